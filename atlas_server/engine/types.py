"""The engine's public contract: what a request asks for and what comes back.

What it does: defines `SamplingParams` (per request; `validate()` checks it against an
engine's `RequestLimits`, and `validate_prompt()` checks the prompt ids), `EngineConfig`
(the bounds of one engine), the output events streamed to a caller, and the engine's
errors. What it does not do: any work; see `engine.py`, `scheduler.py`, `output.py`.
The HTTP layer translates OpenAI request fields into these types and never reaches
further into the engine.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length", "abort", "error"]


class EngineError(Exception):
    """Base class of the engine's errors."""


class InvalidRequestError(EngineError, ValueError):
    """The request cannot be served as asked (e.g. prompt + max_tokens exceed the context)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class QueueFullError(EngineError):
    """The waiting queue is at its configured bound; retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class EngineStoppedError(EngineError):
    """The engine is shutting down or has stopped and accepts no new requests."""


SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # torch generators take 64-bit seeds
# A repetition penalty divides positive logits: below this, fp32 logits overflow (and a
# value under 1e-45 rounds to 0 in fp32), and the sampler's softmax would be NaN.
MIN_REPETITION_PENALTY = 0.01
MAX_LOGPROBS = 20  # top alternatives a request may ask for, per position (OpenAI's bound)


@dataclass(frozen=True)
class RequestLimits:
    """What one engine can serve, which a request is validated against."""

    vocab_size: int
    max_model_len: int  # prompt + max_tokens must fit
    max_n: int  # choices per request (each takes a KV slot): the engine's max_running


@dataclass(frozen=True)
class SamplingParams:
    """How to continue one prompt. Defaults follow the OpenAI completions API."""

    max_tokens: int = 16
    min_tokens: int = 0  # stop conditions (EOS, stop ids/strings) are ignored before this many
    temperature: float = 1.0  # 0 (or below 1e-5, sampling.GREEDY_BELOW) means greedy
    top_k: int = 0  # 0 or less: off
    top_p: float = 1.0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # 1.0: off (HF/CTRL definition, over prompt + output)
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()  # the client's: the id hit is the stop_reason
    # Ids that end the answer as EOS does (a chat template's end of turn): "stop" with no
    # stop_reason, masked below min_tokens and ignored with ignore_eos, as vLLM has it.
    end_token_ids: tuple[int, ...] = ()
    include_stop_str_in_output: bool = False  # vLLM's: keep the matched stop string
    ignore_eos: bool = False
    skip_special_tokens: bool = True  # leave special tokens out of the text (vLLM's default)
    logprobs: int | None = None  # None: none; k >= 0: sampled token's logprob + top-k alternatives
    prompt_logprobs: int | None = None  # same, for the prompt tokens (OpenAI `echo` + `logprobs`)
    n: int = 1  # independent samples of one prompt; they share its prefill

    def validate(self, limits: RequestLimits, prompt_len: int | None = None) -> None:
        """Raise InvalidRequestError naming the first field an engine with `limits` cannot
        serve; with `prompt_len`, also check that prompt + max_tokens fit the context."""
        for ok, param, message in self._checks(limits):
            if not ok:
                raise InvalidRequestError(message, param)
        vocab = limits.vocab_size
        for token, bias in self.logit_bias.items():
            if not isinstance(token, int) or not 0 <= token < vocab:
                raise InvalidRequestError(
                    f"logit_bias token {token} is outside the vocabulary", "logit_bias"
                )
            if not (math.isfinite(bias) and -100 <= bias <= 100):
                raise InvalidRequestError(
                    f"logit_bias values must be in [-100, 100], got {bias} for token {token}",
                    "logit_bias",
                )
        bad_stop_ids = [t for t in self.stop_token_ids if not 0 <= t < vocab]
        if bad_stop_ids:
            raise InvalidRequestError(
                f"stop_token_ids {bad_stop_ids} are outside the vocabulary", "stop_token_ids"
            )
        if prompt_len is not None and prompt_len + self.max_tokens > limits.max_model_len:
            raise InvalidRequestError(
                f"this model's maximum context length is {limits.max_model_len} tokens; the "
                f"prompt has {prompt_len} and max_tokens asks for {self.max_tokens} more "
                f"({prompt_len + self.max_tokens}); shorten the prompt or lower max_tokens",
                "max_tokens",
            )

    def _checks(self, limits: RequestLimits) -> list[tuple[bool, str, str]]:
        checks = [
            (self.max_tokens >= 1, "max_tokens", f"max_tokens must be >= 1, got {self.max_tokens}"),
            (
                0 <= self.min_tokens <= self.max_tokens,
                "min_tokens",
                f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}",
            ),
            (
                math.isfinite(self.temperature) and self.temperature >= 0,
                "temperature",
                f"temperature must be >= 0, got {self.temperature}",
            ),
            (0 < self.top_p <= 1, "top_p", f"top_p must be in (0, 1], got {self.top_p}"),
            (0 <= self.min_p <= 1, "min_p", f"min_p must be in [0, 1], got {self.min_p}"),
            (
                -2 <= self.presence_penalty <= 2,
                "presence_penalty",
                f"presence_penalty must be in [-2, 2], got {self.presence_penalty}",
            ),
            (
                -2 <= self.frequency_penalty <= 2,
                "frequency_penalty",
                f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}",
            ),
            (
                math.isfinite(self.repetition_penalty)
                and self.repetition_penalty >= MIN_REPETITION_PENALTY,
                "repetition_penalty",
                f"repetition_penalty must be >= {MIN_REPETITION_PENALTY}, "
                f"got {self.repetition_penalty}",
            ),
            (
                1 <= self.n <= limits.max_n,
                "n",
                f"n must be in [1, {limits.max_n}] (max_running), got {self.n}",
            ),
            (
                self.seed is None or SEED_MIN <= self.seed <= SEED_MAX,
                "seed",
                f"seed must be a 64-bit signed integer, got {self.seed}",
            ),
        ]
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            ok = k is None or 0 <= k <= MAX_LOGPROBS
            checks.append((ok, name, f"{name} must be in [0, {MAX_LOGPROBS}], got {k}"))
        return checks


def validate_prompt(prompt_ids: Sequence[int], vocab_size: int) -> list[int]:
    """The prompt as a list of token ids, or InvalidRequestError (param "prompt")."""
    if not prompt_ids:
        raise InvalidRequestError("the prompt is empty; give at least one token", "prompt")
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt_ids):
        raise InvalidRequestError("prompt token ids must be integers", "prompt")
    ids = list(prompt_ids)
    out_of_vocab = [t for t in ids if not 0 <= t < vocab_size]
    if out_of_vocab:
        raise InvalidRequestError(
            f"prompt token ids {out_of_vocab[:5]} are outside the vocabulary [0, {vocab_size})",
            "prompt",
        )
    return ids


@dataclass(frozen=True)
class EngineConfig:
    """Bounds of one engine. All memory is allocated at start from these numbers."""

    # Sequences decoding at once (= KV cache slots); None: 16 on the CPU, 256 on CUDA
    # (runner.resolve_max_running), fewer where the KV budget holds fewer.
    max_running: int | None = None
    max_batched_tokens: int = 512  # tokens per forward step, prefill chunks included
    max_queued: int = 256  # requests waiting beyond the running set; more -> QueueFullError
    max_model_len: int | None = None  # None: the model's max_seq_len
    # Reuse KV rows of a prompt prefix that a slot already holds (engine/prefix_cache.py).
    prefix_caching: bool = True
    device: str = "cpu"
    dtype: str = "auto"  # "auto": bfloat16 on CUDA, float32 elsewhere (runner.resolve_dtype)
    # "int8": the weights' CPU copies in 8 bits (q8_0 blocks, native.Int8PanelWeight); fp32
    # models on the CPU only. "none": as the model's dtype.
    quantize: str = "none"
    # KV cache budget in GiB; None: max_running slots on the CPU, a share of the free
    # memory on CUDA. Fewer slots than max_running fit -> the engine runs fewer.
    kv_cache_gib: float | None = None
    cuda_graphs: bool = True  # on CUDA: decode steps replay captured graphs (cuda_runner.py)
    tf32: bool = False  # on CUDA: TF32 matmuls for fp32 weights (faster, ~1e-3 relative)
    # Detokenize and emit step N's tokens while the device runs step N+1 (engine.py,
    # "Overlap"); None: on where the model runs on CUDA, off on the CPU (nothing to overlap).
    overlap: bool | None = None


@dataclass
class TokenLogprob:
    """One position's log-probability, and its top alternatives (id -> logprob).

    Values are the raw model's log_softmax (before logit_bias, penalties, temperature and
    truncation), as OpenAI and vLLM report them; always finite (floored at -9999.0).
    `top` is ordered best first and holds at most the k asked for.
    """

    token_id: int
    logprob: float
    top: dict[int, float] = field(default_factory=dict)


@dataclass
class RequestOutput:
    """One event of one choice of a request's stream.

    Events carry only what is new since the previous event of the same choice.
    `prompt_logprobs` arrives once, on the first event of choice 0, when asked for.
    The last event of a choice has `finished=True` and a `finish_reason`.
    """

    request_id: str
    index: int  # choice index, 0..n-1
    token_ids: list[int]
    text: str  # newly decoded text; stop strings and any partial UTF-8 are held back
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    finished: bool = False
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None  # the stop string or stop token id that matched
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache, not recomputed
    num_generated_tokens: int = 0  # total so far for this choice
    error: str | None = None
    # Set on the first event of a request: seconds between submit() and the engine first
    # scheduling it (the queue time the API reports as a metric).
    queue_time_s: float | None = None
    # Engine-side timestamps (time.perf_counter() of the engine process), so the API can
    # compute TTFT, inter-token latency and end-to-end latency without trusting the event
    # loop's delivery delay: `arrival_time` (submit() called) and `first_token_time` are on
    # every event of a choice; `time` is when the engine produced this event.
    arrival_time: float | None = None
    first_token_time: float | None = None
    time: float | None = None


@dataclass
class EngineStats:
    running: int
    waiting: int
    kv_slots_used: int
    kv_slots_total: int
    kv_cache_bytes: int
    prompt_tokens_total: int  # prompt tokens run through the model
    generation_tokens_total: int
    steps_total: int
    prefix_cache_hit_tokens_total: int = 0  # prompt tokens whose KV rows were reused
