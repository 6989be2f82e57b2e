"""Startup cost of the light commands against the libraries they cannot avoid (typer, rich, pydantic).

    python bench/startup.py [--repeats 15]

Each command runs in a fresh interpreter, with bytecode caching on (as after a pip install) and after one warm-up
run; the table reports medians and the ratio to the baseline measured in the same run, interleaved, so that machine
load affects both alike.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

BASELINE = [sys.executable, "-c", "import typer, rich, pydantic"]
COMMANDS = {
    "fmcheck --help": [sys.executable, "-m", "fmcheck", "--help"],
    "fmcheck --version": [sys.executable, "-m", "fmcheck", "--version"],
    "fmcheck list": [sys.executable, "-m", "fmcheck", "list"],
    "fmcheck list --codes": [sys.executable, "-m", "fmcheck", "list", "--codes"],
    "fmcheck explain kl": [sys.executable, "-m", "fmcheck", "explain", "kl"],
    "fmcheck explain scale.twice": [sys.executable, "-m", "fmcheck", "explain", "scale.twice"],
}
REFERENCES = {
    "import torch": [sys.executable, "-c", "import torch"],
}


# As on a user's machine, where pip compiled every module to bytecode at install: a PYTHONDONTWRITEBYTECODE set in
# this shell would make each run recompile fmcheck's own modules, a cost no installed fmcheck pays.
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def timed(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, env=ENV)
    return time.perf_counter() - start


def measure(repeats: int) -> dict[str, float]:
    samples: dict[str, list[float]] = {"baseline": [], **{k: [] for k in COMMANDS}, **{k: [] for k in REFERENCES}}
    for command in [BASELINE, *COMMANDS.values()]:  # warm-up: bytecode written, files in the page cache
        timed(command)
    for _ in range(repeats):
        samples["baseline"].append(timed(BASELINE))
        for name, command in COMMANDS.items():
            samples[name].append(timed(command))
    for name, command in REFERENCES.items():
        samples[name] = [timed(command) for _ in range(max(3, repeats // 5))]
    return {name: statistics.median(values) for name, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    medians = measure(args.repeats)
    base = medians["baseline"]
    print(f"baseline `python -c 'import typer, rich, pydantic'`: {base:.3f} s (median of {args.repeats})")
    for name in [*COMMANDS, *REFERENCES]:
        print(f"{name:>22}: {medians[name]:.3f} s  ratio {medians[name] / base:.2f}x")


if __name__ == "__main__":
    main()
