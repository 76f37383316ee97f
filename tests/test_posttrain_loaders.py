"""The SFT and DPO loaders walk their items as the token loader walks its windows
(`loader.step_picks`, `loader.eval_part`): an optimizer step's global batch rolls over the
epoch as a whole, so micro_batch B x grad_accum A trains on the items of B*A x 1, and
validation is split over the ranks, whose sums (DPO's in `dpo_evaluate`) are added; DPO's
reference pass is split over them too."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from posttrain_helpers import make_base, preference_records, settings, write_jsonl

import trainer.dpo as dpo
from atlas_server.checkpoint import load_checkpoint
from trainer.artifacts import weights_sha256
from trainer.chat_data import PackedRows, TokenizedPair
from trainer.config import load_train_config
from trainer.dpo import load_reference_logps, pairs_sha256, reference_logps
from trainer.loop import Dist
from trainer.posttrain import DPOLoss, PairData, SFTData, dpo_evaluate, load_pairs
from trainer.sft import PackedLoader

N = 53  # items: a step of 3 x accum 4 = 12 leaves a tail of 5 each epoch


def _rows(n: int = N) -> PackedRows:
    """n rows of 4 tokens whose first token is the row's index."""
    inputs = np.arange(n, dtype=np.int64)[:, None] + np.zeros((1, 4), dtype=np.int64)
    return PackedRows(inputs, inputs.copy(), np.zeros_like(inputs), np.ones_like(inputs), [])


def _pairs(n: int = N) -> list[TokenizedPair]:
    """n pairs whose chosen answer starts with the pair's index."""
    ids = [np.array([i, 1, 2], dtype=np.int64) for i in range(n)]
    mask = np.array([False, True, True])
    return [TokenizedPair(x, mask, x + 1000, mask, f"pair {x[0]}") for x in ids]


def _sft(rank: int = 0, world: int = 1, seed: int = 9) -> SFTData:
    rows = _rows()
    return SFTData(rows, [], "", N, 0, rank, world, PackedLoader(rows, seed, rank, world))


def _dpo(rank: int = 0, world: int = 1, seed: int = 9) -> PairData:
    return PairData(_pairs(), 0, [], "", 0, seed, rank, world)


@pytest.mark.parametrize("make", [_sft, _dpo], ids=["sft", "dpo"])
def test_accumulation_gets_the_items_of_one_big_batch_across_epoch_ends(make):
    small, big = make(), make()
    for _ in range(14):  # 4 steps an epoch: three epoch ends
        micro = small.step_batches(3, 4)
        assert [len(b[0]) for b in micro] == [3 * (1 + (make is _dpo))] * 4  # DPO: 2 rows a pair
        whole = big.next_batch(12)[0]
        if make is _dpo:  # chosen rows first: the pairs are the first half
            whole = whole[:12]
            micro = [(b[0][:3],) for b in micro]
        assert torch.equal(torch.cat([b[0] for b in micro])[:, 0], whole[:, 0])
        assert small.state_dict() == big.state_dict()
    # Two ranks: each step's items are the single process's, split between them.
    ranks, one = [make(r, 2) for r in range(2)], make()
    for _ in range(10):
        parts = [b[0][:, 0] for r in ranks for b in r.step_batches(3, 2)]
        got = torch.cat(parts if make is _sft else [p[:3] for p in parts])
        expected = one.next_batch(12)[0][:12, 0]
        assert sorted(got.tolist()) == sorted(expected.tolist())


@pytest.mark.parametrize("make", [_sft, _dpo], ids=["sft", "dpo"])
@pytest.mark.parametrize("asked", [8, 40])  # batches of 2: fewer items than there are, more
def test_each_rank_validates_its_own_part(make, asked):
    def items(world: int) -> list[list[list[int]]]:
        per_rank = []
        for r in range(world):
            batches = make(r, world).eval_batches(2, asked // 2)
            per_rank.append(
                [b[0][: len(b[0]) // (1 + (make is _dpo)), 0].tolist() for b in batches]
            )
        return per_rank

    one = items(1)
    assert [i for b in one[0] for i in b] == list(range(min(N, asked)))
    two = items(2)
    flat = [i for rank in two for b in rank for i in b]
    # The first 2 x asked items (all 53 rounded down to an even count), each once.
    assert flat == list(range(min(N, 2 * asked) // 2 * 2))
    assert len(two[0]) == len(two[1])  # FSDP's forward is collective: as many batches


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dpo_rank(rank: int, world: int, root: str, port: int, results) -> None:
    """One process of a DPO run's data side over 10 pairs: the cached reference pass (its
    log-probs and how many pairs this process scored itself), then `dpo_evaluate` of a
    policy nudged away from the reference."""
    torch.set_num_threads(1)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    base, prefs = f"{root}/base", f"{root}/prefs.jsonl"
    cfg = load_train_config(
        None,
        settings(base, f"{root}/out", f'dpo.train=["{prefs}"]', f'dpo.val=["{prefs}"]',
                 'dpo.reference="frozen"', "run.eval_batches=8"),
    )  # fmt: skip
    data = load_pairs(cfg, cfg.dpo.val, Dist(rank, world), "val")
    scored: list[int] = []
    compute = dpo.compute_reference_logps
    dpo.compute_reference_logps = lambda m, p, *a, **k: (
        scored.append(len(p)) or compute(m, p, *a, **k)
    )
    try:
        logps = reference_logps(
            Path(root) / f"ref-{world}.safetensors", load_checkpoint(base).model, data.pairs,
            data.pad_id, batch_size=3, progress=False, rank=rank, world=world,
        )  # fmt: skip
    finally:
        dpo.compute_reference_logps = compute
    model = load_checkpoint(base).model
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    metrics = dpo_evaluate(DPOLoss(model, cfg), data, cfg, "cpu", torch.ones(256))
    results[rank] = (logps.chosen.tolist(), logps.rejected.tolist(), sum(scored), metrics)
    results["pairs_sha256"] = pairs_sha256(data.pairs)
    if world > 1:
        dist.destroy_process_group()


def test_dpo_reference_pass_and_validation_over_two_ranks_equal_one_process(
    tmp_path, byte_tokenizer
):
    """Each of 2 processes scores 5 of the 10 pairs for the reference; both get all 10 in
    pair order, as one process computes them, and the first stores them. Each evaluates 5
    pairs; the summed metrics are one process's."""
    base = make_base(tmp_path, byte_tokenizer)
    write_jsonl(tmp_path / "prefs.jsonl", preference_records())
    one: dict = {}
    _dpo_rank(0, 1, str(tmp_path), 0, one)
    with mp.Manager() as manager:
        two = manager.dict()
        mp.spawn(_dpo_rank, args=(2, str(tmp_path), _free_port(), two), nprocs=2)
        two = dict(two)
    chosen, rejected, scored, metrics = one[0]
    assert scored == 10 and [two[rank][2] for rank in (0, 1)] == [5, 5]
    assert len(set(chosen)) == 10  # every pair its own number: the order is checked
    for rank in (0, 1):
        assert two[rank][0] == pytest.approx(chosen, rel=1e-5)
        assert two[rank][1] == pytest.approx(rejected, rel=1e-5)
    stored = load_reference_logps(
        tmp_path / "ref-2.safetensors",
        weights_sha256(load_checkpoint(base).model.state_dict()),
        one["pairs_sha256"],
        False,
    )
    assert stored.chosen.tolist() == pytest.approx(chosen, rel=1e-5)
    assert metrics["preference_accuracy"] not in (0.0, 1.0)  # the pairs differ, so do halves
    for rank in (0, 1):
        assert two[rank][3] == pytest.approx(metrics, rel=1e-5, abs=1e-6)
