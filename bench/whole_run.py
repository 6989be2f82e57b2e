"""`fmcheck all` on the digits pipeline: wall time, where the time goes (per check), and peak memory against a raw
training loop on the same pipeline; and how much of the wall time is only building the pipeline (its imports and
model loads, which any tool that runs the user's step pays).

    python bench/whole_run.py [--repeats 3] [--raw-steps 200]

Each run is a fresh process whose peak RSS is read with getrusage(RUSAGE_CHILDREN) by a wrapper process, so the
two sides are measured the same way. The raw loop builds the same pipeline and runs step + backward + optimizer step
`--raw-steps` times (about what the overfit check runs): the memory a training run needs anyway.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

RAW_LOOP = """
import sys, time
sys.path.insert(0, {root!r})
from fixtures.digits import build
p = build()
batches = list(p["batches"])
for i in range({steps}):
    out = p["step"](batches[i % len(batches)], i)
    p["optimizer"].zero_grad()
    out["loss"].backward()
    p["optimizer"].step()
"""

BUILD_ONLY = """
import sys
sys.path.insert(0, {root!r})
from fixtures.digits import build
build()
"""

WRAPPER = """
import resource, subprocess, sys, time
start = time.perf_counter()
code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
print(time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, code)
"""


def measured(command: list[str]) -> tuple[float, float, int]:
    """(seconds, peak RSS in MiB, exit code) of one fresh process."""
    out = subprocess.run([sys.executable, "-c", WRAPPER, *command], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True).stdout.split()
    return float(out[0]), float(out[1]) / 1024, int(out[2])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--raw-steps", type=int, default=200)
    args = parser.parse_args()
    report_path = Path(tempfile.mkdtemp()) / "report.json"
    fmcheck_cmd = [sys.executable, "-m", "fmcheck", "all", "--module", "fixtures.digits:build", "--json",
                   str(report_path)]
    raw_cmd = [sys.executable, "-c", RAW_LOOP.format(root=str(ROOT), steps=args.raw_steps)]
    build_cmd = [sys.executable, "-c", BUILD_ONLY.format(root=str(ROOT))]
    runs, raws, builds, per_check = [], [], [], {}
    for _ in range(args.repeats):  # interleaved, so load affects both sides alike
        runs.append(measured(fmcheck_cmd))
        raws.append(measured(raw_cmd))
        builds.append(measured(build_cmd))
        report = json.loads(report_path.read_text())
        for check in report["checks"]:
            per_check.setdefault(check["id"], []).append(check["duration_s"])
    seconds = statistics.median(r[0] for r in runs)
    rss, raw_rss = statistics.median(r[1] for r in runs), statistics.median(r[1] for r in raws)
    print(f"fmcheck all --module fixtures.digits:build: {seconds:.1f} s wall (median of {args.repeats}), "
          f"exit code {runs[-1][2]}, verdict {report['verdict']}")
    built = statistics.median(b[0] for b in builds)
    checks_total = sum(statistics.median(v) for v in per_check.values())
    print(f"where the time goes: building the pipeline in a fresh process (python, torch, diffusers and transformers "
          f"imports, the VAE and text encoder loaded) {built:.1f} s; the checks {checks_total:.1f} s; the rest "
          f"(fmcheck's imports, probe, report) {seconds - built - checks_total:.1f} s")
    print(f"raw loop of {args.raw_steps} training steps, same build: "
          f"{statistics.median(r[0] for r in raws):.1f} s wall")
    print("per check (median s): " + ", ".join(f"{k} {statistics.median(v):.2f}" for k, v in per_check.items()))
    others = sum(statistics.median(v) for k, v in per_check.items() if k != "overfit")
    print(f"checks other than overfit together: {others:.2f} s")
    print(f"peak RSS: fmcheck all {rss:.0f} MiB, raw loop of {args.raw_steps} training steps {raw_rss:.0f} MiB, "
          f"ratio {rss / raw_rss:.2f}x")


if __name__ == "__main__":
    main()
