"""The user contract (spec section 1): the Pipeline, its dict form, and loading it from ``module:attr``."""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Iterator, Mapping
from typing import Any, Callable, Optional

from .errors import PipelineError
from .isolate import capture, describe


PREDICTIONS = ("velocity", "epsilon", "sample")  # the parameterisations a sampler may convert from


@dataclasses.dataclass(kw_only=True)
class Pipeline:
    """What fmcheck needs of a training setup. Training code may return a plain dict with the same keys instead."""

    step: Callable[[Any, int], Mapping[str, Any]]
    batches: Any
    trainable: Any
    optimizer: Any = None
    frozen: Optional[Mapping[str, Any]] = None
    vae: Any = None
    encode: Optional[Callable[[Any], Any]] = None
    decode: Optional[Callable[[Any], Any]] = None
    pixels: Optional[Callable[[Any], Any]] = None
    total_steps: Optional[int] = None
    velocity: Any = None
    grad_scaler: Any = None
    generators: Any = None  # name -> random generator (or a sequence) the step draws from that fmcheck cannot find
    before_optimizer_step: Optional[Callable[[], None]] = None  # after backward (and unscale_), before step
    lr_scheduler: Any = None  # stepped after each optimizer step; state_dict() / load_state_dict() to restore it
    prediction: str = "velocity"  # what the velocity module's raw output is trained to be: velocity, epsilon, sample

    def __post_init__(self) -> None:
        validate(self)

    # -- accessors the checks use -------------------------------------------------------------------------------
    def iter_batches(self) -> Iterator[Any]:
        """A fresh iterator over the training batches."""
        source = self.batches() if _is_factory(self.batches) else self.batches
        return iter(source)

    def trainable_modules(self) -> dict[str, Any]:
        import torch

        if isinstance(self.trainable, torch.nn.Module):
            return {"model": self.trainable}
        return dict(self.trainable)

    def frozen_modules(self) -> dict[str, Any]:
        """The one definition of the frozen modules: the declared ``frozen`` mapping, plus the ``vae`` when it is an
        nn.Module not already listed (under the key "vae", or "pipeline field 'vae'" when a different module holds
        that key). Each module once: callers never add the VAE by hand."""
        import torch

        modules = {str(key): module for key, module in (self.frozen or {}).items()}
        vae = self.vae
        if isinstance(vae, torch.nn.Module) and all(module is not vae for module in modules.values()):
            modules["vae" if "vae" not in modules else "pipeline field 'vae'"] = vae
        return modules

    def pixels_of(self, batch: Any) -> Any:
        """The pixel tensor of a batch: the ``pixels`` field, else ``batch["pixels"]``, else a tuple's first tensor."""
        import torch

        if self.pixels is not None:
            return self.pixels(batch)
        if isinstance(batch, Mapping) and "pixels" in batch:
            return batch["pixels"]
        if isinstance(batch, (tuple, list)):
            for item in batch:
                if isinstance(item, torch.Tensor):
                    return item
        if isinstance(getattr(batch, "pixels", None), torch.Tensor):
            return batch.pixels
        raise PipelineError(
            f"cannot find the pixels of a {type(batch).__name__} batch: set the pipeline field 'pixels' "
            "to a function batch -> pixel tensor"
        )


FIELDS = tuple(f.name for f in dataclasses.fields(Pipeline))
REQUIRED = ("step", "batches", "trainable")


def _is_factory(batches: Any) -> bool:
    """A zero-argument callable that returns an iterator (as opposed to a re-iterable such as a DataLoader)."""
    return callable(batches) and not hasattr(batches, "__iter__")


def _type_name(value: Any) -> str:
    return type(value).__name__


def validate(pipeline: Pipeline) -> None:
    """Check every field's type; raise PipelineError naming the first offending field."""
    import torch

    def bad(name: str, expected: str) -> PipelineError:
        value = getattr(pipeline, name)
        return PipelineError(f"pipeline field '{name}': expected {expected}, got {_type_name(value)}")

    for name in REQUIRED:
        if getattr(pipeline, name) is None:
            raise PipelineError(f"pipeline field '{name}' is required but missing")
    if not callable(pipeline.step):
        raise bad("step", "a callable step(batch, step_index) -> mapping")
    batches = pipeline.batches
    if isinstance(batches, (str, bytes)) or not (_is_factory(batches) or hasattr(batches, "__iter__")):
        raise bad("batches", "a re-iterable of batches or a zero-argument callable returning an iterator")
    # Tested without calling iter(): starting a shuffled DataLoader draws from the user's RNG before the snapshot.
    if not _is_factory(batches) and isinstance(batches, Iterator):
        raise PipelineError(
            "pipeline field 'batches': got an iterator, which is exhausted after one pass; "
            "pass a list, a DataLoader, or a zero-argument callable returning a fresh iterator"
        )
    trainable = pipeline.trainable
    if isinstance(trainable, Mapping):
        if not trainable:
            raise PipelineError("pipeline field 'trainable': the mapping is empty")
        for key, module in trainable.items():
            if not isinstance(module, torch.nn.Module):
                raise PipelineError(
                    f"pipeline field 'trainable[{key!r}]': expected torch.nn.Module, got {_type_name(module)}"
                )
    elif not isinstance(trainable, torch.nn.Module):
        raise bad("trainable", "a torch.nn.Module or a mapping of name -> nn.Module")
    if pipeline.optimizer is not None and not isinstance(pipeline.optimizer, torch.optim.Optimizer):
        raise bad("optimizer", "a torch.optim.Optimizer")
    if pipeline.frozen is not None:
        if not isinstance(pipeline.frozen, Mapping):
            raise bad("frozen", "a mapping of name -> nn.Module")
        for key, module in pipeline.frozen.items():
            if not isinstance(module, torch.nn.Module):
                raise PipelineError(
                    f"pipeline field 'frozen[{key!r}]': expected torch.nn.Module, got {_type_name(module)}"
                )
    if pipeline.vae is not None:
        missing = [m for m in ("encode", "decode") if not callable(getattr(pipeline.vae, m, None))]
        if missing:
            raise PipelineError(
                f"pipeline field 'vae': a {_type_name(pipeline.vae)} has no {' or '.join(missing)}() method; "
                "expected a diffusers AutoencoderKL-like VAE"
            )
    for name in ("encode", "decode", "pixels"):
        value = getattr(pipeline, name)
        if value is not None and not callable(value):
            raise bad(name, "a callable")
    total = pipeline.total_steps
    if total is not None and (isinstance(total, bool) or not isinstance(total, int) or total <= 0):
        raise PipelineError(f"pipeline field 'total_steps': expected a positive int, got {total!r}")
    if pipeline.velocity is not None and not isinstance(pipeline.velocity, torch.nn.Module):
        raise bad("velocity", "a torch.nn.Module mapping (x_t, t, cond) to v_pred")
    if pipeline.grad_scaler is not None and not callable(getattr(pipeline.grad_scaler, "scale", None)):
        raise bad("grad_scaler", "a torch.amp.GradScaler")
    if pipeline.before_optimizer_step is not None and not callable(pipeline.before_optimizer_step):
        raise bad("before_optimizer_step", "a zero-argument callable (e.g. gradient clipping)")
    scheduler = pipeline.lr_scheduler
    if scheduler is not None and not all(callable(getattr(scheduler, m, None))
                                         for m in ("step", "state_dict", "load_state_dict")):
        raise bad("lr_scheduler", "an LR scheduler with step(), state_dict() and load_state_dict()")
    if pipeline.prediction not in PREDICTIONS:
        raise PipelineError(f"pipeline field 'prediction': expected one of {', '.join(repr(p) for p in PREDICTIONS)}, "
                            f"got {pipeline.prediction!r}")
    _validate_generators(pipeline.generators)


def _validate_generators(generators: Any) -> None:
    from .state import is_generator

    if generators is None:
        return
    if isinstance(generators, Mapping):
        items = [(f"generators[{k!r}]", g) for k, g in generators.items()]
    elif isinstance(generators, (list, tuple)):
        items = [(f"generators[{i}]", g) for i, g in enumerate(generators)]
    else:
        raise PipelineError(f"pipeline field 'generators': expected a mapping of name -> torch.Generator (or a list), "
                            f"got {_type_name(generators)}")
    for where, generator in items:
        if not is_generator(generator):
            raise PipelineError(f"pipeline field '{where}': expected a torch.Generator (or random.Random, numpy "
                                f"Generator), got {_type_name(generator)}")


def coerce(value: Any, source: str = "pipeline") -> Pipeline:
    """A Pipeline from a Pipeline or a plain dict with the same keys."""
    if isinstance(value, Pipeline):
        return value
    if isinstance(value, Mapping):
        unknown = [k for k in value if k not in FIELDS]
        if unknown:
            key = unknown[0]
            close = difflib.get_close_matches(str(key), FIELDS, n=1)
            suggestion = f" (did you mean '{close[0]}'?)" if close else f" (known keys: {', '.join(FIELDS)})"
            raise PipelineError(f"{source}: unknown pipeline key '{key}'{suggestion}")
        missing = [k for k in REQUIRED if k not in value]
        if missing:
            raise PipelineError(f"{source}: pipeline field '{missing[0]}' is required but missing")
        return Pipeline(**value)
    raise PipelineError(f"{source} is a {_type_name(value)}; expected fmcheck.Pipeline or a dict with its keys")


def load_pipeline(spec: str) -> Pipeline:
    """Import ``module:attr`` (the current directory first on sys.path, as ``python -m`` does) and build it."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise PipelineError(f"--module {spec!r}: expected MODULE:ATTR, e.g. mytrain:build")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    with _argv_of(module_name):
        return _build(spec, module_name, attr)


@contextlib.contextmanager
def _argv_of(module_name: str):
    """While the user's module is imported and built, sys.argv is what ``python -m module`` with no arguments gives:
    an argparse call in it must not read fmcheck's own command line (nor print a usage line named fmcheck)."""
    saved = sys.argv
    sys.argv = [module_name.rpartition(".")[2] + ".py"]
    try:
        yield
    finally:
        sys.argv = saved


def _build(spec: str, module_name: str, attr: str) -> Pipeline:
    module = _import(module_name)
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise PipelineError(f"--module {spec}: module '{module_name}' has no attribute '{attr}'")
        target = getattr(target, part)
    if callable(target) and not isinstance(target, (Pipeline, Mapping)):
        _require_zero_args(target, spec)
        outcome = capture(target)
        if not outcome.ok:
            if isinstance(outcome.exc, PipelineError):
                raise outcome.exc
            raise PipelineError(f"--module {spec}: {attr}() raised {describe(outcome.exc)}") from outcome.exc
        target = outcome.value
        source = f"{spec}() returned"
    else:
        source = spec
    if not isinstance(target, (Pipeline, Mapping)):
        raise PipelineError(
            f"{source} a {_type_name(target)}; expected fmcheck.Pipeline or a dict with its keys"
            if source.endswith("returned")
            else f"{spec} is a {_type_name(target)}; expected fmcheck.Pipeline, a dict, or a zero-argument callable"
        )
    return coerce(target, source=spec)


def _import(module_name: str):
    # find_spec imports the parent packages: their __init__ is user code and may raise anything.
    found = capture(importlib.util.find_spec, module_name)
    parts = module_name.split(".")
    prefixes = {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
    missing = (isinstance(found.exc, ModuleNotFoundError) and found.exc.name in prefixes) or \
        isinstance(found.exc, ValueError)  # a parent that is missing or not a package
    if not found.ok and not missing:
        parent = module_name.rpartition(".")[0]
        raise PipelineError(f"--module: importing the package '{parent}' raised {describe(found.exc)}") from found.exc
    if found.value is None:
        hint = ""
        if module_name.endswith(".py"):
            hint = f"; name the module without '.py': --module {module_name[:-3].replace(os.sep, '.')}:ATTR"
        raise PipelineError(f"--module: no module named '{module_name}' (searched from {os.getcwd()}){hint}")
    outcome = capture(importlib.import_module, module_name)
    if not outcome.ok:
        raise PipelineError(f"--module: importing '{module_name}' raised {describe(outcome.exc)}") from outcome.exc
    return outcome.value


def _require_zero_args(fn: Callable[..., Any], spec: str) -> None:
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins without a signature: just call them
        return
    required = [
        p.name
        for p in signature.parameters.values()
        if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]
    if required:
        raise PipelineError(f"--module {spec}: expected a zero-argument callable, but it requires {', '.join(required)}")
