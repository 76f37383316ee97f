"""An instruction and preference data set built from the running Python's own docstrings.

What it does: collects the public functions of a fixed list of standard-library modules
(and the methods of the built-in types) whose docstring opens with a usable sentence
(20-160 characters, ending with a period, a leading signature line skipped), keeps one
function per distinct sentence (bytes.strip and bytearray.strip say the same thing), and
writes, under an output folder:
  - sft_train.jsonl / sft_heldout.jsonl: chat records, a question about a function
    ("What does json.dumps do?", or one of a few other phrasings) answered by its
    docstring's first sentence; two phrasings per training function, one per held-out one;
  - prefs_train.jsonl / prefs_heldout.jsonl: preference records for the same questions
    whose `rejected` answer is a plausible wrong one: the first sentence of another
    function of the same module (or type), from the same split;
  - manifest.json: seed, Python version and platform, counts and each file's sha256.
The split is by function: a function is held out when a hash of (seed, its name) falls
under `heldout_fraction`, so no held-out function, question or answer appears in the
training files, and the split of a name does not depend on the Python version. Every
other choice (phrasings, wrong answers) comes from a `random.Random(seed)`; the output is
byte-identical for the same seed, Python version and platform (docstrings and module
contents change between them).
What it does not do: clean reST markup out of docstrings (``obj`` stays as written), or
judge whether a sentence is a good answer beyond the length and period rules.

Usage: python -m trainer.instruct_data OUT [--seed 0] [--heldout-fraction 0.1]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import json
import platform
import random
import re
import sys
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from atlas_server.checkpoint import sha256_file
from atlas_server.io import atomic_write_text

MODULES = (
    "builtins", "os", "os.path", "sys", "json", "re", "math", "cmath", "random", "statistics",
    "itertools", "functools", "operator", "collections", "string", "textwrap", "shutil",
    "glob", "fnmatch", "heapq", "bisect", "copy", "pickle", "base64", "binascii", "hashlib",
    "hmac", "secrets", "struct", "zlib", "gzip", "bz2", "lzma", "zipfile", "tarfile", "csv",
    "time", "datetime", "calendar", "locale", "pathlib", "tempfile", "io", "codecs",
    "unicodedata", "difflib", "pprint", "reprlib", "enum", "typing", "inspect", "ast", "dis",
    "tokenize", "keyword", "warnings", "contextlib", "traceback", "logging", "argparse",
    "getpass", "platform", "subprocess", "signal", "socket", "select", "threading", "queue",
    "urllib.parse", "html", "xml.sax.saxutils", "email.utils", "mimetypes", "uuid",
    "ipaddress", "decimal", "fractions", "array", "weakref", "types", "gc", "atexit",
    "sysconfig", "importlib", "shlex", "filecmp", "stat", "colorsys", "quopri",
    "urllib.request", "asyncio", "sqlite3", "doctest", "timeit", "tracemalloc", "code",
)  # fmt: skip
TYPES = (str, bytes, bytearray, list, tuple, dict, set, frozenset, int, float)
TEMPLATES = (
    "What does {name} do?",
    "Explain {name} in one sentence.",
    "In one sentence, what is {name} for?",
    "Describe the Python {kind} {name}.",
)
SIGNATURE = re.compile(r"^[\w.]+\(.*\)(\s*->.*)?$")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(\"'`])")


@dataclass(frozen=True)
class Function:
    name: str  # as a user would write it: "json.dumps", "str.split", "abs"
    group: str  # the module or type it belongs to (wrong answers come from the same group)
    kind: str  # "function" or "method"
    answer: str  # the first sentence of its docstring


def first_sentence(doc: str) -> str | None:
    """The first sentence of a docstring's first prose paragraph (a signature line, as C
    functions' docstrings start with, is skipped)."""
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", doc.strip()) if p.strip()]
    while paragraphs and SIGNATURE.match(paragraphs[0]):
        paragraphs.pop(0)
    if not paragraphs:
        return None
    return SENTENCE_END.split(paragraphs[0], maxsplit=1)[0]


def usable(sentence: str | None) -> bool:
    return sentence is not None and 20 <= len(sentence) <= 160 and sentence.endswith(".")


def module_functions(module_name: str) -> list[Function]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated modules warn on import
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            return []  # absent on this Python or platform
    exported = getattr(module, "__all__", None)
    found = []
    for attr in sorted(set(exported or dir(module))):
        obj = getattr(module, attr, None)
        if attr.startswith("_") or not (inspect.isfunction(obj) or inspect.isbuiltin(obj)):
            continue
        # Without __all__, only what the module defines (not what it imported); never a
        # settable hook (sys.excepthook, ...), whose value is the process's state (a test
        # runner replaces some), nor anything from outside the standard library.
        home = getattr(obj, "__module__", None) or module_name
        if exported is None and home not in (module_name, module.__name__):
            continue
        if attr.endswith("hook") or home.split(".")[0] not in sys.stdlib_module_names:
            continue
        sentence = first_sentence(inspect.getdoc(obj) or "")
        if usable(sentence):
            name = attr if module_name == "builtins" else f"{module_name}.{attr}"
            found.append(Function(name, module_name, "function", sentence))
    return found


def type_methods(cls: type) -> list[Function]:
    found = []
    for attr in sorted(vars(cls)):
        if attr.startswith("_"):
            continue
        sentence = first_sentence(inspect.getdoc(getattr(cls, attr)) or "")
        if usable(sentence):
            found.append(Function(f"{cls.__name__}.{attr}", cls.__name__, "method", sentence))
    return found


def collect_functions() -> list[Function]:
    """Every usable function, one per distinct answer (the first found keeps it)."""
    seen: set[str] = set()
    out = []
    candidates = [f for m in dict.fromkeys(MODULES) for f in module_functions(m)]
    candidates += [f for cls in TYPES for f in type_methods(cls)]
    for function in candidates:
        if function.answer not in seen:
            seen.add(function.answer)
            out.append(function)
    return out


def is_heldout(name: str, seed: int, fraction: float) -> bool:
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < fraction


def question(function: Function, template: str) -> str:
    return template.format(name=function.name, kind=function.kind)


def chat_record(function: Function, template: str) -> dict:
    return {
        "id": function.name,
        "messages": [
            {"role": "user", "content": question(function, template)},
            {"role": "assistant", "content": function.answer},
        ],
    }


def wrong_answer(function: Function, pool: list[Function], rng: random.Random) -> str:
    """Another function's sentence, from the same group when it has another member."""
    same_group = [f for f in pool if f.group == function.group and f.answer != function.answer]
    others = same_group or [f for f in pool if f.answer != function.answer]
    return rng.choice(others).answer


def build(seed: int = 0, heldout_fraction: float = 0.1) -> dict[str, list[dict]]:
    """The four record lists, in a seeded order."""
    if not 0 < heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    rng = random.Random(seed)
    functions = collect_functions()
    rng.shuffle(functions)
    splits: dict[str, list[Function]] = defaultdict(list)
    for f in functions:
        splits["heldout" if is_heldout(f.name, seed, heldout_fraction) else "train"].append(f)
    out: dict[str, list[dict]] = {}
    for split, members in (("train", splits["train"]), ("heldout", splits["heldout"])):
        sft, prefs = [], []
        for f in members:
            phrasings = rng.sample(TEMPLATES, 2 if split == "train" else 1)
            sft += [chat_record(f, t) for t in phrasings]
            prefs.append(
                {
                    "id": f.name,
                    "prompt": question(f, phrasings[0]),
                    "chosen": f.answer,
                    "rejected": wrong_answer(f, members, rng),
                }
            )
        out[f"sft_{split}"], out[f"prefs_{split}"] = sft, prefs
    return out


def write(output: str | Path, seed: int = 0, heldout_fraction: float = 0.1) -> dict:
    """Write the four JSONL files and manifest.json (atomically, each); returns the manifest."""
    output = Path(output)
    records = build(seed, heldout_fraction)
    files = {}
    for name, rows in records.items():
        path = output / f"{name}.jsonl"
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        files[path.name] = {"records": len(rows), "sha256": sha256_file(path)}
    manifest = {
        "builder": "trainer.instruct_data",
        "seed": seed,
        "heldout_fraction": heldout_fraction,
        "python": platform.python_version(),
        "platform": sys.platform,
        "functions": {split: len(records[f"prefs_{split}"]) for split in ("train", "heldout")},
        "files": files,
    }
    atomic_write_text(output / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.instruct_data", description=__doc__.split("\n")[0]
    )
    parser.add_argument("output", type=Path, help="folder for the JSONL files and manifest.json")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--heldout-fraction", type=float, default=0.1)
    args = parser.parse_args(argv)
    try:
        manifest = write(args.output, args.seed, args.heldout_fraction)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for name, entry in manifest["files"].items():
        print(f"{args.output / name}: {entry['records']} records")
    return 0


if __name__ == "__main__":
    sys.exit(main())
