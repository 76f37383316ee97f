"""Atlas: tokenizer, model, checkpoints, serving engine, HTTP API, plugins and RAG.

Importing the package sets one process-wide default before PyTorch allocates anything:
`THP_MEM_ALLOC_ENABLE=1`, which makes PyTorch's CPU allocator align tensors of 2 MB and more
and ask the kernel for transparent huge pages. Large per-step tensors (logits, gradients,
activations) are otherwise mapped afresh and page-faulted every step, which on the
project's machine showed as several times more page faults and slower training steps
(compare `THP_MEM_ALLOC_ENABLE=0 python bench/bench_train.py` with the default). Set the
variable to 0 to opt out; it has no effect if PyTorch allocated before `atlas_server` was
imported.
"""

import os

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
