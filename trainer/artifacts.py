"""Post-training artifacts on disk: content hashes and atomic safetensors / JSON writes.

What it does: `weights_sha256` hashes a state dict's names, dtypes, shapes and bytes (the
same weights give the same hash whichever file or device they came from; the same weights
in another dtype are other numbers and another hash); `arrays_sha256` hashes a sequence of
numpy arrays (tokenized data); `save_safetensors_atomic` / `write_json_atomic` write into a
temp file beside the target, fsync and rename, so a crash leaves the old file or the new
one, never half of one. What it does not do: decide what a hash must match (the callers:
dpo.py's reference cache, lora.py's adapters).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from atlas_server.io import atomic_write_text


def weights_sha256(state: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}|".encode())
        h.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def arrays_sha256(arrays: Iterable[np.ndarray]) -> str:
    h = hashlib.sha256()
    for array in arrays:
        a = np.ascontiguousarray(array)
        h.update(f"{a.dtype.str}|{list(a.shape)}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def save_safetensors_atomic(
    path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
            str(tmp),
            metadata=dict(metadata),
        )
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: Path, value: Any) -> None:
    atomic_write_text(Path(path), json.dumps(value, indent=2, sort_keys=True) + "\n")
