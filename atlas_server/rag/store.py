"""The vector store interface, and how a back end is chosen and opened by name.

What it does: defines `VectorStore`, the one interface every back end implements, the
helpers they share (BM25 sparse vectors, filter normalisation, the default folder), and
`open_store(name, ...)`, which builds the back end registered under `name` through the
plugin host's `atlas_register_vector_stores` hook (built-ins: `plugins/stores.py`); a
factory's failure, whatever it raised, comes out of it as a StoreError naming the store
and its plugin. `GuardedStore` is a store as Atlas hands it out: an exception of the back
end's own code other than StoreError becomes a `StorePluginError` naming it.
What it does not do: chunking, embedding, or any back end's storage (`rag/stores/`).

The interface (what ingest, retrievers and the HTTP routes call):

    collections() -> list[str]                 names, sorted
    exists(name) -> bool
    ensure_collection(name, dim)               create if missing; a different dim is an error
    delete_collection(name) -> bool            False when there was none
    count(name) -> int                         chunks stored
    upsert(name, chunks, vectors)              by chunk id: the same id twice stores once
    existing_ids(name, ids) -> set[str]        which of `ids` are stored (resumable ingest)
    delete(name, ids) -> int                   remove chunks by id; returns how many were there
    delete_sources(name, sources) -> int       remove every chunk of those sources; how many
    search_dense(name, vector, top_k, filters=None) -> [(Chunk, cosine, stored vector)]
    search_bm25(name, query, top_k, filters=None)   -> [(Chunk, bm25 score, stored vector)]
    vectors(name, ids) -> {id: vector}         stored dense vectors
    iter_chunks(name, batch_size=1024) -> Iterator[(Chunk, vector)]   every chunk, any order
    close()                                    idempotent; also run at interpreter exit

Vectors are L2-normalised float32 rows (the embedder's output), so cosine = dot product.
Results come best first; scores are comparable only within one back end and one method.
An unknown collection raises `StoreError` (the service answers it as 404 collection_not_found).

Filters: `{field: value}` or `{field: [values]}` (strings or integers, not both in one
list), all fields must match. A field is a chunk field (`source`, `heading`: strings;
`start`, `end`: integers; a value of another type is an error) or a metadata key, written
`metadata.KEY` or plainly `KEY`. Every back end compares JSON values by type and value:
true is not 1 and "1" is not 1. Dots separate nested keys, as in Qdrant and MongoDB:
`a.b` is metadata["a"]["b"], so a metadata key that itself holds a dot cannot be filtered
on. A key with an empty part (`a..b`, `metadata.`) or a `[`, `]` or `"` is an error.

BM25: every back end ranks with Okapi BM25 (k1 = 1.2, b = 0.75). The Qdrant back ends store
the document side, tf * (k1 + 1) / (tf + k1 * (1 - b + b * len / avg_len)), as a sparse
vector with avg_len fixed at the chunker's typical chunk length (chunks are cut to similar
sizes, so a fixed average costs little) and let Qdrant apply the IDF at query time; terms
are lower-cased word tokens hashed to 31-bit ids. Milvus and FAISS (SQLite FTS5) use their
engines' own BM25, whose tokenisers differ slightly.

Back ends (`[rag] store = NAME`): `embedded` (default, Qdrant Edge in-process: HNSW, one
folder), `qdrant` (a Qdrant server by URL, or qdrant-client's local mode in a folder),
`milvus` (Milvus by URI, or Milvus Lite in a local file), `faiss` (a FAISS index + SQLite
in a folder). docs/rag.md says which to use at which scale.
"""

from __future__ import annotations

import hashlib
import os
import re
from abc import ABC, ABCMeta, abstractmethod
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import PluginRuntimeError, RAGError
from .types import Chunk

DENSE, SPARSE = "dense", "bm25"
K1, B, AVG_LEN = 1.2, 0.75, 120.0
DEFAULT_STORE = "embedded"
CHUNK_FIELDS = ("source", "heading", "start", "end")
CHUNK_FIELD_TYPES = {"source": str, "heading": str, "start": int, "end": int}
_WORD = re.compile(r"\w+", re.UNICODE)
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,255}$")

Hit = tuple[Chunk, float, Any]  # (chunk, score, stored dense vector)
Filters = dict[str, Any]


class StoreError(RuntimeError):
    """A vector-store problem the user can act on (lock held, unknown collection, ...)."""


class StoreFactoryError(StoreError):
    """A store's factory raised something other than StoreError (its `__cause__`): the
    store did not open. `open_store` raises it, naming the store and its plugin."""


class StorePluginError(StoreError, PluginRuntimeError):
    """A store back end's own code raised something other than StoreError (a bug, or a
    client library's exception it let through). It is a StoreError, so no retriever is
    blamed for it and `atlas rag` prints it as one line, and a PluginRuntimeError naming
    the store and its plugin, so the server answers 502 `plugin_error` and logs the
    traceback (`__cause__`). `GuardedStore` raises it."""

    def __init__(self, plugin: str, store: str, method: str, error: BaseException) -> None:
        RAGError.__init__(
            self,
            f"vector store {store!r} (plugin {plugin!r}) failed in {method}(): "
            f"{type(error).__name__}: {error}",
        )
        self.plugin, self.kind, self.name, self.method = plugin, "vector store", store, method


def atlas_data_home() -> Path:
    """Where Atlas keeps RAG data: $ATLAS_HOME/rag, else $XDG_DATA_HOME/atlas/rag
    (default ~/.local/share/atlas/rag)."""
    if os.environ.get("ATLAS_HOME"):
        return Path(os.environ["ATLAS_HOME"]) / "rag"
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "atlas" / "rag"


def default_data_dir(store: str = DEFAULT_STORE) -> Path:
    """The folder a file-backed store uses when none is configured."""
    return atlas_data_home() / store


# --- BM25 sparse vectors (the Qdrant back ends) ------------------------------------------
def terms(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


def term_id(term: str) -> int:
    return (
        int.from_bytes(hashlib.blake2b(term.encode(), digest_size=4).digest(), "little")
        & 0x7FFFFFFF
    )


def bm25_document_terms(text: str) -> tuple[list[int], list[float]]:
    """(sorted term ids, BM25 tf weights) of a document."""
    words = terms(text)
    counts = Counter(term_id(w) for w in words)
    norm = K1 * (1 - B + B * len(words) / AVG_LEN)
    indices = sorted(counts)
    return indices, [counts[i] * (K1 + 1) / (counts[i] + norm) for i in indices]


def bm25_query_terms(text: str) -> tuple[list[int], list[float]]:
    """(sorted term ids, 1.0 each) of a query; the store multiplies by IDF."""
    indices = sorted({term_id(w) for w in terms(text)})
    return indices, [1.0] * len(indices)


# --- filters, payloads --------------------------------------------------------------------
KEY_FORBIDDEN = '[]"'  # characters no filter key may hold (a dot separates nested keys)


def metadata_key_problem(metadata: dict[str, Any], path: str = "") -> str | None:
    """Why a filter could never name one of `metadata`'s keys (at any depth), or None: a
    key that is empty or holds a dot (`filter_path` reads it as nesting) or one of
    KEY_FORBIDDEN would be stored and never matched."""
    for key, value in metadata.items():
        if not key or "." in key or any(c in key for c in KEY_FORBIDDEN):
            return (
                f"metadata key {path + key!r} cannot be filtered on: keys are non-empty and "
                'hold no ".", "[", "]" or \'"\' (a dot means nesting: use {"a": {"b": ...}})'
            )
        if isinstance(value, dict) and (inner := metadata_key_problem(value, f"{path}{key}.")):
            return inner
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, int) and not -(2**63) <= v < 2**63 for v in values):
            # The stores keep 64-bit integers: a larger one came back a float, unmatched.
            return (
                f"metadata value of {path + key!r} is an integer outside 64 bits, which no "
                "store keeps as an integer; send it as a string"
            )
    return None


def filter_path(key: str) -> tuple[str, ...]:
    """A filter key as a path into the payload: ("source",), ("metadata", "lang") or, for
    a dotted key, ("metadata", "a", "b") (metadata["a"]["b"]; see the module docstring)."""
    if key in CHUNK_FIELDS:
        return (key,)
    name = key[len("metadata.") :] if key.startswith("metadata.") else key
    parts = name.split(".")
    if not all(parts) or any(c in name for c in KEY_FORBIDDEN):
        raise StoreError(
            f"filter key {key!r} names no metadata key: use a chunk field "
            f"({', '.join(CHUNK_FIELDS)}), KEY or metadata.KEY, with dots only between "
            'nested keys (a.b) and no [, ] or "'
        )
    return ("metadata", *parts)


def check_filters(filters: Filters | None) -> list[tuple[tuple[str, ...], list[Any]]]:
    """Filters as [(payload path, allowed values)], validated."""
    out = []
    for key, value in (filters or {}).items():
        values = value if isinstance(value, list) else [value]
        if not values:
            raise StoreError(f"filter {key!r}: the list of values is empty")
        for v in values:
            if not isinstance(v, str | int | bool) or (len(values) > 1 and isinstance(v, bool)):
                raise StoreError(
                    f"filter {key!r}: values are strings, integers or one boolean; got {v!r}"
                )
            if isinstance(v, int) and not -(2**63) <= v < 2**63:  # what the engines hold
                raise StoreError(f"filter {key!r}: integers are 64-bit; got {v}")
        if len({type(v) for v in values}) > 1:
            raise StoreError(
                f"filter {key!r}: a list of values holds strings or integers, not both"
            )
        path = filter_path(key)
        # Chunk fields have one type each; a value of another could never match.
        want = CHUNK_FIELD_TYPES.get(path[0]) if len(path) == 1 else None
        if want is not None and type(values[0]) is not want:
            kind = "a string" if want is str else "an integer"
            raise StoreError(f"filter {key!r}: {key} is {kind}; got {values[0]!r}")
        out.append((path, values))
    return out


def json_path(path: tuple[str, ...]) -> str:
    """Qdrant's JSON path (Qdrant server, local mode and Edge alike) of a payload path: keys below the top one quoted, since a bare key
    with a space or a control character is no path ("invalid JSON path"). check_filters
    refuses keys holding a double quote, so quoting needs no escapes."""
    return ".".join((path[0], *(f'"{part}"' for part in path[1:])))


def bool_copies(metadata: dict[str, Any]) -> dict[str, Any]:
    """The boolean leaves of `metadata` as 0/1, nested as they are: back ends whose engines
    equate true with 1 store this beside the metadata, so filters can tell them apart."""
    out: dict[str, Any] = {}
    for key, value in metadata.items():
        if isinstance(value, bool):
            out[key] = int(value)
        elif isinstance(value, dict) and (inner := bool_copies(value)):
            out[key] = inner
    return out


def payload_of(chunk: Chunk) -> dict[str, Any]:
    return {
        "text": chunk.text,
        "source": chunk.source,
        "heading": chunk.heading,
        "start": chunk.start,
        "end": chunk.end,
        "metadata": chunk.metadata,
    }


def chunk_from_payload(point_id: Any, payload: dict[str, Any]) -> Chunk:
    return Chunk(
        str(point_id),
        payload["text"],
        payload["source"],
        payload.get("heading"),
        int(payload["start"]),
        int(payload["end"]),
        payload.get("metadata") or {},
    )


def as_matrix(vectors: Any, dim: int | None = None) -> np.ndarray:
    """[N, D] float32 C-contiguous; checks D when `dim` is given."""
    matrix = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32))
    if matrix.ndim == 1:
        matrix = matrix[None, :]
    if dim is not None and matrix.shape[1] != dim:
        raise StoreError(f"vectors have {matrix.shape[1]} dimensions; the collection holds {dim}")
    return matrix


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise StoreError(f"collection names are 1-255 letters, digits, - and _; got {name[:80]!r}")
    return name


# --- the interface ------------------------------------------------------------------------
@dataclass(frozen=True)
class StoreSettings:
    """What a back end's factory gets: a folder, a URL, a secret and free-form options."""

    data_dir: Path | None = None  # None: the back end's default (under atlas_data_home())
    url: str | None = None  # a server or cluster (Qdrant, Milvus); None: in-process
    api_key: str | None = None  # never from the config file: CLI or environment
    options: dict[str, Any] = field(default_factory=dict)  # back-end specific tuning

    def check_options(self, store: str, known: Sequence[str]) -> None:
        """Refuse `store_options` keys the back end does not read: a misspelt `hnsw_eff`
        would otherwise leave the default in force without a word."""
        unknown = sorted(set(self.options) - set(known))
        if unknown:
            raise StoreError(
                f"store {store!r} has no option {', '.join(map(repr, unknown))} (rag."
                f"store_options); it reads {', '.join(sorted(known)) or 'none'}"
            )


class _OpensDefault(ABCMeta):
    """`VectorStore(data_dir, url)` keeps working as before this interface existed: it
    opens the default back end (or the Qdrant server when `url` is given)."""

    def __call__(cls, *args: Any, **kwargs: Any):
        if cls is VectorStore:
            data_dir = kwargs.pop("data_dir", args[0] if args else None)
            url = kwargs.pop("url", args[1] if len(args) > 1 else None)
            api_key = kwargs.pop("api_key", args[2] if len(args) > 2 else None)
            return open_store("qdrant" if url else DEFAULT_STORE, data_dir, url, api_key)
        return super().__call__(*args, **kwargs)


class VectorStore(ABC, metaclass=_OpensDefault):
    """Chunks with a dense vector and BM25 terms, in named collections (see module doc)."""

    name: str = "?"  # the back end's registered name
    location: str = ""  # folder or URL, for messages

    @abstractmethod
    def collections(self) -> list[str]: ...

    @abstractmethod
    def exists(self, name: str) -> bool: ...

    @abstractmethod
    def ensure_collection(self, name: str, dim: int) -> None: ...

    @abstractmethod
    def delete_collection(self, name: str) -> bool: ...

    @abstractmethod
    def count(self, name: str) -> int: ...

    @abstractmethod
    def upsert(self, name: str, chunks: list[Chunk], vectors: Any) -> None: ...

    @abstractmethod
    def existing_ids(self, name: str, ids: list[str]) -> set[str]: ...

    @abstractmethod
    def delete(self, name: str, ids: list[str]) -> int: ...

    @abstractmethod
    def search_dense(
        self, name: str, vector: Any, top_k: int, filters: Filters | None = None
    ) -> list[Hit]: ...

    @abstractmethod
    def search_bm25(
        self, name: str, query: str, top_k: int, filters: Filters | None = None
    ) -> list[Hit]: ...

    @abstractmethod
    def vectors(self, name: str, ids: list[str]) -> dict[str, Any]: ...

    @abstractmethod
    def iter_chunks(self, name: str, batch_size: int = 1024) -> Iterator[tuple[Chunk, Any]]: ...

    @abstractmethod
    def close(self) -> None: ...

    # shared behaviour ----------------------------------------------------------------------
    def delete_sources(self, name: str, sources: list[str]) -> int:
        """Remove every chunk whose source is one of `sources`; returns how many there were.
        This portable default reads the whole collection once (iter_chunks); the built-in
        back ends override it with their engine's filtered delete, which reads nothing."""
        wanted = set(sources)
        ids = [chunk.id for chunk, _ in self.iter_chunks(name) if chunk.source in wanted]
        return self.delete(name, ids) if ids else 0

    def _require(self, name: str) -> None:
        if not self.exists(name):
            raise StoreError(
                f"collection {name!r} does not exist; ingest documents into it first "
                f"(collections: {', '.join(self.collections()) or 'none'})"
            )

    def __enter__(self) -> VectorStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} at {self.location}>"


class GuardedStore(VectorStore):
    """`store` as Atlas hands it out (RAGService; `ctx.store` of plugins): every method
    forwards to it, and an exception other than StoreError becomes a StorePluginError
    naming the store and `plugin`, so a store's bug is reported as the store's, not as
    the retriever's that called it, nor as a bare 500. A StoreError passes unchanged
    (the store saying it is unavailable, or that a collection is missing). Other
    attributes (a back end's own `client`, `flush`, ...) are the store's, its methods
    guarded too. What it does not do: retry, lock, or change what a method returns."""

    def __init__(self, store: VectorStore, name: str, plugin: str | None) -> None:
        self.store, self.name, self.plugin = store, name, plugin or "?"
        self.location = getattr(store, "location", "")

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return getattr(self.store, method)(*args, **kwargs)
        except StoreError:
            raise
        except Exception as e:
            raise StorePluginError(self.plugin, self.name, method, e) from e

    def __getattr__(self, attr: str) -> Any:  # only what the class does not define
        if attr == "store":  # not set yet (a copy being made): no recursion
            raise AttributeError(attr)
        value = getattr(self.store, attr)
        if not callable(value) or getattr(value, "__self__", None) is not self.store:
            return value
        return lambda *args, **kwargs: self._call(attr, *args, **kwargs)

    def collections(self) -> list[str]:
        return self._call("collections")

    def exists(self, name: str) -> bool:
        return self._call("exists", name)

    def ensure_collection(self, name: str, dim: int) -> None:
        return self._call("ensure_collection", name, dim)

    def delete_collection(self, name: str) -> bool:
        return self._call("delete_collection", name)

    def count(self, name: str) -> int:
        return self._call("count", name)

    def upsert(self, name: str, chunks: list[Chunk], vectors: Any) -> None:
        return self._call("upsert", name, chunks, vectors)

    def existing_ids(self, name: str, ids: list[str]) -> set[str]:
        return self._call("existing_ids", name, ids)

    def delete(self, name: str, ids: list[str]) -> int:
        return self._call("delete", name, ids)

    def delete_sources(self, name: str, sources: list[str]) -> int:
        return self._call("delete_sources", name, sources)  # the back end's own, if it has one

    def search_dense(
        self, name: str, vector: Any, top_k: int, filters: Filters | None = None
    ) -> list[Hit]:
        return self._call("search_dense", name, vector, top_k, filters)

    def search_bm25(
        self, name: str, query: str, top_k: int, filters: Filters | None = None
    ) -> list[Hit]:
        return self._call("search_bm25", name, query, top_k, filters)

    def vectors(self, name: str, ids: list[str]) -> dict[str, Any]:
        return self._call("vectors", name, ids)

    def iter_chunks(self, name: str, batch_size: int = 1024) -> Iterator[tuple[Chunk, Any]]:
        # A generator fails while it is read, not when it is made: guard each step.
        rows = iter(self._call("iter_chunks", name, batch_size))
        while True:
            try:
                row = next(rows)
            except StopIteration:
                return
            except StoreError:
                raise
            except Exception as e:
                raise StorePluginError(self.plugin, self.name, "iter_chunks", e) from e
            yield row

    def close(self) -> None:
        return self._call("close")

    def __repr__(self) -> str:
        return repr(self.store)


def guarded(store: VectorStore, name: str, plugin: str | None) -> VectorStore:
    """`store` in a GuardedStore (once: a guarded store is returned as it is)."""
    return store if isinstance(store, GuardedStore) else GuardedStore(store, name, plugin)


def open_store(
    name: str = DEFAULT_STORE,
    data_dir: str | os.PathLike | None = None,
    url: str | None = None,
    api_key: str | None = None,
    options: dict[str, Any] | None = None,
    host: Any = None,
) -> VectorStore:
    """Open the vector store back end registered as `name` (see `atlas plugins`)."""
    from ..plugins import get_plugin_host

    host = host or get_plugin_host()
    factories = host.vector_stores
    settings = StoreSettings(
        Path(data_dir).expanduser() if data_dir else None, url, api_key, dict(options or {})
    )
    check_store_options(name, settings.options, host)
    owner = host.owner("vector_stores", name) or "?"
    try:
        store = factories[name](settings)
    except StoreError:
        raise  # the store's own words, for the user
    except ImportError as e:  # its client library is not installed
        raise StoreError(
            f"the {name!r} vector store (plugin {owner!r}) cannot be opened: its package is "
            f"not installed ({e})"
        ) from e
    except Exception as e:
        # Whatever else a factory raises (a client's ConnectionRefusedError, a bug) is
        # still the store failing to open: a StoreError naming it, its cause kept for the
        # log, so a server starts without RAG and `atlas rag` says one line.
        raise StoreFactoryError(
            f"vector store {name!r} (plugin {owner!r}) failed to open: {type(e).__name__}: {e}"
        ) from e
    if not isinstance(store, VectorStore):
        raise StoreError(
            f"vector store {name!r} (plugin {host.owner('vector_stores', name)!r}) built a "
            f"{type(store).__name__}, which does not implement atlas_server.rag.store.VectorStore"
        )
    return store


def check_store_options(name: str, options: dict[str, Any], host: Any = None) -> None:
    """Refuse, without opening anything, a store name no plugin registered and
    `store_options` keys store `name` does not read: a factory may list the keys it reads
    as its `options` attribute (the built-ins do); a factory without one takes any."""
    from ..plugins import get_plugin_host

    host = host or get_plugin_host()
    factories = host.vector_stores
    if name not in factories:
        installed = ", ".join(sorted(factories)) or (
            "none"
            if host.disable
            else "none (the built-ins come from the `atlas` entry points: reinstall Atlas "
            "with `pip install -e .` if it was installed before they existed)"
        )
        raise StoreError(
            f"no vector store named {name!r}{host.disabled_hint()}; installed: {installed}"
        )
    known = getattr(factories[name], "options", None)
    if known is not None:
        problem = options_attribute_problem(known)
        if problem:
            owner = host.owner("vector_stores", name)
            raise StoreError(f"vector store {name!r} (plugin {owner!r}): {problem}")
        StoreSettings(options=dict(options)).check_options(name, known)


def options_attribute_problem(known: Any) -> str | None:
    """Why a factory's `options` attribute is no list of key names, or None. The classic
    slip is `options = ("mode")`, a string, which would read as the keys "m", "o", ..."""
    if isinstance(known, str | bytes) or not isinstance(known, Sequence | set | frozenset):
        return (
            f"its factory's `options` attribute is {known!r}, not a tuple of the option "
            'names it reads (for one option write ("mode",), with the comma)'
        )
    if not all(isinstance(key, str) for key in known):
        return f"its factory's `options` attribute {known!r} holds a non-string"
    return None


def store_name(rag: Any) -> tuple[str, str | None]:
    """(store name, url) a server's `[rag]` section names (`qdrant_url` alone: "qdrant")."""
    name, url = rag.store, rag.store_url
    if rag.qdrant_url and not url:
        name, url = ("qdrant" if name == DEFAULT_STORE else name), rag.qdrant_url
    return name, url


def store_from_config(rag: Any, host: Any = None) -> VectorStore:
    """The store a server's `[rag]` section names (`qdrant_url` alone means store "qdrant")."""
    name, url = store_name(rag)
    key = os.environ.get("ATLAS_VECTOR_STORE_API_KEY") or None
    return open_store(name, rag.data_dir, url, key, dict(rag.store_options), host)
