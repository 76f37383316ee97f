"""Deleting one document from a large collection: each back end's filtered delete against
the interface's portable default, measured in the same run.

What it does: fills a fresh collection of each back end named by `--stores` with
`--chunks` chunks of random 384-d vectors (no embedder: only the store is timed), spread
over sources of 20 chunks each, then deletes one source at a time, alternating
  - `portable`: `VectorStore.delete_sources`, the default a third-party back end inherits
    (read every chunk with `iter_chunks`, delete the matching ids), which is what
    `DELETE /v1/collections/NAME/documents?source=` did before the back ends overrode it;
  - `filtered`: the back end's own `delete_sources` (a filtered count and delete on the
    indexed `source` field).
After each delete the source is written back, so both always see the same collection.
It prints the median milliseconds of each and their ratio per back end.
What it does not do: embed, chunk or go through HTTP (the route adds the same small cost
to both).
Run: `python bench/bench_delete_source.py [--chunks 20000] [--rounds 5] [--stores embedded,faiss]`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from atlas_server.rag.store import VectorStore, open_store  # noqa: E402
from atlas_server.rag.types import Chunk  # noqa: E402

DIM, PER_SOURCE = 384, 20


def make(n: int) -> tuple[list[Chunk], np.ndarray]:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((n, DIM)).astype(np.float32)  # [N, DIM]
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    chunks = [
        Chunk(
            str(uuid.uuid5(uuid.NAMESPACE_URL, f"c{i}")),
            f"chunk {i} text",
            f"doc{i // PER_SOURCE}.md",
            None,
            0,
            10,
        )
        for i in range(n)
    ]
    return chunks, vectors


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--stores", default="embedded,faiss,qdrant")
    args = parser.parse_args()
    chunks, vectors = make(args.chunks)
    sources = sorted({c.source for c in chunks})
    print(f"{args.chunks} chunks, {len(sources)} sources of {PER_SOURCE}; median ms per delete")
    for name in args.stores.split(","):
        with tempfile.TemporaryDirectory() as folder, open_store(name, folder) as store:
            store.ensure_collection("bench", DIM)
            for i in range(0, len(chunks), 1024):
                store.upsert("bench", chunks[i : i + 1024], vectors[i : i + 1024])
            times: dict[str, list[float]] = {"portable": [], "filtered": []}
            for r in range(args.rounds):
                for kind in ("portable", "filtered") if r % 2 == 0 else ("filtered", "portable"):
                    source = sources[(r * 7 + len(times[kind])) % len(sources)]
                    rows = [i for i, c in enumerate(chunks) if c.source == source]
                    delete = (
                        VectorStore.delete_sources
                        if kind == "portable"
                        else type(store).delete_sources
                    )
                    times[kind].append(timed(delete, store, "bench", [source]))
                    assert store.count("bench") == len(chunks) - len(rows)
                    store.upsert("bench", [chunks[i] for i in rows], vectors[rows])
            portable, filtered = (statistics.median(times[k]) for k in ("portable", "filtered"))
            print(
                f"{name:>10}: portable {portable:9.1f} ms   filtered {filtered:7.1f} ms   "
                f"{portable / filtered:7.1f}x"
            )


if __name__ == "__main__":
    main()
