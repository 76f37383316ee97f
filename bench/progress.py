"""Progress lines for the long benchmarks: which phase runs, since when, on stderr.

A benchmark that measures for minutes must say what it is doing, or a user cannot tell a
slow machine from a hang. Each phase prints one line to stderr, flushed at once, so the
JSON (or table) on stdout stays clean for `> result.json` and pipes:

    [bench_serving  0:00:12  3/9] concurrency 4: 12 requests, 128 prompt + 64 output tokens

`ATLAS_BENCH_QUIET=1` silences them. What it does not do: bars that redraw in place (a log
file or CI output would fill with carriage returns), or timing that enters the results.

Beside it, the checks the benchmarks share for arguments that would fail only once work
has started: `check_device` (a `--device` PyTorch cannot parse, or CUDA where there is
none), `check_preset` (an unknown `--preset`), `check_fits` (arguments whose tensors would
not fit in half of this machine's memory) and `positive` (an argparse type for counts that
must be at least 1). Each refuses through `parser.error`, in
one line with exit status 2, and imports PyTorch or Atlas only when called.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

__all__ = ["Progress", "check_device", "check_fits", "check_preset", "positive"]


class Progress:
    """`progress.phase("what")` before each phase; `progress.done()` at the end."""

    def __init__(self, script: str, phases: int | None = None) -> None:
        self.name = Path(script).stem
        self.phases = phases
        self.count = 0
        self.start = time.perf_counter()
        self.quiet = os.environ.get("ATLAS_BENCH_QUIET") == "1"

    def _line(self, text: str, counted: bool) -> None:
        if self.quiet:
            return
        seconds = int(time.perf_counter() - self.start)
        clock = f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
        where = ""
        if counted:
            where = f"  {self.count}/{self.phases}" if self.phases else f"  {self.count}"
        print(f"[{self.name}  {clock}{where}] {text}", file=sys.stderr, flush=True)

    def phase(self, text: str) -> None:
        """Announce the phase that starts now."""
        self.count += 1
        self._line(text, counted=True)

    def note(self, text: str) -> None:
        """A line within a phase (a measured figure, a skipped step)."""
        self._line(text, counted=False)

    def done(self) -> None:
        self._line(f"done in {time.perf_counter() - self.start:.0f} s", counted=False)


def check_device(parser: argparse.ArgumentParser, device: str) -> None:
    """`parser.error` unless `device` names a device PyTorch can use here (cpu, cuda, cuda:N)."""
    import torch

    try:
        parsed = torch.device(device)
    except RuntimeError:
        parser.error(f"--device {device}: not a PyTorch device (e.g. cpu, cuda, cuda:1)")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {device}: no CUDA device here")
    if parsed.type == "cuda" and (parsed.index or 0) >= torch.cuda.device_count():
        parser.error(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")


def check_preset(parser: argparse.ArgumentParser, name: str) -> None:
    """`parser.error` unless `name` is a model preset (configs/models/NAME.toml) that loads."""
    from atlas_server.model import ConfigError, load_preset

    try:
        load_preset(name)
    except ConfigError as e:
        parser.error(str(e))


def positive(text: str) -> int:
    """argparse type: an integer of at least 1 (a count of rows, steps or rounds)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def check_fits(parser: argparse.ArgumentParser, nbytes: int, what: str) -> None:
    """`parser.error` when `nbytes` of tensors would take more than half of this machine's
    memory: a one-line refusal before any work, not an allocator traceback minutes in."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not a POSIX system: cannot tell
        return
    if nbytes > memory // 2:
        parser.error(
            f"{what} would take {nbytes / 2**30:.1f} GiB, more than half of this machine's"
            f" {memory / 2**30:.1f} GiB"
        )
