"""Run `overfit` on pipelines with the set's randomness replayed (as fmcheck does) or fresh on every pass.

The numbers in docs/checks/overfit.md (the fresh vs replayed table, the calibration of both regimes) come from it:

    OMP_NUM_THREADS=1 python scripts/overfit_regimes.py [--fresh] [--never --max-steps 400 --at 40,72,144,400] SPEC...

`--fresh` reseeds every replay call anew (so each pass draws new t, noise and eps, as a step with its own generator
does); `--never` sets the pass thresholds out of reach, to read the curves at the `--at` steps.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

NEVER = {"cos_pass": 1.0, "loss_drop": 0.999999, "fresh_loss_drop": 0.999999, "fresh_cos_gain": 1.0,
         "trend_after": 1.0, "scale_fail": 1e30, "scale_warn": 1e30, "diverge": 1e30}


def main() -> None:
    import torch

    from fmcheck.checks.overfit import REPLAY_SALT
    from fmcheck.config import Settings
    from fmcheck.context import Context
    from fmcheck.contract import load_pipeline
    from fmcheck.runner import run

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fresh", action="store_true", help="fresh randomness on every pass")
    parser.add_argument("--never", action="store_true", help="pass thresholds out of reach")
    parser.add_argument("--max-steps", type=int, default=400)
    parser.add_argument("--at", default="", help="comma-separated steps to print the curves at")
    parser.add_argument("specs", nargs="+", help="MODULE:ATTR of each pipeline")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.fresh:
        counter = itertools.count(1)
        seed_everything = Context.seed_everything

        def fresh(self, salt=0):
            return seed_everything(self, salt=10_000_000 + next(counter) if salt >= REPLAY_SALT else salt)

        Context.seed_everything = fresh
    for spec in args.specs:
        started = time.perf_counter()
        settings = Settings(max_steps=args.max_steps, time_budget=1e4,
                            thresholds={"overfit": NEVER} if args.never else {})
        check = run(load_pipeline(spec), settings, only=["overfit"]).check("overfit")
        details = check.details or {}
        curves = details.get("curves", {})
        print(f"{spec}: {check.verdict.value} {details.get('outcome')} steps={details.get('steps_run')} "
              f"randomness={details.get('randomness')} {time.perf_counter() - started:.1f}s :: {check.summary}",
              flush=True)
        for at in [int(a) for a in args.at.split(",") if a]:
            if at in curves.get("step", []):
                i = curves["step"].index(at)
                print(f"    step {at}: fm_loss/mean(v*^2) {curves['fm_relative'][0]:.3f} -> "
                      f"{curves['fm_relative'][i]:.3f}, cos {curves['cos'][0]:.2f} -> {curves['cos'][i]:.3f}",
                      flush=True)


if __name__ == "__main__":
    main()
