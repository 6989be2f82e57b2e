"""The `fmcheck` command's entry point.

`fmcheck list`, `fmcheck list --codes` and `fmcheck explain NAME` for a built-in check or code are served from the
catalogue (fmcheck/catalog.py) without building the Typer app: Typer builds a pydantic adapter for every option it
parses, which alone costs more than the listing. Anything else, or any plugin installed, goes to the full CLI
(fmcheck/cli.py), which gives the same output.
"""

from __future__ import annotations

import sys
from typing import Optional


def main(argv: Optional[list[str]] = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if _light(args):
        return
    from .cli import main as full

    full()


def _light(args: list[str]) -> bool:
    if args not in (["list"], ["list", "--codes"]) and not (len(args) == 2 and args[0] == "explain"
                                                             and not args[1].startswith("-")):
        return False
    from . import catalog

    data = catalog.load()
    if data is None or catalog.plugins_installed():
        return False
    from .renderers.terminal import catalog_codes, catalog_list, make_console, markdown

    if args[0] == "list":
        (catalog_codes if args[1:] else catalog_list)(data, make_console())
        return True
    pages = {c["id"]: c["markdown"] for c in data["checks"]}
    pages.update({r["code"]: r["markdown"] for c in data["checks"] for r in c["rules"]})
    if args[1] not in pages:
        return False  # the full CLI says what is wrong, with a suggestion
    markdown(pages[args[1]], make_console())
    return True
