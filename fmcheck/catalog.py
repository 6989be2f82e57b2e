"""The built-in checks' catalogue: ids, titles, purposes, finding codes and their docs, as data.

`fmcheck list` and `fmcheck explain` read it instead of importing every check (and pydantic's model machinery) just
to print names: ``scripts/gen_docs.py`` writes it from the checks' own metadata (``checks/catalog.json``, shipped in
the wheel), and tests/test_docs.py keeps it current. Nothing here imports torch, pydantic or a check.
"""

from __future__ import annotations

import json
from importlib import metadata, resources
from typing import Any, Optional

FILE = "catalog.json"


def build(registry: Any) -> dict[str, Any]:
    """The catalogue of the built-in checks in ``registry`` (the checks are imported here: this runs at build time)."""
    from .docs import check_markdown, rule_markdown

    checks = []
    for cls in registry.ordered():
        if registry.sources[cls.id] != "fmcheck":
            continue
        checks.append({
            "id": cls.id, "title": cls.title, "purpose": cls.purpose, "markdown": check_markdown(cls),
            "rules": [{"code": r.code, "verdict": r.verdict.value, "title": r.title,
                       "markdown": rule_markdown(r, cls)} for r in cls.rules],
        })
    return {"checks": checks}


def dumps(catalog: dict[str, Any]) -> str:
    return json.dumps(catalog, indent=1, ensure_ascii=False) + "\n"


def load() -> Optional[dict[str, Any]]:
    """The shipped catalogue, or None when it is missing or does not list exactly the built-in checks installed
    (a source tree whose checks changed since it was written): the caller then imports the checks."""
    try:
        catalog = json.loads(resources.files("fmcheck.checks").joinpath(FILE).read_text())
        installed = {ep.name for ep in metadata.distribution("fmcheck").entry_points if ep.group == "fmcheck.checks"}
    except (OSError, ValueError, metadata.PackageNotFoundError, ModuleNotFoundError):
        return None
    return catalog if {c["id"] for c in catalog.get("checks", [])} == installed else None


def plugins_installed() -> bool:
    """Whether a distribution other than fmcheck registers checks: their titles and codes need an import."""
    for entry_point in metadata.entry_points(group="fmcheck.checks"):
        dist = getattr(entry_point, "dist", None)
        if dist is None or dist.metadata["Name"] != "fmcheck":
            return True
    return False
