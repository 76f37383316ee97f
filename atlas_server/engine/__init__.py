"""The serving engine: continuous batching over a preallocated KV cache, with sampling."""

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
