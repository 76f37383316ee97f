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
import random
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
    "metric",
    "nothing_fits",
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


class Suite(abc.ABC):
    name: ClassVar[str]
    description: ClassVar[str]
    metrics: ClassVar[tuple[str, ...]]
    config_cls: ClassVar[type]
    # Whether --seed decides which items the suite evaluates (or how it asks for them):
    # `compare` then marks no "best" between runs of different seeds.
    seeded: ClassVar[bool] = True

    def check_server(self, base_url: str, config: Any) -> None:
        """Refuse a server before any request is sent (default: every server is fine)."""
        return None

    @abc.abstractmethod
    async def run(self, ctx: RunContext) -> SuiteResult:
        """Send the suite's requests through `ctx.client` and score the answers."""


def metric(value: float, higher_is_better: bool | None, description: str) -> dict[str, Any]:
    return {"value": float(value), "higher_is_better": higher_is_better, "description": description}


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
