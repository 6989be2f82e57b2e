"""Run every built-in check on every fixture and print the finding codes each fires; ``--write`` puts them into the
fixtures' EXPECT (a bug fixture's codes replace its per-check verdicts; "pass" entries stay).

    .venv/bin/python scripts/fixture_codes.py [--write] [NAME_SUBSTRING ...]

Read its output before writing: a code on a fixture that does not plant that cause is a double report or a stray
warning to fix in the check, not to write down.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fixtures.catalog import checks_to_run, discover, reported  # noqa: E402
from fmcheck.config import Settings  # noqa: E402
from fmcheck.contract import load_pipeline  # noqa: E402
from fmcheck.registry import discover as discover_checks  # noqa: E402
from fmcheck.runner import run  # noqa: E402


def main(argv: list[str]) -> None:
    write = "--write" in argv
    names = [a for a in argv if not a.startswith("--")]
    registry = discover_checks()
    builtin = [c.id for c in registry.ordered() if registry.sources[c.id] == "fmcheck"]
    for fixture in discover():
        if fixture.skip or (names and not any(n in fixture.name for n in names)):
            continue
        report = run(load_pipeline(fixture.spec), Settings(), only=checks_to_run(fixture, builtin),
                     pipeline_name=fixture.spec)
        codes = reported(report)
        verdicts = {c.id: c.verdict.value for c in report.checks}
        changed = [f"{k}: expected {v}, got {verdicts.get(k)}" for k, v in fixture.expect.items()
                   if "." not in k and verdicts.get(k) != v]
        print(f"{fixture.name}: {codes}" + (f"   CHECK VERDICTS DIFFER: {changed}" if changed else ""), flush=True)
        if write and not fixture.correct:
            _write(fixture, codes, {k: v for k, v in fixture.expect.items() if "." not in k and v == "pass"})


def _write(fixture, codes: dict[str, str], keep: dict[str, str]) -> None:
    path = ROOT / (fixture.module.replace(".", "/") + ".py")
    if not path.exists():
        path = ROOT / fixture.module.replace(".", "/") / "__init__.py"
    text = path.read_text()
    line = "EXPECT = {" + ", ".join(f'"{k}": "{v}"' for k, v in {**codes, **keep}.items()) + "}"
    new, count = re.subn(r"^EXPECT = \{.*\}$", line, text, count=1, flags=re.M)
    if count == 1:
        path.write_text(new)


if __name__ == "__main__":
    main(sys.argv[1:])
