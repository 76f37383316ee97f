"""Where Atlas keeps what it makes for a user: one home folder, `ATLAS_HOME`.

What it does: names the home folder (`$ATLAS_HOME`, default `~/.cache/atlas`) and the
quickstart's folder inside it, whose `checkpoint/` is the model `atlas serve` serves when
given none. What it does not do: create folders, or decide where a run's own outputs go
(its config's `out_dir`).

A leaf: it imports nothing of Atlas, so the trainer and the server share it without the
trainer importing a serving command.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["atlas_home", "quickstart_dir"]


def atlas_home() -> Path:
    """`$ATLAS_HOME` (`~` expanded), else `~/.cache/atlas`."""
    configured = os.environ.get("ATLAS_HOME")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "atlas"


def quickstart_dir() -> Path:
    """The quickstart's folder; `quickstart_dir() / "checkpoint"` is the server's default model."""
    return atlas_home() / "quickstart"
