"""Shared helpers for the CLI: turning known errors into one-line messages."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import typer

# Errors whose message is meant for the user; anything else is a bug and keeps its traceback.
from ..checkpoint import CheckpointError
from ..model import ConfigError
from ..tokenizer import TokenizerError

USER_ERRORS: tuple[type[BaseException], ...] = (
    CheckpointError,
    ConfigError,
    TokenizerError,
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
)


def fail(message: str, code: int = 1) -> None:
    """Print `error: message` to stderr and exit non-zero."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@contextlib.contextmanager
def user_errors(*extra: type[BaseException]) -> Iterator[None]:
    """Turn expected errors into a one-line message and exit status 1."""
    try:
        yield
    except (*USER_ERRORS, *extra) as e:
        msg = str(e) or e.__class__.__name__
        if isinstance(e, OSError) and e.filename:
            msg = f"{e.strerror}: {e.filename}"
        print(f"error: {msg}", file=sys.stderr)
        raise typer.Exit(1) from None
