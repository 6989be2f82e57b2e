"""What `structure` measures on the user's pipeline: the time balance probes, the precision of the step, non-finite
outputs, and the frozen modules' modes, flags and optimizer membership. Plain data out (the observation); nothing
here judges."""

from __future__ import annotations

import math
from typing import Any, Optional

from .maths import merge_modes
from .velocity import CALL_SALT, FIRST_INPUTS, _Call, _find_velocity, _Found, _probe

T_CORRELATION = 0.99  # |Pearson r| between an argument and the step's t for that argument to be taken for t


def _time_features(ctx, call: _Call, batch: int, calls: tuple, t_samples=None) -> Optional[dict[str, Any]]:
    """The first leaf-module input that follows t and not x_t (the time embedding's features), and how much it varies
    across the batch: ||F - mean over the batch|| / ||F||. ``calls``: (args, kwargs) as is, t permuted, x_t
    permuted."""
    from .. import _structure_math as sm

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

    from .. import _structure_math as sm

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


def _modes(pipeline) -> dict[str, dict[str, Any]]:
    """Per frozen module (``Pipeline.frozen_modules``: the declared ones and the VAE): its mode, its mode-dependent
    layers active, its parameters that require grad and those the optimizer holds. A parameter shared with a
    trainable module is trained on purpose and counted in neither."""
    from .._modes import active_layers

    trained = {id(p) for module in pipeline.trainable_modules().values() for p in module.parameters()}
    optimizer = pipeline.optimizer
    optimized = ({id(p) for group in optimizer.param_groups for p in group["params"]}
                 if optimizer is not None else set())
    state = {}
    for name, module in pipeline.frozen_modules().items():
        own = [(n, p) for n, p in module.named_parameters() if id(p) not in trained]
        grad = [(n, p.numel()) for n, p in own if p.requires_grad]
        held = [p.numel() for _, p in own if id(p) in optimized]
        trainable_held = [p.numel() for _, p in own if id(p) in optimized and p.requires_grad]
        state[name] = {"training": bool(module.training), "active": active_layers(module),
                       "grad_tensors": len(grad), "grad_elements": int(sum(n for _, n in grad)),
                       "grad_names": [n for n, _ in grad[:3]],
                       "tensors": sum(1 for _ in module.parameters()),
                       "optimizer_tensors": len(held), "optimizer_elements": int(sum(held)),
                       "optimizer_grad_elements": int(sum(trainable_held))}
    return state


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



def observe(ctx) -> dict[str, Any]:
    """The observation: one fresh, seeded forward of the step with the velocity net's call recorded, the probes on
    it, and the frozen modules inspected before and after the step (the step may switch their mode or flags)."""
    batch = ctx.batches(1)[0]
    before = _modes(ctx.pipeline)
    found = _find_velocity(ctx, batch)
    after = _modes(ctx.pipeline)
    return {
        "velocity": found.call.name if found.call is not None else None,
        "velocity_class": type(found.call.module).__name__ if found.call is not None else None,
        "velocity_how": found.how,
        "balance": _balance(ctx, found),
        "precision": _precision(ctx, found),
        "non_finite": _non_finite(ctx),
        "modes": merge_modes(before, after),
        "notes": found.notes,
    }
