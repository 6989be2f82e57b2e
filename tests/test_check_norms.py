"""The `norms` check: z0 and z1 in the same units, on synthetic pipelines with known scale errors."""

from __future__ import annotations

import math

import fm_variants
import pytest

from fmcheck.checks.norms import NormsCheck
from fmcheck.config import Settings
from fmcheck.contract import coerce
from fmcheck.runner import run
from fmcheck.verdict import Verdict


def _run(settings: Settings | None = None, **options):
    return run(coerce(fm_variants.build(**options)), settings or Settings(), only=["norms"]).check("norms")


def _value(result, name):
    return next(m for m in result.measurements if m.name == name).value


def test_a_correct_pipeline_passes_with_the_numbers():
    result = _run()
    assert result.verdict is Verdict.PASS, result.summary
    ratio = _value(result, "E||x1|| / E||x0||")
    assert 0.8 < ratio < 1.25
    assert f"{ratio:.3g}" in result.summary
    # a unit-variance latent of 64 dims has a per-sample norm of about 8 and a per-dimension RMS of about 1
    assert 0.9 < _value(result, "per-dim RMS x1") < 1.1
    assert 7 < _value(result, "E||x1||") < 9
    assert result.details["samples"] == 4 * 32


def test_the_ratio_is_the_ratio_of_mean_norms():
    base = _value(_run(), "E||x1|| / E||x0||")
    scaled = _value(_run(x1_scale=2.5), "E||x1|| / E||x0||")
    assert scaled == pytest.approx(2.5 * base, rel=1e-4)


@pytest.mark.parametrize("x1_scale, verdict", [(1.5, Verdict.PASS), (2.5, Verdict.WARN), (4.0, Verdict.FAIL),
                                               (1 / 2.5, Verdict.WARN), (1 / 4.0, Verdict.FAIL)])
def test_ratio_bands(x1_scale, verdict):
    result = _run(x1_scale=x1_scale)
    assert result.verdict is verdict, result.summary


def test_a_forgotten_scaling_factor_fails_and_the_hint_points_at_scale_for_the_cause():
    base = _value(_run(), "E||x1|| / E||x0||")
    result = _run(vae_scaling_factor=0.18215)  # x1 = raw latent, 1/0.18215 = 5.5x too large
    assert result.verdict is Verdict.FAIL
    ratio = _value(result, "E||x1|| / E||x0||")
    assert ratio == pytest.approx(base / 0.18215, rel=1e-4)
    assert f"x1 (the data latent) is {ratio:.3g}x larger" in result.summary
    # norms names the side that is off scale; the cause is the scale check's to name (one owner per fact)
    assert "data latent x1 is off scale" in result.hint and "fmcheck scale" in result.hint
    assert "ratio correction" in result.hint


@pytest.mark.parametrize("options", [dict(vae_scaling_factor=0.2, x1_scale=0.2 * 0.2),  # looks applied twice
                                     dict(vae_scaling_factor=0.2, x1_scale=1 / 0.2),  # looks inverted
                                     dict(x1_scale=0.2)])  # off scale, no factor matching
def test_the_hint_never_guesses_the_scaling_mistake_from_the_factor(options):
    # A guess from scaling_factor alone assumes raw latents of std 1; where they are not (a config that does not fit
    # the VAE), it contradicted the scale check, which compares z1 with the VAE's own latents.
    result = _run(**options)
    assert result.verdict is Verdict.FAIL
    assert "off scale" in result.hint and "fmcheck scale" in result.hint
    for guess in ("looks applied twice", "looks NOT applied", "looks divided"):
        assert guess not in result.hint


def test_non_finite_x1_says_so_instead_of_arithmetic_on_nan():
    pipeline = fm_variants.build()
    inner = pipeline["step"]

    def step(batch, step_index):
        out = inner(batch, step_index)
        x1 = out["x1"].clone()
        x1[0].view(-1)[0] = float("nan")
        return {**out, "x1": x1}

    pipeline["step"] = step
    result = run(coerce(pipeline), Settings(), only=["norms"]).check("norms")
    assert result.verdict is Verdict.FAIL
    assert "non-finite values (NaN/Inf) in x1 (4 of 128 samples)" in result.summary, result.summary
    assert "inf" not in result.summary.replace("Inf", "") and "nan" not in result.summary.lower().replace("nan/", "")
    assert "structure" in result.hint


def test_strict_thresholds_do_not_print_one_x_larger():
    strict = Settings(thresholds={"norms": {"ratio_warn": 1.0001, "ratio_fail": 1.0002}})
    result = _run(strict, x1_scale=1.01)
    assert result.verdict is not Verdict.PASS
    assert " 1x larger" not in result.summary and "% larger" in result.summary, result.summary
    ratio = next(m for m in result.measurements if m.name == "E||x1|| / E||x0||")
    assert ratio.expected == "0.9999..1.0001"


def test_a_large_head_output_is_blamed_on_the_head():
    result = _run(x0_scale=5.0)
    assert result.verdict is Verdict.FAIL
    assert "x0 (the source) is" in result.summary
    assert "text head" in result.hint and "sigma" in result.hint


def test_a_dominant_latent_channel_warns():
    result = _run(channel_scale=[0.5, 1.0, 1.0, 2.2])
    assert result.verdict is Verdict.WARN, result.summary
    spread = _value(result, "x1 channel std spread (max/min)")
    assert spread == pytest.approx(4.4, rel=0.15)
    assert "per-channel" in result.summary
    off = Settings(thresholds={"norms": {"channel_spread_warn": None}})
    assert _run(off, channel_scale=[0.5, 1.0, 1.0, 2.2]).verdict is Verdict.PASS


def test_thresholds_are_configurable():
    loose = Settings(thresholds={"norms": {"ratio_warn": 3.0, "ratio_fail": 5.0}})
    assert _run(loose, x1_scale=2.5).verdict is Verdict.PASS
    assert _run(loose, x1_scale=4.0).verdict is Verdict.WARN


def test_a_pure_noise_source_is_fine():
    result = _run(head=False)
    assert result.verdict is Verdict.PASS
    assert all(m.name != "per-dim RMS mu" for m in result.measurements)
    assert math.isclose(_value(result, "per-dim RMS x0"), 1.0, rel_tol=0.1)


def test_skips_naming_the_missing_output():
    result = _run(outputs_without=("x0",))
    assert result.verdict is Verdict.SKIP
    assert "'x0'" in result.summary


def test_the_doc_renders_every_threshold():
    from fmcheck.docs import check_markdown

    text = check_markdown(NormsCheck)
    for name in NormsCheck.Thresholds.model_fields:
        assert f"`{name}`" in text
