"""Collection folders of the back ends that keep them on disk (`embedded`, `faiss`, and
qdrant-client's local mode): the longest valid name can be deleted (QA F13), and the trash
of a delete that a crash interrupted is removed when the store opens again (QA F11).
"""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from atlas_server.rag.store import StoreError, open_store
from atlas_server.rag.stores import folder
from atlas_server.rag.types import Chunk

DIM = 4
LONGEST = "L" * 255  # store.check_name allows 1-255 characters


def opener(name: str):
    if name == "faiss":
        pytest.importorskip("faiss")
    return lambda path: open_store(name, path)


def fill(store, name: str) -> None:
    chunk = Chunk(str(uuid.uuid4()), "hello", "s.md", None, 0, 5, {})
    store.ensure_collection(name, DIM)
    store.upsert(name, [chunk], np.ones((1, DIM), dtype=np.float32))


@pytest.mark.parametrize("backend", ["embedded", "faiss", "qdrant"])
def test_longest_collection_name_can_be_deleted(backend, tmp_path):
    store = opener(backend)(tmp_path)
    try:
        fill(store, LONGEST)
        assert store.delete_collection(LONGEST) is True  # was OSError: File name too long
        assert not store.exists(LONGEST) and store.collections() == []
    finally:
        store.close()
    if backend != "qdrant":  # nothing left behind, trash included
        assert list((tmp_path / "collections").iterdir()) == []


def test_a_delete_that_cannot_rename_says_why(tmp_path):
    with pytest.raises(StoreError, match="cannot delete the collection folder"):
        folder.remove_tree(tmp_path / "gone")


@pytest.mark.parametrize("backend", ["embedded", "faiss"])
def test_an_interrupted_delete_leaves_no_trash_after_reopening(backend, tmp_path, monkeypatch):
    open_ = opener(backend)
    store = open_(tmp_path)
    fill(store, "keep")
    fill(store, "victim")
    # "Killed" between the rename and the removal: the trash stays behind.
    monkeypatch.setattr(folder.shutil, "rmtree", lambda *a, **k: None)
    store.delete_collection("victim")
    monkeypatch.undo()
    store.close()
    collections = tmp_path / "collections"
    # and one left by an older Atlas (`.deleted-NAME-UUID`)
    (collections / f".deleted-old-{uuid.uuid4().hex}" / "sub").mkdir(parents=True)
    assert len([p for p in collections.iterdir() if p.name.startswith(".deleted-")]) == 2

    store = open_(tmp_path)
    try:
        assert sorted(p.name for p in collections.iterdir()) == ["keep"]
        assert store.collections() == ["keep"] and store.count("keep") == 1
    finally:
        store.close()
