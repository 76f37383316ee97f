"""PyTorch work off the event loop that does not slow the serving engine down.

Why: PyTorch runs its CPU kernels, and Atlas its C kernels, on OpenMP (GNU libgomp). Each
thread that opens a parallel region gets its own team of worker threads, kept for as long
as that thread lives. Once libgomp manages more threads than there are CPUs, its workers
stop spinning between regions and sleep instead, so every one of the hundreds of small
parallel regions in an engine step pays for a futex wake-up: a batch-16 decode step of
GPT-2 124M then took 1.39x as long on the development machine (`python bench/omp_teams.py`). A pool thread
that outlives its call, such as those of `asyncio.to_thread`, would keep a second team
alive for the rest of the process once it had embedded one query.

What it does: `run_in_fresh_thread(fn, *args)` awaits `fn(*args)` run in a new (daemon)
thread that ends with the call, taking its OpenMP team with it. What it does not do: limit how many
run at once (callers that need that bound it themselves), or help work that never leaves
the engine thread (the engine's own steps already run on one thread).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


Report = Callable[[Any, "BaseException | None"], None]


def _start(fn: Callable[..., Any], args: tuple, report: Report) -> threading.Thread:
    """Start fn(*args) on a new daemon thread that hands (value, error) to `report` and ends."""

    def target() -> None:
        value, error = None, None
        try:
            value = fn(*args)
        except BaseException as e:  # handed to whoever waits, through `report`
            error = e
        report(value, error)

    thread = threading.Thread(target=target, name="atlas-compute", daemon=True)
    thread.start()
    return thread


def call_in_fresh_thread(fn: Callable[..., T], *args: Any) -> T:
    """fn(*args) in a new thread that ends with it; blocks until it has (exceptions pass on)."""
    result: dict[str, Any] = {}
    _start(fn, args, lambda value, error: result.update(value=value, error=error)).join()
    if result["error"] is not None:
        raise result["error"]
    return result["value"]


async def run_in_fresh_thread(fn: Callable[..., T], *args: Any) -> T:
    """Await fn(*args) run in a new thread that ends with the call (see the module docstring).

    The event loop keeps serving meanwhile. The thread reports to the loop itself, with no
    executor between: `asyncio.to_thread`'s pool thread, waiting on a plugin hung in a
    request, was joined at interpreter exit and kept a server alive for as long as the
    plugin slept, long after SIGTERM and the drain. The thread is a daemon: it never does.
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def settle(value: Any, error: BaseException | None) -> None:
        if done.cancelled():  # the request went away (a disconnect, the drain's deadline)
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(value)

    def report(value: Any, error: BaseException | None) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits
            loop.call_soon_threadsafe(settle, value, error)

    thread = _start(fn, args, report)
    try:
        return await done
    finally:
        # Answered: let the thread finish ending (its OpenMP team goes with it) before the
        # caller goes on, as a join did. Abandoned (cancelled): it ends on its own.
        if done.done() and not done.cancelled():
            while thread.is_alive():
                await asyncio.sleep(0.001)
