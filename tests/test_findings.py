"""Findings as the unit of judgement: rules, the one concluding policy, --ignore, --strict, explain, JSON, JUnit.

The in-process tests use the test plugin `t_rules` (tests/plugin_site), whose rules read ||x1|| / ||x0|| of the tiny
pipeline (0.9726): `t_rules.larger` always fires (WARN), `t_rules.far` (FAIL) and `t_rules.off` (WARN) follow the
thresholds, and `t_rules.broken` raises on request.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest

from conftest import PLUGIN_SITE, plugins, run_cli
from fmcheck.config import Settings
from fmcheck.errors import UsageError
from fmcheck.findings import Hit, Rule, conclude, evaluate
from fmcheck.registry import Registry
from fmcheck.report import Finding
from fmcheck.runner import run
from fmcheck.verdict import Verdict

TIGHT = {"t_rules": {"warn_factor": 1.0001, "fail_factor": 1.0002}}


@pytest.fixture
def rules_registry():
    registry = Registry()
    for cls in (plugins.WithRules, plugins.Ratio):
        registry.add(cls, name=cls.id, target=f"fmcheck_testplugins:{cls.__name__}", distribution="fmcheck-testplugins")
    return registry


def _run(pipeline, registry, **settings):
    return run(pipeline, Settings(**settings), only=["t_rules"], registry=registry)


def _finding(code, verdict, message="m", fix="f", ignored=False):
    return Finding(code=code, verdict=verdict, message=message, fix=fix, ignored=ignored)


# --- the core policy, on hand-written findings ------------------------------------------------------------------

def test_conclude_orders_fail_error_warn_and_joins_two_messages():
    findings = [_finding("a.w", Verdict.WARN, "warned", "fix w"), _finding("a.e", Verdict.ERROR, "crashed", "fix e"),
                _finding("a.f", Verdict.FAIL, "failed", "fix f"), _finding("a.f2", Verdict.FAIL, "failed too", "fix f")]
    verdict, summary, hint = conclude(findings, "all good")
    assert verdict is Verdict.FAIL
    assert summary == "failed; failed too (+2 more)"
    assert hint == "fix f | fix e | fix w"  # each distinct fix once, worst first


def test_conclude_with_nothing_counting_passes_and_names_the_ignored():
    verdict, summary, hint = conclude([_finding("a.w", Verdict.WARN, "x1 is 2.5x larger", ignored=True)], "ratio 1.0")
    # what was set aside is said, never a passing summary it contradicts
    assert (verdict, summary, hint) == (Verdict.PASS, "a.w ignored: x1 is 2.5x larger", None)
    assert conclude([], "ratio 1.0") == (Verdict.PASS, "ratio 1.0", None)


def test_a_rule_that_raises_is_an_error_for_that_rule_alone():
    def boom(evidence, thresholds):
        raise KeyError("logvar_max")

    rules = (Rule("x.boom", Verdict.FAIL, "t", "m", "f", boom, "d"),
             Rule("x.fires", Verdict.WARN, "t", "value {observed} above {bound}", "lower it",
                  lambda e, t: Hit.of(e, "<= 1"), "d"))
    findings = evaluate(rules, 2.5, None)
    assert [(f.code, f.verdict) for f in findings] == [("x.boom", Verdict.ERROR), ("x.fires", Verdict.WARN)]
    assert "KeyError" in findings[0].message and "logvar_max" in findings[0].message
    assert findings[1].message == "value 2.5 above <= 1" and findings[1].observed == 2.5


def test_a_template_naming_a_missing_field_is_an_error_not_a_crash():
    rule = Rule("x.bad", Verdict.WARN, "t", "value {nope}", "f", lambda e, t: Hit.of(1.0), "d")
    (finding,) = evaluate((rule,), None, None)
    assert finding.verdict is Verdict.ERROR and "nope" in finding.message


def test_a_rule_may_fire_once_per_place():
    rule = Rule("x.each", Verdict.WARN, "t", "module {name}", "f",
                lambda e, t: [Hit.of(name=n) for n in e], "d")
    assert [f.message for f in evaluate((rule,), ["vae", "text"], None)] == ["module vae", "module text"]


@pytest.mark.parametrize("code", ["Scale.twice", "scale", "scale.", "scale twice"])
def test_rule_codes_are_check_dot_name(code):
    with pytest.raises(ValueError):
        Rule(code, Verdict.FAIL, "t", "m", "f", lambda e, t: None)


# --- through the runner -----------------------------------------------------------------------------------------

def test_findings_give_the_check_its_verdict_summary_and_hint(tiny_pipeline, rules_registry):
    result = _run(tiny_pipeline, rules_registry, thresholds=TIGHT).checks[0]
    assert [(f.code, f.verdict) for f in result.findings] == [("t_rules.far", Verdict.FAIL),
                                                               ("t_rules.larger", Verdict.WARN)]
    assert result.verdict is Verdict.FAIL
    assert result.summary == "||x1||/||x0|| = 0.9726 (bound <= 1.0002x either way); the larger side is x0"
    assert result.hint == "fix the scale | none needed"


def test_ignore_drops_exactly_that_finding_and_lists_it(tiny_pipeline, rules_registry):
    report = _run(tiny_pipeline, rules_registry, thresholds=TIGHT, ignore=["t_rules.far"])
    result = report.checks[0]
    assert [(f.code, f.ignored) for f in result.findings] == [("t_rules.far", True), ("t_rules.larger", False)]
    assert result.verdict is Verdict.WARN and report.exit_code == 0 and report.ignored == ["t_rules.far"]
    assert result.summary == "the larger side is x0"
    both = _run(tiny_pipeline, rules_registry, thresholds=TIGHT, ignore=["t_rules.far", "t_rules.larger"]).checks[0]
    assert both.verdict is Verdict.PASS and both.summary.startswith("t_rules.far ignored: ||x1||/||x0|| = 0.9726")


def test_ignoring_an_unknown_code_is_a_usage_error_with_a_suggestion(tiny_pipeline, rules_registry):
    with pytest.raises(UsageError, match=r"unknown finding code 't_rules\.lager' \(did you mean 't_rules\.larger'"):
        _run(tiny_pipeline, rules_registry, ignore=["t_rules.lager"])


def test_a_check_without_rules_reports_under_its_id_and_can_be_ignored(tiny_pipeline, rules_registry):
    tight = {"t_ratio": {"warn_factor": 1.0001, "fail_factor": 1.0002}}
    report = run(tiny_pipeline, Settings(thresholds=tight), only=["t_ratio"], registry=rules_registry)
    (finding,) = report.checks[0].findings
    assert finding.code == "t_ratio" and finding.verdict is Verdict.FAIL and finding.fix == "fix the scale"
    ignored = run(tiny_pipeline, Settings(thresholds=tight, ignore=["t_ratio"]), only=["t_ratio"],
                  registry=rules_registry)
    assert ignored.checks[0].verdict is Verdict.PASS and ignored.exit_code == 0


def test_strict_makes_each_counting_warning_a_failure(tiny_pipeline, rules_registry):
    result = _run(tiny_pipeline, rules_registry, strict=True).checks[0]
    (finding,) = result.findings
    assert finding.verdict is Verdict.FAIL and finding.strict
    assert result.verdict is Verdict.FAIL and result.summary.endswith("[warn, --strict]")
    ignored = _run(tiny_pipeline, rules_registry, strict=True, ignore=["t_rules.larger"]).checks[0]
    assert ignored.verdict is Verdict.PASS and not ignored.findings[0].strict


def test_a_broken_rule_does_not_silence_the_others(tiny_pipeline, rules_registry):
    settings = {"t_rules": {**TIGHT["t_rules"], "break_rule": True}}
    result = _run(tiny_pipeline, rules_registry, thresholds=settings).checks[0]
    verdicts = {f.code: f.verdict for f in result.findings}
    assert verdicts == {"t_rules.far": Verdict.FAIL, "t_rules.broken": Verdict.ERROR,
                        "t_rules.larger": Verdict.WARN}
    assert result.verdict is Verdict.FAIL


# --- the command line: --ignore, explain, JSON findings[], JUnit cases --------------------------------------------

def cli(*args):
    return run_cli(*args, extra_path=(PLUGIN_SITE,))


def test_cli_ignore_changes_the_exit_code_and_lists_the_finding(tmp_path):
    args = ["all", "--module", "tiny:build", "--only", "t_rules", "--set", "t_rules.warn_factor=1.0001",
            "--set", "t_rules.fail_factor=1.0002"]
    failing = cli(*args, "--json", str(tmp_path / "a.json"), "--junit", str(tmp_path / "a.xml"))
    assert failing.returncode == 1, failing.stderr
    data = json.loads((tmp_path / "a.json").read_text())
    assert data["schema_version"] == 2
    (check,) = data["checks"]
    assert [(f["code"], f["verdict"], f["observed"], f["bound"]) for f in check["findings"]] == [
        ("t_rules.far", "fail", 0.972647, "<= 1.0002x either way"), ("t_rules.larger", "warn", 0.972647, "")]
    assert check["summary"] and check["hint"]  # what CI parses today is still there
    cases = ET.parse(tmp_path / "a.xml").getroot().findall("testcase")
    assert [(c.get("name"), [e.tag for e in c if e.tag != "properties"]) for c in cases] == [
        ("t_rules.far", ["failure"]), ("t_rules.larger", ["system-out"])]

    ignored = cli(*args, "--ignore", "t_rules.far", "--json", str(tmp_path / "b.json"),
                  "--junit", str(tmp_path / "b.xml"))
    assert ignored.returncode == 0, ignored.stderr
    assert "ignored" in ignored.stdout and "t_rules.far" in ignored.stdout
    data = json.loads((tmp_path / "b.json").read_text())
    assert data["ignored"] == ["t_rules.far"] and data["checks"][0]["verdict"] == "warn"
    assert [f["ignored"] for f in data["checks"][0]["findings"]] == [True, False]
    cases = ET.parse(tmp_path / "b.xml").getroot().findall("testcase")
    assert [(c.get("name"), c.find("skipped") is not None) for c in cases] == [("t_rules.far", True),
                                                                               ("t_rules.larger", False)]


def test_cli_ignore_of_an_unknown_code_exits_2_in_one_line():
    result = cli("all", "--module", "tiny:build", "--only", "t_rules", "--ignore", "t_rules.fra")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "did you mean 't_rules.far'" in result.stderr


def test_config_ignore_list_adds_to_the_command_line(tmp_path):
    config = tmp_path / "fmcheck.toml"
    config.write_text('ignore = ["t_rules.larger"]\n')
    result = cli("all", "--module", "tiny:build", "--only", "t_rules", "--config", str(config), "--strict")
    assert result.returncode == 0, result.stdout + result.stderr


def test_explain_a_code_prints_its_rule():
    result = cli("explain", "t_rules.far")
    assert result.returncode == 0, result.stderr
    assert "t_rules.far" in result.stdout and "the ratio is far from 1" in result.stdout
    assert "held to the configured factors" in result.stdout and "--ignore t_rules.far" in result.stdout
    unknown = cli("explain", "t_rules.fra")
    assert unknown.returncode == 2 and "did you mean 't_rules.far'" in unknown.stderr


def test_list_codes_lists_every_rule():
    result = cli("list", "--codes")
    assert result.returncode == 0
    for code in ("t_rules.far", "t_rules.off", "t_rules.broken", "t_rules.larger"):
        assert code in result.stdout


# --- one cause, one finding across checks (Rule.covered_by) -------------------------------------------------------

def test_a_finding_another_checks_finding_names_is_covered_and_counts_toward_nothing():
    from fmcheck.findings import cover

    owner = Rule("a.cause", Verdict.FAIL, "t", "m", "f", lambda e, t: None, "d")
    echo = Rule("b.symptom", Verdict.FAIL, "t", "m", "f", lambda e, t: None, "d", covered_by=("a.cause",))
    rules = {r.code: r for r in (owner, echo)}
    cause = Finding(code="a.cause", verdict=Verdict.FAIL, message="the cause")
    symptom = Finding(code="b.symptom", verdict=Verdict.FAIL, message="the symptom", strict=False)
    (covered,) = cover([symptom], rules, [cause])
    assert covered.covered_by == "a.cause"
    assert conclude([covered], "same units") == (Verdict.PASS, "b.symptom covered by a.cause: the symptom", None)
    assert cover([symptom], rules, []) == [symptom]  # run alone, the check still reports it


def test_covering_matches_subjects_where_both_findings_have_one():
    from fmcheck.findings import cover

    echo = Rule("b.requires_grad", Verdict.WARN, "t", "m", "f", lambda e, t: None, "d", covered_by=("a.gradient",))
    reached = Finding(code="a.gradient", verdict=Verdict.FAIL, message="m", subject="vae")
    on_vae = Finding(code="b.requires_grad", verdict=Verdict.WARN, message="m", subject="vae")
    on_text = Finding(code="b.requires_grad", verdict=Verdict.WARN, message="m", subject="text_encoder")
    got = cover([on_vae, on_text], {"b.requires_grad": echo}, [reached])
    assert [f.covered_by for f in got] == ["a.gradient", None]


def test_the_seed_bug_names_its_scale_cause_once():
    """scale names why z1 is off scale; norms' ratio finding is the same cause and is listed as covered by it."""
    from fmcheck.contract import load_pipeline

    report = run(load_pipeline("fixtures.bugs.scale_twice:build"), Settings(), only=["scale", "norms"])
    norms = report.check("norms")
    (finding,) = norms.findings
    assert finding.code == "norms.z1_scale" and finding.covered_by == "scale.twice"
    assert norms.verdict is Verdict.PASS and norms.summary.startswith("norms.z1_scale covered by scale.twice: ")
    alone = run(load_pipeline("fixtures.bugs.scale_twice:build"), Settings(), only=["norms"])
    assert alone.check("norms").verdict is Verdict.FAIL  # without scale, norms says it
