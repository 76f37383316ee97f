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
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from hf_models import hf_gpt2, hf_llama
from test_engine import GREEDY, prompts, run
from torch.nn.attention import SDPBackend, sdpa_kernel

from atlas_server.checkpoint import load_checkpoint
from atlas_server.engine import Engine, EngineConfig, SamplingParams
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
    config = EngineConfig(max_running=2, device=DEVICE)
    engine = Engine.from_checkpoint(tiny_llama_checkpoint, config).start()
    assert all(p.device.type == DEVICE for p in engine.model.parameters())
    prompt = engine.tokenizer.encode("from a checkpoint")
    ids, _, _ = run_engine(engine, lambda: run(engine, prompt, GREEDY))
    assert ids[0] == engine.model.generate(prompt, GREEDY.max_tokens)


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
def test_cuda_resume_continues_like_an_uninterrupted_run(trainer_api, token_data, tmp_path):
    """8 steps straight vs 4 steps, resume, 4 more (dropout on: the CUDA RNG state must be
    restored too). A restore that misses anything (weights, AdamW moments, data position,
    RNG) moves losses by 1e-3 or more; the tolerance only absorbs summation order."""
    dropout = "model.overrides={dropout = 0.1}"
    full = trainer_api.train(
        train_config(trainer_api, token_data, tmp_path / "full", dropout), progress=False
    )
    checkpoints = tmp_path / "full" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_000004", "step_000008"]
    # The interrupted run: the same directory with only the step-4 checkpoint.
    shutil.copytree(
        tmp_path / "full", tmp_path / "part", ignore=shutil.ignore_patterns("step_000008")
    )
    resumed = trainer_api.train(
        train_config(trainer_api, token_data, tmp_path / "part", dropout),
        resume=True,
        progress=False,
    )
    assert resumed["start_step"] == 4
    assert resumed["losses"] == pytest.approx(full["losses"][4:], rel=1e-5, abs=1e-6)
    a = load_checkpoint(checkpoints / "step_000008").model.state_dict()
    b = load_checkpoint(tmp_path / "part" / "checkpoints" / "step_000008").model.state_dict()
    for name, tensor in a.items():
        torch.testing.assert_close(b[name], tensor, atol=1e-5, rtol=1e-4, msg=name)
