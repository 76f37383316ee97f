"""`atlas tokenizer ...`: train a byte-level BPE tokenizer, encode, decode and inspect one.

What it does: thin commands over `atlas_server.tokenizer`; every user mistake (missing
files, an empty corpus, a vocabulary too small, ids that are not integers or not in the
vocabulary) ends as one `error: ...` line and exit status 1. What it does not do:
convert Hugging Face tokenizers (that is `atlas checkpoint import-hf`).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import typer

from ..tokenizer import (
    DEFAULT_SPECIAL_TOKENS,
    GPT2_SPLIT_PATTERN,
    GPT4_SPLIT_PATTERN,
    TOKENIZER_FILE,
    Tokenizer,
    TokenizerError,
)
from ._common import fail, user_errors

app = typer.Typer(
    help="Train, inspect and run byte-level BPE tokenizers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

NAMED_PATTERNS = {"gpt4": GPT4_SPLIT_PATTERN, "gpt2": GPT2_SPLIT_PATTERN}


@app.command()
def train(
    paths: list[str] = typer.Argument(
        ...,
        help="Files, folders (recursive: .txt .md .rst .py .jsonl) or globs.",
        show_default=False,
    ),
    vocab_size: int = typer.Option(
        ..., "--vocab-size", help="Total ids: 256 bytes + merges + special tokens."
    ),
    output: Path = typer.Option(
        ..., "--output", "-o", help="Folder to write atlas_tokenizer.json into."
    ),
    special_token: list[str] = typer.Option(
        None,
        "--special-token",
        help="A special token; repeat for several. Default: " + ", ".join(DEFAULT_SPECIAL_TOKENS),
        show_default=False,
    ),
    pattern: str = typer.Option(
        "gpt4",
        "--pattern",
        help="Split pattern: 'gpt4', 'gpt2' or a regex (`regex` module syntax).",
    ),
    jsonl_field: str = typer.Option(
        "text", "--jsonl-field", help="Field holding the text in .jsonl records."
    ),
    min_frequency: int = typer.Option(
        2, "--min-frequency", help="Stop when the best pair occurs fewer times."
    ),
    name: str = typer.Option("atlas", "--name", help="Name stored in the tokenizer file."),
    workers: int = typer.Option(
        1, "--workers", help="Processes counting pre-tokens (0: one per CPU); same result."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace an atlas_tokenizer.json already in OUTPUT."
    ),
) -> None:
    """Learn merges from text files and write OUTPUT/atlas_tokenizer.json (atomically).

    Example: atlas tokenizer train docs/*.md notes/*.md --vocab-size 8192 --output tok/
    """
    from ..tokenizer.train import TrainConfig, TrainStats, train_from_files

    config = TrainConfig(
        vocab_size=vocab_size,
        special_tokens=tuple(special_token) if special_token else DEFAULT_SPECIAL_TOKENS,
        pattern=NAMED_PATTERNS.get(pattern, pattern),
        min_frequency=min_frequency,
        jsonl_field=jsonl_field,
        name=name,
    )
    stats = TrainStats()
    start = time.perf_counter()
    with user_errors():
        if output.exists() and not output.is_dir():
            raise TokenizerError(f"--output must be a folder; {output} is a file")
        # Checked before training: the shards and checkpoints made with a tokenizer are
        # only readable with it, so replacing one is a choice, not a side effect.
        if (output / TOKENIZER_FILE).exists() and not overwrite:
            raise TokenizerError(
                f"{output / TOKENIZER_FILE} exists; pass --overwrite to replace it, or "
                "choose another --output"
            )
        if workers < 0:
            raise TokenizerError(f"--workers must be 0 (one per CPU) or more, got {workers}")
        tokenizer = train_from_files(
            paths, config, progress=not quiet, stats=stats, workers=workers or os.cpu_count() or 1
        )
        path = tokenizer.save(output / TOKENIZER_FILE)
    elapsed = time.perf_counter() - start
    typer.echo(f"wrote {path}")
    typer.echo(
        f"  read {stats.files} files, {_human_bytes(stats.bytes_read)}, "
        f"{stats.pretokens:,} pre-tokens ({stats.distinct_pretokens:,} distinct)"
    )
    typer.echo(
        f"  {stats.merges:,} merges, vocab size {tokenizer.vocab_size:,}, "
        f"{stats.bytes_per_token:.2f} bytes/token on the training text, {elapsed:.1f} s"
    )
    if stats.stopped_early:
        typer.echo(
            f"  stopped early: no pair occurs {min_frequency} times or more "
            f"(asked for vocab size {vocab_size})"
        )


def _human_bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def _load(path: Path) -> Tokenizer:
    with user_errors():
        try:
            return Tokenizer.from_file(path)
        except TokenizerError as e:
            # bpe.py's wording names its own API; say what the user can act on.
            if str(e).startswith("not an Atlas tokenizer (format="):
                raise TokenizerError(
                    f"{path} is neither an Atlas tokenizer (atlas_tokenizer.json) nor a "
                    "Hugging Face tokenizer.json"
                ) from None
            raise


@app.command()
def encode(
    text: str = typer.Argument(
        None, help="Text to encode; read from stdin when left out.", show_default=False
    ),
    tokenizer: Path = typer.Option(
        ...,
        "--tokenizer",
        "-t",
        help="Tokenizer file (Atlas or Hugging Face) or a folder holding one (a checkpoint).",
    ),
    allow_special: bool = typer.Option(
        False, "--allow-special", help="Turn special-token text (e.g. <|endoftext|>) into its id."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list instead of spaced ids."),
    show_tokens: bool = typer.Option(
        False, "--tokens", help="Print one token per line: id and bytes."
    ),
) -> None:
    """Print the token ids of TEXT (or of stdin).

    Example: atlas tokenizer encode -t tok/atlas_tokenizer.json "Hello, world!"
    """
    tok = _load(tokenizer)
    if text is None:
        text = _read_stdin()
    ids = tok.encode(text, allowed_special="all" if allow_special else ())
    if show_tokens:
        for token_id in ids:
            typer.echo(f"{token_id}\t{tok.token_bytes(token_id)!r}")
    elif as_json:
        typer.echo(json.dumps(ids))
    else:
        typer.echo(" ".join(map(str, ids)))


def _read_stdin() -> str:
    """All of stdin as text; bytes that are not UTF-8 become U+FFFD instead of failing."""
    stream = getattr(sys.stdin, "buffer", None)
    if stream is None:
        return sys.stdin.read()
    return stream.read().decode("utf-8", errors="replace")


def _parse_ids(raw: list[str], vocab_size: int) -> list[int]:
    """Ids from arguments like `1 2 3`, `1,2,3` or `[1, 2, 3]`."""
    ids: list[int] = []
    for chunk in " ".join(raw).replace(",", " ").replace("[", " ").replace("]", " ").split():
        try:
            token_id = int(chunk)
        except ValueError:
            fail(f"token ids must be integers, got {chunk!r}")
        if not 0 <= token_id < vocab_size:
            fail(f"token id {token_id} is outside this tokenizer (ids 0..{vocab_size - 1})")
        ids.append(token_id)
    return ids


@app.command()
def decode(
    ids: list[str] = typer.Argument(
        None, help="Token ids; read from stdin when left out.", show_default=False
    ),
    tokenizer: Path = typer.Option(
        ...,
        "--tokenizer",
        "-t",
        help="Tokenizer file (Atlas or Hugging Face) or a folder holding one (a checkpoint).",
    ),
) -> None:
    """Print the text of token IDS (invalid UTF-8 shows as U+FFFD).

    Example: atlas tokenizer decode -t tok/atlas_tokenizer.json 72 101 108 108 111
    """
    tok = _load(tokenizer)
    raw = ids if ids else [_read_stdin()]
    typer.echo(tok.decode(_parse_ids(raw, tok.vocab_size)))


@app.command()
def info(
    path: Path = typer.Argument(
        ...,
        help="Tokenizer file (Atlas or Hugging Face) or a folder holding one (a checkpoint).",
        show_default=False,
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Summarise a tokenizer: size, pattern, special tokens, longest tokens.

    Example: atlas tokenizer info tok/atlas_tokenizer.json
    """
    tok = _load(path)
    pattern_name = next((k for k, v in NAMED_PATTERNS.items() if v == tok.pattern), "custom")
    longest = sorted(tok.ranks, key=lambda b: (-len(b), b))[:5]
    summary = {
        "name": tok.name,
        "vocab_size": tok.vocab_size,
        "ordinary_tokens": len(tok.ranks),
        "merges": len(tok.merges) if tok.merges is not None else None,
        "special_tokens": tok.special_tokens,
        "pattern": pattern_name if pattern_name != "custom" else tok.pattern,
        "longest_tokens": [b.decode("utf-8", "replace") for b in longest],
    }
    if as_json:
        typer.echo(json.dumps(summary, ensure_ascii=False, indent=2))
        return
    for key, value in summary.items():
        typer.echo(f"{key:16} {value}")


if __name__ == "__main__":
    app()
