"""The CUDA runner's logic, on the CPU: buckets, padding, KV sizing, and the padded path.

`GraphRunner(cuda_graphs=False)` runs exactly the static, bucketed, padded decode forward
that a CUDA graph captures, eagerly, so it runs here. It is checked against the eager
runner (unpadded, per-step KV lengths) and the model's own greedy loop; the arithmetic
(which bucket, how many KV slots fit a budget) against numbers worked out by hand and the
KV size kv_cache.py documents for GPT-2 124M. tests/test_cuda.py repeats the runner checks
with captured graphs on a GPU.
"""

from __future__ import annotations

import asyncio
import copy

import pytest
import torch
from test_engine import GREEDY, prompts, run

from atlas_server.engine import Engine, EngineConfig, SamplingParams
from atlas_server.engine.cuda_runner import (
    DecodeShape,
    GraphRunner,
    batch_buckets,
    bucket_for,
    decode_shape,
    kv_budget_bytes,
    kv_bytes_per_slot,
    kv_length_buckets,
    kv_slots,
    padded_inputs,
)
from atlas_server.engine.request import Request
from atlas_server.engine.runner import EagerRunner, make_runner, resolve_dtype
from atlas_server.engine.scheduler import DecodeBatch, PrefillChunk, StepPlan
from atlas_server.model import Transformer, load_preset

GiB, MiB = 2**30, 2**20


# --- buckets and padding -------------------------------------------------------------
def test_batch_buckets_are_powers_of_two_up_to_max_running():
    assert batch_buckets(16) == [1, 2, 4, 8, 16]
    assert batch_buckets(48) == [1, 2, 4, 8, 16, 32, 48]
    assert batch_buckets(256) == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert batch_buckets(1) == [1]
    with pytest.raises(ValueError, match="max_running"):
        batch_buckets(0)


def test_kv_length_buckets_and_bucket_choice():
    assert kv_length_buckets(1024) == [256, 512, 1024]
    assert kv_length_buckets(2048, smallest=512) == [512, 1024, 2048]
    assert kv_length_buckets(300) == [256, 300]
    assert kv_length_buckets(100) == [100]
    buckets = batch_buckets(48)
    assert [bucket_for(n, buckets) for n in (1, 2, 3, 5, 16, 17, 33, 48)] == [
        1, 2, 4, 8, 16, 32, 48, 48,
    ]  # fmt: skip
    assert bucket_for(49, buckets) is None


def batch(positions: list[int], slots: list[int] | None = None) -> DecodeBatch:
    n = len(positions)
    return DecodeBatch((), tuple(range(7, 7 + n)), tuple(positions), tuple(slots or range(n)))


def test_decode_shape_picks_the_smallest_buckets_or_declines():
    batches, lengths, dead = batch_buckets(16), kv_length_buckets(1024), 1023
    assert decode_shape(batch([5, 9, 300]), batches, lengths, dead) == DecodeShape(4, 512)
    assert decode_shape(batch([255]), batches, lengths, dead) == DecodeShape(1, 256)
    assert decode_shape(batch([256]), batches, lengths, dead) == DecodeShape(1, 512)
    assert decode_shape(batch([1022] * 9), batches, lengths, dead) == DecodeShape(16, 1024)
    # Declined (the eager path serves): slots not 0..B-1, the dead position, no rows.
    assert decode_shape(batch([5, 9], slots=[0, 2]), batches, lengths, dead) is None
    assert decode_shape(batch([1023]), batches, lengths, dead) is None
    assert decode_shape(batch([]), batches, lengths, dead) is None
    assert decode_shape(batch([3] * 17), batches, lengths, dead) is None


def test_padding_rows_decode_token_zero_at_the_dead_position():
    assert padded_inputs(batch([4, 8, 2]), 4, 99) == [[7, 8, 9, 0], [4, 8, 2, 99]]
    assert padded_inputs(batch([4]), 1, 99) == [[7], [4]]
    with pytest.raises(ValueError, match="do not fit"):
        padded_inputs(batch([1, 2, 3]), 2, 99)


# --- KV sizing ----------------------------------------------------------------------
def test_kv_bytes_per_slot_match_the_documented_gpt2_124m_figure():
    config = load_preset("gpt2-124m")
    # kv_cache.py: "124M GPT-2, 1024 positions, fp32: 72 MiB per slot".
    assert kv_bytes_per_slot(config, 1024, torch.float32) == 72 * MiB
    assert kv_bytes_per_slot(config, 1024, torch.bfloat16) == 36 * MiB
    assert kv_bytes_per_slot(config, 512, torch.bfloat16) == 18 * MiB
    gqa = load_preset("llama-tiny")  # fewer kv heads than query heads: only kv heads count
    per_position = 2 * gqa.n_layers * gqa.kv_heads * gqa.head_dim * 4
    assert gqa.kv_heads < gqa.n_heads
    assert kv_bytes_per_slot(gqa, 100, torch.float32) == 100 * per_position


def test_kv_slots_from_a_budget():
    per_slot = 36 * MiB
    assert kv_slots(8 * GiB, per_slot, 1000) == 227  # floor(8192 / 36)
    assert kv_slots(8 * GiB, per_slot, 64) == 64  # max_running caps it
    assert kv_slots(per_slot, per_slot, 64) == 1
    with pytest.raises(ValueError, match="holds no slot"):
        kv_slots(per_slot - 1, per_slot, 64)
    assert kv_budget_bytes(2.5, None) == int(2.5 * GiB)
    assert kv_budget_bytes(2.5, 100 * GiB) == int(2.5 * GiB)  # an explicit budget wins
    assert kv_budget_bytes(None, 100 * GiB) == 50 * GiB  # CUDA default: half of free
    assert kv_budget_bytes(None, None) is None  # CPU default: no budget
    with pytest.raises(ValueError, match="kv_cache_gib"):
        kv_budget_bytes(0.0, None)


def test_dtype_auto_is_bf16_on_cuda_only():
    assert resolve_dtype("cuda", "auto") == "bfloat16"
    assert resolve_dtype("cuda:1", "auto") == "bfloat16"
    assert resolve_dtype("cpu", "auto") == "float32"
    assert resolve_dtype("cuda", "float32") == "float32"  # --dtype overrides


def test_a_kv_budget_below_max_running_slots_runs_fewer(varied_model):
    model = varied_model.model
    per_slot = kv_bytes_per_slot(model.config, 64, torch.float32)
    config = EngineConfig(max_running=8, max_model_len=64, kv_cache_gib=3.5 * per_slot / GiB)
    engine = Engine(model, varied_model.tokenizer, config)
    try:
        assert isinstance(engine.runner, EagerRunner)
        assert engine.cache.n_slots == 3 and engine.config.max_running == 3
        assert engine.stats().kv_slots_total == 3
    finally:
        engine.shutdown()
    runner = make_runner(model, EngineConfig(max_running=8, max_model_len=64), 64)
    assert runner.cache.n_slots == 8  # no budget on the CPU unless asked


# --- the padded path against the eager runner ------------------------------------------
def tiny(preset: str, attention: str) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(load_preset(preset, vocab_size=300, attention=attention, max_seq_len=512))
    with torch.no_grad():
        for weight in model.parameters():
            if weight.dim() == 2:
                weight.mul_(8.0)
    return model


def prefill(slot: int, tokens: list[int]) -> PrefillChunk:
    request = Request(f"r{slot}", tokens, SamplingParams(max_tokens=4), 0.0)
    return PrefillChunk(request, slot, 0, tuple(tokens), "last")


@pytest.mark.parametrize("attention", ["sdpa", "reference"])  # C decode kernel / masked SDPA
@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny"])
def test_padded_bucketed_decode_equals_the_eager_runner_at_every_batch_size(preset, attention):
    max_len, slots = 300, 6  # KV length buckets [256, 300]; batch buckets [1, 2, 4, 6]
    model = tiny(preset, attention)
    eager = EagerRunner(copy.deepcopy(model), slots, max_len)
    padded = GraphRunner(copy.deepcopy(model), slots, max_len, cuda_graphs=False)
    generator = torch.Generator().manual_seed(0)
    lengths = [3, 40, 17, 260, 9, 5]  # slot 3 reads past the first KV bucket
    plan = StepPlan(
        prefill=[
            prefill(s, torch.randint(0, 300, (n,), generator=generator).tolist())
            for s, n in enumerate(lengths)
        ]
    )
    with torch.inference_mode():
        for runner in (eager, padded):
            runner.execute(plan)
        for n in range(1, slots + 1):  # every batch size: buckets 1, 2, 4 (padded) and 6
            tokens = torch.randint(0, 300, (n,), generator=generator).tolist()
            step = DecodeBatch((), tuple(tokens), tuple(lengths[:n]), tuple(range(n)))
            shape = decode_shape(step, padded.batches, padded.kv_lengths, padded.dead_position)
            assert shape is not None and shape.batch >= n
            want = eager.execute(StepPlan(decode=step)).decode
            got = padded.execute(StepPlan(decode=step)).decode
            assert got.shape == want.shape == (n, 300)
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
            assert (got.argmax(-1) == want.argmax(-1)).all()
            for i in range(n):
                lengths[i] += 1
    # Padding rows wrote only the dead position of the slots above the batch: every row a
    # real sequence holds is the eager runner's.
    for layer in range(model.config.n_layers):
        for store_e, store_p in ((eager.cache.k, padded.cache.k), (eager.cache.v, padded.cache.v)):
            for s, n in enumerate(lengths):
                torch.testing.assert_close(store_p[layer][s, :, :n], store_e[layer][s, :, :n])
            dead = store_p[layer][:, :, padded.dead_position]
            assert dead.abs().sum() > 0  # the padding rows did write somewhere: there


@pytest.mark.parametrize("runner_kind", ["eager", "padded"])
def test_rows_fed_the_last_steps_sampled_ids_equal_rows_given_the_tokens(runner_kind):
    """Overlap mode's input path: decode rows whose `sampled_rows` point into the previous
    step's sampled ids (a tensor on the device, in another order, some rows given as host
    integers) get the same logits and KV as the same tokens given by the host."""
    model = tiny("gpt2-tiny", "sdpa")
    make = {
        "eager": lambda m: EagerRunner(m, 4, 300),
        "padded": lambda m: GraphRunner(m, 4, 300, cuda_graphs=False),
    }[runner_kind]
    given, fed = make(copy.deepcopy(model)), make(copy.deepcopy(model))
    lengths = [5, 9, 3]
    chunks = [prefill(s, list(range(10 + s, 10 + s + n))) for s, n in enumerate(lengths)]
    tokens = (41, 17, 250)
    sampled = torch.tensor([250, 99, 41])  # the previous step's ids, in its own row order
    with torch.inference_mode():
        for runner in (given, fed):
            runner.execute(StepPlan(prefill=chunks))
        host = DecodeBatch((), tokens, tuple(lengths), (0, 1, 2))
        device = DecodeBatch((), (0, 17, 0), tuple(lengths), (0, 1, 2), sampled_rows=(2, -1, 0))
        want = given.execute(StepPlan(decode=host)).decode
        got = fed.execute(StepPlan(decode=device), sampled).decode
        with pytest.raises(ValueError, match="sampled ids"):
            fed.execute(StepPlan(decode=device))  # the plan needs them
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    for store_g, store_f in zip(given.cache.k, fed.cache.k, strict=True):
        torch.testing.assert_close(store_f[:3], store_g[:3], atol=0, rtol=0)


def test_graph_runner_needs_cuda_for_graphs():
    with pytest.raises(ValueError, match="CUDA device"):
        GraphRunner(tiny("gpt2-tiny", "sdpa"), 2, 64, cuda_graphs=True)


@pytest.mark.parametrize("overlap", [False, True], ids=["serial", "overlap"])
def test_engine_on_the_padded_runner_equals_greedy_alone_and_together(varied_model, overlap):
    """Engine-level: 5 slots -> buckets [1, 2, 4, 5], so 3 running streams decode padded
    into slots 3 and 4, where other prompts are prefilling; a request that fills its whole
    slot (prompt + max_tokens = max_model_len) never meets the dead position, also when
    overlap mode schedules ahead of the tokens (CUDA's default)."""
    model, tokenizer = varied_model.model, varied_model.tokenizer
    max_len = 64
    runner = GraphRunner(model, 5, max_len, cuda_graphs=False)
    config = EngineConfig(
        max_running=5, max_batched_tokens=16, max_model_len=max_len, overlap=overlap
    )
    engine = Engine(model, tokenizer, config, runner=runner).start()
    ps = prompts(tokenizer, 5)
    full = SamplingParams(temperature=0.0, max_tokens=max_len - len(ps[0]))

    async def main():
        alone = [(await run(engine, p, GREEDY))[0][0] for p in ps[:3]]
        together = await asyncio.gather(*(run(engine, p, GREEDY) for p in ps))
        whole = await run(engine, ps[0], full)
        return alone, [ids[0] for ids, _, _ in together], whole[0][0]

    try:
        alone, together, whole = asyncio.run(main())
    finally:
        engine.shutdown(timeout=5)
    expected = [model.generate(p, GREEDY.max_tokens) for p in ps]
    assert alone == expected[:3]
    assert together == expected
    assert whole == model.generate(ps[0], full.max_tokens)
