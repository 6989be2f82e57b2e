"""The one place that turns arbitrary exceptions into data (as pytest's CallInfo does).

Everything that runs user or plugin code without a verdict of its own goes through :func:`capture`; no other module
catches broadly. ``KeyboardInterrupt`` is never swallowed. ``SystemExit`` raised by the code being run (a ``sys.exit``
in the user's build or step, argparse rejecting fmcheck's own command line) is data like any error: it must not end
fmcheck silently with the user's exit code (``sys.exit(0)`` in ``build()`` would pass a CI gate).
:class:`CheckTimeout` derives from BaseException so that a user's ``except Exception`` cannot swallow it.
"""

from __future__ import annotations

import os
import sysconfig
import time
import traceback
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Callable, Optional

_FMCHECK_DIR = os.path.dirname(os.path.abspath(__file__))
_STDLIB_DIR = os.path.abspath(sysconfig.get_paths()["stdlib"])


class CheckTimeout(BaseException):
    """Raised inside a check when its time limit is reached."""


@dataclass
class Outcome:
    value: Any = None
    exc: Optional[BaseException] = None
    duration_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.exc is None


def capture(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Outcome:
    start = time.perf_counter()
    try:
        value = fn(*args, **kwargs)
    except (Exception, SystemExit, CheckTimeout) as exc:  # the project's single broad catch
        return Outcome(exc=exc, duration_s=time.perf_counter() - start)
    return Outcome(value=value, duration_s=time.perf_counter() - start)


def describe(exc: BaseException) -> str:
    """``ValueError: message (file.py:42)``: the exception and the user-side frame it came from."""
    if isinstance(exc, SystemExit):
        text = _describe_exit(exc)
    else:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        text = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    where = origin(exc.__traceback__)
    return f"{text} ({where})" if where else text


def _describe_exit(exc: SystemExit) -> str:
    code = exc.code if exc.code is not None else 0
    frames = traceback.extract_tb(exc.__traceback__) if exc.__traceback__ is not None else []
    if any(os.path.basename(f.filename) == "argparse.py" for f in frames):
        return (f"SystemExit {code} from argparse: the code parses the command line, and fmcheck gives it none "
                "(sys.argv is just the module's name); give those arguments defaults, or parse them under "
                "`if __name__ == '__main__':`")
    return f"SystemExit: sys.exit({code!r}) was called"


def origin(tb: Optional[TracebackType]) -> Optional[str]:
    """The innermost frame outside fmcheck and outside site-packages' torch internals, as ``path:line``."""
    frames = traceback.extract_tb(tb) if tb is not None else []
    best = None
    for frame in frames:
        path = os.path.abspath(frame.filename)
        if (path.startswith((_FMCHECK_DIR, _STDLIB_DIR)) or f"{os.sep}site-packages{os.sep}" in path
                or "<frozen" in path):
            continue
        best = frame
    if best is None:
        return None
    try:
        shown = os.path.relpath(best.filename)
    except ValueError:
        shown = best.filename
    if shown.startswith(".." + os.sep + ".."):
        shown = best.filename
    return f"{shown}:{best.lineno}"


def short_traceback(exc: BaseException, limit: int = 6) -> str:
    lines = traceback.format_exception(type(exc), exc, exc.__traceback__, limit=-limit)
    return "".join(lines).rstrip()


def full_traceback(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip()
