"""The user contract: Pipeline validation, the dict form, and loading from MODULE:ATTR."""

from __future__ import annotations

import textwrap

import pytest
import torch

import tiny
from fmcheck.contract import FIELDS, Pipeline, coerce, load_pipeline
from fmcheck.errors import PipelineError


def valid() -> dict:
    return tiny.build()


@pytest.mark.parametrize("field", ["step", "batches", "trainable"])
def test_missing_required_field_is_named(field):
    pipeline = valid()
    del pipeline[field]
    with pytest.raises(PipelineError, match=f"'{field}' is required"):
        coerce(pipeline)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("step", 42, "'step': expected a callable"),
        ("batches", 3, "'batches': expected a re-iterable"),
        ("batches", "abc", "'batches': expected a re-iterable"),
        ("batches", iter([1, 2]), "iterator, which is exhausted after one pass"),
        ("trainable", "head", "'trainable': expected a torch.nn.Module"),
        ("trainable", {}, "'trainable': the mapping is empty"),
        ("trainable", {"head": 3}, "'trainable['head']': expected torch.nn.Module, got int"),
        ("optimizer", "adam", "'optimizer': expected a torch.optim.Optimizer"),
        ("frozen", [torch.nn.Linear(1, 1)], "'frozen': expected a mapping"),
        ("frozen", {"vae": "x"}, "'frozen['vae']': expected torch.nn.Module, got str"),
        ("vae", object(), "'vae': a object has no encode or decode"),
        ("encode", 1.5, "'encode': expected a callable"),
        ("decode", "no", "'decode': expected a callable"),
        ("pixels", 7, "'pixels': expected a callable"),
        ("total_steps", 0, "'total_steps': expected a positive int"),
        ("total_steps", 2.5, "'total_steps': expected a positive int"),
        ("total_steps", True, "'total_steps': expected a positive int"),
        ("velocity", lambda x: x, "'velocity': expected a torch.nn.Module"),
        ("grad_scaler", object(), "'grad_scaler': expected a torch.amp.GradScaler"),
    ],
)
def test_wrong_type_is_one_line_naming_the_field(field, value, message):
    pipeline = valid()
    pipeline[field] = value
    with pytest.raises(PipelineError) as info:
        coerce(pipeline)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_key_suggests_the_close_one():
    pipeline = valid()
    pipeline["total_step"] = 10
    with pytest.raises(PipelineError, match="unknown pipeline key 'total_step' \\(did you mean 'total_steps'\\?\\)"):
        coerce(pipeline)


def test_dict_and_dataclass_forms_are_equivalent():
    as_dict = valid()
    pipeline = coerce(as_dict)
    assert isinstance(pipeline, Pipeline)
    assert set(FIELDS) >= set(as_dict)
    assert coerce(pipeline) is pipeline
    with pytest.raises(TypeError):
        Pipeline(as_dict["step"], as_dict["batches"], as_dict["trainable"])  # keyword-only


def test_batches_may_be_a_factory_and_are_reiterable():
    data = valid()
    batches = data["batches"]
    data["batches"] = lambda: iter(batches)
    pipeline = coerce(data)
    assert len(list(pipeline.iter_batches())) == len(list(pipeline.iter_batches())) == len(batches)


def test_single_module_trainable_is_named_model():
    data = valid()
    data["trainable"] = data["trainable"]["velocity"]
    assert list(coerce(data).trainable_modules()) == ["model"]


class _Vae(torch.nn.Module):
    def encode(self, x):
        return x

    def decode(self, z):
        return z


def test_frozen_modules_are_the_declared_ones_plus_the_vae_once():
    vae, text = _Vae(), torch.nn.Linear(1, 1)
    assert coerce({**valid(), "vae": vae}).frozen_modules() == {"vae": vae}
    both = coerce({**valid(), "vae": vae, "frozen": {"text": text}}).frozen_modules()
    assert both == {"text": text, "vae": vae}
    listed = coerce({**valid(), "vae": vae, "frozen": {"autoencoder": vae}}).frozen_modules()
    assert listed == {"autoencoder": vae}  # already declared: not twice
    clash = coerce({**valid(), "vae": vae, "frozen": {"vae": text}}).frozen_modules()
    assert clash == {"vae": text, "pipeline field 'vae'": vae}
    assert coerce(valid()).frozen_modules() == {}


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(name: str, source: str) -> None:
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))

    return write


@pytest.mark.parametrize(
    "spec, source, message",
    [
        ("nocolon", "", "expected MODULE:ATTR"),
        ("does_not_exist_xyz:build", None, "no module named 'does_not_exist_xyz'"),
        ("m1:build", "x = 1\n", "module 'm1' has no attribute 'build'"),
        ("m2:build", "import not_installed_dependency_xyz\n", "importing 'm2' raised ModuleNotFoundError"),
        ("m3:build", "def build():\n    raise ValueError('no data dir')\n", "build() raised ValueError: no data dir (m3.py:2)"),
        ("m4:build", "def build():\n    return 42\n", "returned a int; expected fmcheck.Pipeline"),
        ("m5:build", "def build(config):\n    return {}\n", "zero-argument callable, but it requires config"),
        ("m6:build", "def build():\n    return {'step': print}\n", "pipeline field 'batches' is required"),
        ("m7:build", "raise RuntimeError('import time failure')\n", "importing 'm7' raised RuntimeError: import time failure (m7.py:1)"),
        ("m8:PIPE", "PIPE = 3\n", "m8:PIPE is a int; expected fmcheck.Pipeline"),
    ],
)
def test_loading_errors_are_one_line_and_name_the_place(project, spec, source, message):
    if source is not None:
        project(spec.split(":")[0], source)
    with pytest.raises(PipelineError) as info:
        load_pipeline(spec)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_loads_a_callable_or_the_pipeline_itself(project):
    project("good", """
        import sys
        sys.path.insert(0, %r)
        import tiny
        build = tiny.build
        PIPELINE = tiny.build()
    """ % str(__import__("pathlib").Path(tiny.__file__).parent))
    assert isinstance(load_pipeline("good:build"), Pipeline)
    assert isinstance(load_pipeline("good:PIPELINE"), Pipeline)
