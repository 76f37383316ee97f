"""The console scripts' entry points: `atlas`, `atlas-train` and `atlas-eval`.

What it does: imports each CLI only once the script has started, so that a Ctrl-C while
PyTorch is still importing (a second or two) ends with one line and exit status 130, as a
Ctrl-C anywhere else in these commands does, rather than a traceback through torch's
import machinery. What it does not do: parse arguments or handle Ctrl-C inside a command
(each CLI does that itself, saying what was saved).
"""

from __future__ import annotations

import importlib
import sys

INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a command stopped by Ctrl-C


def _run(module: str) -> None:
    try:
        main = importlib.import_module(module).main
        main()
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(INTERRUPTED)


def atlas() -> None:
    _run("atlas_server.cli")


def atlas_train() -> None:
    _run("trainer.cli")


def atlas_eval() -> None:
    _run("eval_suites.cli")
