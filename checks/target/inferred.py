"""The path of a step that returns only its loss: x_t, t from the velocity module's inputs, x1 from the pipeline's
``encode``, and the path's coefficients inferred without x0.

For an affine path x_t = a(t) x0 + b(t) x1 with a source x0 drawn independently of the data x1 (noise, or a text
head's sample), the projection of x_t on x1 gives b per sample up to a term of relative size 1/sqrt(D)
(E<x0, x1> = 0), so a smooth fit B(t) of <x_t, x1> / ||x1||^2 is b(t); the rest, x_t - B(t) x1 = a(t) x0, has a norm
proportional to a(t) (||x0|| is the same in law for every t), so a smooth fit A(t) of ||x_t - B(t) x1|| is a(t) up
to a constant factor. The velocity needs only B, B' and the log-derivative A'/A, which that factor does not change:

    v = a' x0 + b' x1 = (A'/A)(t) (x_t - B(t) x1) + B'(t) x1.

The maths (``infer_path``) is in ``maths.py``; this module reads the module's inputs and ``encode``.
"""

from __future__ import annotations

from typing import Any

from .maths import infer_path, thin, weight_shape


def compare_inferred(ctx, batch, probe, solved, obs: dict[str, Any]) -> dict[str, Any]:
    """A step without x0/x1/x_t/t (``probe``, ``solved``: the implied audit's first probe and solution): x_t and t
    from the velocity module's inputs, x1 from ``encode``, the path inferred by :func:`infer_path`; the implied
    target compared with that path's velocity."""
    import torch

    from .. import _path_fit as pf
    from .. import _structure_math as sm
    from .implied import PROBE_SALT, compare_with_path

    raw = probe.raw
    n = int(raw.shape[0])
    kwargs = probe.kwargs or {}
    x_slot = next((slot for slot, value in sm.iter_slots(probe.args, kwargs) if isinstance(value, torch.Tensor)
                   and value.shape == raw.shape and value.is_floating_point()), None)
    if x_slot is None:
        return {**obs, "compared": False, "not_compared": "no argument of the velocity module is shaped like its "
                                                          "output (x_t)"}
    t_slot, _, how = sm.find_time_slot(probe.args, kwargs, n, None, exclude=x_slot)
    if t_slot is None:
        return {**obs, "compared": False, "not_compared": f"cannot tell which argument is t: {how}"}
    if ctx.pipeline.encode is None:
        return {**obs, "compared": False, "not_compared": "no pipeline field 'encode' to compute x1"}
    xt = sm.get_slot(probe.args, kwargs, x_slot).detach()
    raw_t = sm.per_sample_scalar(sm.get_slot(probe.args, kwargs, t_slot), n).cpu().numpy()
    t, scale = pf.normalise_time(raw_t)
    ctx.seed_everything(salt=PROBE_SALT)  # the step's first draws: a sampled posterior matches the step's
    with torch.no_grad():
        x1 = ctx.pipeline.encode(ctx.pipeline.pixels_of(batch))
    if not isinstance(x1, torch.Tensor) or x1.shape[0] != n or x1[0].numel() != xt[0].numel():
        return {**obs, "compared": False, "not_compared": f"encode's x1 {tuple(getattr(x1, 'shape', ()))} does not "
                                                          f"match the velocity module's x_t {tuple(xt.shape)}"}
    path = infer_path(xt, x1.detach().to(xt.device), t)
    obs["inferred"] = [f"x_t: the velocity module's {sm.slot_name(x_slot)}",
                       f"t: its {sm.slot_name(t_slot)} ({how})" + (f", divided by {scale:g}" if scale else ""),
                       "x1: pipeline field 'encode' on the batch's pixels", "v_pred: the module's output",
                       "target: the loss gradient", "x0: x_t - b(t) x1 (a source independent of the data)"]
    obs["weight"] = weight_shape(t, solved.k.cpu().numpy())
    median = obs["weight"].get("median") or 1.0
    keep = thin(n)
    obs["weight_curve"] = {"t": t[keep].tolist(), "k": (solved.k.cpu().numpy()[keep] / median).tolist()}
    if not path.ok:
        return {**obs, "compared": False, "not_compared": path.reason}
    obs.update(direction=path.direction, describe=path.describe, ends=path.ends)
    target = solved.target.to(path.expected.device)
    rows = torch.isfinite(target).all(1)
    if not compare_with_path(obs, target, path.expected, rows, t):
        return obs
    ones = torch.ones(int(rows.sum()), dtype=torch.float64, device=target.device)
    candidates = pf.candidate_targets(path.source[rows], pf.flat(x1).to(target.device)[rows],
                                      pf.flat(xt).to(target.device)[rows], path.expected[rows], None, ones)
    obs["candidates"] = [{"name": r.name, "cos": r.cos, "ratio": r.ratio}
                         for r in pf.resemblances(target[rows], candidates)]
    return obs
