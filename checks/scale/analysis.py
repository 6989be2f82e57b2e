"""The `scale` check's analysis: which scaling hypothesis the measured numbers support, as typed evidence.

Pure maths over the observation ``measure`` returned (moments, affine fits, the configured transform): which raw
latent z1 is a function of (the recorded sample, the mean, the mean plus noise of its own), which convention the map
from it to z1 is (once, twice, missing, inverted, shift ignored, ...), how the configuration fits this VAE, and
whether decode inverts encode (and, if not, what decode does instead). No torch, no user code, no verdicts: the
rules (:mod:`.rules`) judge the evidence. The resolution thresholds (``resolution``, ``round_trip_warn``) enter
here because they decide what the data can tell apart, not what is acceptable.
"""

from __future__ import annotations

import math
from typing import Any, Optional

from . import maths as sm
from .evidence import IDENTICAL, ConfigFit, Evidence, HalfProbe, RoundTrip, Sampling, Transform

EXACT = 1e-3  # unexplained variance share under which z1 is an exact affine map of a raw latent


def analyse(obs: dict[str, Any], t: Any) -> Evidence:
    cfg = obs["configured"]
    mean_moments = sm.Moments(tuple(obs["mu_mean"]), tuple(obs["mu_var"]))
    samples = mean_moments.plus_variance(obs["sigma2"])
    raw_std = samples.overall_std()
    sigma_rel = math.sqrt(sum(obs["sigma2"]) / len(obs["sigma2"])) / raw_std if raw_std > 0 else 0.0
    source, fit = z1_source(obs)
    transform, ident = encode_side(obs, t, cfg, mean_moments, samples, source, fit)
    mean_fit = obs["fits"].get("mean")
    unexplained = mean_fit.unexplained() if source == "unexplained" and mean_fit is not None else math.nan
    half = obs["half"]
    return Evidence(
        config=config_fit(cfg, samples, obs["images"]),
        transform=transform,
        sampling=Sampling(source, sigma_rel, obs["repeat_diff"], unexplained),
        round_trip=round_trip(obs["round_trip"], t, cfg, ident),
        half=half_probe(half),
        pixels=tuple(obs["input_range"]) if obs["input_range"] is not None else None,
    )


def config_fit(cfg: sm.Configured, samples: sm.Moments, images: int, snippet: str = "") -> ConfigFit:
    """The configured transform on posterior samples of this VAE: the std and mean latents get under it."""
    under = samples.mapped(cfg.map())
    raw_std = samples.overall_std()
    return ConfigFit(formula=cfg.formula(), std=under.overall_std(), mean=under.overall_mean(),
                     raw_mean=samples.overall_mean(), recommended_scale=1 / raw_std if raw_std > 0 else math.inf,
                     images=images, snippet=snippet)


def half_probe(half: Optional[dict[str, Any]]) -> Optional[HalfProbe]:
    if half is None:
        return None
    return HalfProbe(images=half["images"], latent_finite=half["latent_finite"], decode_finite=half["decode_finite"],
                     latent_error=half["latent_error"])


# ------------------------------------------------------------------------------------------------ z1's source


def z1_source(obs: dict[str, Any]):
    """Which raw latent z1 is a function of: the recorded sample, the mean, or the mean plus noise of its own.

    Direct evidence first: z1 is an exact affine map of the sample ``latent_dist.sample()`` returned, or of the
    posterior mean. When sigma is so small that both fit (their residuals within 100x), the repeated encode
    decides: a fresh sample differs between calls, the mean does not. A z1 that fits the mean only up to noise
    of the posterior's size, or that differs between calls, was sampled outside ``latent_dist.sample()``.
    Returns (source, the fit of z1 against it or None).
    """
    fits = obs["fits"]
    if not fits:
        return "layout", None
    repeat = obs["repeat_diff"]
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
    expected_noise = slope2 * sum(obs["sigma2"]) / len(obs["sigma2"])
    resid = sum(mean_fit.resid) / len(mean_fit.resid)
    if expected_noise > 0 and 0.5 <= resid / expected_noise <= 2.0:
        return "own_sample", mean_fit
    if obs["z1_reshaped"]:  # same size, other layout (e.g. packed into tokens): no element correspondence
        return "layout", None
    return "unexplained", mean_fit


# ------------------------------------------------------------------------------------------------ encode's map


def encode_side(obs: dict[str, Any], t: Any, cfg: sm.Configured, mean_moments: sm.Moments, samples: sm.Moments,
                source: str, fit) -> tuple[Transform, sm.Identification]:
    """z1's map from the raw latent, named among the configured transform and the usual mistakes."""
    candidates = sm.encode_candidates(cfg)
    once = cfg.map()
    repeat = obs["repeat_diff"]
    deterministic = repeat is not None and repeat <= IDENTICAL
    # The raw latent z1 is a map of: posterior samples, unless z1 comes from the mean.
    uses_mean = source == "mean" or (source in ("layout", "unexplained") and deterministic)
    inputs = mean_moments if uses_mean else samples
    norm = inputs.mapped(once).rms()
    affine = fit is not None and source != "unexplained"
    if affine:
        user = fit.per_channel
        tolerance = max(t.resolution, 4 * fit.map_standard_error(inputs) / norm if norm > 0 else t.resolution)
        ident = sm.identify(candidates, lambda m: sm.map_distance(user, m, inputs, norm),
                            lambda m: sm.map_distance(m, once, inputs, norm), tolerance)
        slope, offset = fit.overall
        method = "per-channel affine fit"
        ratios = [a / k for a, k in zip(fit.per_channel.slope, once.slope) if k != 0]
        slope_ratio = sum(ratios) / len(ratios) if ratios else math.nan
    else:
        observed = (obs["z1_mean"], obs["z1_std"])
        ident = sm.identify(candidates, lambda m: sm.moment_distance(observed, m, inputs, norm),
                            lambda m: sm.map_distance(m, once, inputs, norm), 2 * t.resolution)
        raw_mean, raw_std = inputs.overall_mean(), inputs.overall_std()
        slope = obs["z1_std"] / raw_std if raw_std > 0 else math.nan
        offset = obs["z1_mean"] - slope * raw_mean
        method = "overall mean and std (z1 is not an affine map of the latent's elements" + (
            ": its layout differs)" if source == "layout" else ")")
        slope_ratio = slope / once.mean_slope() if once.mean_slope() != 0 else math.nan
    formula = cfg.formula()
    mean_error = obs["z1_mean"] - inputs.mapped(once).overall_mean()
    if len(set(once.slope)) == 1 and len(set(once.offset)) == 1:
        description = f"z1 = {slope:.4g} x{signed(offset)}, config: {formula}"
    else:
        description = (f"z1's slope is {slope_ratio:.3g}x the configured per-channel slope and its mean "
                       f"{mean_error:+.3g} off, config: {formula}")
    label = ident.label
    if ident.best == "missing" and source == "mean":
        label = "z1 is the raw posterior mean, neither sampled nor scaled"
    transform = Transform(
        best=ident.best, label=label, matches_correct=ident.matches_correct, matches_other=ident.matches_other,
        distance=ident.distance_correct, tolerance=ident.tolerance, source=source, description=description,
        formula=formula, z1_finite=obs["z1_finite"], z1_std=obs["z1_std"], z1_mean=obs["z1_mean"],
        raw_std=samples.overall_std(), configured_std=samples.mapped(once).overall_std(), slope=slope,
        offset=offset, slope_ratio=slope_ratio, mean_error=mean_error, method=method,
        indistinguishable=ident.indistinguishable, ranking=ident.ranking,
        per_channel_slope=tuple(fit.per_channel.slope) if affine else None,
        per_channel_offset=tuple(fit.per_channel.offset) if affine else None, norm=norm)
    return transform, ident


# -------------------------------------------------------------------------------------------------- round trip


def round_trip(rt: Optional[dict[str, Any]], t: Any, cfg: sm.Configured, ident: sm.Identification
               ) -> Optional[RoundTrip]:
    """decode(encode(x)) against the raw latent, and decode's own map named (None when not measured)."""
    if rt is None:
        return None
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
        if resolution > t.round_trip_warn and decode_fit is not None and decode_fit.unexplained() <= EXACT \
                and (ident.matches_correct or ident.matches_other):
            # decode's own map is exact (z1 -> decode's latent): compose it with encode's identified convention
            composed = decode_fit.per_channel.after(_encode_map(cfg, ident))
            error = sm.map_distance(composed, identity, comp.x, comp.x.rms())
            resolution = 0.0
            shown = (composed.mean_slope(), composed.mean_offset())
            method = "decode's exact map after encode's identified convention (z1 sampled outside the VAE)"
    elif rt["pixel_error"] is not None:
        error, comp, resolution, shown = rt["pixel_error"], None, 0.0, None
        method = "decode's pixels vs the VAE's own decode (decode bypasses vae.decode)"
    else:
        return None
    decode, label, ranking = None, "", ()
    decode_map, z1_moments, spread = _decode_map(rt, comp, cfg, ident)
    if decode_map is not None:
        inverse = cfg.map().inverse()
        norm = z1_moments.mapped(inverse).rms()
        named = sm.identify(sm.decode_candidates(cfg), lambda mp: sm.map_distance(decode_map, mp, z1_moments, norm),
                            lambda mp: sm.map_distance(mp, inverse, z1_moments, norm),
                            max(t.resolution, 4 * spread / norm if norm > 0 else 0))
        ranking = named.ranking
        if named.matches_correct:
            decode = "inverse"
        elif named.matches_other:
            decode, label = named.best, named.label
    slope, offset = shown if shown is not None else (None, None)
    return RoundTrip(error=error, resolution=resolution, slope=slope, offset=offset, decode=decode,
                     decode_label=label, method=method, images=rt["images"], ranking=ranking)


def _encode_map(cfg: sm.Configured, ident: sm.Identification) -> sm.ChannelMap:
    return next(c.map for c in sm.encode_candidates(cfg) if c.key == ident.best)


def _decode_map(rt: dict[str, Any], comp, cfg: sm.Configured, ident: sm.Identification):
    """decode's own map z1 -> the latent it hands vae.decode, its input moments, and its standard error.

    Fitted directly when z1 and that latent align element by element; else, when encode's convention was
    identified, derived from the round trip: decode = (decode o encode) o encode^-1.
    """
    decode_fit = rt.get("decode_fit")
    if decode_fit is not None and decode_fit.unexplained() <= EXACT:  # else z1's layout only looked alike
        return decode_fit.per_channel, decode_fit.x, decode_fit.map_standard_error()
    if comp is None or not (ident.matches_correct or ident.matches_other):
        return None, None, 0.0
    encode_map = _encode_map(cfg, ident)
    return comp.per_channel.after(encode_map.inverse()), comp.x.mapped(encode_map), comp.map_standard_error()


def signed(value: float) -> str:
    """`` + 0.123`` / `` - 0.123``, or nothing for a value that is zero to print precision."""
    if not math.isfinite(value) or abs(value) < 5e-5:
        return ""
    return f" {'+' if value > 0 else '-'} {abs(value):.3g}"
