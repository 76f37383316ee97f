"""A small real corpus for RAG tests: standard-library module documentation as Markdown.

Each module becomes one Markdown file: its docstring under a `#` heading, then every
public function or class docstring under a `##` heading. Deterministic on one Python.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

MODULES = [
    "bisect",
    "heapq",
    "json",
    "csv",
    "textwrap",
    "statistics",
    "shutil",
    "functools",
    "shlex",
    "fnmatch",
    "difflib",
    "base64",
]


def write_corpus(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in MODULES:
        module = importlib.import_module(name)
        parts = [f"# {name}\n\n{inspect.getdoc(module) or ''}\n"]
        for attr in sorted(getattr(module, "__all__", dir(module))):
            obj = getattr(module, attr, None)
            if attr.startswith("_") or not (
                inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj)
            ):
                continue
            doc = inspect.getdoc(obj)
            if doc and getattr(obj, "__module__", name).split(".")[0] in (name, f"_{name}"):
                parts.append(f"## {name}.{attr}\n\n{doc}\n")
        path = folder / f"{name}.md"
        path.write_text("\n".join(parts), encoding="utf-8")
        paths.append(path)
    return paths
