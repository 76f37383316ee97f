"""Import a GGUF file (llama.cpp's format) as an atlas checkpoint: export-gguf's inverse.

What it does: reads the file with the `gguf` package's `GGUFReader` (llama.cpp's own
reader; nothing here parses the format), takes the architecture (`gpt2`, `llama`, `qwen2`,
`gptneox`: the four export-gguf writes) and its hyper-parameters into a ModelConfig,
converts every tensor to fp32 (F32, F16, BF16 and Q8_0, with `gguf.quants.dequantize`),
maps llama.cpp's names and [out, in] layouts back to Atlas's (`gguf_export.gguf_tensors`
run backwards; for `llama`, q/k rows go back from adjacent-pair to rotate-half RoPE order),
rebuilds the byte-level BPE tokenizer from the tokens, token types (NORMAL: vocabulary,
CONTROL: special, USER_DEFINED: added token matched in any text, UNUSED: padding rows),
merges and the pre-tokenizer's split pattern, through the same reader as a Hugging Face
tokenizer.json, keeps the chat template, and writes a checkpoint whose provenance names
the file, its sha256, its `general.name` and architecture, the bos/eos ids and what the
file says to add around each text (`add_bos_token`, as import-hf's `tokenizer_adds`), for
`atlas serve` and the exports. Every tensor must be used, and every one the hyper-parameters
call for must be there with its shape. A checkpoint exported as f32 comes back bit for bit
with the same tokenizer ids; from f16/q8_0 the weights are the dequantized numbers.
Known differences, as llama.cpp itself computes them: `gpt2` and `gptneox` come back with
tanh GELU (`mlp="gelu"`; a Pythia exported with exact GELU returns tanh), and the tokenizer
with no normalizer (an imported Qwen2's NFC is not in the file). The pre-tokenizer
`llama-bpe` becomes GPT-4's split pattern (Atlas's default), which splits as Llama 3's does.
A tied gptneox head (written out as a copy of the embedding) is tied again.
What it does not do: other tensor types (q4_0, k-quants, i-quants: refused naming the
tensor), other architectures, SentencePiece or other non-BPE vocabularies, pre-tokenizers
Atlas has no split pattern for, rope scaling, split (multi-file) or big-endian files.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .checkpoint import save_checkpoint, sha256_file
from .gguf_export import BIASES, GGUF_ARCH, QWEN2_SPLIT_PATTERN, gguf_tensors
from .hf_arch import ARCHITECTURES, HFConversionError
from .model import ConfigError, ModelConfig, Transformer
from .tokenizer import GPT2_SPLIT_PATTERN, GPT4_SPLIT_PATTERN, IM_END, Tokenizer, TokenizerError
from .tokenizer.hf_format import CHATML_TEMPLATE, DIGITS_GPT2_SPLIT_PATTERN, tokenizer_from_hf_json

__all__ = ["GGUFImportError", "SPLIT_PATTERNS", "atlas_state_from_gguf", "import_gguf"]

# llama.cpp architecture -> Hugging Face model_type (what hf_arch and the exports call it).
MODEL_TYPES = {arch: model_type for model_type, arch in GGUF_ARCH.items()}
# llama.cpp pre-tokenizer (`tokenizer.ggml.pre`) -> the split pattern Atlas encodes with:
# export-gguf's names, and llama.cpp's older names for Llama 3's.
SPLIT_PATTERNS = {
    "gpt-2": GPT2_SPLIT_PATTERN,
    "llama-bpe": GPT4_SPLIT_PATTERN,  # splits as Llama 3's (gguf_export.PRE_TOKENIZERS)
    "llama3": GPT4_SPLIT_PATTERN,
    "llama-v3": GPT4_SPLIT_PATTERN,
    "qwen2": QWEN2_SPLIT_PATTERN,
    "smollm": DIGITS_GPT2_SPLIT_PATTERN,
}
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0")
_REQUIRED = object()


class GGUFImportError(HFConversionError):
    """A GGUF file that cannot be imported; the message says why."""


def _unpermute_rotary(w: Tensor, heads: int) -> Tensor:
    """gguf_export._permute_rotary undone: rows of a q or k projection ([heads * D, ...])
    from llama.cpp's adjacent-pair order (2i, 2i + 1) back to rotate-half (i, i + D/2)."""
    D = w.shape[0] // heads
    return w.reshape(heads, D // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def atlas_state_from_gguf(
    t: dict[str, Tensor], config: ModelConfig, model_type: str
) -> dict[str, Tensor]:
    """Atlas's state dict from llama.cpp's tensor names and [out, in] layouts (the inverse of
    `gguf_tensors`); `t` must hold exactly the tensors `gguf_tensors` writes for `config`."""
    H, K = config.n_heads, config.kv_heads
    state = {"tok_emb.weight": t["token_embd.weight"]}  # [V, C]
    if config.pos_encoding == "learned":
        state["pos_emb.weight"] = t["position_embd.weight"]  # [L, C]
    for i in range(config.n_layers):
        g, a = f"blk.{i}.", f"blocks.{i}."
        for ours, theirs in (("attn_norm", "attn_norm"), ("mlp_norm", "ffn_norm")):
            for suffix in ("weight", "bias"):
                if g + f"{theirs}.{suffix}" in t:
                    state[a + f"{ours}.{suffix}"] = t[g + f"{theirs}.{suffix}"]
        if model_type in ("gpt2", "gpt_neox"):  # one fused q|k|v matrix
            state[a + "attn.wqkv.weight"] = t[g + "attn_qkv.weight"].t()  # [C, 3 * H * D]
            if g + "attn_qkv.bias" in t:
                state[a + "attn.wqkv.bias"] = t[g + "attn_qkv.bias"]
        else:
            q, k, v = (t[g + f"attn_{n}.weight"] for n in "qkv")  # [H*D, C], [K*D, C] x 2
            if model_type == "llama":
                q, k = _unpermute_rotary(q, H), _unpermute_rotary(k, K)
            state[a + "attn.wqkv.weight"] = torch.cat([q, k, v]).t()  # [C, (H + 2K) * D]
            if g + "attn_q.bias" in t:
                qb, kb, vb = (t[g + f"attn_{n}.bias"] for n in "qkv")
                if model_type == "llama":
                    qb, kb = _unpermute_rotary(qb, H), _unpermute_rotary(kb, K)
                state[a + "attn.wqkv.bias"] = torch.cat([qb, kb, vb])  # [(H + 2K) * D]
        state[a + "attn.wo.weight"] = t[g + "attn_output.weight"].t()  # [H * D, C]
        if config.mlp == "swiglu":  # gate first, as FeedForward splits w_in
            gate, up = t[g + "ffn_gate.weight"], t[g + "ffn_up.weight"]  # [F, C] each
            state[a + "mlp.w_in.weight"] = torch.cat([gate, up]).t()  # [C, 2F]
        else:
            state[a + "mlp.w_in.weight"] = t[g + "ffn_up.weight"].t()  # [C, F]
        state[a + "mlp.w_out.weight"] = t[g + "ffn_down.weight"].t()  # [F, C]
        for ours, theirs in BIASES:
            if g + f"{theirs}.bias" in t:
                state[a + f"{ours}.bias"] = t[g + f"{theirs}.bias"]
    state["final_norm.weight"] = t["output_norm.weight"]
    if "output_norm.bias" in t:
        state["final_norm.bias"] = t["output_norm.bias"]
    if not config.tie_embeddings:
        state["lm_head.weight"] = t["output.weight"].t()  # [C, V]
    return {k: v.contiguous() for k, v in state.items()}


class _Fields:
    """The file's key/value fields, read with a type check that names the key."""

    def __init__(self, reader: Any, path: Path) -> None:
        self.fields, self.path = reader.fields, path

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = _REQUIRED) -> Any:
        import gguf

        field = self.fields.get(key)
        if field is None:
            if default is _REQUIRED:
                raise GGUFImportError(f"{self.path} has no {key}, which a GGUF model has")
            return default
        try:
            value = field.contents()
        except UnicodeDecodeError:  # strings are decoded only when read
            raise GGUFImportError(f"{self.path}: {key} is not valid UTF-8 text") from None
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            names = (
                kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            )
            raise GGUFImportError(f"{self.path}: {key} should be {names}, got {value!r}")
        if field.types[0] == gguf.GGUFValueType.FLOAT32:
            # A float32 key read as the shortest decimal that gives it (1e-05, not
            # 9.99999974737875e-06): the number the exported config held.
            value = float(str(np.float32(value)))
        return value


def _open(path: Path) -> Any:
    """A GGUFReader for PATH; a missing, foreign, truncated or damaged file in one line."""
    try:
        import gguf
    except ImportError:
        raise GGUFImportError(
            "GGUF import needs the gguf package: pip install 'atlas-llm[gguf]'"
        ) from None
    if path.is_dir():
        raise GGUFImportError(f"{path} is a folder; give the path of a .gguf file")
    if not path.is_file():
        raise GGUFImportError(f"no such file: {path}")
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":  # the format's magic
            raise GGUFImportError(f"{path} is not a GGUF file (it does not start with 'GGUF')")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, TypeError, OverflowError) as e:
        # The reader indexes past the end of a short file, or finds a tensor that does
        # not fit in what is left of it.
        raise GGUFImportError(
            f"{path} is truncated or damaged (llama.cpp's reader: {e or type(e).__name__})"
        ) from None
    if reader.byte_order != "I":
        raise GGUFImportError(f"{path} is a big-endian GGUF file; Atlas reads little-endian ones")
    return reader


def _model_config(f: _Fields, arch: str, names: dict[str, tuple[int, ...]]) -> ModelConfig:
    """The ModelConfig export-gguf writes these hyper-parameters from."""
    p = f"{arch}."
    n_heads = f.get(p + "attention.head_count", int)
    d_model = f.get(p + "embedding_length", int)
    kv_heads = f.get(p + "attention.head_count_kv", int, n_heads)
    if n_heads <= 0 or d_model % n_heads:
        raise GGUFImportError(
            f"{f.path}: embedding_length {d_model} is not a multiple of head_count {n_heads}"
        )
    head_dim = d_model // n_heads
    key_length = f.get(p + "attention.key_length", int, head_dim)
    if key_length != head_dim:  # Atlas's heads are d_model / n_heads wide
        raise GGUFImportError(
            f"{f.path}: head width {key_length} is not embedding_length / head_count "
            f"({head_dim}); Atlas does not support that"
        )
    scaling = f.get(p + "rope.scaling.type", str, "none")
    if scaling != "none":
        raise GGUFImportError(f"{f.path}: rope scaling {scaling!r} is not supported")
    if "token_embd.weight" not in names:
        raise GGUFImportError(f"{f.path} has no token_embd.weight tensor")
    vocab = f.get(p + "vocab_size", int, names["token_embd.weight"][0])
    ff = f.get(p + "feed_forward_length", int)
    common: dict[str, Any] = {
        "vocab_size": vocab,
        "n_layers": f.get(p + "block_count", int),
        "d_model": d_model,
        "n_heads": n_heads,
        "max_seq_len": f.get(p + "context_length", int),
        # export-gguf writes no output.weight for a tied head (but a copy for gptneox,
        # which _import_tensors ties again)
        "tie_embeddings": "output.weight" not in names,
    }
    if arch == "gpt2":
        config: dict[str, Any] = {
            "pos_encoding": "learned",
            "norm": "layernorm",
            "norm_eps": f.get(p + "attention.layer_norm_epsilon", (int, float)),
            "mlp": "gelu",  # llama.cpp's gpt2 graph: tanh GELU
            "bias": True,
        }
    else:
        rope_dims = f.get(p + "rope.dimension_count", int, head_dim)
        config = {
            "pos_encoding": "rope",
            "rope_theta": f.get(p + "rope.freq_base", (int, float), 10000.0),
        }
        if arch == "gptneox":
            config |= {
                "rotary_dim": rope_dims,
                "norm": "layernorm",
                "norm_eps": f.get(p + "attention.layer_norm_epsilon", (int, float)),
                "mlp": "gelu",  # llama.cpp's gptneox graph: tanh GELU
                "bias": True,
                "parallel_residual": f.get(p + "use_parallel_residual", bool, True),
            }
        else:
            if rope_dims != head_dim:  # the q/k permutation and Atlas's llama rotate whole heads
                raise GGUFImportError(
                    f"{f.path}: {arch} with RoPE on {rope_dims} of {head_dim} dims per head "
                    "is not supported"
                )
            config |= {
                "n_kv_heads": kv_heads,
                "norm": "rmsnorm",
                "norm_eps": f.get(p + "attention.layer_norm_rms_epsilon", (int, float)),
                "mlp": "swiglu",
                "bias": False,
                "qkv_bias": "blk.0.attn_q.bias" in names,  # Qwen2's (any other bias is refused)
            }
    try:
        config = _canonical(ModelConfig(**common, **config), ff)
    except ConfigError as e:
        raise GGUFImportError(f"{f.path}: {e}") from None
    return config


def _canonical(config: ModelConfig, ff: int) -> ModelConfig:
    """`config` with d_ff = ff, and with None where a value is the default it stands for
    (n_kv_heads = n_heads, ...), so an exported preset comes back as the same config."""
    config = config.replace(d_ff=None if ff == config.replace(d_ff=None).ff_dim else ff)
    if config.n_kv_heads == config.n_heads:
        config = config.replace(n_kv_heads=None)
    if config.rotary_dim == config.head_dim:
        config = config.replace(rotary_dim=None)
    if config.qkv_bias == config.bias:
        config = config.replace(qkv_bias=None)
    return config


def _import_tensors(
    reader: Any, path: Path, config: ModelConfig, model_type: str
) -> tuple[ModelConfig, dict[str, Tensor]]:
    """Every tensor as fp32 under Atlas's names; (config, state). Refuses a missing, extra or
    misshapen tensor, naming it."""
    import gguf

    raw = {}
    for t in reader.tensors:
        # ggml's ne lists dims innermost first; dequantize gives numpy's order, [out, in].
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        raw[t.name] = torch.tensor(values.reshape(tuple(reversed(t.shape.tolist()))))
    # export-gguf writes a tied head out for gptneox (llama.cpp's always reads one): a head
    # equal to the embedding is that copy, and is tied again.
    head, embedding = raw.get("output.weight"), raw.get("token_embd.weight")
    if model_type == "gpt_neox" and head is not None and torch.equal(head, embedding):
        del raw["output.weight"]
        config = config.replace(tie_embeddings=True)
    with torch.device("meta"):  # names and shapes only, no memory
        expected = gguf_tensors(Transformer(config).state_dict(), config, model_type)
    if config.tie_embeddings:
        expected.pop("output.weight", None)  # gptneox's copy, tied above
    missing = sorted(set(expected) - set(raw))
    if missing:
        raise GGUFImportError(
            f"{path} lacks tensor {missing[0]}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + f", which this {GGUF_ARCH[model_type]} model needs"
        )
    left = sorted(set(raw) - set(expected))
    if left:
        more = f" and {len(left) - 3} more" if len(left) > 3 else ""
        raise GGUFImportError(
            f"{path} holds {len(left)} tensors this model does not use "
            f"({', '.join(left[:3])}{more}); do the hyper-parameters match the tensors?"
        )
    for name, tensor in expected.items():
        if raw[name].shape != tensor.shape:
            raise GGUFImportError(
                f"{path}: tensor {name} is {list(raw[name].shape)} but the hyper-parameters "
                f"make it {list(tensor.shape)} ([out, in])"
            )
    return config, atlas_state_from_gguf(raw, config, model_type)


def _hf_pre_tokenizer(pattern: str) -> dict[str, Any]:
    """The tokenizer.json pre-tokenizer that splits by `pattern` (as tokenizer_to_hf_json
    writes it), for `tokenizer_from_hf_json` to read back."""
    if pattern == GPT2_SPLIT_PATTERN:
        return {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    if pattern == DIGITS_GPT2_SPLIT_PATTERN:
        parts = [{"type": "Digits", "individual_digits": True}, {"type": "ByteLevel"}]
        return {"type": "Sequence", "pretokenizers": parts}
    split = {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated"}
    return {"type": "Sequence", "pretokenizers": [split, {"type": "ByteLevel", "use_regex": False}]}


def _tokenizer(f: _Fields, name: str) -> Tokenizer:
    """Atlas's byte-level BPE tokenizer from the tokenizer.ggml.* fields."""
    import gguf

    model = f.get("tokenizer.ggml.model", str)
    if model != "gpt2":
        what = "a SentencePiece vocabulary" if model == "llama" else f"a {model!r} vocabulary"
        raise GGUFImportError(
            f"{f.path} holds {what} (tokenizer.ggml.model={model!r}); Atlas imports "
            "byte-level BPE ('gpt2') tokenizers only"
        )
    pre = f.get("tokenizer.ggml.pre", str, "default")
    if pre not in SPLIT_PATTERNS:
        raise GGUFImportError(
            f"{f.path}: pre-tokenizer {pre!r} is not one Atlas can split by; known: "
            f"{', '.join(SPLIT_PATTERNS)}"
        )
    tokens = f.get("tokenizer.ggml.tokens", list)
    types = f.get("tokenizer.ggml.token_type", list)
    if len(types) != len(tokens):
        raise GGUFImportError(f"{f.path} has {len(tokens)} tokens but {len(types)} token types")
    T = gguf.TokenType
    vocab, added = {}, []
    for i, (token, kind) in enumerate(zip(tokens, types, strict=True)):
        if kind == T.NORMAL:
            if vocab.setdefault(token, i) != i:
                raise GGUFImportError(f"{f.path}: token {token!r} is listed twice")
        elif kind in (T.CONTROL, T.USER_DEFINED):  # a special, or matched in any text
            added.append({"id": i, "content": token, "special": kind == T.CONTROL})
        elif kind != T.UNUSED:  # padding rows past the vocabulary
            kind_name = {t.value: t.name for t in T}.get(kind, str(kind))
            raise GGUFImportError(
                f"{f.path}: token {i} {token!r} has type {kind_name}, which a byte-level BPE "
                "vocabulary does not use"
            )
    merges = f.get("tokenizer.ggml.merges", list, [])
    odd = next((m for m in merges if not isinstance(m, str) or " " not in m), None)
    if odd is not None:
        raise GGUFImportError(f"{f.path}: merge {odd!r} is not two tokens joined by a space")
    hf_json = {  # the structure of a tokenizer.json, read by import-hf's own reader
        "model": {"type": "BPE", "vocab": vocab, "merges": merges},
        "pre_tokenizer": _hf_pre_tokenizer(SPLIT_PATTERNS[pre]),
        "added_tokens": added,
    }
    try:
        return tokenizer_from_hf_json(hf_json, name=name)
    except TokenizerError as e:
        raise GGUFImportError(f"{f.path}: {e}") from None


def _special_ids(f: _Fields, tokenizer: Tokenizer) -> dict[str, Any]:
    """bos/eos ids and what to add around each text, as import-hf records them
    (hf_export.special_ids reads them back). Ids that are not special tokens (llama.cpp's
    default 11, an ordinary token) are not kept."""
    known = tokenizer.id_to_special.keys() | tokenizer.id_to_added.keys()
    bos = f.get("tokenizer.ggml.bos_token_id", int, None)
    eos = f.get("tokenizer.ggml.eos_token_id", int, None)
    eot = f.get("tokenizer.ggml.eot_token_id", int, None)
    found: dict[str, Any] = {}
    if bos in known:
        found["bos_token_id"] = bos
    if eos in known:
        found["eos_token_id"] = eos
        # An end-of-turn that is not ChatML's <|im_end|> (a stop already) stops too: Llama
        # 3 Instruct's <|eot_id|>; the file's own eos stays the one the exports write.
        if eot in known and eot not in (eos, tokenizer.special_tokens.get(IM_END)):
            found["eos_token_id"] = [eos, eot]
            found["tokenizer_eos_token_id"] = eos
    before = [bos] if f.get("tokenizer.ggml.add_bos_token", bool, False) and bos in known else []
    after = [eos] if f.get("tokenizer.ggml.add_eos_token", bool, False) and eos in known else []
    if before or after:
        found["tokenizer_adds"] = {"before": before, "after": after}
    return found


def import_gguf(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Convert the GGUF file SRC into an atlas checkpoint at DST."""
    path = Path(src)
    reader = _open(path)
    f = _Fields(reader, path)
    if f.get("split.count", int, 1) > 1:
        raise GGUFImportError(
            f"{path} is one part of a split GGUF; merge the parts first "
            "(llama.cpp's llama-gguf-split --merge)"
        )
    arch = f.get("general.architecture", str)
    if arch not in MODEL_TYPES:
        raise GGUFImportError(
            f"{path}: architecture {arch!r} is not supported; Atlas imports "
            f"{', '.join(MODEL_TYPES)}"
        )
    model_type = MODEL_TYPES[arch]
    gguf_name = f.get("general.name", str, None)
    tokenizer = _tokenizer(f, gguf_name or path.stem)  # refused before any tensor is read
    for t in reader.tensors:
        if t.tensor_type.name not in SUPPORTED_TYPES:
            raise GGUFImportError(
                f"{path}: tensor {t.name} is {t.tensor_type.name}; Atlas imports "
                f"{', '.join(SUPPORTED_TYPES)} tensors (convert the original model to one "
                "of them with llama.cpp)"
            )
    names = {t.name: tuple(reversed(t.shape.tolist())) for t in reader.tensors}
    config = _model_config(f, arch, names)
    config, state = _import_tensors(reader, path, config, model_type)
    model = Transformer(config)
    model.load_state_dict(state, strict=True)

    template = f.get("tokenizer.chat_template", str, None)
    if template == CHATML_TEMPLATE:
        # export-gguf writes this for a checkpoint with none: it is what the server renders
        # without a template, so the round trip keeps having none.
        template = None
    provenance = {
        "source": f"gguf:{path.resolve()}",
        "source_file": path.name,
        "source_sha256": sha256_file(path),
        **({"gguf_name": gguf_name} if gguf_name is not None else {}),
        "gguf_architecture": arch,
        "imported_from": model_type,  # the exports pick this architecture back
        "architecture": ARCHITECTURES[model_type].hf_class,
        **_special_ids(f, tokenizer),
    }
    return save_checkpoint(dst, model.eval(), tokenizer, provenance, template)
