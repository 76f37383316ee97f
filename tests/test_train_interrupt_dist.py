"""Ctrl-C and SIGTERM in a distributed run: every rank stops after the same step, one
checkpoint of it is saved, and --resume continues bit for bit (trainer/interrupt.py).

The runs are 2 CPU processes over gloo, started by hand (RANK, WORLD_SIZE... as torchrun
sets them: each rank's exit status and output can be checked) or by torchrun (a terminal's
Ctrl-C reaches it, not the workers). Each waits for a logged step before it signals, with
generous deadlines: the machine may be loaded.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import test_train
import torch

import trainer.interrupt
from trainer.interrupt import REPEAT_WINDOW_S, graceful_interrupt
from trainer.state import list_checkpoints, load_training_checkpoint

# test_train's fixtures: a corpus, its tokenizer and the prepared data (once per module).
corpus, tokenizer_file, data_dir = test_train.corpus, test_train.tokenizer_file, test_train.data_dir
ROOT = Path(__file__).resolve().parent.parent
DEADLINE_S = 120  # for a step to be logged, a run to end: far above an idle machine's seconds
STOPPED = re.compile(
    r"stopped at step (\d+); last checkpoint (\S+) \(step (\d+)\); resume with --resume"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_args(data_dir: Path, out: Path, *extra: str) -> list[str]:
    """`atlas-train train` options: a tiny model, a constant learning rate (max_steps can
    change on resume), a step logged as a line every step, no periodic checkpoint."""
    sets = [
        f'data.path="{data_dir}"', f'run.out_dir="{out}"', 'model.preset="gpt2-tiny"',
        "data.seq_len=32", "data.micro_batch=2", "data.grad_accum=2", "schedule.kind=constant",
        "schedule.max_steps=100000", "schedule.warmup_steps=3", "run.eval_every=100000",
        "run.eval_batches=2", "run.checkpoint_every=100000", "run.log_every=1", "run.threads=1",
        "run.sample_tokens=0", "run.tensorboard=false", "model.overrides={dropout = 0.1}",
        *extra,
    ]  # fmt: skip
    return ["train", *[word for item in sets for word in ("--set", item)]]


class Ranks:
    """Two ranks of `atlas-train`, started as torchrun starts them; each writes its stderr
    to a file (a pipe left unread could block it)."""

    def __init__(self, logs: Path, args: list[str]) -> None:
        logs.mkdir(parents=True, exist_ok=True)
        port, self.logs, self.procs = free_port(), [], []
        for rank in range(2):
            env = {
                **os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            }  # fmt: skip
            self.logs.append(logs / f"rank{rank}.txt")
            with open(self.logs[-1], "w") as stderr:
                self.procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "trainer.cli", *args],
                        cwd=ROOT,
                        env=env,
                        stdout=subprocess.DEVNULL,
                        stderr=stderr,
                    )  # fmt: skip
                )

    def output(self, rank: int) -> str:
        return self.logs[rank].read_text()

    def wait_for(self, text: str) -> None:
        """Until rank 0 has written `text`."""
        deadline = time.monotonic() + DEADLINE_S
        while text not in self.output(0):
            for p in self.procs:
                assert p.poll() is None, self.tails()
            assert time.monotonic() < deadline, f"no {text!r} in {DEADLINE_S} s: {self.tails()}"
            time.sleep(0.1)

    def wait(self) -> list[int]:
        try:
            for p in self.procs:
                p.wait(timeout=DEADLINE_S)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"a rank still runs {DEADLINE_S} s on: {self.tails()}") from None
        return [p.returncode for p in self.procs]

    def kill(self) -> None:
        for p in self.procs:
            p.kill()
            p.wait()

    def tails(self) -> str:
        return "".join(f"\n--- rank {r}:\n{self.output(r)[-3000:]}" for r in range(2))


def run_to_the_end(*runs: tuple[Path, list[str]]) -> list[Ranks]:
    """Runs side by side (logs folder, options), each to its end."""
    started = [Ranks(logs, args) for logs, args in runs]
    try:
        for ranks in started:
            assert ranks.wait() == [0, 0], ranks.tails()
    finally:
        for ranks in started:
            ranks.kill()
    return started


def stopped_step(err: str, out: Path) -> int:
    """The step in rank 0's "stopped at step N ..." line, checked against the checkpoint:
    the only one in the run folder, of that step, complete."""
    match = STOPPED.search(err)
    assert match, err[-3000:]
    step = int(match.group(1))
    assert int(match.group(3)) == step
    assert Path(match.group(2)) == out / "checkpoints" / f"step_{step:06d}"
    assert [p.name for p in list_checkpoints(out)] == [f"step_{step:06d}"]
    state = json.loads(
        (out / "checkpoints" / f"step_{step:06d}" / "trainer_state.json").read_text()
    )
    assert state["step"] == step and state["world_size"] == 2
    return step


def losses(err: str) -> dict[int, str]:
    """The losses rank 0 logged, by step (4 decimals)."""
    return {int(s): loss for s, loss in re.findall(r"step (\d+)/\d+ \| loss (\S+)", err)}


# --- the ranks' agreement ---------------------------------------------------------------------
VOTE_SCRIPT = textwrap.dedent(
    """
    import json, signal, sys
    import torch.distributed as dist
    from trainer.interrupt import StopVote

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    # The call at which each rank was signalled, and with what (one, both, none).
    plan = json.loads(sys.argv[1])[rank]
    vote, answers = StopVote(), []
    for call in range(8):
        local = plan[1] if plan and call >= plan[0] else 0
        answers.append(vote.agreed(local))
        if answers[-1]:
            break
    vote.close()
    print(json.dumps(answers))
    dist.destroy_process_group()
    """
)


@pytest.mark.parametrize(
    ("plan", "expected"),
    [
        # Only rank 1 is signalled, at its 3rd call: both stop at the 4th, with its signal.
        ([None, [2, 15]], [0, 0, 0, 15]),
        # Ctrl-C on rank 0, SIGTERM on rank 1, at the same call: SIGTERM's 15 (exit 143).
        ([[1, 2], [1, 15]], [0, 0, 15]),
    ],
    ids=["one-rank", "both-ranks"],
)
def test_ranks_stop_at_the_same_call_one_step_after_the_first_signal(tmp_path, plan, expected):
    """The vote reads the all_reduce started one call before: every rank gets the same
    answer at the same call, the largest signal number sent."""
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", VOTE_SCRIPT, json.dumps(plan)],
            cwd=ROOT,
            env={
                **os.environ,
                "RANK": str(r),
                "WORLD_SIZE": "2",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
            },  # fmt: skip
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    try:
        results = [p.communicate(timeout=DEADLINE_S) for p in procs]
    finally:  # a rank left waiting for the other must not outlive the test
        for p in procs:
            p.kill()
            p.wait()
    for p, (_, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err[-3000:]
    assert [json.loads(out) for out, _ in results] == [expected, expected]


@pytest.fixture
def one_rank_group(tmp_path):
    """torch.distributed of one process: enough to run the vote's calls in this process."""
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    yield
    dist.destroy_process_group()


def test_a_distributed_run_takes_a_signal_passed_on_twice_as_one(one_rank_group, monkeypatch):
    """SIGTERM twice in a moment (SLURM signals torchrun and the workers; torchrun passes it
    on) is one stop; another REPEAT_WINDOW_S later stops at once. The vote answers one step
    late, with that signal."""
    now, before = [1000.0], signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(trainer.interrupt.time, "monotonic", lambda: now[0])
    with graceful_interrupt(distributed=True, announce=False) as stop:
        assert not stop.after_step()
        os.kill(os.getpid(), signal.SIGTERM)
        try:
            os.kill(os.getpid(), signal.SIGTERM)
        except KeyboardInterrupt:  # caught: pytest would take it for the user's Ctrl-C
            pytest.fail("the signal passed on a second time stopped the run at once")
        assert stop.requested and not stop.after_step()  # sent now, read at the next step
        assert stop.after_step() and stop.signal == signal.SIGTERM
        now[0] += REPEAT_WINDOW_S
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_single_process_second_signal_still_stops_at_once():
    with graceful_interrupt() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.after_step() and stop.signal == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)


# --- whole runs ---------------------------------------------------------------------------------
def test_sigterm_to_one_rank_stops_both_at_one_step_and_resume_is_exact(tmp_path, data_dir):
    """`kill` of rank 1 alone: rank 0 stops after the same step, rank 0 alone says where,
    both exit 143, and a resumed run ends with the weights of an uninterrupted one."""
    out = tmp_path / "interrupted"
    ranks = Ranks(tmp_path / "logs", train_args(data_dir, out))
    try:
        ranks.wait_for("step 3/")
        ranks.procs[1].send_signal(signal.SIGTERM)
        assert ranks.wait() == [143, 143], ranks.tails()
    finally:
        ranks.kill()
    err0, err1 = ranks.output(0), ranks.output(1)
    assert "Traceback" not in err0 + err1, ranks.tails()
    assert "SIGTERM on another rank: every rank stops after this step and saves" in err0
    assert "stopped at step" not in err1
    stopped = stopped_step(err0, out)

    steps = f"schedule.max_steps={stopped + 2}"
    full_dir = tmp_path / "full"
    full, resumed = run_to_the_end(
        (tmp_path / "full-logs", train_args(data_dir, full_dir, steps)),
        (tmp_path / "resumed-logs", [*train_args(data_dir, out, steps), "--resume"]),
    )
    assert f"resuming from step {stopped}" in resumed.output(0)
    after = {s: v for s, v in losses(full.output(0)).items() if s > stopped}
    assert len(after) == 2 and losses(resumed.output(0)) == after
    name = f"step_{stopped + 2:06d}"
    a = load_training_checkpoint(full_dir / "checkpoints" / name).weights
    b = load_training_checkpoint(out / "checkpoints" / name).weights
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_sigterm_to_every_rank_twice_is_one_graceful_stop(tmp_path, data_dir, strategy):
    """A scheduler's preemption: SIGTERM to each rank, and at once again (the copy torchrun
    passes on): one stop with a checkpoint, not the stop-at-once of a second signal. FSDP
    gathers the weights from every rank to save them, as for a periodic checkpoint."""
    out = tmp_path / "run"
    args = train_args(data_dir, out, f'run.distributed="{strategy}"')
    ranks = Ranks(tmp_path / "logs", args)
    try:
        ranks.wait_for("step 3/")
        for _ in range(2):
            for p in ranks.procs:
                p.send_signal(signal.SIGTERM)
        assert ranks.wait() == [143, 143], ranks.tails()
    finally:
        ranks.kill()
    err0 = ranks.output(0)
    assert "Traceback" not in err0 + ranks.output(1), ranks.tails()
    assert "SIGTERM: every rank stops within two steps and saves a checkpoint" in err0
    stopped_step(err0, out)


def test_ctrl_c_in_a_terminal_under_torchrun_is_a_graceful_stop(tmp_path, data_dir):
    """A terminal's Ctrl-C is SIGINT to its foreground process group: torchrun (which starts
    each worker in a session of its own and passes SIGINT on). The workers save one
    checkpoint of one step within torchrun's 30 s and rank 0 says how to resume."""
    out = tmp_path / "run"
    log = tmp_path / "torchrun.txt"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--master-port", str(free_port()), "-m", "trainer.cli", *train_args(data_dir, out),
    ]  # fmt: skip
    with open(log, "w") as stderr:  # a process group of its own, as a terminal's job is
        proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True
        )
    try:
        deadline = time.monotonic() + DEADLINE_S
        while "step 3/" not in log.read_text():
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=DEADLINE_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    err = log.read_text()
    stopped_step(err, out)
    assert len(STOPPED.findall(err)) == 1, err[-3000:]  # rank 0's line only
    assert "Ctrl-C: every rank stops within two steps and saves a checkpoint" in err, err[-3000:]
    assert "KeyboardInterrupt" not in err and "forcefully exiting via SIGKILL" not in err
