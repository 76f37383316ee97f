"""The vector store contract on every built-in back end, and what is theirs alone.

The contract itself is `atlas_server.testing.store_contract.StoreContract` (shipped with
Atlas, so a third-party back end's own tests run it: docs/plugins.md). Here it runs against
every built-in back end, opened by name through the plugin host as the server opens it:
`embedded` (Qdrant Edge; once with its defaults, where these small collections are
searched exactly, and once with tiny thresholds so HNSW indexes are built), `qdrant`
(qdrant-client's local mode; a real Qdrant server too when ATLAS_TEST_QDRANT_URL is set),
`milvus` (a real Milvus engine started by Milvus Lite), and `faiss` (exact, and with a
tiny `exact_below` so the IVF index is used). Dense results are checked against exact
NumPy search over the same vectors. The module's own tests check what only the built-ins
promise: one process per folder, folders of one back end refused by another, the default
folder, choosing a back end by config, a plugin's store registered and a bad one named.
"""

from __future__ import annotations

import os

import pytest

from atlas_server.plugins import get_plugin_host
from atlas_server.rag.store import StoreError, VectorStore, open_store
from atlas_server.testing.store_contract import DIM, Backend, StoreContract, make_chunks

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


class TestBuiltinBackEnds(StoreContract):
    """The contract, once per entry of BACKENDS."""

    @pytest.fixture(scope="class", params=list(BACKENDS))
    def backend(self, request) -> Backend:
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
        return Backend(
            lambda folder: open_store(name, folder, url, options=options), ann, name, options, url
        )


# --- what only the built-in back ends promise ------------------------------------------------


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
