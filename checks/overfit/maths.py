"""Pure maths of the `overfit` check: window means, trends and the stop rule (the checkpoint that decides).

No torch, no numpy: the check's loop records one row of statistics per training step on the device, reads them to
the host from time to time, and hands the rows to these functions. Every rule is evaluated at fixed *checkpoints*
(every ``window`` steps), never at the moments the host happened to read, so the verdict and the step it is reached
at do not depend on timing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

# Outcomes, in the order the rules are tried at each checkpoint.
NONFINITE = "nonfinite"
SCALE_DRIFT = "scale_drift"
DIVERGED = "diverged"
PASSED = "pass"
STALLED = "stalled"  # the trends say neither threshold is within reach in the step budget
BUDGET = "budget"  # the step budget ran out before the thresholds were met
OUT_OF_TIME = "out_of_time"  # the time budget ran out first: no verdict, the machine was too slow for it
SCALE_MOVING = "scale_moving"  # thresholds met at the end of the budget, but the scale never settled
STOPPED = "stopped"  # under torchrun: stopped before training because another rank could not train
NOT_IN_OPTIMIZER = "not_in_optimizer"  # a trainable module has parameters the optimizer does not hold
NO_GRADIENT = "no_gradient"  # a trainable module received no gradient in the whole first window
HUNG = "hung"  # a step ran past the time budget (and its grace): no verdict

# The outcomes that fail: each rests on evidence counted in steps, never on how fast the machine ran.
FAILURES = frozenset({NONFINITE, SCALE_DRIFT, DIVERGED, STALLED, NOT_IN_OPTIMIZER, NO_GRADIENT})


@dataclass(frozen=True)
class Rules:
    loss_drop: float  # fm_loss / mean(v_target^2) must fall to (1 - loss_drop) x its initial value
    cos_pass: float  # window mean of cos(v_pred, v_target) must reach this (replayed set) ...
    scale_fail: float  # ||x0||/||x1|| leaving its start's band by more than this factor fails at once
    diverge: float  # fm_loss above this multiple of its initial value fails at once
    trend_after: float  # fraction of the step budget after which the trends may fail the run
    trend_optimism: float  # the recent slopes are extrapolated this many times faster than observed
    trend_reach: float = 0.5  # ... and must bring at least this share of the improvement needed, on one measure
    cos_gain: Optional[float] = None  # ... or, when set (fresh randomness), close this share of its gap to 1
    min_steps: int = 0  # no pass before this many steps: the scale needs time to show a drift

    def cos_target(self, initial: "Point") -> float:
        """The cos a pass needs: absolute for a replayed set; for fresh randomness, where the best prediction is a
        conditional mean whose cos with v* is below 1 by an amount nobody knows, a share of the way to 1."""
        if self.cos_gain is None:
            return self.cos_pass
        return initial.cos + self.cos_gain * (1.0 - initial.cos)


@dataclass(frozen=True)
class Point:
    """Window means of one checkpoint (``step`` = steps completed at the window's end)."""

    step: int
    fm: float
    cos: Optional[float]  # None when the step returns only its loss (no v_pred, v_target)
    ratio: Optional[float] = None  # mean ||x0|| / mean ||x1||, None when the step does not expose x0 and x1
    loss: float = float("nan")
    kl: Optional[float] = None
    grad: float = float("nan")
    vnorm: Optional[float] = None
    power: Optional[float] = None  # mean of v_target**2: the error a zero prediction would make

    @property
    def rel(self) -> float:
        """fm_loss relative to the target's power: the share of v_target not yet explained, whatever its scale."""
        if self.power is None or not self.power > 0:
            return self.fm
        return self.fm / self.power


@dataclass
class Decision:
    outcome: str
    step: int
    reason: str = ""
    projected_fm: Optional[float] = None  # the relative fm_loss fall the trend reaches by the end of the budget
    projected_cos: Optional[float] = None
    drift: Optional[float] = None
    extra: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.outcome == PASSED


def mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values) if values else float("nan")


def window_point(rows: Sequence[Sequence[float]], columns: dict[str, int], start: int, end: int) -> Point:
    """Means of steps [start, end) of the per-step rows (index by column name)."""
    chunk = rows[start:end]

    def col(name: str) -> Optional[float]:
        if name not in columns:
            return None
        return mean([row[columns[name]] for row in chunk])

    x0, x1 = col("x0"), col("x1")
    ratio = x0 / x1 if x0 is not None and x1 is not None and x1 > 0 else None
    return Point(step=end, fm=col("fm"), cos=col("cos"), ratio=ratio, loss=col("loss"), kl=col("kl"),
                 grad=col("grad"), vnorm=col("v"), power=col("power"))


def first_nonfinite(rows: Sequence[Sequence[float]], columns: dict[str, int], keys: Sequence[str],
                    offset: int = 0) -> Optional[tuple[int, list[str]]]:
    """(step, the keys non-finite at that step, in ``keys`` order) for the first step with a non-finite value."""
    for index, row in enumerate(rows):
        bad = [key for key in keys if key in columns and not math.isfinite(row[columns[key]])]
        if bad:
            return offset + index, bad
    return None


def slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of ys over xs (0 for fewer than two distinct xs)."""
    if len(xs) < 2:
        return 0.0
    mx, my = mean(xs), mean(ys)
    sxx = math.fsum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return 0.0
    return math.fsum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx


def recent(initial: Point, history: Sequence[Point]) -> list[Point]:
    """The points of the later half of the run so far (at least the initial point and the current one)."""
    current = history[-1]
    later = [p for p in history if p.step >= current.step / 2]
    return later if len(later) >= 2 else [initial, *later]


def drift_of(initial: Point, point: Point) -> Optional[float]:
    """How far ||x0||/||x1|| left the band between its start and 1, as a factor (1 = inside it).

    Moving from an unbalanced start towards the balanced ratio 1 is not drift; moving away from the start and
    from 1 is (a factor > 1 above the band, < 1 below it). For a start near 1 this is the ratio over its start.
    """
    if point.ratio is None or initial.ratio is None or not initial.ratio > 0 or not point.ratio > 0:
        return None
    low, high = min(initial.ratio, 1.0), max(initial.ratio, 1.0)
    if point.ratio > high:
        return point.ratio / high
    if point.ratio < low:
        return point.ratio / low
    return 1.0


def spread(factor: float) -> float:
    """A factor folded above 1: 0.25 and 4 are both 4x."""
    return max(factor, 1.0 / factor) if factor > 0 else math.inf


def scale_projection(initial: Point, history: Sequence[Point]) -> Optional[float]:
    """The drift factor if the recent log-ratio trend went on for as many steps again as have run."""
    current = history[-1]
    drift = drift_of(initial, current)
    if drift is None:
        return None
    points = recent(initial, history)
    xs = [p.step for p in points]
    ys = [math.log(drift_of(initial, p) or 1.0) for p in points]
    return math.exp(math.log(drift) + slope(xs, ys) * current.step)


def rel_target(initial: Point, rules: Rules) -> float:
    """The relative fm_loss a pass needs: (1 - loss_drop) x the initial one."""
    return (1.0 - rules.loss_drop) * initial.rel


def fm_fall(initial: Point, point: Point) -> float:
    """By which fraction the relative fm_loss fell from the start (negative when it rose)."""
    return 1.0 - point.rel / initial.rel if initial.rel > 0 else float("nan")


def evaluate(initial: Point, history: Sequence[Point], rules: Rules, budget_steps: int) -> Optional[Decision]:
    """The verdict at the newest checkpoint, or None while it is not yet certain.

    In order: scale drift beyond ``scale_fail`` fails; fm_loss above ``diverge`` x its start fails; a pass needs
    the relative fm_loss (fm_loss / mean v_target**2, so that a target that grows with x0 does not hide or fake
    progress) down by ``loss_drop``, cos up to ``cos_pass`` and the scale drift still within ``scale_fail`` if its
    recent trend went on for as many steps again (the scale has settled); after ``trend_after`` of the
    budget, a run whose optimistic extrapolations bring less than ``trend_reach`` of the improvement needed by
    the end of the budget, on both measures, fails.
    """
    current = history[-1]
    drift = drift_of(initial, current)
    if drift is not None and spread(drift) > rules.scale_fail:
        return Decision(SCALE_DRIFT, current.step, drift=drift,
                        reason=f"||x0||/||x1|| moved {drift:.3g}x from its start")
    if current.fm > rules.diverge * initial.fm:
        return Decision(DIVERGED, current.step, drift=drift,
                        reason=f"fm_loss rose to {current.fm / initial.fm:.3g}x its start")
    fm_ok = current.rel <= rel_target(initial, rules)
    cos_ok = current.cos is None or current.cos >= rules.cos_target(initial)
    if fm_ok and cos_ok and current.step >= rules.min_steps:
        if drift is None:
            return Decision(PASSED, current.step, reason="fm_loss and cos reached their thresholds")
        projected = scale_projection(initial, history)
        if spread(projected) <= rules.scale_fail:
            return Decision(PASSED, current.step, drift=drift, extra={"projected_drift": projected},
                            reason="fm_loss and cos reached their thresholds with the scale settled")
    if len(history) >= 3 and current.step >= rules.trend_after * budget_steps:
        remaining = max(0, budget_steps - current.step)
        points = recent(initial, history)
        xs = [p.step for p in points]
        # Linear extrapolation of a falling error and a rising cos, faster than observed: optimistic for the
        # usual decelerating curves. Runs often sit on a plateau before memorising (the mean first, then each
        # sample), so only a run whose optimistic trends bring less than `trend_reach` of the improvement needed,
        # on both measures, is called hopeless; anything closer gets its whole budget.
        rel_slope = slope(xs, [p.rel for p in points])
        projected_rel = max(0.0, current.rel + min(rel_slope, 0.0) * rules.trend_optimism * remaining)
        projected_fall = 1.0 - projected_rel / initial.rel if initial.rel > 0 else 0.0
        reach_fm = projected_fall / rules.loss_drop
        if current.cos is None or initial.cos is None:  # a loss-only step: the loss alone decides
            projected_cos, reach_cos = None, reach_fm
        else:
            cos_slope = slope(xs, [p.cos for p in points])
            projected_cos = current.cos + max(cos_slope, 0.0) * rules.trend_optimism * remaining
            cos_needed = rules.cos_target(initial)
            reach_cos = ((projected_cos - initial.cos) / (cos_needed - initial.cos)
                         if cos_needed > initial.cos else 1.0)
        if reach_fm < rules.trend_reach and reach_cos < rules.trend_reach:
            return Decision(STALLED, current.step, drift=drift, projected_fm=projected_fall,
                            projected_cos=projected_cos, extra={"reach": [reach_fm, reach_cos]},
                            reason=f"the trends reach a fm_loss fall of {projected_fall:.0%} by step "
                                   f"{budget_steps}")
    return None


def at_budget_end(initial: Point, history: Sequence[Point], rules: Rules, out_of_time: bool = False) -> Decision:
    """The verdict when the budget ran out with no earlier decision (``out_of_time``: the time budget did)."""
    current = history[-1]
    drift = drift_of(initial, current)
    if out_of_time:
        return Decision(OUT_OF_TIME, current.step, drift=drift,
                        reason="the time budget ran out before a checkpoint decided")
    fm_ok = current.rel <= rel_target(initial, rules)
    cos_ok = current.cos is None or current.cos >= rules.cos_target(initial)
    if fm_ok and cos_ok and drift is not None:  # only the scale kept it from passing
        return Decision(SCALE_MOVING, current.step, drift=drift,
                        extra={"projected_drift": scale_projection(initial, history)},
                        reason=f"thresholds met but ||x0||/||x1|| moved {drift:.3g}x and had not settled")
    return Decision(BUDGET, current.step, drift=drift, reason="the step budget ran out before the thresholds were met")


class Tracker:
    """Feeds per-step rows in as the host reads them and evaluates every checkpoint they complete, in order.

    ``initial_rows``: one pass over the fixed set before any update; the initial values are their means (without
    them, the means of the first ``epoch`` training steps). A non-finite value there decides at step 0.
    ``nonfinite_keys`` are the columns whose first non-finite value fails the run at once (named in that order).
    """

    def __init__(self, columns: dict[str, int], *, epoch: int, window: int, rules: Rules,
                 nonfinite_keys: Sequence[str], initial_rows: Optional[Sequence[Sequence[float]]] = None,
                 not_in_optimizer: Sequence[str] = (), module_grad_keys: Sequence[str] = ()):
        self.columns = columns
        self.not_in_optimizer = list(not_in_optimizer)
        self.module_grad_keys = [k for k in module_grad_keys if k in columns]
        self.epoch = max(1, epoch)
        self.window = max(1, window)
        self.rules = rules
        self.nonfinite_keys = list(nonfinite_keys)
        self.rows: list[Sequence[float]] = []
        self.initial: Optional[Point] = None
        self.history: list[Point] = []
        self.decision: Optional[Decision] = None
        if initial_rows:
            bad = first_nonfinite(initial_rows, columns, self.nonfinite_keys)
            if bad is not None:
                self.decision = Decision(NONFINITE, 0, reason=f"non-finite {', '.join(bad[1])} before any update",
                                         extra={"keys": bad[1], "before_training": True})
            else:
                self.initial = window_point(initial_rows, columns, 0, len(initial_rows))

    def feed(self, rows: Sequence[Sequence[float]], budget_steps: int) -> Optional[Decision]:
        if self.decision is not None:
            return self.decision
        offset = len(self.rows)
        bad = first_nonfinite(rows, self.columns, self.nonfinite_keys, offset=offset)
        self.rows.extend(rows if bad is None else rows[: bad[0] - offset])
        if self.initial is None and len(self.rows) >= self.epoch:
            self.initial = window_point(self.rows, self.columns, 0, self.epoch)
        if self.initial is not None:
            while self.window * (len(self.history) + 1) <= len(self.rows):
                end = self.window * (len(self.history) + 1)
                self.history.append(window_point(self.rows, self.columns, end - self.window, end))
                self.decision = self._structure(end) if len(self.history) == 1 else None
                if self.decision is None:
                    self.decision = evaluate(self.initial, self.history, self.rules, budget_steps)
                if self.decision is not None:
                    return self.decision
        if bad is not None:
            step, keys = bad
            self.decision = Decision(NONFINITE, step, reason=f"non-finite {', '.join(keys)} at step {step}",
                                     extra={"keys": keys})
        return self.decision

    def _structure(self, end: int) -> Optional[Decision]:
        """At the first checkpoint: parameters the optimizer does not hold, modules that got no gradient at all."""
        if self.not_in_optimizer:
            return Decision(NOT_IN_OPTIMIZER, end, extra={"modules": self.not_in_optimizer},
                            reason="trainable parameters outside the optimizer")
        silent = [key.removeprefix("grad:") for key in self.module_grad_keys
                  if all(row[self.columns[key]] == 0.0 for row in self.rows[:end])]
        if silent:
            return Decision(NO_GRADIENT, end, extra={"modules": silent},
                            reason=f"no gradient reached {', '.join(silent)} in {end} steps")
        return None

    def hung(self, steps: int) -> Decision:
        """No verdict: a step ran past the time budget. The numbers so far close a last, partial window."""
        if self.initial is not None and self.rows and (not self.history or self.history[-1].step < len(self.rows)):
            self.history.append(window_point(self.rows, self.columns, max(0, len(self.rows) - self.window),
                                             len(self.rows)))
        self.decision = Decision(HUNG, steps, reason="a step exceeded the time budget")
        return self.decision

    def finish(self, budget_steps: int, out_of_time: bool = False) -> Decision:
        """The verdict once the budget is spent (a last, overlapping window closes a partial one)."""
        if self.decision is not None:
            return self.decision
        if not self.rows:
            raise ValueError("no steps recorded")
        if self.initial is None:  # fewer steps than one pass over the set
            self.initial = window_point(self.rows, self.columns, 0, len(self.rows))
        last = self.history[-1].step if self.history else 0
        if last < len(self.rows):
            self.history.append(window_point(self.rows, self.columns, max(0, len(self.rows) - self.window),
                                             len(self.rows)))
            if not out_of_time:  # the step budget's end is a fixed checkpoint; where the clock stopped is not
                self.decision = evaluate(self.initial, self.history, self.rules, budget_steps)
        if self.decision is None:
            self.decision = at_budget_end(self.initial, self.history, self.rules, out_of_time)
        return self.decision
