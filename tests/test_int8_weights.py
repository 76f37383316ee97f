"""8-bit weights for CPU serving (`model.quantize = "int8"`): the C kernel's q8_0 panels.

References: llama.cpp's own q8_0 quantizer (the `gguf` package, which reproduces
ggml-quants.c bit for bit) for the quantized numbers, and PyTorch's fp32/fp64 matmul over
the dequantized weights for every product and for whole models (the int8 path must compute
exactly x @ native.dequantize_q8(W), to float rounding, on every path a token takes).
"""

from __future__ import annotations

import asyncio
import copy

import pytest
import torch
import torch.nn.functional as F
import typer
from test_decode_stack import ARCHITECTURES, decode, varied

from atlas_server.config import ConfigFileError, load_config
from atlas_server.model import Transformer, native
from atlas_server.model.transformer import Linear, check_quantize

pytestmark = pytest.mark.skipif(not native.available(), reason="no C compiler here")


def with_dequantized_weights(model: Transformer) -> Transformer:
    """A copy of `model` whose matrices are the int8 copies' numbers, in fp32, served by
    PyTorch's own matmul: what the int8 path must compute."""
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for module in reference.modules():
            if isinstance(module, Linear):
                k, n = module.weight.shape
                module.weight.copy_(native.dequantize_q8(*native.quantize_q8(module.weight), k, n))
        if reference.config.tie_embeddings:
            emb = reference.tok_emb.weight  # [V, C], read as the head's [C, V]
            head = native.dequantize_q8(*native.quantize_q8(emb.t()), emb.shape[1], emb.shape[0])
            # The tied embedding is also the input lookup, which stays fp32: untie the copy.
            reference.config = reference.config.replace(tie_embeddings=False)
            reference.lm_head = Linear(emb.shape[1], emb.shape[0], bias=False)
            reference.lm_head.weight.copy_(head)
    return reference.prepare_for_inference(pack=False)


@pytest.mark.parametrize(("k", "n"), [(32, 1), (64, 48), (768, 2304), (96, 50)])
def test_quantized_numbers_are_llama_cpps_q8_0_bit_for_bit(k, n):
    gguf = pytest.importorskip("gguf")
    torch.manual_seed(0)
    weight = torch.randn(k, n) * 0.02
    weight[5, 0] = 0.9  # an outlier: its block's scale, not its column's
    weight[32:64] = 0.0 if k >= 64 else weight[32:64]  # all-zero blocks: scale 0, no NaN
    kind = gguf.GGMLQuantizationType.Q8_0
    # ggml quantizes along a row's input dimension: rows of W^T, [N, K].
    theirs = gguf.quants.dequantize(gguf.quants.quantize(weight.t().numpy(), kind), kind)
    ours = native.dequantize_q8(*native.quantize_q8(weight), k, n)
    assert torch.equal(ours, torch.from_numpy(theirs).t())
    assert not ours.isnan().any()


def test_rounding_at_the_edges_is_llama_cpps():
    """Halves go away from zero, and 0.49999997 (whose + 0.5 is 1.0 in fp32) goes down."""
    gguf = pytest.importorskip("gguf")
    weight = torch.zeros(32, 4)
    weight[0] = 127.0  # each column's scale is 1: q is the rounded weight itself
    weight[1:6] = torch.tensor([0.5, -0.5, 1.5, 0.49999997, -2.5])[:, None]
    kind = gguf.GGMLQuantizationType.Q8_0
    theirs = gguf.quants.dequantize(gguf.quants.quantize(weight.t().numpy(), kind), kind)
    ours = native.dequantize_q8(*native.quantize_q8(weight), 32, 4)
    assert torch.equal(ours, torch.from_numpy(theirs).t())
    assert ours[1:6, 0].tolist() == [1.0, -1.0, 2.0, 0.0, -3.0]


def test_a_short_last_block_is_scaled_by_its_own_largest_weight():
    """K need not be a multiple of 32 (q8_0 requires it; Atlas's panels do not)."""
    weight = torch.full((40, 3), 0.01)
    weight[35, 1] = 1.0  # in the last block, 8 rows long
    q, scales = native.quantize_q8(weight)
    assert scales.shape[1] == 2
    assert scales[0, 1, 1] == torch.tensor(1.0 / 127).half()
    assert scales[0, 0, 1] == torch.tensor(0.01 / 127).half()
    assert q[0, 35, 1] == 127 and q[0, 34, 1] == 1


@pytest.mark.parametrize(
    ("rows", "k", "n"),
    # every tile height (1-8 rows, and past one tile and one block of rows), K a multiple
    # of the 64-step chunk or not, N short of a panel or ragged, and the GPT-2 head
    [(m, 33, 97) for m in range(1, 10)]
    + [(17, 3, 5), (40, 768, 2304), (2, 768, 50257), (3, 100, 50)]
    + [(3, 0, 30)],  # K = 0: zeros, as x @ W gives
)
@pytest.mark.parametrize("with_bias", [False, True])
def test_matmul_panels_q8_equals_x_at_the_dequantized_weight(rows, k, n, with_bias):
    weight, x = torch.randn(k, n), torch.randn(rows, k)
    bias = torch.randn(n) if with_bias else None
    q, scales = native.quantize_q8(weight)
    y = native.matmul_panels_q8(x, q, scales, n, bias)
    expected = x.double() @ native.dequantize_q8(q, scales, k, n).double()
    expected += 0 if bias is None else bias.double()
    torch.testing.assert_close(y.double(), expected, atol=1e-4 * k**0.5, rtol=1e-5)
    gelu = native.matmul_panels_q8(x, q, scales, n, bias, gelu_tanh=True)
    torch.testing.assert_close(
        gelu.double(), F.gelu(expected, approximate="tanh"), atol=1e-4 * k**0.5, rtol=2e-6
    )


def test_a_rows_numbers_do_not_depend_on_the_other_rows_in_the_product():
    weight, x = torch.randn(768, 2304), torch.randn(40, 768)
    q, scales = native.quantize_q8(weight)
    together = native.matmul_panels_q8(x, q, scales, 2304)
    for i in (0, 7, 8, 16, 31, 32, 39):
        assert torch.equal(native.matmul_panels_q8(x[i : i + 1], q, scales, 2304)[0], together[i])


@pytest.mark.parametrize(
    "change",
    ["float panels", "float32 scales", "scales shape", "float64 x", "x features", "n_out", "bias"],
)
def test_matmul_panels_q8_refuses_what_it_would_misread(change):
    q, scales = native.quantize_q8(torch.randn(64, 10))
    x, n_out, bias = torch.randn(2, 64), 10, None
    if change == "float panels":
        q = q.float()
    elif change == "float32 scales":
        scales = scales.float()
    elif change == "scales shape":
        scales = scales[:, :1].contiguous()
    elif change == "float64 x":
        x = x.double()
    elif change == "x features":
        x = torch.randn(2, 63)
    elif change == "n_out":
        n_out = 10_000
    else:
        bias = torch.randn(11)
    with pytest.raises(ValueError, match="unsupported shapes|float32"):
        native.matmul_panels_q8(x, q, scales, n_out, bias)


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_an_int8_model_computes_with_the_dequantized_weights_on_every_path(name, monkeypatch):
    """Prompt (the panel products), one-call decode steps and block-by-block steps all equal
    the full forward of the same model with its weights replaced by the int8 numbers."""
    model = varied(ARCHITECTURES[name])
    model.prepare_for_inference(quantize="int8")
    copies = [m.packed for m in model.modules() if isinstance(m, Linear)]
    assert copies and all(isinstance(c, native.Int8PanelWeight) for c in copies)
    if model.config.tie_embeddings:
        assert isinstance(model._packed_head, native.Int8PanelWeight)
    reference = with_dequantized_weights(model)
    ids = torch.randint(0, 97, (3, 20), generator=torch.Generator().manual_seed(1))
    slots = torch.tensor([2, 0, 1])
    got = decode(model, ids, slots, model.new_cache(3, 32), start=7)
    assert model._decode_stack is not None, "int8 decode steps did not take the one-call path"
    with torch.inference_mode():
        full = reference(ids)[:, 7:]
    torch.testing.assert_close(got, full, atol=5e-5, rtol=1e-5)
    monkeypatch.setenv("ATLAS_DECODE_STACK", "0")
    by_block = decode(model, ids, slots, model.new_cache(3, 32), start=7)
    torch.testing.assert_close(by_block, got, atol=5e-5, rtol=1e-5)


def test_int8_logits_stay_close_to_the_fp32_models():
    """Quantization error, not a bug: a 4 MB-class model's logits move by a few hundredths
    of their spread (bench/bench_int8.py measures bits per byte on real text)."""
    config = ARCHITECTURES["gpt2, learned positions"].replace(d_model=128, n_heads=4)
    torch.manual_seed(0)
    model = Transformer(config).prepare_for_inference()
    ids = torch.randint(0, 97, (2, 24))
    with torch.inference_mode():
        fp32 = model(ids)
        model.prepare_for_inference(quantize="int8")
        int8 = model(ids)
    assert not torch.equal(fp32, int8)  # the copies are in use
    assert (int8 - fp32).abs().max() < 0.05 * fp32.std()


def test_int8_copies_step_aside_once_the_weight_changes(tmp_path):
    """...and /health stops naming them: a changed or unpickled model computes in fp32."""
    from atlas_server.engine.runner import serving_kernels

    model = varied(ARCHITECTURES["llama, grouped-query"]).prepare_for_inference(quantize="int8")
    assert serving_kernels(model)["matmul"] == "C int8"
    torch.save(model, tmp_path / "model.pt")
    unpickled = torch.load(tmp_path / "model.pt", weights_only=False)
    assert serving_kernels(unpickled)["matmul"] == "PyTorch"
    ids = torch.randint(0, 97, (1, 8))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)  # an in-place change: the 8-bit copies now hold old numbers
    with torch.inference_mode():
        stale_safe = model(ids)
        assert serving_kernels(model)["matmul"] == "PyTorch"
        fresh = model.prepare_for_inference(pack=False)(ids)
    torch.testing.assert_close(stale_safe, fresh, atol=1e-5, rtol=1e-5)


def test_a_copied_int8_model_quantizes_its_own_weights():
    model = varied(ARCHITECTURES["gpt2, learned positions"]).prepare_for_inference(quantize="int8")
    twin = copy.deepcopy(model)
    copies = [m.packed for m in twin.modules() if isinstance(m, Linear)]
    assert all(isinstance(c, native.Int8PanelWeight) for c in copies)
    ids = torch.randint(0, 97, (1, 8))
    with torch.inference_mode():
        assert torch.equal(twin(ids), model(ids))


@pytest.mark.parametrize(
    ("device", "dtype", "message"),
    [
        ("cuda", torch.float32, "for serving on the CPU"),
        ("cpu", torch.bfloat16, "computes in float32: serve with dtype float32"),
    ],
)
def test_int8_where_it_cannot_run_is_refused_with_what_is_wrong(device, dtype, message):
    with pytest.raises(ValueError, match=message):
        check_quantize("int8", device, dtype)
    model = Transformer(ARCHITECTURES["gpt2, learned positions"]).to(dtype)
    if device == "cpu":
        with pytest.raises(ValueError, match=message):
            model.prepare_for_inference(quantize="int8")


def test_int8_without_the_c_kernels_is_refused(monkeypatch):
    monkeypatch.setattr(native, "available", lambda: False)
    with pytest.raises(ValueError, match="needs Atlas's C kernels"):
        check_quantize("int8", "cpu", torch.float32)


def test_the_config_key_and_flag_are_checked(tmp_path, capsys):
    path = tmp_path / "server.toml"
    path.write_text("[model]\nquantize = 'int4'\n")
    with pytest.raises(ConfigFileError, match="model.quantize must be none or int8, got 'int4'"):
        load_config(path)
    assert load_config(None).model.quantize == "none"

    from atlas_server.checkpoint import save_checkpoint
    from atlas_server.commands import serve as serve_command
    from atlas_server.model import load_preset
    from atlas_server.tokenizer import byte_level_tokenizer

    tok = byte_level_tokenizer()
    ckpt = save_checkpoint(
        tmp_path / "ckpt", Transformer(load_preset("gpt2-tiny", vocab_size=tok.vocab_size)), tok, {}
    )
    serve_command.check_engine_fits(ckpt, load_config(None, ["model.quantize=int8"]))
    config = load_config(None, ["model.quantize=int8", "model.dtype=bfloat16"])
    with pytest.raises(typer.Exit):  # before any weights load: not a server that 503s
        serve_command.check_engine_fits(ckpt, config)
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "quantize=int8 computes in float32" in line


def test_the_engine_serves_int8_and_says_so(varied_model):
    """Greedy tokens from the engine equal the dequantized model's full-forward argmax, and
    /health's backend (engine.backend) names the 8-bit kernel."""
    from atlas_server.engine import Engine, EngineConfig, SamplingParams

    model = copy.deepcopy(varied_model.model)
    engine = Engine(
        model, varied_model.tokenizer, EngineConfig(max_running=4, quantize="int8")
    ).start()
    try:
        assert engine.backend["matmul"] == "C int8"
        assert engine.backend["decode_step"] == "one call"
        prompts = [[10, 20, 30], [40, 50, 60, 70, 80], [5]]
        params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)

        async def one(prompt):
            return [t async for e in engine.submit(prompt, params) for t in e.token_ids]

        async def all_of():
            return await asyncio.gather(*(one(p) for p in prompts))

        got = asyncio.run(all_of())
    finally:
        engine.shutdown(timeout=5)
    reference = with_dequantized_weights(engine.model)
    for prompt, tokens in zip(prompts, got, strict=True):
        ids = list(prompt)
        with torch.inference_mode():
            for _ in range(5):
                ids.append(int(reference(torch.tensor([ids]))[0, -1].argmax()))
        assert tokens == ids[len(prompt) :]


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_a_prepared_model_copied_inside_inference_mode_serves_the_same(quantize):
    """QA: a deepcopy under torch.inference_mode() (inference tensors: no version counter)
    raised "Inference tensors do not track version counter"; the copies watch them by
    address, and the copy decodes (one-call step included) as the original does."""
    model = varied(ARCHITECTURES["llama, grouped-query"]).prepare_for_inference(quantize=quantize)
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(3))
    slots = torch.tensor([0, 1])
    with torch.inference_mode():
        twin = copy.deepcopy(model)
    want = decode(model, ids, slots, model.new_cache(2, 16), start=5)
    got = decode(twin, ids, slots, twin.new_cache(2, 16), start=5)
    assert twin._decode_stack is not None
    assert torch.equal(got, want)


@pytest.mark.parametrize("value", ["int4", "INT8", "", "int8 "])
def test_a_bad_quantize_flag_is_one_line_and_exit_1(value, tmp_path):
    from typer.testing import CliRunner

    from atlas_server.cli import app

    r = CliRunner().invoke(app, ["serve", "--quantize", value, "--checkpoint", str(tmp_path)])
    assert r.exit_code == 1
    (line,) = r.output.strip().splitlines()
    assert "model.quantize must be none or int8" in line and "Traceback" not in r.output
