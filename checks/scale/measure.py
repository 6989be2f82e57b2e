"""The `scale` check's measurement: the only part that runs the user's code (``encode``, ``decode``) and the VAE.

It returns plain data (the observation); :mod:`.analysis` turns that into evidence and :mod:`.rules` judges it.
Torch is imported inside functions only, so that ``fmcheck --help`` stays light.
"""

from __future__ import annotations

import math
from typing import Any, Optional

from .recorder import RawLatent, VaeRecorder

REPEAT_IMAGES = 16  # images encoded a second time (sample or mean?)
ROUND_TRIP_IMAGES = 16  # images decoded (round trip, PSNR)
HALF_PROBE_IMAGES = 4  # images through a half-precision copy of the VAE


def measure(ctx) -> dict[str, Any]:
    """The observation: the raw posterior of the measured batches, the user's z1 and its fits, a repeated encode, a
    round trip through ``decode`` and a float16 probe (unless ``half_probe`` is off)."""
    import torch

    from . import maths as sm
    from . import tensors as tn

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
    repeat_diff = tn.relative_rms(z1_again.to(first.device), first) if z1_again.shape == first.shape else None
    ctx.progress(len(pixels) + 1, total, stage="decode")

    mean = torch.cat([r.mean for r, _ in raws])
    std = torch.cat([r.std for r, _ in raws])
    samples = [r.sample for r, _ in raws]
    sample = torch.cat(samples) if all(s is not None for s in samples) else None
    z1_all = torch.cat([z.to(mean.device) for z in z1s])
    channels = int(mean.shape[1])
    mu_mean, mu_var = tn.moments_of(mean, channels)
    sigma2 = tn.channels_first(std, channels).pow(2).mean(1)
    z1_flat = z1_all.detach().float()
    z1_stats = torch.stack([z1_flat.mean(), z1_flat.std(unbiased=False), z1_flat.abs().max()])
    z1_aligned = tn.align(z1_all, mean)
    fits: dict[str, Any] = {}
    if z1_aligned is not None:
        fits["mean"] = tn.fit(mean, z1_aligned, channels)
        if sample is not None:
            fits["sample"] = tn.fit(sample, z1_aligned, channels)
    z1_channel_std = tn.moments_of(z1_aligned, channels)[1].sqrt() if z1_aligned is not None else None

    # 3. Round trip on a few images: what does decode hand vae.decode?
    round_trip = None
    if pipeline.decode is not None:
        round_trip = _round_trip(pipeline, vae, z1s[0], raws[0][0], pixels[0], channels)
    ctx.progress(len(pixels) + 2, total, stage="float16 probe")

    # 4. The VAE in float16 (the VAE's frozen-module hygiene is the `structure` check's).
    half = None
    if ctx.thresholds.half_probe != "off":
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
        "vae_dtype": _dtype_name(vae),
        "half": half,
        "input_range": [min(r[0] for r in ranges), max(r[1] for r in ranges)] if ranges else None,
    }


def _round_trip(pipeline, vae, z1, raw, px, channels: int) -> dict[str, Any]:
    from . import tensors as tn

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
        result["psnr"] = tn.psnr(reference, decoded)
    raw_mean = raw.mean[:n]
    z_dec = tn.align(z_dec.to(raw_mean.device), raw_mean) if z_dec is not None else None
    result["capture"] = z_dec is not None
    if z_dec is not None:
        # The composite map raw latent -> what decode hands vae.decode (identity when decode inverts encode),
        # from the mean and, when recorded, from the very sample encode used.
        result["fits"]["mean"] = tn.fit(raw_mean, z_dec, channels)
        if source is not None:
            result["fits"]["sample"] = tn.fit(source, z_dec, channels)
        aligned = tn.align(z1.to(z_dec.device), z_dec)
        if aligned is not None:
            result["decode_fit"] = tn.fit(aligned, z_dec, channels)
    elif decoded is not None:
        # decode bypasses vae.decode: compare its pixels with the VAE's own decode of the raw latent.
        import torch

        latent = source if source is not None else raw.mean[:n]
        with torch.no_grad():
            own = _pixels_from(vae.decode(latent.to(_vae_dtype(vae))))
        if own is not None and own.shape == decoded.shape:
            result["pixel_error"] = tn.relative_rms(decoded.to(own.device).float(), own.float())
    return result



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


def _dtype_name(vae) -> Optional[str]:
    dtype = _vae_dtype(vae)
    return str(dtype).replace("torch.", "") if dtype is not None else None


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
        from .tensors import relative_rms

        error = relative_rms(mean.float().to(reference_mean.device), reference_mean.float())
    del probe
    return {"dtype": "float16", "images": int(px.shape[0]), "latent_finite": bool(finite[0]),
            "decode_finite": bool(finite[1]), "latent_error": error}


