"""The implied-target audit of `target`: what the loss trains the velocity module's raw output toward.

The step's own labels (``v_pred``, ``v_target``) can be in another parameterisation than the network's output:
diffusers' ``precondition_outputs`` compares ``raw * (-sigma) + x_t`` with the latents, a weighting multiplies the
error per sample. The loss itself knows what it trains: for any per-sample weighted squared error of an affine
function of the output, the gradient with respect to the raw output is affine in it,

    g_i = k_i (raw_i - target_i),

so two probes, at the raw output and at raw + delta (the same step, its randomness replayed), give per sample the
slope k_i = <g1_i - g0_i, delta_i> / ||delta_i||^2 (the implied loss weight) and the implied target
target_i = raw_i - g0_i / k_i. The misfit of g1 - g0 to k_i delta_i says whether that model holds (an L1 or Huber
loss, or weights that vary inside a sample, do not fit it).

This module holds the probe that runs the user's step with a forward hook replacing the module's output; the maths
(``solve``, ``weight_shape``) is in ``maths.py``. Torch is imported inside functions: `fmcheck --help` must not load
it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional

from .._structure_math import layout_map  # noqa: F401  (the packed-latents match, shared with `structure`)
from .maths import solve, thin, weight_shape

PROBE_SALT = 0  # batch 0, step_index 0, salt 0: the very randomness of the cached outputs the path fit uses
REPLAY_TOLERANCE = 1e-4  # relative difference between the two probes' raw outputs above which the replay failed
AFFINE_TOLERANCE = 0.02  # median misfit of g1 - g0 to k delta above which the loss is not a weighted squared error


# -- module outputs ---------------------------------------------------------------------------------------------------
def replace_output(out: Any, old: Any, new: Any) -> Any:
    """``out`` with the tensor ``old`` (as found by ``output_tensor``) replaced by ``new``: a tensor, a tuple or list
    (diffusers' return_dict=False), a mapping or an output object with ``.sample``."""
    import copy

    import torch

    if isinstance(out, torch.Tensor):
        return new
    if isinstance(out, (list, tuple)) and not hasattr(out, "_fields"):
        return type(out)(new if item is old else item for item in out)
    if isinstance(out, tuple):  # a namedtuple
        return type(out)(*(new if item is old else item for item in out))
    if isinstance(out, Mapping):
        items = {key: new if value is old else value for key, value in out.items()}
        try:
            return type(out)(**items)
        except TypeError:
            return items
    clone = copy.copy(out)
    for name, value in vars(out).items():
        if value is old:
            setattr(clone, name, new)
    return clone


# -- the probe --------------------------------------------------------------------------------------------------------
@dataclass
class Probe:
    raw: Any = None  # the module's own output (detached)
    grad: Any = None  # d loss / d output, in the output's shape
    outputs: Any = None  # the step's outputs (StepOutputs)
    args: tuple = ()
    kwargs: Optional[dict] = None
    calls: int = 0
    reason: Optional[str] = None


def run_probe(ctx, module, batch, shift=None) -> Probe:
    """One step with the module's first output replaced by a leaf holding it (plus ``shift``); d loss / d leaf."""
    import torch

    from .. import _structure_math as sm

    probe = Probe()
    leaf_box: list = []

    def hook(mod, args, kwargs, out):
        probe.calls += 1
        if probe.calls > 1:
            return None
        tensor = sm.output_tensor(out)
        if tensor is None or not tensor.is_floating_point():
            return None
        probe.raw, probe.args, probe.kwargs = tensor.detach(), tuple(args), dict(kwargs)
        work = torch.float32 if tensor.dtype in (torch.float16, torch.bfloat16) else tensor.dtype
        leaf = tensor.detach().to(work).clone()
        if shift is not None:
            leaf = leaf + shift.to(device=leaf.device, dtype=work)
        leaf.requires_grad_(True)
        leaf_box.append(leaf)
        # a copy, not the leaf itself: the step may modify its prediction in place
        return replace_output(out, tensor, leaf.to(tensor.dtype, copy=True))

    handle = module.register_forward_hook(hook, with_kwargs=True)
    try:
        probe.outputs = ctx.run_step(batch, 0, grad=True, salt=PROBE_SALT)
    finally:
        handle.remove()
    if not leaf_box:
        probe.reason = ("the velocity module was not called during the step" if probe.calls == 0 else
                        "the velocity module's output holds no floating-point tensor")
        return probe
    loss = probe.outputs["loss"]
    if not loss.requires_grad:
        probe.reason = "'loss' carries no autograd graph"
        return probe
    (grad,) = torch.autograd.grad(loss, leaf_box[0], allow_unused=True)
    if grad is None:
        probe.reason = ("the loss does not depend on the velocity module's output through autograd (no_grad or "
                        "detach on the way, or a reentrant checkpoint around the module)")
        return probe
    probe.grad = grad.detach()
    return probe


def locate(ctx, batch) -> tuple[Any, str, str]:
    """(module, name, how) of the velocity net: the pipeline field, else the module `structure` finds through
    forward hooks (the outermost trainable module called with the step's x_t); (None, "", reason) when neither."""
    if ctx.pipeline.velocity is not None:
        return ctx.pipeline.velocity, "velocity", "pipeline field 'velocity'"
    from ..structure import _find_velocity

    found = _find_velocity(ctx, batch)
    if found.call is None:
        return None, "", found.reason or "no velocity module found"
    return found.call.module, found.call.name, found.how




def compare_with_path(obs: dict[str, Any], target: Any, expected: Any, rows: Any, t_values: Any) -> bool:
    """Per-sample cos and norm ratio of an implied target against the path velocity, over ``rows``: the medians,
    the 5% quantile of cos and a thinned cos(t) curve go into ``obs``. False (and why, in ``obs``) when no sample
    can be compared."""
    import numpy as np
    import torch

    from .. import _path_fit as pf

    cos, ratio = pf.cosine_and_ratio(target[rows], expected[rows])
    finite = torch.isfinite(cos) & torch.isfinite(ratio)
    if not bool(finite.any()):
        obs["compared"], obs["not_compared"] = False, "no sample with a positive weight and a non-zero velocity"
        return False
    cos_f, ratio_f = cos[finite], ratio[finite]
    summary = torch.stack([cos_f.median(), ratio_f.median(), cos_f.quantile(0.05)]).cpu().tolist()
    obs["compared"] = True
    obs["cos_median"], obs["ratio_median"], obs["cos_p05"] = (float(x) for x in summary)
    obs["cos_samples"] = [round(float(x), 5) for x in cos_f.cpu().tolist()]
    t_rows = np.asarray(t_values)[rows.cpu().numpy()][finite.cpu().numpy()]
    keep = thin(len(obs["cos_samples"]))
    obs["cos_curve"] = {"t": t_rows[keep].tolist(), "cos": np.asarray(obs["cos_samples"])[keep].tolist()}
    return True


def _as_layout(target, raw, out, probe: Probe) -> tuple[Optional[Any], str]:
    """The implied target in the layout of the step's x0 (N, D), and how it was put there."""
    import torch

    x0 = out.get("x0")
    if not isinstance(x0, torch.Tensor) or x0.dim() < 1 or x0.shape[0] != raw.shape[0]:
        return None, "the step returns no (B, ...) 'x0' to compare with"
    if x0[0].numel() != raw[0].numel():
        return None, (f"the velocity module's output has {raw[0].numel()} values per sample, x0 has "
                      f"{x0[0].numel()}")
    if tuple(raw.shape) == tuple(x0.shape):
        return target, "same layout as x0"
    xt = out.get("xt")
    if isinstance(xt, torch.Tensor) and tuple(xt.shape) == tuple(x0.shape):
        index = _layout_from_inputs(raw, xt, probe)
        if index is not None:
            return target[:, index.to(target.device)], "unpacked: the module's x_t input holds the step's x_t " \
                                                       "in another layout"
    return None, (f"the velocity module's output {tuple(raw.shape)} has another layout than x0 "
                  f"{tuple(x0.shape)} and its x_t input could not be matched to the step's 'xt'")


def _layout_from_inputs(raw, xt, probe: Probe) -> Optional[Any]:
    """Among the module's inputs, the tensor shaped like its output that holds the step's x_t in another layout."""
    import torch

    from .. import _structure_math as sm

    for _, value in sm.iter_slots(probe.args, probe.kwargs or {}):
        if isinstance(value, torch.Tensor) and tuple(value.shape) == tuple(raw.shape):
            index = layout_map(value, xt)
            if index is not None:
                return index
    return None


def measure_implied(ctx, path_fit: dict, t_scale: Optional[float]) -> dict[str, Any]:
    """The implied target and weight on batch 0, compared with the fitted path velocity (``path_fit``: what the
    path audit fitted: "fit", a ScheduleFit, and "noise_slope", s'/s of a returned noise term; empty when it could
    not fit)."""
    import numpy as np
    import torch

    from .. import _path_fit as pf
    from .. import _structure_math as sm

    fit = path_fit.get("fit")
    batch = ctx.batches(1)[0]
    module, name, how = locate(ctx, batch)
    if module is None:
        return {"ok": False, "reason": how}
    # declared: the pipeline field, which the sampler integrates (found by hooks, it may be an inner module)
    obs: dict[str, Any] = {"module": name, "how": how, "declared": module is ctx.pipeline.velocity}
    first = run_probe(ctx, module, batch)
    if first.reason:
        return {**obs, "ok": False, "reason": first.reason}
    raw = first.raw
    rms = float(raw.detach().double().pow(2).mean().sqrt())
    gen = ctx.generator(salt=PROBE_SALT + 1)
    delta = torch.randn(raw.shape, generator=gen, dtype=torch.float32) * (rms if rms > 1e-6 else 1.0)
    second = run_probe(ctx, module, batch, shift=delta)
    if second.reason:
        return {**obs, "ok": False, "reason": second.reason}
    obs["calls"] = first.calls
    replay = sm.relative_change(second.raw, raw)
    obs["replay_difference"] = replay
    if not replay <= REPLAY_TOLERANCE:
        return {**obs, "ok": False, "reason": f"the step's randomness was not replayed: the velocity module's output "
                                              f"differs by {replay:.3g} (relative) between two seeded runs of "
                                              "batch 0 (draw t and noise from torch's global RNG, or a generator "
                                              "seeded per step)"}
    solved = solve(raw, first.grad, second.grad, delta.to(raw.device))
    k = solved.k
    n = int(k.shape[0])
    obs["samples"] = n
    obs["misfit"] = float(solved.misfit.median())
    if obs["misfit"] > AFFINE_TOLERANCE:
        return {**obs, "ok": False, "reason": f"the loss is not a per-sample weighted squared error of the output "
                                              f"(the gradient's change misses k * delta by {obs['misfit']:.2g}, "
                                              "median): an L1/Huber loss or weights varying inside a sample"}
    out = first.outputs
    obs["ok"] = True
    trained = torch.isfinite(solved.target).all(1)
    obs["zero_weight_share"] = float(1 - trained.double().mean())
    if any(key not in out for key in ("x0", "x1", "xt", "t")):
        from .inferred import compare_inferred

        return compare_inferred(ctx, batch, first, solved, obs)
    t_values = None
    if "t" in out:
        t_sample = pf.per_sample_t(out.tensor("t").detach().cpu(), n)
        if t_sample is not None:
            t_values = t_sample.numpy() / (t_scale or 1.0)
    k_host = k.cpu().numpy()
    obs["weight"] = weight_shape(t_values if t_values is not None else np.zeros(n), k_host)
    if t_values is None:
        obs["weight"]["describe"] = "no per-sample t returned: the weight's shape in t is unknown"
    keep = thin(n)
    median = obs["weight"].get("median") or 1.0
    obs["weight_curve"] = {"t": (t_values[keep].tolist() if t_values is not None else []),
                           "k": (k_host[keep] / median).tolist()}
    target, layout = _as_layout(solved.target, raw, out, first)
    obs["layout"] = layout
    v_pred = out.get("v_pred")
    obs["v_pred_is_raw"] = bool(sm.same_samples(v_pred, raw)) if isinstance(v_pred, torch.Tensor) else None
    if target is None or fit is None or not fit.ok or t_values is None or any(
            not isinstance(out.get(key), torch.Tensor) for key in ("x0", "x1")):
        why = layout if target is None else ("the path was not fitted" if fit is None or not fit.ok else
                                             "the step returns no per-sample 't', 'x0' and 'x1'")
        obs["compared"], obs["not_compared"] = False, why
        return obs
    x0, x1 = out["x0"].detach(), out["x1"].detach()
    t_in = np.clip(t_values, fit.t_lo, fit.t_hi)
    da, db = fit.derivatives(t_in)
    fa, _ = fit.values(t_in)
    work = x0.device if x0.device.type != "mps" else torch.device("cpu")
    as_t = lambda v: torch.as_tensor(v, dtype=torch.float64, device=work)  # noqa: E731
    expected = pf.expected_velocity(x0.to(work), x1.to(work), as_t(da), as_t(db))
    without_noise = None
    noise = out.get("noise")
    xt_step = out.get("xt")
    if "noise_slope" in path_fit and isinstance(noise, torch.Tensor) and noise.shape == x0.shape and \
            isinstance(xt_step, torch.Tensor) and xt_step.shape == x0.shape:
        noise = noise.detach().to(work)
        s_i = pf.fit_samples_with_noise(x0.to(work), x1.to(work), noise, xt_step.detach().to(work)).s
        without_noise = expected
        expected = expected + (as_t(path_fit["noise_slope"](t_in)) * s_i)[:, None] * pf.flat(noise)
    target = target.to(work)
    rows = trained.to(work)
    if not compare_with_path(obs, target, expected, rows, t_values):
        return obs
    eps = out.get("eps")
    eps = eps.detach().to(work) if isinstance(eps, torch.Tensor) and eps.shape == x0.shape else None
    xt = out.get("xt")
    xt = xt.detach().to(work) if isinstance(xt, torch.Tensor) and xt.shape == x0.shape else x0.to(work)
    candidates = pf.candidate_targets(x0[rows.to(x0.device)].to(work), x1[rows.to(x1.device)].to(work),
                                      xt[rows], expected[rows], eps[rows] if eps is not None else None,
                                      as_t(fa)[rows], without_noise[rows] if without_noise is not None else None)
    obs["candidates"] = [{"name": r.name, "cos": r.cos, "ratio": r.ratio}
                         for r in pf.resemblances(target[rows], candidates)]
    v_target = out.get("v_target")
    if isinstance(v_target, torch.Tensor) and v_target.shape == x0.shape:
        c, _ = pf.cosine_and_ratio(target[rows], v_target.detach().to(work)[rows])
        obs["cos_with_v_target"] = float(c.nanmedian())
    return obs

