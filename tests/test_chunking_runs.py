"""Runs of characters the embedder's tokenizer cannot count (QA F15): MiniLM's WordPiece
reads more than 100 characters without a space or punctuation (a hash, a base64 blob, an
emoji run) as a single [UNK], so the chunker used to keep 50,000 of them as one chunk.
Ordinary text must chunk exactly as before (chunk ids are content-derived).
"""

from __future__ import annotations

import hashlib

import pytest

from atlas_server.rag.chunking import ChunkSettings, chunk_text

SETTINGS = ChunkSettings()  # 200 pieces, the server's default


@pytest.fixture(scope="module")
def count():
    from atlas_server.rag.embedding import Embedder

    return Embedder().count_pieces


def covered(text: str, chunks) -> bool:
    """Every chunk is its span of `text`, and together they leave nothing out."""
    end = 0
    for c in chunks:
        if text[c.start : c.end] != c.text or c.start > end:
            return False
        end = max(end, c.end)
    return end == len(text)


@pytest.mark.parametrize(
    "run",
    ["a" * 50_000, "\U0001f600" * 20_000, "0123456789abcdef" * 1_000, "QUJD" * 2_500],
    ids=["letters", "emoji", "hex", "base64"],
)
def test_a_run_without_spaces_is_cut_to_the_chunk_size(count, run):
    chunks = chunk_text(run, "blob", count, SETTINGS)
    assert count(run) == 1  # what the chunker was going by: one [UNK]
    assert len(chunks) > 1 and covered(run, chunks)
    # at most one piece per character, the most WordPiece makes of them
    assert max(len(c.text) for c in chunks) <= SETTINGS.max_tokens


def test_a_run_inside_a_sentence_is_cut_and_the_words_around_it_kept(count):
    blob = "f" * 5_000
    text = f"The key is sha256:{blob} and nothing else. A second sentence follows."
    chunks = chunk_text(text, "doc.md", count, SETTINGS)
    assert covered(text, chunks)
    assert max(c.text.count("f") for c in chunks) <= SETTINGS.max_tokens
    assert "The key is sha256:" in chunks[0].text
    assert chunks[-1].text.endswith("and nothing else. A second sentence follows.")


def test_runs_the_tokenizer_can_count_are_left_alone(count):
    # 100 characters (WordPiece's limit), CJK (one piece per ideograph) and a run broken by
    # non-ASCII punctuation are counted correctly, so they pack as before: one chunk each.
    for text in ["a" * 100, "中文文本" * 40, "x" * 80 + "。" + "y" * 80]:
        assert [c.text for c in chunk_text(text, "s", count, SETTINGS)] == [text]


def test_ordinary_text_keeps_its_chunk_ids(count):
    text = (
        "# Notes\n\nSee https://example.com/"
        + "/".join(f"part{i}" for i in range(120))
        + " for details. "
        + " ".join(f"Sentence {i} is ordinary text." for i in range(60))
        + "\n\n## CJK\n\n"
        + "中文文本" * 80
        + "\n\n"
        + "a" * 100
        + " "
        + "x" * 80
        + "。"
        + "y" * 80
        + "\n"
    )
    chunks = chunk_text(text, "doc.md", count, ChunkSettings(60, 10))
    ids = "".join(c.id for c in chunks)
    # the ids the chunker gave before runs were cut (a changed id re-embeds a document)
    assert (len(chunks), hashlib.sha1(ids.encode()).hexdigest()) == (
        25,
        "a191ac0ac5362403d10194e1eecd72556c12edfc",
    )
