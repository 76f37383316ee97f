"""GGUF export, read back with llama.cpp's own reader (`gguf.GGUFReader`).

What is checked: the architecture and hyper-parameters llama.cpp reads, every tensor's
name, shape (ggml order), type and numbers, the tokenizer (tokens, types, merges, specials,
pre-tokenizer, chat template; the merges rebuilt into a Hugging Face `tokenizers` BPE give
Atlas's ids on held-out text), the q/k row permutation of llama's RoPE layout (attention
scores unchanged), f16 / q8_0 conversion, the refusals, and bench_llamacpp.py's command
line. Running the file in llama.cpp itself is bench/bench_llamacpp.py's job (it builds
llama.cpp and checks greedy tokens); docs/benchmarks.md has its figures.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from atlas_server.checkpoint import save_checkpoint
from atlas_server.cli import app
from atlas_server.gguf_export import _permute_rotary, export_gguf, gguf_tensors
from atlas_server.model import Transformer, load_preset
from atlas_server.tokenizer import TrainConfig, train_from_texts
from atlas_server.tokenizer.corpus import stdlib_sample
from atlas_server.tokenizer.hf_format import CHATML_TEMPLATE, gpt2_bytes_to_unicode

gguf = pytest.importorskip("gguf")
BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(scope="module")
def tokenizer():
    return train_from_texts(stdlib_sample(80_000), TrainConfig(vocab_size=420))


def _checkpoint(root: Path, preset: str, tokenizer, **overrides) -> Path:
    torch.manual_seed(0)
    config = load_preset(preset, vocab_size=tokenizer.vocab_size + 12, **overrides)  # 12 pad rows
    model = Transformer(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # no all-ones norms / zero biases to hide mix-ups
    return save_checkpoint(root / preset, model, tokenizer)


def _fields(reader) -> dict:
    return {name: field.contents() for name, field in reader.fields.items()}


def _expected_tensors(preset: str, layers: int) -> set[str]:
    if preset == "gpt2-tiny":
        names = {
            "token_embd.weight",
            "position_embd.weight",
            "output_norm.weight",
            "output_norm.bias",
        }
        block = [
            f"{t}.{s}"
            for t in ("attn_norm", "attn_qkv", "attn_output", "ffn_norm", "ffn_up", "ffn_down")
            for s in ("weight", "bias")
        ]
    else:  # llama-tiny: untied head
        names = {"token_embd.weight", "output_norm.weight", "output.weight"}
        block = [
            f"{t}.weight"
            for t in (
                "attn_norm",
                "attn_q",
                "attn_k",
                "attn_v",
                "attn_output",
                "ffn_norm",
                "ffn_gate",
                "ffn_up",
                "ffn_down",
            )
        ]
    return names | {f"blk.{i}.{b}" for i in range(layers) for b in block}


@pytest.mark.parametrize(("preset", "arch"), [("gpt2-tiny", "gpt2"), ("llama-tiny", "llama")])
def test_reader_sees_architecture_hyperparameters_tensors_and_tokenizer(
    tmp_path, tokenizer, preset, arch
):
    ckpt = _checkpoint(tmp_path, preset, tokenizer)
    out = tmp_path / "model.gguf"
    result = CliRunner().invoke(app, ["checkpoint", "export-gguf", str(ckpt), str(out)])
    assert result.exit_code == 0, result.output
    reader = gguf.GGUFReader(out)
    f = _fields(reader)
    config = load_preset(preset, vocab_size=tokenizer.vocab_size + 12)

    assert f["general.architecture"] == arch
    assert f["general.file_type"] == gguf.LlamaFileType.ALL_F32
    assert f[f"{arch}.context_length"] == config.max_seq_len
    assert f[f"{arch}.embedding_length"] == config.d_model
    assert f[f"{arch}.block_count"] == config.n_layers
    assert f[f"{arch}.feed_forward_length"] == config.ff_dim
    assert f[f"{arch}.attention.head_count"] == config.n_heads
    assert f[f"{arch}.attention.head_count_kv"] == config.kv_heads
    if arch == "llama":
        assert f["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(config.norm_eps)
        assert f["llama.rope.freq_base"] == pytest.approx(config.rope_theta)
        assert f["llama.rope.dimension_count"] == config.head_dim
    else:
        assert f["gpt2.attention.layer_norm_epsilon"] == pytest.approx(config.norm_eps)

    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == _expected_tensors(preset, config.n_layers)
    assert {t.tensor_type for t in reader.tensors} == {gguf.GGMLQuantizationType.F32}
    ours = load_file(ckpt / "model.safetensors")
    embd = tensors["token_embd.weight"]
    assert list(embd.shape) == [config.d_model, config.vocab_size]  # ggml order: ne0 first
    np.testing.assert_array_equal(
        embd.data.reshape(config.vocab_size, config.d_model), ours["tok_emb.weight"].numpy()
    )
    ffn_down = tensors["blk.1.ffn_down.weight"]
    assert list(ffn_down.shape) == [config.ff_dim, config.d_model]  # ne = [in, out]
    np.testing.assert_array_equal(
        ffn_down.data.reshape(config.d_model, config.ff_dim),
        ours["blocks.1.mlp.w_out.weight"].t().numpy(),
    )
    if arch == "gpt2":
        qkv = tensors["blk.0.attn_qkv.weight"].data.reshape(3 * config.d_model, config.d_model)
        np.testing.assert_array_equal(qkv, ours["blocks.0.attn.wqkv.weight"].t().numpy())
    else:
        v_rows = config.kv_heads * config.head_dim
        v = tensors["blk.0.attn_v.weight"].data.reshape(v_rows, config.d_model)
        np.testing.assert_array_equal(v, ours["blocks.0.attn.wqkv.weight"][:, -v_rows:].t().numpy())

    # the tokenizer
    assert f["tokenizer.ggml.model"] == "gpt2"
    assert f["tokenizer.ggml.pre"] == "llama-bpe"  # Atlas's default (GPT-4) split pattern
    tokens, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == config.vocab_size
    to_char = gpt2_bytes_to_unicode()
    for i in (0, 65, 300, 400):
        assert tokens[i] == "".join(to_char[b] for b in tokenizer.id_to_bytes[i])
        assert types[i] == gguf.TokenType.NORMAL
    for text, i in tokenizer.special_tokens.items():
        assert tokens[i] == text and types[i] == gguf.TokenType.CONTROL
    assert types[-1] == gguf.TokenType.UNUSED and tokens[-1] == f"[PAD{config.vocab_size - 1}]"
    eot = tokenizer.special_tokens["<|endoftext|>"]
    assert f["tokenizer.ggml.eos_token_id"] == f["tokenizer.ggml.bos_token_id"] == eot
    assert f["tokenizer.ggml.eot_token_id"] == tokenizer.special_tokens["<|im_end|>"]
    assert f["tokenizer.ggml.add_bos_token"] is False
    assert f["tokenizer.chat_template"] == CHATML_TEMPLATE

    # The merges are what llama.cpp's BPE uses: rebuilt into a `tokenizers` BPE (an
    # implementation nobody here wrote) with the same split, they give Atlas's ids.
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {tokens[i]: i for i in tokenizer.id_to_bytes}
    merges = [tuple(m.split(" ")) for m in f["tokenizer.ggml.merges"]]
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=merges))
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.Sequence(
        [
            tokenizers.pre_tokenizers.Split(
                tokenizers.Regex(tokenizer.pattern), behavior="isolated"
            ),
            tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    for text in stdlib_sample(200_000, stride=7)[-25:] + ["naïve 東京 🙂\r\n  x 12345"]:
        assert bpe.encode(text).ids == tokenizer.encode(text)


def test_llama_rope_row_permutation_keeps_attention_scores():
    """llama.cpp's `llama` rotates adjacent pairs (2i, 2i+1), Atlas rotates halves (i, i+D/2):
    with the exported rows, each rotation of its own q and k gives the same scores."""
    torch.manual_seed(0)
    heads, D, C, T = 3, 8, 12, 5
    w_q, w_k = torch.randn(heads * D, C), torch.randn(heads * D, C)  # [out, in]
    x = torch.randn(T, C)
    angles = torch.outer(torch.arange(T).float(), 1.0 / 10000 ** (torch.arange(0, D, 2) / D))

    def rotate_half(v):  # [T, heads, D]
        a, b = v[..., : D // 2], v[..., D // 2 :]
        cos, sin = angles.cos()[:, None], angles.sin()[:, None]
        return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)

    def rotate_pairs(v):
        a, b = v[..., 0::2], v[..., 1::2]
        cos, sin = angles.cos()[:, None], angles.sin()[:, None]
        return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)

    def scores(q, k):  # [heads, T, T]
        return torch.einsum("thd,shd->hts", q, k)

    ours = scores(
        rotate_half((x @ w_q.t()).view(T, heads, D)), rotate_half((x @ w_k.t()).view(T, heads, D))
    )
    q_p, k_p = _permute_rotary(w_q, heads), _permute_rotary(w_k, heads)
    theirs = scores(
        rotate_pairs((x @ q_p.t()).view(T, heads, D)), rotate_pairs((x @ k_p.t()).view(T, heads, D))
    )
    torch.testing.assert_close(theirs, ours)
    unpermuted = scores(
        rotate_pairs((x @ w_q.t()).view(T, heads, D)), rotate_pairs((x @ w_k.t()).view(T, heads, D))
    )
    assert not torch.allclose(unpermuted, ours, atol=1e-3)


def test_llama_q_and_k_rows_are_exported_permuted(tokenizer):
    config = load_preset("llama-tiny", vocab_size=tokenizer.vocab_size)
    model = Transformer(config)
    out = gguf_tensors(model.state_dict(), config, "llama")
    q_rows = config.n_heads * config.head_dim
    wq = model.state_dict()["blocks.0.attn.wqkv.weight"][:, :q_rows].t()
    torch.testing.assert_close(out["blk.0.attn_q.weight"], _permute_rotary(wq, config.n_heads))


@pytest.mark.parametrize("kind", ["f16", "q8_0"])
def test_converted_types_keep_the_numbers(tmp_path, tokenizer, kind):
    ckpt = _checkpoint(tmp_path, "llama-tiny", tokenizer)
    f32 = export_gguf(ckpt, tmp_path / "f32.gguf")
    small = export_gguf(ckpt, tmp_path / f"{kind}.gguf", kind)
    assert small.stat().st_size < 0.6 * f32.stat().st_size
    full = {t.name: t for t in gguf.GGUFReader(f32).tensors}
    reader = gguf.GGUFReader(small)
    want = {"f16": gguf.GGMLQuantizationType.F16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[kind]
    assert (
        _fields(reader)["general.file_type"]
        == {
            "f16": gguf.LlamaFileType.MOSTLY_F16,
            "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        }[kind]
    )
    for t in reader.tensors:
        reference = full[t.name].data.reshape(-1)
        if t.name.endswith("norm.weight"):
            assert t.tensor_type == gguf.GGMLQuantizationType.F32
            continue
        assert t.tensor_type == want, t.name
        values = gguf.quants.dequantize(t.data, t.tensor_type).reshape(-1)
        scale = np.abs(reference).max()
        assert np.abs(values - reference).max() <= scale * (1e-3 if kind == "f16" else 1e-2)


def test_refusals_are_one_line_and_write_nothing(tmp_path, tokenizer, byte_tokenizer):
    runner = CliRunner()
    cases = {
        # llama.cpp's BPE needs merges; the byte-level tokenizer has none
        "no merges": (_checkpoint(tmp_path / "a", "gpt2-tiny", byte_tokenizer), "no merges"),
        # no llama.cpp architecture computes sinusoidal positions
        "sinusoidal": (
            _checkpoint(tmp_path / "b", "gpt2-tiny", tokenizer, pos_encoding="sinusoidal"),
            "pos_encoding=sinusoidal",
        ),
    }
    for ckpt, message in cases.values():
        out = tmp_path / f"{ckpt.parent.name}.gguf"
        result = runner.invoke(app, ["checkpoint", "export-gguf", str(ckpt), str(out)])
        assert result.exit_code == 1 and result.output.startswith("error:"), result.output
        assert message in result.output and "Traceback" not in result.output
        assert not out.exists()
    ckpt = _checkpoint(tmp_path / "c", "gpt2-tiny", tokenizer)
    out = tmp_path / "kept.gguf"
    out.write_bytes(b"mine")
    result = runner.invoke(app, ["checkpoint", "export-gguf", str(ckpt), str(out)])
    assert result.exit_code == 1 and "--overwrite" in result.output
    assert out.read_bytes() == b"mine"
    result = runner.invoke(app, ["checkpoint", "export-gguf", str(ckpt), str(out), "--type", "q4"])
    assert result.exit_code == 1 and "q4" in result.output
    folder = tmp_path / "a-folder"
    folder.mkdir()
    result = runner.invoke(
        app, ["checkpoint", "export-gguf", str(ckpt), str(folder), "--overwrite"]
    )
    assert result.exit_code == 1 and "is a folder; give the path of the .gguf" in result.output
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files


# --- bench/bench_llamacpp.py's command line (the benchmark itself builds llama.cpp) ------------
@pytest.mark.parametrize(
    "args",
    [
        ["--batch", "0"],
        ["--threads", "-1"],
        ["--new-tokens", "1"],
        ["--type", "q4_k"],
        ["--checkpoint", "/no/such/checkpoint"],
        ["--json", "/no/such/folder/out.json"],
    ],
)
def test_bench_llamacpp_refuses_bad_arguments_in_one_line(args):
    r = subprocess.run(
        [sys.executable, str(BENCH / "bench_llamacpp.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("bench_llamacpp.py: error:")


def test_bench_llamacpp_build_options_and_cache(monkeypatch, tmp_path):
    sys.path.insert(0, str(BENCH))
    try:
        import bench_llamacpp
    finally:
        sys.path.remove(str(BENCH))
    monkeypatch.setenv("CMAKE_ARGS", "-DGGML_AVX512=OFF -DGGML_BLAS=OFF")
    args = bench_llamacpp.cmake_args()
    assert "-DLLAMA_BUILD_TOOLS=OFF" in args and "-DBUILD_SHARED_LIBS=ON" in args
    assert args[-2:] == ["-DGGML_AVX512=OFF", "-DGGML_BLAS=OFF"]  # the user's, last, win
    monkeypatch.setenv("ATLAS_HOME", str(tmp_path))
    parsed = bench_llamacpp.parse_args(["--quick"])
    assert parsed.cache == tmp_path / "llamacpp" and parsed.new_tokens == 24
    # a finished build (its marker matches these options) is reused without building
    root = tmp_path / "llamacpp" / parsed.version
    root.mkdir(parents=True)
    (root / "built.json").write_text(
        json.dumps({"version": parsed.version, "cmake_args": bench_llamacpp.cmake_args()})
    )
    lib, package = bench_llamacpp.ensure_llamacpp(parsed.cache, parsed.version, 1)
    assert lib == root / "build" / "bin" and package == root / "src"


# --- the imported architectures: qwen2 (q/k/v biases) and gptneox (partial rotary, parallel)
@pytest.mark.parametrize(
    ("shape", "arch"),
    [
        ({"pos_encoding": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False,
          "qkv_bias": True, "n_kv_heads": 2}, "qwen2"),
        ({"pos_encoding": "rope", "norm": "layernorm", "mlp": "gelu_exact", "bias": True,
          "rotary_dim": 8, "parallel_residual": True}, "gptneox"),
    ],
)  # fmt: skip
def test_qwen2_and_gptneox_layouts(tmp_path, tokenizer, shape, arch):
    from atlas_server.model import ModelConfig

    config = ModelConfig(
        vocab_size=tokenizer.vocab_size, n_layers=2, d_model=64, n_heads=4, **shape
    )
    torch.manual_seed(0)
    model = Transformer(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ckpt = save_checkpoint(tmp_path / arch, model, tokenizer)
    reader = gguf.GGUFReader(export_gguf(ckpt, tmp_path / f"{arch}.gguf"))
    f = _fields(reader)
    tensors = {t.name: t for t in reader.tensors}
    state = model.state_dict()
    assert f["general.architecture"] == arch
    assert f[f"{arch}.rope.dimension_count"] == config.rope_dims
    wqkv, bqkv = state["blocks.0.attn.wqkv.weight"], state["blocks.0.attn.wqkv.bias"]
    if arch == "qwen2":
        assert "blk.0.attn_output.bias" not in tensors and "output.weight" not in tensors
        q_rows, kv_rows = 64, 2 * 16
        # qwen2 rotates halves in llama.cpp too: q/k rows are not permuted
        np.testing.assert_array_equal(
            tensors["blk.0.attn_q.weight"].data.reshape(q_rows, 64), wqkv[:, :q_rows].t().numpy()
        )
        np.testing.assert_array_equal(
            tensors["blk.0.attn_k.bias"].data, bqkv[q_rows : q_rows + kv_rows].numpy()
        )
    else:
        assert f["gptneox.use_parallel_residual"] is True
        assert f["gptneox.attention.layer_norm_epsilon"] == pytest.approx(config.norm_eps)
        np.testing.assert_array_equal(
            tensors["blk.0.attn_qkv.weight"].data.reshape(192, 64), wqkv.t().numpy()
        )
        np.testing.assert_array_equal(tensors["blk.0.attn_qkv.bias"].data, bqkv.numpy())
        # llama.cpp's gptneox always reads an output matrix: the tied head is written out
        np.testing.assert_array_equal(
            tensors["output.weight"].data.reshape(tokenizer.vocab_size, 64),
            state["tok_emb.weight"].numpy(),
        )


def test_added_tokens_are_user_defined_and_digit_splitting_is_smollm(tmp_path):
    from atlas_server.tokenizer import Tokenizer
    from atlas_server.tokenizer.hf_format import DIGITS_GPT2_SPLIT_PATTERN

    trained = train_from_texts(stdlib_sample(60_000), TrainConfig(vocab_size=300))
    tok = Tokenizer(
        trained.ranks,
        trained.special_tokens,
        DIGITS_GPT2_SPLIT_PATTERN,
        trained.merges,
        normalizer="NFC",
        added_tokens={"    ": 300, "  ": 301},
    )
    ckpt = _checkpoint(tmp_path, "gpt2-tiny", tok)
    f = _fields(gguf.GGUFReader(export_gguf(ckpt, tmp_path / "m.gguf")))
    assert f["tokenizer.ggml.pre"] == "smollm"
    assert f["tokenizer.ggml.tokens"][300] == "    "
    assert f["tokenizer.ggml.token_type"][300] == gguf.TokenType.USER_DEFINED


def test_written_checkpoints_and_gguf_files_follow_the_umask(tmp_path, tokenizer):
    """Temporary files and folders are 0600 / 0700; published, they were left so, and a
    server or llama.cpp running as another user could not read them."""
    import os
    import stat

    previous = os.umask(0o022)
    try:
        path = _checkpoint(tmp_path, "gpt2-tiny", tokenizer)
        gguf = export_gguf(path, tmp_path / "m.gguf", "f32")
        alone = tmp_path / "tok" / "atlas_tokenizer.json"
        tokenizer.save(alone)  # the tokenizer's own atomic write, outside a checkpoint
    finally:
        os.umask(previous)
    assert stat.S_IMODE(alone.stat().st_mode) == 0o644
    assert stat.S_IMODE(path.stat().st_mode) == 0o755
    assert {stat.S_IMODE(f.stat().st_mode) for f in path.iterdir()} == {0o644}
    assert stat.S_IMODE(gguf.stat().st_mode) == 0o644
