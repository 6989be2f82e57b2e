"""Pure functions of what `structure` measured: no torch, no user code. The judge and the rules both read the time
balance through ``time_state`` and the precision through ``fp16_sources``, so a measurement's verdict and the rule
that backs it can never disagree."""

from __future__ import annotations

import math
from typing import Any, Optional

FP16 = "torch.float16"
NOISE_FLOOR = 1e-6  # relative output change below which a probe is taken as no change at all
NOISE_FACTOR = 10  # a change counts when above this many times the repeat-call noise


# The states of the time balance. OK and RESOLVED pass; the others are each one rule's finding.
NOT_MEASURED = "not measured"  # the probe could not run (no velocity net found, no t argument, ...)
FLAT = "both flat"  # the output (and the last hidden activation) moves with neither t nor x_t
DOMINATES = "time dominates"  # ratio above time_dominates_ratio
UNITS = "time units"  # blind to t at these weights, and the time features barely vary: t in the wrong units
BLIND = "time blind"  # permuting t changes nothing and no time feature meets x_t
IGNORED = "time ignored"  # ratio below time_ignored_ratio, t moves the output a little
RESOLVED = "resolved"  # blind at these weights (zero-initialised blocks), the time features vary: passes
OK = "ok"
PASSING = (OK, RESOLVED)


def noise_floor(noise: float) -> float:
    return max(NOISE_FACTOR * noise, NOISE_FLOOR)


def time_state(measured: bool, state: Optional[str], ratio: Optional[float], t_change: Optional[float],
               noise: Optional[float], features_spread: Optional[float], features_mix: bool,
               dominates: float, ignored: float, features_min: float) -> str:
    """Which of the states above the balance is in, from its numbers and the three thresholds."""
    if not measured:
        return NOT_MEASURED
    if state == FLAT or ratio is None:
        return FLAT
    if ratio > dominates:
        return DOMINATES
    if ratio >= ignored:
        return OK
    blind = t_change <= noise_floor(noise)
    if blind and features_spread is not None and features_mix:
        return RESOLVED if features_spread >= features_min else UNITS
    return BLIND if blind else IGNORED


def fp16_sources(autocast: Optional[bool], autocast_dtype: Optional[str], autocast_device: Optional[str],
                 param_dtype: Optional[str], v_pred: Optional[str]) -> list[str]:
    """Where float16 compute shows in the velocity forward (empty: none)."""
    where = []
    if autocast and autocast_dtype == FP16:
        where.append(f"{autocast_device} autocast float16")
    if param_dtype == FP16:
        where.append("float16 parameters")
    if v_pred == FP16 and not where:
        where.append("v_pred is float16")
    return where


def merge_modes(before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """A mode or flag seen before or after the step counts (the step itself may switch a module to train mode or
    turn its requires_grad on)."""
    merged = {}
    for name, first in before.items():
        second = after.get(name, first)
        grad = first if first["grad_tensors"] >= second["grad_tensors"] else second
        kinds = set(first["active"]) | set(second["active"])
        held = first if first["optimizer_elements"] >= second["optimizer_elements"] else second
        merged[name] = {**grad, "training": first["training"] or second["training"],
                        "switched_by_step": first["training"] != second["training"],
                        "grad_by_step": first["grad_tensors"] < second["grad_tensors"],
                        "optimizer_tensors": held["optimizer_tensors"],
                        "optimizer_elements": held["optimizer_elements"],
                        "active": {k: max(first["active"].get(k, 0), second["active"].get(k, 0)) for k in kinds}}
    return merged


def rounded(value: Optional[float]) -> Optional[float]:
    """6 significant digits for the report (non-finite and missing values as they are)."""
    return value if value is None or not math.isfinite(value) else float(f"{value:.6g}")


def plural(count: int, word: str) -> str:
    return f"{count} {word if count == 1 else word + 's'}"
