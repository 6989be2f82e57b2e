"""Where users live: the Python API, the pytest plugin, third-party checks, `fmcheck init`."""

from __future__ import annotations

import ast
import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

import fmcheck
from conftest import PLUGIN_SITE, ROOT, TESTS, run_cli
from fmcheck.cli import app

EXAMPLE = ROOT / "examples" / "fmcheck-example-plugin"


@pytest.fixture
def only_test_checks(monkeypatch, test_registry):
    monkeypatch.setattr("fmcheck.runner.discover", lambda: test_registry)
    return test_registry


def test_run_returns_a_report_for_a_dict_or_a_spec(only_test_checks, monkeypatch):
    import tiny

    report = fmcheck.run(tiny.build(), ["t_ratio"])
    assert isinstance(report, fmcheck.Report) and report.check("t_ratio").verdict is fmcheck.Verdict.PASS
    monkeypatch.chdir(TESTS)
    assert fmcheck.run("tiny:build", ["t_ratio"], seed=3).environment.seed == 3


def test_run_rejects_unknown_options(only_test_checks):
    import tiny

    with pytest.raises(fmcheck.ConfigError, match="option 'sampels'"):
        fmcheck.run(tiny.build(), ["t_ratio"], sampels=3)


def test_preflight_raises_with_the_numbers_on_fail_and_returns_the_report_otherwise(only_test_checks):
    import tiny

    assert fmcheck.preflight(tiny.build(), ["t_ratio", "t_warn"]).verdict is fmcheck.Verdict.WARN
    with pytest.raises(fmcheck.PreflightError) as info:
        fmcheck.preflight(tiny.build(), ["t_ratio"], thresholds={"t_ratio": {"warn_factor": 1, "fail_factor": 1.0001}})
    message = str(info.value)
    assert "t_ratio: FAIL" in message and "x1/x0 = " in message and "fix: fix the scale" in message
    assert info.value.report.exit_code == 1


def test_pytest_plugin_runs_one_item_per_check(tmp_path):
    (tmp_path / "test_mine.py").write_text(
        "def test_my_assertion(fmcheck_report):\n"
        "    assert fmcheck_report.check('t_ratio').measurements[0].value > 0.5\n"
    )
    env = {**__import__("os").environ, "PYTHONPATH": f"{PLUGIN_SITE}:{TESTS}"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rA", "--fmcheck", "tiny:build",
         "--fmcheck-checks", "t_ratio,t_raise,t_skip,t_warn", str(tmp_path / "test_mine.py")],
        cwd=TESTS, env=env, capture_output=True, text=True, timeout=300,
    )
    out = result.stdout
    lines = out.splitlines()
    # the summary line may carry " - <reason>" after the node id, depending on the terminal width
    assert any(line.startswith("PASSED") and "::fmcheck[t_ratio]" in line for line in lines), out
    assert any(line.startswith("FAILED") and "::fmcheck[t_raise]" in line for line in lines), out
    assert "t_raise: ERROR check crashed: RuntimeError: boom" in out
    assert "SKIPPED" in out and "the pipeline has no head" in out
    assert "3 passed" in out and "1 failed" in out and "1 skipped" in out  # t_ratio, t_warn, test_my_assertion
    assert result.returncode == 1


def test_pytest_fixture_skips_without_the_option(tmp_path):
    (tmp_path / "test_mine.py").write_text("def test_it(fmcheck_report):\n    pass\n")
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert "1 skipped" in result.stdout


def test_example_plugin_installs_and_joins_list_and_reports(tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q", "--target",
                    str(target), str(EXAMPLE)], check=True, capture_output=True)
    listing = run_cli("list", extra_path=(target,), env={"COLUMNS": "300"})
    assert "time_coverage" in listing.stdout and "fmcheck-example-plugin" in listing.stdout
    result = run_cli("all", "--module", "tiny:build", "--only", "time_coverage", "--json", "-", extra_path=(target,))
    check = json.loads(result.stdout)["checks"][0]
    assert check["id"] == "time_coverage" and check["verdict"] == "pass", check
    assert result.returncode == 0
    # its rules are addressable like fmcheck's own: tight thresholds fire them, --ignore lists them as ignored
    tight = run_cli("all", "--module", "tiny:build", "--only", "time_coverage", "--set", "time_coverage.min_span=1.5",
                    "--ignore", "time_coverage.gap", "--json", "-", extra_path=(target,))
    findings = json.loads(tight.stdout)["checks"][0]["findings"]
    assert [f["code"] for f in findings] == ["time_coverage.narrow"] and tight.returncode == 0
    explained = run_cli("explain", "time_coverage.narrow", extra_path=(target,))
    assert explained.returncode == 0 and "part of [0, 1]" in explained.stdout


def test_init_writes_a_template_and_refuses_to_overwrite(tmp_path):
    runner = CliRunner()
    first = runner.invoke(app, ["init", str(tmp_path)])
    assert first.exit_code == 0, first.output
    adapter = tmp_path / "fmcheck_adapter.py"
    source = adapter.read_text()
    ast.parse(source)
    for key in ("step", "batches", "trainable", "optimizer", "encode", "decode", "v_target", "kl_weight"):
        assert key in source
    adapter.write_text("# the user's own edits\n")
    second = runner.invoke(app, ["init", str(adapter)])
    assert second.exit_code == 2 and "already exists" in second.output
    assert adapter.read_text() == "# the user's own edits\n"


def test_the_documented_ci_command_runs_as_documented(tmp_path):
    """docs/ci.md's gate command, run verbatim on the bundled pipeline: exit 0, JSON and JUnit written."""
    import os
    import shlex

    text = (ROOT / "docs" / "ci.md").read_text()
    block = text.split("<!-- ci-command -->", 1)[1].split("```bash", 1)[1].split("```", 1)[0].strip()
    args = shlex.split(block)
    assert args[0] == "fmcheck"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "fmcheck", *args[1:]], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert json.loads((tmp_path / "fmcheck.json").read_text())["verdict"] in ("pass", "warn")
    import xml.etree.ElementTree as ET

    assert ET.parse(tmp_path / "fmcheck-junit.xml").getroot().get("failures") == "0"
