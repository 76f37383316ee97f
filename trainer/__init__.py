"""Atlas's trainer: data preparation, the training loop, checkpoints, `atlas-train`.

Importing it (as `atlas-train` does, before PyTorch loads) sets `OMP_WAIT_POLICY=PASSIVE`
unless the environment says otherwise: OpenMP threads that finish their share of an
operation then sleep instead of spinning while they wait for the others. On a quiet
machine that costs a wake-up per parallel region (well under 1% of a quickstart step);
on a shared one it matters a great deal, because a spinning thread burns the time slice
that the thread it waits for needs. The quickstart's step on 2 threads beside other jobs
(load average 14-16 on 2 cores) took 8.6-11.4 s spinning and 5.5-6.2 s passive
(bench/bench_train.py --quickstart, run once with each setting; docs/training.md). It has
no effect when PyTorch was imported first.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
