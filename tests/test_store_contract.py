"""One contract every vector store back end passes (see atlas_server/rag/store.py).

Each test runs against every built-in back end, opened by name through the plugin host as
the server opens it: `embedded` (Qdrant Edge; once with its defaults, where these small
collections are searched exactly, and once with tiny thresholds so HNSW indexes are
built), `qdrant` (qdrant-client's local mode; a real Qdrant server too when
ATLAS_TEST_QDRANT_URL is set), `milvus` (a real Milvus engine started by Milvus Lite),
and `faiss` (exact, and with a tiny `exact_below` so the IVF index is used). Dense results
are checked against exact NumPy search over the same vectors.
A third-party back end can reuse the suite: add its name and options to BACKENDS.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

from atlas_server.plugins import get_plugin_host
from atlas_server.rag.store import StoreError, VectorStore, open_store
from atlas_server.rag.types import Chunk

DIM, N = 16, 300
TOPICS = [
    "heap queue priority insert",
    "json parse decode object",
    "socket network connect timeout",
    "regular expression match group",
    "file open read write",
    "thread lock wait condition",
]

# id -> (store name, options, needs a url from the environment, ANN (not exact) search)
BACKENDS = {
    "embedded": ("embedded", {}, None, False),
    "embedded-hnsw": (
        "embedded",
        {"indexing_threshold_kb": 1, "full_scan_threshold_kb": 1, "optimize_every": 100_000},
        None,
        True,
    ),
    "qdrant-local": ("qdrant", {}, None, False),
    "qdrant-server": ("qdrant", {}, "ATLAS_TEST_QDRANT_URL", True),
    "milvus-lite": ("milvus", {}, None, False),
    "faiss": ("faiss", {}, None, False),
    "faiss-ivf": ("faiss", {"exact_below": 100, "nprobe": 48}, None, True),
}


def make_chunks(n: int = N, seed: int = 0) -> tuple[list[Chunk], np.ndarray]:
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


@pytest.fixture(scope="module", params=list(BACKENDS))
def backend(request):
    """(opener, is_ann): opener(folder) opens the back end on that location."""
    name, options, url_env, ann = BACKENDS[request.param]
    if name == "milvus":
        pytest.importorskip("pymilvus")
        pytest.importorskip("milvus_lite")
    if name == "faiss":
        pytest.importorskip("faiss")
    url = None
    if url_env:
        url = os.environ.get(url_env)
        if not url:
            pytest.skip(f"set {url_env} to run the contract against a real server")
    return (lambda folder: open_store(name, folder, url, options=options)), ann


@pytest.fixture(scope="module")
def store(backend, tmp_path_factory):
    opener, _ = backend
    s = opener(tmp_path_factory.mktemp("store"))
    yield s
    s.close()


def fill(store, name: str) -> tuple[str, list[Chunk], np.ndarray]:
    chunks, vectors = make_chunks()
    store.ensure_collection(name, DIM)
    for i in range(0, N, 64):
        store.upsert(name, chunks[i : i + 64], vectors[i : i + 64])
    optimize = getattr(store, "optimize", None)
    if optimize:
        optimize(name)  # builds the HNSW index where thresholds call for one
    return name, chunks, vectors


@pytest.fixture(scope="module")
def filled(store):
    """A collection holding make_chunks(), shared by the tests that only read it."""
    yield fill(store, "shared")
    store.delete_collection("shared")


@pytest.fixture
def fresh(store):
    """A collection holding make_chunks() for one test that changes it."""
    name = "c" + uuid.uuid4().hex[:12]
    yield fill(store, name)
    store.delete_collection(name)


def exact_top(vectors: np.ndarray, query: np.ndarray, k: int, allowed=None) -> list[int]:
    scores = vectors @ query  # [N]
    order = [int(i) for i in np.argsort(-scores, kind="stable")]
    return [i for i in order if allowed is None or i in allowed][:k]


def test_is_a_vector_store(store):
    assert isinstance(store, VectorStore)


def test_collections_are_listed_counted_and_deleted(store):
    name = "life" + uuid.uuid4().hex[:8]
    assert not store.exists(name) and name not in store.collections()
    store.ensure_collection(name, DIM)
    store.ensure_collection(name, DIM)  # idempotent
    assert store.exists(name) and name in store.collections() and store.count(name) == 0
    with pytest.raises(StoreError, match="-d"):
        store.ensure_collection(name, DIM + 1)
    assert store.delete_collection(name) is True
    assert not store.exists(name) and store.delete_collection(name) is False


def test_unknown_collection_is_a_store_error(store):
    with pytest.raises(StoreError, match="does not exist"):
        store.search_dense("missing-one", np.ones(DIM, np.float32), 3)
    with pytest.raises(StoreError, match="does not exist"):
        store.count("missing-one")


def test_upsert_is_idempotent_by_chunk_id(store, filled):
    name, chunks, vectors = filled
    assert store.count(name) == N
    store.upsert(name, chunks[:50], vectors[:50])  # the same ids again
    store.upsert(name, chunks[:2] + chunks[:2], np.concatenate([vectors[:2], vectors[:2]]))
    assert store.count(name) == N
    assert store.existing_ids(name, [chunks[3].id, "not-there", chunks[9].id]) == {
        chunks[3].id,
        chunks[9].id,
    }


def test_an_upsert_replaces_text_and_vector(store, fresh):
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


def test_dense_search_matches_exact_search(store, filled, backend):
    name, chunks, vectors = filled
    _, ann = backend
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


def test_a_stored_vector_finds_itself_first(store, filled):
    name, chunks, vectors = filled
    for i in (0, 57, 299):
        assert store.search_dense(name, vectors[i], 1)[0][0].id == chunks[i].id


def test_bm25_ranks_rare_terms_first_and_ignores_empty_queries(store, filled):
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
def test_filters_restrict_dense_and_bm25_results(store, filled, backend, filters, keep):
    name, chunks, vectors = filled
    _, ann = backend
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


def test_bad_filters_are_store_errors(store, filled):
    name, _, vectors = filled
    with pytest.raises(StoreError, match="not both"):
        store.search_dense(name, vectors[0], 3, {"n": [1, "x"]})


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


@pytest.fixture(scope="module")
def typed(store):
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
def test_filters_compare_json_types_and_read_dots_as_nesting(store, typed, filters, sources):
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
def test_bad_filters_are_store_errors_naming_the_rule(store, typed, filters, message):
    name, vectors = typed
    with pytest.raises(StoreError, match=message):
        store.search_dense(name, vectors[0], 3, filters)
    with pytest.raises(StoreError, match=message):
        store.search_bm25(name, "typed", 3, filters)


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


def test_a_collection_written_by_another_process_is_searched_and_extended(
    backend, tmp_path, request
):
    """Found on Milvus Lite: a collection another process wrote starts 'released', so
    search, get and re-ingest failed after a restart while count worked."""
    opener, _ = backend
    name, options, url_env, _ = BACKENDS[request.node.callspec.params["backend"]]
    if url_env:
        pytest.skip("a server outlives its clients; this checks in-process stores")
    subprocess.run(
        [sys.executable, "-c", WRITER, name, str(tmp_path), repr(options)],
        check=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    store = opener(tmp_path)
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


def test_delete_removes_chunks_from_count_and_results(store, fresh):
    name, chunks, vectors = fresh
    gone = [chunks[7].id, chunks[8].id, "never-stored"]
    assert store.delete(name, gone) == 2
    assert store.count(name) == N - 2
    assert store.existing_ids(name, gone) == set()
    assert store.search_dense(name, vectors[8], 1)[0][0].id != chunks[8].id
    assert all(c.id != chunks[7].id for c, _, _ in store.search_bm25(name, "xylophone", 5))
    assert store.delete(name, gone) == 0


@pytest.mark.parametrize("portable", [False, True], ids=["backend", "portable-default"])
def test_delete_sources_removes_exactly_those_documents(store, fresh, portable):
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


def test_iter_chunks_returns_every_chunk_with_its_vector(store, filled):
    name, chunks, vectors = filled
    seen = {c.id: (c, np.asarray(v, np.float32)) for c, v in store.iter_chunks(name, batch_size=64)}
    assert set(seen) == {c.id for c in chunks}
    for c, v in zip(chunks, vectors, strict=True):
        assert seen[c.id][0] == c
        np.testing.assert_allclose(seen[c.id][1], v, atol=1e-5)


def test_data_survives_close_and_reopen(backend, tmp_path):
    """A second store on the same location sees what the first stored (after close)."""
    opener, _ = backend
    chunks, vectors = make_chunks(120, seed=3)
    first = opener(tmp_path)
    name = "persist" + uuid.uuid4().hex[:8]
    try:
        first.ensure_collection(name, DIM)
        first.upsert(name, chunks, vectors)
        first.delete(name, [chunks[0].id])
        expected = [c.id for c, _, _ in first.search_dense(name, vectors[10], 5)]
    finally:
        first.close()
        first.close()  # idempotent
    again = opener(tmp_path)
    try:
        assert name in again.collections() and again.count(name) == 119
        assert [c.id for c, _, _ in again.search_dense(name, vectors[10], 5)] == expected
        assert again.search_bm25(name, "xylophone", 1)[0][0].id == chunks[7].id
        again.upsert(name, chunks[:5], vectors[:5])  # writes still work after reopening
        assert again.count(name) == 120
        again.delete_collection(name)
    finally:
        again.close()


@pytest.mark.parametrize("name", ["embedded", "faiss"])
def test_folder_stores_allow_one_process_per_folder(tmp_path, name):
    if name == "faiss":
        pytest.importorskip("faiss")
    first = open_store(name, tmp_path)
    try:
        with pytest.raises(StoreError, match="one process per data directory"):
            open_store(name, tmp_path)
    finally:
        first.close()
    open_store(name, tmp_path).close()  # released on close


@pytest.mark.parametrize(
    ("first", "second"),
    [("embedded", "faiss"), ("faiss", "embedded"), ("embedded", "qdrant"),
     ("faiss", "qdrant"), ("qdrant", "faiss")],
)  # fmt: skip
@pytest.mark.parametrize("marked", [True, False])
def test_back_ends_refuse_each_others_folders(tmp_path, first, second, marked):
    """Found by an audit: faiss and embedded both keep collections/NAME/, so a faiss
    server on an embedded folder wrote into its collections, and deleting one there
    deleted the other's. Folders from before the marker are recognised by their layout."""
    if "faiss" in (first, second):
        pytest.importorskip("faiss")
    store = open_store(first, tmp_path)
    try:
        store.ensure_collection("manual", DIM)
    finally:
        store.close()
    if not marked:
        (tmp_path / ".atlas-store").unlink()
    with pytest.raises(StoreError, match=f"holds the {first} store's data"):
        open_store(second, tmp_path)
    again = open_store(first, tmp_path)  # its owner still opens it, collection and all
    try:
        assert again.exists("manual")
    finally:
        again.close()


@pytest.mark.parametrize("name", ["embedded", "faiss", "qdrant"])
def test_a_data_dir_that_cannot_be_a_folder_is_a_store_error(tmp_path, name):
    if name == "faiss":
        pytest.importorskip("faiss")
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(StoreError, match="cannot use the data dir"):
        open_store(name, tmp_path / "a-file")


def test_default_folder_honours_atlas_home(tmp_path, monkeypatch):
    monkeypatch.setenv("ATLAS_HOME", str(tmp_path / "home"))
    store = open_store("embedded")
    try:
        assert store.location == str(tmp_path / "home" / "rag" / "embedded")
        store.ensure_collection("mine", DIM)
        assert (tmp_path / "home" / "rag" / "embedded" / "collections" / "mine").is_dir()
    finally:
        store.close()


def test_old_style_constructor_opens_the_default_store(tmp_path):
    store = VectorStore(tmp_path / "v")
    try:
        assert store.name == "embedded" and store.location == str(tmp_path / "v")
    finally:
        store.close()


def test_unknown_store_name_lists_the_installed_ones():
    with pytest.raises(StoreError, match="installed: .*embedded"):
        open_store("chroma-nonexistent")
    assert {"embedded", "qdrant", "milvus", "faiss"} <= set(get_plugin_host().vector_stores)


# --- choosing a back end --------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Failed to obtain server version")  # nothing listens there
def test_the_config_chooses_the_back_end(tmp_path):
    from atlas_server.config import RAGSection
    from atlas_server.rag.store import store_from_config

    pytest.importorskip("faiss")
    store = store_from_config(RAGSection(store="faiss", data_dir=str(tmp_path / "f")))
    try:
        assert store.name == "faiss" and store.location == str(tmp_path / "f")
    finally:
        store.close()
    remote = store_from_config(RAGSection(qdrant_url="http://127.0.0.1:9"))  # the old shorthand
    try:
        assert remote.name == "qdrant" and remote.location == "http://127.0.0.1:9"
    finally:
        remote.close()


def test_a_plugin_registers_a_store_and_a_bad_factory_is_named(tmp_path):
    from atlas_server.hookspecs import hookimpl
    from atlas_server.plugins import PluginHost
    from atlas_server.rag.stores.faiss import FaissStore

    pytest.importorskip("faiss")

    class Shelf(FaissStore):
        name = "shelf"

    class Plugin:
        @hookimpl
        def atlas_register_vector_stores(self, register):
            register("shelf", Shelf)
            register("not-a-store", lambda settings: object())

    host = PluginHost(discover=False)
    host.register(Plugin(), "shelf-plugin")
    store = open_store("shelf", tmp_path / "s", options={"exact_below": 5}, host=host)
    try:
        assert isinstance(store, Shelf) and store.opts == {"exact_below": 5}
        assert host.describe()[0]["registered"]["vector_stores"] == ["shelf", "not-a-store"]
    finally:
        store.close()
    with pytest.raises(StoreError, match="shelf-plugin.*does not implement"):
        open_store("not-a-store", tmp_path / "x", host=host)


def test_embedded_store_refuses_an_old_local_mode_folder(tmp_path):
    old = open_store("qdrant", tmp_path / "old")  # qdrant-client local mode, as before
    old.ensure_collection("manual", DIM)
    old.close()
    with pytest.raises(StoreError, match='store = "qdrant"'):
        open_store("embedded", tmp_path / "old")


def test_faiss_rebuilds_an_index_older_than_its_table(tmp_path):
    """A process killed between saves leaves the table ahead of the index file."""
    pytest.importorskip("faiss")
    chunks, vectors = make_chunks(60)
    store = open_store("faiss", tmp_path, options={"save_every_s": 3600})
    store.ensure_collection("c", DIM)
    store.upsert("c", chunks[:30], vectors[:30])
    store.flush()  # the index file now holds the first 30
    store.upsert("c", chunks[30:], vectors[30:])  # in SQLite only: then "killed"
    for collection in store._open.values():
        collection.db.close()
    store._folder_lock.release()
    again = open_store("faiss", tmp_path)
    try:
        assert again.count("c") == 60
        for i in (5, 45, 59):
            assert again.search_dense("c", vectors[i], 1)[0][0].id == chunks[i].id
    finally:
        again.close()
