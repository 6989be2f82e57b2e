"""The command line. Thin: parse options, build settings, load the pipeline, run, render, exit.

Only this module imports typer. Nothing here imports torch at import time, so --help, --version and list stay fast.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

from ._version import __version__
from .errors import UsageError
from .verdict import ExitCode

app = typer.Typer(
    name="fmcheck",
    help="Pre-flight checks for flow-matching text-to-latent training: scale, norms, target, KL, overfit.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

ModuleOpt = Annotated[str, typer.Option("--module", "-m", help="The pipeline: MODULE:ATTR (a zero-argument callable "
                                                                "returning it, or the pipeline itself).")]
DeviceOpt = Annotated[Optional[str], typer.Option(help="cpu, cuda or cuda:N (default: where the trainable "
                                                       "parameters are).")]
SeedOpt = Annotated[Optional[int], typer.Option(help="Seed for every random draw fmcheck makes.")]
JsonOpt = Annotated[Optional[str], typer.Option("--json", help="Write the JSON report to PATH ('-' for stdout; the "
                                                               "human report then goes to stderr).")]
JunitOpt = Annotated[Optional[Path], typer.Option("--junit", help="Write a JUnit XML report to PATH.")]
StrictOpt = Annotated[bool, typer.Option("--strict", help="Treat WARN as FAIL (exit code 1).")]
ConfigOpt = Annotated[Optional[str], typer.Option("--config", help="A TOML file of settings and thresholds.")]
SamplesOpt = Annotated[Optional[int], typer.Option(help="Samples in the overfit set (default 128).")]
MaxStepsOpt = Annotated[Optional[int], typer.Option("--max-steps", help="Overfit step budget.")]
BudgetOpt = Annotated[Optional[float], typer.Option("--time-budget", help="Overfit wall-clock budget, seconds.")]
TimeoutOpt = Annotated[Optional[float], typer.Option("--timeout", help="Per-check time limit, seconds.")]
PlotOpt = Annotated[Optional[str], typer.Option("--plot", help="Write plots (PNG) to DIR.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Full tracebacks.")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Also every measurement with its note, the "
                                                                  "curves and the tracebacks (the JSON report always "
                                                                  "has them; --debug implies it).")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override a threshold: CHECK.NAME=VALUE "
                                                                   "(repeatable).")]
IdsOpt = Annotated[Optional[list[str]], typer.Option(help="Check ids, comma-separated or repeated.")]
IgnoreOpt = Annotated[Optional[list[str]], typer.Option("--ignore", metavar="CODE",
                                                        help="Ignore a finding: listed as ignored, counted toward no "
                                                             "verdict or exit code (repeatable or comma-separated; "
                                                             "`fmcheck list --codes` lists them).")]


def _ids(values: Optional[list[str]]) -> list[str]:
    return [part.strip() for value in values or [] for part in value.split(",") if part.strip()]


def _fail_usage(exc: BaseException, debug: bool) -> "typer.Exit":
    from .renderers.terminal import usage_error

    message = str(exc)
    if message.startswith("fmcheck "):  # "fmcheck init: ..." would read "fmcheck: error: fmcheck init: ..."
        message = message[len("fmcheck "):]
    usage_error(message, debug)
    return typer.Exit(int(ExitCode.USAGE))


def _execute(module: str, *, only: list[str], skip: list[str], json_path: Optional[str], junit: Optional[Path],
             debug: bool, verbose: bool, config: Optional[str], overrides: Optional[list[str]],
             **cli_settings: Any) -> None:
    from . import distributed
    from .config import load_settings
    from .contract import load_pipeline
    from .isolate import capture
    from .renderers.console import ProgressDisplay, render
    from .renderers.terminal import make_console, plain
    from .runner import run

    human = make_console(stderr=json_path == "-")
    rank = None
    try:
        _check_outputs(json_path, junit)
        settings, origins = load_settings({**cli_settings, "debug": debug}, config, overrides)
        rank = distributed.setup(settings.device)
        if rank is not None and settings.device is None:
            settings = settings.model_copy(update={"device": distributed.default_device(rank)})
        loaded = capture(load_pipeline, module)  # (it raises UsageError only: user code runs under its own capture)
        if not loaded.ok and not isinstance(loaded.exc, UsageError):
            raise loaded.exc
        distributed.agree_on_failure(rank, loaded.exc)
        pipeline = loaded.value
        with ProgressDisplay(human, enabled=rank is None or rank.is_main) as progress:
            report = run(pipeline, settings, only=only, skip=skip, listener=progress, origins=origins,
                         pipeline_name=module, rank=rank)
        unwritten = None
        if rank is None or rank.is_main:  # rank 0 alone renders and writes; every rank exits alike
            _write_plots(report, settings.plot_dir)
            render(report, human, verbose=verbose or debug, shown=progress.shown)  # --debug: tracebacks too
            unwritten = _write_reports(report, json_path, junit, debug)
        # The other ranks wait for those files: one that exits non-zero first has torchrun kill rank 0 mid-write.
        distributed.barrier(rank)
        if unwritten is not None:
            raise unwritten
    except UsageError as exc:
        if rank is not None and not rank.is_main:  # every rank raised the same error: rank 0 says it
            raise typer.Exit(int(ExitCode.USAGE)) from None
        raise _fail_usage(exc, debug) from None
    except KeyboardInterrupt:  # during the import, build() or the first step: no check ran, so no report
        plain(human, "fmcheck: interrupted (Ctrl-C) before any check ran; nothing was checked, no report written")
        raise typer.Exit(130) from None
    finally:
        distributed.teardown(rank)
    raise typer.Exit(report.exit_code)


def _write_plots(report: Any, directory: Optional[str]) -> None:
    """--plot DIR: the figures of the report's data, recorded on each result (checks[].plots) before any rendering."""
    if directory:
        from .renderers.plots import write_plots

        write_plots(report, directory)


def _check_outputs(json_path: Optional[str], junit: Optional[Path]) -> None:
    """Refuse report paths that cannot be written before anything runs, not after a long run. Under torchrun only
    global rank 0 writes, so only it tries the paths: two ranks probing one file would race."""
    import os

    if os.environ.get("RANK", "0") != "0":
        return
    for option, path in (("--json", json_path), ("--junit", junit)):
        if path is None or str(path) == "-":
            continue
        target = Path(path)
        if target.is_dir():
            raise UsageError(f"{option} {path}: is a folder; give a file path")
        existed = target.exists()
        try:
            with open(target, "a"):  # append mode: an existing file is left as it is
                pass
        except OSError as exc:
            raise UsageError(f"{option} {path}: cannot write there ({exc.strerror or exc})") from None
        if not existed:
            target.unlink(missing_ok=True)


def _write_reports(report: Any, json_path: Optional[str], junit: Optional[Path],
                   debug: bool = False) -> Optional["typer.Exit"]:
    """--json (a path, or '-' for stdout) and --junit; returns the exit to raise when a file could not be written."""
    if json_path == "-":
        sys.stdout.write(report.model_dump_json(indent=2) + "\n")
    outputs: list[tuple[str, Any, Callable[[], str]]] = []
    if json_path and json_path != "-":
        outputs.append(("--json", json_path, lambda: report.model_dump_json(indent=2) + "\n"))
    if junit is not None:
        from .renderers.junit import to_junit

        outputs.append(("--junit", junit, lambda: to_junit(report)))
    for option, path, text in outputs:
        try:
            Path(path).write_text(text())
        except OSError as exc:  # checked before the run; the disk or the folder changed since
            return _fail_usage(UsageError(f"{option} {path}: cannot write the report ({exc.strerror or exc})"), debug)
    return None


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"fmcheck {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version_callback, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Pre-flight checks for flow-matching text-to-latent training."""


def _command(only_id: Optional[str]) -> Callable[..., None]:
    """A subcommand that runs every check (``all``) or one check, with the common options."""

    def command(
        module: ModuleOpt,
        device: DeviceOpt = None,
        seed: SeedOpt = None,
        json_path: JsonOpt = None,
        junit: JunitOpt = None,
        strict: StrictOpt = False,
        config: ConfigOpt = None,
        samples: SamplesOpt = None,
        max_steps: MaxStepsOpt = None,
        time_budget: BudgetOpt = None,
        timeout: TimeoutOpt = None,
        plot: PlotOpt = None,
        debug: DebugOpt = False,
        verbose: VerboseOpt = False,
        set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a threshold: CHECK.NAME=VALUE "
                                                                        "(repeatable).")] = None,
        ignore: IgnoreOpt = None,
        only: IdsOpt = None,
        skip: IdsOpt = None,
    ) -> None:
        selected = [only_id] if only_id else _ids(only)
        _execute(module, only=selected, skip=_ids(skip), json_path=json_path, junit=junit, debug=debug,
                 verbose=verbose, config=config, overrides=set_, device=device, seed=seed, strict=strict or None,
                 samples=samples, max_steps=max_steps, time_budget=time_budget, timeout=timeout, plot_dir=plot,
                 ignore=_ids(ignore))

    if only_id is not None:  # --only/--skip make no sense for a single check: hide them
        command.__signature__ = _without(command, ("only", "skip"))  # type: ignore[attr-defined]
    return command


def _without(fn: Callable[..., Any], names: tuple[str, ...]):
    import inspect

    signature = inspect.signature(fn, eval_str=True)  # typer needs the real annotations, not strings
    return signature.replace(parameters=[p for p in signature.parameters.values() if p.name not in names])


app.command("all", help="Run every registered check against the pipeline.")(_command(None))


def _builtin_ids() -> list[tuple[str, str]]:
    """(id, target) of fmcheck's own checks, read from fmcheck's packaging metadata alone: no check is imported
    and no other distribution is scanned, so --help stays fast."""
    from importlib import metadata

    try:
        entry_points = metadata.distribution("fmcheck").entry_points
    except metadata.PackageNotFoundError:  # running from a source tree that was never installed
        return []
    return sorted({(ep.name, ep.value) for ep in entry_points if ep.group == "fmcheck.checks"})


def _scale_command() -> Callable[..., None]:
    """`scale`: the check on a pipeline (--module, as every check), or standalone on a VAE (--vae)."""
    import inspect
    import typing

    check = _command("scale")
    hints = typing.get_type_hints(check, include_extras=True)
    standalone_only = ("samples", "max_steps", "time_budget", "timeout", "plot")

    def command(module: Optional[str] = None, vae: Optional[str] = None, images: Optional[str] = None,
                resolution: Optional[int] = None, **common: Any) -> None:
        debug = bool(common.get("debug"))
        if (module is None) == (vae is None):
            message = ("scale: --module and --vae exclude each other; give one" if module else
                       "scale: needs --module M:ATTR (check a pipeline) or --vae DIR_OR_ID (recommend a VAE's scaling)")
            raise _fail_usage(UsageError(message), debug)
        if module is not None:
            if images is not None or resolution is not None:
                raise _fail_usage(UsageError("scale: --images and --resolution go with --vae, not --module"), debug)
            check(module=module, **common)
            return
        ignored = [f"--{name.replace('_', '-')}" for name in standalone_only if common.get(name) is not None]
        if ignored:
            raise _fail_usage(UsageError(f"scale --vae: {', '.join(ignored)} apply to --module runs only"), debug)
        _execute_scale_vae(vae, images=images, resolution=resolution, **common)

    own = [
        inspect.Parameter("module", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None, annotation=Annotated[
            Optional[str], typer.Option("--module", "-m", help="The pipeline: MODULE:ATTR (the check on it), or "
                                                               "--vae instead.")]),
        inspect.Parameter("vae", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None, annotation=Annotated[
            Optional[str], typer.Option("--vae", help="Standalone: a diffusers VAE folder, or a model id already in "
                                                      "the local Hugging Face cache; recommends its scaling_factor / "
                                                      "shift_factor.")]),
        inspect.Parameter("images", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None, annotation=Annotated[
            Optional[str], typer.Option("--images", help="With --vae: a folder of PNG/JPEG images (default: sample "
                                                         "photos that ship with scikit-learn).")]),
        inspect.Parameter("resolution", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None, annotation=Annotated[
            Optional[int], typer.Option("--resolution", help="With --vae: image side in pixels (default: the VAE "
                                                             "config's sample_size).")]),
    ]
    rest = [p.replace(annotation=hints[p.name]) for p in inspect.signature(check).parameters.values()
            if p.name != "module"]
    command.__signature__ = inspect.Signature(own + rest)  # type: ignore[attr-defined]
    return command


def _execute_scale_vae(vae: str, *, images: Optional[str], resolution: Optional[int], json_path: Optional[str],
                       junit: Optional[Path], debug: bool, verbose: bool, config: Optional[str],
                       set_: Optional[list[str]], device: Optional[str], seed: Optional[int], strict: bool,
                       ignore: Optional[list[str]] = None, **_: Any) -> None:
    from .config import load_settings
    from .renderers.console import render
    from .renderers.terminal import make_console, plain, status

    human = make_console(stderr=json_path == "-")
    try:
        _check_outputs(json_path, junit)
        settings, origins = load_settings({"device": device, "seed": seed, "strict": strict or None, "debug": debug,
                                           "ignore": _ids(ignore)}, config, set_)
        from .checks.scale import standalone  # lazily: diffusers, PIL and scikit-learn only when used

        with status(human, f"scale --vae {vae}: loading and encoding"):
            report = standalone.run(vae, images=images, resolution=resolution, settings=settings,
                                    origins=origins)
    except UsageError as exc:
        raise _fail_usage(exc, debug) from None
    render(report, human, verbose=verbose or debug)
    snippet = report.checks[0].details.get("config_snippet") if report.checks else None
    if snippet and snippet not in (report.checks[0].hint or ""):  # a non-PASS result already shows it in its fix
        plain(human, snippet)
    unwritten = _write_reports(report, json_path, junit, debug)
    if unwritten is not None:
        raise unwritten
    raise typer.Exit(report.exit_code)


for _check_id, _target in _builtin_ids():
    app.command(_check_id, help=f"Run only the '{_check_id}' check (`fmcheck explain {_check_id}` says what it "
                                "measures)." + (" Or, with --vae instead of --module, recommend a VAE's scaling "
                                                "without a pipeline." if _check_id == "scale" else ""))(
        _scale_command() if _check_id == "scale" else _command(_check_id))


@app.command("list", help="Every registered check, built-in and plugin, with its one-line purpose; --codes lists "
                           "the finding codes instead.")
def list_checks(
    codes: Annotated[bool, typer.Option("--codes", help="List every finding code (for --ignore and explain).")]
    = False,
) -> None:
    from .registry import discover
    from .renderers.terminal import check_list, code_list, make_console

    (code_list if codes else check_list)(discover(), make_console())


@app.command("explain", help="What a check measures, why, its thresholds, causes and fixes; or, for a finding code "
                              "(scale.twice), what that finding means and how to fix it.")
def explain(name: Annotated[str, typer.Argument(metavar="CHECK_OR_CODE",
                                                help="A check id or a finding code (`fmcheck list --codes`).")]) -> None:
    from .docs import check_markdown, rule_markdown
    from .findings import unknown_code
    from .registry import discover
    from .renderers.terminal import make_console, markdown

    registry = discover()
    cls = registry.get(name)
    if cls is not None:
        markdown(check_markdown(cls), make_console())
        return
    rules = {rule.code: (rule, owner) for owner in registry.ordered() for rule in owner.rules}
    if name in rules:
        rule, owner = rules[name]
        markdown(rule_markdown(rule, owner), make_console())
        return
    if "." in name:
        raise _fail_usage(UsageError(f"explain: {unknown_code(name, rules)}"), False)
    raise _fail_usage(UsageError(f"explain: unknown check id '{name}' (known: {', '.join(sorted(registry.checks))}; "
                                 "or give a finding code from `fmcheck list --codes`)"), False)


@app.command("init", help="Write a commented adapter template (build() around your training step). Never overwrites.")
def init(path: Annotated[str, typer.Argument(help="File or folder (default: ./fmcheck_adapter.py).")] = ".") -> None:
    from .scaffold import run_hint, write_template

    try:
        target = write_template(path)
    except UsageError as exc:
        raise _fail_usage(exc, False) from None
    typer.echo(f"wrote {target}: fill in the TODOs, then run `{run_hint(target)}`")


@app.command("compare", help="Are two JSON reports' numbers comparable? Same VAE (class, config, weights), scaling "
                              "as applied, latent shape and pixel resolution. Exit 0 comparable, 1 not, 2 unreadable.")
def compare(
    report_a: Annotated[Path, typer.Argument(metavar="A.json", help="A JSON report (fmcheck ... --json PATH).")],
    report_b: Annotated[Path, typer.Argument(metavar="B.json", help="Another JSON report.")],
    rtol: Annotated[float, typer.Option(help="Relative tolerance for fitted values (the scaling as applied, from the "
                                             "scale check); configuration, shapes and hashes must match exactly.")]
    = 0.01,
    show_all: Annotated[bool, typer.Option("--all", help="Show identical fields too.")] = False,
) -> None:
    from .fingerprint import compare as compare_fingerprints
    from .fingerprint import load_fingerprint
    from .renderers.compare import render_comparison
    from .renderers.terminal import make_console

    try:
        first, second = load_fingerprint(report_a), load_fingerprint(report_b)
    except UsageError as exc:
        raise _fail_usage(exc, False) from None
    comparison = compare_fingerprints(first, second, rtol=rtol)
    render_comparison(comparison, str(report_a), str(report_b), make_console(), show_all=show_all)
    raise typer.Exit(int(ExitCode.OK) if comparison.comparable else int(ExitCode.FAILED))


def main() -> None:
    app()
