"""A decoder-only transformer, readable top to bottom.

What it does: token embedding -> positional information (learned, sinusoidal or RoPE)
-> n pre-norm blocks of causal self-attention (multi-head or grouped-query) and a
feed-forward network (GELU MLP or SwiGLU) with residual connections -> final norm ->
logits. Options cover the imported architectures: a bias on the q|k|v projection alone
(Qwen2), RoPE on part of each head and a parallel residual (GPT-NeoX), exact GELU.
The forward pass optionally reads and writes a `KVCache` at explicit
positions, which is all the serving engine needs to prefill and decode ragged
batches. What it does not do: sampling, scheduling, tokenization or checkpoint I/O.

Weight layout: every projection stores its weight as [in_features, out_features] and
computes `x @ weight`. For batch-1 decode this streams the weight matrix row by row
in memory order; the [out, in] layout of `nn.Linear` makes the same product a
matrix-vector over a transposed view, which on CPU reaches well under half of DRAM
bandwidth (see bench/). Shapes in comments: B batch, T tokens, C d_model, H heads,
K kv heads, D head_dim, S cache length, V vocab.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import decode_stack, native
from .attention import attention, document_causal_mask
from .config import ModelConfig
from .decode_stack import DecodeStack
from .kv_cache import KVCache
from .onednn import PackedWeight, packing_supported, train_matmul
from .weight_copy import WeightCopy, version_of

QUANTIZE = ("none", "int8")  # what prepare_for_inference(quantize=...) takes


def inference_copy(
    weight: Tensor, out_in: bool = False, quantize: str = "none"
) -> WeightCopy | None:
    """The fastest inference copy of `weight` this machine has, or None: column panels for
    Atlas's C kernel in fp32 (native.py: faster than oneDNN for a decode step's 1-32 rows
    and on par beyond, `python bench/bench_matmul.py`), else a oneDNN-packed copy
    (onednn.py). One kernel for every row count keeps a row's numbers independent of the
    batch it is in. `quantize="int8"`: the C kernel's 8-bit panels (q8_0 blocks), which
    needs an fp32 CPU weight and the C kernels (check_quantize says so beforehand)."""
    if quantize == "int8":
        return native.Int8PanelWeight(weight, out_in)
    if weight.dtype == torch.float32 and weight.device.type == "cpu" and native.available():
        return native.PanelWeight(weight, out_in)
    return PackedWeight(weight, out_in) if packing_supported(weight) else None


def check_quantize(quantize: str, device: torch.device | str, dtype: torch.dtype) -> None:
    """Refuse, with what is wrong, a `quantize` the model cannot be served with."""
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE)}, got {quantize!r}")
    if quantize == "none":
        return
    if torch.device(device).type != "cpu":
        raise ValueError(
            f"quantize={quantize} is for serving on the CPU (Atlas's C kernels): pass "
            f"--device cpu, or serve on {torch.device(device).type} in bfloat16 without it"
        )
    if dtype != torch.float32:
        raise ValueError(
            f"quantize={quantize} computes in float32: serve with dtype float32 (or auto), "
            f"not {str(dtype).removeprefix('torch.')}"
        )
    if not native.available():
        raise ValueError(
            f"quantize={quantize} needs Atlas's C kernels, which are not available here "
            "(the warning before this says why: no C compiler, a failed build, an "
            "ATLAS_NATIVE_LIB that cannot be used, or ATLAS_NATIVE=0)"
        )


class Linear(nn.Module):
    """y = x @ W (+ b) with W stored as [in, out] (see the module docstring for why)."""

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.packed: WeightCopy | None = None  # set by pack(); see inference_copy()

    def pack(self, quantize: str = "none") -> None:
        """Keep an inference copy of the weight for the CPU (see inference_copy())."""
        self.packed = inference_copy(self.weight, quantize=quantize)

    def forward(self, x: Tensor, gelu_tanh: bool = False) -> Tensor:
        """x @ W (+ b), then GELU (tanh form) when asked (oneDNN fuses it into its matmul)."""
        if self.packed is not None and self.packed.usable_for(x):
            return self.packed(x, self.bias, gelu_tanh)
        y = train_matmul(x, self.weight, self.bias)  # oneDNN with autograd, where it applies
        if y is None:
            y = x @ self.weight
            # The bias in the product's dtype: under autocast an fp32 bias would promote a
            # bf16/fp16 result back to fp32 for the rest of the block.
            y = y + self.bias.to(y.dtype) if self.bias is not None else y
        return F.gelu(y, approximate="tanh") if gelu_tanh else y


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if native_inference(x, self.weight):
            return native.rms_norm(x, self.weight, self.eps)  # one call, not six
        # Normalise in fp32 so bf16/fp16 activations keep their precision here.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def native_inference(*tensors: Tensor) -> bool:
    """Whether Atlas's C kernels (native.py) can take this step: fp32 CPU tensors, no
    autograd to record it, and the kernels compiled."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return all(t.is_cpu and t.dtype == torch.float32 for t in tensors) and native.available()


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.d_model, config.norm_eps)
    return nn.LayerNorm(config.d_model, eps=config.norm_eps, bias=config.bias)


def sinusoidal_table(max_len: int, dim: int) -> Tensor:
    """The fixed sin/cos table of "Attention Is All You Need": [max_len, dim]."""
    position = torch.arange(max_len, dtype=torch.float32)[:, None]  # [L, 1]
    inv_freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(max_len, dim)
    table[:, 0::2] = torch.sin(position * inv_freq)
    table[:, 1::2] = torch.cos(position * inv_freq[: dim // 2])
    return table


def rope_tables(max_len: int, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos and sin for rotary embeddings, each [max_len, head_dim] (halves repeated)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)  # [L, D/2]
    angles = torch.cat([angles, angles], dim=-1)  # [L, D]
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (i, i + D/2) of x [B, T, H, D] by angles given as cos/sin [B, T, 1, D].

    This is the "rotate half" convention used by Llama in Hugging Face transformers.
    """
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.float() * cos + rotated.float() * sin).type_as(x)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.n_heads, self.n_kv_heads, self.head_dim = (
            config.n_heads,
            config.kv_heads,
            config.head_dim,
        )
        qkv_out = (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
        self.wqkv = Linear(config.d_model, qkv_out, config.has_qkv_bias)  # fused: one matmul
        self.wo = Linear(self.n_heads * self.head_dim, config.d_model, config.bias)
        self.dropout = config.dropout
        self.impl = config.attention
        self.use_rope = config.pos_encoding == "rope"
        self.rope_dims = config.rope_dims

    def forward(
        self,
        x: Tensor,  # [B, T, C]
        positions: Tensor,  # [B, T]
        rope: tuple[Tensor, Tensor] | None,
        cache: KVCache | None,
        slots: Tensor | None,  # [B]
        segments: list[Segment] | None = None,
        mask: Tensor | None = None,  # [B, 1, T, T] training-only attention mask
    ) -> Tensor:
        B, T, _ = x.shape
        qkv = self.wqkv(x)  # [B, T, (H + 2K) * D]
        if segments is None:
            out = self._attend(qkv, positions, rope, cache, slots, mask=mask)  # [B, T, H*D]
        else:
            # One flattened batch (B = 1) of several groups of sequences: the projections
            # ran over all N tokens at once; attention runs group by group.
            parts = [
                self._attend(
                    qkv[0, g.start : g.stop].view(g.rows, g.length, -1),
                    g.positions,
                    rope,
                    cache,
                    g.slots,
                    g.kv_length,
                    g.first_slot,
                ).reshape(1, g.stop - g.start, -1)
                for g in segments
            ]
            out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)  # [1, N, H*D]
        out = self.wo(out)
        return F.dropout(out, self.dropout, self.training)

    def _attend(
        self,
        qkv: Tensor,  # [B, T, (H + 2K) * D]
        positions: Tensor,  # [B, T]
        rope: tuple[Tensor, Tensor] | None,
        cache: KVCache | None,
        slots: Tensor | None,  # [B]
        kv_length: int | None = None,  # host-side hints, see Segment
        first_slot: int | None = None,
        mask: Tensor | None = None,  # [B, 1, T, T]; None = plain causal
    ) -> Tensor:
        B, T, _ = qkv.shape
        H, K, D = self.n_heads, self.n_kv_heads, self.head_dim
        rotated = False
        if self.use_rope and qkv.is_contiguous() and positions.dtype == torch.int64:
            cos, sin = rope  # type: ignore[misc]
            if native_inference(qkv, cos, sin):
                # q and k heads turned in place, reading the tables at each row's position.
                native.rope_in_place(qkv, positions, cos, sin, H + K, D)
                rotated = True
        q, k, v = qkv.split([H * D, K * D, K * D], dim=-1)
        q = q.view(B, T, H, D)
        k = k.view(B, T, K, D)
        v = v.view(B, T, K, D)
        if self.use_rope and not rotated:
            cos, sin = rope  # type: ignore[misc]
            cos = cos[positions].unsqueeze(2)  # [B, T, 1, R], R = rotated dims (D or fewer)
            sin = sin[positions].unsqueeze(2)
            if self.rope_dims == D:
                q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            else:  # partial rotary: the first R dims of each head turn, the rest pass
                R = self.rope_dims
                q = torch.cat([apply_rope(q[..., :R], cos, sin), q[..., R:]], dim=-1)
                k = torch.cat([apply_rope(k[..., :R], cos, sin), k[..., R:]], dim=-1)

        if cache is None:
            # Training / full forward: the sequence attends to itself, causally (within each
            # document when packed rows bring a mask).
            out = attention(
                q.transpose(1, 2),  # [B, H, T, D]
                k.transpose(1, 2),  # [B, K, T, D]
                v.transpose(1, 2),
                mask=mask,
                dropout=self.dropout if self.training else 0.0,
                impl=self.impl,
            )
        else:
            assert slots is not None, "a KV cache needs the slot of each batch row"
            if T == 1 and self._native_decode_applies(q, cache):
                # One token per row: the kernel stores its key and value in the cache, then
                # reads each row's own positions straight from it.
                out = native.decode_attention(
                    q[:, 0],  # [B, H, D]
                    cache.k[self.layer_index],
                    cache.v[self.layer_index],
                    slots,
                    positions[:, 0] + 1,  # [B] cached positions each row attends to
                    D**-0.5,
                    k[:, 0],  # [B, K, D]
                    v[:, 0],
                )  # [B, H, D]
                return out.reshape(B, T, H * D)
            cache.write(self.layer_index, slots, positions, k, v)
            if kv_length == T:
                # A prompt chunk at position 0 (Segment: consecutive positions 0..T-1 in
                # every row) sees only itself: plain causal attention over its own keys,
                # with no mask, so SDPA can take its flash kernel instead of reading the
                # cache back and masking (a host-side test: no GPU sync).
                out = attention(
                    q.transpose(1, 2),
                    k.transpose(1, 2),
                    v.transpose(1, 2),
                    mask=None,
                    dropout=0.0,
                    impl=self.impl,
                )  # [B, H, T, D]
                return out.transpose(1, 2).reshape(B, T, H * D)
            length = kv_length if kv_length is not None else int(positions.max()) + 1
            keys, values = cache.read(self.layer_index, slots, length, first_slot)
            # keys/values: [B, K, S, D] with S = furthest position in this batch + 1.
            # Query at position p sees cache positions <= p of its own slot; positions past a
            # row's own length hold stale or padding entries and are masked out here.
            key_pos = torch.arange(keys.shape[2], device=qkv.device)
            mask = key_pos[None, None, None, :] <= positions[:, None, :, None]  # [B, 1, T, S]
            out = attention(q.transpose(1, 2), keys, values, mask=mask, dropout=0.0, impl=self.impl)
        return out.transpose(1, 2).reshape(B, T, H * D)  # [B, T, H*D]

    def _native_decode_applies(self, q: Tensor, cache: KVCache) -> bool:
        """The C decode kernel covers fp32 CPU inference with the default attention."""
        return (
            self.impl == "sdpa"
            and q.device.type == "cpu"
            and q.dtype == cache.k[0].dtype == torch.float32
            and not (q.requires_grad and torch.is_grad_enabled())
            and native.available()
        )


@dataclass(frozen=True)
class Segment:
    """Tokens [start, stop) of a flattened batch: `rows` sequences of `length` tokens each,
    row i in KV slot `slots[i]` at `positions[i]` ([rows, length], consecutive in a row).

    The optional hints repeat, as host integers, what the tensors hold, so that a GPU step
    never waits to read them back: `kv_length` = max(positions) + 1, and `first_slot` when
    the slots are first_slot, first_slot + 1, ... (the cache then hands out a view).
    """

    start: int
    stop: int
    rows: int
    length: int
    slots: Tensor
    positions: Tensor
    kv_length: int | None = None
    first_slot: int | None = None


class FeedForward(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.kind = config.mlp
        hidden = config.ff_dim
        # SwiGLU fuses its gate and up projections into one [C, 2F] matmul.
        n_in = 2 * hidden if self.kind == "swiglu" else hidden
        self.w_in = Linear(config.d_model, n_in, config.bias)
        self.w_out = Linear(hidden, config.d_model, config.bias)
        self.dropout = config.dropout

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "swiglu":
            gate, up = self.w_in(x).chunk(2, dim=-1)  # [B, T, F] each
            h = F.silu(gate) * up
        elif self.kind == "gelu_exact":
            h = F.gelu(self.w_in(x))  # [B, T, F]; erf GELU (Pythia's "gelu")
        else:
            h = self.w_in(x, gelu_tanh=True)  # [B, T, F]; GPT-2's "gelu_new"
        return F.dropout(self.w_out(h), self.dropout, self.training)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)); with
    `parallel_residual`, both read the same x: x + attn(norm1(x)) + mlp(norm2(x))."""

    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.attn_norm = make_norm(config)
        self.attn = CausalSelfAttention(config, layer_index)
        self.mlp_norm = make_norm(config)
        self.mlp = FeedForward(config)
        self.parallel = config.parallel_residual

    def forward(self, x, positions, rope, cache, slots, segments=None, mask=None) -> Tensor:
        attn = self.attn(self.attn_norm(x), positions, rope, cache, slots, segments, mask)
        if self.parallel:
            return x + attn + self.mlp(self.mlp_norm(x))
        x = x + attn
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        # A buffer (not a plain attribute) so .to(dtype/device) converts it with the weights;
        # non-persistent, so checkpoints never hold it. Set by prepare_for_inference().
        self.register_buffer("_tied_head_t", None, persistent=False)
        self._packed_head: WeightCopy | None = None  # inference copy of a tied head (CPU)
        self._decode_stack: DecodeStack | None = None  # one-call CPU decode (decode_stack.py)
        if config.pos_encoding == "learned":
            self.pos_emb = nn.Embedding(config.max_seq_len, config.d_model)
        self._rebuild_buffers()
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.final_norm = make_norm(config)
        if not config.tie_embeddings:
            self.lm_head = Linear(config.d_model, config.vocab_size, bias=False)
        self.reset_parameters()

    def _rebuild_buffers(self) -> None:
        """(Re)compute the fixed position tables; they are derived, so never saved."""
        config, device = self.config, self.tok_emb.weight.device
        if config.pos_encoding == "sinusoidal":
            table = sinusoidal_table(config.max_seq_len, config.d_model).to(device)
            self.register_buffer("pos_table", table, persistent=False)
        elif config.pos_encoding == "rope":
            cos, sin = rope_tables(config.max_seq_len, config.rope_dims, config.rope_theta)
            # Built in fp32; `model.to(dtype)` converts them like any buffer (as Hugging Face's
            # Llama does). apply_rope multiplies in fp32 either way.
            self.register_buffer("rope_cos", cos.to(device), persistent=False)
            self.register_buffer("rope_sin", sin.to(device), persistent=False)

    # --- initialisation -------------------------------------------------------------
    def reset_parameters(self) -> None:
        """GPT-2 initialisation: N(0, 0.02), residual output projections scaled by 1/sqrt(2L)."""
        std = self.config.init_std
        for name, p in self.named_parameters():
            if p.dim() == 1:
                # Norm gains start at one, biases at zero.
                nn.init.ones_(p) if name.endswith("norm.weight") else nn.init.zeros_(p)
            elif name.endswith(("wo.weight", "w_out.weight")):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.config.n_layers))
            else:
                nn.init.normal_(p, 0.0, std)

    # --- forward --------------------------------------------------------------------
    def head_is_one_matrix(self) -> bool:
        """The logits are `hidden @ output_weight()`: true unless the untied head is wrapped
        (a LoRA adapter on `lm_head` adds its own low-rank term, with its own dropout)."""
        return self.config.tie_embeddings or type(self.lm_head) is Linear

    def output_weight(self) -> Tensor:
        """The [C, V] matrix that maps final hidden states to logits (see head_is_one_matrix)."""
        if not self.head_is_one_matrix():
            raise TypeError(f"lm_head is a {type(self.lm_head).__name__}, not one matrix")
        if self.config.tie_embeddings:
            # A transposed view of the [V, C] embedding; see prepare_for_inference().
            # The inference copy goes stale once training updates the embedding: train mode
            # always reads the live weight.
            if self._tied_head_t is not None and not self.training:
                return self._tied_head_t
            return self.tok_emb.weight.t()
        return self.lm_head.weight

    def forward(
        self,
        idx: Tensor,  # [B, T] token ids
        positions: Tensor | None = None,  # [B, T] absolute positions; default 0..T-1
        cache: KVCache | None = None,
        slots: Tensor | None = None,  # [B] cache slot of each row (needed with a cache)
        last_only: bool = False,  # return logits for the final position only
        doc_ids: Tensor | None = None,  # [B, T] packed training rows: attend within a document
    ) -> Tensor:
        B, T = idx.shape
        furthest = T - 1  # known without reading the tensor: no GPU sync, no compile graph break
        if positions is None:
            positions = torch.arange(T, device=idx.device).expand(B, T)
        else:
            furthest = int(positions.max())
        mask = None
        if doc_ids is not None:
            if cache is not None:
                raise ValueError("doc_ids are for packed training rows, not for a KV cache")
            mask = document_causal_mask(doc_ids)  # [B, 1, T, T]
        x, rope = self._embed(idx, positions, furthest)  # [B, T, C]
        if (
            T > 1
            or slots is None
            or not self._decode_in_one_call(x[:, 0], positions[:, 0], slots, cache)
        ):
            for block in self.blocks:
                x = block(x, positions, rope, cache, slots, None, mask)
        if last_only:
            x = x[:, -1:, :]  # [B, 1, C]
        return self._logits(x)  # [B, T, V]

    def hidden_states(self, idx: Tensor) -> Tensor:
        """The final-normed hidden states [B, T, C] of a training forward over idx [B, T]:
        what `forward` multiplies by `output_weight()`, for losses that apply the head
        themselves, a chunk of rows at a time (trainer/loss.py; tests compare the two)."""
        B, T = idx.shape
        positions = torch.arange(T, device=idx.device).expand(B, T)
        x, rope = self._embed(idx, positions, T - 1)  # [B, T, C]
        for block in self.blocks:
            x = block(x, positions, rope, None, None)
        return self.final_norm(x)  # [B, T, C]

    def forward_segments(
        self,
        idx: Tensor,  # [N] token ids of every segment, back to back
        segments: list[Segment],
        cache: KVCache,
        logit_rows: Tensor,  # [R] which of the N tokens need logits
    ) -> Tensor:
        """One forward over several groups of sequences at once: the serving engine's step.

        Decode rows (one token each) and prompt chunks (many tokens each) share every
        projection and MLP matmul, so the weights are read once per step however the work
        is split; attention runs per segment against the KV cache. Returns [R, V].
        """
        positions = torch.cat([g.positions.reshape(-1) for g in segments])[None]  # [1, N]
        lengths = [g.kv_length for g in segments]
        furthest = max(lengths) - 1 if None not in lengths else int(positions.max())
        x, rope = self._embed(idx[None], positions, furthest)  # [1, N, C]
        decode_only = len(segments) == 1 and segments[0].length == 1
        if not (
            decode_only and self._decode_in_one_call(x[0], positions[0], segments[0].slots, cache)
        ):
            for block in self.blocks:
                x = block(x, positions, rope, cache, None, segments)
        return self._logits(x[0, logit_rows])  # [R, V]

    def _decode_in_one_call(
        self,
        x: Tensor,  # [B, C]: one embedded token per row, a view the step may write
        positions: Tensor,  # [B]
        slots: Tensor,  # [B]
        cache: KVCache | None,
    ) -> bool:
        """Take x through every block in one C call (decode_stack.py) where the model and
        cache allow it, updating x in place; False (x untouched) where they do not."""
        if cache is None or torch.is_grad_enabled() or not x.is_cpu or x.dtype != torch.float32:
            return False
        if self.training or not decode_stack.enabled():  # training: dropout, block by block
            return False
        stack = self._current_decode_stack(cache)
        if stack is None or not x.is_contiguous():
            return False
        stack(x, positions, slots)
        return True

    def _current_decode_stack(self, cache: KVCache) -> DecodeStack | None:
        stack = self._decode_stack
        if stack is None or not stack.current(self, cache):
            stack = self._decode_stack = DecodeStack.build(self, cache)
        return stack

    def decodes_in_one_call(self, cache: KVCache) -> bool:
        """Whether one-token steps over `cache` run every block in one C call (decode_stack.py)
        rather than block by block: fp32 on the CPU, plain blocks with their panel copies."""
        return decode_stack.enabled() and self._current_decode_stack(cache) is not None

    def _embed(self, idx: Tensor, positions: Tensor, furthest: int) -> tuple[Tensor, tuple | None]:
        """Token embeddings plus positional information; RoPE tables are returned instead."""
        if furthest >= self.config.max_seq_len:
            raise ValueError(f"position {furthest} exceeds max_seq_len={self.config.max_seq_len}")
        x = self.tok_emb(idx)  # [B, T, C]
        rope = None
        if self.config.pos_encoding == "learned":
            x = x + self.pos_emb(positions)
        elif self.config.pos_encoding == "sinusoidal":
            x = x + self.pos_table[positions].to(x.dtype)
        else:
            rope = (self.rope_cos, self.rope_sin)
        return self.drop(x), rope

    def _logits(self, x: Tensor) -> Tensor:
        x = self.final_norm(x)
        if not self.config.tie_embeddings:
            # Through the module, not its weight: its CPU inference copy (the head is the
            # largest matrix of a small model), and a LoRA adapter's update where it has one.
            return self.lm_head(x)  # [..., V]
        if self._packed_head is not None and self._packed_head.usable_for(x):
            return self._packed_head(x)  # [..., V]
        head = self.output_weight()  # [C, V]
        logits = train_matmul(x, head)
        return logits if logits is not None else x @ head  # [..., V]

    def loss(self, idx: Tensor, targets: Tensor, ignore_index: int = -100) -> Tensor:
        """Mean next-token cross-entropy; targets [B, T] are the ids that should follow."""
        logits = self(idx)
        return F.cross_entropy(
            logits.float().reshape(-1, logits.size(-1)),
            targets.reshape(-1),
            ignore_index=ignore_index,
        )

    # --- serving helpers ------------------------------------------------------------
    def prepare_for_inference(self, pack: bool = True, quantize: str = "none") -> Transformer:
        """Eval mode, plus the weight copies that make decoding fast.

        On a CPU (and with `pack=True`), every projection and the output head get an
        inference copy (see inference_copy(): column panels for Atlas's C kernel in fp32,
        else a oneDNN-packed copy, both faster than PyTorch's default matmul). Elsewhere,
        a tied head gets a contiguous [C, V] copy: read as a transposed view of the [V, C]
        embedding it is the slow layout for matrix-vector products. Each copy costs the
        memory of the weights it copies.
        `quantize="int8"` makes those copies 8-bit (native.Int8PanelWeight: q8_0 blocks,
        fp32 arithmetic), for fp32 models on the CPU; the embedding lookup stays fp32.
        Packed copies notice in-place changes to their weight and step aside; call this
        again after changing the weights to get the fast path back. Calling it again with
        the weights unchanged keeps the tied head's copy: a second engine over the same model
        must not free the tensor the first one's captured CUDA graphs read.
        """
        if quantize != "none":
            check_quantize(quantize, self.tok_emb.weight.device, self.tok_emb.weight.dtype)
            if not pack:
                raise ValueError("quantize needs pack=True: the 8-bit weights are the copies")
        self.eval()
        self._decode_stack = None  # it holds the old copies; the next decode step builds anew
        kept_head = self._tied_head_t if self._tied_head_is_current() else None
        self._packed_head, self._tied_head_t = None, None
        for module in self.modules():
            if isinstance(module, Linear):
                module.packed = None
                if pack:
                    module.pack(quantize)
        if self.config.tie_embeddings:
            weight = self.tok_emb.weight
            self._packed_head = inference_copy(weight, True, quantize) if pack else None
            if self._packed_head is None:
                self._tied_head_t = (
                    kept_head if kept_head is not None else weight.detach().t().contiguous()
                )
                self._tied_head_source = (weight.data_ptr(), version_of(weight))
        return self

    def _tied_head_is_current(self) -> bool:
        """The tied head's copy was made from the embedding as it is now (same storage, no
        in-place change since)."""
        weight = self.tok_emb.weight
        return (
            self._tied_head_t is not None
            and self._tied_head_t.device == weight.device
            and self._tied_head_t.dtype == weight.dtype
            and getattr(self, "_tied_head_source", None) == (weight.data_ptr(), version_of(weight))
        )

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.tok_emb.weight.numel()
            if self.config.pos_encoding == "learned":
                n -= self.pos_emb.weight.numel()
        return n

    def new_cache(
        self, n_slots: int, max_len: int | None = None, dtype: torch.dtype | None = None
    ) -> KVCache:
        p = self.tok_emb.weight
        return KVCache(
            n_layers=self.config.n_layers,
            n_slots=n_slots,
            n_kv_heads=self.config.kv_heads,
            max_len=max_len or self.config.max_seq_len,
            head_dim=self.config.head_dim,
            device=p.device,
            dtype=dtype or p.dtype,
        )

    @torch.inference_mode()
    def generate(
        self,
        prompt_ids: list[int],
        max_new_tokens: int,
        temperature: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> list[int]:
        """Minimal one-sequence generation with a KV cache (the engine does the real serving)."""
        total = len(prompt_ids) + max_new_tokens
        if total > self.config.max_seq_len:
            raise ValueError(f"{total} tokens exceed max_seq_len={self.config.max_seq_len}")
        device = self.tok_emb.weight.device
        cache = self.new_cache(1, total)
        slots = torch.zeros(1, dtype=torch.long, device=device)
        ids = torch.tensor([prompt_ids], device=device)
        positions = torch.arange(len(prompt_ids), device=device)[None]
        out: list[int] = []
        for _ in range(max_new_tokens):
            logits = self(ids, positions, cache, slots, last_only=True)[0, -1].float()  # [V]
            if not bool(torch.isfinite(logits).all()):  # diverged weights: say so, not garbage
                raise FloatingPointError("the model's logits are not finite (NaN or infinite)")
            if temperature <= 0:
                next_id = int(logits.argmax())
            else:
                probs = torch.softmax(logits / temperature, dim=-1)
                next_id = int(torch.multinomial(probs, 1, generator=generator))
            out.append(next_id)
            ids = torch.tensor([[next_id]], device=device)
            positions = positions[:, -1:] + 1
        return out
