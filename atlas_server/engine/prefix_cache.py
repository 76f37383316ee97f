"""Prefix caching over KV slots: which slot already holds the start of a new prompt.

Why: a chat client resends the whole conversation each turn, and many requests share a
system prompt or a few-shot preamble. Their KV rows at positions [0, L) depend only on
those L tokens (attention is causal), so a slot that computed them once can serve them
again. On 2 CPU cores a 124M model prefills about 1,000 tokens a second, so a 1,000-token
history costs a second of TTFT each turn without this; copying a slot's rows costs about
70 KB per position, well under a millisecond for hundreds.

What it does: `SlotContents` remembers, for each free slot, the tokens whose KV rows it
still holds (set when a sequence leaves the slot, forgotten when the slot is reused), and
`longest_prefix()` finds the slot, free or running, holding the longest prefix of a
prompt. The scheduler (scheduler.py) then takes that free slot as it is when the prompt
covers all it holds (a chat's next turn), or else copies the matched rows into another
free slot (the source runs, or holds more: another conversation that shares only a system
prompt keeps its history for its own next turn), and prefills only the rest.

What it does not do: share rows between running sequences without a copy (that needs paged
KV blocks, which Atlas does not use: model/kv_cache.py says why), or keep anything once a
slot is reused. Requests that ask for prompt logprobs are never served from the cache,
since they need the logits of every prompt position.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def common_prefix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    """Length of the common prefix of a and b, at most `limit`."""
    n, limit = 0, min(limit, len(a), len(b))
    while n < limit and a[n] == b[n]:
        n += 1
    return n


class SlotContents:
    """What each free KV slot still holds (tokens whose rows are valid at [0, len))."""

    def __init__(self) -> None:
        self._held: dict[int, list[int]] = {}

    def remember(self, slot: int, tokens: list[int]) -> None:
        if tokens:
            self._held[slot] = tokens
        else:
            self._held.pop(slot, None)

    def forget(self, slot: int) -> None:
        self._held.pop(slot, None)

    def holds(self, slot: int) -> bool:
        return slot in self._held

    def held(self, slot: int) -> list[int]:
        """The tokens whose rows `slot` holds ([] if none)."""
        return self._held.get(slot, [])

    def longest_prefix(
        self,
        prompt: list[int],
        free_slots: Iterable[int],
        running: Iterable[tuple[int, Sequence[int]]],
    ) -> tuple[int, int | None, bool]:
        """(length, slot, slot_is_free) of the longest cached prefix of `prompt`.

        At most len(prompt) - 1 tokens: the last prompt position must run to give the
        logits of the first generated token. `running` pairs a running slot with the tokens
        its rows hold. A free slot wins a tie, as it needs no copy. (0, None, False) when
        nothing matches.
        """
        limit = len(prompt) - 1
        best: tuple[int, int | None, bool] = (0, None, False)
        for slot in free_slots:
            held = self._held.get(slot)
            if held and held[0] == prompt[0]:
                n = common_prefix(held, prompt, limit)
                if n > best[0]:
                    best = (n, slot, True)
        for slot, held in running:
            if held and held[0] == prompt[0]:
                n = common_prefix(held, prompt, limit)
                if n > best[0]:
                    best = (n, slot, False)
        return best
