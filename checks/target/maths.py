"""`target`'s pure maths (no user code, no torch at import): the implied target and weight from two gradient
probes, the weight's shape in t, and the path of a loss-only step inferred from x_t and x1 alone.

The implied target: for any per-sample weighted squared error of an affine function of the output, the gradient with
respect to the raw output is affine in it, g_i = k_i (raw_i - target_i), so two probes, at the raw output and at
raw + delta, give per sample the slope k_i = <g1_i - g0_i, delta_i> / ||delta_i||^2 (the implied loss weight) and
the implied target target_i = raw_i - g0_i / k_i. The misfit of g1 - g0 to k_i delta_i says whether that model holds.

The inferred path: for x_t = a(t) x0 + b(t) x1 with a source independent of the data, a smooth fit B(t) of
<x_t, x1> / ||x1||^2 is b(t) and a fit A(t) of ||x_t - B(t) x1|| is a(t) up to a factor, so
v = (A'/A)(t) (x_t - B(t) x1) + B'(t) x1 (see ``inferred.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

ZERO_WEIGHT = 1e-9  # |k_i| below this fraction of max |k| counts as a sample the loss does not train
MIN_SAMPLES = 8  # fewer samples cannot support the two curves of an inferred path
SCATTER_POINTS = 512  # per-sample points kept for the figures (the JSON report carries them)


def thin(count: int) -> Any:
    """Evenly spaced indices of at most SCATTER_POINTS out of ``count``."""
    import numpy as np

    return np.unique(np.linspace(0, count - 1, min(count, SCATTER_POINTS)).round().astype(int)) if count else \
        np.zeros(0, dtype=int)


# -- the implied target -------------------------------------------------------------------------------
@dataclass
class Solved:
    k: Any  # (N,) implied per-sample weight
    target: Any  # (N, D) implied target of the raw output (NaN rows where k is zero)
    misfit: Any  # (N,) ||g1 - g0 - k delta|| / ||g1 - g0||: 0 for a weighted squared error


def solve(raw, g0, g1, delta) -> Solved:
    """Per sample, the affine map g = k (raw - target) through the two probes; all (N, D) tensors."""
    import torch

    raw, g0, g1, delta = (x.detach().reshape(x.shape[0], -1).to(torch.float64) for x in (raw, g0, g1, delta))
    change = g1 - g0
    k = (change * delta).sum(1) / (delta * delta).sum(1)
    rest = (change - k[:, None] * delta).norm(dim=1)
    size = change.norm(dim=1)
    misfit = torch.where(size > 0, rest / torch.where(size > 0, size, torch.ones_like(size)),
                         torch.zeros_like(size))
    scale = float(k.abs().max()) if k.numel() else 0.0
    trained = k.abs() > ZERO_WEIGHT * scale
    safe = torch.where(trained, k, torch.ones_like(k))
    target = torch.where(trained[:, None], raw - g0 / safe[:, None], torch.full_like(raw, float("nan")))
    return Solved(k=k, target=target, misfit=misfit)


def weight_shape(t, k) -> dict[str, Any]:
    """How the implied weight varies with the path's time: k normalised to its median, its spread, and the power law
    k ~ c t^p (1 - t)^q fitted in logs over the samples with k > 0 and t inside (0, 1) (SD3's precondition_outputs
    with t = sigma gives p = 2, q = 0; a constant weight p = q = 0)."""
    import numpy as np

    t = np.asarray(t, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    positive = k > 0
    out: dict[str, Any] = {"negative_share": float(np.mean(k < 0)) if k.size else 0.0}
    if not positive.any():
        out.update(median=0.0, spread=math.nan, describe="no sample has a positive weight")
        return out
    median = float(np.median(k[positive]))
    norm = k / median
    out["median"] = median
    out["spread"] = float(norm[positive].max() / norm[positive].min())
    inside = positive & (t > 1e-6) & (t < 1 - 1e-6)
    if out["spread"] < 1.01:
        out.update(p=0.0, q=0.0, describe="constant in t")
        return out
    if inside.sum() >= 4 and np.ptp(t[inside]) > 0:
        design = np.stack([np.ones(inside.sum()), np.log(t[inside]), np.log1p(-t[inside])], 1)
        coef, *_ = np.linalg.lstsq(design, np.log(norm[inside]), rcond=None)
        fitted = design @ coef
        resid = float(np.sqrt(np.mean((np.log(norm[inside]) - fitted) ** 2)))
        p, q = (float(x) for x in coef[1:])
        out.update(p=p, q=q, log_residual=resid)
        if resid < 0.05:
            terms = [f"t^{p:.2f}" if abs(p) > 0.05 else "", f"(1-t)^{q:.2f}" if abs(q) > 0.05 else ""]
            out["describe"] = "~ " + (" ".join(x for x in terms if x) or "constant")
            return out
    corr = float(np.corrcoef(t[positive], norm[positive])[0, 1]) if positive.sum() > 2 and np.ptp(t) > 0 else 0.0
    out["describe"] = (f"varies {out['spread']:.3g}x over the batch (correlation with t {corr:+.2f}); no power law "
                       "of t and 1 - t fits")
    return out



@dataclass
class InferredPath:
    ok: bool
    reason: str = ""
    expected: Any = None  # (N, D) the path velocity
    source: Any = None  # (N, D) the inferred x0 direction, scaled by 1 / A(t)
    describe: str = ""
    direction: str = ""
    ends: Optional[dict] = None


def infer_path(xt, x1, t) -> InferredPath:
    """The path velocity of each sample from x_t, x1 and the path time t (numpy, in [0, 1] units)."""
    import numpy as np
    import torch

    from .. import _path_fit as pf

    xt, x1 = pf.flat(xt), pf.flat(x1)
    t = np.asarray(t, dtype=np.float64)
    n = int(xt.shape[0])
    count, width = pf.spread(t)
    if n < MIN_SAMPLES or count < pf.MIN_DISTINCT_T + 1 or width < pf.MIN_T_RANGE:
        return InferredPath(False, f"{n} samples with {count} distinct t spanning {width:.3g}: too few to infer "
                                   "the path without x0")
    size = (x1 * x1).sum(1)
    if bool((size <= 0).any()):
        return InferredPath(False, "some x1 is zero")
    b_hat = ((xt * x1).sum(1) / size).cpu().numpy()
    b_curve = pf.fit_over_t(t, b_hat, max_degree=3)
    b_t = torch.as_tensor(b_curve.value(t), dtype=torch.float64, device=xt.device)
    rest = xt - b_t[:, None] * x1
    # ||x_t - B x1|| scatters ~1/sqrt(2D) per sample around a(t) ||x0||: low degrees only (linear paths are exact)
    norms = (rest.norm(dim=1) / math.sqrt(xt.shape[1])).cpu().numpy()
    a_curve = pf.fit_over_t(t, norms, max_degree=3)
    a_t = a_curve.value(t)
    if not bool(np.all(a_t > 1e-3 * float(np.max(np.abs(a_t))))):
        return InferredPath(False, "the source's share of x_t, ||x_t - b(t) x1||, reaches zero inside the t range: "
                                   "its log-derivative is undefined there")
    log_slope = torch.as_tensor(a_curve.slope(t) / a_t, dtype=torch.float64, device=xt.device)
    db = torch.as_tensor(b_curve.slope(t), dtype=torch.float64, device=xt.device)
    expected = log_slope[:, None] * rest + db[:, None] * x1
    source = rest / torch.as_tensor(a_t, dtype=torch.float64, device=xt.device)[:, None]
    lo, hi = float(t.min()), float(t.max())
    ends = {"t": [lo, hi], "b": [float(b_curve.value(np.array([lo]))[0]), float(b_curve.value(np.array([hi]))[0])],
            "a (relative)": [float(a_curve.value(np.array([lo]))[0] / a_curve.value(np.array([hi]))[0]), 1.0]}
    rising = ends["b"][1] > ends["b"][0]
    direction = "t=1 at the data (x1)" if rising else "t=1 at the source (x0)"
    return InferredPath(True, expected=expected, source=source, direction=direction, ends=ends,
                        describe=f"b(t) {b_curve.describe()}, a(t) up to a factor {a_curve.describe()} "
                                 "(inferred from x_t and x1)")


