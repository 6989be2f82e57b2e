"""The `scale` rules on hand-written evidence: each rule fires (with its verdict) and stays quiet near its bound.

No torch, no VAE, no user code: the evidence is built by hand as :func:`checks.scale.analysis.analyse` would.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from fmcheck.checks.scale.evidence import ConfigFit, Evidence, HalfProbe, RoundTrip, Sampling, Transform
from fmcheck.checks.scale.rules import RULES, STANDALONE_RULES, ScaleThresholds
from fmcheck.findings import evaluate
from fmcheck.verdict import Verdict

FAIL, WARN = Verdict.FAIL, Verdict.WARN
T = ScaleThresholds()
FORMULA = "z = x * 0.18215"
CONFIG = ConfigFit(formula=FORMULA, std=1.02, mean=0.01, raw_mean=0.3, recommended_scale=0.1786, images=64)
ONCE = Transform(best="once", label="scaling applied once (the configured transform)", matches_correct=True,
                 matches_other=False, distance=0.002, tolerance=0.01, formula=FORMULA,
                 description=f"z1 = 0.1822 x, config: {FORMULA}", z1_std=1.02, z1_mean=0.01, raw_std=5.6,
                 configured_std=1.02)
SAMPLE = Sampling(source="sample", sigma_rel=0.05, repeat_diff=0.04)


def evidence(**changes) -> Evidence:
    return Evidence(**{"config": CONFIG, "transform": ONCE, "sampling": SAMPLE, **changes})


def mistake(key: str, distance: float = 0.8, **changes) -> Transform:
    return replace(ONCE, **{"best": key, "label": f"the {key} words", "matches_correct": False, "matches_other": True,
                            "distance": distance, "description": f"z1 = 0.0332 x, config: {FORMULA}", "z1_std": 0.19,
                            **changes})


def found(ev: Evidence, t: ScaleThresholds = T, rules=RULES) -> dict[str, Verdict]:
    findings = evaluate(rules, ev, t)
    assert all(f.verdict is not Verdict.ERROR for f in findings), [f.message for f in findings]
    return {f.code: f.verdict for f in findings}


def message(ev: Evidence, code: str, t: ScaleThresholds = T, rules=RULES):
    return next(f for f in evaluate(rules, ev, t) if f.code == code)


def test_a_correct_pipeline_concludes_nothing():
    assert found(evidence(round_trip=RoundTrip(error=1e-6), half=HalfProbe(4, True, True, 1e-3),
                          pixels=(-1.0, 0.98))) == {}


# ------------------------------------------------------------------------------------------------ encode's map


@pytest.mark.parametrize("key, code", [
    ("missing", "scale.missing"),
    ("twice", "scale.twice"),
    ("inverted", "scale.inverted"),
    ("shift_missing", "scale.shift_ignored"),
    ("shift_sign", "scale.shift_sign"),
    ("shift_after_scale", "scale.shift_after_scale"),
    ("scale_missing_shift_applied", "scale.shift_without_scale"),
    ("std_ignored", "scale.std_ignored"),
    ("scalar_only", "scale.per_channel_ignored"),
])
def test_a_named_mistake_fails_beyond_the_tolerance_and_warns_within(key, code):
    assert found(evidence(transform=mistake(key))) == {code: FAIL}
    assert found(evidence(transform=mistake(key, distance=0.051))) == {code: FAIL}
    assert found(evidence(transform=mistake(key, distance=0.049))) == {code: WARN}  # Flux's small shift
    finding = message(evidence(transform=mistake(key)), code)
    assert finding.message.startswith(f"the {key} words: z1 = 0.0332 x") and "z1 std 0.19" in finding.message
    assert finding.observed == 0.8 and finding.bound == "<= 0.05"


def test_twice_names_the_number_and_the_fix():
    finding = message(evidence(transform=mistake("twice")), "scale.twice")
    assert "0.8 rel. RMS from the configured transform, bound <= 0.05" in finding.message
    assert f"exactly once ({FORMULA})" in finding.fix and "decode" not in finding.fix


def test_z1_not_finite_fails_and_names_no_convention():
    bad = mistake("twice", z1_finite=False)
    assert found(evidence(transform=replace(bad, z1_std=math.nan))) == {"scale.z1_not_finite": FAIL}


def test_config_not_used_when_z1_has_unit_std_but_the_config_does_not():
    # diffusers' default 0.18215 left on a unit-std VAE, z1 left raw: the config is what is wrong
    unit = mistake("missing", z1_std=1.05, configured_std=0.19, raw_std=1.05)
    assert found(evidence(transform=unit, config=replace(CONFIG, std=0.19))) == {
        "scale.config_not_used": WARN, "scale.config_std_off": FAIL}
    assert "recommended scaling_factor 0.9524" in message(evidence(transform=unit), "scale.config_not_used").fix
    # z1 just outside unit std: the mistake is named instead
    assert found(evidence(transform=replace(unit, z1_std=1.6))) == {"scale.missing": FAIL}


def test_unrecognised_warns_then_fails_and_passes_within_the_tolerance():
    other = replace(ONCE, best="twice", matches_correct=False, matches_other=False)
    assert found(evidence(transform=replace(other, distance=0.049))) == {}
    assert found(evidence(transform=replace(other, distance=0.2))) == {"scale.unrecognised": WARN}
    assert found(evidence(transform=replace(other, distance=0.26))) == {"scale.unrecognised": FAIL}
    assert found(evidence(transform=replace(other, distance=math.nan))) == {"scale.unrecognised": FAIL}


# ---------------------------------------------------------------------------------------------- configuration


@pytest.mark.parametrize("std, verdict", [(1.49, None), (1 / 1.49, None), (1.6, WARN), (0.3, WARN), (4.1, FAIL),
                                          (0.2, FAIL), (math.nan, FAIL), (0.0, FAIL)])
def test_config_std_off(std, verdict):
    got = found(evidence(config=replace(CONFIG, std=std)))
    assert got == ({} if verdict is None else {"scale.config_std_off": verdict})


def test_config_std_off_says_the_recommended_factor_and_where_to_find_it():
    finding = message(evidence(config=replace(CONFIG, std=0.2)), "scale.config_std_off")
    assert "std 0.2 on 64 images" in finding.message and "recommended scaling_factor 0.1786" in finding.message
    assert "`fmcheck scale --vae DIR`" in finding.fix and finding.fix.endswith("re-check encode and decode")


def test_config_mean_off_is_the_standalone_commands():
    off = evidence(config=replace(CONFIG, mean=0.6, std=1.0))
    assert found(off) == {}  # with a pipeline the transform rules judge the shift
    standalone = Evidence(config=replace(CONFIG, mean=0.6, std=1.0, snippet='"shift_factor": 0.3'), standalone=True)
    assert found(standalone, rules=STANDALONE_RULES) == {"scale.config_mean_off": WARN}
    finding = message(standalone, "scale.config_mean_off", rules=STANDALONE_RULES)
    assert "recommended shift_factor 0.3" in finding.message and '"shift_factor": 0.3' in finding.fix
    centred = Evidence(config=replace(CONFIG, mean=0.49, std=1.0), standalone=True)
    assert found(centred, rules=STANDALONE_RULES) == {}


def test_standalone_judges_the_config_and_the_float16_probe_only():
    ev = Evidence(config=replace(CONFIG, std=0.1), half=HalfProbe(4, False, True), standalone=True)
    assert found(ev, rules=STANDALONE_RULES) == {"scale.config_std_off": FAIL, "scale.half_overflow": FAIL}


# ---------------------------------------------------------------------------------------------- sampling


def test_mean_not_sample_warns_only_when_sigma_matters():
    mean = Sampling(source="mean", sigma_rel=0.011, repeat_diff=0.0)
    assert found(evidence(sampling=mean)) == {"scale.mean_not_sample": WARN}
    assert "sigma is 0.011 of the latent's std" in message(evidence(sampling=mean), "scale.mean_not_sample").message
    assert found(evidence(sampling=replace(mean, sigma_rel=0.009))) == {}


def test_fixed_noise_warns_when_two_encodes_are_identical():
    fixed = Sampling(source="sample", sigma_rel=0.05, repeat_diff=0.0)
    assert found(evidence(sampling=fixed)) == {"scale.fixed_noise": WARN}
    assert found(evidence(sampling=replace(fixed, source="own_sample"))) == {"scale.fixed_noise": WARN}
    assert found(evidence(sampling=replace(fixed, repeat_diff=2e-5))) == {}
    assert found(evidence(sampling=replace(fixed, sigma_rel=0.005))) == {}


def test_not_affine_warns_with_the_unexplained_share():
    squashed = Sampling(source="unexplained", sigma_rel=0.05, repeat_diff=0.04, unexplained=0.23)
    assert found(evidence(sampling=squashed)) == {"scale.not_affine": WARN}
    assert "(23% of its variance unexplained" in message(evidence(sampling=squashed), "scale.not_affine").message


# -------------------------------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("decode, code", [
    ("forward", "scale.decode_multiplies"),
    ("none", "scale.decode_unscale_missing"),
    ("twice", "scale.decode_twice"),
    ("shift_missing", "scale.decode_shift_missing"),
    ("shift_sign", "scale.decode_shift_sign"),
    ("inverse", "scale.round_trip_encode_side"),
    (None, "scale.decode_not_inverse"),
])
def test_a_failing_round_trip_names_what_decode_does(decode, code):
    rt = RoundTrip(error=0.9668, slope=0.0332, offset=0.0, decode=decode, decode_label=f"the {decode} words")
    assert found(evidence(round_trip=rt)) == {code: FAIL}
    assert found(evidence(round_trip=replace(rt, error=0.049))) == {code: WARN}
    assert found(evidence(round_trip=replace(rt, error=0.0099))) == {}
    finding = message(evidence(round_trip=rt), code)
    assert finding.message.startswith("decode is not the inverse of encode (round-trip error 0.9668): "
                                      "decode(encode(x)) feeds vae.decode 0.0332 x raw instead of the raw latent")
    assert finding.bound == "<= 0.01" and finding.unit == "rel. RMS"


def test_the_round_trip_bound_widens_to_the_fits_resolution():
    noisy = RoundTrip(error=0.04, resolution=0.06)
    assert found(evidence(round_trip=noisy)) == {}
    assert found(evidence(round_trip=replace(noisy, error=0.07))) == {"scale.decode_not_inverse": FAIL}
    assert found(evidence(round_trip=RoundTrip(error=math.nan))) == {"scale.decode_not_inverse": FAIL}


def test_a_round_trip_broken_by_encode_does_not_blame_decode():
    rt = RoundTrip(error=0.97, slope=0.0332, offset=0.0, decode="inverse")
    finding = message(evidence(round_trip=rt), "scale.round_trip_encode_side")
    assert "encode is what deviates" in finding.message and "decode" not in finding.fix


# ---------------------------------------------------------------------------------------------- VAE and pixels


def test_half_overflow_follows_the_half_probe_setting():
    overflow = evidence(half=HalfProbe(images=4, latent_finite=True, decode_finite=False))
    assert found(overflow) == {"scale.half_overflow": FAIL}
    assert "NaN/Inf decoded pixels on 4 images" in message(overflow, "scale.half_overflow").message
    assert found(overflow, ScaleThresholds(half_probe="warn")) == {"scale.half_overflow": WARN}
    assert found(overflow, ScaleThresholds(half_probe="off")) == {}
    assert found(evidence(half=HalfProbe(4, True, True, 2e-3))) == {}


@pytest.mark.parametrize("low, high, code", [
    (0.0, 255.0, "scale.pixels_0_255"),
    (-0.5, 2.01, "scale.pixels_0_255"),
    (0.0, 1.0, "scale.pixels_0_1"),
    (-0.01, 0.51, "scale.pixels_0_1"),
    (-1.0, 1.0, None),
    (-0.02, 1.0, None),
    (0.0, 0.5, None),
])
def test_pixel_ranges(low, high, code):
    got = found(evidence(pixels=(low, high)))
    assert got == ({} if code is None else {code: WARN})
    if code:
        assert message(evidence(pixels=(low, high)), code).observed == f"{low:.3g}..{high:.3g}"
