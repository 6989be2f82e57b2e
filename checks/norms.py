"""`norms`: are z0 (the source x0) and z1 (the data latent x1) in the same units?

The seed's first lesson: with ||x0|| ~ 150 and ||x1|| ~ 900-1200 the velocity v* = x1 - x0 is all x1, and the head
and its KL stall. This check reads the cached step outputs of a few batches and compares the per-sample L2 norms.
"""

from __future__ import annotations

import math
from typing import Any, Optional

from pydantic import Field

from fmcheck.api import Check, CheckDoc, Judgement, Skip, Thresholds
from fmcheck.judges import flag, info, ratio_within
from fmcheck.verdict import Verdict

NORM_KEYS = ("x0", "x1", "xt", "v_target")
LABELS = {"x0": "||x0||", "x1": "||x1||", "xt": "||x_t||", "v_target": "||v_target||"}


class NormsThresholds(Thresholds):
    ratio_warn: float = Field(2.0, ge=1, description="E||x1|| / E||x0|| within this factor (either way) passes")
    ratio_fail: float = Field(3.0, ge=1, description="E||x1|| / E||x0|| beyond this factor (either way) fails; "
                                                     "between ratio_warn and ratio_fail warns")
    channel_spread_warn: Optional[float] = Field(
        4.0, ge=1, description="largest / smallest per-channel std of x1 above this warns (a few channels dominate "
                               "v*: per-channel latents_mean/latents_std not applied); unset to turn off")


def _float64(x) -> Any:
    """x detached in float64 (on the CPU for devices without float64, such as MPS)."""
    import torch

    x = x.detach()
    return (x.cpu() if x.device.type == "mps" else x).to(torch.float64)


def _per_sample_norms(x) -> Any:
    return _float64(x).reshape(x.shape[0], -1).norm(dim=1)


class NormsCheck(Check):
    id = "norms"
    title = "Norms of x0, x1, x_t, v*"
    purpose = "z0 and z1 in the same units: E||x1|| / E||x0|| within 2x, per-dim RMS, per-channel std of x1."
    order = 20
    requires_outputs = ("x0", "x1")
    Thresholds = NormsThresholds
    doc = CheckDoc(
        what=(
            "From the cached step outputs of the first `measure_batches` batches (default 4; no extra forward), "
            "per sample: the L2 norms of x0 (the source z0), x1 (the data latent z1), x_t and v_target, each "
            "flattened over all non-batch dimensions; their means over all samples (E||.||); the per-dimension RMS "
            "(E||x||^2 / D, square-rooted: about 1 for a unit-variance latent, whatever its size); and, when x1 has "
            "a channel dimension ((B, C, H, W) or (B, C, T, H, W)), the std and mean of every channel of x1. When "
            "the step returns mu and logvar, the per-dimension RMS of mu and of sigma = exp(logvar / 2) are "
            "reported too, to tell a large head mean from a large head variance.\n\n"
            "Verdict: the ratio E||x1|| / E||x0||, pass within `ratio_warn` (2x) either way, warn within "
            "`ratio_fail` (3x), fail beyond (the seed's 2-3x rule). A spread of the per-channel std of x1 "
            "(largest / smallest) above `channel_spread_warn` warns. NaN or Inf in x0 or x1 fails with the number "
            "of samples affected: their norms, and the ratio, are then not defined. The hint says which side is "
            "off scale; the cause of a mis-scaled x1 is named by `fmcheck scale`, which sees the VAE's own latents."
        ),
        why=(
            "In flow matching the target v* = x1 - x0 (and x_t) mixes both endpoints in absolute units. If x1 is "
            "6x larger than x0, v* is almost only x1: the velocity net learns to ignore the text head's sample, the "
            "head gets almost no useful gradient through x_t and its KL term dominates it, and it stalls. The seed "
            "reports exactly this: ||x0|| ~ 151-155 against ||x1|| ~ 896-1224, caused by a VAE latent that was "
            "neither sampled nor scaled consistently. A few channels of x1 with a much larger std than the others "
            "dominate v* the same way."
        ),
        bug_example=(
            "```python\n"
            "z1 = vae.encode(x).latent_dist.sample()                    # scaling_factor forgotten: ||z1|| ~ 5.5x\n"
            "z1 = vae.encode(x).latent_dist.sample() * sf * sf          # scaled twice: ||z1|| ~ sf x\n"
            "r = z1.pow(2).mean().sqrt() / z0.pow(2).mean().sqrt()      # the wrong fix: a ratio correction\n"
            "```\n"
            "fmcheck reports, for the first (SD-style VAE, scaling_factor 0.18215): `E||x1|| / E||x0|| = 5.5: x1 (the "
            "data latent) is 5.5x larger; v* = x1 - x0 is dominated by it`, with the hint that x1 is the side off "
            "scale (per-dimension RMS 5.5 where a unit-variance latent has ~1). Which scaling mistake it is, is the "
            "`scale` check's to name: it compares z1 with the VAE's own latents."
        ),
        fix=(
            "Fix the scale where it is made, not with a ratio correction. For x1: apply the VAE's "
            "`scaling_factor` exactly once when encoding (and divide by it exactly once when decoding), subtract "
            "`shift_factor` first if the VAE has one, use per-channel `latents_mean`/`latents_std` if the VAE "
            "defines them; `fmcheck scale` identifies which of these is wrong. For x0: bound the head's output "
            "scale (a smaller init of its last layer, a logvar clamp, the KL term). Do not multiply one side by "
            "r = ||x1|| / ||x0||: it hides the mismatch, changes from batch to batch, and the sampler (which starts "
            "from the head's z0 without that factor) no longer matches training."
        ),
        causes=(
            "the VAE scaling_factor missing (x1 ~ 1/scaling_factor too large, e.g. ~5.5x for 0.18215)",
            "the scaling_factor applied twice (x1 too small by that factor) or divided instead of multiplied",
            "shift_factor or per-channel latents_mean/latents_std ignored (one channel dominates)",
            "the posterior mean used where training expects a sample, or the other way round (small change in norm, "
            "large in per-channel statistics)",
            "a text head with a large output scale at init (mu or sigma far from 1 per dimension)",
        ),
        blind_spots=(
            "Norm ratios cannot see a wrong sign or a wrong target; the `target` check does.",
            "A source distribution deliberately wider or narrower than the data (by design) will warn or fail; "
            "raise `ratio_warn` / `ratio_fail` if that is intended.",
            "Per-channel statistics assume dimension 1 of x1 is the channel dimension and are computed only for "
            "image- or video-shaped latents ((B, C, H, W), (B, C, T, H, W)); token-shaped (B, L, C) and flat "
            "(B, D) latents get none.",
        ),
    )

    def measure(self, ctx) -> dict[str, Any]:
        import torch

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
                    norms[key].append(_per_sample_norms(tensor))
                    dims[key] = int(tensor[0].numel())
            for key in latents:
                if isinstance(out[key], torch.Tensor) and out[key].dim() >= 1:
                    latents[key].append(out[key].detach())
            if isinstance(out.get("mu"), torch.Tensor) and isinstance(out.get("logvar"), torch.Tensor):
                mu, logvar = _float64(out["mu"]), _float64(out["logvar"])
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
        channels = {key: _channel_stats(parts) for key, parts in latents.items()}
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
            "distributions": _distributions(latents, {k: torch.cat(norms[k]) for k in latents}, channels),
        }
        if extra is not None:
            mu_ms, sigma_ms = extra.cpu().tolist()
            observation["mu_rms"], observation["sigma_rms"] = math.sqrt(mu_ms), math.sqrt(sigma_ms)
        return observation

    def judge(self, obs: dict[str, Any], th: NormsThresholds) -> Judgement:
        norms = obs["norms"]
        n0, n1 = norms["x0"]["mean"], norms["x1"]["mean"]
        non_finite = [k for k in ("x0", "x1") if not math.isfinite(norms[k]["mean"])]
        ratio = n1 / n0 if n0 > 0 else math.inf
        if non_finite:
            ratio = math.nan  # a ratio of NaN/Inf norms is no measurement of units
        measurements = [ratio_within("E||x1|| / E||x0||", ratio, warn_factor=th.ratio_warn, fail_factor=th.ratio_fail)]
        for key in NORM_KEYS:
            if key in norms:
                measurements.append(info(f"E{LABELS[key]}", norms[key]["mean"],
                                         note=f"per-sample L2 over {obs['dims'][key]} dims"))
        for key in NORM_KEYS:
            if key in norms:
                measurements.append(info(f"per-dim RMS {key}", norms[key]["rms_per_dim"],
                                         note="a unit-variance latent has ~1" if key in ("x0", "x1") else ""))
        if obs["mu_rms"] is not None:
            measurements.append(info("per-dim RMS mu", obs["mu_rms"]))
            measurements.append(info("per-dim RMS sigma", obs["sigma_rms"]))
        spread = None
        if obs["channel_std"]:
            stds = obs["channel_std"]
            low = min(stds)
            spread = max(stds) / low if low > 0 else math.inf
            measurements.append(info("x1 per-channel std", ", ".join(f"{s:.3g}" for s in stds)))
            measurements.append(info("x1 per-channel mean", ", ".join(f"{m:.3g}" for m in obs["channel_mean"])))
            if th.channel_spread_warn is not None:
                measurements.append(flag("x1 channel std spread (max/min)", spread <= th.channel_spread_warn,
                                         value=spread, unit="x", expected=f"<= {th.channel_spread_warn:g}",
                                         bad=Verdict.WARN))
        # the data of the latents figure (`--plot`): histograms on shared bins and per-channel statistics
        latents = {**obs["distributions"], "mean_norm": {"x0": n0, "x1": n1}, "ratio": ratio}
        judgement = Judgement(measurements=measurements, summary="", details={"samples": obs["samples"],
                                                                               "batches": obs["batches"],
                                                                               "latents": latents})
        if non_finite:
            counts = obs.get("non_finite_samples", {})
            where = ", ".join(f"{k} ({counts[k]} of {obs['samples']} samples)" if k in counts else k
                              for k in non_finite)
            judgement.summary = (f"non-finite values (NaN/Inf) in {where}: the norms, and their ratio, are not "
                                 "defined")
            judgement.hint = ("Find where the step's x0/x1 turn NaN/Inf (the structure check names the output and "
                              "batch) and fix that first; the norm ratio is measurable once they are finite.")
            return judgement
        verdict = judgement.final_verdict()
        head = (f"E||x1|| / E||x0|| = {_ratio_text(ratio)} (E||x0|| {n0:.4g}, E||x1|| {n1:.4g}, "
                f"{obs['samples']} samples)")
        if verdict is Verdict.PASS:
            judgement.summary = f"{head}: z0 and z1 in the same units"
            return judgement
        ratio_bad = measurements[0].verdict is not Verdict.PASS
        if ratio_bad:
            bigger = "x1 (the data latent)" if ratio > 1 else "x0 (the source)"
            factor = max(ratio, 1 / ratio) if ratio > 0 else math.inf
            judgement.summary = f"{head}: {bigger} is {_larger_text(factor)}; v* = x1 - x0 is dominated by it"
            judgement.hint = _ratio_hint(obs, ratio)
        else:
            judgement.summary = (f"x1 per-channel std spread {spread:.3g}x (stds {obs['channel_std']}); "
                                 f"a few channels dominate v*. {head}")
            judgement.hint = ("Normalise the latent per channel as the VAE defines it (latents_mean / latents_std in "
                              "its config: z1 = (z - mean) / std * scaling_factor), or check `fmcheck scale`; do not "
                              "rescale channels by hand-tuned factors.")
        return judgement


def _ratio_text(ratio: float) -> str:
    """The ratio with 3 significant digits, more when 3 would print a ratio that is not 1 as 1."""
    text = f"{ratio:.3g}"
    return f"{ratio:.6g}" if text == "1" and ratio != 1 else text


def _larger_text(factor: float) -> str:
    """'5.52x larger', or '0.03% larger' for a factor so close to 1 that 'x' would print '1x larger'."""
    if factor < 1.1:
        return f"{(factor - 1) * 100:.2g}% larger"
    return f"{factor:.3g}x larger"


def _channel_stats(parts: list) -> Any:
    """(2, C): per-channel std and mean over batch and positions, for image- or video-shaped latents; else None.

    Dimension 1 is the channel of a (B, C, H, W) or (B, C, T, H, W) latent; a 3-d (B, L, C) or (B, C, L) is
    ambiguous, so it gets none. Accumulated batch by batch in float64 (no concatenated copy of a large latent).
    """
    import torch

    if not parts or parts[0].dim() < 4:
        return None
    count, total, squares = 0, 0.0, 0.0
    for part in parts:
        values = _float64(part).transpose(0, 1).reshape(part.shape[1], -1)
        count += values.shape[1]
        total = total + values.sum(dim=1)
        squares = squares + values.pow(2).sum(dim=1)
    mean = total / count
    variance = (squares - count * mean.pow(2)).clamp_min(0) / max(count - 1, 1)
    return torch.stack([variance.sqrt(), mean])


HISTOGRAM_BINS = 80
QUANTILE_SAMPLE = 200_000  # torch.quantile refuses very large inputs; a fixed-stride subsample is plenty for a range


def _finite_flat(part) -> Any:
    import torch

    values = _float64(part).reshape(-1)
    return values[torch.isfinite(values)]


def _distributions(values: dict[str, list], norms: dict[str, Any], channels: dict[str, Any]) -> dict[str, Any]:
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
        sample = torch.cat([_finite_flat(p)[::stride] for p in parts]) if parts else None
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
                flat = _finite_flat(part)
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


def _ratio_hint(obs: dict[str, Any], ratio: float) -> str:
    """Which side is off scale, in per-dimension RMS, and where the cause is named. The cause of a mis-scaled x1
    (scaling missing, applied twice, inverted, a config that does not fit the VAE, a shift ignored) is the scale
    check's to name: it compares z1 with the VAE's own latents, which this check never sees, so nothing here guesses
    it from the scaling_factor (a guess that assumes raw latents of std 1 contradicts scale whenever they are not)."""
    rms0 = obs["norms"]["x0"]["rms_per_dim"]
    rms1 = obs["norms"]["x1"]["rms_per_dim"]
    parts = [f"Per-dimension RMS: x0 {rms0:.3g}, x1 {rms1:.3g} (a unit-variance latent has ~1)."]
    # Which side is off: the one whose per-dimension RMS is farther from 1 on a log scale.
    x1_off = abs(math.log(rms1)) >= abs(math.log(rms0)) if rms0 > 0 and rms1 > 0 else ratio > 1
    if x1_off:
        parts.append("The data latent x1 is off scale: `fmcheck scale` compares z1 with the VAE's own latents and "
                     "names the cause (scaling_factor missing, applied twice or inverted, a config that does not "
                     "fit this VAE, a shift or per-channel mean ignored).")
    else:
        cause = "The source x0 is off scale: the text head's output (mu, sigma) sets it."
        if obs["mu_rms"] is not None:
            cause += (f" Per-dimension RMS of mu {obs['mu_rms']:.3g}, of sigma {obs['sigma_rms']:.3g}: bound the "
                      "larger one (smaller init of the head's last layer, logvar clamp, KL weight).")
        parts.append(cause)
    parts.append("Fix the scale at its source; do not add a ratio correction r = ||z1|| / ||z0||: it hides the "
                 "mismatch and the sampler does not apply it.")
    return " ".join(parts)
