"""Incremental detokenization with stop-string hold-back, one instance per output stream.

What it does: `IncrementalDetokenizer` turns token ids into text as they arrive and
emits only complete UTF-8 (a character split across tokens waits for its last byte);
the concatenation of everything it emits equals `tokenizer.decode(all ids)`, invalid
bytes included (both use the "replace" error handler), less the special tokens when it
is asked to skip them. `StopStringMatcher` sits after
it: text that could still be the beginning of a stop string is held back, a matched stop
string is cut off and never emitted. What it does not do: choose tokens or decide EOS.
"""

from __future__ import annotations

import codecs

from ..tokenizer import Tokenizer

__all__ = ["IncrementalDetokenizer", "StopStringMatcher"]


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self._token_bytes = tokenizer.token_bytes
        # Special tokens (<|endoftext|>, <|im_start|>...) are control marks, not text: a
        # model that emits one mid-answer should not show it (vLLM's default too).
        self._skipped = frozenset(tokenizer.special_tokens.values()) if skip_special_tokens else ()
        # The codec's incremental decoder keeps an incomplete trailing sequence (at most
        # 3 bytes) between calls, which is exactly the hold-back we need.
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_id: int) -> str:
        """The text that became complete with this token (often '', at most a few chars)."""
        if token_id in self._skipped:
            return ""
        return self._decoder.decode(self._token_bytes(token_id), final=False)

    def flush(self) -> str:
        """Whatever is still held at the end of the stream (an incomplete char becomes U+FFFD)."""
        return self._decoder.decode(b"", final=True)


class StopStringMatcher:
    """Buffers text until it cannot be part of a stop string."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = tuple(s for s in stops if s)
        self._held = ""
        self._unchecked = 0  # leading chars of _held that arrived before min_tokens

    def feed(self, text: str, check: bool = True) -> tuple[str, str | None]:
        """Returns (text safe to emit, matched stop string or None).

        With `check=False` (min_tokens not reached yet) no stop string matches, but the text
        that could begin one is still held: a stop string that starts before min_tokens and
        ends after it stops the stream, as in vLLM, whose window reaches len(stop) - 1
        characters back. One that ends before min_tokens never matches.
        """
        if not self.stops:
            return text, None
        buffer = self._held + text
        match_at, matched = -1, None
        if check:
            for stop in self.stops:
                at = self._find_after(buffer, stop, self._unchecked)
                if at != -1 and (match_at == -1 or at < match_at):
                    match_at, matched = at, stop
        if matched is not None:
            self._held, self._unchecked = "", 0
            return buffer[:match_at], matched
        keep = self._longest_stop_prefix_suffix(buffer)
        self._held = buffer[len(buffer) - keep :]
        # Of the held text, the part that arrived unchecked: all of it below min_tokens;
        # after, what is left of the unchecked prefix of `buffer` in its held suffix.
        dropped = len(buffer) - keep
        self._unchecked = keep if not check else max(0, self._unchecked - dropped)
        return buffer[: len(buffer) - keep], None

    @staticmethod
    def _find_after(buffer: str, stop: str, start: int) -> int:
        """First index of `stop` in `buffer` whose match ends past `start` characters."""
        return buffer.find(stop, max(0, start - len(stop) + 1))

    def flush(self) -> str:
        out, self._held, self._unchecked = self._held, "", 0
        return out

    def _longest_stop_prefix_suffix(self, buffer: str) -> int:
        """Length of the longest suffix of `buffer` that is a proper prefix of a stop string."""
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(buffer)), best, -1):
                if buffer.endswith(stop[:n]):
                    best = n
                    break
        return best
