"""`structure`: the seed's remaining gotchas: time-conditioning balance, precision, and the modes of frozen modules.

Time: the velocity net is called on the step's own arguments, then with t permuted across the batch and with x_t
permuted across the batch; the relative output changes say whether time dominates the net or is ignored by it.
Precision: fp16 compute without loss scaling, x_t in half precision, non-finite step outputs. Modes: frozen modules with
mode-dependent layers (dropout, batch-norm, ...: checks/_modes.py) active in train mode, or with parameters that
require grad.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Optional

from pydantic import Field

from fmcheck.api import Check, CheckDoc, Judgement, Thresholds
from fmcheck.judges import flag, info
from fmcheck.report import Measurement
from fmcheck.verdict import Verdict

MAX_RECORDED_CALLS = 256  # candidate calls kept while looking for the module that receives x_t
CALL_SALT = 60_011  # the same RNG state before every probe call: dropout masks match between calls
FP16 = "torch.float16"
HALF = (FP16, "torch.bfloat16")
T_CORRELATION = 0.99  # |Pearson r| between an argument and the step's t for that argument to be taken for t


class StructureThresholds(Thresholds):
    time_dominates_ratio: float = Field(
        1.0, gt=0, description="(output change with t permuted) / (output change with x_t permuted) above this "
                               "warns: at init the time conditioning moves the velocity more than the whole x_t does")
    time_ignored_ratio: float = Field(
        0.01, ge=0, description="the same ratio below this warns: the velocity barely depends on t (t in the wrong "
                                "units for its embedding, or t dropped)")
    time_features_aliased: float = Field(
        0.25, gt=0, le=1, description="the smoothest time feature's mean squared step between samples adjacent in t, "
                                     "over twice its variance, above this warns: every feature jumps at random "
                                     "between neighbouring t (t too large for a sinusoidal embedding)")
    time_features_min: float = Field(
        0.01, ge=0, description="when the net is blind to t at its current weights (zero-initialised blocks), its "
                                "time features (the first layer input that follows t) must vary across the batch "
                                "by at least this (||F - mean|| / ||F||); below, t is in the wrong units")


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

    from . import _structure_math as sm

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

    from . import _structure_math as sm

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

    from . import _structure_math as sm

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

    from . import _structure_math as sm

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


def _time_features(ctx, call: _Call, batch: int, calls: tuple, t_samples=None) -> Optional[dict[str, Any]]:
    """The first leaf-module input that follows t and not x_t (the time embedding's features), and how much it varies
    across the batch: ||F - mean over the batch|| / ||F||. ``calls``: (args, kwargs) as is, t permuted, x_t
    permuted."""
    from . import _structure_math as sm

    base, with_t, with_x = (_probe(ctx, call, a, k, batch, first=FIRST_INPUTS) for a, k in calls)
    found: Optional[dict[str, Any]] = None
    for (name, b), (name_t, t_in), (name_x, x_in) in zip(base, with_t, with_x):
        if not (name == name_t == name_x) or b.shape != t_in.shape or b.shape != x_in.shape:
            break
        moves_t, moves_x = sm.relative_change(t_in, b) > 1e-6, sm.relative_change(x_in, b) > 1e-9
        if found is None and moves_t and not moves_x and b[0].numel() > 1:  # features, not t itself
            flat = b.reshape(batch, -1).double()
            total = float(flat.norm())
            spread = float((flat - flat.mean(0, keepdim=True)).norm()) / total if total > 0 else 0.0
            found = {"module": name, "spread": spread, "mixes": None,
                     "roughness": sm.smoothest_roughness(flat, t_samples) if t_samples is not None else None}
        elif found is not None and moves_t and moves_x:
            # where t meets x_t: the embedding is used, only the weights after it are blind (zero-initialised)
            found["mixes"] = name
            break
    return found


def _balance(ctx, found: _Found) -> dict[str, Any]:
    """The relative output changes with t and with x_t permuted across the batch."""
    import torch

    from . import _structure_math as sm

    call, outputs = found.call, found.outputs
    result: dict[str, Any] = {"measured": False, "reason": found.reason}
    if found.reason is not None or call is None:
        return result
    x_value = sm.get_slot(call.args, call.kwargs, found.x_slot)
    batch = int(x_value.shape[0])
    if batch < 2:
        result["reason"] = f"the batch holds {batch} sample; permuting needs at least 2"
        return result
    t_out = outputs.get("t")
    t_slot, corr, how = sm.find_time_slot(call.args, call.kwargs, batch,
                                          t_out if isinstance(t_out, torch.Tensor) else None,
                                          exclude=found.x_slot, min_correlation=T_CORRELATION)
    if t_slot is None:
        result["reason"] = f"cannot tell which argument is t: {how}"
        return result
    t_value = sm.get_slot(call.args, call.kwargs, t_slot)
    t_samples = sm.per_sample_scalar(t_value, batch)
    if float(t_samples.max() - t_samples.min()) == 0:
        result["reason"] = "t is the same for every sample of the batch; permuting it changes nothing"
        return result
    perm = sm.derangement(batch, ctx.generator(salt=CALL_SALT))
    base = _probe(ctx, call, call.args, call.kwargs, batch)
    again = _probe(ctx, call, call.args, call.kwargs, batch)
    t_args, t_kwargs = sm.replace_slot(call.args, call.kwargs, t_slot, sm.permuted(t_value, perm))
    with_t = _probe(ctx, call, t_args, t_kwargs, batch)
    x_args, x_kwargs = sm.replace_slot(call.args, call.kwargs, found.x_slot, sm.permuted(x_value, perm))
    with_x = _probe(ctx, call, x_args, x_kwargs, batch)
    noise = sm.relative_change(again, base)
    t_change, x_change = sm.relative_change(with_t, base), sm.relative_change(with_x, base)
    floor = max(10 * noise, 1e-6)
    ratio, state = sm.balance(t_change, x_change, floor)
    where = "output"
    if state == "both flat":
        # a zero-initialised output layer (torchcfm's UNet): measure where the time signal is, the input of the
        # last layer (the last hidden activation), with the same permutations
        probes = [_probe(ctx, call, a, k, batch, hidden=True) for a, k in
                  ((call.args, call.kwargs), (call.args, call.kwargs), (t_args, t_kwargs), (x_args, x_kwargs))]
        if all(h is not None for _, h in probes):
            (layer, base_h), (_, again_h), (_, with_t_h), (_, with_x_h) = probes
            noise = sm.relative_change(again_h, base_h)
            t_change, x_change = sm.relative_change(with_t_h, base_h), sm.relative_change(with_x_h, base_h)
            floor = max(10 * noise, 1e-6)
            ratio, state = sm.balance(t_change, x_change, floor)
            where = f"last hidden activation (the input of {layer}; the output is flat)"
    # does the time embedding resolve t? flat features (t too small for it) or aliased ones (t too large: a
    # sinusoidal embedding fed timesteps where it expects t / 1000) show at its input, whatever the weights after it
    result["features"] = _time_features(ctx, call, batch, ((call.args, call.kwargs), (t_args, t_kwargs),
                                                           (x_args, x_kwargs)), t_samples)
    slope = offset = None
    if isinstance(t_out, torch.Tensor):
        reference = sm.per_sample_scalar(t_out, batch)
        if reference is not None:
            slope, offset = sm.affine_fit(reference, t_samples)
    result.update(measured=True, reason=None, batch=batch, t_change=t_change, x_change=x_change, noise=noise,
                  where=where,
                  ratio=ratio, state=state, t_slot=sm.slot_name(t_slot), x_slot=sm.slot_name(found.x_slot),
                  t_how=how, t_correlation=corr, t_slope=slope, t_offset=offset,
                  t_range=[float(t_samples.min()), float(t_samples.max())])
    return result


def _frozen_modules(pipeline) -> dict[str, Any]:
    import torch

    modules = {str(k): m for k, m in pipeline.frozen_modules().items()}
    vae = pipeline.vae
    if isinstance(vae, torch.nn.Module) and all(m is not vae for m in modules.values()):
        modules["vae" if "vae" not in modules else "pipeline field 'vae'"] = vae
    return modules


def _modes(modules: dict[str, Any]) -> dict[str, dict[str, Any]]:
    from ._modes import active_layers

    state = {}
    for name, module in modules.items():
        grad = [(n, p.numel()) for n, p in module.named_parameters() if p.requires_grad]
        state[name] = {"training": bool(module.training), "active": active_layers(module),
                       "grad_tensors": len(grad), "grad_elements": int(sum(n for _, n in grad)),
                       "grad_names": [n for n, _ in grad[:3]],
                       "tensors": sum(1 for _ in module.parameters())}
    return state


def _merge_modes(before: dict, after: dict) -> dict:
    """A mode or flag seen before or after the step counts (the step itself may switch a module to train mode or
    turn its requires_grad on)."""
    merged = {}
    for name, first in before.items():
        second = after.get(name, first)
        grad = first if first["grad_tensors"] >= second["grad_tensors"] else second
        kinds = set(first["active"]) | set(second["active"])
        merged[name] = {**grad, "training": first["training"] or second["training"],
                        "switched_by_step": first["training"] != second["training"],
                        "grad_by_step": first["grad_tensors"] < second["grad_tensors"],
                        "active": {k: max(first["active"].get(k, 0), second["active"].get(k, 0)) for k in kinds}}
    return merged


def _dtype(value: Any) -> Optional[str]:
    import torch

    return str(value.dtype) if isinstance(value, torch.Tensor) else None


def _precision(ctx, found: _Found) -> dict[str, Any]:
    outputs = found.outputs
    call = found.call
    param_dtype = None
    module = call.module if call is not None else ctx.pipeline.velocity
    if module is not None:
        for param in module.parameters():
            if param.is_floating_point():
                param_dtype = str(param.dtype)
                break
    scaler = ctx.pipeline.grad_scaler
    enabled = getattr(scaler, "is_enabled", None)
    return {
        "autocast": call.autocast if call is not None else None,
        "autocast_dtype": call.autocast_dtype if call is not None else None,
        "autocast_device": call.device_type if call is not None else None,
        "param_dtype": param_dtype,
        "v_pred": _dtype(outputs.get("v_pred")),
        "xt": _dtype(outputs.get("xt")),
        "x0": _dtype(outputs.get("x0")),
        "x1": _dtype(outputs.get("x1")),
        "scaler": scaler is not None,
        "scaler_enabled": scaler is not None and (bool(enabled()) if callable(enabled) else True),
    }


def _non_finite(ctx) -> list[dict[str, Any]]:
    """Every step output with a NaN or Inf, over the cached outputs of the measuring batches."""
    import torch

    found: list[dict[str, Any]] = []
    per_device: dict[Any, list] = {}
    for index, out in enumerate(ctx.all_outputs()):
        for key in out:
            value = out[key]
            if isinstance(value, torch.Tensor):
                if value.is_floating_point() or value.is_complex():
                    per_device.setdefault(value.device, []).append(((index, key), (~torch.isfinite(value)).sum()))
            elif isinstance(value, float) and not math.isfinite(value):
                found.append({"batch": index, "key": key, "count": 1})
    for entries in per_device.values():
        counts = torch.stack([c for _, c in entries]).cpu().tolist()  # one transfer per device
        found.extend({"batch": i, "key": k, "count": int(n)} for ((i, k), _), n in zip(entries, counts) if n)
    return sorted(found, key=lambda f: (f["batch"], f["key"]))


class StructureCheck(Check):
    id = "structure"
    title = "Time conditioning, precision, modes"
    purpose = ("Velocity net's sensitivity to t vs x_t (time dominates / ignored), fp16 without loss scaling, "
               "frozen modules with dropout / batch-norm active.")
    order = 60
    Thresholds = StructureThresholds
    doc = CheckDoc(
        what=(
            "Three groups of measurements on one fresh, seeded forward of the user's step (no autograd) and the "
            "cached outputs of the measuring batches.\n\n"
            "**Time-conditioning balance.** The velocity net is the pipeline field `velocity`, else the outermost "
            "trainable module (or submodule) whose forward receives the step's `xt` (found with forward pre-hooks "
            "during the step; the report names the module). Its call arguments are captured, and which argument is "
            "x_t (the tensor equal to the step's `xt`, also after a reshape or cast) and which is t (the per-sample "
            "scalar that correlates with the step's `t` at |r| >= 0.99: t itself, 1 - t, t * 1000, "
            "integer timesteps) is identified. The module is then called three times more on the same arguments, "
            "under the step's autocast state and the same RNG state (dropout masks match): as is, with t permuted "
            "across the batch (a random cycle: every sample gets another sample's t) and with x_t permuted across "
            "the batch. Reported: the relative output changes ||f(t permuted) - f|| / ||f|| and "
            "||f(x_t permuted) - f|| / ||f||, their ratio (t over x_t), and the affine map from the step's t to the "
            "argument the net receives (its units and range). Ratio above `time_dominates_ratio` warns (time "
            "dominates: at init t moves the output more than the whole x_t does), below `time_ignored_ratio` warns "
            "(time ignored). If the output moves with neither (a zero-initialised output layer, as torchcfm's UNet), "
            "the same probes are measured at the last hidden activation (the input of the last layer called); "
            "x_t passed packed (Flux-style tokens, the same elements in another layout) is matched to the step's "
            "`xt` by its values. A balance that could not be measured warns with the reason: a probe that did not "
            "measure is never a PASS. A net whose output and last hidden activation do not move with t at all, "
            "while t does reach a layer input that also depends on x_t (t embedded and added, then multiplied by "
            "zero-initialised weights: torchcfm's UNet, adaLN-zero blocks), is judged at its time features "
            "instead: the first layer input that follows t and not x_t must vary across the batch by at least "
            "`time_features_min` (||F - mean|| / ||F||). `fmcheck structure --module "
            "fixtures.libs.torchcfm_sigma01_unet:build` measures 0.0792 at time_embed.0 (PASS); the same net fed "
            "t / 1000 measures 8.0e-05 (WARN: t in the wrong units). A t that never meets x_t (embedded, then "
            "dropped) still warns. The same time features also show t too large for a sinusoidal embedding: with the "
            "samples sorted by t, the smoothest feature's mean squared step over twice its variance is about 1 when "
            "every feature jumps at random between neighbouring t (aliased) and small when some feature follows t "
            "(above `time_features_aliased` warns; judged with at least 16 distinct t). Measured: 0.002-0.013 on "
            "every correct fixture (digits, SD3, Flux, flow_matching, torchcfm), 0.51 for "
            "`fixtures/libs/diffusers_flux_timesteps_not_divided.py` (Flux fed timesteps where it expects "
            "timesteps / 1000).\n\n"
            "Calibration (untrained networks, default init): x_t, a high-dimensional input on the main path, should "
            "move the output more than the scalar t does, while t still moves it by a few percent of that. The "
            "digits velocity net (sinusoidal embedding -> MLP -> per-block scale/shift) gives 0.032-0.047 across "
            "its correct variants; other default-init designs measured 0.02-0.23 (a DDPM-style additive time "
            "embedding, raw t concatenated to the input, an embedding table with std 0.1). The planted bugs: time "
            "embedding 100x too loud 1.5 on digits (1.3-19 on other designs); t divided by 1000 on its way into "
            "the digits net 0.0038; t dropped 0.\n\n"
            "**Precision.** fp16 compute in the velocity forward (autocast with dtype float16 seen from inside the "
            "forward, or float16 parameters, or a float16 `v_pred`) without an enabled `grad_scaler` warns; bf16 "
            "needs none. `xt` in half precision (float16/bfloat16) while `x0`/`x1` are float32 warns. Any NaN or "
            "Inf in any step output, over the measuring batches, fails (the key and batch are named).\n\n"
            "**Modes.** The frozen modules (pipeline field `frozen`, plus `vae`), inspected before and after the "
            "step. Train mode matters only through layers whose forward differs in it, so fmcheck looks for those "
            "in train mode: dropout with p > 0 (`nn.Dropout*`, `AlphaDropout`), normalisation with running "
            "statistics (`BatchNorm*`, `SyncBatchNorm`, `InstanceNorm` with `track_running_stats`), RNN or "
            "`MultiheadAttention` dropout > 0, stochastic depth (`DropPath`, `StochasticDepth`, `DropBlock`), and "
            "any module holding a numeric `*drop*` probability > 0 (attention layers that apply dropout only in "
            "training). Any such layer active in a frozen module warns, whether the module itself is in train "
            "mode or its parent is in eval; a frozen module in train mode without any is reported in the summary "
            "and measurements, not warned about (diffusers' AutoencoderKL: dropout p = 0, GroupNorm). Parameters "
            "with requires_grad=True warn (named and counted; the `target` check's gradient audit says whether "
            "they actually receive gradient)."
        ),
        why=(
            "The seed's gotchas beyond scale, target and KL. A sinusoidal/MLP time embedding with too large an "
            "amplitude dominates the network (the seed's fix: a LayerNorm or a small initialisation): the net then "
            "learns a function of t first and x_t second. The opposite is as costly and more silent: t in [0, 1] "
            "fed to an embedding built for timesteps in [0, 1000] (or t dropped on the way) gives an embedding "
            "that barely moves, and the net must learn the velocity field without knowing where on the path it "
            "is. fp16 without loss scaling underflows small gradients to zero; x_t built in half precision loses "
            "the small differences between nearby t. A frozen VAE or text encoder left in train mode keeps "
            "dropout noise (and, for some VAEs, posterior noise or batch statistics) in what should be fixed "
            "targets and conditions."
        ),
        bug_example=(
            "emb = self.time_mlp(sinusoidal(t)) * 100        # or a large init of the time MLP: time dominates\n"
            "v = net(x_t, t / 1000, q)                       # t already in [0, 1]: the embedding sees [0, 0.001]\n"
            "with torch.autocast('cuda', dtype=torch.float16): loss = step(batch)   # no GradScaler\n"
            "model.train()                                   # also switches the frozen VAE / text encoder to train"
        ),
        fix=(
            "Time dominates: normalise the time embedding (LayerNorm after the MLP), initialise its last layer "
            "small, or check the sin/cos amplitude. Time ignored: feed t in the units the embedding was built for "
            "(multiply t in [0, 1] by the number of training timesteps, or build the embedding for [0, 1]) and "
            "make sure t reaches the net. fp16: use torch.amp.GradScaler (scaler.scale(loss).backward(), "
            "scaler.step(opt), scaler.update()) and set the pipeline field `grad_scaler`, or use bfloat16. Build "
            "x_t in float32 and let autocast cast inside the net. Modes: call .eval() and .requires_grad_(False) on "
            "frozen modules after any model.train(), and never put them in the optimizer."
        ),
        causes=(
            "a time-embedding MLP or sin/cos features with a large scale (no normalisation after it)",
            "t in [0, 1] divided again by the number of timesteps, or timesteps 0..1000 fed to an embedding that "
            "multiplies by 1000 itself",
            "t dropped or detached into a constant on the way to the net (e.g. t.mean(), a Python float)",
            "torch.autocast(dtype=torch.float16) without torch.amp.GradScaler",
            "x_t = (1 - t) * x0.half() + t * x1.half() instead of building it in float32",
            "a global model.train() that also reaches the frozen VAE / text encoder; frozen modules never given "
            "requires_grad_(False)",
        ),
        blind_spots=(
            "The balance is measured at the current weights (usually the initialisation): it judges the "
            "architecture's time pathway, not what training will make of it.",
            "t in the wrong units is caught when it leaves the output nearly blind to t (the digits net: ratio "
            "0.0038). Where the x_t path is weak relative to the time path, the same bug may only lower the ratio "
            "about 10x (e.g. 0.23 -> 0.021 in an additive-embedding net) and pass; the t argument's scale and "
            "range are in the report for a human to read.",
            "nn.Embedding's default N(0, 1) initialisation used as a timestep table is louder than default Linear "
            "features and warns as 'time dominates': that is the seed's gotcha, not a false alarm.",
            "A sinusoidal embedding fed t x1000 where it expected [0, 1] aliases rather than saturates: the output "
            "still moves with t and the balance passes; the time-feature roughness catches it when every feature "
            "aliases (not when the embedding's lowest frequencies still resolve the larger t).",
            "t and x_t must be separate, top-level arguments of the velocity module (nested containers and a "
            "tensor that concatenates x_t and t are not taken apart); otherwise the balance is not measured and "
            "warns with the reason.",
            "A net blind to t at initialisation is judged at its time features (flat or aliased); a time embedding "
            "that is not a sinusoid of t (a learned table, raw t concatenated to x_t) has no separate time features "
            "and only the output balance applies. A net blind to t in another way (identical time parameters, or t meeting x_t beyond the first "
            "64 layer calls) warns 'time ignored ... changes nothing', naming both causes; the balance is not "
            "re-measured after training steps.",
            "Autocast entered inside the velocity module's own forward is seen only through v_pred's dtype.",
            "x_t built in half precision and cast back to float32 has float32 dtype; the `target` check's path fit "
            "sees its rounding error instead.",
            "A frozen module whose own forward branches on self.training (rather than through one of the layers "
            "above) is not seen: such a branch cannot be told from a harmless one (diffusers calls .contiguous() "
            "in training) without running both modes.",
        ),
    )

    def measure(self, ctx) -> dict[str, Any]:
        batch = ctx.batches(1)[0]
        frozen = _frozen_modules(ctx.pipeline)
        before = _modes(frozen)
        found = _find_velocity(ctx, batch)
        after = _modes(frozen)
        observation = {
            "velocity": found.call.name if found.call is not None else None,
            "velocity_class": type(found.call.module).__name__ if found.call is not None else None,
            "velocity_how": found.how,
            "balance": _balance(ctx, found),
            "precision": _precision(ctx, found),
            "non_finite": _non_finite(ctx),
            "modes": _merge_modes(before, after),
            "notes": found.notes,
        }
        return observation

    def judge(self, obs: dict[str, Any], th: StructureThresholds) -> Judgement:
        measurements: list[Measurement] = []  # the verdict-bearing ones first (the report's headline)
        extra: list[Measurement] = []  # the numbers behind the balance
        findings: list[tuple[Verdict, str, str]] = []  # (verdict, summary text, hint)
        self._judge_balance(obs, th, measurements, extra, findings)
        self._judge_precision(obs, measurements, findings)
        self._judge_modes(obs, measurements, findings)
        measurements += extra
        details = {"velocity": obs["velocity"], "velocity_how": obs["velocity_how"],
                   "balance": {k: v for k, v in obs["balance"].items()
                               if k in ("t_change", "x_change", "ratio", "noise", "t_slope", "t_offset", "reason",
                                        "where", "features")},
                   "modes": obs["modes"], "notes": obs["notes"]}
        # a sub-measurement that could not be made (SKIP) does not make the check a SKIP
        verdict = Verdict.worst(m.verdict for m in measurements if m.verdict is not Verdict.SKIP)
        if not findings:
            return Judgement(measurements, _quiet_summary(obs), verdict=verdict, details=details)
        findings.sort(key=lambda f: -f[0].severity)
        summary = "; ".join(text for _, text, _ in findings)
        hint = " ".join(dict.fromkeys(h for _, _, h in findings if h))
        return Judgement(measurements, summary, hint=hint, verdict=verdict, details=details)

    # -- the three groups -------------------------------------------------------------------------------------
    @staticmethod
    def _judge_balance(obs, th, measurements, extra, findings) -> None:
        balance = obs["balance"]
        where = obs["velocity"] or "none found"
        if obs["velocity"]:
            where = f"{obs['velocity']} ({obs['velocity_class']})"
        extra.append(info("velocity module", where, expected=obs["velocity_how"]))
        expected = f"{th.time_ignored_ratio:g}..{th.time_dominates_ratio:g}"
        if not balance["measured"]:
            # a probe that did not measure is never a PASS: a t x 1000 bug would go unnoticed
            measurements.append(Measurement(name="t / x_t sensitivity", value=None, expected=expected,
                                            verdict=Verdict.WARN, unit=f"not measured: {balance['reason']}"))
            findings.append((Verdict.WARN, f"time balance not measured: {balance['reason']}",
                             "Let the check find the velocity net and its x_t and t arguments: declare the pipeline "
                             "field 'velocity', return the step's 'xt' and 't', and pass x_t and t to it as "
                             "separate arguments."))
            return
        if balance.get("where", "output") != "output":
            extra.append(info("balance measured at", balance["where"]))
        if balance["t_slope"] is not None:
            extra.append(info("t argument / step t", balance["t_slope"], unit="x",
                                     expected=f"{balance['t_slot']}: {balance['t_slope']:.4g} * t + "
                                              f"{balance['t_offset']:.3g}, range {balance['t_range'][0]:.3g}.."
                                              f"{balance['t_range'][1]:.3g}"))
        extra.append(info("output change, t permuted", balance["t_change"], unit="rel",
                                 expected="||f(t perm) - f|| / ||f||"))
        extra.append(info("output change, x_t permuted", balance["x_change"], unit="rel",
                                 expected="||f(x_t perm) - f|| / ||f||"))
        ratio, state = balance["ratio"], balance["state"]
        if state == "both flat":
            measurements.append(Measurement(
                name="t / x_t sensitivity", value=None, expected=expected, verdict=Verdict.WARN,
                unit="not measurable: the output (and its last hidden activation) moves with neither t nor x_t"))
            findings.append((Verdict.WARN, "time balance not measurable: the velocity net's output and last hidden "
                                           "activation move with neither t nor x_t",
                             "Check that x_t and t reach the net (no detach into constants); a zero-initialised "
                             "net is measured at its last hidden activation, so this one ignores both."))
            return
        features = balance.get("features")
        rough = features.get("roughness") if features else None
        if rough is not None:
            aliased = rough > th.time_features_aliased
            measurements.append(flag("time features follow t smoothly", not aliased, value=_round(rough),
                                     unit="rel", expected=f"<= {th.time_features_aliased:g} (the smoothest feature "
                                                          f"at {features['module']})", bad=Verdict.WARN))
            if aliased:
                findings.append((Verdict.WARN, f"the time embedding aliases t: no time feature at "
                                               f"{features['module']} varies smoothly across the batch (smoothest "
                                               f"{rough:.3g} > {th.time_features_aliased:g}; the net receives "
                                               f"{balance['t_range'][0]:.4g}..{balance['t_range'][1]:.4g}): t is too "
                                               "large for its embedding",
                                 "Feed t in the units the embedding was built for: e.g. diffusers' Flux transformer "
                                 "takes timesteps / 1000 (it multiplies by 1000 itself), SD3 takes timesteps."))
        if ratio > th.time_dominates_ratio:
            verdict = Verdict.WARN
            findings.append((verdict, f"time dominates the velocity net: permuting t moves its output "
                                      f"{balance['t_change']:.3g} vs {balance['x_change']:.3g} for x_t "
                                      f"(ratio {ratio:.3g} > {th.time_dominates_ratio:g})",
                             "Normalise the time embedding (LayerNorm after its MLP) or initialise its last layer "
                             "small; check the amplitude of the sin/cos features and of the t argument."))
        elif ratio < th.time_ignored_ratio:
            verdict = Verdict.WARN
            units = ""
            if balance["t_slope"] is not None:
                units = f"; the net receives {balance['t_slope']:.4g} * t, range " \
                        f"{balance['t_range'][0]:.3g}..{balance['t_range'][1]:.3g}"
            blind = balance["t_change"] <= max(10 * balance["noise"], 1e-6)
            features = balance.get("features")
            if blind and features is not None and features["mixes"] is not None:
                spread = features["spread"]
                resolved = spread >= th.time_features_min
                extra.append(info("time features across the batch", _round(spread), unit="rel",
                                  expected=f">= {th.time_features_min:g} at {features['module']} (the first layer "
                                           f"input that follows t; t meets x_t at {features['mixes']})"))
                if resolved:  # blind downstream only (zero-initialised blocks): the time pathway itself is sound
                    measurements.append(Measurement(
                        name="t / x_t sensitivity", value=_round(ratio), unit="x", verdict=Verdict.PASS,
                        expected=f"{expected}; blind at these weights, judged at the time features instead"))
                    return
                findings.append((verdict, f"time ignored by the velocity net, and its time features at "
                                          f"{features['module']} barely vary across the batch ({spread:.3g} < "
                                          f"{th.time_features_min:g}){units}: t is in the wrong units for its "
                                          "embedding",
                                 "Feed t in the units its embedding was built for (e.g. no extra division by the "
                                 "number of timesteps) and check that t reaches the net per sample."))
            elif blind:  # no effect at all: t dropped, or a net blind to t by construction until it is trained
                findings.append((verdict, f"time ignored by the velocity net: permuting t changes nothing "
                                          f"({balance['t_change']:.3g} vs {balance['x_change']:.3g} for x_t){units}: "
                                          "t is dropped on the way, or the net is blind to t at these weights "
                                          "(zero-initialised residual branches, identical time parameters)",
                                 "Check that t reaches the net per sample; if the architecture starts blind to t "
                                 "(e.g. torchcfm's UNet zero-initialises every residual branch), rerun `structure` "
                                 "on a checkpoint after some training steps, where the balance means something."))
            else:
                findings.append((verdict, f"time ignored by the velocity net: permuting t moves its output "
                                          f"{balance['t_change']:.3g} vs {balance['x_change']:.3g} for x_t "
                                          f"(ratio {ratio:.3g} < {th.time_ignored_ratio:g}){units}",
                                 "Feed t in the units its embedding was built for (e.g. t in [0, 1] times the "
                                 "number of training timesteps for a DDPM-style sinusoidal embedding, or no extra "
                                 "division) and check that t reaches the net per sample."))
        else:
            verdict = Verdict.PASS
        measurements.append(Measurement(name="t / x_t sensitivity", value=_round(ratio), unit="x",
                                        expected=expected, verdict=verdict))

    @staticmethod
    def _judge_precision(obs, measurements, findings) -> None:
        p = obs["precision"]
        half = FP16
        fp16_where = []
        if p["autocast"] and p["autocast_dtype"] == half:
            fp16_where.append(f"{p['autocast_device']} autocast float16")
        if p["param_dtype"] == half:
            fp16_where.append("float16 parameters")
        if p["v_pred"] == half and not fp16_where:
            fp16_where.append("v_pred is float16")
        fp16 = bool(fp16_where)
        unscaled = fp16 and not p["scaler_enabled"]
        compute = ", ".join(fp16_where) if fp16 else (
            f"{p['autocast_device']} autocast {p['autocast_dtype'].replace('torch.', '')}" if p["autocast"]
            else (p["param_dtype"] or "unknown").replace("torch.", ""))
        scaler = "enabled" if p["scaler_enabled"] else ("disabled" if p["scaler"] else "none")
        # the value answers the measurement's question first: "no: float32; ..." must not read as if fp16 were found
        answer = "yes" if unscaled else "no"
        measurements.append(flag("fp16 without loss scaling", not unscaled,
                                 value=f"{answer}: {compute}; grad_scaler {scaler}",
                                 expected="float16 compute needs an enabled grad_scaler", bad=Verdict.WARN))
        if unscaled:
            findings.append((Verdict.WARN, f"fp16 compute ({', '.join(fp16_where)}) without loss scaling "
                                           f"(grad_scaler {scaler}): small gradients underflow to zero",
                             "Use torch.amp.GradScaler with float16 autocast (scaler.scale(loss).backward(); "
                             "scaler.step(optimizer); scaler.update()) and pass it as the pipeline field "
                             "'grad_scaler', or switch to bfloat16."))
        endpoints = [p[k] for k in ("x0", "x1") if p[k] is not None]
        if p["xt"] is not None and endpoints:
            wide = [d for d in endpoints if d not in HALF]
            bad = p["xt"] in HALF and bool(wide)
            value = f"x_t {p['xt']}, x0 {p['x0']}, x1 {p['x1']}".replace("torch.", "")
            measurements.append(flag("x_t precision", not bad, value=value,
                                     expected="x_t built in the endpoints' float32", bad=Verdict.WARN))
            if bad:
                findings.append((Verdict.WARN, f"x_t is {p['xt'].replace('torch.', '')} while x0/x1 are "
                                               f"{wide[0].replace('torch.', '')}: the path is built in half "
                                               "precision",
                                 "Build x_t = (1 - t) x0 + t x1 in float32 and let autocast cast inside the "
                                 "network."))
        bad_outputs = obs["non_finite"]
        if bad_outputs:
            keys = list(dict.fromkeys(f["key"] for f in bad_outputs))
            first = bad_outputs[0]
            value = ", ".join(f"{f['key']}@batch{f['batch']}: {f['count']}" for f in bad_outputs[:6])
            measurements.append(flag("non-finite step outputs", False, value=value, expected="none"))
            findings.append((Verdict.FAIL, f"non-finite values in step output {', '.join(repr(k) for k in keys)} "
                                           f"({first['count']} in '{first['key']}' on batch {first['batch']})",
                             "Find the first output that turns NaN/Inf (logvar.exp() without a clamp, a division "
                             "by a norm, float16 overflow above 65504) and bound it."))
        else:
            measurements.append(flag("non-finite step outputs", True, value="none", expected="none"))

    @staticmethod
    def _judge_modes(obs, measurements, findings) -> None:
        from ._modes import describe

        modes = obs["modes"]
        if not modes:
            measurements.append(info("frozen modules", "none declared", note="pipeline fields 'frozen', 'vae'"))
            return
        # Train mode matters only through layers that behave differently in it (checks/_modes.py says which): a
        # frozen module in train mode without any is reported, not warned about.
        training = [n for n, m in modes.items() if m["training"]]
        measurements.append(info("frozen modules in train mode", ", ".join(training) or "none",
                                 note="judged by their mode-dependent layers, below"))
        active = {n: m["active"] for n, m in modes.items() if sum(m["active"].values())}
        measurements.append(flag("mode-dependent layers active in frozen modules", not active,
                                 value="; ".join(f"{n}: {describe(c)}" for n, c in active.items()) or "none",
                                 expected="none (dropout, batch-norm... in eval)", bad=Verdict.WARN))
        for name in training:
            if name not in active:
                continue
            note = " (switched by the step)" if modes[name]["switched_by_step"] else ""
            findings.append((Verdict.WARN, f"frozen module '{name}' in train mode{note} with mode-dependent layers "
                                           f"active ({describe(active[name])}): its outputs are noised or use batch "
                                           "statistics",
                             "Call .eval() on frozen modules after any model.train() (and keep them out of it)."))
        quiet = {n: c for n, c in active.items() if n not in training}
        if quiet:
            findings.append((Verdict.WARN, "mode-dependent layers in train mode inside frozen modules under an eval "
                                           "parent: " + ", ".join(f"{n} ({describe(c)})" for n, c in quiet.items()),
                             "Call .eval() on the whole frozen module, not on its parts."))
        grads = {n: m for n, m in modes.items() if m["grad_tensors"]}
        count = sum(m["grad_tensors"] for m in grads.values())
        measurements.append(flag("frozen parameters with requires_grad", not grads, value=count,
                                 unit="tensors", expected="0", bad=Verdict.WARN))
        if grads:
            described = ", ".join(f"{n} ({m['grad_tensors']}/{m['tensors']} tensors, {m['grad_elements']} values, "
                                  f"e.g. {m['grad_names'][0]}{'; turned on by the step' if m['grad_by_step'] else ''})"
                                  for n, m in grads.items())
            findings.append((Verdict.WARN, f"frozen parameters require grad: {described}",
                             "Call .requires_grad_(False) on frozen modules (the target check's gradient audit "
                             "says whether they actually receive gradient)."))


def _round(value: float) -> float:
    return value if not math.isfinite(value) else float(f"{value:.6g}")


def _quiet_summary(obs: dict[str, Any]) -> str:
    balance = obs["balance"]
    parts = []
    if balance["measured"] and balance["ratio"] is not None:
        parts.append(f"t / x_t sensitivity {balance['ratio']:.3g} (t {balance['t_change']:.3g}, x_t "
                     f"{balance['x_change']:.3g}; velocity: {obs['velocity']})")
    elif balance["measured"]:
        parts.append("time balance not measurable (output moves with neither t nor x_t)")
    else:
        parts.append(f"time balance not measured ({balance['reason']})")
    precision = obs["precision"]
    parts.append(f"compute {(precision['autocast_dtype'] or precision['param_dtype'] or '?').replace('torch.', '')}")
    modes = obs["modes"]
    if modes:
        training = [n for n, m in modes.items() if m["training"]]
        state = "in eval" if not training else (
            f"{', '.join(training)} in train mode without mode-dependent layers (harmless)")
        parts.append(f"{_plural(len(modes), 'frozen module')} {state}, no grad")
    else:
        parts.append("no frozen modules")
    return "; ".join(parts)


def _plural(count: int, word: str) -> str:
    return f"{count} {word if count == 1 else word + 's'}"
