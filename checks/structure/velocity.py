"""Finding the velocity net and calling it: the I/O with the user's modules that the balance probes need.

The velocity net is the pipeline field ``velocity``, else the outermost trainable module called with the step's x_t
(forward pre-hooks during one step). ``_probe`` calls it again under the step's autocast state and one RNG state, so
that dropout masks match between calls. The `target` check reuses ``_find_velocity``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Optional

MAX_RECORDED_CALLS = 256  # candidate calls kept while looking for the module that receives x_t
CALL_SALT = 60_011  # the same RNG state before every probe call: dropout masks match between calls


@dataclass
class _Call:
    """One recorded call of a candidate velocity module (references to its arguments, not copies)."""

    name: str
    module: Any
    args: tuple
    kwargs: dict
    device_type: str
    autocast: bool
    autocast_dtype: str


@dataclass
class _Found:
    call: Optional[_Call] = None
    x_slot: Any = None
    how: str = ""
    reason: Optional[str] = None  # why the balance cannot be measured
    outputs: Any = None
    notes: list = field(default_factory=list)


def _first_tensor(args: tuple, kwargs: dict):
    import torch

    for value in [*args, *kwargs.values()]:
        if isinstance(value, torch.Tensor):
            return value
    return None


def _autocast_state(device_type: str) -> tuple[bool, str]:
    import torch

    enabled = bool(torch.is_autocast_enabled(device_type))
    return enabled, str(torch.get_autocast_dtype(device_type)) if enabled else ""


def _module_names(pipeline) -> list[tuple[str, Any]]:
    """(qualified name, module) for every trainable module and submodule, each module once, outermost first."""
    seen: set[int] = set()
    named = []
    for key, root in pipeline.trainable_modules().items():
        for sub, module in root.named_modules(prefix=key):
            if id(module) not in seen:
                seen.add(id(module))
                named.append((sub, module))
    return named


def _record_calls(ctx, batch, modules: list[tuple[str, Any]], shape_filter) -> tuple[Any, list[_Call]]:
    """Run the step once (no grad) with forward pre-hooks on ``modules``; returns (outputs, recorded calls)."""
    calls: list[_Call] = []

    def make_hook(name: str):
        def hook(module, args, kwargs):
            if len(calls) >= MAX_RECORDED_CALLS or not shape_filter(args, kwargs):
                return None
            first = _first_tensor(args, kwargs)
            device_type = first.device.type if first is not None else "cpu"
            enabled, dtype = _autocast_state(device_type)
            calls.append(_Call(name, module, tuple(args), dict(kwargs), device_type, enabled, dtype))
            return None

        return hook

    handles = []
    try:
        for name, module in modules:
            handles.append(module.register_forward_pre_hook(make_hook(name), with_kwargs=True))
        outputs = ctx.run_step(batch, step_index=0, grad=False)
    finally:
        for handle in handles:
            handle.remove()
    return outputs, calls


def _find_velocity(ctx, batch) -> _Found:
    """Which module maps (x_t, t, ...) to v_pred, and its arguments in this step."""
    import torch

    from .. import _structure_math as sm

    pipeline = ctx.pipeline
    reference = ctx.outputs(0)
    xt_ref = reference["xt"] if isinstance(reference.get("xt"), torch.Tensor) else None
    if pipeline.velocity is not None:
        modules = [("velocity", pipeline.velocity)]
        how = "pipeline field 'velocity'"

        def shape_filter(args, kwargs):
            return True
    else:
        if xt_ref is None or xt_ref.dim() == 0:
            outputs = ctx.run_step(batch, step_index=0, grad=False)
            return _Found(reason="no pipeline field 'velocity' and no step output 'xt' to find it by",
                          outputs=outputs)
        modules = _module_names(pipeline)
        how = "found by forward hooks: the outermost trainable module called with the step's x_t"
        size, numel = xt_ref.shape[0], xt_ref.numel()

        def shape_filter(args, kwargs):
            return any(isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == size and v.numel() == numel
                       for _, v in sm.iter_slots(args, kwargs))

    outputs, calls = _record_calls(ctx, batch, modules, shape_filter)
    xt = outputs["xt"] if isinstance(outputs.get("xt"), torch.Tensor) else None
    found = _Found(how=how, outputs=outputs)
    if not calls:
        found.reason = ("pipeline field 'velocity' was not called during the step" if pipeline.velocity is not None
                        else "no trainable module was called with a tensor shaped like the step's 'xt'")
        return found
    if xt is None:
        found.call = calls[0]
        found.reason = "the step returns no 'xt' to find among the velocity net's arguments"
        slot = _slot_shaped_like_output(ctx, calls[0])
        if slot is not None:  # a loss-only step: x_t is the argument the prediction is shaped like
            found.x_slot, found.reason = slot, None
            found.notes.append(f"the step returns no 'xt': x_t taken as the velocity net's {sm.slot_name(slot)}, "
                               "the argument shaped like its output")
        return found
    for call in calls:
        slot = sm.find_slot(call.args, call.kwargs, xt)
        if slot is not None:
            found.call, found.x_slot = call, slot
            break
    if found.call is None:  # Flux-style packing: the same elements as x_t in another layout (tokens)
        for call in calls:
            slot = _packed_slot(call, xt)
            if slot is not None:
                found.call, found.x_slot = call, slot
                found.notes.append(f"x_t reaches the velocity net packed: {sm.slot_name(slot)} holds the step's "
                                   "x_t in another layout")
                break
    if found.call is None:
        found.call = calls[0]
        found.reason = ("none of the velocity net's arguments equals the step's 'xt'" if pipeline.velocity is not None
                        else "no trainable module was called with the step's 'xt'")
        if pipeline.velocity is None:
            found.call = None
    if len(calls) >= MAX_RECORDED_CALLS:
        found.notes.append(f"only the first {MAX_RECORDED_CALLS} candidate calls were recorded")
    return found


def _slot_shaped_like_output(ctx, call: _Call):
    """The only floating-point argument with the shape of the module's output (x_t for a velocity net), or None."""
    import torch

    from .. import _structure_math as sm

    first = _first_tensor(call.args, call.kwargs)
    if first is None or not first.dim():
        return None
    output = _probe(ctx, call, call.args, call.kwargs, int(first.shape[0]))
    slots = [slot for slot, value in sm.iter_slots(call.args, call.kwargs) if isinstance(value, torch.Tensor)
             and value.is_floating_point() and tuple(value.shape) == tuple(output.shape)]
    return slots[0] if len(slots) == 1 else None


def _packed_slot(call: _Call, xt):
    """The argument holding the step's x_t with its elements in another layout, or None."""
    import torch

    from .. import _structure_math as sm

    for slot, value in sm.iter_slots(call.args, call.kwargs):
        if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == xt.shape[0] and \
                value.numel() == xt.numel() and value.is_floating_point() and sm.layout_map(value, xt) is not None:
            return slot
    return None


FIRST_INPUTS = 64  # leaf-module inputs kept, in call order, when looking for the time features


def _probe(ctx, call: _Call, args: tuple, kwargs: dict, batch: int, hidden: bool = False, first: int = 0):
    """Call the velocity module once, under the step's autocast state and the same RNG state every time.

    ``hidden``: return (name, input) of the last leaf module called (the output layer's input) instead of the
    output; ``first``: return the (name, input) of the first ``first`` leaf-module calls instead."""
    import torch

    from .. import _structure_math as sm

    ctx.seed_everything(salt=CALL_SALT)
    autocast = (torch.autocast(call.device_type, dtype=getattr(torch, call.autocast_dtype.split(".")[-1]))
                if call.autocast else contextlib.nullcontext())
    last: list = []  # (name, first input) of the last leaf module called: the output layer
    seen: list = []  # (name, first input) of the first leaf-module calls
    handles = []
    if hidden or first:
        def record(name):
            def hook(module, inputs):
                value = _first_tensor(tuple(inputs), {})
                if value is not None and value.is_floating_point() and value.dim() and value.shape[0] == batch:
                    last[:] = [(name, value.detach())]
                    if len(seen) < first:
                        seen.append((name, value.detach()))
            return hook

        for name, sub in call.module.named_modules():
            if not list(sub.children()) and sub is not call.module:
                handles.append(sub.register_forward_pre_hook(record(name)))
    try:
        with torch.no_grad(), autocast:
            out = call.module(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    tensor = sm.output_tensor(out, batch)
    if tensor is None:
        raise TypeError(f"the velocity module returned a {type(out).__name__} without a tensor")
    if first:
        return seen
    if hidden:
        return last[0] if last else (None, None)
    return tensor

