"""Shared helpers for the CLI: turning known errors into one-line messages."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import typer

# Errors whose message is meant for the user; anything else is a bug and keeps its traceback.
# The checkpoint's and the plugin host's error classes are looked up only once their modules
# are loaded (the first imports PyTorch, which `atlas tokenizer ...` never needs): before
# that, none can have been raised.
from ..model.config import ConfigError
from ..tokenizer import TokenizerError

USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError,
    TokenizerError,
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
)
_LOADED_ON_USE = (
    ("atlas_server.checkpoint", "CheckpointError"),
    ("atlas_server.plugins", "PluginError"),  # a name clash, a misspelled hook
)


def user_error_types() -> tuple[type[BaseException], ...]:
    """USER_ERRORS, and the classes of _LOADED_ON_USE whose modules are loaded."""
    loaded = tuple(
        getattr(sys.modules[module], name)
        for module, name in _LOADED_ON_USE
        if module in sys.modules
    )
    return USER_ERRORS + loaded


def fail(message: str, code: int = 1) -> None:
    """Print `error: message` to stderr and exit non-zero."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@contextlib.contextmanager
def user_errors(*extra: type[Exception]) -> Iterator[None]:
    """Turn expected errors into a one-line message and exit status 1."""
    try:
        yield
    except Exception as e:
        if not isinstance(e, (*user_error_types(), *extra)):
            raise
        msg = str(e) or e.__class__.__name__
        if isinstance(e, OSError) and e.filename:
            msg = f"{e.strerror}: {e.filename}"
        print(f"error: {msg}", file=sys.stderr)
        raise typer.Exit(1) from None
