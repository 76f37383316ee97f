"""Build the labelled retrieval set: Python documentation questions and the passages that answer them.

What it does: from the reST sources of Debian's `python3.11-doc` package
(`html/_sources/**.rst.txt`), builds
  - the corpus (at run time, never committed): one document per section of every page of
    the documentation (its heading as the title, reST markup stripped by the same rules as
    `build_data.py`), plus one document per glossary entry (its definition);
  - the questions (`retrieval/python_docs_qa.jsonl`, committed): every section heading that
    is a question (ends in "?", at least three words, an answer of at least 80 characters;
    nearly all from the FAQ pages), its answer section as the one relevant document; and
    every glossary term with letters in it as "What is TERM in Python?", its definition as
    the relevant document. The question text itself is never part of the corpus (a
    section's heading is its title, not its text), so a retriever cannot match it verbatim.
Each question is assigned to `dev` or `test` by a hash of its id (about half each): choose
settings on dev, quote test. The output is byte-identical for the same package version
(sorted files, no randomness). What it does not do: embed or evaluate (see
`bench/bench_retrieval.py`).

The documentation is (c) the Python Software Foundation, PSF License Agreement; see
`LICENSE-PSF-DOCS.md`.

Usage:
    python eval_suites/data/build_retrieval.py [SOURCES_DIR]
SOURCES_DIR defaults to the cache folder `docs_sources()` fills (apt-get download
python3.11-doc + dpkg-deb -x, once).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from build_data import clean_inline, sections  # noqa: E402

PACKAGE = "python3.11-doc"
QUESTIONS = HERE / "retrieval" / "python_docs_qa.jsonl"
MIN_ANSWER_CHARS = 80
_GLOSSARY_TERM = re.compile(r"^   (\S.*)$")
_GLOSSARY_BODY = re.compile(r"^      ")


def cache_dir() -> Path:
    """$ATLAS_HOME/python3.11-doc (Atlas's one home folder, as the eval cache), else
    $XDG_CACHE_HOME/atlas/..., else ~/.cache/atlas/python3.11-doc."""
    if home := os.environ.get("ATLAS_HOME"):
        return Path(home).expanduser() / PACKAGE
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "atlas" / PACKAGE


def docs_sources(folder: Path | None = None) -> Path:
    """The package's `_sources` folder, downloaded and unpacked into `folder` if missing."""
    folder = folder or cache_dir()
    root = folder / "usr" / "share" / "doc" / "python3.11" / "html" / "_sources"
    if root.is_dir():
        return root
    folder.mkdir(parents=True, exist_ok=True)
    print(f"fetching {PACKAGE} into {folder} (apt-get download + dpkg-deb -x)", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            subprocess.run(["apt-get", "download", PACKAGE], cwd=tmp, check=True)
        except (OSError, subprocess.CalledProcessError) as e:
            raise SystemExit(
                f"could not download {PACKAGE} ({e}); unpack it yourself and pass the "
                "html/_sources folder"
            ) from None
        (deb,) = Path(tmp).glob(f"{PACKAGE}_*.deb")
        subprocess.run(["dpkg-deb", "-x", str(deb), str(folder)], check=True)
        (folder / "PACKAGE").write_text(deb.name + "\n")
    return root


def glossary(text: str) -> list[tuple[str, str]]:
    """(term, definition) pairs of the `.. glossary::` block, markup stripped."""
    entries: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        term = _GLOSSARY_TERM.match(line)
        if term:
            entries.append((clean_inline(term.group(1).strip()), []))
        elif entries and (_GLOSSARY_BODY.match(line) or not line.strip()):
            entries[-1][1].append(clean_inline(line.strip()))
    out = []
    for term, body in entries:
        definition = re.sub(r"\n{3,}", "\n\n", "\n".join(body)).strip()
        if definition:
            out.append((term, definition))
    return out


def build_corpus(root: Path) -> list[dict]:
    """Every section of every page, and every glossary entry: {"source", "title", "text"}."""
    docs = []
    for path in sorted(root.rglob("*.rst.txt"), key=lambda p: p.as_posix()):
        page = path.relative_to(root).as_posix().removesuffix(".rst.txt")
        text = path.read_text(encoding="utf-8")
        seen: dict[str, int] = {}
        for heading, body in sections(text):
            seen[heading] = seen.get(heading, 0) + 1
            suffix = f"#{seen[heading]}" if seen[heading] > 1 else ""
            docs.append({"source": f"{page}#{heading}{suffix}", "title": heading, "text": body})
        if page == "glossary":
            for term, definition in glossary(text):
                docs.append({"source": f"glossary#{term}", "title": term, "text": definition})
    return docs


def split_of(question_id: str) -> str:
    return "dev" if hashlib.sha1(question_id.encode()).digest()[0] % 2 == 0 else "test"


def build_questions(corpus: list[dict]) -> list[dict]:
    questions = []
    for doc in corpus:
        source, title, text = doc["source"], doc["title"], doc["text"]
        if source.startswith("glossary#"):
            if not re.search(r"[A-Za-z]", title):
                continue  # `>>>`, `...`
            kind, question = "glossary", f"What is {title} in Python?"
        elif (
            title.endswith("?")
            and "..." not in title
            and len(title.split()) >= 3
            and len(text) >= MIN_ANSWER_CHARS
        ):
            kind, question = "faq" if source.startswith("faq/") else "docs", title
        else:
            continue
        questions.append(
            {
                "id": source,
                "question": question,
                "relevant": [source],
                "kind": kind,
                "split": split_of(source),
            }
        )
    return questions


def main(argv: list[str]) -> None:
    root = Path(argv[0]) if argv else docs_sources()
    questions = build_questions(build_corpus(root))
    QUESTIONS.parent.mkdir(parents=True, exist_ok=True)
    with QUESTIONS.open("w", encoding="utf-8") as f:
        for q in questions:
            f.write(json.dumps(q, ensure_ascii=False) + "\n")
    splits = {s: sum(q["split"] == s for q in questions) for s in ("dev", "test")}
    print(f"wrote {len(questions)} questions to {QUESTIONS} ({splits})")


if __name__ == "__main__":
    main(sys.argv[1:])
