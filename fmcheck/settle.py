"""Settling a check's findings into its verdict, summary and hint, once they are known.

:func:`settle` applies ``--ignore`` and ``--strict`` and the one concluding policy (``findings.conclude``);
:func:`cover_across` sets aside a finding whose cause another check's finding of the run names (``Rule.covered_by``);
:func:`legacy_finding` turns the verdict of a check without rules into one finding; :func:`check_ignores` refuses an
ignored code no check declares. The runner and `fmcheck scale --vae` both settle through here. Nothing here imports
torch or renders.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Optional

from .errors import UsageError
from .findings import active, conclude, cover, ignore as ignore_codes, promote_warnings, unknown_code
from .report import CheckResult, Finding
from .verdict import Verdict

if TYPE_CHECKING:
    from .api import Judgement


def legacy_finding(check_id: str, judgement: "Judgement", verdict: Verdict) -> Finding:
    """A check without rules: its verdict as one finding under its id, with its summary, its hint, and the worst
    judged measurement's number against its bound."""
    worst = next((m for v in (Verdict.FAIL, Verdict.ERROR, Verdict.WARN) for m in judgement.measurements
                  if m.verdict is v), None)
    if worst is None:
        return Finding(code=check_id, verdict=verdict, message=judgement.summary, fix=judgement.hint or "")
    unit = f" {worst.unit}" if worst.unit else ""
    number = f"{worst.name} = {worst.value}{unit}" + (f", expected {worst.expected}" if worst.expected else "")
    return Finding(code=check_id, verdict=verdict, message=f"{judgement.summary} ({number})", fix=judgement.hint or "",
                   observed=worst.value, bound=worst.expected, unit=worst.unit)


def settle(result: CheckResult, passed: str, ignored: Iterable[str] = (), strict: bool = False) -> CheckResult:
    """The check's verdict, summary and hint from its findings (fmcheck.findings.conclude), after ``--ignore`` marks
    findings ignored and ``--strict`` turns the WARNs that count into FAILs."""
    findings = ignore_codes(result.findings, ignored)
    if strict:
        findings = promote_warnings(findings)
    verdict, summary, hint = conclude(findings, passed)
    if any(f.strict for f in active(findings)):
        summary = f"{summary} [warn, --strict]"
    settled = result.model_copy(update={"findings": findings, "verdict": verdict, "summary": summary, "hint": hint})
    settled._passed = passed
    return settled


def cover_across(results: list[CheckResult], checks: Iterable[Any], settings: Any,
                 owners: Optional[list[CheckResult]] = None) -> list[CheckResult]:
    """One cause, one finding: a finding whose rule names another check's finding as the owner of its cause
    (``Rule.covered_by``), when that finding counts among ``owners`` (default: ``results``), is marked covered and
    its check settled again. The runner applies it as each check finishes (owners usually run first: scale before
    norms, target before structure) and once more at the end. Run alone, each check still reports it."""
    rules = {rule.code: rule for check in checks for rule in check.rules}
    counting = [f for r in (results if owners is None else owners) for f in active(r.findings)]
    out = []
    for result in results:
        covered = cover(result.findings, rules, counting)
        if covered != result.findings and result.verdict is not Verdict.ERROR:
            result = settle(result.model_copy(update={"findings": covered}), result._passed, settings.ignore,
                            settings.strict)
        out.append(result)
    return out


def known_codes(registry: Any) -> set[str]:
    """Every finding code a run with this registry can report: the rules' codes, and the id of a check (or a plugin
    that failed to load) that declares none."""
    codes = {rule.code for cls in registry.checks.values() for rule in cls.rules}
    codes |= {cls.id for cls in registry.checks.values() if not cls.rules}
    return codes | {f.name for f in registry.failures}


def check_ignores(ignored: Iterable[str], registry: Any) -> None:
    """Refuse an ignored code no check declares, before anything runs: a typo must not ignore nothing silently."""
    codes = known_codes(registry)
    for code in ignored:
        if code not in codes:
            raise UsageError(f"--ignore {code}: " + unknown_code(code, codes))
