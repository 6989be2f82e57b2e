"""The bad-input catalogue: each mistake a user can make gets one line naming the problem and where it is.

Every case runs the real CLI in-process (typer's CliRunner) on a small module written to a temporary project, and
asserts the exit code, the message, that there is no traceback, and that the user's files are untouched.
"""

from __future__ import annotations

import itertools
import textwrap

import pytest
from typer.testing import CliRunner

from conftest import TESTS
from fmcheck.cli import app

_counter = itertools.count()

BASE = f"""
import sys
sys.path.insert(0, {str(TESTS)!r})
import math
import torch
import tiny

def pipeline(**changes):
    data = tiny.build()
    data.update(changes)
    return data
"""

# (case id, module body, extra CLI args, exit code, message fragment)
CASES = [
    ("module-not-found", None, [], 2, "no module named"),
    ("attribute-missing", "x = 1", [], 2, "has no attribute 'build'"),
    ("build-raises", "def build():\n    raise FileNotFoundError('data/train.parquet')", [], 2,
     "build() raised FileNotFoundError: data/train.parquet ("),
    ("build-wrong-type", "def build():\n    return [1, 2]", [], 2, "returned a list; expected fmcheck.Pipeline"),
    ("build-needs-args", "def build(cfg):\n    return {}", [], 2, "requires cfg"),
    ("import-error-inside", "import torchvisionx", [], 2, "raised ModuleNotFoundError: No module named 'torchvisionx'"),
    ("missing-step", "def build():\n    d = pipeline()\n    del d['step']\n    return d", [], 2,
     "pipeline field 'step' is required"),
    ("missing-trainable", "def build():\n    d = pipeline()\n    del d['trainable']\n    return d", [], 2,
     "pipeline field 'trainable' is required"),
    ("unknown-key", "def build():\n    return pipeline(optimiser=None)", [], 2,
     "unknown pipeline key 'optimiser' (did you mean 'optimizer'?)"),
    ("trainable-not-module", "def build():\n    return pipeline(trainable={'head': 'head'})", [], 2,
     "'trainable['head']': expected torch.nn.Module, got str"),
    ("optimizer-wrong-type", "def build():\n    return pipeline(optimizer={'lr': 1e-4})", [], 2,
     "'optimizer': expected a torch.optim.Optimizer, got dict"),
    ("batches-iterator", "def build():\n    return pipeline(batches=iter(tiny.build()['batches']))", [], 2,
     "iterator, which is exhausted after one pass"),
    ("batches-empty", "def build():\n    return pipeline(batches=[])", [], 2, "'batches' yielded no batch"),
    ("batches-raise", "def gen():\n    raise OSError('shard 3 unreadable')\n    yield\n"
                      "def build():\n    return pipeline(batches=gen)", [], 2,
     "iterating pipeline field 'batches' raised OSError: shard 3 unreadable"),
    ("step-raises", "def build():\n    d = pipeline()\n    def step(b, i):\n        raise KeyError('caption')\n"
                    "    d['step'] = step\n    return d", [], 2, "step(batch, step_index=0) raised KeyError: 'caption' ("),
    ("step-not-mapping", "def build():\n    d = pipeline()\n    s = d['step']\n"
                         "    d['step'] = lambda b, i: s(b, i)['loss']\n    return d", [], 2,
     "returned a Tensor; expected a mapping"),
    ("step-no-loss", "def build():\n    d = pipeline()\n    s = d['step']\n"
                     "    d['step'] = lambda b, i: {'fm': s(b, i)['loss']}\n    return d", [], 2,
     "returned no 'loss' (keys: fm)"),
    ("loss-not-scalar", "def build():\n    d = pipeline()\n    s = d['step']\n"
                        "    d['step'] = lambda b, i: {**s(b, i), 'loss': torch.ones(4)}\n    return d", [], 2,
     "output 'loss' has shape (4,); expected a scalar"),
    ("loss-a-float", "def build():\n    d = pipeline()\n    s = d['step']\n"
                     "    d['step'] = lambda b, i: {**s(b, i), 'loss': 0.5}\n    return d", [], 2,
     "output 'loss' is a float; expected the scalar tensor"),
    ("output-a-string", "def build():\n    d = pipeline()\n    s = d['step']\n"
                        "    d['step'] = lambda b, i: {**s(b, i), 'caption': 'a seven'}\n    return d", [], 2,
     "output 'caption' is a str"),
    ("mixed-devices", "def build():\n    d = pipeline()\n    s = d['step']\n"
                      "    d['step'] = lambda b, i: {**s(b, i), 'x1': torch.zeros(32, 16, device='meta')}\n"
                      "    return d", [], 2, "output 'x1' is on meta but 'x0' is on cpu"),
    ("shape-mismatch", "def build():\n    d = pipeline()\n    s = d['step']\n"
                       "    d['step'] = lambda b, i: {**s(b, i), 'v_pred': torch.zeros(32, 8)}\n    return d", [], 2,
     "output 'v_pred' has shape (32, 8) but 'x0' has (32, 16)"),
    ("total-steps-negative", "def build():\n    return pipeline(total_steps=-5)", [], 2,
     "'total_steps': expected a positive int, got -5"),
    ("unknown-check-id", "def build():\n    return pipeline()", ["--only", "nrms"], 2, "unknown check id 'nrms'"),
    ("bad-set", "def build():\n    return pipeline()", ["--set", "norms"], 2, "expected CHECK.THRESHOLD=VALUE"),
    ("bad-device", "def build():\n    return pipeline()", ["--device", "gpu0"], 2, "expected cpu, cuda or cuda:N"),
    ("cuda-unavailable", "def build():\n    return pipeline()", ["--device", "cuda"], 2, "CUDA is not available"),
    ("config-missing", "def build():\n    return pipeline()", ["--config", "nope.toml"], 2,
     "--config nope.toml: no such file"),
    ("config-invalid-toml", "def build():\n    return pipeline()", ["--config", "bad.toml"], 2, "invalid TOML"),
    ("config-unknown-setting", "def build():\n    return pipeline()", ["--config", "unknown.toml"], 2,
     "unknown setting 'sample'"),
    ("plot-dir-under-a-file", "def build():\n    return pipeline()", ["--plot", "bad.toml/figures"], 2,
     "--plot bad.toml/figures: 'bad.toml' exists and is not a folder"),
    ("negative-samples", "def build():\n    return pipeline()", ["--samples", "0"], 2,
     "setting 'samples': Input should be greater than or equal to 1"),
    # Found by the audit of 2026-11-30 (rows 22, 45, 46, 53, 64, 65, 78-81, 101 of its table (b)).
    ("build-calls-sys-exit", "def build():\n    sys.exit(0)", [], 2,
     "build() raised SystemExit: sys.exit(0) was called ("),
    ("import-calls-sys-exit", "sys.exit(3)", [], 2, "raised SystemExit: sys.exit(3) was called"),
    ("batches-iter-raises", "class Shards:\n    def __iter__(self):\n        raise OSError('bucket not mounted')\n"
                            "def build():\n    return pipeline(batches=Shards())", [], 2,
     "iterating pipeline field 'batches' raised OSError: bucket not mounted ("),
    ("batches-raise-after-the-first", "def build():\n    good = tiny.build()['batches']\n"
                                      "    def gen():\n        yield good[0]\n        raise OSError('corrupt shard 17')\n"
                                      "    return pipeline(batches=gen)", [], 2,
     "iterating pipeline field 'batches' raised OSError: corrupt shard 17 ("),
    ("step-calls-backward", "def build():\n    d = pipeline()\n    s = d['step']\n    def step(b, i):\n"
                            "        out = s(b, i)\n        out['loss'].backward()\n        return out\n"
                            "    d['step'] = step\n    return d", [], 2,
     "step() must not call backward() or optimizer.step()"),
    ("t-not-one-per-sample", "def build():\n    d = pipeline()\n    s = d['step']\n"
                             "    d['step'] = lambda b, i: {**s(b, i), 't': torch.rand(3)}\n    return d", [], 2,
     "output 't' has shape (3,) for 32 samples ('x0' (32, 16)); expected one time per sample (leading dimension), or one for all"),
    ("module-on-meta", "def build():\n    d = pipeline()\n    d['trainable']['velocity'].to('meta')\n    return d", [],
     2, "module 'velocity.net.0' is on the meta device"),
    ("device-mps-missing", "def build():\n    return pipeline()", ["--device", "mps"], 2,
     "--device mps: MPS is not available on this machine"),
    ("set-warn-beyond-fail", "def build():\n    return pipeline()",
     ["--set", "norms.ratio_warn=5", "--set", "norms.ratio_fail=1.5"], 2,
     "--set norms.*: ratio_warn (5) lies beyond ratio_fail (1.5): the warning bound must come before the failure"),
    ("set-unknown-threshold", "def build():\n    return pipeline()", ["--set", "norms.ratio_wrn=3"], 2,
     "unknown threshold 'ratio_wrn' for check 'norms' (did you mean 'ratio_warn'?)"),
    ("set-unknown-check", "def build():\n    return pipeline()", ["--set", "norm.ratio_warn=3"], 2,
     "thresholds given for unknown check id 'norm' (did you mean 'norms'? known: kl, norms"),
    ("json-path-missing-folder", "def build():\n    return pipeline()", ["--json", "/nonexistent/out/report.json"],
     2, "--json /nonexistent/out/report.json: cannot write there (No such file or directory)"),
    ("json-path-a-folder", "def build():\n    return pipeline()", ["--json", "."], 2,
     "--json .: is a folder; give a file path"),
    ("junit-path-missing-folder", "def build():\n    return pipeline()", ["--junit", "/nonexistent/junit.xml"], 2,
     "--junit /nonexistent/junit.xml: cannot write there"),
    ("junit-path-not-writable", "def build():\n    return pipeline()", ["--junit", "/proc/junit.xml"], 2,
     "--junit /proc/junit.xml: cannot write there"),
]


@pytest.mark.parametrize("case, body, args, code, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input(tmp_path, monkeypatch, case, body, args, code, message):
    monkeypatch.chdir(tmp_path)
    name = f"user_train_{next(_counter)}"
    if body is not None:
        (tmp_path / f"{name}.py").write_text(BASE + "\n" + textwrap.dedent(body) + "\n")
    (tmp_path / "bad.toml").write_text("samples = [\n")
    (tmp_path / "unknown.toml").write_text("sample = 3\n")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    result = CliRunner().invoke(app, ["all", "--module", f"{name}:build", *args], catch_exceptions=False)
    output = result.output
    assert result.exit_code == code, output
    assert message in " ".join(output.split()), output
    assert "Traceback" not in output
    assert len([line for line in output.splitlines() if line.strip()]) == 1, output
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name != "__pycache__"}
    assert after == before  # nothing of the user's was touched, nothing was written


def test_the_catalogue_is_large():
    assert len(CASES) >= 25


def test_a_package_whose_init_raises_is_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "badpkg").mkdir()
    (tmp_path / "badpkg" / "__init__.py").write_text("raise RuntimeError('set DATA_ROOT first')\n")
    (tmp_path / "badpkg" / "train.py").write_text("def build():\n    return {}\n")
    result = CliRunner().invoke(app, ["all", "--module", "badpkg.train:build"], catch_exceptions=False)
    assert result.exit_code == 2, result.output
    assert "importing the package 'badpkg' raised RuntimeError: set DATA_ROOT first (" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_a_module_named_as_a_file_gets_the_module_name_suggested(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mytrain.py").write_text("def build():\n    return {}\n")
    result = CliRunner().invoke(app, ["all", "--module", "mytrain.py:build"], catch_exceptions=False)
    assert result.exit_code == 2 and "name the module without '.py': --module mytrain:ATTR" in result.output


ARGPARSE = """
import argparse
parser = argparse.ArgumentParser()
parser.add_argument("--data", {required})
args = parser.parse_args()
import sys
sys.path.insert(0, {tests!r})
import tiny
def build():
    return tiny.build()
"""


def test_argparse_in_the_users_module_reads_no_fmcheck_arguments(tmp_path, monkeypatch):
    """argparse at import time sees the module's own name and no arguments, as `python -m mytrain` would; when it
    requires an argument, the usage line names the user's module, not fmcheck, and fmcheck says what happened."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "opt_args.py").write_text(ARGPARSE.format(required="default='data/'", tests=str(TESTS)))
    result = CliRunner().invoke(app, ["all", "--module", "opt_args:build", "--only", "norms"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    (tmp_path / "req_args.py").write_text(ARGPARSE.format(required="required=True", tests=str(TESTS)))
    result = CliRunner().invoke(app, ["all", "--module", "req_args:build", "--only", "norms"],
                                catch_exceptions=False)
    assert result.exit_code == 2, result.output
    assert "usage: req_args.py" in result.output and "usage: fmcheck" not in result.output
    assert "SystemExit 2 from argparse: the code parses the command line, and fmcheck gives it none" in \
        " ".join(result.output.split())
    assert "Traceback" not in result.output


def test_scale_vae_with_an_id_that_is_not_cached_is_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    result = CliRunner().invoke(app, ["scale", "--vae", "stabilityai/sd-vae-ft-mse"], catch_exceptions=False)
    assert result.exit_code == 2, result.output
    assert "no model with this id in the local Hugging Face cache" in " ".join(result.output.split())
    assert "Traceback" not in result.output


def test_scale_vae_finds_a_cached_id_and_its_vae_subfolder(tmp_path, monkeypatch):
    """The cache layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<commit>/...}."""
    from fmcheck.checks.scale.standalone import locate

    repo = tmp_path / "hub" / "models--org--pipe"
    snapshot = repo / "snapshots" / ("a" * 40)
    (snapshot / "vae").mkdir(parents=True)
    (snapshot / "vae" / "config.json").write_text('{"_class_name": "AutoencoderKL"}')
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert locate("org/pipe") == snapshot / "vae"
    assert locate("org/pipe/vae") == snapshot / "vae"


@pytest.mark.parametrize("path, message", [
    ("/proc/x.py", "init /proc/x.py: cannot write /proc/x.py"),
    ("notes.txt", "init notes.txt: the adapter must be a .py file (or name a folder)"),
])
def test_init_into_a_bad_path_is_one_line(tmp_path, monkeypatch, path, message):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["init", path], catch_exceptions=False)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()) and "Traceback" not in result.output
    assert "fmcheck: error: init" in result.output  # no doubled "fmcheck: error: fmcheck init"


def test_init_into_a_new_folder_writes_there_and_says_how_to_run_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["init", "adapters/"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "adapters" / "fmcheck_adapter.py").exists()
    assert "cd adapters && fmcheck all --module fmcheck_adapter:build" in result.output


def test_ctrl_c_before_any_check_ran_says_so_in_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "interrupted.py").write_text(BASE + "\ndef build():\n    d = pipeline()\n"
                                             "    def step(b, i):\n        raise KeyboardInterrupt\n"
                                             "    d['step'] = step\n    return d\n")
    result = CliRunner().invoke(app, ["all", "--module", "interrupted:build"], catch_exceptions=False)
    assert result.exit_code == 130, result.output
    assert "interrupted (Ctrl-C) before any check ran; nothing was checked" in " ".join(result.output.split())
    assert "Traceback" not in result.output
