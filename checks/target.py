"""`target`: does the model learn the velocity of the user's own path, detached, with gradient where it belongs?

Three audits on the user's step outputs:

- path: fit x_t = a(t) x0 + b(t) x1 (per sample, then over t), and compare v_target with a'(t) x0 + b'(t) x1
  (the maths is in ``checks/_path_fit.py``);
- autograd: v_target must not reach trainable parameters (moving target); per loss term, which trainable and frozen
  modules receive gradient, and how much of it flows through x_t or through the target;
- precision: x_t built in half precision, v_pred / v_target dtypes.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import Field

from fmcheck.api import Check, CheckDoc, Judgement, Skip, Thresholds
from fmcheck.judges import at_least, at_most, flag, info, ratio_within
from fmcheck.report import Measurement
from fmcheck.verdict import Verdict

PATH_KEYS = ("x0", "x1", "t", "xt")  # v_target is optional: the implied audit infers it from the loss gradient
HALF = ("torch.float16", "torch.bfloat16")
NOISE_TERM_MIN = 1e-6  # ||s_i noise_i|| / ||x_t|| above this: the returned 'noise' is a term of the path
ZERO_REL = 1e-8  # a gradient norm below this fraction of the largest one in its term counts as none
IDENTIFIED = 0.999  # a wrong candidate this close to the target names it: a near-miss WARN becomes a FAIL
TIE = 0.005  # candidates whose median cosine is within this of the best are reported together
DETACH_FIX = ("Detach the target: v_target = (x1 - x0).detach() (or build it from x0.detach(), x1.detach()). Only "
              "u_theta(x_t, t) may carry gradient; the head gets its gradient through x_t (the reparameterised z0).")


class TargetThresholds(Thresholds):
    cos_warn: float = Field(0.99, ge=-1, le=1, description="median cos(v_target, path velocity) below this warns")
    cos_fail: float = Field(0.9, ge=-1, le=1, description="median cos(v_target, path velocity) below this fails")
    norm_ratio_warn: float = Field(1.1, ge=1, description="median ||v_target|| / ||path velocity|| outside "
                                                          "[1/x, x] warns")
    norm_ratio_fail: float = Field(1.25, ge=1, description="median ||v_target|| / ||path velocity|| outside "
                                                           "[1/x, x] fails (a mis-scaled target)")
    disagree_share_warn: float = Field(0.1, ge=0, le=1, description="share of samples with cos < cos_fail above "
                                                                    "this warns (a target wrong for some t only)")
    xt_residual_warn: float = Field(0.01, ge=0, description="share of ||x_t|| outside span(x0, x1) above this warns")
    xt_residual_fail: float = Field(0.05, ge=0, description="share of ||x_t|| outside span(x0, x1) above this fails "
                                                            "(extra noise, x_t from other x0/x1)")
    schedule_residual_warn: float = Field(0.02, ge=0, description="RMS scatter of the per-sample (a, b) around the "
                                                                  "fitted a(t), b(t), relative, above this warns")
    schedule_residual_fail: float = Field(0.1, ge=0, description="the same scatter above this fails (x_t was not "
                                                                 "built with the t returned)")
    max_batches: int = Field(16, ge=1, description="batches drawn at most while t has fewer than 8 distinct values")


# ---------------------------------------------------------------------------------------------------------------------
# measuring
# ---------------------------------------------------------------------------------------------------------------------
def _work(x):
    """float64 needs a device that has it (MPS does not)."""
    return x.cpu() if x.device.type == "mps" else x


def _gather_path(outputs: list) -> dict[str, Any]:
    """Pool x0, x1, xt, v_target, eps and per-sample t over the batches' cached outputs."""
    import torch

    from fmcheck.checks import _path_fit as pf

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

    from fmcheck.checks import _path_fit as pf

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

    from fmcheck.checks import _path_fit as pf

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
    keep = _thin(int(usable.sum()))
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
    keep = _thin(len(obs["cos_samples"]))
    obs["schedule"]["cos"] = {"t": t[finite.cpu().numpy()][keep].tolist(),
                              "cos": np.asarray(obs["cos_samples"])[keep].tolist()}
    candidates = pf.candidate_targets(x0, x1, xt, expected, eps,
                                      torch.as_tensor(fa, dtype=torch.float64, device=device), without_noise)
    obs["candidates"] = [{"name": r.name, "cos": r.cos, "ratio": r.ratio} for r in pf.resemblances(v, candidates)]
    return obs


SCATTER_POINTS = 512  # per-sample points kept for the figure (the JSON report carries them)


def _thin(count: int) -> Any:
    """Evenly spaced indices of at most SCATTER_POINTS out of ``count``."""
    import numpy as np

    return np.unique(np.linspace(0, count - 1, min(count, SCATTER_POINTS)).round().astype(int)) if count else \
        np.zeros(0, dtype=int)


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


def _leaves(tensor) -> set[int]:
    """ids of the leaf tensors (AccumulateGrad variables) an autograd graph reaches."""
    import torch

    if not isinstance(tensor, torch.Tensor) or not tensor.requires_grad:
        return set()
    if tensor.grad_fn is None:
        return {id(tensor)}
    found: set[int] = set()
    seen: set[int] = set()
    stack = [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        variable = getattr(node, "variable", None)
        if variable is not None:
            found.add(id(variable))
            continue
        stack.extend(child for child, _ in node.next_functions if child is not None)
    return found


def _parameter_table(pipeline) -> list[tuple[str, str, str, Any]]:
    """(qualified name, module key, 'trainable' or 'frozen', parameter), each parameter once, trainable first."""
    import torch

    rows, seen = [], set()
    frozen = dict(pipeline.frozen_modules())
    vae = pipeline.vae
    if isinstance(vae, torch.nn.Module) and all(vae is not m for m in frozen.values()):
        frozen["vae"] = vae
    for group, modules in (("trainable", pipeline.trainable_modules()), ("frozen", frozen)):
        for key, module in modules.items():
            for name, param in module.named_parameters():
                if id(param) not in seen:
                    seen.add(id(param))
                    rows.append((f"{key}.{name}", key, group, param))
    return rows


REENTRANT = "use_reentrant=True"  # torch.utils.checkpoint's error for autograd.grad through a reentrant checkpoint
REENTRANT_NOTE = ("reentrant torch.utils.checkpoint in the model: gradients measured with backward() and hooks "
                  "(autograd.grad cannot run through it)")


def _is_reentrant_error(error: RuntimeError) -> bool:
    return REENTRANT in str(error)


def _has_reentrant_checkpoint(tensor) -> bool:
    """Whether the autograd graph of ``tensor`` holds a reentrant checkpoint: autograd.grad would either raise or,
    for the parameters inside it (not inputs of its graph node), silently report no gradient."""
    import torch

    if not isinstance(tensor, torch.Tensor) or tensor.grad_fn is None:
        return False
    seen: set[int] = set()
    stack = [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if "CheckpointFunction" in type(node).__name__:
            return True
        stack.extend(child for child, _ in node.next_functions)
    return False


class _KeepGrads:
    """Saves the .grad of ``params`` and clears them; restores them on exit (backward() accumulates into them)."""

    def __init__(self, params: list) -> None:
        self.params = params

    def __enter__(self) -> "_KeepGrads":
        self.saved = [p.grad for p in self.params]
        for p in self.params:
            p.grad = None
        return self

    def __exit__(self, *exc: Any) -> None:
        for p, g in zip(self.params, self.saved):
            p.grad = g


def _param_grads(output, params: list, upstream, obs: dict) -> list:
    """d output / d params (output weighted by ``upstream``); through backward() where a reentrant checkpoint makes
    autograd.grad fail."""
    import torch

    if not obs.get("reentrant"):
        try:
            return list(torch.autograd.grad(output, params, grad_outputs=upstream, allow_unused=True,
                                            retain_graph=True))
        except RuntimeError as error:
            if not _is_reentrant_error(error):
                raise
            obs["reentrant"] = True
            obs["notes_info"].append(REENTRANT_NOTE)
    with _KeepGrads(params):
        output.backward(gradient=upstream, retain_graph=True)
        return [None if p.grad is None else p.grad.detach().clone() for p in params]


def _node_grad(output, node, params: list, obs: dict):
    """d output / d node, the upstream gradient at an intermediate tensor; through a tensor hook during backward()
    where a reentrant checkpoint makes autograd.grad fail."""
    import torch

    if not obs.get("reentrant"):
        try:
            return torch.autograd.grad(output, node, allow_unused=True, retain_graph=True)[0]
        except RuntimeError as error:
            if not _is_reentrant_error(error):
                raise
            obs["reentrant"] = True
            obs["notes_info"].append(REENTRANT_NOTE)
    seen: list = []
    handle = node.register_hook(lambda grad: seen.append(grad.detach().clone()))
    try:
        with _KeepGrads(params):
            output.backward(retain_graph=True)
    finally:
        handle.remove()
    return seen[0] if seen else None


def _measure_autograd(ctx) -> dict[str, Any]:
    import torch

    pipeline = ctx.pipeline
    table = _parameter_table(pipeline)
    batch = ctx.batches(1)[0]
    out = ctx.run_step(batch, 0, grad=True)
    obs: dict[str, Any] = {"modules": {}, "notes": [], "notes_info": []}
    for _, key, group, _ in table:
        obs["modules"].setdefault(key, group)

    index = {id(p): i for i, (_, _, _, p) in enumerate(table)}
    trainable = {i for i, row in enumerate(table) if row[2] == "trainable"}

    def reach(key: str) -> set[int]:
        return {index[v] for v in _leaves(out.get(key)) if v in index}

    reached = {k: reach(k) for k in ("v_target", "xt", "x0", "x1", "mu", "logvar", "v_pred")}
    if isinstance(pipeline.velocity, torch.nn.Module):
        ids = {id(p) for p in pipeline.velocity.parameters()}
        velocity = {i for i in trainable if id(table[i][3]) in ids}
        obs["velocity_from"] = "pipeline field 'velocity'"
    else:
        velocity = (reached["v_pred"] - reached["xt"] - reached["x0"] - reached["mu"] - reached["logvar"]) & trainable
        obs["velocity_from"] = "parameters v_pred reaches that x_t does not"
    head = ((reached["x0"] | reached["mu"] | reached["logvar"]) & trainable) - velocity

    def names(indices: set[int]) -> list[str]:
        return [table[i][0] for i in sorted(indices)]

    def modules_of(indices: set[int]) -> list[str]:
        return sorted({table[i][1] for i in indices})

    obs["roles"] = {"velocity": modules_of(velocity), "head": modules_of(head)}
    obs["moving_target"] = names(reached["v_target"] & trainable)
    obs["target_reaches_frozen"] = names(reached["v_target"] - trainable)
    obs["x1_reaches"] = names(reached["x1"])
    obs["has_head"] = bool(head)
    obs["has_mu"] = "mu" in out or "logvar" in out
    obs["xt_returned"] = "xt" in out

    live = [i for i, row in enumerate(table) if row[3].requires_grad]
    params = [table[i][3] for i in live]
    terms: dict[str, Any] = {}
    obs["terms_absent"], obs["terms_without_graph"] = [], []
    for key in ("fm_loss", "kl", "loss"):
        value = out.get(key)
        if value is None:
            obs["terms_absent"].append(key)
        elif isinstance(value, torch.Tensor) and value.requires_grad:
            terms[key] = value.sum() if value.numel() > 1 else value.reshape(())
        else:
            obs["terms_without_graph"].append(key)
    fm_key = "fm_loss" if "fm_loss" in terms else ("loss" if "fm_loss" in obs["terms_absent"] else None)
    obs["fm_key"] = fm_key
    if any(_has_reentrant_checkpoint(value) for value in terms.values()):
        obs["reentrant"] = True
        obs["notes_info"].append(REENTRANT_NOTE)
    rows: list[Any] = []  # one (len(live),) tensor of squared norms per entry of `labels`
    labels: list[str] = []

    def squared(grads) -> Any:
        """Squared norm per parameter, on the host; one transfer per device, not one per parameter."""
        sums = [None if g is None else g.detach().float().pow(2).sum() for g in grads]
        host = torch.zeros(len(sums), dtype=torch.float64)
        by_device: dict[Any, list[int]] = {}
        for j, value in enumerate(sums):
            if value is not None:
                by_device.setdefault(value.device, []).append(j)
        for positions in by_device.values():
            host[positions] = torch.stack([sums[j] for j in positions]).cpu().double()
        return host

    if params:
        for key, value in terms.items():
            rows.append(squared(_param_grads(value, params, None, obs)))
            labels.append(key)
        if fm_key is not None:
            fm = terms[fm_key]
            for via in ("v_target", "xt"):
                node = out.get(via)
                if isinstance(node, torch.Tensor) and node.requires_grad:
                    upstream = _node_grad(fm, node, params, obs)
                    if upstream is not None:
                        grads = _param_grads(node, params, upstream, obs)
                        rows.append(squared(grads))
                        labels.append(f"{fm_key} via {via}")
    else:
        obs["notes"].append("no parameter of the trainable or frozen modules requires grad")
    grads: dict[str, dict[str, float]] = {}
    if rows:
        matrix = torch.stack(rows).tolist()  # already on the host: one small (terms x params) table
        for label, values in zip(labels, matrix):
            per_module: dict[str, float] = {}
            per_role = {"velocity": 0.0, "head": 0.0}
            for j, i in enumerate(live):
                key = table[i][1]
                per_module[key] = per_module.get(key, 0.0) + values[j]
                if i in velocity:
                    per_role["velocity"] += values[j]
                if i in head:
                    per_role["head"] += values[j]
            frozen_hit = [table[i][0] for j, i in enumerate(live) if table[i][2] == "frozen" and values[j] > 0]
            grads[label] = {"modules": {k: math.sqrt(s) for k, s in per_module.items()},
                            "roles": {k: math.sqrt(s) for k, s in per_role.items()},
                            "frozen_params": frozen_hit[:20], "frozen_count": len(frozen_hit)}
    obs["grads"] = grads
    obs["frozen_requires_grad"] = sorted({table[i][1] for i in live if table[i][2] == "frozen"})
    del out, terms
    return obs


# ---------------------------------------------------------------------------------------------------------------------
# judging
# ---------------------------------------------------------------------------------------------------------------------
class _Findings:
    """Measurements plus, for each non-PASS one, a one-line diagnosis and a fix."""

    def __init__(self) -> None:
        self.measurements: list[Measurement] = []
        self.issues: list[tuple[Verdict, str, str]] = []
        self.good: list[str] = []

    def add(self, measurement: Measurement, problem: str = "", fix: str = "") -> Measurement:
        self.measurements.append(measurement)
        if measurement.verdict in (Verdict.WARN, Verdict.FAIL) and problem:
            self.issues.append((measurement.verdict, problem, fix))
        return measurement


def _fmt_ratio(x: float) -> str:
    return f"{x:.3g}x"


def _candidate_fix(name: str) -> str:
    fixes = {
        "eps (the reparam noise)": "eps is the DDPM noise-prediction target, not a velocity",
        "-eps": "-eps is a noise (score-like) target, not a velocity",
        "x0": "x0 alone is the source, not a velocity",
        "x0 (the source noise: an eps target)": "the source noise is the DDPM eps target, not a velocity",
        "x1": "x1 alone is the data (an x0-prediction target), not a velocity",
        "x_t": "x_t is the model's input, not a velocity",
        "score-like -x0/a(t)": "-x0/sigma(t) is a score target, not a velocity",
    }
    return fixes.get(name, "")


def _path_velocity_text(path: dict[str, Any]) -> str:
    combo = path.get("velocity_combination")
    fit = path.get("fit", {})
    text = ""
    if combo:
        text = f"median a'(t) = {combo['x0']:.3g}, b'(t) = {combo['x1']:.3g}"
    if fit.get("describe"):
        text += f"; path fitted as {fit['describe']}, {fit.get('direction', '')}"
    return text


def _judge_path(path: dict[str, Any], th: TargetThresholds, out: _Findings, primary: bool = True) -> None:
    """The step outputs' path audit; with ``primary`` False (the implied audit decided) v_target is a cross-check."""
    if "problem" in path:
        out.add(flag("path fit", False, value=path["problem"], bad=Verdict.WARN),
                f"path not audited: {path['problem']}",
                "Return x0, x1, x_t, v_target as (B, ...) tensors with the same number of values per sample, and t "
                "as one time per sample (shape (B,) or broadcastable like (B, 1, 1, 1)).")
        return
    if path.get("t_scale"):
        # timesteps (0..1000, what diffusers' transformers take) are a convention, not a bug: the target is judged
        # against d x_t / d(t / scale), and a target in other time units shows as a mis-scaled target below
        scale = path["t_scale"]
        out.add(info("t in timestep units", path["t_raw_max"],
                     expected=f"t / {scale:g} is the path's time in [0, 1] (raw t {path['t_raw_min']:.4g}.."
                              f"{path['t_raw_max']:.4g})"))
        out.good.append(f"t in timestep units: judged as t / {scale:g}")
    residual = path["xt_residual"]
    out.add(at_most("x_t off span(x0, x1)", residual, warn=th.xt_residual_warn, fail=th.xt_residual_fail),
            f"x_t is not a mix of the returned x0 and x1: {residual:.1%} of ||x_t|| lies outside span(x0, x1)",
            "Build x_t from exactly the x0 and x1 you return (same samples, same order), with no extra noise term. "
            "If your path adds noise on purpose (torchcfm with sigma > 0, a Schrodinger bridge, a stochastic "
            "interpolant), return that noise as the step output 'noise' (torchcfm: return_noise=True): the check "
            "then fits its std s(t) and expects the target a'(t) x0 + b'(t) x1 + s'(t)/s(t) (x_t - mu_t).")
    noise = path.get("noise_term")
    if noise and "describe" in noise:
        out.add(info("noise term of x_t (step output 'noise')", noise["share"], unit="of ||x_t||",
                     expected=f"{noise['describe']}; RMS s'/s {noise['log_slope_rms']:.3g} (the target's "
                              f"s'/s (x_t - mu_t) term); off span(x0, x1) without it: "
                              f"{noise['residual_without']:.1%}"))
        out.good.append(f"x_t carries the returned noise ({noise['share']:.1%} of ||x_t||, {noise['describe']}): "
                        "the path velocity includes its s'/s term")
    fit = path["fit"]
    if not fit["ok"]:
        combo = path["v_combination"]
        extra = f" after drawing {path['extra_batches']} more batch(es)" if path["extra_batches"] else ""
        described = "" if combo is None else (
            f"; v_target ~ {combo['x0']:.3g} x0 + {combo['x1']:.3g} x1"
            + (f" (but {combo['residual']:.0%} of it is outside span(x0, x1))" if combo["residual"] > 0.05 else ""))
        out.add(flag("t spread for the path fit", False,
                     value=f"{path['distinct_t']} distinct, range {path['t_range']:.3g}",
                     expected=">= 3 distinct values spanning >= 0.02", bad=Verdict.WARN),
                f"path velocity not fitted: {fit['reason']}{extra}{described}",
                "Sample t per sample (t = torch.rand(B)), or yield more batches, so a(t) and b(t) can be fitted; "
                "with x_t = (1-t) x0 + t x1 the target must be 1.0 x1 - 1.0 x0.")
        return
    out.add(info("path", f"{fit['describe']}; {fit['direction']}"))
    out.add(info("samples (batches)", f"{path['samples']} ({path['batches']})",
                 expected=f"{path['distinct_t']} distinct t, range {path['t_range']:.3g}"))
    sched = fit["residual"]
    out.add(at_most("(a, b) off the fitted a(t), b(t)", sched, warn=th.schedule_residual_warn,
                    fail=th.schedule_residual_fail),
            f"x_t does not follow t: the per-sample mix (a, b) of x0, x1 scatters {sched:.1%} around any smooth "
            "a(t), b(t)",
            "Return the t that x_t was built with, one per sample, after any shift or warp of t (and the same t "
            "the velocity net receives).")
    if not path.get("v_target_returned", True):
        if primary:
            out.add(flag("target audited", False, value="no v_target, no implied target", bad=Verdict.WARN),
                    "the step returns no 'v_target' and the loss's implied target could not be measured: the target "
                    "is not audited",
                    "Return 'v_target' (and 'v_pred'), or declare the pipeline field 'velocity' so the target can be "
                    "read from the loss gradient.")
        else:
            out.add(info("v_target", "not returned: the loss's implied target is audited instead"))
        return
    if primary:
        _judge_match(path, path, th, out, subject="v_target")
        return
    # the implied audit decides; the step's v_target is reported as a cross-check
    cos, ratio = path["cos_median"], path["ratio_median"]
    out.add(info("median cos(v_target, path velocity)", cos, expected="cross-check (the implied target decides)"))
    out.add(info("median ||v_target|| / ||path velocity||", ratio, expected="cross-check"))


def _candidate_list(path: dict[str, Any], found: dict[str, Any]) -> list[dict[str, Any]]:
    candidates = [dict(c) for c in found["candidates"]]
    for c in candidates:
        if c["name"] == "x0" and path.get("source_is_noise"):
            c["name"] = "x0 (the source noise: an eps target)"
    return candidates


def _judge_match(path: dict[str, Any], found: dict[str, Any], th: TargetThresholds, out: _Findings,
                 subject: str, cap: Verdict = Verdict.FAIL, caveat: str = "") -> bool:
    """Judge ``found``'s cos / norm ratio against the path velocity (``subject``: "v_target" or "implied target")
    and name the candidate it resembles; True when it matches."""
    general_fix = ("Train the output toward the time derivative of your own x_t: for x_t = a(t) x0 + b(t) x1 it is "
                   "a'(t) x0 + b'(t) x1, detached (x_t = (1-t) x0 + t x1 -> x1 - x0; x_t = t x0 + (1-t) x1 -> "
                   "x0 - x1; x_t = cos(pi t/2) x0 + sin(pi t/2) x1 -> pi/2 (cos(pi t/2) x1 - sin(pi t/2) x0)).")
    label = "the loss's implied target" if subject != "v_target" else "v_target"
    if path.get("prediction", "velocity") != "velocity":
        return _judge_declared(path, found, th, out, subject, label)
    cos, ratio = found["cos_median"], found["ratio_median"]
    cos_m = at_least(f"median cos({subject}, path velocity)", cos, warn=th.cos_warn, fail=th.cos_fail)
    identified = next((c for c in _candidate_list(path, found) if c["cos"] >= IDENTIFIED and "path velocity" not in
                       c["name"]), None)
    if cos_m.verdict is Verdict.WARN and identified is not None:
        # not a near miss: the target IS another quantity (e.g. the path velocity without its noise term)
        cos_m = cos_m.model_copy(update={"verdict": Verdict.FAIL})
    ratio_m = ratio_within(f"median ||{subject}|| / ||path velocity||", ratio, warn_factor=th.norm_ratio_warn,
                           fail_factor=th.norm_ratio_fail)
    cos_m, ratio_m = (m.model_copy(update={"verdict": cap}) if m.verdict.severity > cap.severity else m
                      for m in (cos_m, ratio_m))
    out.add(cos_m)
    out.add(ratio_m)
    out.add(info(f"5th percentile cos ({subject})", found["cos_p05"]))
    samples = found["cos_samples"]
    share = sum(1 for c in samples if c < th.cos_fail) / len(samples) if samples else 0.0
    share_m = out.add(at_most(f"share of samples with cos < {th.cos_fail:g}" + (f" ({subject})" if subject !=
                                                                                 "v_target" else ""),
                              share, warn=th.disagree_share_warn, fail=None))
    if subject == "v_target":
        combo = path["v_combination"]
        out.add(info("v_target ~ c x0 + d x1", f"c {combo['x0']:.3g}, d {combo['x1']:.3g}",
                     expected=f"c = a'(t), d = b'(t): {_path_velocity_text(path)}"))
    velocity_text = _path_velocity_text(path)
    candidates = _candidate_list(path, found)
    if cos_m.verdict is not Verdict.PASS:
        best = candidates[0]
        alike = [c["name"] for c in candidates if c["cos"] >= best["cos"] - TIE]
        best = next((c for c in candidates if c["name"] in alike and "noise term" in c["name"]), best)
        concrete = [n for n in alike if "path velocity" not in n]
        if "minus the path velocity (flipped sign)" in alike:
            what = f"{label} has the flipped sign"
            if concrete:
                what += f" (it is {concrete[0]})"
            problem = f"{what}: median cos {cos:.3f} with the path velocity"
            fix = f"Negate the target: train toward d x_t / dt ({velocity_text}). " + general_fix
        elif best["cos"] >= th.cos_warn and best["name"] != "the path velocity":
            ratio_text = f", norm ratio {best['ratio']:.3g}"
            problem = (f"{label} is not the path velocity (median cos {cos:.3f}); it is {best['name']} "
                       f"(cos {best['cos']:.3f}{ratio_text})")
            fix = f"{_candidate_fix(best['name'])}. ".lstrip(". ") + general_fix + f" Here: {velocity_text}."
        else:
            near = ", ".join(f"{c['name']} (cos {c['cos']:.2f})" for c in candidates[:3])
            problem = f"{label} is not the path velocity: median cos {cos:.3f}; closest candidates: {near}"
            fix = general_fix + f" Here: {velocity_text}."
        out.issues.append((cos_m.verdict, problem + caveat, fix))
    elif ratio_m.verdict is not Verdict.PASS:
        out.issues.append((ratio_m.verdict,
                           f"{label} is {_fmt_ratio(ratio)} the path velocity (median norm ratio; cos {cos:.3f}): "
                           "a mis-scaled target" + caveat,
                           "Remove the extra factor from the target: it must be exactly d x_t / dt "
                           f"({velocity_text}). If the sampler integrates in another time variable (e.g. "
                           "phi = pi t / 2), return that variable as t."))
    if share_m.verdict is not Verdict.PASS and cos_m.verdict is Verdict.PASS:
        out.issues.append((share_m.verdict,
                           f"{share:.0%} of the samples have cos < {th.cos_fail:g} with the path velocity although "
                           f"the median is {cos:.3f}: the target is wrong for part of the batch or of the t range",
                           "Compare the target with d x_t / dt per t range; look for a branch on t (clamping, a "
                           "different formula near t=0 or t=1)."))
    fit = path["fit"]
    matched = cos_m.verdict is Verdict.PASS and ratio_m.verdict is Verdict.PASS
    if matched and subject == "v_target":
        out.good.append(f"v_target = path velocity (median cos {cos:.4f}, norm ratio {ratio:.3f}; "
                        f"{fit['direction']})")
    return matched


DECLARED = {"epsilon": ("x0", "the source noise x0"), "sample": ("x1", "the data x1")}


def _judge_declared(path: dict[str, Any], found: dict[str, Any], th: TargetThresholds, out: _Findings,
                    subject: str, label: str) -> bool:
    """A declared ``prediction`` other than velocity: the target must be the source noise (epsilon) or the data
    (sample), judged on the medians of the candidate table."""
    prediction = path["prediction"]
    key, name = DECLARED[prediction]
    entry = next(c for c in found["candidates"] if c["name"] == key)
    cos, ratio = entry["cos"], entry["ratio"]
    cos_m = out.add(at_least(f"median cos({subject}, {key})", cos, warn=th.cos_warn, fail=th.cos_fail))
    ratio_m = out.add(ratio_within(f"median ||{subject}|| / ||{key}||", ratio, warn_factor=th.norm_ratio_warn,
                                   fail_factor=th.norm_ratio_fail))
    matched = cos_m.verdict is Verdict.PASS and ratio_m.verdict is Verdict.PASS
    if not matched:
        best = _candidate_list(path, found)[0]
        worst = cos_m.verdict if cos_m.verdict.severity >= ratio_m.verdict.severity else ratio_m.verdict
        out.issues.append((worst, f"{label} is not {name}, what the declared prediction '{prediction}' means "
                                  f"(median cos {cos:.3f}, norm ratio {ratio:.3g}); it resembles {best['name']} "
                                  f"(cos {best['cos']:.3f})",
                           f"Either train the output toward {name} (prediction '{prediction}') or declare the "
                           "prediction the loss trains (pipeline field 'prediction': 'velocity', 'epsilon' or "
                           "'sample'), so the sampler converts the right quantity."))
    elif subject == "v_target":
        out.good.append(f"v_target = {name} as the declared prediction '{prediction}' (median cos {cos:.4f})")
    return matched


NEGATIVE_WEIGHT_FIX = ("A loss weight must be >= 0 for every t: a negative weight maximises the error there and "
                       "trains the output away from its target. Check the sign of the weighting formula (e.g. "
                       "diffusers' compute_loss_weighting_for_sd3) and of any factor multiplied into the loss.")


def _judge_implied(implied: dict[str, Any], path: dict[str, Any], th: TargetThresholds, out: _Findings) -> bool:
    """The implied-target audit; True when it decided the target verdict (the step's v_target is then a
    cross-check)."""
    if not implied.get("ok"):
        out.add(info("implied target", f"not measured: {implied.get('reason', '?')}",
                     expected="the loss gradient w.r.t. the velocity module's output"))
        return False
    weight = implied["weight"]
    compared = bool(implied.get("compared"))
    # the module was found by hooks, the step's v_pred is not its output and v_target matches the path: the two
    # audits disagree and fmcheck cannot tell which module the sampler integrates, so the implied audit only warns
    found_by_hooks = implied.get("how") != "pipeline field 'velocity'"
    adapter_ok = path.get("cos_median", -1.0) >= th.cos_warn and \
        1 / th.norm_ratio_warn <= path.get("ratio_median", 0.0) <= th.norm_ratio_warn
    undecided = found_by_hooks and implied.get("v_pred_is_raw") is False and adapter_ok
    cap, caveat = Verdict.FAIL, ""
    if undecided:
        cap = Verdict.WARN
        caveat = (f" (while the step's v_target matches the path velocity; {implied['module']} was found by forward "
                  "hooks: declare the pipeline field 'velocity' to settle which output the sampler uses)")
    matched = compared and _judge_match(path, implied, th, out, subject="implied target", cap=cap, caveat=caveat)
    out.add(info("velocity module (implied audit)", implied["module"], expected=implied["how"]))
    if implied.get("calls", 1) > 1:
        out.add(info("velocity module calls per step", implied["calls"], expected="the first call is audited"))
    negative = weight["negative_share"]
    out.add(at_most("share of samples with a negative loss weight", negative, warn=None, fail=0.0),
            f"the loss weight is negative for {negative:.0%} of the samples (implied k_i from the loss gradient): "
            "the loss trains the output away from its target there",
            NEGATIVE_WEIGHT_FIX)
    out.add(info("implied weight k(t) / median", weight["describe"],
                 expected=f"spread {weight.get('spread', float('nan')):.3g}x, "
                          f"{implied['zero_weight_share']:.0%} of samples with zero weight"))
    if not compared:
        out.add(info("implied target vs path velocity", f"not compared: {implied['not_compared']}"))
        return False
    if matched:
        relabel = ""
        if path.get("prediction", "velocity") == "velocity" and (
                implied.get("v_pred_is_raw") is False or path.get("cos_median", 1.0) < th.cos_warn):
            relabel = (f"; the step's v_target is a relabelled target (median cos {path.get('cos_median', 0):.3f} "
                       "with the path velocity): the loss preconditions the output")
        key, toward = DECLARED.get(path.get("prediction", "velocity"), ("", "the path velocity"))
        entry = next((c for c in implied["candidates"] if c["name"] == key),
                     {"cos": implied["cos_median"], "ratio": implied["ratio_median"]})
        out.good.append(f"the loss trains the raw output of {implied['module']} toward {toward} (median "
                        f"cos {entry['cos']:.4f}, norm ratio {entry['ratio']:.3f}; "
                        f"{path['fit']['direction']}); loss weight {weight['describe']}{relabel}")
    return True


def _norm_text(value: float) -> str:
    return f"{value:.3g}"


def _judge_autograd(grad: dict[str, Any], out: _Findings) -> None:
    moving = grad["moving_target"]
    out.add(flag("trainable parameters v_target reaches", not moving, value=len(moving), expected="0"),
            f"moving target: v_target carries autograd history into {len(moving)} trainable parameter(s) "
            f"({', '.join(moving[:4])}{', ...' if len(moving) > 4 else ''})",
            DETACH_FIX)
    for note in grad.get("notes_info", []):
        out.add(info("gradient map", note))
    for note in grad["notes"]:
        out.add(flag("gradient map", False, value=note, bad=Verdict.WARN), note,
                "Make the step compute its loss with autograd enabled for the trainable modules.")
    for key in grad["terms_without_graph"]:
        if key == "kl":
            continue  # judged with the KL path below
        out.add(flag(f"{key} has an autograd graph", False, value=False, bad=Verdict.FAIL),
                f"'{key}' carries no gradient at all (computed under no_grad, detached, or a Python number)",
                f"Compute '{key}' from tensors with autograd history; training calls loss.backward() on it.")
    grads = grad["grads"]
    fm_key = grad["fm_key"]
    roles = grad["roles"]
    fm = grads.get(fm_key) if fm_key is not None else None
    good: list[str] = []
    if fm is not None:
        _judge_fm_paths(grad, fm_key, fm, out)
        good.append(f"{fm_key} -> " + ", ".join(f"{m} {_norm_text(n)}" for m, n in sorted(fm["modules"].items())
                                                if grad["modules"].get(m) == "trainable" and n > 0))
    if "kl" in grads:
        kl = grads["kl"]
        kl_tiny = ZERO_REL * max([*kl["modules"].values(), 0.0])
        others = {m: n for m, n in kl["modules"].items()
                  if grad["modules"].get(m) == "trainable" and m not in roles["head"] and n > kl_tiny and n > 0}
        if grad["has_head"]:
            to_head = kl["roles"]["head"]
            out.add(flag("kl reaches the head", to_head > 0, value=to_head, expected="> 0", bad=Verdict.WARN),
                    "kl carries no gradient to the head",
                    "Compute kl from the head's mu and logvar with autograd (not detached).")
        out.add(flag("kl reaches modules other than the head", not others, value=", ".join(sorted(others)) or "none",
                     expected="none", bad=Verdict.WARN),
                f"kl sends gradient into {', '.join(sorted(others))}, not only the head",
                "The KL of q(z0|text) against N(0, I) depends on the head's mu and logvar only.")
        good.append("kl -> " + (", ".join(roles["head"]) or "nothing"))
    elif "kl" in grad["terms_without_graph"]:
        out.add(flag("kl has an autograd graph", not grad["has_head"], value=False,
                     expected="a graph to the head" if grad["has_head"] else "", bad=Verdict.WARN),
                "kl carries no gradient (computed under no_grad, detached, or a Python number): the KL term does "
                "not train the head",
                "Compute kl from the head's mu and logvar with autograd (not detached).")
    elif "kl" in grad["terms_absent"]:
        out.add(info("kl gradient path", "no kl output: KL path not audited"))
        good.append("no kl output: KL path not audited")
    frozen_hits: dict[str, float] = {}
    for label in ("loss", "fm_loss", "kl"):
        entry = grads.get(label)
        if entry:
            for module, norm in entry["modules"].items():
                if grad["modules"].get(module) == "frozen" and norm > 0:
                    frozen_hits[module] = max(frozen_hits.get(module, 0.0), norm)
    out.add(flag("gradient into frozen modules", not frozen_hits,
                 value=", ".join(f"{m} {_norm_text(n)}" for m, n in sorted(frozen_hits.items())) or "none",
                 expected="none"),
            f"frozen module(s) {', '.join(sorted(frozen_hits))} receive gradient "
            f"(|grad| {', '.join(_norm_text(n) for n in frozen_hits.values())})",
            "Freeze them (module.requires_grad_(False)) and run them under torch.no_grad() (e.g. the VAE encode "
            "that makes z1): they are not trained, and their graph costs memory and time.")
    if grads:
        silent = [m for m, group in grad["modules"].items() if group == "trainable"
                  and sum(grads[k]["modules"].get(m, 0.0) for k in ("loss", "fm_loss", "kl") if k in grads) <= 0]
        already = set(roles["velocity"]) | (set(roles["head"]) if grad["has_head"] else set())
        silent = [m for m in silent if m not in already]
        out.add(flag("trainable modules with no gradient", not silent, value=", ".join(silent) or "none",
                     expected="none", bad=Verdict.WARN),
                f"trainable module(s) {', '.join(silent)} get no gradient from loss, fm_loss or kl at step 0",
                "Every module the optimizer trains must be reached by the loss; check for detach/no_grad, or drop "
                "the module from `trainable`.")
    if good:
        out.good.append("; ".join(good))


def _judge_fm_paths(grad: dict[str, Any], fm_key: str, fm: dict[str, Any], out: _Findings) -> None:
    """fm_loss must reach the velocity net, the head through x_t, and nothing through v_target."""
    grads = grad["grads"]
    roles = grad["roles"]
    tiny = ZERO_REL * max([*fm["modules"].values(), 0.0])
    for module, norm in sorted(fm["modules"].items()):
        if grad["modules"].get(module) == "trainable":
            out.add(info(f"|grad {fm_key}| {module}", norm, expected="> 0"))
    if roles["velocity"]:
        v_norm = fm["roles"]["velocity"]
        out.add(flag(f"{fm_key} reaches the velocity net", v_norm > tiny and v_norm > 0, value=v_norm,
                     expected="> 0"),
                f"the velocity net ({', '.join(roles['velocity'])}) gets no gradient from {fm_key}",
                "Compute v_pred with autograd (no torch.no_grad(), .detach() or .data on the way from the velocity "
                "net to the loss).")
    via_target = grads.get(f"{fm_key} via v_target")
    if via_target is not None:
        hit = {m: n for m, n in via_target["modules"].items() if n > tiny and n > 0}
        out.add(flag(f"{fm_key} gradient through v_target", not hit, value=max(hit.values()) if hit else 0.0,
                     expected="0"),
                f"gradient flows through the target into {', '.join(sorted(hit))} "
                f"(|grad| {', '.join(_norm_text(n) for n in hit.values())})",
                DETACH_FIX)
    if grad["has_head"] and not grad.get("xt_returned", True):
        out.add(info(f"{fm_key} reaches the head through x_t", "not measured: the step returns no 'xt'"))
    elif grad["has_head"]:
        h_norm = fm["roles"]["head"]
        via_xt = grads.get(f"{fm_key} via xt")
        xt_norm = via_xt["roles"]["head"] if via_xt else 0.0
        out.add(flag(f"{fm_key} reaches the head through x_t", xt_norm > tiny and xt_norm > 0, value=xt_norm,
                     expected="> 0", bad=Verdict.WARN),
                f"the head ({', '.join(roles['head'])}) gets no gradient from {fm_key} through x_t "
                f"(total {_norm_text(h_norm)}): the reparameterisation path is closed (z0 detached before x_t)",
                "Build x_t from the reparameterised sample z0 = mu + sigma * eps without .detach(): the FM loss "
                "must train the head through x_t (only the target is detached).")
    elif not grad["has_mu"]:
        out.add(info("head", "none: the source is not produced by a trainable module"))


def _judge_precision(prec: dict[str, Any], out: _Findings) -> None:
    dtypes = prec["dtypes"]
    full = ("torch.float32", "torch.float64")
    if dtypes["xt"] in HALF and dtypes["x0"] in full and dtypes["x1"] in full:
        out.add(flag("x_t dtype", False, value=dtypes["xt"], expected="float32 like x0, x1", bad=Verdict.WARN),
                f"x_t is {dtypes['xt']} while x0 and x1 are float32: the path is built in half precision",
                "Build x_t in float32 ((1 - t) * x0 + t * x1 on float32 tensors), then cast where the network "
                "needs it (autocast does this for its inputs).")
    shares = prec["half_exact_share"]
    if "xt" in shares and dtypes["xt"] in full:
        for half in ("float16", "bfloat16"):
            xt_share = shares["xt"][half]
            base = max(shares.get("x0", {}).get(half, 0.0), shares.get("x1", {}).get(half, 0.0))
            quantised = xt_share >= 0.99 and xt_share - base >= 0.5
            if quantised:
                out.add(flag("x_t values exact in half precision", False, value=xt_share,
                             expected=f"about the share of x0, x1 ({base:.2g})", bad=Verdict.WARN),
                        f"x_t is {dtypes['xt']} but {xt_share:.1%} of its values are exact {half} numbers (x0, x1: "
                        f"{base:.1%}): it was computed in {half} and cast back",
                        "Build x_t in float32 from float32 x0, x1 (outside autocast or with explicit .float()), "
                        "then cast.")
                break
    # (shapes: fmcheck's core already rejects step outputs whose latent-space shapes disagree)
    if dtypes["v_pred"] is not None and dtypes["v_target"] is not None and dtypes["v_pred"] != dtypes["v_target"]:
        lossy = dtypes["v_target"] in HALF and dtypes["x0"] in full
        out.add(flag("v_pred / v_target dtypes", not lossy, value=f"{dtypes['v_pred']} / {dtypes['v_target']}",
                     expected="v_target in float32", bad=Verdict.WARN),
                f"v_target is {dtypes['v_target']}: the target itself is rounded to half precision",
                "Compute v_target in float32 and the loss in float32 (F.mse_loss(v_pred.float(), v_target)).")


class TargetCheck(Check):
    id = "target"
    title = "Target, detach and gradient paths"
    purpose = ("v_target is the velocity of the user's own path (any affine path, either time direction), "
               "detached; gradient reaches the right modules.")
    order = 30
    # x0, x1, t, xt are needed unless the step returns only its loss and declares its velocity module (then the
    # path is inferred in measure; a Skip names what is missing otherwise)
    Thresholds = TargetThresholds
    doc = CheckDoc(
        what=(
            "**Implied-target audit** (the primary verdict whenever the velocity module's raw output can be found: "
            "the pipeline field `velocity`, else the outermost trainable module called with the step's `xt`, "
            "found through forward hooks as `structure` does). The step's own labels can be in another "
            "parameterisation than the network's output, so the loss is asked instead. The step runs twice more "
            "on batch 0 with its randomness replayed (the same seed as the cached outputs); a forward hook "
            "replaces the module's output by a leaf tensor holding the output itself (raw), then raw + delta "
            "(delta: seeded Gaussian noise of the output's RMS). For a loss that is a per-sample weighted squared "
            "error of any affine function of the output (plain MSE, diffusers' `precondition_outputs`, any loss "
            "weighting) the gradient is g_i = k_i (raw_i - target_i), so per sample k_i = <g1 - g0, delta> / "
            "||delta||^2 is the implied loss weight and target_i = raw_i - g0_i / k_i the implied target. The "
            "implied target is compared with the fitted path velocity exactly as v_target is below (median cosine, "
            "norm ratio, the candidate it resembles); a negative k_i for any sample fails (the loss trains the "
            "output away from its target there); the weight's shape in t is reported (k / median k, a power law "
            "k ~ t^p (1 - t)^q when one fits) and drawn by `--plot` (`target-weight.png`). The audit is not used, "
            "and says why, when the two probes' raw outputs differ (randomness not replayed: a private generator "
            "that advances), when g1 - g0 misses k delta by more than 2% (an L1 or Huber loss, weights varying "
            "inside a sample), when the loss has no gradient to the output, or when the output's layout cannot be "
            "matched to x0 (Flux-style packed tokens are unpacked through the module's x_t input). If the module "
            "was only found by hooks, the step's `v_pred` is not its output and the step's `v_target` matches the "
            "path velocity while the implied target does not, the audits disagree and the verdict is at most WARN "
            "(declaring `velocity` settles it). With the implied audit deciding, the step's v_target comparison "
            "is reported as a cross-check (a preconditioned target, e.g. the latents, is expected there); a step "
            "that returns no `v_target` (nor `v_pred`: a loss module that keeps them as locals) is audited by the "
            "implied target alone, and warns that the target is not audited when that cannot run. A step that "
            "returns only `loss` with a declared `velocity` module is audited too, and the report lists what was "
            "inferred: x_t and t from the module's arguments (the argument shaped like its output; the only "
            "per-sample scalar), x1 from the pipeline's `encode` (seeded like the step), v_pred from its output, "
            "the target from the loss gradient, and the path from x_t and x1 alone: for a source independent of "
            "the data, B(t), a smooth fit of <x_t, x1> / ||x1||^2, is b(t), A(t), a fit of ||x_t - B(t) x1||, is "
            "a(t) up to a factor, and the path velocity is (A'/A)(x_t - B x1) + B' x1. The "
            "optional pipeline field `prediction` (`velocity`, the default; `epsilon`; `sample`) says what the "
            "output is meant to be: with `epsilon` the target must be the source noise x0, with `sample` the data "
            "x1.\n\n"
            "Worked example, diffusers' SD3 DreamBooth loss with `precondition_outputs`: x_t = (1 - sigma) x1 + "
            "sigma noise, model_pred = raw * (-sigma) + x_t, target = x1, so the loss is "
            "sigma^2 ||raw - (noise - x1)||^2: the raw output is trained toward noise - x1 = d x_t / d sigma, the "
            "path velocity, with weight sigma^2. `fmcheck target --module fixtures.bugs._target_sd3:build` (a "
            "one-layer SD3Transformer2DModel, logit-normal sigma, no weighting) reports `median cos(implied target, "
            "path velocity)` 1.0, norm ratio 1.0, `implied weight k(t) / median` ~ t^2.00 (spread 9.86x), and "
            "notes that the step's v_target (the latents) is a relabelled target (median cos -0.709 with the path "
            "velocity). With the `sigma_sqrt` weighting (sigma^-2) the implied weight is constant in t; with the "
            "wrong sign of sigma (`fixtures/libs/diffusers_sd3_precondition_wrong_sign.py`) the implied target "
            "has the flipped sign: median cos -1.000, FAIL.\n\n"
            "**Path audit** (cached outputs of the first `measure_batches` batches, pooled; more batches, up to "
            "`max_batches`, while t has fewer than 8 distinct values). Per sample, least squares of x_t on "
            "(x0, x1) gives the mix x_t ~ a_i x0 + b_i x1 and the residual: the share of ||x_t|| outside "
            "span(x0, x1) (`x_t off span(x0, x1)`). `t` is read as one time per sample ((B,), (B, 1, 1, 1), a "
            "scalar); a t above 1.5 is in timestep units (diffusers' 0..1000) and is divided by the next power of "
            "ten (999 -> 1000), reported, not warned about. Over the batch, a(t) and b(t) are fitted as smooth curves: Legendre polynomials of "
            "degree 1-12 in t (or in sqrt(t) / sqrt(1-t), which hold VP paths' square-root ends), the simplest "
            "whose leave-one-out error over the distinct t values is within 1.5x of the best. The scatter of the "
            "(a_i, b_i) around the curves (`(a, b) off the fitted a(t), b(t)`) shows whether x_t was built with "
            "the returned t. The expected velocity is d x_t / dt = a'(t) x0 + b'(t) x1; per sample, the cosine "
            "and the norm ratio ||v_target|| / ||a' x0 + b' x1|| are computed, judged on their medians, and the "
            "share of samples with cos < `cos_fail` is reported. A path with a noise term, x_t = a(t) x0 + b(t) x1 "
            "+ s(t) noise, is modelled when the step returns that noise as the output `noise` (torchcfm's "
            "`return_noise=True`): x_t is regressed per sample on (x0, x1, noise), s(t)^2 is fitted as a smooth "
            "curve and the path velocity gains the term s'(t)/s(t) (x_t - mu_t) (zero for torchcfm's constant "
            "sigma, (1 - 2t) / (2t (1 - t)) for the Schrodinger bridge); a target without a needed term fails as "
            "`a'(t) x0 + b'(t) x1 without the noise term`. Noise the step does not return stays in the span "
            "residual. A wrong candidate that matches the target at cos >= 0.999 turns a near-miss WARN into a "
            "FAIL. Nothing assumes a convention: linear, reversed "
            "(t=1 at the source), cosine/trig, VP and sigma_min paths all pass when the target is their "
            "derivative. When the target fails, it is compared with the usual wrong targets (x0 - x1, x1 - x0, "
            "x0, x1, eps, -eps, the score-like -x0/a(t), x_t, the scaled path velocity) and the summary says which "
            "it is. v_target is also expressed as c x0 + d x1 per sample (medians reported).\n\n"
            "**Detach and gradient paths** (one fresh forward of batch 0, step_index 0, with autograd). The "
            "autograd graph of v_target is walked to its leaves (AccumulateGrad nodes): any trainable parameter "
            "it reaches is a moving target and fails, by name. The roles come from the graph: the velocity net "
            "is the pipeline's `velocity` module (else the parameters v_pred reaches but x_t does not), the head "
            "the trainable parameters x0, mu or logvar reach. For each loss term (`fm_loss`, `kl`, `loss`), "
            "torch.autograd.grad gives the gradient norm of every trainable and frozen module; fm_loss's "
            "gradient is also split into the part through x_t and the part through v_target (the upstream "
            "gradient at those nodes pulled back to the parameters). Expected: fm_loss reaches the velocity net "
            "(else fail) and the head through x_t (else warn: the reparameterisation path is closed); nothing "
            "through v_target (else fail); kl reaches the head (else warn) and nothing else (else warn); no "
            "frozen parameter (the `frozen` modules and the `vae`) that requires grad receives any (else fail); "
            "every other trainable module gets some gradient (else warn). Without kl (plain N(0, I) source) the "
            "KL path is not audited and says so.\n\n"
            "**Precision** (batch 0). x_t in float16/bfloat16 while x0 and x1 are float32 warns; so does a float32 "
            "x_t whose values are (almost) all exact half-precision numbers when those of x0 and x1 are not "
            "(computed in half, cast back). A half-precision v_target next to float32 x0 warns; v_pred and "
            "v_target dtypes are reported when they differ. (Shapes that disagree are rejected before any check "
            "runs.)"
        ),
        why=(
            "The model learns whatever the target says. In noise-free flow matching the target is the velocity of "
            "the path, v* = d x_t / dt (x1 - x0 for the linear path, constant in t). An epsilon (DDPM) target, a "
            "score, x0 or x1, a flipped sign or an extra factor all still train (the loss falls) but the sampler, "
            "which integrates v from the source to the data, goes somewhere else. A target that is not detached "
            "moves: the head's gradient then also pulls z0 towards what the net predicts, and the head and KL "
            "collapse. Conversely the head must receive gradient through x_t via the reparameterised z0, or it is "
            "trained by the KL alone. Frozen modules (VAE, text encoder) that receive gradient waste memory and, "
            "with a careless optimizer, drift. An x_t built in half precision loses 3 significant digits of the "
            "interpolation that the velocity net must undo."
        ),
        bug_example=(
            "```python\n"
            "xt = (1 - t) * x0 + t * x1\n"
            "v_target = x0 - x1                      # flipped sign (the path's velocity is x1 - x0)\n"
            "v_target = eps                          # DDPM habit: predicts the noise\n"
            "v_target = x1 - x0                      # not detached: x0 carries the head's graph\n"
            "xt = (1 - t) * x0.detach() + t * x1     # reparam path closed: the head gets no FM gradient\n"
            "z1 = vae.encode(x).latent_dist.sample() # without torch.no_grad(), VAE not frozen\n"
            "```\n"
            "fmcheck reports, for the first: `v_target has the flipped sign (it is x0 - x1): median cos -1.000 with "
            "the path velocity`; for the third: `moving target: v_target carries autograd history into 6 trainable "
            "parameter(s) (head.layers.0.weight, ...)`."
        ),
        fix=(
            "v_target = d x_t / dt of your own path, detached: for x_t = (1-t) x0 + t x1, v_target = "
            "(x1 - x0).detach(); for t=1 at the source, (x0 - x1).detach(); for the cosine path, "
            "pi/2 (cos(pi t/2) x1 - sin(pi t/2) x0). Keep x0 = mu + sigma * eps un-detached inside x_t so the head "
            "is trained through it. Freeze the VAE and text encoder (requires_grad_(False)) and encode under "
            "torch.no_grad(). Build x_t in float32 and cast afterwards. Return t in [0, 1] as the network sees it."
        ),
        causes=(
            "sign convention mixed up between papers (t=1 at the data vs at the noise)",
            "a DDPM/score codebase's target kept (eps, -eps/sigma, x0-prediction)",
            "a weighting folded into the target (0.5 (x1 - x0), sigma-scaled targets)",
            "missing .detach() on the target or on x0/x1 inside it",
            "z0 detached before x_t (or a no_grad region around the source sample)",
            "the VAE encode outside torch.no_grad() with its parameters not frozen",
            "x_t computed under an autocast region or from .half() tensors",
            "t warped (shifted, logit-normal) after x_t was built, or extra noise added to x_t",
            "precondition_outputs with the wrong sign of sigma, or a loss weighting that goes negative",
            "a stochastic path (Schrodinger bridge) trained on the plain x1 - x0 without its noise term",
        ),
        blind_spots=(
            "The path is identified from x0, x1 and x_t as returned: if the step returns other tensors than the "
            "ones the loss uses (e.g. a detached copy of a non-detached target), the audit sees the copies.",
            "Noise in x_t that the step does not return as `noise` fails the span residual even where it is a "
            "constant-std noise term whose target needs no extra term (torchcfm's sigma > 0 written without "
            "return_noise): nothing in (x0, x1, t, x_t) tells it from a stray term.",
            "A loss-only step's path is inferred from one batch with low-degree curves: exact for linear paths "
            "(rectified flow, SD3), approximate for trigonometric ones (a correct cosine path measured median cos "
            "0.92 on 32 samples of 64 values: WARN); a source correlated with the data (OT pairing) biases b(t).",
            "The implied-target audit assumes the velocity module's first call in the step is the one the loss "
            "trains (self-conditioning or a second call is noted, not audited) and a per-sample weighted squared "
            "error; other losses fall back to the step's v_target.",
            "A target deliberately expressed in another time variable (v-prediction w.r.t. phi = pi t / 2) is "
            "reported as mis-scaled: return that variable as t.",
            "Timestep units are normalised by the next power of ten above max(t) (1000 for 0..999); a schedule "
            "over another span (e.g. 0..500) is judged with the wrong time unit.",
            "The gradient map is taken at step_index 0 on one batch: a loss term switched on later (KL warmup) is "
            "still audited through its unweighted `kl` output; behaviour that changes with the step is not.",
        ),
    )

    def measure(self, ctx) -> dict[str, Any]:
        limits = self.Thresholds(**ctx.settings.thresholds.get(self.id, {}))
        from fmcheck.checks import _target_implied as ti

        store: dict[str, Any] = {}
        try:
            path = _measure_path(ctx, limits.max_batches, store)
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

    def judge(self, obs: dict[str, Any], th: TargetThresholds) -> Judgement:
        out = _Findings()
        implied = obs.get("implied", {"ok": False, "reason": "not run"})
        decided = "problem" not in obs["path"] and _judge_implied(implied, obs["path"], th, out)
        if obs["path"].get("inferred"):
            out.add(info("values inferred", "; ".join(implied["inferred"]),
                         expected="the step returns only 'loss': these come from the velocity module and encode"))
            out.add(info("path (inferred)", f"{implied['describe']}; {implied['direction']}"))
        else:
            _judge_path(obs["path"], th, out, primary=not decided)
        _judge_autograd(obs["autograd"], out)
        _judge_precision(obs["precision"], out)
        path = {k: v for k, v in obs["path"].items() if k != "cos_samples"}
        if "schedule" in path:
            path["schedule"] = {**path["schedule"], "guides": {"cos": [[th.cos_warn, "warn"], [th.cos_fail, "fail"]]}}
        details = {
            "path": path,
            "implied": {k: v for k, v in implied.items() if k != "cos_samples"},
            "gradients": obs["autograd"]["grads"],
            "roles": obs["autograd"]["roles"],
            "moving_target": obs["autograd"]["moving_target"],
            "target_reaches_frozen": obs["autograd"]["target_reaches_frozen"],
            "x1_reaches": obs["autograd"]["x1_reaches"][:20],
            "precision": obs["precision"],
        }
        judgement = Judgement(measurements=out.measurements, summary="", details=details)
        verdict = judgement.final_verdict()
        issues = sorted(out.issues, key=lambda i: -i[0].severity)
        if verdict is Verdict.PASS or not issues:
            judgement.summary = "; ".join(out.good) or "target, detach and gradient paths as expected"
            return judgement
        worst = [i for i in issues if i[0] is issues[0][0]]
        summary = worst[0][1]
        if len(issues) > 1:
            summary += f" (+{len(issues) - 1} more: " + "; ".join(i[1] for i in issues[1:3])
            summary += "; ...)" if len(issues) > 3 else ")"
        judgement.summary = summary
        hints = []
        for _, _, fix in issues:
            if fix and fix not in hints:
                hints.append(fix)
        judgement.hint = " | ".join(hints)
        return judgement
