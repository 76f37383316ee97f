"""The `atlas` command: one Typer app whose sub-commands live in `atlas_server/commands/`.

Each sub-command module owns one family: tokenizer, checkpoint and rag expose a Typer
`app` of subcommands; serve and plugins are single commands (a function each). Errors that a user can fix are printed as one line and exit with
status 1 (see `commands/_common.py`), never as a traceback.

OpenMP wait policy: unless the environment sets `OMP_WAIT_POLICY` or `GOMP_SPINCOUNT`, the
command sets `OMP_WAIT_POLICY=PASSIVE` and `GOMP_SPINCOUNT=10000`, before anything imports
PyTorch (OpenMP reads them once, when it loads). Idle OpenMP threads then spin for about
0.1 ms (GNU OpenMP, which PyTorch's Linux wheels use: an explicit spin count wins over the
policy) or not at all (other runtimes), then sleep, instead of spinning for milliseconds
after every parallel region: spinning threads take the CPU from the server's event loop and
from everything else on a small or shared machine. The short spin keeps the barriers inside
a decode step (the one-call step has several per layer) from sleeping and waking each time,
which PASSIVE alone did: 1.1x the HTTP throughput at one stream, a third off an 8-bit
one-sequence step on a quiet machine, and the same as PASSIVE beside busy processes
(docs/benchmarks.md, "The OpenMP wait policy"). `OMP_WAIT_POLICY=ACTIVE atlas serve ...`
restores spinning.
"""

from __future__ import annotations

import os

if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    os.environ["GOMP_SPINCOUNT"] = "10000"

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
