"""Host data to device tensors without making the host wait for the device.

What it does: `to_device(data, device, dtype)` turns a host list (token ids, positions,
slots, per-row sampling numbers) into a tensor on `device`. On CUDA it goes through pinned
memory with an asynchronous copy, queued on the current stream like any kernel. The plain
`torch.tensor(data, device="cuda")` copies from pageable memory, which PyTorch completes
with a stream synchronize: the host would wait for every step already queued, and overlap
mode (engine.py) would lose the step it queued ahead. On the CPU the tensor is the host one.

What it does not do: device-to-host copies (sampling.QueuedStep reads a step's tokens back
behind an event).
"""

from __future__ import annotations

import torch
from torch import Tensor


def to_device(data: list, device: torch.device, dtype: torch.dtype = torch.long) -> Tensor:
    """`data` as a `dtype` tensor on `device`, never synchronizing the host with it."""
    host = torch.tensor(data, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
