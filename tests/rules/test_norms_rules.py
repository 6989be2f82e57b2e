"""Judge tests of the ``norms`` check's rules on hand-written evidence: no user code, no torch forward."""

from __future__ import annotations

import dataclasses
import math

import pytest

from fmcheck.checks.norms import NormsCheck
from fmcheck.checks.norms.rules import NormsEvidence, NormsThresholds
from fmcheck.findings import evaluate
from fmcheck.verdict import Verdict

TH = NormsThresholds()
# a (4, 8, 8) latent: 256 dims, unit variance has ||x|| ~ 16
GOOD = NormsEvidence(n0=16.0, n1=17.0, rms0=1.0, rms1=1.06, samples=128, channel_std=(1.0, 0.9, 1.1, 1.2))


def codes(ev, th=TH):
    return {f.code: f.verdict for f in evaluate(NormsCheck.rules, ev, th)}


def finding(ev, code, th=TH):
    return next(f for f in evaluate(NormsCheck.rules, ev, th) if f.code == code)


def x1_scaled(factor, **changes):
    return dataclasses.replace(GOOD, n1=16.0 * factor, rms1=factor, **changes)


def test_latents_in_the_same_units_give_no_finding():
    assert codes(GOOD) == {}


@pytest.mark.parametrize("factor, verdict", [(2.0, None), (2.5, Verdict.WARN), (3.0, Verdict.WARN),
                                             (3.1, Verdict.FAIL), (5.5, Verdict.FAIL)])
def test_an_off_scale_data_latent_warns_then_fails_at_the_ratio_bands(factor, verdict):
    assert codes(x1_scaled(factor)).get("norms.z1_scale") is verdict
    assert "norms.z0_scale" not in codes(x1_scaled(factor))


def test_the_z1_finding_says_which_side_and_points_at_scale_for_the_cause():
    hit = finding(x1_scaled(5.5), "norms.z1_scale")
    assert hit.verdict is Verdict.FAIL and hit.observed == 5.5 and hit.bound == "0.5..2"
    assert "x1 (the data latent) is 5.5x larger" in hit.message and "(E||x0|| 16, E||x1|| 88" in hit.message
    assert "expected 0.5..2" in hit.message and "per-dimension RMS x0 1, x1 5.5;" in hit.message
    assert "data latent x1 is off scale" in hit.fix and "fmcheck scale` names the cause" in hit.fix
    assert "ratio correction" in hit.fix
    # a data latent too SMALL (scaling applied twice) is the same cause, the other way
    small = finding(x1_scaled(0.18), "norms.z1_scale")
    assert "x0 (the source) is 5.56x larger" in small.message and "fmcheck scale` names the cause" in small.fix


def test_the_scale_checks_naming_of_the_cause_covers_the_ratio():
    from fmcheck.checks.norms.rules import RULES

    rule = next(r for r in RULES if r.code == "norms.z1_scale")
    assert {"scale.twice", "scale.missing", "scale.inverted"} <= set(rule.covered_by)


def test_an_off_scale_source_names_the_head_and_its_moments():
    ev = dataclasses.replace(GOOD, n0=160.0, rms0=10.0, mu_rms=9.9, sigma_rms=1.0)
    hit = finding(ev, "norms.z0_scale")
    assert codes(ev) == {"norms.z0_scale": Verdict.FAIL}
    assert "x0 (the source) is 9.41x larger" in hit.message
    assert "text head" in hit.fix and "RMS of mu 9.9, of sigma 1" in hit.fix
    without = finding(dataclasses.replace(ev, mu_rms=None, sigma_rms=None), "norms.z0_scale")
    assert "sigma" in without.fix and "RMS of mu" not in without.fix


def test_a_ratio_a_hair_off_one_prints_a_percentage():
    loose = NormsThresholds(ratio_warn=1.0001, ratio_fail=1.001)
    hit = finding(x1_scaled(1.0003), "norms.z1_scale", loose)
    assert hit.verdict is Verdict.WARN and "0.03% larger" in hit.message and " 1x larger" not in hit.message


def test_non_finite_latents_fail_once_with_the_sample_count():
    ev = dataclasses.replace(GOOD, n1=math.nan, rms1=math.nan, non_finite_samples={"x1": 4})
    assert codes(ev) == {"norms.nonfinite": Verdict.FAIL}  # no ratio or channel finding on undefined norms
    hit = finding(ev, "norms.nonfinite")
    assert "non-finite values (NaN/Inf) in x1 (4 of 128 samples)" in hit.message and "structure" in hit.fix


def test_a_few_dominating_channels_warn_and_the_threshold_can_be_unset():
    ev = dataclasses.replace(GOOD, channel_std=(0.5, 1.0, 1.0, 2.0))
    assert codes(ev) == {}  # exactly 4x
    spread = dataclasses.replace(GOOD, channel_std=(0.4, 1.0, 1.0, 2.0))
    hit = finding(spread, "norms.channel_spread")
    assert hit.verdict is Verdict.WARN and hit.observed == 5.0 and "per-channel" in hit.message
    assert codes(spread, NormsThresholds(channel_spread_warn=None)) == {}
    assert codes(dataclasses.replace(GOOD, channel_std=(0.0, 1.0)))["norms.channel_spread"] is Verdict.WARN


def test_evidence_from_an_observation():
    obs = {"norms": {"x0": {"mean": 16.0, "rms_per_dim": 1.0}, "x1": {"mean": 88.0, "rms_per_dim": 5.5}},
           "samples": 64, "channel_std": None, "non_finite_samples": {}, "mu_rms": None, "sigma_rms": None}
    ev = NormsEvidence.from_observation(obs)
    assert ev.ratio == 5.5 and ev.x1_off and ev.channel_spread is None
    assert codes(ev) == {"norms.z1_scale": Verdict.FAIL}


# -- the measurements table agrees with the findings: every non-PASS row is backed by a finding of that verdict
def observation(n1=17.0, rms1=1.06, stds=(1.0, 0.9, 1.1, 1.2), non_finite=None):
    return {"batches": 4, "samples": 128, "dims": {"x0": 256, "x1": 256},
            "norms": {"x0": {"mean": 16.0, "rms_per_dim": 1.0}, "x1": {"mean": n1, "rms_per_dim": rms1}},
            "channel_std": list(stds), "channel_mean": [0.0] * len(stds), "mu_rms": 0.9, "sigma_rms": 0.4,
            "non_finite_samples": non_finite or {}, "distributions": {"values": None, "norms": None, "channels": {}}}


@pytest.mark.parametrize("obs, code", [
    (observation(), None),
    (observation(n1=40.0, rms1=2.5), "norms.z1_scale"),
    (observation(n1=3.0, rms1=0.18), "norms.z1_scale"),
    (observation(n1=math.nan, rms1=math.nan, stds=(math.nan,) * 4, non_finite={"x1": 3}), "norms.nonfinite"),
    (observation(stds=(0.1, 1.0, 1.0, 1.0)), "norms.channel_spread"),
])
def test_every_non_pass_measurement_is_backed_by_a_finding_of_its_verdict(obs, code):
    judgement = NormsCheck().judge(obs, TH)
    found = {f.code: f.verdict for f in judgement.findings}
    assert (code in found) if code else not found, found
    loud = {m.verdict for m in judgement.measurements if m.verdict not in (None, Verdict.PASS)}
    assert loud <= set(found.values()), (loud, found)
    assert Verdict.worst(loud) is Verdict.worst(found.values()) if found else not loud
