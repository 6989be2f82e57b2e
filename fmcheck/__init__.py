"""fmcheck: pre-flight checks for flow-matching text-to-latent training code.

The public API is re-exported here and resolved lazily (PEP 562), so that `fmcheck --help` pays for none of it and
importing fmcheck never imports torch. Implementations live in the submodules.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

_EXPORTS = {
    "Check": "api", "CheckDoc": "api", "Judgement": "api", "Skip": "api", "Thresholds": "api",
    "Hit": "findings", "Rule": "findings",
    "PreflightError": "api_run", "preflight": "api_run", "run": "api_run",
    "Settings": "config",
    "Pipeline": "contract", "load_pipeline": "contract",
    "ConfigError": "errors", "PipelineError": "errors", "UsageError": "errors",
    "CheckResult": "report", "Finding": "report", "Measurement": "report", "Report": "report",
    "ExitCode": "verdict", "Verdict": "verdict",
    "judges": None,
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fmcheck' has no attribute {name!r}")
    module_name = _EXPORTS[name]
    if module_name is None:
        value = importlib.import_module(f".{name}", __name__)
    else:
        value = getattr(importlib.import_module(f".{module_name}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from . import judges
    from .api import Check, CheckDoc, Judgement, Skip, Thresholds
    from .findings import Hit, Rule
    from .api_run import PreflightError, preflight, run
    from .config import Settings
    from .contract import Pipeline, load_pipeline
    from .errors import ConfigError, PipelineError, UsageError
    from .report import CheckResult, Finding, Measurement, Report
    from .verdict import ExitCode, Verdict
