"""The `structure` check: its pure helpers on synthetic tensors, then the check end to end on small synthetic
pipelines (one change each) and on the digits pipeline and its planted-bug fixtures."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from fmcheck.checks import _structure_math as sm
from fmcheck.checks.structure import StructureCheck, StructureThresholds
from fmcheck.config import Settings
from fmcheck.contract import coerce
from fmcheck.runner import run
from fmcheck.verdict import Verdict

LATENT, TEXT, BATCH = 16, 8, 32


# ----------------------------------------------------------------------------------------------- pure helpers
def test_derangement_moves_every_sample():
    for size in (2, 3, 7, 64):
        perm = sm.derangement(size, torch.Generator().manual_seed(size))
        assert sorted(perm.tolist()) == list(range(size))
        assert not (perm == torch.arange(size)).any()


def test_find_slot_by_identity_value_reshape_and_cast():
    xt = torch.randn(4, 2, 3)
    other = torch.randn(4, 2, 3)
    assert sm.find_slot((other, xt), {}, xt) == ("arg", 1)
    assert sm.find_slot((other,), {"x": xt.clone()}, xt) == ("kw", "x")
    assert sm.find_slot((xt.flatten(1),), {}, xt) == ("arg", 0)
    assert sm.find_slot((other, xt.half()), {}, xt) == ("arg", 1)
    assert sm.find_slot((other, xt + 0.1), {}, xt) is None


def test_find_time_slot_by_correlation_in_any_units():
    t = torch.rand(16)
    x = torch.randn(16, 4)
    noise_level = torch.rand(16)  # another per-sample scalar that is not t
    for received, slope in ((t, 1.0), (t * 1000, 1000.0), (1 - t, -1.0), ((t * 999).long(), 999.0),
                            (t.view(16, 1, 1, 1), 1.0), (t[:, None].expand(16, 5), 1.0)):
        slot, corr, _ = sm.find_time_slot((x, noise_level, received), {}, 16, t, exclude=("arg", 0))
        assert slot == ("arg", 2), received.shape
        assert abs(corr) > 0.99
        fitted, _ = sm.affine_fit(t, sm.per_sample_scalar(received, 16))
        assert fitted == pytest.approx(slope, rel=0.01)


def test_find_time_slot_without_step_t_needs_a_single_candidate():
    x, t = torch.randn(8, 4), torch.rand(8)
    assert sm.find_time_slot((x, t), {}, 8, None, exclude=("arg", 0))[0] == ("arg", 1)
    slot, _, how = sm.find_time_slot((x, t, torch.rand(8)), {}, 8, None, exclude=("arg", 0))
    assert slot is None and "2 per-sample scalar" in how
    slot, _, how = sm.find_time_slot((x, torch.rand(8)), {}, 8, t, exclude=("arg", 0))
    assert slot is None and "correlation" in how


def test_per_sample_scalar_shapes():
    assert sm.per_sample_scalar(torch.rand(5), 5).shape == (5,)
    assert sm.per_sample_scalar(torch.rand(5, 1, 1), 5).shape == (5,)
    assert sm.per_sample_scalar(torch.rand(5, 3), 5) is None  # varies within a sample: not a time
    assert sm.per_sample_scalar(torch.rand(4), 5) is None
    assert sm.per_sample_scalar(torch.tensor(0.5), 5) is None


def test_output_tensor_unwraps_common_return_types():
    v = torch.randn(3, 2)
    assert sm.output_tensor(v, 3) is v
    assert sm.output_tensor((torch.zeros(()), v), 3) is v
    assert sm.output_tensor({"sample": v, "other": torch.zeros(3)}, 3) is v
    assert sm.output_tensor(SimpleNamespace(sample=v), 3) is v
    assert sm.output_tensor("nothing", 3) is None


def test_relative_change_and_balance_states():
    base = torch.ones(4, 3)
    assert sm.relative_change(base * 1.1, base) == pytest.approx(0.1)
    assert sm.relative_change(torch.zeros(2), torch.zeros(2)) == 0.0
    assert sm.relative_change(torch.ones(2), torch.zeros(2)) == math.inf
    assert sm.balance(0.5, 1.0, 1e-6) == (0.5, "measured")
    assert sm.balance(0.0, 0.0, 1e-6) == (None, "both flat")
    assert sm.balance(0.3, 0.0, 1e-6) == (math.inf, "x flat")


# -------------------------------------------------------------------------------------- synthetic pipelines
class Velocity(nn.Module):
    """u(x_t, t, q): x_t and q through Linear layers, t through a sinusoidal embedding and an MLP (scale: t units)."""

    def __init__(self, time_scale: float = 1000.0, loudness: float = 1.0, uses_t: bool = True, dropout: float = 0.0):
        super().__init__()
        self.time_scale, self.loudness, self.uses_t = time_scale, loudness, uses_t
        self.register_buffer("freqs", torch.exp(-math.log(10_000.0) * torch.arange(16) / 16), persistent=False)
        self.time = nn.Sequential(nn.Linear(32, 64), nn.SiLU(), nn.Linear(64, 64))
        self.inp = nn.Linear(LATENT, 64)
        self.text = nn.Linear(TEXT, 64)
        self.body = nn.Sequential(nn.SiLU(), nn.Dropout(dropout), nn.Linear(64, 64), nn.SiLU(), nn.Linear(64, LATENT))

    def forward(self, xt, t, q):
        angles = (t.float().reshape(-1) * self.time_scale)[:, None] * self.freqs
        emb = self.time(torch.cat([angles.sin(), angles.cos()], dim=1)) * self.loudness
        h = self.inp(xt.float()) + self.text(q) + (emb if self.uses_t else 0)
        return self.body(h)


def synthetic(velocity: nn.Module = None, *, call=None, interpolate=None, frozen=None, extra_outputs=None,
              autocast=None, grad_scaler=None, declare_velocity=True, drop=()) -> dict:
    """A small correct pipeline; each keyword changes one thing."""
    torch.manual_seed(0)
    head = nn.Linear(TEXT, 2 * LATENT)
    velocity = velocity or Velocity()
    gen = torch.Generator().manual_seed(0)
    batches = [{"q": torch.randn(BATCH, TEXT, generator=gen), "x1": torch.randn(BATCH, LATENT, generator=gen)}
               for _ in range(2)]
    call = call or (lambda v, xt, t, q: v(xt, t, q))
    interpolate = interpolate or (lambda x0, x1, t: (1 - t[:, None]) * x0 + t[:, None] * x1)

    def forward(batch, step_index):
        mu, logvar = head(batch["q"]).chunk(2, dim=-1)
        x0 = mu + torch.exp(0.5 * logvar.clamp(-6, 6)) * torch.randn_like(mu)
        x1 = batch["x1"]
        t = torch.rand(BATCH)
        xt = interpolate(x0, x1, t)
        v_target = (x1 - x0).detach()
        v_pred = call(velocity, xt, t, batch["q"])
        fm_loss = ((v_pred.float() - v_target) ** 2).mean()
        out = {"loss": fm_loss, "x0": x0, "x1": x1, "t": t, "xt": xt, "v_target": v_target, "v_pred": v_pred,
               "fm_loss": fm_loss}
        out.update(extra_outputs or {})
        return {k: v for k, v in out.items() if k not in drop}

    def step(batch, step_index):
        if autocast is None:
            return forward(batch, step_index)
        with torch.autocast("cpu", dtype=autocast):
            return forward(batch, step_index)

    pipeline = {"step": step, "batches": batches, "trainable": {"head": head, "velocity": velocity},
                "optimizer": torch.optim.SGD([*head.parameters(), *velocity.parameters()], lr=1e-3)}
    if declare_velocity:
        pipeline["velocity"] = velocity
    if frozen is not None:
        pipeline["frozen"] = frozen
    if grad_scaler is not None:
        pipeline["grad_scaler"] = grad_scaler
    return pipeline


def structure(pipeline, **settings):
    report = run(coerce(pipeline), Settings(**settings), only=["structure"])
    return report.check("structure")


def measurement(result, name):
    return next(m for m in result.measurements if m.name == name)


def codes(result) -> list[str]:
    """The codes of the findings that count (not ignored), in the order the check declared them."""
    return [f.code for f in result.findings if not f.ignored]


def test_correct_synthetic_pipeline_passes_with_the_numbers():
    result = structure(synthetic())
    assert result.verdict is Verdict.PASS, result.summary
    ratio = measurement(result, "t / x_t sensitivity")
    assert 0.01 < ratio.value < 1
    t_change = measurement(result, "output change, t permuted").value
    x_change = measurement(result, "output change, x_t permuted").value
    assert ratio.value == pytest.approx(t_change / x_change, rel=1e-3)
    assert measurement(result, "t argument / step t").value == pytest.approx(1.0)
    assert result.details["velocity"] == "velocity"


def test_velocity_found_by_hooks_when_not_declared():
    result = structure(synthetic(declare_velocity=False))
    assert result.verdict is Verdict.PASS, result.summary
    assert result.details["velocity"] == "velocity"
    assert "hooks" in result.details["velocity_how"]


def test_velocity_inside_a_wrapper_module_is_found_as_the_outermost_receiver():
    velocity = Velocity()
    wrapper = nn.ModuleDict({"net": velocity})
    pipeline = synthetic(velocity, declare_velocity=False)
    pipeline["trainable"] = {"head": pipeline["trainable"]["head"], "model": wrapper}
    result = structure(pipeline)
    assert result.details["velocity"] == "model.net"
    assert measurement(result, "t / x_t sensitivity").verdict is Verdict.PASS


def test_keyword_arguments_and_timestep_units():
    """x_t and t passed by keyword, t as integer timesteps 0..999 into an embedding table."""

    class TableVelocity(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = nn.Embedding(1000, 64)
            nn.init.normal_(self.table.weight, std=0.1)  # nn.Embedding's default N(0, 1) would dominate x_t
            self.inp, self.out = nn.Linear(LATENT, 64), nn.Linear(64, LATENT)

        def forward(self, *, sample, timestep, q):
            return self.out(torch.tanh(self.inp(sample) + self.table(timestep)))

    call = lambda v, xt, t, q: v(sample=xt, timestep=(t * 999).long(), q=q)  # noqa: E731
    result = structure(synthetic(TableVelocity(), call=call))
    assert measurement(result, "t argument / step t").value == pytest.approx(999, rel=0.01)
    assert "keyword 'timestep'" in measurement(result, "t argument / step t").note
    assert measurement(result, "t / x_t sensitivity").verdict is Verdict.PASS, result.summary


def test_loud_time_embedding_warns_time_dominates():
    result = structure(synthetic(Velocity(loudness=100.0)))
    assert result.verdict is Verdict.WARN
    ratio = measurement(result, "t / x_t sensitivity")
    assert ratio.verdict is Verdict.WARN and ratio.value > 1
    assert "time dominates" in result.summary
    assert codes(result) == ["structure.time_embedding_loud"]
    assert "LayerNorm" in result.hint


def test_time_in_the_wrong_units_lowers_the_balance():
    """t in [0, 1] into an embedding built for timesteps in [0, 1000]: the sin/cos features barely move. How far the
    ratio falls depends on the architecture (the digits fixture falls below the threshold, see below); here it falls
    about 10x, and the received t range shows the units."""
    correct = measurement(structure(synthetic()), "t / x_t sensitivity").value
    result = structure(synthetic(Velocity(time_scale=1.0)))
    ratio = measurement(result, "t / x_t sensitivity").value
    assert ratio < correct / 5
    strict = structure(synthetic(Velocity(time_scale=1.0)), thresholds={"structure": {"time_ignored_ratio": 0.05}})
    assert "time ignored" in strict.summary and "range" in strict.summary
    assert codes(strict) == ["structure.time_ignored"]


def test_net_that_drops_t_warns_time_ignored():
    result = structure(synthetic(Velocity(uses_t=False)))
    ratio = measurement(result, "t / x_t sensitivity")
    assert ratio.value == 0 and ratio.verdict is Verdict.WARN
    assert "time ignored" in result.summary
    assert codes(result) == ["structure.time_blind"]


def test_a_zero_initialised_output_layer_is_measured_at_the_last_hidden_activation():
    velocity = Velocity()
    nn.init.zeros_(velocity.body[-1].weight)
    nn.init.zeros_(velocity.body[-1].bias)
    result = structure(synthetic(velocity))
    ratio = measurement(result, "t / x_t sensitivity")
    assert ratio.verdict is Verdict.PASS and 0.01 < ratio.value < 1, result.summary
    assert "last hidden activation" in measurement(result, "balance measured at").value
    assert "body.4" in result.details["balance"]["where"]
    # ... where the bugs it hid show again: t divided by 1000 on the way in
    blind = Velocity(time_scale=1e-3)
    nn.init.zeros_(blind.body[-1].weight)
    nn.init.zeros_(blind.body[-1].bias)
    result = structure(synthetic(blind))
    assert measurement(result, "t / x_t sensitivity").verdict is Verdict.WARN
    assert "time ignored" in result.summary


def test_a_net_that_moves_with_nothing_is_not_a_pass():
    class Constant(nn.Module):
        def __init__(self):
            super().__init__()
            self.bias = nn.Parameter(torch.zeros(LATENT))

        def forward(self, xt, t, q):
            return self.bias.expand(xt.shape[0], LATENT) + 0 * xt

    result = structure(synthetic(Constant()))
    ratio = measurement(result, "t / x_t sensitivity")
    assert ratio.verdict is Verdict.WARN and "neither" in ratio.unit
    assert codes(result) == ["structure.inputs_ignored"]
    assert result.verdict is Verdict.WARN


def test_dropout_in_the_velocity_net_does_not_blur_the_balance():
    """The same RNG state before every probe call: with dropout active the unpermuted calls agree exactly."""
    result = structure(synthetic(Velocity(dropout=0.5)))
    assert result.details["balance"]["noise"] == 0
    assert measurement(result, "t / x_t sensitivity").verdict is Verdict.PASS


def test_balance_not_measured_names_what_is_missing():
    result = structure(synthetic(declare_velocity=False, drop=("xt",)))
    ratio = measurement(result, "t / x_t sensitivity")
    assert ratio.verdict is Verdict.WARN  # a probe that did not measure is never a PASS
    assert result.verdict is Verdict.WARN and "declare the pipeline field 'velocity'" in result.hint
    assert "'xt'" in ratio.unit and "'velocity'" in ratio.unit
    assert "not measured" in result.summary
    assert "structure.balance_not_measured" in codes(result)

    constant = lambda v, xt, t, q: v(xt, torch.zeros_like(t), q)  # noqa: E731  (t replaced by a constant)
    result = structure(synthetic(call=constant))
    assert "cannot tell which argument is t" in measurement(result, "t / x_t sensitivity").unit


def test_fp16_autocast_without_scaler_warns_and_bf16_or_a_scaler_does_not():
    result = structure(synthetic(autocast=torch.float16))
    fp16 = measurement(result, "fp16 without loss scaling")
    assert fp16.verdict is Verdict.WARN and "autocast float16" in fp16.value and fp16.value.startswith("yes: ")
    assert "GradScaler" in result.hint

    scaled = structure(synthetic(autocast=torch.float16, grad_scaler=torch.amp.GradScaler("cpu")))
    assert measurement(scaled, "fp16 without loss scaling").verdict is Verdict.PASS

    disabled = structure(synthetic(autocast=torch.float16, grad_scaler=torch.amp.GradScaler("cpu", enabled=False)))
    assert measurement(disabled, "fp16 without loss scaling").verdict is Verdict.WARN

    bf16 = structure(synthetic(autocast=torch.bfloat16))
    assert measurement(bf16, "fp16 without loss scaling").verdict is Verdict.PASS
    assert measurement(bf16, "fp16 without loss scaling").value.startswith("no: ")
    assert bf16.verdict is Verdict.PASS, bf16.summary


def test_xt_in_half_precision_is_left_to_the_target_check():
    # one owner per cause: x_t built in half precision is `target.xt_half_precision`; structure says nothing of it
    half = lambda x0, x1, t: (1 - t[:, None].half()) * x0.half() + t[:, None].half() * x1.half()  # noqa: E731
    result = structure(synthetic(interpolate=half))
    assert not any(m.name == "x_t precision" for m in result.measurements)
    assert codes(result) == [], result.summary
    # the velocity net receives the half x_t (cast inside its forward): still found by value
    assert measurement(result, "t / x_t sensitivity").verdict is Verdict.PASS


def test_non_finite_output_fails_naming_the_key():
    result = structure(synthetic(extra_outputs={"kl": torch.tensor(float("inf")), "mu": torch.zeros(BATCH, 2)}))
    assert result.verdict is Verdict.FAIL
    assert "'kl'" in result.summary
    assert codes(result) == ["structure.non_finite"]
    assert measurement(result, "non-finite step outputs").verdict is Verdict.FAIL


def _encoder(train: bool, grad: bool) -> nn.Module:
    torch.manual_seed(1)
    module = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1), nn.BatchNorm1d(4))
    module.train(train)
    module.requires_grad_(grad)
    return module


def test_frozen_module_modes():
    quiet = structure(synthetic(frozen={"text_encoder": _encoder(False, False)}))
    assert quiet.verdict is Verdict.PASS, quiet.summary
    assert "1 frozen module in eval" in quiet.summary  # one module, singular

    training = structure(synthetic(frozen={"text_encoder": _encoder(True, False)}))
    assert measurement(training, "frozen modules in train mode").value == "text_encoder"
    assert measurement(training, "frozen modules in train mode").verdict is None  # reported, judged below
    active = measurement(training, "mode-dependent layers active in frozen modules")
    assert active.value == "text_encoder: 1 batch-norm, 1 dropout" or active.value == "text_encoder: 1 dropout, 1 batch-norm"
    assert training.verdict is Verdict.WARN and "'text_encoder' in train mode" in training.summary
    assert codes(training) == ["structure.frozen_train_mode"]

    encoder = _encoder(False, False)
    encoder[1].train()  # dropout active under an eval parent
    partial = structure(synthetic(frozen={"text_encoder": encoder}))
    assert measurement(partial, "frozen modules in train mode").value == "none"
    assert measurement(partial, "mode-dependent layers active in frozen modules").verdict is Verdict.WARN
    assert "'text_encoder' in eval with submodules in train mode" in partial.summary
    assert codes(partial) == ["structure.frozen_train_mode"]

    grad = structure(synthetic(frozen={"text_encoder": _encoder(False, True)}))
    flagged = measurement(grad, "frozen parameters with requires_grad")
    assert flagged.verdict is Verdict.WARN and flagged.value == 4  # two weights, two biases
    assert "0.weight" in grad.summary and codes(grad) == ["structure.frozen_requires_grad"]


class _Vae(nn.Module):
    """A frozen module given as the pipeline field 'vae' (encode/decode), not listed in 'frozen'."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1))

    def encode(self, x):
        return self.net(x)

    def decode(self, z):
        return z


def test_the_vae_is_a_frozen_module_like_the_declared_ones():
    vae = _Vae().train()
    vae.requires_grad_(True)
    pipeline = {**synthetic(frozen={"text_encoder": _encoder(False, False)}), "vae": vae}
    result = structure(pipeline)
    assert codes(result) == ["structure.frozen_train_mode", "structure.frozen_requires_grad"]
    assert "frozen module 'vae' in train mode" in result.summary
    assert measurement(result, "frozen parameters with requires_grad").value == 2
    assert "2 frozen modules" not in result.summary  # not a pass


def test_frozen_parameters_in_the_optimizer_fail_and_shared_ones_do_not_count():
    vae = _Vae().eval().requires_grad_(False)
    pipeline = {**synthetic(), "vae": vae}
    trainable = [p for module in pipeline["trainable"].values() for p in module.parameters()]
    pipeline["optimizer"] = torch.optim.AdamW([*trainable, *vae.parameters()], lr=1e-3)
    # none of them requires grad: the optimizer skips them, so nothing moves yet (a WARN)
    result = structure(pipeline)
    assert result.verdict is Verdict.WARN and codes(result) == ["structure.frozen_in_optimizer"]
    vae.requires_grad_(True)  # now the optimizer updates the VAE: a FAIL (and requires_grad is its own finding)
    result = structure(pipeline)
    assert result.verdict is Verdict.FAIL
    assert codes(result) == ["structure.frozen_requires_grad", "structure.frozen_in_optimizer"]
    vae.requires_grad_(False)
    result = structure(pipeline)
    assert measurement(result, "frozen parameters in the optimizer").value == 20  # 4x4 weight and 4 biases
    finding = result.findings[0]
    assert finding.observed == 20 and finding.bound == "0" and "'vae'" in finding.message

    # a frozen module that shares a trainable module's parameters (a tied embedding) is trained on purpose there
    shared = synthetic()
    shared["frozen"] = {"tied": shared["trainable"]["head"]}
    result = structure(shared)
    assert result.verdict is Verdict.PASS, result.summary
    assert measurement(result, "frozen parameters in the optimizer").value == 0
    assert measurement(result, "frozen parameters with requires_grad").value == 0


def test_a_frozen_module_in_train_mode_without_mode_dependent_layers_is_not_a_warning():
    # Linear, LayerNorm, GroupNorm, a dropout of p = 0 and an InstanceNorm without running statistics compute the
    # same in both modes: a frozen text encoder like this left in train mode is harmless.
    torch.manual_seed(1)
    encoder = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Dropout(0.0), nn.GroupNorm(2, 4), nn.Linear(4, 4))
    encoder.train().requires_grad_(False)
    result = structure(synthetic(frozen={"text_encoder": encoder}))
    assert result.verdict is Verdict.PASS, result.summary
    assert measurement(result, "frozen modules in train mode").value == "text_encoder"
    assert measurement(result, "mode-dependent layers active in frozen modules").value == "none"
    assert "text_encoder in train mode without mode-dependent layers (harmless)" in result.summary


@pytest.mark.parametrize("layer, kind", [(lambda: nn.Dropout(0.1), "dropout"),
                                         (lambda: nn.BatchNorm1d(4), "batch-norm"),
                                         (lambda: nn.InstanceNorm1d(4, track_running_stats=True), "batch-norm"),
                                         (lambda: _AttentionWithDropoutProbability(0.1), "dropout")])
def test_a_frozen_module_in_train_mode_with_a_mode_dependent_layer_warns(layer, kind):
    torch.manual_seed(1)
    encoder = nn.Sequential(nn.Linear(4, 4), layer())
    encoder.train().requires_grad_(False)
    result = structure(synthetic(frozen={"text_encoder": encoder}))
    assert result.verdict is Verdict.WARN, result.summary
    assert measurement(result, "mode-dependent layers active in frozen modules").value == f"text_encoder: 1 {kind}"
    assert "'text_encoder' in train mode" in result.summary


class _AttentionWithDropoutProbability(nn.Module):
    """An attention layer that keeps its dropout as a float and applies it only in training (Hugging Face CLIP)."""

    def __init__(self, attention_dropout: float):
        super().__init__()
        self.attention_dropout = attention_dropout

    def forward(self, x):
        return nn.functional.dropout(x, self.attention_dropout if self.training else 0.0)


def test_step_that_switches_a_frozen_module_to_train_mode_warns():
    encoder = _encoder(False, False)
    pipeline = synthetic(frozen={"text_encoder": encoder})
    inner = pipeline["step"]

    def step(batch, step_index):
        encoder.train()  # e.g. a model.train() inside the training step
        return inner(batch, step_index)

    pipeline["step"] = step
    result = structure(pipeline)
    assert "switched by the step" in result.summary
    assert not encoder.training  # restored by the runner


def test_no_hooks_left_and_state_untouched():
    pipeline = synthetic(Velocity(dropout=0.2), declare_velocity=False)
    modules = [m for module in pipeline["trainable"].values() for m in module.modules()]
    before = {k: v.clone() for k, v in pipeline["trainable"]["velocity"].state_dict().items()}
    structure(pipeline)
    assert all(not m._forward_pre_hooks for m in modules)
    after = pipeline["trainable"]["velocity"].state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_thresholds_are_configurable():
    strict = structure(synthetic(), thresholds={"structure": {"time_dominates_ratio": 0.001}})
    assert "time dominates" in strict.summary
    assert StructureThresholds().time_ignored_ratio < StructureThresholds().time_dominates_ratio


def test_check_doc_and_registration():
    from fmcheck.docs import check_markdown
    from fmcheck.registry import discover

    assert discover().get("structure") is StructureCheck
    text = check_markdown(StructureCheck)
    for name in StructureThresholds.model_fields:
        assert name in text


# --------------------------------------------------------------------------------------- digits and fixtures
@pytest.fixture(scope="module")
def digits_results():
    """One structure run per digits variant (one batch of measurement each to keep the suite fast). The fp16 and
    train-mode fixtures are asserted by the detection matrix; their mechanics are tested on synthetic pipelines
    above."""
    import importlib

    results = {}
    for name in ("fixtures.digits", "fixtures.bugs.time_embedding_loud", "fixtures.bugs.time_units_wrong"):
        pipeline = importlib.import_module(name).build()
        results[name.rsplit(".", 1)[-1]] = structure(pipeline, measure_batches=1)
    return results


def test_digits_is_quiet_with_margin(digits_results):
    result = digits_results["digits"]
    assert result.verdict is Verdict.PASS, result.summary
    ratio = measurement(result, "t / x_t sensitivity").value
    th = StructureThresholds()
    # the defaults sit at least 3x away from the reference network's balance on both sides
    assert th.time_ignored_ratio * 3 < ratio < th.time_dominates_ratio / 3


def test_digits_fixtures_fire_for_their_reason(digits_results):
    loud = digits_results["time_embedding_loud"]
    assert loud.verdict is Verdict.WARN and "time dominates" in loud.summary
    assert codes(loud) == ["structure.time_embedding_loud"]
    units = digits_results["time_units_wrong"]
    assert units.verdict is Verdict.WARN and "time ignored" in units.summary
    assert codes(units) == ["structure.time_ignored"]
    assert measurement(units, "t argument / step t").value == pytest.approx(1e-3)


def test_packed_latents_are_matched_to_x_t_and_a_timestep_bug_behind_them_shows():
    """Flux-style: the step packs x_t (B, C, H, W) into tokens (B, HW/4, 4C) before the transformer and unpacks its
    output; the adapter returns the unpacked tensors."""
    channels, side = 1, 4
    latent = channels * side * side

    def pack(x):
        b = x.shape[0]
        return x.view(b, channels, side // 2, 2, side // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, 4 * channels)

    def unpack(tokens):
        b = tokens.shape[0]
        return tokens.view(b, side // 2, side // 2, channels, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, latent)

    class Tokens(nn.Module):
        def __init__(self, time_scale=1.0):
            super().__init__()
            self.inner = Velocity(time_scale=time_scale)

        def forward(self, tokens, t, q):
            return pack(self.inner(unpack(tokens), t, q).view(-1, channels, side, side))

    assert latent == LATENT
    for scale, verdict in ((1.0, Verdict.PASS), (1e-3, Verdict.WARN)):
        net = Tokens(scale)
        call = lambda v, xt, t, q: unpack(v(pack(xt.view(-1, channels, side, side)), t, q))  # noqa: E731
        result = structure(synthetic(net, call=call))
        ratio = measurement(result, "t / x_t sensitivity")
        assert ratio.verdict is verdict, result.summary
        assert any("packed" in note for note in result.details["notes"])


class ZeroBlockVelocity(Velocity):
    """t enters only through a zero-initialised residual branch (torchcfm's UNet, DiT's adaLN-zero): at init the
    output, and every activation after the branch, is exactly blind to t."""

    def __init__(self, time_scale: float = 1000.0):
        super().__init__(time_scale=time_scale)
        self.gate = nn.Linear(64, 64)
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)

    def forward(self, xt, t, q):
        angles = (t.float().reshape(-1) * self.time_scale)[:, None] * self.freqs
        emb = self.time(torch.cat([angles.sin(), angles.cos()], dim=1))
        h = self.inp(xt.float()) + self.text(q)
        h = h + self.gate(nn.functional.silu(h + emb))
        return self.body(h)


def test_a_net_blind_to_t_at_init_is_judged_at_its_time_features():
    result = structure(synthetic(ZeroBlockVelocity()))
    assert result.verdict is Verdict.PASS, result.summary
    ratio = measurement(result, "t / x_t sensitivity")
    assert ratio.value == 0 and "judged at the time features" in ratio.expected
    features = measurement(result, "time features across the batch")
    assert features.value > 0.1 and "time.0" in features.note
    # the units bug such a net hides: t divided by 1000 once too often leaves its time features flat
    result = structure(synthetic(ZeroBlockVelocity(time_scale=1.0 / 1000)))
    assert result.verdict is Verdict.WARN
    assert "time features at time.0 barely vary" in result.summary
    assert codes(result) == ["structure.time_units"]
    assert measurement(result, "time features across the batch").value < 0.01


def test_a_net_that_drops_t_after_embedding_it_is_not_excused_by_its_time_features():
    result = structure(synthetic(Velocity(uses_t=False)))
    assert result.verdict is Verdict.WARN
    assert "changes nothing" in result.summary and "t is dropped" in result.summary
    assert codes(result) == ["structure.time_blind"]
    features = result.details["balance"]["features"]
    assert features["module"] == "time.0" and features["mixes"] is None  # embedded, but never meets x_t


def test_roughness_tells_smooth_time_features_from_aliased_ones():
    t = torch.rand(32, generator=torch.Generator().manual_seed(0))
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(64) / 64)

    def features(scale):
        angles = t[:, None] * scale * freqs
        return torch.cat([angles.sin(), angles.cos()], 1)

    assert sm.smoothest_roughness(features(1000.0), t) < 0.05  # timesteps into a DDPM embedding: resolved
    assert sm.smoothest_roughness(features(1e6), t) > 0.25  # x 1000 again: every feature aliases
    assert sm.smoothest_roughness(features(1000.0), t[:1].expand(32)) is None  # one t: nothing to judge


def test_t_too_large_for_its_embedding_warns_that_it_aliases():
    result = structure(synthetic(Velocity(time_scale=1e6)))
    assert result.verdict is Verdict.WARN, result.summary
    assert "the time embedding aliases t" in result.summary
    assert "structure.time_features_aliased" in codes(result)
    assert measurement(result, "time features follow t smoothly").verdict is Verdict.WARN
    assert measurement(structure(synthetic()), "time features follow t smoothly").verdict is Verdict.PASS


def test_a_step_without_xt_uses_the_argument_shaped_like_the_output_of_a_declared_velocity_net():
    result = structure(synthetic(drop=("xt",)))
    assert measurement(result, "t / x_t sensitivity").verdict is Verdict.PASS, result.summary
    assert any("x_t taken as the velocity net's argument 0" in note for note in result.details["notes"])
