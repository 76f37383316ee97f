"""The one-call decode step (atlas_server/model/decode_stack.py) against the model's other paths.

References: the full forward over the whole sequence, with no cache (PyTorch's SDPA and
the prompt-shaped products), and the block-by-block decode (`ATLAS_DECODE_STACK=0`).
"""

from __future__ import annotations

import asyncio
import copy

import pytest
import torch
from test_model import tiny

from atlas_server.model import Transformer, native
from atlas_server.model.decode_stack import DecodeStack

pytestmark = pytest.mark.skipif(not native.available(), reason="no C compiler here")

ARCHITECTURES = {
    "llama, grouped-query": tiny("rope", "rmsnorm", "swiglu", 2, bias=False),
    "gpt2, learned positions": tiny("learned", "layernorm", "gelu", None),
    "neox, partial rope, parallel residual, exact gelu": tiny(
        "rope", "layernorm", "gelu_exact", None, rotary_dim=4, parallel_residual=True
    ),
    "qwen2, q|k|v bias only, one kv head": tiny(
        "rope", "rmsnorm", "swiglu", 1, bias=False, qkv_bias=True
    ),
    "sinusoidal, layernorm without bias": tiny("sinusoidal", "layernorm", "swiglu", 4, bias=False),
}


def varied(config, seed: int = 0) -> Transformer:
    """A prepared model whose random weights (biases and norm gains too) are far from their
    initial values, so every parameter moves the logits."""
    torch.manual_seed(seed)
    model = Transformer(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model.prepare_for_inference()


def decode(model, ids, slots, cache, start: int) -> torch.Tensor:
    """Prefill ids[:, :start] into the slots, then decode the rest one token a step: the
    logits of every decoded position, [B, T - start, V]."""
    B, T = ids.shape
    with torch.inference_mode():
        model(ids[:, :start], torch.arange(start).expand(B, start), cache, slots)
        steps = [
            model(ids[:, t : t + 1], torch.full((B, 1), t), cache, slots)[:, 0]
            for t in range(start, T)
        ]
    return torch.stack(steps, 1)


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_one_call_step_equals_full_forward_and_block_by_block(name, monkeypatch):
    model = varied(ARCHITECTURES[name])
    ids = torch.randint(0, 97, (3, 24), generator=torch.Generator().manual_seed(1))
    slots = torch.tensor([4, 0, 2])  # any slots, not in order
    cache = model.new_cache(5, 32)
    got = decode(model, ids, slots, cache, start=9)
    assert model._decode_stack is not None, "the decode steps did not take the one-call path"
    with torch.inference_mode():
        full = model(ids)[:, 9:]  # [3, 15, V]: no cache at all
    torch.testing.assert_close(got, full, atol=2e-5, rtol=1e-5)

    monkeypatch.setenv("ATLAS_DECODE_STACK", "0")
    block_cache = model.new_cache(5, 32)
    by_block = decode(model, ids, slots, block_cache, start=9)
    torch.testing.assert_close(got, by_block, atol=2e-5, rtol=1e-5)
    for stored, expected in zip(cache.k + cache.v, block_cache.k + block_cache.v, strict=True):
        torch.testing.assert_close(stored, expected, atol=1e-5, rtol=1e-5)


def test_rows_of_different_lengths_get_what_they_get_alone():
    """Each row reads only its own slot's positions, and its numbers do not depend on the
    batch (same kernels, same order of sums): bit for bit."""
    model = varied(ARCHITECTURES["llama, grouped-query"])
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 97, (1, n), generator=gen) for n in (3, 17, 9)]
    cache = model.new_cache(6, 32)
    slots = [5, 1, 3]
    alone = []
    with torch.inference_mode():
        for prompt, slot in zip(prompts, slots, strict=True):
            model(prompt, torch.arange(prompt.shape[1])[None], cache, torch.tensor([slot]))
        token = torch.tensor([[7], [8], [9]])
        positions = torch.tensor([[3], [17], [9]])
        before = [t.clone() for t in cache.k + cache.v]
        together = model(token, positions, cache, torch.tensor(slots))[:, 0]  # [3, V]
        for b, slot in enumerate(slots):
            for t, saved in zip(cache.k + cache.v, before, strict=True):
                t.copy_(saved)
            alone.append(model(token[b : b + 1], positions[b : b + 1], cache, torch.tensor([slot])))
    assert torch.equal(together, torch.cat(alone)[:, 0])


def test_out_of_range_slot_or_position_changes_nothing():
    model = varied(ARCHITECTURES["gpt2, learned positions"])
    cache = model.new_cache(2, 16)
    stack = DecodeStack.build(model, cache)
    assert stack is not None
    x = torch.randn(2, 32)
    kept_x, kept_cache = x.clone(), [t.clone() for t in cache.k + cache.v]
    for slots, positions, bad in (([0, 2], [3, 3], "row 1: slot 2"), ([1, 0], [16, 0], "row 0")):
        with pytest.raises(IndexError, match=bad):
            stack(x, torch.tensor(positions), torch.tensor(slots))
    assert torch.equal(x, kept_x)
    assert all(torch.equal(a, b) for a, b in zip(cache.k + cache.v, kept_cache, strict=True))
    with pytest.raises(ValueError, match="unsupported shapes"):
        stack(torch.randn(2, 31), torch.tensor([0, 0]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="unsupported shapes"):  # one position short
        stack(torch.randn(2, 32), torch.tensor([0]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="contiguous float32 CPU tensor"):
        stack(torch.randn(2, 32, dtype=torch.float64), torch.tensor([0, 0]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="contiguous float32 CPU tensor"):
        stack(torch.randn(32, 2).t(), torch.tensor([0, 0]), torch.tensor([0, 1]))
    assert torch.equal(x, kept_x)


def test_changed_weights_are_never_read_stale():
    """A projection changed in place makes its panel copy stale: decoding steps aside to
    the live weights until the model is prepared again, and then takes the one call again."""
    model = varied(ARCHITECTURES["llama, grouped-query"])
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(3))
    slots = torch.tensor([0, 1])
    cache = model.new_cache(2, 16)  # one cache throughout: only the weights change
    decode(model, ids, slots, cache, start=6)
    assert model._decode_stack is not None
    with torch.no_grad():
        model.blocks[1].mlp.w_out.weight.mul_(-1.5)
    got = decode(model, ids, slots, cache, start=6)
    assert model._decode_stack is None
    with torch.inference_mode():
        torch.testing.assert_close(got, model(ids)[:, 6:], atol=2e-5, rtol=1e-5)
    model.prepare_for_inference()
    again = decode(model, ids, slots, cache, start=6)
    assert model._decode_stack is not None
    torch.testing.assert_close(again, got, atol=2e-5, rtol=1e-5)


def test_norms_and_biases_changed_in_place_are_read_fresh():
    """Norm gains and biases have no inference copy: a change to one in place must reach
    the next step as it does on the block-by-block path."""
    model = varied(ARCHITECTURES["neox, partial rope, parallel residual, exact gelu"])
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(8))
    slots, cache = torch.tensor([1, 0]), model.new_cache(2, 16)
    decode(model, ids, slots, cache, start=6)
    with torch.no_grad():
        model.blocks[0].mlp_norm.weight.add_(0.5)
        model.blocks[1].attn.wo.bias.mul_(-2.0)
    got = decode(model, ids, slots, cache, start=6)
    assert model._decode_stack is not None
    with torch.inference_mode():
        torch.testing.assert_close(got, model(ids)[:, 6:], atol=2e-5, rtol=1e-5)


def test_a_new_prepare_for_inference_is_followed():
    """Copies made anew (here from a weight swapped for another tensor, which PyTorch's
    version counters do not see) replace the ones the stack was built from."""
    model = varied(ARCHITECTURES["qwen2, q|k|v bias only, one kv head"])
    ids = torch.randint(0, 97, (1, 10), generator=torch.Generator().manual_seed(7))
    cache = model.new_cache(1, 16)
    decode(model, ids, torch.tensor([0]), cache, start=5)
    first = model._decode_stack
    with torch.no_grad():
        wqkv = model.blocks[0].attn.wqkv
        wqkv.weight = torch.nn.Parameter(wqkv.weight * 0.5)
    model.prepare_for_inference()
    got = decode(model, ids, torch.tensor([0]), cache, start=5)
    assert model._decode_stack is not None and model._decode_stack is not first
    with torch.inference_mode():
        torch.testing.assert_close(got, model(ids)[:, 5:], atol=2e-5, rtol=1e-5)


def test_models_it_does_not_cover_keep_their_own_path():
    from trainer.lora import LoRAConfig, apply_lora

    reference = varied(tiny("rope", "rmsnorm", "swiglu", 2, attention="reference", bias=False))
    assert DecodeStack.build(reference, reference.new_cache(1, 8)) is None
    unpacked = varied(ARCHITECTURES["llama, grouped-query"]).prepare_for_inference(pack=False)
    assert DecodeStack.build(unpacked, unpacked.new_cache(1, 8)) is None
    other_eps = varied(ARCHITECTURES["gpt2, learned positions"])
    other_eps.blocks[1].mlp_norm.eps = 1e-2  # the C function takes one eps for every norm
    assert DecodeStack.build(other_eps, other_eps.new_cache(1, 8)) is None
    model = varied(ARCHITECTURES["llama, grouped-query"])
    ids = torch.randint(0, 97, (1, 10), generator=torch.Generator().manual_seed(4))
    decode(model, ids, torch.tensor([0]), model.new_cache(1, 16), start=5)
    assert model._decode_stack is not None
    apply_lora(model, LoRAConfig(rank=2, targets=["attn.wqkv"]))
    with torch.no_grad():  # a trained adapter: B starts at zero
        for name, p in model.named_parameters():
            if "lora" in name:
                p.normal_(0, 0.5)
    model.eval()
    got = decode(model, ids, torch.tensor([0]), model.new_cache(1, 16), start=5)
    assert model._decode_stack is None
    with torch.inference_mode():
        torch.testing.assert_close(got, model(ids)[:, 5:], atol=2e-5, rtol=1e-5)


def test_train_mode_decodes_block_by_block(monkeypatch):
    """Dropout applies in train mode, which the one call does not do: a stack built in eval
    mode must not be used once the model is back in train mode."""
    calls = []
    monkeypatch.setattr(DecodeStack, "__call__", lambda *a: calls.append(1))
    model = varied(ARCHITECTURES["gpt2, learned positions"].replace(dropout=0.5))
    ids = torch.randint(0, 97, (1, 8), generator=torch.Generator().manual_seed(6))
    cache = model.new_cache(1, 8)  # the same cache: the stack stays current
    decode(model, ids, torch.tensor([0]), cache, start=4)
    assert len(calls) == 4  # eval mode: every decode step in one call
    model.train()
    decode(model, ids, torch.tensor([0]), cache, start=4)
    assert len(calls) == 4


def test_a_copied_model_builds_its_own_stack():
    model = varied(ARCHITECTURES["gpt2, learned positions"])
    ids = torch.randint(0, 97, (1, 8), generator=torch.Generator().manual_seed(5))
    first = decode(model, ids, torch.tensor([0]), model.new_cache(1, 8), start=4)
    twin = copy.deepcopy(model)
    assert twin._decode_stack is None
    torch.testing.assert_close(
        decode(twin, ids, torch.tensor([0]), twin.new_cache(1, 8), start=4), first
    )
    assert twin._decode_stack is not None and twin._decode_stack is not model._decode_stack


def test_engine_decodes_through_the_one_call_step(varied_model, make_engine):
    """The engine's decode-only steps (forward_segments with one segment of one-token rows)
    take the one call, and its greedy output is the full forward's argmax, step by step."""
    from atlas_server.engine import SamplingParams

    model = varied_model.model
    engine = make_engine(max_running=4, max_batched_tokens=64)
    prompts = [[10, 20, 30], [40, 50, 60, 70, 80, 90, 100], [5]]
    params = SamplingParams(temperature=0.0, max_tokens=6)

    async def one(prompt):
        return [t async for e in engine.submit(prompt, params) for t in e.token_ids]

    async def all_of():
        return await asyncio.gather(*(one(p) for p in prompts))

    got = asyncio.run(all_of())
    assert engine.runner.model._decode_stack is not None
    for prompt, tokens in zip(prompts, got, strict=True):
        ids = list(prompt)
        with torch.inference_mode():
            for _ in range(6):
                ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
        assert tokens == ids[len(prompt) :]
