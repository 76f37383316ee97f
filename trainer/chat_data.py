"""Chat and preference data for post-training: read, check, render to token ids, pack.

What it does:
  - reads chat records in OpenAI's fine-tuning shape
    `{"messages": [{"role": "system"|"user"|"assistant", "content": "...", "weight": 0|1}]}`
    (`weight`, on assistant messages only, 0 = context, not trained on) and preference
    records `{"prompt": "..." | [messages], "chosen": ..., "rejected": ...}` (or `messages`
    instead of `prompt`; `chosen`/`rejected` are strings, assistant messages, or a list of one
    assistant message, as TRL's conversational format has them) from .jsonl / .parquet files,
    folders, globs, or `hf:NAME[:CONFIG][:SPLIT]` (a Hub name or a local dataset folder,
    through `trainer.data.iter_hf_records`);
  - checks every record: a bad one is reported as `file:line: what is wrong`; all bad
    records of a read are collected into one error (the first few shown, the rest counted),
    so nothing is dropped silently and one run shows every problem;
  - renders a conversation to token ids and an assistant-token mask through a
    `ChatRenderer` (any callable messages -> (ids, mask)). `TemplateRenderer` renders through
    the server's own chat template (ChatML or the checkpoint's chat_template.jinja), so the
    ids are exactly what `/v1/chat/completions` feeds the model for the same messages; the
    mask marks what the model produces at serving time: each assistant message's content
    and its end-of-turn token;
  - packs tokenized conversations into rows of `seq_len` next-token pairs with per-token
    document ids (attention never crosses conversations: see
    atlas_server.model.attention.document_causal_mask) and positions restarting at 0 per
    conversation, as serving sees each one. A conversation longer than a row is skipped
    and counted (`PackStats`, plus a warning naming the first ones), never truncated.
What it does not do: render templates itself (atlas_server/chat_template.py does), shuffling
or batching across steps (the training loop).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from atlas_server.chat_template import ChatTemplate, ChatTemplateError, load_chat_template
from atlas_server.tokenizer import Tokenizer

from .data import DataError, iter_hf_records, resolve_sources

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
DATA_SUFFIXES = (".jsonl", ".parquet")
IGNORE = -100  # label of a position the loss skips (F.cross_entropy's ignore_index)
SHOWN_PROBLEMS = 5

Message = dict[str, str]  # {"role": ..., "content": ...}


class ChatDataError(DataError):
    """Chat or preference data that cannot be used; the message names file, line and problem."""


class RecordError(ValueError):
    """One bad record (internal: collected into a ChatDataError with its origin)."""


@dataclass(frozen=True)
class Conversation:
    messages: tuple[Message, ...]
    trained: tuple[bool, ...]  # per message: an assistant message the loss learns from
    origin: str  # "path:line" or "hf:NAME row N": where the record came from


@dataclass(frozen=True)
class PreferencePair:
    prompt: tuple[Message, ...]  # the conversation before the response
    chosen: str
    rejected: str
    origin: str

    def conversation(self, response: str) -> list[Message]:
        return [*self.prompt, {"role": "assistant", "content": response}]


# --- sources and records ------------------------------------------------------------------
def chat_sources(paths: Sequence[str]) -> list[str]:
    """Data files under folders / globs (sorted), and `hf:` sources as given."""
    out: list[str] = []
    for item in paths:
        path = Path(item)
        if item.startswith("hf:"):
            out.append(item)
        elif path.is_dir():
            found = sorted(
                str(f) for f in path.rglob("*") if f.is_file() and f.suffix in DATA_SUFFIXES
            )
            if not found:
                raise ChatDataError(f"{item} holds no .jsonl or .parquet files")
            out += found
        else:
            for f in resolve_sources([item]):
                if Path(f).suffix not in DATA_SUFFIXES:
                    raise ChatDataError(f"{f}: chat and preference data are .jsonl or .parquet")
                out.append(f)
    if not out:
        raise ChatDataError("no data sources given")
    return out


def iter_records(source: str) -> Iterator[tuple[str, Any]]:
    """(origin, record) for every record of one source; a line that is not JSON comes back
    as a RecordError in place of the record."""
    if source.startswith("hf:"):
        for n, record in enumerate(iter_hf_records(source), 1):
            yield f"{source} row {n}", record
    elif source.endswith(".parquet"):
        yield from _parquet_records(source)
    else:
        with open(source, "rb") as f:
            for n, raw in enumerate(f, 1):
                if not raw.strip():
                    continue  # a blank line is not a record
                try:
                    yield f"{source}:{n}", json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError:
                    yield f"{source}:{n}", RecordError("not valid UTF-8")
                except json.JSONDecodeError as e:
                    yield f"{source}:{n}", RecordError(f"not valid JSON ({e.msg})")


def _parquet_records(source: str) -> Iterator[tuple[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = 0
    try:  # pyarrow's own errors name no file: "Parquet magic bytes not found in footer..."
        for batch in pq.ParquetFile(source).iter_batches():
            for record in batch.to_pylist():
                n += 1
                yield f"{source} row {n}", record
    except (pa.ArrowException, OSError) as e:
        raise ChatDataError(f"{source} is not a readable parquet file: {e}") from None


def read_records(sources: Sequence[str], parse: Callable[[Any, str], Any]) -> list:
    """Parse every record of `sources`; raise one ChatDataError listing the bad ones."""
    items: list = []
    problems: list[str] = []
    files = chat_sources(sources)
    for source in files:
        for origin, record in iter_records(source):
            try:
                if isinstance(record, RecordError):
                    raise record
                items.append(parse(record, origin))
            except RecordError as e:
                problems.append(f"{origin}: {e}")
    if problems:
        shown = "; ".join(problems[:SHOWN_PROBLEMS])
        more = len(problems) - SHOWN_PROBLEMS
        raise ChatDataError(
            f"{len(problems)} bad record(s): {shown}" + (f" (and {more} more)" if more > 0 else "")
        )
    if not items:
        raise ChatDataError(f"no records in {', '.join(files)}")
    return items


def read_conversations(sources: Sequence[str]) -> list[Conversation]:
    return read_records(sources, parse_conversation)


def read_preferences(sources: Sequence[str]) -> list[PreferencePair]:
    return read_records(sources, parse_preference)


# --- record checks ------------------------------------------------------------------------
def _text(content: Any, where: str) -> str:
    """A message's text: a string, or a list of {"type": "text", "text": ...} parts (joined,
    as the chat endpoint joins them)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, Mapping) and p.get("type") == "text" and isinstance(p.get("text"), str)
        for p in content
    ):
        return "".join(p["text"] for p in content)
    raise RecordError(f"{where}.content must be a string or a list of text parts")


def parse_message(raw: Any, where: str, allow_weight: bool = False) -> tuple[Message, bool]:
    """(message, trained) from one raw message; `trained` is True for an assistant message
    whose weight is 1 (the default)."""
    if not isinstance(raw, Mapping):
        raise RecordError(f"{where} must be an object with role and content")
    allowed = {"role", "content", "weight"} if allow_weight else {"role", "content"}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise RecordError(f"{where} has unsupported key(s) {unknown}; allowed: {sorted(allowed)}")
    role = raw.get("role")
    if role not in ROLES:
        raise RecordError(f"{where}.role is {role!r}; use one of {list(ROLES)}")
    if "content" not in raw:
        raise RecordError(f"{where} has no content")
    message = {"role": role, "content": _text(raw["content"], where)}
    weight = raw.get("weight", 1)
    if "weight" in raw and (
        role != "assistant" or weight not in (0, 1) or isinstance(weight, float)
    ):
        raise RecordError(f"{where}.weight must be 0 or 1, and only on assistant messages")
    return message, role == "assistant" and weight == 1


def _messages(raw: Any, key: str, allow_weight: bool) -> list[tuple[Message, bool]]:
    if not isinstance(raw, list) or not raw:
        raise RecordError(f"{key} must be a non-empty list of messages")
    return [parse_message(m, f"{key}[{i}]", allow_weight) for i, m in enumerate(raw)]


def parse_conversation(record: Any, origin: str) -> Conversation:
    if not isinstance(record, Mapping) or "messages" not in record:
        raise RecordError('expected an object with "messages"')
    parsed = _messages(record["messages"], "messages", allow_weight=True)
    if not any(trained for _, trained in parsed):
        raise RecordError("no assistant message with weight 1: nothing to learn from")
    return Conversation(
        tuple(m for m, _ in parsed), tuple(trained for _, trained in parsed), origin
    )


def _response(raw: Any, key: str) -> str:
    """chosen / rejected: a string, an assistant message, or a list of one."""
    if isinstance(raw, str):
        return raw
    if isinstance(raw, list):
        if len(raw) != 1:
            raise RecordError(f"{key} must hold exactly one assistant message, got {len(raw)}")
        raw = raw[0]
    message, _ = parse_message(raw, key)
    if message["role"] != "assistant":
        raise RecordError(f"{key} must be an assistant message, got role {message['role']!r}")
    return message["content"]


def parse_preference(record: Any, origin: str) -> PreferencePair:
    if not isinstance(record, Mapping):
        raise RecordError("expected an object with prompt (or messages), chosen and rejected")
    if ("prompt" in record) == ("messages" in record):
        raise RecordError('give exactly one of "prompt" and "messages"')
    for key in ("chosen", "rejected"):
        if key not in record:
            raise RecordError(f'missing "{key}"')
    key = "prompt" if "prompt" in record else "messages"
    raw = record[key]
    if isinstance(raw, str):
        if not raw:
            raise RecordError("prompt is empty")
        prompt: tuple[Message, ...] = ({"role": "user", "content": raw},)
    else:
        prompt = tuple(m for m, _ in _messages(raw, key, allow_weight=False))
    chosen, rejected = (
        _response(record["chosen"], "chosen"),
        _response(record["rejected"], "rejected"),
    )
    if chosen == rejected:
        raise RecordError("chosen and rejected are the same text: the pair prefers nothing")
    return PreferencePair(prompt, chosen, rejected, origin)


# --- rendering ------------------------------------------------------------------------------
class ChatRenderer(Protocol):
    """messages -> (token ids, assistant mask): mask[i] is True for a token the model
    produces as the assistant (what a loss on "assistant tokens only" trains on)."""

    def __call__(self, messages: Sequence[Message]) -> tuple[list[int], list[bool]]: ...


class TemplateRenderer:
    """A conversation's ids and assistant mask through the server's chat template
    (atlas_server/chat_template.py), so the ids trained on are the ids served."""

    def __init__(self, template: ChatTemplate) -> None:
        self.template = template
        self.tokenizer = template.tokenizer

    @classmethod
    def for_checkpoint(cls, directory: str | Path | None, tokenizer: Tokenizer) -> TemplateRenderer:
        """The checkpoint's own chat_template.jinja, else ChatML (what `atlas serve` uses)."""
        try:
            return cls(load_chat_template(directory, tokenizer))
        except ChatTemplateError as e:
            raise ChatDataError(str(e)) from None

    def __call__(self, messages: Sequence[Message]) -> tuple[list[int], list[bool]]:
        try:
            example = self.template.training_example(messages)
        except ChatTemplateError as e:
            raise RecordError(str(e)) from None
        return example.ids, example.assistant_mask


def ChatMLRenderer(tokenizer: Tokenizer) -> TemplateRenderer:  # noqa: N802 (a renderer factory)
    """ChatML, the chat template of a checkpoint without its own."""
    return TemplateRenderer.for_checkpoint(None, tokenizer)


# --- tokenized examples ----------------------------------------------------------------------
@dataclass(frozen=True)
class TokenizedChat:
    ids: np.ndarray  # [n] int64
    mask: np.ndarray  # [n] bool: the tokens the loss trains on
    origin: str


@dataclass(frozen=True)
class TokenizedPair:
    chosen_ids: np.ndarray  # [n] int64
    chosen_mask: np.ndarray  # [n] bool: the response (final assistant message) only
    rejected_ids: np.ndarray
    rejected_mask: np.ndarray
    origin: str


def mask_runs(mask: Sequence[bool]) -> list[tuple[int, int]]:
    """[start, stop) of each run of True in `mask`."""
    runs, start = [], None
    for i, flag in enumerate(mask):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            runs.append((start, i))
            start = None
    if start is not None:
        runs.append((start, len(mask)))
    return runs


def _assistant_spans(renderer: ChatRenderer, messages: Sequence[Message], origin: str):
    try:
        ids, mask = renderer(messages)
    except RecordError as e:
        raise ChatDataError(f"{origin}: {e}") from None
    if len(ids) != len(mask):
        raise ChatDataError(
            f"{origin}: the renderer gave {len(ids)} ids but {len(mask)} mask flags"
        )
    runs = mask_runs(mask)
    expected = sum(m["role"] == "assistant" for m in messages)
    if len(runs) != expected:
        raise ChatDataError(
            f"{origin}: the renderer marked {len(runs)} assistant spans for {expected}"
            " assistant messages; cannot tell which tokens answer which message"
        )
    return np.asarray(ids, dtype=np.int64), runs


def tokenize_conversation(conversation: Conversation, renderer: ChatRenderer) -> TokenizedChat:
    ids, runs = _assistant_spans(renderer, conversation.messages, conversation.origin)
    mask = np.zeros(len(ids), dtype=bool)
    trained = [
        t
        for m, t in zip(conversation.messages, conversation.trained, strict=True)
        if m["role"] == "assistant"
    ]
    for (start, stop), keep in zip(runs, trained, strict=True):
        mask[start:stop] = keep
    return TokenizedChat(ids, mask, conversation.origin)


def tokenize_pair(pair: PreferencePair, renderer: ChatRenderer) -> TokenizedPair:
    def response_only(text: str) -> tuple[np.ndarray, np.ndarray]:
        ids, runs = _assistant_spans(renderer, pair.conversation(text), pair.origin)
        mask = np.zeros(len(ids), dtype=bool)
        start, stop = runs[-1]  # the final assistant message is the response
        mask[start:stop] = True
        return ids, mask

    chosen_ids, chosen_mask = response_only(pair.chosen)
    rejected_ids, rejected_mask = response_only(pair.rejected)
    return TokenizedPair(chosen_ids, chosen_mask, rejected_ids, rejected_mask, pair.origin)


# --- packing -----------------------------------------------------------------------------------
@dataclass
class PackedRows:
    """Rows of `seq_len` next-token pairs; several conversations per row."""

    inputs: np.ndarray  # [N, L] int64 token ids fed to the model
    labels: np.ndarray  # [N, L] int64 the id that should follow; IGNORE where not trained
    positions: np.ndarray  # [N, L] int64, restarting at 0 for each conversation
    doc_ids: np.ndarray  # [N, L] int64: 1, 2, ... per conversation in a row; 0 = padding
    examples: list[list[int]]  # indices (into the packed list) of each row's conversations


@dataclass
class PackStats:
    examples: int  # conversations offered
    rows: int
    seq_len: int
    tokens: int  # positions holding conversation tokens (the rest is padding)
    trained_tokens: int  # positions whose label is trained on
    skipped_too_long: int = 0
    skipped: list[str] = field(default_factory=list)  # "origin (N tokens)" of the first few

    @property
    def fill(self) -> float:
        """Share of row positions holding real tokens."""
        return self.tokens / max(1, self.rows * self.seq_len)


def pack_conversations(
    examples: Sequence[TokenizedChat], seq_len: int, pad_id: int
) -> tuple[PackedRows, PackStats]:
    """First-fit packing in the given order: each conversation goes into the first row with
    room for it, else a new row. A conversation of n tokens takes n - 1 positions (inputs
    ids[:-1], labels ids[1:]), so no label ever crosses into the next conversation."""
    if seq_len < 1:
        raise ChatDataError(f"seq_len must be >= 1, got {seq_len}")
    rows: list[list[int]] = []
    room: list[int] = []
    stats = PackStats(len(examples), 0, seq_len, 0, 0)
    for index, example in enumerate(examples):
        need = len(example.ids) - 1
        if need > seq_len:
            stats.skipped_too_long += 1
            if len(stats.skipped) < SHOWN_PROBLEMS:
                stats.skipped.append(f"{example.origin} ({len(example.ids)} tokens)")
            continue
        if need < 1:
            raise ChatDataError(
                f"{example.origin}: a conversation of one token has nothing to predict"
            )
        row = next((r for r, free in enumerate(room) if free >= need), None)
        if row is None:
            rows.append([])
            room.append(seq_len)
            row = len(rows) - 1
        rows[row].append(index)
        room[row] -= need
    if stats.skipped_too_long:
        log.warning(
            "skipped %d of %d conversations longer than seq_len + 1 = %d tokens, e.g. %s",
            stats.skipped_too_long,
            len(examples),
            seq_len + 1,
            ", ".join(stats.skipped),
        )
    n = len(rows)
    packed = PackedRows(
        inputs=np.full((n, seq_len), pad_id, dtype=np.int64),
        labels=np.full((n, seq_len), IGNORE, dtype=np.int64),
        positions=np.zeros((n, seq_len), dtype=np.int64),
        doc_ids=np.zeros((n, seq_len), dtype=np.int64),
        examples=rows,
    )
    for r, members in enumerate(rows):
        at = 0
        for doc, index in enumerate(members, 1):
            ex = examples[index]
            k = len(ex.ids) - 1
            packed.inputs[r, at : at + k] = ex.ids[:-1]
            packed.labels[r, at : at + k] = np.where(ex.mask[1:], ex.ids[1:], IGNORE)
            packed.positions[r, at : at + k] = np.arange(k)
            packed.doc_ids[r, at : at + k] = doc
            at += k
        # Padding: its own document, positions 0.. so no row is left without a valid key.
        packed.positions[r, at:] = np.arange(seq_len - at)
        stats.tokens += at
    stats.rows = n
    stats.trained_tokens = int((packed.labels != IGNORE).sum())
    return packed, stats
