"""Benchmark of the `overfit` check (not a test): its loop's overhead against a plain training loop, and the steps
and seconds it takes to reach a verdict on the digits pipeline.

    python bench/overfit_overhead.py [--steps 60] [--repeats 3] [--device cpu|cuda] [--pipeline tiny|digits|dit]

Overhead: the same N steps (same batches, same step indices, zero_grad / backward / optimizer.step) run as a raw
loop and inside the check (rules that can never decide, so it runs exactly N steps); repeats alternate the two to
even out a shared machine's load. Per-step `.item()` logging is timed too, as the reference that deferred reads
must beat. `--pipeline dit` is a DiT-B-sized transformer step on random latents, for a GPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

NEVER = {"cos_pass": 1.0, "loss_drop": 0.999999, "fresh_loss_drop": 0.999999, "fresh_cos_gain": 1.0,
         "trend_after": 1.0, "scale_fail": 1e30, "scale_warn": 1e30, "diverge": 1e30}


def build(name: str, device: str) -> dict:
    import torch

    if name == "tiny":
        import tiny

        pipeline = tiny.build()
    elif name == "digits":
        from fixtures.digits import DigitsPipeline

        pipeline = DigitsPipeline().to_pipeline()
    else:
        pipeline = dit_pipeline(device)
    for module in pipeline["trainable"].values():
        module.to(device)
    for module in (pipeline.get("frozen") or {}).values():
        module.to(device)
    pipeline["batches"] = [_to(b, device) for b in list(pipeline["batches"])[:2]]
    torch.manual_seed(0)
    return pipeline


def _to(batch, device):
    import torch

    if isinstance(batch, dict):
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return batch


def dit_pipeline(device: str) -> dict:
    """A DiT-B-sized velocity net (12 blocks, width 768, 12 heads) on 4x32x32 latents, patch 2: 256 tokens."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, width=768, heads=12):
            super().__init__()
            self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
            self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
            self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
            self.mod = nn.Linear(width, 2 * width)

        def forward(self, h, c):
            scale, shift = self.mod(c).unsqueeze(1).chunk(2, dim=-1)
            x = self.norm1(h) * (1 + scale) + shift
            h = h + self.attn(x, x, x, need_weights=False)[0]
            return h + self.mlp(self.norm2(h))

    class DiT(nn.Module):
        def __init__(self, width=768, depth=12):
            super().__init__()
            self.patch = nn.Conv2d(4, width, 2, 2)
            self.time = nn.Sequential(nn.Linear(1, width), nn.SiLU(), nn.Linear(width, width))
            self.text = nn.Linear(384, width)
            self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
            self.out = nn.Linear(width, 4 * 2 * 2)

        def forward(self, xt, t, q):
            b = xt.shape[0]
            h = self.patch(xt).flatten(2).transpose(1, 2)
            c = self.time(t[:, None]) + self.text(q)
            for block in self.blocks:
                h = block(h, c)
            out = self.out(h).view(b, 16, 16, 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
            return out.reshape(b, 4, 32, 32)

    head = nn.Sequential(nn.Linear(384, 1024), nn.SiLU(), nn.Linear(1024, 1024), nn.SiLU(), nn.Linear(1024, 8192))
    dit = DiT()
    gen = torch.Generator().manual_seed(0)
    batches = [{"q": torch.randn(32, 384, generator=gen), "x1": torch.randn(32, 4, 32, 32, generator=gen)}
               for _ in range(2)]

    def step(batch, step_index):
        mu, logvar = head(batch["q"]).view(-1, 2, 4, 32, 32).unbind(1)
        logvar = logvar.clamp(-6, 6)
        eps = torch.randn_like(mu)
        x0 = mu + (0.5 * logvar).exp() * eps
        x1 = batch["x1"]
        t = torch.rand(x0.shape[0], device=x0.device)
        xt = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * x1
        v_target = (x1 - x0).detach()
        with torch.autocast(x0.device.type, dtype=torch.bfloat16, enabled=x0.device.type == "cuda"):
            v_pred = dit(xt, t, batch["q"]).float()
        fm_loss = (v_pred - v_target).pow(2).mean()
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).mean()
        loss = fm_loss + 0.01 * kl
        return {"loss": loss, "x0": x0, "x1": x1, "t": t, "xt": xt, "v_target": v_target, "v_pred": v_pred,
                "mu": mu, "logvar": logvar, "kl": kl, "kl_weight": 0.01, "fm_loss": fm_loss, "eps": eps}

    params = [*head.parameters(), *dit.parameters()]
    return {"step": step, "batches": batches, "trainable": {"head": head, "velocity": dit},
            "optimizer": torch.optim.AdamW(params, lr=1e-4), "total_steps": 100_000, "velocity": dit}


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def raw_loop(pipeline: dict, steps: int, device: str, start: int, log_items: bool = False) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of a plain training loop."""
    step, batches, optimizer = pipeline["step"], pipeline["batches"], pipeline["optimizer"]
    _sync(device)
    began, cpu = time.perf_counter(), time.process_time()
    for index in range(steps):
        optimizer.zero_grad(set_to_none=True)
        out = step(batches[index % len(batches)], start + index)
        out["loss"].backward()
        optimizer.step()
        if log_items:  # what a per-step logger does: host syncs every step
            for key in ("loss", "fm_loss", "kl"):
                out[key].item()
    _sync(device)
    return time.perf_counter() - began, time.process_time() - cpu


def check_loop(pipeline: dict, steps: int, device: str) -> tuple[float, float]:
    from fmcheck.config import Settings
    from fmcheck.contract import coerce
    from fmcheck.runner import run

    from fmcheck.context import batch_size

    samples = sum(batch_size(b) for b in pipeline["batches"])  # both batches, as the raw loop cycles them
    settings = Settings(device=device, max_steps=steps, time_budget=1e6, timeout=1e6, samples=samples,
                        thresholds={"overfit": NEVER})
    report = run(coerce(pipeline), settings, only=["overfit"])
    result = report.check("overfit")
    assert result.details.get("steps_run") == steps, (result.summary, result.error)
    return result.details["timing"]["seconds_run"], result.details["timing"]["cpu_seconds_run"]


def overhead(args) -> None:
    import torch

    pipeline = build(args.pipeline, args.device)
    pipeline["total_steps"] = 200_000
    start = pipeline["total_steps"] // 2
    raw_loop(pipeline, 3, args.device, start)  # warm-up (allocator, kernels)
    raw, logged, checked = [], [], []
    for _ in range(args.repeats):
        raw.append(raw_loop(pipeline, args.steps, args.device, start))
        logged.append(raw_loop(pipeline, args.steps, args.device, start, log_items=True))
        checked.append(check_loop(pipeline, args.steps, args.device))
    print(f"device {args.device} ({torch.cuda.get_device_name() if args.device.startswith('cuda') else 'cpu'}), "
          f"torch threads {torch.get_num_threads()}, pipeline {args.pipeline}, {args.steps} steps x {args.repeats}")
    for index, clock in enumerate(("wall", "cpu")):
        r, lg, c = (statistics.median(x[index] for x in runs) for runs in (raw, logged, checked))
        # the fastest run of each side too: on a shared machine load only ever adds time (as timeit advises)
        r_min, c_min = (min(x[index] for x in runs) for runs in (raw, checked))
        print(f"[{clock}] raw loop median {r:.3f} s ({1000 * r / args.steps:.2f} ms/step); per-step .item() "
              f"{100 * (lg / r - 1):+.1f}%; fmcheck loop {100 * (c / r - 1):+.1f}% (medians), "
              f"{100 * (c_min / r_min - 1):+.1f}% (fastest runs)  "
              f"(raw runs {[round(x[index], 3) for x in raw]}, fmcheck runs {[round(x[index], 3) for x in checked]})")


def verdict_time(args) -> None:
    from fmcheck.config import Settings
    from fmcheck.contract import coerce
    from fmcheck.runner import run

    from fixtures.digits import build as digits

    report = run(coerce(digits()), Settings(device=args.device), only=["overfit"])
    result = report.check("overfit")
    steps = next(m.value for m in result.measurements if m.name == "steps to verdict")
    seconds = next(m.value for m in result.measurements if m.name == "seconds to verdict")
    print(f"digits verdict: {result.verdict.value} after {steps} steps, {seconds} s (check total "
          f"{result.duration_s:.1f} s): {result.summary}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--pipeline", default="digits", choices=("tiny", "digits", "dit"))
    parser.add_argument("--skip-verdict", action="store_true", help="only the overhead comparison")
    args = parser.parse_args()
    overhead(args)
    if not args.skip_verdict:
        verdict_time(args)


if __name__ == "__main__":
    main()
