"""`atlas plugins`: every installed plugin, its version and what it registered."""

from __future__ import annotations

import json

import typer


def plugins(
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    strict: bool = typer.Option(False, "--strict", help="Fail if any plugin cannot be loaded."),
) -> None:
    """List installed plugins (the `atlas` entry-point group) and what they registered.

    Example: atlas plugins --strict
    """
    from ..plugins import PluginError, PluginHost

    try:
        host = PluginHost(strict=strict)
    except PluginError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    rows = host.describe()
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    for p in rows:
        version = p["version"] or "-"
        typer.echo(
            f"{p['name']} {version} ({p['module']})"
            + (f"  FAILED: {p['error']}" if p["error"] else "")
        )
        for kind, names in p["registered"].items():
            if names:
                typer.echo(f"    {kind}: {', '.join(names)}")
