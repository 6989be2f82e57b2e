"""The `scale` check's tensor reductions: latents to per-channel sums on the tensors' own device, handed back as one
small CPU tensor (then plain numbers: :mod:`.maths`). Used by ``measure``; torch is imported inside functions."""

from __future__ import annotations

import math

from .maths import Fit


def channels_first(t, channels: int):
    """(B, C, ...) -> (C, B * ...) float32 (a view where possible)."""
    return t.detach().float().transpose(0, 1).reshape(channels, -1)


def moments_of(t, channels: int):
    """Per-channel (mean, var) of a (B, C, ...) tensor as two (C,) tensors (population variance)."""
    x = channels_first(t, channels)
    mean = x.mean(1)
    var = (x - mean[:, None]).pow(2).mean(1)
    return mean, var


def affine_fit(x, y):
    """Least-squares ``y = slope * x + offset`` per row of two (C, M) tensors.

    Returns a (8, C) tensor of rows: slope, offset, residual variance, var x, mean x, var y, mean y, count.
    A row whose x has no variance gets slope 0 (its y is then its mean: the offset).
    """
    import torch

    x = x.double() if x.device.type == "cpu" else x.float()
    y = y.to(x.dtype)
    mean_x, mean_y = x.mean(1), y.mean(1)
    xc, yc = x - mean_x[:, None], y - mean_y[:, None]
    var_x, var_y = xc.pow(2).mean(1), yc.pow(2).mean(1)
    cov = (xc * yc).mean(1)
    tiny = torch.finfo(x.dtype).tiny
    slope = torch.where(var_x > tiny, cov / var_x.clamp_min(tiny), torch.zeros_like(cov))
    offset = mean_y - slope * mean_x
    resid = (yc - slope[:, None] * xc).pow(2).mean(1)
    count = torch.full_like(slope, float(x.shape[1]))
    return torch.stack([slope, offset, resid, var_x, mean_x, var_y, mean_y, count]).float()



def fit(x, y, channels: int) -> Fit:
    """Fit ``y = slope[c] * x + offset[c]`` for two aligned (B, C, ...) tensors; one host transfer."""
    import torch

    xs, ys = channels_first(x, channels), channels_first(y, channels)
    rows = torch.cat([affine_fit(xs, ys), affine_fit(xs.reshape(1, -1), ys.reshape(1, -1))], dim=1).cpu().tolist()
    per_channel = [row[:channels] for row in rows]
    overall = [row[channels:] for row in rows]
    return Fit.from_rows(per_channel, overall)


def align(z, reference):
    """``z`` in the layout of ``reference`` when only its shape differs (a flattened latent), else None."""
    if tuple(z.shape) == tuple(reference.shape):
        return z
    if z.numel() == reference.numel() and z.shape[0] == reference.shape[0]:
        return z.reshape(reference.shape)
    return None


def relative_rms(a, b) -> float:
    """RMS(a - b) / RMS(b) as a float."""
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-30))


def psnr(reference, output) -> float:
    """PSNR in dB with the peak-to-peak range of the reference as the peak (2 for [-1, 1] images, 1 for [0, 1])."""
    reference, output = reference.detach().float(), output.detach().float().to(reference.device)
    peak = float(reference.max() - reference.min())
    mse = float((output - reference).pow(2).mean())
    if not math.isfinite(mse):
        return math.nan
    if peak <= 0:
        return math.nan
    return math.inf if mse == 0 else 10.0 * math.log10(peak * peak / mse)
