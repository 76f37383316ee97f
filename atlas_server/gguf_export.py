"""Export an atlas checkpoint as one GGUF file, the format llama.cpp runs.

What it does: picks the llama.cpp architecture that computes what the Atlas model does
(the Hugging Face one `hf_arch.architecture_for` names: gpt2, llama, qwen2, gptneox),
writes its hyper-parameters, every tensor under llama.cpp's names and layouts, and the
tokenizer (byte-level BPE: tokens in GPT-2's byte-to-unicode alphabet, token types, the
merge list that encodes by Atlas's rule, the pre-tokenizer llama.cpp knows for the split
pattern, specials, chat template) with the `gguf` package, llama.cpp's own writer.
Tensor types: `f32` (everything as trained), `f16` or `q8_0` (matrices converted; norms and
biases stay f32, as llama.cpp's converter does; a matrix whose rows do not split into
q8_0's 32-number blocks is written f16).

Layouts: GGUF stores matrices [out, in] (ggml's ne = [in, out]), so Atlas's [in, out]
weights are transposed. llama.cpp's `llama` architecture rotates adjacent pairs, while
Atlas (like Hugging Face Llama) rotates halves: q and k rows are permuted for it, as
llama.cpp's converter does; qwen2 and gptneox rotate halves in llama.cpp too.
Known differences, none of them in Atlas-trained models: llama.cpp's BPE does not apply an
imported tokenizer's NFC normalizer (ids differ only on text that is not NFC already), and
its gpt2 and gptneox graphs use tanh GELU where Pythia's (and a GPT-2 with
activation_function="gelu") is exact. BOS/EOS ids are the ones `hf_export.special_ids`
gives (an imported model's own; llama.cpp would take id 11 without them).
What it does not do: other quantizations (use llama.cpp's `llama-quantize` on the f32
or f16 file), importance matrices, or tokenizers llama.cpp has no pre-tokenizer for.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from .checkpoint import Checkpoint, load_checkpoint
from .hf_arch import HFConversionError, architecture_for
from .hf_export import special_ids
from .io import as_created
from .model import ModelConfig
from .tokenizer import GPT2_SPLIT_PATTERN, GPT4_SPLIT_PATTERN, IM_END, Tokenizer
from .tokenizer.hf_format import (
    CHATML_TEMPLATE,
    DIGITS_GPT2_SPLIT_PATTERN,
    gpt2_bytes_to_unicode,
    merges_by_rank,
)

__all__ = ["GGUF_TYPES", "GGUFExportError", "export_gguf", "gguf_tensors"]

GGUF_TYPES = ("f32", "f16", "q8_0")
# Hugging Face model_type -> llama.cpp architecture name.
GGUF_ARCH = {"gpt2": "gpt2", "llama": "llama", "qwen2": "qwen2", "gpt_neox": "gptneox"}

LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Split pattern -> the llama.cpp pre-tokenizer (`tokenizer.ggml.pre`) that splits the same
# way. GPT-4's pattern (Atlas's default) and Llama 3's differ only in spelling: possessive
# quantifiers that cannot change a match here, and `\s*[\r\n]` vs `\s*[\r\n]+`, which
# match the same runs.
PRE_TOKENIZERS = {
    GPT2_SPLIT_PATTERN: "gpt-2",
    GPT4_SPLIT_PATTERN: "llama-bpe",
    LLAMA3_SPLIT_PATTERN: "llama-bpe",
    QWEN2_SPLIT_PATTERN: "qwen2",
    DIGITS_GPT2_SPLIT_PATTERN: "smollm",  # digits one by one, then GPT-2's split
}


class GGUFExportError(HFConversionError):
    """A checkpoint that cannot be written as GGUF; the message says why."""


def _permute_rotary(w: Tensor, heads: int) -> Tensor:
    """Rows of a q or k projection ([heads * D, ...]) from rotate-half order (pairs i and
    i + D/2) to adjacent-pair order (pairs 2i and 2i + 1), llama.cpp's `llama` RoPE."""
    D = w.shape[0] // heads
    return w.reshape(heads, 2, D // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# Atlas's projections whose biases llama.cpp names after the tensor (q|k|v's go apart).
BIASES = (("attn.wo", "attn_output"), ("mlp.w_in", "ffn_up"), ("mlp.w_out", "ffn_down"))


def gguf_tensors(
    state: dict[str, Tensor], config: ModelConfig, model_type: str
) -> dict[str, Tensor]:
    """Atlas's state dict under llama.cpp's tensor names and [out, in] layouts."""
    H, K, D = config.n_heads, config.kv_heads, config.head_dim
    out: dict[str, Tensor] = {"token_embd.weight": state["tok_emb.weight"]}  # [V, C]
    if config.pos_encoding == "learned":
        out["position_embd.weight"] = state["pos_emb.weight"]  # [L, C]
    for i in range(config.n_layers):
        a, g = f"blocks.{i}.", f"blk.{i}."
        for ours, theirs in (("attn_norm", "attn_norm"), ("mlp_norm", "ffn_norm")):
            for suffix in ("weight", "bias"):
                if a + f"{ours}.{suffix}" in state:
                    out[g + f"{theirs}.{suffix}"] = state[a + f"{ours}.{suffix}"]
        wqkv = state[a + "attn.wqkv.weight"]  # [C, (H + 2K) * D]
        bqkv = state.get(a + "attn.wqkv.bias")  # [(H + 2K) * D] or None
        if model_type in ("gpt2", "gpt_neox"):  # one fused q|k|v matrix
            out[g + "attn_qkv.weight"] = wqkv.t()
            if bqkv is not None:
                out[g + "attn_qkv.bias"] = bqkv
        else:
            q, k, v = wqkv.t().split([H * D, K * D, K * D], dim=0)  # [*, C] each
            biases = bqkv.split([H * D, K * D, K * D]) if bqkv is not None else (None,) * 3
            if model_type == "llama":
                q, k = _permute_rotary(q, H), _permute_rotary(k, K)
                if bqkv is not None:
                    biases = (
                        _permute_rotary(biases[0], H),
                        _permute_rotary(biases[1], K),
                        biases[2],
                    )
            for name, w, b in zip(("attn_q", "attn_k", "attn_v"), (q, k, v), biases, strict=True):
                out[g + f"{name}.weight"] = w
                if b is not None:
                    out[g + f"{name}.bias"] = b
        out[g + "attn_output.weight"] = state[a + "attn.wo.weight"].t()
        w_in, w_out = state[a + "mlp.w_in.weight"], state[a + "mlp.w_out.weight"]
        if config.mlp == "swiglu":
            gate, up = w_in.chunk(2, dim=1)  # [C, F] each
            out[g + "ffn_gate.weight"], out[g + "ffn_up.weight"] = gate.t(), up.t()
        else:
            out[g + "ffn_up.weight"] = w_in.t()  # [F, C]
        out[g + "ffn_down.weight"] = w_out.t()  # [C, F]
        for ours, theirs in BIASES:
            if a + f"{ours}.bias" in state:
                out[g + f"{theirs}.bias"] = state[a + f"{ours}.bias"]
    out["output_norm.weight"] = state["final_norm.weight"]
    if "final_norm.bias" in state:
        out["output_norm.bias"] = state["final_norm.bias"]
    if not config.tie_embeddings:
        out["output.weight"] = state["lm_head.weight"].t()  # [V, C]
    elif model_type == "gpt_neox":  # llama.cpp's gptneox has no tied head: write a copy
        out["output.weight"] = state["tok_emb.weight"]
    return {k: v.detach().float().contiguous() for k, v in out.items()}


def _tokenizer_fields(tokenizer: Tokenizer, n_vocab: int) -> dict[str, Any]:
    """Tokens (dense ids 0..n_vocab-1), their types, merges and the pre-tokenizer."""
    import gguf

    pre = PRE_TOKENIZERS.get(tokenizer.pattern)
    if pre is None:
        raise GGUFExportError(
            f"llama.cpp has no pre-tokenizer for this tokenizer's split pattern "
            f"{tokenizer.pattern!r}; known: GPT-2's, GPT-4's (Atlas's default), Llama 3's, Qwen2's, "
            "SmolLM's"
        )
    to_char = gpt2_bytes_to_unicode()
    tokens, types = [], []
    for i in range(n_vocab):
        if i in tokenizer.id_to_bytes:
            tokens.append("".join(to_char[b] for b in tokenizer.id_to_bytes[i]))
            types.append(gguf.TokenType.NORMAL)
        elif i in tokenizer.id_to_special:
            tokens.append(tokenizer.id_to_special[i])
            types.append(gguf.TokenType.CONTROL)
        elif i in tokenizer.id_to_added:  # matched in any text, as llama.cpp does these
            tokens.append(tokenizer.id_to_added[i])
            types.append(gguf.TokenType.USER_DEFINED)
        else:  # embedding rows past the tokenizer (padding to a round size)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    as_text = {i: tokens[i] for i in tokenizer.id_to_bytes}
    merges = [f"{left} {right}" for left, right in merges_by_rank(tokenizer, as_text)]
    if not merges:  # GGUF has no empty arrays, and llama.cpp's BPE insists on the key
        raise GGUFExportError(
            "this tokenizer has no merges (single bytes only); llama.cpp's BPE needs at least one"
        )
    return {
        "pre": pre,
        "tokens": tokens,
        "types": types,
        "merges": merges,
    }


def _quantize(data: np.ndarray, kind: str) -> tuple[np.ndarray, Any]:
    """(data, GGML type) for one tensor: matrices converted, vectors kept f32."""
    import gguf

    if kind == "f32" or data.ndim < 2:
        return data.astype(np.float32), gguf.GGMLQuantizationType.F32
    if kind == "q8_0" and data.shape[-1] % 32 == 0:
        q = gguf.GGMLQuantizationType.Q8_0
        return gguf.quants.quantize(data.astype(np.float32), q), q
    return data.astype(np.float16), gguf.GGMLQuantizationType.F16


def export_gguf(
    checkpoint: str | os.PathLike | Checkpoint,
    out: str | os.PathLike,
    kind: str = "f32",
    progress: bool = False,
) -> Path:
    """Write CHECKPOINT as the GGUF file OUT (atomically: a temp file renamed into place)."""
    try:
        import gguf
    except ImportError:
        raise GGUFExportError(
            "GGUF export needs the gguf package: pip install 'atlas-llm[gguf]'"
        ) from None
    if kind not in GGUF_TYPES:
        raise GGUFExportError(f"unknown tensor type {kind!r}; choose one of {list(GGUF_TYPES)}")
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
    config, tokenizer = ckpt.config, ckpt.tokenizer
    model_type = architecture_for(config, ckpt.provenance.get("imported_from")).model_type
    arch = GGUF_ARCH[model_type]
    tok = _tokenizer_fields(tokenizer, config.vocab_size)
    ids = special_ids(tokenizer, ckpt.provenance)
    if ids.before not in ([], [ids.bos]) or ids.after not in ([], [ids.first_eos]):
        raise GGUFExportError(
            f"the tokenizer adds {ids.before} before and {ids.after} after each text; "
            "GGUF can only say 'add BOS' and 'add EOS'"
        )
    state = {k: v.detach().cpu() for k, v in ckpt.model.state_dict().items()}
    tensors = gguf_tensors(state, config, model_type)

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    as_created(tmp_name)  # 0644 under the usual umask, not mkstemp's 0600
    tmp = Path(tmp_name)
    try:
        w = gguf.GGUFWriter(str(tmp), arch)
        w.add_name(ckpt.path.name)
        w.add_file_type(
            {
                "f32": gguf.LlamaFileType.ALL_F32,
                "f16": gguf.LlamaFileType.MOSTLY_F16,
                "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
            }[kind]
        )
        if kind == "q8_0":
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_context_length(config.max_seq_len)
        w.add_embedding_length(config.d_model)
        w.add_block_count(config.n_layers)
        w.add_feed_forward_length(config.ff_dim)
        w.add_head_count(config.n_heads)
        w.add_head_count_kv(config.kv_heads)
        w.add_vocab_size(config.vocab_size)
        if config.norm == "rmsnorm":
            w.add_layer_norm_rms_eps(config.norm_eps)
        else:
            w.add_layer_norm_eps(config.norm_eps)
        if config.pos_encoding == "rope":
            w.add_rope_freq_base(config.rope_theta)
            w.add_rope_dimension_count(config.rope_dims)
        if model_type == "gpt_neox":
            w.add_parallel_residual(config.parallel_residual)

        w.add_tokenizer_model("gpt2")  # byte-level BPE
        w.add_tokenizer_pre(tok["pre"])
        w.add_token_list(tok["tokens"])
        w.add_token_types(tok["types"])
        w.add_token_merges(tok["merges"])
        specials = tokenizer.special_tokens
        # Without these keys llama.cpp takes id 11 for both, an ordinary byte here.
        if ids.bos is not None:
            w.add_bos_token_id(ids.bos)
        if ids.first_eos is not None:
            w.add_eos_token_id(ids.first_eos)
        if IM_END in specials:
            w.add_eot_token_id(specials[IM_END])
        # Atlas adds nothing when encoding; an imported Llama 3 tokenizer added its BOS.
        w.add_add_bos_token(bool(ids.before))
        w.add_add_eos_token(bool(ids.after))
        template = ckpt.chat_template
        if template is None and IM_END in specials:
            template = CHATML_TEMPLATE
        if template is not None:
            w.add_chat_template(template)

        for name, tensor in tensors.items():
            data, qtype = _quantize(tensor.numpy(), kind)
            w.add_tensor(name, data, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file(progress=progress)
        w.close()
        os.replace(tmp, out)
        return out
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
