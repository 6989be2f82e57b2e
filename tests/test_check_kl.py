"""The `kl` check: the analytic-KL maths, the stress probe on heads of every output shape, and the check end to end on
small synthetic pipelines (each one bug at a time; the digits fixtures are covered by the detection matrix)."""

from __future__ import annotations

import dataclasses
import math
from collections import namedtuple

import pytest
import torch
from torch import nn

from fmcheck.checks.kl import maths as km
from fmcheck.checks.kl import probe as kp
from fmcheck.checks.kl import NOT_APPLICABLE, KLCheck
from fmcheck.config import Settings
from fmcheck.contract import coerce
from fmcheck.runner import run
from fmcheck.verdict import Verdict

LATENT = (3, 4, 5)  # a (C, H, W) latent whose reductions differ by factors other than 1 and 2
D = math.prod(LATENT)


def reference_kl(mu, logvar):
    """Per-element KL from torch.distributions, independent of the formula under test."""
    q = torch.distributions.Normal(mu.double(), (0.5 * logvar.double()).exp())
    p = torch.distributions.Normal(torch.zeros_like(mu.double()), torch.ones_like(mu.double()))
    return torch.distributions.kl_divergence(q, p)


def gaussian_batches(sizes=(5, 7), seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, *LATENT, generator=gen), 0.8 * torch.randn(b, *LATENT, generator=gen)) for b in sizes]


# -- the analytic comparison ----------------------------------------------------------------------------------
def test_per_element_kl_is_the_kl_of_the_two_gaussians():
    mu, logvar = gaussian_batches()[0]
    assert torch.allclose(km.kl_elements(mu, logvar), reference_kl(mu, logvar), rtol=1e-12, atol=1e-12)


NORMALISATIONS = {
    "sum over latent dims, mean over batch": lambda e: e.flatten(1).sum(1).mean(),
    "mean over all elements": lambda e: e.mean(),
    "sum over everything": lambda e: e.sum(),
    "mean over latent dims, sum over batch": lambda e: e.flatten(1).mean(1).sum(),
    "sum over dims 2.., mean over batch and dim 1": lambda e: e.sum(dim=(2, 3)).mean(),
    "sum over the last dim, mean over the others": lambda e: e.sum(-1).mean(),
    "per sample: sum over latent dims": lambda e: e.flatten(1).sum(1),
    "per sample: mean over latent dims": lambda e: e.flatten(1).mean(1),
}


@pytest.mark.parametrize("factor,label", [(1.0, "correct"), (2.0, "missing 1/2"), (-1.0, "flipped sign"),
                                          (-2.0, "flipped sign and missing 1/2")])
@pytest.mark.parametrize("name", list(NORMALISATIONS))
def test_each_normalisation_and_factor_is_recognised(name, factor, label):
    batches = gaussian_batches()
    user = [(factor * NORMALISATIONS[name](reference_kl(mu, lv))).float() for mu, lv in batches]
    match = km.match_formula(user, [km.kl_elements(mu, lv) for mu, lv in batches])
    assert (match.reduction, match.factor, match.label) == (name, factor, label)
    assert not match.ambiguous
    assert match.rel_error < 1e-2  # in units of the 1e-3 tolerance: float32 rounding only


def test_a_kl_that_is_no_reduction_of_the_analytic_one_matches_none_and_names_the_closest():
    batches = gaussian_batches()
    # a single-sample Monte Carlo estimate, averaged over elements: close to the mean, but not equal
    gen = torch.Generator().manual_seed(1)
    user = []
    for mu, lv in batches:
        z = mu + (0.5 * lv).exp() * torch.randn(mu.shape, generator=gen)
        log_q = -0.5 * (lv + (z - mu) ** 2 / lv.exp())
        log_p = -0.5 * z**2
        user.append((log_q - log_p).mean())
    match = km.match_formula(user, [km.kl_elements(mu, lv) for mu, lv in batches])
    assert match.reduction is None and match.factor is None
    assert match.closest is not None and match.closest_ratio is not None and match.closest_ratio > 0


def test_a_kl_at_the_prior_is_ambiguous_in_sign():
    zero = torch.zeros(4, *LATENT)
    match = km.match_formula([torch.tensor(0.0)], [km.kl_elements(zero, zero)])
    assert match.ambiguous and match.label == "correct"


def test_a_kl_that_only_fits_one_batch_does_not_match():
    batches = gaussian_batches()
    user = [NORMALISATIONS["mean over all elements"](reference_kl(*batches[0])),
            NORMALISATIONS["sum over everything"](reference_kl(*batches[1]))]
    assert km.match_formula(user, [km.kl_elements(mu, lv) for mu, lv in batches]).reduction is None


def test_posterior_statistics_see_a_mu_that_ignores_the_text():
    gen = torch.Generator().manual_seed(0)
    varying = torch.randn(8, D, generator=gen)
    constant = torch.randn(1, D, generator=gen).expand(8, D)
    logvar = torch.zeros(8, D)
    assert km.posterior_stats([varying], [logvar])["text_share"] > 0.5
    stats = km.posterior_stats([constant], [logvar])
    assert stats["text_share"] == 0.0 and stats["mu_between_var"] == 0.0
    assert stats["kl_per_element"] == pytest.approx(0.5 * float(constant[0].pow(2).mean()), rel=1e-6)


def test_share_at_bounds():
    logvar = torch.tensor([[-6.0, -6.0, 0.0, 1.0, 5.99, 6.0, 2.0, 3.0]])
    assert km.share_at_bounds([logvar], -6.0, 6.0) == pytest.approx(4 / 8)


# -- module outputs of every shape ------------------------------------------------------------------------------
Moments = namedtuple("Moments", "mu logvar")


@dataclasses.dataclass
class MomentsData:
    mu: torch.Tensor
    logvar: torch.Tensor
    label: str = "x"


def test_push_maps_every_floating_tensor_and_keeps_the_containers():
    t = torch.ones(2)
    ids = torch.tensor([1, 2])
    fn = kp.push(+1.0, factor=10.0, shift=1.0)
    assert torch.equal(kp.map_tensors(t, fn), torch.full((2,), 11.0))
    out = kp.map_tensors((t, [t, ids]), fn)
    assert isinstance(out, tuple) and isinstance(out[1], list) and torch.equal(out[1][1], ids)
    assert isinstance(kp.map_tensors(Moments(t, t), fn), Moments)
    mapped = kp.map_tensors({"mu": t, "logvar": t}, kp.push(-1.0, 10.0, 1.0))
    assert torch.equal(mapped["logvar"], torch.full((2,), -11.0))
    data = kp.map_tensors(MomentsData(t, t), fn)
    assert isinstance(data, MomentsData) and data.label == "x" and torch.equal(data.mu, torch.full((2,), 11.0))


class TupleHead(nn.Module):
    def __init__(self, bound=None):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.SiLU(), nn.Linear(16, 2 * D))
        self.bound = bound

    def forward(self, q):
        mu, logvar = self.net(q).view(q.shape[0], 2, *LATENT).unbind(1)
        if self.bound == "tanh-inside":
            logvar = 6 * torch.tanh(logvar / 6)
        return mu, logvar


class ChunkedHead(nn.Module):
    """One tensor out; the step chunks it."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.SiLU(), nn.Linear(16, 2 * D))

    def forward(self, q):
        return self.net(q)


class DictHead(nn.Module):
    """Separate mu and logvar layers, a dict out."""

    def __init__(self, zero_init_logvar=False, bound=None):
        super().__init__()
        self.bound = bound
        self.body = nn.Sequential(nn.Linear(8, 16), nn.SiLU())
        self.to_mu = nn.Linear(16, D)
        self.to_logvar = nn.Linear(16, D)
        if zero_init_logvar:
            nn.init.zeros_(self.to_logvar.weight)
            nn.init.zeros_(self.to_logvar.bias)

    def forward(self, q):
        h = self.body(q)
        logvar = self.to_logvar(h).view(-1, *LATENT)
        if self.bound == "tanh-inside":
            logvar = 6 * torch.tanh(logvar / 6)
        return {"mu": self.to_mu(h).view(-1, *LATENT), "logvar": logvar}


def make_step(head, velocity_fn, style, bound, head_input=lambda q: q):
    def moments(q):
        out = head(head_input(q))
        if style == "chunked":
            mu, logvar = out.chunk(2, dim=-1)
            return mu.reshape(-1, *LATENT), logvar.reshape(-1, *LATENT)
        if style == "dict":
            return out["mu"], out["logvar"]
        return out

    def step(batch, step_index):
        q, x1 = batch["q"], batch["x1"]
        mu, logvar = moments(q)
        if bound == "clamp":
            logvar = logvar.clamp(-6, 6)
        elif bound == "tanh":
            logvar = 6 * torch.tanh(logvar / 6)
        elif bound == "narrow":  # a clamp that holds almost every value of an untrained head
            logvar = logvar.clamp(-0.01, 0.01)
        eps = torch.randn_like(mu)
        x0 = mu + (0.5 * logvar).exp() * eps
        t = torch.rand(x0.shape[0])
        tt = t.view(-1, 1, 1, 1)
        xt = (1 - tt) * x0 + tt * x1
        v_target = (x1 - x0).detach()
        v_pred = velocity_fn(xt, q).view_as(xt)
        fm_loss = ((v_pred - v_target) ** 2).mean()
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).mean()
        return {"loss": fm_loss + 0.1 * kl, "mu": mu, "logvar": logvar, "kl": kl, "fm_loss": fm_loss,
                "v_pred": v_pred, "v_target": v_target, "x0": x0, "x1": x1, "t": t, "xt": xt}

    return step


HEADS = {
    "tuple": lambda: (TupleHead(), "tuple"),
    "chunked": lambda: (ChunkedHead(), "chunked"),
    "dict": lambda: (DictHead(), "dict"),
    "dict, zero-initialised logvar layer": lambda: (DictHead(zero_init_logvar=True), "dict"),
}


def probe(head_name, bound, inner_bound=None, one_model=False):
    torch.manual_seed(0)
    head, style = HEADS[head_name]()
    if inner_bound:
        head.bound = inner_bound
    velocity = nn.Sequential(nn.Linear(D, 32), nn.SiLU(), nn.Linear(32, D))
    step = make_step(head, lambda xt, q: velocity(xt.flatten(1)), style, bound)
    gen = torch.Generator().manual_seed(0)
    batch = {"q": torch.randn(6, 8, generator=gen), "x1": torch.randn(6, *LATENT, generator=gen)}

    def run_once():
        torch.manual_seed(1)
        with torch.no_grad():
            return step(batch, 0)

    ref = run_once()
    if one_model:  # one trainable module holding both; the step calls its parts directly
        model = nn.Module()
        model.text_head, model.flow = head, velocity
        trainable = {"model": model}
    else:
        trainable = {"head": head, "velocity": velocity}
    result = kp.stress_probe(run_once, trainable, ref["mu"], ref["logvar"])
    hooks = [m for m in [*head.modules(), *velocity.modules()] if m._forward_hooks]
    return result, hooks


@pytest.mark.parametrize("head_name", list(HEADS))
@pytest.mark.parametrize("bound", ["clamp", "tanh"])
def test_the_stress_probe_passes_a_bounded_logvar_whatever_the_head_returns(head_name, bound):
    result, hooks = probe(head_name, bound)
    assert not hooks, "the probe left hooks behind"
    assert result.located is not None and result.located.startswith("head"), result
    assert result.raised is None and len(result.runs) == 2
    assert result.logvar_max_abs == pytest.approx(6.0, abs=1e-4)
    assert result.kl_finite
    lows, highs = [r.logvar_min for r in result.runs], [r.logvar_max for r in result.runs]
    assert min(lows) == pytest.approx(-6.0, abs=1e-4) and max(highs) == pytest.approx(6.0, abs=1e-4)


@pytest.mark.parametrize("head_name", list(HEADS))
def test_the_stress_probe_reveals_an_unbounded_logvar_whatever_the_head_returns(head_name):
    result, hooks = probe(head_name, None)
    assert not hooks
    assert result.located is not None and result.located.startswith("head")
    assert result.logvar_max_abs > 20  # raw outputs pushed to about +-100
    assert not result.kl_finite  # exp(logvar) overflows float32


@pytest.mark.parametrize("head_name,layer", [("tuple", "head.net.2"), ("dict", "head.to_logvar")])
def test_a_bound_inside_the_heads_forward_is_probed_before_the_bound(head_name, layer):
    """6 * tanh inside forward: pushing the head's own (bounded) output would fake an unbounded logvar."""
    result, _ = probe(head_name, None, inner_bound="tanh-inside")
    assert result.located == layer, result
    assert result.logvar_max_abs == pytest.approx(6.0, abs=1e-4)


@pytest.mark.parametrize("bound,bounded", [("clamp", True), (None, False)])
def test_the_head_is_found_inside_a_single_trainable_module(bound, bounded):
    result, hooks = probe("tuple", bound, one_model=True)
    assert not hooks
    assert result.located.startswith("model.text_head"), result
    assert (result.logvar_max_abs <= 6.0 + 1e-4) is bounded


def test_the_probe_reports_a_logvar_no_module_produces():
    torch.manual_seed(0)
    head, velocity = nn.Linear(8, D), nn.Linear(D, D)
    free_logvar = nn.Parameter(torch.zeros(D))
    batch = torch.randn(4, 8)

    def run_once():
        with torch.no_grad():
            mu = head(batch)
            logvar = free_logvar.expand_as(mu)
            return {"loss": velocity(mu).pow(2).mean(), "mu": mu, "logvar": logvar}

    ref = run_once()
    result = kp.stress_probe(run_once, {"head": head, "velocity": velocity}, ref["mu"], ref["logvar"])
    assert result.located is None and result.runs == [] and "logvar" in result.reason
    assert result.tried  # it did try the candidates


# -- the check end to end ---------------------------------------------------------------------------------------
def build(bound="clamp", kl_sign=1.0, kl_half=0.5, warmup=True, kl_weight=0.1, collapse=False, head="tuple",
          total_steps=1000, outputs_drop=(), kl_reduce="mean", weight_as_tensor=False, batch_size=16):
    torch.manual_seed(0)
    head_module, style = HEADS[head]()
    velocity = nn.Sequential(nn.Linear(D + 8, 32), nn.SiLU(), nn.Linear(32, D))
    gen = torch.Generator().manual_seed(0)
    q_all = torch.randn(64, 8, generator=gen)
    x1_all = torch.randn(64, *LATENT, generator=gen)
    batches = [{"q": q_all[i:i + batch_size], "x1": x1_all[i:i + batch_size]} for i in range(0, 64, batch_size)]
    inner = make_step(head_module, lambda xt, q: velocity(torch.cat([xt.flatten(1), q], 1)), style, bound,
                      head_input=torch.zeros_like if collapse else (lambda q: q))

    def step(batch, step_index):
        out = inner(batch, step_index)
        mu, logvar = out["mu"], out["logvar"]
        elements = kl_half * (mu.pow(2) + logvar.exp() - 1 - logvar)
        kl = kl_sign * (elements.mean() if kl_reduce == "mean" else elements.flatten(1).sum(1).mean()
                        if kl_reduce == "sum_dims" else elements.sum())
        weight = kl_weight * (min(1.0, step_index / (0.1 * total_steps)) if warmup and total_steps else 1.0)
        result = {**out, "kl": kl, "kl_weight": torch.tensor(weight) if weight_as_tensor else weight,
                  "loss": out["fm_loss"] + weight * kl}
        return {k: v for k, v in result.items() if k not in outputs_drop}

    pipeline = {"step": step, "batches": batches, "trainable": {"head": head_module, "velocity": velocity},
                "optimizer": torch.optim.AdamW([*head_module.parameters(), *velocity.parameters()], lr=1e-3)}
    if total_steps:
        pipeline["total_steps"] = total_steps
    return coerce(pipeline)


def check(pipeline, **thresholds):
    settings = Settings(thresholds={"kl": thresholds}) if thresholds else Settings()
    return run(pipeline, settings, only=["kl"]).check("kl")


def measurement(result, name):
    return next(m for m in result.measurements if m.name == name)


def test_a_correct_pipeline_passes_with_the_numbers():
    result = check(build())
    assert result.verdict is Verdict.PASS, result.summary
    assert measurement(result, "max |logvar| under the stress probe").value == pytest.approx(6.0, abs=1e-3)
    assert measurement(result, "kl formula vs analytic KL").value.startswith("mean over all elements x 1")
    weights = [m.value for m in result.measurements if m.name.startswith("kl_weight at step ") and "/" not in m.name]
    assert weights == pytest.approx([0.0, 0.01, 0.05, 0.1, 0.1])
    assert "bounded under stress" in result.summary


@pytest.mark.parametrize("head", ["chunked", "dict"])
def test_a_smooth_bound_passes_for_other_head_shapes(head):
    result = check(build(bound="tanh", head=head))
    assert result.verdict is Verdict.PASS, result.summary


def test_an_unclamped_logvar_fails_through_the_stress_probe_only():
    result = check(build(bound=None))
    assert result.verdict is Verdict.FAIL
    assert measurement(result, "max |logvar| on the measured batches").verdict is Verdict.PASS  # small at init
    stressed = measurement(result, "max |logvar| under the stress probe")
    assert stressed.verdict is Verdict.FAIL and stressed.value > 20
    assert "unbounded" in result.summary and "clamp(-6, 6)" in result.hint


def test_a_clamp_holding_most_logvars_warns_and_the_bound_is_configurable():
    narrow = check(build(bound="narrow"))
    assert narrow.verdict is Verdict.WARN and "sit at the bound" in narrow.summary
    assert measurement(narrow, "share of logvar at the bound").value > 0.5
    clamped = check(build(), logvar_bound=5.0)  # [-6, 6] exceeds a 5-nat bound
    assert clamped.verdict is Verdict.FAIL
    assert measurement(clamped, "max |logvar| under the stress probe").verdict is Verdict.FAIL


def test_an_unbounded_logvar_reports_no_share_at_a_bound():
    result = check(build(bound=None))
    assert not [m for m in result.measurements if m.name == "share of logvar at the bound"]


def test_a_kl_with_the_wrong_sign_fails():
    result = check(build(kl_sign=-1.0))
    assert result.verdict is Verdict.FAIL
    assert "flipped sign" in result.summary
    assert measurement(result, "kl (user) minimum").verdict is Verdict.FAIL


def test_a_missing_half_warns():
    result = check(build(kl_half=1.0))
    assert result.verdict is Verdict.WARN
    assert "missing 1/2" in result.summary


def test_a_kl_summed_over_the_batch_warns_and_a_per_sample_sum_passes():
    summed = check(build(kl_reduce="sum_all", kl_weight=1e-3))
    assert summed.verdict is Verdict.WARN and "batch size" in summed.summary
    per_sample = check(build(kl_reduce="sum_dims", kl_weight=1e-3))
    assert per_sample.verdict is Verdict.PASS, per_sample.summary
    assert "sum over latent dims, mean over batch" in measurement(per_sample, "kl formula vs analytic KL").value


def test_no_warmup_warns_with_the_numbers_and_the_threshold_is_configurable():
    result = check(build(warmup=False))
    assert result.verdict is Verdict.WARN
    assert "never changes" in result.summary and "0.1@0" in result.summary and "0.1@500" in result.summary
    assert measurement(result, "kl_weight at step 0 / target").value == pytest.approx(1.0)
    assert check(build(warmup=False), warmup_start_warn=1.0).verdict is Verdict.PASS


def test_a_kl_weight_given_as_a_tensor_is_read():
    result = check(build(weight_as_tensor=True))
    assert result.verdict is Verdict.PASS, result.summary
    assert measurement(result, "kl_weight at step 100 (10%)").value == pytest.approx(0.1)


def test_a_weighted_kl_that_dominates_the_fm_loss_fails():
    result = check(build(kl_weight=1e4))
    assert result.verdict is Verdict.FAIL
    ratio = measurement(result, "weighted KL / fm_loss")
    assert ratio.verdict is Verdict.FAIL and ratio.value > 100
    assert "dominates" in result.summary


@pytest.mark.parametrize("collapse", [False, True])
def test_batches_of_one_caption_give_no_collapse_verdict_and_say_what_would(collapse):
    # One sample per batch: mu cannot differ between captions of a batch, so a share of 0 proves nothing.
    result = check(build(batch_size=1, collapse=collapse))
    assert "collapse" not in result.summary, result.summary
    share = measurement(result, "share of mu varying between captions")
    assert share.verdict is None and share.value == "not measurable"
    assert "two or more captions" in share.note
    assert result.verdict is Verdict.PASS, result.summary


def test_a_head_that_ignores_the_text_warns_as_collapsed():
    result = check(build(collapse=True))
    assert result.verdict is Verdict.WARN
    assert "collapse" in result.summary
    assert measurement(result, "share of mu varying between captions").value == 0.0


def test_without_total_steps_the_warmup_is_not_probed():
    result = check(build(total_steps=None))
    assert result.verdict is Verdict.PASS, result.summary
    assert "not probed" in measurement(result, "kl_weight warmup").value


def test_without_kl_the_formula_is_not_checked_but_the_rest_runs():
    result = check(build(outputs_drop=("kl",)))
    assert result.verdict is Verdict.PASS, result.summary
    assert "no 'kl'" in measurement(result, "kl formula").value
    assert measurement(result, "KL finite under the stress probe").verdict is Verdict.PASS


def test_a_plain_noise_source_skips_with_the_reason():
    result = check(build(outputs_drop=("mu", "logvar", "kl", "kl_weight")))
    assert result.verdict is Verdict.SKIP
    assert NOT_APPLICABLE in result.summary


def test_a_missing_logvar_skips_naming_it():
    result = check(build(outputs_drop=("logvar",)))
    assert result.verdict is Verdict.SKIP and "'logvar'" in result.summary


def test_the_check_leaves_no_hooks_behind():
    pipeline = build(bound=None)
    check(pipeline)
    modules = [m for module in pipeline.trainable_modules().values() for m in module.modules()]
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in modules)


def test_the_documentation_is_generated_from_the_check():
    from pathlib import Path

    from fmcheck.docs import check_markdown

    doc = Path(__file__).resolve().parent.parent / "docs" / "checks" / "kl.md"
    assert doc.read_text().strip() == check_markdown(KLCheck).strip()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_kl_computed_in_low_precision_still_matches_within_its_rounding(dtype):
    gen = torch.Generator().manual_seed(0)
    mus = [(0.05 * torch.randn(16, *LATENT, generator=gen)).to(dtype) for _ in range(2)]
    logvars = [(0.1 * torch.randn(16, *LATENT, generator=gen)).to(dtype) for _ in range(2)]
    user = [0.5 * (mu.pow(2) + lv.exp() - 1 - lv).mean() for mu, lv in zip(mus, logvars)]  # all in `dtype`
    elements = [km.kl_elements(mu, lv) for mu, lv in zip(mus, logvars)]
    strict = km.match_formula(user, elements)
    assert strict.reduction is None  # the float32 tolerance rejects the rounding
    eps = torch.finfo(dtype).eps
    loose = km.match_formula(user, elements, batch_rtols=[km.rounding_rtol(m, lv, eps) for m, lv in zip(mus, logvars)])
    assert loose.reduction == "mean over all elements" and loose.label == "correct"
    doubled = km.match_formula([2 * u for u in user], elements,
                               batch_rtols=[km.rounding_rtol(m, lv, eps) for m, lv in zip(mus, logvars)])
    assert doubled.label == "missing 1/2" or doubled.ambiguous
