"""Findings: the unit of judgement.

Everything a check can conclude is declared once as a :class:`Rule`: a stable code (``scale.twice``), the verdict it
gives, a verdict function over the check's typed evidence and its thresholds, and one message template and one fix
template. :func:`evaluate` runs a check's rules; :func:`conclude` is the one place that turns findings into a check's
verdict, summary and hint (ordering and joining), after ``--ignore`` and ``--strict`` are applied. A rule that raises
is an ERROR for that rule alone: the other rules still speak.

Nothing here imports torch or renders.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

from .isolate import capture, describe
from .report import Finding, Value
from .verdict import Verdict

# FAIL first, then ERROR, then WARN: what fails the run comes first (and the exit code agrees: FAIL is 1, ERROR 3).
URGENCY = (Verdict.FAIL, Verdict.ERROR, Verdict.WARN)
SUMMARY_FINDINGS = 2  # messages joined into a check's one-line summary; the rest are counted


@dataclass(frozen=True)
class Hit:
    """What a rule's test returns when the rule fires: the number, the bound it broke, and the words the templates
    need. ``verdict`` is the rule's own unless given (a rule whose severity follows a warn/fail threshold pair)."""

    observed: Value = None
    bound: str = ""
    unit: str = ""
    verdict: Optional[Verdict] = None
    fields: Mapping[str, Any] = field(default_factory=dict)
    subject: str = ""  # what the finding is about when a rule fires once per thing (a module's key): see covered_by

    @classmethod
    def of(cls, observed: Value = None, bound: str = "", unit: str = "", verdict: Optional[Verdict] = None,
           subject: str = "", **fields: Any) -> "Hit":
        return cls(observed=observed, bound=bound, unit=unit, verdict=verdict, fields=fields, subject=subject)


Test = Callable[[Any, Any], Union[None, Hit, Iterable[Hit]]]


@dataclass(frozen=True)
class Rule:
    """One thing a check can conclude.

    ``message`` and ``fix`` are ``str.format`` templates over the hit's ``observed``, ``bound``, ``unit`` and its
    ``fields``. ``test(evidence, thresholds)`` returns None when the rule does not fire, a :class:`Hit`, or several
    hits (one per module, per output: the same cause seen in several places). ``doc`` is what ``fmcheck explain
    CODE`` prints: what is measured, why the bound, and when the finding is expected on a correct pipeline.
    """

    code: str
    verdict: Verdict
    title: str
    message: str
    fix: str
    test: Test
    doc: str = ""
    # One cause, one finding across checks: codes (of any check) that name this finding's cause. When one of them
    # counts in the same run (on the same subject, where both have one), this finding is listed as covered by it
    # and counts toward nothing; run alone, the check still reports it.
    covered_by: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_id, dot, name = self.code.partition(".")
        if not dot or not check_id or not name or self.code != self.code.strip().lower() or " " in self.code:
            raise ValueError(f"rule code {self.code!r}: expected '<check id>.<name>' in lower case")
        if self.verdict not in (Verdict.FAIL, Verdict.WARN):
            raise ValueError(f"rule {self.code}: a rule concludes FAIL or WARN (got {self.verdict})")

    @property
    def check_id(self) -> str:
        return self.code.partition(".")[0]

    def render(self, hit: Hit) -> Finding:
        words = {"observed": _shown(hit.observed), "bound": hit.bound, "unit": hit.unit, **hit.fields}
        return Finding(code=self.code, verdict=hit.verdict or self.verdict, message=self.message.format(**words),
                       fix=self.fix.format(**words), observed=_plain(hit.observed), bound=hit.bound, unit=hit.unit,
                       subject=hit.subject)


def evaluate(rules: Sequence[Rule], evidence: Any, thresholds: Any) -> list[Finding]:
    """Every rule's findings on this evidence, in the rules' declared order. A rule that raises (or whose template
    names a field its hit lacks) becomes one ERROR finding under its own code."""
    findings: list[Finding] = []
    for rule in rules:
        outcome = capture(_fire, rule, evidence, thresholds)  # one rule's bug must not silence the others
        if outcome.ok:
            findings.extend(outcome.value)
        else:
            findings.append(Finding(code=rule.code, verdict=Verdict.ERROR,
                                    message=f"rule {rule.code} could not be judged: {describe(outcome.exc)}",
                                    fix="report this to the check's authors with the JSON report (--json); "
                                        "the other findings stand"))
    return findings


def _fire(rule: Rule, evidence: Any, thresholds: Any) -> list[Finding]:
    hits = rule.test(evidence, thresholds)
    if hits is None:
        return []
    hits = [hits] if isinstance(hits, Hit) else list(hits)
    for hit in hits:
        if hit.verdict is not None and hit.verdict not in (Verdict.FAIL, Verdict.WARN):
            raise ValueError(f"a hit concludes FAIL or WARN (got {hit.verdict})")
    return [rule.render(hit) for hit in hits]


def set_aside(finding: Finding) -> bool:
    """Whether a finding was set aside: ignored (--ignore), or covered by another check's finding of the cause."""
    return finding.ignored or finding.covered_by is not None


def counts(finding: Finding) -> bool:
    """Whether a finding counts toward its check's verdict: not ignored, not covered by another check's finding."""
    return not set_aside(finding) and finding.verdict in URGENCY


def active(findings: Iterable[Finding]) -> list[Finding]:
    """The findings that count, worst first (FAIL, ERROR, WARN), in declared order within a verdict."""
    live = [f for f in findings if counts(f)]
    return sorted(live, key=lambda f: URGENCY.index(f.verdict))


def conclude(findings: Sequence[Finding], passed: str) -> tuple[Verdict, str, Optional[str]]:
    """A check's verdict, summary and hint from its findings: the one ordering and joining policy.

    The summary is the first findings' messages (worst first) and a count of the rest; the hint joins each distinct
    fix once. With no finding that counts, the verdict is PASS and the summary is ``passed`` (what was measured), or,
    when findings were set aside (ignored, or covered by another check's), those findings with why: an ignored
    finding is never silently dropped, and a passing summary never claims what a set-aside finding contradicts."""
    live = active(findings)
    if not live:
        # Nothing counts. Findings set aside (--ignore, or covered by another check's finding of the same cause)
        # are said instead of what was measured: a passing summary would claim what they contradict.
        quiet = [f for f in findings if set_aside(f)]
        if not quiet:
            return Verdict.PASS, passed or "no findings", None
        return Verdict.PASS, _joined([f"{f.code} {why_set_aside(f)}: {f.message}" for f in quiet]), None
    summary = _joined([f.message for f in live])
    hint = " | ".join(dict.fromkeys(f.fix for f in live if f.fix)) or None
    return live[0].verdict, summary, hint


def why_set_aside(finding: Finding) -> str:
    return "ignored" if finding.ignored else f"covered by {finding.covered_by}"


def _joined(texts: Sequence[str]) -> str:
    """The first texts joined, and a count of the rest."""
    more = len(texts) - SUMMARY_FINDINGS
    return "; ".join(texts[:SUMMARY_FINDINGS]) + (f" (+{more} more)" if more > 0 else "")


def cover(findings: Sequence[Finding], rules: Mapping[str, Rule], counting: Sequence[Finding]) -> list[Finding]:
    """The findings with those whose cause a counting finding of the run already names marked ``covered_by`` it
    (``Rule.covered_by``; on the same subject, where both have one)."""
    out = []
    for f in findings:
        rule = rules.get(f.code)
        owner = None
        if rule is not None and rule.covered_by and f.covered_by is None:
            owner = next((g.code for g in counting if g.code in rule.covered_by
                          and (not g.subject or not f.subject or g.subject == f.subject)), None)
        if owner:  # a WARN --strict promoted goes back to what it was: it counts toward nothing now
            f = f.model_copy(update={"covered_by": owner, **({"verdict": Verdict.WARN, "strict": False}
                                                              if f.strict else {})})
        out.append(f)
    return out


def ignore(findings: Sequence[Finding], codes: Iterable[str]) -> list[Finding]:
    """The findings with those whose code is in ``codes`` marked ignored (kept, and listed as ignored)."""
    codes = set(codes)
    return [f.model_copy(update={"ignored": True}) if f.code in codes and not f.ignored else f for f in findings]


def promote_warnings(findings: Sequence[Finding]) -> list[Finding]:
    """--strict: every WARN that counts becomes a FAIL."""
    return [f.model_copy(update={"verdict": Verdict.FAIL, "strict": True})
            if f.verdict is Verdict.WARN and counts(f) else f for f in findings]


def unknown_code(code: str, known: Iterable[str]) -> str:
    """The one-line error for an --ignore / explain code that no rule declares."""
    known = sorted(set(known))
    close = difflib.get_close_matches(code, known, n=1)
    return (f"unknown finding code '{code}'" + (f" (did you mean '{close[0]}'?)" if close else "")
            + "; `fmcheck list --codes` lists them")


def _shown(value: Value) -> str:
    """An observed value as a message prints it: 4 significant digits for floats."""
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return "" if value is None else str(value)


def _plain(value: Any) -> Value:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and math.isfinite(value):
        return float(f"{value:.6g}")
    return value if isinstance(value, (bool, int, float, str)) or value is None else str(value)
