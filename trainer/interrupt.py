"""Ctrl-C (or SIGTERM) during training: finish the step, save a checkpoint, say how to resume.

What it does: while a run trains, the first SIGINT or SIGTERM (a scheduler preempting the
job) only sets a flag that the loop reads after each step (`StopRequest.after_step`): the
step finishes, a checkpoint is saved unless the step already has one, and the run ends with
"stopped at step N; last checkpoint DIR (step N); resume with --resume" and exit status
128 + the signal's number. A second signal raises KeyboardInterrupt at once (saves are
atomic, so at worst the run resumes from the checkpoint before). Saving on the way out is
cheap next to a step of training: the trainer writes the same checkpoint every
`checkpoint_every` steps.

A distributed run (torchrun) stops the same way, all ranks after the same step
(`StopVote`): a signal reaches the ranks at different times, or only some of them, and a
rank that stopped alone would leave the others waiting in a collective. The ranks agree
one step late, so they stop one or two steps after the first signal, save as a periodic
checkpoint does, and exit with the same status; only rank 0 speaks. There a second signal
stops at once only REPEAT_WINDOW_S or more after the first: SLURM's `scancel` can signal
torchrun and the workers alike (every process of the job step's cgroup) and torchrun
passes the signal on, so a worker can get one stop twice within milliseconds. (torchrun
starts each worker in a session of its own, so a terminal's Ctrl-C reaches only torchrun,
which passes SIGINT on once; a second Ctrl-C makes it send SIGTERM.)

A Ctrl-C before the first step (while the data is read, the model built, the matmul
peak measured) stops at once with "interrupted before training started; no checkpoint was
saved" (`before_training`).
What it does not do: outwait a launcher. torchrun SIGKILLs the workers that have not exited
30 s after it passed a signal on (`--shutdown-timeout`, TORCH_ELASTIC_SHUTDOWN_TIMEOUT), as
SLURM (KillWait) and Kubernetes (terminationGracePeriodSeconds) do by default; a stop whose
two steps and save take longer is cut off (the save is atomic) and the run resumes from the
last periodic checkpoint. Nor threads other than the main one, where Python cannot install
signal handlers.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

NOTHING_SAVED = "interrupted before training started; no checkpoint was saved"

# A distributed run's second signal within this many seconds of the first is the same stop
# passed on twice (see the module docstring); a person's second Ctrl-C comes later.
REPEAT_WINDOW_S = 2.0


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


class StopVote:
    """The ranks' agreement on the step to stop after: after each step every rank puts the
    signal it got (its number, 0 for none) into an all_reduce(MAX) and reads the result of
    the one it started after the step before. Every rank reads the same results at the
    same calls, so all stop after the same step, one step after the signal went in, and
    with the same signal (SIGTERM over SIGINT).

    Why one step late, asynchronously, on a gloo group of its own: the result is there long
    before it is read, so the wait costs nothing, and the flag never touches a GPU: reading
    back an NCCL all_reduce every step would be a host sync per step, which the loop avoids
    (it reads the losses every `log_every` steps). Voting only at those log steps, where
    the loop syncs anyway, would cost as little, but a stop could then wait `log_every`
    steps, past a launcher's 30 s.
    Every rank must make the same calls: the constructor (it makes the group), `agreed`
    after every step, `close` after the loop."""

    def __init__(self) -> None:
        import torch  # not at the top: the CLI imports this module before torch
        import torch.distributed as dist

        self.dist = dist
        self.group = dist.new_group(backend="gloo")
        self.flag = torch.zeros(1, dtype=torch.int32)
        self.pending: Any = None  # the all_reduce in flight
        self.stopped = False

    def agreed(self, local: int) -> int:
        """The largest signal number a rank gave at the call before (0: go on); sends
        `local` for the next call unless the ranks stop now."""
        if self.pending is not None:
            self.pending.wait()
            self.pending = None
            if result := int(self.flag):
                self.stopped = True
                return result
        self.flag.fill_(local)
        self.pending = self.dist.all_reduce(
            self.flag, op=self.dist.ReduceOp.MAX, group=self.group, async_op=True
        )
        return 0

    def close(self) -> None:
        """After the loop: the last vote is collected, and after a stop the ranks leave
        together. Rank 0 may still be writing the checkpoint, and torchrun stops every
        worker (SIGTERM) as soon as one exits with a status other than 0."""
        if self.pending is not None:
            self.pending.wait()
            self.pending = None
        if self.stopped:
            self.dist.barrier(group=self.group)


class StopRequest:
    """Set by the first Ctrl-C or SIGTERM; the loop asks `after_step()` after each step."""

    def __init__(self, vote: StopVote | None = None, announce: bool = True) -> None:
        self.requested = False
        self.signal = signal.SIGINT  # which one asked: the exit status is 128 + its number
        self.at = 0.0  # when (time.monotonic())
        self.vote = vote
        self.announce = announce

    def after_step(self) -> bool:
        """Whether the run stops now: on its own, when asked; in a distributed run, when the
        ranks agree (the same answer on every rank)."""
        if self.vote is None:
            return self.requested
        agreed = self.vote.agreed(int(self.signal) if self.requested else 0)
        if not agreed:
            return False
        if not self.requested:  # another rank was signalled: from now on this one stops too
            self.requested, self.at = True, time.monotonic()
            if self.announce:
                name = signal.Signals(agreed).name
                _say(f"{name} on another rank: every rank stops after this step and saves")
        self.signal = signal.Signals(agreed)  # every rank exits with the same status
        return True


def _say(message: str) -> None:
    print(f"\n{message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def graceful_interrupt(distributed: bool = False, announce: bool = True) -> Iterator[StopRequest]:
    """Handle SIGINT and SIGTERM as a request to stop between steps (the module docstring).
    `distributed`: more than one rank, each of which must enter here at the same point
    (the vote makes a process group); `announce`: this process says when a signal came
    (rank 0)."""
    stop = StopRequest(StopVote() if distributed else None, announce)
    repeat_window = REPEAT_WINDOW_S if distributed else 0.0

    def on_signal(signum, frame) -> None:
        now = time.monotonic()
        if stop.requested:
            if now - stop.at < repeat_window:
                return  # the same stop, passed on by a launcher as well
            raise KeyboardInterrupt
        stop.requested, stop.signal, stop.at = True, signal.Signals(signum), now
        if not announce:
            return
        name = "Ctrl-C" if signum == signal.SIGINT else stop.signal.name
        if distributed:
            again = f"again, {REPEAT_WINDOW_S:g} s or more later: stop at once"
            _say(f"{name}: every rank stops within two steps and saves a checkpoint ({again})")
        else:
            _say(f"{name}: finishing this step and saving a checkpoint (again: stop at once)")

    # SIGTERM is what a scheduler sends to preempt a job (SLURM, Kubernetes, torchrun
    # passing it on): the run saves and stops as for a Ctrl-C, and loses no step.
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
        if stop.vote is not None:  # not after an error: the other ranks may be gone
            stop.vote.close()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
