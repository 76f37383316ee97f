"""Rebuild the committed suite text files from Debian's python3.11-doc reST sources.

What it does: reads the reStructuredText sources of the Python 3.11 documentation
(`html/_sources/**.rst.txt` in Debian's `python3.11-doc` package), strips reST markup with
a few deterministic rules and writes
  - `perplexity/python_whatsnew.jsonl`: the "What's New in Python 2.0 .. 2.7" essays, one
    document per section (held-out prose for rolling log-likelihood);
  - `generation/python_faq.jsonl`: the Python FAQ, one record per question and its answer
    (the source of the heading and continuation tasks).
The output is byte-identical for the same input package version (sorted files, no
randomness). What it does not do: run at test time or fetch anything; the outputs are
committed and tests read only them.

The documentation is (c) the Python Software Foundation and distributed under the PSF
License Agreement (https://docs.python.org/3/license.html); see `data/LICENSE-PSF-DOCS.md`.

Usage (once, by a maintainer):
    apt-get download python3.11-doc && dpkg-deb -x python3.11-doc_*.deb /tmp/pydoc
    python eval_suites/data/build_data.py /tmp/pydoc/usr/share/doc/python3.11/html/_sources
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
WHATSNEW_FILES = [f"whatsnew/2.{minor}.rst.txt" for minor in range(0, 8)]
FAQ_FILES = [
    "faq/general.rst.txt",
    "faq/programming.rst.txt",
    "faq/design.rst.txt",
    "faq/library.rst.txt",
    "faq/extending.rst.txt",
    "faq/windows.rst.txt",
    "faq/gui.rst.txt",
    "faq/installed.rst.txt",
]
PERPLEXITY_BYTE_BUDGET = 320_000
UNDERLINE = re.compile(r"^([=\-~^*+#\"'`])\1{2,}\s*$")
ROLE = re.compile(r":[a-zA-Z:]+:`~?!?([^`<]*?)(?:\s*<[^>]*>)?`")
LINK = re.compile(r"`([^`<]+?)\s*<[^>]+>`__?")
LITERAL = re.compile(r"``([^`]+)``")
REF_TARGET = re.compile(r"`([^`]+)`_+")


def clean_inline(line: str) -> str:
    """Turn reST inline markup into the plain text a reader sees."""
    line = ROLE.sub(r"\1", line)
    line = LINK.sub(r"\1", line)
    line = LITERAL.sub(r"\1", line)
    line = REF_TARGET.sub(r"\1", line)
    return line.replace("\\ ", "")


def drop_directives(lines: list[str]) -> list[str]:
    """Remove `.. directive::` blocks (and comments) with their indented bodies."""
    out: list[str] = []
    skipping = False
    for line in lines:
        if line.startswith(".."):
            skipping = True
            continue
        if skipping and (not line.strip() or line[:1] in " \t"):
            continue
        skipping = False
        out.append(line)
    return out


def sections(text: str) -> list[tuple[str, str]]:
    """Split a reST document into (heading, body) pairs at underlined headings."""
    lines = drop_directives(text.splitlines())
    found: list[tuple[str, list[str]]] = []
    i = 0
    while i < len(lines):
        is_heading = (
            i + 1 < len(lines)
            and lines[i].strip()
            and UNDERLINE.match(lines[i + 1])
            and len(lines[i + 1].strip()) >= len(lines[i].strip()) - 1
        )
        if UNDERLINE.match(lines[i]) and not is_heading:
            i += 1  # an overline
            continue
        if is_heading:
            found.append((clean_inline(lines[i].strip()), []))
            i += 2
            continue
        if found:
            found[-1][1].append(clean_inline(lines[i].rstrip()))
        i += 1
    result = []
    for heading, body in found:
        text_body = re.sub(r"\n{3,}", "\n\n", "\n".join(body)).strip()
        if text_body:
            result.append((heading, text_body))
    return result


def first_prose_paragraph(body: str) -> str:
    """The first paragraph that is prose (not code, not a list), joined into one line."""
    for para in body.split("\n\n"):
        lines = para.splitlines()
        if lines and not lines[0].startswith((" ", "*", "-", ">>>", "#")):
            return " ".join(line.strip() for line in lines)
    return ""


def build_perplexity(root: Path) -> list[dict]:
    docs, total = [], 0
    for name in WHATSNEW_FILES:
        for heading, body in sections((root / name).read_text(encoding="utf-8")):
            if len(body) < 400 or total >= PERPLEXITY_BYTE_BUDGET:
                continue
            text = f"{heading}\n\n{body}\n"
            docs.append({"id": f"{name.removesuffix('.rst.txt')}#{heading}", "text": text})
            total += len(text.encode("utf-8"))
    return docs


def build_faq(root: Path) -> list[dict]:
    records = []
    for name in FAQ_FILES:
        for heading, body in sections((root / name).read_text(encoding="utf-8")):
            paragraph = first_prose_paragraph(body)
            # Questions only: section titles that are topics ("General Information") are skipped.
            if not heading.endswith("?") or len(paragraph) < 80:
                continue
            records.append(
                {
                    "id": f"{name.removesuffix('.rst.txt')}#{heading}",
                    "question": heading,
                    "paragraph": paragraph,
                }
            )
    return records


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        raise SystemExit(__doc__)
    root = Path(argv[0])
    write_jsonl(HERE / "perplexity" / "python_whatsnew.jsonl", build_perplexity(root))
    write_jsonl(HERE / "generation" / "python_faq.jsonl", build_faq(root))


if __name__ == "__main__":
    main(sys.argv[1:])
