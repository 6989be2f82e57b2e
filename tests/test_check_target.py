"""The `target` check: the path-fit maths on synthetic tensors, then the check end to end on synthetic pipelines."""

from __future__ import annotations

import itertools

import math

import fm_variants
import numpy as np
import pytest
import torch

from fmcheck.checks import _path_fit as pf
from fmcheck.checks.target import TargetCheck
from fmcheck.config import Settings
from fmcheck.contract import coerce
from fmcheck.runner import run
from fmcheck.state import state_digest
from fmcheck.verdict import Verdict

N, D = 256, 64
HALF_PI = math.pi / 2


# ---------------------------------------------------------------------------------------------------------------------
# the maths
# ---------------------------------------------------------------------------------------------------------------------
def _endpoints(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(N, D, generator=gen, dtype=torch.float64)
    x1 = 1.3 * torch.randn(N, D, generator=gen, dtype=torch.float64) + 0.2
    t = torch.rand(N, generator=gen, dtype=torch.float64)
    return x0, x1, t, gen


def _vp(t, beta_min=0.1, beta_max=20.0):
    """Score-SDE VP schedule, t=0 at the data: x_t = alpha(t) x1 + sigma(t) x0, and the derivatives."""
    log_alpha = -0.25 * t**2 * (beta_max - beta_min) - 0.5 * t * beta_min
    alpha = torch.exp(log_alpha)
    d_alpha = alpha * (-0.5 * t * (beta_max - beta_min) - 0.5 * beta_min)
    sigma = torch.sqrt(1 - alpha**2)
    return sigma, alpha, -alpha * d_alpha / sigma, d_alpha


PATHS = {
    "linear": lambda t: (1 - t, t, -torch.ones_like(t), torch.ones_like(t)),
    "reversed": lambda t: (t, 1 - t, torch.ones_like(t), -torch.ones_like(t)),
    "cosine": lambda t: ((HALF_PI * t).cos(), (HALF_PI * t).sin(), -HALF_PI * (HALF_PI * t).sin(),
                         HALF_PI * (HALF_PI * t).cos()),
    "sigma_min": lambda t: (1 - (1 - 1e-2) * t, t, -(1 - 1e-2) * torch.ones_like(t), torch.ones_like(t)),
    "vp_linear_alpha_bar": lambda t: (t.sqrt(), (1 - t).sqrt(), 0.5 / t.sqrt(), -0.5 / (1 - t).sqrt()),
    "vp_beta_schedule": _vp,
}


def _audit(x0, x1, xt, v, t):
    """The check's path pipeline on plain tensors: returns (sample fit, schedule fit, per-sample cos, ratio)."""
    samples = pf.fit_samples(x0, x1, xt)
    fit = pf.fit_schedule(t.numpy(), samples.a.numpy(), samples.b.numpy())
    assert fit.ok, fit.reason
    da, db = fit.derivatives(t.numpy())
    expected = pf.expected_velocity(x0, x1, torch.from_numpy(da), torch.from_numpy(db))
    cos, ratio = pf.cosine_and_ratio(v, expected)
    return samples, fit, cos, ratio


@pytest.mark.parametrize("name", sorted(PATHS))
def test_the_true_velocity_of_every_affine_path_is_recognised(name):
    x0, x1, t, _ = _endpoints()
    a, b, da, db = PATHS[name](t)
    xt = a[:, None] * x0 + b[:, None] * x1
    v = da[:, None] * x0 + db[:, None] * x1
    samples, fit, cos, ratio = _audit(x0, x1, xt, v, t)
    assert samples.relative_residual() < 1e-10
    assert torch.allclose(samples.a, a) and torch.allclose(samples.b, b)
    assert cos.median() > 0.99999 and abs(ratio.median() - 1) < 1e-3
    if name != "vp_beta_schedule":  # smooth (in t or sqrt(t)): every sample, not only the median
        assert cos.min() > 0.9999 and (ratio - 1).abs().max() < 1e-3, (cos.min(), ratio.min(), ratio.max())
    else:  # sigma ~ sqrt(0.1 t + 10 t^2): a bend at t ~ 0.01 that a polynomial resolves only roughly
        assert (cos < 0.99).double().mean() < 0.02
    direction = pf.describe_direction(fit)
    at_data = name in ("linear", "cosine", "sigma_min")
    assert direction == ("t=1 at the data (x1)" if at_data else "t=1 at the source (x0)")


def test_the_fit_chooses_the_simplest_model_that_the_data_support():
    x0, x1, t, _ = _endpoints()
    for name, degree, coordinate in (("linear", 1, "t"), ("vp_linear_alpha_bar", 1, None)):
        a, b, _, _ = PATHS[name](t)
        fit = pf.fit_schedule(t.numpy(), a.numpy(), b.numpy())
        assert fit.a.degree == degree and fit.b.degree == degree
        if coordinate:
            assert fit.a.coordinate == fit.b.coordinate == coordinate
    a, b, _, _ = PATHS["vp_linear_alpha_bar"](t)
    fit = pf.fit_schedule(t.numpy(), a.numpy(), b.numpy())
    assert (fit.a.coordinate, fit.b.coordinate) == ("sqrt(t)", "sqrt(1-t)")  # each singular at its own end
    a, b, _, _ = PATHS["cosine"](t)
    fit = pf.fit_schedule(t.numpy(), a.numpy(), b.numpy())
    assert 3 <= fit.a.degree <= pf.MAX_DEGREE


def test_wrong_targets_are_told_apart():
    x0, x1, t, gen = _endpoints()
    eps = torch.randn(N, D, generator=gen, dtype=torch.float64)
    a, b, da, db = PATHS["linear"](t)
    xt = a[:, None] * x0 + b[:, None] * x1
    velocity = da[:, None] * x0 + db[:, None] * x1
    expected = pf.expected_velocity(x0, x1, da, db)
    candidates = pf.candidate_targets(x0, x1, xt, expected, eps, a)
    cases = {"minus the path velocity (flipped sign)": -velocity, "eps (the reparam noise)": eps, "x0": x0,
             "x1": x1, "score-like -x0/a(t)": -x0 / a[:, None]}
    for name, v in cases.items():
        best = pf.resemblances(v, candidates)[0]
        tied = [r.name for r in pf.resemblances(v, candidates) if r.cos > best.cos - 1e-9]
        assert name in tied, (name, tied)
        assert best.cos > 0.9999
    scaled = pf.resemblances(0.5 * velocity, candidates)
    assert scaled[0].name == "the path velocity" and abs(scaled[0].ratio - 0.5) < 1e-9


def test_every_candidate_has_a_typed_kind():
    """The evidence reads a candidate's kind from its key once; a candidate without one would stop the judge."""
    from fmcheck.checks.target.evidence import CANDIDATE_NAMES

    x0, x1, t, gen = _endpoints()
    eps = torch.randn(N, D, generator=gen, dtype=torch.float64)
    candidates = pf.candidate_targets(x0, x1, x0, x1 - x0, eps, 1 - t, without_noise=x1 - x0)
    assert set(candidates) == set(CANDIDATE_NAMES)


@pytest.mark.parametrize("noise", [0.01, 0.1, 0.3])
def test_a_noisy_path_shows_in_the_residual_and_still_gives_the_velocity(noise):
    x0, x1, t, gen = _endpoints()
    a, b, da, db = PATHS["linear"](t)
    clean = a[:, None] * x0 + b[:, None] * x1
    xt = clean + noise * torch.randn(N, D, generator=gen, dtype=torch.float64)
    v = da[:, None] * x0 + db[:, None] * x1
    samples, fit, cos, ratio = _audit(x0, x1, xt, v, t)
    # the residual is the share of x_t outside span(x0, x1): about noise * sqrt(D - 2) / ||x_t||
    predicted = noise * math.sqrt(D - 2) / clean.norm(dim=1).pow(2).mean().sqrt().item()
    assert 0.8 * predicted < samples.relative_residual() < 1.2 * predicted
    assert cos.median() > 0.999 and abs(ratio.median() - 1) < 0.02
    assert fit.residual < 0.1


def test_x_t_built_with_another_t_shows_in_the_schedule_residual():
    x0, x1, t, gen = _endpoints()
    a, b, _, _ = PATHS["linear"](t)
    xt = a[:, None] * x0 + b[:, None] * x1
    returned_t = t[torch.randperm(N, generator=gen)]
    samples = pf.fit_samples(x0, x1, xt)
    fit = pf.fit_schedule(returned_t.numpy(), samples.a.numpy(), samples.b.numpy())
    assert samples.relative_residual() < 1e-10  # x_t is still on the span ...
    assert fit.residual > 0.3  # ... but its mix does not follow the returned t


@pytest.mark.parametrize("values", [[0.5], [0.3, 0.7], [0.5, 0.5 + 1e-9, 0.5 - 1e-9], [0.5, 0.505, 0.51]])
def test_degenerate_t_is_refused_with_a_reason(values):
    x0, x1, _, _ = _endpoints()
    t = torch.tensor(values, dtype=torch.float64).repeat(N // len(values) + 1)[:N]
    a, b, _, _ = PATHS["linear"](t)
    samples = pf.fit_samples(x0, x1, a[:, None] * x0 + b[:, None] * x1)
    fit = pf.fit_schedule(t.numpy(), samples.a.numpy(), samples.b.numpy())
    assert not fit.ok
    assert "distinct value" in fit.reason
    assert not pf.spread_ok(t.numpy())


def test_repeated_t_values_cannot_fake_the_cross_validation():
    """One t per batch: 4 distinct values among 256 samples allow at most degree 2, whatever the sample count."""
    x0, x1, _, _ = _endpoints()
    t = torch.tensor([0.1, 0.4, 0.6, 0.9], dtype=torch.float64).repeat_interleave(N // 4)
    a, b, da, db = PATHS["linear"](t)
    samples, fit, cos, _ = _audit(x0, x1, a[:, None] * x0 + b[:, None] * x1, da[:, None] * x0 + db[:, None] * x1, t)
    assert fit.distinct_t == 4 and fit.a.degree <= 2
    assert cos.min() > 0.9999


def test_collinear_endpoints_are_not_usable():
    x0, _, t, _ = _endpoints()
    samples = pf.fit_samples(x0, 2 * x0, 0.5 * x0)
    assert not samples.usable.any()


def test_time_in_timestep_units_and_time_shapes():
    t, scale = pf.normalise_time(np.array([0.0, 500.0, 999.0]))
    assert scale == 1000.0 and t.max() == pytest.approx(0.999)
    t, scale = pf.normalise_time(np.array([1.0, 1000.0]))
    assert scale == 1000.0 and t.max() == pytest.approx(1.0)
    t, scale = pf.normalise_time(np.array([0.0, 1.0]))
    assert scale is None
    assert pf.per_sample_t(torch.tensor(0.3), 4).tolist() == pytest.approx([0.3] * 4)
    assert pf.per_sample_t(torch.arange(4.0).view(4, 1, 1, 1), 4).tolist() == [0, 1, 2, 3]
    assert pf.per_sample_t(torch.arange(4.0).view(4, 1).expand(4, 3), 4).tolist() == [0, 1, 2, 3]
    assert pf.per_sample_t(torch.rand(4, 3), 4) is None


# ---------------------------------------------------------------------------------------------------------------------
# the check, end to end
# ---------------------------------------------------------------------------------------------------------------------
def _run(settings: Settings | None = None, **options):
    pipeline = coerce(fm_variants.build(**options))
    return run(pipeline, settings or Settings(), only=["target"]).check("target")


def _measurement(result, name):
    return next(m for m in result.measurements if m.name == name)


@pytest.mark.parametrize("path", ["linear", "reversed", "cosine"])
def test_correct_pipelines_pass_in_every_convention(path):
    result = _run(path=path)
    assert result.verdict is Verdict.PASS, result.summary
    assert _measurement(result, "median cos(v_target, path velocity)").value > 0.9999
    assert abs(_measurement(result, "median ||v_target|| / ||path velocity||").value - 1) < 1e-3
    direction = "t=1 at the source (x0)" if path == "reversed" else "t=1 at the data (x1)"
    assert direction in result.summary


def test_a_pure_noise_source_without_head_or_kl_passes_and_says_what_it_did_not_audit():
    result = _run(head=False)
    assert result.verdict is Verdict.PASS, result.summary
    assert "no kl output: KL path not audited" in result.summary
    assert _measurement(result, "kl gradient path").value == "no kl output: KL path not audited"


def _codes(result) -> list[str]:
    return [f.code for f in result.findings]


@pytest.mark.parametrize("target, verdict, code, words", [
    ("flipped", Verdict.FAIL, "target.sign_flipped", ["flipped sign", "x0 - x1", "cos -1.000"]),
    ("eps", Verdict.FAIL, "target.epsilon", ["eps (the reparam noise)"]),
    ("x0", Verdict.FAIL, "target.x0", ["it is x0 "]),
    ("x1", Verdict.FAIL, "target.x1", ["it is x1 "]),
    ("half", Verdict.FAIL, "target.scaled", ["0.5x the path velocity"]),
    ("double", Verdict.FAIL, "target.scaled", ["2x the path velocity"]),
])
def test_wrong_targets_fail_and_are_named(target, verdict, code, words):
    result = _run(target=target)
    assert result.verdict is verdict, result.summary
    assert _codes(result) == [code]
    for word in words:
        assert word in result.summary, result.summary
    assert result.hint


def test_a_flipped_target_in_the_reversed_convention_is_x1_minus_x0():
    result = _run(path="reversed", target="flipped")
    assert result.verdict is Verdict.FAIL
    assert "flipped sign (it is x1 - x0)" in result.summary


def test_eps_target_with_a_noise_source_is_called_an_eps_target():
    result = _run(head=False, target="eps")
    assert result.verdict is Verdict.FAIL
    assert _codes(result) == ["target.epsilon"]  # x0 is the source noise: an eps target, not target.x0
    assert "the source noise: an eps target" in result.summary


def test_a_moving_target_fails_naming_the_parameters_it_reaches():
    result = _run(detach=False)
    assert result.verdict is Verdict.FAIL
    assert _codes(result) == ["target.moving"]  # the graph and the gradient through the target: one cause
    assert "moving target" in result.summary and "head.net.0.weight" in result.summary
    assert _measurement(result, "trainable parameters v_target reaches").value == 4
    assert _measurement(result, "fm_loss gradient through v_target").verdict is Verdict.FAIL


def test_a_closed_reparameterisation_path_warns():
    result = _run(z0_detached=True)
    assert result.verdict is Verdict.WARN, result.summary
    assert _codes(result) == ["target.reparam_closed"]
    assert "reparameterisation path is closed" in result.summary
    assert _measurement(result, "fm_loss reaches the head through x_t").value == 0
    assert _measurement(result, "kl reaches the head").verdict is Verdict.PASS


def test_a_frozen_module_receiving_gradient_fails():
    result = _run(vae_grad=True)
    assert result.verdict is Verdict.FAIL
    assert "target.frozen_gradient" in _codes(result)
    assert "frozen module 'vae' receives gradient" in result.summary
    assert result.details["path"]["fit"]["ok"]  # the path audit itself is unaffected


def test_x_t_with_extra_noise_fails_on_the_span_residual():
    result = _run(xt_noise=0.1)
    assert result.verdict is Verdict.FAIL
    assert "target.xt_off_span" in _codes(result)
    assert _measurement(result, "x_t off span(x0, x1)").value > 0.05
    assert "outside span(x0, x1)" in result.summary


def test_x_t_built_with_another_t_fails_on_the_schedule_residual():
    result = _run(t_mode="shuffled")
    assert result.verdict is Verdict.FAIL
    assert "target.t_mismatch" in _codes(result)
    assert "x_t does not follow t" in result.summary


def test_x_t_computed_in_half_precision_warns():
    result = _run(xt_half=True)
    assert result.verdict is Verdict.WARN, result.summary
    assert _codes(result) == ["target.xt_half_precision"]
    assert "exact float16 numbers" in result.summary


def test_timestep_units_are_a_reported_convention_and_then_judged():
    result = _run(t_units=1000.0)
    assert result.verdict is Verdict.PASS, result.summary
    assert _codes(result) == []  # a convention, not a finding
    assert "t in timestep units: judged as t / 1000" in result.summary
    assert _measurement(result, "t in timestep units").value > 900
    assert _measurement(result, "median cos(implied target, path velocity)").verdict is Verdict.PASS
    assert _run(t_units=1000.0, target="flipped").verdict is Verdict.FAIL


def test_one_t_per_batch_draws_more_batches():
    result = _run(t_mode="per_batch", t_shape="broadcast")
    assert result.verdict is Verdict.PASS, result.summary
    assert result.details["path"]["extra_batches"] == 4  # 8 batches available, 4 measured by default


def test_too_little_spread_in_t_warns_and_says_so():
    result = _run(t_mode="constant")
    assert result.verdict is Verdict.WARN
    assert _codes(result) == ["target.path_not_fitted"]
    assert "path velocity not fitted" in result.summary and "after drawing 4 more batch(es)" in result.summary
    result = _run(t_mode="two_values")
    assert result.verdict is Verdict.WARN and "2 distinct value(s)" in result.summary


def test_thresholds_are_configurable():
    settings = Settings(thresholds={"target": {"norm_ratio_warn": 2.5, "norm_ratio_fail": 3.0}})
    assert _run(settings, target="double").verdict is Verdict.PASS


def test_skips_naming_the_missing_output():
    pipeline = fm_variants.build(outputs_without=("xt",))
    del pipeline["velocity"]  # nothing to infer x_t from
    result = run(coerce(pipeline), Settings(), only=["target"]).check("target")
    assert result.verdict is Verdict.SKIP
    assert "'xt'" in result.summary


def test_without_xt_a_declared_velocity_module_supplies_it():
    result = _run(outputs_without=("xt",))
    assert result.verdict is Verdict.PASS, result.summary
    assert "x_t: the velocity module's argument 0" in _measurement(result, "values inferred").value


def test_without_v_target_and_v_pred_the_loss_gradient_supplies_the_target():
    result = _run(outputs_without=("v_target", "v_pred"))
    assert result.verdict is Verdict.PASS, result.summary
    assert _measurement(result, "v_target").value.startswith("not returned")
    assert _measurement(result, "median cos(implied target, path velocity)").value > 0.9999
    flipped = _run(outputs_without=("v_target", "v_pred"), target="flipped")
    assert flipped.verdict is Verdict.FAIL and "flipped sign" in flipped.summary


def test_without_v_target_and_without_an_implied_target_the_target_is_not_audited():
    pipeline = fm_variants.build(outputs_without=("v_target", "v_pred"))
    step = pipeline["step"]

    def l1(batch, index):  # an L1 loss: the implied audit does not apply
        out = step(batch, index)
        out["loss"] = out["fm_loss"] = out["fm_loss"].sqrt()
        return out

    pipeline["step"] = l1
    result = run(coerce(pipeline), Settings(), only=["target"]).check("target")
    assert result.verdict is Verdict.WARN, result.summary
    assert _codes(result) == ["target.unaudited"]
    assert "the target is not audited" in result.summary


def test_the_users_state_is_unchanged(tiny_pipeline):
    before = state_digest(tiny_pipeline)
    assert run(tiny_pipeline, Settings(), only=["target"]).check("target").verdict is Verdict.PASS
    assert state_digest(tiny_pipeline) == before


def test_the_doc_renders_every_threshold():
    from fmcheck.docs import check_markdown

    text = check_markdown(TargetCheck)
    for name in TargetCheck.Thresholds.model_fields:
        assert f"`{name}`" in text


# ---------------------------------------------------------------------------------------------------------------------
# the implied-target audit: maths
# ---------------------------------------------------------------------------------------------------------------------
from fmcheck.checks.target import implied as ti  # noqa: E402
from fmcheck.checks.target import maths as tm  # noqa: E402


def _gradient(loss_of, raw):
    leaf = raw.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss_of(leaf), leaf)
    return grad


def test_solve_recovers_target_and_weight_through_preconditioning_and_weighting():
    x0, x1, t, gen = _endpoints()
    sigma = t[:, None]
    xt = (1 - sigma) * x1 + sigma * x0  # SD3: x0 is the noise at sigma = 1
    weight = 1 / (1 + sigma)

    def loss_of(raw):  # precondition_outputs: raw * (-sigma) + x_t against x1, weighted, mean-reduced
        return (weight * (raw * (-sigma) + xt - x1) ** 2).mean()

    raw = torch.randn(N, D, generator=gen, dtype=torch.float64)
    delta = torch.randn(N, D, generator=gen, dtype=torch.float64)
    solved = tm.solve(raw, _gradient(loss_of, raw), _gradient(loss_of, raw + delta), delta)
    assert torch.allclose(solved.target, x0 - x1, atol=1e-8)  # the path velocity d x_t / d sigma
    expected_k = 2 * (weight[:, 0] * t**2) / (N * D)
    assert torch.allclose(solved.k, expected_k, rtol=1e-8)
    assert float(solved.misfit.max()) < 1e-8


def test_solve_reports_a_loss_that_is_not_a_weighted_squared_error():
    x0, x1, t, gen = _endpoints()
    raw = torch.randn(N, D, generator=gen, dtype=torch.float64)
    delta = torch.randn(N, D, generator=gen, dtype=torch.float64)

    def l1(out):
        return (out - (x1 - x0)).abs().mean()

    solved = tm.solve(raw, _gradient(l1, raw), _gradient(l1, raw + delta), delta)
    assert float(solved.misfit.median()) > ti.AFFINE_TOLERANCE


def test_zero_weight_samples_have_no_target():
    raw = torch.randn(4, 3, dtype=torch.float64)
    grad0 = torch.zeros(4, 3, dtype=torch.float64)
    grad0[:2] = 2 * (raw[:2] - 1.0)
    delta = torch.ones(4, 3, dtype=torch.float64)
    grad1 = grad0.clone()
    grad1[:2] += 2 * delta[:2]
    solved = tm.solve(raw, grad0, grad1, delta)
    assert torch.allclose(solved.target[:2], torch.ones(2, 3, dtype=torch.float64))
    assert torch.isnan(solved.target[2:]).all()


def test_weight_shape_names_power_laws_and_negative_weights():
    t = np.linspace(0.05, 0.95, 50)
    assert tm.weight_shape(t, 3.0 * np.ones(50))["describe"] == "constant in t"
    shape = tm.weight_shape(t, 0.1 * t**2)
    assert shape["describe"] == "~ t^2.00" and abs(shape["p"] - 2) < 1e-6
    shape = tm.weight_shape(t, 1 - 8 * (t - 0.5) ** 2)
    assert shape["negative_share"] == pytest.approx(np.mean(1 - 8 * (t - 0.5) ** 2 < 0))


def test_layout_map_unpacks_flux_style_tokens():
    x = torch.randn(3, 4, 6, 6)
    packed = x.view(3, 4, 3, 2, 3, 2).permute(0, 2, 4, 1, 3, 5).reshape(3, 9, 16)  # diffusers' _pack_latents
    index = ti.layout_map(packed, x)
    assert index is not None and torch.equal(packed.flatten(1)[:, index], x.flatten(1))
    assert ti.layout_map(torch.randn(3, 9, 16), x) is None


def test_replace_output_keeps_the_container():
    from types import SimpleNamespace

    old, new = torch.zeros(2), torch.ones(2)
    assert ti.replace_output(old, old, new) is new
    assert ti.replace_output((old, 3), old, new)[0] is new
    assert ti.replace_output({"sample": old}, old, new)["sample"] is new
    assert ti.replace_output(SimpleNamespace(sample=old), old, new).sample is new


# ---------------------------------------------------------------------------------------------------------------------
# the implied-target audit: end to end, diffusers' SD3 training loss with a tiny SD3Transformer2DModel
# ---------------------------------------------------------------------------------------------------------------------
def _sd3(settings: Settings | None = None, prediction: str | None = None, **options):
    from fixtures.bugs import _target_sd3

    pipeline = _target_sd3.build(**options)
    if prediction:
        pipeline["prediction"] = prediction
    return run(coerce(pipeline), settings or Settings(), only=["target"]).check("target")


@pytest.mark.parametrize("options, weight", [
    ({"precondition": False}, "constant in t"),
    ({"precondition": True}, "~ t^2.00"),  # sigma^2 ||raw - (noise - latents)||^2
    ({"precondition": True, "weighting": "sigma_sqrt", "density": "sigma_sqrt"}, "constant in t"),
    ({"precondition": True, "weighting": "cosmap", "density": "cosmap"}, None),
    ({"precondition": True, "t_output": "timesteps"}, "~ t^2.00"),
    ({"precondition": True, "declare_velocity": False}, "~ t^2.00"),  # the transformer found by forward hooks
])
def test_sd3_training_losses_pass_whatever_the_preconditioning_and_weighting(options, weight):
    result = _sd3(**options)
    assert result.verdict is Verdict.PASS, result.summary
    implied = result.details["implied"]
    assert implied["ok"] and implied["compared"], implied
    assert implied["cos_median"] > 0.9999 and abs(implied["ratio_median"] - 1) < 1e-3
    if weight:
        assert implied["weight"]["describe"] == weight
    if options.get("precondition"):
        assert "the loss preconditions the output" in result.summary
        assert _measurement(result, "median cos(v_target, path velocity)").verdict is None  # a cross-check: context
    assert len(implied["weight_curve"]["t"]) == len(implied["weight_curve"]["k"]) == implied["samples"]


@pytest.mark.parametrize("options, words", [
    ({"sigma_sign": 1.0}, ["implied target has the flipped sign", "x1 - x0"]),
    ({"precondition": False, "weighting": "negative", "density": "uniform"}, ["loss weight is negative"]),
    ({"precondition": False, "trained": "epsilon"}, ["an eps target"]),
    ({"precondition": True, "trained": "epsilon"}, ["an eps target"]),
])
def test_sd3_planted_bugs_fail(options, words):
    result = _sd3(**options)
    assert result.verdict is Verdict.FAIL, result.summary
    for word in words:
        assert word in result.summary, result.summary


def test_a_declared_prediction_is_what_the_target_is_compared_with():
    assert _sd3(precondition=False, trained="epsilon", prediction="epsilon").verdict is Verdict.PASS
    result = _sd3(precondition=False, prediction="epsilon")
    assert result.verdict is Verdict.FAIL
    assert "declared prediction 'epsilon'" in result.summary and "resembles the path velocity" in result.summary


def test_a_step_whose_randomness_is_not_replayed_falls_back_to_v_target():
    pipeline = fm_variants.build()
    calls = itertools.count()
    step = pipeline["step"]

    def reseeded(batch, index):  # seeded from a call counter: nothing fmcheck can find or replay
        torch.manual_seed(next(calls))
        return step(batch, index)

    pipeline["step"] = reseeded
    result = run(coerce(pipeline), Settings(), only=["target"]).check("target")
    assert "randomness was not replayed" in _measurement(result, "implied target").value
    assert _measurement(result, "median cos(v_target, path velocity)").verdict is Verdict.PASS


def test_an_l1_loss_is_not_audited_by_the_implied_target():
    pipeline = fm_variants.build()
    step = pipeline["step"]

    def l1(batch, index):
        out = step(batch, index)
        out["loss"] = out["fm_loss"] = (out["v_pred"] - out["v_target"]).abs().mean()
        return out

    pipeline["step"] = l1
    result = run(coerce(pipeline), Settings(), only=["target"]).check("target")
    assert "not a per-sample weighted squared error" in _measurement(result, "implied target").value
    assert result.verdict is Verdict.PASS, result.summary


def test_the_prediction_field_is_validated():
    from fmcheck.errors import PipelineError

    with pytest.raises(PipelineError, match="'prediction'"):
        coerce({**fm_variants.build(), "prediction": "v"})


# ---------------------------------------------------------------------------------------------------------------------
# paths with a noise term (torchcfm sigma > 0, Schrodinger bridge)
# ---------------------------------------------------------------------------------------------------------------------
def test_noise_term_fit_recovers_the_bridge_std_and_its_log_slope():
    x0, x1, t, gen = _endpoints()
    noise = torch.randn(N, D, generator=gen, dtype=torch.float64)
    s = 0.7 * torch.sqrt(t * (1 - t))
    xt = (1 - t)[:, None] * x0 + t[:, None] * x1 + s[:, None] * noise
    fitted = pf.fit_samples_with_noise(x0, x1, noise, xt)
    assert torch.allclose(fitted.s, s, atol=1e-10) and fitted.samples.relative_residual() < 1e-10
    assert torch.allclose(fitted.samples.a, 1 - t, atol=1e-10)
    slope, described = pf.noise_log_slope(t.numpy(), fitted.s.numpy())
    inner = (t > 0.05) & (t < 0.95)
    truth = (1 - 2 * t) / (2 * t * (1 - t))
    assert np.allclose(slope(t.numpy())[inner.numpy()], truth[inner].numpy(), rtol=1e-6)
    slope, _ = pf.noise_log_slope(t.numpy(), np.full(N, 0.1))
    assert np.abs(slope(t.numpy())).max() < 1e-6  # constant sigma: no extra term


def _noisy_pipeline(schedule: str, with_term: bool, return_noise: bool = True) -> dict:
    torch.manual_seed(0)
    velocity = torch.nn.Sequential(torch.nn.Linear(D + 1, 64), torch.nn.SiLU(), torch.nn.Linear(64, D))
    gen = torch.Generator().manual_seed(5)
    data = [{"x1": torch.randn(32, D, generator=gen)} for _ in range(8)]

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = velocity

        def forward(self, xt, t):
            return self.net(torch.cat([xt, t[:, None]], 1))

    net = Net()

    def step(batch, index):
        x1 = batch["x1"]
        x0 = torch.randn_like(x1)
        noise = torch.randn_like(x1)
        t = torch.rand(x1.shape[0]).clamp(0.02, 0.98)
        s = 0.1 * torch.ones_like(t) if schedule == "constant" else 0.5 * torch.sqrt(t * (1 - t))
        mu = (1 - t[:, None]) * x0 + t[:, None] * x1
        xt = mu + s[:, None] * noise
        target = x1 - x0
        if with_term and schedule == "bridge":
            target = target + ((1 - 2 * t) / (2 * t * (1 - t)))[:, None] * (xt - mu)
        v = net(xt, t)
        loss = ((v - target) ** 2).mean()
        out = {"loss": loss, "x0": x0, "x1": x1, "t": t, "xt": xt, "v_target": target, "v_pred": v}
        if return_noise:
            out["noise"] = noise
        return out

    return {"step": step, "batches": data, "trainable": {"velocity": net}, "velocity": net}


@pytest.mark.parametrize("schedule, with_term, verdict", [
    ("constant", False, Verdict.PASS),  # torchcfm ConditionalFlowMatcher(sigma=0.1): x1 - x0 is exact
    ("bridge", True, Verdict.PASS),  # Schrodinger bridge with its (1 - 2t) / (2t (1 - t)) (x_t - mu_t) term
    ("bridge", False, Verdict.FAIL),  # the bridge's x_t with the plain target: the needed term left out
])
def test_a_returned_noise_term_is_modelled(schedule, with_term, verdict):
    result = run(coerce(_noisy_pipeline(schedule, with_term)), Settings(), only=["target"]).check("target")
    assert result.verdict is verdict, result.summary
    assert _measurement(result, "x_t off span(x0, x1)").verdict is Verdict.PASS
    assert _measurement(result, "noise term of x_t (step output 'noise')").value > 0.01
    if verdict is Verdict.FAIL:
        assert "without the noise term" in result.summary


def test_noise_the_step_does_not_return_still_fails_the_span_residual():
    result = run(coerce(_noisy_pipeline("constant", False, return_noise=False)), Settings(),
                 only=["target"]).check("target")
    assert result.verdict is Verdict.FAIL
    assert "outside span(x0, x1)" in result.summary and "'noise'" in result.hint


@pytest.mark.parametrize("declared, verdict", [(False, Verdict.WARN), (True, Verdict.FAIL)])
def test_an_implied_target_that_contradicts_the_step_labels_fails_only_for_a_declared_module(declared, verdict):
    """v_pred = -raw: the labels say 'velocity', the loss trains the raw output toward minus it. Which one the
    sampler integrates is known only when the pipeline declares its velocity module."""
    pipeline = fm_variants.build()
    step = pipeline["step"]

    def negated(batch, index):
        out = step(batch, index)
        out["v_pred"] = -out["v_pred"]
        out["loss"] = out["fm_loss"] = ((out["v_pred"] - out["v_target"]) ** 2).mean()
        return out

    pipeline["step"] = negated
    if not declared:
        del pipeline["velocity"]
    result = run(coerce(pipeline), Settings(), only=["target"]).check("target")
    assert result.verdict is verdict, result.summary
    assert "flipped sign" in result.summary
    assert ("declare the pipeline field 'velocity'" in result.summary) is not declared
    assert result.details["implied"]["v_pred_is_raw"] is False


def test_a_reentrant_gradient_checkpoint_is_audited_through_backward():
    from torch.utils.checkpoint import checkpoint

    pipeline = fm_variants.build()
    net = pipeline["velocity"]
    plain = net.forward
    net.forward = lambda xt, t, q: checkpoint(plain, xt, t, q, use_reentrant=True)
    out = pipeline["step"](pipeline["batches"][0], 0)
    with pytest.raises(RuntimeError, match="use_reentrant=True"):  # what autograd.grad says through it
        torch.autograd.grad(out["loss"], list(pipeline["trainable"]["head"].parameters()))
    # ... and for the parameters inside it, no error but no gradient: the engine never enters the checkpoint
    assert all(g is None for g in torch.autograd.grad(out["loss"], list(net.parameters()), allow_unused=True))
    result = run(coerce(pipeline), Settings(), only=["target"]).check("target")
    assert result.verdict is Verdict.PASS, result.summary
    assert any(m.name == "gradient map" and "reentrant" in str(m.value) for m in result.measurements)
    assert _measurement(result, "fm_loss reaches the velocity net").verdict is Verdict.PASS
    assert _measurement(result, "fm_loss reaches the head through x_t").verdict is Verdict.PASS
    assert result.details["implied"]["compared"]
    for param in [*net.parameters(), *pipeline["trainable"]["head"].parameters()]:
        assert param.grad is None  # backward() left no gradient behind


def test_a_reentrant_checkpoint_without_an_input_that_requires_grad_trains_nothing():
    """PyTorch's pitfall: with use_reentrant=True and no input requiring grad, the parameters inside get none."""
    from torch.utils.checkpoint import checkpoint

    pipeline = fm_variants.build(head=False)
    net = pipeline["velocity"]
    plain = net.forward
    net.forward = lambda xt, t, q: checkpoint(plain, xt, t, q, use_reentrant=True)
    result = run(coerce(pipeline), Settings(), only=["target"]).check("target")
    assert result.verdict is Verdict.FAIL
    assert "carries no gradient at all" in result.summary or "gets no gradient" in result.summary, result.summary


def test_a_moving_target_is_still_caught_through_a_reentrant_checkpoint():
    from torch.utils.checkpoint import checkpoint

    pipeline = fm_variants.build(detach=False)
    net = pipeline["velocity"]
    plain = net.forward
    net.forward = lambda xt, t, q: checkpoint(plain, xt, t, q, use_reentrant=True)
    result = run(coerce(pipeline), Settings(), only=["target"]).check("target")
    assert result.verdict is Verdict.FAIL
    assert _measurement(result, "fm_loss gradient through v_target").verdict is Verdict.FAIL


# ---------------------------------------------------------------------------------------------------------------------
# a step that returns only its loss, with a declared velocity module
# ---------------------------------------------------------------------------------------------------------------------
ALL_BUT_LOSS = ("x0", "x1", "t", "xt", "v_target", "v_pred", "eps", "mu", "logvar", "kl", "kl_weight", "fm_loss")


@pytest.mark.parametrize("options, verdict, words", [
    ({}, Verdict.PASS, ["toward the path velocity", "t=1 at the data (x1)"]),
    ({"path": "reversed"}, Verdict.PASS, ["t=1 at the source (x0)"]),
    ({"t_units": 1000.0}, Verdict.PASS, []),
    ({"target": "flipped"}, Verdict.FAIL, ["flipped sign"]),
    ({"target": "eps"}, Verdict.FAIL, ["an eps target"]),
])
def test_a_loss_only_step_is_audited_through_the_velocity_module_and_encode(options, verdict, words):
    result = _run(outputs_without=ALL_BUT_LOSS, **options)
    assert result.verdict is verdict, result.summary
    for word in words:
        assert word in result.summary, result.summary
    inferred = _measurement(result, "values inferred").value
    assert "x_t: the velocity module's argument 0" in inferred and "x1: pipeline field 'encode'" in inferred
    assert "t: its argument 1" in inferred


def test_a_loss_only_sd3_step_with_preconditioning():
    from fixtures.bugs import _target_sd3

    for sign, verdict in ((-1.0, Verdict.PASS), (1.0, Verdict.FAIL)):
        pipeline = _target_sd3.build(precondition=True, sigma_sign=sign)
        step = pipeline["step"]
        pipeline["step"] = lambda batch, index, step=step: {"loss": step(batch, index)["loss"]}
        pipeline["encode"], pipeline["pixels"] = (lambda x: x), (lambda batch: batch["latents"])
        result = run(coerce(pipeline), Settings(), only=["target"]).check("target")
        assert result.verdict is verdict, result.summary
        assert "keyword 'timestep'" in _measurement(result, "values inferred").value
        if verdict is Verdict.PASS:
            assert result.details["implied"]["weight"]["describe"] == "~ t^2.00"


def test_a_loss_only_step_without_a_declared_velocity_module_is_skipped_naming_what_is_missing():
    pipeline = fm_variants.build(outputs_without=ALL_BUT_LOSS)
    del pipeline["velocity"]
    result = run(coerce(pipeline), Settings(), only=["target"]).check("target")
    assert result.verdict is Verdict.SKIP and "'x0'" in result.summary


def test_a_prediction_modified_in_place_is_still_audited():
    pipeline = _noisy_pipeline("constant", False)
    net = pipeline["velocity"]

    def step(batch, index):  # the trainer rescales its prediction in place after the call
        x1 = batch["x1"]
        x0, t = torch.randn_like(x1), torch.rand(x1.shape[0])
        xt = (1 - t[:, None]) * x0 + t[:, None] * x1
        v = net(xt, t)
        v.mul_(1.0)
        loss = ((v - (x1 - x0)) ** 2).mean()
        return {"loss": loss, "x0": x0, "x1": x1, "t": t, "xt": xt, "v_target": x1 - x0, "v_pred": v}

    pipeline["step"] = step
    result = run(coerce(pipeline), Settings(), only=["target"]).check("target")
    assert result.verdict is Verdict.PASS, result.summary
    assert result.details["implied"]["compared"]


@pytest.mark.parametrize("options, resembles", [
    ({"precondition": True}, "the path velocity"),
    ({"precondition": False, "trained": "epsilon"}, "x0 (the source noise: an eps target)"),
])
def test_the_report_names_what_the_implied_target_resembles(options, resembles):
    result = _sd3(**options)
    assert _measurement(result, "implied target resembles").value.startswith(resembles)


def test_timesteps_over_another_span_warn_instead_of_failing_the_norm_ratio():
    """t over 0..500 (num_train_timesteps = 500) is normalised by 1000: the target is right per t / 500."""
    result = _run(t_units=500.0)
    assert result.verdict is Verdict.WARN, result.summary
    assert _codes(result) == ["target.timestep_span"]
    assert "the path reaches its end at raw t" in result.summary and "0.5x" in result.summary
    assert _run(t_units=500.0, target="flipped").verdict is Verdict.FAIL
    assert _run(t_units=1000.0, target="half").verdict is Verdict.FAIL  # the span is 1000: a real 0.5x
