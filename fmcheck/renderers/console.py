"""The human report (a Rich table with the numbers behind each verdict) and the live progress display."""

from __future__ import annotations

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


def verdict_text(verdict: Verdict) -> Text:
    return Text(verdict.value.upper(), style=STYLE[verdict])


def format_value(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _measurement_line(m: Measurement) -> str:
    return f"{m.name} {format_value(m.value)}{(' ' + m.unit) if m.unit else ''}"


def headline(result: CheckResult, count: int = 3) -> str:
    """The numbers that decided the verdict first, then the first others."""
    decisive = [m for m in result.measurements if m.verdict is not Verdict.PASS]
    rest = [m for m in result.measurements if m.verdict is Verdict.PASS]
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


def details(result: CheckResult) -> Panel:
    parts: list = []
    if result.measurements:
        table = Table(show_edge=False, box=None, pad_edge=False)
        for column in ("measurement", "observed", "expected", "unit", "verdict"):
            table.add_column(column, style="dim" if column == "unit" else None)
        for m in result.measurements:
            table.add_row(m.name, format_value(m.value), m.expected, m.unit, verdict_text(m.verdict))
        parts.append(table)
    if result.hint:
        parts.append(Text.assemble(("fix: ", "bold"), result.hint))
    if result.error:
        parts.append(Text(result.error, style="dim"))
    title = Text.assemble((result.id, "bold"), " ", verdict_text(result.verdict), " ", result.summary)
    return Panel(Group(*parts) if parts else Text(""), title=title, title_align="left",
                 border_style=STYLE[result.verdict].replace("bold ", ""))


def render(report: Report, console: Console) -> None:
    console.print(summary_table(report))
    for result in report.checks:
        if result.verdict not in (Verdict.PASS, Verdict.SKIP):
            console.print(details(result))
    counts = ", ".join(
        f"{sum(1 for c in report.checks if c.verdict is v)} {v.value}" for v in Verdict
        if any(c.verdict is v for c in report.checks)
    )
    total = sum(c.duration_s for c in report.checks)
    note = " (interrupted)" if report.interrupted else ""
    console.print(Text.assemble("verdict ", verdict_text(report.verdict), f"  {counts}  in {total:.1f} s  "
                                f"exit code {report.exit_code}{note}"))


class ProgressDisplay:
    """A run listener that shows one line per running check, with live fields (loss, cos) when a check reports them."""

    def __init__(self, console: Console):
        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console,
                                 transient=True)
        self.task: Optional[int] = None

    def __enter__(self) -> "ProgressDisplay":
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def run_started(self, checks) -> None:
        pass

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
        self.progress.console.print(Text.assemble(verdict_text(result.verdict), f" {result.id}  {result.summary}"))
