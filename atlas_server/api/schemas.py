"""Wire schemas of the OpenAI-compatible API, as msgspec Structs.

What it does: declares the request bodies Atlas accepts (field names and defaults follow
the OpenAI API, with vLLM's extras such as top_k, min_p and repetition_penalty) and checks
their ranges, raising `RequestError` with the offending field. Responses are plain dicts
built in the route modules, because their shape varies with echo/logprobs/stream.
What it does not do: translate requests into engine parameters (see `params.py`).
"""

from __future__ import annotations

from typing import Any

import msgspec

from .errors import RequestError


class _Body(msgspec.Struct, kw_only=True, forbid_unknown_fields=False):
    """Unknown fields are ignored, as OpenAI-compatible servers do for client extras."""


class StreamOptions(_Body, kw_only=True):
    include_usage: bool = False


class RAGOptions(_Body, kw_only=True):
    """Atlas addition: retrieval-augmented generation for this request."""

    collection: str
    top_k: int | None = None
    retriever: str | None = None
    reranker: str | None = None
    filters: dict[str, Any] | None = None


class _SamplingFields(_Body, kw_only=True):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    n: int = 1
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[str, float] | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    rag: RAGOptions | None = None

    def check_ranges(self) -> None:
        def need(ok: bool, param: str, message: str) -> None:
            if not ok:
                raise RequestError(message, param=param)

        need(
            self.max_tokens is None or self.max_tokens >= 0, "max_tokens", "max_tokens must be >= 0"
        )
        need(
            self.max_tokens is None or self.max_tokens <= 1_000_000,
            "max_tokens",
            "max_tokens is too large",
        )
        need(
            self.temperature is None or 0.0 <= self.temperature <= 2.0,
            "temperature",
            "temperature must be between 0 and 2",
        )
        need(self.top_p is None or 0.0 < self.top_p <= 1.0, "top_p", "top_p must be in (0, 1]")
        need(
            self.top_k is None or self.top_k >= -1, "top_k", "top_k must be -1, 0 (off) or positive"
        )
        need(self.min_p is None or 0.0 <= self.min_p <= 1.0, "min_p", "min_p must be in [0, 1]")
        need(1 <= self.n <= 16, "n", "n must be between 1 and 16")
        need(
            -2.0 <= self.presence_penalty <= 2.0,
            "presence_penalty",
            "presence_penalty must be between -2 and 2",
        )
        need(
            -2.0 <= self.frequency_penalty <= 2.0,
            "frequency_penalty",
            "frequency_penalty must be between -2 and 2",
        )
        need(
            0.0 < self.repetition_penalty <= 10.0,
            "repetition_penalty",
            "repetition_penalty must be in (0, 10]",
        )
        need(self.min_tokens >= 0, "min_tokens", "min_tokens must be >= 0")
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        need(len(stops) <= 16, "stop", "at most 16 stop sequences")
        need(
            all(0 < len(s) <= 256 for s in stops), "stop", "stop sequences must be 1-256 characters"
        )
        for key, value in (self.logit_bias or {}).items():
            need(
                key.lstrip("-").isdigit(), "logit_bias", f"logit_bias key {key!r} is not a token id"
            )
            need(-100.0 <= value <= 100.0, "logit_bias", "logit_bias values must be in [-100, 100]")
        if self.rag is not None:
            need(bool(self.rag.collection), "rag.collection", "rag.collection must not be empty")
            need(
                self.rag.top_k is None or 1 <= self.rag.top_k <= 100,
                "rag.top_k",
                "rag.top_k must be between 1 and 100",
            )


class CompletionRequest(_SamplingFields, kw_only=True):
    # str | list[str] | list[int] | list[list[int]]: msgspec allows one array type in a
    # union, so the list forms are checked in `prompts_of()`.
    prompt: str | list[Any]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    def check_ranges(self) -> None:
        super().check_ranges()
        if self.logprobs is not None and not 0 <= self.logprobs <= 5:
            raise RequestError("logprobs must be between 0 and 5", param="logprobs")
        if self.best_of is not None and self.best_of != self.n:
            raise RequestError("best_of is supported only when null or equal to n", param="best_of")
        if self.suffix:
            raise RequestError("suffix is not supported", param="suffix")


class ChatMessage(_Body, kw_only=True):
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatCompletionRequest(_SamplingFields, kw_only=True):
    messages: list[ChatMessage]
    logprobs: bool = False
    top_logprobs: int | None = None
    max_completion_tokens: int | None = None
    add_generation_prompt: bool = True

    def check_ranges(self) -> None:
        super().check_ranges()
        if not self.messages:
            raise RequestError("messages must contain at least one message", param="messages")
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= 20:
            raise RequestError("top_logprobs must be between 0 and 20", param="top_logprobs")
        if self.top_logprobs and not self.logprobs:
            raise RequestError("top_logprobs needs logprobs: true", param="top_logprobs")


class TokenizeRequest(_Body, kw_only=True):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Body, kw_only=True):
    model: str | None = None
    tokens: list[int]
