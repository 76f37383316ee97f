"""Token shards: preparing them from raw text, and reading them as deterministic batches.

Shard file: a 32-byte header — magic `ATLASTOK`, format version (u32), bytes per token
(u32: 2 for uint16, 4 for uint32), token count (u64), 8 reserved bytes — then the tokens.
Documents are separated by `<|endoftext|>`. A folder of shards has `manifest.json`
(shards with token counts and sha256, the tokenizer's hash, the sources, the split rule,
the input files skipped as not text) and `atlas_tokenizer.json`, a copy of the tokenizer
whose hash the manifest also records: training reads that copy and refuses one that is not
the shards' (`data_tokenizer`).

Preparation streams documents from files (or a `datasets` source): a record of a .jsonl or
.parquet file is a document; a plain-text file is one document up to `WHOLE_FILE_CHARS`
characters, and a longer one (a whole corpus in one file) is read in pieces of at most
`PIECE_CHARS`, each ending at a blank line or a line end, each a document. Files that are
not UTF-8 text (a NUL byte, an invalid byte sequence) are skipped with a warning naming
each. Documents are tokenized in several processes with results kept in input order (so the
output does not depend on scheduling); each goes to the validation split when a hash of its
text falls under `val_fraction`. A split's shard is cut at exactly `shard_tokens` tokens,
inside a document if need be; when one split fills a shard, the other's tokens so far are
written too, so progress has a single resume point. Each finished shard is written
atomically and recorded in `progress.json` with that point (the next document, and how many
of its tokens are already written), so an interrupted run resumes from the last finished
shard and ends byte-identical to an uninterrupted one. Every argument is checked before
anything is written, and a preparation refused later (no training tokens, a bad record)
before it wrote a training shard is undone: the call leaves no folder and an existing
preparation as it was.

Loading: shards are memory-mapped. The training stream is cut into windows of
`seq_len + 1` tokens; each epoch visits them in a permutation seeded by (seed, epoch).
A global batch is a contiguous run of that permutation; data-parallel rank r of w takes
the r-th slice, so the union of the ranks' batches is the single-process global batch.
The position (epoch, cursor) is saved in the trainer state for exact resume.
What it does not do: tokenizer training (see atlas_server.tokenizer.train); cut a record
(of .jsonl, .parquet or hf:) into pieces: however long, it is read and tokenized whole.
"""

from __future__ import annotations

import codecs
import contextlib
import glob
import hashlib
import itertools
import json
import logging
import multiprocessing as mp
import os
import struct
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np
from tqdm import tqdm

from atlas_server.io import atomic_write_bytes, atomic_write_json
from atlas_server.progress import progress_bar
from atlas_server.tokenizer import TOKENIZER_FILE, Tokenizer
from atlas_server.tokenizer.bpe import HF_TOKENIZER_FILE

log = logging.getLogger(__name__)

MAGIC = b"ATLASTOK"
VERSION = 1
HEADER = struct.Struct("<8sIIQ8x")  # 32 bytes
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".jsonl", ".parquet")
# A plain-text file up to this size is one document, as every file once was (source files,
# articles, books). A longer one is cut into documents of at most PIECE_CHARS: reading and
# tokenizing it whole took ~37x its size in memory, and as one document it went wholly to
# training or wholly to validation. Pieces of 32-64 KiB give a 20 MB file ~400 chances at
# --val-fraction, and an <|endoftext|> every ~10k tokens costs the model little.
WHOLE_FILE_CHARS = 1 << 20
PIECE_CHARS = 1 << 16
# Characters of text per worker in one batch handed to the pool: with 256 documents per
# worker, this bounds a batch of long documents (and their token arrays) in memory.
BATCH_CHARS = 4 << 20


class DataError(ValueError):
    """Data that cannot be prepared or read; the message names the file."""


# --- shard files ----------------------------------------------------------------------
def write_shard(path: Path, tokens: np.ndarray) -> str:
    """Write tokens with the header atomically; returns the file's sha256."""
    data = HEADER.pack(MAGIC, VERSION, tokens.dtype.itemsize, len(tokens)) + tokens.tobytes()
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def read_shard(path: Path) -> np.ndarray:
    """Memory-map a shard's tokens (read-only)."""
    with open(path, "rb") as f:
        raw = f.read(HEADER.size)
    if len(raw) < HEADER.size:
        raise DataError(f"{path} is too short to be a token shard")
    magic, version, width, count = HEADER.unpack(raw)
    if magic != MAGIC:
        raise DataError(f"{path} is not an Atlas token shard (bad magic)")
    if version > VERSION:
        raise DataError(
            f"{path} has shard format version {version}; this Atlas reads up to {VERSION}"
        )
    dtype = {2: np.uint16, 4: np.uint32}.get(width)
    if dtype is None:
        raise DataError(f"{path} has an unsupported token width {width}")
    expected = HEADER.size + width * count
    if path.stat().st_size != expected:
        raise DataError(
            f"{path} is truncated: {path.stat().st_size} bytes, header promises {expected}"
        )
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER.size, shape=(count,))


# --- sources --------------------------------------------------------------------------
def resolve_sources(paths: Sequence[str]) -> list[str]:
    """Files under folders/globs, sorted; `hf:NAME[:CONFIG][:SPLIT]` passes through."""
    out: list[str] = []
    for item in paths:
        if item.startswith("hf:"):
            out.append(item)
            continue
        p = Path(item)
        if p.is_dir():
            out += sorted(str(f) for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES)
        elif p.is_file():
            out.append(str(p))
        else:
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                raise DataError(f"no such file, folder or glob match: {item}")
            out += [m for m in matches if Path(m).is_file()]
    if not out:
        raise DataError("no input files found")
    return out


def not_text(path: Path) -> str | None:
    """Why the file at `path` is not UTF-8 text, or None when it is: read in blocks, so a
    file of any size is checked in bounded memory before any of it is used."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0  # of the block's first byte in the file
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            nul = block.find(b"\0")
            if nul >= 0:  # valid UTF-8, but no text holds it: a binary file, or UTF-16
                return f"not text (a NUL byte at offset {offset + nul})"
            carried = len(decoder.getstate()[0])  # a character begun in the last block
            try:
                decoder.decode(block)
            except UnicodeDecodeError as e:
                at = offset - carried + e.start
                return f"not UTF-8 (byte 0x{e.object[e.start]:02x} at offset {at})"
            offset += len(block)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return "not UTF-8 (it ends inside a character)"
    return None


def iter_documents(source: str, text_field: str = "text") -> Iterator[str]:
    """The documents of one source: each record of a .jsonl or .parquet file or an hf:
    source; a plain-text file whole, or in pieces when it is long (`_text_pieces`). Files
    are read as UTF-8, and one that is not is a DataError: check files with `not_text`
    first to skip them instead."""
    if source.startswith("hf:"):
        yield from _hf_documents(source, text_field)
        return
    path = Path(source)
    try:
        if path.suffix == ".jsonl":
            with path.open(encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        raise DataError(f"{path}:{n} is not valid JSON") from None
                    # A record without the text is an error, not a skip: a misnamed
                    # field dropped every record, reported as "empty input".
                    if not isinstance(record, dict) or not isinstance(
                        record.get(text_field), str | None
                    ):
                        raise DataError(
                            f"{path}:{n} is not a record with a string {text_field!r} field"
                        )
                    if text_field not in record:
                        fields = ", ".join(map(repr, record)) or "none"
                        raise DataError(
                            f"{path}:{n} has no {text_field!r} field (its fields: {fields}); "
                            "name the text's field with --text-field"
                        )
                    if record[text_field]:
                        yield record[text_field]
        elif path.suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.ParquetFile(path)
            columns = table.schema_arrow.names
            if text_field not in columns:
                raise DataError(
                    f"{path} has no column {text_field!r} (its columns: "
                    f"{', '.join(map(repr, columns))}); name the text's column with --text-field"
                )
            for batch in table.iter_batches(columns=[text_field]):
                yield from (t for t in batch.column(0).to_pylist() if t)
        else:
            with path.open(encoding="utf-8") as f:
                yield from (piece for piece in _text_pieces(f) if piece.strip())
    except UnicodeDecodeError as e:  # changed since `not_text` passed it, or never checked
        raise DataError(f"{path} is not UTF-8 text ({e.reason})") from None


def _text_pieces(f: TextIO) -> Iterator[str]:
    """A text file's documents: its whole text when it has at most WHOLE_FILE_CHARS
    characters, else pieces of at most PIECE_CHARS read as they are needed."""
    text = f.read(WHOLE_FILE_CHARS + 1)
    if len(text) <= WHOLE_FILE_CHARS:
        yield text
        return
    start = 0
    while True:
        while len(text) - start > PIECE_CHARS:
            end = _piece_end(text, start)
            yield text[start:end]
            start = end
        more = f.read(WHOLE_FILE_CHARS)
        if not more:
            break
        text, start = text[start:] + more, 0
    yield text[start:]


def _piece_end(text: str, start: int) -> int:
    """Where the piece of `text` that begins at `start` ends, within PIECE_CHARS: after the
    last blank line in its second half, else after the last line end, else before the last
    space (where a BPE's pre-tokenizer splits anyway: no word is cut), else at the limit (a
    half-piece with no space at all: a blob such as base64 or minified code)."""
    low, high = start + PIECE_CHARS // 2, start + PIECE_CHARS
    for separator, keep in (("\n\n", 2), ("\n", 1), (" ", 0)):  # a space begins a word
        at = text.rfind(separator, low, high)
        if at >= 0:
            return at + keep
    return high


def iter_hf_records(source: str) -> Iterator[dict]:
    """The records of `hf:NAME[:CONFIG][:SPLIT]` (a hub name or a local dataset folder),
    streamed through `datasets.load_dataset`; the split defaults to train."""
    try:
        import datasets
    except ImportError:
        raise DataError(
            "hf: sources need the `datasets` package (pip install 'atlas-llm[datasets]')"
        ) from None
    parts = source[3:].split(":")
    name, config, split = (
        parts[0],
        (parts[1] if len(parts) > 1 else None),
        (parts[2] if len(parts) > 2 else "train"),
    )
    try:
        stream = datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as e:
        raise DataError(f"cannot open {source}: {e}") from None
    yield from stream


def _hf_documents(source: str, text_field: str) -> Iterator[str]:
    for n, record in enumerate(iter_hf_records(source), 1):
        if text_field not in record:  # as for .jsonl: a misnamed field dropped every record
            fields = ", ".join(map(repr, record)) or "none"
            raise DataError(
                f"{source} record {n} has no {text_field!r} field (its fields: {fields}); "
                "name the text's field with --text-field"
            )
        text = record[text_field]
        if text:
            yield text


def is_validation(text: str, val_fraction: float) -> bool:
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < val_fraction


# --- preparation ----------------------------------------------------------------------
_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer_path: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer.from_file(tokenizer_path)


def _encode(text: str) -> np.ndarray:
    assert _worker_tokenizer is not None
    # An array, not the list: 4 bytes a token instead of ~36 on the way back and in memory.
    return np.array(_worker_tokenizer.encode_ordinary(text), dtype=np.uint32)


def _spawn_can_start_workers() -> bool:
    """Whether "spawn" workers can start: each re-imports the main script by its path, which a
    script read from stdin or given with -c does not have (its workers die at start, and the
    pool restarts them forever)."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    return path is None or os.path.isfile(path)  # None: an interactive session, not re-run


@contextlib.contextmanager
def _encoder_pool(n_workers: int, tokenizer_path: str) -> Iterator[Callable]:
    """A function encoding a list of texts in order: by `n_workers` spawned processes, or in
    this process when there is one worker."""
    if n_workers == 1:
        _init_worker(tokenizer_path)
        yield lambda batch: [_encode(text) for text in batch]
        return
    ctx = mp.get_context("spawn")
    with ctx.Pool(n_workers, initializer=_init_worker, initargs=(tokenizer_path,)) as pool:
        yield lambda batch: pool.map(_encode, batch, chunksize=8)


@dataclass
class _Split:
    name: str
    buffer: list[np.ndarray]  # tokens not yet in a shard, in the shards' dtype
    count: int
    shards: list[dict]


def tokenizer_file(path: str | os.PathLike) -> Path:
    """The file `Tokenizer.from_file(path)` reads: `path` itself, or for a folder (a
    tokenizer's, a checkpoint's, an HF model's) its atlas_tokenizer.json, else its
    tokenizer.json. What is hashed must be what is read, whichever was given."""
    path = Path(path)
    if not path.is_dir():
        return path
    own, legacy = path / TOKENIZER_FILE, path / HF_TOKENIZER_FILE
    return legacy if legacy.is_file() and not own.is_file() else own


def document_framing(tokenizer: Tokenizer, tok_file: Path) -> tuple[list[int], list[int]]:
    """(ids before, ids after) each document in the shards.

    After: the end-of-text token, <|endoftext|> (GPT-2's and Atlas's), else another
    end-of-text name (an imported Llama 3 has <|end_of_text|>). Before: what the model
    expects before every text (`text_adds_of`: Llama 3's <|begin_of_text|>, whether the
    tokenizer is given as the HF folder's tokenizer.json or the imported checkpoint's), so
    a model trained with it at every document start is continued with it, as HF's
    tokenizer would encode its documents."""
    from atlas_server.checkpoint import text_adds_of
    from atlas_server.hf_export import EOS_NAMES

    end = next(
        (tokenizer.special_tokens[n] for n in EOS_NAMES if n in tokenizer.special_tokens), None
    )
    if end is None:
        raise DataError(
            f"the tokenizer has no end-of-text token to separate documents (one of "
            f"{', '.join(EOS_NAMES)})"
        )
    before, after = text_adds_of(tok_file)
    # A tokenizer that already appends the end-of-text token needs no second one.
    return before, after if after[-1:] == [end] else [*after, end]


def data_tokenizer(folder: str | os.PathLike) -> Tokenizer:
    """The tokenizer a prepared folder's shards were encoded with: the copy beside them,
    checked against the hashes in manifest.json. Another tokenizer there would feed the
    model ids it has no embedding rows for (or the wrong ones), so it is refused.

    A manifest written before `tokenizer_copy_sha256` was recorded names only the hash of
    the file given to prepare-data, which the copy equals unless it was converted from
    another format; then only the vocabulary size can be checked."""
    folder = Path(folder)
    # Named as the data folder it should be, not as a missing tokenizer file (which is what
    # reading one first said of a typo or of a folder of raw text).
    if not folder.is_dir():
        what = "does not exist" if not folder.exists() else "is a file"
        raise DataError(f"data.path {folder} {what}; make it with `atlas-train prepare-data`")
    if not (folder / "manifest.json").is_file() and not tokenizer_file(folder).is_file():
        raise DataError(
            f"data.path {folder} is not prepared data (no manifest.json, no tokenizer copy); "
            f"make it with `atlas-train prepare-data TEXT... --tokenizer TOK --output {folder}`"
        )
    tokenizer = Tokenizer.from_file(folder)
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except FileNotFoundError:
        return tokenizer  # not prepared: the loader says so
    copy = tokenizer_file(folder)
    actual = hashlib.sha256(copy.read_bytes()).hexdigest()
    given = manifest.get("tokenizer_sha256")
    expected = manifest.get("tokenizer_copy_sha256")
    if actual in (expected, given):
        return tokenizer
    if expected is None and tokenizer.vocab_size == manifest.get("tokenizer_vocab_size"):
        return tokenizer
    raise DataError(
        f"{copy} is not the tokenizer the shards of {folder} were encoded with (sha256 "
        f"{actual[:12]}, manifest.json records {str(expected or given)[:12]}); re-run the "
        "prepare-data command that made the folder to restore it, or prepare the data again"
    )


def prepare_data(
    sources: Sequence[str],
    tokenizer_path: str | os.PathLike,
    output: str | os.PathLike,
    val_fraction: float = 0.01,
    shard_tokens: int = 1 << 24,
    workers: int | None = None,
    text_field: str = "text",
    progress: bool = True,
) -> dict:
    """Tokenize `sources` into shards under `output`; returns the manifest.

    Every argument is checked before anything is written, and a call refused later, before
    it wrote a training shard (no training tokens, a bad record), is undone: a refused call
    leaves an existing preparation (its tokenizer copy included) as it was, and creates no
    folder. Files that are not UTF-8 text are skipped, each named in a warning.
    """
    if not 0 <= val_fraction < 1:
        raise DataError("val_fraction must be in [0, 1)")
    if shard_tokens < 1:
        raise DataError(f"--shard-tokens must be >= 1 (got {shard_tokens})")
    if workers is not None and workers < 0:
        raise DataError(f"--workers must be >= 0 (got {workers}; 0 means one per CPU)")
    out = Path(output)
    tok_file = tokenizer_file(tokenizer_path)  # a folder is resolved once, used everywhere
    tokenizer = Tokenizer.from_file(tok_file)
    before, after = document_framing(tokenizer, tok_file)
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    files = resolve_sources(sources)
    tok_hash = hashlib.sha256(tok_file.read_bytes()).hexdigest()
    settings = {
        "sources": files,
        "tokenizer_sha256": tok_hash,
        "val_fraction": val_fraction,
        "shard_tokens": shard_tokens,
        "dtype": np.dtype(dtype).name,
        "text_field": text_field,
        # How plain-text files are cut into documents: resuming under another rule would
        # count documents differently.
        "text_document_chars": [WHOLE_FILE_CHARS, PIECE_CHARS],
    }
    if before or after != [tokenizer.eot_id]:  # recorded only when not <|endoftext|> alone,
        settings["document_framing"] = {"before": before, "after": after}  # as it always was
    progress_path = out / "progress.json"
    state = json.loads(progress_path.read_text()) if progress_path.is_file() else None
    stored = state["settings"] if state is not None else settings
    if state is not None and state["done"] and "text_document_chars" not in stored:
        # Finished before long files were cut: a re-run tokenizes nothing (it only restores
        # the tokenizer copy), so how that run cut them does not matter.
        stored = {**stored, "text_document_chars": settings["text_document_chars"]}
    if stored != settings:
        differ = sorted(
            k for k in set(settings) | set(stored) if settings.get(k) != stored.get(k)
        )  # fmt: skip
        named = {"tokenizer_sha256": "the tokenizer", "sources": "the input files"}
        raise DataError(
            f"{out} holds a preparation with other settings "
            f"({', '.join(named.get(k, k) for k in differ)}); use another --output"
        )
    if state is None:
        state = {"settings": settings, "next_doc": 0, "train": [], "val": [], "done": False}
    # Checked: only now is anything written. What this call may change is noted first, so
    # a refusal can put it back: the folders it creates, the files it overwrites.
    new_folders = [p for p in (out, *out.parents) if not p.exists()]  # deepest first
    kept = {
        p: (p.read_bytes() if p.is_file() else None) for p in (progress_path, out / TOKENIZER_FILE)
    }
    # The shards are meaningless without their tokenizer, so a copy goes beside them
    # (rewritten by a re-run with the same settings, which restores a copy damaged since).
    out.mkdir(parents=True, exist_ok=True)
    copy_hash = hashlib.sha256(
        tokenizer.save(out / TOKENIZER_FILE).read_bytes()  # Atlas format, whatever it came in
    ).hexdigest()
    if state["done"]:
        return json.loads((out / "manifest.json").read_text())
    splits = {name: _Split(name, [], 0, list(state[name])) for name in ("train", "val")}
    written: list[Path] = []  # the shard files this call wrote
    skipped: list[tuple[str, str]] = []  # (file, why) for each input that is not text

    def documents() -> Iterator[str]:
        for f in files:
            # .parquet is binary by design (pyarrow decodes it); hf: is not a file.
            why = None if f.startswith("hf:") or f.endswith(".parquet") else not_text(Path(f))
            if why is not None:
                with tqdm.external_write_mode(file=sys.stderr):  # a line of its own, not
                    log.warning("warning: skipped %s: %s", f, why)  # the bar's tail
                skipped.append((f, why))
                continue
            yield from iter_documents(f, text_field)

    def write(split: _Split, whole: bool) -> None:
        """Write the split's tokens as shards of `shard_tokens`; the rest too if `whole`,
        else it stays in the buffer."""
        if split.count == 0:
            return
        tokens = np.concatenate(split.buffer)
        end = len(tokens) if whole else len(tokens) - len(tokens) % shard_tokens
        for start in range(0, end, shard_tokens):
            name = f"{split.name}_{len(split.shards):05d}.bin"
            sha = write_shard(out / name, tokens[start : min(start + shard_tokens, end)])
            written.append(out / name)
            split.shards.append(
                {"file": name, "tokens": min(shard_tokens, end - start), "sha256": sha}
            )
        split.count = len(tokens) - end
        split.buffer = [tokens[end:].copy()] if split.count else []  # a copy frees `tokens`

    def checkpoint(full: _Split | None, next_doc: int, doc_tokens: int) -> None:
        # The split that filled a shard keeps what is left of the last document (doc
        # `next_doc - 1`, `doc_tokens` tokens long); the other is written whole. So every
        # token before the resume point (a document, and how many of its tokens) is on disk.
        for split in splits.values():
            write(split, whole=split is not full)
        offset = doc_tokens - full.count if full is not None and full.count else 0
        state.update(
            next_doc=next_doc - 1 if offset else next_doc,
            next_doc_offset=offset,
            train=splits["train"].shards,
            val=splits["val"].shards,
        )
        atomic_write_json(progress_path, state)
        # Test hook: die right after a given number of shards, to prove resumption.
        kill_after = os.environ.get("ATLAS_TEST_SIGKILL_AFTER_SHARDS")
        if kill_after is not None and len(splits["train"].shards) >= int(kill_after):
            os.kill(os.getpid(), 9)

    n_workers = workers or max(1, (os.cpu_count() or 1))
    if n_workers > 1 and not _spawn_can_start_workers():
        log.warning(
            "tokenizing in this process: worker processes must re-import the calling script,"
            " and this one has no file (stdin or -c); run it from a .py file to use %d workers",
            n_workers,
        )
        n_workers = 1
    skip, written_of_next = state["next_doc"], state.get("next_doc_offset", 0)
    bar = progress_bar(desc="tokenizing", unit="doc", disable=not progress, initial=skip)
    doc_index = skip
    framing = (np.array(before, dtype=np.uint32), np.array(after, dtype=np.uint32))
    try:
        with _encoder_pool(n_workers, str(tok_file)) as encode_all:
            # Bounded batches keep memory flat (Pool.imap would read the whole corpus
            # ahead); map() returns results in input order, so the output never depends on
            # scheduling.
            texts = itertools.islice(documents(), skip, None)
            for batch in _batched(texts, 256 * n_workers, BATCH_CHARS * n_workers):
                for text, ids in zip(batch, encode_all(batch), strict=True):
                    split = splits["val" if is_validation(text, val_fraction) else "train"]
                    tokens = np.concatenate((framing[0], ids, framing[1])).astype(dtype)
                    if doc_index == skip:  # its first tokens may be in shards already
                        split.buffer.append(tokens[written_of_next:])
                    else:
                        split.buffer.append(tokens)
                    split.count += len(split.buffer[-1])
                    doc_index += 1
                    bar.update(1)
                    if split.count >= shard_tokens:
                        checkpoint(split, doc_index, len(tokens))
        bar.close()  # before a message: the bar's line would run into it
        checkpoint(None, doc_index, 0)
        if not splits["train"].shards:
            raise DataError(_no_training_tokens(files, skipped))
    except DataError:
        bar.close()
        if not splits["train"].shards:  # nothing worth resuming: put the folder back
            _put_back(kept, written, new_folders)
        raise
    manifest = {
        "format": "atlas-tokens",
        "version": VERSION,
        **settings,
        "tokenizer_copy_sha256": copy_hash,  # its atlas_tokenizer.json (data_tokenizer)
        "tokenizer_vocab_size": tokenizer.vocab_size,
        "train": splits["train"].shards,
        "val": splits["val"].shards,
        "train_tokens": sum(s["tokens"] for s in splits["train"].shards),
        "val_tokens": sum(s["tokens"] for s in splits["val"].shards),
        "documents": doc_index,
        "skipped": [{"file": f, "reason": why} for f, why in skipped],
    }
    if skipped:
        log.warning(
            "warning: skipped %d of %d input files as not UTF-8 text (each named above)",
            len(skipped),
            len(files),
        )
    if val_fraction > 0 and not manifest["val"]:
        log.warning(
            "warning: val_fraction=%g put none of the %d documents in the validation split "
            "(each document goes there when a hash of its text falls under the fraction); "
            "training will report no validation loss. Use a larger --val-fraction, or more, "
            "smaller documents.",
            val_fraction,
            doc_index,
        )
    atomic_write_json(out / "manifest.json", manifest, indent=2)
    state.update(next_doc=doc_index, train=manifest["train"], val=manifest["val"], done=True)
    atomic_write_json(progress_path, state)
    return manifest


def _no_training_tokens(files: list[str], skipped: list[tuple[str, str]]) -> str:
    if skipped and len(skipped) == len(files):
        first = f"{skipped[0][0]}: {skipped[0][1]}"
        if len(files) == 1:
            return f"no training tokens were produced: the input is not UTF-8 text ({first})"
        return (
            f"no training tokens were produced: none of the {len(files)} input files is "
            f"UTF-8 text ({first}; and {len(files) - 1} more)"
        )
    also = f"; {len(skipped)} files that are not UTF-8 text were skipped" if skipped else ""
    return f"no training tokens were produced (empty input, or everything went to validation{also})"


def _put_back(kept: dict[Path, bytes | None], written: list[Path], new_folders: list[Path]) -> None:
    """Undo a refused preparation: remove the shards it wrote, restore the files it
    overwrote (or remove them, when they were new), remove the folders it created."""
    for path in written:
        path.unlink(missing_ok=True)
    for path, data in kept.items():
        if data is None:
            path.unlink(missing_ok=True)
        else:
            atomic_write_bytes(path, data)
    for folder in new_folders:  # deepest first; one holding anything else stays
        with contextlib.suppress(OSError):
            folder.rmdir()


def _batched(items: Iterator[str], size: int, max_chars: int) -> Iterator[list[str]]:
    batch: list[str] = []
    chars = 0
    for item in items:
        batch.append(item)
        chars += len(item)
        if len(batch) == size or chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch
