"""The `overfit` rules on hand-written evidence: each conclusion fires on its recorded run with its verdict, and stays
quiet near its bound. No torch, no user code."""

from __future__ import annotations

import pytest

from fmcheck.checks.overfit import OverfitCheck, OverfitThresholds
from fmcheck.checks.overfit import maths as om
from fmcheck.checks.overfit.rules import OUTCOMES, Evidence, Reading
from fmcheck.checks.overfit.words import passed
from fmcheck.findings import conclude, evaluate
from fmcheck.verdict import Verdict

TH = OverfitThresholds()
START = Reading(step=0, fm=1.2, rel=1.14, cos=0.01, ratio=0.99, drift=1.0)
FITTED = Reading(step=32, fm=0.31, rel=0.30, cos=0.84, ratio=1.01, drift=1.02)


def evidence(outcome=om.PASSED, step=32, initial=START, final=FITTED, **fields) -> Evidence:
    return Evidence(outcome=outcome, step=step, initial=initial, final=final, **{
        "start_step": 500, "budget_steps": 300, "steps_run": step, "time_budget": 60.0, "kl_weight": 1.0,
        "best_cos": final.cos if final is not None else None, **fields})


def findings(ev: Evidence, thresholds: OverfitThresholds = TH):
    return evaluate(OverfitCheck.rules, ev, thresholds)


def only(ev: Evidence, thresholds: OverfitThresholds = TH):
    """The one finding the evidence gives, checked to be the only one."""
    found = findings(ev, thresholds)
    assert len(found) == 1, [(f.code, f.verdict, f.message) for f in found]
    assert found[0].verdict is not Verdict.ERROR, found[0].message
    return found[0]


def test_a_passing_run_has_no_finding_and_says_what_it_measured():
    ev = evidence()
    assert findings(ev) == []
    verdict, summary, hint = conclude(findings(ev), passed(ev, TH))
    assert verdict is Verdict.PASS and hint is None
    assert summary.startswith("overfits 128 samples in 32 steps: fm_loss 1.2 -> 0.31")
    assert "cos 0.01 -> 0.84" in summary and "||x0||/||x1|| 0.99 -> 1.01" in summary


def test_nonfinite_names_the_first_output_in_data_flow_order_and_its_step():
    bad = only(evidence(om.NONFINITE, step=7, final=FITTED, nonfinite=("xt", "v_target", "v_pred")))
    assert bad.code == "overfit.nonfinite" and bad.verdict is Verdict.FAIL
    assert "'xt' is non-finite at overfit step 7, after 7 updates (step_index 507)" in bad.message
    assert "and so are v_target, v_pred" in bad.message and bad.observed == "xt at step 7"
    first = only(evidence(om.NONFINITE, step=0, initial=None, final=None, nonfinite=("kl",), before_training=True))
    assert first.code == "overfit.nonfinite"
    assert "'kl' is non-finite at the first forward, before any update" in first.message
    grad = only(evidence(om.NONFINITE, step=1, nonfinite=("grad",)))
    assert "the gradient (backward) is non-finite at overfit step 1, after 1 update " in grad.message


def test_scale_drift_fails_with_the_ratio_its_limit_and_the_kl_weight():
    drifted = Reading(step=56, fm=0.5, rel=0.2, cos=0.89, ratio=3.06, drift=3.09)
    hit = only(evidence(om.SCALE_DRIFT, step=56, final=drifted, drift=3.09, kl_weight=1e-6))
    assert hit.code == "overfit.scale_drift" and hit.verdict is Verdict.FAIL
    assert hit.message.startswith("scale drift: ||x0||/||x1|| went 0.99 -> 3.06 (3.09x, limit 3x) by step 56")
    assert "KL weight of 1e-06" in hit.message and "ratio correction" in hit.fix
    assert hit.observed == 3.09 and hit.bound == "within 3x"


def test_a_pass_whose_scale_moved_beyond_scale_warn_is_a_warning_and_one_just_inside_is_not():
    moved = Reading(step=40, fm=0.3, rel=0.3, cos=0.85, ratio=2.2, drift=2.2)
    hit = only(evidence(step=40, final=moved))
    assert hit.code == "overfit.scale_loose" and hit.verdict is Verdict.WARN
    assert "the scale moved 2.2x on the way (warn beyond 2x)" in hit.message
    inside = Reading(step=40, fm=0.3, rel=0.3, cos=0.85, ratio=1.99, drift=1.99)
    assert findings(evidence(step=40, final=inside)) == []
    shrunk = Reading(step=40, fm=0.3, rel=0.3, cos=0.85, ratio=0.4, drift=0.4)  # 2.5x below the band: drift too
    assert only(evidence(step=40, final=shrunk)).code == "overfit.scale_loose"


def test_a_fit_met_at_the_budgets_end_with_the_scale_still_moving_is_a_warning():
    moving = Reading(step=300, fm=0.3, rel=0.3, cos=0.85, ratio=2.5, drift=2.5)
    hit = only(evidence(om.SCALE_MOVING, step=300, final=moving, drift=2.5, projected_drift=6.1))
    assert hit.code == "overfit.scale_moving" and hit.verdict is Verdict.WARN
    assert "the scale had not settled by the end of the budget: ||x0||/||x1|| 0.99 -> 2.5 in 300 steps" in hit.message
    assert hit.observed == 6.1


def test_divergence_fails_with_the_rise_against_its_limit():
    up = Reading(step=16, fm=14.0, rel=11.0, cos=0.1, ratio=1.0, drift=1.0)
    hit = only(evidence(om.DIVERGED, step=16, final=up))
    assert hit.code == "overfit.diverged" and hit.verdict is Verdict.FAIL
    assert hit.message.startswith("diverged: fm_loss rose to 11.7x its start (limit 10x) by step 16")
    assert "lower the learning rate" in hit.fix


def test_parameters_outside_the_optimizer_fail_and_are_counted_per_module():
    hit = only(evidence(om.NOT_IN_OPTIMIZER, step=8, final=Reading(step=8, fm=1.0, rel=1.0, cos=0.1),
                        missing=(("velocity", 1365760, 1365760),)))
    assert hit.code == "overfit.not_in_optimizer" and hit.verdict is Verdict.FAIL
    assert "the optimizer does not hold 'velocity' (1365760 of 1365760 parameters)" in hit.message
    assert hit.observed == 1365760 and "add the missing parameters to the optimizer" in hit.fix


def test_a_module_without_gradient_fails_at_the_first_checkpoint():
    hit = only(evidence(om.NO_GRADIENT, step=8, final=Reading(step=8, fm=1.0, rel=1.0, cos=0.1),
                        no_gradient=("velocity",), quiet=("velocity",)))
    assert hit.code == "overfit.no_gradient" and hit.verdict is Verdict.FAIL
    assert "'velocity' received no gradient in any of the first 8 steps" in hit.message
    assert "compute v_pred with autograd from velocity" in hit.fix


def test_a_hopeless_trend_fails_and_says_how_far_the_optimistic_trends_reach():
    flat = Reading(step=96, fm=1.17, rel=1.11, cos=0.05, ratio=1.0, drift=1.0)
    hit = only(evidence(om.STALLED, step=96, final=flat, projected_fall=0.07, projected_cos=0.06))
    assert hit.code == "overfit.stalled" and hit.verdict is Verdict.FAIL
    assert hit.message.startswith("will not overfit within 300 steps: after 96 steps fm_loss")
    assert "(a pass needs a relative fall of 50% and cos >= 0.80)" in hit.message
    assert "even optimistic trends reach only a 7% fall and cos 0.06" in hit.message
    assert hit.fix == "go back to scale, target and gradients (`fmcheck all`)"
    assert hit.observed == 0.07 and hit.bound == ">= 0.25"  # trend_reach (50%) of the 50% fall a pass needs
    quiet = only(evidence(om.STALLED, step=96, final=flat, projected_fall=0.07, projected_cos=0.06, quiet=("head",)))
    assert quiet.fix.endswith("; and compute v_pred with autograd from head (no torch.no_grad, .detach(), .data)")
    assert "('head' receives no gradient)" in quiet.message


@pytest.mark.parametrize("outcome,budget,room", [
    (om.BUDGET, "the step budget (300 steps) ended the run after 300 steps", "--max-steps 600"),
    (om.OUT_OF_TIME, "the time budget (2.5 s) ended the run after 300 steps", "--time-budget 60"),
])
def test_a_budget_that_ends_the_run_is_inconclusive_never_a_failure(outcome, budget, room):
    undecided = Reading(step=300, fm=0.9, rel=0.9, cos=0.5, ratio=1.0, drift=1.0)
    hit = only(evidence(outcome, step=300, final=undecided, steps_run=300, time_budget=2.5))
    assert hit.code == "overfit.inconclusive" and hit.verdict is Verdict.WARN
    assert hit.message.startswith("inconclusive: " + budget + ", before a verdict: fm_loss")
    assert room in hit.fix and hit.observed == 300


def test_a_hung_step_is_inconclusive_with_or_without_a_checkpoint():
    hit = only(evidence(om.HUNG, step=3, final=None, steps_run=3, time_budget=1.0))
    assert hit.code == "overfit.step_hung" and hit.verdict is Verdict.WARN
    assert hit.message == ("inconclusive: a step exceeded the time budget (1 s) after 3 steps, before the first "
                           "checkpoint")
    assert "find what blocks the step" in hit.fix and "--time-budget 60" in hit.fix
    later = only(evidence(om.HUNG, step=20, final=Reading(step=20, fm=0.9, rel=0.9, cos=0.5), steps_run=20))
    assert later.code == "overfit.step_hung" and "after 20 steps: fm_loss 1.2 -> 0.9" in later.message


def test_a_rank_stopped_with_the_others_is_a_warning():
    hit = only(evidence(om.STOPPED, step=0, initial=None, final=None))
    assert hit.code == "overfit.rank_stopped" and hit.verdict is Verdict.WARN


def test_fresh_randomness_is_judged_on_its_fall_and_said_so():
    ev = evidence(step=48, replayed=False, changed_outputs=("t", "xt"),
                  final=Reading(step=48, fm=0.8, rel=0.8, cos=0.45, ratio=1.0, drift=1.0))
    assert findings(ev) == []
    assert ev.cos_needed(TH) == pytest.approx(0.01 + 0.4 * 0.99) and ev.drop_needed(TH) == 0.25
    assert "fresh randomness each pass (t, xt changed)" in passed(ev, TH)


def test_a_step_returning_only_its_loss_is_described_on_the_loss_alone():
    ev = evidence(initial=Reading(step=0, fm=1.0, rel=1.0), final=Reading(step=40, fm=0.3, rel=0.3), loss_name="loss")
    assert findings(ev) == [] and "no v_pred, v_target: judged on the loss alone" in passed(ev, TH)
    assert ev.cos_needed(TH) is None


def test_every_outcome_the_stop_rule_records_is_concluded_by_exactly_one_rule_or_passes():
    """No outcome of the stop rule is left without a conclusion, and none gets two."""
    final = Reading(step=32, fm=0.9, rel=0.9, cos=0.5, ratio=1.0, drift=1.0)
    extra = {om.SCALE_DRIFT: {"drift": 3.5}, om.STALLED: {"projected_fall": 0.1, "projected_cos": 0.2},
             om.NO_GRADIENT: {"no_gradient": ("velocity",)}, om.NONFINITE: {"nonfinite": ("x0",)},
             om.NOT_IN_OPTIMIZER: {"missing": (("velocity", 5, 5),)}, om.SCALE_MOVING: {"projected_drift": 4.0}}
    for outcome in OUTCOMES:
        found = findings(evidence(outcome, final=final, **extra.get(outcome, {})))
        assert all(f.verdict is not Verdict.ERROR for f in found), [f.message for f in found]
        assert len(found) == (0 if outcome == om.PASSED else 1), (outcome, [f.code for f in found])
        if found and outcome in om.FAILURES:
            assert found[0].verdict is Verdict.FAIL, outcome
        elif found:
            assert found[0].verdict is Verdict.WARN, outcome


def test_an_unknown_outcome_is_an_error_not_a_silent_pass():
    obs = {"decision": {"outcome": "mystery", "step": 1}}
    with pytest.raises(ValueError, match="unknown overfit outcome"):
        Evidence.from_observation(obs)


def observation(outcome: str, final: dict, **decision) -> dict:
    """A recorded run as `measure` returns it (only what the judge reads)."""
    initial = {"step": 0, "fm": 1.2, "rel": 1.14, "cos": 0.01, "ratio": 0.99, "drift": 1.0, "loss": 1.2, "kl": 0.1,
               "grad": 1.0, "vnorm": 5.0}
    return {"decision": {"outcome": outcome, "step": final["step"], **decision}, "initial": initial,
            "points": [{**initial, **final}], "samples": 128, "requested_samples": 128, "batches": 4,
            "randomness": "replayed", "changed_outputs": [], "fm_source": "fm_loss",
            "params_missing_from_optimizer": {"head": 0, "velocity": 0},
            "params_trainable": {"head": 10, "velocity": 20},
            "module_grad_final": {"head": 1.0, "velocity": 2.0}, "best_cos": final["cos"], "kl_weight": 1e-6,
            "start_step": 500, "budget_steps": 300, "steps_run": final["step"], "time_budget": 60.0,
            "timing": {"seconds_to_verdict": 1.0}, "budget_note": "--time-budget 60", "has_scale": True,
            "has_kl": True, "grad_initial": 1.0, "extras": {}, "lr": 1e-3}


def test_the_measurements_agree_with_the_findings():
    """A FAIL finding is backed by a FAIL row on the same number (the scale drift); a run a budget ended, whose
    finding is a WARN, has no FAIL row, though its cos and its fall missed their bounds."""
    from fmcheck.checks.overfit.table import measurements

    obs = observation(om.SCALE_DRIFT, {"step": 56, "fm": 0.5, "rel": 0.2, "cos": 0.89, "ratio": 3.06, "drift": 3.09},
                      drift=3.09)
    ev = Evidence.from_observation(obs)
    assert [f.code for f in findings(ev)] == ["overfit.scale_drift"]
    rows = {m.name: m for m in measurements(obs, ev, TH)}
    assert rows["scale drift"].verdict is Verdict.FAIL and rows["scale drift"].value == pytest.approx(3.09)

    obs = observation(om.BUDGET, {"step": 300, "fm": 1.0, "rel": 0.9, "cos": 0.5, "ratio": 3.5, "drift": 3.5})
    ev = Evidence.from_observation(obs)
    assert [(f.code, f.verdict) for f in findings(ev)] == [("overfit.inconclusive", Verdict.WARN)]
    rows = {m.name: m for m in measurements(obs, ev, TH)}
    assert rows["cos final"].verdict is Verdict.WARN and rows["relative fm_loss fall"].verdict is Verdict.WARN
    assert rows["scale drift"].verdict is Verdict.WARN
    assert not [m.name for m in rows.values() if m.verdict is Verdict.FAIL]
