"""What the command line prints besides the report: its consoles, a usage error, the list of checks, a check's doc.

The CLI calls these and never imports rich itself (tests/test_layering.py)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.status import Status
from rich.table import Table
from rich.text import Text


def make_console(stderr: bool = False) -> Console:
    return Console(stderr=stderr)


def usage_error(message: str, debug: bool) -> None:
    """``fmcheck: error: <message>`` on stderr (one line, the user's text never read as markup); with ``debug``,
    the traceback of the exception being handled first."""
    console = Console(stderr=True)
    if debug:
        console.print_exception()
    console.print(Text.assemble(("fmcheck: error: ", "bold red"), message), highlight=False, soft_wrap=True)


def plain(console: Console, text: str) -> None:
    """A line of text as it is: not markup, not highlighted, not wrapped."""
    console.print(Text(text), highlight=False, soft_wrap=True)


def status(console: Console, text: str) -> Status:
    """A spinner with ``text`` while a step without progress of its own runs (a context manager)."""
    return console.status(text)


def check_list(registry: Any, console: Console) -> None:
    """`fmcheck list`: every registered check, and every plugin that failed to load, with where it comes from."""
    table = Table(title="fmcheck checks", title_justify="left")
    for column in ("id", "title", "purpose", "from"):
        table.add_column(column)
    for cls in registry.ordered():
        table.add_row(cls.id, cls.title, cls.purpose, registry.sources[cls.id])
    for failure in registry.failures:
        table.add_row(failure.name, Text("not loaded", style="magenta"), failure.reason, failure.distribution)
    console.print(table)


def code_list(registry: Any, console: Console) -> None:
    """`fmcheck list --codes`: every finding code a run can report, with its verdict and what it names."""
    table = Table(title="fmcheck finding codes", title_justify="left")
    for column in ("code", "verdict", "finding"):
        table.add_column(column)
    for cls in registry.ordered():
        for rule in cls.rules:
            table.add_row(rule.code, rule.verdict.value.upper(), rule.title)
        if not cls.rules:  # a check without rules reports under its id
            table.add_row(cls.id, "", Text(f"{cls.title} (the check declares no rules)", style="dim"))
    console.print(table)


def catalog_list(catalog: dict, console: Console) -> None:
    """`fmcheck list` from the catalogue of built-in checks: the same table as :func:`check_list`."""
    table = Table(title="fmcheck checks", title_justify="left")
    for column in ("id", "title", "purpose", "from"):
        table.add_column(column)
    for check in catalog["checks"]:
        table.add_row(check["id"], check["title"], check["purpose"], "fmcheck")
    console.print(table)


def catalog_codes(catalog: dict, console: Console) -> None:
    """`fmcheck list --codes` from the catalogue: the same table as :func:`code_list`."""
    table = Table(title="fmcheck finding codes", title_justify="left")
    for column in ("code", "verdict", "finding"):
        table.add_column(column)
    for check in catalog["checks"]:
        for rule in check["rules"]:
            table.add_row(rule["code"], rule["verdict"].upper(), rule["title"])
    console.print(table)


def markdown(text: str, console: Console) -> None:
    import re

    from rich.markdown import Markdown  # markdown-it only for `explain`: `list` stays light

    # Code blocks print as plain text: loading a Pygments lexer to colour a five-line snippet takes longer than
    # the rest of `explain` together.
    console.print(Markdown(re.sub(r"^```[\w+-]+$", "```text", text, flags=re.M)))
