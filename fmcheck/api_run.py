"""The Python API: ``fmcheck.run`` for a report, ``fmcheck.preflight`` to stop a training script on FAIL."""

from __future__ import annotations

from typing import Any, Iterable, Optional, Union

from .config import load_settings
from .contract import Pipeline, coerce, load_pipeline
from .report import Report
from .verdict import Verdict

PipelineLike = Union[Pipeline, dict, str]


class PreflightError(RuntimeError):
    """Raised by :func:`preflight` when a check fails; ``report`` holds the whole report."""

    def __init__(self, report: Report):
        from .renderers.plain import preflight_failure

        self.report = report
        super().__init__(preflight_failure(report))


def _pipeline(pipeline: PipelineLike) -> Pipeline:
    return load_pipeline(pipeline) if isinstance(pipeline, str) else coerce(pipeline)


def run(pipeline: PipelineLike, checks: Optional[Iterable[str]] = None, *, skip: Optional[Iterable[str]] = None,
        config: Optional[str] = None, overrides: Optional[list[str]] = None, **options: Any) -> Report:
    """Run checks on a pipeline (a Pipeline, its dict form, or "module:attr") and return the Report.

    ``options`` are :class:`~fmcheck.config.Settings` fields: device, seed, samples, max_steps, time_budget, timeout,
    strict, thresholds={"norms": {"ratio_warn": 3.0}}, ... Settings come from the same places, in the same order, as on
    the command line: these options (``overrides`` are ``--set`` strings such as "norms.ratio_warn=3"), then the
    ``config`` TOML file, then ``[tool.fmcheck]`` in the nearest pyproject.toml, then the defaults.
    """
    from .runner import run as run_checks

    settings, origins = load_settings(options, config, overrides, source="option")  # the CLI's settings path
    name = pipeline if isinstance(pipeline, str) else None
    report = run_checks(_pipeline(pipeline), settings, only=checks, skip=skip, origins=origins, pipeline_name=name)
    if settings.plot_dir:  # plot_dir="figures/": drawn after the run, recorded on each result (checks[].plots)
        from .renderers.plots import write_plots

        write_plots(report, settings.plot_dir)
    return report


def preflight(pipeline: PipelineLike, checks: Optional[Iterable[str]] = None, **options: Any) -> Report:
    """Run the checks and raise :class:`PreflightError` on any FAIL or ERROR; return the report otherwise.

    Call it at the top of a training script, before the first optimizer step.
    """
    report = run(pipeline, checks, **options)
    if report.verdict in (Verdict.FAIL, Verdict.ERROR):
        raise PreflightError(report)
    return report
