"""`target`'s measuring: the I/O with the user's code. The path audit pools the cached step outputs and fits
x_t = a(t) x0 + b(t) x1 (+ s(t) noise when the step returns its noise) per sample, then over t (the maths in
``checks/_path_fit.py``); the implied-target audit probes the loss gradient (``implied.py``, a loss-only step's path
in ``inferred.py``); the gradient paths come from one fresh step with autograd (``autograd.py``); the precision of
the path tensors from batch 0. Returns plain data: judging is in ``rules.py`` and ``judge.py``.
"""

from __future__ import annotations

from typing import Any

from fmcheck.api import Skip

from .autograd import _measure_autograd
from .maths import thin

PATH_KEYS = ("x0", "x1", "t", "xt")  # v_target is optional: the implied audit infers it from the loss gradient
NOISE_TERM_MIN = 1e-6  # ||s_i noise_i|| / ||x_t|| above this: the returned 'noise' is a term of the path


def measure(ctx, max_batches: int) -> dict[str, Any]:
    """The observation: the path audit, the implied target, the precision and the gradient paths."""
    from . import implied as ti

    store: dict[str, Any] = {}
    try:
        path = _measure_path(ctx, max_batches, store)
    except Skip as missing:
        if ctx.pipeline.velocity is None:
            raise
        # a step that returns only its loss: the path is inferred around the declared velocity module
        implied = ti.measure_implied(ctx, store, None)
        if not implied.get("compared"):
            raise Skip(f"{missing}; the path could not be inferred around the velocity module either: "
                       f"{implied.get('not_compared') or implied.get('reason')}") from None
        path = {"inferred": True, "fit": {"ok": True, "direction": implied["direction"],
                                          "describe": implied["describe"]},
                "source_is_noise": True}
    path["prediction"] = ctx.pipeline.prediction
    if not path.get("inferred"):
        implied = ti.measure_implied(ctx, store, path.get("t_scale"))
    precision = _measure_precision(ctx.outputs(0))
    autograd = _measure_autograd(ctx)
    return {"path": path, "implied": implied, "precision": precision, "autograd": autograd}


def _work(x):
    """float64 needs a device that has it (MPS does not)."""
    return x.cpu() if x.device.type == "mps" else x


def _gather_path(outputs: list) -> dict[str, Any]:
    """Pool x0, x1, xt, v_target, eps and per-sample t over the batches' cached outputs."""
    import torch

    from .. import _path_fit as pf

    parts: dict[str, list] = {k: [] for k in ("x0", "x1", "xt", "v_target", "eps", "noise", "t")}
    for out in outputs:
        missing = out.missing(PATH_KEYS)
        if missing:
            raise Skip(f"step output lacks {', '.join(repr(k) for k in missing)} (needed for the path fit)")
        x0 = out["x0"]
        if not isinstance(x0, torch.Tensor) or x0.dim() < 1:
            raise Skip("step output 'x0' is not a batched tensor (need shape (B, ...))")
        n = x0.shape[0]
        for key in ("x0", "x1", "xt", "v_target"):
            if key == "v_target" and key not in out:
                continue
            value = out[key]
            if not isinstance(value, torch.Tensor) or value.dim() < 1 or value.shape[0] != n:
                return {"problem": f"'{key}' is not a (B, ...) tensor with the batch size {n} of x0"}
            if value[0].numel() != x0[0].numel():
                return {"problem": f"'{key}' has {value[0].numel()} values per sample, x0 has {x0[0].numel()}"}
            parts[key].append(_work(value.detach()))
        t = pf.per_sample_t(out.tensor("t").detach().cpu(), n)
        if t is None:
            return {"problem": f"'t' of shape {tuple(out.tensor('t').shape)} is not one time per sample"}
        parts["t"].append(t)
        for key in ("eps", "noise"):  # the reparam noise; the path's own noise term (torchcfm's return_noise)
            extra = out.get(key)
            if isinstance(extra, torch.Tensor) and extra.dim() >= 1 and extra.shape[0] == n and \
                    extra[0].numel() == x0[0].numel():
                parts[key].append(_work(extra.detach()))
    pooled = {k: torch.cat([p.reshape(p.shape[0], -1) for p in v]) for k, v in parts.items()
              if v and k not in ("t", "eps", "noise", "v_target")}
    for key in ("eps", "noise", "v_target"):
        pooled[key] = torch.cat([p.reshape(p.shape[0], -1) for p in parts[key]]) \
            if len(parts[key]) == len(outputs) else None
    pooled["t"] = torch.cat(parts["t"]).numpy()
    return pooled


def _draw_for_spread(ctx, limit: int) -> tuple[list, int]:
    """Cached outputs of the first batches, more of them while t has too few distinct values."""
    import torch

    from .. import _path_fit as pf

    count = len(ctx.batches(ctx.settings.measure_batches))
    outputs = [ctx.outputs(i) for i in range(count)]
    while count < limit and ctx.time_left() > 10:
        times = [pf.per_sample_t(o.tensor("t").detach().cpu(), o["x0"].shape[0]) for o in outputs
                 if "t" in o and isinstance(o.get("x0"), torch.Tensor) and o["x0"].dim() >= 1]
        if not times or any(t is None for t in times):
            break
        values, _ = pf.normalise_time(torch.cat(times).cpu().numpy())
        if pf.spread_ok(values, pf.WANT_DISTINCT_T):
            break
        if len(ctx.batches(count + 1)) <= count:
            break
        outputs.append(ctx.outputs(count))
        count += 1
    return outputs, count


def _measure_path(ctx, limit: int, store: dict) -> dict[str, Any]:
    """The path audit on the pooled cached outputs; ``store["fit"]`` receives the ScheduleFit for the implied audit."""
    import numpy as np
    import torch

    from .. import _path_fit as pf

    initial = len(ctx.batches(ctx.settings.measure_batches))
    outputs, count = _draw_for_spread(ctx, max(limit, initial))
    pooled = _gather_path(outputs)
    obs: dict[str, Any] = {"batches": count, "extra_batches": count - initial}
    if "problem" in pooled:
        obs["problem"] = pooled["problem"]
        return obs
    x0, x1, xt, v, eps = pooled["x0"], pooled["x1"], pooled["xt"], pooled["v_target"], pooled["eps"]
    raw_t = pooled["t"]
    t, scale = pf.normalise_time(raw_t)
    obs.update(samples=int(x0.shape[0]), t_scale=scale, t_raw_max=float(np.max(raw_t)),
               t_raw_min=float(np.min(raw_t)))
    noise, noise_s = pooled["noise"], None
    samples = pf.fit_samples(x0, x1, xt)
    if noise is not None:
        with_noise = pf.fit_samples_with_noise(x0, x1, noise, xt)
        size = float((with_noise.s[:, None] * pf.flat(noise)).norm()) / max(float(pf.flat(xt).norm()), 1e-30)
        obs["noise_term"] = {"share": size, "residual_without": samples.relative_residual()}
        if size > NOISE_TERM_MIN:  # a returned noise that x_t actually carries: model it (else sigma = 0)
            samples, noise_s = with_noise.samples, with_noise.s
    # no reparam noise, no mu/logvar: the source is plain noise, and x0 is what a DDPM codebase calls eps
    obs["source_is_noise"] = eps is None and "mu" not in outputs[0] and "logvar" not in outputs[0]
    obs["v_target_returned"] = v is not None
    a, b, usable = (samples.a.cpu().numpy(), samples.b.cpu().numpy(), samples.usable.cpu().numpy())
    obs["usable_share"] = float(usable.mean())
    obs["xt_residual"] = samples.relative_residual()
    obs["v_combination"] = None
    if v is not None:
        combo = pf.fit_combination(v, x0, x1)
        c_med, d_med = (float(x) for x in torch.stack([combo.a.median(), combo.b.median()]).cpu().tolist())
        obs["v_combination"] = {"x0": c_med, "x1": d_med, "residual": combo.relative_residual()}
    count_t, width = pf.spread(t)
    obs["distinct_t"], obs["t_range"] = count_t, width
    # the data of the path figure (`--plot`): per-sample (t, a, b), then the fitted curves once there is a fit
    keep = thin(int(usable.sum()))
    obs["schedule"] = {"t": t[usable][keep].tolist(), "a": a[usable][keep].tolist(), "b": b[usable][keep].tolist(),
                       "t_scale": scale}
    if usable.sum() < pf.MIN_DISTINCT_T:
        obs["fit"] = {"ok": False, "reason": "x0 and x1 are (nearly) parallel in almost every sample: the mix of "
                                             "x0 and x1 in x_t cannot be identified"}
        return obs
    fit = pf.fit_schedule(t[usable], a[usable], b[usable])
    obs["fit"] = {"ok": fit.ok, "reason": fit.reason}
    if not fit.ok:
        return obs
    store["fit"] = fit
    fa_lo, fb_lo = (float(v_[0]) for v_ in fit.values(np.array([fit.t_lo])))
    fa_hi, fb_hi = (float(v_[0]) for v_ in fit.values(np.array([fit.t_hi])))
    obs["fit"].update(residual=fit.residual, describe=fit.describe(), direction=pf.describe_direction(fit),
                      ends={"t": [fit.t_lo, fit.t_hi], "a": [fa_lo, fa_hi], "b": [fb_lo, fb_hi]})
    da, db = fit.derivatives(t)
    fa, _ = fit.values(t)
    device = x0.device
    da_t = torch.as_tensor(da, dtype=torch.float64, device=device)
    db_t = torch.as_tensor(db, dtype=torch.float64, device=device)
    expected = pf.expected_velocity(x0, x1, da_t, db_t)
    without_noise = None
    if noise_s is not None:
        log_slope, described = pf.noise_log_slope(t[usable], noise_s.cpu().numpy()[usable])
        store["noise_slope"] = log_slope
        term = torch.as_tensor(log_slope(t), dtype=torch.float64, device=device) * noise_s
        obs["noise_term"].update(describe=described, s_median=float(noise_s.abs().median()),
                                 log_slope_rms=float(np.sqrt(np.mean(log_slope(t) ** 2))))
        without_noise = expected
        expected = expected + term[:, None] * pf.flat(noise)
    grid = np.linspace(fit.t_lo, fit.t_hi, 101)
    (grid_a, grid_b), (grid_da, grid_db) = fit.values(grid), fit.derivatives(grid)
    obs["schedule"].update(grid={"t": grid.tolist(), "a": grid_a.tolist(), "b": grid_b.tolist(),
                                 "da": grid_da.tolist(), "db": grid_db.tolist()})
    obs["velocity_combination"] = {"x0": float(np.median(da)), "x1": float(np.median(db))}
    if v is None:
        return obs
    cos, ratio = pf.cosine_and_ratio(v, expected)
    finite = torch.isfinite(cos) & torch.isfinite(ratio)
    cos_f, ratio_f = cos[finite], ratio[finite]
    summary = torch.stack([cos_f.median(), ratio_f.median(), cos_f.quantile(0.05)]).cpu().tolist()
    obs["cos_median"], obs["ratio_median"], obs["cos_p05"] = (float(x) for x in summary)
    obs["cos_samples"] = [round(float(x), 5) for x in cos_f.cpu().tolist()]
    keep = thin(len(obs["cos_samples"]))
    obs["schedule"]["cos"] = {"t": t[finite.cpu().numpy()][keep].tolist(),
                              "cos": np.asarray(obs["cos_samples"])[keep].tolist()}
    candidates = pf.candidate_targets(x0, x1, xt, expected, eps,
                                      torch.as_tensor(fa, dtype=torch.float64, device=device), without_noise)
    obs["candidates"] = [{"name": r.name, "cos": r.cos, "ratio": r.ratio} for r in pf.resemblances(v, candidates)]
    return obs


def _measure_precision(out) -> dict[str, Any]:
    import torch

    def dtype_of(key):
        value = out.get(key)
        return str(value.dtype) if isinstance(value, torch.Tensor) else None

    obs: dict[str, Any] = {"dtypes": {k: dtype_of(k) for k in ("x0", "x1", "xt", "v_target", "v_pred")}}
    shares = {}
    for key in ("x0", "x1", "xt"):
        value = out.get(key)
        if isinstance(value, torch.Tensor) and value.dtype in (torch.float32, torch.float64) and value.numel():
            x = value.detach()
            shares[key] = torch.stack([(x == x.to(half).to(x.dtype)).float().mean()
                                       for half in (torch.float16, torch.bfloat16)])
    host = {k: v.cpu().tolist() for k, v in shares.items()}
    obs["half_exact_share"] = {k: {"float16": v[0], "bfloat16": v[1]} for k, v in host.items()}
    return obs
