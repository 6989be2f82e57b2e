"""The report data model (JSON schema_version 2). Renderers read it; nothing here renders.

Version 2 added ``checks[].findings`` (one entry per conclusion a check reached, with its stable code) and the
report's ``ignored`` codes; every field of version 1 is still there with its meaning (docs/ci.md).
"""

from __future__ import annotations

from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from .verdict import ExitCode, Verdict

SCHEMA_VERSION = 2

Value = Union[bool, int, float, str, None]


class Measurement(BaseModel):
    """One number in a check's report: what was observed, in which unit.

    Either judged: ``verdict`` is what ``value`` says against the bound in ``expected`` (the judges helpers compute
    both). Or informational: ``verdict`` is None (JSON null) and ``expected`` is empty; ``note`` then says what the
    number is (how it was computed, what it is for), never a bound it is held to.
    """

    # NaN and Inf are findings, not missing data: keep them visible in JSON.
    model_config = ConfigDict(frozen=True, ser_json_inf_nan="strings")

    name: str
    value: Value
    unit: str = ""
    expected: str = ""
    verdict: Optional[Verdict] = None
    note: str = ""

    @property
    def judged(self) -> bool:
        return self.verdict is not None


class Finding(BaseModel):
    """One conclusion a check reached, under its rule's stable code (``scale.twice``): what was observed against
    which bound, what it means and what fixes it. ``ignored`` findings (``--ignore CODE``) and ``covered`` ones are
    kept and listed but count toward no verdict; ``strict`` marks a WARN that ``--strict`` made a FAIL."""

    model_config = ConfigDict(frozen=True, ser_json_inf_nan="strings")

    code: str
    verdict: Verdict
    message: str
    fix: str = ""
    observed: Value = None
    bound: str = ""
    unit: str = ""
    ignored: bool = False
    strict: bool = False
    # What the finding is about when its rule fires once per thing (a module's key); "" otherwise.
    subject: str = ""
    # The code of another check's finding that names the same cause in this run: this one then counts toward
    # nothing (one cause, one finding); None when it counts.
    covered_by: Optional[str] = None


class CheckResult(BaseModel):
    model_config = ConfigDict(ser_json_inf_nan="strings")

    id: str
    title: str = ""
    verdict: Verdict
    summary: str = ""
    measurements: list[Measurement] = Field(default_factory=list)
    hint: Optional[str] = None
    # What the check concluded, in its rules' declared order; its verdict, summary and hint derive from these.
    findings: list[Finding] = Field(default_factory=list)
    duration_s: float = 0.0
    # Extra machine-readable data a check wants to keep (curves, fingerprints); never needed to read the verdict.
    details: dict[str, Any] = Field(default_factory=dict)
    # Short traceback for ERROR rows.
    error: Optional[str] = None
    # Figures written with --plot (paths), or a 'not written: ...' note saying why not.
    plots: list[str] = Field(default_factory=list)
    # What the row says when no finding counts (the judgement's summary), kept to settle the findings again once
    # the whole run is known (a finding covered by another check's); not part of the JSON.
    _passed: str = PrivateAttr(default="")


class Environment(BaseModel):
    python: str
    torch: Optional[str] = None
    device: Optional[str] = None
    seed: int = 0
    platform: str = ""
    world_size: int = 1


class Report(BaseModel):
    model_config = ConfigDict(ser_json_inf_nan="strings")

    schema_version: int = SCHEMA_VERSION
    fmcheck_version: str
    verdict: Verdict
    exit_code: int
    environment: Environment
    pipeline: Optional[str] = None
    strict: bool = False
    # Finding codes the run was told to ignore (--ignore / ignore = [...]): listed, never counted.
    ignored: list[str] = Field(default_factory=list)
    interrupted: bool = False
    checks: list[CheckResult] = Field(default_factory=list)
    # The latent space the numbers were measured in (VAE, scaling, latent shape, resolution): `fmcheck compare`.
    fingerprint: Optional[dict[str, Any]] = None
    # The pipeline's own random generators fmcheck found, reseeded for its forwards and restored afterwards.
    generators: list[str] = Field(default_factory=list)

    def check(self, check_id: str) -> CheckResult:
        for result in self.checks:
            if result.id == check_id:
                return result
        raise KeyError(check_id)


def overall_verdict(results: list[CheckResult]) -> Verdict:
    verdicts = {r.verdict for r in results}
    for verdict in (Verdict.FAIL, Verdict.ERROR, Verdict.WARN):
        if verdict in verdicts:
            return verdict
    if verdicts == {Verdict.SKIP}:  # nothing was checked: not a PASS (the exit code stays 0: nothing failed)
        return Verdict.SKIP
    return Verdict.PASS


def exit_code_for(results: list[CheckResult]) -> ExitCode:
    verdicts = {r.verdict for r in results}
    if Verdict.FAIL in verdicts:
        return ExitCode.FAILED
    if Verdict.ERROR in verdicts:
        return ExitCode.ERROR
    return ExitCode.OK
