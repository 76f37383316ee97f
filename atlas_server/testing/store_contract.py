"""The vector store contract, as a pytest suite a back end's own tests run.

What it does: `StoreContract` is a class of pytest tests that every `VectorStore` back end
(atlas_server/rag/store.py) must pass: collections created, counted and deleted; upsert
idempotent by chunk id; dense search equal to exact search (recall@10 >= 0.9 for an
approximate one); BM25 ranking; the filter language (JSON types, dotted nesting, the
errors for bad filters); delete by id and by source; `iter_chunks`; data that survives
close and reopen; and a collection another process wrote. A store plugin's test module
subclasses it and says how to open the store:

    from atlas_server.testing.store_contract import StoreContract

    class TestMyStore(StoreContract):
        store_name = "mystore"  # the name your plugin registers (installed)
        store_options = {}  # the [rag] store_options to open it with
        ann = False  # True when search_dense is approximate

and `pytest` runs it (override `open_store(folder)` to open it some other way, and the
`backend` fixture to run it over several configurations, as Atlas's tests/
test_store_contract.py does for the built-in back ends). Each store is opened on a fresh
folder of pytest's. A few checks match an error's words, as Atlas's own messages and
helpers put them: a collection that does not exist says "does not exist", a second
dimension for one names it as "16-d", and bad filters raise `check_filters`' errors (call
it: store.py's helpers are there to be used).
What it does not do: check what is a back end's own (folder locks, servers, tuning), or
run without pytest, which it imports (Atlas's `test` extra); Atlas itself never imports
this module.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

try:
    import pytest
except ImportError as e:  # pragma: no cover - a test helper without the test tool
    raise ImportError(
        "atlas_server.testing.store_contract is a pytest suite: pip install pytest"
    ) from e

from ..rag.store import StoreError, VectorStore, open_store
from ..rag.types import Chunk

__all__ = ["DIM", "Backend", "StoreContract", "exact_top", "fill", "make_chunks"]

DIM, N = 16, 300  # the dimension and number of the chunks every test stores

TOPICS = [
    "heap queue priority insert",
    "json parse decode object",
    "socket network connect timeout",
    "regular expression match group",
    "file open read write",
    "thread lock wait condition",
]


def make_chunks(n: int = N, seed: int = 0) -> tuple[list[Chunk], np.ndarray]:
    """`n` chunks on six topics (metadata lang, n, draft) and their unit vectors [n, DIM]."""
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n, DIM)).astype(np.float32)  # [N, DIM]
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    chunks = []
    for i in range(n):
        text = f"Note {i} is about {TOPICS[i % len(TOPICS)]}."
        if i == 7:
            text += " The xylophone appears only here."
        chunks.append(
            Chunk(
                str(uuid.uuid5(uuid.NAMESPACE_URL, f"chunk-{seed}-{i}")),
                text,
                f"docs/{TOPICS[i % len(TOPICS)].split()[0]}.md",
                None if i % 5 == 0 else f"Section {i % 4}",
                i * 100,
                i * 100 + len(text),
                {"lang": "en" if i % 2 else "de", "n": i % 3, "draft": i % 4 == 0},
            )
        )
    return chunks, vectors


def fill(store, name: str) -> tuple[str, list[Chunk], np.ndarray]:
    """Collection `name` holding make_chunks(), written in batches of 64."""
    chunks, vectors = make_chunks()
    store.ensure_collection(name, DIM)
    for i in range(0, N, 64):
        store.upsert(name, chunks[i : i + 64], vectors[i : i + 64])
    optimize = getattr(store, "optimize", None)
    if optimize:
        optimize(name)  # builds the HNSW index where thresholds call for one
    return name, chunks, vectors


def exact_top(vectors: np.ndarray, query: np.ndarray, k: int, allowed=None) -> list[int]:
    """Indices of the `k` rows nearest `query` by exact search (among `allowed`)."""
    scores = vectors @ query  # [N]
    order = [int(i) for i in np.argsort(-scores, kind="stable")]
    return [i for i in order if allowed is None or i in allowed][:k]


TYPED = [  # (source, metadata): JSON types, a key holding a dot, nesting, odd strings
    (
        "a.md",
        {
            "n": 1,
            "flag": True,
            "v.x": "dot",
            "s": "1",
            "v": {"x": "nest", "b": True},
            "a b": "space",
            "\u00a8\u0084": "control",
            "café": "é",
            "t\tab": "tab",
        },
    ),  # fmt: skip
    ("b.md", {"n": 2, "flag": False, "e": "Straße", "q": 'say "hi" \\ now\n'}),
]


WRITER = """
import sys
import numpy as np
from atlas_server.rag.store import open_store
from atlas_server.rag.types import Chunk
name, folder, options = sys.argv[1], sys.argv[2], eval(sys.argv[3])
store = open_store(name, folder, options=options)
store.ensure_collection("written", 4)
chunk = Chunk("00000000-0000-0000-0000-000000000001", "alpha heap", "a.md", None, 0, 10)
store.upsert("written", [chunk], np.eye(1, 4, dtype=np.float32))
store.close()
"""


@dataclass(frozen=True)
class Backend:
    """How the suite opens the back end under test."""

    open: Callable[[Path], VectorStore]  # a store on this folder (a server's ignores it)
    ann: bool = False  # search_dense is approximate: recall is checked, not exact order
    name: str | None = None  # as registered: a second process opens it by name
    options: dict[str, Any] = field(default_factory=dict)  # its store_options
    url: str | None = None  # a server's: it outlives its clients (no second-process check)


class StoreContract:
    """The contract tests; subclass as `TestSomething` (module docstring)."""

    store_name: str | None = None
    store_options: dict[str, Any] = {}  # read, never changed
    store_url: str | None = None
    ann = False

    def open_store(self, folder: Path) -> VectorStore:
        """The store under test, on `folder`."""
        if self.store_name is None:
            raise NotImplementedError(
                f"{type(self).__name__}: set store_name (as registered) or override open_store"
            )
        return open_store(self.store_name, folder, self.store_url, options=dict(self.store_options))

    @pytest.fixture(scope="class")
    def backend(self) -> Backend:
        return Backend(
            self.open_store, self.ann, self.store_name, dict(self.store_options), self.store_url
        )

    @pytest.fixture(scope="class")
    def store(self, backend, tmp_path_factory):
        s = backend.open(tmp_path_factory.mktemp("store"))
        yield s
        s.close()

    @pytest.fixture(scope="class")
    def filled(self, store):
        """A collection holding make_chunks(), shared by the tests that only read it."""
        yield fill(store, "shared")
        store.delete_collection("shared")

    @pytest.fixture
    def fresh(self, store):
        """A collection holding make_chunks() for one test that changes it."""
        name = "c" + uuid.uuid4().hex[:12]
        yield fill(store, name)
        store.delete_collection(name)

    def test_is_a_vector_store(self, store):
        assert isinstance(store, VectorStore)

    def test_collections_are_listed_counted_and_deleted(self, store):
        name = "life" + uuid.uuid4().hex[:8]
        assert not store.exists(name) and name not in store.collections()
        store.ensure_collection(name, DIM)
        store.ensure_collection(name, DIM)  # idempotent
        assert store.exists(name) and name in store.collections() and store.count(name) == 0
        with pytest.raises(StoreError, match="-d"):
            store.ensure_collection(name, DIM + 1)
        assert store.delete_collection(name) is True
        assert not store.exists(name) and store.delete_collection(name) is False

    def test_unknown_collection_is_a_store_error(self, store):
        with pytest.raises(StoreError, match="does not exist"):
            store.search_dense("missing-one", np.ones(DIM, np.float32), 3)
        with pytest.raises(StoreError, match="does not exist"):
            store.count("missing-one")

    def test_upsert_is_idempotent_by_chunk_id(self, store, filled):
        name, chunks, vectors = filled
        assert store.count(name) == N
        store.upsert(name, chunks[:50], vectors[:50])  # the same ids again
        store.upsert(name, chunks[:2] + chunks[:2], np.concatenate([vectors[:2], vectors[:2]]))
        assert store.count(name) == N
        assert store.existing_ids(name, [chunks[3].id, "not-there", chunks[9].id]) == {
            chunks[3].id,
            chunks[9].id,
        }

    def test_an_upsert_replaces_text_and_vector(self, store, fresh):
        name, chunks, vectors = fresh
        old = chunks[11]
        new = Chunk(
            old.id, "Replaced text mentions a marimba.", old.source, "New", 1, 2, {"lang": "fr"}
        )
        moved = -vectors[11]
        store.upsert(name, [new], moved[None, :])
        assert store.count(name) == N
        top = store.search_dense(name, moved, 1)[0]
        assert top[0] == new and abs(top[1] - 1.0) < 1e-4
        assert store.search_bm25(name, "marimba", 3)[0][0].id == old.id
        assert store.search_bm25(name, "xylophone", 3)[0][0].id == chunks[7].id
        np.testing.assert_allclose(store.vectors(name, [old.id])[old.id], moved, atol=1e-5)

    def test_dense_search_matches_exact_search(self, store, filled, backend):
        name, chunks, vectors = filled
        ann = backend.ann
        rng = np.random.default_rng(1)
        found = total = 0
        for _ in range(20):
            q = rng.standard_normal(DIM).astype(np.float32)
            q /= np.linalg.norm(q)
            hits = store.search_dense(name, q, 10)
            expected = exact_top(vectors, q, 10)
            assert len(hits) == 10
            scores = [s for _, s, _ in hits]
            assert scores == sorted(scores, reverse=True)
            index = {c.id: i for i, c in enumerate(chunks)}
            for chunk, score, vector in hits:
                i = index[chunk.id]
                assert chunk == chunks[i]  # payload round trip: text, heading None, metadata
                assert abs(score - float(vectors[i] @ q)) < 1e-4  # cosine similarity
                np.testing.assert_allclose(np.asarray(vector, np.float32), vectors[i], atol=1e-5)
            got = [index[c.id] for c, _, _ in hits]
            if not ann:
                assert got == expected
            found += len(set(got) & set(expected))
            total += 10
        assert found / total >= 0.9  # recall@10 of an ANN index on this small set

    def test_a_stored_vector_finds_itself_first(self, store, filled):
        name, chunks, vectors = filled
        for i in (0, 57, 299):
            assert store.search_dense(name, vectors[i], 1)[0][0].id == chunks[i].id

    def test_bm25_ranks_rare_terms_first_and_ignores_empty_queries(self, store, filled):
        name, chunks, _ = filled
        hits = store.search_bm25(name, "xylophone heap", 5)
        assert hits[0][0].id == chunks[7].id
        assert all("xylophone" in c.text or "heap" in c.text for c, _, _ in hits)
        assert [s for _, s, _ in hits] == sorted((s for _, s, _ in hits), reverse=True)
        assert store.search_bm25(name, "?! ...", 5) == []
        assert len(hits[0][2]) == DIM  # the stored dense vector comes back too

    @pytest.mark.parametrize(
        ("filters", "keep"),
        [
            ({"source": "docs/json.md"}, lambda c: c.source == "docs/json.md"),
            (
                {"source": ["docs/json.md", "docs/heap.md"]},
                lambda c: c.source in ("docs/json.md", "docs/heap.md"),
            ),
            ({"lang": "en"}, lambda c: c.metadata["lang"] == "en"),
            (
                {"metadata.n": [0, 2], "lang": "de"},
                lambda c: c.metadata["n"] != 1 and c.metadata["lang"] == "de",
            ),
            ({"draft": True}, lambda c: c.metadata["draft"] is True),
            ({"heading": "Section 3"}, lambda c: c.heading == "Section 3"),
        ],
    )
    def test_filters_restrict_dense_and_bm25_results(self, store, filled, backend, filters, keep):
        name, chunks, vectors = filled
        ann = backend.ann
        allowed = {i for i, c in enumerate(chunks) if keep(c)}
        assert 0 < len(allowed) < N
        q = vectors[5] + vectors[6]
        q /= np.linalg.norm(q)
        hits = store.search_dense(name, q, 8, filters)
        assert hits and all(keep(c) for c, _, _ in hits)
        index = {c.id: i for i, c in enumerate(chunks)}
        expected = exact_top(vectors, q, 5, allowed)
        if ann:  # a filtered graph search may miss the best match, not all of the best five
            assert {index[c.id] for c, _, _ in hits} & set(expected)
        else:
            assert index[hits[0][0].id] == expected[0]
        bm25 = store.search_bm25(name, "note about json heap thread", 8, filters)
        assert bm25 and all(keep(c) for c, _, _ in bm25)

    def test_bad_filters_are_store_errors(self, store, filled):
        name, _, vectors = filled
        with pytest.raises(StoreError, match="not both"):
            store.search_dense(name, vectors[0], 3, {"n": [1, "x"]})

    @pytest.fixture(scope="class")
    def typed(self, store):
        name = "typed"
        store.ensure_collection(name, DIM)
        chunks = [
            Chunk(str(uuid.uuid5(uuid.NAMESPACE_URL, src)), f"typed {src}", src, None, 0, 9, meta)
            for src, meta in TYPED
        ]
        vectors = np.eye(len(chunks), DIM, dtype=np.float32)
        store.upsert(name, chunks, vectors)
        yield name, vectors
        store.delete_collection(name)

    @pytest.mark.parametrize(
        ("filters", "sources"),
        [
            ({"flag": True}, ["a.md"]),
            ({"flag": False}, ["b.md"]),
            ({"flag": 1}, []),  # true is not 1 ...
            ({"n": True}, []),  # ... nor 1 true
            ({"n": 1}, ["a.md"]),
            ({"n": [1, 2]}, ["a.md", "b.md"]),
            ({"n": "1"}, []),  # "1" is not 1 ...
            ({"s": 1}, []),  # ... nor 1 "1"
            ({"s": "1"}, ["a.md"]),
            ({"v.x": "nest"}, ["a.md"]),  # dots separate nested keys
            ({"metadata.v.x": "nest"}, ["a.md"]),
            ({"v.x": "dot"}, []),  # so a key holding a dot is not reached
            ({"v.b": True}, ["a.md"]),
            ({"e": "Straße"}, ["b.md"]),  # non-ASCII strings
            ({"q": 'say "hi" \\ now\n'}, ["b.md"]),  # quotes, backslashes, newlines
            ({"flag": True, "n": 1}, ["a.md"]),
            ({"a b": "space"}, ["a.md"]),  # keys no bare JSON path can name (schemathesis found
            ({"\u00a8\u0084": "control"}, ["a.md"]),  # the second: Qdrant refused the path)
            ({"café": "é"}, ["a.md"]),  # FAISS stored it as "caf\\u00e9", which no path reached
            ({"t\tab": "tab"}, ["a.md"]),
        ],
    )
    def test_filters_compare_json_types_and_read_dots_as_nesting(
        self, store, typed, filters, sources
    ):
        """One filter means the same on every back end (store.py's module docstring)."""
        name, vectors = typed
        for hits in (
            store.search_dense(name, vectors[0], 5, filters),
            store.search_bm25(name, "typed", 5, filters),
        ):
            assert sorted(c.source for c, _, _ in hits) == sources
        assert all("__atlas" not in str(c.metadata) for c, _, _ in hits)  # no private keys back

    @pytest.mark.parametrize(
        ("filters", "message"),
        [
            ({"": "x"}, "names no metadata key"),
            ({"metadata.": "x"}, "names no metadata key"),
            ({"a..b": 1}, "names no metadata key"),
            ({"a[0]": 1}, "names no metadata key"),
            ({"start": True}, "start is an integer"),
            ({"source": 1}, "source is a string"),
            ({"n": [1, "x"]}, "not both"),
        ],
    )
    def test_bad_filters_are_store_errors_naming_the_rule(self, store, typed, filters, message):
        name, vectors = typed
        with pytest.raises(StoreError, match=message):
            store.search_dense(name, vectors[0], 3, filters)
        with pytest.raises(StoreError, match=message):
            store.search_bm25(name, "typed", 3, filters)

    def test_a_collection_written_by_another_process_is_searched_and_extended(
        self, backend, tmp_path
    ):
        """Found on Milvus Lite: a collection another process wrote starts 'released', so
        search, get and re-ingest failed after a restart while count worked."""
        if backend.url:
            pytest.skip("a server outlives its clients; this checks in-process stores")
        if backend.name is None:
            pytest.skip(
                "give the store's registered name (store_name) to open it in a second process"
            )
        subprocess.run(
            [sys.executable, "-c", WRITER, backend.name, str(tmp_path), repr(backend.options)],
            check=True,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},  # what this one imports
        )
        store = backend.open(tmp_path)
        try:
            hits = store.search_dense("written", np.eye(1, 4, dtype=np.float32)[0], 3)
            assert [c.source for c, _, _ in hits] == ["a.md"]
            assert [c.source for c, _, _ in store.search_bm25("written", "heap", 3)] == ["a.md"]
            assert store.existing_ids("written", [hits[0][0].id]) == {hits[0][0].id}
            assert list(store.vectors("written", [hits[0][0].id]))
            again = Chunk("00000000-0000-0000-0000-000000000002", "beta", "b.md", None, 0, 4)
            store.upsert("written", [again], np.eye(1, 4, k=1, dtype=np.float32))
            assert store.count("written") == 2
        finally:
            store.close()

    def test_delete_removes_chunks_from_count_and_results(self, store, fresh):
        name, chunks, vectors = fresh
        gone = [chunks[7].id, chunks[8].id, "never-stored"]
        assert store.delete(name, gone) == 2
        assert store.count(name) == N - 2
        assert store.existing_ids(name, gone) == set()
        assert store.search_dense(name, vectors[8], 1)[0][0].id != chunks[8].id
        assert all(c.id != chunks[7].id for c, _, _ in store.search_bm25(name, "xylophone", 5))
        assert store.delete(name, gone) == 0

    @pytest.mark.parametrize("portable", [False, True], ids=["backend", "portable-default"])
    def test_delete_sources_removes_exactly_those_documents(self, store, fresh, portable):
        """The back end's filtered delete and the interface's portable default (read every
        chunk, delete by id) remove the same chunks: all of the named sources, nothing else."""
        name, chunks, vectors = fresh
        delete_sources = (
            (lambda *a: VectorStore.delete_sources(store, *a)) if portable else store.delete_sources
        )
        gone = {"docs/heap.md", "docs/json.md"}
        expected = [c for c in chunks if c.source in gone]
        assert delete_sources(name, [*sorted(gone), "docs/never.md"]) == len(expected) > 0
        assert store.count(name) == N - len(expected)
        left = {c.id for c, _ in store.iter_chunks(name)}
        assert left == {c.id for c in chunks if c.source not in gone}
        assert store.search_bm25(name, "heap queue", 5, {"source": "docs/heap.md"}) == []
        assert delete_sources(name, sorted(gone)) == 0
        assert delete_sources(name, []) == 0
        assert store.count(name) == N - len(expected)
        # A source is data: quotes, backslashes and filter syntax must match only themselves.
        hostile = ["we\"ird\\na'me.md", "x.md' or source != '", 'a" || true || "b', "ünï cødé.md"]
        extra = [
            Chunk(str(uuid.uuid5(uuid.NAMESPACE_URL, f"hostile-{i}")), f"odd {i}", src, None, 0, 5)
            for i, src in enumerate(hostile)
        ]
        store.upsert(name, extra, vectors[: len(extra)])
        for i, src in enumerate(hostile):
            assert delete_sources(name, [src]) == 1, src
            assert store.count(name) == N - len(expected) + len(hostile) - i - 1

    def test_iter_chunks_returns_every_chunk_with_its_vector(self, store, filled):
        name, chunks, vectors = filled
        seen = {
            c.id: (c, np.asarray(v, np.float32)) for c, v in store.iter_chunks(name, batch_size=64)
        }
        assert set(seen) == {c.id for c in chunks}
        for c, v in zip(chunks, vectors, strict=True):
            assert seen[c.id][0] == c
            np.testing.assert_allclose(seen[c.id][1], v, atol=1e-5)

    def test_data_survives_close_and_reopen(self, backend, tmp_path):
        """A second store on the same location sees what the first stored (after close)."""
        chunks, vectors = make_chunks(120, seed=3)
        first = backend.open(tmp_path)
        name = "persist" + uuid.uuid4().hex[:8]
        try:
            first.ensure_collection(name, DIM)
            first.upsert(name, chunks, vectors)
            first.delete(name, [chunks[0].id])
            expected = [c.id for c, _, _ in first.search_dense(name, vectors[10], 5)]
        finally:
            first.close()
            first.close()  # idempotent
        again = backend.open(tmp_path)
        try:
            assert name in again.collections() and again.count(name) == 119
            assert [c.id for c, _, _ in again.search_dense(name, vectors[10], 5)] == expected
            assert again.search_bm25(name, "xylophone", 1)[0][0].id == chunks[7].id
            again.upsert(name, chunks[:5], vectors[:5])  # writes still work after reopening
            assert again.count(name) == 120
            again.delete_collection(name)
        finally:
            again.close()
