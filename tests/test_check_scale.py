"""The `scale` check and `fmcheck scale --vae`: the maths on synthetic numbers, the check end to end on small
random-weight AutoencoderKLs of each config kind (scaling_factor only; shift_factor; per-channel latents_mean/std),
the digits fixtures' diagnoses, and the standalone command."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from conftest import run_cli
from fmcheck.checks.scale import ScaleCheck
from fmcheck.checks.scale import maths as sm
from fmcheck.checks.scale import tensors
from fmcheck.checks.scale.recorder import VaeRecorder
from fmcheck.config import Settings
from fmcheck.contract import coerce
from fmcheck.errors import UsageError
from fmcheck.runner import run
from fmcheck.verdict import Verdict

KINDS = ("scale", "shift", "channel")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny convolutions: one intra-op thread is as fast, and far faster on a shared, oversubscribed CPU.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------------- maths


def _cfg(kind: str, channels: int = 4) -> sm.Configured:
    config = {
        "scale": {"scaling_factor": 0.18215},
        "shift": {"scaling_factor": 1.5305, "shift_factor": 0.0609},  # SD3's values
        "channel": {"scaling_factor": 1.0, "latents_mean": [-0.5, 0.2, 1.0, 0.1][:channels],
                    "latents_std": [2.0, 2.5, 1.5, 3.0][:channels]},
        "unit": {"scaling_factor": 0.995},
    }[kind]
    return sm.Configured.from_config(config, channels)


def test_configured_maps_follow_diffusers_conventions():
    sd = _cfg("scale").map()
    assert sd.slope == (0.18215,) * 4 and sd.offset == (0.0,) * 4
    sd3 = _cfg("shift").map()
    assert sd3.slope[0] == pytest.approx(1.5305) and sd3.offset[0] == pytest.approx(-0.0609 * 1.5305)
    per = _cfg("channel").map()
    assert per.slope == pytest.approx((0.5, 0.4, 1 / 1.5, 1 / 3.0))
    assert per.offset == pytest.approx((0.25, -0.08, -1 / 1.5, -0.1 / 3.0))
    # z = map(x) inverts exactly
    x = 3.7
    for fmap in (sd, sd3, per):
        back = fmap.inverse().after(fmap)
        assert [k * x + m for k, m in zip(back.slope, back.offset)] == pytest.approx([x] * 4)


def test_malformed_config_values_are_ignored_with_a_note():
    cfg = sm.Configured.from_config({"scaling_factor": 0.5, "latents_mean": [0.0, 1.0], "latents_std": [1.0, 1.0]}, 4)
    assert not cfg.per_channel and any("2 values for 4 latent channels" in n for n in cfg.notes)
    cfg = sm.Configured.from_config({"scaling_factor": "x", "latents_mean": [0.0] * 4}, 4)
    assert cfg.scaling_factor is None and not cfg.per_channel and len(cfg.notes) == 2


def test_map_distance_is_the_rms_of_the_difference():
    inputs = sm.Moments((1.0, -2.0), (4.0, 9.0))
    a = sm.ChannelMap((2.0, 1.0), (0.0, 1.0))
    b = sm.ChannelMap((1.0, 1.0), (0.0, 0.0))
    # channel 0: (a-b)(x) = x: E[x^2] = 4 + 1; channel 1: 1: E = 1
    assert sm.map_distance(a, b, inputs, 1.0) == pytest.approx(math.sqrt((5 + 1) / 2))
    assert sm.map_distance(a, a, inputs, 1.0) == 0


@pytest.mark.parametrize("kind", KINDS)
def test_every_named_convention_is_identified_by_name(kind):
    cfg = _cfg(kind)
    once = cfg.map()
    # raw latents for which the config is right: the configured transform maps them to ~unit latents
    raw = sm.Moments((0.1, -0.2, 0.3, 0.0), (1.0, 0.8, 1.2, 1.0)).mapped(once.inverse())
    norm = raw.mapped(once).rms()
    candidates = sm.encode_candidates(cfg)
    keys = [c.key for c in candidates]
    assert keys[:4] == ["once", "missing", "twice", "inverted"]
    if kind != "scale":
        assert "shift_missing" in keys
    if kind == "channel":
        assert "std_ignored" in keys
    for candidate in candidates:
        ident = sm.identify(candidates, lambda m: sm.map_distance(candidate.map, m, raw, norm),
                            lambda m: sm.map_distance(m, once, raw, norm), 0.01)
        assert ident.best == candidate.key
        assert ident.matches_correct == candidate.correct
        assert ident.matches_other == (not candidate.correct)
        assert not ident.indistinguishable


def test_a_factor_near_one_is_a_reported_blind_spot():
    cfg = _cfg("unit")
    once = cfg.map()
    raw = sm.Moments((0.0,) * 4, (1.0,) * 4)
    candidates = sm.encode_candidates(cfg)
    missing = next(c for c in candidates if c.key == "missing")
    ident = sm.identify(candidates, lambda m: sm.map_distance(missing.map, m, raw, 1.0),
                        lambda m: sm.map_distance(m, once, raw, 1.0), 0.01)
    assert {k for k, _ in ident.indistinguishable} == {"missing", "twice", "inverted"}
    assert ident.matches_correct  # the raw latent passes: its scale is, in fact, fine


def test_affine_fit_recovers_slopes_and_offsets_per_channel():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 5, 5, generator=gen) * torch.tensor([1.0, 2.0, 5.0]).view(1, 3, 1, 1)
    slope, offset = torch.tensor([0.5, -2.0, 0.1]), torch.tensor([0.0, 1.0, -0.3])
    y = x * slope.view(1, 3, 1, 1) + offset.view(1, 3, 1, 1)
    fit = tensors.fit(x, y, 3)
    assert fit.per_channel.slope == pytest.approx(slope.tolist(), abs=1e-6)
    assert fit.per_channel.offset == pytest.approx(offset.tolist(), abs=1e-6)
    assert fit.unexplained() < 1e-10
    noisy = tensors.fit(x, y + 0.5 * torch.randn(y.shape, generator=gen), 3)
    assert noisy.per_channel.slope == pytest.approx(slope.tolist(), abs=0.05)
    assert noisy.unexplained() > 0.01 and noisy.map_standard_error() > 0


def test_recommendation_and_psnr():
    moments = sm.Moments((-1.0, 1.0), (4.0, 4.0))  # overall mean 0, overall var 4 + 1
    rec = sm.recommend(moments, images=10)
    assert rec.scaling_factor == pytest.approx(1 / math.sqrt(5))
    assert rec.shift_factor is None and rec.per_channel_advised  # channel means 1 std apart
    assert '"latents_mean": [-1, 1]' in rec.snippet()
    shifted = sm.recommend(sm.Moments((3.0, 3.0), (1.0, 1.0)), images=10)
    assert shifted.shift_factor == pytest.approx(3.0) and not shifted.per_channel_advised
    x = torch.zeros(2, 1, 4, 4)
    x[0] = 1.0
    assert tensors.psnr(x, x + 0.1) == pytest.approx(20.0)  # peak 1, mse 0.01


# ----------------------------------------------------------------------------------------- synthetic pipelines


def tiny_vae(kind: str, data: torch.Tensor, trained_like: bool = True, seed: int = 0):
    """A random-weight AutoencoderKL, configured as a user of each kind would: factors derived from its latents.

    ``trained_like`` rescales the quant_conv so that the latents look like a trained VAE's (std ~5 as SD's, whose
    1/std is 0.18215; small posterior sigma; channels with different means); without it the default init gives a
    posterior sigma ~1 that dominates the latent, and a factor near 1.
    """
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=8, sample_size=16).eval().requires_grad_(False)
    if trained_like:
        with torch.no_grad():
            conv = vae.quant_conv
            conv.weight[:4] *= 20.0
            conv.bias[:4] += torch.tensor([-6.0, 2.0, 8.0, -3.0])
            conv.weight[4:] *= 0.1
            conv.bias[4:] = -5.0
    with torch.no_grad():
        samples = vae.encode(data).latent_dist.sample(generator=torch.Generator().manual_seed(1))
    if kind == "scale":
        vae.register_to_config(scaling_factor=float(1 / samples.std()))
    elif kind == "shift":
        vae.register_to_config(scaling_factor=float(1 / samples.std()), shift_factor=float(samples.mean()))
    else:
        vae.register_to_config(scaling_factor=1.0, latents_mean=samples.mean((0, 2, 3)).tolist(),
                               latents_std=samples.std((0, 2, 3)).tolist())
    return vae


def images(n: int = 32, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=gen)
    return torch.nn.functional.interpolate(coarse, size=(16, 16), mode="bilinear", align_corners=False) * 2 - 1


def correct_transform(vae):
    cfg = vae.config
    s = cfg.scaling_factor

    def channel(values, like):
        return torch.tensor(values, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)

    if cfg.latents_mean is not None:
        return (lambda x: (x - channel(cfg.latents_mean, x)) * s / channel(cfg.latents_std, x),
                lambda z: z * channel(cfg.latents_std, z) / s + channel(cfg.latents_mean, z))
    shift = cfg.shift_factor or 0.0
    return (lambda x: (x - shift) * s), (lambda z: z / s + shift)


class Head(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(2, 2)


def pipeline(kind: str = "scale", encode: str = "once", decode: str = "inverse", latent: str = "sample",
             layout: str = "same", trained_like: bool = True, device: str = "cpu", vae=None) -> dict:
    """A minimal pipeline around a tiny VAE; ``encode``/``decode``/``latent``/``layout`` plant one mistake."""
    data = images()
    vae = vae if vae is not None else tiny_vae(kind, data, trained_like)
    vae.to(device)
    forward, inverse = correct_transform(vae)

    def std_of(x):  # the config's latents_std, shaped to multiply a latent
        return torch.tensor(vae.config.latents_std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)

    def raw_latent(px):
        px = px.to(device)
        if latent == "own_noise":  # the posterior through the VAE's modules, its own reparameterisation
            moments = vae.quant_conv(vae.encoder(px))
            mean, logvar = moments.chunk(2, dim=1)
            return mean + (0.5 * logvar).exp() * torch.randn_like(mean)
        dist = vae.encode(px).latent_dist
        if latent == "fixed_noise":  # a generator re-seeded every call: the same noise every epoch
            return dist.sample(generator=torch.Generator(device=px.device).manual_seed(0))
        return dist.mean if latent == "mean" else dist.sample()

    def encode_fn(px):
        with torch.no_grad():
            r = raw_latent(px)
        z = {"once": forward, "missing": lambda x: x, "twice": lambda x: forward(forward(x)), "inverted": inverse,
             "shift_ignored": lambda x: forward(x) - forward(torch.zeros_like(x)),  # scaled, not centred
             "std_ignored": lambda x: forward(x) * std_of(x) if kind == "channel" else forward(x),
             "tanh": lambda x: torch.tanh(forward(x))}[encode](r)
        if layout == "flat":
            return z.flatten(1)
        if layout == "packed":  # tokens of 2x2 patches, channels last (as Flux packs its latents)
            b, c, h, w = z.shape
            return z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)
        return z

    def decode_fn(z1):
        z1 = z1.to(device)
        b = z1.shape[0]
        if layout == "flat":  # latents are (B, 4, 8, 8)
            z1 = z1.view(b, 4, 8, 8)
        elif layout == "packed":
            z1 = z1.view(b, 4, 4, 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, 4, 8, 8)
        latent_in = {"inverse": inverse, "forward": forward, "none": lambda z: z, "bypass": inverse}[decode](z1)
        with torch.no_grad():
            if decode == "bypass":
                return vae.decoder(vae.post_quant_conv(inverse(z1)))
            return vae.decode(latent_in).sample

    head = Head().to(device)
    batches = [{"pixels": data[i:i + 16]} for i in range(0, len(data), 16)]

    def step(batch, step_index):
        z1 = encode_fn(batch["pixels"])
        return {"loss": head.linear.weight.sum() * 0 + z1.float().pow(2).mean(), "x1": z1}

    return {"step": step, "batches": batches, "trainable": {"head": head}, "frozen": {"vae": vae}, "vae": vae,
            "encode": encode_fn, "decode": decode_fn}


def check(settings: Settings | None = None, **options):
    return run(coerce(pipeline(**options)), settings or Settings(), only=["scale"]).check("scale")


def codes(result) -> set[str]:
    assert_backed(result)
    return {f.code for f in result.findings}


def assert_backed(result) -> None:
    """Every judged measurement that did not pass is backed by a finding with its verdict (one policy: the
    measurements table and the findings say the same)."""
    verdicts = {f.verdict for f in result.findings}
    for m in result.measurements:
        if m.verdict not in (None, Verdict.PASS):
            assert m.verdict in verdicts, (m.name, m.verdict, [(f.code, f.verdict) for f in result.findings])
    assert result.verdict is Verdict.worst([Verdict.PASS, *(m.verdict for m in result.measurements if m.verdict)])


def value(result, name):
    return next(m for m in result.measurements if m.name == name).value


# -------------------------------------------------------------------------------------------- end to end, CPU


@pytest.mark.parametrize("kind", KINDS)
def test_correct_usage_passes_on_each_config_kind(kind):
    result = check(kind=kind)
    assert result.verdict is Verdict.PASS, result.summary
    assert value(result, "z1 transform") == "once"
    assert value(result, "z1 source") == "posterior sample"
    assert value(result, "round-trip error") < 1e-5
    assert 0.8 < value(result, "configured latent std") < 1.25
    assert "scaling applied once" in result.summary
    assert result.details["applied"]["convention"] == "once"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mistake, key", [("twice", "twice"), ("missing", "missing"), ("inverted", "inverted")])
def test_wrong_scaling_fails_and_is_named_on_each_config_kind(kind, mistake, key):
    result = check(kind=kind, encode=mistake)
    assert result.verdict is Verdict.FAIL, result.summary
    assert value(result, "z1 transform") == key
    assert f"scale.{mistake}" in codes(result)
    label = {"twice": "applied twice", "missing": "scaling missing", "inverted": "inverted"}[mistake]
    assert label in result.summary
    # the number that shows it: the slope against the configured one is s, 1/s or 1/s^2 (mean over channels)
    ratio = value(result, "z1 slope / configured slope")
    cfg = result.details["configured"]
    if kind != "channel":
        s = cfg["scaling_factor"]
        expected = {"twice": s, "missing": 1 / s, "inverted": 1 / s ** 2}[mistake]
        assert ratio == pytest.approx(expected, rel=1e-3)
        assert f"{s:.4g}" in result.summary


@pytest.mark.parametrize("kind, mistake, key, words", [
    ("shift", "shift_ignored", "shift_missing", "shift_factor ignored"),
    ("channel", "shift_ignored", "shift_missing", "latents_mean ignored"),
    ("channel", "std_ignored", "std_ignored", "latents_std ignored"),
])
def test_an_ignored_shift_mean_or_std_fails(kind, mistake, key, words):
    result = check(kind=kind, encode=mistake)
    assert result.verdict is Verdict.FAIL, result.summary
    assert value(result, "z1 transform") == key
    assert f"scale.{mistake}" in codes(result)
    assert words in result.summary


@pytest.mark.parametrize("kind", KINDS)
def test_decode_that_multiplies_fails_the_round_trip(kind):
    result = check(kind=kind, decode="forward")
    assert result.verdict is Verdict.FAIL, result.summary
    assert value(result, "z1 transform") == "once"
    assert value(result, "round-trip error") > 0.5
    assert "decode is not the inverse of encode" in result.summary
    assert "multiplies instead of divides" in result.summary
    assert codes(result) == {"scale.decode_multiplies"}


def test_decode_without_unscaling_is_named():
    result = check(decode="none")
    assert result.verdict is Verdict.FAIL
    assert "no unscaling" in result.summary
    assert codes(result) == {"scale.decode_unscale_missing"}


def test_decode_that_bypasses_vae_decode_is_compared_in_pixels():
    result = check(decode="bypass")
    assert result.verdict is Verdict.PASS, result.summary
    assert "bypasses" in result.details["round_trip"]["method"]
    assert value(result, "round-trip error") < 1e-4


def test_the_posterior_mean_warns_and_the_seeds_case_fails():
    result = check(latent="mean")
    assert result.verdict is Verdict.WARN, result.summary
    assert value(result, "z1 source") == "posterior mean"
    assert "posterior mean" in result.summary and "not a sample" in result.summary
    assert codes(result) == {"scale.mean_not_sample"}
    seed_case = check(latent="mean", encode="missing")
    assert seed_case.verdict is Verdict.FAIL
    assert "neither sampled nor scaled" in seed_case.summary


def test_fixed_noise_and_a_non_affine_z1_warn():
    fixed = check(latent="fixed_noise")
    assert fixed.verdict is Verdict.WARN, fixed.summary
    assert value(fixed, "z1 source") == "fixed-noise sample" and "same one every call" in fixed.summary
    assert codes(fixed) == {"scale.fixed_noise"}
    squashed = check(encode="tanh")
    assert value(squashed, "z1 source") == "not affine"
    assert "not an affine map" in squashed.summary or squashed.verdict is Verdict.FAIL


def test_own_reparameterisation_is_recognised_as_a_sample_without_vae_encode():
    # encode never calls vae.encode: the check encodes the pixels itself and sees z1 = map(mean) + noise
    result = check(latent="own_noise")
    assert result.details["raw"]["capture"] == "explicit"
    assert value(result, "z1 source") == "mean + noise"
    assert value(result, "z1 transform") == "once", result.summary
    wrong = check(latent="own_noise", encode="twice")
    assert wrong.verdict is Verdict.FAIL and value(wrong, "z1 transform") == "twice"


def test_noise_dominated_own_sampling_still_judges_the_round_trip():
    # Default init (sigma ~ the latent's spread) and a reparameterisation outside the VAE: the encode fit is noisy,
    # so near-1 factors are a stated blind spot, but decode's own map is exact and the round trip is still judged.
    good = check(trained_like=False, latent="own_noise")
    assert good.verdict is Verdict.PASS and "blind spot" in good.summary, good.summary
    assert value(good, "round-trip error") < 1e-5
    bad = check(trained_like=False, latent="own_noise", decode="forward")
    assert bad.verdict is Verdict.FAIL and "multiplies instead of divides" in bad.summary


def test_flattened_and_packed_latents():
    flat = check(layout="flat")
    assert flat.verdict is Verdict.PASS, flat.summary
    assert flat.details["transform"]["method"] == "per-channel affine fit"
    packed = check(layout="packed")
    assert packed.verdict is Verdict.PASS, packed.summary
    assert packed.details["transform"]["method"].startswith("overall mean and std")
    packed_twice = check(layout="packed", encode="twice")
    assert packed_twice.verdict is Verdict.FAIL and value(packed_twice, "z1 transform") == "twice"
    assert "decode" not in packed_twice.hint  # decode is derived from the round trip: it is the correct inverse
    packed_decode = check(layout="packed", decode="forward")
    assert "multiplies instead of divides" in packed_decode.summary


def test_default_init_vae_sampling_dominated_and_a_factor_near_one():
    # Default init: the posterior sigma (~1) dominates the latent and the derived factor is near 1 (~0.93).
    result = check(trained_like=False)
    assert result.verdict is Verdict.PASS, result.summary
    assert value(result, "posterior sigma / latent std") > 0.5
    # The recorded sample makes the fit exact, so even a 7% mistake is seen and named, with its size.
    missing = check(trained_like=False, encode="missing")
    factor = missing.details["configured"]["scaling_factor"]
    assert 0.02 < abs(math.log(factor)) < 0.2
    assert value(missing, "z1 transform") == "missing"
    assert value(missing, "z1 distance from configured transform") == pytest.approx(abs(1 - factor) / factor,
                                                                                     rel=0.05)


def test_blind_spot_is_said_when_the_factor_is_one():
    # A VAE whose latents already have ~unit std, configured with scaling_factor 1: applying it twice changes
    # nothing measurable. The check passes (z1 is in the right units) and says what it cannot see.
    data = images()
    vae = tiny_vae("scale", data, trained_like=False)
    vae.register_to_config(scaling_factor=1.0)
    result = run(coerce(pipeline(vae=vae, encode="twice")), Settings(), only=["scale"]).check("scale")
    assert result.verdict is Verdict.PASS, result.summary
    assert "blind spot" in result.summary
    assert set(value(result, "indistinguishable conventions").split(", ")) == {"missing", "twice", "inverted"}


def test_diffusers_default_factor_left_on_a_unit_std_vae():
    # A VAE trained from scratch whose latents have ~unit std, with diffusers' default 0.18215 left in its config;
    # the user (rightly, for training) does not scale. The transform only warns ("missing", but z1 has unit std);
    # the configured transform is what fails: the config does not fit this VAE.
    data = images()
    vae = tiny_vae("scale", data, trained_like=False)
    vae.register_to_config(scaling_factor=0.18215)
    result = run(coerce(pipeline(vae=vae, encode="missing")), Settings(), only=["scale"]).check("scale")
    transform = next(m for m in result.measurements if m.name == "z1 transform")
    assert transform.value == "missing" and transform.verdict is Verdict.WARN
    assert value(result, "configured latent std") < 0.25
    assert result.verdict is Verdict.FAIL and "does not fit this VAE" in result.summary
    assert {"scale.config_not_used", "scale.config_std_off"} <= codes(result)


def test_the_vaes_frozen_module_hygiene_is_structures_not_scales():
    # A VAE in train mode, requiring grad and in the optimizer: the `structure` check owns that cause (for every
    # frozen module); scale judges only the scaling, which is correct here.
    p = pipeline()
    vae = p["vae"]
    vae.train().requires_grad_(True)
    p["optimizer"] = torch.optim.SGD([*p["trainable"]["head"].parameters(), *vae.parameters()], lr=0.1)
    result = run(coerce(p), Settings(), only=["scale"]).check("scale")
    assert result.verdict is Verdict.PASS, result.summary
    assert not any(m.name.startswith("VAE parameters") for m in result.measurements)
    assert vae.training  # the runner restores the user's modes


def test_half_probe_reports_overflow():
    p = pipeline()
    with torch.no_grad():  # activations beyond float16's range (65504) in the encoder
        p["vae"].encoder.conv_in.weight.mul_(1e5)
    result = run(coerce(p), Settings(), only=["scale"]).check("scale")
    assert value(result, "float16 probe finite") is False
    assert "float16" in result.summary or "float16" in (result.hint or "")
    assert "scale.half_overflow" in codes(result)
    off = run(coerce(p), Settings(thresholds={"scale": {"half_probe": "off"}}), only=["scale"]).check("scale")
    assert all(m.name != "float16 probe finite" for m in off.measurements)


def test_pixels_in_zero_one_warn():
    p = pipeline()
    p["batches"] = [{"pixels": (b["pixels"] + 1) / 2} for b in p["batches"]]
    result = run(coerce(p), Settings(), only=["scale"]).check("scale")
    assert any(m.name == "VAE input range" and m.verdict is Verdict.WARN for m in result.measurements)
    assert codes(result) == {"scale.pixels_0_1"}


def test_skips_without_vae_or_encode(tiny_pipeline):
    result = run(tiny_pipeline, Settings(), only=["scale"]).check("scale")
    assert result.verdict is Verdict.SKIP and "'vae'" in result.summary
    p = pipeline()
    del p["encode"]
    result = run(coerce(p), Settings(), only=["scale"]).check("scale")
    assert result.verdict is Verdict.SKIP and "'encode'" in result.summary


def test_encode_returning_no_tensor_is_an_error_naming_the_field():
    p = pipeline()
    p["encode"] = lambda px: {"z": px}
    result = run(coerce(p), Settings(), only=["scale"]).check("scale")
    assert result.verdict is Verdict.ERROR and "'encode'" in result.summary


def test_recorder_restores_the_vae_methods():
    data = images(4)
    vae = tiny_vae("scale", data)
    own = lambda x: "user's own"  # noqa: E731
    with VaeRecorder(vae) as recorder:
        vae.encode(data).latent_dist.sample()
        vae.decode(torch.zeros(4, 4, 4, 4))
    assert "encode" not in vae.__dict__ and "decode" not in vae.__dict__
    assert len(recorder.encodes) == 1 and len(recorder.encodes[0]["samples"]) == 1 and len(recorder.decodes) == 1
    vae.encode = own
    with VaeRecorder(vae):
        pass
    assert vae.encode is own


def test_same_verdicts_with_another_seed_and_thresholds_apply():
    result = check(settings=Settings(seed=7))
    assert result.verdict is Verdict.PASS
    strict = check(encode="twice", settings=Settings(thresholds={"scale": {"map_tolerance": 100.0,
                                                                           "round_trip_fail": 100.0,
                                                                           "round_trip_warn": 100.0}}))
    # a named mistake whose effect is within the (huge) tolerance only warns
    assert strict.verdict is Verdict.WARN, strict.summary


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", KINDS)
def test_on_gpu(kind):
    assert check(kind=kind, device="cuda").verdict is Verdict.PASS
    assert check(kind=kind, device="cuda", encode="twice").verdict is Verdict.FAIL


# ------------------------------------------------------------------------------------------ digits fixtures


def _digits_factors():
    from fixtures.correct.scale_shifted_vae import latent_statistics
    from fixtures.digits.pipeline import load_vae

    stats = latent_statistics()
    return float(load_vae().config.scaling_factor), stats["mean"] / stats["std"]


# module -> (verdict, words naming the bug, the number that shows it, its expected value from the VAE's factors)
SCALE_FIXTURES = {
    "fixtures.bugs.scale_twice": ("fail", "applied twice", r"z1 std ([\d.]+)", lambda s, m: s),
    "fixtures.bugs.scale_missing": ("fail", "scaling missing", r"z1 std ([\d.]+)", lambda s, m: 1 / s),
    "fixtures.bugs.scale_inverted": ("fail", "inverted", r"z1 std ([\d.]+)", lambda s, m: 1 / s ** 2),
    "fixtures.bugs.scale_decode_not_inverse": ("fail", "multiplies instead of divides",
                                               r"round-trip error ([\d.]+)", lambda s, m: 1 - s * s),
    "fixtures.bugs.scale_shift_ignored": ("fail", "shift_factor ignored", r"mean ([\d.]+)", lambda s, m: m),
    "fixtures.bugs.scale_mean_not_sample": ("warn", "posterior mean", r"sigma is ([\d.]+)", None),
    "fixtures.bugs.scale_seed_unsampled_unscaled": ("fail", "neither sampled nor scaled", r"z1 std ([\d.]+)",
                                                    lambda s, m: 1 / s),
    "fixtures.correct.scale_shifted_vae": ("pass", "applied once", r"z1 std ([\d.]+)", lambda s, m: 1.0),
    "fixtures.correct.scale_per_channel_vae": ("pass", "applied once", r"z1 std ([\d.]+)", lambda s, m: 1.0),
    "fixtures.digits": ("pass", "applied once", r"z1 std ([\d.]+)", lambda s, m: 1.0),
}

# module -> the finding that names the bug (first: FAIL before WARN, in the rules' order); None for a correct one
FIXTURE_CODES = {
    "fixtures.bugs.scale_twice": "scale.twice",
    "fixtures.bugs.scale_missing": "scale.missing",
    "fixtures.bugs.scale_inverted": "scale.inverted",
    "fixtures.bugs.scale_decode_not_inverse": "scale.decode_multiplies",
    "fixtures.bugs.scale_shift_ignored": "scale.shift_ignored",
    "fixtures.bugs.scale_mean_not_sample": "scale.mean_not_sample",
    "fixtures.bugs.scale_seed_unsampled_unscaled": "scale.missing",
    "fixtures.correct.scale_shifted_vae": None,
    "fixtures.correct.scale_per_channel_vae": None,
    "fixtures.digits": None,
}


@pytest.mark.parametrize("module", sorted(SCALE_FIXTURES))
def test_digits_fixtures_are_diagnosed_by_name_with_the_number(module):
    import re

    from fmcheck.contract import load_pipeline

    verdict, words, pattern, expected = SCALE_FIXTURES[module]
    result = run(load_pipeline(f"{module}:build"), Settings(), only=["scale"]).check("scale")
    assert result.verdict.value == verdict, result.summary
    assert words in result.summary
    assert [f.code for f in result.findings][:1] == ([FIXTURE_CODES[module]] if FIXTURE_CODES[module] else [])
    assert_backed(result)
    shown = float(re.search(pattern, result.summary).group(1))
    if expected is None:  # the posterior sigma, relative to the latent's std: above the threshold, well below 1
        assert ScaleCheck.Thresholds().sigma_negligible <= shown < 0.5
    else:
        assert shown == pytest.approx(expected(*_digits_factors()), rel=0.1), result.summary


# ------------------------------------------------------------------------------------------------ standalone


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae")
    tiny_vae("scale", images()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    from PIL import Image

    folder = tmp_path_factory.mktemp("images")
    for index, image in enumerate(images(12, seed=3)):
        array = ((image.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
        Image.fromarray(array).save(folder / f"{index:02d}.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


def standalone(folder, settings: Settings | None = None, **options):
    from fmcheck.checks.scale import standalone as command

    options.setdefault("images", None)
    options.setdefault("resolution", None)
    return command.run(str(folder), settings=settings or Settings(), **options).checks[0]


def test_standalone_recommends_a_factor_that_gives_unit_std(vae_folder, image_folder, tmp_path):
    import shutil

    result = standalone(vae_folder, images=str(image_folder))
    assert result.details["images"]["count"] == 12
    recommended = value(result, "recommended scaling_factor")
    snippet = result.details["config_snippet"]
    assert f'"scaling_factor": {recommended:.5g}' in snippet and '"latents_std": [' in snippet
    # Put the recommendation in the config (as the user would) and the configured latents get std 1.
    edited = tmp_path / "vae"
    shutil.copytree(vae_folder, edited)
    config = json.loads((edited / "config.json").read_text())
    config["scaling_factor"] = recommended
    config["shift_factor"] = value(result, "recommended shift_factor")
    if config["shift_factor"] == "none":
        config["shift_factor"] = None
    (edited / "config.json").write_text(json.dumps(config))
    again = standalone(edited, images=str(image_folder))
    assert value(again, "configured latent std") == pytest.approx(1.0, abs=1e-3)
    assert again.verdict is Verdict.PASS, again.summary
    # ... and a factor 10x off fails, with the snippet as the fix
    config["scaling_factor"] = recommended / 10
    (edited / "config.json").write_text(json.dumps(config))
    wrong = standalone(edited, images=str(image_folder))
    assert wrong.verdict is Verdict.FAIL and f"{recommended:.4g}" in wrong.summary
    assert [f.code for f in wrong.findings] == ["scale.config_std_off"]
    assert wrong.findings[0].observed == pytest.approx(0.1, rel=1e-3)  # 10x off: std 0.1
    assert wrong.details["config_snippet"] in wrong.hint
    # its finding is addressable: ignored, it is listed and no longer counts
    ignored = standalone(edited, Settings(ignore=["scale.config_std_off"]), images=str(image_folder))
    assert ignored.verdict is Verdict.PASS and [f.ignored for f in ignored.findings] == [True]
    assert ignored.summary.startswith("scale.config_std_off ignored: ")


def test_standalone_default_images_are_sample_photo_tiles(vae_folder):
    result = standalone(vae_folder, resolution=16)
    assert result.details["images"]["count"] == 18
    assert "sample photos" in result.details["images"]["source"]


@pytest.mark.parametrize("problem", ["missing_folder", "broken_config", "unknown_class", "bad_image",
                                     "empty_images", "resolution"])
def test_standalone_usage_errors_name_the_file(problem, vae_folder, image_folder, tmp_path):
    import shutil

    folder, options = vae_folder, {}
    if problem == "missing_folder":
        folder, expected = tmp_path / "nope", "no such folder"
    elif problem in ("broken_config", "unknown_class"):
        folder = tmp_path / "vae"
        shutil.copytree(vae_folder, folder)
        text = "{broken" if problem == "broken_config" else json.dumps({"_class_name": "NotAVae"})
        (folder / "config.json").write_text(text)
        expected = str(folder / "config.json")
    elif problem == "bad_image":
        bad = tmp_path / "images"
        shutil.copytree(image_folder, bad)
        (bad / "zz.png").write_bytes(b"not a png")
        options, expected = {"images": str(bad)}, str(bad / "zz.png")
    elif problem == "empty_images":
        options, expected = {"images": str(tmp_path)}, "no PNG or JPEG"
    else:
        options, expected = {"resolution": 12}, "multiple of 8"
    with pytest.raises(UsageError) as info:
        standalone(folder, **options)
    message = str(info.value)
    assert expected in message and "\n" not in message


def test_cli_scale_needs_exactly_one_of_module_and_vae(vae_folder):
    neither = run_cli("scale")
    assert neither.returncode == 2 and "needs --module" in neither.stderr
    assert len(neither.stderr.strip().splitlines()) == 1
    both = run_cli("scale", "--module", "tiny:build", "--vae", str(vae_folder))
    assert both.returncode == 2 and "exclude each other" in both.stderr
    mixed = run_cli("scale", "--module", "tiny:build", "--images", ".")
    assert mixed.returncode == 2 and "go with --vae" in mixed.stderr


def test_cli_scale_vae_json_junit_and_snippet(vae_folder, image_folder, tmp_path, monkeypatch):
    # In-process (typer's CliRunner): a subprocess would spend most of its time importing diffusers.
    from typer.testing import CliRunner

    from fmcheck.cli import app

    monkeypatch.chdir(tmp_path)
    junit = tmp_path / "scale.xml"
    result = CliRunner().invoke(app, ["scale", "--vae", str(vae_folder), "--images", str(image_folder), "--json",
                                      "-", "--junit", str(junit)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    check_result = report["checks"][0]
    assert check_result["id"] == "scale" and report["pipeline"] == f"--vae {vae_folder}"
    names = {m["name"] for m in check_result["measurements"]}
    assert {"recommended scaling_factor", "recommended shift_factor", "configured latent std"} <= names
    assert '"scaling_factor":' in result.stderr  # the config snippet, under the human report
    assert 'testcase' in junit.read_text() and 'name="scale"' in junit.read_text()
    inapplicable = CliRunner().invoke(app, ["scale", "--vae", str(vae_folder), "--samples", "3"])
    assert inapplicable.exit_code == 2 and "--samples apply to --module runs only" in inapplicable.output


def test_cli_scale_vae_whose_encode_raises_is_an_error_row_without_traceback(vae_folder, image_folder, tmp_path,
                                                                              monkeypatch):
    # The VAE's own code runs isolated, as a check under the runner does: ERROR, exit 3, one line and a fix.
    from diffusers import AutoencoderKL
    from typer.testing import CliRunner

    from fmcheck.cli import app

    def encode(self, *args, **kwargs):
        raise RuntimeError("encoder exploded")

    monkeypatch.setattr(AutoencoderKL, "encode", encode)
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "report.json"
    result = CliRunner().invoke(app, ["scale", "--vae", str(vae_folder), "--images", str(image_folder), "--json",
                                      str(path)], catch_exceptions=False)
    assert result.exit_code == 3, result.output
    assert "Traceback" not in result.output
    assert re.search(r"ERROR +scale +check crashed: RuntimeError: encoder exploded", result.output), result.output
    assert "fix: rerun with --debug" in result.output
    check_result = json.loads(path.read_text())["checks"][0]
    assert check_result["verdict"] == "error" and "encoder exploded" in check_result["error"]  # the JSON keeps it


def test_check_doc_renders():
    from fmcheck.docs import check_markdown

    text = check_markdown(ScaleCheck)
    assert "blind spot" in text.lower() and "map_tolerance" in text
