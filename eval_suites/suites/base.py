"""What every suite shares: the run context it receives and the result it returns.

A suite is a class with a `name`, a one-line `description`, the `metrics` it reports (for
`atlas-eval list`), a frozen config dataclass whose defaults live in
`eval_suites/configs/<name>.toml` (each has `max_context_tokens`, see `fit.py`), and
`async run(ctx) -> SuiteResult`. Suites talk to the server only through `ctx.client` (HTTP)
and fit their prompts to its context through `ctx.fit`, reporting every item there as kept,
trimmed or skipped. What this module does not do: write results (see `results.py`) or
start servers (see `server.py`).
"""

from __future__ import annotations

import abc
import hashlib
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ..client import OpenAIClient
from ..errors import SuiteConfigError
from ..fit import PromptFitter

__all__ = [
    "DATA_DIR",
    "RunContext",
    "Suite",
    "SuiteResult",
    "data_path",
    "file_sha256",
    "iter_jsonl",
    "metric",
    "nothing_fits",
    "read_jsonl",
    "stable_order",
]

DATA_DIR = Path(__file__).resolve().parent.parent / "data"


@dataclass
class RunContext:
    client: OpenAIClient
    config: Any  # the suite's frozen config dataclass
    seed: int
    limit: int | None  # for testing only: fewer items than the suite defines
    output_dir: Path
    model_card: dict[str, Any]
    fit: PromptFitter  # the server's context length, token counts, kept / trimmed / skipped
    tokenizer_file: Path | None = None


@dataclass
class SuiteResult:
    # name -> {"value": float, "higher_is_better": bool | None, "description": str}
    metrics: dict[str, dict[str, Any]]
    samples: list[dict[str, Any]]
    data_files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256
    details: dict[str, Any] = field(default_factory=dict)  # suite-specific tables, signatures
    # What the user should know about numbers that are not wrong but may mislead (a level
    # that measured nothing): results.json `warnings`, report.md and `warning: ...` lines
    # on stderr.
    warnings: list[str] = field(default_factory=list)


class Suite(abc.ABC):
    name: ClassVar[str]
    description: ClassVar[str]
    # Metric names for `atlas-eval list`; a name in braces ({level}/median_ttft_ms) is a
    # pattern, explained by `metrics_note`.
    metrics: ClassVar[tuple[str, ...]]
    metrics_note: ClassVar[str] = ""
    config_cls: ClassVar[type]
    # Whether the suite's answers go through the response cache, so that a rerun of an
    # interrupted or failed run continues where it stopped (the latency suite measures
    # afresh every time).
    cached: ClassVar[bool] = True
    # Whether --seed decides which items the suite evaluates (or how it asks for them):
    # `compare` then marks no "best" between runs of different seeds.
    seeded: ClassVar[bool] = True

    def check_server(self, base_url: str, config: Any) -> None:
        """Refuse a server before any request is sent (default: every server is fine)."""
        return None

    @abc.abstractmethod
    async def run(self, ctx: RunContext) -> SuiteResult:
        """Send the suite's requests through `ctx.client` and score the answers."""


def metric(
    value: float, higher_is_better: bool | None, description: str, count: bool = False
) -> dict[str, Any]:
    """A metric entry; a `count` (failed requests) is stored, and shown, as an integer."""
    return {
        "value": int(value) if count else float(value),
        "higher_is_better": higher_is_better,
        "description": description,
    }


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def data_path(relative: str) -> Path:
    """A suite data file: an absolute path as it is; a relative one from the current folder
    where it exists there (a user's `--set data=heldout.jsonl`), else inside eval_suites/data/
    (where the suites' own files live, named so in their configs)."""
    path = Path(relative)
    if path.is_absolute():
        return path
    if path.exists():
        return path.resolve()
    return DATA_DIR / path


def iter_jsonl(path: Path, suite: str) -> Iterator[tuple[int, Any]]:
    """(line number from 1, decoded value) for each non-blank line of a JSONL file. A file
    that is not UTF-8, or a line that is not JSON, stops the run with one line naming
    FILE:LINE (lines are split at newlines only: a JSON string may hold U+2028)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise SuiteConfigError(
            f"{suite}: {path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})"
        ) from None
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise SuiteConfigError(
                f"{suite}: {path}:{number} is not JSON ({e.msg} at column {e.colno})"
            ) from None
        yield number, value


def read_jsonl(
    path: Path,
    suite: str,
    what: str,
    required: tuple[str, ...] = (),
    kinds: dict[str, tuple[type, ...]] | None = None,
    unique: str | None = None,
) -> list[dict[str, Any]]:
    """The records of a JSONL data file, checked as they are read, before any request: each
    line a JSON object with every `required` key, of the types in `kinds` where given, and
    a distinct `unique` key; the first that is not stops the run with one line naming
    FILE:LINE and the key (`SUITE: WHAT FILE:LINE lacks id, paragraph`)."""
    rows: list[dict[str, Any]] = []
    seen: dict[Any, int] = {}
    for number, row in iter_jsonl(path, suite):
        where = f"{suite}: {what} {path}:{number}"
        if not isinstance(row, dict):
            raise SuiteConfigError(f"{where} is not a JSON object (got {type(row).__name__})")
        missing = [k for k in required if k not in row]
        if missing:
            raise SuiteConfigError(f"{where} lacks {', '.join(missing)}")
        for key, types in (kinds or {}).items():
            if key in row and not (isinstance(row[key], types) and not isinstance(row[key], bool)):
                names = " or ".join(KIND_NAMES.get(t, t.__name__) for t in types)
                raise SuiteConfigError(f"{where}: {key} is not {names} (got {row[key]!r:.40})")
        if unique is not None:
            key = json.dumps(row.get(unique), sort_keys=True)
            if key in seen:
                raise SuiteConfigError(
                    f"{where}: {unique} {row.get(unique)!r} repeats line {seen[key]}"
                )
            seen[key] = number
        rows.append(row)
    if not rows:
        raise SuiteConfigError(f"{suite}: {what} file {path} holds no records")
    return rows


KIND_NAMES = {str: "a string", int: "an integer", float: "a number", list: "a list"}


def missing_data_file(value: str) -> str:
    """Where a data file that does not exist was looked for, for the error that says so."""
    if Path(value).is_absolute():
        return f"{value} does not exist"
    return f"{value} is neither in the current folder nor in {DATA_DIR}"


def stable_order(ids: list[str], seed: int) -> list[str]:
    """A seeded permutation that does not depend on Python's hash randomisation."""
    keyed = sorted(ids)
    random.Random(seed).shuffle(keyed)
    return keyed


def nothing_fits(suite: str, fit: PromptFitter, what: str) -> SuiteConfigError:
    """The error when every item was skipped: a run with no scores is not a result."""
    first = next(iter(sorted(fit.skipped.items())), ("", "no items"))
    return SuiteConfigError(
        f"{suite}: none of the {len(fit.skipped)} {what} fits the server's context"
        f" ({fit.window.tokens} tokens, {fit.window.source}); e.g. {first[0]}: {first[1]}"
    )
