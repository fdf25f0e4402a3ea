"""``ldt plugins``: the installed plugins and the parts they register."""

from __future__ import annotations

import typer


def plugins(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
    """List installed plugins and the parts they register."""
    import json

    from rich.console import Console
    from rich.table import Table

    from lowdose_toolkit.core.plugin_manager import get_plugin_manager, get_registry

    registry = get_registry()
    failures = get_plugin_manager().failures
    rows = [
        {"kind": e.kind, "name": e.name, "plugin": e.plugin, "version": e.version, "doc": e.doc}
        for e in registry.entries()
    ]
    if as_json:
        typer.echo(json.dumps({"parts": rows, "failures": [f.__dict__ for f in failures]}, indent=2))
        return
    table = Table(title="lowdose-toolkit parts")
    for col in ("kind", "name", "plugin", "version", "doc"):
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(*(row[c] for c in ("kind", "name", "plugin", "version", "doc")))
    console = Console()
    console.print(table)
    for failure in failures:
        console.print(f"[yellow]warning:[/] {failure}")
