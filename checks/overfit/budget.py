"""The `overfit` check's time budget: the per-check limit, a step's grace, and the interruption of a hung step."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from types import SimpleNamespace
from typing import Any

SETUP_MARGIN_S = 60.0  # per-check time limit = time budget + a step's grace + this (loading, first pass, judging)


def hang_grace(time_budget: float) -> float:
    """How long a step still running when the time budget ends may take before it counts as hung."""
    return min(30.0, max(1.0, 0.25 * time_budget))


def timeout_for(settings) -> float:
    """The overfit's own per-check time limit when --timeout is not given: its budget, a step's grace, a margin."""
    return settings.time_budget + hang_grace(settings.time_budget) + SETUP_MARGIN_S


def budget_note(settings, time_left: float) -> dict[str, Any]:
    """The training loop's time budget, and a note when the per-check time limit caps it."""
    requested = settings.time_budget
    available = time_left - hang_grace(requested) - 5.0  # room for the judge once the loop ends
    if requested <= available:
        return {"seconds": requested, "note": f"--time-budget {requested:g}"}
    seconds = max(1.0, available)
    return {"seconds": seconds, "note": f"--time-budget {requested:g} capped at {seconds:.0f} s by the per-check "
                                        f"time limit (--timeout {settings.timeout:g}); raise --timeout with it"}


@contextlib.contextmanager
def hang_limit(seconds: float):
    """Interrupt the user's step when the loop outlives ``seconds`` (SIGALRM, main thread only): ``.fired`` says so.

    Nested inside the runner's own limit: that one stays in charge when it ends first, and its remaining time is
    re-armed afterwards."""
    state = SimpleNamespace(fired=False)
    usable = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    outer_left = signal.getitimer(signal.ITIMER_REAL)[0] if usable else 0.0
    if not usable or (outer_left and outer_left <= seconds):
        yield state
        return

    class Hung(BaseException):
        pass

    def on_alarm(signum, frame):
        state.fired = True
        raise Hung()

    entered = time.monotonic()
    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield state
    except Hung:
        pass
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer_left:
            signal.setitimer(signal.ITIMER_REAL, max(1e-3, outer_left - (time.monotonic() - entered)))

