"""PyTorch work off the event loop leaves no thread behind (atlas_server/compute_threads.py).

A thread that outlives its PyTorch call keeps an OpenMP team, which slows every step of
the serving engine (bench/omp_teams.py); these tests check that the helpers' threads,
and their OpenMP workers, are gone once the call returns, where a pool's are not.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from atlas_server.compute_threads import call_in_fresh_thread, run_in_fresh_thread

needs_proc = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="counts threads in /proc/self/task"
)


def threads() -> set[str]:
    """The process's thread ids. Compared as sets, not counted: another test's thread may
    end meanwhile (a server shutting down), which a count would mistake for ours."""
    return set(os.listdir("/proc/self/task"))


def parallel_work() -> set[str]:
    """One PyTorch parallel region (4M elements is far above its grain size); returns the
    process's threads while it is still running."""
    torch.ones(2**22).mul_(2.0)
    return threads()


def started_since(before: set[str], settle_s: float = 10.0) -> set[str]:
    """Threads started since `before` that are still alive, once ended ones are reaped
    (waits up to `settle_s`, generous for a loaded machine, only while some remain)."""
    deadline = time.monotonic() + settle_s
    while (left := threads() - before) and time.monotonic() < deadline:
        time.sleep(0.02)
    return left


def test_results_and_exceptions_come_back():
    assert call_in_fresh_thread(lambda a, b: a + b, 2, 3) == 5
    assert asyncio.run(run_in_fresh_thread(lambda a, b: a * b, 4, 5)) == 20

    def fail():
        raise KeyError("missing")

    with pytest.raises(KeyError, match="missing"):
        call_in_fresh_thread(fail)
    with pytest.raises(KeyError, match="missing"):
        asyncio.run(run_in_fresh_thread(fail))


async def test_the_event_loop_keeps_running_meanwhile():
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    task = asyncio.create_task(ticker())
    await run_in_fresh_thread(time.sleep, 0.2)
    task.cancel()
    assert ticks >= 5


@pytest.fixture
def two_torch_threads():
    """An OpenMP team needs at least two threads (one machine core still runs two)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


@needs_proc
def test_no_thread_outlives_the_call(two_torch_threads):
    before = threads()
    during = asyncio.run(run_in_fresh_thread(parallel_work))
    assert len(during - before) >= 2  # the call's thread and its OpenMP worker, while it ran
    assert started_since(before) == set()
    assert len(call_in_fresh_thread(parallel_work) - before) >= 2
    assert started_since(before) == set()
    # What the helpers avoid: a pool thread keeps its OpenMP team after the call.
    with ThreadPoolExecutor(1) as pool:
        pool.submit(parallel_work).result()
        assert len(started_since(before, settle_s=0.5)) >= 2


def test_a_hung_call_does_not_keep_the_process_alive_at_exit():
    """A plugin hung in a request kept `atlas serve` running for as long as it slept (96 s
    after SIGTERM): `asyncio.to_thread`'s pool thread waited on it, and the pool is joined
    at interpreter exit. Abandoned (the request cancelled), the call must not hold the exit."""
    import subprocess

    script = (
        "import asyncio, time\n"
        "from atlas_server.compute_threads import run_in_fresh_thread\n"
        "async def main():\n"
        "    task = asyncio.ensure_future(run_in_fresh_thread(time.sleep, 120))\n"
        "    await asyncio.sleep(0.2)\n"
        "    task.cancel()\n"
        "asyncio.run(main())\n"
        "print('exiting')\n"
    )
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=100
    )
    assert done.returncode == 0 and "exiting" in done.stdout, done.stderr
    assert time.monotonic() - start < 60  # not the 120 s the call sleeps
