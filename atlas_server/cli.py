"""The `atlas` command: one Typer app whose sub-commands live in `atlas_server/commands/`.

Each sub-command module owns one family: tokenizer, checkpoint and rag expose a Typer
`app` of subcommands; serve and plugins are single commands (a function each). Errors that a user can fix are printed as one line and exit with
status 1 (see `commands/_common.py`), never as a traceback.

OpenMP wait policy: the command sets `OMP_WAIT_POLICY=PASSIVE` unless the environment
already sets it, before anything imports PyTorch (OpenMP reads it once, when it loads).
Idle OpenMP threads then sleep at once instead of spinning for a while after every
parallel region; spinning threads take the CPU from the server's event loop and from
everything else on a small or shared machine. docs/architecture.md gives the measurements
behind the choice; `OMP_WAIT_POLICY=ACTIVE atlas serve ...` restores spinning.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import typer  # noqa: E402

from .commands import checkpoint, plugins, rag, serve, tokenizer  # noqa: E402

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
    from .commands._common import run_app

    run_app(app)


if __name__ == "__main__":
    main()
