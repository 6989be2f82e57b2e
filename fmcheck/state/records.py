"""The per-object records of a snapshot: which modules and tensors the pipeline holds, values kept as host copies
and put back into the same objects, and one record per module object, per parameter's own hooks and for the
optimizer, each able to say in words what changed since it was taken (:meth:`changes`) and to undo it."""

from __future__ import annotations

import copy
from typing import Any, Iterator, Optional

from ..contract import Pipeline

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
