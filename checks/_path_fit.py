"""Pure maths of the `target` check: identify the user's interpolation path and its velocity from step outputs.

Any affine probability path writes ``x_t = a(t) x0 + b(t) x1`` (linear, reversed, cosine/trig, VP, sigma_min OT...),
and its velocity is ``dx_t/dt = a'(t) x0 + b'(t) x1``. Nothing here assumes a convention: the coefficients are
measured.

1. Per sample, least squares of x_t on (x0, x1) gives (a_i, b_i) and the part of x_t outside span(x0, x1)
   (the residual: extra noise, a wrong x0/x1, an x_t from another sample).
2. Over the batch, a(t) and b(t) are each modelled as a smooth curve: a Legendre polynomial series on the observed
   range of a time coordinate (t itself, or sqrt(t) / sqrt(1-t) for paths with a square-root end such as VP), with
   the coordinate and degree (1..12) chosen by leave-one-out cross-validation over the distinct t values.
   Polynomials represent linear paths exactly and approximate trigonometric schedules to ~1e-8 on [0, 1]; the
   cross-validation keeps the degree as low as the data allow, so noise is not differentiated into the velocity.
3. The expected velocity a'(t_i) x0_i + b'(t_i) x1_i is compared with v_target per sample (cosine and norm ratio).

Tensor functions take (N, D) tensors (flattened samples) and stay on their device; the schedule fit works on small
float64 numpy vectors (one value per sample).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

MAX_DEGREE = 12
MIN_DISTINCT_T = 3  # the fewest distinct t values a schedule (and its derivative) can be fitted and validated on
MIN_T_RANGE = 0.02  # the smallest spread of t (after normalisation) worth fitting on
WANT_DISTINCT_T = 8  # below this the caller should draw more batches
TIMESTEP_THRESHOLD = 1.5  # max(t) above this: t is in timestep units


# -- step 1: per-sample coefficients ---------------------------------------------------------------------------------
@dataclass
class SampleFit:
    a: torch.Tensor  # (N,) coefficient of x0
    b: torch.Tensor  # (N,) coefficient of x1
    residual_sq: torch.Tensor  # (N,) ||x_t - a x0 - b x1||^2
    xt_sq: torch.Tensor  # (N,) ||x_t||^2
    usable: torch.Tensor  # (N,) bool: x0 and x1 not (nearly) collinear, so (a, b) is identifiable

    def relative_residual(self) -> float:
        """sqrt(sum ||residual||^2 / sum ||x_t||^2): the share of x_t that no path through x0 and x1 explains."""
        total = float(self.xt_sq.sum())
        return math.sqrt(float(self.residual_sq.sum()) / total) if total > 0 else 0.0


def flat(x: torch.Tensor) -> torch.Tensor:
    """(N, ...) -> (N, D) in float64 (exact Gram matrices even for large D)."""
    return x.detach().reshape(x.shape[0], -1).to(torch.float64)


def fit_samples(x0: torch.Tensor, x1: torch.Tensor, xt: torch.Tensor) -> SampleFit:
    """Per-sample least squares x_t ~ a x0 + b x1 (2x2 normal equations, batched)."""
    x0, x1, xt = flat(x0), flat(x1), flat(xt)
    g00 = (x0 * x0).sum(1)
    g01 = (x0 * x1).sum(1)
    g11 = (x1 * x1).sum(1)
    r0 = (x0 * xt).sum(1)
    r1 = (x1 * xt).sum(1)
    det = g00 * g11 - g01 * g01
    # sin^2 of the angle between x0 and x1: below 1e-8 the two coefficients cannot be told apart.
    usable = det > 1e-8 * g00 * g11
    safe = torch.where(usable, det, torch.ones_like(det))
    a = torch.where(usable, (g11 * r0 - g01 * r1) / safe, torch.zeros_like(det))
    b = torch.where(usable, (g00 * r1 - g01 * r0) / safe, torch.zeros_like(det))
    residual = xt - a[:, None] * x0 - b[:, None] * x1
    return SampleFit(a=a, b=b, residual_sq=(residual * residual).sum(1), xt_sq=(xt * xt).sum(1), usable=usable)


@dataclass
class NoiseFit:
    """Per-sample x_t ~ a x0 + b x1 + s noise, for a path whose step returns its noise (torchcfm's sigma > 0)."""

    samples: SampleFit  # a, b, the residual after the noise term, usable
    s: torch.Tensor  # (N,) coefficient of the returned noise


def fit_samples_with_noise(x0: torch.Tensor, x1: torch.Tensor, noise: torch.Tensor, xt: torch.Tensor) -> NoiseFit:
    """Per-sample least squares of x_t on (x0, x1, noise): 3x3 normal equations, batched."""
    basis = torch.stack([flat(x0), flat(x1), flat(noise)], 1)  # (N, 3, D)
    xt = flat(xt)
    gram = basis @ basis.transpose(1, 2)
    rhs = (basis @ xt[:, :, None])[:, :, 0]
    diag = torch.diagonal(gram, dim1=1, dim2=2)
    # relative determinant: the three directions must be far from linearly dependent
    usable = torch.linalg.det(gram) > 1e-8 * diag.prod(1)
    safe = torch.where(usable[:, None, None], gram, torch.eye(3, dtype=gram.dtype, device=gram.device))
    coef = torch.where(usable[:, None], torch.linalg.solve(safe, rhs), torch.zeros_like(rhs))
    residual = xt - (coef[:, :, None] * basis).sum(1)
    fit = SampleFit(a=coef[:, 0], b=coef[:, 1], residual_sq=(residual * residual).sum(1), xt_sq=(xt * xt).sum(1),
                    usable=usable)
    return NoiseFit(samples=fit, s=coef[:, 2])


def fit_over_t(t: np.ndarray, values: np.ndarray, max_degree: int = MAX_DEGREE) -> Curve:
    """One smooth curve through per-sample values: averaged per distinct t, then :func:`fit_curve`."""
    t = np.asarray(t, dtype=np.float64)
    times = distinct_times(t)
    index = np.clip(np.searchsorted(times, t - 1e-7 * max(1.0, float(np.ptp(t)))), 0, times.size - 1)
    means = np.bincount(index, weights=np.asarray(values, dtype=np.float64), minlength=times.size) / \
        np.bincount(index, minlength=times.size)
    return fit_curve(times, means, max_degree)


def noise_log_slope(t: np.ndarray, s: np.ndarray, max_degree: int = MAX_DEGREE) -> tuple[Callable, str]:
    """s'(t) / s(t) of the noise std, from per-sample s_i: q(t) = s(t)^2 is fitted as a smooth curve (a Schrodinger
    bridge's sigma^2 t (1 - t) is a polynomial, where sqrt(t (1 - t)) is singular at both ends), then
    s'/s = q' / (2 q). Returns (function of t, description)."""
    curve = fit_over_t(t, np.asarray(s, dtype=np.float64) ** 2, max_degree)

    def slope(times: np.ndarray) -> np.ndarray:
        times = np.asarray(times, dtype=np.float64)
        value = curve.value(times)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(value > 0, curve.slope(times) / (2 * value), 0.0)

    return slope, f"s(t)^2 {curve.describe()}"


def fit_combination(v: torch.Tensor, x0: torch.Tensor, x1: torch.Tensor) -> SampleFit:
    """The same least squares for v_target: v ~ c x0 + d x1 describes the target in terms of the endpoints."""
    return fit_samples(x0, x1, v)


# -- time ------------------------------------------------------------------------------------------------------------
def per_sample_t(t: torch.Tensor, n: int) -> Optional[torch.Tensor]:
    """t as one value per sample: accepts (), (1,), (N,), (N, 1, ...) or a full (N, ...) tensor constant per sample.

    Returns None when t cannot be read as one time per sample.
    """
    t = t.detach().to(torch.float64)
    if t.numel() == 1:
        return t.reshape(1).expand(n).clone()
    if t.numel() == n:
        return t.reshape(n)
    if t.dim() >= 1 and t.shape[0] == n:
        rows = t.reshape(n, -1)
        if bool((rows.amax(1) - rows.amin(1)).abs().max() <= 1e-6 * (1 + rows.abs().max())):
            return rows[:, 0].clone()
    return None


def normalise_time(t: np.ndarray) -> tuple[np.ndarray, Optional[float]]:
    """t in timestep units (max > 1.5, e.g. 0..999 or 1..1000) -> [0, 1] by the next power of ten; else unchanged.

    Returns (t, scale) where scale is None when nothing was changed.
    """
    top = float(np.max(np.abs(t))) if t.size else 0.0
    if top <= TIMESTEP_THRESHOLD:
        return t, None
    scale = float(10 ** math.ceil(math.log10(top)))
    return t / scale, scale


def distinct_times(t: np.ndarray) -> np.ndarray:
    """The distinct values of t (values closer than 1e-7 of the range are one)."""
    if t.size == 0:
        return t
    values = np.unique(t)
    tol = 1e-7 * max(1.0, float(values[-1] - values[0]))
    keep = np.concatenate([[True], np.diff(values) > tol])
    return values[keep]


def spread(t: np.ndarray) -> tuple[int, float]:
    """(number of distinct t values, max - min)."""
    values = distinct_times(t)
    return int(values.size), float(values[-1] - values[0]) if values.size else 0.0


def spread_ok(t: np.ndarray, want: int = MIN_DISTINCT_T) -> bool:
    count, width = spread(t)
    return count >= want and width >= MIN_T_RANGE


# -- step 2: the schedule a(t), b(t) ---------------------------------------------------------------------------------
# The time coordinates a schedule may be smooth in. Polynomials in t hold linear and trigonometric paths; VP paths
# (sigma(t) = sqrt(1 - alpha(t)^2), alpha(t) = exp(-integral beta / 2)) have a square-root singularity at the data end
# (sigma ~ sqrt(t)) and are smooth in sqrt(t) instead (sqrt(1 - t) when t=1 is the data). Cross-validation picks one.
COORDINATES = ("t", "sqrt(t)", "sqrt(1-t)")


def _coordinate(name: str, t: np.ndarray) -> np.ndarray:
    if name == "t":
        return t
    if name == "sqrt(t)":
        return np.sqrt(np.clip(t, 0.0, None))
    return np.sqrt(np.clip(1.0 - t, 0.0, None))


def _coordinate_slope(name: str, t: np.ndarray) -> np.ndarray:
    """du/dt of the coordinate (infinite at the singular end, as the velocity of such a path is)."""
    with np.errstate(divide="ignore"):
        if name == "t":
            return np.ones_like(t)
        if name == "sqrt(t)":
            return 0.5 / np.sqrt(np.clip(t, 0.0, None))
        return -0.5 / np.sqrt(np.clip(1.0 - t, 0.0, None))


@dataclass
class Curve:
    """One coefficient as a function of t: a Legendre series in the coordinate u(t), u mapped from [lo, hi]."""

    coordinate: str
    degree: int
    lo: float
    hi: float
    coef: np.ndarray
    loo_rmse: float

    def _s(self, t: np.ndarray) -> np.ndarray:
        u = _coordinate(self.coordinate, np.asarray(t, dtype=np.float64))
        return (2.0 * u - (self.lo + self.hi)) / (self.hi - self.lo)

    def value(self, t: np.ndarray) -> np.ndarray:
        return np.polynomial.legendre.legval(self._s(t), self.coef)

    def slope(self, t: np.ndarray) -> np.ndarray:
        t = np.asarray(t, dtype=np.float64)
        chain = 2.0 / (self.hi - self.lo) * _coordinate_slope(self.coordinate, t)
        return np.polynomial.legendre.legval(self._s(t), np.polynomial.legendre.legder(self.coef)) * chain

    def describe(self) -> str:
        return f"degree {self.degree} in {self.coordinate}"


def _loo_rmse(design: np.ndarray, target: np.ndarray) -> float:
    """Leave-one-out RMSE of a linear least-squares fit, in closed form through the hat matrix's leverages."""
    q, _ = np.linalg.qr(design)
    leverage = np.clip((q * q).sum(1), 0.0, 1.0 - 1e-9)
    coef, *_ = np.linalg.lstsq(design, target, rcond=None)
    loo = (target - design @ coef) / (1.0 - leverage)
    return float(np.sqrt(np.mean(loo * loo)))


def _design(name: str, values: np.ndarray, degree: int) -> tuple[np.ndarray, float, float]:
    u = _coordinate(name, values)
    lo, hi = float(u.min()), float(u.max())
    return np.polynomial.legendre.legvander((2.0 * u - (lo + hi)) / (hi - lo), degree), lo, hi


def fit_curve(values: np.ndarray, target: np.ndarray, max_degree: int = MAX_DEGREE) -> Curve:
    """The simplest (coordinate, degree) whose leave-one-out error is within a small margin of the best one.

    Candidates in order of simplicity: coordinate t before the square-root ones, low degree before high. The
    square-root coordinates are offered only when t lies inside [0, 1], where they mean "singular at an end".
    """
    inside = values.min() >= 0.0 and values.max() <= 1.0
    top = int(min(max_degree, values.size - 2))
    scale = float(np.sqrt(np.mean(target * target))) or 1.0
    scores: dict[tuple[str, int], float] = {}
    for name in COORDINATES if inside else ("t",):
        for degree in range(1, top + 1):
            scores[(name, degree)] = _loo_rmse(_design(name, values, degree)[0], target)
    margin = 1.5 * min(scores.values()) + 1e-7 * scale
    name, degree = next(key for key, err in scores.items() if err <= margin)  # dicts keep insertion order
    design, lo, hi = _design(name, values, degree)
    coef, *_ = np.linalg.lstsq(design, target, rcond=None)
    return Curve(coordinate=name, degree=degree, lo=lo, hi=hi, coef=coef, loo_rmse=scores[(name, degree)])


@dataclass
class ScheduleFit:
    """a(t) and b(t) fitted over the batch; ``ok`` False (with ``reason``) when t cannot support a fit."""

    ok: bool
    reason: str = ""
    a: Optional[Curve] = None
    b: Optional[Curve] = None
    distinct_t: int = 0
    t_range: float = 0.0
    t_lo: float = 0.0
    t_hi: float = 1.0
    residual: float = float("nan")  # RMS of (a_i, b_i) off the fitted curves / RMS of (a_i, b_i)

    def values(self, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        assert self.a is not None and self.b is not None
        return self.a.value(t), self.b.value(t)

    def derivatives(self, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        assert self.a is not None and self.b is not None
        return self.a.slope(t), self.b.slope(t)

    def describe(self) -> str:
        if not self.ok or self.a is None or self.b is None:
            return "no fit"
        return f"a(t): {self.a.describe()}, b(t): {self.b.describe()}"


def fit_schedule(t: np.ndarray, a: np.ndarray, b: np.ndarray, max_degree: int = MAX_DEGREE) -> ScheduleFit:
    """Fit a(t), b(t) over the batch: the coefficients are averaged per distinct t, then each is fitted by
    :func:`fit_curve` (cross-validated on the distinct t values, so repeated t values cannot fake a validation)."""
    t = np.asarray(t, dtype=np.float64)
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    count, width = spread(t)
    if count < MIN_DISTINCT_T or width < MIN_T_RANGE:
        return ScheduleFit(ok=False, distinct_t=count, t_range=width,
                           reason=f"t has {count} distinct value(s) spanning {width:.3g}; a(t), b(t) need at least "
                                  f"{MIN_DISTINCT_T} distinct values spanning {MIN_T_RANGE}")
    values = distinct_times(t)
    index = np.clip(np.searchsorted(values, t - 1e-7 * max(1.0, width)), 0, values.size - 1)
    sums = np.zeros((values.size, 2))
    np.add.at(sums, index, np.stack([a, b], 1))
    means = sums / np.bincount(index, minlength=values.size)[:, None]
    fit = ScheduleFit(ok=True, a=fit_curve(values, means[:, 0], max_degree),
                      b=fit_curve(values, means[:, 1], max_degree),
                      distinct_t=count, t_range=width, t_lo=float(values[0]), t_hi=float(values[-1]))
    fa, fb = fit.values(t)
    off = np.mean((a - fa) ** 2 + (b - fb) ** 2)
    size = np.mean(a * a + b * b)
    fit.residual = float(np.sqrt(off / size)) if size > 0 else float("nan")
    return fit


def describe_direction(fit: ScheduleFit) -> str:
    """Where the path starts and ends: 't=1 at the data (x1)' or 't=1 at the source (x0)' or 'unclear'."""
    a_lo, b_lo = (float(v[0]) for v in fit.values(np.array([fit.t_lo])))
    a_hi, b_hi = (float(v[0]) for v in fit.values(np.array([fit.t_hi])))
    if b_hi - b_lo > 0 and a_hi - a_lo < 0:
        return "t=1 at the data (x1)"
    if b_hi - b_lo < 0 and a_hi - a_lo > 0:
        return "t=1 at the source (x0)"
    return "unclear"


# -- step 3: compare with the expected velocity ----------------------------------------------------------------------
def expected_velocity(x0: torch.Tensor, x1: torch.Tensor, da: torch.Tensor, db: torch.Tensor) -> torch.Tensor:
    """a'(t_i) x0_i + b'(t_i) x1_i, (N, D) in float64."""
    return da[:, None] * flat(x0) + db[:, None] * flat(x1)


def cosine_and_ratio(v: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample: cos(v, ref) and ||v|| / ||ref|| (NaN where ref is zero)."""
    v, ref = flat(v), flat(ref)
    nv = v.norm(dim=1)
    nr = ref.norm(dim=1)
    denom = nv * nr
    nan = torch.full_like(nv, float("nan"))
    cos = torch.where(denom > 0, (v * ref).sum(1) / torch.where(denom > 0, denom, torch.ones_like(denom)), nan)
    ratio = torch.where(nr > 0, nv / torch.where(nr > 0, nr, torch.ones_like(nr)), nan)
    return cos, ratio


def candidate_targets(x0: torch.Tensor, x1: torch.Tensor, xt: torch.Tensor, expected: torch.Tensor,
                      eps: Optional[torch.Tensor], source_coef: torch.Tensor,
                      without_noise: Optional[torch.Tensor] = None) -> dict[str, Callable[[], torch.Tensor]]:
    """The quantities a wrong target is usually made of, each as a zero-argument function returning (N, D)
    (built one at a time, so that large latents do not hold ten copies at once).

    ``source_coef`` is the fitted a(t_i) (how much of x0 is left in x_t): the score of a Gaussian path is
    -x0 / a(t), the "score-like" candidate.
    """
    safe = torch.where(source_coef.abs() > 1e-3, source_coef, torch.full_like(source_coef, float("nan")))
    found: dict[str, Callable[[], torch.Tensor]] = {
        "the path velocity": lambda: expected,
        "minus the path velocity (flipped sign)": lambda: -expected,
        "x1 - x0": lambda: flat(x1) - flat(x0),
        "x0 - x1": lambda: flat(x0) - flat(x1),
        "x0": lambda: flat(x0),
        "x1": lambda: flat(x1),
        "x_t": lambda: flat(xt),
        "score-like -x0/a(t)": lambda: -flat(x0) / safe[:, None],
    }
    if eps is not None and eps.numel() == x0.numel():
        found["eps (the reparam noise)"] = lambda: flat(eps)
        found["-eps"] = lambda: -flat(eps)
    if without_noise is not None:
        found["a'(t) x0 + b'(t) x1 without the noise term"] = lambda: without_noise
    return found


@dataclass
class Resemblance:
    name: str
    cos: float  # median per-sample cosine
    ratio: float  # median per-sample norm ratio ||v|| / ||candidate||


def resemblances(v: torch.Tensor, candidates: dict[str, Callable[[], torch.Tensor]]) -> list[Resemblance]:
    """Every candidate with its median cosine and norm ratio against v, best (highest cosine) first."""
    names = list(candidates)
    stats = []
    for name in names:
        cos, ratio = cosine_and_ratio(v, candidates[name]())
        stats.append(torch.stack([cos.nanmedian(), ratio.nanmedian()]))
    table = torch.stack(stats).cpu().tolist()  # one host transfer
    found = [Resemblance(name, float(c), float(r)) for name, (c, r) in zip(names, table)]
    return sorted(found, key=lambda r: -r.cos if math.isfinite(r.cos) else math.inf)
