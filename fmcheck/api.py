"""The check API: what a built-in or third-party check implements.

A check measures, then judges. ``measure`` runs the user's code through the shared :class:`~fmcheck.context.Context`
and returns plain data (an *observation*); ``judge`` maps that observation and the configured thresholds to
measurements with verdicts. Neither prints. Check modules must not import torch at module level, so that
``fmcheck list`` and ``--help`` stay fast: import it inside ``measure``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Optional

from pydantic import BaseModel, ConfigDict, model_validator

from .findings import Hit, Rule, evaluate
from .report import Finding, Measurement
from .verdict import Verdict

if TYPE_CHECKING:
    from .context import Context


class Thresholds(BaseModel):
    """Base for a check's configurable thresholds: unknown keys are errors, not silently ignored.

    A pair ``X_warn`` / ``X_fail`` must keep the order of its defaults: the warning bound lies between passing and
    failing (``ratio_warn=5`` with ``ratio_fail=1.5`` would fail what it never warned about).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="after")
    def _warn_before_fail(self) -> "Thresholds":
        fields = type(self).model_fields
        for name in fields:
            if not name.endswith("_warn") or f"{name[:-5]}_fail" not in fields:
                continue
            fail_name = f"{name[:-5]}_fail"
            warn_default, fail_default = fields[name].default, fields[fail_name].default
            warn, fail = getattr(self, name), getattr(self, fail_name)
            numbers = (warn_default, fail_default, warn, fail)
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers) \
                    or warn_default == fail_default:
                continue
            higher_is_worse = warn_default < fail_default
            if (warn > fail) if higher_is_worse else (warn < fail):
                raise ValueError(f"{name} ({warn:g}) lies beyond {fail_name} ({fail:g}): the warning bound must come "
                                 f"before the failure bound ({'<=' if higher_is_worse else '>='} {fail_name})")
        return self


class NoThresholds(Thresholds):
    pass


__all__ = ["Check", "CheckDoc", "Finding", "Hit", "Judgement", "NoThresholds", "Rule", "Skip", "Thresholds"]


class Skip(Exception):
    """Raised by ``measure`` when the pipeline lacks what the check needs; the reason is shown to the user."""


@dataclass(frozen=True)
class CheckDoc:
    """Every check documents itself in one template (rendered by ``fmcheck explain`` and docs/checks/)."""

    what: str
    why: str
    bug_example: str
    fix: str
    causes: tuple[str, ...] = ()
    blind_spots: tuple[str, ...] = ()


@dataclass
class Judgement:
    """What ``judge`` returns.

    A check with rules returns its ``findings`` (``fmcheck.findings.evaluate(self.rules, evidence, thresholds)``):
    the runner derives the verdict, the summary and the hint from them, after ``--ignore`` and ``--strict``;
    ``summary`` is then what the row says when no finding counts (what was measured). A check without rules (an
    older plugin) leaves ``findings`` None: its verdict is the worst measurement's unless ``verdict`` is given, and
    a non-PASS verdict becomes one finding under the check's id, with ``summary`` and ``hint`` as its words.
    """

    measurements: list[Measurement]
    summary: str
    hint: Optional[str] = None
    verdict: Optional[Verdict] = None
    details: dict[str, Any] = field(default_factory=dict)
    findings: Optional[list[Finding]] = None

    def final_verdict(self) -> Verdict:
        if self.verdict is not None:
            return self.verdict
        return Verdict.worst(m.verdict for m in self.measurements)


class Check:
    """Base class of every check. Subclasses set the class attributes and implement ``measure`` and ``judge``."""

    id: ClassVar[str]
    title: ClassVar[str]
    purpose: ClassVar[str]  # one line, for `fmcheck list`
    doc: ClassVar[CheckDoc]
    requires: ClassVar[tuple[str, ...]] = ()  # pipeline fields that must be set
    requires_outputs: ClassVar[tuple[str, ...]] = ()  # step-output keys that must be present
    Thresholds: ClassVar[type[Thresholds]] = NoThresholds
    order: ClassVar[int] = 100  # position in `fmcheck all` (the seed's order: scale, norms, target, kl, overfit;
    # structure's static checks run before the overfit's training)
    # Measured facts other parts of fmcheck may read, as {published name: details key} (the fingerprint reads the
    # scaling as applied from the scale check's "applied_scaling"); everything else in details is the check's own.
    publishes: ClassVar[dict[str, str]] = {}
    # Everything the check can conclude, each under a stable code (`fmcheck explain CODE`, `--ignore CODE`).
    rules: ClassVar[tuple[Rule, ...]] = ()

    def conclude(self, evidence: Any, thresholds: Thresholds, measurements: list[Measurement], passed: str,
                 details: Optional[dict[str, Any]] = None) -> Judgement:
        """The usual end of ``judge``: run the check's rules on the evidence and hand back the judgement."""
        return Judgement(measurements=measurements, summary=passed, details=details or {},
                         findings=evaluate(self.rules, evidence, thresholds))

    def measure(self, ctx: "Context") -> Any:
        raise NotImplementedError

    def judge(self, observation: Any, thresholds: Thresholds) -> Judgement:
        raise NotImplementedError
