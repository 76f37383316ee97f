"""The Hugging Face architectures Atlas converts, both ways: config keys and weight names.

What it does: for each supported `model_type` (GPT-2, Llama, Qwen2, GPT-NeoX), maps an HF `config.json`
dict to a `ModelConfig` and back, and an HF state dict (HF names, HF layouts) to Atlas's
`Transformer.state_dict()` and back. This is the one place the weight-name maps live:
`hf_import.py`, `hf_export.py`, `gguf_export.py` and the benchmarks' `transformers` twins
use it. `architecture_for(config)` says which HF architecture an Atlas config is.

Layouts: Atlas's `Linear` stores [in, out]. GPT-2's Conv1D is [in, out] too and `c_attn`
is already the fused q|k|v, so its tensors copy unchanged. Llama's projections are
[out, in] (`nn.Linear`): transposed, q/k/v fused into `wqkv`, gate/up into `w_in`
(gate first, as `FeedForward` splits them); Qwen2 is Llama plus q/k/v biases. GPT-NeoX
fuses q/k/v per head ([head][q, k, v][D] rows), which is regrouped into q|k|v, and rotates
only the first `rotary_pct` of each head. All use the "rotate half" RoPE convention, so
q/k need no permutation.
Importing refuses tensors the config leaves unused and unties a tied config whose file holds
a different head, as transformers does.
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


# HF activation names -> Atlas's non-gated MLP kinds.
GELU_KINDS = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "gelu": "gelu_exact"}


def _gelu_kind(act: str, model: str) -> str:
    if act not in GELU_KINDS:
        raise HFConversionError(
            f"{model} activation {act!r} is not supported (Atlas has GELU, tanh or exact)"
        )
    return GELU_KINDS[act]


def _gpt2_config(cfg: dict[str, Any]) -> ModelConfig:
    mlp = _gelu_kind(cfg.get("activation_function", "gelu_new"), "GPT-2")
    # Both change the attention scores; Atlas always divides by sqrt(head_dim) only.
    if not cfg.get("scale_attn_weights", True):
        raise HFConversionError("GPT-2 scale_attn_weights=false is not supported")
    if cfg.get("scale_attn_by_inverse_layer_idx"):
        raise HFConversionError("GPT-2 scale_attn_by_inverse_layer_idx=true is not supported")
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
        mlp=mlp,
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
        "activation_function": "gelu" if c.mlp == "gelu_exact" else "gelu_new",
        "layer_norm_epsilon": c.norm_eps,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "scale_attn_weights": True,
    }


def _sequential(c: ModelConfig) -> bool:
    return not c.parallel_residual and c.rope_dims == c.head_dim


def _gpt2_matches(c: ModelConfig) -> bool:
    return (
        c.pos_encoding == "learned"
        and c.norm == "layernorm"
        and c.mlp in ("gelu", "gelu_exact")
        and c.bias
        and c.has_qkv_bias
        and c.kv_heads == c.n_heads
        and _sequential(c)
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
def _llama_config(cfg: dict[str, Any], model: str = "Llama", qkv_bias: bool = False) -> ModelConfig:
    _refuse_rope_scaling(cfg)
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise HFConversionError(f"{model} attention_bias / mlp_bias are not supported")
    if cfg.get("hidden_act", "silu") != "silu":
        raise HFConversionError(f"{model} hidden_act {cfg.get('hidden_act')!r} is not supported")
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    if head_dim * heads != cfg["hidden_size"]:
        raise HFConversionError(f"{model} head_dim * num_attention_heads must equal hidden_size")
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
        qkv_bias=True if qkv_bias else None,
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
    return (
        c.pos_encoding == "rope"
        and c.norm == "rmsnorm"
        and c.mlp == "swiglu"
        and not c.bias
        and not c.has_qkv_bias
        and _sequential(c)
    )


def _llama_from_hf(t: State, c: ModelConfig) -> State:
    state = {
        "tok_emb.weight": _take(t, "model.embed_tokens.weight"),
        "final_norm.weight": _take(t, "model.norm.weight"),
    }
    for i in range(c.n_layers):
        p, a = f"model.layers.{i}.", f"blocks.{i}."
        q, k, v = (_take(t, f"{p}self_attn.{n}_proj.weight") for n in "qkv")
        state[a + "attn.wqkv.weight"] = torch.cat([q.t(), k.t(), v.t()], dim=1)
        if c.has_qkv_bias:  # Qwen2
            biases = (_take(t, f"{p}self_attn.{n}_proj.bias") for n in "qkv")
            state[a + "attn.wqkv.bias"] = torch.cat(list(biases))
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
        if c.has_qkv_bias:  # Qwen2
            qb, kb, vb = s[a + "attn.wqkv.bias"].split([H * D, K * D, K * D])
            out[p + "self_attn.q_proj.bias"] = qb
            out[p + "self_attn.k_proj.bias"] = kb
            out[p + "self_attn.v_proj.bias"] = vb
        out[p + "self_attn.o_proj.weight"] = s[a + "attn.wo.weight"].t()
        out[p + "mlp.gate_proj.weight"] = gate.t()
        out[p + "mlp.up_proj.weight"] = up.t()
        out[p + "mlp.down_proj.weight"] = s[a + "mlp.w_out.weight"].t()
        out[p + "input_layernorm.weight"] = s[a + "attn_norm.weight"]
        out[p + "post_attention_layernorm.weight"] = s[a + "mlp_norm.weight"]
    if not c.tie_embeddings:
        out["lm_head.weight"] = s["lm_head.weight"].t()
    return out


# --- Qwen2 (Llama with q/k/v biases) ---------------------------------------------------------
def _qwen2_config(cfg: dict[str, Any]) -> ModelConfig:
    if cfg.get("use_sliding_window"):
        raise HFConversionError("Qwen2 sliding-window attention is not supported")
    return _llama_config(cfg, "Qwen2", qkv_bias=True)


def _qwen2_hf_config(c: ModelConfig) -> dict[str, Any]:
    config = _llama_hf_config(c)
    for key in ("head_dim", "attention_bias", "mlp_bias"):  # not Qwen2Config keys
        config.pop(key)
    return {
        **config,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": c.n_layers,
    }


def _qwen2_matches(c: ModelConfig) -> bool:
    return (
        c.pos_encoding == "rope"
        and c.norm == "rmsnorm"
        and c.mlp == "swiglu"
        and not c.bias
        and c.has_qkv_bias
        and _sequential(c)
    )


# --- GPT-NeoX (Pythia) ---------------------------------------------------------------------
def _neox_config(cfg: dict[str, Any]) -> ModelConfig:
    _refuse_rope_scaling(cfg)
    if not cfg.get("attention_bias", True):
        raise HFConversionError("GPT-NeoX without attention biases is not supported")
    heads, width = cfg["num_attention_heads"], cfg["hidden_size"]
    rope = cfg.get("rope_parameters") or {}
    pct = rope.get("partial_rotary_factor", cfg.get("rotary_pct", 0.25))
    theta = rope.get("rope_theta", cfg.get("rotary_emb_base", cfg.get("rope_theta", 10000.0)))
    rotary = int(width // heads * pct)
    return ModelConfig(
        vocab_size=cfg["vocab_size"],
        n_layers=cfg["num_hidden_layers"],
        d_model=width,
        n_heads=heads,
        d_ff=cfg["intermediate_size"],
        max_seq_len=cfg.get("max_position_embeddings", 2048),
        pos_encoding="rope",
        rope_theta=float(theta),
        rotary_dim=None if rotary == width // heads else rotary,
        norm="layernorm",
        norm_eps=cfg.get("layer_norm_eps", 1e-5),
        mlp=_gelu_kind(cfg.get("hidden_act", "gelu"), "GPT-NeoX"),
        bias=True,
        parallel_residual=cfg.get("use_parallel_residual", True),
        tie_embeddings=cfg.get("tie_word_embeddings", False),
    )


def _neox_hf_config(c: ModelConfig) -> dict[str, Any]:
    pct = c.rope_dims / c.head_dim
    if int(c.head_dim * pct) != c.rope_dims:  # transformers computes int(head_dim * pct)
        raise HFConversionError(f"rotary_dim {c.rope_dims} is not expressible as rotary_pct")
    return {
        "hidden_size": c.d_model,
        "num_attention_heads": c.n_heads,
        "num_hidden_layers": c.n_layers,
        "intermediate_size": c.ff_dim,
        "max_position_embeddings": c.max_seq_len,
        "layer_norm_eps": c.norm_eps,
        "hidden_act": "gelu" if c.mlp == "gelu_exact" else "gelu_new",
        "use_parallel_residual": c.parallel_residual,
        "attention_bias": True,
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
        # transformers 4 reads rotary_pct / rotary_emb_base, 5 reads rope_parameters
        "rotary_pct": pct,
        "rotary_emb_base": c.rope_theta,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": c.rope_theta,
            "partial_rotary_factor": pct,
        },
    }


def _neox_matches(c: ModelConfig) -> bool:
    return (
        c.pos_encoding == "rope"
        and c.norm == "layernorm"
        and c.mlp in ("gelu", "gelu_exact")
        and c.bias
        and c.has_qkv_bias
        and c.kv_heads == c.n_heads
    )


_NEOX_NAMES = {  # Atlas -> GPT-NeoX, per block (weight and bias each)
    "attn_norm": "input_layernorm",
    "mlp_norm": "post_attention_layernorm",
    "attn.wo": "attention.dense",
    "mlp.w_in": "mlp.dense_h_to_4h",
    "mlp.w_out": "mlp.dense_4h_to_h",
}


def _neox_from_hf(t: State, c: ModelConfig) -> State:
    H, D, C = c.n_heads, c.head_dim, c.d_model
    state = {
        "tok_emb.weight": _take(t, "gpt_neox.embed_in.weight"),
        "final_norm.weight": _take(t, "gpt_neox.final_layer_norm.weight"),
        "final_norm.bias": _take(t, "gpt_neox.final_layer_norm.bias"),
    }
    for i in range(c.n_layers):
        p, a = f"gpt_neox.layers.{i}.", f"blocks.{i}."
        for ours, theirs in _NEOX_NAMES.items():
            for suffix in ("weight", "bias"):
                w = _take(t, f"{p}{theirs}.{suffix}")
                linear = suffix == "weight" and "norm" not in ours
                state[f"{a}{ours}.{suffix}"] = w.t() if linear else w
        # rows [head][q, k, v][D] -> [q heads | k heads | v heads], then [in, out]
        w = _take(t, f"{p}attention.query_key_value.weight").view(H, 3, D, C)
        b = _take(t, f"{p}attention.query_key_value.bias").view(H, 3, D)
        state[a + "attn.wqkv.weight"] = w.transpose(0, 1).reshape(3 * H * D, C).t()
        state[a + "attn.wqkv.bias"] = b.transpose(0, 1).reshape(3 * H * D)
    if not c.tie_embeddings:
        state["lm_head.weight"] = _take(t, "embed_out.weight").t()
    return state


def _neox_to_hf(s: State, c: ModelConfig) -> State:
    H, D, C = c.n_heads, c.head_dim, c.d_model
    out = {
        "gpt_neox.embed_in.weight": s["tok_emb.weight"],
        "gpt_neox.final_layer_norm.weight": s["final_norm.weight"],
        "gpt_neox.final_layer_norm.bias": s["final_norm.bias"],
    }
    for i in range(c.n_layers):
        a, p = f"blocks.{i}.", f"gpt_neox.layers.{i}."
        for ours, theirs in _NEOX_NAMES.items():
            for suffix in ("weight", "bias"):
                w = s[f"{a}{ours}.{suffix}"]
                linear = suffix == "weight" and "norm" not in ours
                out[f"{p}{theirs}.{suffix}"] = w.t() if linear else w
        w = s[a + "attn.wqkv.weight"].t().reshape(3, H, D, C)  # [q|k|v][head][D][C]
        b = s[a + "attn.wqkv.bias"].reshape(3, H, D)
        out[p + "attention.query_key_value.weight"] = w.transpose(0, 1).reshape(3 * H * D, C)
        out[p + "attention.query_key_value.bias"] = b.transpose(0, 1).reshape(3 * H * D)
    if not c.tie_embeddings:  # a tied head is left to transformers to tie
        out["embed_out.weight"] = s["lm_head.weight"].t()
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
        Architecture(
            "qwen2",
            "Qwen2ForCausalLM",
            _qwen2_config,
            _qwen2_hf_config,
            _qwen2_matches,
            _llama_from_hf,
            _llama_to_hf,
        ),
        Architecture(
            "gpt_neox",
            "GPTNeoXForCausalLM",
            _neox_config,
            _neox_hf_config,
            _neox_matches,
            _neox_from_hf,
            _neox_to_hf,
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


# Per model_type: (input embedding, output head) tensor names, both with the GPT-2 prefix
# as transformers saves it.
_HEADS = {
    "gpt2": ("transformer.wte.weight", "lm_head.weight"),
    "llama": ("model.embed_tokens.weight", "lm_head.weight"),
    "qwen2": ("model.embed_tokens.weight", "lm_head.weight"),
    "gpt_neox": ("gpt_neox.embed_in.weight", "embed_out.weight"),
}
# Buffers some checkpoints carry that hold no weights: GPT-2's and GPT-NeoX's causal masks,
# older Llama/NeoX RoPE frequencies (recomputed from the config).
_BUFFERS = (".attn.bias", ".attn.masked_bias", ".attention.bias", ".attention.masked_bias")
_BUFFERS += (".rotary_emb.inv_freq",)


def untie_if_head_differs(cfg: dict[str, Any], tensors: State) -> dict[str, Any]:
    """`cfg` with tie_word_embeddings false when the file holds an output head unlike the
    embedding: transformers 5 then keeps both and does not tie (it warns), so Atlas does too."""
    model_type = cfg.get("model_type")
    tied = cfg.get("tie_word_embeddings", model_type == "gpt2")
    if model_type not in _HEADS or not tied:
        return cfg
    emb_name, head_name = _HEADS[model_type]
    emb = tensors.get(emb_name, tensors.get(emb_name.removeprefix("transformer.")))
    head = tensors.get(head_name)
    if head is None or emb is None or (head.shape == emb.shape and torch.equal(head, emb)):
        return cfg
    return {**cfg, "tie_word_embeddings": False}


class _Used(dict):
    """A state dict that records which tensors were read, to find the ones left over."""

    def __init__(self, tensors: State) -> None:
        super().__init__(tensors)
        self.read: set[str] = set()

    def __getitem__(self, name: str) -> Tensor:
        self.read.add(name)
        return super().__getitem__(name)


def atlas_state_from_hf(cfg: dict[str, Any], tensors: State) -> State:
    """Atlas's state dict from an HF one (HF names and layouts), fp32, contiguous.

    Every tensor must be used (a config with fewer layers than the file, a stray head):
    leftovers are refused rather than silently dropped. A tied config whose file holds a
    different head is untied, as transformers does (`untie_if_head_differs`).
    """
    arch = _architecture(cfg.get("model_type"))
    cfg = untie_if_head_differs(cfg, tensors)
    config = arch.config_from_hf(cfg)
    used = _Used({k: v.float() for k, v in tensors.items()})
    state = arch.state_from_hf(used, config)
    head = _HEADS[arch.model_type][1]
    if config.tie_embeddings and head in used:
        used.read.add(head)  # equal to the embedding (else untied above): tied as saved
    left = sorted(k for k in set(used) - used.read if not k.endswith(_BUFFERS))
    if left:
        more = f" and {len(left) - 3} more" if len(left) > 3 else ""
        raise HFConversionError(
            f"the weights hold {len(left)} tensors this config does not use "
            f"({', '.join(left[:3])}{more}); does config.json match the weights?"
        )
    return {k: v.contiguous() for k, v in state.items()}


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
        "GPT-2 (learned positions, LayerNorm, GELU, biases), Llama (RoPE, RMSNorm, SwiGLU, "
        "no biases), Qwen2 (Llama with q/k/v biases), GPT-NeoX (RoPE, LayerNorm, GELU, biases)"
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
