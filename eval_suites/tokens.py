"""Counting tokens the way the server will: its /tokenize, a local tokenizer file, or an estimate.

Suites need token counts to fit prompts into the server's context window (see `fit.py`) and
token ids to cut perplexity windows. In order of preference:
  1. a local tokenizer file given with `--tokenizer` (an Atlas tokenizer.json or a Hugging
     Face one): the user said which tokenizer the server uses, so no request is sent;
  2. the server's vLLM-style `POST /tokenize` (Atlas, vLLM): exact, and for chat messages
     it includes the server's chat template; answers go through the response cache;
  3. when neither exists (a 404 from /tokenize): an estimate that never counts too few for
     a byte-level BPE (GPT-2, Llama 3, Atlas) or a SentencePiece with byte fallback:
     UTF-8 bytes + 2 (a token is at least one byte; + 2 for begin/end-of-sequence tokens
     a tokenizer may add), and for chat messages 8 more tokens per message and 8 for the
     reply's header (common chat templates add 4-6; one with a long default system prompt
     adds more). It counts about 3-4x too many for English, so prompts get trimmed more
     than they need; the server's own 400 stays the last check (`fit.py`).
A plain prompt whose estimate already fits is never sent to /tokenize (`fit.py`).
What it does not do: decide what to trim (suites do) or guess a tokenizer by model name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .client import OpenAIClient
from .errors import CapabilityError, ServerRequestError, SuiteConfigError

__all__ = ["ESTIMATE", "LocalTokenizer", "TokenCounter", "estimate_tokens"]

ESTIMATE = "estimate: UTF-8 bytes + 2 (+ 8 per chat message)"
CHAT_TOKENS_PER_MESSAGE = 8


class LocalTokenizer:
    """Token ids from a tokenizer file: an Atlas tokenizer.json or a Hugging Face one."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._load(path)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SuiteConfigError(
                f"--tokenizer {path}: not a readable Atlas or Hugging Face tokenizer file ({e})"
            ) from None

    def _load(self, path: Path) -> None:
        from atlas_server.checkpoint import text_adds_of

        raw = json.loads(path.read_text(encoding="utf-8"))
        # What the model expects around every text (an imported Llama 3's BOS), from the
        # HF post-processor or the checkpoint's record beside an Atlas file.
        before, after = text_adds_of(path)
        # lm-eval puts the BOS, if the tokenizer has one, before a document it scores.
        self.bos_id = before[0] if before else None
        if "model" in raw and "pre_tokenizer" in raw:  # the Hugging Face tokenizers format
            from tokenizers import Tokenizer as HFTokenizer

            hf = HFTokenizer.from_file(str(path))
            self.encode = lambda text: hf.encode(text, add_special_tokens=False).ids
            # What a server sends to its model for a completion prompt (BOS included).
            self.count = lambda text: len(hf.encode(text, add_special_tokens=True).ids)
            self.eot_id = hf.token_to_id("<|endoftext|>")
        else:
            from atlas_server.tokenizer import Tokenizer

            tok = Tokenizer.from_file(path)
            added = len(before) + len(after)  # what an Atlas server adds to a text prompt
            self.encode = tok.encode_ordinary
            self.count = lambda text: len(tok.encode(text)) + added
            self.eot_id = tok.eot_id


def estimate_tokens(prompt: str | list[dict[str, Any]]) -> int:
    """An upper bound for byte-level BPE tokenizers (see the module docstring)."""
    if isinstance(prompt, str):
        return len(prompt.encode("utf-8")) + 2
    content = sum(len(str(m.get("content") or "").encode("utf-8")) for m in prompt)
    return content + CHAT_TOKENS_PER_MESSAGE * (len(prompt) + 1) + 2


class TokenCounter:
    """Prompt (or chat messages) -> tokens, by the best method available (module docstring).

    A /tokenize that is missing, refuses a kind of input (chat messages without a template)
    or answers something unusable (no integer ids, none for a non-empty prompt, a 5xx) is
    not asked again for that kind: those prompts are estimated, and `method` says why.
    """

    def __init__(self, client: OpenAIClient | None, local: LocalTokenizer | None = None) -> None:
        self.client = client
        self.local = local
        # kind ("prompt" | "messages") -> why the server is not used for it
        self.estimated: dict[str, str] = {}
        if client is None and local is None:
            self.estimated = {"prompt": "no server", "messages": "no server"}

    @property
    def method(self) -> str:
        """How prompts were counted, for results.json."""
        if self.local is not None:
            prompts = f"local tokenizer {self.local.path}"
        else:
            prompts = self._describe("prompt")
        messages = self._describe("messages")
        return prompts if messages == prompts else f"{prompts}; chat messages: {messages}"

    def _describe(self, kind: str) -> str:
        reason = self.estimated.get(kind)
        return "server /tokenize" if reason is None else f"{ESTIMATE} ({reason})"

    async def count(self, prompt: str | list[dict[str, Any]]) -> int:
        if isinstance(prompt, str):
            if self.local is not None:
                return self.local.count(prompt)
            body: dict[str, Any] = {"prompt": prompt, "add_special_tokens": True}
            kind = "prompt"
        else:
            body = {"messages": prompt, "add_generation_prompt": True}
            kind = "messages"
        if kind not in self.estimated:
            try:
                return await self._server_count(body, empty=prompt == "")
            except CapabilityError:
                self.estimated = {"prompt": "no /tokenize", "messages": "no /tokenize"}
            except ServerRequestError as e:
                self.estimated[kind] = f"/tokenize could not count {kind}: {str(e)[:120]}"
        return estimate_tokens(prompt)

    async def _server_count(self, body: dict[str, Any], empty: bool) -> int:
        assert self.client is not None
        answer = await self.client.tokenize_request(body)
        count = answer.get("count")
        count = int(count) if isinstance(count, int) else len(answer["tokens"])
        if count == 0 and not empty:
            raise ServerRequestError("it answered 0 tokens for a non-empty prompt")
        return count
