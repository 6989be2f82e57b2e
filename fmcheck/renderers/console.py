"""The human report (a Rich table with the numbers behind each verdict) and the live progress display."""

from __future__ import annotations

import math
import re
from typing import Optional

from rich.console import Console, Group
from rich.panel import Panel
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from ..report import CheckResult, Measurement, Report
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


def headline(result: CheckResult, count: int = 3) -> str:
    """The numbers that decided the verdict first, then the first others."""
    decisive = [m for m in result.measurements if m.verdict in (Verdict.WARN, Verdict.FAIL, Verdict.ERROR)]
    rest = [m for m in result.measurements if m not in decisive]
    return "\n".join(_measurement_line(m) for m in (decisive + rest)[:count])


def summary_table(report: Report) -> Table:
    table = Table(title=f"fmcheck {report.fmcheck_version} — {report.pipeline or 'pipeline'}", title_justify="left",
                  expand=False, show_lines=True)
    table.add_column("check", style="bold")
    table.add_column("verdict")
    table.add_column("numbers")
    table.add_column("diagnosis", ratio=1)
    for result in report.checks:
        table.add_row(result.id, verdict_text(result.verdict), headline(result), result.summary)
    return table


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
    # The title is short (id and verdict): a summary in the title is cut mid-sentence at the panel's width.
    parts: list = [Text(result.summary)] if result.summary else []
    if result.measurements:
        table = Table(show_edge=False, box=None, pad_edge=False)
        for column in ("measurement", "observed", "expected", "verdict"):
            table.add_column(column)
        for m in result.measurements:
            table.add_row(_name_cell(m), _observed_cell(m), m.expected, verdict_text(m.verdict))
        parts.append(table)
    if result.hint:
        parts.append(Text.assemble(("fix: ", "bold"), result.hint))
    if result.error:
        parts.append(Text(result.error, style="dim"))
    parts.extend(curve_lines(result))
    title = Text.assemble((result.id, "bold"), " ", verdict_text(result.verdict))
    return Panel(Group(*parts) if parts else Text(""), title=title, title_align="left",
                 border_style=STYLE[result.verdict].replace("bold ", ""))


def render(report: Report, console: Console) -> None:
    console.print(summary_table(report))
    for result in report.checks:
        if result.verdict not in (Verdict.PASS, Verdict.SKIP):
            console.print(details(result))
        elif result.verdict is Verdict.PASS and curve_lines(result):  # a passing check's curves, without a panel
            console.print(Text.assemble((f"{result.id} curves", "bold")))
            for line in curve_lines(result):
                console.print(line)
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
    """A run listener that shows one line per running check, with live fields (loss, cos) when a check reports them."""

    def __init__(self, console: Console, enabled: bool = True):
        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console,
                                 transient=True, disable=not enabled)
        self.enabled = enabled
        self.task: Optional[int] = None
        self.rank: Optional[tuple[int, int]] = None

    def __enter__(self) -> "ProgressDisplay":
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def run_started(self, checks) -> None:
        self.rank = process_rank()
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
            self.progress.console.print(live_line(result, self.rank))


def live_line(result: CheckResult, rank: Optional[tuple[int, int]] = None) -> Table:
    """``VERDICT id  summary``, the summary wrapped in its own column: in a piped log a continuation line is indented
    under the summary instead of starting at column 0 like a log line of its own. Under torchrun the line is labelled
    with the rank it comes from: it is that rank's verdict, before the merge."""
    grid = Table.grid(padding=(0, 1))
    grid.add_column(no_wrap=True)
    grid.add_column(no_wrap=True, style="bold")
    grid.add_column(ratio=1)
    label = result.id if rank is None else f"{result.id} (rank {rank[0]})"
    grid.add_row(verdict_text(result.verdict), label, result.summary)
    return grid


def process_rank() -> Optional[tuple[int, int]]:
    """(rank, world size) when this process is one of several torch.distributed ranks, else None. Reads an
    already-imported torch.distributed only: the renderer never imports torch."""
    import sys

    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None
    world = dist.get_world_size()
    return (dist.get_rank(), world) if world > 1 else None
