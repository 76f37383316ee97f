"""Ctrl-C (or SIGTERM) during training: finish the step, save a checkpoint, say how to resume.

What it does: while a single-process run trains, the first SIGINT or SIGTERM (a
scheduler preempting the job) only sets a flag that
the loop reads after each step (the step finishes, a checkpoint is saved unless the step
already has one, and the run ends with "stopped at step N; last checkpoint DIR (step N);
resume with --resume"); a second SIGINT raises KeyboardInterrupt at once (saves are
atomic, so at worst the run resumes from the checkpoint before). Saving on the way out is
cheap next to a step of training: the trainer writes the same checkpoint every
`checkpoint_every` steps.
A Ctrl-C before the first step (while the data is read, the model built, the matmul
peak measured) stops at once with "interrupted before training started; no checkpoint was
saved" (`before_training`).
What it does not do: distributed runs (ranks would stop at different steps and wait on
each other forever); there Ctrl-C stops at once and the run resumes from the last
periodic checkpoint. Nor threads other than the main one, where Python cannot install
signal handlers.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator

NOTHING_SAVED = "interrupted before training started; no checkpoint was saved"


@contextlib.contextmanager
def before_training(report: bool = True) -> Iterator[None]:
    """Say NOTHING_SAVED (when `report`) if Ctrl-C stops the run here, then let it through:
    no loop runs yet to say where the run stopped, and the command exits 130 silently."""
    try:
        yield
    except KeyboardInterrupt:
        if report:
            print(f"\n{NOTHING_SAVED}", file=sys.stderr, flush=True)
        raise


class StopRequest:
    """Set by the first Ctrl-C or SIGTERM; the loop reads `requested` between steps."""

    def __init__(self) -> None:
        self.requested = False
        self.signal = signal.SIGINT  # which one asked: the exit status is 128 + its number


@contextlib.contextmanager
def graceful_interrupt(enabled: bool = True) -> Iterator[StopRequest]:
    stop = StopRequest()
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def on_signal(signum, frame) -> None:
        if stop.requested:
            raise KeyboardInterrupt
        stop.requested, stop.signal = True, signal.Signals(signum)
        name = "Ctrl-C" if signum == signal.SIGINT else stop.signal.name
        print(
            f"\n{name}: finishing this step and saving a checkpoint (again: stop at once)",
            file=sys.stderr,
            flush=True,
        )

    # SIGTERM is what a scheduler sends to preempt a job (SLURM, Kubernetes, torchrun
    # passing it on): the run saves and stops as for a Ctrl-C, and loses no step.
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
