"""Check documentation from the check's own metadata: `fmcheck explain` and docs/checks/*.md share this template."""

from __future__ import annotations

from typing import Any


def _threshold_rows(cls: Any) -> list[str]:
    rows = []
    for name, field in cls.Thresholds.model_fields.items():
        description = (field.description or "").replace("|", "\\|")
        rows.append(f"| `{name}` | {field.default!r} | {description} |")
    return rows


def check_markdown(cls: Any) -> str:
    doc = cls.doc
    lines = [f"# `{cls.id}`: {cls.title}", "", cls.purpose, "", "## What it measures", "", doc.what, "",
             "## Why it matters", "", doc.why, "", "## Example of the bug", "", doc.bug_example, "", "## How to fix",
             "", doc.fix, ""]
    if doc.causes:
        lines += ["## Typical causes", ""] + [f"- {c}" for c in doc.causes] + [""]
    rows = _threshold_rows(cls)
    if rows:
        lines += ["## Thresholds", "",
                  f"Override with `--set {cls.id}.NAME=VALUE`, a `--config` file, or `[tool.fmcheck.{cls.id}]`.", "",
                  "| name | default | meaning |", "|---|---|---|", *rows, ""]
    if doc.blind_spots:
        lines += ["## Blind spots", ""] + [f"- {b}" for b in doc.blind_spots] + [""]
    needs = [f"pipeline field `{f}`" for f in cls.requires] + [f"step output `{k}`" for k in cls.requires_outputs]
    if needs:
        lines += ["## Needs", "", "Skipped, with the reason, without: " + ", ".join(needs) + ".", ""]
    return "\n".join(lines)
