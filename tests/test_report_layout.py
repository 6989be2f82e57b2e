"""The console report leads with what to fix: the rows of the checks (printed live as each finishes), then for each
check that did not pass its decisive number against its bound and the fix, then, with --verbose only, every
measurement; the verdict line last. Nothing is printed twice."""

from __future__ import annotations

import io
import json
import re

from rich.console import Console

from conftest import ROOT, run_cli
from fmcheck.judges import at_most, info
from fmcheck.renderers.console import render
from fmcheck.report import CheckResult, Environment, Finding, Report
from fmcheck.verdict import Verdict

SEED = "fixtures.bugs.scale_seed_unsampled_unscaled:build"


def _flat(text: str) -> str:
    """The text with its wrapping undone: a wrapped line continues, indented, on the next."""
    return " ".join(text.split())


def test_the_seed_bug_shows_its_fixes_on_the_first_screen(tmp_path):
    report_path = tmp_path / "report.json"
    done = run_cli("all", "--module", SEED, "--skip", "overfit", "--json", str(report_path), cwd=ROOT,
                   env={"COLUMNS": "80"})
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    first_screen = lines[:25]
    fix_at = next(i for i, line in enumerate(lines) if "fix: " in line)
    assert fix_at < 25, done.stdout
    # both planted causes (unscaled, unsampled), each under its code with the number against its bound
    assert any(re.match(r"FAIL +scale\.missing +z1 is the raw posterior mean", line) for line in first_screen)
    assert any(re.match(r"WARN +scale\.mean_not_sample +z1 is the posterior mean", line) for line in first_screen)
    assert "bound <= 0.05" in _flat("\n".join(first_screen))
    # the rows name the codes; the fixes list says each finding's words once; norms' ratio is the same cause as
    # scale.missing, so it is set aside (covered), with its numbers, not reported twice
    assert re.match(r"FAIL +scale +2 findings: scale\.missing, scale\.mean_not_sample$", lines[0].rstrip())
    assert re.match(r"PASS +norms +set aside: norms\.z1_scale \(covered by scale\.missing\)$", lines[1].rstrip())
    assert any(re.match(r"skip +norms\.z1_scale +covered by scale\.missing", line) for line in lines)
    assert "expected 0.5..2" in _flat(done.stdout)
    assert lines[-1].startswith("verdict FAIL") and "exit code 1" in lines[-1]
    report = json.loads(report_path.read_text())
    flat = _flat(done.stdout)
    for check in report["checks"]:
        for finding in check["findings"]:
            assert flat.count(_flat(finding["message"])) == 1, finding["code"]
            if not finding["covered_by"]:  # a covered finding's fix is its owner's business
                assert flat.count(_flat(finding["fix"])) == 1, finding["code"]
        if not check["findings"]:
            assert flat.count(_flat(check["summary"])) == 1, check["id"]
    # the details are not on the console by default, and the JSON keeps them
    norms = next(c for c in report["checks"] if c["id"] == "norms")
    assert any(m["name"] == "per-dim RMS x0" for m in norms["measurements"])
    assert "per-dim RMS x0" not in done.stdout


def test_verbose_shows_every_measurement_and_its_note():
    quiet = run_cli("norms", "--module", SEED, cwd=ROOT, env={"COLUMNS": "80"})
    loud = run_cli("norms", "--module", SEED, "--verbose", cwd=ROOT, env={"COLUMNS": "80"})
    assert quiet.returncode == loud.returncode == 1, loud.stdout + loud.stderr
    for detail in ("per-dim RMS x0", "a unit-variance latent has ~1", "x1 channel std spread (max/min)"):
        assert detail in loud.stdout and detail not in quiet.stdout
    assert "╭─ norms FAIL" in loud.stdout and "╭" not in quiet.stdout
    for out in (quiet.stdout, loud.stdout):  # the details add numbers, never a second copy of the words
        flat = _flat(out)
        assert flat.count("is dominated by it") == 1 and flat.count("Fix the scale at its source") == 1
        assert out.splitlines()[-1].startswith("verdict FAIL")


def _report() -> Report:
    checks = [CheckResult(id="norms", verdict=Verdict.WARN, summary="x1 is 2.5x larger",
                          measurements=[info("E||x0||", 16.0), at_most("ratio", 2.5, warn=2.0, fail=3.0)],
                          hint="scale x1",
                          findings=[Finding(code="norms.x1_off", verdict=Verdict.WARN, message="x1 is 2.5x larger",
                                            fix="scale x1", observed=2.5, bound="<= 2", unit="x")]),
              CheckResult(id="scale", verdict=Verdict.FAIL, summary="applied twice",
                          measurements=[at_most("z1 std", 0.03, warn=None, fail=0.01)], hint="apply it once",
                          findings=[Finding(code="scale.twice", verdict=Verdict.FAIL, message="applied twice",
                                            fix="apply it once", observed=0.03, bound="<= 0.01")]),
              CheckResult(id="kl", verdict=Verdict.PASS, summary="bounded")]
    return Report(fmcheck_version="x", verdict=Verdict.FAIL, exit_code=1, environment=Environment(python="3"),
                  pipeline="mytrain:build", checks=checks)


def _render(report: Report, **options) -> str:
    out = io.StringIO()
    render(report, Console(file=out, width=80, color_system=None), **options)
    return out.getvalue()


def test_fixes_come_in_verdict_order_then_the_rows():
    lines = _render(_report()).splitlines()
    # each finding once, worst first: verdict, code, the message with the number against its bound, then the fix
    assert re.match(r"FAIL +scale\.twice +applied twice \(0\.03, expected <= 0\.01\)$", lines[0].rstrip())
    assert lines[1].strip() == "fix: apply it once"
    assert re.match(r"WARN +norms\.x1_off +x1 is 2\.5x larger \(2\.5 x, expected <= 2\)$", lines[2].rstrip())
    assert lines[3].strip() == "fix: scale x1"
    title = lines.index("fmcheck x — mytrain:build")
    # the rows name the codes (their words are above), or say what a passing check measured
    assert [line.split() for line in lines[title + 1:title + 4]] == [
        ["WARN", "norms", "1", "finding:", "norms.x1_off"], ["FAIL", "scale", "1", "finding:", "scale.twice"],
        ["PASS", "kl", "bounded"]]
    assert lines[-1].startswith("verdict FAIL")


def test_an_ignored_finding_is_listed_dimmed_never_dropped():
    report = _report()
    report.checks[1].findings = [report.checks[1].findings[0].model_copy(update={"ignored": True})]
    report.checks[1].verdict, report.checks[1].summary = Verdict.PASS, "z1 std 0.03 (1 ignored: scale.twice)"
    lines = _render(report).splitlines()
    assert any(re.match(r"skip +scale\.twice +ignored \(--ignore\); FAIL applied twice", line) for line in lines)
    assert "fix: apply it once" not in "\n".join(lines)


def test_rows_the_live_display_printed_are_not_printed_again():
    report = _report()
    text = _render(report, shown=report.checks)
    assert text.count("applied twice") == 1 and "bounded" not in text and "fmcheck x" not in text
    assert "fix: apply it once" in text
    # a row that changed after its live line (under torchrun, the merge of the ranks) is printed
    merged = report.model_copy(deep=True)
    merged.checks[2].summary = "rank 1 of 2 (rank 0 pass): unbounded"
    text = _render(merged, shown=report.checks)
    assert "rank 1 of 2" in text and text.count("applied twice") == 1
