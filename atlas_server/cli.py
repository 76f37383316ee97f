"""The `atlas` command: one Typer app whose sub-commands live in `atlas_server/commands/`.

Each sub-command module owns one family (tokenizer, checkpoint, serve, plugins, rag) and
exposes a Typer `app`. Errors that a user can fix are printed as one line and exit with
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
app.add_typer(serve.app, name="serve", help="Serve a checkpoint over the OpenAI-compatible API.")
app.add_typer(rag.app, name="rag")
app.add_typer(plugins.app, name="plugins", help="List installed plugins.")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
