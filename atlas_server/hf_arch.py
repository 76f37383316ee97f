"""The Hugging Face architectures Atlas converts, both ways: config keys and weight names.

What it does: for each supported `model_type` (GPT-2, Llama), maps an HF `config.json`
dict to a `ModelConfig` and back, and an HF state dict (HF names, HF layouts) to Atlas's
`Transformer.state_dict()` and back. This is the one place the weight-name maps live:
`hf_import.py`, `hf_export.py`, `gguf_export.py` and the benchmarks' `transformers` twins
use it. `architecture_for(config)` says which HF architecture an Atlas config is.

Layouts: Atlas's `Linear` stores [in, out]. GPT-2's Conv1D is [in, out] too and `c_attn`
is already the fused q|k|v, so its tensors copy unchanged. Llama's projections are
[out, in] (`nn.Linear`): transposed, q/k/v fused into `wqkv`, gate/up into `w_in`
(gate first, as `FeedForward` splits them). Both use the "rotate half" RoPE convention,
so q/k need no permutation.
What it does not do: read or write files (hf_import.py, hf_export.py), tokenizers
(tokenizer/hf_format.py), or import `transformers`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .checkpoint import CheckpointError
from .model import ModelConfig

__all__ = [
    "ARCHITECTURES",
    "GPT2_BLOCK_NAMES",
    "Architecture",
    "HFConversionError",
    "architecture_for",
    "atlas_state_from_hf",
    "hf_config_from_atlas",
    "hf_state_from_atlas",
    "model_config_from_hf",
]

State = dict[str, Tensor]


class HFConversionError(CheckpointError):
    """A model Atlas cannot convert to or from Hugging Face; the message says what to change."""


def _take(tensors: State, name: str) -> Tensor:
    try:
        return tensors[name]
    except KeyError:
        raise HFConversionError(f"tensor {name} is missing from the checkpoint") from None


def _rope_theta(cfg: dict[str, Any], default: float = 10000.0) -> float:
    """rope_theta from transformers 4 (top level) or 5 (`rope_parameters`) configs."""
    rope = cfg.get("rope_parameters") or {}
    return float(rope.get("rope_theta", cfg.get("rope_theta", default)))


def _refuse_rope_scaling(cfg: dict[str, Any]) -> None:
    rope = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or (
        {} if rope.get("rope_type", "default") == "default" else rope
    )
    if scaling:
        raise HFConversionError(f"rope scaling {scaling} is not supported")


def _rope_keys(theta: float) -> dict[str, Any]:
    # Both spellings: transformers 4 reads the top-level key, 5 reads rope_parameters.
    return {
        "rope_theta": theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        "rope_scaling": None,
    }


# --- GPT-2 ---------------------------------------------------------------------------------
# Atlas block parameter names -> GPT-2's (transformers and the original checkpoints).
GPT2_BLOCK_NAMES = {
    "attn_norm": "ln_1",
    "attn.wqkv": "attn.c_attn",
    "attn.wo": "attn.c_proj",
    "mlp_norm": "ln_2",
    "mlp.w_in": "mlp.c_fc",
    "mlp.w_out": "mlp.c_proj",
}


def _gpt2_config(cfg: dict[str, Any]) -> ModelConfig:
    act = cfg.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise HFConversionError(f"GPT-2 activation {act!r} is not supported (Atlas uses tanh GELU)")
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


def _gpt2_hf_config(c: ModelConfig) -> dict[str, Any]:
    return {
        "n_positions": c.max_seq_len,
        "n_ctx": c.max_seq_len,
        "n_embd": c.d_model,
        "n_layer": c.n_layers,
        "n_head": c.n_heads,
        "n_inner": c.ff_dim,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": c.norm_eps,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "scale_attn_weights": True,
    }


def _gpt2_matches(c: ModelConfig) -> bool:
    return (
        c.pos_encoding == "learned"
        and c.norm == "layernorm"
        and c.mlp == "gelu"
        and c.bias
        and c.kv_heads == c.n_heads
    )


def _gpt2_from_hf(t: State, c: ModelConfig) -> State:
    p = "transformer." if "transformer.wte.weight" in t else ""
    state = {
        "tok_emb.weight": _take(t, f"{p}wte.weight"),
        "pos_emb.weight": _take(t, f"{p}wpe.weight"),
        "final_norm.weight": _take(t, f"{p}ln_f.weight"),
        "final_norm.bias": _take(t, f"{p}ln_f.bias"),
    }
    for i in range(c.n_layers):
        for ours, theirs in GPT2_BLOCK_NAMES.items():
            for suffix in ("weight", "bias"):
                state[f"blocks.{i}.{ours}.{suffix}"] = _take(t, f"{p}h.{i}.{theirs}.{suffix}")
    if not c.tie_embeddings:
        state["lm_head.weight"] = _take(t, "lm_head.weight").t()
    return state


def _gpt2_to_hf(s: State, c: ModelConfig) -> State:
    out = {
        "transformer.wte.weight": s["tok_emb.weight"],
        "transformer.wpe.weight": s["pos_emb.weight"],
        "transformer.ln_f.weight": s["final_norm.weight"],
        "transformer.ln_f.bias": s["final_norm.bias"],
    }
    for i in range(c.n_layers):
        for ours, theirs in GPT2_BLOCK_NAMES.items():
            for suffix in ("weight", "bias"):
                out[f"transformer.h.{i}.{theirs}.{suffix}"] = s[f"blocks.{i}.{ours}.{suffix}"]
    if not c.tie_embeddings:
        out["lm_head.weight"] = s["lm_head.weight"].t()
    return out


# --- Llama ---------------------------------------------------------------------------------
def _llama_config(cfg: dict[str, Any]) -> ModelConfig:
    _refuse_rope_scaling(cfg)
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise HFConversionError("Llama attention_bias / mlp_bias are not supported")
    if cfg.get("hidden_act", "silu") != "silu":
        raise HFConversionError(f"Llama hidden_act {cfg.get('hidden_act')!r} is not supported")
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    if head_dim * heads != cfg["hidden_size"]:
        raise HFConversionError("Llama head_dim * num_attention_heads must equal hidden_size")
    return ModelConfig(
        vocab_size=cfg["vocab_size"],
        n_layers=cfg["num_hidden_layers"],
        d_model=cfg["hidden_size"],
        n_heads=heads,
        n_kv_heads=cfg.get("num_key_value_heads") or heads,
        d_ff=cfg["intermediate_size"],
        max_seq_len=cfg.get("max_position_embeddings", 2048),
        pos_encoding="rope",
        rope_theta=_rope_theta(cfg),
        norm="rmsnorm",
        norm_eps=cfg.get("rms_norm_eps", 1e-6),
        mlp="swiglu",
        bias=False,
        tie_embeddings=cfg.get("tie_word_embeddings", False),
    )


def _llama_hf_config(c: ModelConfig) -> dict[str, Any]:
    return {
        "hidden_size": c.d_model,
        "intermediate_size": c.ff_dim,
        "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.kv_heads,
        "head_dim": c.head_dim,
        "max_position_embeddings": c.max_seq_len,
        "rms_norm_eps": c.norm_eps,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        **_rope_keys(c.rope_theta),
    }


def _llama_matches(c: ModelConfig) -> bool:
    return c.pos_encoding == "rope" and c.norm == "rmsnorm" and c.mlp == "swiglu" and not c.bias


def _llama_from_hf(t: State, c: ModelConfig) -> State:
    state = {
        "tok_emb.weight": _take(t, "model.embed_tokens.weight"),
        "final_norm.weight": _take(t, "model.norm.weight"),
    }
    for i in range(c.n_layers):
        p, a = f"model.layers.{i}.", f"blocks.{i}."
        q, k, v = (_take(t, f"{p}self_attn.{n}_proj.weight") for n in "qkv")
        state[a + "attn.wqkv.weight"] = torch.cat([q.t(), k.t(), v.t()], dim=1)
        state[a + "attn.wo.weight"] = _take(t, f"{p}self_attn.o_proj.weight").t()
        gate, up = _take(t, f"{p}mlp.gate_proj.weight"), _take(t, f"{p}mlp.up_proj.weight")
        state[a + "mlp.w_in.weight"] = torch.cat([gate.t(), up.t()], dim=1)
        state[a + "mlp.w_out.weight"] = _take(t, f"{p}mlp.down_proj.weight").t()
        state[a + "attn_norm.weight"] = _take(t, f"{p}input_layernorm.weight")
        state[a + "mlp_norm.weight"] = _take(t, f"{p}post_attention_layernorm.weight")
    if not c.tie_embeddings:
        state["lm_head.weight"] = _take(t, "lm_head.weight").t()
    return state


def _llama_to_hf(s: State, c: ModelConfig) -> State:
    H, K, D = c.n_heads, c.kv_heads, c.head_dim
    out = {
        "model.embed_tokens.weight": s["tok_emb.weight"],
        "model.norm.weight": s["final_norm.weight"],
    }
    for i in range(c.n_layers):
        a, p = f"blocks.{i}.", f"model.layers.{i}."
        q, k, v = s[a + "attn.wqkv.weight"].split([H * D, K * D, K * D], dim=1)  # [C, *] each
        gate, up = s[a + "mlp.w_in.weight"].chunk(2, dim=1)  # [C, F] each
        out[p + "self_attn.q_proj.weight"] = q.t()
        out[p + "self_attn.k_proj.weight"] = k.t()
        out[p + "self_attn.v_proj.weight"] = v.t()
        out[p + "self_attn.o_proj.weight"] = s[a + "attn.wo.weight"].t()
        out[p + "mlp.gate_proj.weight"] = gate.t()
        out[p + "mlp.up_proj.weight"] = up.t()
        out[p + "mlp.down_proj.weight"] = s[a + "mlp.w_out.weight"].t()
        out[p + "input_layernorm.weight"] = s[a + "attn_norm.weight"]
        out[p + "post_attention_layernorm.weight"] = s[a + "mlp_norm.weight"]
    if not c.tie_embeddings:
        out["lm_head.weight"] = s["lm_head.weight"].t()
    return out


# --- the table -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Architecture:
    model_type: str  # config.json "model_type"
    hf_class: str  # config.json "architectures"[0]: the transformers class that loads it
    config_from_hf: Callable[[dict[str, Any]], ModelConfig]
    hf_config: Callable[[ModelConfig], dict[str, Any]]  # the architecture's own keys
    matches: Callable[[ModelConfig], bool]
    state_from_hf: Callable[[State, ModelConfig], State]
    state_to_hf: Callable[[State, ModelConfig], State]


ARCHITECTURES: dict[str, Architecture] = {
    a.model_type: a
    for a in (
        Architecture(
            "gpt2",
            "GPT2LMHeadModel",
            _gpt2_config,
            _gpt2_hf_config,
            _gpt2_matches,
            _gpt2_from_hf,
            _gpt2_to_hf,
        ),
        Architecture(
            "llama",
            "LlamaForCausalLM",
            _llama_config,
            _llama_hf_config,
            _llama_matches,
            _llama_from_hf,
            _llama_to_hf,
        ),
    )
}


def _architecture(model_type: Any) -> Architecture:
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise HFConversionError(
            f"model_type {model_type!r} is not supported; Atlas converts {', '.join(ARCHITECTURES)}"
        ) from None


def model_config_from_hf(cfg: dict[str, Any]) -> ModelConfig:
    """The ModelConfig of an HF config.json dict; unsupported options are refused."""
    return _architecture(cfg.get("model_type")).config_from_hf(cfg)


def atlas_state_from_hf(cfg: dict[str, Any], tensors: State) -> State:
    """Atlas's state dict from an HF one (HF names and layouts), fp32, contiguous."""
    arch = _architecture(cfg.get("model_type"))
    config = arch.config_from_hf(cfg)
    tensors = {k: v.float() for k, v in tensors.items()}
    return {k: v.contiguous() for k, v in arch.state_from_hf(tensors, config).items()}


def architecture_for(config: ModelConfig, preferred: str | None = None) -> Architecture:
    """The HF architecture that computes exactly what this Atlas config does.

    `preferred` (the model_type an imported checkpoint came from) wins when it fits.
    """
    candidates = [ARCHITECTURES[preferred]] if preferred in ARCHITECTURES else []
    candidates += list(ARCHITECTURES.values())
    for arch in candidates:
        if arch.matches(config):
            return arch
    raise HFConversionError(
        f"no Hugging Face architecture computes this model (pos_encoding={config.pos_encoding}, "
        f"norm={config.norm}, mlp={config.mlp}, bias={config.bias}); exportable shapes: "
        "GPT-2 (learned positions, LayerNorm, GELU, biases) and Llama (RoPE, RMSNorm, SwiGLU, "
        "no biases)"
    )


def hf_config_from_atlas(
    config: ModelConfig,
    arch: Architecture,
    bos_token_id: int | None,
    eos_token_id: int | list[int] | None,
) -> dict[str, Any]:
    """The HF config.json dict of an Atlas config under `arch` (no transformers import)."""
    return {
        "architectures": [arch.hf_class],
        "model_type": arch.model_type,
        "vocab_size": config.vocab_size,
        **arch.hf_config(config),
        "tie_word_embeddings": config.tie_embeddings,
        "initializer_range": config.init_std,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "use_cache": True,
        "torch_dtype": "float32",  # transformers 4's key; 5 reads "dtype"
        "dtype": "float32",
    }


def hf_state_from_atlas(state: State, config: ModelConfig, arch: Architecture) -> State:
    """HF names and layouts for an Atlas state dict; contiguous, so safetensors can save it."""
    return {k: v.detach().contiguous() for k, v in arch.state_to_hf(state, config).items()}
