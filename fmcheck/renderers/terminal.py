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
    rows: list[tuple[Any, ...]] = [(c.id, c.title, c.purpose, registry.sources[c.id]) for c in registry.ordered()]
    rows += [(f.name, Text("not loaded", style="magenta"), f.reason, f.distribution) for f in registry.failures]
    _check_table(rows, console)


def _check_table(rows: list[tuple[Any, ...]], console: Console) -> None:
    table = Table(title="fmcheck checks", title_justify="left")
    for column in ("id", "title", "purpose", "from"):
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    console.print(table)


def code_list(registry: Any, console: Console) -> None:
    """`fmcheck list --codes`: every finding code a run can report, with its verdict and what it names."""
    rows = [(rule.code, rule.verdict.value.upper(), rule.title) for cls in registry.ordered() for rule in cls.rules]
    rows += [(cls.id, "", f"{cls.title} (the check declares no rules)") for cls in registry.ordered() if not cls.rules]
    _code_rows(rows, console)


def _code_rows(rows: list[tuple[str, str, str]], console: Console) -> None:
    """One line per code, in columns of plain text: a hundred-row Rich table costs more to lay out than the rest of
    the command."""
    width = max((len(code) for code, _, _ in rows), default=0)
    for code, verdict, title in rows:
        line = Text(code.ljust(width + 2), style="bold")
        line.append(f"{verdict:<6}", style=_VERDICT_STYLE.get(verdict, ""))
        line.append(title)
        console.print(line, soft_wrap=True)


_VERDICT_STYLE = {"FAIL": "red", "WARN": "yellow"}


def catalog_list(catalog: dict, console: Console) -> None:
    """`fmcheck list` from the catalogue of built-in checks: the same table as :func:`check_list`."""
    _check_table([(c["id"], c["title"], c["purpose"], "fmcheck") for c in catalog["checks"]], console)


def catalog_codes(catalog: dict, console: Console) -> None:
    """`fmcheck list --codes` from the catalogue: the same lines as :func:`code_list`."""
    _code_rows([(r["code"], r["verdict"].upper(), r["title"]) for c in catalog["checks"] for r in c["rules"]], console)


def markdown(text: str, console: Console) -> None:
    """`fmcheck explain`: fmcheck's own doc pages (headings, paragraphs, bullets, tables, code blocks, inline code)
    drawn with plain Rich text. rich.markdown would parse them with markdown-it and colour code with Pygments: that
    import alone takes as long as Python, typer, rich and pydantic together, for pages this simple."""
    fenced = False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            console.print(Text("    " + line, style="dim"), soft_wrap=True)
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            console.print(_inline(line[level:].strip(), "bold underline" if level == 1 else "bold"))
        elif line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= set("-: ") for c in cells):  # not the |---| separator
                console.print(Text("  ").append_text(_inline("  ".join(cells))))
        elif line.lstrip().startswith("- "):
            indent = len(line) - len(line.lstrip())
            console.print(Text(" " * indent + " • ").append_text(_inline(line.lstrip()[2:])))
        else:
            console.print(_inline(line))


def _inline(text: str, style: str = "") -> Text:
    """``code`` in cyan, **bold** in bold; the marks themselves are dropped."""
    import re

    out = Text(style=style)
    for part in re.split(r"(`[^`]+`|\*\*[^*]+\*\*)", text):
        if part.startswith("`") and part.endswith("`") and len(part) > 1:
            out.append(part[1:-1], style="cyan")
        elif part.startswith("**") and part.endswith("**") and len(part) > 3:
            out.append(part[2:-2], style="bold")
        else:
            out.append(part)
    return out