"""Ingest: unusable files skipped by name, chunks that fit the embedder, resume after a kill,
the embedding thread, the embedder backends, and the chunker against the previous one."""

from __future__ import annotations

import itertools
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(ROOT / "bench"))
from rag_corpus import write_corpus  # noqa: E402

from atlas_server.cli import app  # noqa: E402
from atlas_server.rag.chunking import ChunkSettings, chunk_text, sections, sentences  # noqa: E402
from atlas_server.rag.ingest import Corpus, Document, IngestError, ingest  # noqa: E402
from atlas_server.rag.store import VectorStore  # noqa: E402


@pytest.fixture(scope="module")
def embedder():
    from atlas_server.rag.embedding import Embedder

    return Embedder(backend="fp32")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Four modules' documentation (~90 chunks): enough for several windows and batches."""
    folder = tmp_path_factory.mktemp("ingestcorpus")
    for path in write_corpus(folder):
        if path.stem not in ("bisect", "heapq", "json", "textwrap"):
            path.unlink()
    return folder


def stored(store: VectorStore, name: str) -> dict[str, tuple]:
    """Every stored chunk of `name` with its vector, by id, read through the store interface."""
    return {chunk.id: (chunk, vector) for chunk, vector in store.iter_chunks(name)}


def expected_ids(embedder, folder: Path, settings: ChunkSettings = ChunkSettings()) -> set[str]:
    ids = set()
    for doc in Corpus([str(folder)]):
        ids |= {c.id for c in chunk_text(doc.text, doc.source, embedder.count_pieces, settings)}
    return ids


def mixed_folder(root: Path) -> Path:
    folder = root / "mixed"
    (folder / "sub").mkdir(parents=True)
    (folder / "good.md").write_text("# Heaps\n\nA heap keeps its smallest item first.\n")
    (folder / "sub" / "notes.txt").write_text("Bisection finds an insertion point quickly.\n")
    # The eval report's samples file: JSON objects, none with a `text` field (issue 21).
    (folder / "samples.jsonl").write_text('{"id": 1, "prompt": "p", "answer": "a"}\n')
    (folder / "partly.jsonl").write_text(
        '{"text": "Queues pass items between threads.", "source": "q"}\nnot json\n'
    )
    (folder / "binary.txt").write_bytes(b"\x00\x01\x02 not text")
    (folder / "latin1.rst").write_bytes("caf\xe9 au lait".encode("latin-1"))
    return folder


def test_jsonl_records_whose_title_is_not_a_string_are_counted_as_bad_lines(tmp_path):
    """Found by an audit: a title of 5 or ["x"] became a chunk heading (str | None)."""
    path = tmp_path / "titles.jsonl"
    path.write_text(
        '{"text": "Heaps keep order.", "title": "Heaps"}\n'
        '{"text": "Queues pass items.", "title": 5}\n'
        '{"text": "Bisect finds places.", "title": ["x"]}\n'
        '{"text": "No title here."}\n'
    )
    corpus = Corpus([str(path)])
    docs = list(corpus)
    assert [(d.text, d.title) for d in docs] == [
        ("Heaps keep order.", "Heaps"),
        ("No title here.", None),
    ]
    [bad] = corpus.bad_lines
    assert bad.path == f"{path}:2" and bad.reason.startswith("2 line(s) without")
    assert "string `title`" in bad.reason


def test_jsonl_metadata_goes_on_every_chunk_and_a_non_object_is_a_bad_line(tmp_path, embedder):
    path = tmp_path / "meta.jsonl"
    path.write_text(
        '{"text": "Heaps keep order.", "metadata": {"lang": "en", "year": 2024}}\n'
        '{"text": "Queues pass items.", "metadata": ["en"]}\n'
        '{"text": "Bisect finds places.", "metadata": {"a.b": 1}}\n'  # no filter could match
    )
    corpus = Corpus([str(path)])
    [doc] = list(corpus)
    assert doc.metadata == {"lang": "en", "year": 2024}
    [bad] = corpus.bad_lines
    assert bad.reason.startswith("2 line(s)") and "object `metadata`" in bad.reason
    store = VectorStore(tmp_path / "q")
    try:
        ingest(store, embedder, "c", [doc], progress=False)
        [(chunk, _)] = stored(store, "c").values()
        assert chunk.metadata == {"lang": "en", "year": 2024}
    finally:
        store.close()


def test_one_file_is_one_source_however_its_path_is_spelled(tmp_path, monkeypatch):
    """Found by an audit: `docs/x.md`, `$PWD/docs/x.md` and `x.md` from inside docs/ were
    three sources, so re-ingesting stored the chunks again and results held copies."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "x.md").write_text("A heap keeps its smallest item first.\n")
    (tmp_path / "docs" / "r.jsonl").write_text('{"text": "Queues pass items."}\n')
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path)

    def sources(paths, root=None):
        return sorted(d.source for d in Corpus(paths, root))

    expected = ["docs/r.jsonl#1", "docs/x.md"]
    assert sources(["docs"]) == sources(["./docs/"]) == sources([str(tmp_path / "docs")])
    assert sources(["docs"]) == expected
    monkeypatch.chdir(tmp_path / "docs")
    assert sources(["."], root=tmp_path) == expected  # the same names from another folder
    assert sources(["x.md"], root=tmp_path / "elsewhere") == [str(tmp_path / "docs" / "x.md")]
    # A root that is not a folder would name every file anew (stored again): refused.
    (tmp_path / "elsewhere").rmdir()
    for root in (tmp_path / "elsewhere", tmp_path / "docs" / "x.md"):
        with pytest.raises(IngestError, match="is not a folder"):
            Corpus(["x.md"], root)


def test_unusable_files_are_skipped_by_name_and_the_rest_ingested(tmp_path):
    folder = mixed_folder(tmp_path)
    data = tmp_path / "q"
    args = ["rag", "ingest", str(folder), "--collection", "c", "--data-dir", str(data)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    out = result.output
    assert f"skipped {folder / 'samples.jsonl'}: no JSON object with a string `text` field" in out
    assert f"skipped {folder / 'binary.txt'}: binary file" in out
    assert f"skipped {folder / 'latin1.rst'}: not UTF-8 text" in out
    assert f"skipped {folder / 'partly.jsonl'}:2: 1 line(s) without" in out
    assert "3 of 6 files read (3 skipped, 1 with bad lines)" in out
    store = VectorStore(data)
    sources = {chunk.source for chunk, _ in stored(store, "c").values()}
    store.close()
    assert sources == {str(folder / "good.md"), str(folder / "sub" / "notes.txt"), "q"}

    strict = CliRunner().invoke(app, [*args, "--strict"])
    assert (
        strict.exit_code == 1 and "3 file(s) skipped, 1 with bad lines (--strict)" in strict.output
    )

    for name in ("good.md", "sub/notes.txt", "partly.jsonl"):
        (folder / name).unlink()
    nothing = CliRunner().invoke(app, [*args, "--collection", "d"])
    assert nothing.exit_code == 1 and "no file could be ingested" in nothing.output
    store = VectorStore(data)  # and it left no empty collection "d" to list and search
    assert store.collections() == ["c"]
    store.close()
    # Bad values are one line and exit 1, as over HTTP, not Click's box (exit 2) or a
    # silent exit 0 with nothing (or 1,000 results) printed.
    query = ["rag", "query", "x", "--collection", "c", "--data-dir", str(data)]
    for bad, says in (
        ([*args, "--source-root", str(tmp_path / "nothere")], "is not a folder"),
        ([*query, "--top-k", "0"], "--top-k must be in 1..100"),
        ([*query, "--top-k", "1000"], "--top-k must be in 1..100"),
        (["rag", "query", " ", "--collection", "c", "--data-dir", str(data)], "empty"),
    ):
        result = CliRunner().invoke(app, bad)
        assert result.exit_code == 1 and says in result.output, (bad, result.output)


def test_missing_path_and_oversized_chunks_are_clear_errors(tmp_path, corpus):
    runner = CliRunner()
    missing = runner.invoke(app, ["rag", "ingest", str(tmp_path / "nope"), "--collection", "c"])
    assert missing.exit_code == 1 and "no such file or folder" in missing.output
    too_big = runner.invoke(
        app,
        ["rag", "ingest", str(corpus), "--collection", "c", "--data-dir", str(tmp_path / "q")]
        + ["--max-tokens", "300"],
    )
    assert too_big.exit_code == 1
    assert "do not fit the embedder's window (254 pieces" in too_big.output
    assert "Traceback" not in too_big.output
    # Found by an audit: a URL for the in-process store was silently ignored.
    url = runner.invoke(
        app, ["rag", "ingest", str(corpus), "--collection", "c", "--store-url", "http://q:6333"]
    )
    assert url.exit_code != 0 and "--store-url is for a Qdrant or Milvus server" in url.output


def test_chunks_fit_the_window_whole_and_the_tokenizer_does_not_warn(embedder, caplog, capfd):
    long_sentence = " ".join(f"word{i} and more" for i in range(400))  # ~1,600 pieces
    blob = "QmFzZTY0" * 700  # one 5,600-character "word": ~2,000 pieces, no space to cut at
    text = f"# Data\n\nShort first sentence. {long_sentence}. Then {blob} ends it.\n"
    embedder.model.tokenizer.deprecation_warnings.clear()  # transformers warns once per tokenizer
    with caplog.at_level(logging.WARNING):
        chunks = chunk_text(text, "d.md", embedder.count_pieces, ChunkSettings(254, 40))
    assert "longer than the specified maximum" not in caplog.text + "".join(capfd.readouterr())
    limit = embedder.max_text_pieces
    assert limit == 254 and all(embedder.count_pieces(c.text) <= limit for c in chunks)
    # Nothing is lost: every character that is not whitespace is inside some chunk.
    covered = np.zeros(len(text), dtype=bool)
    for c in chunks:
        covered[c.start : c.end] = True
    body = text.index("Short")
    assert all(covered[i] for i in range(body, len(text)) if not text[i].isspace())


def test_chunker_cuts_the_same_chunks_as_the_previous_one(embedder, corpus):
    """The summed counts cut where the old chunker's re-counting did. Sections with a
    sentence longer than a chunk are left out: those now pack word by word (below)."""
    import ingest_baseline

    old_count = ingest_baseline.old_count_pieces(embedder)
    compared = 0
    for doc in Corpus([str(corpus)]):
        for settings in (ChunkSettings(), ChunkSettings(60, 15)):
            new = chunk_text(doc.text, doc.source, embedder.count_pieces, settings, doc.title)
            old = ingest_baseline.chunk_text(doc.text, doc.source, old_count, settings, doc.title)
            fits = [
                all(embedder.count_pieces(doc.text[a:b]) <= settings.max_tokens
                    for a, b in sentences(doc.text, start, end))
                for _, start, end in sections(doc.text)
            ]  # fmt: skip
            if all(fits):
                assert [c.id for c in new] == [c.id for c in old], doc.source
                compared += 1
    assert compared >= 4


def test_a_long_sentence_packs_with_its_neighbours_leaving_no_remnant(embedder):
    """A table row's `|` before a line longer than a chunk was a chunk of one character
    that outranked whole passages for short queries (found in the Python docs corpus)."""
    row = " ".join(f"cell{i} value" for i in range(150))  # ~600 pieces: three chunks' worth
    text = f"Table\n=====\n\nThe table below.\n\n|\n{row}\n\nAfter it.\n"
    settings = ChunkSettings(200, 40)
    chunks = chunk_text(text, "t.rst", embedder.count_pieces, settings)
    assert min(len(c.text) for c in chunks) > 100, [c.text[:30] for c in chunks]
    assert chunks[0].text.startswith("The table below.")
    assert all(embedder.count_pieces(c.text) <= 200 for c in chunks)
    # Consecutive chunks still overlap inside the long line, by at most the overlap.
    overlaps = [text[after.start : before.end] for before, after in itertools.pairwise(chunks)]
    assert overlaps and all(o and embedder.count_pieces(o) <= 40 for o in overlaps), overlaps


@pytest.mark.parametrize("pipeline", [True, False])
def test_each_stored_vector_is_its_own_chunks_embedding(tmp_path, embedder, corpus, pipeline):
    files = sorted(str(f) for f in corpus.iterdir())[:2]
    store = VectorStore(tmp_path / "q")
    result = ingest(
        store,
        embedder,
        "c",
        Corpus(files),
        batch_size=8,
        progress=False,
        pipeline=pipeline,
        window=16,
    )
    points = stored(store, "c")
    store.close()
    assert result["embedded"] == result["chunks"] == len(points) == result["total"] > 16
    texts = [chunk.text for chunk, _ in points.values()]
    vectors = np.array([vector for _, vector in points.values()], dtype=np.float32)
    alone = np.stack([embedder.encode([t])[0] for t in texts[:12]])  # [12, D], one call each
    assert np.min(np.sum(vectors[:12] * alone, axis=1)) > 0.9999


def test_a_failing_embedder_stops_the_ingest_with_its_error(tmp_path, embedder):
    class Broken:
        dim, max_text_pieces = embedder.dim, embedder.max_text_pieces
        count_pieces = staticmethod(embedder.count_pieces)

        def encode(self, texts):
            raise RuntimeError("embedder exploded")

    store = VectorStore(tmp_path / "q")
    docs = [Document(f"Sentence {i} about heaps.", f"d{i}") for i in range(5)]
    with pytest.raises(RuntimeError, match="embedder exploded"):
        ingest(store, Broken(), "c", docs, batch_size=2, progress=False)
    with pytest.raises(IngestError, match="do not fit"):
        ingest(store, embedder, "c", docs, ChunkSettings(255, 10), progress=False)
    store.close()


KILLER = textwrap.dedent(
    """
    import os, signal, sys
    import atlas_server.rag.store as store_module
    from atlas_server.cli import app

    calls = 0
    open_store = store_module.open_store

    def open_store_that_dies(*args, **kwargs):
        store = open_store(*args, **kwargs)
        upsert = store.upsert  # the back end's own method, whichever back end opened

        def upsert_then_die(*a, **k):
            global calls
            upsert(*a, **k)
            calls += 1
            if calls == 3:  # killed mid-way: no clean-up, no flush, nothing after this point
                os.kill(os.getpid(), signal.SIGKILL)

        store.upsert = upsert_then_die
        return store

    store_module.open_store = open_store_that_dies
    sys.argv = ["atlas"] + sys.argv[1:]
    app()
    """
)


def test_a_killed_ingest_rerun_continues_and_never_duplicates(tmp_path, embedder, corpus):
    data = tmp_path / "q"
    args = ["rag", "ingest", str(corpus), "--collection", "c", "--data-dir", str(data)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    killed = subprocess.run(
        [sys.executable, "-c", KILLER, *args, "--batch-size", "16", "--backend", "fp32"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    store = VectorStore(data)
    before = set(stored(store, "c"))
    # Three documents were written before the kill, each whole; the fourth not at all (a
    # document is written once all its chunks are embedded: never a fragment).
    by_source = {
        doc.source: {
            c.id for c in chunk_text(doc.text, doc.source, embedder.count_pieces, ChunkSettings())
        }
        for doc in Corpus([str(corpus)])
    }
    whole = [source for source, ids in by_source.items() if ids <= before]
    assert len(whole) == 3 and before == set().union(*(by_source[s] for s in whole))
    result = ingest(store, embedder, "c", Corpus([str(corpus)]), batch_size=16, progress=False)
    after = stored(store, "c")
    store.close()
    everything = expected_ids(embedder, corpus)
    assert set(after) == everything and result["total"] == len(everything)  # no duplicates
    assert result["already_stored"] == len(before)
    assert result["embedded"] == len(everything) - len(before)
    again = VectorStore(data)
    rerun = ingest(again, embedder, "c", Corpus([str(corpus)]), progress=False)
    again.close()
    assert rerun["embedded"] == 0 and rerun["total"] == len(everything)


def test_bf16_and_int8_backends_stay_close_to_fp32(embedder, corpus):
    from atlas_server.rag.embedding import Embedder

    texts = [
        c.text
        for c in chunk_text(
            (corpus / "json.md").read_text(), "j", embedder.count_pieces, ChunkSettings()
        )
    ][:24]
    reference = embedder.encode(texts)  # [24, D]
    for backend, floor in (("bf16", 0.999), ("int8", 0.9)):
        other = Embedder(backend=backend)
        assert other.backend == backend
        vectors = other.encode(texts)
        cosine = np.sum(vectors * reference, axis=1)
        assert cosine.min() > floor and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
        assert cosine.mean() < 0.999999, backend  # it really computes differently


def test_rag_query_with_a_server_config_searches_that_servers_store(tmp_path):
    """`atlas rag query --config server.toml` used to take only the config's plugin
    options and search the default store; it now opens the store the server would (its
    data_dir, store_options), and a store flag still overrides it."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "heap.md").write_text("# heapq\n\nA heap is a priority queue kept as a list.\n")
    data = tmp_path / "store"
    runner = CliRunner()
    ingest_args = ["rag", "ingest", str(docs), "--collection", "notes", "--data-dir", str(data)]
    assert runner.invoke(app, ingest_args).exit_code == 0
    config = tmp_path / "server.toml"
    config.write_text(f'[rag]\ndata_dir = "{data}"\n')
    query = ["rag", "query", "priority queue", "--collection", "notes", "--config", str(config)]
    found = runner.invoke(app, query)
    assert found.exit_code == 0, found.output
    assert "heap.md" in found.output
    elsewhere = runner.invoke(app, [*query, "--data-dir", str(tmp_path / "empty")])
    assert elsewhere.exit_code == 1 and "notes" in elsewhere.output  # no such collection there
    config.write_text(f'[rag]\ndata_dir = "{data}"\nstore_options = {{hnsw_eff = 1}}\n')
    typo = runner.invoke(app, query)
    assert typo.exit_code == 1 and "'hnsw_eff'" in typo.output


EARLY_KILLER = textwrap.dedent(
    """
    import os, signal, sys
    from atlas_server.rag import embedding
    from atlas_server.cli import app

    def encode_then_die(self, *a, **k):  # killed while the first document is embedded
        os.kill(os.getpid(), signal.SIGKILL)

    embedding.Embedder.encode = encode_then_die
    sys.argv = ["atlas"] + sys.argv[1:]
    app()
    """
)


def test_an_ingest_killed_before_its_first_write_leaves_no_collection(tmp_path, corpus):
    """The collection is made at the first write: a kill while the first document is
    embedded left an empty collection listed (and searched) after the restart."""
    data = tmp_path / "q"
    args = ["rag", "ingest", str(corpus), "--collection", "c", "--data-dir", str(data)]
    killed = subprocess.run(
        [sys.executable, "-c", EARLY_KILLER, *args, "--backend", "fp32"],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    store = VectorStore(data)
    try:
        assert not store.exists("c")
    finally:
        store.close()


def test_a_bad_or_unknown_collection_is_refused_before_the_embedder_loads(
    tmp_path, corpus, monkeypatch
):
    """QA: `atlas rag ingest --collection 'bad name!'` and `atlas rag query --collection
    nosuch` loaded the embedder (seconds) before saying what was wrong."""
    import atlas_server.rag.embedding as embedding

    def no_embedder(*args, **kwargs):
        raise AssertionError("the embedder was loaded")

    monkeypatch.setattr(embedding, "Embedder", no_embedder)
    data = str(tmp_path / "q")
    runner = CliRunner()
    bad = runner.invoke(
        app, ["rag", "ingest", str(corpus), "--collection", "bad name!", "--data-dir", data]
    )
    assert bad.exit_code == 1 and "collection names are" in bad.output, bad.output
    unknown = runner.invoke(
        app, ["rag", "query", "x", "--collection", "nosuch", "--data-dir", data]
    )
    assert unknown.exit_code == 1, unknown.output
    assert "collection 'nosuch' does not exist" in unknown.output
    assert len(unknown.output.strip().splitlines()) == 1


def test_ingest_quiet_draws_no_progress(tmp_path, corpus):
    """QA: `atlas rag ingest` had no -q (`atlas tokenizer train` has one)."""
    data = str(tmp_path / "q")
    args = ["rag", "ingest", str(corpus), "--collection", "c", "--data-dir", data]
    loud = CliRunner().invoke(app, args)
    quiet = CliRunner().invoke(app, [*args, "--collection", "d", "-q"])
    assert loud.exit_code == 0 and quiet.exit_code == 0, quiet.output
    assert "ingesting into c" in loud.output and "ingesting into" not in quiet.output
    assert "collection 'd' now holds" in quiet.output  # the summary still comes
