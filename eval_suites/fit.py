"""Fitting prompts into the server's context window, and keeping count of what did not fit.

The context length, in order:
  1. `max_model_len` of the served model in `/v1/models` (Atlas and vLLM report it);
  2. the suite option `max_context_tokens` (> 0) for servers that do not; when both are
     known the smaller wins, so the option can also hold prompts below the server's limit;
  3. unknown: nothing is trimmed ahead, and the server's own HTTP 400 ("maximum context
     length ...") is the check, item by item.
A prompt fits when its tokens (counted as in `tokens.py`) plus the request's `max_tokens`
are at most the context length: the rule Atlas, vLLM and the OpenAI API apply.

Each suite decides how to make an item fit (documented in the suite: fewer few-shot
examples, shorter passages, a smaller perplexity window) and reports every item here as
kept, trimmed or skipped. A skipped item (it cannot fit even fully trimmed, or the server
refused it as too long) is left out of the scores and listed with its reason; it never
stops the run. The runner writes `report()` to results.json as `context_fit`.
What it does not do: lower `max_tokens` (that would change what the suite measures) or
trim anything silently.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .errors import ServerRequestError
from .tokens import TokenCounter, estimate_tokens

__all__ = ["ContextWindow", "PromptFitter", "is_context_error", "resolve_context"]

T = TypeVar("T")
Prompt = str | list[dict[str, Any]]
# How servers word "the prompt does not fit": Atlas, vLLM and OpenAI ("maximum context
# length"), llama.cpp ("exceeds the available context size"), TGI ("must be <= N"), Atlas's
# RAG ("no retrieved source fits the model's 512-token context next to the question").
CONTEXT_ERROR = re.compile(
    r"context (?:length|size|window)|too long|exceeds? the|must be <= \d+|\d+-token context",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class ContextWindow:
    tokens: int | None  # None: unknown, the server's 400 is the only check
    source: str  # where the number came from, for results.json


def resolve_context(card: dict[str, Any], option: int) -> ContextWindow:
    """The context length from the model card and a suite's `max_context_tokens` option."""
    served = card.get("max_model_len")
    served = served if isinstance(served, int) and served > 0 else None
    if option > 0 and (served is None or option < served):
        return ContextWindow(option, "max_context_tokens option")
    if served is not None:
        return ContextWindow(served, "server /v1/models max_model_len")
    return ContextWindow(
        None, "unknown: /v1/models reports no max_model_len and max_context_tokens = 0"
    )


def is_context_error(error: Exception) -> bool:
    """True for a server's 400 that says the prompt (plus max_tokens) is too long."""
    return (
        isinstance(error, ServerRequestError)
        and error.status in (400, 413, 422)
        and bool(CONTEXT_ERROR.search(str(error)))
    )


@dataclass
class PromptFitter:
    window: ContextWindow
    counter: TokenCounter
    kept: set[str] = field(default_factory=set)  # item ids that fit (perhaps trimmed)
    trimmed: set[str] = field(default_factory=set)
    skipped: dict[str, str] = field(default_factory=dict)  # item id -> reason
    notes: list[str] = field(default_factory=list)

    async def fits(self, prompt: Prompt, max_tokens: int) -> bool:
        limit = self.window.tokens
        if limit is None:
            return True
        # The estimate never counts too few for a plain prompt: no request needed when it fits.
        if isinstance(prompt, str) and estimate_tokens(prompt) + max_tokens <= limit:
            return True
        return await self.counter.count(prompt) + max_tokens <= limit

    async def largest_fitting(
        self, build: Callable[[int], Prompt], low: int, high: int, max_tokens: int
    ) -> int | None:
        """The largest n in [low, high] whose `build(n)` fits, or None; `build` must grow
        with n (a binary search: about log2(high - low) token counts)."""
        if low > high or not await self.fits(build(low), max_tokens):
            return None
        while low < high:
            middle = (low + high + 1) // 2
            if await self.fits(build(middle), max_tokens):
                low = middle
            else:
                high = middle - 1
        return low

    def keep(self, item_id: str, trimmed: bool) -> None:
        self.kept.add(item_id)
        if trimmed:
            self.trimmed.add(item_id)

    def skip(self, item_id: str, reason: str) -> None:
        self.skipped[item_id] = reason

    def is_skipped(self, item_id: str) -> bool:
        return item_id in self.skipped

    async def refused_as_too_long(self, item_id: str, request: Awaitable[T]) -> T | None:
        """Await `request`; a 400 that says the prompt is too long skips the item (None)."""
        try:
            return await request
        except ServerRequestError as e:
            if not is_context_error(e):
                raise
            self.skip(item_id, f"the server refused it as too long: {e}")
            return None

    def too_long_reason(self, what: str, max_tokens: int) -> str:
        return (
            f"{what} does not fit the {self.window.tokens}-token context with max_tokens"
            f" {max_tokens}"
        )

    def report(self) -> dict[str, Any]:
        """`context_fit` in results.json; skipped items sorted by id (runs compare equal)."""
        return {
            "max_model_len": self.window.tokens,
            "source": self.window.source,
            "token_counter": self.counter.method,
            "items_evaluated": len(self.kept - set(self.skipped)),
            "items_trimmed": len(self.trimmed - set(self.skipped)),
            "items_skipped": len(self.skipped),
            "skipped": [{"id": k, "reason": self.skipped[k]} for k in sorted(self.skipped)],
            "notes": list(self.notes),
        }
