"""Measurement for the ``norms`` check: reads the cached step outputs of the first batches (no extra forward) and
returns plain data; judging is in ``rules``."""

from __future__ import annotations

import math
from typing import Any

from fmcheck.api import Skip

NORM_KEYS = ("x0", "x1", "xt", "v_target")


def measure(ctx) -> dict[str, Any]:
    import torch

    from .maths import channel_stats, distributions, float64, per_sample_norms

    count = len(ctx.batches(ctx.settings.measure_batches))
    outputs = [ctx.outputs(i) for i in range(count)]
    norms: dict[str, list] = {k: [] for k in NORM_KEYS}
    dims: dict[str, int] = {}
    latents: dict[str, list] = {"x0": [], "x1": []}  # the cached outputs themselves (no copies), for histograms
    mu_sq, sigma_sq, moments_n = [], [], 0
    for out in outputs:
        for key in NORM_KEYS:
            if key in out and isinstance(out[key], torch.Tensor) and out[key].dim() >= 1:
                tensor = out[key]
                norms[key].append(per_sample_norms(tensor))
                dims[key] = int(tensor[0].numel())
        for key in latents:
            if isinstance(out[key], torch.Tensor) and out[key].dim() >= 1:
                latents[key].append(out[key].detach())
        if isinstance(out.get("mu"), torch.Tensor) and isinstance(out.get("logvar"), torch.Tensor):
            mu, logvar = float64(out["mu"]), float64(out["logvar"])
            mu_sq.append(mu.pow(2).mean())
            sigma_sq.append(logvar.exp().mean())
            moments_n += 1
    for key in ("x0", "x1"):
        if not norms[key]:
            raise Skip(f"step output '{key}' is not a batched tensor (need shape (B, ...))")
    stats = {}
    for key, parts in norms.items():
        if parts:
            values = torch.cat(parts)
            stats[key] = torch.stack([values.mean(), values.pow(2).mean()])
    channels = {key: channel_stats(parts) for key, parts in latents.items()}
    channel = channels["x1"]
    extra = torch.stack([torch.stack(mu_sq).mean(), torch.stack(sigma_sq).mean()]) if moments_n else None
    # a few small host transfers, after all the device work
    host = {k: v.cpu().tolist() for k, v in stats.items()}
    samples = int(sum(p.numel() for p in norms["x0"]))
    non_finite = {k: int(sum(int((~torch.isfinite(p)).sum()) for p in norms[k])) for k in ("x0", "x1")}
    observation: dict[str, Any] = {
        "batches": count,
        "samples": samples,
        "norms": {k: {"mean": v[0], "rms_per_dim": math.sqrt(v[1] / max(dims[k], 1))}
                  for k, v in host.items()},
        "dims": dims,
        "channel_std": channel[0].cpu().tolist() if channel is not None else None,
        "channel_mean": channel[1].cpu().tolist() if channel is not None else None,
        "mu_rms": None,
        "sigma_rms": None,
        "non_finite_samples": {k: v for k, v in non_finite.items() if v},
        "distributions": distributions(latents, {k: torch.cat(norms[k]) for k in latents}, channels),
    }
    if extra is not None:
        mu_ms, sigma_ms = extra.cpu().tolist()
        observation["mu_rms"], observation["sigma_rms"] = math.sqrt(mu_ms), math.sqrt(sigma_ms)
    return observation
