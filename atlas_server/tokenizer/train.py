"""Learn a byte-level BPE tokenizer from text files on disk.

What it does, in two phases:

1. Count pre-tokens. Files are streamed chunk by chunk (see `corpus.py`), split with the
   regex pattern, and the distinct pre-tokens are counted; this table is the only thing
   that grows with the corpus.
2. Merge. Every distinct pre-token becomes a word of byte ids 0..255 weighted by its
   count. The pair counts over all words are computed once; a max-heap holds the pairs,
   and an index maps each pair to the words that contain it. Each merge rewrites only
   the words holding the chosen pair and adjusts the counts of the pairs in those words;
   nothing is recounted from scratch.

Tie-break (this is what makes training deterministic): the pair with the highest count
wins; among equal counts, the pair whose (left bytes, right bytes) is lexicographically
smallest. The rule depends only on the corpus content, never on file order, hash seeds
or dict order, so the same corpus and settings give a byte-identical atlas_tokenizer.json.

Ids: 0..255 are the bytes, merge i makes id 256 + i, and the special tokens follow the
last merge. `vocab_size` counts all three. Training stops early if no pair occurs at
least `min_frequency` times; the tokenizer is then smaller than asked.

Counting can run in several processes (`workers`); merging runs in one. What it does
not do: normalise text (no NFC, no lowercasing), spread merging over processes, or learn
Unigram/WordPiece models.
"""

from __future__ import annotations

import heapq
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import regex
from tqdm.auto import tqdm

from .bpe import (
    DEFAULT_SPECIAL_TOKENS,
    GPT4_SPLIT_PATTERN,
    Tokenizer,
    TokenizerError,
    replace_lone_surrogates,
)
from .corpus import CorpusFile, iter_chunks, resolve_corpus_files

__all__ = [
    "TrainConfig",
    "TrainStats",
    "count_pretokens",
    "learn_merges",
    "train_from_counts",
    "train_from_files",
    "train_from_texts",
]

Pair = tuple[int, int]
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one training run; together with the corpus they fix the result."""

    vocab_size: int
    special_tokens: tuple[str, ...] = DEFAULT_SPECIAL_TOKENS
    pattern: str = GPT4_SPLIT_PATTERN
    min_frequency: int = 2
    jsonl_field: str = "text"
    name: str = "atlas"

    @property
    def num_merges(self) -> int:
        return self.vocab_size - 256 - len(self.special_tokens)

    def validate(self) -> None:
        """Raise TokenizerError naming the first setting that cannot work."""
        minimum = 256 + len(self.special_tokens)
        if self.vocab_size < minimum:
            raise TokenizerError(
                f"vocab size {self.vocab_size} is too small: 256 byte tokens + "
                f"{len(self.special_tokens)} special tokens need at least {minimum}"
            )
        if len(set(self.special_tokens)) != len(self.special_tokens):
            raise TokenizerError(f"special tokens repeat: {list(self.special_tokens)}")
        if any(not s for s in self.special_tokens):
            raise TokenizerError("a special token cannot be the empty string")
        if self.min_frequency < 1:
            raise TokenizerError(f"min frequency must be at least 1, got {self.min_frequency}")
        try:
            split = regex.compile(self.pattern).findall
        except regex.error as e:
            raise TokenizerError(f"invalid split pattern: {e}") from None
        # decode(encode(s)) == s needs the pieces to cover every character: text the pattern
        # skips would be dropped silently ("a" on "banana split" encodes to "aaa").
        pieces = "".join(split(PATTERN_PROBE))
        if pieces != PATTERN_PROBE:
            raise TokenizerError(
                f"the split pattern must match every character; on {PATTERN_PROBE!r} "
                f"its pieces join to {pieces!r}"
            )


# Letters, digits, punctuation, runs of spaces and newlines, tabs, accents, CJK, an emoji.
PATTERN_PROBE = "Hello, world! It's 2024:  x=y+1;\n\n\tcafé ñ 你好 🙂 (ok)?"


@dataclass
class TrainStats:
    """What a training run saw and produced, for the CLI summary and benchmarks."""

    files: int = 0
    bytes_read: int = 0
    pretokens: int = 0
    distinct_pretokens: int = 0
    merges: int = 0
    tokens_after_merges: int = 0  # the training pre-tokens encoded with the learned merges
    skipped_duplicate_pairs: int = 0
    stopped_early: bool = False
    seconds_counting: float = 0.0
    seconds_merging: float = 0.0
    pretoken_bytes: int = 0

    @property
    def bytes_per_token(self) -> float:
        """Compression on the training text: UTF-8 bytes per token after merging."""
        return self.pretoken_bytes / self.tokens_after_merges if self.tokens_after_merges else 0.0


# --- phase 1: count pre-tokens --------------------------------------------------------


def count_pretokens(
    texts: Iterable[str], pattern: str = GPT4_SPLIT_PATTERN, counts: Counter | None = None
) -> Counter:
    """Add the pre-token counts of `texts` to `counts` (a Counter of str) and return it.

    Each text is split on its own: pre-tokens never join two texts. Lone surrogates are
    replaced first, exactly as `Tokenizer.encode` does, so training sees what encoding will.
    """
    split = regex.compile(pattern).findall
    counts = Counter() if counts is None else counts
    for text in texts:
        if _SURROGATE.search(text):
            text = replace_lone_surrogates(text)
        counts.update(split(text))  # Counter.update over a list runs in C
    return counts


def _count_files(
    files: Sequence[CorpusFile],
    config: TrainConfig,
    stats: TrainStats,
    progress: bool,
    workers: int = 1,
) -> Counter:
    """Count the pre-tokens of all files, in this process or in `workers` processes.

    Counts are sums, so the result does not depend on how files are shared out.
    """
    counts: Counter = Counter()
    total = sum(f.size for f in files)
    with tqdm(total=total, unit="B", unit_scale=True, desc="reading", disable=not progress) as bar:
        for batch_counts, batch in _counted_batches(files, config, workers):
            counts.update(batch_counts)
            batch_bytes = sum(f.size for f in batch)
            stats.files += len(batch)
            stats.bytes_read += batch_bytes
            bar.set_postfix(files=f"{stats.files}/{len(files)}", refresh=False)
            bar.update(batch_bytes)
    return counts


def _counted_batches(
    files: Sequence[CorpusFile], config: TrainConfig, workers: int
) -> Iterator[tuple[Counter, list[CorpusFile]]]:
    if workers <= 1:
        for file in files:
            yield _count_batch([file.path], config.pattern, config.jsonl_field), [file]
        return
    from concurrent.futures import ProcessPoolExecutor, as_completed

    batches = _batches_by_size(files, WORKER_BATCH_BYTES)
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = {
            pool.submit(_count_batch, [f.path for f in b], config.pattern, config.jsonl_field): b
            for b in batches
        }
        for future in as_completed(futures):
            yield future.result(), futures[future]


# Files are sent to worker processes in batches of about this many bytes.
WORKER_BATCH_BYTES = 4 << 20


def _batches_by_size(files: Sequence[CorpusFile], limit: int) -> list[list[CorpusFile]]:
    batches: list[list[CorpusFile]] = [[]]
    size = 0
    for file in files:
        if batches[-1] and size + file.size > limit:
            batches.append([])
            size = 0
        batches[-1].append(file)
        size += file.size
    return batches


def _count_batch(paths: list[Path], pattern: str, jsonl_field: str) -> Counter:
    """Pre-token counts of some files (a top-level function, so worker processes can run it)."""
    counts: Counter = Counter()
    for path in paths:
        count_pretokens(iter_chunks(path, jsonl_field), pattern, counts)
    return counts


# --- phase 2: merges ----------------------------------------------------------------


class _MergeState:
    """Words, their counts, pair counts, the pair -> words index and the pair heap."""

    def __init__(self, word_counts: dict[bytes, int]) -> None:
        # Sorting the words makes word indices, and so every iteration order, a function
        # of the corpus alone.
        ordered = sorted(word_counts.items())
        self.words: list[list[int]] = [list(w) for w, _ in ordered]
        self.counts: list[int] = [c for _, c in ordered]
        self.token_bytes: list[bytes] = [bytes([b]) for b in range(256)]
        self.known: set[bytes] = set(self.token_bytes)
        self.skipped_duplicates = 0
        self.pair_counts: dict[Pair, int] = {}
        # pair -> indices of words that held it when it was last added. Lists, not sets
        # (a third of the memory): a word listed twice, or no longer holding the pair, is
        # found out by _merge_word and skipped.
        self.where: dict[Pair, list[int]] = {}
        self._count_all_pairs()
        self.heap: list[tuple[int, bytes, bytes, Pair]] = [
            self._heap_entry(p, c) for p, c in self.pair_counts.items() if c > 0
        ]
        heapq.heapify(self.heap)

    def _count_all_pairs(self) -> None:
        pair_counts, where = self.pair_counts, self.where
        for index, (word, count) in enumerate(zip(self.words, self.counts, strict=True)):
            for pair in pairwise(word):
                pair_counts[pair] = pair_counts.get(pair, 0) + count
                holders = where.get(pair)
                if holders is None:
                    where[pair] = [index]
                elif holders[-1] != index:
                    holders.append(index)

    def _heap_entry(self, pair: Pair, count: int) -> tuple[int, bytes, bytes, Pair]:
        # heapq is a min-heap: negate the count; equal counts fall back to the bytes.
        return (-count, self.token_bytes[pair[0]], self.token_bytes[pair[1]], pair)

    def best_pair(self, min_frequency: int) -> Pair | None:
        """Pop the winning pair, skipping stale heap entries (lazy invalidation)."""
        heap, pair_counts = self.heap, self.pair_counts
        while heap:
            neg_count, _, _, pair = heap[0]
            current = pair_counts.get(pair, 0)
            if current == -neg_count:
                if current < min_frequency:
                    return None
                heapq.heappop(heap)
                if self.token_bytes[pair[0]] + self.token_bytes[pair[1]] in self.known:
                    # Another merge already made these bytes (e.g. "a"+"bc" after "ab"+"c").
                    # A second id for the same bytes would make rank-based encoding
                    # ambiguous, so this pair is never merged.
                    self.skipped_duplicates += 1
                    continue
                return pair
            # Counts of existing pairs only ever fall, so a stale entry sits too high:
            # replace it with its current count (or drop it if the pair is gone).
            if current > 0:
                heapq.heapreplace(heap, self._heap_entry(pair, current))
            else:
                heapq.heappop(heap)
        return None

    def merge(self, pair: Pair) -> int:
        """Apply one merge to every word holding `pair`; returns the new token id."""
        new_id = len(self.token_bytes)
        left, right = pair
        self.token_bytes.append(self.token_bytes[left] + self.token_bytes[right])
        self.known.add(self.token_bytes[-1])
        pair_counts, where, words, counts = self.pair_counts, self.where, self.words, self.counts
        new_pair_counts: dict[Pair, int] = {}
        for index in where.pop(pair):
            word = words[index]
            merged = _merge_word(word, left, right, new_id)
            if merged is None:  # stale or repeated entry: the pair is not (or no longer) here
                continue
            count = counts[index]
            for old in pairwise(word):
                pair_counts[old] -= count
            for new in pairwise(merged):
                if new_id in new:
                    new_pair_counts[new] = new_pair_counts.get(new, 0) + count
                    holders = where.get(new)
                    if holders is None:
                        where[new] = [index]
                    elif holders[-1] != index:
                        holders.append(index)
                else:  # a pair the word already had: undo its subtraction above
                    pair_counts[new] += count
            words[index] = merged
        del pair_counts[pair]
        # Pairs that hold the new token did not exist before: enter them with their
        # final counts. Pairs that lost occurrences are fixed lazily in best_pair.
        for new, count in new_pair_counts.items():
            pair_counts[new] = count
            heapq.heappush(self.heap, self._heap_entry(new, count))
        return new_id


def _merge_word(word: list[int], left: int, right: int, new_id: int) -> list[int] | None:
    """Replace non-overlapping (left, right) pairs, scanning left to right; None if absent."""
    merged: list[int] = []
    i, n, found = 0, len(word), False
    while i < n:
        if i + 1 < n and word[i] == left and word[i + 1] == right:
            merged.append(new_id)
            i += 2
            found = True
        else:
            merged.append(word[i])
            i += 1
    return merged if found else None


def learn_merges(
    word_counts: dict[bytes, int],
    num_merges: int,
    min_frequency: int = 2,
    progress: bool = False,
    on_merge: Callable[[int, Pair, int], None] | None = None,
    stats: TrainStats | None = None,
) -> tuple[list[Pair], list[bytes]]:
    """Learn up to `num_merges` merges from weighted byte strings.

    Returns the merges (pairs of ids, in order) and the bytes of every token id.
    `on_merge(step, pair, count)` is called after each merge; `stats`, if given, gets
    the merge count and the compression reached.
    """
    state = _MergeState(word_counts)
    merges: list[Pair] = []
    for step in tqdm(range(num_merges), desc="merging", unit="merge", disable=not progress):
        pair = state.best_pair(min_frequency)
        if pair is None:
            break
        count = state.pair_counts[pair]
        state.merge(pair)
        merges.append(pair)
        if on_merge is not None:
            on_merge(step, pair, count)
    if stats is not None:
        stats.merges = len(merges)
        stats.stopped_early = len(merges) < num_merges
        stats.skipped_duplicate_pairs = state.skipped_duplicates
        stats.pretoken_bytes = sum(len(w) * c for w, c in word_counts.items())
        stats.tokens_after_merges = sum(map(_weighted_len, state.words, state.counts))
    return merges, state.token_bytes


def _weighted_len(word: list[int], count: int) -> int:
    return len(word) * count


# --- the whole run -------------------------------------------------------------------


def _build_tokenizer(
    merges: list[Pair], token_bytes: list[bytes], config: TrainConfig
) -> Tokenizer:
    ranks = {b: i for i, b in enumerate(token_bytes)}
    if len(ranks) != len(token_bytes):
        # Two merges produced the same bytes; rank-based encoding could not tell them apart.
        raise TokenizerError("training produced duplicate tokens; this is a bug in Atlas")
    first_special = len(token_bytes)
    specials = {s: first_special + i for i, s in enumerate(config.special_tokens)}
    return Tokenizer(ranks, specials, config.pattern, merges, config.name)


def train_from_counts(
    counts: Counter, config: TrainConfig, stats: TrainStats | None = None, progress: bool = False
) -> Tokenizer:
    """Learn merges from a Counter of pre-token strings and build the tokenizer."""
    stats = stats if stats is not None else TrainStats()
    word_counts: dict[bytes, int] = {}
    for text, count in counts.items():
        try:
            raw = text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates: learn what encode() will see
            raw = replace_lone_surrogates(text).encode("utf-8")
        # Summed, because two pieces with different surrogates can become the same bytes.
        word_counts[raw] = word_counts.get(raw, 0) + count
    stats.pretokens = sum(word_counts.values())
    stats.distinct_pretokens = len(word_counts)
    start = time.perf_counter()
    merges, token_bytes = learn_merges(
        word_counts, config.num_merges, config.min_frequency, progress=progress, stats=stats
    )
    stats.seconds_merging = time.perf_counter() - start
    return _build_tokenizer(merges, token_bytes, config)


def train_from_texts(
    texts: Iterable[str], config: TrainConfig, progress: bool = False
) -> Tokenizer:
    """Train on in-memory documents (each string is one document)."""
    config.validate()
    counts = count_pretokens(texts, config.pattern)
    if not counts:
        raise TokenizerError("the training corpus is empty")
    return train_from_counts(counts, config, progress=progress)


def train_from_files(
    paths: Sequence[str | os.PathLike],
    config: TrainConfig,
    progress: bool = True,
    stats: TrainStats | None = None,
    workers: int = 1,
) -> Tokenizer:
    """Train on files, folders or globs (see `corpus.resolve_corpus_files`).

    `workers` > 1 counts pre-tokens in that many processes (the result is identical);
    merging always runs in this process.
    """
    config.validate()
    stats = stats if stats is not None else TrainStats()
    files = resolve_corpus_files(paths)
    start = time.perf_counter()
    counts = _count_files(files, config, stats, progress, workers)
    stats.seconds_counting = time.perf_counter() - start
    if not counts:
        raise TokenizerError(f"the training corpus is empty ({len(files)} files, no text)")
    return train_from_counts(counts, config, stats, progress)
