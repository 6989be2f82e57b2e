"""Check documentation from the check's own metadata: `fmcheck explain` and docs/checks/*.md share this template."""

from __future__ import annotations

from typing import Any


def _threshold_rows(cls: Any) -> list[str]:
    rows = []
    for name, field in cls.Thresholds.model_fields.items():
        description = (field.description or "").replace("|", "\\|")
        rows.append(f"| `{name}` | {field.default!r} | {description} |")
    return rows


def _plain_template(text: str) -> str:
    """A template as prose: '{observed}' reads as 'the observed value' would be wordy; the field names say it."""
    return text.replace("{", "<").replace("}", ">")


def rule_markdown(rule: Any, cls: Any) -> str:
    """`fmcheck explain CODE`: one finding's rule, in the check's context."""
    lines = [f"# `{rule.code}` ({rule.verdict.value.upper()}): {rule.title}", "",
             f"Reported by the `{cls.id}` check ({cls.title}); `fmcheck explain {cls.id}` says what it measures.", ""]
    if rule.doc:
        lines += [rule.doc, ""]
    lines += ["## Message (its fields filled with the run's numbers)", "", f"`{rule.message}`", "", "## Fix", "",
              _plain_template(rule.fix), "",
              "## Ignoring it", "",
              f"`--ignore {rule.code}`, or `ignore = [\"{rule.code}\"]` under `[tool.fmcheck]`: the finding is then "
              "listed as ignored and counts toward no verdict or exit code.", ""]
    return "\n".join(lines)


def check_markdown(cls: Any) -> str:
    doc = cls.doc
    lines = [f"# `{cls.id}`: {cls.title}", "", cls.purpose, "", "## What it measures", "", doc.what, "",
             "## Why it matters", "", doc.why, "", "## Example of the bug", "", doc.bug_example, "", "## How to fix",
             "", doc.fix, ""]
    if doc.causes:
        lines += ["## Typical causes", ""] + [f"- {c}" for c in doc.causes] + [""]
    if cls.rules:
        lines += ["## Findings", "",
                  "Each is reported under its code; `fmcheck explain CODE` prints its doc and fix, `--ignore CODE` "
                  "(or `ignore = [...]` in the config) lists it as ignored instead of counting it.", "",
                  *(f"- `{r.code}` ({r.verdict.value.upper()}): {r.title}" for r in cls.rules), ""]
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
