"""The transformer: both attention paths agree, the KV cache reproduces full forwards."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

from atlas_server.model import ConfigError, ModelConfig, Transformer, load_preset, preset_names
from atlas_server.model.onednn import packing_supported
from atlas_server.model.transformer import Linear, apply_rope

COMBOS = list(
    itertools.product(
        ["learned", "sinusoidal", "rope"], ["layernorm", "rmsnorm"], ["gelu", "swiglu"], [4, 2, 1]
    )
)


def tiny(pos, norm, mlp, kv, attention="sdpa", **kw) -> ModelConfig:
    return ModelConfig(
        vocab_size=97,
        n_layers=2,
        d_model=32,
        n_heads=4,
        n_kv_heads=kv,
        max_seq_len=64,
        pos_encoding=pos,
        norm=norm,
        mlp=mlp,
        attention=attention,
        **kw,
    )


def twin_models(config: ModelConfig):
    torch.manual_seed(0)
    ref = Transformer(config.replace(attention="reference")).eval()
    fast = Transformer(config.replace(attention="sdpa")).eval()
    fast.load_state_dict(ref.state_dict())
    return ref, fast


@pytest.mark.parametrize(("pos", "norm", "mlp", "kv"), COMBOS)
def test_reference_and_sdpa_attention_agree(pos, norm, mlp, kv):
    ref, fast = twin_models(tiny(pos, norm, mlp, kv))
    ids = torch.randint(0, 97, (3, 33))
    with torch.no_grad():
        torch.testing.assert_close(fast(ids), ref(ids), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("attention", ["sdpa", "reference"])
@pytest.mark.parametrize(("pos", "norm", "mlp", "kv"), COMBOS[::3])
def test_kv_cache_decoding_equals_full_forward(pos, norm, mlp, kv, attention):
    torch.manual_seed(0)
    model = Transformer(tiny(pos, norm, mlp, kv, attention)).eval()
    ids = torch.randint(0, 97, (3, 30))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(n_slots=5, max_len=40)
        slots = torch.tensor([4, 0, 2])
        # prefill in two chunks of different sizes, then decode token by token
        parts = [
            model(ids[:, :7], torch.arange(7).expand(3, 7), cache, slots),
            model(ids[:, 7:20], torch.arange(7, 20).expand(3, 13), cache, slots),
        ]
        for t in range(20, 30):
            parts.append(model(ids[:, t : t + 1], torch.full((3, 1), t), cache, slots))
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=2e-5, rtol=1e-4)


def test_ragged_batch_rows_at_different_positions_match_their_own_forward():
    torch.manual_seed(0)
    model = Transformer(tiny("rope", "rmsnorm", "swiglu", 2)).eval()
    a, b = torch.randint(0, 97, (1, 12)), torch.randint(0, 97, (1, 5))
    cache = model.new_cache(n_slots=2, max_len=32)
    with torch.no_grad():
        model(a[:, :11], torch.arange(11)[None], cache, torch.tensor([0]))
        model(b[:, :4], torch.arange(4)[None], cache, torch.tensor([1]))
        # one decode step for both sequences, at positions 11 and 4
        step = model(
            torch.cat([a[:, 11:], b[:, 4:]]), torch.tensor([[11], [4]]), cache, torch.tensor([0, 1])
        )
        torch.testing.assert_close(step[0, -1], model(a)[0, -1], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(step[1, -1], model(b)[0, -1], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_forward_tracks_fp32(dtype):
    torch.manual_seed(0)
    model = Transformer(tiny("rope", "rmsnorm", "swiglu", 2)).eval()
    ids = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        ref = model(ids)
        low = model.to(dtype)(ids)
    assert low.dtype == dtype
    assert (low.float() - ref).abs().max() < 0.05 * ref.abs().max()


def test_prepare_for_inference_keeps_logits_and_tied_head():
    torch.manual_seed(0)
    model = Transformer(tiny("learned", "layernorm", "gelu", 4)).eval()
    ids = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        before = model(ids)
        after = model.prepare_for_inference(pack=False)(ids)
    torch.testing.assert_close(before, after)
    assert model.output_weight().is_contiguous()
    # Again with the weights unchanged: the same copy (a captured CUDA graph reads it).
    head = model._tied_head_t
    assert model.prepare_for_inference(pack=False)._tied_head_t is head
    with torch.no_grad():
        model.tok_emb.weight.mul_(2.0)  # an in-place change: the copy is stale, remade
        changed = model.prepare_for_inference(pack=False)._tied_head_t
    assert changed is not head
    torch.testing.assert_close(changed, 2.0 * head)


class _Recorded:
    """An inference copy that notes each use of itself."""

    def __init__(self, inner, ran: list) -> None:
        self.inner, self.ran = inner, ran

    def usable_for(self, x):
        return self.inner.usable_for(x)

    def __call__(self, *args):
        self.ran.append(self)
        return self.inner(*args)


@pytest.mark.parametrize(
    "config",
    [
        tiny("learned", "layernorm", "gelu", 4),
        tiny("rope", "rmsnorm", "swiglu", 2, tie_embeddings=False),
    ],
)
@pytest.mark.skipif(not packing_supported(torch.empty(1)), reason="PyTorch built without oneDNN")
def test_onednn_packed_weights_give_the_same_logits_and_step_aside_when_stale(config):
    torch.manual_seed(0)
    model = Transformer(config).eval()
    ids = torch.randint(0, 97, (3, 9))
    with torch.no_grad():
        before = model(ids)
        model.prepare_for_inference()
        packed = [m for m in model.modules() if getattr(m, "packed", None) is not None]
        assert len(packed) == sum(isinstance(m, Linear) for m in model.modules())
        assert (model._packed_head is not None) == config.tie_embeddings
        # Every projection, an untied head included, runs through its copy.
        ran = []
        for m in packed:
            m.packed = _Recorded(m.packed, ran)
        torch.testing.assert_close(model(ids), before, atol=1e-5, rtol=1e-5)
        assert sorted(map(id, ran)) == sorted(id(m.packed) for m in packed)
        for m in packed:
            m.packed = m.packed.inner
        # Incremental decode through the packed path equals the full forward.
        cache = model.new_cache(3, 16)
        slots, pos = torch.arange(3), torch.arange(9).expand(3, 9)
        model(ids[:, :5], pos[:, :5], cache, slots)
        step = model(ids[:, 5:], pos[:, 5:], cache, slots)
        torch.testing.assert_close(step, before[:, 5:], atol=1e-5, rtol=1e-5)
        # In-place changes (an optimizer step, load_state_dict) make the packed copies stale.
        for p in model.parameters():
            p.mul_(1.5)
        fresh = Transformer(config).eval()
        fresh.load_state_dict(model.state_dict())
        torch.testing.assert_close(model(ids), fresh(ids))
    # With gradients recorded the live weights are used, so backward works.
    model.prepare_for_inference()
    model(ids).sum().backward()
    assert model.blocks[0].mlp.w_in.weight.grad is not None
    copied = copy.deepcopy(model)
    with torch.no_grad():
        torch.testing.assert_close(copied(ids), model(ids))


def test_training_loss_is_next_token_cross_entropy():
    torch.manual_seed(0)
    model = Transformer(tiny("learned", "layernorm", "gelu", 4))
    ids = torch.randint(0, 97, (2, 10))
    loss = model.loss(ids[:, :-1], ids[:, 1:])
    expected = torch.nn.functional.cross_entropy(
        model(ids[:, :-1]).reshape(-1, 97), ids[:, 1:].reshape(-1)
    )
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_position_past_max_seq_len_is_refused():
    model = Transformer(tiny("learned", "layernorm", "gelu", 4))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 65, dtype=torch.long))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"d_model": 30}, "divisible"),
        ({"n_kv_heads": 3}, "multiple"),
        ({"norm": "batchnorm"}, "norm"),
        ({"dropout": 1.5}, "dropout"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"pos_encoding": "rope", "rotary_dim": 3}, "even number of rotated dims"),
        ({"pos_encoding": "rope", "rotary_dim": 16}, "1..head_dim"),
        ({"rotary_dim": 4}, "pos_encoding='rope' only"),
        ({"mlp": "relu"}, "mlp"),
        # Wrong JSON types in a hand-edited config.json: "no" is truthy, "x" is no width.
        ({"tie_embeddings": "no"}, "tie_embeddings must be bool, got 'no'"),
        ({"d_model": "x"}, "d_model must be int, got 'x'"),
        ({"norm_eps": "a"}, "norm_eps must be int or float"),
        ({"n_layers": True}, "n_layers must be int, got True"),
    ],
)
def test_invalid_configs_name_the_problem(change, message):
    with pytest.raises(ConfigError, match=message):
        tiny("learned", "layernorm", "gelu", 4).replace(**change)


def test_unknown_config_key_is_refused():
    with pytest.raises(ConfigError, match="unknown model config keys"):
        ModelConfig.from_dict({**tiny("rope", "rmsnorm", "gelu", 4).to_dict(), "n_expertz": 4})


@pytest.mark.parametrize("name", preset_names())
def test_presets_build_and_have_the_documented_size(name):
    config = load_preset(name)
    with torch.device("meta"):
        n = Transformer(config).num_parameters()
    expected_millions = {"tiny": (0.05, 1), "mini": (2, 10), "50m": (45, 65), "124m": (115, 135)}[
        name.split("-")[1]
    ]
    assert expected_millions[0] <= n / 1e6 <= expected_millions[1]


def test_gpt2_124m_and_llama_124m_have_the_parameter_count_of_transformers():
    transformers = pytest.importorskip("transformers")
    gpt2, llama = load_preset("gpt2-124m"), load_preset("llama-124m")
    with torch.device("meta"):
        ours = [Transformer(gpt2).num_parameters(), Transformer(llama).num_parameters()]
        theirs = [
            transformers.GPT2LMHeadModel(transformers.GPT2Config()).num_parameters(),
            transformers.LlamaForCausalLM(
                transformers.LlamaConfig(
                    vocab_size=llama.vocab_size,
                    hidden_size=llama.d_model,
                    intermediate_size=llama.ff_dim,
                    num_hidden_layers=llama.n_layers,
                    num_attention_heads=llama.n_heads,
                    num_key_value_heads=llama.n_kv_heads,
                    tie_word_embeddings=False,
                )
            ).num_parameters(),
        ]
    assert ours == theirs


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_kv_cache_decoding_tracks_the_full_forward(dtype):
    torch.manual_seed(0)
    model = Transformer(tiny("rope", "rmsnorm", "swiglu", 2)).eval().to(dtype)
    ids = torch.randint(0, 97, (2, 12))
    cache = model.new_cache(n_slots=2, max_len=16)
    slots = torch.tensor([0, 1])
    with torch.no_grad():
        full = model(ids).float()
        parts = [model(ids[:, :8], torch.arange(8).expand(2, 8), cache, slots)]
        parts += [
            model(ids[:, t : t + 1], torch.full((2, 1), t), cache, slots) for t in range(8, 12)
        ]
    assert cache.k[0].dtype == dtype
    got = torch.cat(parts, 1).float()
    assert (got - full).abs().max() < 0.05 * full.abs().max()
    assert (got.argmax(-1) == full.argmax(-1)).float().mean() > 0.9


def test_dropout_is_active_in_training_only():
    torch.manual_seed(0)
    model = Transformer(tiny("learned", "layernorm", "gelu", 4, dropout=0.5))
    ids = torch.randint(0, 97, (1, 16))
    assert not torch.equal(model.train()(ids), model(ids))
    with torch.no_grad():
        assert torch.equal(model.eval()(ids), model(ids))


def test_prepared_tied_head_follows_dtype_changes_and_is_not_used_in_training():
    torch.manual_seed(0)
    model = Transformer(tiny("learned", "layernorm", "gelu", 4)).prepare_for_inference()
    assert "_tied_head_t" not in model.state_dict()
    ids = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        low = model.to(torch.bfloat16)(ids)
        expected = Transformer(model.config).to(torch.bfloat16)
        expected.load_state_dict(model.state_dict())
        torch.testing.assert_close(low, expected.eval()(ids))
    model.float().train()
    with torch.no_grad():
        model.tok_emb.weight.mul_(2)
    assert torch.equal(model.output_weight(), model.tok_emb.weight.t())


@pytest.mark.skipif(not packing_supported(torch.empty(1)), reason="PyTorch built without oneDNN")
def test_onednn_training_matmul_matches_autograd_through_plain_matmul():
    """train_matmul's forward and all three gradients equal PyTorch's own matmul's."""
    from atlas_server.model.onednn import train_matmul

    torch.manual_seed(0)
    x = torch.randn(3, 7, 24, requires_grad=True)
    weight = torch.randn(40, 24).t().requires_grad_()  # a transposed view, like the tied head
    bias = torch.randn(40, requires_grad=True)
    upstream = torch.randn(3, 7, 40)
    ours = train_matmul(x, weight, bias)
    assert ours is not None
    ours.backward(upstream)
    got = [ours.detach(), x.grad, weight.grad, bias.grad]
    for t in (x, weight, bias):
        t.grad = None
    (x @ weight + bias).backward(upstream)
    want = [(x @ weight + bias).detach(), x.grad, weight.grad, bias.grad]
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)
    with torch.no_grad():
        assert train_matmul(x, weight, bias) is None  # nothing to differentiate: caller's path
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert train_matmul(x, weight, bias) is None  # autocast decides precision there


@pytest.mark.skipif(not packing_supported(torch.empty(1)), reason="PyTorch built without oneDNN")
def test_model_gradients_are_the_same_with_and_without_onednn(monkeypatch):
    torch.manual_seed(0)
    model = Transformer(tiny("learned", "layernorm", "gelu", 4))
    ids = torch.randint(0, 97, (2, 12))
    grads = []
    for flag in ("1", "0"):
        monkeypatch.setenv("ATLAS_ONEDNN", flag)
        through_onednn = type(model(ids).grad_fn).__name__ == "_TrainMatmulBackward"
        assert through_onednn == (flag == "1")
        model.zero_grad(set_to_none=True)
        model.loss(ids[:, :-1], ids[:, 1:]).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.skipif(
    not packing_supported(torch.empty(1, dtype=torch.bfloat16)), reason="no oneDNN bf16 here"
)
def test_onednn_packed_bf16_weights_match_plain_bf16_matmuls():
    torch.manual_seed(0)
    model = Transformer(tiny("rope", "rmsnorm", "swiglu", 2)).to(torch.bfloat16).eval()
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        plain = model.prepare_for_inference(pack=False)(ids).float()
        packed = model.prepare_for_inference()(ids).float()
    assert model.blocks[0].attn.wqkv.packed is not None
    assert (packed - plain).abs().max() <= 0.05 * plain.abs().max()


@pytest.mark.parametrize(
    "config", [tiny("learned", "layernorm", "gelu", 4), tiny("rope", "rmsnorm", "swiglu", 2)]
)
def test_forward_segments_equals_separate_forwards(config):
    """Decode rows and prompt chunks in one flattened forward give the logits (and the KV
    cache contents) that separate batched forwards give."""
    from atlas_server.model.transformer import Segment

    torch.manual_seed(0)
    model = Transformer(config).prepare_for_inference()
    prompts = torch.randint(0, 97, (3, 12))
    with torch.no_grad():
        apart, together = model.new_cache(4, 32), model.new_cache(4, 32)
        for cache in (apart, together):  # slots 0-1 hold 8 prompt tokens already
            model(prompts[:2, :8], torch.arange(8).expand(2, 8), cache, torch.tensor([0, 1]))
        decode_pos = torch.tensor([[8], [8]])
        want_decode = model(prompts[:2, 8:9], decode_pos, apart, torch.tensor([0, 1]))[:, -1]
        # slot 3: a new prompt's first chunk of 5 tokens
        want_chunk = model(prompts[2:, :5], torch.arange(5)[None], apart, torch.tensor([3]))[0]
        segments = [
            Segment(0, 2, 2, 1, torch.tensor([0, 1]), decode_pos),
            Segment(2, 7, 1, 5, torch.tensor([3]), torch.arange(5)[None]),
        ]
        idx = torch.cat([prompts[:2, 8], prompts[2, :5]])
        got = model.forward_segments(idx, segments, together, torch.tensor([0, 1, 2, 3, 4, 5, 6]))
    torch.testing.assert_close(got[:2], want_decode, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[2:], want_chunk, atol=1e-5, rtol=1e-5)
    for layer in range(config.n_layers):
        torch.testing.assert_close(together.k[layer][:, :, :9], apart.k[layer][:, :, :9])
        torch.testing.assert_close(together.v[layer][:, :, :9], apart.v[layer][:, :, :9])


@pytest.mark.parametrize(
    "config", [tiny("learned", "layernorm", "gelu", 4), tiny("rope", "rmsnorm", "swiglu", 2)]
)
def test_a_prompt_chunk_at_position_0_attends_causally_without_reading_the_cache(config):
    """The engine's first chunk of a prompt (kv_length == its length) runs plain causal
    attention over its own keys: the logits of the uncached forward, the same cache
    contents, and no cache read; a later chunk of the same prompt still reads the cache."""
    from atlas_server.model.transformer import Segment

    torch.manual_seed(0)
    model = Transformer(config).prepare_for_inference()
    prompt = torch.randint(0, 97, (1, 11))
    cache = model.new_cache(2, 32)
    reads: list[int] = []
    read = cache.read

    def spy(layer, *args, **kwargs):
        reads.append(layer)
        return read(layer, *args, **kwargs)

    cache.read = spy
    with torch.no_grad():
        want = model(prompt)[0]  # [11, V], no cache at all
        first = Segment(0, 7, 1, 7, torch.tensor([1]), torch.arange(7)[None], kv_length=7)
        got_first = model.forward_segments(prompt[0, :7], [first], cache, torch.arange(7))
        assert reads == []
        rest = Segment(0, 4, 1, 4, torch.tensor([1]), torch.arange(7, 11)[None], kv_length=11)
        got_rest = model.forward_segments(prompt[0, 7:], [rest], cache, torch.arange(4))
        assert reads == list(range(config.n_layers))
    torch.testing.assert_close(got_first, want[:7], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_rest, want[7:], atol=1e-5, rtol=1e-5)


# --- the options imported architectures need: Qwen2's q/k/v bias, GPT-NeoX's partial rotary
# and parallel residual, exact GELU (references: tests/test_hf_import.py, against transformers)
NEW_SHAPES = {
    "qwen2": tiny("rope", "rmsnorm", "swiglu", 2, bias=False, qkv_bias=True),
    "neox": tiny("rope", "layernorm", "gelu_exact", 4, rotary_dim=2, parallel_residual=True),
    "neox-sequential": tiny("rope", "layernorm", "gelu", 4, rotary_dim=4),
}


def _spread(model: Transformer) -> Transformer:
    with torch.no_grad():  # non-zero biases and bigger weights, so each option shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


@pytest.mark.parametrize("name", NEW_SHAPES)
def test_new_options_shape_the_parameters(name):
    model = Transformer(NEW_SHAPES[name])
    attn = model.blocks[0].attn
    assert (attn.wqkv.bias is not None) is True  # qwen2: qkv_bias; neox: bias
    assert (attn.wo.bias is not None) == NEW_SHAPES[name].bias
    assert model.rope_cos.shape[-1] == NEW_SHAPES[name].rope_dims


def test_partial_rotary_leaves_the_other_dims_alone_and_parallel_residual_differs():
    """Positions change only the rotated dims of q and k; the parallel residual is not the
    sequential block."""
    torch.manual_seed(0)
    config = NEW_SHAPES["neox"]
    model = _spread(Transformer(config)).eval()
    attn = model.blocks[0].attn
    x = torch.randn(1, 1, config.d_model)
    qkv = attn.wqkv(x)  # one token, seen at position 0 and at position 5
    H, D, R = config.n_heads, config.head_dim, config.rope_dims
    outs = []
    for pos in (0, 5):
        q = qkv[..., : H * D].view(1, 1, H, D)
        cos, sin = model.rope_cos[pos].view(1, 1, 1, R), model.rope_sin[pos].view(1, 1, 1, R)
        outs.append(torch.cat([apply_rope(q[..., :R], cos, sin), q[..., R:]], -1))
    assert torch.equal(outs[0][..., R:], outs[1][..., R:])
    assert not torch.allclose(outs[0][..., :R], outs[1][..., :R])
    ids = torch.randint(0, 97, (2, 12))
    sequential = Transformer(config.replace(parallel_residual=False)).eval()
    sequential.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert not torch.allclose(model(ids), sequential(ids), atol=1e-3)


@pytest.mark.parametrize("name", NEW_SHAPES)
@pytest.mark.parametrize("pack", [False, True])
def test_new_options_decode_with_the_kv_cache_and_cpu_kernels_like_the_full_forward(name, pack):
    torch.manual_seed(0)
    model = _spread(Transformer(NEW_SHAPES[name])).eval()
    ids = torch.randint(0, 97, (3, 20))
    with torch.no_grad():
        full = model(ids)
        model.prepare_for_inference(pack=pack)  # C kernels / oneDNN copies carry the biases
        if pack:
            assert model.blocks[0].attn.wqkv.packed is not None or not packing_supported(
                model.blocks[0].attn.wqkv.weight
            )
        cache = model.new_cache(n_slots=4, max_len=24)
        slots = torch.tensor([3, 0, 1])
        parts = [model(ids[:, :9], torch.arange(9).expand(3, 9), cache, slots)]
        for t in range(9, 20):  # one token per row: the C decode-attention kernel
            parts.append(model(ids[:, t : t + 1], torch.full((3, 1), t), cache, slots))
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", NEW_SHAPES)
def test_new_options_forward_segments_equal_separate_forwards(name):
    """The engine's flattened step (decode rows and a prompt chunk together)."""
    from atlas_server.model.transformer import Segment

    torch.manual_seed(0)
    model = _spread(Transformer(NEW_SHAPES[name])).prepare_for_inference()
    prompts = torch.randint(0, 97, (3, 12))
    with torch.no_grad():
        apart, together = model.new_cache(4, 32), model.new_cache(4, 32)
        for cache in (apart, together):
            model(prompts[:2, :8], torch.arange(8).expand(2, 8), cache, torch.tensor([0, 1]))
        decode_pos = torch.tensor([[8], [8]])
        want_decode = model(prompts[:2, 8:9], decode_pos, apart, torch.tensor([0, 1]))[:, -1]
        want_chunk = model(prompts[2:, :5], torch.arange(5)[None], apart, torch.tensor([3]))[0]
        segments = [
            Segment(0, 2, 2, 1, torch.tensor([0, 1]), decode_pos),
            Segment(2, 7, 1, 5, torch.tensor([3]), torch.arange(5)[None]),
        ]
        idx = torch.cat([prompts[:2, 8], prompts[2, :5]])
        got = model.forward_segments(idx, segments, together, torch.arange(7))
    torch.testing.assert_close(got[:2], want_decode, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[2:], want_chunk, atol=1e-5, rtol=1e-5)


def test_configs_without_the_new_keys_load_with_the_old_behaviour():
    old = tiny("rope", "rmsnorm", "swiglu", 2).to_dict()
    for key in ("qkv_bias", "rotary_dim", "parallel_residual"):
        del old[key]
    config = ModelConfig.from_dict(old)
    assert config.rope_dims == config.head_dim and config.has_qkv_bias == config.bias
    assert not config.parallel_residual
