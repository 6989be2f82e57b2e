"""The human report (a Rich table with the numbers behind each verdict) and the live progress display."""

from __future__ import annotations

import math
import re
from typing import Iterable, Optional

from rich.console import Console, Group
from rich.panel import Panel
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from ..findings import URGENCY, active, set_aside, why_set_aside
from ..report import CheckResult, Finding, Measurement, Report
from ..verdict import Verdict

STYLE = {
    Verdict.PASS: "bold green",
    Verdict.WARN: "bold yellow",
    Verdict.FAIL: "bold red",
    Verdict.ERROR: "bold magenta",
    Verdict.SKIP: "dim",
}


def verdict_text(verdict: Optional[Verdict]) -> Text:
    if verdict is None:  # an informational measurement: no verdict of its own
        return Text("info", style="dim")
    return Text(verdict.value.upper(), style=STYLE[verdict])


_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")  # "0.9999..1.0001" is two numbers


def format_value(value: object, expected: str = "") -> str:
    """A float with 4 significant digits, or more where 4 would print it as one of the bounds in ``expected`` while
    it is not equal to it (1.0002 against 0.9999..1.0001 must not read as 1)."""
    if not isinstance(value, float):
        return str(value)
    bounds = [float(n) for n in _NUMBER.findall(expected)] if expected and math.isfinite(value) else []
    for digits in range(4, 13):
        text = f"{value:.{digits}g}"
        if all(text != f"{b:.{digits}g}" or b == value for b in bounds):
            return text
    return repr(value)


def _measurement_line(m: Measurement) -> str:
    return f"{m.name} {format_value(m.value, m.expected)}{(' ' + m.unit) if m.unit else ''}"


SPARK = "▁▂▃▄▅▆▇█"


def sparkline(values: list, width: int = 32) -> str:
    """A one-line chart of a curve (resampled to ``width`` points); non-finite points show as '·'."""
    import math

    points = [v for v in values if isinstance(v, (int, float))]
    if not points:
        return ""
    if len(points) > width:
        points = [points[round(i * (len(points) - 1) / (width - 1))] for i in range(width)]
    finite = [v for v in points if math.isfinite(v)]
    low, high = (min(finite), max(finite)) if finite else (0.0, 0.0)
    span = high - low
    chars = []
    for v in points:
        if not math.isfinite(v):
            chars.append("·")
        else:
            chars.append(SPARK[0] if span == 0 else SPARK[min(len(SPARK) - 1, int((v - low) / span * len(SPARK)))])
    return "".join(chars)


def curve_lines(result: CheckResult) -> list[Text]:
    """One line per curve in ``details["curves"]`` (a mapping of name -> list of numbers; "step" is the x axis)."""
    curves = result.details.get("curves") if isinstance(result.details, dict) else None
    if not isinstance(curves, dict):
        return []
    steps = curves.get("step") or []
    lines = []
    for name, values in curves.items():
        if name == "step" or not isinstance(values, list) or not values:
            continue
        numbers = [v for v in values if isinstance(v, (int, float))]
        if not numbers:
            continue
        span = f"steps {steps[0]}..{steps[-1]}  " if steps else ""
        lines.append(Text.assemble((f"{name:>12} ", "bold"), sparkline(values),
                                   f"  {format_value(float(numbers[0]))} -> {format_value(float(numbers[-1]))}  "
                                   f"{span}", style=None))
    return lines


def _name_cell(m: Measurement) -> Text:
    """The measurement's name; its note (what the number is; each rank's value under torchrun) under it, dimmed: it
    is context, not a bound, so it never sits in the expected column."""
    return Text.assemble(m.name, (f"\n{m.note}", "dim") if m.note else "")


def _observed_cell(m: Measurement) -> Text:
    return Text.assemble(format_value(m.value, m.expected), (f" {m.unit}", "dim") if m.unit else "")


def details(result: CheckResult) -> Panel:
    """Everything measured for one check (``--verbose``): each measurement with its note, the traceback of an ERROR,
    the curves. The summary and the fix are not repeated here: the check's row and the list of fixes carry them."""
    # The title is short (id and verdict): a summary in the title is cut mid-sentence at the panel's width.
    parts: list = []
    if result.measurements:
        table = Table(show_edge=False, box=None, pad_edge=False)
        for column in ("measurement", "observed", "expected", "verdict"):
            table.add_column(column)
        for m in result.measurements:
            table.add_row(_name_cell(m), _observed_cell(m), m.expected, verdict_text(m.verdict))
        parts.append(table)
    if result.error:
        parts.append(Text(result.error, style="dim"))
    parts.extend(curve_lines(result))
    title = Text.assemble((result.id, "bold"), " ", verdict_text(result.verdict))
    return Panel(Group(*parts) if parts else Text(""), title=title, title_align="left",
                 border_style=STYLE[result.verdict].replace("bold ", ""))


def _has_details(result: CheckResult) -> bool:
    return bool(result.measurements or result.error or curve_lines(result))


def finding_text(finding: Finding) -> str:
    """The finding's message; its number against its bound appended when the message does not already say it."""
    if finding.bound and finding.bound not in finding.message:
        observed = format_value(finding.observed, finding.bound)
        unit = f" {finding.unit}" if finding.unit else ""
        return f"{finding.message} ({observed}{unit}, expected {finding.bound})"
    return finding.message


def fixes(report: Report) -> Optional[Table]:
    """What to fix, first: one entry per finding that counts, FAIL then ERROR then WARN across all checks: verdict,
    then the code and its message (the number against its bound), then ``fix:`` under it. The message wraps under
    the code, so the whole width carries words; a fix shared by several findings is said once. A check that crashed
    (no finding) gives its id and fix: its row says what happened. Ignored findings, and those another check's
    finding covers (the same cause), follow, dimmed."""
    entries: list[tuple[Verdict, str, str, Optional[str]]] = []
    for result in report.checks:
        live = active(result.findings)
        if live:
            entries += [(f.verdict, f.code, finding_text(f), f.fix or None) for f in live]
        elif result.verdict in URGENCY and result.hint:  # a crash, a leak, a plugin that failed to load: its row
            entries.append((result.verdict, result.id, "", result.hint))  # says what happened; here, the fix
    ignored = [f for result in report.checks for f in result.findings if set_aside(f)]
    if not entries and not ignored:
        return None
    entries.sort(key=lambda e: URGENCY.index(e[0]))  # stable: the checks' order within a verdict
    grid = Table.grid(padding=(0, 1))
    grid.add_column(no_wrap=True, min_width=5)
    grid.add_column()  # no ratio: a short row is not padded to the console's width with trailing spaces
    said: set[str] = set()
    for verdict, code, text, fix in entries:
        head = Text.assemble((code, "bold"), f"  {text}" if text else "")
        if fix and fix not in said:
            said.add(fix)
            head = Text.assemble(head, "\n", ("fix: ", "bold"), fix)
        grid.add_row(verdict_text(verdict), head)
    for f in ignored:
        why = "ignored (--ignore)" if f.ignored else f"covered by {f.covered_by}: the same cause"
        grid.add_row(Text("skip", style="dim"), Text(f"{f.code}  {why}; {f.verdict.value.upper()} {finding_text(f)}",
                                                     style="dim"))
    return grid


def _grid(id_width: int) -> Table:
    """Three columns: verdict, check id, text; text wraps under itself, so a continuation line is indented instead
    of starting at column 0 like a log line of its own."""
    grid = Table.grid(padding=(0, 1))
    grid.add_column(no_wrap=True, min_width=5)
    grid.add_column(no_wrap=True, style="bold", min_width=id_width)
    grid.add_column()  # no ratio: a short row is not padded to the console's width with trailing spaces
    return grid


def row_text(result: CheckResult) -> str:
    """A check's row: the codes of its findings when it has any that count, or of those set aside (ignored, covered
    by another check's finding), whose words follow in the list of fixes: nothing is said twice. Else its summary
    (what it measured, why it skipped, how it crashed)."""
    live = active(result.findings)
    if live:
        codes = list(dict.fromkeys(f.code for f in live))
        return f"{len(live)} finding{'s' if len(live) > 1 else ''}: {', '.join(codes)}"
    quiet = [f for f in result.findings if set_aside(f)]
    if quiet:
        return "set aside: " + ", ".join(f"{f.code} ({why_set_aside(f)})" for f in quiet)
    return result.summary


def rows(results: list[CheckResult], id_width: int = 0) -> Table:
    """The compact per-check table: one row per check (verdict, id, its findings' codes or its summary), the text
    wrapped in its column."""
    grid = _grid(id_width or max((len(r.id) for r in results), default=0))
    for result in results:
        grid.add_row(verdict_text(result.verdict), result.id, row_text(result))
    return grid


def render(report: Report, console: Console, *, verbose: bool = False, shown: Iterable[CheckResult] = ()) -> None:
    """The report after the run, in reading order: what to fix, then the per-check rows, then (``verbose``) every
    measurement and curve, then plots and the final verdict line.

    ``shown`` are the rows the live display already printed, word for word: they are not printed again (under
    torchrun the merged rows differ from the rank's live lines, so they are printed)."""
    already = {(r.id, r.verdict, row_text(r)) for r in shown}
    width = max((len(r.id) for r in report.checks), default=0)
    to_fix = fixes(report)
    if to_fix is not None:
        console.print(to_fix)
        console.print()
    rest = [r for r in report.checks if (r.id, r.verdict, row_text(r)) not in already]
    if rest:
        console.print(Text.assemble((f"fmcheck {report.fmcheck_version}", "bold"),
                                    f" — {report.pipeline or 'pipeline'}"), highlight=False)
        console.print(rows(rest, width))
    if verbose:
        for result in report.checks:
            if _has_details(result):
                console.print(details(result))
    counts = ", ".join(
        f"{sum(1 for c in report.checks if c.verdict is v)} {v.value}" for v in Verdict
        if any(c.verdict is v for c in report.checks)
    )
    plots = [(c.id, path) for c in report.checks for path in c.plots]
    if plots:
        console.print(Text("plots", style="bold"))
        for check_id, path in plots:
            console.print(Text.assemble(f"  {check_id:<10} ", (path, "dim" if path.startswith("not written") else "")))
    if report.generators:
        console.print(Text.assemble(("random generators restored ", "bold"), ", ".join(report.generators)))
    total = sum(c.duration_s for c in report.checks)
    note = " (interrupted)" if report.interrupted else ""
    console.print(Text.assemble("verdict ", verdict_text(report.verdict), f"  {counts}  in {total:.1f} s  "
                                f"exit code {report.exit_code}{note}"))


class ProgressDisplay:
    """A run listener that shows one line per running check, with live fields (loss, cos) when a check reports them.

    When a check finishes, its row (verdict, id, summary) is printed for good, in a terminal and in a pipe alike:
    those lines are the per-check table, so :func:`render` is given :attr:`shown` and does not print them again."""

    def __init__(self, console: Console, enabled: bool = True):
        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console,
                                 transient=True, disable=not enabled)
        self.enabled = enabled
        self.task: Optional[int] = None
        self.rank: Optional[tuple[int, int]] = None
        self.id_width = 0
        # The rows printed as final: under torchrun a live line is one rank's result, not the merged row.
        self.shown: list[CheckResult] = []

    def __enter__(self) -> "ProgressDisplay":
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def run_started(self, checks) -> None:
        self.rank = process_rank()
        self.id_width = max((len(c.id) for c in checks), default=0)
        if self.enabled and self.rank is not None:
            rank, world = self.rank
            self.progress.console.print(Text(f"live lines: rank {rank}'s own results; the table at the end merges "
                                             f"all {world} ranks (worst verdict)", style="dim"))

    def check_started(self, check_id: str, title: str) -> None:
        self.task = self.progress.add_task(f"{check_id}: {title}", total=None, info="")

    def check_progress(self, check_id: str, completed: float, total: Optional[float], fields: dict) -> None:
        if self.task is not None:
            info = "  ".join(f"{k} {format_value(v)}" for k, v in fields.items())
            self.progress.update(self.task, completed=completed, total=total, info=info)

    def check_finished(self, result: CheckResult) -> None:
        if self.task is not None:
            self.progress.remove_task(self.task)
            self.task = None
        if self.enabled:
            self.progress.console.print(live_line(result, self.rank, self.id_width))
            if self.rank is None:
                self.shown.append(result)


def live_line(result: CheckResult, rank: Optional[tuple[int, int]] = None, id_width: int = 0) -> Table:
    """``VERDICT id  summary``: the check's row, printed as it finishes (the summary wraps in its own column, so in a
    piped log a continuation line is indented under it). Under torchrun the line is labelled with the rank it comes
    from: it is that rank's verdict, before the merge."""
    label = result.id if rank is None else f"{result.id} (rank {rank[0]})"
    return rows([result.model_copy(update={"id": label})], id_width)


def process_rank() -> Optional[tuple[int, int]]:
    """(rank, world size) when this process is one of several torch.distributed ranks, else None. Reads an
    already-imported torch.distributed only: the renderer never imports torch."""
    import sys

    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None
    world = dist.get_world_size()
    return (dist.get_rank(), world) if world > 1 else None
