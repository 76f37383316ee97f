"""The labelled retrieval set: how questions and passages are cut from the docs, and the committed file."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "eval_suites" / "data"))
from build_retrieval import (  # noqa: E402
    QUESTIONS,
    build_corpus,
    build_questions,
    cache_dir,
    split_of,
)

FAQ = """\
:tocdepth: 2

=====================
Programming FAQ
=====================

General Questions
=================

How do I sort a list of tuples by their second item?
----------------------------------------------------

Use :func:`sorted` with ``key=operator.itemgetter(1)``; the list itself is not changed and a
new sorted list is returned to the caller.

Why?
----

Too short to be a question worth asking, and its answer is short too.
"""

GLOSSARY = """\
.. glossary::

   ``>>>``
      The default Python prompt of the interactive shell.

   decorator
      A function returning another function, usually applied as a function
      transformation using the ``@wrapper`` syntax.
"""


def test_questions_are_question_headings_and_glossary_terms_answered_by_their_own_passage(
    tmp_path,
):
    (tmp_path / "faq").mkdir()
    (tmp_path / "faq" / "programming.rst.txt").write_text(FAQ)
    (tmp_path / "glossary.rst.txt").write_text(GLOSSARY)
    corpus = build_corpus(tmp_path)
    by_source = {d["source"]: d for d in corpus}
    questions = build_questions(corpus)
    assert [(q["question"], q["kind"]) for q in questions] == [
        ("How do I sort a list of tuples by their second item?", "faq"),
        ("What is decorator in Python?", "glossary"),
    ]
    for q in questions:
        (answer,) = q["relevant"]
        text = by_source[answer]["text"]
        assert q["question"] not in text  # the heading is the title, never the passage
        assert q["split"] == split_of(q["id"])
    assert "itemgetter(1)" in by_source[questions[0]["relevant"][0]]["text"]
    assert "``" not in by_source[questions[0]["relevant"][0]]["text"]  # markup stripped
    assert by_source["glossary#decorator"]["text"].startswith("A function returning")
    assert build_questions(build_corpus(tmp_path)) == questions  # deterministic


def test_the_committed_set_is_large_split_and_well_formed():
    questions = [json.loads(line) for line in QUESTIONS.read_text().splitlines() if line]
    assert len(questions) >= 200 and len({q["id"] for q in questions}) == len(questions)
    splits = {s: [q for q in questions if q["split"] == s] for s in ("dev", "test")}
    assert min(len(v) for v in splits.values()) >= 100
    assert all(q["split"] == split_of(q["id"]) and q["relevant"] == [q["id"]] for q in questions)
    assert sum(q["kind"] == "faq" for q in questions) >= 150


def test_the_docs_download_is_kept_under_atlas_home(monkeypatch, tmp_path):
    """Atlas's one home folder, as the eval cache and the kernels: not ~/.cache regardless."""
    monkeypatch.setenv("ATLAS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "home" / "python3.11-doc"
    monkeypatch.delenv("ATLAS_HOME")
    assert cache_dir() == tmp_path / "xdg" / "atlas" / "python3.11-doc"
