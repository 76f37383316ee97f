"""The CUDA model runner: decode steps replayed from captured CUDA graphs.

What it does: `GraphRunner` executes a `StepPlan` like the eager runner (runner.py), except
that the decode rows run as one replay of a CUDA graph captured at start-up, so a decode
step costs one launch instead of a few hundred (at batch 1 the eager step is Python and
kernel launches: 8 ms for a model whose bf16 weights stream from HBM in 0.1 ms). Prompt
chunks still run eagerly (`forward_segments`, SDPA per chunk) in the same step.

How a graph stays valid: a graph replays fixed kernels on fixed addresses, so
  - inputs live in static buffers (`_ids`, `_positions`; the slots are the
    fixed 0..b-1, because the scheduler keeps a decode batch of B rows in slots 0..B-1);
    a step copies its host integers in with one asynchronous pinned copy;
  - batch sizes are bucketed (`batch_buckets`: 1, 2, 4, ..., up to max_running) and a
    step of B rows replays the smallest bucket b >= B; the b - B padding rows decode token
    0 at the slot's DEAD position (max_len - 1) in slots B..b-1. No real sequence ever
    writes or reads that position (a request's prompt + max_tokens <= max_len, and the last
    sampled token is never fed back, so positions <= max_len - 2 are all that is written),
    and every operation is row-wise, so padding rows never change a real row's logits or KV;
  - decode attention reads a fixed length of every slot, masked per row to its own
    positions (a plain masked SDPA): the lengths are bucketed too (`kv_length_buckets`:
    powers of two from 256 up to max_len), so short sequences do not read the whole slot.
One graph per (batch bucket, length bucket), captured largest first into one memory pool;
the start-up log says how many and how long the capture took. `cuda_graphs=False` keeps
the same static, padded path but runs it eagerly (and on the CPU, which is how the tests
check the padding logic without a GPU).

The pure functions at the top (buckets, padding, KV sizing) hold the arithmetic; they are
tested on the CPU (tests/test_cuda_runner_logic.py).

In overlap mode (engine.py) a step is queued before the host has read the last step's
tokens: those rows' input ids are copied into `_ids` from the last step's sampled ids on
the device (`feed_sampled`), after the host's integers and before the replay.

What it does not do: schedule (scheduler.py) or sample (sampling.py, which runs on the GPU
too).
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
import time

import torch
from torch import Tensor

from ..model import Transformer
from ..model.config import ModelConfig
from ..model.transformer import Segment
from .runner import EagerRunner, StepLogits, feed_sampled
from .scheduler import DecodeBatch, StepPlan
from .transfer import to_device

log = logging.getLogger("atlas.engine")

SMALLEST_KV_BUCKET = 256  # decode attention reads at least this many positions per row
KV_FREE_FRACTION = 0.5  # default KV budget: this share of the GPU memory free after loading


# --- the arithmetic (pure; tested on the CPU) ---------------------------------------------
def batch_buckets(max_running: int) -> list[int]:
    """Decode batch sizes that get a graph: powers of two below max_running, and itself."""
    if max_running < 1:
        raise ValueError(f"max_running must be >= 1, got {max_running}")
    sizes, b = [], 1
    while b < max_running:
        sizes.append(b)
        b *= 2
    return [*sizes, max_running]


def kv_length_buckets(max_len: int, smallest: int = SMALLEST_KV_BUCKET) -> list[int]:
    """KV lengths decode attention reads: powers of two from `smallest` below max_len, and
    max_len itself."""
    sizes, length = [], smallest
    while length < max_len:
        sizes.append(length)
        length *= 2
    return [*sizes, max_len]


def bucket_for(value: int, buckets: list[int]) -> int | None:
    """The smallest bucket >= value (buckets ascending); None when value exceeds them all."""
    i = bisect.bisect_left(buckets, value)
    return buckets[i] if i < len(buckets) else None


@dataclasses.dataclass(frozen=True)
class DecodeShape:
    """Which graph serves a decode batch: `batch` rows (the real ones first) reading
    `kv_length` positions of their slots."""

    batch: int
    kv_length: int


def decode_shape(
    decode: DecodeBatch, batches: list[int], kv_lengths: list[int], dead_position: int
) -> DecodeShape | None:
    """The bucketed shape of a decode batch, or None when no graph can serve it: slots not
    0..B-1 (the scheduler's packing guarantees they are), more rows than the largest
    bucket, or a position at or past the dead one."""
    n = len(decode)
    if n == 0 or decode.slots != tuple(range(n)) or max(decode.positions) >= dead_position:
        return None
    batch = bucket_for(n, batches)
    length = bucket_for(max(decode.positions) + 1, kv_lengths)
    if batch is None or length is None:
        return None
    return DecodeShape(batch, length)


def padded_inputs(decode: DecodeBatch, batch: int, dead_position: int) -> list[list[int]]:
    """[[token ids], [positions]], each of `batch` entries: the real rows, then padding rows
    (token 0 at the dead position, see the module docstring)."""
    pad = batch - len(decode)
    if pad < 0:
        raise ValueError(f"{len(decode)} rows do not fit a bucket of {batch}")
    return [list(decode.tokens) + [0] * pad, list(decode.positions) + [dead_position] * pad]


def kv_bytes_per_slot(config: ModelConfig, max_len: int, dtype: torch.dtype) -> int:
    """Bytes one KV slot of max_len positions takes: keys and values, every layer."""
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * config.n_layers * config.kv_heads * max_len * config.head_dim * element


def kv_slots(budget_bytes: int, bytes_per_slot: int, max_running: int) -> int:
    """How many slots a KV budget holds, at most max_running; refuses a budget below one."""
    fits = budget_bytes // bytes_per_slot
    if fits < 1:
        raise ValueError(
            f"a KV budget of {budget_bytes / 2**30:.3f} GiB holds no slot of "
            f"{bytes_per_slot / 2**20:.1f} MiB; raise engine.kv_cache_gib or lower "
            "engine.max_model_len"
        )
    return min(max_running, fits)


def kv_budget_bytes(kv_cache_gib: float | None, free_bytes: int | None) -> int | None:
    """The KV budget: `kv_cache_gib` when set, else KV_FREE_FRACTION of the free device
    memory (None where that is unknown, i.e. on the CPU: no budget, max_running slots)."""
    if kv_cache_gib is not None:
        if kv_cache_gib <= 0:
            raise ValueError(f"engine.kv_cache_gib must be > 0, got {kv_cache_gib}")
        return int(kv_cache_gib * 2**30)
    if free_bytes is None:
        return None
    return int(KV_FREE_FRACTION * free_bytes)


# --- the runner -------------------------------------------------------------------------
class GraphRunner(EagerRunner):
    """Decode rows through captured CUDA graphs (or their eager twin); see the module
    docstring. Prompt chunks run as in EagerRunner."""

    def __init__(
        self, model: Transformer, num_slots: int, max_len: int, cuda_graphs: bool = True
    ) -> None:
        super().__init__(model, num_slots, max_len)
        if max_len < 2:
            raise ValueError("the graph runner needs max_len >= 2 (one position is the dead one)")
        self.dead_position = max_len - 1
        self.batches = batch_buckets(num_slots)
        self.kv_lengths = kv_length_buckets(max_len)
        largest = self.batches[-1]
        dev = self.device
        # Separate buffers, so that every bucket's slice of each is contiguous.
        self._ids = torch.zeros(largest, dtype=torch.long, device=dev)
        self._positions = torch.zeros(largest, dtype=torch.long, device=dev)
        self._slots = torch.arange(largest, device=dev)  # row i decodes in slot i
        self._graphs: dict[DecodeShape, tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        self.graph_status = "off"
        self.capture_seconds = 0.0
        if cuda_graphs:
            if dev.type != "cuda":
                raise ValueError(f"CUDA graphs need a CUDA device, the model is on {dev}")
            self._capture_all()

    # --- decode ---------------------------------------------------------------------
    def _forward(self, plan: StepPlan, sampled: Tensor | None = None) -> StepLogits:
        shape = decode_shape(plan.decode, self.batches, self.kv_lengths, self.dead_position)
        if shape is None:  # nothing to decode, or a batch no graph fits: all eager
            return super()._forward(plan, sampled)
        decode_logits = self._decode(plan.decode, shape, sampled)
        prefill = []
        if plan.prefill:
            rest = dataclasses.replace(plan, decode=DecodeBatch((), (), (), ()), moves=[])
            prefill = super()._forward(rest).prefill
        return StepLogits(decode_logits, prefill)

    def _decode(self, decode: DecodeBatch, shape: DecodeShape, sampled: Tensor | None) -> Tensor:
        inputs = to_device(padded_inputs(decode, shape.batch, self.dead_position), self.device)
        self._ids[: shape.batch].copy_(inputs[0])  # [b]
        self._positions[: shape.batch].copy_(inputs[1])  # [b]
        if decode.feeds_sampled:  # the last step's tokens, straight from the device
            feed_sampled(self._ids, decode.sampled_rows, sampled)
        captured = self._graphs.get(shape)
        if captured is None:
            out = self._static_forward(shape)
        else:
            graph, out = captured
            graph.replay()
        return out[: len(decode)]  # [B, V] float32; valid until the next replay

    def _static_forward(self, shape: DecodeShape) -> Tensor:
        """The decode forward over the static buffers: what a graph captures. [b, V]."""
        b = shape.batch
        ids, positions = self._ids[:b], self._positions[:b]
        segment = Segment(
            0, b, b, 1, self._slots[:b], positions[:, None], kv_length=shape.kv_length, first_slot=0
        )
        return self.model.forward_segments(ids, [segment], self.cache, self._slots[:b]).float()

    # --- capture --------------------------------------------------------------------
    def _capture_all(self) -> None:
        started = time.perf_counter()
        shapes = [
            DecodeShape(b, n) for b in reversed(self.batches) for n in reversed(self.kv_lengths)
        ]
        self._ids.zero_()
        self._positions.fill_(self.dead_position)  # capture-time runs touch only dead positions
        try:
            pool = torch.cuda.graph_pool_handle()
            with torch.inference_mode():
                for shape in shapes:  # largest first: smaller graphs reuse its pool
                    side = torch.cuda.Stream()
                    side.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(side):  # warm-up: lazy init, cuBLAS workspaces
                        self._static_forward(shape)
                    torch.cuda.current_stream().wait_stream(side)
                    graph = torch.cuda.CUDAGraph()
                    # thread_local: other threads' CUDA calls (another engine, the
                    # server's) do not break this capture.
                    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                        out = self._static_forward(shape)
                    self._graphs[shape] = (graph, out)
            torch.cuda.synchronize()
        except Exception as e:  # the eager twin still serves; say so loudly
            self._graphs.clear()
            self.graph_status = f"off (capture failed: {type(e).__name__}: {e})"
            log.warning("CUDA graph capture failed, decoding eagerly: %s", e, exc_info=True)
            return
        self.capture_seconds = time.perf_counter() - started
        self.graph_status = f"on ({len(shapes)} graphs)"
        log.info(
            "captured %d decode CUDA graphs (batch %s x kv length %s) in %.2f s",
            len(shapes),
            self.batches,
            self.kv_lengths,
            self.capture_seconds,
        )

    def describe(self) -> dict[str, str]:
        return {**super().describe(), "cuda_graphs": self.graph_status}
