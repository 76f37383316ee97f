"""Shared helpers for the CLIs (`atlas`, `atlas-train`, `atlas-eval`): known errors, and
Click's own usage errors, as one-line messages."""

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


def run_app(app: typer.Typer) -> None:
    """Run a Typer app as a console script. Click's usage errors (a missing option, an
    unknown one, a value of the wrong type) come out as one line, `error: ... (see `CMD
    --help`)`, with Click's exit status 2, instead of its usage box; the rest as Click."""
    try:
        code = app(standalone_mode=False)
    except typer.TyperException as e:  # Click's exceptions (Typer carries its own Click)
        ctx = getattr(e, "ctx", None)
        if type(e).__name__ == "NoArgsIsHelpError":
            e.show()  # a group given no command shows its help, as before
        else:
            see = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
            print(f"error: {e.format_message()}{see}", file=sys.stderr)
        sys.exit(e.exit_code)
    except typer.Abort:  # Click's form of a Ctrl-C it caught: the entry point says it
        raise KeyboardInterrupt from None
    sys.exit(code if isinstance(code, int) else 0)
