"""The heart of the suite: every planted bug is caught by exactly the findings it declares, and correct pipelines stay
quiet.

Fixtures come from fixtures/catalog.py. Every built-in check runs on every fixture (the overfit where it is asserted:
it trains for seconds), so a second check reporting a planted cause, or a stray warning, fails the test: the findings
that count must be exactly the codes the fixture's EXPECT names. A correct fixture must have no finding at all.
"""

from __future__ import annotations

import pytest

from fixtures.catalog import checks_to_run, discover, reported
from fmcheck.config import Settings
from fmcheck.contract import load_pipeline
from fmcheck.registry import discover as discover_checks
from fmcheck.runner import run
from fmcheck.state import state_digest

FIXTURES = discover()
REGISTRY = discover_checks()
BUILTIN = [c.id for c in REGISTRY.ordered() if REGISTRY.sources[c.id] == "fmcheck"]


@pytest.mark.parametrize("fixture", FIXTURES, ids=[f.name for f in FIXTURES])
def test_fixture_findings(fixture):
    if fixture.skip:
        pytest.skip(f"{fixture.name}: {fixture.skip}")
    pipeline = load_pipeline(fixture.spec)
    before = state_digest(pipeline)
    report = run(pipeline, Settings(), only=checks_to_run(fixture, BUILTIN), pipeline_name=fixture.spec)
    assert state_digest(pipeline) == before, f"{fixture.name}: the user's state was not restored bit for bit"
    got = {c.id: c.verdict.value for c in report.checks}
    summaries = {c.id: c.summary for c in report.checks}
    codes = reported(report)
    messages = {f.code: f.message for c in report.checks for f in c.findings}
    errors = {k: summaries[k] for k, v in got.items() if v == "error"}
    assert not errors, f"{fixture.name}: checks crashed: {errors}"
    assert codes == fixture.codes, (f"{fixture.name}: findings {codes} but EXPECT names {fixture.codes}; "
                                    f"unexpected: { {k: messages[k] for k in set(codes) - set(fixture.codes)} }")
    for check_id, expected in fixture.check_verdicts.items():
        assert got[check_id] == expected, f"{fixture.name}: {check_id} gave {got[check_id]} ({summaries[check_id]})"


# Checks whose planted bug needs more than one process; proven in the test named here instead.
PROVEN_ELSEWHERE = {"ranks": "tests/test_distributed.py (fixtures/distributed/rank_scaling.py under torchrun)"}


def test_every_builtin_check_catches_at_least_one_planted_bug():
    # a covered finding counts here: the check saw the bug, and another check's finding names the same cause
    caught = {code.partition(".")[0] for f in FIXTURES if not f.correct and not f.skip
              for code, v in f.codes.items() if v in ("fail", "warn", "covered")}
    missing = set(BUILTIN) - caught - set(PROVEN_ELSEWHERE)
    assert not missing, f"no planted bug proves these checks fire: {missing}"


def test_every_bug_fixture_declares_what_must_fire():
    for fixture in FIXTURES:
        if not fixture.correct:
            assert any(v in ("fail", "warn") for v in fixture.codes.values()), fixture.name


# Durations only: the overfit stops exactly at its deciding checkpoint, so its steps are counted, not timed; its
# seconds live in measurements with unit "s" and in its details' "timing".
CLOCK_DEPENDENT = {"timing"}


def test_same_seed_same_json_on_the_reference_pipeline():
    """Two runs with the same seed give identical reports, durations and clock-dependent numbers aside."""
    def strip(report):
        checks = []
        for check in report.checks:
            data = check.model_dump(exclude={"duration_s"})
            data["measurements"] = [m for m in data["measurements"]
                                    if m["unit"] != "s" and m["name"] not in CLOCK_DEPENDENT]
            data["details"] = {k: v for k, v in data["details"].items() if k not in CLOCK_DEPENDENT}
            checks.append(data)
        return checks

    first = run(load_pipeline("fixtures.digits:build"), Settings(seed=7))
    second = run(load_pipeline("fixtures.digits:build"), Settings(seed=7))
    assert strip(first) == strip(second)
    assert first.fingerprint == second.fingerprint
