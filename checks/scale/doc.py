"""The `scale` check's documentation (`fmcheck explain scale`, docs/checks/scale.md)."""

from __future__ import annotations

from fmcheck.api import CheckDoc

DOC = CheckDoc(
    what=(
        "On the first training batches (`measure_batches`, default 4) the check calls the pipeline's own "
        "`encode(pixels)` while it watches the raw VAE: `vae.encode`, `vae.decode` and the posterior's "
        "`sample()`/`mode()` are wrapped on the instance for the duration and restored afterwards. It so learns "
        "the raw posterior (mean and sigma) of exactly the pixels the user's code fed the VAE, and the very "
        "sample it drew. When `encode` does not go through `vae.encode`, the check encodes the same pixels "
        "itself.\n\n"
        "Measurements:\n\n"
        "- **raw latent**: mean and std of posterior samples, overall and per channel (from the posterior mean "
        "and sigma: var = var(mean) + E[sigma^2]); the implied `scaling_factor` 1/std (the latent-diffusion "
        "recipe that gave SD's 0.18215) and shift (the mean); the configured `scaling_factor`, `shift_factor`, "
        "`latents_mean`/`latents_std` (diffusers' conventions: z = x*s; z = (x - shift)*s (SD3, Flux); "
        "z = (x - mean)*s/std (per channel; s = 1 when the config has none, as Wan and Qwen-Image)).\n"
        "- **configured latent std**: the std latents have under the configured transform. Expected ~1; off by "
        "more than `config_std_warn` it warns, beyond `config_std_fail` it fails (the config does not fit this "
        "VAE, e.g. diffusers' default 0.18215 left on a VAE trained from scratch).\n"
        "- **z1 transform**: the least-squares affine map z1 = a[c] * x + b[c], per latent channel, from the raw "
        "latent the VAE produced (its recorded sample, or its mean: whichever z1 is an exact affine function "
        "of) to the user's z1. It is compared with the configured transform and with the usual mistakes: "
        "applied twice, missing, inverted (divided), shift/mean ignored, shift added instead of subtracted, "
        "shift after scaling, scaling missing with the shift applied, latents_std ignored. The distance of two "
        "maps is the RMS of their difference over the raw latents, in units of the correctly scaled latent's "
        "RMS. Within `map_tolerance` of the configured transform passes; clearly closer to a named mistake "
        "fails and names it (it only warns when the mistake changes z1 by less than `map_tolerance`, e.g. "
        "Flux's small shift, or when z1 nevertheless has unit std while the configured transform does not: "
        "then the config is what is wrong); matching nothing known warns up to `map_fail` and fails beyond. "
        "Mistakes closer to the configured transform than the check resolves (`resolution`, or 4 standard "
        "errors of the fit) are listed as indistinguishable: the blind spot, said in the result. A z1 whose "
        "layout differs from the latent's (e.g. packed into tokens) is compared by its overall mean and std "
        "only. The fitted map is kept in the result's details as `applied` (the report's latent-space "
        "fingerprint, for `fmcheck compare`).\n"
        "- **z1 source**: posterior sample or mean. Direct evidence (which of the recorded sample or the mean "
        "z1 is an exact affine function of) plus a second encode of 16 of the images: a fresh sample differs, "
        "the mean does not. A z1 that fits the mean up to noise of the posterior's size (or differs between "
        "calls) was sampled outside `latent_dist.sample()` (\"mean + noise\"): the fit is then unbiased but "
        "noisy, and its standard error widens the tolerance. The mean (or the same noise every call) warns "
        "when the posterior sigma is at least `sigma_negligible` of the latent's std; below that the choice "
        "makes no difference.\n"
        "- **round trip**: `decode(z1)` on a few images, watching the latent it hands `vae.decode`: it must be "
        "the raw latent that encode started from (relative RMS error, warn/fail at `round_trip_warn` / "
        "`round_trip_fail`), i.e. decode is the inverse of encode. The decode-side map is named as well "
        "(inverse; multiplies instead of divides; no unscaling; unscales twice; shift not added back). When "
        "`decode` bypasses `vae.decode`, its pixels are compared with the VAE's own decode of the raw latent. "
        "PSNR of decode(encode(x)) against x is reported (the VAE's quality is not this check's verdict).\n"
        "- **float16 and pixels**: a copy of the VAE in float16 encodes and decodes a few images; NaN/Inf fails "
        "(`half_probe`); the relative error of its latents is reported. The range of the pixels the VAE receives "
        "is reported, with a warning when it looks like [0, 1] or [0, 255] (diffusers VAEs expect [-1, 1]). The "
        "VAE's frozen-module hygiene (parameters requiring grad or in the optimizer, train mode with "
        "mode-dependent layers) is the `structure` check's, as for every frozen module.\n\n"
        "Cost: one encode of the measured batches, a second encode and one decode of 16 images, and a float16 "
        "encode+decode of 4 images (`bench/scale_overhead.py`: 0.6x a plain encode+decode of the same 256 "
        "digits on CPU)."
    ),
    why=(
        "Noise-free flow matching regresses v* = x1 - x0: if z1 is in other units than z0, v* is dominated by "
        "one side and the head and the KL get stuck. The seed's case: ||x0|| ~ 150 while ||x1|| ~ 900-1200, "
        "because the latent was neither sampled nor scaled. Scaling twice shrinks z1 toward zero, a missing or "
        "inverted factor inflates it 5-50x, an ignored shift offsets it; and if decode does not undo exactly "
        "what encode did, samples decode to the wrong images even when training looked fine. A ratio "
        "correction (r = ||z1|| / ||z0||) hides the bug instead of fixing it."
    ),
    bug_example=(
        "z1 = vae.encode(x).latent_dist.sample() * vae.config.scaling_factor\n"
        "z1 = z1 * vae.config.scaling_factor          # a helper already scaled: applied twice\n"
        "\n"
        "z1 = vae.encode(x).latent_dist.mean           # the seed's case: neither sampled nor scaled\n"
        "\n"
        "z1 = vae.encode(x).latent_dist.sample() * s    # SD3/Flux VAE: shift_factor ignored\n"
        "x = vae.decode(z1 * s).sample                  # decode multiplies instead of divides"
    ),
    fix=(
        "Encode: z1 = (vae.encode(x).latent_dist.sample() - shift) * scaling_factor (per channel: "
        "(x - latents_mean) * scaling_factor / latents_std), applied exactly once; decode: vae.decode(z1 / "
        "scaling_factor + shift) (per channel: z1 * latents_std / scaling_factor + latents_mean). If the "
        "configured factor does not fit your VAE (configured latent std far from 1), run "
        "`fmcheck scale --vae DIR` for recommended values and put them in the VAE's config, so that training "
        "and inference read the same numbers."
    ),
    causes=(
        "a data pipeline or latent cache that stores scaled latents, scaled again in the training step",
        "a VAE wrapper whose encode already applies scaling_factor (or one that does not, assumed to)",
        "latent_dist.mean / mode() instead of sample(), without the factor (the seed's case)",
        "SD3/Flux VAEs: shift_factor ignored, or added instead of subtracted, or subtracted after scaling",
        "SDXL-style, Wan or Qwen-Image VAEs: latents_mean/latents_std ignored or applied as scalars",
        "decode copied from encode: multiplies by scaling_factor instead of dividing",
        "diffusers' default scaling_factor 0.18215 left in the config of a VAE trained from scratch",
        "the VAE in float16 (SDXL's VAE overflows to NaN in float16; its config says force_upcast)",
    ),
    blind_spots=(
        "When the configured transform is close to the identity (scaling_factor ~ 1, no shift, e.g. a VAE "
        "whose latents already have unit std), applying it twice, not at all or inverted changes z1 by less "
        "than the check resolves: those mistakes are invisible here (and harmless to z1's scale). The result "
        "says so, naming the conventions it cannot tell apart, instead of passing them silently.",
        "A scaling factor the user picked deliberately, different from the config's, is reported as an "
        "unrecognised transform (warn or fail): put the factor in the VAE's config so decode uses the same.",
        "Only what `encode`/`decode` do to these batches is seen; a different code path at sampling time "
        "(a separate inference script) is not.",
        "A z1 packed into another layout (Flux's 2x2 tokens) is compared by its overall mean and std: "
        "per-channel mistakes and the sign of the factor are not identified.",
        "The float16 probe uses a few images; activations that overflow only on other images go unseen.",
    ),
)
