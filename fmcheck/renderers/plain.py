"""The plain-text failure: what `fmcheck.preflight` raises and what the pytest plugin prints for a failed check.

No Rich: it lands in tracebacks and pytest's failure section, where markup would be noise.
"""

from __future__ import annotations

from typing import Any, Iterable

from ..findings import active
from ..report import CheckResult, Report
from ..verdict import Verdict


def measurement_line(m: Any) -> str:
    """A judged measurement with its verdict and bound (when it has one); an informational one as 'info', with its
    note and no bound."""
    value = f"{m.name} = {m.value} {m.unit}".rstrip()
    if m.verdict is None:
        return f"  {'info':5} {value}" + (f" ({m.note})" if m.note else "")
    return f"  {m.verdict.value:5} {value}" + (f" (expected {m.expected})" if m.expected else "")


def check_failure(result: CheckResult, *, measurements: bool = True) -> list[str]:
    """One check that did not pass: its verdict line, each finding that counts with its code and fix, the ignored
    ones by code, then (``measurements``) every measurement, and the traceback of a crash."""
    lines = [f"{result.id}: {result.verdict.value.upper()} {result.summary}"]
    for finding in active(result.findings):
        lines.append(f"  {finding.verdict.value.upper()} {finding.code}: {finding.message}")
        if finding.fix:
            lines.append(f"    fix: {finding.fix}")
    if not result.findings and result.hint:  # a crash: no finding, one fix
        lines.append(f"  fix: {result.hint}")
    ignored = [f.code for f in result.findings if f.ignored]
    if ignored:
        lines.append(f"  ignored: {', '.join(ignored)}")
    covered = [f"{f.code} (by {f.covered_by})" for f in result.findings if f.covered_by and not f.ignored]
    if covered:
        lines.append(f"  covered: {', '.join(covered)}")
    if measurements:
        lines += [measurement_line(m) for m in result.measurements]
    if result.error:
        lines.append(result.error)
    return lines


def preflight_failure(report: Report) -> str:
    """`PreflightError`'s message: every check that failed or crashed, its findings and fixes, its judged numbers."""
    bad = [c for c in report.checks if c.verdict in (Verdict.FAIL, Verdict.ERROR)]
    lines = [f"fmcheck: {len(bad)} check(s) did not pass before training:"]
    for check in bad:
        lines += ["  " + line for line in check_failure(check, measurements=False)]
        lines += ["  " + measurement_line(m) for m in _judged_not_passing(check.measurements)]
    return "\n".join(lines)


def _judged_not_passing(measurements: Iterable[Any]) -> list[Any]:
    return [m for m in measurements if m.verdict in (Verdict.WARN, Verdict.FAIL, Verdict.ERROR)]
