"""The ``norms`` check's documentation (`fmcheck explain norms`, docs/checks/norms.md)."""

from __future__ import annotations

from fmcheck.api import CheckDoc

DOC = CheckDoc(
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
