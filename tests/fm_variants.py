"""Small synthetic flow-matching pipelines with switchable conventions and planted bugs, for the `norms` and `target`
tests (fast: no text encoder, no real VAE). ``build(**options)`` returns a dict pipeline; every option defaults to a
correct pipeline: a text head (mu, logvar) -> reparameterised x0, a frozen linear "VAE" making x1, x_t on the linear
path with t=1 at the data, v* = (x1 - x0).detach().
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Optional

import torch
from torch import nn

SHAPE = (4, 4, 4)
DIM = math.prod(SHAPE)
TEXT = 8


class Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(TEXT, 32), nn.SiLU(), nn.Linear(32, 2 * DIM))

    def forward(self, q):
        mu, logvar = self.net(q).chunk(2, dim=-1)
        return mu.view(-1, *SHAPE), logvar.view(-1, *SHAPE)


class Velocity(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(DIM + 1 + TEXT, 64), nn.SiLU(), nn.Linear(64, DIM))

    def forward(self, xt, t, q):
        features = torch.cat([xt.flatten(1).float(), t.reshape(xt.shape[0], -1)[:, :1].float(), q], dim=1)
        return self.net(features).view(-1, *SHAPE)


class LinearVae(nn.Module):
    """A stand-in for a frozen VAE: a fixed linear map from 'pixels' to a (4, 4, 4) latent."""

    def __init__(self, scaling_factor: float) -> None:
        super().__init__()
        self.lin = nn.Linear(DIM, DIM)
        self.config = SimpleNamespace(scaling_factor=scaling_factor, shift_factor=None)

    def encode(self, pixels):
        return self.lin(pixels.flatten(1)).view(-1, *SHAPE)

    def decode(self, latents):
        return latents


def _coefficients(path: str, t):
    """(a, b, a', b') of x_t = a(t) x0 + b(t) x1."""
    one = torch.ones_like(t)
    if path == "linear":
        return 1 - t, t, -one, one
    if path == "reversed":
        return t, 1 - t, one, -one
    if path == "cosine":
        half_pi = math.pi / 2
        return (half_pi * t).cos(), (half_pi * t).sin(), -half_pi * (half_pi * t).sin(), half_pi * (half_pi * t).cos()
    raise ValueError(f"unknown path {path!r}")


def build(*, path: str = "linear", target: str = "velocity", detach: bool = True, head: bool = True,
          z0_detached: bool = False, t_units: float = 1.0, t_mode: str = "per_sample", t_shape: str = "flat",
          xt_noise: float = 0.0, xt_half: bool = False, x1_scale: float = 1.0, x0_scale: float = 1.0,
          channel_scale: Optional[list[float]] = None, vae_grad: bool = False, vae_scaling_factor: float = 1.0,
          outputs_without: tuple[str, ...] = (), seed: int = 0, batches: int = 8,
          batch_size: int = 32) -> dict:
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        text_head, velocity, vae = Head(), Velocity(), LinearVae(vae_scaling_factor)
    # make the VAE produce unit-variance latents from unit-variance pixels, before the pipeline's own scaling
    with torch.no_grad():
        vae.lin.weight.copy_(torch.linalg.qr(torch.randn(DIM, DIM, generator=gen))[0])
        vae.lin.bias.zero_()
    vae.requires_grad_(vae_grad)
    total = batches * batch_size
    q_all = torch.randn(total, TEXT, generator=gen)
    pixels_all = torch.randn(total, DIM, generator=gen)
    data = [{"q": q_all[i:i + batch_size], "pixels": pixels_all[i:i + batch_size]}
            for i in range(0, total, batch_size)]
    channels = torch.tensor(channel_scale).view(1, -1, 1, 1) if channel_scale is not None else None

    def encode(pixels):
        if vae_grad:
            latents = vae.encode(pixels)
        else:
            with torch.no_grad():
                latents = vae.encode(pixels)
        latents = latents / vae_scaling_factor * x1_scale  # vae_scaling_factor != 1: the scaling is "forgotten"
        return latents * channels if channels is not None else latents

    def step(batch, step_index):
        q = batch["q"]
        n = q.shape[0]
        x1 = encode(batch["pixels"])
        out: dict = {}
        if head:
            mu, logvar = text_head(q)
            mu, logvar = mu * x0_scale, logvar.clamp(-6, 6) + 2 * math.log(x0_scale)
            eps = torch.randn_like(mu)
            x0 = mu + torch.exp(0.5 * logvar) * eps
            out.update(mu=mu, logvar=logvar, eps=eps, kl=0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).mean(),
                       kl_weight=0.0)
        else:
            eps = x0 = torch.randn(n, *SHAPE) * x0_scale
        if t_mode == "per_sample":
            t = torch.rand(n)
        elif t_mode == "per_batch":
            t = torch.rand(1).expand(n)
        elif t_mode == "constant":
            t = torch.full((n,), 0.5)
        elif t_mode == "two_values":
            t = torch.where(torch.rand(n) < 0.5, 0.25, 0.75)
        elif t_mode == "shuffled":  # x_t built with one t, another t returned
            t = torch.rand(n)
        else:
            raise ValueError(t_mode)
        a, b, da, db = (c.view(-1, 1, 1, 1) for c in _coefficients(path, t))
        source = x0.detach() if z0_detached else x0
        xt = a * source + b * x1
        if xt_noise:
            xt = xt + xt_noise * torch.randn_like(xt)
        if xt_half:
            xt = xt.half().float()
        velocity_true = da * x0 + db * x1
        v_target = {"velocity": velocity_true, "flipped": -velocity_true, "eps": eps, "x0": x0, "x1": x1,
                    "half": 0.5 * velocity_true, "double": 2.0 * velocity_true}[target]
        if detach:
            v_target = v_target.detach()
        t_out = t[torch.randperm(n)] if t_mode == "shuffled" else t
        t_out = t_out * t_units
        if t_shape == "broadcast":
            t_out = t_out.view(-1, 1, 1, 1)
        v_pred = velocity(xt, t_out, q)
        fm_loss = ((v_pred - v_target) ** 2).mean()
        out.update(x0=x0, x1=x1, t=t_out, xt=xt, v_target=v_target, v_pred=v_pred, fm_loss=fm_loss,
                   loss=fm_loss + out.get("kl_weight", 0.0) * out.get("kl", 0.0))
        for key in outputs_without:
            out.pop(key, None)
        return out

    trainable = {"head": text_head, "velocity": velocity} if head else {"velocity": velocity}
    parameters = [p for module in trainable.values() for p in module.parameters()]
    return {"step": step, "batches": data, "trainable": trainable, "frozen": {"vae": vae}, "vae": vae,
            "encode": encode, "optimizer": torch.optim.AdamW(parameters, lr=1e-3), "total_steps": 1000,
            "velocity": velocity}
