"""The reference digits pipeline (fixtures/digits): the contract it offers, that it really trains, and that its
VAE's scaling factor and round trip are right. Everything is seeded."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `fixtures` lives at the repository root, next to `tests`
    sys.path.insert(0, str(ROOT))

from fixtures.digits import DigitsPipeline, build  # noqa: E402
from fixtures.digits.data import load_split  # noqa: E402
from fixtures.digits.pipeline import load_vae  # noqa: E402

PIPELINE_KEYS = {
    "step", "batches", "trainable", "optimizer", "frozen", "vae", "encode", "decode", "pixels", "total_steps",
    "velocity",
}
LATENT_TENSORS = ("x0", "x1", "xt", "v_target", "v_pred", "mu", "logvar", "eps")


@pytest.fixture(scope="module")
def pipeline() -> DigitsPipeline:
    return DigitsPipeline(seed=0)


@pytest.fixture(scope="module")
def first_batch(pipeline) -> dict:
    return next(iter(pipeline.batches))


def psnr(reference: torch.Tensor, reconstruction: torch.Tensor) -> float:
    mse = torch.mean((reconstruction.clamp(-1, 1) - reference) ** 2).item()
    return 10 * math.log10(4.0 / mse)  # pixels in [-1, 1]: peak-to-peak 2


def test_build_returns_the_contract_dict():
    built = build()
    assert set(built) == PIPELINE_KEYS
    assert set(built["trainable"]) == {"head", "velocity"}
    assert set(built["frozen"]) == {"vae", "text_encoder"}
    assert built["velocity"] is built["trainable"]["velocity"]
    assert built["vae"] is built["frozen"]["vae"]
    for module in built["frozen"].values():
        assert not module.training
        assert not any(parameter.requires_grad for parameter in module.parameters())
    trainable_ids = {id(p) for module in built["trainable"].values() for p in module.parameters()}
    optimized_ids = {id(p) for group in built["optimizer"].param_groups for p in group["params"]}
    assert optimized_ids == trainable_ids
    assert 0.5e6 <= sum(p.numel() for m in built["trainable"].values() for p in m.parameters()) <= 2e6


def test_batches_are_reiterable_and_seeded(pipeline):
    first, again = next(iter(pipeline.batches)), next(iter(pipeline.batches))
    assert first["pixels"].shape == (64, 1, 32, 32) and first["pixels"].dtype == torch.float32
    assert first["label"].shape == (64,) and first["label"].dtype == torch.long
    assert len(first["caption"]) == 64 and all(isinstance(caption, str) for caption in first["caption"])
    assert torch.equal(first["pixels"], again["pixels"]) and first["caption"] == again["caption"]
    assert -1.0 <= first["pixels"].min() and first["pixels"].max() <= 1.0


def test_step_outputs_have_the_documented_keys_and_shapes(pipeline, first_batch):
    torch.manual_seed(0)
    out = pipeline.step(first_batch, 0)
    assert set(out) == {"loss", "t", "kl", "kl_weight", "fm_loss", *LATENT_TENSORS}
    for key in LATENT_TENSORS:
        assert out[key].shape == (64, 4, 8, 8), key
    assert out["t"].shape == (64,) and 0.0 <= out["t"].min() and out["t"].max() <= 1.0
    assert out["loss"].dim() == 0 and out["loss"].requires_grad
    assert out["fm_loss"].dim() == 0 and out["kl"].dim() == 0
    assert isinstance(out["kl_weight"], float) and out["kl_weight"] == 0.0  # warmup starts at zero
    assert not out["v_target"].requires_grad  # detached target
    assert out["x0"].requires_grad  # the reparameterised source keeps its path to the head
    assert -6.0 <= out["logvar"].min() and out["logvar"].max() <= 6.0
    assert torch.allclose(out["loss"], out["fm_loss"] + out["kl_weight"] * out["kl"])
    expected_xt = (1 - out["t"].view(-1, 1, 1, 1)) * out["x0"] + out["t"].view(-1, 1, 1, 1) * out["x1"]
    assert torch.allclose(out["xt"], expected_xt, atol=1e-6)
    assert torch.allclose(out["v_target"], out["x1"] - out["x0"], atol=1e-6)
    analytic_kl = 0.5 * (out["mu"] ** 2 + out["logvar"].exp() - 1 - out["logvar"]).mean()
    assert torch.allclose(out["kl"], analytic_kl)


def test_kl_weight_warms_up_over_the_first_tenth(pipeline):
    weights = [pipeline.kl_weight(int(fraction * pipeline.total_steps)) for fraction in (0, 0.05, 0.1, 0.5)]
    assert weights == pytest.approx([0.0, pipeline.kl_weight_target / 2, pipeline.kl_weight_target,
                                     pipeline.kl_weight_target])


def test_same_seed_same_weights_and_the_callers_rng_is_untouched():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first, second = DigitsPipeline(seed=0), DigitsPipeline(seed=0)
    assert torch.equal(torch.rand(3), expected_next)
    for a, b in zip(first.velocity.parameters(), second.velocity.parameters()):
        assert torch.equal(a, b)
    assert not torch.equal(next(DigitsPipeline(seed=1).head.parameters()), next(first.head.parameters()))


def test_a_subclass_changes_one_method(first_batch):
    class FlippedTarget(DigitsPipeline):
        def target(self, x0, x1):
            return (x0 - x1).detach()

    torch.manual_seed(0)
    out = FlippedTarget.build()["step"](first_batch, 0)
    assert torch.allclose(out["v_target"], out["x0"] - out["x1"], atol=1e-6)


def test_short_training_run_lowers_the_fm_loss():
    torch.manual_seed(0)
    trainer = DigitsPipeline(seed=0, total_steps=2000)
    losses = []
    step = 0
    while step < 200:
        for batch in trainer.batches:
            if step == 200:
                break
            out = trainer.step(batch, step)
            trainer.optimizer.zero_grad(set_to_none=True)
            out["loss"].backward()
            trainer.optimizer.step()
            losses.append(out["fm_loss"].item())
            step += 1
    initial, final = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert math.isfinite(final)
    assert final < 0.6 * initial, (initial, final)


def test_scaling_factor_is_one_over_the_latent_std():
    vae = load_vae()
    pixels = load_split("train")[0][:384]
    with torch.no_grad():
        raw = vae.encode(pixels).latent_dist.sample(generator=torch.Generator().manual_seed(0))
    measured = 1.0 / raw.std().item()
    configured = vae.config.scaling_factor
    assert abs(configured - measured) / measured < 0.10, (configured, measured)
    assert 0.1 < configured < 0.4  # far from 1, so applying it twice or not at all shows
    assert vae.config.shift_factor is None


def test_encode_scales_once_and_decode_inverts_it(pipeline):
    pixels = load_split("test")[0][:128]
    torch.manual_seed(0)
    z1 = pipeline.encode(pixels)
    assert z1.shape == (128, 4, 8, 8)
    assert 0.8 < z1.std().item() < 1.25  # scaled latents are in unit-variance units
    assert not torch.equal(z1, pipeline.encode(pixels))  # a posterior sample, not the mean
    assert psnr(pixels, pipeline.decode(z1)) > 25.0
