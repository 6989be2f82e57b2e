"""Regenerate the figures shown in docs/ (`--plot` output on the bundled pipelines).

    python scripts/doc_figures.py

The seed's case before the fix (fixtures.bugs.scale_seed_unsampled_unscaled) and after it (fixtures.digits), through
`norms` and `target`; and the overfit curves of the reference pipeline. Writes docs/images/plots-*.png.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

IMAGES = ROOT / "docs" / "images"
RUNS = [  # (module, checks, {figure file written by --plot: name in docs/images})
    ("fixtures.bugs.scale_seed_unsampled_unscaled:build", ["norms"], {"norms-latents.png": "plots-seed-latents.png"}),
    ("fixtures.digits:build", ["norms", "target", "overfit"],
     {"norms-latents.png": "plots-digits-latents.png", "target-path.png": "plots-digits-path.png",
      "overfit.png": "plots-digits-overfit.png"}),
]


def main() -> None:
    import fmcheck

    for module, checks, files in RUNS:
        with tempfile.TemporaryDirectory() as folder:
            report = fmcheck.run(module, checks=checks, plot_dir=folder)
            print(f"{module}: {report.verdict.value} ({', '.join(f'{r.id} {r.verdict.value}' for r in report.checks)})")
            for written, name in files.items():
                shutil.copyfile(Path(folder) / written, IMAGES / name)
                print(f"  docs/images/{name}")


if __name__ == "__main__":
    main()
