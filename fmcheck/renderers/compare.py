"""`fmcheck compare`: two fingerprints side by side, and whether their numbers are comparable."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..fingerprint import Comparison, FieldComparison


def format_fingerprint_value(name: str, value: Any) -> str:
    if value is None:
        return "-"
    if name.endswith("sha256") and isinstance(value, str):
        return value[:16] + "…"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list):
        shown = ", ".join(format_fingerprint_value("", v) for v in value[:8])
        return f"[{shown}{', …' if len(value) > 8 else ''}]"
    return str(value)


def _status(row: FieldComparison) -> Text:
    if not row.differs:
        return Text("same", style="dim")
    style = "bold red" if row.decisive else "yellow"
    note = "" if row.decisive else " (not decisive)"
    return Text(row.status + note, style=style)


def comparison_table(comparison: Comparison, name_a: str, name_b: str, show_all: bool = False) -> Table:
    # Narrow terminals wrap (fold) every cell, never truncate it: two field names cut to the same prefix
    # ("vae.config.latents_…") would make their rows indistinguishable. The report paths are in the title, not in
    # the column headers, where a long path broke the header over several lines.
    table = Table(title=f"latent-space fingerprints\nA: {name_a}\nB: {name_b}", title_justify="left",
                  show_lines=False)
    table.add_column("field", style="bold", overflow="fold")
    table.add_column("A", overflow="fold")
    table.add_column("B", overflow="fold")
    table.add_column("", overflow="fold")
    rows = comparison.rows if show_all else comparison.differences
    for row in sorted(rows, key=lambda r: (not (r.differs and r.decisive), not r.differs, r.field)):
        table.add_row(row.field, format_fingerprint_value(row.field, row.a), format_fingerprint_value(row.field, row.b),
                      _status(row))
    return table


def render_comparison(comparison: Comparison, name_a: str, name_b: str, console: Console,
                      show_all: bool = False) -> None:
    same = sum(1 for r in comparison.rows if not r.differs)
    if comparison.differences or show_all:
        console.print(comparison_table(comparison, name_a, name_b, show_all))
    if comparison.comparable:
        extra = ""
        if comparison.differences:
            extra = f"; differs only in {', '.join(r.field for r in comparison.differences)} (not decisive)"
        console.print(Text.assemble(("comparable", "bold green"), ": same VAE, scaling, latent shape and resolution "
                                    f"({same} fields identical{extra})"))
    else:
        fields = ", ".join(r.field for r in comparison.blocking)
        console.print(Text.assemble(("not comparable", "bold red"), f": the reports differ in {fields}. Their numbers "
                                    "were measured in different latent spaces; compare metrics only under the same "
                                    "VAE, scaling, latent shape and resolution."))
