"""Small pure functions that turn a number and its bounds into a Measurement with a verdict.

Checks use them inside ``judge``; the expectation string they write is what the report shows as "expected".
"""

from __future__ import annotations

import math
from typing import Optional

from .report import Measurement, Value
from .verdict import Verdict


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def info(name: str, value: Value, unit: str = "", expected: str = "") -> Measurement:
    """A reported number that carries no verdict of its own."""
    return Measurement(name=name, value=_clean(value), unit=unit, expected=expected, verdict=Verdict.PASS)


def flag(name: str, ok: bool, *, value: Value = None, unit: str = "", expected: str = "",
         bad: Verdict = Verdict.FAIL) -> Measurement:
    """PASS when ``ok``, else ``bad``."""
    return Measurement(name=name, value=_clean(value if value is not None else ok), unit=unit, expected=expected,
                       verdict=Verdict.PASS if ok else bad)


def at_most(name: str, value: float, *, warn: Optional[float], fail: Optional[float], unit: str = "") -> Measurement:
    """Higher is worse. NaN fails."""
    bound = warn if warn is not None else fail
    expected = f"<= {_fmt(bound)}" if bound is not None else ""
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
    expected = f">= {_fmt(bound)}" if bound is not None else ""
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
    expected = f"{_fmt(1 / warn_factor)}..{_fmt(warn_factor)}"
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


def _clean(value: Value) -> Value:
    """Plain Python scalars with a readable precision; NaN/Inf stay as floats (JSON writes them as strings)."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and math.isfinite(value):
        return float(f"{value:.6g}")
    return value
