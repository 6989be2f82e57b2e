"""One settings path: the CLI, fmcheck.run, fmcheck.preflight and `pytest --fmcheck` read the same sources in the same
order (options > --config > [tool.fmcheck] in the nearest pyproject.toml > defaults) and give the same report."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import fmcheck
from conftest import PLUGIN_SITE, TESTS, run_cli

PYPROJECT = "[tool.fmcheck]\nseed = 7\n[tool.fmcheck.t_ratio]\nwarn_factor = 1.0\nfail_factor = 1.0001\n"
PYTEST_DUMP = (
    "import json\n"
    "def test_dump(fmcheck_report):\n"
    "    open('pytest_report.json', 'w').write(fmcheck_report.model_dump_json())\n"
)


def _comparable(report: dict) -> dict:
    """What must agree between entry points: verdicts, numbers, seed (durations and the pipeline label aside)."""
    return {
        "verdict": report["verdict"], "exit_code": report["exit_code"], "seed": report["environment"]["seed"],
        "checks": [(c["id"], c["verdict"], c["summary"], [(m["name"], m["value"]) for m in c["measurements"]])
                   for c in report["checks"]],
    }


@pytest.fixture
def project(tmp_path, monkeypatch, test_registry):
    (tmp_path / "pyproject.toml").write_text(PYPROJECT)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(TESTS))
    monkeypatch.setattr("fmcheck.runner.discover", lambda: test_registry)
    return tmp_path


def test_the_four_entry_points_read_pyproject_alike(project):
    cli = run_cli("all", "--module", "tiny:build", "--only", "t_ratio", "--json", "cli.json", cwd=project,
                  extra_path=(PLUGIN_SITE, TESTS))
    assert cli.returncode == 1, cli.stderr
    from_cli = _comparable(json.loads((project / "cli.json").read_text()))

    from_run = _comparable(json.loads(fmcheck.run("tiny:build", ["t_ratio"]).model_dump_json()))
    with pytest.raises(fmcheck.PreflightError) as failed:
        fmcheck.preflight("tiny:build", ["t_ratio"])
    from_preflight = _comparable(json.loads(failed.value.report.model_dump_json()))

    (project / "test_dump.py").write_text(PYTEST_DUMP)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PLUGIN_SITE), str(TESTS)])}
    subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--fmcheck", "tiny:build",
                    "--fmcheck-checks", "t_ratio", "test_dump.py"], cwd=project, env=env, capture_output=True,
                   text=True, timeout=300)
    from_pytest = _comparable(json.loads((project / "pytest_report.json").read_text()))

    assert from_cli["seed"] == 7 and from_cli["verdict"] == "fail"  # pyproject's seed and thresholds were read
    assert from_run == from_cli
    assert from_preflight == from_cli
    assert from_pytest == from_cli


def test_config_file_and_overrides_layer_the_same_way_in_the_api(project):
    loose = project / "loose.toml"
    loose.write_text("seed = 3\n[t_ratio]\nwarn_factor = 5.0\nfail_factor = 9.0\n")
    report = fmcheck.run("tiny:build", ["t_ratio"], config=str(loose))
    assert report.verdict is fmcheck.Verdict.PASS and report.environment.seed == 3  # --config beats pyproject
    report = fmcheck.run("tiny:build", ["t_ratio"], config=str(loose), seed=11,
                         overrides=["t_ratio.warn_factor=1", "t_ratio.fail_factor=1.0001"])
    assert report.verdict is fmcheck.Verdict.FAIL and report.environment.seed == 11  # options beat both


def test_config_errors_keep_their_table_names(project):
    (project / "pyproject.toml").write_text("[tool.fmcheck.t_ratio]\nwarn_factr = 2.0\n")
    result = run_cli("all", "--module", "tiny:build", "--only", "t_ratio", cwd=project, extra_path=(PLUGIN_SITE, TESTS))
    assert result.returncode == 2
    line = result.stderr.strip()
    assert "\n" not in line
    assert "[tool.fmcheck] [t_ratio]" in line and "unknown threshold 'warn_factr'" in line
    assert "did you mean 'warn_factor'" in line
    with pytest.raises(fmcheck.ConfigError, match=r"\[tool.fmcheck\] \[t_ratio\]: unknown threshold 'warn_factr'"):
        fmcheck.run("tiny:build", ["t_ratio"])
