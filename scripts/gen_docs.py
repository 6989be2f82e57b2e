"""Regenerate docs/checks/<id>.md from each built-in check's own doc (`make docs`)."""

from __future__ import annotations

from pathlib import Path

from fmcheck.docs import check_markdown
from fmcheck.registry import discover

DOCS = Path(__file__).resolve().parent.parent / "docs" / "checks"


def main() -> None:
    DOCS.mkdir(parents=True, exist_ok=True)
    registry = discover()
    for cls in registry.ordered():
        if registry.sources[cls.id] == "fmcheck":
            path = DOCS / f"{cls.id}.md"
            path.write_text(check_markdown(cls) + "\n")
            print(f"wrote {path.relative_to(DOCS.parent.parent)}")


if __name__ == "__main__":
    main()
