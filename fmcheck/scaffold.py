"""`fmcheck init`: a commented adapter template for the user to fill in."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import UsageError

TEMPLATE = '''"""fmcheck adapter: exposes this project's training setup to `fmcheck all --module {module}:build`.

Fill in the TODOs with your own objects. Keep `step` the SAME code your training loop runs (one forward, no
backward, no optimizer step): fmcheck is only as useful as it is faithful to your training.
"""

import torch


def build():
    # TODO: construct (or import) your models exactly as training does.
    head = ...          # text head: q_token -> (mu, logvar)
    velocity = ...      # u_theta(x_t, t, cond)
    vae = ...           # the raw diffusers AutoencoderKL (frozen)
    text_encoder = ...  # frozen text encoder / VLM
    optimizer = torch.optim.AdamW([*head.parameters(), *velocity.parameters()], lr=1e-4)
    train_loader = ...  # re-iterable (a DataLoader is fine), yielding your own batch format

    def encode(pixels):
        # pixels -> z1 EXACTLY as training computes its latents, scaling (and shift) included.
        latent = vae.encode(pixels).latent_dist.sample()
        return latent * vae.config.scaling_factor

    def decode(z1):
        # z1 -> pixels EXACTLY as sampling/inference decodes: the inverse of encode.
        return vae.decode(z1 / vae.config.scaling_factor).sample

    def step(batch, step_index):
        # TODO: your training forward. Return `loss` (the scalar you call .backward() on) and as many of the other
        # keys as you have; a check that needs a missing key is skipped and says which.
        q_token = ...                                        # text -> q_token
        mu, logvar = head(q_token)
        logvar = logvar.clamp(-6, 6)
        eps = torch.randn_like(mu)
        x0 = mu + torch.exp(0.5 * logvar) * eps              # reparameterised sample z0
        with torch.no_grad():
            x1 = encode(batch["pixels"])                     # z1
        t = torch.rand(x0.shape[0], device=x0.device)
        tt = t.view(-1, *([1] * (x0.dim() - 1)))
        xt = (1 - tt) * x0 + tt * x1
        v_target = (x1 - x0).detach()
        v_pred = velocity(xt, t, q_token)
        fm_loss = torch.nn.functional.mse_loss(v_pred, v_target)
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).flatten(1).sum(1).mean()   # unweighted
        kl_weight = 1e-4 * min(1.0, step_index / (0.1 * TOTAL_STEPS))                  # warmup
        loss = fm_loss + kl_weight * kl
        return {{
            "loss": loss, "x0": x0, "x1": x1, "t": t, "xt": xt, "v_target": v_target, "v_pred": v_pred,
            "mu": mu, "logvar": logvar, "kl": kl, "kl_weight": kl_weight, "fm_loss": fm_loss, "eps": eps,
        }}

    return {{
        "step": step,
        "batches": train_loader,
        "trainable": {{"head": head, "velocity": velocity}},
        "optimizer": optimizer,
        "frozen": {{"vae": vae, "text_encoder": text_encoder}},
        "vae": vae,
        "encode": encode,
        "decode": decode,
        # "pixels": lambda batch: batch["pixels"],   # how to find the pixels in YOUR batch format
        "total_steps": TOTAL_STEPS,
        "velocity": velocity,                        # `target` asks the loss what it trains this output toward
        # "prediction": "velocity",                  # or "epsilon" / "sample", if your sampler converts from those
        # "grad_scaler": scaler,                     # if training uses fp16 autocast with a GradScaler
        # "generators": {{"noise": noise_gen}},      # torch.Generators your step draws from, if fmcheck cannot
        #                                            # find them (it looks in the DataLoader, the step's closure
        #                                            # and its object): restored afterwards, replayed in overfit
        # The extras of your training loop, which `overfit` runs where your loop runs them:
        # "before_optimizer_step": lambda: torch.nn.utils.clip_grad_norm_(
        #     [*head.parameters(), *velocity.parameters()], 1.0),   # after backward (and scaler.unscale_), before
        #                                                           # optimizer.step()
        # "lr_scheduler": scheduler,                 # stepped after each optimizer step (state restored afterwards)
    }}


TOTAL_STEPS = 100_000  # TODO: the planned length of the run (the KL warmup audit reads it)
'''


def write_template(path: str) -> Path:
    target = Path(path)
    if target.is_dir() or path.endswith(("/", os.sep)):  # a folder, existing or to be made
        target = target / "fmcheck_adapter.py"
    if target.suffix != ".py":
        raise UsageError(f"init {path}: the adapter must be a .py file (or name a folder)")
    if target.exists():
        raise UsageError(f"init: {target} already exists; not overwriting it")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "x") as handle:  # "x": never overwrite, even a file that appeared meanwhile
            handle.write(TEMPLATE.format(module=target.stem))
    except OSError as exc:
        raise UsageError(f"init {path}: cannot write {target} ({exc.strerror or exc})") from exc
    return target


def run_hint(target: Path) -> str:
    """The command that runs fmcheck on a freshly written adapter, from the current folder."""
    try:
        relative = target.resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        return f"cd {target.parent} && fmcheck all --module {target.stem}:build"
    module = ".".join(relative.with_suffix("").parts)
    if len(relative.parts) > 1 and not all((Path.cwd() / Path(*relative.parts[:i]) / "__init__.py").exists()
                                           for i in range(1, len(relative.parts))):
        return f"cd {target.parent} && fmcheck all --module {target.stem}:build"
    return f"fmcheck all --module {module}:build"
