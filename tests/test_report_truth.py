"""Reports tell the truth: a measurement is judged (its verdict is what its value says against its bound) or
informational (no verdict, no bound), in every renderer; bounds print with the digits that tell them apart."""

from __future__ import annotations

import io
import json
import re
import xml.etree.ElementTree as ET

import pytest
from rich.console import Console

from fmcheck.api import Judgement
from fmcheck.api_run import PreflightError
from fmcheck.judges import _fmt, at_least, at_most, flag, info, ratio_within
from fmcheck.renderers.console import details, format_value, live_line, render
from fmcheck.renderers.junit import to_junit
from fmcheck.report import CheckResult, Environment, Report
from fmcheck.verdict import Verdict


def _report(*measurements, verdict=Verdict.FAIL, summary="the overfit did not learn") -> Report:
    check = CheckResult(id="overfit", verdict=verdict, summary=summary, measurements=list(measurements),
                        hint="lower the learning rate")
    return Report(fmcheck_version="x", verdict=verdict, exit_code=1, environment=Environment(python="3"),
                  checks=[check])


def _console(width=80) -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=width, color_system=None), out


def test_info_has_no_verdict_and_no_bound():
    m = info("fm_loss / mean(v_target^2) final", 0.692, "", "the loss in units of the target's energy")
    assert m.verdict is None and m.expected == "" and not m.judged
    assert m.note == "the loss in units of the target's energy"
    # the older keyword lands in the note, never in expected: an informational number is held to nothing
    old = info("steps to verdict", 35, "steps", expected="<= 400")
    assert old.verdict is None and old.expected == "" and old.note == "<= 400"
    judged = at_most("loss", 0.692, warn=0.5014, fail=None)
    assert judged.verdict is Verdict.WARN and judged.expected == "<= 0.5014" and judged.judged


def test_informational_measurements_leave_the_check_verdict_alone():
    assert Verdict.worst([None, None]) is Verdict.PASS
    assert Verdict.worst([None, Verdict.WARN, None]) is Verdict.WARN
    only_info = Judgement([info("a", 1.0), info("b", "text")], "numbers only")
    assert only_info.final_verdict() is Verdict.PASS


def test_json_writes_null_for_an_informational_verdict():
    report = _report(info("z1 slope / configured slope", 5.481, "x", "1 when z1 is as configured"),
                     ratio_within("ratio", 5.5, warn_factor=2.0, fail_factor=3.0))
    data = json.loads(report.model_dump_json())
    slope, ratio = data["checks"][0]["measurements"]
    assert slope["verdict"] is None and slope["expected"] == "" and slope["note"] == "1 when z1 is as configured"
    assert ratio["verdict"] == "fail" and ratio["expected"] == "0.5..2"
    assert Report.model_validate_json(report.model_dump_json()) == report  # round trip keeps the null


def test_junit_informational_properties_carry_no_pass():
    report = _report(info("fm_loss final", 0.692, "", "not judged"), flag("finite", True, expected="True"),
                     info("kl_weight", "not exposed"))
    suite = ET.fromstring(to_junit(report).split("?>", 1)[1])
    props = {p.get("name"): p.get("value") for p in suite.iter("property")}
    assert props["fm_loss final"] == "0.692 (info: not judged)"
    assert props["kl_weight"] == "not exposed (info)"
    assert props["finite"] == "True (expected True; pass)"
    failure = suite.find("testcase/failure").text
    assert "fm_loss final: 0.692 (info: not judged)" in failure and "-> pass" not in failure


def test_console_panel_shows_info_without_verdict_or_bound_and_a_short_title():
    result = _report(info("fm_loss / mean(v_target^2) final", 0.692, "", "loss per unit of target energy"),
                     at_most("cos final", 0.2, warn=None, fail=0.1)).checks[0]
    console, out = _console()
    long = "z1 is the raw posterior mean, neither sampled nor scaled: z1 = 1 x, config: z = x * 0.1824"
    result = result.model_copy(update={"summary": long})
    console.print(details(result))
    text = out.getvalue()
    lines = text.splitlines()
    assert lines[0].startswith("╭─ overfit FAIL ─") and "raw posterior" not in lines[0]  # title: id + verdict
    assert "raw posterior" not in text  # the panel holds the numbers; the summary is in the check's row
    # ... where it is whole, wrapped under itself, and said once
    console, out = _console()
    report = _report(*result.measurements, summary=long)
    render(report, console, verbose=True)
    whole = " ".join(out.getvalue().split())
    assert long in whole and whole.count("neither sampled nor scaled") == 1
    row = next(line for line in lines if "fm_loss / mean" in line)
    assert "info" in row and "PASS" not in row and "<=" not in row
    assert "loss per unit of target energy" in text


def test_pytest_plugin_lines_show_no_empty_expectation():
    from fmcheck.renderers.plain import measurement_line as _measurement_line

    assert _measurement_line(info("samples", 128, "samples")) == "  info  samples = 128 samples"
    assert _measurement_line(flag("finite", False)) == "  fail  finite = False"
    assert _measurement_line(at_most("x", 3.0, warn=2.0, fail=None)) == "  warn  x = 3.0 (expected <= 2)"


def test_preflight_error_lists_only_judged_findings():
    report = _report(info("steps to verdict", 35, "steps", "<= 400"), flag("learns", False),
                     at_most("loss", 0.7, warn=0.5, fail=None))
    text = str(PreflightError(report))
    assert "steps to verdict" not in text
    assert "learns = False\n" in text + "\n" and "(expected )" not in text
    assert "loss = 0.7 (expected <= 0.5)" in text


@pytest.mark.parametrize("factor, expected", [(2.0, "0.5..2"), (1.0001, "0.9999..1.0001"), (1.5, "0.6667..1.5"),
                                              (1.00001, "0.99999..1.00001")])
def test_ratio_bounds_are_told_apart_from_each_other_and_from_the_ideal(factor, expected):
    assert ratio_within("r", 1.0, warn_factor=factor, fail_factor=None).expected == expected


def test_a_bound_is_printed_on_its_own_side_of_the_value():
    # 2.00004 > 2.00001: printed with 4 digits both read "2", and the WARN would look like a pass
    m = at_most("x", 2.00004, warn=2.00001, fail=None)
    assert m.verdict is Verdict.WARN and m.expected == "<= 2.00001"
    assert format_value(m.value, m.expected) == "2.00004"
    low = at_least("y", 0.99995, warn=0.99999, fail=None)
    assert low.verdict is Verdict.WARN and low.expected == ">= 0.99999"
    assert _fmt(0.18215) == "0.18215" and _fmt(3.0) == "3"  # a threshold prints as written
    assert _fmt(1 / 1.5) == "0.6667" and _fmt(1 / 3) == "0.3333"  # a derived bound: 4 digits where they suffice
    assert format_value(2.00000, "<= 2.00001") == "2"
    assert format_value(1.0002, "0.9999..1.0001") == "1.0002" and format_value(0.5, "0.5..2") == "0.5"


def test_piped_live_lines_indent_their_continuation():
    result = CheckResult(id="scale", verdict=Verdict.FAIL,
                         summary="z1 is the raw posterior mean, neither sampled nor scaled: z1 = 1 x, config: "
                                 "z = x * 0.1824; z1 std 5.48, mean 0.761")
    console, out = _console()
    console.print(live_line(result))
    lines = out.getvalue().rstrip("\n").splitlines()
    assert len(lines) >= 2 and re.match(r"FAIL +scale ", lines[0])
    indent = lines[0].index("z1 is")
    assert all(line.startswith(" " * indent) and line.strip() for line in lines[1:])
    console, out = _console()
    console.print(live_line(result, (0, 2)))
    assert re.match(r"FAIL +scale \(rank 0\) ", out.getvalue())


def test_the_final_line_counts_the_interrupted_check_time():
    report = _report(verdict=Verdict.ERROR)
    report.checks[0].duration_s = 12.34
    console, out = _console()
    render(report, console)
    assert "in 12.3 s" in out.getvalue()
