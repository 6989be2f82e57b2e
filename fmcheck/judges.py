"""Small pure functions that turn a number and its bounds into a Measurement with a verdict.

Checks use them inside ``judge``; the expectation string they write is what the report shows as "expected", and the
verdict is what the value says against that bound. ``info`` is the other kind: a number reported for context, with
no verdict and no bound.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional

from .report import Measurement, Value
from .verdict import Verdict


MAX_DIGITS = 12
EXACT_DIGITS = 6


def _fmt(x: float, against: Iterable[Optional[float]] = ()) -> str:
    """A bound as the report prints it: exactly, when it has up to 6 significant digits (thresholds people write:
    2.00001, not 2); else with 4 significant digits, or more where 4 would put it on the other side of (or onto) a
    number it must be told apart from: the measured value, the other bound, the ideal. ``ratio_warn=1.0001`` shows
    0.9999..1.0001, not 0.9999..1."""
    if not _finite(x):
        return str(x)
    for digits in range(4, EXACT_DIGITS + 1):  # a configured threshold (2.00001, 0.18215) prints as written
        text = f"{x:.{digits}g}"
        if float(text) == x:
            return text
    others = [float(y) for y in against if y is not None and _finite(y) and float(y) != x]
    for digits in range(4, MAX_DIGITS + 1):  # a derived one (1 / 1.5) with the digits that keep it on its side
        text = f"{x:.{digits}g}"
        shown = float(text)
        if all((shown > y) == (x > y) and (shown < y) == (x < y) for y in others):
            return text
    return repr(float(x))


def info(name: str, value: Value, unit: str = "", note: str = "", *, expected: str = "") -> Measurement:
    """A number reported for context: no verdict (JSON null) and no bound.

    ``note`` says what the number is (how it was computed, what it is for); ``expected`` is accepted as an older
    spelling of ``note`` and lands there, never in the measurement's ``expected``: an informational number is held
    to nothing, so nothing may read as its bound.
    """
    return Measurement(name=name, value=_clean(value), unit=unit, note=note or expected, verdict=None)


def flag(name: str, ok: bool, *, value: Value = None, unit: str = "", expected: str = "",
         bad: Verdict = Verdict.FAIL) -> Measurement:
    """PASS when ``ok``, else ``bad``."""
    return Measurement(name=name, value=_clean(value if value is not None else ok), unit=unit, expected=expected,
                       verdict=Verdict.PASS if ok else bad)


def at_most(name: str, value: float, *, warn: Optional[float], fail: Optional[float], unit: str = "") -> Measurement:
    """Higher is worse. NaN fails."""
    bound = warn if warn is not None else fail
    expected = f"<= {_fmt(bound, (_num(value), fail))}" if bound is not None else ""
    if not _finite(value):
        verdict = Verdict.FAIL
    elif fail is not None and value > fail:
        verdict = Verdict.FAIL
    elif warn is not None and value > warn:
        verdict = Verdict.WARN
    else:
        verdict = Verdict.PASS
    return Measurement(name=name, value=_clean(value), unit=unit, expected=expected, verdict=verdict)


def at_least(name: str, value: float, *, warn: Optional[float], fail: Optional[float], unit: str = "") -> Measurement:
    """Lower is worse. NaN fails."""
    bound = warn if warn is not None else fail
    expected = f">= {_fmt(bound, (_num(value), fail))}" if bound is not None else ""
    if not _finite(value):
        verdict = Verdict.FAIL
    elif fail is not None and value < fail:
        verdict = Verdict.FAIL
    elif warn is not None and value < warn:
        verdict = Verdict.WARN
    else:
        verdict = Verdict.PASS
    return Measurement(name=name, value=_clean(value), unit=unit, expected=expected, verdict=verdict)


def ratio_within(name: str, value: float, *, warn_factor: float, fail_factor: Optional[float],
                 unit: str = "x") -> Measurement:
    """A ratio whose ideal is 1: within ``warn_factor`` either way passes, within ``fail_factor`` warns, else fails."""
    low, high = 1 / warn_factor, warn_factor
    shown = _num(value)
    expected = f"{_fmt(low, (shown, 1.0, high))}..{_fmt(high, (shown, 1.0, low))}"
    if not _finite(value) or value <= 0:
        verdict = Verdict.FAIL
    else:
        spread = max(value, 1 / value)
        if spread <= warn_factor:
            verdict = Verdict.PASS
        elif fail_factor is None or spread <= fail_factor:
            verdict = Verdict.WARN
        else:
            verdict = Verdict.FAIL
    return Measurement(name=name, value=_clean(value), unit=unit, expected=expected, verdict=verdict)


def _finite(value: float) -> bool:
    return value is not None and math.isfinite(float(value))


def _num(value: Value) -> Optional[float]:
    """The value as a float when it is a finite number (for telling a bound apart from it), else None."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _clean(value: Value) -> Value:
    """Plain Python scalars with a readable precision; NaN/Inf stay as floats (JSON writes them as strings)."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and math.isfinite(value):
        return float(f"{value:.6g}")
    return value
