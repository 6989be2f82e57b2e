"""Regenerate docs/checks/<id>.md and checks/catalog.json from each built-in check's own doc (`make docs`)."""

from __future__ import annotations

from pathlib import Path

from fmcheck import catalog
from fmcheck.docs import check_markdown
from fmcheck.registry import discover

DOCS = Path(__file__).resolve().parent.parent / "docs" / "checks"
CHECKS = Path(__file__).resolve().parent.parent / "checks"


def main() -> None:
    DOCS.mkdir(parents=True, exist_ok=True)
    registry = discover()
    for cls in registry.ordered():
        if registry.sources[cls.id] == "fmcheck":
            path = DOCS / f"{cls.id}.md"
            path.write_text(check_markdown(cls) + "\n")
            print(f"wrote {path.relative_to(DOCS.parent.parent)}")
    (CHECKS / catalog.FILE).write_text(catalog.dumps(catalog.build(registry)))
    print(f"wrote checks/{catalog.FILE}")


if __name__ == "__main__":
    main()
