"""StateSnapshot: everything a check could disturb, taken once and put back any number of times; with what only it
uses (torch's process-wide switches and hook registries, objects with state_dict, the seeds torch queues for devices
it has not initialised yet)."""

from __future__ import annotations

import copy
import random
from typing import Any

from ..contract import Pipeline
from ..errors import PipelineError
from .generators import _rng_state, _set_rng_state, find_generators
from .records import (_copy_container, _hook_words, _ModuleRecord, _OptimizerRecord, _refill, _tensors, _TensorHooks,
                      _write, named_modules)

# Pipeline fields holding an object with state_dict() / load_state_dict() that a check may advance.
EXTRA_STATEFUL = ("grad_scaler", "lr_scheduler")

# Where torch keeps its process-wide hook registries (module attributes named _global_*).
_GLOBAL_HOOK_HOMES = ("torch.nn.modules.module", "torch.optim.optimizer")


def _refuse_unusable(modules: list[tuple[str, Any]]) -> None:
    """A module without real weights (meta device, lazy parameters) cannot run: one line naming it."""
    import torch

    for name, tensor in _tensors(modules):
        owner = name.rsplit(".", 1)[0]
        if isinstance(tensor, torch.nn.parameter.UninitializedTensorMixin):
            raise PipelineError(f"module '{owner}' has an uninitialized lazy parameter ('{name}'): run one forward "
                                "(or build it with concrete sizes) before fmcheck")
        if tensor.device.type == "meta":
            raise PipelineError(f"module '{owner}' is on the meta device ('{name}' holds no data): load or "
                                "materialize its weights (e.g. to_empty() and load_state_dict) before fmcheck")


# -- the snapshot -------------------------------------------------------------------------------------------------

class StateSnapshot:
    """Everything a check could disturb, taken once; :meth:`restore` puts it all back (any number of times)."""

    def __init__(self, pipeline: Pipeline, device: Any = None):
        """``device``: where the run will execute; CUDA's generators are captured when it is a CUDA device."""
        import numpy as np
        import torch

        self.pipeline = pipeline
        modules = named_modules(pipeline)
        _refuse_unusable(modules)
        tensors = list(_tensors(modules))
        self.modules = [_ModuleRecord(name, module) for name, module in modules]
        self.tensor_names = [name for name, _ in tensors]
        self.tensors = [(t, t.detach().to("cpu", copy=True)) for _, t in tensors]
        params = [(name, t) for name, t in tensors if isinstance(t, torch.nn.Parameter)]
        self.grads = [(p, p.grad, None if p.grad is None else p.grad.detach().to("cpu", copy=True)) for _, p in params]
        self.flags = [(p, p.requires_grad) for _, p in params]
        self.tensor_hooks = [_TensorHooks(name, p) for name, p in params]
        self.optimizer = _OptimizerRecord(pipeline.optimizer) if pipeline.optimizer is not None else None
        self.stateful = [(obj, _offload(obj.state_dict())) for obj in _stateful(pipeline)]
        self.globals = _global_hooks()
        self.settings = [(name, get, put, get()) for name, get, put in _torch_settings()]
        self.generators = find_generators(pipeline)
        self.generator_states = [(found.generator, _rng_state(found.generator)) for found in self.generators]
        self.python_rng = random.getstate()
        self.numpy_rng = np.random.get_state()
        self.torch_rng = torch.get_rng_state()
        self.lazy_seeds = [(tracker, _copy_tracker(tracker)) for tracker in _lazy_seed_trackers()]
        if device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available():
            torch.cuda.init()  # runs any seed the user queued, as their own first CUDA call would; the run needs it
        self.cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() \
            else None
        self.tolerated: set[str] = set()

    def rebound(self) -> "StateSnapshot":
        """This snapshot for the modules as they are now, after the runner moved them to the run's device.

        Moving a module re-creates its buffer tensors (``Module._apply``); the restores during the run must put the
        saved values into those, on the run's device. The final restore, after the modules are moved back, uses the
        original snapshot and so puts back the user's own buffer objects.
        """
        modules = named_modules(self.pipeline)
        tensors = list(_tensors(modules))
        if [name for name, _ in tensors] != self.tensor_names:
            return self  # the move changed more than tensor objects: keep the original records
        view = copy.copy(self)
        view.modules = [_ModuleRecord(name, module) for name, module in modules]
        view.tensors = [(t, saved) for (_, t), (_, saved) in zip(tensors, self.tensors)]
        view.tolerated = set()
        return view

    # -- what a check left behind --------------------------------------------------------------------------------
    def changes(self) -> list[str]:
        """Structural changes since the snapshot, in words: hooks, swapped objects, attributes added or removed."""
        found: list[str] = []
        for record in self.modules:
            found += record.changes()
        for hooks in self.tensor_hooks:
            found += hooks.changes()
        if self.optimizer is not None:
            found += self.optimizer.changes()
        for home, key, obj, saved in self.globals:
            words = _hook_words(key)
            now = getattr(home, key, None)
            if words is not None and isinstance(saved, dict) and isinstance(now, dict) \
                    and any(k not in saved for k in now):
                found.append(f"left a global {words} ({home.__name__})")
        for name, get, _, value in self.settings:
            now = get()
            if now != value:
                found.append(f"changed the torch setting {name} from {value} to {now}")
        return found

    def tolerate_current_changes(self) -> None:
        """What the user's own step does to its modules (a cache it builds on first call) is never a check's fault."""
        self.tolerated.update(self.changes())

    def leftovers(self) -> list[str]:
        """What a check left behind, beyond what the user's own step does."""
        return [change for change in self.changes() if change not in self.tolerated]

    # -- putting it back -----------------------------------------------------------------------------------------
    def restore(self) -> None:
        import numpy as np
        import torch

        for record in self.modules:  # first the objects, so that values go into the original tensors
            record.restore()
        for tensor, saved in self.tensors:
            _write(tensor, saved)
        for param, grad, saved in self.grads:
            if grad is None:
                param.grad = None
            else:
                _write(grad, saved, param.device)
                param.grad = grad
        for param, flag in self.flags:
            param.requires_grad_(flag)
        for hooks in self.tensor_hooks:
            hooks.restore()
        if self.optimizer is not None:
            self.optimizer.restore()
        for obj, saved in self.stateful:
            obj.load_state_dict(copy.deepcopy(saved))
        for home, key, obj, saved in self.globals:
            setattr(home, key, obj)
            if isinstance(saved, (dict, set)):
                _refill(obj, saved)
        for _, get, put, value in self.settings:
            if get() != value:
                put(value)
        for generator, state in self.generator_states:
            _set_rng_state(generator, state)
        random.setstate(self.python_rng)
        np.random.set_state(self.numpy_rng)
        torch.set_rng_state(self.torch_rng)
        for tracker, saved in self.lazy_seeds:
            tracker.__dict__.update(_copy_tracker_state(saved))
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)


def _torch_settings() -> list[tuple[str, Any, Any]]:
    """(name, get, set) of torch's process-wide switches a check could flip and forget: the next check, and the user's
    training, would run under them."""
    import torch

    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul

    def flag(owner: Any, attr: str) -> tuple[Any, Any]:
        return (lambda: getattr(owner, attr)), (lambda value: setattr(owner, attr, value))

    return [
        ("autograd", torch.is_grad_enabled, torch.set_grad_enabled),
        ("default dtype", torch.get_default_dtype, torch.set_default_dtype),
        ("deterministic algorithms",
         lambda: (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()),
         lambda value: torch.use_deterministic_algorithms(value[0], warn_only=value[1])),
        ("anomaly detection", lambda: (torch.is_anomaly_enabled(), torch.is_anomaly_check_nan_enabled()),
         lambda value: torch.set_anomaly_enabled(*value)),
        ("float32 matmul precision", torch.get_float32_matmul_precision, torch.set_float32_matmul_precision),
        ("cudnn.enabled", *flag(cudnn, "enabled")),
        ("cudnn.benchmark", *flag(cudnn, "benchmark")),
        ("cudnn.deterministic", *flag(cudnn, "deterministic")),
        ("cudnn.allow_tf32", *flag(cudnn, "allow_tf32")),
        ("cuda.matmul.allow_tf32", *flag(matmul, "allow_tf32")),
    ]


def _stateful(pipeline: Pipeline) -> list[Any]:
    objects = [getattr(pipeline, field, None) for field in EXTRA_STATEFUL]
    return [obj for obj in objects if obj is not None and callable(getattr(obj, "state_dict", None))
            and callable(getattr(obj, "load_state_dict", None))]


def _offload(value: Any) -> Any:
    """Deep copy with tensors cloned to CPU, so a snapshot costs host memory, not accelerator memory."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _offload(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_offload(v) for v in value)
    return copy.deepcopy(value)


def _global_hooks() -> list[tuple[Any, str, Any, Any]]:
    """(home module, name, object, saved contents) for torch's process-wide hook registries."""
    import importlib

    saved = []
    for home_name in _GLOBAL_HOOK_HOMES:
        home = importlib.import_module(home_name)
        for key, value in vars(home).items():
            if key.startswith("_global_") and "hook" in key:
                saved.append((home, key, value, _copy_container(value) if isinstance(value, (dict, set)) else value))
    return saved


def _lazy_seed_trackers() -> list[Any]:
    """Where torch queues ``manual_seed`` for a CUDA/XPU device it has not initialised (replayed at its first use)."""
    import torch

    trackers = []
    for backend in ("cuda", "xpu"):
        tracker = getattr(getattr(torch, backend, None), "_lazy_seed_tracker", None)
        if tracker is not None and isinstance(getattr(tracker, "__dict__", None), dict):
            trackers.append(tracker)
    return trackers


def _copy_tracker(tracker: Any) -> dict[str, Any]:
    return _copy_tracker_state(tracker.__dict__)


def _copy_tracker_state(state: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, list) else v for k, v in state.items()}
