"""`target`'s rules on hand-written evidence: each fires (with its verdict) on the evidence of its cause and stays
quiet near its bound. No torch forward, no fixture: pure functions of the evidence and the thresholds."""

from __future__ import annotations

from dataclasses import replace

import pytest

from fmcheck.checks.target import TargetCheck, TargetThresholds
from fmcheck.checks.target.evidence import (Candidate, Evidence, GradientEvidence, ImpliedEvidence, KlPath, Match,
                                            PathEvidence, Prediction, PrecisionEvidence, Resemblance)
from fmcheck.checks.target.judge import measurements
from fmcheck.findings import evaluate
from fmcheck.verdict import Verdict

TH = TargetThresholds()
NAMES = {Candidate.VELOCITY: "the path velocity", Candidate.FLIPPED: "minus the path velocity (flipped sign)",
         Candidate.X1_MINUS_X0: "x1 - x0", Candidate.X0_MINUS_X1: "x0 - x1", Candidate.X0: "x0",
         Candidate.X1: "x1", Candidate.XT: "x_t", Candidate.SCORE: "score-like -x0/a(t)",
         Candidate.EPS: "eps (the reparam noise)", Candidate.MINUS_EPS: "-eps",
         Candidate.WITHOUT_NOISE_TERM: "a'(t) x0 + b'(t) x1 without the noise term"}


def match(cos: float = 1.0, ratio: float = 1.0, samples: tuple[float, ...] | None = None,
          **resembles: tuple[float, float]) -> Match:
    """A target with median cos / norm ratio against the path velocity; ``resembles``: candidate -> (cos, ratio)."""
    table = {Candidate.VELOCITY: (cos, ratio), Candidate.FLIPPED: (-cos, ratio), Candidate.X1_MINUS_X0: (cos, ratio),
             Candidate.X0_MINUS_X1: (-cos, ratio), Candidate.X0: (-0.5, 1.0), Candidate.X1: (0.5, 1.0),
             Candidate.XT: (0.2, 1.0), Candidate.SCORE: (0.3, 1.0)}
    table.update({Candidate[k.upper()]: v for k, v in resembles.items()})
    ranked = sorted((Resemblance(k, NAMES[k], c, r) for k, (c, r) in table.items()), key=lambda r: -r.cos)
    return Match(cos, ratio, cos, samples if samples is not None else (cos,) * 100, tuple(ranked))


PATH = PathEvidence(samples=128, batches=4, distinct_t=128, t_range=0.98, fit_ok=True, describe="linear",
                    direction="t=1 at the data (x1)", velocity_combination=(-1.0, 1.0), v_combination=(-1.0, 1.0, 0.0),
                    end_t=1.0, end_a=0.0, end_b=1.0, v_target=match())
GRADS = {
    "loss": {"modules": {"head": 1.0, "velocity": 2.0, "vae": 0.0}, "roles": {"velocity": 2.0, "head": 1.0}},
    "fm_loss": {"modules": {"head": 1.0, "velocity": 2.0, "vae": 0.0}, "roles": {"velocity": 2.0, "head": 1.0}},
    "kl": {"modules": {"head": 0.5, "velocity": 0.0, "vae": 0.0}, "roles": {"velocity": 0.0, "head": 0.5}},
    "fm_loss via v_target": {"modules": {"head": 0.0, "velocity": 0.0, "vae": 0.0}, "roles": {"velocity": 0.0,
                                                                                              "head": 0.0}},
    "fm_loss via xt": {"modules": {"head": 1.0, "velocity": 0.0, "vae": 0.0}, "roles": {"velocity": 0.0, "head": 1.0}},
}
GRADIENTS = GradientEvidence(modules={"head": "trainable", "velocity": "trainable", "vae": "frozen"}, grads=GRADS,
                             velocity=("velocity",), head=("head",), has_head=True, has_mu=True, xt_returned=True,
                             fm_key="fm_loss", moving=(), notes=(), notes_info=(), terms_without_graph=(),
                             kl=KlPath.GRAPH)
F32 = "torch.float32"
PRECISION = PrecisionEvidence(dtypes={"x0": F32, "x1": F32, "xt": F32, "v_target": F32, "v_pred": F32},
                              half_exact={k: {"float16": 0.001, "bfloat16": 0.01} for k in ("x0", "x1", "xt")})
IMPLIED_OFF = ImpliedEvidence(reason="the loss is not a per-sample weighted squared error")
CORRECT = Evidence(PATH, IMPLIED_OFF, GRADIENTS, PRECISION)


def implied(m: Match, **fields) -> ImpliedEvidence:
    return ImpliedEvidence(**{"ok": True, "module": "velocity", "how": "pipeline field 'velocity'", "declared": True,
                              "weight_describe": "constant in t", "weight_spread": 1.0, "compared": True,
                              "match": m, **fields})


def findings(ev: Evidence, th: TargetThresholds = TH) -> dict[str, Verdict]:
    found = evaluate(TargetCheck.rules, ev, th)
    assert not [f for f in found if f.verdict is Verdict.ERROR], found
    return {f.code: f.verdict for f in found}


def messages(ev: Evidence, th: TargetThresholds = TH) -> dict[str, str]:
    return {f.code: f.message for f in evaluate(TargetCheck.rules, ev, th)}


def with_target(m: Match, **path) -> Evidence:
    return replace(CORRECT, path=replace(PATH, v_target=m, **path))


def test_a_correct_pipeline_gives_no_finding_and_every_measurement_passes():
    assert findings(CORRECT) == {}
    table = measurements(CORRECT, TH)
    assert all(m.verdict in (None, Verdict.PASS) for m in table.measurements)
    assert "v_target = path velocity" in "; ".join(table.good)


@pytest.mark.parametrize("ev, code, verdict", [
    (with_target(match(-1.0)), "target.sign_flipped", Verdict.FAIL),
    (with_target(match(0.3, eps=(0.9995, 0.8))), "target.epsilon", Verdict.FAIL),
    (with_target(match(0.3, minus_eps=(0.999, 0.8))), "target.epsilon", Verdict.FAIL),
    (with_target(match(0.3, x0=(0.9999, 1.0))), "target.x0", Verdict.FAIL),
    (with_target(match(0.3, x0=(0.9999, 1.0)), source_is_noise=True), "target.epsilon", Verdict.FAIL),
    (with_target(match(0.6, x1=(0.9999, 1.0))), "target.x1", Verdict.FAIL),
    (with_target(match(0.2, xt=(0.9999, 1.0))), "target.xt_as_target", Verdict.FAIL),
    (with_target(match(0.3, score=(0.9999, 1.0))), "target.score", Verdict.FAIL),
    (with_target(match(0.95, x1_minus_x0=(0.9999, 1.0))), "target.wrong_path", Verdict.FAIL),
    (with_target(match(0.95, without_noise_term=(0.9999, 1.0))), "target.noise_term_missing", Verdict.FAIL),
    (with_target(match(0.5, x1_minus_x0=(0.5, 1.0))), "target.not_velocity", Verdict.FAIL),
    (with_target(match(0.95, x1_minus_x0=(0.95, 1.0))), "target.not_velocity", Verdict.WARN),
])
def test_a_wrong_target_is_named_by_what_it_is(ev, code, verdict):
    assert findings(ev) == {code: verdict}


def test_the_flipped_sign_names_the_quantity_it_equals():
    message = messages(with_target(match(-1.0)))["target.sign_flipped"]
    assert message == "v_target has the flipped sign (it is x0 - x1): median cos -1.000 with the path velocity"


def test_a_near_miss_that_is_another_quantity_fails_and_a_plain_near_miss_warns():
    # cos 0.95 is a WARN; a wrong candidate at cos >= 0.999 makes it the FAIL of that candidate
    assert findings(with_target(match(0.95, without_noise_term=(0.9989, 1.0)))) == \
        {"target.noise_term_missing": Verdict.WARN}
    assert findings(with_target(match(0.95, without_noise_term=(0.999, 1.0)))) == \
        {"target.noise_term_missing": Verdict.FAIL}


@pytest.mark.parametrize("cos, verdict", [(0.99, None), (0.9899, Verdict.WARN), (0.9, Verdict.WARN),
                                          (0.8999, Verdict.FAIL)])
def test_the_cosine_bounds(cos, verdict):
    got = findings(with_target(match(cos, x1_minus_x0=(cos, 1.0)), describe="cosine"))
    assert got == ({} if verdict is None else {"target.not_velocity": verdict})


@pytest.mark.parametrize("ratio, verdict", [(1.1, None), (1 / 1.1, None), (1.11, Verdict.WARN), (1.25, Verdict.WARN),
                                            (1.26, Verdict.FAIL), (0.5, Verdict.FAIL), (2.0, Verdict.FAIL)])
def test_a_mis_scaled_target(ratio, verdict):
    got = findings(with_target(match(1.0, ratio)))
    assert got == ({} if verdict is None else {"target.scaled": verdict})
    if verdict is not None and ratio == 0.5:
        assert "is 0.5x the path velocity" in messages(with_target(match(1.0, ratio)))["target.scaled"]


def test_a_target_in_the_units_of_another_timestep_span_warns_with_both_readings():
    # t over 0..500 read as t / 1000: the path ends at 0.5, the target is right per t / 500
    ev = with_target(match(1.0, 0.5), t_scale=1000.0, end_t=0.5, end_a=0.0, end_b=1.0)
    assert findings(ev) == {"target.timestep_span": Verdict.WARN}
    assert "t may be in units of 500 timesteps" in messages(ev)["target.timestep_span"]
    # the same norm ratio with a path that ends at 1: a real 0.5x
    assert findings(with_target(match(1.0, 0.5), t_scale=1000.0)) == {"target.scaled": Verdict.FAIL}


def test_timestep_units_alone_are_no_finding():
    ev = with_target(match(), t_scale=1000.0, t_raw_max=999.0)
    assert findings(ev) == {}
    assert "t in timestep units: judged as t / 1000" in measurements(ev, TH).good


def test_a_target_wrong_for_part_of_the_batch_warns_above_the_share():
    ten = (0.5,) * 10 + (1.0,) * 90  # exactly disagree_share_warn: passes
    assert findings(with_target(match(1.0, samples=ten))) == {}
    eleven = (0.5,) * 11 + (1.0,) * 89
    assert findings(with_target(match(1.0, samples=eleven))) == {"target.partly_wrong": Verdict.WARN}


def test_the_implied_target_decides_and_a_relabelled_v_target_is_context():
    ev = Evidence(replace(PATH, v_target=match(-0.7)), implied(match()), GRADIENTS, PRECISION)
    assert findings(ev) == {}
    assert "the loss preconditions the output" in "; ".join(measurements(ev, TH).good)
    flipped = replace(ev, implied=implied(match(-1.0)))
    assert findings(flipped) == {"target.sign_flipped": Verdict.FAIL}
    assert messages(flipped)["target.sign_flipped"].startswith("the loss's implied target has the flipped sign")


def test_audits_that_disagree_on_a_module_found_by_hooks_only_warn():
    undeclared = implied(match(-1.0), declared=False, v_pred_is_raw=False, module="transformer")
    ev = Evidence(PATH, undeclared, GRADIENTS, PRECISION)
    assert findings(ev) == {"target.sign_flipped": Verdict.WARN}
    assert "declare the pipeline field 'velocity'" in messages(ev)["target.sign_flipped"]
    declared = replace(undeclared, declared=True)
    assert findings(replace(ev, implied=declared)) == {"target.sign_flipped": Verdict.FAIL}


def test_a_declared_prediction_is_what_the_target_is_compared_with():
    eps_target = match(0.3, x0=(0.9999, 1.0))
    ev = replace(CORRECT, path=replace(PATH, prediction=Prediction.EPSILON, v_target=eps_target))
    assert findings(ev) == {}
    wrong = replace(CORRECT, path=replace(PATH, prediction=Prediction.EPSILON))
    assert findings(wrong) == {"target.declared_prediction_mismatch": Verdict.FAIL}
    assert "declared prediction 'epsilon'" in messages(wrong)["target.declared_prediction_mismatch"]
    near = replace(CORRECT, path=replace(PATH, prediction=Prediction.SAMPLE, v_target=match(0.3, x1=(0.95, 1.0))))
    assert findings(near) == {"target.declared_prediction_mismatch": Verdict.WARN}


@pytest.mark.parametrize("share, verdict", [(0.0, None), (0.01, Verdict.FAIL), (float("nan"), Verdict.FAIL)])
def test_a_negative_loss_weight_fails(share, verdict):
    ev = replace(CORRECT, implied=implied(match(), negative_share=share))
    assert findings(ev) == ({} if verdict is None else {"target.negative_weighting": verdict})


@pytest.mark.parametrize("residual, verdict", [(0.01, None), (0.0101, Verdict.WARN), (0.05, Verdict.WARN),
                                               (0.0501, Verdict.FAIL)])
def test_x_t_off_the_span_of_x0_and_x1(residual, verdict):
    got = findings(with_target(match(), xt_residual=residual))
    assert got == ({} if verdict is None else {"target.xt_off_span": verdict})


@pytest.mark.parametrize("residual, verdict", [(0.02, None), (0.021, Verdict.WARN), (0.1, Verdict.WARN),
                                               (0.11, Verdict.FAIL)])
def test_x_t_that_does_not_follow_t(residual, verdict):
    got = findings(with_target(match(), fit_residual=residual))
    assert got == ({} if verdict is None else {"target.t_mismatch": verdict})


def test_inconclusive_audits_warn():
    unfitted = with_target(None, fit_ok=False, fit_reason="t has 1 distinct value(s)", extra_batches=4)
    assert findings(unfitted) == {"target.path_not_fitted": Verdict.WARN}
    assert "after drawing 4 more batch(es)" in messages(unfitted)["target.path_not_fitted"]
    problem = replace(CORRECT, path=PathEvidence(problem="'xt' is not a (B, ...) tensor"))
    assert findings(problem) == {"target.path_not_audited": Verdict.WARN}
    unaudited = with_target(None, v_target_returned=False)
    assert findings(unaudited) == {"target.unaudited": Verdict.WARN}
    # ... unless the implied target stands in for the missing v_target
    assert findings(replace(unaudited, implied=implied(match()))) == {}
    notes = replace(CORRECT, gradients=replace(GRADIENTS, notes=("no parameter requires grad",)))
    assert findings(notes) == {"target.gradients_not_audited": Verdict.WARN}


def test_a_moving_target_fails_naming_what_it_reaches():
    moving = replace(CORRECT, gradients=replace(GRADIENTS, moving=("head.net.0.weight", "head.net.0.bias")))
    assert findings(moving) == {"target.moving": Verdict.FAIL}
    assert "2 trainable parameter(s) (head.net.0.weight, head.net.0.bias)" in messages(moving)["target.moving"]
    through = dict(GRADS, **{"fm_loss via v_target": {"modules": {"head": 0.3, "velocity": 0.0, "vae": 0.0},
                                                     "roles": {"velocity": 0.0, "head": 0.3}}})
    grads_only = replace(CORRECT, gradients=replace(GRADIENTS, grads=through))
    assert findings(grads_only) == {"target.moving": Verdict.FAIL}
    assert "gradient flows through the target into head" in messages(grads_only)["target.moving"]
    tiny = dict(GRADS, **{"fm_loss via v_target": {"modules": {"head": 1e-9}, "roles": {"velocity": 0.0,
                                                                                       "head": 1e-9}}})
    assert findings(replace(CORRECT, gradients=replace(GRADIENTS, grads=tiny))) == {}  # below 1e-8 of the largest


def test_gradient_into_a_frozen_module_fails():
    grads = dict(GRADS, loss={"modules": {"head": 1.0, "velocity": 2.0, "vae": 0.01},
                              "roles": {"velocity": 2.0, "head": 1.0}})
    ev = replace(CORRECT, gradients=replace(GRADIENTS, grads=grads))
    assert findings(ev) == {"target.frozen_gradient": Verdict.FAIL}
    assert messages(ev)["target.frozen_gradient"] == "frozen module 'vae' receives gradient (|grad| 0.01)"
    # one finding per module, the module its subject: structure's requires_grad finding on it is the same cause
    (finding,) = evaluate(TargetCheck.rules, ev, TargetCheck.Thresholds())
    assert finding.subject == "vae"


def test_the_flow_matching_gradient_must_reach_the_velocity_net_and_the_head_through_x_t():
    no_velocity = dict(GRADS, fm_loss={"modules": {"head": 1.0, "velocity": 0.0}, "roles": {"velocity": 0.0,
                                                                                             "head": 1.0}})
    assert findings(replace(CORRECT, gradients=replace(GRADIENTS, grads=no_velocity))) == \
        {"target.velocity_no_gradient": Verdict.FAIL}
    closed = dict(GRADS, **{"fm_loss via xt": {"modules": {"head": 0.0}, "roles": {"velocity": 0.0, "head": 0.0}}})
    ev = replace(CORRECT, gradients=replace(GRADIENTS, grads=closed))
    assert findings(ev) == {"target.reparam_closed": Verdict.WARN}
    assert "reparameterisation path is closed" in messages(ev)["target.reparam_closed"]
    # x_t not returned: not measurable, no finding
    assert findings(replace(ev, gradients=replace(GRADIENTS, grads=closed, xt_returned=False))) == {}


def test_a_loss_term_without_graph_fails_and_a_kl_without_one_warns():
    ev = replace(CORRECT, gradients=replace(GRADIENTS, terms_without_graph=("fm_loss",)))
    assert findings(ev) == {"target.loss_without_graph": Verdict.FAIL}
    kl = replace(CORRECT, gradients=replace(GRADIENTS, terms_without_graph=("kl",), kl=KlPath.NO_GRAPH))
    assert findings(kl) == {"target.kl_no_head_gradient": Verdict.WARN}
    headless = replace(kl, gradients=replace(kl.gradients, has_head=False))
    assert findings(headless) == {}


def test_the_kl_term_trains_the_head_and_only_the_head():
    no_head = dict(GRADS, kl={"modules": {"head": 0.0, "velocity": 0.0}, "roles": {"velocity": 0.0, "head": 0.0}})
    assert findings(replace(CORRECT, gradients=replace(GRADIENTS, grads=no_head))) == \
        {"target.kl_no_head_gradient": Verdict.WARN}
    leak = dict(GRADS, kl={"modules": {"head": 0.5, "velocity": 0.1}, "roles": {"velocity": 0.1, "head": 0.5}})
    assert findings(replace(CORRECT, gradients=replace(GRADIENTS, grads=leak))) == \
        {"target.kl_reaches_other": Verdict.WARN}
    faint = dict(GRADS, kl={"modules": {"head": 0.5, "velocity": 1e-10}, "roles": {"velocity": 0.0, "head": 0.5}})
    assert findings(replace(CORRECT, gradients=replace(GRADIENTS, grads=faint))) == {}


def test_a_trainable_module_without_gradient_warns():
    modules = {"head": "trainable", "velocity": "trainable", "text": "trainable", "vae": "frozen"}
    ev = replace(CORRECT, gradients=replace(GRADIENTS, modules=modules))
    assert findings(ev) == {"target.trainable_without_gradient": Verdict.WARN}
    assert "trainable module(s) text get no gradient" in messages(ev)["target.trainable_without_gradient"]


def test_x_t_built_in_half_precision_warns_either_way():
    half = replace(CORRECT, precision=replace(PRECISION, dtypes={**PRECISION.dtypes, "xt": "torch.float16"}))
    assert findings(half) == {"target.xt_half_precision": Verdict.WARN}
    exact = {**PRECISION.half_exact, "xt": {"float16": 1.0, "bfloat16": 0.2}}
    cast_back = replace(CORRECT, precision=replace(PRECISION, half_exact=exact))
    assert findings(cast_back) == {"target.xt_half_precision": Verdict.WARN}
    assert "exact float16 numbers" in messages(cast_back)["target.xt_half_precision"]
    # half-exact values that x0, x1 share (data already in half precision) are not a finding
    shared = {k: {"float16": 1.0, "bfloat16": 1.0} for k in ("x0", "x1", "xt")}
    assert findings(replace(CORRECT, precision=replace(PRECISION, half_exact=shared))) == {}


def test_a_half_precision_target_warns():
    dtypes = {**PRECISION.dtypes, "v_target": "torch.bfloat16"}
    assert findings(replace(CORRECT, precision=replace(PRECISION, dtypes=dtypes))) == \
        {"target.target_half_precision": Verdict.WARN}
    other = {**PRECISION.dtypes, "v_target": "torch.float64"}  # differs, not lossy: reported, not judged
    assert findings(replace(CORRECT, precision=replace(PRECISION, dtypes=other))) == {}


def test_every_non_pass_measurement_is_backed_by_a_finding():
    cases = [with_target(match(-1.0)), with_target(match(1.0, 0.5)), with_target(match(), xt_residual=0.2),
             replace(CORRECT, gradients=replace(GRADIENTS, moving=("head.w",))),
             replace(CORRECT, precision=replace(PRECISION, dtypes={**PRECISION.dtypes, "xt": "torch.float16"}))]
    for ev in cases:
        worst = Verdict.worst(m.verdict for m in measurements(ev, TH).measurements if m.verdict is not None)
        assert Verdict.worst(findings(ev).values()) is worst


def test_rules_never_read_display_labels():
    """Renaming every candidate for display changes no finding: the rules branch on the typed kind."""
    ev = with_target(match(0.3, eps=(0.9995, 0.8)))
    renamed = tuple(replace(c, name=c.name.upper()) for c in ev.path.v_target.candidates)
    relabelled = with_target(replace(ev.path.v_target, candidates=renamed))
    assert findings(relabelled) == findings(ev) == {"target.epsilon": Verdict.FAIL}
