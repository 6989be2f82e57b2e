"""Judge tests of the ``kl`` check's rules on hand-written evidence: no user code, no torch forward."""

from __future__ import annotations

import dataclasses
import math

import pytest

from fmcheck.checks.kl import KLCheck
from fmcheck.checks.kl.evidence import Formula, KLEvidence, KLThresholds, Posterior, Stress, Warmup
from fmcheck.findings import evaluate
from fmcheck.verdict import Verdict

TH = KLThresholds()
GOOD = KLEvidence(
    posterior=Posterior(logvar_min=-0.3, logvar_max=0.2, logvar_finite=True, kl_per_element=0.01, mu_energy=0.5,
                        text_share=0.4, multi_sample_batches=4, largest_batch=8),
    stress=Stress(located="head.proj", why="its output holds the mu and logvar values", ran=True,
                  logvar_max_abs=6.0, kls=(3.1, 2.9), bound=(-6.0, 6.0)),
    formula=Formula(reduction="mean over all elements", factor=1.0, label="correct", ambiguous=False,
                    tolerance=1e-3, kl_min=0.001, kl_mean=0.01, fm_reduction="mean over all elements"),
    warmup=Warmup(weights=((0, 0.0, 0.0), (10, 0.01, 0.01), (50, 0.05, 0.05), (100, 0.1, 0.1), (500, 0.5, 0.1)),
                  total_steps=1000),
    at_bound_share=0.01, fm_loss_mean=1.2)


def with_(ev=GOOD, **parts):
    """GOOD with some of its parts replaced: ``posterior={"logvar_max": 30}`` updates a field of a part."""
    changes = {}
    for name, value in parts.items():
        current = getattr(ev, name)
        changes[name] = dataclasses.replace(current, **value) if isinstance(value, dict) else value
    return dataclasses.replace(ev, **changes)


def codes(ev, th=TH):
    return {f.code: f.verdict for f in evaluate(KLCheck.rules, ev, th)}


def finding(ev, code, th=TH):
    return next(f for f in evaluate(KLCheck.rules, ev, th) if f.code == code)


def test_a_healthy_head_gives_no_finding():
    assert codes(GOOD) == {}


def test_logvar_beyond_the_bound_on_the_measured_batches_fails_and_at_the_bound_passes():
    assert codes(with_(posterior={"logvar_max": 20.0})) == {}
    hit = finding(with_(posterior={"logvar_max": 20.5}), "kl.logvar_out_of_bound")
    assert hit.verdict is Verdict.FAIL and hit.observed == 20.5 and hit.bound == "<= 20"
    assert codes(with_(posterior={"logvar_finite": False}))["kl.logvar_out_of_bound"] is Verdict.FAIL


def test_an_unbounded_logvar_under_the_stress_probe_fails_naming_the_module():
    assert "kl.unbounded" not in codes(with_(stress={"logvar_max_abs": 20.0}))
    hit = finding(with_(stress={"logvar_max_abs": 1.3e4}), "kl.unbounded")
    assert hit.verdict is Verdict.FAIL and "head.proj" in hit.message and "1.3e+04" in hit.message
    assert "clamp(-6, 6)" in hit.fix
    assert codes(with_(stress={"logvar_max_abs": math.inf}))["kl.unbounded"] is Verdict.FAIL
    assert codes(with_(stress={"logvar_max_abs": 6.0}), KLThresholds(logvar_bound=5.0))["kl.unbounded"] \
        is Verdict.FAIL


def test_a_probe_that_found_no_module_warns_with_the_reason():
    ev = with_(stress=Stress(located=None, reason="no trainable module is called by the step"))
    hit = finding(ev, "kl.stress_probe_not_run")
    assert hit.verdict is Verdict.WARN and "no trainable module is called" in hit.message
    assert codes(ev) == {"kl.stress_probe_not_run": Verdict.WARN}  # nothing else judged on an unrun probe


def test_a_step_that_raises_under_the_probe_warns():
    ev = with_(stress={"raised": "AssertionError: logvar exploded", "ran": False})
    assert codes(ev) == {"kl.stress_raised": Verdict.WARN}
    assert "logvar exploded" in finding(ev, "kl.stress_raised").message


def test_a_kl_that_turns_non_finite_under_the_probe_fails():
    ev = with_(stress={"kl_finite": False, "kls": (math.inf,)})
    assert codes(ev) == {"kl.nonfinite_under_stress": Verdict.FAIL}


def test_most_logvars_at_the_bound_warn_and_half_passes():
    assert codes(with_(at_bound_share=0.5)) == {}
    hit = finding(with_(at_bound_share=0.9), "kl.logvar_at_bound")
    assert hit.verdict is Verdict.WARN and hit.message.startswith("90% of logvar values sit at the bound")
    # not judged when the bound the probe found is itself beyond logvar_bound
    assert "kl.logvar_at_bound" not in codes(with_(at_bound_share=0.9, stress={"logvar_max_abs": 50.0}))


def test_a_non_finite_kl_fails():
    ev = with_(formula={"kl_finite": False, "kl_min": math.nan})
    assert codes(ev) == {"kl.nonfinite": Verdict.FAIL}


def test_a_negative_kl_fails_and_one_within_the_tolerance_passes():
    assert codes(with_(formula={"kl_min": -1e-7})) == {}
    hit = finding(with_(formula={"kl_min": -0.02}), "kl.negative")
    assert hit.verdict is Verdict.FAIL and hit.observed == -0.02


def test_a_flipped_sign_fails_once_and_not_also_as_negative():
    ev = with_(formula={"factor": -1.0, "label": "flipped sign", "kl_min": -0.4})
    assert codes(ev) == {"kl.sign_flipped": Verdict.FAIL}
    assert "-1 x the analytic KL (mean over all elements)" in finding(ev, "kl.sign_flipped").message
    # too close to 0 for the sign to be told: no sign finding
    assert codes(with_(formula={"factor": -1.0, "label": "flipped sign", "ambiguous": True, "kl_min": 0.0})) == {}


def test_a_missing_half_warns():
    ev = with_(formula={"factor": 2.0, "label": "missing 1/2"})
    assert codes(ev) == {"kl.missing_half": Verdict.WARN}


def test_a_kl_that_matches_no_reduction_warns_with_the_closest():
    ev = with_(formula={"reduction": None, "factor": None, "label": None, "closest": "mean over all elements",
                        "closest_ratio": 1.37})
    hit = finding(ev, "kl.formula_mismatch")
    assert hit.verdict is Verdict.WARN and "closest: mean over all elements" in hit.message and "1.37" in hit.message
    bare = with_(formula={"reduction": None, "factor": None, "label": None})
    assert finding(bare, "kl.formula_mismatch").message == "kl matches no reduction of the analytic KL"


def test_a_kl_summed_over_the_batch_warns_unless_fm_loss_is_summed_too():
    ev = with_(formula={"reduction": "sum over everything"})
    assert codes(ev) == {"kl.batch_summed": Verdict.WARN}
    assert codes(with_(formula={"reduction": "sum over everything", "fm_reduction": "sum over everything"})) == {}
    assert codes(with_(formula={"reduction": "sum over latent dims, mean over batch"})) == {}


def test_a_non_finite_kl_weight_fails_and_stops_the_schedule_rules():
    ev = with_(warmup={"weights": ((0, 0.0, math.nan), (100, 0.1, 0.1))})
    assert codes(ev) == {"kl.weight_nonfinite": Verdict.FAIL}


def test_a_negative_kl_weight_fails():
    ev = with_(warmup={"weights": ((0, 0.0, -0.01), (100, 0.1, 0.1))})
    assert codes(ev) == {"kl.weight_negative": Verdict.FAIL}
    assert "-0.01@0" in finding(ev, "kl.weight_negative").message


def test_a_kl_weight_of_zero_throughout_warns_only_with_total_steps():
    zero = {"weights": ((0, 0.0, 0.0), (100, 0.1, 0.0), (500, 0.5, 0.0))}
    assert codes(with_(warmup=zero)) == {"kl.weight_zero": Verdict.WARN}
    assert codes(with_(warmup={**zero, "total_steps": None})) == {}


def test_no_warmup_warns_and_the_threshold_is_the_bound():
    constant = with_(warmup={"weights": ((0, 0.0, 0.1), (100, 0.1, 0.1), (500, 0.5, 0.1))})
    hit = finding(constant, "kl.no_warmup")
    assert hit.verdict is Verdict.WARN and "never changes" in hit.message and "0.1@500" in hit.message
    half = with_(warmup={"weights": ((0, 0.0, 0.05), (100, 0.1, 0.1))})
    assert codes(half) == {}  # exactly warmup_start_warn
    late = with_(warmup={"weights": ((0, 0.0, 0.06), (100, 0.1, 0.1))})
    assert "starts at 60% of its target" in finding(late, "kl.no_warmup").message
    assert codes(constant, KLThresholds(warmup_start_warn=1.0)) == {}


@pytest.mark.parametrize("kl_mean, verdict", [(100.0, None), (130.0, Verdict.WARN), (1000.0, Verdict.WARN),
                                              (1010.0, Verdict.FAIL)])
def test_a_dominating_kl_warns_beyond_balance_warn_and_fails_beyond_balance_fail(kl_mean, verdict):
    ev = with_(formula={"kl_mean": kl_mean}, fm_loss_mean=1.0)  # weighted KL = 0.1 x kl_mean, fm_loss 1
    assert codes(ev).get("kl.dominates") is verdict


def test_a_negligible_kl_is_judged_only_away_from_the_prior():
    tiny = with_(formula={"kl_mean": 1e-4}, fm_loss_mean=1.0)  # weighted 1e-5: 1e5x smaller
    assert codes(tiny) == {}  # KL 0.01 nats/element: the head sits at the prior
    away = with_(tiny, posterior={"kl_per_element": 0.2})
    hit = finding(away, "kl.negligible")
    assert hit.verdict is Verdict.FAIL and "1e+05x smaller" in hit.message
    assert finding(with_(away, formula={"kl_mean": 0.5}), "kl.negligible").verdict is Verdict.WARN  # 20x


def test_mu_exactly_zero_without_a_gradient_path_warns_and_with_one_passes():
    ev = with_(posterior={"mu_energy": 0.0, "text_share": 0.0})
    assert codes(ev) == {"kl.collapsed_source": Verdict.WARN}
    assert codes(with_(ev, posterior={"mu_has_grad_path": True})) == {}


def test_mu_the_same_for_every_caption_warns_and_batches_of_one_are_not_judged():
    ev = with_(posterior={"text_share": 0.0, "kl_per_element": 0.001})
    hit = finding(ev, "kl.posterior_collapse")
    assert hit.verdict is Verdict.WARN and "KL ~ 0 and mu is the same" in hit.message
    assert codes(with_(posterior={"text_share": 1e-6})) == {}  # exactly the threshold
    assert codes(with_(ev, posterior={"multi_sample_batches": 0})) == {}


def test_evidence_from_an_observation():
    obs = {"posterior": {"logvar_min": -1.0, "logvar_max": 1.0, "logvar_finite": True, "kl_per_element": 0.1,
                         "mu_energy": 1.0, "text_share": 0.3, "multi_sample_batches": 2, "largest_batch": 4},
           "stress": {"located": "head", "why": "named head", "tried": ["head"], "raised": None, "reason": None,
                      "factor": 100.0, "shift": 100.0, "logvar_max_abs": 400.0, "kl_finite": True,
                      "runs": [{"kl": 5.0}, {"kl": None}]},
           "warmup": {"total_steps": 100, "weights": [[0, 0.0, 0.1]], "note": None}}
    ev = KLEvidence.from_observation(obs)
    assert ev.stress.ran and ev.stress.kls == (5.0,) and ev.formula is None
    assert codes(ev) == {"kl.unbounded": Verdict.FAIL, "kl.no_warmup": Verdict.WARN}


# -- the measurements table agrees with the findings: every non-PASS row is backed by a finding of that verdict
def observation(**changes):
    obs = {"posterior": {"logvar_min": -0.3, "logvar_max": 0.2, "logvar_mean": 0.0, "logvar_finite": True,
                         "sigma_min": 0.86, "sigma_mean": 1.0, "sigma_max": 1.1, "kl_per_element": 0.01,
                         "mu_energy": 0.5, "text_share": 0.4, "text_signal_ratio": 0.3, "multi_sample_batches": 4,
                         "largest_batch": 8},
           "stress": {"located": "head.proj", "why": "named head", "tried": ["head.proj"], "reason": None,
                      "raised": None, "factor": 100.0, "shift": 100.0, "logvar_max_abs": 6.0, "kl_finite": True,
                      "bound": [-6.0, 6.0], "runs": [{"kl": 3.1}, {"kl": 2.9}]},
           "formula": {"reduction": "mean over all elements", "factor": 1.0, "label": "correct", "ambiguous": False,
                       "tolerance": 1e-3, "closest": None, "closest_ratio": None},
           "kl_user_min": 0.001, "kl_user_mean": 0.01, "kl_user_finite": True, "fm_loss_mean": 1.2,
           "warmup": {"total_steps": 1000, "note": None,
                      "weights": [[0, 0.0, 0.0], [10, 0.01, 0.01], [100, 0.1, 0.1], [500, 0.5, 0.1]]},
           "at_bound_share": 0.01}
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(obs.get(key), dict):
            obs[key] = {**obs[key], **value}
        else:
            obs[key] = value
    return obs


@pytest.mark.parametrize("changes, code", [
    ({}, None),
    ({"posterior": {"logvar_max": 25.0}}, "kl.logvar_out_of_bound"),
    ({"stress": {"logvar_max_abs": 900.0}}, "kl.unbounded"),
    ({"stress": {"located": None, "reason": "none", "runs": []}}, "kl.stress_probe_not_run"),
    ({"stress": {"raised": "AssertionError: boom", "runs": []}}, "kl.stress_raised"),
    ({"stress": {"kl_finite": False}}, "kl.nonfinite_under_stress"),
    ({"at_bound_share": 0.8}, "kl.logvar_at_bound"),
    ({"kl_user_finite": False, "kl_user_min": math.nan}, "kl.nonfinite"),
    ({"kl_user_min": -0.5, "formula": {"reduction": None, "factor": None, "label": None}}, "kl.negative"),
    ({"formula": {"factor": -1.0, "label": "flipped sign"}, "kl_user_min": -0.5}, "kl.sign_flipped"),
    ({"formula": {"factor": 2.0, "label": "missing 1/2"}}, "kl.missing_half"),
    ({"formula": {"reduction": "sum over everything"}}, "kl.batch_summed"),
    ({"warmup": {"weights": [[0, 0.0, math.inf]]}}, "kl.weight_nonfinite"),
    ({"warmup": {"weights": [[0, 0.0, -1.0], [100, 0.1, 0.1]]}}, "kl.weight_negative"),
    ({"warmup": {"weights": [[0, 0.0, 0.0], [100, 0.1, 0.0]]}}, "kl.weight_zero"),
    ({"warmup": {"weights": [[0, 0.0, 0.1], [100, 0.1, 0.1]]}}, "kl.no_warmup"),
    ({"kl_user_mean": 1e4}, "kl.dominates"),
    ({"kl_user_mean": 1e-6, "posterior": {"kl_per_element": 0.5}}, "kl.negligible"),
    ({"posterior": {"mu_energy": 0.0, "text_share": 0.0}}, "kl.collapsed_source"),
    ({"posterior": {"text_share": 0.0}}, "kl.posterior_collapse"),
])
def test_every_non_pass_measurement_is_backed_by_a_finding_of_its_verdict(changes, code):
    judgement = KLCheck().judge(observation(**changes), TH)
    found = {f.code: f.verdict for f in judgement.findings}
    assert (code in found) if code else not found, found
    loud = {m.verdict for m in judgement.measurements if m.verdict not in (None, Verdict.PASS)}
    assert loud <= set(found.values()), (loud, found)
    assert Verdict.worst(loud) is Verdict.worst(found.values()) if found else not loud


def test_one_cause_one_finding_an_unbounded_logvar_explains_a_non_finite_stressed_kl():
    ev = with_(stress={"kl_finite": False, "kls": (math.inf,), "logvar_max_abs": 900.0})
    assert codes(ev) == {"kl.unbounded": Verdict.FAIL}  # not also "kl.nonfinite_under_stress"


def test_one_cause_one_finding_a_non_finite_kl_is_not_also_a_formula_mismatch():
    ev = with_(formula={"kl_finite": False, "kl_min": math.nan, "reduction": None, "factor": None, "label": None,
                        "closest": None, "closest_ratio": None})
    assert codes(ev) == {"kl.nonfinite": Verdict.FAIL}  # not also "kl.formula_mismatch"


def test_one_cause_one_finding_a_kl_non_finite_unstressed_is_not_also_non_finite_under_stress():
    ev = with_(formula={"kl_finite": False, "kl_min": math.nan, "reduction": None, "factor": None, "label": None,
                        "closest": None, "closest_ratio": None},
               stress={"kl_finite": False, "kls": (math.nan,)})
    assert codes(ev) == {"kl.nonfinite": Verdict.FAIL}
