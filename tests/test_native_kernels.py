"""The native CPU kernels (atlas_server/model/native.py) against PyTorch's own operations."""

from __future__ import annotations

import logging
import platform
import subprocess
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from test_model import tiny

from atlas_server.model import Transformer, native
from atlas_server.model.attention import reference_attention
from atlas_server.model.decode_stack import DecodeStack
from atlas_server.model.transformer import Linear, apply_rope, rope_tables

needs_kernel = pytest.mark.skipif(not native.available(), reason="no C compiler here")


@pytest.fixture
def reload_library(monkeypatch):
    """The library is loaded once per process: forget it around a test that changes how,
    which starts from the default settings whatever the environment sets."""
    monkeypatch.delenv("ATLAS_NATIVE", raising=False)
    monkeypatch.delenv("ATLAS_NATIVE_LIB", raising=False)
    native._library.cache_clear()
    yield
    native._library.cache_clear()


def sdpa_over_own_lengths(q, k_store, v_store, slots, lengths):
    """The oracle: PyTorch's SDPA per row over exactly that row's cached positions."""
    group = q.shape[1] // k_store.shape[1]
    rows = []
    for b, (slot, n) in enumerate(zip(slots.tolist(), lengths.tolist(), strict=True)):
        k = k_store[slot, :, :n].repeat_interleave(group, 0)  # [H, n, D]
        v = v_store[slot, :, :n].repeat_interleave(group, 0)
        rows.append(F.scaled_dot_product_attention(q[b, :, None], k, v)[:, 0])  # [H, D]
    return torch.stack(rows)  # [B, H, D]


@needs_kernel
@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim"), [(12, 12, 64), (8, 2, 32), (4, 1, 80), (3, 3, 7)]
)
def test_kernel_equals_sdpa_over_each_rows_own_positions(heads, kv_heads, head_dim):
    gen = torch.Generator().manual_seed(heads * 100 + head_dim)
    k_store = torch.randn(6, kv_heads, 50, head_dim, generator=gen)
    v_store = torch.randn(6, kv_heads, 50, head_dim, generator=gen)
    q = 3 * torch.randn(5, heads, head_dim, generator=gen)  # large scores: softmax is peaked
    slots = torch.tensor([5, 0, 3, 3, 1])  # any order, repeats allowed
    lengths = torch.tensor([1, 50, 17, 30, 2])  # one position, the whole cache, ragged
    out = native.decode_attention(q, k_store, v_store, slots, lengths, head_dim**-0.5)
    expected = sdpa_over_own_lengths(q, k_store, v_store, slots, lengths)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@needs_kernel
def test_kernel_reads_views_and_matches_the_reference_attention_with_a_mask():
    # A cache view with a storage offset (like a slice of a larger cache), and a
    # non-contiguous query (like a slice of the fused qkv projection).
    big = torch.randn(2, 4, 2, 32, 16)
    k_store, v_store = big[0], big[1]
    qkv = torch.randn(3, 2 * 16 * 3)
    q = qkv[:, : 2 * 16].view(3, 2, 16)
    slots, lengths = torch.tensor([2, 1, 0]), torch.tensor([32, 9, 20])
    out = native.decode_attention(q, k_store, v_store, slots, lengths, 0.25)
    keys, values = k_store[slots], v_store[slots]  # [B, K, 32, D]
    mask = torch.arange(32)[None, None, None, :] < lengths[:, None, None, None]
    expected = reference_attention(q[:, :, None] * (0.25 * 16**0.5), keys, values, mask, 0.0)
    torch.testing.assert_close(out, expected[:, :, 0], atol=1e-5, rtol=1e-5)


@needs_kernel
@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"slots": torch.tensor([0, 4])}, IndexError),
        ({"slots": torch.tensor([-1, 0])}, IndexError),
        ({"lengths": torch.tensor([0, 3])}, IndexError),
        ({"lengths": torch.tensor([3, 11])}, IndexError),
        ({"lengths": torch.tensor([3])}, ValueError),
        ({"q": torch.randn(2, 4, 8, dtype=torch.float64)}, ValueError),
        ({"q": torch.randn(2, 3, 8)}, ValueError),  # 3 heads over 2 kv heads
        (
            {"v_store": torch.randn(4, 2, 10, 8).transpose(0, 1).contiguous().transpose(0, 1)},
            ValueError,
        ),
    ],
)
def test_kernel_refuses_inputs_it_would_read_out_of_bounds(change, error):
    args = {
        "q": torch.randn(2, 4, 8),
        "k_store": torch.randn(4, 2, 10, 8),
        "v_store": torch.randn(4, 2, 10, 8),
        "slots": torch.tensor([0, 3]),
        "lengths": torch.tensor([3, 10]),
    }
    args.update(change)
    with pytest.raises(error):
        native.decode_attention(**args, scale=1.0)


@needs_kernel
def test_kernel_stores_the_new_keys_and_values_before_attending_as_a_cache_write_would():
    gen = torch.Generator().manual_seed(7)
    k_store, v_store = torch.randn(2, 4, 2, 12, 16, generator=gen)  # [slots, K, len, D] each
    qkv = torch.randn(3, (8 + 2 * 2) * 16, generator=gen)  # one fused projection row each
    q, new_k, new_v = (t.view(3, -1, 16) for t in qkv.split([8 * 16, 2 * 16, 2 * 16], -1))
    slots, lengths = torch.tensor([3, 0, 2]), torch.tensor([5, 12, 1])
    written_k, written_v = k_store.clone(), v_store.clone()
    rows = slots[:, None]
    written_k[rows, :, (lengths - 1)[:, None]] = new_k[:, None]  # KVCache.write's indexing
    written_v[rows, :, (lengths - 1)[:, None]] = new_v[:, None]
    expected = native.decode_attention(q, written_k, written_v, slots, lengths, 0.25)

    # The key as PyTorch's RoPE leaves it (a tensor of its own), the value still a view of
    # the projection: two layouts, which the kernel's one row stride cannot both be.
    new_k = new_k.clone()
    out = native.decode_attention(q, k_store, v_store, slots, lengths, 0.25, new_k, new_v)
    assert torch.equal(k_store, written_k) and torch.equal(v_store, written_v)
    assert torch.equal(out, expected)


@needs_kernel
@pytest.mark.parametrize(
    ("slots", "lengths"), [([0, 4], [3, 3]), ([0, 1], [3, 0]), ([0, 1], [11, 3])]
)
def test_kernel_with_an_index_out_of_range_stores_nothing(slots, lengths):
    k_store, v_store = torch.randn(4, 2, 10, 8), torch.randn(4, 2, 10, 8)
    before = k_store.clone(), v_store.clone()
    with pytest.raises(IndexError, match="outside the KV cache"):
        native.decode_attention(
            torch.randn(2, 4, 8), k_store, v_store, torch.tensor(slots), torch.tensor(lengths),
            1.0, torch.randn(2, 2, 8), torch.randn(2, 2, 8),
        )  # fmt: skip
    assert torch.equal(k_store, before[0]) and torch.equal(v_store, before[1])


@needs_kernel
@pytest.mark.parametrize(
    "new", [(torch.randn(2, 2, 8), None), (torch.randn(2, 2, 8), torch.randn(2, 1, 8))]
)
def test_kernel_refuses_new_keys_without_values_or_of_another_shape(new):
    with pytest.raises(ValueError, match="new"):
        native.decode_attention(
            torch.randn(2, 4, 8), torch.randn(4, 2, 10, 8), torch.randn(4, 2, 10, 8),
            torch.tensor([0, 1]), torch.tensor([3, 3]), 1.0, *new,
        )  # fmt: skip


@needs_kernel
def test_model_decode_steps_run_the_kernel_and_equal_the_full_forward(monkeypatch):
    calls = []
    kernel = native.decode_attention
    monkeypatch.setattr(native, "decode_attention", lambda *a: calls.append(1) or kernel(*a))
    torch.manual_seed(0)
    model = Transformer(tiny("rope", "rmsnorm", "swiglu", 2)).eval()
    ids = torch.randint(0, 97, (3, 16))
    slots = torch.tensor([4, 0, 2])
    with torch.inference_mode():
        full = model(ids)
        cache = model.new_cache(n_slots=5, max_len=20)
        parts = [model(ids[:, :10], torch.arange(10).expand(3, 10), cache, slots)]
        for t in range(10, 16):
            parts.append(model(ids[:, t : t + 1], torch.full((3, 1), t), cache, slots))
    assert len(calls) == 6 * model.config.n_layers  # every decode step, every layer; no prefill
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=2e-5, rtol=1e-4)


# --- a Llama block's RMSNorm and rotary embedding -------------------------------------------
def pytorch_rms_norm(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


@needs_kernel
@pytest.mark.parametrize("shape", [(1, 1, 768), (3, 7, 48), (5, 30)])
def test_rms_norm_equals_its_pytorch_form(shape):
    torch.manual_seed(0)
    x, weight = torch.randn(shape) * 3, torch.rand(shape[-1]) + 0.5
    out = native.rms_norm(x, weight, 1e-6)
    assert out.shape == x.shape
    torch.testing.assert_close(out, pytorch_rms_norm(x, weight, 1e-6), atol=2e-6, rtol=2e-6)
    view = x.flatten().flip(0).view(x.shape[-1], -1).t()  # not contiguous: read as values
    torch.testing.assert_close(
        native.rms_norm(view, weight, 1e-6), pytorch_rms_norm(view, weight, 1e-6),
        atol=2e-6, rtol=2e-6,
    )  # fmt: skip


@needs_kernel
@pytest.mark.parametrize(
    "heads, kv_heads, head_dim, rotated",
    [(4, 4, 16, 16), (12, 12, 64, 64), (8, 2, 32, 32), (4, 4, 32, 8)],
    ids=["multi-head", "gpt2-size", "grouped", "partial (NeoX)"],
)
def test_rope_in_place_turns_q_and_k_as_apply_rope_does_and_leaves_v(
    heads, kv_heads, head_dim, rotated
):
    torch.manual_seed(0)
    cos, sin = rope_tables(50, rotated, 10000.0)
    B, T, turned = 3, 5, heads + kv_heads
    qkv = torch.randn(B, T, (heads + 2 * kv_heads) * head_dim)
    positions = torch.randint(0, 50, (B, T))
    before = qkv.clone().view(B, T, -1, head_dim)
    c, s = cos[positions].unsqueeze(2), sin[positions].unsqueeze(2)  # [B, T, 1, R]
    expected = torch.cat(
        [apply_rope(before[:, :, :turned, :rotated], c, s), before[:, :, :turned, rotated:]], -1
    )
    native.rope_in_place(qkv, positions, cos, sin, turned, head_dim)
    after = qkv.view(B, T, -1, head_dim)
    torch.testing.assert_close(after[:, :, :turned], expected, atol=1e-6, rtol=1e-6)
    assert torch.equal(after[:, :, turned:], before[:, :, turned:])  # the value heads


@needs_kernel
@pytest.mark.parametrize(
    "change, error",
    [
        ({"positions": torch.tensor([[0, 50]])}, IndexError),
        ({"positions": torch.tensor([[-1, 0]])}, IndexError),
        ({"positions": torch.tensor([[0, 1]], dtype=torch.int32)}, ValueError),
        ({"qkv": torch.randn(1, 4, 96).transpose(1, 2)[:, :2]}, ValueError),
        ({"heads": 7}, ValueError),
        ({"cos": torch.randn(50, 15), "sin": torch.randn(50, 15)}, ValueError),
        ({"qkv": torch.randn(1, 2, 96, dtype=torch.float64)}, ValueError),
    ],
    ids=["past the tables", "negative", "int32", "not contiguous", "too many heads", "odd dims",
         "float64"],
)  # fmt: skip
def test_rope_in_place_refuses_what_it_would_misread_and_changes_nothing(change, error):
    cos, sin = rope_tables(50, 16, 10000.0)
    args = {"qkv": torch.randn(1, 2, 96), "positions": torch.tensor([[0, 1]]), "cos": cos,
            "sin": sin, "heads": 4, "head_dim": 16}  # fmt: skip
    args.update(change)
    before = args["qkv"].clone()
    with pytest.raises(error):
        native.rope_in_place(**args)
    assert torch.equal(args["qkv"], before)


@needs_kernel
@pytest.mark.parametrize("rotary_dim", [None, 4], ids=["full", "partial"])
def test_llama_inference_runs_the_norm_and_rope_kernels_and_training_does_not(
    monkeypatch, rotary_dim
):
    """Inference (no autograd) takes the C norm and RoPE with the same logits as the PyTorch
    forward that training runs, which never calls them: they record nothing for backward."""
    calls = []
    for name in ("rms_norm", "rope_in_place"):
        real = getattr(native, name)
        monkeypatch.setattr(native, name, lambda *a, _r=real, _n=name: calls.append(_n) or _r(*a))
    torch.manual_seed(0)
    model = Transformer(tiny("rope", "rmsnorm", "swiglu", 2, rotary_dim=rotary_dim))
    ids = torch.randint(0, 97, (2, 12))
    trained = model(ids)  # grad enabled: PyTorch's path, differentiable
    trained.sum().backward()
    assert calls == [] and model.blocks[0].attn_norm.weight.grad is not None
    with torch.inference_mode():
        served = model(ids)
        cache = model.new_cache(n_slots=2, max_len=12)
        slots = torch.tensor([1, 0])
        model(ids[:, :11], torch.arange(11).expand(2, 11), cache, slots)
        step = model(ids[:, 11:], torch.full((2, 1), 11), cache, slots)
    layers = model.config.n_layers
    assert calls.count("rope_in_place") == 3 * layers  # each forward, each layer
    assert calls.count("rms_norm") == 3 * (2 * layers + 1)  # two per block and the final one
    torch.testing.assert_close(served, trained.detach(), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(step[:, -1], trained.detach()[:, -1], atol=2e-5, rtol=1e-4)


def test_without_a_compiler_decoding_falls_back_to_pytorch_with_one_warning(
    monkeypatch, tmp_path, caplog, reload_library
):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("ATLAS_HOME", str(tmp_path))
    with caplog.at_level(logging.WARNING, logger=native.__name__):
        assert not native.available()
        assert not native.available()  # decided once
    assert len(caplog.records) == 1 and "PyTorch" in caplog.records[0].getMessage()
    torch.manual_seed(0)
    model = Transformer(tiny("learned", "layernorm", "gelu", 4)).prepare_for_inference()
    ids = torch.randint(0, 97, (2, 9))
    cache = model.new_cache(n_slots=2, max_len=9)
    with torch.inference_mode():
        model(ids[:, :8], torch.arange(8).expand(2, 8), cache, torch.tensor([0, 1]))
        step = model(ids[:, 8:], torch.full((2, 1), 8), cache, torch.tensor([0, 1]))
        torch.testing.assert_close(step[:, -1], model(ids)[:, -1], atol=2e-5, rtol=1e-4)
    with pytest.raises(RuntimeError, match="not available"):
        native.decode_attention(
            torch.zeros(1, 1, 1),
            *[torch.zeros(1, 1, 1, 1)] * 2,
            *[torch.ones(1, dtype=torch.long)] * 2,
            1.0,
        )


def test_atlas_native_0_turns_the_kernels_off(monkeypatch, reload_library):
    monkeypatch.setenv("ATLAS_NATIVE", "0")
    assert not native.available()


@needs_kernel
def test_compiled_library_is_cached_by_content_and_written_atomically(monkeypatch, tmp_path):
    monkeypatch.setenv("ATLAS_HOME", str(tmp_path))
    compiler = native._compiler()
    first = native._compile(compiler)
    stamp = first.stat().st_mtime_ns
    assert native._compile(compiler) == first and first.stat().st_mtime_ns == stamp  # reused
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no partial files left


@needs_kernel
@pytest.mark.parametrize(
    "march",
    [
        "native",
        # The 4-lane build (no AVX): the vector width, tiles and register pin of a CPU that
        # no test machine here has, so a build or arithmetic error in it shows up somewhere.
        pytest.param(
            "x86-64",
            marks=pytest.mark.skipif(
                platform.machine() not in ("x86_64", "AMD64"), reason="an x86 target"
            ),
        ),
    ],
)
def test_a_library_built_ahead_of_time_runs_without_a_compiler(
    monkeypatch, tmp_path, reload_library, march
):
    target = tmp_path / "cpu_kernels.so"
    native.main([str(target), "--march", march])  # the Dockerfile's step
    monkeypatch.setenv("ATLAS_NATIVE_LIB", str(target))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    assert native.available()
    if march == "x86-64":
        assert native._library().width == 12  # 3 vectors of 4 lanes: that build, loaded
    q, k, v = torch.randn(2, 4, 16), torch.randn(3, 4, 80, 16), torch.randn(3, 4, 80, 16)
    slots, lengths = torch.tensor([2, 0]), torch.tensor([80, 5])  # past one block of 64
    torch.testing.assert_close(
        native.decode_attention(q, k, v, slots, lengths, 0.25),
        sdpa_over_own_lengths(q, k, v, slots, lengths),  # SDPA's default scale: 16**-0.5
        atol=1e-5,
        rtol=1e-5,
    )
    weight, x = torch.randn(100, 70), torch.randn(37, 100)  # K past two chunks, 2 row blocks
    y = native.matmul_panels(x, native.pack_panels(weight), 70)
    torch.testing.assert_close(y, x @ weight, atol=1e-4, rtol=1e-5)
    torch.manual_seed(0)  # and a whole decode step in one call (decode_stack.py)
    model = Transformer(tiny("rope", "rmsnorm", "swiglu", 2)).prepare_for_inference()
    ids, cache, slots = torch.randint(0, 97, (2, 9)), model.new_cache(2, 9), torch.tensor([1, 0])
    with torch.inference_mode():
        model(ids[:, :8], torch.arange(8).expand(2, 8), cache, slots)
        step = model(ids[:, 8:], torch.full((2, 1), 8), cache, slots)[:, 0]
        assert model._decode_stack is not None
        torch.testing.assert_close(step, model(ids)[:, -1], atol=2e-5, rtol=1e-4)


def test_a_prebuilt_library_that_is_not_one_falls_back_with_a_warning(
    monkeypatch, tmp_path, caplog, reload_library
):
    fake = tmp_path / "cpu_kernels.so"
    fake.write_bytes(b"\x7fELF not really")
    monkeypatch.setenv("ATLAS_NATIVE_LIB", str(fake))
    with caplog.at_level(logging.WARNING, logger=native.__name__):
        assert not native.available()
    assert "unavailable" in caplog.records[0].getMessage()


@needs_kernel
@pytest.mark.parametrize(
    "source",
    [
        'const char *source_sha(void) { return "0123456789abcdef"; }',  # another version
        "int unrelated(void) { return 0; }",  # predates the check: no source_sha at all
    ],
)
def test_a_prebuilt_library_from_another_source_is_refused_with_a_warning(
    monkeypatch, tmp_path, caplog, reload_library, source
):
    # Its functions may take other arguments: calling them would read memory wrongly.
    (tmp_path / "other.c").write_text(source + "\n")
    library = tmp_path / "other.so"
    subprocess.run(
        [native._compiler(), "-shared", "-fPIC", str(tmp_path / "other.c"), "-o", str(library)],
        check=True,
    )
    monkeypatch.setenv("ATLAS_NATIVE_LIB", str(library))
    with caplog.at_level(logging.WARNING, logger=native.__name__):
        assert not native.available()
    assert "another version" in caplog.records[0].getMessage()


@pytest.mark.parametrize("problem", ["no compiler", "output under a file"])
def test_building_ahead_of_time_reports_what_went_wrong_in_one_line(monkeypatch, tmp_path, problem):
    output = tmp_path / "out" / "cpu_kernels.so"
    if problem == "no compiler":
        monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    else:
        (tmp_path / "out").write_text("a file where the folder should be")
    with pytest.raises(SystemExit, match=r"^error: ") as raised:
        native.main([str(output)])
    assert "\n" not in str(raised.value)


@needs_kernel
def test_building_for_an_unknown_cpu_is_a_one_line_error(tmp_path):
    with pytest.raises(SystemExit, match="error: .*march"):
        native.main(["--march", "no-such-cpu", str(tmp_path / "x.so")])
    assert list(tmp_path.iterdir()) == []


@needs_kernel
@pytest.mark.parametrize(
    ("rows", "k", "n"),
    # every tile height (1-8 rows, and past one tile), odd K, N short of a whole panel or
    # spanning many with a ragged last one, and the GPT-2 head
    [(m, 33, 97) for m in range(1, 10)]
    + [(17, 3, 5), (64, 768, 2304), (2, 768, 50257)]
    + [(3, 0, 30)],  # K = 0: zeros, as x @ W gives
)
@pytest.mark.parametrize("with_bias", [False, True])
def test_matmul_panels_equals_x_at_w(rows, k, n, with_bias):
    weight, x = torch.randn(k, n), torch.randn(rows, k)
    bias = torch.randn(n) if with_bias else None
    y = native.matmul_panels(x, native.pack_panels(weight), n, bias)
    expected = x.double() @ weight.double() + (0 if bias is None else bias.double())
    torch.testing.assert_close(y.double(), expected, atol=1e-4 * k**0.5, rtol=1e-5)


@needs_kernel
def test_matmul_panels_applies_the_tanh_gelu_to_within_float_rounding():
    # Pre-activations from deep in both tails to the middle, with a ragged last panel.
    weight = torch.eye(50)
    x = torch.cat([torch.linspace(-12, 12, 2999), torch.randn(1001) * 3]).view(-1, 50)
    bias = torch.randn(50)
    y = native.matmul_panels(x, native.pack_panels(weight), 50, bias, gelu_tanh=True)
    exact = F.gelu(x.double() + bias.double(), approximate="tanh")
    torch.testing.assert_close(y.double(), exact, atol=1e-6, rtol=2e-6)


@needs_kernel
def test_matmul_panels_keeps_leading_dimensions_and_reads_a_transposed_source():
    weight, x = torch.randn(24, 40).t(), torch.randn(2, 3, 40)  # [K, N] as a view
    y = native.matmul_panels(x, native.pack_panels(weight), 24)
    assert y.shape == (2, 3, 24)
    torch.testing.assert_close(y, x @ weight, atol=1e-4, rtol=1e-5)


@needs_kernel
@pytest.mark.parametrize(
    ("x_shape", "n_out", "change"),
    [
        ((2, 7), 10, None),  # x has 7 features, the panels 8
        ((2, 8), 10 + 10_000, None),  # more outputs than the panels hold
        ((2, 8), 0, None),  # fewer than the panels' last one starts at
        ((2, 8), 10, "bias"),  # bias of the wrong length
        ((2, 8), 10, "strided"),
        ((2, 8), 10, "float64"),
    ],
)
def test_matmul_panels_refuses_shapes_it_would_misread(x_shape, n_out, change):
    panels = native.pack_panels(torch.randn(8, 10))
    x, bias = torch.randn(x_shape), None
    if change == "bias":
        bias = torch.randn(n_out + 1)
    elif change == "strided":
        panels = panels.transpose(0, 1)
    elif change == "float64":
        x, panels = x.double(), panels.double()
    with pytest.raises(ValueError):
        native.matmul_panels(x, panels, n_out, bias)


@needs_kernel
@pytest.mark.parametrize(
    ("x", "bias"),
    [
        (torch.randn(2, 7), None),  # 7 features, the weight 8
        (torch.randn(2, 8, dtype=torch.float64), None),
        (torch.randn(2, 8), torch.randn(11)),  # bias of the wrong length
        (torch.randn(2, 8), torch.randn(10, dtype=torch.float64)),
    ],
    ids=["features", "float64 x", "bias length", "float64 bias"],
)
def test_a_panel_weight_checks_each_call_as_matmul_panels_does(x, bias):
    # The per-call fast path skips the panels' checks, never x's or the bias's.
    with pytest.raises(ValueError):
        native.PanelWeight(torch.randn(8, 10))(x, bias)


@needs_kernel
@pytest.mark.parametrize(
    "weight",
    [torch.randn(3), torch.randn(2, 3, 4), torch.randn(4, 3, dtype=torch.float64)],
    ids=["1-D", "3-D", "float64"],
)
def test_pack_panels_refuses_what_is_not_a_float32_matrix(weight):
    with pytest.raises(ValueError, match="2-D float32"):
        native.pack_panels(weight)


@needs_kernel
def test_a_rows_numbers_do_not_depend_on_the_other_rows_in_the_product():
    # Batch invariance, bit for bit: each row is summed in the same order whatever tile or
    # block of rows it lands in, so a sequence's logits are the same alone and inside any
    # batch (40 rows: two blocks of rows, the second ragged).
    weight, x = torch.randn(768, 2304), torch.randn(40, 768)
    panels = native.pack_panels(weight)
    together = native.matmul_panels(x, panels, 2304)
    for i in (0, 7, 8, 16, 31, 32, 39):
        assert torch.equal(native.matmul_panels(x[i : i + 1], panels, 2304)[0], together[i])
    assert torch.equal(native.matmul_panels(x[5:11], panels, 2304), together[5:11])


@needs_kernel
def test_model_products_all_go_through_the_panels_with_the_same_logits(monkeypatch):
    calls = []
    kernel = native._multiply  # what the checked and the per-weight paths both call
    monkeypatch.setattr(native, "_multiply", lambda *a: calls.append(1) or kernel(*a))
    # Block by block: the one-call decode step (test_decode_stack.py) reads the same panels
    # from C, so only its head's product would pass through here.
    monkeypatch.setenv("ATLAS_DECODE_STACK", "0")
    torch.manual_seed(0)
    model = Transformer(tiny("learned", "layernorm", "gelu", 4)).prepare_for_inference()
    ids = torch.randint(0, 97, (3, 12))
    cache = model.new_cache(n_slots=3, max_len=12)
    slots = torch.arange(3)
    per_forward = 4 * model.config.n_layers + 1  # qkv, out, MLP in and out; the tied head
    with torch.inference_mode():
        prompt = model(ids[:, :11], torch.arange(11).expand(3, 11), cache, slots, last_only=True)
        assert len(calls) == per_forward
        step = model(ids[:, 11:], torch.full((3, 1), 11), cache, slots)
        assert len(calls) == 2 * per_forward
        model.prepare_for_inference(pack=False)  # no copies: PyTorch's own matmul
        full = model(ids)
    torch.testing.assert_close(prompt[:, -1], full[:, 10], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(step[:, -1], full[:, -1], atol=2e-5, rtol=1e-4)


@needs_kernel
def test_panel_copies_step_aside_once_the_weight_changes():
    torch.manual_seed(0)
    model = Transformer(tiny("rope", "rmsnorm", "swiglu", 2)).prepare_for_inference()
    copies = [m.packed for m in model.modules() if isinstance(m, Linear)]
    assert all(isinstance(c, native.PanelWeight) for c in [*copies, model._packed_head])
    ids = torch.randint(0, 97, (1, 6))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)  # bumps every version counter: the panel copies are stale
        cache = model.new_cache(n_slots=1, max_len=6)
        model(ids[:, :5], torch.arange(5)[None], cache, torch.tensor([0]))
        step = model(ids[:, 5:], torch.tensor([[5]]), cache, torch.tensor([0]))
        fresh = Transformer(model.config).eval()
        fresh.load_state_dict(model.state_dict())
        torch.testing.assert_close(step[0, -1], fresh(ids)[0, -1], atol=2e-5, rtol=1e-4)


# --- which kernels serve, as the engine and /health report it -------------------------------
@pytest.mark.parametrize("path", ["C", "oneDNN", "PyTorch"])
async def test_the_engine_reports_the_kernels_that_actually_serve(
    monkeypatch, reload_library, byte_tokenizer, caplog, path
):
    """Turned off by ATLAS_NATIVE=0 and ATLAS_ONEDNN=0 (as the CI legs do), the engine's
    `backend` and start-up log name the path that is left, and only that path runs."""
    from atlas_server.engine import Engine, EngineConfig, SamplingParams
    from atlas_server.model import onednn

    if path != "C":
        monkeypatch.setenv("ATLAS_NATIVE", "0")
    if path == "PyTorch":
        monkeypatch.setenv("ATLAS_ONEDNN", "0")
    if path == "C" and not native.available():
        pytest.skip("no C compiler here")
    if path == "oneDNN" and not onednn.packing_supported(torch.zeros(1)):
        pytest.skip("this PyTorch has no oneDNN packing")
    calls: list[str] = []
    for module, name, label in [
        (native, "_multiply", "C"),
        (native, "decode_attention", "C attention"),
        (DecodeStack, "__call__", "C decode step"),
        (onednn.PackedWeight, "__call__", "oneDNN"),
    ]:
        real = getattr(module, name)
        monkeypatch.setattr(
            module,
            name,
            lambda *a, _real=real, _label=label, **kw: calls.append(_label) or _real(*a, **kw),
        )
    torch.manual_seed(0)
    config = replace(tiny("learned", "layernorm", "gelu", 4), vocab_size=byte_tokenizer.vocab_size)
    with caplog.at_level(logging.INFO, logger="atlas.engine"):
        engine = Engine(Transformer(config), byte_tokenizer, EngineConfig(max_running=2)).start()
    try:
        attention = "C" if path == "C" else "PyTorch"
        step = "one call" if path == "C" else "block by block"
        assert engine.backend == {
            "device": "cpu", "dtype": "float32", "matmul": path, "attention": attention,
            "decode_step": step,
        }  # fmt: skip
        assert f"kernels: matmul {path}, attention {attention}, decode step {step}" in caplog.text
        params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
        events = [e async for e in engine.submit([1, 2, 3], params)]
        assert events[-1].finish_reason == "length"
    finally:
        engine.shutdown()
    # In C, the prompt's products are the panel kernel's and every decode step is one call.
    expected = {"C": {"C", "C decode step"}, "oneDNN": {"oneDNN"}, "PyTorch": set()}[path]
    assert set(calls) == expected


def test_health_says_which_kernels_serve(tiny_checkpoint):
    """/health carries the engine's backend; under ATLAS_NATIVE=0 (the CI leg without the
    C kernels) it must not claim them."""
    import os

    from servers import serving

    from atlas_server.api import ServerState, create_app
    from atlas_server.config import ServerConfig

    state = ServerState(
        config=ServerConfig(), model_name="tiny", checkpoint_path=str(tiny_checkpoint)
    )
    with serving(create_app(state)) as base:
        import httpx

        health = httpx.get(base + "/health").json()
    state.shutdown()
    assert health["status"] == "ok" and health["backend"] == state.engine.backend
    assert set(health["backend"]) == {"device", "dtype", "matmul", "attention", "decode_step"}
    assert health["backend"]["matmul"] in {"C", "oneDNN", "PyTorch"}
    if os.environ.get("ATLAS_NATIVE") == "0":
        assert "C" not in (health["backend"]["matmul"], health["backend"]["attention"])
        assert health["backend"]["decode_step"] == "block by block"
    elif native.available():
        assert health["backend"]["matmul"] == "C"
        assert health["backend"]["decode_step"] == "one call"


@needs_kernel
@pytest.mark.parametrize(
    "x, weight",
    [
        (torch.randn(2, 8), torch.ones(7)),  # weight of another width
        (torch.randn(2, 8), torch.ones(8, 2)[:, 0]),  # weight not contiguous
        (torch.randn(2, 8, dtype=torch.float64), torch.ones(8)),
    ],
    ids=["width", "strided weight", "float64"],
)
def test_rms_norm_refuses_what_it_would_misread(x, weight):
    with pytest.raises(ValueError):
        native.rms_norm(x, weight, 1e-6)
