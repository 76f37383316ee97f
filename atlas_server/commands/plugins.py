"""`atlas plugins`: every installed plugin, its version and what it registered.

A misspelled hook or a name two plugins claim stops every other command; here each is shown
on the plugin at fault, beside everything else installed, then said as `error:` lines, and
the exit status is 1. A plugin named by ATLAS_DISABLE_PLUGINS (or, with `--config`, by
the server config's `[plugins] disable`) is listed as disabled; a name there that no
plugin has is an `error:` line too.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer


def plugins(
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    strict: bool = typer.Option(False, "--strict", help="Fail if any plugin cannot be loaded."),
    config: Path = typer.Option(
        None,
        "--config",
        help="Server config TOML: list the plugins its \\[plugins] disable leaves out as "
        "disabled, as `atlas serve` does (ATLAS_DISABLE_PLUGINS applies either way).",
    ),
) -> None:
    """List installed plugins (the `atlas` entry-point group) and what they registered.

    Example: atlas plugins --strict
    """
    from ..config import ConfigFileError, load_config
    from ..plugins import PluginError, PluginHost, disabled_names
    from ._common import user_errors

    with user_errors(ConfigFileError):
        configured = load_config(config, []).plugins.disable if config else []
    try:
        # diagnose: a misspelled hook or a name two plugins claim is shown on the plugin at
        # fault, beside everything else installed, rather than stopping the listing.
        host = PluginHost(strict=strict, diagnose=True, disable=disabled_names(configured))
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
                + ("  disabled" if p["disabled"] else "")
            )
            for kind, names in p["registered"].items():
                if names:
                    typer.echo(f"    {kind}: {', '.join(names)}")
    for problem in host.problems:  # what stops every other command until it is fixed
        typer.echo(f"error: {problem}", err=True)
    if host.problems:
        raise typer.Exit(1)
