"""Model runners: execute a scheduler's `StepPlan` on the model and its KV cache.

What it does: `ModelRunner` is the interface between the engine and a device. A runner
owns the model (prepared for inference) and the KV cache, and `execute(plan)` does a
step's slot moves, one forward over the decode batch and the prompt chunks, then each
completed prompt's copies to its other choices, and returns the logits the output
processor samples from (`StepLogits`). `describe()` says what serves (device, dtype,
kernels), for the start-up log and /health.

`EagerRunner` is the runner today, on every device: the step is one flattened batch
(`Transformer.forward_segments`), so all its tokens go through every projection and MLP
matmul together and the weights are read once per step (at 124M fp32, ~10 ms of DRAM
traffic that a separate prompt forward would pay again), while attention runs per
segment: the decode rows as one [B, 1] batch against their KV slots, each chunk as
[1, T]. Nothing is padded: a padded [B, T] block mixing 1-token rows with a T-token chunk
would multiply the decode work by T (measured 8.5x slower for 16 rows and a 64-token
chunk). Against a decode forward plus separate chunk forwards (`python bench/ab_serving.py
6efd908 de36c19`, alternating builds): +3% output throughput with 16 streams of 128-token
prompts, -2% with 4 (within the run-to-run noise).

On CUDA, `make_runner` picks `GraphRunner` (cuda_runner.py): the same `execute()`, with
the decode rows replayed from CUDA graphs captured at start-up; the plan gives every
number as host integers (tokens, positions, slots), so filling the graphs' static input
buffers needs no device read-back. In overlap mode some decode rows' tokens are still on
the device: the plan names the row of the last step's sampled ids each comes from, and
`feed_sampled` copies them in on the device. Host lists reach a GPU through
`transfer.to_device`, which never waits for the device. `make_runner` also sizes the KV cache
(`engine.kv_cache_gib`, by default a share of the free GPU memory) and `resolve_dtype`
picks the serving dtype ("auto": bfloat16 on CUDA, float32 elsewhere).

What it does not do: decide what runs (scheduler.py), sample or detokenize (output.py).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

from ..model import KVCache, Transformer, native
from ..model.transformer import Segment, check_quantize
from .scheduler import SlotCopy, StepPlan
from .transfer import to_device
from .types import EngineConfig

log = logging.getLogger("atlas.engine")


@dataclass
class StepLogits:
    """A step's logits, float32: the decode rows' [B, V] and, per prompt chunk, the
    positions it asked for ([T, V] for "all", [1, V] for "last", [0, V] for "none")."""

    decode: Tensor
    prefill: list[Tensor]


class ModelRunner(ABC):
    """Runs step plans on one device; see the module docstring."""

    model: Transformer
    cache: KVCache

    @abstractmethod
    def execute(self, plan: StepPlan, sampled: Tensor | None = None) -> StepLogits:
        """Do `plan.moves`, the forward, then each chunk's `copy_to`, in that order.

        `sampled`: the previous step's sampled token ids [B'] on the device, which decode
        rows with `plan.decode.sampled_rows` >= 0 take as their input (overlap mode)."""

    @abstractmethod
    def describe(self) -> dict[str, str]:
        """What serves: {"device", "dtype", "matmul", "attention"} (kernel names), and how a
        decode step runs where there is a choice ("decode_step" on the CPU, "cuda_graphs")."""


class EagerRunner(ModelRunner):
    """The plan as one eager `forward_segments` call per step (see the module docstring)."""

    def __init__(
        self, model: Transformer, num_slots: int, max_len: int, quantize: str = "none"
    ) -> None:
        self.model = model.prepare_for_inference(quantize=quantize)  # "int8": 8-bit copies
        self.cache = model.new_cache(num_slots, max_len)
        self.device = model.tok_emb.weight.device

    def execute(self, plan: StepPlan, sampled: Tensor | None = None) -> StepLogits:
        if plan.decode.feeds_sampled and sampled is None:
            raise ValueError("the plan feeds the previous step's sampled ids; none given")
        for move in plan.moves:
            if isinstance(move, SlotCopy):
                self.cache.copy_slot(move.source, list(move.targets), move.length)
            else:
                self.cache.swap_slots(move.a, move.b, move.length)
        logits = self._forward(plan, sampled)
        for chunk in plan.prefill:
            if chunk.copy_to:
                self.cache.copy_slot(chunk.slot, list(chunk.copy_to), chunk.end)
        return logits

    def _forward(self, plan: StepPlan, sampled: Tensor | None = None) -> StepLogits:
        dev = self.device
        decode = plan.decode
        ids: list[int] = list(decode.tokens)
        segments: list[Segment] = []
        logit_rows: list[int] = list(range(len(decode)))
        if decode.tokens:
            n, slots = len(decode), list(decode.slots)
            consecutive = slots == list(range(slots[0], slots[0] + n))
            segments.append(
                Segment(
                    0,
                    n,
                    n,
                    1,
                    to_device(slots, dev),
                    to_device(list(decode.positions), dev)[:, None],  # [B, 1]
                    kv_length=max(decode.positions) + 1,
                    first_slot=slots[0] if consecutive else None,
                )
            )
        wanted: list[int] = []  # logit rows per chunk
        for chunk in plan.prefill:
            at, length = len(ids), len(chunk.tokens)
            ids += chunk.tokens
            segments.append(
                Segment(
                    at,
                    at + length,
                    1,
                    length,
                    to_device([chunk.slot], dev),
                    torch.arange(chunk.start, chunk.end, device=dev)[None],  # [1, T]
                    kv_length=chunk.end,
                    first_slot=chunk.slot,
                )
            )
            if chunk.logits == "all":
                rows = list(range(at, at + length))
            else:
                rows = [at + length - 1] if chunk.logits == "last" else []
            logit_rows += rows
            wanted.append(len(rows))
        ids_tensor = to_device(ids, dev)  # [N]
        if decode.feeds_sampled:
            feed_sampled(ids_tensor, decode.sampled_rows, sampled)
        out = self.model.forward_segments(
            ids_tensor,
            segments,
            self.cache,
            to_device(logit_rows, dev),
        ).float()  # [R, V]
        decode_logits, *per_chunk = out.split([len(decode), *wanted])
        return StepLogits(decode_logits, per_chunk)

    def describe(self) -> dict[str, str]:
        described = {
            "device": str(self.device),
            "dtype": str(self.model.tok_emb.weight.dtype).removeprefix("torch."),
            **serving_kernels(self.model),
        }
        if self.device.type == "cpu":  # CUDA's runner says how it decodes (cuda_graphs)
            one_call = self.model.decodes_in_one_call(self.cache)
            described["decode_step"] = "one call" if one_call else "block by block"
        return described


def feed_sampled(ids: Tensor, sampled_rows: tuple[int, ...], sampled: Tensor) -> None:
    """Overwrite ids[i] with sampled[sampled_rows[i]] where sampled_rows[i] >= 0, on the
    device (no read-back): one copy when the rows are the last step's in order, as in a
    steady decode; otherwise an index copy."""
    n = len(sampled_rows)
    if sampled_rows == tuple(range(n)):
        ids[:n].copy_(sampled[:n])
        return
    pairs = [(i, row) for i, row in enumerate(sampled_rows) if row >= 0]
    index = to_device(pairs, ids.device).T  # [2, F]: positions in ids, rows of sampled
    ids.index_copy_(0, index[0], sampled.index_select(0, index[1]))


# The default number of sequences decoded together: on 2-16 CPU cores a step of 16 rows
# already keeps the cores busy and more rows lengthen every stream's step; a GPU decodes
# 256 rows in about the time of one (the weights are read once a step), so the KV budget,
# not this number, should be what limits it there (vLLM's max_num_seqs is 256 too).
DEFAULT_MAX_RUNNING = {"cpu": 16, "cuda": 256}


def resolve_max_running(device: str | torch.device, max_running: int | None) -> int:
    """`max_running` when set, else the device's default (DEFAULT_MAX_RUNNING)."""
    if max_running is not None:
        return max_running
    return DEFAULT_MAX_RUNNING.get(torch.device(device).type, DEFAULT_MAX_RUNNING["cpu"])


def resolve_dtype(device: str | torch.device, dtype: str) -> str:
    """The serving dtype's name: "auto" is bfloat16 on CUDA (the weights and KV cache read
    half the bytes of fp32 per step), float32 elsewhere (CPUs without fast bf16 matmuls
    decode slower in it); any other name is kept."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if torch.device(device).type == "cuda" else "float32"


def make_runner(model: Transformer, config: EngineConfig, max_len: int) -> ModelRunner:
    """The runner for the model's device, with its KV cache sized (see the module docstring).

    Slots: `max_running`, fewer when the KV budget (`kv_cache_gib`; on CUDA by default a
    share of the free memory) holds fewer; the engine then runs that many.
    """
    from . import cuda_runner as cr  # it subclasses EagerRunner, defined above

    device = model.tok_emb.weight.device
    if device.type == "cuda" and config.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    budget = cr.kv_budget_bytes(config.kv_cache_gib, free)
    per_slot = cr.kv_bytes_per_slot(model.config, max_len, model.tok_emb.weight.dtype)
    slots = config.max_running
    if budget is not None:
        slots = cr.kv_slots(budget, per_slot, config.max_running)
        log.info(
            "KV cache: %d slots x %d positions, %.1f MiB each (budget %.2f GiB%s; holds %d)",
            slots,
            max_len,
            per_slot / 2**20,
            budget / 2**30,
            "" if config.kv_cache_gib is not None else f", {cr.KV_FREE_FRACTION:.0%} of free",
            budget // per_slot,
        )
    if device.type == "cuda":
        check_quantize(config.quantize, device, model.tok_emb.weight.dtype)  # "none" only
        return cr.GraphRunner(model, slots, max_len, cuda_graphs=config.cuda_graphs)
    return EagerRunner(model, slots, max_len, config.quantize)


def serving_kernels(model: Transformer) -> dict[str, str]:
    """Which kernels a prepared model serves with: {"matmul": ..., "attention": ...}.

    "C" is Atlas's own (model/native.py), "C int8" the same over 8-bit weights, "oneDNN" PyTorch's packed oneDNN matmul
    (model/onednn.py), "PyTorch" the default path (matmul, SDPA). Decode attention is C
    where the model's decode steps take the C kernel (fp32 on the CPU, SDPA attention).
    """
    copies = [getattr(m, "packed", None) for m in model.modules() if hasattr(m, "packed")]
    # A stale copy (its weight changed, or the model was unpickled) steps aside: PyTorch's.
    names = {c.kernel if c is not None and c.fresh() else "PyTorch" for c in copies}
    weight = model.tok_emb.weight
    native_attention = (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and model.config.attention == "sdpa"
        and native.available()
    )
    return {
        "matmul": "+".join(sorted(names)) or "PyTorch",
        "attention": "C" if native_attention else "PyTorch",
    }
