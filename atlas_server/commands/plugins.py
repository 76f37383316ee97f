"""`atlas plugins`: every installed plugin, its version and what it registered.

A misspelled hook or a name two plugins claim stops every other command; here each is shown
on the plugin at fault, beside everything else installed, then said as `error:` lines, and
the exit status is 1.
"""

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
        # diagnose: a misspelled hook or a name two plugins claim is shown on the plugin at
        # fault, beside everything else installed, rather than stopping the listing.
        host = PluginHost(strict=strict, diagnose=True)
    except PluginError as e:  # --strict: a plugin that fails to load or register
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    rows = host.describe()
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
    else:
        for p in rows:
            version = p["version"] or "-"
            typer.echo(
                f"{p['name']} {version} ({p['module']})"
                + (f"  FAILED: {p['error']}" if p["error"] else "")
            )
            for kind, names in p["registered"].items():
                if names:
                    typer.echo(f"    {kind}: {', '.join(names)}")
    for problem in host.problems:  # what stops every other command until it is fixed
        typer.echo(f"error: {problem}", err=True)
    if host.problems:
        raise typer.Exit(1)
