"""Verdicts and exit codes: the two vocabularies every layer shares."""

from __future__ import annotations

import enum


class Verdict(str, enum.Enum):
    PASS = "pass"
    WARN = "warn"
    FAIL = "fail"
    ERROR = "error"
    SKIP = "skip"

    @property
    def severity(self) -> int:
        return _SEVERITY[self]

    @staticmethod
    def worst(verdicts) -> "Verdict":
        """The most severe verdict; PASS for an empty sequence. None (an informational measurement) is no verdict."""
        return max((v for v in verdicts if v is not None), key=lambda v: v.severity, default=Verdict.PASS)


# SKIP sits with PASS: a skipped check proves nothing, but it is not a finding.
_SEVERITY = {Verdict.SKIP: 0, Verdict.PASS: 0, Verdict.WARN: 1, Verdict.ERROR: 2, Verdict.FAIL: 3}


class ExitCode(enum.IntEnum):
    OK = 0  # no FAIL and no ERROR (WARN allowed unless --strict)
    FAILED = 1  # at least one FAIL
    USAGE = 2  # bad command line or pipeline: nothing ran
    ERROR = 3  # no FAIL, but a check crashed or timed out
