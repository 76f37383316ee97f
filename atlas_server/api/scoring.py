"""Text scoring under the served model, for rerankers: many pairs, one engine round trip.

What it does: `EngineScorer.score_texts(pairs)` gives, for each (prefix, text) pair, the
mean log p(text | prefix) of the text's tokens under the model the server is serving:
it submits every pair to the engine as a prompt-logprobs request at once, so the engine
prefills them together, and waits for all of them together. It runs its own short event
loop on the calling thread (a reranker's worker thread): the engine thread hands events
straight to it, with no hop through the server's event loop. A prefix too long for the
context is cut from the left; a text too long is cut from the right. When the engine's
queue is full it submits the rest as earlier pairs finish.
What it does not do: rank anything (rerankers do, plugins/rerankers.py), or reach into
the engine beyond `Engine.submit` and its request stream.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from ..engine.types import QueueFullError, RequestOutput, SamplingParams
from .state import ServerState

# One generated token is the least a request can ask for; only the prompt's logprobs matter.
_PARAMS = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)


class EngineScorer:
    """RAGContext.score_texts over the server's engine (see the module docstring)."""

    def __init__(self, state: ServerState) -> None:
        self.state = state

    def score_texts(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        """Mean log p(text | prefix) per pair. Blocks; call it from a worker thread."""
        if not pairs:
            return []
        state = self.state
        if not state.ready or state.engine is None:
            raise RuntimeError("the model is not loaded yet")
        prompts = [self._prompt(prefix, text) for prefix, text in pairs]
        return asyncio.run(self._score(prompts))

    def _prompt(self, prefix: str, text: str) -> tuple[list[int], int]:
        """(prompt ids, number of text tokens at its end), fitted to the context."""
        tokenizer, limit = self.state.tokenizer, self.state.max_model_len
        text_ids = tokenizer.encode(text)[: max(1, limit - 2)]
        room = limit - 1 - len(text_ids)  # -1: the one generated token
        prefix_ids = tokenizer.encode(prefix)
        prefix_ids = prefix_ids[len(prefix_ids) - room :] if room > 0 else []
        return prefix_ids + text_ids, len(text_ids)

    async def _score(self, prompts: list[tuple[list[int], int]]) -> list[float]:
        engine = self.state.engine
        scores: list[float] = [0.0] * len(prompts)
        tasks: list[asyncio.Task] = []

        async def read(i: int, stream, n_text: int) -> None:
            logprobs = None
            async for event in stream:
                _check(event)
                if event.prompt_logprobs is not None:
                    logprobs = event.prompt_logprobs
            tail = [e.logprob for e in (logprobs or [])[-n_text:] if e is not None]
            scores[i] = sum(tail) / max(1, len(tail))

        try:
            for i, (ids, n_text) in enumerate(prompts):
                while True:
                    try:
                        stream = engine.submit(ids, _PARAMS)
                        break
                    except QueueFullError:
                        running = [t for t in tasks if not t.done()]
                        if not running:
                            raise
                        await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                tasks.append(asyncio.create_task(read(i, stream, n_text)))
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:  # after a failure: abort what is still running
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return scores


def _check(event: RequestOutput) -> None:
    if event.finished and event.finish_reason in ("error", "abort"):
        reason = event.error or ("the engine stopped" if event.finish_reason == "abort" else "")
        raise RuntimeError(f"scoring failed: {reason or 'engine error'}")
