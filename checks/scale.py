"""`scale`: is z1 the VAE latent scaled exactly as the VAE's config says, and does decode undo it?

The seed's first item and its costliest bug: a latent scale applied twice, not at all, inverted, or a shift/mean
ignored. Training still "works", but z1 lives in other units than z0 and the target v* = x1 - x0 is dominated by
one side. The check watches the user's own ``encode``/``decode`` call the raw VAE (it wraps ``vae.encode``,
``vae.decode`` and the posterior's ``sample``/``mode`` for the duration of the measurement), fits the affine map
from the raw latent the VAE produced to the user's z1, and names the convention that map is. The maths lives in
``checks/_scale_math.py``; the standalone ``fmcheck scale --vae`` lives in ``checks/_scale_standalone.py``.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Optional

from pydantic import Field

from fmcheck.api import Check, CheckDoc, Judgement, Thresholds
from fmcheck.judges import at_most, flag, info, ratio_within
from fmcheck.report import Measurement
from fmcheck.verdict import Verdict

from ._modes import describe as describe_layers

REPEAT_IMAGES = 16  # images encoded a second time (sample or mean?)
ROUND_TRIP_IMAGES = 16  # images decoded (round trip, PSNR)
HALF_PROBE_IMAGES = 4  # images through a half-precision copy of the VAE
EXACT = 1e-3  # unexplained variance share under which z1 is an exact affine map of a raw latent
IDENTICAL = 1e-5  # relative difference under which two encodes of the same pixels are the same


class ScaleThresholds(Thresholds):
    map_tolerance: float = Field(0.05, gt=0, description="z1's fitted map may differ from the configured transform "
                                                         "by this much (RMS of the difference over the latents, in "
                                                         "units of the correctly scaled latent's RMS) and pass")
    map_fail: float = Field(0.25, gt=0, description="a map that matches no known convention fails beyond this "
                                                    "distance from the configured transform (warns between "
                                                    "map_tolerance and this)")
    resolution: float = Field(0.01, gt=0, description="the smallest map difference called: conventions closer than "
                                                      "twice this (or 4 standard errors of the fit) to the configured "
                                                      "one are reported as indistinguishable (the blind spot)")
    round_trip_warn: float = Field(0.01, gt=0, description="relative RMS error of the latent that decode(encode(x)) "
                                                           "feeds vae.decode against the raw latent encode used")
    round_trip_fail: float = Field(0.05, gt=0, description="round-trip error beyond this fails")
    config_std_warn: float = Field(1.5, ge=1, description="the std of latents under the configured transform may "
                                                          "differ from 1 by this factor either way")
    config_std_fail: float = Field(4.0, ge=1, description="beyond this factor the configured transform fails (the "
                                                          "config's scaling_factor does not fit this VAE)")
    sigma_negligible: float = Field(0.01, ge=0, description="posterior sigma (RMS) relative to the raw latent's "
                                                            "std under which using the posterior mean instead of a "
                                                            "sample is harmless (no warning)")
    half_probe: Literal["fail", "warn", "off"] = Field("fail", description="verdict when a float16 copy of the VAE "
                                                                          "gives NaN/Inf latents or decodes on the "
                                                                          "probe images ('off' skips the probe)")


class ScaleCheck(Check):
    id = "scale"
    title = "VAE latent scaling round trip"
    purpose = ("z1 = the VAE latent scaled once as its config says (not twice, missing, inverted, shift ignored), "
               "decode its inverse.")
    order = 10
    requires = ("vae", "encode")
    Thresholds = ScaleThresholds
    doc = CheckDoc(
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
            "- **health**: the VAE frozen (parameters with requires_grad warn; parameters in the optimizer fail) "
            "and without mode-dependent layers (dropout p > 0, batch-norm with running statistics, ...: the same "
            "rule as the `structure` check's modes) active in train mode (warns; a VAE in train mode without any is "
            "harmless and only reported); a float16 probe: a copy of the VAE in float16 encodes and decodes a few images; "
            "NaN/Inf fails (`half_probe`); the relative error of its latents is reported. The range of the pixels "
            "the VAE receives is reported, with a warning when it looks like [0, 1] or [0, 255] (diffusers VAEs "
            "expect [-1, 1]).\n\n"
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

    # -------------------------------------------------------------------------------------------------- measure
    def measure(self, ctx) -> dict[str, Any]:
        import torch

        from . import _scale_math as sm

        pipeline = ctx.pipeline
        vae = pipeline.vae
        batches = ctx.batches()
        pixels = [pipeline.pixels_of(b) for b in batches]
        total = len(pixels) + 3
        ctx.progress(0, total, stage="encode")

        # 1. The user's encode of every measured batch, watching the raw VAE.
        ctx.seed_everything(salt=1)
        z1s, raws, inputs = [], [], []
        for index, px in enumerate(pixels):
            with VaeRecorder(vae) as recorder:
                z1 = _tensor_from(pipeline.encode(px), "encode")
            raw = recorder.encode_result(z1.shape[0])
            capture = "vae.encode"
            if raw is None:
                raw = _explicit_encode(vae, px)
                capture = "explicit"
            inputs.append(recorder.input_range() if capture == "vae.encode" else _range(px))
            # keep only what the float16 probe needs of the pixels the VAE received
            raw.vae_input = _head(raw.vae_input, HALF_PROBE_IMAGES) if index == 0 and raw.vae_input is not None \
                else None
            raws.append((raw, capture))
            z1s.append(z1.detach())
            ctx.progress(index + 1, total, stage="encode")

        # 2. The same pixels again: a fresh sample differs, the mean does not.
        repeat_n = min(REPEAT_IMAGES, z1s[0].shape[0])
        z1_again = _tensor_from(pipeline.encode(_head(pixels[0], repeat_n)), "encode").detach()
        first = z1s[0][:repeat_n]
        repeat_diff = sm.relative_rms(z1_again.to(first.device), first) if z1_again.shape == first.shape else None
        ctx.progress(len(pixels) + 1, total, stage="decode")

        mean = torch.cat([r.mean for r, _ in raws])
        std = torch.cat([r.std for r, _ in raws])
        samples = [r.sample for r, _ in raws]
        sample = torch.cat(samples) if all(s is not None for s in samples) else None
        z1_all = torch.cat([z.to(mean.device) for z in z1s])
        channels = int(mean.shape[1])
        mu_mean, mu_var = sm.moments_of(mean, channels)
        sigma2 = sm.channels_first(std, channels).pow(2).mean(1)
        z1_flat = z1_all.detach().float()
        z1_stats = torch.stack([z1_flat.mean(), z1_flat.std(unbiased=False), z1_flat.abs().max()])
        z1_aligned = sm.align(z1_all, mean)
        fits: dict[str, Any] = {}
        if z1_aligned is not None:
            fits["mean"] = sm.fit(mean, z1_aligned, channels)
            if sample is not None:
                fits["sample"] = sm.fit(sample, z1_aligned, channels)
        z1_channel_std = sm.moments_of(z1_aligned, channels)[1].sqrt() if z1_aligned is not None else None

        # 3. Round trip on a few images: what does decode hand vae.decode?
        round_trip = None
        if pipeline.decode is not None:
            round_trip = self._round_trip(pipeline, vae, z1s[0], raws[0][0], pixels[0], channels)
        ctx.progress(len(pixels) + 2, total, stage="float16 probe")

        # 4. Health.
        health = _health(vae, pipeline.optimizer)
        thresholds = self.Thresholds(**ctx.settings.thresholds.get(self.id, {}))
        half = None
        if thresholds.half_probe != "off":
            probe_pixels = raws[0][0].vae_input if raws[0][0].vae_input is not None else pixels[0]
            half = _half_probe(vae, _head(probe_pixels, HALF_PROBE_IMAGES), _head(mean, HALF_PROBE_IMAGES))
        ctx.progress(total, total)

        numbers = torch.stack([mu_mean, mu_var, sigma2]).cpu().tolist()
        z1_numbers = z1_stats.cpu().tolist()
        ranges = [r for r in inputs if r is not None]
        config = getattr(vae, "config", None)
        return {
            "channels": channels,
            "images": int(mean.shape[0]),
            "latent_shape": list(mean.shape[1:]),
            "z1_shape": list(z1_all.shape[1:]),
            "configured": sm.Configured.from_config(config if config is not None else {}, channels),
            "has_config": config is not None,
            "capture": "vae.encode" if all(c == "vae.encode" for _, c in raws) else "explicit",
            "mu_mean": numbers[0],
            "mu_var": numbers[1],
            "sigma2": numbers[2],
            "z1_mean": z1_numbers[0],
            "z1_std": z1_numbers[1],
            "z1_absmax": z1_numbers[2],
            "z1_finite": bool(math.isfinite(z1_numbers[0]) and math.isfinite(z1_numbers[1])),
            "z1_channel_std": z1_channel_std.cpu().tolist() if z1_channel_std is not None else None,
            "z1_reshaped": z1_aligned is not None and tuple(z1_all.shape) != tuple(mean.shape),
            "fits": fits,
            "sample_recorded": sample is not None,
            "repeat_diff": repeat_diff,
            "repeat_images": repeat_n,
            "round_trip": round_trip,
            "health": health,
            "half": half,
            "input_range": [min(r[0] for r in ranges), max(r[1] for r in ranges)] if ranges else None,
        }

    def _round_trip(self, pipeline, vae, z1, raw, px, channels: int) -> dict[str, Any]:
        from . import _scale_math as sm

        n = min(ROUND_TRIP_IMAGES, z1.shape[0])
        z1 = z1[:n]
        source = raw.sample[:n] if raw.sample is not None else None
        with VaeRecorder(vae) as recorder:
            out = pipeline.decode(z1)
        decoded = _pixels_from(out)
        z_dec = recorder.decode_input(n)
        result: dict[str, Any] = {"images": n, "capture": z_dec is not None, "psnr": None, "fits": {},
                                  "pixel_error": None, "decoded": decoded is not None}
        reference = _head(px, n)
        if decoded is not None and decoded.shape == reference.shape:
            result["psnr"] = sm.psnr(reference, decoded)
        raw_mean = raw.mean[:n]
        z_dec = sm.align(z_dec.to(raw_mean.device), raw_mean) if z_dec is not None else None
        result["capture"] = z_dec is not None
        if z_dec is not None:
            # The composite map raw latent -> what decode hands vae.decode (identity when decode inverts encode),
            # from the mean and, when recorded, from the very sample encode used.
            result["fits"]["mean"] = sm.fit(raw_mean, z_dec, channels)
            if source is not None:
                result["fits"]["sample"] = sm.fit(source, z_dec, channels)
            aligned = sm.align(z1.to(z_dec.device), z_dec)
            if aligned is not None:
                result["decode_fit"] = sm.fit(aligned, z_dec, channels)
        elif decoded is not None:
            # decode bypasses vae.decode: compare its pixels with the VAE's own decode of the raw latent.
            import torch

            latent = source if source is not None else raw.mean[:n]
            with torch.no_grad():
                own = _pixels_from(vae.decode(latent.to(_vae_dtype(vae))))
            if own is not None and own.shape == decoded.shape:
                result["pixel_error"] = sm.relative_rms(decoded.to(own.device).float(), own.float())
        return result

    # ---------------------------------------------------------------------------------------------------- judge
    def judge(self, obs: dict[str, Any], t: ScaleThresholds) -> Judgement:
        return _Judge(obs, t).run()


# ------------------------------------------------------------------------------------------------ instrumentation


class RawLatent:
    """What the raw VAE produced for one batch of the user's encode: posterior mean, sigma, the drawn sample."""

    def __init__(self, mean, std, sample=None, vae_input=None):
        self.mean, self.std, self.sample, self.vae_input = mean, std, sample, vae_input


class VaeRecorder:
    """Wraps ``vae.encode`` / ``vae.decode`` (instance attributes) and the posteriors they return; restores on exit.

    Records, per ``vae.encode`` call, the posterior mean and std and every tensor its ``sample()`` returned, and,
    per ``vae.decode`` call, the latent it was given.
    """

    def __init__(self, vae):
        self.vae = vae
        self.encodes: list[dict[str, Any]] = []
        self.decodes: list[Any] = []
        self._saved: dict[str, Any] = {}

    def __enter__(self) -> "VaeRecorder":
        for name, wrapper in (("encode", self._wrap_encode), ("decode", self._wrap_decode)):
            original = getattr(self.vae, name, None)
            if original is None:
                continue
            self._saved[name] = self.vae.__dict__.get(name, _ABSENT)
            object.__setattr__(self.vae, name, wrapper(original))
        return self

    def __exit__(self, *exc) -> None:
        for name, saved in self._saved.items():
            if saved is _ABSENT:
                self.vae.__dict__.pop(name, None)
            else:
                object.__setattr__(self.vae, name, saved)

    def _wrap_encode(self, original):
        def encode(x, *args, **kwargs):
            out = original(x, *args, **kwargs)
            self._record_encode(x, out)
            return out

        return encode

    def _wrap_decode(self, original):
        def decode(z, *args, **kwargs):
            self.decodes.append(z.detach() if hasattr(z, "detach") else z)
            return original(z, *args, **kwargs)

        return decode

    def _record_encode(self, x, out) -> None:
        dist = getattr(out, "latent_dist", None)
        if dist is None and isinstance(out, (tuple, list)) and out:
            dist = out[0]
        mean = getattr(dist, "mean", None)
        if dist is None or not hasattr(mean, "detach"):
            return
        std = getattr(dist, "std", None)
        if not hasattr(std, "detach"):
            logvar = getattr(dist, "logvar", None)
            std = (0.5 * logvar).exp() if hasattr(logvar, "exp") else mean * 0
        entry = {"mean": mean.detach(), "std": std.detach(), "samples": [],
                 "input": x.detach() if hasattr(x, "detach") else None}
        self.encodes.append(entry)
        original_sample = getattr(dist, "sample", None)
        if callable(original_sample):
            def sample(*args, **kwargs):
                value = original_sample(*args, **kwargs)
                if hasattr(value, "detach"):
                    entry["samples"].append(value.detach())
                return value

            try:
                dist.sample = sample
            except AttributeError:  # a posterior object without instance attributes: no sample recorded
                pass

    def encode_result(self, batch: int) -> Optional[RawLatent]:
        """The raw latent of the user's call: every vae.encode in it concatenated, or the last one alone."""
        import torch

        if not self.encodes:
            return None
        for entries in (self.encodes, self.encodes[-1:]):
            if sum(e["mean"].shape[0] for e in entries) == batch:
                mean = torch.cat([e["mean"] for e in entries]).float()
                std = torch.cat([e["std"] for e in entries]).float()
                sample = None
                if all(len(e["samples"]) >= 1 and e["samples"][-1].shape == e["mean"].shape for e in entries):
                    sample = torch.cat([e["samples"][-1] for e in entries]).float()
                inputs = [e["input"] for e in entries]
                vae_input = torch.cat(inputs) if all(i is not None for i in inputs) else None
                return RawLatent(mean, std, sample, vae_input)
        return None

    def input_range(self) -> Optional[tuple[float, float]]:
        import torch

        inputs = [e["input"].float() for e in self.encodes if isinstance(e["input"], torch.Tensor)]
        if not inputs:
            return None
        low, high = torch.stack([torch.stack([i.min(), i.max()]) for i in inputs]).T.cpu().tolist()
        return float(min(low)), float(max(high))

    def decode_input(self, batch: int):
        import torch

        latents = [z for z in self.decodes if hasattr(z, "shape")]
        if latents and sum(z.shape[0] for z in latents) == batch:
            return torch.cat(latents).float()
        if latents and latents[-1].shape[0] == batch:
            return latents[-1].float()
        return None


_ABSENT = object()


def _tensor_from(value: Any, field: str):
    import torch

    from fmcheck.errors import PipelineError

    if not isinstance(value, torch.Tensor):
        raise PipelineError(f"pipeline field '{field}' returned a {type(value).__name__}; expected a tensor (z1)")
    if not value.is_floating_point():
        raise PipelineError(f"pipeline field '{field}' returned a {value.dtype} tensor; expected floating point")
    return value


def _pixels_from(value: Any):
    """Pixels from decode's return: a tensor, or an object with ``.sample`` (diffusers' DecoderOutput)."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach()
    sample = getattr(value, "sample", None)
    if isinstance(sample, torch.Tensor):
        return sample.detach()
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0].detach()
    return None


def _head(t, n: int):
    return t[:n]


def _range(t) -> Optional[tuple[float, float]]:
    import torch

    if not isinstance(t, torch.Tensor):
        return None
    low, high = torch.stack([t.detach().float().min(), t.detach().float().max()]).cpu().tolist()
    return float(low), float(high)


def _vae_dtype(vae):
    param = next(iter(vae.parameters()), None) if hasattr(vae, "parameters") else None
    return param.dtype if param is not None else None


def _explicit_encode(vae, px) -> RawLatent:
    """The raw posterior of these pixels, when the user's encode did not go through vae.encode."""
    import torch

    from fmcheck.errors import PipelineError

    device = next(iter(vae.parameters())).device if hasattr(vae, "parameters") else px.device
    dtype = _vae_dtype(vae) or px.dtype
    with torch.no_grad():
        out = vae.encode(px.to(device, dtype))
    dist = getattr(out, "latent_dist", None)
    if dist is None and isinstance(out, (tuple, list)) and out:
        dist = out[0]
    mean = getattr(dist, "mean", None)
    if not hasattr(mean, "detach"):
        raise PipelineError("pipeline field 'vae': vae.encode(x) returned no posterior with a .mean "
                            "(expected a diffusers AutoencoderKL-like .latent_dist)")
    std = getattr(dist, "std", None)
    if not hasattr(std, "detach"):
        std = torch.zeros_like(mean)
    return RawLatent(mean.detach().float(), std.detach().float(), None, px.to(device, dtype))


def _health(vae, optimizer) -> dict[str, Any]:
    modules = list(vae.modules()) if hasattr(vae, "modules") else []
    params = list(vae.parameters()) if hasattr(vae, "parameters") else []
    training = [m for m in modules if getattr(m, "training", False)]
    in_optimizer = 0
    if optimizer is not None:
        ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
        in_optimizer = sum(p.numel() for p in params if id(p) in ids)
    config = getattr(vae, "config", None)
    force_upcast = config.get("force_upcast") if isinstance(config, dict) else getattr(config, "force_upcast", None)
    dtype = _vae_dtype(vae)
    from ._modes import active_layers

    return {
        "train_mode": len(training),
        "mode_dependent": active_layers(vae) if hasattr(vae, "modules") else {},
        "requires_grad": sum(p.numel() for p in params if p.requires_grad),
        "in_optimizer": in_optimizer,
        "parameters": sum(p.numel() for p in params),
        "dtype": str(dtype).replace("torch.", "") if dtype is not None else None,
        "force_upcast": force_upcast,
    }


def _half_probe(vae, px, reference_mean) -> Optional[dict[str, Any]]:
    """Encode and decode a few images with a float16 copy of the VAE: NaN/Inf is the classic overflow."""
    import copy

    import torch

    if not hasattr(vae, "parameters") or not hasattr(vae, "half"):
        return None
    dtype = torch.float16
    device = next(iter(vae.parameters())).device
    probe = copy.deepcopy(vae)
    # torch's own Module.to: every weight in float16 (diffusers' override would log about keep-in-fp32 modules)
    torch.nn.Module.to(probe, device=device, dtype=dtype).eval()
    with torch.no_grad():
        out = probe.encode(px.to(device, dtype))
        dist = getattr(out, "latent_dist", None) or (out[0] if isinstance(out, (tuple, list)) else None)
        mean = getattr(dist, "mean", None)
        if not hasattr(mean, "detach"):
            return None
        decoded = _pixels_from(probe.decode(mean))
    finite = torch.stack([torch.isfinite(mean).all(),
                          torch.isfinite(decoded).all() if decoded is not None else torch.tensor(True)]).cpu().tolist()
    error = None
    if finite[0] and mean.shape == reference_mean.shape:
        from ._scale_math import relative_rms

        error = relative_rms(mean.float().to(reference_mean.device), reference_mean.float())
    del probe
    return {"dtype": "float16", "images": int(px.shape[0]), "latent_finite": bool(finite[0]),
            "decode_finite": bool(finite[1]), "latent_error": error}


# ------------------------------------------------------------------------------------------------------- judge


class _Judge:
    """Turns the observation into measurements, a one-line diagnosis and a fix hint."""

    def __init__(self, obs: dict[str, Any], t: ScaleThresholds):
        from . import _scale_math as sm

        self.sm = sm
        self.obs = obs
        self.t = t
        self.cfg: Any = obs["configured"]
        mean = sm.Moments(tuple(obs["mu_mean"]), tuple(obs["mu_var"]))
        self.mean_moments = mean
        self.sample_moments = mean.plus_variance(obs["sigma2"])
        self.measurements: list[Measurement] = []
        self.findings: list[tuple[int, str, Optional[str]]] = []  # (severity, summary, hint)
        self.notes: list[str] = []
        self.details: dict[str, Any] = {}

    def add(self, m: Measurement) -> Measurement:
        self.measurements.append(m)
        return m

    def finding(self, verdict: Verdict, summary: str, hint: Optional[str]) -> None:
        if verdict in (Verdict.WARN, Verdict.FAIL):
            self.findings.append((verdict.severity, summary, hint))

    # ---------------------------------------------------------------------------------------------------------
    def run(self) -> Judgement:
        obs, sm = self.obs, self.sm
        once = self.cfg.map()
        raw_std = self.sample_moments.overall_std()
        sigma_rel = math.sqrt(sum(obs["sigma2"]) / len(obs["sigma2"])) / raw_std if raw_std > 0 else 0.0
        source, fit = self._source()
        self._transform(source, fit, once)
        self._configured(once)
        self._sampling(source, sigma_rel)
        self._round_trip(once)
        self._health()
        self._raw_report(once, sigma_rel)

        verdict = Verdict.worst(m.verdict for m in self.measurements)
        if self.findings:
            self.findings.sort(key=lambda f: -f[0])
            summary = self.findings[0][1]
            hints = [h.rstrip(".") for _, _, h in self.findings if h]
            hint = ". Also: ".join(dict.fromkeys(hints)) + "." if hints else None
            others = len(self.findings) - 1
            if others:
                summary += f" (+{others} more findings)"  # listed in the fix and the measurements
            if self.ident.indistinguishable:
                summary += f"; {self._blind_spot_text()}"
        else:
            summary, hint = self._pass_summary(), None
        if self.notes:
            self.details["notes"] = self.notes
        return Judgement(self.measurements, summary, hint, verdict=verdict, details=self.details)

    # ----------------------------------------------------------------------------------------- z1 source
    def _source(self):
        """Which raw latent z1 is a function of: the recorded sample, the mean, or the mean plus noise of its own.

        Direct evidence first: z1 is an exact affine map of the sample ``latent_dist.sample()`` returned, or of the
        posterior mean. When sigma is so small that both fit (their residuals within 100x), the repeated encode
        decides: a fresh sample differs between calls, the mean does not. A z1 that fits the mean only up to noise
        of the posterior's size, or that differs between calls, was sampled outside ``latent_dist.sample()``.
        """
        fits = self.obs["fits"]
        if not fits:
            return "layout", None
        repeat = self.obs["repeat_diff"]
        differs = repeat is not None and repeat > IDENTICAL
        share = {name: f.unexplained() for name, f in fits.items()}
        exact = [name for name in fits if share[name] <= EXACT]
        if len(exact) == 2:
            if share["sample"] < 0.01 * share["mean"]:
                name = "sample"
            elif share["mean"] < 0.01 * share["sample"]:
                name = "mean"
            else:
                name = "sample" if differs else "mean"
        elif exact:
            name = exact[0]
        else:
            name = None
        if name == "sample":
            return "sample", fits["sample"]
        mean_fit = fits["mean"]
        if name == "mean" and not differs:
            return "mean", mean_fit
        if name == "mean":  # differs between calls, yet affine in the mean up to tiny noise: sampled elsewhere
            return "own_sample", mean_fit
        slope2 = sum(k * k for k in mean_fit.per_channel.slope) / mean_fit.per_channel.channels
        expected_noise = slope2 * sum(self.obs["sigma2"]) / len(self.obs["sigma2"])
        resid = sum(mean_fit.resid) / len(mean_fit.resid)
        if expected_noise > 0 and 0.5 <= resid / expected_noise <= 2.0:
            return "own_sample", mean_fit
        if self.obs["z1_reshaped"]:  # same size, other layout (e.g. packed into tokens): no element correspondence
            return "layout", None
        return "unexplained", mean_fit

    # ------------------------------------------------------------------------------------------- transform
    def _transform(self, source: str, fit, once) -> None:
        sm, obs, t = self.sm, self.obs, self.t
        candidates = sm.encode_candidates(self.cfg)
        repeat = obs["repeat_diff"]
        deterministic = repeat is not None and repeat <= IDENTICAL
        # The raw latent z1 is a map of: posterior samples, unless z1 comes from the mean.
        uses_mean = source == "mean" or (source in ("layout", "unexplained") and deterministic)
        inputs = self.mean_moments if uses_mean else self.sample_moments
        norm = inputs.mapped(once).rms()
        if fit is not None and source != "unexplained":
            user = fit.per_channel
            tolerance = max(t.resolution, 4 * fit.map_standard_error(inputs) / norm if norm > 0 else t.resolution)
            ident = sm.identify(candidates, lambda m: sm.map_distance(user, m, inputs, norm),
                                lambda m: sm.map_distance(m, once, inputs, norm), tolerance)
            slope, offset = fit.overall
            method = "per-channel affine fit"
        else:
            observed = (obs["z1_mean"], obs["z1_std"])
            tolerance = 2 * t.resolution
            ident = sm.identify(candidates, lambda m: sm.moment_distance(observed, m, inputs, norm),
                                lambda m: sm.map_distance(m, once, inputs, norm), tolerance)
            raw_mean, raw_std = inputs.overall_mean(), inputs.overall_std()
            slope = obs["z1_std"] / raw_std if raw_std > 0 else math.nan
            offset = obs["z1_mean"] - slope * raw_mean
            method = "overall mean and std (z1 is not an affine map of the latent's elements" + (
                ": its layout differs)" if source == "layout" else ")")
        self.ident, self.fit_slope, self.fit_offset = ident, slope, offset
        self.details["transform"] = {"method": method, "source": source, "slope": slope, "offset": offset,
                                     "per_channel_slope": list(fit.per_channel.slope) if fit is not None else None,
                                     "per_channel_offset": list(fit.per_channel.offset) if fit is not None else None,
                                     "ranking": [list(r) for r in ident.ranking], "tolerance": ident.tolerance,
                                     "configured": self.cfg.formula()}
        formula = self.cfg.formula()
        configured_mean = inputs.mapped(once).overall_mean()
        if fit is not None and source != "unexplained":
            ratios = [a / k for a, k in zip(fit.per_channel.slope, once.slope) if k != 0]
            slope_ratio = sum(ratios) / len(ratios) if ratios else math.nan
        else:
            slope_ratio = slope / once.mean_slope() if once.mean_slope() != 0 else math.nan
        mean_error = obs["z1_mean"] - configured_mean
        uniform = len(set(once.slope)) == 1 and len(set(once.offset)) == 1
        if uniform:
            z1_desc = f"z1 = {slope:.4g} x{_signed(offset)}, config: {formula}"
        else:
            z1_desc = (f"z1's slope is {slope_ratio:.3g}x the configured per-channel slope and its mean "
                       f"{mean_error:+.3g} off, config: {formula}")
        self.details["transform"].update({"slope_ratio": slope_ratio, "mean_error": mean_error})
        # The scaling as applied, for the report's latent-space fingerprint (`fmcheck compare`): offsets below a
        # thousandth of the latent's RMS are float noise and recorded as 0.
        slopes = list(fit.per_channel.slope) if fit is not None and source != "unexplained" else [slope]
        offsets = list(fit.per_channel.offset) if fit is not None and source != "unexplained" else [offset]
        floor = 1e-3 * (norm if math.isfinite(norm) else 1.0)
        self.details["applied"] = {"convention": ident.best if ident.matches_correct or ident.matches_other
                                   else "unrecognised", "source": source,
                                   "slope": [float(f"{v:.6g}") for v in slopes],
                                   "offset": [0.0 if abs(v) < floor else float(f"{v:.6g}") for v in offsets]}
        distance = ident.distance_correct
        if not obs["z1_finite"]:
            verdict = Verdict.FAIL
            self.finding(verdict, "z1 has NaN/Inf values", "check the VAE's dtype (keep it in float32) and the "
                         "pixels fed to it")
        elif ident.matches_correct:
            verdict = Verdict.PASS
        elif ident.matches_other:
            # A named mistake; one whose effect is within the tolerance for any deviation only warns.
            verdict = Verdict.FAIL if distance > t.map_tolerance else Verdict.WARN
            label = ident.label
            unit_z1 = _within(obs["z1_std"], t.config_std_warn)
            config_std = self.sample_moments.mapped(once).overall_std()
            if unit_z1 and not _within(config_std, t.config_std_warn):
                verdict = Verdict.WARN
                self.finding(verdict, f"{label}; {z1_desc}; but z1 has unit std ({obs['z1_std']:.3g}) while the "
                             f"configured transform gives {config_std:.3g}: the config does not fit this VAE",
                             f"put the factor you use in the VAE's config (recommended scaling_factor "
                             f"{1 / self.sample_moments.overall_std():.4g}) so that decode and inference use it too")
            else:
                if ident.best == "missing" and source == "mean":
                    label = "z1 is the raw posterior mean, neither sampled nor scaled"
                self.finding(verdict, f"{label}: {z1_desc}; z1 std {obs['z1_std']:.3g}, mean {obs['z1_mean']:.3g}",
                             _ENCODE_HINTS.get(ident.best, "").format(formula=formula))
        elif distance <= t.map_tolerance:
            verdict = Verdict.PASS
        else:
            verdict = Verdict.WARN if distance <= t.map_fail else Verdict.FAIL
            self.finding(verdict, f"z1's transform matches no known convention: {z1_desc}, {distance:.3g} apart; "
                         f"closest: {ident.label}",
                         f"make encode compute {formula} from vae.encode(x).latent_dist.sample(); if the other "
                         "factor is deliberate, put it in the VAE's config so decode and inference use it too")
        self.z1_desc = z1_desc
        self.add(Measurement(name="z1 transform", value=ident.best if verdict is Verdict.PASS or ident.matches_other
                             else "unrecognised", expected="once", verdict=verdict))
        self.add(Measurement(name="z1 distance from configured transform", value=_num(distance),
                             unit="rel. RMS", expected=f"<= {max(t.map_tolerance, ident.tolerance):.3g}",
                             verdict=verdict))
        self.add(info("z1 slope / configured slope", _num(slope_ratio), "x", "1 when z1 is as configured"))
        self.add(info("z1 mean - configured mean", _num(mean_error), "", "0 when z1 is as configured"))
        if ident.indistinguishable:
            names = ", ".join(f"{k} ({d:.2g} apart)" for k, d in ident.indistinguishable)
            blind = (f"blind spot: the configured transform ({formula}) is within {2 * ident.tolerance:.2g} of "
                     f"{names}; this data cannot tell them apart")
            self.notes.append(blind)
            self.details["indistinguishable"] = [list(x) for x in ident.indistinguishable]
            self.add(info("indistinguishable conventions", ", ".join(k for k, _ in ident.indistinguishable), "",
                          "conventions this data cannot tell from the configured one (a blind spot)"))

    # ------------------------------------------------------------------------------------------ configuration
    def _configured(self, once) -> None:
        obs, t = self.obs, self.t
        cfg = self.cfg
        under = self.sample_moments.mapped(once)
        std = under.overall_std()
        m = self.add(ratio_within("configured latent std", _num(std), warn_factor=t.config_std_warn,
                                  fail_factor=t.config_std_fail, unit=""))
        recommended = 1 / self.sample_moments.overall_std() if self.sample_moments.overall_std() > 0 else math.nan
        if m.verdict is not Verdict.PASS:
            self.finding(m.verdict, f"the configured transform ({cfg.formula()}) gives latents of std {std:.3g}, "
                         f"not ~1: the config does not fit this VAE (implied scaling_factor {recommended:.4g})",
                         "set the VAE config's scaling_factor (and shift_factor) to what "
                         "`fmcheck scale --vae DIR` recommends, then re-check encode and decode")
        self.add(info("configured latent mean", _num(under.overall_mean())))
        self.add(info("configured scaling_factor", cfg.scaling_factor if cfg.scaling_factor is not None else "none"))
        if cfg.shift_factor is not None:
            self.add(info("configured shift_factor", cfg.shift_factor))
        if cfg.per_channel:
            self.add(info("configured latents_mean", _short(cfg.latents_mean)))
            self.add(info("configured latents_std", _short(cfg.latents_std)))
        if not obs["has_config"]:
            self.notes.append("the VAE has no config: the configured transform is taken as the identity")
        for note in cfg.notes:
            self.notes.append(note)

    # ------------------------------------------------------------------------------------------- sampling
    def _sampling(self, source: str, sigma_rel: float) -> None:
        obs, t = self.obs, self.t
        repeat = obs["repeat_diff"]
        identical = repeat is not None and repeat <= IDENTICAL
        matters = sigma_rel >= t.sigma_negligible
        label = {"sample": "posterior sample", "mean": "posterior mean", "own_sample": "mean + noise",
                 "unexplained": "not affine", "layout": "other layout"}[source]
        verdict = Verdict.PASS
        if source == "mean" and matters:
            verdict = Verdict.WARN
            self.finding(verdict, f"z1 is the posterior mean (latent_dist.mean / mode()), not a sample: the "
                         f"posterior sigma is {sigma_rel:.3g} of the latent's std",
                         "training usually samples: z1 = (vae.encode(x).latent_dist.sample() - shift) * "
                         "scaling_factor; keep the mean only if that is a deliberate choice")
        elif source in ("sample", "own_sample") and identical and matters:
            verdict = Verdict.WARN
            label = "fixed-noise sample"
            self.finding(verdict, "z1 is a posterior sample, but the same one every call (two encodes of the same "
                         f"pixels are identical; posterior sigma {sigma_rel:.3g} of the latent's std)",
                         "draw fresh noise per call: latent_dist.sample() without a freshly re-seeded generator")
        elif source == "unexplained":
            verdict = Verdict.WARN
            fit = obs["fits"].get("mean")
            share = fit.unexplained() if fit is not None else math.nan
            self.finding(verdict, f"z1 is not an affine map of the VAE's latent ({share:.0%} of its variance "
                         "unexplained, beyond posterior noise): the transform was compared by mean and std only",
                         "z1 should be the VAE latent times the scaling factor (minus the shift), nothing else: "
                         "no clamp, tanh or re-normalisation per batch")
        elif source == "layout":
            self.notes.append(f"z1 has shape {obs['z1_shape']} and the latent {obs['latent_shape']}: compared by "
                              "overall mean and std only")
        self.add(Measurement(name="z1 source", value=label, expected="posterior sample", verdict=verdict))
        self.add(info("posterior sigma / latent std", _num(sigma_rel), "",
                      f"sample vs mean matters from {t.sigma_negligible:g} (sigma_negligible)"))
        if repeat is not None:
            self.add(info("repeat encode difference", _num(repeat), "rel. RMS",
                          "0 for the posterior mean, > 0 for a sample"))

    # ----------------------------------------------------------------------------------------- round trip
    def _round_trip(self, once) -> None:
        obs, t, sm = self.obs, self.t, self.sm
        hint: Optional[str]
        rt = obs["round_trip"]
        if rt is None:
            self.add(info("round trip", "not measured", "", "needs pipeline field 'decode'"))
            return
        if rt["psnr"] is not None:
            self.add(info("PSNR decode(encode(x)) vs x", _num(rt["psnr"]), "dB", "reported, not judged"))
        if rt["capture"] and rt["fits"]:
            # The raw latent decode's input is (closest to) an affine map of: the recorded sample or the mean. For
            # an exact map the distance below is RMS(z_dec - raw) / RMS(raw) itself; for a noisy one (z1 sampled
            # outside latent_dist.sample) it is the same quantity for the fitted, unbiased map.
            fits = rt["fits"]
            comp = fits[min(fits, key=lambda name: fits[name].unexplained())]
            identity = sm.ChannelMap.identity(comp.per_channel.channels)
            error = sm.map_distance(comp.per_channel, identity, comp.x, comp.x.rms())
            # Against the posterior mean while z1 carries noise of its own, the fit is noisy: no verdict below
            # 4 standard errors (0 for an exact fit).
            resolution = 4 * comp.map_standard_error() / comp.x.rms() if comp.x.rms() > 0 else 0.0
            method = "latent fed to vae.decode vs the raw latent"
            shown = comp.overall
            decode_fit = rt.get("decode_fit")
            ident = self.ident
            if resolution > t.round_trip_warn and decode_fit is not None and decode_fit.unexplained() <= EXACT \
                    and (ident.matches_correct or ident.matches_other):
                # decode's own map is exact (z1 -> decode's latent): compose it with encode's identified convention
                encode_map = next(c.map for c in sm.encode_candidates(self.cfg) if c.key == ident.best)
                composed = decode_fit.per_channel.after(encode_map)
                error = sm.map_distance(composed, identity, comp.x, comp.x.rms())
                resolution = 0.0
                shown = (composed.mean_slope(), composed.mean_offset())
                method = "decode's exact map after encode's identified convention (z1 sampled outside the VAE)"
        elif rt["pixel_error"] is not None:
            error, comp, resolution, shown = rt["pixel_error"], None, 0.0, None
            method = "decode's pixels vs the VAE's own decode (decode bypasses vae.decode)"
        else:
            self.add(info("round trip", "not measured", "", "decode returned no pixel tensor"
                          if not rt["decoded"] else "decode did not call vae.decode"))
            return
        self.details["round_trip"] = {"method": method, "error": error, "images": rt["images"],
                                      "resolution": resolution}
        m = self.add(at_most("round-trip error", _num(error), warn=max(t.round_trip_warn, resolution),
                             fail=max(t.round_trip_fail, resolution), unit="rel. RMS"))
        if shown is not None:
            slope, offset = shown
            self.add(info("decode(encode(x)) latent slope", _num(slope), "x raw", "1 when decode inverts encode"))
            self.details["round_trip"].update({"slope": slope, "offset": offset})
        if m.verdict is Verdict.PASS:
            return
        what = ""
        if shown is not None:
            slope, offset = shown
            what = f": decode(encode(x)) feeds vae.decode {slope:.4g} x raw{_signed(offset)} instead of the raw latent"
        decode_label, hint = "", ("make decode the exact inverse of encode: vae.decode(z1 / scaling_factor + shift) "
                                  "(per channel: z1 * latents_std / scaling_factor + latents_mean)")
        decode_map, z1_moments, spread = self._decode_map(rt, comp)
        if decode_map is not None:
            inverse = once.inverse()
            norm = z1_moments.mapped(inverse).rms()
            ident = sm.identify(sm.decode_candidates(self.cfg),
                                lambda mp: sm.map_distance(decode_map, mp, z1_moments, norm),
                                lambda mp: sm.map_distance(mp, inverse, z1_moments, norm),
                                max(t.resolution, 4 * spread / norm if norm > 0 else 0))
            self.details["round_trip"]["decode_ranking"] = [list(r) for r in ident.ranking]
            if ident.matches_correct:
                decode_label = "; decode inverts the configured transform: encode is what deviates"
                hint = None
            elif ident.matches_other:
                decode_label = f"; {ident.label}"
                hint = _DECODE_HINTS.get(ident.best, hint)
        self.finding(m.verdict, f"decode is not the inverse of encode (round-trip error {error:.3g}){what}"
                     f"{decode_label}", hint)

    def _decode_map(self, rt: dict[str, Any], comp):
        """decode's own map z1 -> the latent it hands vae.decode, its input moments, and its standard error.

        Fitted directly when z1 and that latent align element by element; else, when encode's convention was
        identified, derived from the round trip: decode = (decode o encode) o encode^-1.
        """
        decode_fit = rt.get("decode_fit")
        if decode_fit is not None and decode_fit.unexplained() <= EXACT:  # else z1's layout only looked alike
            return decode_fit.per_channel, decode_fit.x, decode_fit.map_standard_error()
        ident = self.ident
        if comp is None or not (ident.matches_correct or ident.matches_other):
            return None, None, 0.0
        encode_map = next(c.map for c in self.sm.encode_candidates(self.cfg) if c.key == ident.best)
        decode_map = comp.per_channel.after(encode_map.inverse())
        return decode_map, comp.x.mapped(encode_map), comp.map_standard_error()

    # --------------------------------------------------------------------------------------------- health
    def _health(self) -> None:
        obs, t = self.obs, self.t
        h = obs["health"]
        m = self.add(flag("VAE parameters in the optimizer", h["in_optimizer"] == 0, value=h["in_optimizer"],
                          expected="0"))
        if m.verdict is not Verdict.PASS:
            self.finding(m.verdict, f"{h['in_optimizer']:,} VAE parameters are in the optimizer: training moves "
                         "the latent space it is learning to hit", "remove the VAE from the optimizer and freeze it "
                         "(vae.requires_grad_(False))")
        m = self.add(flag("VAE parameters requiring grad", h["requires_grad"] == 0, value=h["requires_grad"],
                          expected="0", bad=Verdict.WARN))
        if m.verdict is not Verdict.PASS:
            self.finding(m.verdict, f"the VAE is not frozen ({h['requires_grad']:,} parameters require grad)",
                         "vae.requires_grad_(False) and encode under torch.no_grad()")
        # Train mode matters only through layers that behave differently in it (checks/_modes.py, shared with the
        # structure check so that both say the same of the same VAE).
        active = h.get("mode_dependent", {})
        self.add(info("VAE submodules in train mode", h["train_mode"],
                      note="judged by the mode-dependent layers among them, below"))
        m = self.add(flag("VAE mode-dependent layers in train mode", not active,
                          value=describe_layers(active) or "none", expected="none", bad=Verdict.WARN))
        if m.verdict is not Verdict.PASS:
            self.finding(m.verdict, f"the VAE is in train mode with mode-dependent layers active "
                         f"({describe_layers(active)}): its latents are noised or use batch statistics", "vae.eval()")
        half = obs["half"]
        if half is not None:
            ok = half["latent_finite"] and half["decode_finite"]
            bad = Verdict.FAIL if t.half_probe == "fail" else Verdict.WARN
            m = self.add(flag("float16 probe finite", ok, value=ok, expected="True", bad=bad))
            if half["latent_error"] is not None:
                self.add(info("float16 latent error", _num(half["latent_error"]), "rel. RMS"))
            if not ok:
                where = "latents" if not half["latent_finite"] else "decoded pixels"
                self.finding(m.verdict, f"the VAE in float16 gives NaN/Inf {where} on {half['images']} images",
                             "keep the VAE in float32 (encode/decode outside autocast; diffusers upcasts when the "
                             "config says force_upcast)")
        self.add(info("VAE dtype", h["dtype"] or "unknown"))
        rng = obs["input_range"]
        if rng is not None:
            low, high = rng
            value = f"{low:.3g}..{high:.3g}"
            if high > 2.0:
                m = self.add(Measurement(name="VAE input range", value=value, expected="-1..1", verdict=Verdict.WARN))
                self.finding(m.verdict, f"the VAE receives pixels in {value}: looks like [0, 255]",
                             "feed the VAE pixels in [-1, 1]: x / 127.5 - 1")
            elif low >= -0.01 and high > 0.5:
                m = self.add(Measurement(name="VAE input range", value=value, expected="-1..1", verdict=Verdict.WARN))
                self.finding(m.verdict, f"the VAE receives pixels in {value}: looks like [0, 1], diffusers VAEs "
                             "expect [-1, 1]", "feed the VAE 2 * x - 1 (and map decoded pixels back with (y + 1) / 2)")
            else:
                self.add(info("VAE input range", value, "", "diffusers VAEs expect -1..1"))

    # ----------------------------------------------------------------------------------------------- raw
    def _raw_report(self, once, sigma_rel: float) -> None:
        sm = self.sm
        raw = self.sample_moments
        rec = sm.recommend(raw, self.obs["images"])
        self.add(info("raw latent std", _num(raw.overall_std())))
        self.add(info("raw latent mean", _num(raw.overall_mean())))
        self.add(info("implied scaling_factor", _num(rec.scaling_factor), "", "1 / raw std"))
        self.add(info("implied shift", _num(raw.overall_mean()), "", "raw mean"))
        self.add(info("z1 std", _num(self.obs["z1_std"])))
        self.add(info("z1 mean", _num(self.obs["z1_mean"])))
        self.details["raw"] = {"channel_mean": list(raw.mean), "channel_std": list(raw.std()),
                               "posterior_sigma_rms": [math.sqrt(v) for v in self.obs["sigma2"]],
                               "images": self.obs["images"], "latent_shape": self.obs["latent_shape"],
                               "capture": self.obs["capture"], "sample_recorded": self.obs["sample_recorded"]}
        self.details["z1"] = {"mean": self.obs["z1_mean"], "std": self.obs["z1_std"],
                              "channel_std": self.obs["z1_channel_std"], "shape": self.obs["z1_shape"]}
        self.details["configured"] = self.cfg.as_dict()
        self.details["recommended"] = {"scaling_factor": rec.scaling_factor, "shift_factor": rec.shift_factor,
                                       "latents_mean": list(rec.latents_mean), "latents_std": list(rec.latents_std),
                                       "per_channel_advised": rec.per_channel_advised}

    def _pass_summary(self) -> str:
        ident = self.ident
        text = (f"scaling applied once ({self.cfg.formula()}, within {ident.distance_correct:.2g}); "
                f"z1 std {self.obs['z1_std']:.3g}")
        rt = self.details.get("round_trip")
        if rt is not None:
            text += f"; decode inverts encode (error {rt['error']:.2g})"
        if ident.indistinguishable:
            text += f"; {self._blind_spot_text()}"
        return text

    def _blind_spot_text(self) -> str:
        names = "/".join(k for k, _ in self.ident.indistinguishable)
        return (f"blind spot: the configured transform ({self.cfg.formula()}) is ~identity, so {names} would look "
                "the same here")


_ENCODE_HINTS = {
    "missing": "apply the configured transform after encoding: {formula} (decode must undo it)",
    "twice": "apply the configured transform exactly once ({formula}): look for a second multiplication in a "
             "wrapper, a latent cache that already stores scaled latents, or a helper that scales internally",
    "inverted": "encode multiplies by scaling_factor, decode divides: {formula} in encode, x = z / s (+ shift) in "
                "decode",
    "shift_missing": "subtract the shift/mean before scaling: {formula}",
    "shift_sign": "subtract the shift/mean, don't add it: {formula}",
    "shift_after_scale": "subtract the shift before multiplying: {formula}",
    "scale_missing_shift_applied": "multiply by scaling_factor after centring: {formula}",
    "std_ignored": "normalise per channel: {formula}",
    "scalar_only": "normalise per channel with the config's latents_mean/latents_std: {formula}",
}

_DECODE_HINTS = {
    "forward": "decode must divide where encode multiplies: vae.decode(z1 / scaling_factor + shift) (per channel: "
               "z1 * latents_std / scaling_factor + latents_mean)",
    "none": "decode must unscale before the VAE: vae.decode(z1 / scaling_factor + shift)",
    "twice": "unscale once: vae.decode(z1 / scaling_factor + shift)",
    "shift_missing": "add the shift/mean back after unscaling: vae.decode(z1 / scaling_factor + shift)",
    "shift_sign": "add the shift/mean back, don't subtract it: vae.decode(z1 / scaling_factor + shift)",
}


def _signed(value: float) -> str:
    if not math.isfinite(value) or abs(value) < 5e-5:
        return ""
    return f" {'+' if value > 0 else '-'} {abs(value):.3g}"


def _within(value: float, factor: float) -> bool:
    return math.isfinite(value) and value > 0 and max(value, 1 / value) <= factor


def _num(value: Any) -> Any:
    if value is None:
        return None
    value = float(value)
    return value


def _short(values) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"
