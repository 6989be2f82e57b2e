"""Snapshot and exact restore of the user's training state, around the whole run and around each check.

The runner takes one :class:`StateSnapshot` before anything touches the pipeline and puts it back after the probe,
after every check (whatever happened inside it) and at the end of the run. What it holds:

- Every module the pipeline names (``trainable``, ``frozen``, ``vae``, ``velocity``) and all their submodules:
  parameter and buffer values, restored in place into the same tensor objects (a dtype or shape a check changed is put
  back too); gradients, into the same ``.grad`` tensors; ``requires_grad`` flags; hooks on the parameters themselves
  (``Tensor.register_hook``, post-accumulate-grad hooks). And, shallowly, each module object: its class, which
  attributes it has and which objects they hold, which Parameter, buffer and submodule objects it holds, its hook
  dicts (forward, backward, state-dict, ... as the installed torch has them) and its train/eval mode.
- torch's global module hooks and global optimizer hooks, and its process-wide switches (autograd on or off, the
  default dtype, deterministic algorithms, anomaly detection, float32 matmul precision, cuDNN and TF32 flags).
- The optimizer: the same ``param_groups`` list holding the same group dicts (values restored into them, the same
  ``params`` lists), so a group a user holds stays the optimizer's; ``defaults``; the per-parameter ``state``, into the
  same dicts and tensors; its hooks and attributes.
- Objects the pipeline names that have ``state_dict`` / ``load_state_dict`` (:data:`EXTRA_STATEFUL`).
- The python, numpy and torch global RNGs; CUDA's (when CUDA is in use); the seeds torch queues for CUDA/XPU
  devices it has not initialised yet; and the private random generators :func:`find_generators` reaches from the
  pipeline (torch.Generator, random.Random, numpy Generator/RandomState).

Tensors are copied to host memory, so a snapshot costs no accelerator memory; the structure (identities, key sets)
is recorded by reference and costs next to nothing. Not captured, and said so in docs/reliability.md: generators
fmcheck cannot reach, the contents of the user's own containers held as attributes (lists, dicts), files the step
writes, CUDA graphs, data-loader worker processes and streams that keep their own position.

:meth:`StateSnapshot.leftovers` names what a check left behind that a check must not (a hook, a swapped Parameter or
submodule, an added or removed attribute): the runner turns that check's result into ERROR.
"""

from __future__ import annotations

import collections
import copy
import functools
import hashlib
import itertools
import random
import types
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from .contract import Pipeline
from .errors import PipelineError

# Pipeline fields holding an object with state_dict() / load_state_dict() that a check may advance.
EXTRA_STATEFUL = ("grad_scaler", "lr_scheduler")

# Where torch keeps its process-wide hook registries (module attributes named _global_*).
_GLOBAL_HOOK_HOMES = ("torch.nn.modules.module", "torch.optim.optimizer")

_MISSING = object()


# -- what the pipeline holds --------------------------------------------------------------------------------------

def named_modules(pipeline: Pipeline) -> list[tuple[str, Any]]:
    """Every module the pipeline names and all their submodules, each once, as ``(name, module)``.

    Names are the user's: ``velocity.out.2`` for a submodule of ``trainable["velocity"]``; a frozen module whose key
    is also a trainable key is ``frozen.KEY``; the VAE is one of the frozen modules (``vae``); ``velocity`` when not
    already reached.
    """
    roots: list[tuple[str, Any]] = list(pipeline.trainable_modules().items())
    for key, module in pipeline.frozen_modules().items():
        roots.append((f"frozen.{key}" if key in dict(roots) else str(key), module))
    if pipeline.velocity is not None:  # validated: an nn.Module
        roots.append(("velocity", pipeline.velocity))
    seen: set[int] = set()
    named: list[tuple[str, Any]] = []
    for root_name, root in roots:
        for sub_name, module in root.named_modules(remove_duplicate=False):
            if id(module) in seen:
                continue
            seen.add(id(module))
            named.append((f"{root_name}.{sub_name}" if sub_name else str(root_name), module))
    return named


def _tensors(modules: list[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
    """(name, tensor) for every parameter and buffer of ``modules``, each shared tensor once."""
    seen: set[int] = set()
    for name, module in modules:
        for kind in ("_parameters", "_buffers"):
            for key, tensor in module.__dict__.get(kind, {}).items():
                if tensor is None or id(tensor) in seen:
                    continue
                seen.add(id(tensor))
                yield f"{name}.{key}", tensor


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


# -- private random generators ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class FoundGenerator:
    """A random generator reachable from the pipeline, and where: ``batches.generator``, ``step.g``, ..."""

    name: str
    generator: Any


def _generator_kind(value: Any) -> Optional[str]:
    import torch

    if isinstance(value, torch.Generator):
        return "torch"
    if isinstance(value, random.Random) and not isinstance(value, random.SystemRandom):  # SystemRandom has no state
        return "python"
    module = type(value).__module__ or ""
    if module.startswith("numpy.random"):
        import numpy as np

        if isinstance(value, np.random.Generator):
            return "numpy"
        if isinstance(value, np.random.RandomState):
            return "numpy-legacy"
    return None


def is_generator(value: Any) -> bool:
    """A torch.Generator, random.Random or numpy Generator/RandomState: what fmcheck can save, restore and reseed."""
    return _generator_kind(value) is not None


def _global_generators() -> set[int]:
    """The process-wide generators, which the snapshot covers as the global RNGs."""
    import numpy as np
    import torch

    ids = {id(torch.default_generator), id(random._inst), id(np.random.mtrand._rand)}  # type: ignore[attr-defined]
    ids.update(id(g) for g in getattr(torch.cuda, "default_generators", ()))
    return ids


_ATOMS = (str, bytes, int, float, complex, bool, type(None), type, types.ModuleType)
_CONTAINER_LIMIT = 64  # a list of ten thousand batches is not walked past its head


def find_generators(pipeline: Pipeline) -> list[FoundGenerator]:
    """The private random generators reachable from the pipeline, in a fixed order.

    Looked for, a few references deep and never through python modules or tensors: the explicit ``generators``
    field; ``batches`` (a DataLoader's ``generator``, its sampler's and batch sampler's, its dataset's attributes, or a
    batch factory's closure); the closure cells, defaults, named globals and bound object of ``step``, ``encode``,
    ``decode`` and ``pixels``; and the attributes of every module the pipeline names. A generator inside an object
    reached only through deeper or opaque references is not found: declare it in ``generators``.
    """
    import torch

    found: dict[int, FoundGenerator] = {}
    skip = _global_generators()

    def add(name: str, value: Any) -> None:
        if id(value) not in skip and id(value) not in found:
            found[id(value)] = FoundGenerator(name, value)

    declared = pipeline.generators
    items = declared.items() if isinstance(declared, Mapping) else enumerate(declared or ())
    for key, generator in items:
        add(f"generators[{key!r}]", generator)
    roots = [("batches", pipeline.batches, 3)]  # loader -> batch_sampler -> sampler -> generator
    roots += [(field, getattr(pipeline, field), 3) for field in ("step", "encode", "decode", "pixels")]
    roots += [(name, module, 2) for name, module in named_modules(pipeline)]
    visited: dict[int, int] = {}  # id -> the most depth left it was searched with
    for root in roots:
        # Breadth first, so that each generator is named by its shortest path ("batches.generator").
        queue = collections.deque([root])
        while queue:
            name, value, depth = queue.popleft()
            if _generator_kind(value) is not None:
                add(name, value)
                continue
            if depth <= 0 or isinstance(value, _ATOMS) or isinstance(value, torch.Tensor) \
                    or visited.get(id(value), -1) >= depth:
                continue
            visited[id(value)] = depth
            for child_name, child, cost in _references(name, value):
                if cost:
                    queue.append((child_name, child, depth - cost))
                else:
                    queue.appendleft((child_name, child, depth))
    return list(found.values())


def _references(name: str, value: Any) -> Iterator[tuple[str, Any, int]]:
    """What ``value`` refers to, for the generator search: (name, object, 1), or 0 for the same thing seen closer."""
    import torch

    if isinstance(value, types.FunctionType):
        code = value.__code__
        for var, cell in zip(code.co_freevars, value.__closure__ or ()):
            if _cell_filled(cell):
                yield f"{name}.{var}", cell.cell_contents, 1
        for index, default in enumerate(value.__defaults__ or ()):
            yield f"{name}.<default {index}>", default, 1
        for key, default in (value.__kwdefaults__ or {}).items():
            yield f"{name}.{key}", default, 1
        for global_name in _global_names(code):  # module-level objects the function names
            if global_name in value.__globals__:
                yield f"{name}.{global_name}", value.__globals__[global_name], 1
    elif isinstance(value, types.MethodType):
        yield name, value.__func__, 0
        yield name, value.__self__, 1
    elif isinstance(value, functools.partial):
        yield name, value.func, 0
        for index, arg in enumerate(value.args):
            yield f"{name}.<arg {index}>", arg, 1
        for key, arg in value.keywords.items():
            yield f"{name}.{key}", arg, 1
    elif isinstance(value, dict):  # plain containers only: a custom Mapping's items() may load data
        for key, item in itertools.islice(value.items(), _CONTAINER_LIMIT):
            yield f"{name}[{key!r}]", item, 1
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(itertools.islice(value, _CONTAINER_LIMIT)):
            yield f"{name}[{index}]", item, 1
    else:
        attributes = getattr(value, "__dict__", None)
        if isinstance(attributes, dict):
            # a module's own attributes, not its parameters, buffers, submodules or hooks
            internal = _module_containers() if isinstance(value, torch.nn.Module) else ()
            kept = ((k, v) for k, v in attributes.items() if k not in internal)
            for key, item in itertools.islice(kept, _CONTAINER_LIMIT):
                yield f"{name}.{key}", item, 1
        call = getattr(type(value), "__call__", None)
        if isinstance(call, types.FunctionType) and not isinstance(value, torch.nn.Module):
            yield name, call, 1  # a callable object: what its __call__ closes over


def _global_names(code: types.CodeType) -> list[str]:
    """The names a function's code looks up, its comprehensions' and nested functions' included."""
    names = list(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names += [n for n in _global_names(const) if n not in names]
    return names


def _cell_filled(cell: Any) -> bool:
    try:
        cell.cell_contents
    except ValueError:  # an empty cell: the variable is not assigned yet
        return False
    return True


def _rng_state(generator: Any) -> Any:
    kind = _generator_kind(generator)
    if kind == "torch":
        return generator.get_state()
    if kind == "python":
        return generator.getstate()
    if kind == "numpy":
        return copy.deepcopy(generator.bit_generator.state)
    return generator.get_state()


def _set_rng_state(generator: Any, state: Any) -> None:
    kind = _generator_kind(generator)
    if kind == "torch":
        generator.set_state(state)
    elif kind == "python":
        generator.setstate(state)
    elif kind == "numpy":
        generator.bit_generator.state = copy.deepcopy(state)
    else:
        generator.set_state(state)


def derived_seed(seed: int, salt: int, index: int) -> int:
    """A seed for the index-th private generator, a pure function of the run's seed and the salt."""
    digest = hashlib.blake2b(f"{seed}:{salt}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # non-negative and below 2**63


def reseed(generator: Any, seed: int) -> None:
    """Seed any generator :func:`find_generators` returns."""
    kind = _generator_kind(generator)
    if kind == "torch":
        generator.manual_seed(seed)
    elif kind == "python":
        generator.seed(seed)
    elif kind == "numpy":
        generator.bit_generator.state = type(generator.bit_generator)(seed).state
    else:
        generator.seed(seed % 2**32)


# -- saved values -------------------------------------------------------------------------------------------------

class _Saved:
    """A value as it was: a tensor is kept as (the object, a host copy) and put back into the same object."""

    __slots__ = ("obj", "copy", "is_tensor")

    def __init__(self, value: Any):
        import torch

        self.obj = value
        self.is_tensor = isinstance(value, torch.Tensor)
        self.copy = value.detach().to("cpu", copy=True) if self.is_tensor else copy.deepcopy(value)

    def put_back(self, device: Any = None) -> Any:
        """The saved object with its saved value (on ``device``, else where it is now); plain values as copies."""
        if not self.is_tensor:
            return copy.deepcopy(self.copy)
        _write(self.obj, self.copy, device)
        return self.obj


def _write(tensor: Any, saved: Any, device: Any = None) -> None:
    """Put ``saved`` (a host copy) into ``tensor`` in place; its dtype and shape come back too."""
    import torch

    device = tensor.device if device is None else device
    with torch.no_grad():
        if tensor.shape != saved.shape or tensor.dtype != saved.dtype or tensor.device != device:
            tensor.data = saved.to(device, copy=True)
        else:
            tensor.copy_(saved)


def _copy_container(value: Any) -> Any:
    return set(value) if isinstance(value, (set, frozenset)) else dict(value)


def _refill(container: Any, saved: Any) -> None:
    container.clear()
    container.update(saved)


_MODULE_CONTAINERS: Optional[frozenset[str]] = None


def _module_containers() -> frozenset[str]:
    """The dict and set attributes torch gives every module (parameters, buffers, submodules, hook dicts, ...)."""
    global _MODULE_CONTAINERS
    if _MODULE_CONTAINERS is None:
        import torch

        bare = torch.nn.Module().__dict__
        _MODULE_CONTAINERS = frozenset(k for k, v in bare.items() if isinstance(v, (dict, set)))
    return _MODULE_CONTAINERS


def _hook_words(key: str) -> Optional[str]:
    """``_forward_pre_hooks`` -> "forward pre-hook"; None for the flag dicts that shadow a hook dict."""
    if "hook" not in key or key.endswith(("_with_kwargs", "_always_called")) or "is_full" in key:
        return None
    words = key.strip("_").replace("_global_", "").replace("global_", "").replace("_hooks", "").replace("_", " ")
    return words.replace(" pre", " pre-").replace(" post", " post-") + ("hook" if words.endswith(("pre", "post"))
                                                                       else " hook")


def _article(words: str) -> str:
    return f"an {words}" if words[0] in "aeiou" else f"a {words}"


class _ModuleRecord:
    """One module object as it was, shallowly: class, attributes (by reference) and torch's containers' contents."""

    __slots__ = ("name", "module", "cls", "attrs", "containers")

    def __init__(self, name: str, module: Any):
        self.name, self.module, self.cls = name, module, type(module)
        self.attrs = dict(module.__dict__)
        self.containers = {k: _copy_container(self.attrs[k]) for k in _module_containers() if k in self.attrs}

    def changes(self) -> list[str]:
        module, name, now = self.module, self.name, self.module.__dict__
        found: list[str] = []
        if type(module) is not self.cls:
            found.append(f"changed the class of {name} to {type(module).__name__}")
        for key, label in (("_parameters", "parameter"), ("_modules", "submodule"), ("_buffers", "buffer")):
            before, after = self.containers.get(key, {}), now.get(key, {})
            found += [f"removed {label} {name}.{k}" for k in before if k not in after]
            found += [f"added {label} {name}.{k}" for k in after if k not in before]
            if key != "_buffers":  # a forward may rebuild a buffer (a rotary cache); swapping a weight is a check's doing
                found += [f"replaced {label} {name}.{k}" for k in before if k in after and after[k] is not before[k]]
        for key, before in self.containers.items():
            words = _hook_words(key)
            after = now.get(key, {})
            if words is not None and isinstance(before, dict):
                if any(k not in before for k in after):
                    found.append(f"left {_article(words)} on {name}")
                if any(k not in after for k in before):
                    found.append(f"removed {_article(words)} from {name}")
        found += [f"added attribute {name}.{k}" for k in now if k not in self.attrs]
        found += [f"removed attribute {name}.{k}" for k in self.attrs if k not in now]
        return found

    def restore(self) -> None:
        module, now = self.module, self.module.__dict__
        if type(module) is not self.cls:
            module.__class__ = self.cls
        for key in [k for k in now if k not in self.attrs]:
            del now[key]
        for key, value in self.attrs.items():
            if now.get(key, _MISSING) is not value:
                now[key] = value
        for key, saved in self.containers.items():
            _refill(self.attrs[key], saved)


class _TensorHooks:
    """The hooks registered on a tensor itself (``register_hook``, ``register_post_accumulate_grad_hook``)."""

    __slots__ = ("name", "tensor", "saved")
    KINDS = (("_backward_hooks", "gradient hook"), ("_post_accumulate_grad_hooks", "post-accumulate-grad hook"))

    def __init__(self, name: str, tensor: Any):
        self.name, self.tensor = name, tensor
        self.saved = {}
        for key, _ in self.KINDS:
            hooks = getattr(tensor, key, None)
            self.saved[key] = (hooks, None if hooks is None else dict(hooks))

    def changes(self) -> list[str]:
        found = []
        for key, words in self.KINDS:
            hooks, before = getattr(self.tensor, key, None), self.saved[key][1] or {}
            if hooks is not None and any(k not in before for k in hooks):
                found.append(f"left {_article(words)} on parameter {self.name}")
        return found

    def restore(self) -> None:
        for key, _ in self.KINDS:
            obj, contents = self.saved[key]
            if getattr(self.tensor, key, None) is not obj:
                setattr(self.tensor, key, obj)
            if obj is not None:
                _refill(obj, contents)


class _OptimizerRecord:
    """The optimizer as it was: the same list, group dicts, params lists, state dicts and tensors, their values."""

    def __init__(self, optimizer: Any):
        self.optimizer = optimizer
        self.attrs = dict(optimizer.__dict__)
        self.groups_list = optimizer.param_groups
        self.groups = [(group, list(group), group.get("params"), list(group.get("params") or ()),
                        {k: _Saved(v) for k, v in group.items() if k != "params"}) for group in optimizer.param_groups]
        self.defaults = {k: _Saved(v) for k, v in optimizer.defaults.items()}
        self.state_obj = optimizer.state
        # A state tensor that lived on its parameter's device follows the parameter (the runner may move modules).
        self.state = [(param, entry, {k: (_Saved(v), _follows(v, param)) for k, v in entry.items()})
                      for param, entry in optimizer.state.items()]
        self.hooks = {k: dict(v) for k, v in self.attrs.items() if "hook" in k and isinstance(v, dict)}

    def changes(self) -> list[str]:
        found = []
        now = self.optimizer.param_groups
        if len(now) != len(self.groups):
            found.append(f"changed the optimizer's param groups from {len(self.groups)} to {len(now)}")
        for key, before in self.hooks.items():
            after = getattr(self.optimizer, key, {})
            words = key.replace("_optimizer_", "").strip("_").replace("_hooks", "").replace("_", " ")
            if any(k not in before for k in after):
                found.append(f"left an optimizer {words} hook")
        return found

    def restore(self) -> None:
        optimizer, now = self.optimizer, self.optimizer.__dict__
        for key in [k for k in now if k not in self.attrs]:
            del now[key]
        for key, value in self.attrs.items():
            if now.get(key, _MISSING) is not value:
                now[key] = value
        self.groups_list[:] = [group for group, *_ in self.groups]
        for group, keys, params_list, params, values in self.groups:
            group.clear()
            for key in keys:
                group[key] = params_list if key == "params" else values[key].put_back()
            if params_list is not None:
                params_list[:] = params
        _refill(optimizer.defaults, {k: v.put_back() for k, v in self.defaults.items()})
        keep = {id(param) for param, _, _ in self.state}
        for param in [p for p in self.state_obj if id(p) not in keep]:
            del self.state_obj[param]
        for param, entry, values in self.state:
            entry.clear()
            for key, (saved, follows) in values.items():
                entry[key] = saved.put_back(param.device if follows else None)
            self.state_obj[param] = entry
        for key, contents in self.hooks.items():
            _refill(self.attrs[key], contents)


def _follows(value: Any, param: Any) -> bool:
    import torch

    return isinstance(value, torch.Tensor) and isinstance(param, torch.Tensor) and value.device == param.device


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


# -- fmcheck's own digest -----------------------------------------------------------------------------------------

def state_digest(pipeline: Pipeline, include_rng: bool = True) -> str:
    """A hash of every bit :class:`StateSnapshot` restores: two equal digests mean nothing was lost."""
    import numpy as np
    import torch

    digest = hashlib.sha256()

    def feed(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            data = value.detach().cpu().contiguous()
            digest.update(str((tuple(data.shape), data.dtype)).encode())
            digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"")
        elif isinstance(value, dict):
            for key in sorted(value, key=str):
                digest.update(str(key).encode())
                feed(value[key])
        elif isinstance(value, (list, tuple)):
            for item in value:
                feed(item)
        elif isinstance(value, np.ndarray):
            digest.update(value.tobytes())
        else:
            digest.update(repr(value).encode())

    modules = named_modules(pipeline)
    for name, tensor in _tensors(modules):
        digest.update(name.encode())
        feed(tensor)
        feed(id(tensor))
        if isinstance(tensor, torch.nn.Parameter):
            feed(tensor.requires_grad)
            feed(tensor.grad if tensor.grad is not None else "no-grad")
            feed([len(getattr(tensor, key, None) or ()) for key, _ in _TensorHooks.KINDS])
    for name, module in modules:
        feed([name, module.training, type(module).__name__, sorted(module.__dict__)])
        feed([(k, sorted(map(str, module.__dict__[k]))) for k in sorted(_module_containers())
              if k in module.__dict__])
    optimizer = pipeline.optimizer
    if optimizer is not None:
        feed(optimizer.state_dict())
        feed([id(optimizer.param_groups)] + [(id(g), id(g.get("params"))) for g in optimizer.param_groups])
    for obj in _stateful(pipeline):
        feed(obj.state_dict())
    feed([(home.__name__, key, len(value) if isinstance(value, (dict, set)) else value)
          for home, key, value, _ in _global_hooks()])
    if include_rng:
        feed(random.getstate())
        feed(np.random.get_state())
        feed(torch.get_rng_state())
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            feed(torch.cuda.get_rng_state_all())
        for found in find_generators(pipeline):
            feed(found.name)
            feed(_rng_state(found.generator))
    return digest.hexdigest()
