"""The documentation says what the code does: generated pages are current, and documented names exist."""

from __future__ import annotations

import re

from conftest import ROOT
from fmcheck.docs import check_markdown
from fmcheck.registry import discover


def test_every_builtin_check_has_its_current_page_in_docs_checks():
    """docs/checks/<id>.md is `python scripts/gen_docs.py` output: one page per built-in check, none stale."""
    registry = discover()
    builtin = [cls for cls in registry.ordered() if registry.sources[cls.id] == "fmcheck"]
    assert builtin
    for cls in builtin:
        page = ROOT / "docs" / "checks" / f"{cls.id}.md"
        assert page.exists(), f"{page.relative_to(ROOT)} is missing: run python scripts/gen_docs.py"
        assert page.read_text() == check_markdown(cls) + "\n", \
            f"{page.relative_to(ROOT)} is stale: run python scripts/gen_docs.py"


def test_the_catalogue_list_and_explain_read_is_current():
    """checks/catalog.json is `python scripts/gen_docs.py` output: the built-in checks' ids, titles and codes."""
    import json

    from fmcheck import catalog

    written = json.loads((ROOT / "checks" / catalog.FILE).read_text())
    assert written == json.loads(catalog.dumps(catalog.build(discover()))), \
        "checks/catalog.json is stale: run python scripts/gen_docs.py"


def test_the_context_methods_plugins_md_names_exist():
    import inspect

    from fmcheck.context import Context

    text = (ROOT / "docs" / "plugins.md").read_text()
    named = set(re.findall(r"`ctx\.([a-z_]+)", text))
    assert named, "plugins.md documents no ctx method"
    attributes = set(re.findall(r"self\.([a-z_]+)\s*[:=]", inspect.getsource(Context.__init__)))
    missing = sorted(name for name in named if not hasattr(Context, name) and name not in attributes)
    assert not missing, missing
