"""TokenLoader at scale and across its edges: the window table, the permutation drawn once
per epoch, the epoch roll-over decided per optimizer step (B x accum A gets the windows of
B*A x 1), and a validation set fixed by the global batch and split over the ranks.

The data are synthetic shards whose token at position p of shard s is s * 10_000 + p, so a
batch row's first input token names its window."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.data import write_shard
from trainer.loader import TokenLoader, window_table

SEQ = 4


def _listed_windows(lengths: list[int], seq_len: int) -> np.ndarray:
    """The window table as the loader first built it: a list of (shard, offset) tuples."""
    window = seq_len + 1
    starts = [(i, o) for i, n in enumerate(lengths) for o in range(0, n - window + 1, seq_len)]
    return np.array(starts, dtype=np.int64).reshape(-1, 2)


def _write_split(folder: Path, lengths: list[int], split: str = "train") -> None:
    shards = []
    for i, n in enumerate(lengths):
        name = f"{split}_{i}.bin"
        write_shard(folder / name, (i * 10_000 + np.arange(n)).astype(np.uint16))
        shards.append({"file": name, "tokens": n})
    manifest_path = folder / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    manifest_path.write_text(json.dumps({**manifest, split: shards}))


@pytest.fixture
def folder_of(tmp_path):
    """folder_of(train_windows, val_windows): a data folder whose splits have exactly that
    many windows of SEQ + 1 tokens, over three training shards and one validation shard."""

    def make(train_windows: int, val_windows: int = 1) -> Path:
        folder = tmp_path / f"data_{train_windows}_{val_windows}"
        folder.mkdir()
        third = train_windows // 3
        counts = [third, third, train_windows - 2 * third]
        _write_split(folder, [c * SEQ + 1 for c in counts])
        _write_split(folder, [val_windows * SEQ + 1], "val")
        return folder

    return make


def _ids(loader: TokenLoader, inputs: torch.Tensor) -> list[int]:
    """The window ids of a batch's rows (from their first input token)."""
    index = {int(s) * 10_000 + int(o): i for i, (s, o) in enumerate(loader.windows)}
    return [index[int(t)] for t in inputs[:, 0]]


def test_window_table_lists_every_window_shard_by_shard_as_before():
    lengths = [0, 3, 4, 5, 6, 8, 9, 13, 1000, 5]  # empty, shorter than a window, exact fits
    np.testing.assert_array_equal(window_table(lengths, SEQ), _listed_windows(lengths, SEQ))
    assert window_table(lengths, SEQ).dtype == np.int64
    lengths = [100_003, 99_000, 65_536]
    np.testing.assert_array_equal(window_table(lengths, 1024), _listed_windows(lengths, 1024))
    assert window_table([2, 3], SEQ).shape == (0, 2)


def test_the_permutation_is_drawn_once_per_epoch_and_batches_follow_it(folder_of, monkeypatch):
    loader = TokenLoader(folder_of(40), "train", SEQ, seed=3)
    draws = []
    real = np.random.default_rng
    monkeypatch.setattr(np.random, "default_rng", lambda s: draws.append(s) or real(s))
    got = [_ids(loader, loader.next_batch(3)[0]) for _ in range(26)]  # 13 per epoch, tail of 1
    assert draws == [[3, 0], [3, 1]]
    for k, ids in enumerate(got):
        epoch, cursor = divmod(k, 13)
        order = real([3, epoch]).permutation(40)
        assert ids == order[cursor * 3 : cursor * 3 + 3].tolist()


def test_accumulation_gets_the_windows_of_one_big_batch_across_epoch_ends(folder_of):
    # 53 windows: a step of 3 x accum 4 = 12 leaves a tail of 5 each epoch, which one
    # micro-batch of 3 would fit but a step does not; 12 x 1 drops it.
    data = folder_of(53)
    big, small = (TokenLoader(data, "train", SEQ, seed=9) for _ in range(2))
    for _ in range(14):  # 4 steps an epoch: three epoch ends
        micro = small.step_batches(3, 4)
        assert [len(b[0]) for b in micro] == [3] * 4
        assert torch.equal(torch.cat([b[0] for b in micro]), big.next_batch(12)[0])
        assert small.state_dict() == big.state_dict()
    # Two ranks: each step's windows are the single process's, split between them.
    ranks = [TokenLoader(data, "train", SEQ, seed=9, rank=r, world=2) for r in range(2)]
    one = TokenLoader(data, "train", SEQ, seed=9)
    for _ in range(10):
        parts = torch.cat([b[0] for r in ranks for b in r.step_batches(3, 2)])
        assert sorted(_ids(one, parts)) == sorted(_ids(one, one.next_batch(12)[0]))


def test_a_step_inside_an_epoch_gets_the_micro_batches_it_always_got(folder_of):
    data = folder_of(53)
    stepped, one_by_one = (TokenLoader(data, "train", SEQ, seed=2, world=2) for _ in range(2))
    for _ in range(4):  # 4 steps of 2 x 2 ranks x accum 3 = 48 of the 53 windows
        for batch in stepped.step_batches(2, 3):
            assert torch.equal(batch[0], one_by_one.next_batch(2)[0])
    # A step larger than an epoch cannot fit in one: its micro-batches roll over one by one.
    whole, single = (TokenLoader(data, "train", SEQ, seed=2) for _ in range(2))
    for batch in whole.step_batches(10, 7):
        assert torch.equal(batch[0], single.next_batch(10)[0])


def test_resume_at_any_step_and_from_an_old_state_continues_exactly(folder_of):
    data = folder_of(53)
    full = TokenLoader(data, "train", SEQ, seed=4)
    steps = [full.step_batches(3, 4) for _ in range(10)]
    for k in (1, 4, 5, 9):  # 4: at an epoch end
        again = TokenLoader(data, "train", SEQ, seed=4)
        for _ in range(k):
            again.step_batches(3, 4)
        resumed = TokenLoader(data, "train", SEQ, seed=4)
        resumed.load_state_dict(json.loads(json.dumps(again.state_dict())))
        for step in steps[k:]:
            got = resumed.step_batches(3, 4)
            assert all(torch.equal(a[0], b[0]) for a, b in zip(got, step, strict=True))
    # A state saved by the loader that rolled over per micro-batch has the same two fields
    # (here: 6 windows into epoch 1) and continues from that point of epoch 1.
    old = TokenLoader(data, "train", SEQ, seed=4)
    old.load_state_dict({"epoch": 1, "cursor": 6})
    order = np.random.default_rng([4, 1]).permutation(53)
    assert _ids(old, old.next_batch(3)[0]) == order[6:9].tolist()


@pytest.mark.parametrize("val_windows", [100, 21])  # more than asked for, and fewer
def test_the_validation_set_is_the_global_batch_s_not_the_micro_batch_s(folder_of, val_windows):
    data = folder_of(12, val_windows)

    def validation(micro: int, accum: int, world: int) -> list[list[list[int]]]:
        """Each rank's batches (window ids), as the loop asks: eval_batches x grad_accum
        batches of micro_batch, 2 eval_batches."""
        ranks = [TokenLoader(data, "val", SEQ, seed=0, rank=r, world=world) for r in range(world)]
        return [[_ids(r, b[0]) for b in r.eval_batches(micro, 2 * accum)] for r in ranks]

    layouts = {(16, 1, 1), (8, 1, 2), (8, 2, 1), (4, 2, 2)}  # global batch 16: 32 windows
    expected = list(range(min(32, val_windows)))
    for micro, accum, world in layouts:
        per_rank = validation(micro, accum, world)
        flat = [i for rank in per_rank for batch in rank for i in batch]
        # Equal contiguous parts; a split shorter than asked loses at most world - 1.
        assert flat == expected[: len(expected) // world * world]
        assert len({len(rank) for rank in per_rank}) == 1  # as many batches on every rank
        assert all(0 < len(b) <= micro for rank in per_rank for b in rank)
    assert validation(8, 2, 2) == validation(8, 2, 2)  # the same on every call
