"""The CUDA code paths against references: the CPU, transformers, fp32, eager, full forwards.

Every test here needs a GPU and the whole module is skipped without one (CI has none):
run it on a GPU machine with `python -m pytest tests/test_cuda.py -q -x`. Models are the
tiny presets (2 layers, d_model 64); fp32 comparisons run with TF32 off (the autouse
fixture below), so CUDA and CPU numbers differ only by summation order. The trainer tests
need msgspec (trainer/config.py) and are skipped where it is missing.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import StepGate
from hf_models import hf_gpt2, hf_llama
from test_engine import GREEDY, feature_mix_outputs, prompts, run, wait_for
from test_sampling import CASES as SAMPLING_CASES
from test_sampling import VOCAB as SAMPLING_VOCAB
from test_sampling import reference_probs
from torch.nn.attention import SDPBackend, sdpa_kernel

from atlas_server.checkpoint import load_checkpoint
from atlas_server.engine import Engine, EngineConfig, SamplingParams
from atlas_server.engine.cuda_runner import GraphRunner, kv_bytes_per_slot
from atlas_server.engine.request import Request
from atlas_server.engine.runner import EagerRunner
from atlas_server.engine.sampling import SamplingRow, queue_step, sample, sample_step
from atlas_server.engine.scheduler import DecodeBatch, PrefillChunk, SlotCopy, StepPlan
from atlas_server.hf_import import hf_to_atlas_model
from atlas_server.model import Transformer, load_preset
from atlas_server.model.onednn import train_matmul
from atlas_server.model.transformer import Linear
from atlas_server.tokenizer.corpus import stdlib_sample

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU (torch.cuda.is_available() is False); CI runs on CPU only",
)

DEVICE = "cuda"
PRESETS = ["gpt2-tiny", "llama-tiny"]  # learned/LayerNorm/GELU/tied and RoPE/RMSNorm/SwiGLU/GQA
VOCAB = 300
LOW_PRECISION = [torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _exact_fp32_matmuls():
    """TF32 off (cuBLAS and cuDNN) for the test, restored after: fp32 means fp32 here."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def build(preset: str, vocab: int = VOCAB, scale: float = 1.0, **overrides) -> Transformer:
    """A random-weight preset model on the CPU; `scale` multiplies every matrix."""
    torch.manual_seed(0)
    model = Transformer(load_preset(preset, vocab_size=vocab, **overrides))
    with torch.no_grad():
        for weight in model.parameters():
            if weight.dim() == 2:
                weight.mul_(scale)
    return model


def token_ids(shape: tuple[int, ...], vocab: int = VOCAB, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, shape, generator=generator).to(DEVICE)


def assert_tracks(low: torch.Tensor, ref: torch.Tensor, share: float = 0.05) -> None:
    """Low-precision logits: finite, within `share` of the fp32 range, same top-1 mostly."""
    assert torch.isfinite(low).all()
    low = low.float()
    assert (low - ref).abs().max() <= share * ref.abs().max()
    assert (low.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9


# --- the model ----------------------------------------------------------------------
@pytest.mark.parametrize("attention", ["sdpa", "reference"])
@pytest.mark.parametrize("preset", PRESETS)
def test_fp32_logits_loss_and_gradients_on_cuda_equal_the_cpu(preset, attention):
    cpu = build(preset, attention=attention)
    gpu = copy.deepcopy(cpu).to(DEVICE)
    ids = token_ids((3, 40))
    with torch.no_grad():
        torch.testing.assert_close(
            gpu.eval()(ids).cpu(), cpu.eval()(ids.cpu()), atol=2e-5, rtol=1e-4
        )
    # Training: the CPU takes the oneDNN autograd matmul, CUDA plain cuBLAS matmuls.
    losses = []
    for model, x in ((cpu, ids.cpu()), (gpu, ids)):
        loss = model.train().loss(x[:, :-1], x[:, 1:])
        loss.backward()
        losses.append(loss.item())
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    for (name, a), b in zip(cpu.named_parameters(), gpu.parameters(), strict=True):
        assert b.grad is not None and b.grad.device.type == DEVICE
        torch.testing.assert_close(b.grad.cpu(), a.grad, atol=1e-5, rtol=1e-3, msg=name)


@pytest.mark.parametrize("preset", PRESETS)
def test_onednn_copies_step_aside_for_cuda_weights(preset):
    model = build(preset)
    ids = token_ids((2, 9))
    with torch.no_grad():
        want = model.eval()(ids.cpu())
        # Prepared on the CPU (oneDNN copies where supported), then moved: the copies are
        # stale (new storage) and for CPU inputs only, so the live CUDA weights are used.
        model.prepare_for_inference().to(DEVICE)
        torch.testing.assert_close(model(ids).cpu(), want, atol=2e-5, rtol=1e-4)
        model.prepare_for_inference()  # on CUDA: no oneDNN copy at all
        assert all(m.packed is None for m in model.modules() if isinstance(m, Linear))
        assert model._packed_head is None
        if model.config.tie_embeddings:
            assert model._tied_head_t.device.type == DEVICE
        torch.testing.assert_close(model(ids).cpu(), want, atol=2e-5, rtol=1e-4)
    x = torch.randn(3, 64, device=DEVICE, requires_grad=True)
    assert train_matmul(x, torch.randn(64, 8, device=DEVICE, requires_grad=True)) is None


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_cuda_logits_and_greedy_tokens_match_transformers(tmp_path, arch):
    pytest.importorskip("transformers")
    hf = (hf_gpt2 if arch == "gpt2" else hf_llama)(VOCAB)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    ours = hf_to_atlas_model(tmp_path).to(DEVICE)
    hf.to(DEVICE)
    ids = token_ids((2, 24))
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids)
    assert got.device.type == DEVICE
    assert (expected - got).abs().max().item() <= 1e-4
    prompt = ids[0, :8]
    with torch.no_grad():
        theirs = hf.generate(prompt[None], max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert ours.generate(prompt.tolist(), 8) == theirs[0, 8:].tolist()


@pytest.mark.parametrize("mode", ["autocast", "cast"])
@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("preset", PRESETS)
def test_low_precision_forward_on_cuda_tracks_fp32(preset, dtype, mode):
    model = build(preset).to(DEVICE).eval()
    ids = token_ids((2, 32))
    with torch.no_grad():
        ref = model(ids)
        if mode == "autocast":
            with torch.autocast(DEVICE, dtype=dtype):
                low = model(ids)
        else:
            low = model.to(dtype)(ids)
    assert low.dtype == dtype
    assert_tracks(low, ref)


@pytest.mark.parametrize("mode", ["autocast", "cast"])
@pytest.mark.parametrize("preset", PRESETS)
def test_causal_forward_and_backward_run_on_flash_attention(preset, mode):
    """With only the flash kernel allowed, SDPA raises unless every call is flash-eligible
    (bf16, causal flag, no explicit mask); the results must equal the math kernel's."""
    model = build(preset).to(DEVICE)
    if mode == "cast":
        model.to(torch.bfloat16)
    ids = token_ids((2, 48))
    logits, grads = {}, {}
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH):
        autocast = torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=mode == "autocast")
        with sdpa_kernel(backend), autocast:
            with torch.no_grad():
                logits[backend] = model.eval()(ids).float()
            model.zero_grad(set_to_none=True)
            model.train().loss(ids[:, :-1], ids[:, 1:]).backward()
        grads[backend] = torch.cat([p.grad.float().flatten() for p in model.parameters()])
    flash, math_ = logits[SDPBackend.FLASH_ATTENTION], logits[SDPBackend.MATH]
    assert_tracks(flash, math_, share=0.03)
    g_flash, g_math = grads[SDPBackend.FLASH_ATTENTION], grads[SDPBackend.MATH]
    assert torch.isfinite(g_flash).all()
    assert (g_flash - g_math).norm() <= 0.05 * g_math.norm()


@pytest.mark.timeout(600)
@pytest.mark.parametrize("preset", PRESETS)
def test_compiled_model_matches_eager_forward_and_gradients(preset):
    model = build(preset).to(DEVICE).train()
    compiled = torch.compile(model)
    ids = token_ids((4, 33))
    results = []
    for forward in (model, compiled):
        model.zero_grad(set_to_none=True)
        logits = forward(ids[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results.append((logits.detach(), loss.item(), grads))
    (eager, eager_loss, eager_grads), (comp, comp_loss, comp_grads) = results
    torch.testing.assert_close(comp, eager, atol=2e-5, rtol=1e-4)
    assert comp_loss == pytest.approx(eager_loss, rel=1e-5)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(comp_grads[name], grad, atol=1e-5, rtol=1e-3, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("attention", ["sdpa", "reference"])
@pytest.mark.parametrize("preset", PRESETS)
def test_kv_cache_decoding_on_cuda_equals_full_forward(preset, attention, dtype):
    model = build(preset, attention=attention).to(DEVICE, dtype).eval()
    ids = token_ids((3, 30))
    positions = torch.arange(30, device=DEVICE).expand(3, 30)
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(n_slots=5, max_len=40)
        assert cache.k[0].device.type == DEVICE and cache.k[0].dtype == dtype
        slots = torch.tensor([4, 0, 2], device=DEVICE)  # not consecutive: the gather path
        # prefill in two chunks of different sizes, then decode token by token
        parts = [
            model(ids[:, :7], positions[:, :7], cache, slots),
            model(ids[:, 7:20], positions[:, 7:20], cache, slots),
        ]
        for t in range(20, 30):
            parts.append(model(ids[:, t : t + 1], positions[:, t : t + 1], cache, slots))
        got = torch.cat(parts, 1)
    if dtype == torch.float32:
        torch.testing.assert_close(got, full, atol=2e-5, rtol=1e-4)
    else:
        assert_tracks(got, full.float())


# --- the engine -----------------------------------------------------------------------
def varied_model(preset: str, vocab: int) -> Transformer:
    """As tests/test_engine.py: weights scaled up so greedy text varies token to token."""
    return build(preset, vocab, scale=8.0).to(DEVICE)


def run_engine(engine: Engine, main):
    try:
        return asyncio.run(main())
    finally:
        engine.shutdown(timeout=5)


@pytest.mark.parametrize("preset", PRESETS)
def test_engine_greedy_batch_on_cuda_equals_each_prompt_alone(preset, byte_tokenizer):
    model = varied_model(preset, byte_tokenizer.vocab_size)
    config = EngineConfig(max_running=4, max_batched_tokens=16)  # chunked prefill + decode
    engine = Engine(model, byte_tokenizer, config).start()
    ps = prompts(byte_tokenizer, 4)

    async def main():
        alone = [(await run(engine, p, GREEDY))[0][0] for p in ps]
        together = await asyncio.gather(*(run(engine, p, GREEDY) for p in ps))
        return alone, [ids[0] for ids, _, _ in together]

    alone, together = run_engine(engine, main)
    assert engine.cache.k[0].device.type == DEVICE
    expected = [model.generate(p, GREEDY.max_tokens) for p in ps]
    assert alone == expected
    assert together == expected


def test_engine_seeded_sampling_on_cuda_repeats_alone_and_in_a_batch(byte_tokenizer):
    model = varied_model("llama-tiny", byte_tokenizer.vocab_size)
    engine = Engine(model, byte_tokenizer, EngineConfig(max_running=6)).start()
    prompt = byte_tokenizer.encode("seeded sampling")

    def seeded(seed: int) -> SamplingParams:
        return SamplingParams(temperature=1.0, max_tokens=16, seed=seed)

    async def main():
        first = await run(engine, prompt, seeded(1234))
        again = await run(engine, prompt, seeded(1234))
        others = [
            run(engine, p, SamplingParams(temperature=1.0, max_tokens=10 + i))
            for i, p in enumerate(prompts(byte_tokenizer, 4))
        ]
        mixed, *_ = await asyncio.gather(run(engine, prompt, seeded(1234)), *others)
        other_seeds = [await run(engine, prompt, seeded(s)) for s in (99, 100, 101)]
        return first, again, mixed, other_seeds

    first, again, mixed, other_seeds = run_engine(engine, main)
    assert again[:2] == first[:2]  # token ids and text
    assert mixed[:2] == first[:2]
    assert any(other[0][0] != first[0][0] for other in other_seeds)


def test_engine_prompt_logprobs_on_cuda_equal_a_full_forward(byte_tokenizer):
    model = varied_model("gpt2-tiny", byte_tokenizer.vocab_size)
    engine = Engine(model, byte_tokenizer, EngineConfig(max_running=2, max_batched_tokens=16))
    engine.start()
    prompt = byte_tokenizer.encode("echo these prompt tokens back with scores")
    params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=1, prompt_logprobs=1)
    _, _, events = run_engine(engine, lambda: run(engine, prompt, params))
    entries = events[0].prompt_logprobs
    with torch.inference_mode():
        ids = torch.tensor([prompt], device=DEVICE)
        ref = torch.log_softmax(model(ids)[0].float(), -1).cpu()  # [T, V]
    assert entries[0] is None and len(entries) == len(prompt)
    for i in range(1, len(prompt)):
        assert entries[i].token_id == prompt[i]
        assert entries[i].logprob == pytest.approx(float(ref[i - 1, prompt[i]]), abs=1e-4)
        assert list(entries[i].top) == [int(ref[i - 1].argmax())]
    assert events[0].logprobs[0].logprob == pytest.approx(float(ref[-1].max()), abs=1e-4)


def test_engine_from_checkpoint_serves_on_cuda(tiny_llama_checkpoint):
    # fp32: greedy equality between two code paths (graph-replayed decode, generate's
    # eager one) holds only where rounding is that fine; bf16 is the next tests' subject.
    config = EngineConfig(max_running=2, device=DEVICE, dtype="float32")
    engine = Engine.from_checkpoint(tiny_llama_checkpoint, config).start()
    assert all(p.device.type == DEVICE for p in engine.model.parameters())
    prompt = engine.tokenizer.encode("from a checkpoint")
    ids, _, _ = run_engine(engine, lambda: run(engine, prompt, GREEDY))
    assert ids[0] == engine.model.generate(prompt, GREEDY.max_tokens)


# --- sampling on the GPU ---------------------------------------------------------------
@pytest.mark.parametrize("params", SAMPLING_CASES, ids=lambda p: repr(p)[15:70])
def test_gpu_sampling_matches_the_reference_distribution(params):
    """tests/test_sampling.py's check, with the logits and every sampling stage on CUDA."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(SAMPLING_VOCAB, generator=generator) * 2
    prompt, out = [1, 2, 3, 1], [4, 4, 5, 1, 9]
    expected = reference_probs(logits.tolist(), params, prompt, out)
    draws = 6000
    rows = [SamplingRow(params, prompt, out, None) for _ in range(draws)]
    torch.manual_seed(1)
    tokens = sample(logits.to(DEVICE).expand(draws, -1), rows)
    assert tokens.device.type == DEVICE
    counts = torch.bincount(tokens.cpu(), minlength=SAMPLING_VOCAB).tolist()
    for token, (count, p) in enumerate(zip(counts, expected, strict=True)):
        if p == 0:
            assert count == 0, f"token {token} is outside the reference support"
    total_variation = 0.5 * sum(abs(c / draws - p) for c, p in zip(counts, expected, strict=True))
    assert total_variation < 0.04


def test_gpu_sampling_never_syncs_and_seeded_rows_ignore_their_batch():
    """Every stage of a mixed batch (greedy, seeded, unseeded, bias, min_tokens, penalties,
    top-k/p, min-p) runs without one host sync (torch's sync debug mode raises on any); the
    step's single copy comes after. A seeded row draws the same tokens alone and in a batch."""
    logits = torch.randn(6, SAMPLING_VOCAB, device=DEVICE) * 2
    mixed = [
        SamplingParams(temperature=0.0, logit_bias={3: 1.5}),
        SamplingParams(temperature=0.9, top_k=5, repetition_penalty=1.3),
        SamplingParams(temperature=1.1, top_p=0.8, presence_penalty=0.5, frequency_penalty=0.2),
        SamplingParams(temperature=1.0, min_p=0.1, min_tokens=3),
        SamplingParams(temperature=0.7, logprobs=2),
        SamplingParams(temperature=1.0),
    ]

    def rows(seed_row: int | None, n: int = 6):
        return [
            SamplingRow(
                p,
                [1, 2, 3],
                [4, 4],
                torch.Generator(device=DEVICE).manual_seed(9) if i == seed_row else None,
                (5,),
            )
            for i, p in enumerate(mixed[:n])
        ]

    batch = rows(seed_row=2)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        tokens = sample(logits, batch)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert tokens.shape == (6,)
    step = sample_step(logits, rows(seed_row=2), [p.logprobs for p in mixed])
    assert [e is None for e in step.logprobs] == [True] * 4 + [False, True]
    assert len(step.logprobs[4].top) == 2
    alone = [
        sample_step(logits[2:3], [SamplingRow(mixed[2], [1, 2, 3], [4, 4], g, (5,))]).tokens[0]
        for g in [torch.Generator(device=DEVICE).manual_seed(9)]
    ]
    together = sample_step(logits, rows(seed_row=2)).tokens[2]
    assert alone == [together]


def test_a_queued_steps_tokens_are_read_without_waiting_for_later_device_work():
    """Overlap mode reads step N's tokens while step N+1's forward is queued behind them:
    result() must wait for N's copy only. A long kernel queued after the sampling is still
    running when the tokens are back, and they are the right ones."""
    logits = torch.randn(4, SAMPLING_VOCAB, device=DEVICE)
    greedy = [SamplingRow(SamplingParams(temperature=0.0), [1], [], None) for _ in range(4)]
    queued = queue_step(logits, greedy, [None, 2, None, None])
    torch.cuda._sleep(2_000_000_000)  # about a second of GPU time, queued after the copy
    step = queued.result()
    assert not torch.cuda.current_stream().query()  # the sleep is still running
    assert step.tokens == logits.argmax(-1).tolist()
    assert step.logprobs[1] is not None and len(step.logprobs[1].top) == 2
    torch.cuda.synchronize()


# --- the CUDA runner: captured decode graphs ----------------------------------------
def prefill_chunk(slot: int, tokens: list[int]) -> PrefillChunk:
    request = Request(f"r{slot}", tokens, SamplingParams(max_tokens=4), 0.0)
    return PrefillChunk(request, slot, 0, tuple(tokens), "last")


@pytest.mark.parametrize("preset", PRESETS)
def test_graph_replay_equals_eager_logits_at_every_bucket(preset, caplog):
    """fp32: replaying a captured graph gives the logits of the same padded forward run
    eagerly (to 1e-5), and of the unpadded eager runner (summation order only), for every
    batch size 1..8 (buckets 1, 2, 4, 8: padded ones too) and across a KV-length bucket."""
    max_len, slots = 300, 8  # KV length buckets [256, 300]
    model = build(preset, max_seq_len=512).to(DEVICE)
    eager = EagerRunner(copy.deepcopy(model), slots, max_len)
    twin = GraphRunner(copy.deepcopy(model), slots, max_len, cuda_graphs=False)
    with caplog.at_level(logging.INFO, logger="atlas.engine"):
        graphs = GraphRunner(copy.deepcopy(model), slots, max_len, cuda_graphs=True)
    assert graphs.graph_status == "on (8 graphs)", graphs.graph_status
    assert "captured 8 decode CUDA graphs" in caplog.text
    generator = torch.Generator().manual_seed(0)
    lengths = [3, 40, 17, 250, 9, 5, 30, 2]  # slot 3 crosses into the 300 bucket
    plan = StepPlan(
        prefill=[
            prefill_chunk(s, torch.randint(0, VOCAB, (n,), generator=generator).tolist())
            for s, n in enumerate(lengths)
        ]
    )
    runners = (eager, twin, graphs)
    with torch.inference_mode():
        for runner in runners:
            runner.execute(plan)
        # A decode step through a graph: pinned copies in, one replay, no host sync.
        one = DecodeBatch((), (7, 8, 9), tuple(lengths[:3]), (0, 1, 2))
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            graphs.execute(StepPlan(decode=one))
        finally:
            torch.cuda.set_sync_debug_mode(0)
        for runner in (eager, twin):  # the same step, so the caches stay alike
            runner.execute(StepPlan(decode=one))
        for i in range(3):
            lengths[i] += 1
        for step in range(12):
            n = step % slots + 1
            tokens = torch.randint(0, VOCAB, (n,), generator=generator).tolist()
            batch = DecodeBatch((), tuple(tokens), tuple(lengths[:n]), tuple(range(n)))
            want, same, got = (r.execute(StepPlan(decode=batch)).decode.clone() for r in runners)
            torch.testing.assert_close(got, same, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
            for i in range(n):
                lengths[i] += 1
    for s, n in enumerate(lengths):  # padding rows never touched a real row's KV
        torch.testing.assert_close(graphs.cache.k[0][s, :, :n], eager.cache.k[0][s, :, :n])


@pytest.mark.parametrize("cuda_graphs", [True, False])
def test_a_whole_step_queues_without_a_host_sync(cuda_graphs):
    """What overlap mode needs from a step: slot moves, a prompt chunk mid-prompt, decode
    rows fed the last step's sampled ids, and sampling all queue on the GPU without one
    host sync (torch's sync debug mode raises on any), through graphs and without."""
    max_len, slots = 300, 4
    runner = GraphRunner(build("llama-tiny", max_seq_len=512).to(DEVICE), slots, max_len,
                         cuda_graphs=cuda_graphs)  # fmt: skip
    first = [prefill_chunk(s, list(range(5 + s, 25 + s))) for s in range(3)]
    rest = PrefillChunk(first[2].request, 2, 20, tuple(range(40, 60)), "last")
    greedy = [SamplingRow(SamplingParams(temperature=0.0), [1], [], None) for _ in range(3)]
    with torch.inference_mode():
        runner.execute(StepPlan(prefill=first[:2]))
        runner.execute(StepPlan(prefill=first[2:]))
        sampled = token_ids((2,))  # "the last step's" tokens, on the device
        plan = StepPlan(
            moves=[SlotCopy(0, (3,), 20)],
            decode=DecodeBatch((), (0, 0), (20, 20), (0, 1), sampled_rows=(1, 0)),
            prefill=[rest],
        )
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            logits = runner.execute(plan, sampled)
            queued = queue_step(torch.cat([logits.decode, logits.prefill[0]]), greedy)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert len(queued.result().tokens) == 3
    torch.testing.assert_close(runner.cache.k[0][3, :, :20], runner.cache.k[0][0, :, :20])


def test_engine_on_cuda_uses_graphs_and_cuda_graphs_false_turns_them_off(byte_tokenizer):
    model = varied_model("gpt2-tiny", byte_tokenizer.vocab_size)
    on = Engine(model, byte_tokenizer, EngineConfig(max_running=4))
    off = Engine(model, byte_tokenizer, EngineConfig(max_running=4, cuda_graphs=False))
    try:
        assert isinstance(on.runner, GraphRunner) and on.backend["cuda_graphs"].startswith("on")
        assert isinstance(off.runner, GraphRunner) and off.backend["cuda_graphs"] == "off"
        assert not off.runner._graphs
    finally:
        on.shutdown()
        off.shutdown()


@pytest.mark.parametrize("preset", PRESETS)
def test_graph_engine_greedy_is_the_same_alone_and_at_every_bucket(preset, byte_tokenizer):
    model = varied_model(preset, byte_tokenizer.vocab_size)
    engine = Engine(model, byte_tokenizer, EngineConfig(max_running=8)).start()
    ps = prompts(byte_tokenizer, 8)
    expected = [model.generate(p, GREEDY.max_tokens) for p in ps]

    async def main():
        got = {}
        for size in range(1, 9):  # buckets 1, 2, 4, 8 and the padded sizes between
            results = await asyncio.gather(*(run(engine, p, GREEDY) for p in ps[:size]))
            got[size] = [ids[0] for ids, _, _ in results]
        return got

    got = run_engine(engine, main)
    for size, outputs in got.items():
        assert outputs == expected[:size], f"batch of {size}"


def test_graph_engine_overlap_equals_serial_for_every_sampling_feature(byte_tokenizer):
    """Overlap mode on CUDA (the default: decode rows fed the last step's sampled ids on the
    GPU, into graph replays) gives what serial mode gives, feature by feature."""
    model = varied_model("llama-tiny", byte_tokenizer.vocab_size)
    ps = prompts(byte_tokenizer, 4)
    results = []
    for overlap in (False, True):
        config = EngineConfig(max_running=4, max_batched_tokens=12, overlap=overlap)
        engine = Engine(model, byte_tokenizer, config).start()
        assert engine.overlap is overlap and engine.backend["cuda_graphs"].startswith("on")
        results.append(run_engine(engine, lambda e=engine: feature_mix_outputs(e, ps)))
    assert results[1] == results[0]


def test_two_graph_engines_over_one_model_both_serve_exactly(byte_tokenizer):
    """bench_overlap.py's setup: a second engine over the same model prepares it again; the
    first engine's graphs must still read live weights (the tied head's copy is kept)."""
    model = varied_model("gpt2-tiny", byte_tokenizer.vocab_size)
    first = Engine(model, byte_tokenizer, EngineConfig(max_running=2)).start()
    second = Engine(model, byte_tokenizer, EngineConfig(max_running=2, overlap=False)).start()
    torch.cuda.empty_cache()  # a freed head copy would now be handed out again
    prompt = byte_tokenizer.encode("two engines, one model")
    try:
        got = [asyncio.run(run(e, prompt, GREEDY))[0][0] for e in (first, second)]
    finally:
        second.shutdown(timeout=5)
        first.shutdown(timeout=5)
    assert got == [model.generate(prompt, GREEDY.max_tokens)] * 2


def test_graph_engine_abort_during_replay_frees_the_slot(byte_tokenizer):
    model = varied_model("llama-tiny", byte_tokenizer.vocab_size)
    engine = Engine(model, byte_tokenizer, EngineConfig(max_running=2))
    gate = StepGate(engine)  # decode steps (graph replays) run only when allowed
    engine.start()
    prompt = byte_tokenizer.encode("abort me while I decode")

    async def main():
        stream = engine.submit(prompt, SamplingParams(temperature=0.0, max_tokens=200))
        first = await stream.__anext__()  # from the prefill step
        gate.allow(3)  # three replays
        await wait_for(lambda: engine.stats().generation_tokens_total >= 4)
        await stream.aclose()
        gate.allow()  # a step that may be waiting already; the abort applies after it
        await wait_for(lambda: engine.stats().kv_slots_used == 0)
        stats = engine.stats()
        gate.open()
        # The freed slots serve new requests exactly.
        again = await asyncio.gather(*(run(engine, prompt, GREEDY) for _ in range(2)))
        return first, stats, again

    first, stats, again = run_engine(engine, main)
    assert first.token_ids and not first.finished
    assert stats.running == 0 and stats.generation_tokens_total <= 5
    expected = model.generate(prompt, GREEDY.max_tokens)
    assert [ids[0] for ids, _, _ in again] == [expected, expected]


def test_graph_engine_prefix_caching_and_n_choices(byte_tokenizer):
    model = varied_model("gpt2-tiny", byte_tokenizer.vocab_size)
    engine = Engine(model, byte_tokenizer, EngineConfig(max_running=6)).start()
    prompt = byte_tokenizer.encode("a shared prefix that the second request reuses")
    expected = model.generate(prompt, GREEDY.max_tokens)

    async def main():
        first = await run(engine, prompt, GREEDY)
        second = await run(engine, prompt, GREEDY)
        three = await run(engine, prompt, SamplingParams(temperature=0.0, max_tokens=12, n=3))
        seeded = SamplingParams(temperature=1.0, max_tokens=12, n=3, seed=5)
        return (
            first,
            second,
            three,
            await run(engine, prompt, seeded),
            await run(engine, prompt, seeded),
        )

    first, second, three, s1, s2 = run_engine(engine, main)
    assert first[0][0] == second[0][0] == expected
    assert second[2][-1].num_cached_tokens > 0
    assert [three[0][i] for i in range(3)] == [expected] * 3
    assert s1[0] == s2[0]  # seeded n > 1: every choice repeats


def test_graph_engine_64_streams_with_disconnects_returns_to_idle(byte_tokenizer):
    model = varied_model("llama-tiny", byte_tokenizer.vocab_size)
    engine = Engine(model, byte_tokenizer, EngineConfig(max_running=64)).start()
    ps = [byte_tokenizer.encode(f"stream number {i} says") for i in range(64)]

    async def one(i: int):
        params = SamplingParams(temperature=0.0, max_tokens=24)
        if i % 2:  # every other client disconnects after its first event
            stream = engine.submit(ps[i], params)
            await stream.__anext__()
            await stream.aclose()
            return None
        return (await run(engine, ps[i], params))[0][0]

    async def main():
        results = await asyncio.gather(*(one(i) for i in range(64)))
        await wait_for(lambda: engine.stats().kv_slots_used == 0)
        return results, engine.stats()

    results, stats = run_engine(engine, main)
    assert stats.running == 0 and stats.waiting == 0
    for i in (0, 30, 62):
        assert results[i] == model.generate(ps[i], 24)


def test_bf16_is_the_cuda_default_and_tracks_fp32(tiny_llama_checkpoint):
    bf16 = Engine.from_checkpoint(tiny_llama_checkpoint, EngineConfig(device=DEVICE))
    fp32 = Engine.from_checkpoint(
        tiny_llama_checkpoint, EngineConfig(device=DEVICE, dtype="float32")
    )
    try:
        assert bf16.backend["dtype"] == "bfloat16" and bf16.cache.k[0].dtype == torch.bfloat16
        assert fp32.backend["dtype"] == "float32"
        assert not torch.backends.cuda.matmul.allow_tf32  # TF32 only when asked
        asked = Engine(bf16.model, bf16.tokenizer, EngineConfig(tf32=True, cuda_graphs=False))
        asked.shutdown()
        assert torch.backends.cuda.matmul.allow_tf32  # (the fixture restores it)
        ids = token_ids((2, 24), vocab=bf16.model.config.vocab_size)
        with torch.no_grad():
            assert_tracks(bf16.model(ids), fp32.model(ids).float())
    finally:
        bf16.shutdown()
        fp32.shutdown()


def test_kv_cache_gib_on_cuda_sizes_the_slots(byte_tokenizer):
    model = varied_model("gpt2-tiny", byte_tokenizer.vocab_size)
    per_slot = kv_bytes_per_slot(model.config, model.config.max_seq_len, torch.float32)
    small = EngineConfig(max_running=16, kv_cache_gib=5.5 * per_slot / 2**30)
    engine = Engine(model, byte_tokenizer, small)
    default = Engine(model, byte_tokenizer, EngineConfig(max_running=16))
    try:
        assert engine.cache.n_slots == 5 and engine.config.max_running == 5
        assert engine.runner.batches == [1, 2, 4, 5]
        assert default.cache.n_slots == 16  # half the free memory holds far more
    finally:
        engine.shutdown()
        default.shutdown()


# --- the trainer ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def trainer_api():
    pytest.importorskip("msgspec", reason="trainer/config.py needs msgspec")
    from trainer.config import load_train_config
    from trainer.loop import train

    return SimpleNamespace(load_config=load_train_config, train=train)


@pytest.fixture(scope="module")
def token_data(tmp_path_factory, byte_tokenizer) -> Path:
    """Byte-level token shards of ~120 kB of standard-library text (train and val)."""
    from trainer.data import prepare_data

    root = tmp_path_factory.mktemp("cuda_data")
    corpus = root / "corpus"
    corpus.mkdir()
    for i, text in enumerate(stdlib_sample(120_000, docstring_share=0.5)):
        (corpus / f"doc_{i:04d}.txt").write_text(text, encoding="utf-8")
    tokenizer = byte_tokenizer.save(root / "atlas_tokenizer.json")
    out = root / "tokens"
    prepare_data(
        [str(corpus)],
        tokenizer,
        out,
        val_fraction=0.05,
        shard_tokens=40_000,
        workers=1,
        progress=False,
    )
    return out


def train_config(api, data: Path, out: Path, *extra: str):
    return api.load_config(
        None,
        [
            f'data.path="{data}"',
            f'run.out_dir="{out}"',
            f'run.device="{DEVICE}"',
            'model.preset="gpt2-tiny"',
            "data.seq_len=32",
            "data.micro_batch=4",
            "data.grad_accum=2",
            "schedule.max_steps=8",
            "schedule.warmup_steps=2",
            "optim.lr=2e-3",
            "run.eval_every=4",
            "run.eval_batches=2",
            "run.checkpoint_every=4",
            "run.keep_last=2",
            "run.log_every=2",
            "run.sample_tokens=4",
            "run.tensorboard=false",
            *extra,
        ],
    )


@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    ("precision", "compile_", "preset"),
    [("bf16", False, "gpt2-tiny"), ("fp16", False, "llama-tiny"), ("bf16", True, "llama-tiny")],
    ids=["bf16", "fp16-gradscaler", "bf16-compile"],
)
def test_short_cuda_training_learns_and_saves_a_checkpoint_that_loads_on_cuda(
    trainer_api, token_data, tmp_path, precision, compile_, preset
):
    cfg = train_config(
        trainer_api,
        token_data,
        tmp_path / "run",
        f'run.precision="{precision}"',
        f"run.compile={str(compile_).lower()}",
        f'model.preset="{preset}"',
    )
    summary = trainer_api.train(cfg, progress=False)
    losses = summary["losses"]
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]
    assert math.isfinite(summary["val"]["loss"]) and summary["val"]["loss"] < losses[0]
    state = json.loads((Path(summary["checkpoint"]) / "trainer_state.json").read_text())
    if precision == "fp16":  # the GradScaler ran and its state was saved for resuming
        assert state["scaler"] is not None and math.isfinite(state["scaler"]["scale"])
    else:
        assert state["scaler"] is None
    on_gpu = load_checkpoint(summary["checkpoint"], device=DEVICE)
    on_cpu = load_checkpoint(summary["checkpoint"])
    assert on_gpu.provenance["step"] == 8
    assert all(p.device.type == DEVICE for p in on_gpu.model.parameters())
    ids = token_ids((2, 32), vocab=on_cpu.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(
            on_gpu.model(ids).cpu(), on_cpu.model(ids.cpu()), atol=2e-5, rtol=1e-4
        )


@pytest.mark.timeout(600)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_resume_continues_like_an_uninterrupted_run(
    trainer_api, token_data, tmp_path, precision
):
    """8 steps straight vs 4 steps, resume, 4 more (dropout on: the CUDA RNG state must be
    restored too), in fp32 and in bf16 autocast (issue 16: exact resume in bf16). A
    restore that misses anything (weights, AdamW moments, data position, RNG) moves losses
    by 1e-3 or more; the tolerance only absorbs summation order."""
    # Eager (compile is the CUDA default): two cold compiles would double the test's time in
    # the GPU check's 8 minutes; the compiled step is the bf16-compile case above.
    overrides = (
        "model.overrides={dropout = 0.1}",
        "run.compile=false",
        f'run.precision="{precision}"',
    )
    full = trainer_api.train(
        train_config(trainer_api, token_data, tmp_path / "full", *overrides), progress=False
    )
    checkpoints = tmp_path / "full" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_000004", "step_000008"]
    # The interrupted run: the same directory with only the step-4 checkpoint.
    shutil.copytree(
        tmp_path / "full", tmp_path / "part", ignore=shutil.ignore_patterns("step_000008")
    )
    resumed = trainer_api.train(
        train_config(trainer_api, token_data, tmp_path / "part", *overrides),
        resume=True,
        progress=False,
    )
    assert resumed["start_step"] == 4
    assert resumed["losses"] == pytest.approx(full["losses"][4:], rel=1e-5, abs=1e-6)
    a = load_checkpoint(checkpoints / "step_000008").model.state_dict()
    b = load_checkpoint(tmp_path / "part" / "checkpoints" / "step_000008").model.state_dict()
    for name, tensor in a.items():
        torch.testing.assert_close(b[name], tensor, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("stage", ["sft", "dpo-cached", "dpo-frozen"])
def test_post_training_runs_on_cuda(trainer_api, byte_tokenizer, tmp_path, stage):
    """SFT and DPO (both references) on the GPU: finite losses, DPO's first at log 2
    (policy == reference, so the cached reference was scored on the GPU model it matches)."""
    from posttrain_helpers import (
        chat_records,
        make_base,
        preference_records,
        settings,
        write_jsonl,
    )

    from trainer.posttrain import dpo_task, sft_task

    base = make_base(tmp_path, byte_tokenizer)
    if stage == "sft":
        data = write_jsonl(tmp_path / "chat.jsonl", chat_records())
        extra, task = [f'sft.train=["{data}"]'], sft_task()
    else:
        data = write_jsonl(tmp_path / "prefs.jsonl", preference_records())
        reference = stage.split("-")[1]
        extra, task = [f'dpo.train=["{data}"]', f'dpo.reference="{reference}"'], dpo_task()
    cfg = trainer_api.load_config(
        None,
        settings(base, tmp_path / "run", f'run.device="{DEVICE}"', "run.compile=false", *extra),
    )
    summary = trainer_api.train(cfg, progress=False, task=task)
    assert all(math.isfinite(x) for x in summary["losses"])
    if stage != "sft":
        assert summary["losses"][0] == pytest.approx(math.log(2), abs=1e-3)
