"""Pure maths of the ``norms`` check: per-sample norms, per-channel statistics and the histograms of the latents
figure. Takes tensors, returns tensors or plain data; nothing here runs the user's code."""

from __future__ import annotations

import math
from typing import Any


def float64(x) -> Any:
    """x detached in float64 (on the CPU for devices without float64, such as MPS)."""
    import torch

    x = x.detach()
    return (x.cpu() if x.device.type == "mps" else x).to(torch.float64)


def per_sample_norms(x) -> Any:
    return float64(x).reshape(x.shape[0], -1).norm(dim=1)


def channel_stats(parts: list) -> Any:
    """(2, C): per-channel std and mean over batch and positions, for image- or video-shaped latents; else None.

    Dimension 1 is the channel of a (B, C, H, W) or (B, C, T, H, W) latent; a 3-d (B, L, C) or (B, C, L) is
    ambiguous, so it gets none. Accumulated batch by batch in float64 (no concatenated copy of a large latent).
    """
    import torch

    if not parts or parts[0].dim() < 4:
        return None
    count, total, squares = 0, 0.0, 0.0
    for part in parts:
        values = float64(part).transpose(0, 1).reshape(part.shape[1], -1)
        count += values.shape[1]
        total = total + values.sum(dim=1)
        squares = squares + values.pow(2).sum(dim=1)
    mean = total / count
    variance = (squares - count * mean.pow(2)).clamp_min(0) / max(count - 1, 1)
    return torch.stack([variance.sqrt(), mean])


HISTOGRAM_BINS = 80
QUANTILE_SAMPLE = 200_000  # torch.quantile refuses very large inputs; a fixed-stride subsample is plenty for a range


def finite_flat(part) -> Any:
    import torch

    values = float64(part).reshape(-1)
    return values[torch.isfinite(values)]


def distributions(values: dict[str, list], norms: dict[str, Any], channels: dict[str, Any]) -> dict[str, Any]:
    """Histograms of z0 and z1 on shared bins, and their per-channel statistics: the data of the latents figure.

    Element values share linear bins over the central 99.8% of both (so the narrower one shows as a spike inside
    the wider one); per-sample norms share log-spaced bins (they can differ by orders of magnitude). Batch by batch:
    a video latent is never copied whole.
    """
    import torch

    out: dict[str, Any] = {"values": None, "norms": None, "channels": {}}
    elements = {k: sum(p.numel() for p in parts) for k, parts in values.items()}
    ends = []
    for key, parts in values.items():
        stride = max(1, elements[key] // QUANTILE_SAMPLE)
        sample = torch.cat([finite_flat(p)[::stride] for p in parts]) if parts else None
        if sample is not None and sample.numel():
            ends.append(torch.quantile(sample, torch.tensor([0.001, 0.999], dtype=sample.dtype,
                                                            device=sample.device)).cpu().tolist())
    if ends:
        low, high = min(e[0] for e in ends), max(e[1] for e in ends)
        if high <= low:
            low, high = low - 0.5, high + 0.5
        counts, outside = {}, {}
        for key, parts in values.items():
            if not parts:
                continue
            histogram, beyond, finite = 0, 0, 0
            for part in parts:
                flat = finite_flat(part)
                histogram = histogram + torch.histc(flat, HISTOGRAM_BINS, low, high)
                beyond = beyond + ((flat < low) | (flat > high)).sum()
                finite += flat.numel()
            counts[key] = histogram.cpu().tolist()
            outside[key] = float(beyond) / finite if finite else 0.0
        out["values"] = {"edges": torch.linspace(low, high, HISTOGRAM_BINS + 1).tolist(), "counts": counts,
                         "outside": outside}
    positive = {k: v[torch.isfinite(v) & (v > 0)].cpu().double() for k, v in norms.items()}
    positive = {k: v for k, v in positive.items() if v.numel()}
    if positive:
        low = min(float(v.min()) for v in positive.values()) * 0.9
        high = max(float(v.max()) for v in positive.values()) * 1.1
        edges = torch.logspace(math.log10(low), math.log10(high), 41, dtype=torch.float64)
        out["norms"] = {"edges": edges.tolist(),
                        "counts": {k: torch.histogram(v, bins=edges).hist.tolist() for k, v in positive.items()}}
    for key, stats in channels.items():
        if stats is not None:
            std, mean = stats.cpu().tolist()
            out["channels"][key] = {"std": std, "mean": mean}
    return out


