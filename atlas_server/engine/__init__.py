"""The serving engine: continuous batching over a preallocated KV cache, with sampling.

One engine thread runs each step along the data flow scheduler.py (a plain StepPlan) ->
runner.py (the model) -> output.py (sampling, text, events); engine.py glues them and is
the only part other threads call. types.py is the public contract."""

from .engine import Engine
from .types import (
    EngineConfig,
    EngineError,
    EngineStats,
    EngineStoppedError,
    FinishReason,
    InvalidRequestError,
    QueueFullError,
    RequestOutput,
    SamplingParams,
    TokenLogprob,
)

__all__ = [
    "Engine",
    "EngineConfig",
    "EngineError",
    "EngineStats",
    "EngineStoppedError",
    "FinishReason",
    "InvalidRequestError",
    "QueueFullError",
    "RequestOutput",
    "SamplingParams",
    "TokenLogprob",
]
