"""Progress bars that are bars on a terminal and plain lines in a log file.

What it does: `progress_bar(...)` takes tqdm's arguments and returns a tqdm bar. On a
terminal (or in a notebook, through `tqdm.autonotebook`) it is tqdm's own bar. Written to a file
or a pipe (nohup, a batch job, CI, `scripts/serve.sh`'s log) a tqdm bar is a stream of
carriage-return frames, hundreds in one line of the log; there each refresh becomes one
plain line instead, at most every `LOG_INTERVAL_S` seconds, and the final state is
written once when the bar closes. The training loop follows the same rule with its own
step lines (trainer/loop.py).
What it does not do: decide whether a bar is shown at all (`disable=` stays the caller's).
"""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm

LOG_INTERVAL_S = 30.0  # a log gets a line this often at most (a terminal bar: 0.1 s)


class _Lines:
    """A file for tqdm that writes each refresh of the bar as a line of its own."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        # tqdm writes "\r" + the bar (+ padding), a clearing "\r   \r", and "\n" at close;
        # nested bars move the cursor up with ESC[A.
        line = text.replace("\x1b[A", "").replace("\r", "").strip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


def _is_terminal(stream: Any) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def progress_bar(iterable: Any = None, **kwargs: Any) -> tqdm:
    """tqdm(iterable, **kwargs), as lines where its stream (`file`, default stderr) is no
    terminal (see the module docstring)."""
    from tqdm.autonotebook import tqdm as auto_tqdm  # std tqdm outside a notebook

    if auto_tqdm is not tqdm:  # a notebook: its widget, which is no stream of frames
        return auto_tqdm(iterable, **kwargs)
    stream = kwargs.pop("file", None) or sys.stderr
    if _is_terminal(stream):
        return tqdm(iterable, file=stream, **kwargs)
    kwargs.setdefault("mininterval", LOG_INTERVAL_S)
    kwargs.setdefault("ncols", 100)  # no terminal to measure; a bar of a usual width
    kwargs["leave"] = True  # a bar that clears itself at the end leaves a log no last line
    return tqdm(iterable, file=_Lines(stream), **kwargs)
