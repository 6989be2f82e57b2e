"""fmcheck: pre-flight checks for flow-matching text-to-latent training code.

The public API is re-exported here; implementations live in the submodules. Importing fmcheck does not import torch.
"""

from ._version import __version__
from .api import Check, CheckDoc, Judgement, Skip, Thresholds
from .api_run import PreflightError, preflight, run
from .config import Settings
from .contract import Pipeline, load_pipeline
from .errors import ConfigError, PipelineError, UsageError
from .report import CheckResult, Measurement, Report
from .verdict import ExitCode, Verdict

__all__ = [
    "__version__", "Check", "CheckDoc", "CheckResult", "ConfigError", "ExitCode", "Judgement", "Measurement",
    "Pipeline", "PipelineError", "PreflightError", "Report", "Settings", "Skip", "Thresholds", "UsageError",
    "Verdict", "load_pipeline", "preflight", "run",
]

