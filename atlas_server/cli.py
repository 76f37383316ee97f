"""The `atlas` command: one Typer app whose sub-commands live in `atlas_server/commands/`.

Each sub-command module owns one family: tokenizer, checkpoint and rag expose a Typer
`app` of subcommands; serve and plugins are single commands (a function each). Errors that a user can fix are printed as one line and exit with
status 1 (see `commands/_common.py`), never as a traceback.
"""

from __future__ import annotations

import typer

from .commands import checkpoint, plugins, rag, serve, tokenizer

app = typer.Typer(
    name="atlas",
    help="Atlas: train, serve and evaluate small language models built from first principles.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(tokenizer.app, name="tokenizer")
app.add_typer(checkpoint.app, name="checkpoint")
app.command("serve")(serve.serve)  # commands, not groups: they have no subcommands
app.add_typer(rag.app, name="rag")
app.command("plugins")(plugins.plugins)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
