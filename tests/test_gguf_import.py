"""GGUF import (`atlas checkpoint import-gguf`), export-gguf's inverse, against references
nobody here wrote.

References: the `gguf` package (llama.cpp's writer, through export-gguf and directly for
the files Atlas would never write; its reader and `gguf.quants.dequantize`), and
`transformers`' own GGUF loader, which reads, dequantizes and converts a GGUF itself: the
imported model's logits and the imported tokenizer's ids equal what it gets from the same
file, for gpt2, llama and qwen2 (it has no gptneox loader: skipped, saying so).
What is checked: f32 round trips of all four architectures are bit for bit (config,
tensors, tokenizer ids); from f16 and q8_0 the weights are the dequantized numbers; the
split patterns, added tokens, bos/eos/eot, add_bos and chat template come back; provenance
names the file; the refusals (tensor types, architectures, SentencePiece, pre-tokenizers,
truncated, foreign, damaged or mismatched files, an existing output) are one line, exit 1,
and write nothing.
"""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from atlas_server.checkpoint import load_checkpoint, save_checkpoint, sha256_file
from atlas_server.cli import app
from atlas_server.gguf_export import (
    LLAMA3_SPLIT_PATTERN,
    PRE_TOKENIZERS,
    QWEN2_SPLIT_PATTERN,
    export_gguf,
    gguf_tensors,
)
from atlas_server.gguf_import import (
    SPLIT_PATTERNS,
    GGUFImportError,
    atlas_state_from_gguf,
    import_gguf,
)
from atlas_server.model import ModelConfig, Transformer, load_preset, native
from atlas_server.model.transformer import Linear
from atlas_server.tokenizer import (
    GPT2_SPLIT_PATTERN,
    GPT4_SPLIT_PATTERN,
    Tokenizer,
    TrainConfig,
    train_from_texts,
)
from atlas_server.tokenizer.corpus import stdlib_sample
from atlas_server.tokenizer.hf_format import DIGITS_GPT2_SPLIT_PATTERN

gguf = pytest.importorskip("gguf")

TEXTS = [
    "def f(x):\n    return x ** 2  # square\n\n\nclass A:\n\tpass\n",
    "naïve café — 東京 🙂 Ünïcödé ﬁ Ω\r\n",
    "   leading, trailing and    inner runs   \n\n\t\t  \n",
    "numbers 1234567 3.14159 -42 0x1F 2024-01-01",
    "<|endoftext|>after the special<|im_start|>user\nhi<|im_end|>\n",
    "it's we'll THEY'RE you've i'm he'd",
]


@pytest.fixture(scope="module")
def tokenizer():
    return train_from_texts(stdlib_sample(80_000), TrainConfig(vocab_size=420))


def _configs(vocab: int) -> dict[str, ModelConfig]:
    """One tiny model per llama.cpp architecture, with the options each one has."""
    rope = {"pos_encoding": "rope", "n_layers": 2, "d_model": 64, "n_heads": 4}
    return {
        # 12 padding rows past the tokenizer (UNUSED tokens); 1024 positions, because
        # transformers' GGUF loader sets n_ctx but not n_positions (its default is 1024)
        "gpt2": load_preset("gpt2-tiny", vocab_size=vocab + 12, max_seq_len=1024),
        "llama": load_preset("llama-tiny", vocab_size=vocab),  # GQA, untied head
        "qwen2": ModelConfig(
            vocab_size=vocab, n_kv_heads=2, norm="rmsnorm", mlp="swiglu", bias=False,
            qkv_bias=True, rope_theta=1e6, norm_eps=1e-6, **rope,
        ),
        # tanh GELU: what llama.cpp's gptneox computes (exact GELU comes back tanh)
        "gptneox": ModelConfig(
            vocab_size=vocab, norm="layernorm", mlp="gelu", rotary_dim=8,
            parallel_residual=True, tie_embeddings=True, **rope,
        ),
    }  # fmt: skip


def _checkpoint(path: Path, config: ModelConfig, tokenizer, **kwargs) -> Path:
    torch.manual_seed(0)
    model = Transformer(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # no all-ones norms / zero biases to hide mix-ups
    return save_checkpoint(path, model, tokenizer, **kwargs)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    configs = _configs(tokenizer.vocab_size)
    return {arch: _checkpoint(root / arch, c, tokenizer) for arch, c in configs.items()}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, checkpoints) -> dict[tuple[str, str], Path]:
    root = tmp_path_factory.mktemp("gguf")
    return {
        (arch, kind): export_gguf(ckpt, root / f"{arch}-{kind}.gguf", kind)
        for arch, ckpt in checkpoints.items()
        for kind in ("f32", "f16", "q8_0")
    }


def _encodings(tok: Tokenizer) -> list[list[int]]:
    return [tok.encode(text, allowed_special="all") for text in TEXTS]


def _cli(*args: str):
    return CliRunner().invoke(app, ["checkpoint", *args])


# --- round trips ---------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2", "gptneox"])
def test_f32_round_trip_is_bit_for_bit(tmp_path, checkpoints, exported, arch):
    source = exported[arch, "f32"]
    result = _cli("import-gguf", str(source), str(tmp_path / "back"))
    assert result.exit_code == 0, result.output
    original, back = load_checkpoint(checkpoints[arch]), load_checkpoint(tmp_path / "back")
    assert back.config == original.config  # every hyper-parameter, tied head, biases
    ours, theirs = original.model.state_dict(), back.model.state_dict()
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(theirs[name], ours[name]), name
    tok, tok_back = original.tokenizer, back.tokenizer
    assert tok_back.ranks == tok.ranks and tok_back.special_tokens == tok.special_tokens
    assert tok_back.pattern == tok.pattern and tok_back.added_tokens == {}
    assert _encodings(tok_back) == _encodings(tok)
    assert back.chat_template is None  # export's ChatML stand-in is the server's default
    p = back.provenance
    assert p["source_file"] == source.name and p["source_sha256"] == sha256_file(source)
    assert p["gguf_name"] == arch and p["gguf_architecture"] == arch
    assert p["imported_from"] == {"gptneox": "gpt_neox"}.get(arch, arch)
    eot = tok.special_tokens["<|endoftext|>"]
    assert p["bos_token_id"] == p["eos_token_id"] == eot and "tokenizer_adds" not in p
    # and out again: the same tensors and fields as the source file
    again = export_gguf(tmp_path / "back", tmp_path / f"{arch}.gguf")
    want = gguf.GGUFReader(source)
    got = gguf.GGUFReader(again)
    for a, b in zip(want.tensors, got.tensors, strict=True):
        assert a.name == b.name and np.array_equal(a.data, b.data), a.name
    skip = {"general.name", "GGUF.kv_count"}
    assert {k: v.contents() for k, v in want.fields.items() if k not in skip} == {
        k: v.contents() for k, v in got.fields.items() if k not in skip
    }


@pytest.mark.parametrize("kind", ["f16", "q8_0"])
@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2", "gptneox"])
def test_f16_and_q8_0_import_the_dequantized_numbers(tmp_path, checkpoints, exported, arch, kind):
    source = exported[arch, kind]
    back = load_checkpoint(import_gguf(source, tmp_path / "back"))
    assert back.config == load_checkpoint(checkpoints[arch]).config
    # Written out again as f32 (export's mapping, tested in test_gguf.py), every tensor is
    # what llama.cpp's reader and dequantizer make of the source file.
    f32 = gguf.GGUFReader(export_gguf(back, tmp_path / "f32.gguf"))
    ours = {t.name: t.data for t in f32.tensors}
    reader = gguf.GGUFReader(source)
    assert {t.tensor_type.name for t in reader.tensors} == {"F32", kind.upper()}
    for t in reader.tensors:
        want = gguf.quants.dequantize(t.data, t.tensor_type).reshape(ours[t.name].shape)
        assert np.array_equal(ours[t.name], want), t.name


def test_bf16_tensors_are_read(tmp_path, exported):
    def to_bf16(t):
        return gguf.quants.quantize(t.data, gguf.GGMLQuantizationType.BF16), "BF16"

    source = _rewrite(exported["llama", "f32"], tmp_path / "bf16.gguf", tensors={
        name: to_bf16 for name in ("blk.0.attn_q.weight", "output.weight")
    })  # fmt: skip
    back = load_checkpoint(import_gguf(source, tmp_path / "back"))
    head = back.model.state_dict()["lm_head.weight"].t().numpy()  # [V, C]
    reader = {t.name: t for t in gguf.GGUFReader(source).tensors}
    want = gguf.quants.dequantize(reader["output.weight"].data, gguf.GGMLQuantizationType.BF16)
    assert np.array_equal(head, want)


@pytest.mark.parametrize(
    ("model_type", "shape"),
    [
        ("llama", {"n_kv_heads": 1, "qkv_bias": True}),  # biases permuted with their rows
        ("llama", {"n_kv_heads": 2, "tie_embeddings": True}),
        ("gpt_neox", {"norm": "layernorm", "mlp": "gelu", "bias": True, "rotary_dim": 4}),
    ],
    ids=["llama-qkv-bias-mqa", "llama-tied-gqa", "gptneox-partial-rotary"],
)
def test_atlas_state_from_gguf_inverts_gguf_tensors(model_type, shape):
    base = {"norm": "rmsnorm", "mlp": "swiglu", "bias": False}
    config = ModelConfig(
        vocab_size=50, n_layers=2, d_model=32, n_heads=4, pos_encoding="rope",
        **{**base, **shape},
    )  # fmt: skip
    torch.manual_seed(0)
    state = {k: torch.randn_like(v) for k, v in Transformer(config).state_dict().items()}
    back = atlas_state_from_gguf(gguf_tensors(state, config, model_type), config, model_type)
    assert back.keys() == state.keys()
    for name in state:
        assert torch.equal(back[name], state[name]), name


def test_gelu_exact_comes_back_as_llama_cpp_computes_it(tmp_path, tokenizer):
    """llama.cpp's gptneox (and gpt2) graphs use tanh GELU; nothing in the file says more."""
    config = _configs(tokenizer.vocab_size)["gptneox"].replace(mlp="gelu_exact")
    ckpt = _checkpoint(tmp_path / "pythia", config, tokenizer)
    back = load_checkpoint(import_gguf(export_gguf(ckpt, tmp_path / "p.gguf"), tmp_path / "b"))
    assert back.config == config.replace(mlp="gelu")


def test_the_split_patterns_map_back_to_what_export_writes():
    for pre in PRE_TOKENIZERS.values():  # each comes back as a pattern export names it by
        assert PRE_TOKENIZERS[SPLIT_PATTERNS[pre]] == pre


@pytest.mark.parametrize(
    ("pattern", "back_as"),
    [
        (GPT2_SPLIT_PATTERN, GPT2_SPLIT_PATTERN),
        (GPT4_SPLIT_PATTERN, GPT4_SPLIT_PATTERN),
        (LLAMA3_SPLIT_PATTERN, GPT4_SPLIT_PATTERN),  # both are llama.cpp's llama-bpe
        (QWEN2_SPLIT_PATTERN, QWEN2_SPLIT_PATTERN),
        (DIGITS_GPT2_SPLIT_PATTERN, DIGITS_GPT2_SPLIT_PATTERN),
    ],
    ids=["gpt-2", "gpt-4", "llama-3", "qwen2", "smollm"],
)
def test_split_patterns_and_added_tokens_round_trip(tmp_path, tokenizer, pattern, back_as):
    n = tokenizer.vocab_size
    tok = Tokenizer(
        tokenizer.ranks,
        tokenizer.special_tokens,
        pattern,
        tokenizer.merges,
        added_tokens={"    ": n, "  ": n + 1},  # Pythia's runs of spaces: USER_DEFINED
    )
    config = load_preset("gpt2-tiny", vocab_size=n + 2)
    ckpt = _checkpoint(tmp_path / "c", config, tok)
    back = load_checkpoint(import_gguf(export_gguf(ckpt, tmp_path / "t.gguf"), tmp_path / "b"))
    assert back.tokenizer.pattern == back_as
    assert back.tokenizer.added_tokens == tok.added_tokens
    assert _encodings(back.tokenizer) == _encodings(tok)
    assert back.tokenizer.encode("x = [1, 2]      # 12345") == tok.encode("x = [1, 2]      # 12345")


def test_bos_eos_eot_add_bos_and_chat_template_come_back(tmp_path, tokenizer):
    specials = tokenizer.special_tokens
    bos, eos = specials["<|im_start|>"], specials["<|endoftext|>"]
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    recorded = {"bos_token_id": bos, "tokenizer_adds": {"before": [bos], "after": []}}
    ckpt = _checkpoint(
        tmp_path / "c", load_preset("llama-tiny", vocab_size=tokenizer.vocab_size), tokenizer,
        provenance=recorded, chat_template=template,
    )  # fmt: skip
    source = export_gguf(ckpt, tmp_path / "m.gguf")
    result = _cli("import-gguf", str(source), str(tmp_path / "back"))
    assert result.exit_code == 0, result.output
    assert f"adds id [{bos}] before every text" in result.output  # as import-hf says it
    back = load_checkpoint(tmp_path / "back")
    assert back.chat_template == template
    p = back.provenance
    assert p["bos_token_id"] == bos and p["eos_token_id"] == eos
    assert p["tokenizer_adds"] == recorded["tokenizer_adds"]
    fields = gguf.GGUFReader(export_gguf(back, tmp_path / "again.gguf")).fields
    assert fields["tokenizer.ggml.add_bos_token"].contents() is True
    assert fields["tokenizer.ggml.bos_token_id"].contents() == bos
    # An end of turn that is not <|im_end|> (Llama 3's <|eot_id|>) is a stop too.
    u32 = gguf.GGUFValueType.UINT32
    eot = _rewrite(source, tmp_path / "eot.gguf", {"tokenizer.ggml.eot_token_id": (bos, u32)})
    p = load_checkpoint(import_gguf(eot, tmp_path / "eot")).provenance
    assert p["eos_token_id"] == [eos, bos] and p["tokenizer_eos_token_id"] == eos


# --- against transformers' own GGUF loader -----------------------------------------------------
@pytest.mark.parametrize(
    ("arch", "kind"), [("gpt2", "f32"), ("llama", "q8_0"), ("qwen2", "f16"), ("gptneox", "f32")]
)
def test_transformers_reads_the_same_model_and_tokenizer(tmp_path, exported, arch, kind):
    transformers = pytest.importorskip("transformers")
    source = exported[arch, kind]
    try:
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(
            str(source.parent), gguf_file=source.name
        ).eval()
        hf_tok = transformers.AutoTokenizer.from_pretrained(
            str(source.parent), gguf_file=source.name
        )
    except ValueError as e:
        if "not supported" not in str(e):
            raise
        pytest.skip(f"transformers cannot load a {arch} GGUF: {e}")
    ckpt = load_checkpoint(import_gguf(source, tmp_path / "back"))
    ids = torch.randint(
        0, ckpt.tokenizer.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        expected, got = hf_model(ids).logits, ckpt.model(ids)
    assert (expected - got).abs().max().item() <= 1e-4
    # The same ids on varied text (already NFC: Qwen2's tokenizer in transformers normalizes
    # and llama.cpp does not), specials included, as transformers cuts them out.
    for text in TEXTS:
        assert unicodedata.is_normalized("NFC", text)
        want = hf_tok(text, add_special_tokens=False)["input_ids"]
        assert ckpt.tokenizer.encode(text, allowed_special="all") == want, text


# --- refusals ------------------------------------------------------------------------------
def _rewrite(src: Path, dst: Path, fields=None, drop=(), tensors=None, extra=None) -> Path:
    """SRC copied with the gguf writer: `fields` {key: (value, type[, array item type])} set, keys and
    tensors in `drop` left out, `tensors` {name: fn(ReaderTensor) -> (data, type name)}
    converted, `extra` {name: array} added."""
    fields, tensors = dict(fields or {}), tensors or {}
    reader = gguf.GGUFReader(src)
    arch = fields.pop("general.architecture", (None,))[0]
    writer = gguf.GGUFWriter(str(dst), arch or reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in drop:
            continue
        if key in fields:
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub)
    for key, (value, *vtypes) in fields.items():
        writer.add_key_value(key, value, *vtypes)
    for t in reader.tensors:
        if t.name in drop:
            continue
        data, qtype = np.array(t.data), t.tensor_type
        if t.name in tensors:
            data, name = tensors[t.name](t)
            qtype = gguf.GGMLQuantizationType[name]
        writer.add_tensor(t.name, data, raw_dtype=qtype)
    for name, data in (extra or {}).items():
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def _assert_refused(tmp_path, source, *fragments) -> str:
    out = tmp_path / "refused"
    result = _cli("import-gguf", str(source), str(out))
    assert result.exit_code == 1, result.output
    assert result.output.startswith("error:") and len(result.output.strip().splitlines()) == 1
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.output, result.output
    assert not out.exists()
    return result.output


def test_quantizations_other_than_q8_0_are_refused_naming_the_tensor(tmp_path, exported):
    def q4_0(t):
        return gguf.quants.quantize(t.data, gguf.GGMLQuantizationType.Q4_0), "Q4_0"

    source = _rewrite(
        exported["llama", "f32"], tmp_path / "q4.gguf", tensors={"blk.1.ffn_down.weight": q4_0}
    )
    _assert_refused(tmp_path, source, "blk.1.ffn_down.weight is Q4_0", "F32, F16, BF16, Q8_0")


V = gguf.GGUFValueType
S, I32, U32, A = V.STRING, V.INT32, V.UINT32, V.ARRAY


@pytest.mark.parametrize(
    ("change", "fragments"),
    [
        ({"general.architecture": ("falcon", S)}, ["architecture 'falcon' is not supported"]),
        ({"tokenizer.ggml.model": ("llama", S)}, ["SentencePiece", "byte-level BPE"]),
        ({"tokenizer.ggml.model": ("bert", S)}, ["'bert' vocabulary"]),
        ({"tokenizer.ggml.pre": ("deepseek-llm", S)}, ["pre-tokenizer 'deepseek-llm'"]),
        ({"llama.block_count": ("two", S)}, ["llama.block_count should be int, got 'two'"]),
        ({"llama.rope.scaling.type": ("yarn", S)}, ["rope scaling 'yarn'"]),
        ({"llama.attention.key_length": (32, U32)}, ["head width 32"]),
        ({"llama.rope.dimension_count": (8, U32)}, ["RoPE on 8 of 16 dims"]),
        ({"split.count": (2, U32)}, ["split GGUF"]),
        ({"llama.attention.head_count": (3, U32)}, ["embedding_length 64 is not a multiple"]),
        ({"tokenizer.ggml.merges": (["a b", "ab"], A, S)}, ["merge 'ab' is not two tokens"]),
        ({"tokenizer.ggml.token_type": ([6] * 3, A, I32)}, ["3 token types"]),
    ],
    ids=[
        "architecture",
        "sentencepiece",
        "bert-vocab",
        "pre-tokenizer",
        "wrong-type",
        "rope-scaling",
        "key-length",
        "partial-rope-llama",
        "split",
        "heads",
        "merge",
        "types",
    ],
)
def test_files_atlas_cannot_represent_are_refused_in_one_line(
    tmp_path, exported, change, fragments
):
    source = _rewrite(exported["llama", "f32"], tmp_path / "x.gguf", change)
    _assert_refused(tmp_path, source, *fragments)


def test_missing_extra_and_misshapen_tensors_and_keys_are_named(tmp_path, exported):
    source = exported["llama", "f32"]
    cases = [
        (_rewrite(source, tmp_path / "a.gguf", drop=["blk.1.ffn_up.weight"]),
         ["lacks tensor blk.1.ffn_up.weight"]),
        (_rewrite(source, tmp_path / "b.gguf", extra={"rope_freqs.weight": np.ones(8, np.float32)}),
         ["1 tensors this model does not use (rope_freqs.weight)"]),
        (_rewrite(source, tmp_path / "c.gguf", {"llama.feed_forward_length": (128, U32)}),
         ["tensor blk.0.ffn_gate.weight is [192, 64] but the hyper-parameters make it [128, 64]"]),
        (_rewrite(source, tmp_path / "d.gguf", drop=["llama.block_count"]),
         ["has no llama.block_count"]),
        (_rewrite(source, tmp_path / "e.gguf", drop=["tokenizer.ggml.tokens"]),
         ["has no tokenizer.ggml.tokens"]),
    ]  # fmt: skip
    for path, fragments in cases:
        _assert_refused(tmp_path, path, *fragments)


def test_truncated_foreign_and_missing_files_are_one_line_errors(tmp_path, exported, checkpoints):
    data = exported["gpt2", "q8_0"].read_bytes()
    for n in (0, 3, 6, 24, 500, 5000, len(data) // 2, len(data) - 1):
        cut = tmp_path / f"cut{n}.gguf"
        cut.write_bytes(data[:n])
        _assert_refused(tmp_path, cut, "cut", "not a GGUF file" if n < 4 else "truncated")
    _assert_refused(tmp_path, checkpoints["gpt2"] / "model.safetensors", "not a GGUF file")
    _assert_refused(tmp_path, checkpoints["gpt2"] / "config.json", "not a GGUF file")
    _assert_refused(tmp_path, tmp_path / "nowhere.gguf", "no such file")
    _assert_refused(tmp_path, checkpoints["gpt2"], "is a folder")
    with pytest.raises(GGUFImportError, match="truncated"):
        import_gguf(tmp_path / "cut500.gguf", tmp_path / "api")


def test_an_existing_output_is_kept_unless_overwrite(tmp_path, exported):
    source = exported["gpt2", "f32"]
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("mine")
    result = _cli("import-gguf", str(source), str(out))
    assert result.exit_code == 1 and "--overwrite" in result.output
    assert (out / "mine.txt").read_text() == "mine"
    result = _cli("import-gguf", str(source), str(out), "--overwrite")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["provenance"]["source_file"] == source.name
    assert not (out / "mine.txt").exists()
    # the input is never the output, --overwrite or not
    result = _cli("import-gguf", str(source), str(source.parent), "--overwrite")
    assert result.exit_code == 1 and "holds the input" in result.output
    assert source.is_file()


@pytest.mark.skipif(not native.available(), reason="no C compiler here")
def test_a_q8_0_file_served_in_int8_computes_with_the_files_own_numbers(tmp_path, exported):
    """Quantizing q8_0's dequantized numbers again gives them back (each block's largest
    weight is +-127 d exactly), so `atlas serve --quantize int8` of an imported q8_0 file
    multiplies by the file's own 8-bit weights: its matrices, read back from the int8
    copies, equal the file's."""
    back = load_checkpoint(import_gguf(exported["llama", "q8_0"], tmp_path / "back"))
    model = back.model.prepare_for_inference(quantize="int8")
    for module in model.modules():
        if isinstance(module, Linear):
            copy = module.packed
            k, n = module.weight.shape
            assert torch.equal(native.dequantize_q8(copy.panels, copy.scales, k, n), module.weight)
