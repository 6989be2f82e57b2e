"""The real command line, run as a user runs it: exit codes, JSON, JUnit, list, explain, plugins via entry points."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest

from conftest import PLUGIN_SITE, TESTS, run_cli
from fmcheck.report import Report

DUPE_SITE = TESTS / "plugin_site_dupe"


def cli(*args, **kwargs):
    return run_cli(*args, extra_path=(PLUGIN_SITE,), **kwargs)


@pytest.mark.parametrize(
    "args, code",
    [
        (["--only", "t_ratio"], 0),
        (["--only", "t_warn"], 0),
        (["--only", "t_warn", "--strict"], 1),
        (["--only", "t_ratio", "--set", "t_ratio.warn_factor=1.0001", "--set", "t_ratio.fail_factor=1.0002"], 1),
        (["--only", "t_raise"], 3),
        (["--only", "t_hang", "--timeout", "0.5"], 3),
        (["--only", "t_raise,t_ratio", "--set", "t_ratio.fail_factor=1.0001", "--set", "t_ratio.warn_factor=1"], 1),
        (["--only", "nope"], 2),
    ],
)
def test_exit_codes(args, code):
    result = cli("all", "--module", "tiny:build", *args)
    assert result.returncode == code, result.stdout + result.stderr


@pytest.mark.parametrize(
    "module, message",
    [
        ("tiny", "expected MODULE:ATTR"),
        ("no_such_module_xyz:build", "no module named 'no_such_module_xyz'"),
        ("tiny:nothing", "module 'tiny' has no attribute 'nothing'"),
    ],
)
def test_bad_module_is_one_line_exit_2_no_traceback(module, message):
    result = cli("all", "--module", module, "--only", "t_ratio")
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert len(result.stderr.strip().splitlines()) == 1


def test_debug_shows_the_traceback():
    result = cli("all", "--module", "tiny:nothing", "--only", "t_ratio", "--debug")
    assert result.returncode == 2
    assert "Traceback" in result.stderr


def test_json_to_stdout_is_the_pydantic_model_and_round_trips(tmp_path):
    result = cli("all", "--module", "tiny:build", "--only", "t_ratio,t_raise,t_skip", "--json", "-")
    assert result.returncode == 3
    data = json.loads(result.stdout)  # stdout holds only JSON; the human report went to stderr
    assert "t_ratio" in result.stderr
    assert data["schema_version"] == 2 and data["exit_code"] == 3 and data["verdict"] == "error"
    assert set(data["environment"]) >= {"python", "torch", "device", "seed"}
    ratio = next(c for c in data["checks"] if c["id"] == "t_ratio")
    assert set(ratio) >= {"id", "verdict", "summary", "measurements", "hint", "duration_s"}
    assert set(ratio["measurements"][0]) == {"name", "value", "unit", "expected", "verdict", "note"}
    report = Report.model_validate(data)
    assert json.loads(report.model_dump_json()) == data


def test_junit_parses_and_maps_verdicts(tmp_path):
    path = tmp_path / "fmcheck.xml"
    result = cli("all", "--module", "tiny:build", "--only", "t_ratio,t_raise,t_skip,t_warn", "--junit", str(path),
                 "--set", "t_ratio.warn_factor=1", "--set", "t_ratio.fail_factor=1.0001")
    assert result.returncode == 1
    suite = ET.parse(path).getroot()
    cases = {case.get("name"): case for case in suite.iter("testcase")}
    assert set(cases) == {"t_ratio", "t_raise", "t_skip", "t_warn"}
    assert cases["t_ratio"].find("failure") is not None
    assert cases["t_raise"].find("error") is not None
    assert "boom <&>" in cases["t_raise"].find("error").get("message")  # escaped in the file, intact when parsed
    assert cases["t_skip"].find("skipped") is not None
    assert cases["t_warn"].find("failure") is None
    props = {p.get("name"): p.get("value") for p in cases["t_ratio"].iter("property")}
    assert "x1/x0" in props and "expected" in props["x1/x0"]
    assert suite.get("failures") == "1" and suite.get("errors") == "1" and suite.get("skipped") == "1"


def test_human_report_shows_numbers_expectations_and_fix():
    result = cli("all", "--module", "tiny:build", "--only", "t_ratio", "--set", "t_ratio.warn_factor=1",
                 "--set", "t_ratio.fail_factor=1.0001")
    out = result.stdout
    assert "FAIL" in out and "x1/x0" in out and "expected" in out and "fix: fix the scale" in out
    assert "exit code 1" in out


def test_config_file_and_pyproject_precedence(tmp_path):
    (tmp_path / "pyproject.toml").write_text("[tool.fmcheck.t_ratio]\nwarn_factor = 1.0\nfail_factor = 1.0001\n")
    env_path = (PLUGIN_SITE, TESTS)
    assert run_cli("all", "--module", "tiny:build", "--only", "t_ratio", cwd=tmp_path,
                   extra_path=env_path).returncode == 1  # pyproject tightens: FAIL
    loose = tmp_path / "loose.toml"
    loose.write_text("[t_ratio]\nwarn_factor = 5.0\nfail_factor = 9.0\n")
    assert run_cli("all", "--module", "tiny:build", "--only", "t_ratio", "--config", str(loose), cwd=tmp_path,
                   extra_path=env_path).returncode == 0  # --config beats pyproject
    assert run_cli("all", "--module", "tiny:build", "--only", "t_ratio", "--config", str(loose), "--set",
                   "t_ratio.warn_factor=1", "--set", "t_ratio.fail_factor=1.0001", cwd=tmp_path,
                   extra_path=env_path).returncode == 1  # the command line beats both
    (tmp_path / "pyproject.toml").write_text("[tool.fmcheck]\nsamples = 'many'\n")
    bad = run_cli("all", "--module", "tiny:build", "--only", "t_ratio", cwd=tmp_path, extra_path=env_path)
    assert bad.returncode == 2 and "samples" in bad.stderr and "valid integer" in bad.stderr


def test_list_shows_third_party_checks_and_a_broken_plugin_row():
    result = cli("list")
    assert result.returncode == 0
    assert "t_ratio" in result.stdout and "fmcheck-testplugins" in result.stdout
    assert "t_broken" in result.stdout and "failed to import" in result.stdout
    assert "t_notacheck" in result.stdout and "not name a subclass" in result.stdout


def test_a_plugin_that_fails_to_import_is_an_error_row_not_a_crash():
    result = cli("all", "--module", "tiny:build", "--only", "t_ratio,t_broken", "--json", "-")
    data = json.loads(result.stdout)
    rows = {c["id"]: c for c in data["checks"]}
    assert rows["t_ratio"]["verdict"] == "pass"
    assert rows["t_broken"]["verdict"] == "error" and "failed to import" in rows["t_broken"]["summary"]
    assert result.returncode == 3


def test_duplicate_ids_are_refused_with_a_clear_message():
    result = run_cli("list", extra_path=(PLUGIN_SITE, DUPE_SITE), env={"COLUMNS": "400"})
    assert "duplicate check id 't_ratio': already registered by fmcheck-testplugins" in result.stdout


def test_explain_renders_the_doc_and_unknown_id_is_exit_2():
    result = cli("explain", "t_ratio")
    assert result.returncode == 0
    assert "What it measures" in result.stdout and "warn_factor" in result.stdout
    missing = cli("explain", "nope")
    assert missing.returncode == 2 and "unknown check id 'nope'" in missing.stderr


def test_version_and_python_m():
    from fmcheck import __version__

    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"fmcheck {__version__}"


def test_a_single_check_subcommand_takes_the_common_options():
    from typer.testing import CliRunner

    from fmcheck.cli import app

    result = CliRunner().invoke(app, ["norms", "--help"])
    assert result.exit_code == 0, result.output
    assert "--module" in result.output and "--only" not in result.output


@pytest.mark.parametrize("args", [["list"], ["list", "--codes"], ["explain", "kl"]])
def test_list_and_explain_import_no_check_and_no_typer(args):
    """They read the catalogue of built-in checks (checks/catalog.json): no check module, no pydantic model and no
    Typer app is built just to print names (bench/startup.py measures the time this saves)."""
    probe = ("import sys; from fmcheck.entry import main; main(%r); "
             "print(sorted(m for m in sys.modules if m.startswith(('fmcheck.checks.', 'typer', 'torch')) "
             "or m in ('fmcheck.api', 'fmcheck.report')))" % (args,))
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_list_and_explain_fall_back_to_the_full_cli_when_plugins_are_installed():
    listed = cli("list")
    assert listed.returncode == 0 and "t_rules" in listed.stdout  # a plugin's title needs its import
    explained = cli("explain", "t_rules.far")
    assert explained.returncode == 0 and "the ratio is far from 1" in explained.stdout


def test_explain_a_builtin_code_prints_its_rule_doc():
    result = run_cli("explain", "scale.twice")
    assert result.returncode == 0, result.stderr
    flat = " ".join(result.stdout.split())
    assert "scale.twice" in flat and "(FAIL)" in flat and "--ignore scale.twice" in flat
    from fmcheck.registry import discover

    rule = next(r for r in discover().get("scale").rules if r.code == "scale.twice")
    assert " ".join(rule.doc.replace("`", "").split())[:60] in flat  # the rule's own doc, not a summary of it
