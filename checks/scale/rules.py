"""The `scale` check's rules: everything it can conclude, each under a stable code, read from the evidence.

Each rule's test is a pure function of the evidence (:mod:`.evidence`) and the thresholds: it never looks at a
message or a label to decide. The table is long because each rule carries its own words (message, fix, and the
`fmcheck explain` text); the logic per rule is a few lines.
"""

from __future__ import annotations

import math
from typing import Literal, Optional

from pydantic import Field

from fmcheck.api import Hit, Rule, Thresholds
from fmcheck.verdict import Verdict

from .analysis import signed
from .evidence import Evidence, Transform

FAIL, WARN = Verdict.FAIL, Verdict.WARN
MEAN_WARN = 0.5  # `scale --vae`: the configured latents' |mean| / std beyond which a shift_factor is recommended


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


def within(value: float, factor: float) -> bool:
    return math.isfinite(value) and value > 0 and max(value, 1 / value) <= factor


# ---------------------------------------------------------------------------------------------- encode's map


def _z1_not_finite(ev: Evidence, t: ScaleThresholds) -> Optional[Hit]:
    tr = ev.transform
    if tr is None or tr.z1_finite:
        return None
    return Hit.of(tr.z1_std, bound="finite")


def _config_mismatch(tr: Transform, t: ScaleThresholds) -> bool:
    """z1 has unit std while the configured transform does not give it: the config, not encode, is off."""
    return within(tr.z1_std, t.config_std_warn) and not within(tr.configured_std, t.config_std_warn)


def _named(key: str):
    def test(ev: Evidence, t: ScaleThresholds) -> Optional[Hit]:
        tr = ev.transform
        if tr is None or not tr.z1_finite or not tr.matches_other or tr.best != key or _config_mismatch(tr, t):
            return None
        # A named mistake whose effect is within the tolerance for any deviation only warns (Flux's small shift).
        return Hit.of(tr.distance, bound=f"<= {t.map_tolerance:g}", unit="rel. RMS",
                      verdict=FAIL if tr.distance > t.map_tolerance else WARN, label=tr.label,
                      description=tr.description, z1_std=f"{tr.z1_std:.3g}", z1_mean=f"{tr.z1_mean:.3g}",
                      formula=tr.formula)

    return test


def _config_not_used(ev: Evidence, t: ScaleThresholds) -> Optional[Hit]:
    tr = ev.transform
    if tr is None or not tr.z1_finite or not tr.matches_other or not _config_mismatch(tr, t):
        return None
    return Hit.of(tr.z1_std, bound=f"configured std {tr.configured_std:.3g}", label=tr.label,
                  description=tr.description, configured_std=f"{tr.configured_std:.3g}",
                  recommended=f"{1 / tr.raw_std:.4g}" if tr.raw_std > 0 else "nan")


def _unrecognised(ev: Evidence, t: ScaleThresholds) -> Optional[Hit]:
    tr = ev.transform
    if tr is None or not tr.z1_finite or tr.matches_correct or tr.matches_other or tr.distance <= t.map_tolerance:
        return None
    return Hit.of(tr.distance, bound=f"<= {t.map_tolerance:g}", unit="rel. RMS",
                  verdict=WARN if tr.distance <= t.map_fail else FAIL, description=tr.description, label=tr.label,
                  formula=tr.formula)


NAMED = (  # (candidate key, code, title, fix, doc)
    ("missing", "scale.missing", "The latent scaling is missing: z1 is the raw latent",
     "apply the configured transform after encoding: {formula} (decode must undo it)",
     "z1 is the VAE's raw latent (sample or mean) without the configured scaling_factor (and shift). The per-channel "
     "affine map from the raw latent to z1 is the identity while the configured one is not, so z1 lives in other "
     "units than the noise z0 (SD's VAE: ~5x too wide). The seed's case adds the posterior mean: then the message "
     "says 'neither sampled nor scaled'. Expected on a correct pipeline only when the config's factor is wrong and "
     "z1 has unit std anyway: that is reported as scale.config_not_used instead."),
    ("twice", "scale.twice", "The latent scaling is applied twice",
     "apply the configured transform exactly once ({formula}): look for a second multiplication in a wrapper, a "
     "latent cache that already stores scaled latents, or a helper that scales internally",
     "z1's map from the raw latent equals the configured transform applied twice (z = s * s * x with SD's "
     "s = 0.18215: z1 shrinks ~5x toward zero). Typical: a latent cache storing scaled latents, scaled again in the "
     "step. Named only when it explains z1 clearly better than the configured transform (within `resolution` or "
     "4 standard errors); a factor near 1 makes it invisible (listed as a blind spot)."),
    ("inverted", "scale.inverted", "The latent scaling is inverted: encode divides by scaling_factor",
     "encode multiplies by scaling_factor, decode divides: {formula} in encode, x = z / s (+ shift) in decode",
     "z1's map is the inverse of the configured transform (the decode-side z / s used in encode): z1 is s^-2 times "
     "too wide (~30x for SD). Fails beyond `map_tolerance`; warns when the mistake changes z1 by less."),
    ("shift_missing", "scale.shift_ignored", "The shift or per-channel mean is ignored: z1 is scaled but not centred",
     "subtract the shift/mean before scaling: {formula}",
     "The config has a shift_factor (SD3, Flux) or latents_mean, and z1 is the raw latent scaled but not centred: "
     "its mean is offset by shift * s. Flux's small shift changes z1 by less than `map_tolerance`: then it warns "
     "instead of failing."),
    ("shift_sign", "scale.shift_sign", "The shift or mean is added instead of subtracted",
     "subtract the shift/mean, don't add it: {formula}",
     "z1 = (x + shift) * s instead of (x - shift) * s: the per-channel offset of z1's fitted map has the wrong sign "
     "against the configured transform. Fails beyond `map_tolerance`, warns within it."),
    ("shift_after_scale", "scale.shift_after_scale", "The shift is subtracted after scaling instead of before",
     "subtract the shift before multiplying: {formula}",
     "z1 = x * s - shift instead of (x - shift) * s: z1's offset is the shift itself, not shift * s. Only "
     "distinguishable when s is far enough from 1 (else listed as a blind spot)."),
    ("scale_missing_shift_applied", "scale.shift_without_scale", "The shift is applied but the scaling is missing",
     "multiply by scaling_factor after centring: {formula}",
     "z1 = x - shift: centred, but the scaling_factor (or latents_std) never applied, so z1 has the raw latent's "
     "width. Fails beyond `map_tolerance`, warns within it."),
    ("std_ignored", "scale.std_ignored", "latents_std is ignored: centred and scaled but not divided per channel",
     "normalise per channel: {formula}",
     "Per-channel configs (SDXL-style, Wan, Qwen-Image): z1 = (x - latents_mean) * s without the division by "
     "latents_std, so each channel keeps its own width. Identified from the per-channel slopes of z1's fitted map."),
    ("scalar_only", "scale.per_channel_ignored", "latents_mean/latents_std are ignored: only scaling_factor applied",
     "normalise per channel with the config's latents_mean/latents_std: {formula}",
     "Per-channel configs: z1 = x * s, neither centred nor divided per channel, as if the VAE had SD's scalar "
     "convention. Identified from the per-channel slopes and offsets of z1's fitted map."),
)

MISTAKE = ("{label}: {description}; z1 std {z1_std}, mean {z1_mean} ({observed} {unit} from the configured "
           "transform, bound {bound})")

ENCODE_RULES = (
    Rule("scale.z1_not_finite", FAIL, "z1 has NaN or Inf values",
         "z1 has NaN/Inf values (std {observed})",
         "check the VAE's dtype (keep it in float32) and the pixels fed to it",
         _z1_not_finite,
         "The user's encode returned a z1 with NaN or Inf values on the measured batches (its overall mean or std is "
         "not finite). Usually the VAE in float16 overflowing, or pixels with NaN. Never expected on a correct "
         "pipeline."),
    *(Rule(code, FAIL, title, MISTAKE, fix, _named(key), doc) for key, code, title, fix, doc in NAMED),
    Rule("scale.config_not_used", WARN, "z1 has unit std but the VAE's config says another scaling",
         "{label}; {description}; but z1 has unit std ({observed}) while the configured transform gives "
         "{configured_std}: the config does not fit this VAE",
         "put the factor you use in the VAE's config (recommended scaling_factor {recommended}) so that decode and "
         "inference use it too",
         _config_not_used,
         "z1's map is a named mistake against the config (typically 'missing'), yet z1 has unit std (within "
         "`config_std_warn`) while the configured transform does not give it: the config, not encode, is what is "
         "wrong (diffusers' default 0.18215 left on a VAE trained from scratch). Warns: training is in the right "
         "units, but decode and inference read the config."),
    Rule("scale.unrecognised", FAIL, "z1's transform matches no known convention",
         "z1's transform matches no known convention: {description}, {observed} apart; closest: {label}",
         "make encode compute {formula} from vae.encode(x).latent_dist.sample(); if the other factor is deliberate, "
         "put it in the VAE's config so decode and inference use it too",
         _unrecognised,
         "z1's map from the raw latent is further than `map_tolerance` from the configured transform and no named "
         "mistake explains it. Warns up to `map_fail`, fails beyond. Expected on a correct pipeline when the user "
         "deliberately scales by another factor than the config's: put that factor in the config (or --ignore)."),
)


# ---------------------------------------------------------------------------------------------- configuration


def _config_std_off(ev: Evidence, t: ScaleThresholds) -> Optional[Hit]:
    c = ev.config
    if within(c.std, t.config_std_warn):
        return None
    verdict = WARN if math.isfinite(c.std) and c.std > 0 and max(c.std, 1 / c.std) <= t.config_std_fail else FAIL
    return Hit.of(c.std, bound=f"{1 / t.config_std_warn:.3g}..{t.config_std_warn:g}", verdict=verdict,
                  formula=c.formula, images=c.images, recommended=f"{c.recommended_scale:.4g}", snippet=_snippet(c))


def _snippet(c) -> str:
    return f"; {c.snippet}" if c.snippet else ""


def _config_mean_off(ev: Evidence, t: ScaleThresholds) -> Optional[Hit]:
    c = ev.config
    if not ev.standalone:  # with a pipeline, the transform rules judge the shift
        return None
    relative = abs(c.mean) / c.std if c.std > 0 else math.inf
    if math.isfinite(relative) and relative <= MEAN_WARN:
        return None
    return Hit.of(relative, bound=f"<= {MEAN_WARN:g}", unit="std", verdict=WARN if math.isfinite(relative) else FAIL,
                  mean=f"{c.mean:.3g}", shift=f"{c.raw_mean:.4g}", snippet=_snippet(c))


CONFIG_FIX = ("put the values measured on this VAE in its config (scaling_factor, shift_factor: `fmcheck scale --vae DIR` "
              "prints them), then re-check encode and decode{snippet}")

CONFIG_RULES = (
    Rule("scale.config_std_off", FAIL, "The configured scaling does not fit this VAE: latents are not unit std",
         "the configured transform ({formula}) gives latents of std {observed} on {images} images, not ~1: the "
         "config does not fit this VAE (recommended scaling_factor {recommended})",
         CONFIG_FIX, _config_std_off,
         "The std of posterior samples under the configured transform (var = var(mean) + E[sigma^2]) should be ~1. "
         "Off by more than `config_std_warn` either way it warns, beyond `config_std_fail` it fails: the config's "
         "scaling_factor does not fit this VAE (diffusers' default 0.18215 on a VAE trained from scratch). "
         "`fmcheck scale --vae DIR` prints the values to put in the config."),
    Rule("scale.config_mean_off", WARN, "The configured transform leaves the latents off-centre: a shift is needed",
         "the configured transform leaves the latents' mean at {mean} ({observed} std): recommended shift_factor "
         "{shift}",
         CONFIG_FIX, _config_mean_off,
         "`fmcheck scale --vae` only: the mean of the latents under the configured transform, in units of their std, "
         "beyond 0.5 warns: the config needs a shift_factor (SD3 and Flux VAEs have one). With a pipeline the "
         "transform rules judge the shift instead."),
)


# ---------------------------------------------------------------------------------------------- sampling


def _matters(ev: Evidence, t: ScaleThresholds) -> bool:
    return ev.sampling is not None and ev.sampling.sigma_rel >= t.sigma_negligible


def _mean_not_sample(ev: Evidence, t: ScaleThresholds) -> Optional[Hit]:
    s = ev.sampling
    if s is None or s.source != "mean" or not _matters(ev, t):
        return None
    return Hit.of(s.sigma_rel, bound=f"< {t.sigma_negligible:g}")


def _fixed_noise(ev: Evidence, t: ScaleThresholds) -> Optional[Hit]:
    s = ev.sampling
    if s is None or s.source not in ("sample", "own_sample") or not s.identical or not _matters(ev, t):
        return None
    return Hit.of(s.repeat_diff, bound="> 0", unit="rel. RMS", sigma=f"{s.sigma_rel:.3g}")


def _not_affine(ev: Evidence, t: ScaleThresholds) -> Optional[Hit]:
    s = ev.sampling
    if s is None or s.source != "unexplained":
        return None
    return Hit.of(s.unexplained, bound="affine", share=f"{s.unexplained:.0%}")


SAMPLING_RULES = (
    Rule("scale.mean_not_sample", WARN, "z1 is the posterior mean, not a sample",
         "z1 is the posterior mean (latent_dist.mean / mode()), not a sample: the posterior sigma is {observed} of "
         "the latent's std",
         "training usually samples: z1 = (vae.encode(x).latent_dist.sample() - shift) * scaling_factor; keep the "
         "mean only if that is a deliberate choice",
         _mean_not_sample,
         "z1 is an exact affine map of the posterior mean, and two encodes of the same pixels are identical. Warns "
         "when the posterior sigma is at least `sigma_negligible` of the latent's std (below that the choice makes "
         "no difference). Some recipes deliberately train on the mean: then --ignore scale.mean_not_sample."),
    Rule("scale.fixed_noise", WARN, "z1 is a posterior sample, but the same one every call",
         "z1 is a posterior sample, but the same one every call (two encodes of the same pixels are identical; "
         "posterior sigma {sigma} of the latent's std)",
         "draw fresh noise per call: latent_dist.sample() without a freshly re-seeded generator",
         _fixed_noise,
         "z1 follows the posterior sample, yet a second encode of 16 of the same images gives the identical z1: the "
         "noise is fixed (a generator re-seeded every call), so every epoch sees the same latent. Warns when the "
         "posterior sigma is at least `sigma_negligible` of the latent's std."),
    Rule("scale.not_affine", WARN, "z1 is not an affine map of the VAE's latent",
         "z1 is not an affine map of the VAE's latent ({share} of its variance unexplained, beyond posterior "
         "noise): the transform was compared by mean and std only",
         "z1 should be the VAE latent times the scaling factor (minus the shift), nothing else: no clamp, tanh or "
         "re-normalisation per batch",
         _not_affine,
         "No per-channel affine map of the raw latent (sample or mean) explains z1 beyond the posterior's own noise: "
         "a clamp, tanh or per-batch re-normalisation sits between the VAE and z1. The scaling is then judged from "
         "z1's overall mean and std only. Warns."),
)


# -------------------------------------------------------------------------------------------------- round trip


def _round_trip_verdict(ev: Evidence, t: ScaleThresholds) -> Optional[Verdict]:
    rt = ev.round_trip
    if rt is None:
        return None
    warn, fail = max(t.round_trip_warn, rt.resolution), max(t.round_trip_fail, rt.resolution)
    if not math.isfinite(rt.error) or rt.error > fail:
        return FAIL
    return WARN if rt.error > warn else None


def _encode_verdict(ev: Evidence, t: ScaleThresholds) -> Verdict:
    """The worst verdict the encode-side rules give on this evidence (PASS when none fires)."""
    verdicts = [Verdict.PASS]
    for rule in ENCODE_RULES:
        hits = rule.test(ev, t)
        for hit in [hits] if isinstance(hits, Hit) else list(hits or ()):
            verdicts.append(hit.verdict or rule.verdict)
    return Verdict.worst(verdicts)


def _round_trip(decode: Optional[str]):
    """A round-trip rule: fires on a failing round trip whose decode map is ``decode`` (None: anything else)."""

    def test(ev: Evidence, t: ScaleThresholds) -> Optional[Hit]:
        verdict = _round_trip_verdict(ev, t)
        rt = ev.round_trip
        if verdict is None:
            return None
        named = rt.decode if rt.decode in DECODE_KEYS else None
        if named != decode:
            return None
        if decode == "inverse" and _encode_verdict(ev, t).severity >= verdict.severity:
            return None  # encode's own finding names the cause of this failure: one cause, one finding
        feeds = "" if rt.slope is None else (f": decode(encode(x)) feeds vae.decode {rt.slope:.4g} x raw"
                                             f"{signed(rt.offset)} instead of the raw latent")
        return Hit.of(rt.error, bound=f"<= {max(t.round_trip_warn, rt.resolution):.3g}", unit="rel. RMS",
                      verdict=verdict, feeds=feeds, label=rt.decode_label)

    return test


DECODE_NAMED = (  # (decode key, code, title, fix, doc)
    ("forward", "scale.decode_multiplies", "decode multiplies by scaling_factor instead of dividing",
     "decode must divide where encode multiplies: vae.decode(z1 / scaling_factor + shift) (per channel: z1 * "
     "latents_std / scaling_factor + latents_mean)",
     "decode's own map from z1 to the latent it hands vae.decode is the encode-side transform (decode copied from "
     "encode): decode(encode(x)) feeds the VAE s^2 x instead of x. Fails beyond `round_trip_fail`."),
    ("none", "scale.decode_unscale_missing", "decode feeds z1 to the VAE without unscaling",
     "decode must unscale before the VAE: vae.decode(z1 / scaling_factor + shift)",
     "decode hands z1 to vae.decode unchanged: the VAE decodes latents s times too small (or off by the shift). "
     "Identified from decode's own map z1 -> vae.decode's input; fails beyond `round_trip_fail`."),
    ("twice", "scale.decode_twice", "decode unscales twice",
     "unscale once: vae.decode(z1 / scaling_factor + shift)",
     "decode's own map is the configured inverse applied twice: vae.decode receives latents 1/s times too wide. "
     "Identified from decode's own map; fails beyond `round_trip_fail`."),
    ("shift_missing", "scale.decode_shift_missing", "decode does not add the shift or mean back",
     "add the shift/mean back after unscaling: vae.decode(z1 / scaling_factor + shift)",
     "Configs with a shift_factor or latents_mean: decode divides by the factor but does not add the shift back, "
     "so vae.decode receives off-centre latents. Fails beyond `round_trip_fail`, warns beyond `round_trip_warn`."),
    ("shift_sign", "scale.decode_shift_sign", "decode subtracts the shift or mean instead of adding it back",
     "add the shift/mean back, don't subtract it: vae.decode(z1 / scaling_factor + shift)",
     "Configs with a shift_factor or latents_mean: decode subtracts the shift where it must add it back. Fails "
     "beyond `round_trip_fail`, warns beyond `round_trip_warn`."),
)
DECODE_KEYS = ("inverse", *(key for key, *_ in DECODE_NAMED))
NOT_INVERSE = "decode is not the inverse of encode (round-trip error {observed}){feeds}"

ROUND_TRIP_RULES = (
    *(Rule(code, FAIL, title, NOT_INVERSE + "; {label}", fix, _round_trip(key), doc)
      for key, code, title, fix, doc in DECODE_NAMED),
    Rule("scale.round_trip_encode_side", FAIL, "The round trip fails because encode deviates (decode inverts the config)",
         NOT_INVERSE + "; decode inverts the configured transform: encode is what deviates",
         "fix encode as the finding on z1's transform says; the round trip then closes",
         _round_trip("inverse"),
         "decode(encode(x)) does not hand vae.decode the raw latent encode started from, but decode's own map is the "
         "configured inverse: encode's deviation is what breaks the round trip. Reported only when no finding on "
         "encode's side (scale.twice, scale.missing, ...) already names it at the same or a worse verdict: one "
         "cause, one finding. Warns beyond `round_trip_warn`, fails beyond `round_trip_fail`."),
    Rule("scale.decode_not_inverse", FAIL, "decode is not the inverse of encode",
         NOT_INVERSE,
         "make decode the exact inverse of encode: vae.decode(z1 / scaling_factor + shift) (per channel: z1 * "
         "latents_std / scaling_factor + latents_mean)",
         _round_trip(None),
         "decode(z1) on 16 images: the latent it hands vae.decode is compared with the raw latent encode started "
         "from (relative RMS error; decode's pixels against the VAE's own decode when decode bypasses vae.decode). "
         "Warns beyond `round_trip_warn`, fails beyond `round_trip_fail`; this code when decode's map matches no "
         "named mistake."),
)


# ---------------------------------------------------------------------------------------------- VAE and pixels


def _half_overflow(ev: Evidence, t: ScaleThresholds) -> Optional[Hit]:
    half = ev.half
    if half is None or half.finite or t.half_probe == "off":
        return None
    return Hit.of("NaN/Inf", bound="finite", verdict=FAIL if t.half_probe == "fail" else WARN,
                  where="latents" if not half.latent_finite else "decoded pixels", images=half.images)


def _pixel_range(high_above: float, low_at_least: Optional[float]):
    def test(ev: Evidence, t: ScaleThresholds) -> Optional[Hit]:
        if ev.pixels is None:
            return None
        low, high = ev.pixels
        if low_at_least is None:
            fires = high > high_above
        else:  # [0, 1]: only when it does not look like [0, 255]
            fires = not high > 2.0 and low >= low_at_least and high > high_above
        return Hit.of(f"{low:.3g}..{high:.3g}", bound="-1..1") if fires else None

    return test


VAE_RULES = (
    Rule("scale.half_overflow", FAIL, "The VAE overflows in float16",
         "the VAE in float16 gives NaN/Inf {where} on {images} images",
         "keep the VAE in float32 (encode/decode outside autocast; diffusers upcasts when the config says "
         "force_upcast)",
         _half_overflow,
         "A float16 copy of the VAE encodes and decodes a few images (4): NaN or Inf latents or pixels is the "
         "classic overflow (SDXL's VAE; its config says force_upcast). Fails by default; `half_probe = \"warn\"` "
         "warns instead and \"off\" skips the probe (a pipeline that never runs the VAE in half precision)."),
    Rule("scale.pixels_0_255", WARN, "The VAE receives pixels in [0, 255]",
         "the VAE receives pixels in {observed}: looks like [0, 255]",
         "feed the VAE pixels in [-1, 1]: x / 127.5 - 1",
         _pixel_range(2.0, None),
         "The range of the pixels the VAE received in the user's encode. A maximum above 2 looks like uint8 pixels "
         "cast to float: diffusers VAEs expect [-1, 1]. Warns (a VAE trained on another range would be correct)."),
    Rule("scale.pixels_0_1", WARN, "The VAE receives pixels in [0, 1]",
         "the VAE receives pixels in {observed}: looks like [0, 1], diffusers VAEs expect [-1, 1]",
         "feed the VAE 2 * x - 1 (and map decoded pixels back with (y + 1) / 2)",
         _pixel_range(0.5, -0.01),
         "The range of the pixels the VAE received: a minimum >= -0.01 and a maximum above 0.5 looks like [0, 1] "
         "(torchvision's ToTensor without Normalize). diffusers VAEs expect [-1, 1]. Warns: a VAE trained on [0, 1] "
         "is correct (then --ignore scale.pixels_0_1)."),
)

RULES = (*ENCODE_RULES, *CONFIG_RULES, *SAMPLING_RULES, *ROUND_TRIP_RULES, *VAE_RULES)
# What `fmcheck scale --vae` judges: no pipeline, so only the configuration and the float16 probe.
STANDALONE_RULES = (*CONFIG_RULES, VAE_RULES[0])

# The measurement each rule's evidence shows (its verdict is the worst of these findings').
GROUPS = {
    "transform": tuple(r.code for r in ENCODE_RULES),
    "config": tuple(r.code for r in CONFIG_RULES),
    "source": tuple(r.code for r in SAMPLING_RULES),
    "round_trip": tuple(r.code for r in ROUND_TRIP_RULES),
    "half": ("scale.half_overflow",),
    "pixels": ("scale.pixels_0_255", "scale.pixels_0_1"),
}
