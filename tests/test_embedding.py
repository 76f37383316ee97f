"""The embedder's CPU worker split: the same vectors as sentence-transformers' own encode,
in the caller's order, computed on single-threaded worker threads that leave PyTorch's
thread count as it was for every later thread, and errors that reach the caller."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from atlas_server.rag.embedding import Embedder

# Lengths vary a lot so that sorting by length really reorders them.
TEXTS = [
    " ".join(f"word{j} of text {i}" for j in range((i * 7) % 23 + 1)) + f" {i}." for i in range(22)
]


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder(backend="fp32", workers=2, batch_size=3)


def in_fresh_thread(fn):
    """fn() on a new thread (a new thread copies PyTorch's process-wide thread count)."""
    out: dict = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as e:  # handed back to the test
            out["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


def record_forward_calls(monkeypatch, embedder: Embedder, fail_on_call: int | None = None):
    """Wrap the model's forward to note the thread and PyTorch thread count of each call."""
    calls: list[tuple[str, int]] = []
    forward = embedder.model.forward
    lock = threading.Lock()

    def spy(features, *args, **kwargs):
        with lock:
            calls.append((threading.current_thread().name, torch.get_num_threads()))
            n = len(calls)
        if fail_on_call is not None and n == fail_on_call:
            raise RuntimeError("worker exploded")
        return forward(features, *args, **kwargs)

    monkeypatch.setattr(embedder.model, "forward", spy)
    return calls


def test_worker_split_gives_sentence_transformers_vectors_in_the_callers_order(embedder):
    vectors = embedder.encode(TEXTS)  # [22, 384]
    reference = embedder.model.encode(
        TEXTS, batch_size=64, normalize_embeddings=True, convert_to_numpy=True
    )
    assert vectors.shape == (len(TEXTS), embedder.dim) and vectors.dtype == np.float32
    np.testing.assert_allclose(vectors, reference, atol=2e-6)
    # Each row is its own text's vector, not merely some permutation of them.
    alone = embedder.encode([TEXTS[5]])[0]
    assert int(np.argmax(vectors @ alone)) == 5


def test_batches_run_on_single_threaded_workers_and_a_query_on_the_caller(embedder, monkeypatch):
    calls = record_forward_calls(monkeypatch, embedder)
    embedder.encode(TEXTS)
    assert len(calls) == -(-len(TEXTS) // embedder.batch_size)  # one forward per batch
    names = {name for name, _ in calls}
    assert all(name.startswith("atlas-embed") for name in names) and len(names) == 2
    assert {threads for _, threads in calls} == {1}

    calls.clear()
    in_fresh_thread(lambda: embedder.encode(TEXTS[:2]))  # one batch: no workers
    assert len(calls) == 1 and not calls[0][0].startswith("atlas-embed")
    assert calls[0][1] == torch.get_num_threads()


def test_threads_started_after_an_encode_keep_the_processes_thread_count(embedder):
    before = in_fresh_thread(torch.get_num_threads)
    # The caller is a fresh thread too, as for the ingest thread and the RAG routes.
    in_fresh_thread(lambda: embedder.encode(TEXTS))
    assert in_fresh_thread(torch.get_num_threads) == before
    assert torch.get_num_threads() == before


def test_a_workers_error_reaches_the_caller_and_the_thread_count_is_restored(embedder, monkeypatch):
    before = in_fresh_thread(torch.get_num_threads)
    record_forward_calls(monkeypatch, embedder, fail_on_call=2)
    with pytest.raises(RuntimeError, match="worker exploded"):
        in_fresh_thread(lambda: embedder.encode(TEXTS))
    assert in_fresh_thread(torch.get_num_threads) == before


def test_bad_batch_size_is_refused():
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        Embedder(batch_size=0)
    with pytest.raises(ValueError, match="workers must be at least 1"):
        Embedder(workers=-1)


def test_loading_the_embedder_draws_no_bar_and_leaves_transformers_bars_as_they_were(capfd):
    """QA: transformers' "Loading weights" bar went into every server log and each `atlas
    rag query`'s output, for a local model that loads in well under a second."""
    from transformers.utils import logging as hf_logging

    from atlas_server.rag.embedding import Embedder

    assert hf_logging.is_progress_bar_enabled()
    Embedder()
    assert "Loading weights" not in capfd.readouterr().err
    assert hf_logging.is_progress_bar_enabled()  # only this load was quiet


def test_the_evaluation_judges_embedder_loads_without_a_bar_too(capfd):
    """The hallucination suite's embedding judge loads MiniLM itself (eval_suites/support)."""
    from eval_suites.support import default_embedder_path, sentence_model

    sentence_model.cache_clear()  # loaded here, not by an earlier test in this process
    sentence_model(default_embedder_path())
    assert "Loading weights" not in capfd.readouterr().err
