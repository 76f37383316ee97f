"""Convert a local Hugging Face GPT-2 or Llama checkpoint into an atlas checkpoint.

What it does: reads `config.json` and the safetensors weights (single file or sharded with
`model.safetensors.index.json`) directly — no `transformers` import — maps every tensor
to Atlas's names and `[in, out]` layout, checks the architecture options Atlas supports,
converts the byte-level BPE `tokenizer.json` when present, and writes an atlas checkpoint.

Mapping: GPT-2's Conv1D weights are already `[in, out]` and `c_attn` is already the fused
q|k|v projection. Llama's projections are `[out, in]` and are transposed; q, k, v are
fused into `wqkv` and gate, up into `w_in` (gate first, as `FeedForward` splits them).
Both use the "rotate half" RoPE convention, so no permutation of q/k is needed.
What it does not do: pickled `.bin` weights (never unpickled: convert them to safetensors
first), rope scaling, attention/MLP biases for Llama, or SentencePiece tokenizers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .checkpoint import CheckpointError, save_checkpoint
from .model import ModelConfig, Transformer
from .tokenizer import Tokenizer, TokenizerError
from .tokenizer.hf_format import tokenizer_from_hf_json

__all__ = [
    "HFImportError",
    "hf_to_atlas_model",
    "import_hf",
    "load_hf_weights",
    "model_config_from_hf",
    "model_from_hf_tensors",
]


class HFImportError(CheckpointError):
    """A Hugging Face checkpoint Atlas cannot convert; the message says what to change."""


def _read_config(src: Path) -> dict[str, Any]:
    path = src / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise HFImportError(f"{path} is missing; SRC must be a Hugging Face model folder") from None
    except json.JSONDecodeError as e:
        raise HFImportError(f"{path} is not valid JSON: {e}") from None


def load_hf_weights(src: Path) -> dict[str, torch.Tensor]:
    """All tensors of model.safetensors or its shards (never a pickle)."""
    index = src / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (src / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        pickled = [p.name for p in src.glob("*.bin")]
        hint = (
            f" (found {pickled}: pickled weights are never loaded; re-save with safetensors)"
            if pickled
            else ""
        )
        raise HFImportError(f"no model.safetensors in {src}{hint}")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        try:
            with safe_open(str(src / name), framework="pt", device="cpu") as f:
                for key in f.keys():
                    tensors[key] = f.get_tensor(key).float()
        except Exception as e:  # a missing shard or a corrupt header: name the file
            raise HFImportError(f"{src / name} is not a readable safetensors file: {e}") from None
    return tensors


def model_config_from_hf(cfg: dict[str, Any]) -> ModelConfig:
    kind = cfg.get("model_type")
    if kind == "gpt2":
        act = cfg.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise HFImportError(f"GPT-2 activation {act!r} is not supported (Atlas uses tanh GELU)")
        return ModelConfig(
            vocab_size=cfg["vocab_size"],
            n_layers=cfg["n_layer"],
            d_model=cfg["n_embd"],
            n_heads=cfg["n_head"],
            d_ff=cfg.get("n_inner") or 4 * cfg["n_embd"],
            max_seq_len=cfg["n_positions"],
            pos_encoding="learned",
            norm="layernorm",
            norm_eps=cfg.get("layer_norm_epsilon", 1e-5),
            mlp="gelu",
            bias=True,
            tie_embeddings=cfg.get("tie_word_embeddings", True),
        )
    if kind == "llama":
        rope = cfg.get("rope_parameters") or {}
        scaling = cfg.get("rope_scaling") or (
            {} if rope.get("rope_type", "default") == "default" else rope
        )
        if scaling:
            raise HFImportError(f"rope scaling {scaling} is not supported")
        if cfg.get("attention_bias") or cfg.get("mlp_bias"):
            raise HFImportError("Llama attention_bias / mlp_bias are not supported")
        if cfg.get("hidden_act", "silu") != "silu":
            raise HFImportError(f"Llama hidden_act {cfg.get('hidden_act')!r} is not supported")
        heads = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
        if head_dim * heads != cfg["hidden_size"]:
            raise HFImportError("Llama head_dim * num_attention_heads must equal hidden_size")
        return ModelConfig(
            vocab_size=cfg["vocab_size"],
            n_layers=cfg["num_hidden_layers"],
            d_model=cfg["hidden_size"],
            n_heads=heads,
            n_kv_heads=cfg.get("num_key_value_heads") or heads,
            d_ff=cfg["intermediate_size"],
            max_seq_len=cfg.get("max_position_embeddings", 2048),
            pos_encoding="rope",
            rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
            norm="rmsnorm",
            norm_eps=cfg.get("rms_norm_eps", 1e-6),
            mlp="swiglu",
            bias=False,
            tie_embeddings=cfg.get("tie_word_embeddings", False),
        )
    raise HFImportError(f"model_type {kind!r} is not supported; Atlas imports gpt2 and llama")


def _take(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    try:
        return tensors[name]
    except KeyError:
        raise HFImportError(f"tensor {name} is missing from the checkpoint") from None


# Atlas block parameter names -> GPT-2's (transformers and the original checkpoints).
GPT2_BLOCK_NAMES = {
    "attn_norm": "ln_1",
    "attn.wqkv": "attn.c_attn",
    "attn.wo": "attn.c_proj",
    "mlp_norm": "ln_2",
    "mlp.w_in": "mlp.c_fc",
    "mlp.w_out": "mlp.c_proj",
}


def _gpt2_state(t: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    p = "transformer." if "transformer.wte.weight" in t else ""
    state = {
        "tok_emb.weight": _take(t, f"{p}wte.weight"),
        "pos_emb.weight": _take(t, f"{p}wpe.weight"),
        "final_norm.weight": _take(t, f"{p}ln_f.weight"),
        "final_norm.bias": _take(t, f"{p}ln_f.bias"),
    }
    for i in range(config.n_layers):
        for ours, theirs in GPT2_BLOCK_NAMES.items():
            for suffix in ("weight", "bias"):
                state[f"blocks.{i}.{ours}.{suffix}"] = _take(t, f"{p}h.{i}.{theirs}.{suffix}")
    if not config.tie_embeddings:
        state["lm_head.weight"] = _take(t, "lm_head.weight").t()
    return state


def _llama_state(t: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    state = {
        "tok_emb.weight": _take(t, "model.embed_tokens.weight"),
        "final_norm.weight": _take(t, "model.norm.weight"),
    }
    for i in range(config.n_layers):
        p = f"model.layers.{i}."
        q, k, v = (_take(t, f"{p}self_attn.{n}_proj.weight") for n in "qkv")
        state[f"blocks.{i}.attn.wqkv.weight"] = torch.cat([q.t(), k.t(), v.t()], dim=1)
        state[f"blocks.{i}.attn.wo.weight"] = _take(t, f"{p}self_attn.o_proj.weight").t()
        gate, up = _take(t, f"{p}mlp.gate_proj.weight"), _take(t, f"{p}mlp.up_proj.weight")
        state[f"blocks.{i}.mlp.w_in.weight"] = torch.cat([gate.t(), up.t()], dim=1)
        state[f"blocks.{i}.mlp.w_out.weight"] = _take(t, f"{p}mlp.down_proj.weight").t()
        state[f"blocks.{i}.attn_norm.weight"] = _take(t, f"{p}input_layernorm.weight")
        state[f"blocks.{i}.mlp_norm.weight"] = _take(t, f"{p}post_attention_layernorm.weight")
    if not config.tie_embeddings:
        state["lm_head.weight"] = _take(t, "lm_head.weight").t()
    return state


def hf_to_atlas_model(src: str | os.PathLike) -> Transformer:
    """Build an Atlas Transformer holding the weights of a local HF GPT-2 / Llama folder."""
    src = Path(src)
    hf_config = _read_config(src)
    model_config_from_hf(hf_config)  # refuse an unsupported model before reading its weights
    return model_from_hf_tensors(hf_config, load_hf_weights(src))


def model_from_hf_tensors(
    hf_config: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> Transformer:
    """An Atlas Transformer from an HF config.json dict and its state dict (HF names)."""
    config = model_config_from_hf(hf_config)
    tensors = {k: v.float() for k, v in tensors.items()}
    convert = _gpt2_state if hf_config["model_type"] == "gpt2" else _llama_state
    state = {k: v.contiguous() for k, v in convert(tensors, config).items()}
    model = Transformer(config)
    expected = model.state_dict()
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise HFImportError(
                f"{name}: shape {list(tensor.shape)} does not match the config "
                f"({list(expected[name].shape)})"
            )
    model.load_state_dict(state, strict=True)
    return model.eval()


def import_hf(
    src: str | os.PathLike, dst: str | os.PathLike, tokenizer_file: str | None = None
) -> Path:
    """Convert SRC (a local HF folder) into an atlas checkpoint at DST."""
    src = Path(src)
    if not src.is_dir():
        raise HFImportError(f"{src} is not a directory")
    model = hf_to_atlas_model(src)
    tokenizer = _tokenizer_for(src, tokenizer_file)
    provenance = {
        "source": f"huggingface:{src.resolve()}",
        "imported_from": _read_config(src).get("model_type"),
    }
    return save_checkpoint(dst, model, tokenizer, provenance)


def _tokenizer_for(src: Path, tokenizer_file: str | None) -> Tokenizer:
    if tokenizer_file is not None:
        path = Path(tokenizer_file)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise HFImportError(f"cannot read --tokenizer {path}: {e}") from None
        if data.get("format") == "atlas-bpe":
            return Tokenizer.from_dict(data)
        return tokenizer_from_hf_json(data, name=src.name)
    hf_json = src / "tokenizer.json"
    if not hf_json.is_file():
        raise HFImportError(
            f"{src} has no tokenizer.json; pass --tokenizer FILE (an Atlas or "
            "Hugging Face byte-level BPE tokenizer.json)"
        )
    try:
        return tokenizer_from_hf_json(hf_json, name=src.name)
    except TokenizerError as e:
        raise HFImportError(
            f"{hf_json}: {e}; pass --tokenizer FILE (an Atlas or Hugging Face byte-level BPE "
            "tokenizer.json) to import the weights with another tokenizer"
        ) from None
