"""bench/gpu.py, the prepared GPU benchmark, in its CPU smoke mode: tiny sizes, every section end to end, the table."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import ROOT

ROWS = ("| `scale` check at most", "| VAE encode / decode at", "| overfit loop at most", "| raw loop ms/step",
        "| overfit verdict on the reference", "| peak memory")


def test_gpu_bench_smoke_runs_every_section_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # ~20 s on a 2-core CPU; the timeout only stops a hang (not a speed test: the machine may be loaded)
    result = subprocess.run([sys.executable, "bench/gpu.py", "--smoke", "--device", "cpu", "--out", str(out)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "| goal | measured | ratio | verdict |" in result.stdout
    for row in ROWS:
        assert row in result.stdout, (row, result.stdout)
    assert "goals not judged" in result.stdout and "**missed**" not in result.stdout
    results = json.loads(out.read_text())
    assert results["smoke"] is True and results["device"] == "cpu"
    assert [row["goal"] for row in results["rows"]] == [
        line.split(" | ")[0].removeprefix("| ") for line in result.stdout.splitlines() if line.startswith(ROWS)]
    assert results["verdict"]["verdict"] in ("pass", "warn", "fail")  # a verdict, not an error
    assert results["scale"]["verdict"] in ("pass", "warn", "fail")
