"""Console reports (rich tables) shared by the commands."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def print_prepare_report(reports, output_dir, console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title=f"metasft prepare → {output_dir}")
    for column in ("task", "split", "read", "dropped", "support", "query"):
        table.add_column(column, justify="left" if column in ("task", "split", "dropped") else "right")
    for r in reports:
        dropped = ", ".join(f"{n} {why}" for why, n in r.dropped.items()) or "0"
        table.add_row(r.name, {"test": "held-out"}.get(r.split, r.split), str(r.read), dropped, str(r.support), str(r.query))
    console.print(table)
    for r in reports:
        for warning in r.warnings:
            console.print(f"[yellow]warning[/yellow]: task {r.name!r}: {warning}")
