"""Latent-space fingerprints and `fmcheck compare`: the pure comparison, fingerprints of real runs (digits with one
change each: scaling factor, VAE weights, resolution), and the command end to end in a subprocess."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fmcheck import fingerprint as fp
from fmcheck.config import Settings
from fmcheck.context import Context
from fmcheck.contract import coerce
from fmcheck.registry import Registry
from fmcheck.report import CheckResult, Report
from fmcheck.runner import run
from fmcheck.verdict import Verdict

ROOT = Path(__file__).resolve().parent.parent
BASE = {
    "version": 1,
    "vae": {"class": "AutoencoderKL",
            "config": {"scaling_factor": 0.18215, "shift_factor": None, "latents_mean": None, "latents_std": None,
                       "latent_channels": 4, "sample_size": 32, "block_out_channels": [8, 16, 32]},
            "weights_sha256": "ab" * 32},
    "latent": {"shape": [4, 8, 8], "dtype": "float32"},
    "pixels": {"resolution": [32, 32], "channels": 1},
    "applied_scaling": None,
}


def changed(path: str, value, base=BASE) -> dict:
    result = copy.deepcopy(base)
    *parents, leaf = path.split(".")
    node = result
    for key in parents:
        node = node[key]
    node[leaf] = value
    return result


# ------------------------------------------------------------------------------------------------ pure compare
def test_identical_fingerprints_are_comparable():
    comparison = fp.compare(BASE, copy.deepcopy(BASE))
    assert comparison.comparable and not comparison.differences


@pytest.mark.parametrize("path, value", [
    ("vae.config.scaling_factor", 0.13025),
    ("vae.config.shift_factor", 0.1159),
    ("vae.config.latents_mean", [0.1, 0.2, 0.3, 0.4]),
    ("vae.weights_sha256", "cd" * 32),
    ("vae.class", "AutoencoderTiny"),
    ("latent.shape", [4, 16, 16]),
    ("pixels.resolution", [64, 64]),
])
def test_one_decisive_change_is_named(path, value):
    comparison = fp.compare(BASE, changed(path, value))
    assert not comparison.comparable
    assert [r.field for r in comparison.blocking] == [path]


def test_dtype_difference_is_shown_but_not_decisive():
    comparison = fp.compare(BASE, changed("latent.dtype", "float16"))
    assert comparison.comparable
    assert [r.field for r in comparison.differences] == ["latent.dtype"]


def test_applied_scaling_uses_the_fit_tolerance_and_may_be_missing_on_one_side():
    a = changed("applied_scaling", {"scale": 0.1824, "shift": 0.0})
    close = changed("applied_scaling", {"scale": 0.1826, "shift": 0.0})
    far = changed("applied_scaling", {"scale": 0.3650, "shift": 0.0})
    assert fp.compare(a, close).comparable
    assert not fp.compare(a, close, rtol=1e-4).comparable
    assert [r.field for r in fp.compare(a, far).blocking] == ["applied_scaling.scale"]
    one_sided = fp.compare(a, BASE)  # the scale check ran for A only: unknown for B, not a difference
    assert one_sided.comparable and {r.status for r in one_sided.differences} == {"only in A"}


def test_a_vae_on_one_side_only_is_not_comparable():
    comparison = fp.compare(BASE, changed("vae", None))
    assert not comparison.comparable
    assert "vae.weights_sha256" in {r.field for r in comparison.blocking}


# ------------------------------------------------------------------------------------------------ computing
def test_fingerprint_without_a_vae_and_with_the_scale_checks_applied_scaling():
    sys.path.insert(0, str(ROOT / "tests"))
    import tiny

    pipeline = coerce(tiny.build())
    ctx = Context(pipeline, Settings(), torch.device("cpu"))
    scale = CheckResult(id="scale", verdict=Verdict.PASS, details={"applied": {"scale": torch.tensor(0.5)}})
    from fmcheck.registry import discover
    from fmcheck.runner import published

    result = fp.compute(pipeline, ctx, published([discover().get("scale")], [scale]))
    assert result["vae"] is None
    assert result["latent"] == {"shape": [tiny.LATENT], "dtype": "float32"}
    assert result["pixels"] is None  # the batches carry no pixels
    assert result["applied_scaling"] == {"scale": 0.5}
    assert fp.compute(pipeline, ctx, {})["applied_scaling"] is None
    json.dumps(result)


def test_a_part_that_raises_is_recorded_not_fatal():
    class BrokenVae(torch.nn.Module):
        def encode(self, x): ...

        def decode(self, z): ...

        def state_dict(self, *args, **kwargs):
            raise RuntimeError("no weights here")

    sys.path.insert(0, str(ROOT / "tests"))
    import tiny

    raw = tiny.build()
    raw["vae"] = BrokenVae()
    report = run(coerce(raw), Settings(measure_batches=1), only=["structure"])
    assert report.fingerprint is not None
    assert "no weights here" in report.fingerprint["errors"]["vae"]
    assert report.fingerprint["latent"]["shape"] == [tiny.LATENT]


def test_weights_hash_covers_values_and_dtypes():
    module = torch.nn.Linear(3, 2)
    first = fp.weights_sha256(module)
    assert first == fp.weights_sha256(module)
    with torch.no_grad():
        module.bias[0] += 1e-6
    assert fp.weights_sha256(module) != first
    assert fp.weights_sha256(module.to(torch.bfloat16)) != fp.weights_sha256(module.float())


# ------------------------------------------------------------------------------------- digits, end to end
@pytest.fixture(scope="module")
def digits_reports():
    """Real reports of the digits pipeline: as built, with another scaling factor, with perturbed VAE weights."""
    from fixtures.digits import DigitsPipeline

    def report(pipeline) -> Report:
        # no checks: the runner's probe step and the fingerprint alone (the scale check's part stays absent)
        return run(coerce(pipeline.to_pipeline()), Settings(measure_batches=1), registry=Registry())

    reports = {"base": report(DigitsPipeline())}
    rescaled = DigitsPipeline()
    rescaled.vae.register_to_config(scaling_factor=0.25)  # encode() and decode() read it from the config
    reports["scaling"] = report(rescaled)
    perturbed = DigitsPipeline()
    with torch.no_grad():
        next(perturbed.vae.parameters()).add_(1e-3)
    reports["weights"] = report(perturbed)
    return reports


def test_digits_fingerprint_contents(digits_reports):
    fingerprint = digits_reports["base"].fingerprint
    assert fingerprint["vae"]["class"] == "AutoencoderKL"
    assert fingerprint["vae"]["config"]["scaling_factor"] == pytest.approx(0.182446, rel=1e-4)
    assert fingerprint["latent"] == {"shape": [4, 8, 8], "dtype": "float32"}
    assert fingerprint["pixels"] == {"resolution": [32, 32], "channels": 1}
    assert len(fingerprint["vae"]["weights_sha256"]) == 64
    # the JSON round trip keeps it
    assert Report.model_validate_json(digits_reports["base"].model_dump_json()).fingerprint == fingerprint


def test_digits_one_change_each_is_named(digits_reports):
    base = digits_reports["base"].fingerprint
    scaling = fp.compare(base, digits_reports["scaling"].fingerprint)
    assert [r.field for r in scaling.blocking] == ["vae.config.scaling_factor"]
    weights = fp.compare(base, digits_reports["weights"].fingerprint)
    assert [r.field for r in weights.blocking] == ["vae.weights_sha256"]
    # a resolution change (64 x 64 pixels, so 4 x 16 x 16 latents) cannot run through the 8 x 8 velocity net:
    # edit the recorded fields instead
    resolution = changed("latent.shape", [4, 16, 16], changed("pixels.resolution", [64, 64], base))
    assert {r.field for r in fp.compare(base, resolution).blocking} == {"pixels.resolution", "latent.shape"}


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "240", "NO_COLOR": "1"}
    return subprocess.run([sys.executable, "-m", "fmcheck", "compare", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=120)


def test_compare_command_end_to_end(digits_reports, tmp_path):
    paths = {}
    for name, report in digits_reports.items():
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(report.model_dump_json(indent=2))
    same = _cli(str(paths["base"]), str(paths["base"]))
    assert same.returncode == 0, same.stdout + same.stderr
    assert "comparable" in same.stdout and "not comparable" not in same.stdout

    scaled = _cli(str(paths["base"]), str(paths["scaling"]))
    assert scaled.returncode == 1
    assert "vae.config.scaling_factor" in scaled.stdout and "0.25" in scaled.stdout
    assert "not comparable" in scaled.stdout

    weights = _cli(str(paths["base"]), str(paths["weights"]))
    assert weights.returncode == 1 and "vae.weights_sha256" in weights.stdout


def test_compare_command_usage_errors(digits_reports, tmp_path):
    good = tmp_path / "good.json"
    good.write_text(digits_reports["base"].model_dump_json())
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    bare = tmp_path / "bare.json"
    bare.write_text(digits_reports["base"].model_copy(update={"fingerprint": None}).model_dump_json())
    for bad, words in ((broken, "not a valid fmcheck JSON report"), (bare, "no fingerprint"),
                       (tmp_path / "missing.json", "cannot read")):
        result = _cli(str(good), str(bad))
        assert result.returncode == 2, result.stdout + result.stderr
        assert str(bad.name) in result.stderr and words in result.stderr
        assert "Traceback" not in result.stderr


def test_at_80_columns_field_names_wrap_and_stay_distinct():
    import io

    from rich.console import Console

    from fmcheck.renderers.compare import render_comparison

    other = changed("vae.config.latents_mean", [0.1, 0.2, 0.3, 0.4])
    other = changed("vae.config.latents_std", [1.1, 1.2, 1.3, 1.4], base=other)
    other = changed("vae.config.block_out_channels", [8, 16, 64], base=other)
    comparison = fp.compare(BASE, other)
    out = io.StringIO()
    render_comparison(comparison, "./out/a-rather-long-folder-name/tinyfp.json", "./out/b/tinyfp.json",
                      Console(file=out, width=80, color_system=None), show_all=True)
    text = out.getvalue()
    assert "…" not in text.replace("ab" * 8 + "…", "")  # nothing truncated but the shortened hash
    flat = "".join(text.split())  # wrapped cells, read back without the wrapping
    for field in ("vae.config.latents_mean", "vae.config.latents_std", "vae.config.block_out_channels"):
        assert field in flat.replace("│", "")
    assert "A: ./out/a-rather-long-folder-name/tinyfp.json" in text
