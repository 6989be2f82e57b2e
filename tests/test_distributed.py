"""torchrun: 2 gloo processes on CPU over the digits pipeline (passes) and a planted cross-rank bug (fails, naming rank 1)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from fmcheck.distributed import merge
from fmcheck.report import CheckResult, Environment, Measurement, Report
from fmcheck.verdict import Verdict


def torchrun(module: str, out, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "fmcheck", "all",
         "--module", module, "--only", "ranks,norms", "--json", str(out), *extra],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )


@pytest.mark.parametrize("module, code", [("fixtures.digits:build", 0), ("fixtures.distributed.rank_scaling:build", 1)])
def test_torchrun_two_ranks(tmp_path, module, code):
    out = tmp_path / "report.json"
    result = torchrun(module, out)
    assert result.returncode == code, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["environment"]["world_size"] == 2
    ranks = next(c for c in report["checks"] if c["id"] == "ranks")
    norms = next(c for c in report["checks"] if c["id"] == "norms")
    per_rank = norms["details"]["ranks"]
    assert per_rank and all(len(values) == 2 for values in per_rank.values())
    numeric = [v for v in per_rank.values() if all(isinstance(x, float) for x in v)]
    assert any(v[0] != v[1] for v in numeric)  # each rank measured its own shard of batches
    if code == 0:
        assert ranks["verdict"] == "pass", ranks
    else:
        assert ranks["verdict"] == "fail"
        assert "VAE scaling config on rank 1" in ranks["summary"] and "z1 std on rank 1" in ranks["summary"]
    # rank 0 alone renders: the report's title appears once
    assert result.stdout.count("fmcheck 0.") == 1


def _report(verdict: Verdict, value: float, summary: str) -> Report:
    check = CheckResult(id="norms", verdict=verdict, summary=summary,
                        measurements=[Measurement(name="ratio", value=value, verdict=verdict)])
    return Report(fmcheck_version="x", verdict=verdict, exit_code=0, environment=Environment(python="3"),
                  checks=[check])


def test_merge_shows_the_worst_rank_with_its_own_numbers_and_lists_each_rank():
    merged = merge([_report(Verdict.PASS, 1.0, "fine"), _report(Verdict.FAIL, 5.0, "ratio 5")])
    check = merged.checks[0]
    assert check.verdict is Verdict.FAIL and check.summary == "rank 1 of 2 (rank 0 pass): ratio 5"
    # the shown rank's own value and verdict (no mean: 3.0 is a value no rank measured), every rank's value listed
    ratio = check.measurements[0]
    assert ratio.value == 5.0 and ratio.verdict is Verdict.FAIL and ratio.note == "per rank: 1, 5"
    assert check.details["ranks"]["ratio"] == [1.0, 5.0] and check.details["shown_rank"] == 1
    assert merged.exit_code == 1 and merged.environment.world_size == 2


def test_merge_of_agreeing_ranks_keeps_one_summary():
    same = merge([_report(Verdict.PASS, 1.0, "fine"), _report(Verdict.PASS, 1.0, "fine")]).checks[0]
    assert same.summary == "fine" and same.measurements[0].note == ""
    differ = merge([_report(Verdict.PASS, 1.0, "fine 1"), _report(Verdict.PASS, 1.2, "fine 1.2")]).checks[0]
    assert differ.summary == "all 2 ranks pass; rank 0: fine 1" and differ.measurements[0].value == 1.0


def test_ranks_check_skips_without_torch_distributed():
    import tiny
    from fmcheck.contract import coerce
    from fmcheck.runner import run

    report = run(coerce(tiny.build()), only=["ranks"])
    assert report.check("ranks").verdict is Verdict.SKIP
    assert "not running under torch.distributed" in report.check("ranks").summary


ONE_RANK_FAILS = """
import os, sys
sys.path.insert(0, {tests!r})
import tiny

def build():
    if os.environ.get("RANK") == "1":
        raise FileNotFoundError("shard list for rank 1")
    return tiny.build()

def build_step_fails():
    pipeline = tiny.build()
    step = pipeline["step"]
    def failing(batch, index):
        if os.environ.get("RANK") == "1":
            raise KeyError("caption")
        return step(batch, index)
    pipeline["step"] = failing
    return pipeline
"""


@pytest.mark.parametrize("attr, message", [("build", "rank 1: --module one_rank:build: build() raised FileNotFoundError"),
                                           ("build_step_fails", "rank 1: step(batch, step_index=0) raised KeyError")])
def test_a_pipeline_that_fails_on_one_rank_stops_every_rank_with_one_line(tmp_path, attr, message):
    """No rank is left waiting in a collective for torchrun to kill: all ranks exit 2, rank 0 says which failed."""
    (tmp_path / "one_rank.py").write_text(ONE_RANK_FAILS.format(tests=str(ROOT / "tests")))
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "1", "COLUMNS": "300"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "fmcheck",
         "all", "--module", f"one_rank:{attr}", "--only", "norms"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    lines = [line for line in output.splitlines() if line.startswith("fmcheck: error:")]
    assert len(lines) == 1 and message in lines[0], output
    assert "Connection closed" not in output and "Traceback" not in output.split("torch/distributed/elastic")[0]
    assert "exitcode  : 2" in output or "exitcode: 2" in output.replace("  ", " "), output  # torchrun's summary
