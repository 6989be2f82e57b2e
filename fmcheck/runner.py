"""The runner: selects checks, isolates each one, restores the user's state after each, and assembles the report.

``run_check`` is the one function that executes a check; exceptions, timeouts and interrupts become data there.
"""

from __future__ import annotations

import contextlib
import platform
import signal
import threading
import time
from typing import Any, Iterable, Optional

from . import _version
from .api import Check, Judgement, Skip
from .config import Settings, thresholds_for
from .context import Context
from .contract import Pipeline
from .errors import PipelineError, UsageError
from .settle import check_ignores, cover_across, legacy_finding, settle
from .fingerprint import compute as compute_fingerprint
from .isolate import CheckTimeout, capture, describe, full_traceback, short_traceback
from .registry import Registry, discover
from .report import CheckResult, Environment, Report, exit_code_for, overall_verdict
from .state import StateSnapshot
from .verdict import Verdict


class Listener:
    """Receives run events (the progress display is one). Every method is optional to override."""

    def run_started(self, checks: list[type[Check]]) -> None: ...
    def check_started(self, check_id: str, title: str) -> None: ...
    def check_progress(self, check_id: str, completed: float, total: Optional[float], fields: dict) -> None: ...
    def check_finished(self, result: CheckResult) -> None: ...


@contextlib.contextmanager
def time_limit(seconds: Optional[float]):
    """Raise CheckTimeout in the main thread after ``seconds`` (SIGALRM); a no-op where signals are unavailable."""
    usable = (seconds is not None and hasattr(signal, "setitimer")
              and threading.current_thread() is threading.main_thread())
    if not usable:
        yield
        return

    def on_alarm(signum, frame):
        raise CheckTimeout(f"timed out after {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def select_checks(registry: Registry, only: Optional[Iterable[str]] = None,
                  skip: Optional[Iterable[str]] = None) -> list[type[Check]]:
    known = set(registry.checks) | {f.name for f in registry.failures}
    for check_id in [*(only or []), *(skip or [])]:
        if check_id not in known:
            raise UsageError(f"unknown check id '{check_id}' (known: {', '.join(sorted(known)) or 'none'})")
    chosen = [c for c in registry.ordered() if (not only or c.id in only) and c.id not in set(skip or ())]
    return chosen


def _missing_needs(check: type[Check], pipeline: Pipeline, ctx: Context) -> Optional[str]:
    fields = [f for f in check.requires if getattr(pipeline, f, None) is None]
    if fields:
        return f"needs pipeline field {', '.join(repr(f) for f in fields)}"
    if check.requires_outputs:
        missing = ctx.outputs(0).missing(check.requires_outputs)
        if missing:
            return f"step output lacks {', '.join(repr(k) for k in missing)}"
    return None


def error_result(check: type[Check], exc: BaseException, debug: bool, duration: float) -> CheckResult:
    """The ERROR row for an exception a check raised: one line and a fix; the traceback (short, or full with
    --debug) is kept in ``error`` for the verbose report and the JSON."""
    import torch

    if isinstance(exc, CheckTimeout):
        summary, hint = str(exc), "raise the limit with --timeout or reduce --max-steps / --samples"
    elif isinstance(exc, torch.cuda.OutOfMemoryError):
        summary = f"out of accelerator memory ({describe(exc)})"
        hint = "lower the batch size the pipeline yields, or run this check with --device cpu"
    elif isinstance(exc, PipelineError):  # the user's data or contract, said in one line: no fmcheck traceback
        summary, hint = str(exc), None
        if not debug:
            return CheckResult(id=check.id, title=check.title, verdict=Verdict.ERROR, summary=summary,
                               duration_s=duration)
    else:
        summary, hint = f"check crashed: {describe(exc)}", "rerun with --debug for the full traceback"
    traceback_text = full_traceback(exc) if debug else short_traceback(exc)
    return CheckResult(id=check.id, title=check.title, verdict=Verdict.ERROR, summary=summary, hint=hint,
                       duration_s=duration, error=traceback_text)


def check_timeout(check: type[Check], settings: Settings) -> float:
    """The per-check time limit: --timeout when given (command line or config), else the check's own
    ``timeout_for(settings)`` when it has one (the overfit: its time budget plus a margin), else the default."""
    own = getattr(check, "timeout_for", None)
    if "timeout" in settings.model_fields_set or own is None:
        return settings.timeout
    return float(own(settings))


def run_check(check: type[Check], ctx: Context, thresholds: Any, snapshot: StateSnapshot) -> CheckResult:
    """Measure and judge one check in isolation; the user's state is restored whatever happens.

    A check that leaves hooks, swapped Parameters or submodules, or added or removed attributes behind is an ERROR
    naming them (they are undone, so the next check sees the user's modules as they were).
    """
    start = time.perf_counter()
    ctx.check_id, ctx.thresholds = check.id, thresholds
    limit = check_timeout(check, ctx.settings)
    ctx.deadline = time.monotonic() + limit
    left: list[str] = []
    try:
        with time_limit(limit):
            reason_outcome = capture(_missing_needs, check, ctx.pipeline, ctx)
            measured = capture(check().measure, ctx) if reason_outcome.ok and reason_outcome.value is None else None
    finally:
        try:
            left = snapshot.leftovers()  # before the restore undoes them
        finally:
            snapshot.restore()
            ctx.check_id, ctx.deadline, ctx.thresholds = None, None, None
    duration = time.perf_counter() - start
    result = _result(check, thresholds, reason_outcome, measured, ctx.settings, duration)
    return _left_behind(result, left) if left else result


def _left_behind(result: CheckResult, left: list[str]) -> CheckResult:
    shown = "; ".join(left[:4]) + (f"; and {len(left) - 4} more" if len(left) > 4 else "")
    fix = "a check must remove the hooks it registers and put back what it replaces (docs/plugins.md)"
    if result.verdict is Verdict.ERROR:  # the crash stays the headline
        summary, hint = f"{result.summary}; it also {shown}; restored", f"{result.hint}; {fix}" if result.hint else fix
    else:
        summary = f"{shown}; restored"
        hint = f"{fix}; its own verdict was {result.verdict.value.upper()}: {result.summary}"
    return result.model_copy(update={"verdict": Verdict.ERROR, "summary": summary, "hint": hint,
                                     "details": {**result.details, "left_behind": left}})


def _result(check: type[Check], thresholds: Any, reason_outcome: Any, measured: Any, settings: Settings,
            duration: float) -> CheckResult:
    debug = settings.debug
    if not reason_outcome.ok:
        return error_result(check, reason_outcome.exc, debug, duration)
    if reason_outcome.value is not None:
        return CheckResult(id=check.id, title=check.title, verdict=Verdict.SKIP,
                           summary=f"skipped: {reason_outcome.value}", duration_s=duration)
    assert measured is not None
    if isinstance(measured.exc, Skip):
        return CheckResult(id=check.id, title=check.title, verdict=Verdict.SKIP,
                           summary=f"skipped: {measured.exc}", duration_s=duration)
    if not measured.ok:
        return error_result(check, measured.exc, debug, duration)
    judged = capture(check().judge, measured.value, thresholds)
    if not judged.ok:
        result = error_result(check, judged.exc, debug, duration)
        result.summary = f"judging failed: {describe(judged.exc)}"
        return result
    judgement: Judgement = judged.value
    findings = judgement.findings
    if findings is None:  # a check without rules: its verdict, as one finding under its id
        verdict = judgement.final_verdict()
        if verdict is Verdict.SKIP:
            return CheckResult(id=check.id, title=check.title, verdict=verdict, summary=judgement.summary,
                               measurements=judgement.measurements, duration_s=duration, details=judgement.details)
        findings = [] if verdict is Verdict.PASS else [legacy_finding(check.id, judgement, verdict)]
    result = CheckResult(id=check.id, title=check.title, verdict=Verdict.PASS, summary=judgement.summary,
                         measurements=judgement.measurements, duration_s=duration, details=judgement.details,
                         findings=findings)
    return settle(result, judgement.summary, settings.ignore, settings.strict)


def _resolve_device(pipeline: Pipeline, requested: Optional[str]):
    import torch

    if requested is not None:
        device = torch.device(requested)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"--device {requested}: CUDA is not available on this machine")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {requested}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise UsageError(f"--device {requested}: MPS is not available on this machine (it needs Apple silicon "
                             "and a torch built with MPS)")
        return device
    for module in pipeline.trainable_modules().values():
        for param in module.parameters():
            return param.device
    return torch.device("cpu")


def _place_modules(pipeline: Pipeline, device, previous: dict[int, Any]) -> None:
    """Move the pipeline's modules to ``device``, noting each module's previous device in ``previous`` as it goes."""
    modules = [*pipeline.trainable_modules().values(), *pipeline.frozen_modules().values()]  # the VAE among them
    if pipeline.velocity is not None:
        modules.append(pipeline.velocity)
    for module in modules:
        if id(module) in previous:
            continue
        param = next(iter(module.parameters()), None)
        if param is not None and param.device != device:
            previous[id(module)] = (module, param.device)
            module.to(device)


def _probe(ctx: Context, settings: Settings) -> None:
    """Read the batches the measuring checks share and run the step on each: a pipeline that cannot do that stops
    the run with one line here, instead of as the same crash in every check."""
    with time_limit(settings.timeout):
        batches = capture(ctx.batches)
        probe = capture(ctx.all_outputs) if batches.ok else batches
    if probe.ok:
        return
    exc = probe.exc
    if isinstance(exc, UsageError):
        raise exc
    where = "iterating pipeline field 'batches'" if not batches.ok else \
        f"step(batch, step_index={len(ctx.cached_outputs())})"
    raise PipelineError(f"{where} raised {describe(exc)}{_step_hint(exc)}") from exc


def _step_hint(exc: BaseException) -> str:
    """The contract's commonest misreading: a step that also trains."""
    import traceback

    names = {frame.name for frame in traceback.extract_tb(exc.__traceback__)}
    if "backward" in names or "zero_grad" in names:
        return "; step() must not call backward() or optimizer.step(): it is one forward, fmcheck trains with it"
    return ""


def assemble(results: list[CheckResult], settings: Settings, device: Any, pipeline_name: Optional[str],
             **extra: Any) -> Report:
    """The report of a run (a pipeline's, or `fmcheck scale --vae`'s): verdict and exit code from the results."""
    return Report(fmcheck_version=_version.__version__, verdict=overall_verdict(results),
                  exit_code=int(exit_code_for(results)), environment=_environment(device, settings.seed),
                  pipeline=pipeline_name, strict=settings.strict, ignored=list(settings.ignore), checks=results,
                  **extra)


def _environment(device, seed: int) -> Environment:
    import torch

    return Environment(python=platform.python_version(), torch=torch.__version__, device=str(device), seed=seed,
                       platform=f"{platform.system()}-{platform.machine()}")


def run(pipeline: Pipeline, settings: Optional[Settings] = None, *, only: Optional[Iterable[str]] = None,
        skip: Optional[Iterable[str]] = None, registry: Optional[Registry] = None,
        listener: Optional[Listener] = None, origins: Optional[dict[str, str]] = None,
        pipeline_name: Optional[str] = None, rank: Any = None) -> Report:
    """Run the selected checks against ``pipeline`` and return the report. Raises UsageError when nothing can run.

    The report is data: the caller renders it (console, JSON, JUnit) and draws its figures (``--plot``)."""
    settings = settings or Settings()
    registry = registry if registry is not None else discover()
    listener = listener or Listener()
    only, skip = list(only or []), list(skip or [])
    checks = select_checks(registry, only, skip)
    thresholds = {c.id: thresholds_for(c, settings, origins or {}) for c in checks}
    unknown_tables = set(settings.thresholds) - set(registry.checks)
    if unknown_tables:
        import difflib

        name = sorted(unknown_tables)[0]
        close = difflib.get_close_matches(name, list(registry.checks), n=1)
        raise UsageError(f"thresholds given for unknown check id '{name}'"
                         + (f" (did you mean '{close[0]}'? " if close else " (")
                         + f"known: {', '.join(sorted(registry.checks))})")

    check_ignores(settings.ignore, registry)
    if settings.plot_dir:
        _check_plot_dir(settings.plot_dir)
    device = _resolve_device(pipeline, settings.device)
    # Before anything moves, iterates or runs (validation draws nothing either): this is the user's state.
    snapshot = StateSnapshot(pipeline, device)
    moved: dict[int, Any] = {}
    results: list[CheckResult] = []
    interrupted = False
    try:
        _place_modules(pipeline, device, moved)
        in_run = snapshot.rebound() if moved else snapshot  # moving re-creates buffers: restore into those meanwhile
        ctx = Context(pipeline, settings, device, listener, rank=rank, generators=snapshot.generators)
        probed = capture(_probe, ctx, settings)  # (it raises usage errors only: the user's code runs captured)
        if not probed.ok and not isinstance(probed.exc, UsageError):
            raise probed.exc
        from .distributed import agree_on_failure

        agree_on_failure(rank, probed.exc)  # on every rank alike under torchrun
        in_run.tolerate_current_changes()  # what the user's own step does to its modules is not a check's doing
        in_run.restore()

        failures = [f for f in registry.failures if (not only or f.name in only) and f.name not in skip]
        for failure in failures:
            results.append(CheckResult(id=failure.name, title=f"plugin {failure.target}", verdict=Verdict.ERROR,
                                       summary=failure.reason, hint=f"from the distribution {failure.distribution}"))
        listener.run_started(checks)
        for index, check in enumerate(checks):
            listener.check_started(check.id, check.title)
            started = time.perf_counter()
            try:
                result = run_check(check, ctx, thresholds[check.id], in_run)
            except KeyboardInterrupt:
                interrupted = True
                result = CheckResult(id=check.id, title=check.title, verdict=Verdict.ERROR,
                                     summary="interrupted (Ctrl-C); state restored",
                                     duration_s=time.perf_counter() - started)  # the time it ran, not 0
            (result,) = cover_across([result], checks, settings, owners=results)  # before its row is shown
            results.append(result)
            listener.check_finished(result)
            if interrupted:
                for rest in checks[index + 1:]:
                    results.append(CheckResult(id=rest.id, title=rest.title, verdict=Verdict.SKIP,
                                               summary="not run: interrupted"))
                break
        results = cover_across(results, checks, settings)
        # The latent space these numbers were measured in, for `fmcheck compare`; never fails the run.
        fingerprint = capture(compute_fingerprint, pipeline, ctx, published(checks, results)).value \
            if not interrupted else None
    finally:
        for module, original in moved.values():
            module.to(original)
        snapshot.restore()

    report = assemble(results, settings, device, pipeline_name, interrupted=interrupted, fingerprint=fingerprint,
                      generators=[found.name for found in snapshot.generators])
    if rank is not None:
        from .distributed import all_gather, merge

        report = merge(all_gather(report))
    return report


def published(checks: Iterable[type[Check]], results: Iterable[CheckResult]) -> dict[str, Any]:
    """What the checks that ran publish (``Check.publishes``), read from their results' details."""
    by_id = {r.id: r for r in results}
    facts: dict[str, Any] = {}
    for check in checks:
        result = by_id.get(check.id)
        for name, key in check.publishes.items():
            if result is not None and key in result.details:
                facts[name] = result.details[key]
    return facts


def _check_plot_dir(directory: str) -> None:
    """Refuse a --plot DIR that cannot become a folder before anything runs, not after a long run (the caller draws
    the figures into it after the run)."""
    from pathlib import Path

    path = Path(directory)
    for parent in (path, *path.parents):
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"--plot {directory}: '{parent}' exists and is not a folder")
            break
