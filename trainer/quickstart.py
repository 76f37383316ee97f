"""The quickstart: a real tokenizer and a small model, trained here in a few minutes.

What it does: writes a corpus from the running Python's standard library (docstrings and
sources, chosen deterministically: text that exists on every machine with Python),
trains a BPE tokenizer on it, prepares token shards with a held-out validation split,
trains the `gpt2-mini` preset (configs/train/quickstart.toml: bf16 autocast where the CPU
has native bf16, else fp32) for a fixed number of steps, and compares
the held-out bits per byte with a unigram baseline (token frequencies of the training
split, add-one smoothed, on the same validation tokens). The final checkpoint is copied
to `OUTPUT/checkpoint`, which `atlas serve` uses as its embedded default.
What it does not do: produce a useful language model; it proves the pipeline end to end.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from atlas_server.io import atomic_write_json
from atlas_server.model.config import configs_dir
from atlas_server.tokenizer import TOKENIZER_FILE, Tokenizer, train_from_files
from atlas_server.tokenizer.corpus import stdlib_sample
from atlas_server.tokenizer.train import TrainConfig as TokenizerConfig

from .config import TrainConfigError, load_train_config
from .data import prepare_data, read_shard
from .loop import train


def write_corpus(folder: Path, max_bytes: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, text in enumerate(stdlib_sample(max_bytes, docstring_share=0.5)):
        path = folder / f"doc_{i:05d}.txt"
        path.write_text(text, encoding="utf-8")
        paths.append(path)
    return paths


def unigram_bits_per_byte(data_dir: Path, vocab_size: int, byte_lengths: np.ndarray) -> float:
    manifest = json.loads((data_dir / "manifest.json").read_text())
    counts = np.ones(vocab_size, dtype=np.float64)  # add-one smoothing
    for shard in manifest["train"]:
        counts += np.bincount(
            np.asarray(read_shard(data_dir / shard["file"])), minlength=vocab_size
        )
    logp = np.log(counts / counts.sum())
    nll, n_bytes = 0.0, 0.0
    for shard in manifest["val"] or manifest["train"][:1]:
        tokens = np.asarray(read_shard(data_dir / shard["file"]))
        nll -= logp[tokens].sum()
        n_bytes += byte_lengths[tokens].sum()
    return nll / (math.log(2) * n_bytes)


def quickstart(
    output: Path,
    steps: int = 600,
    corpus_bytes: int = 6_000_000,
    vocab_size: int = 4096,
    threads: int | None = None,
    progress: bool = True,
    overrides: Sequence[str] = (),
) -> dict:
    """Corpus, tokenizer, token shards, then configs/train/quickstart.toml for `steps` steps
    (warmup 5% of them) with `overrides` (`section.key=value`) applied last; resumes a run
    that was stopped. Returns (and writes to OUTPUT/quickstart.json) the held-out metrics."""
    # Checked before the corpus, tokenizer and shards (~10 s), not by the config after them.
    if steps < 1:
        raise TrainConfigError(f"--steps must be >= 1, got {steps}")
    if threads is not None and threads < 1:
        raise TrainConfigError(f"--threads must be >= 1, got {threads}")
    output = Path(output)
    corpus = write_corpus(output / "corpus", corpus_bytes)
    tok_file = output / "tokenizer" / TOKENIZER_FILE
    if tok_file.is_file():  # a rerun after Ctrl-C: training it again gives the same file
        tokenizer = Tokenizer.from_file(tok_file)
    else:
        # The tokenizer room draws tqdm's bars, which a log (scripts/serve.sh's) receives as
        # carriage-return frames: there a line before and one after instead.
        bars = progress and sys.stderr.isatty()
        if progress and not bars:
            print(f"training the tokenizer (vocabulary {vocab_size:,})", file=sys.stderr)
        started = time.perf_counter()
        tokenizer = train_from_files(
            [str(p) for p in corpus], TokenizerConfig(vocab_size=vocab_size), progress=bars
        )
        if progress and not bars:
            seconds = time.perf_counter() - started
            print(f"tokenizer trained in {seconds:.1f} s", file=sys.stderr)
        tokenizer.save(tok_file)
    data_dir = output / "data"
    prepare_data(
        [str(p) for p in corpus],
        tok_file,
        data_dir,
        val_fraction=0.02,
        progress=progress,
    )
    settings = [
        f"run.out_dir={json.dumps(str(output / 'run'))}",
        f"data.path={json.dumps(str(data_dir))}",
        f"schedule.max_steps={steps}",
        f"schedule.warmup_steps={max(1, round(0.05 * steps))}",
        *([f"run.threads={threads}"] if threads else []),
        *overrides,
    ]
    cfg = load_train_config(configs_dir() / "train" / "quickstart.toml", settings)
    summary = train(cfg, resume=True, progress=progress)
    if summary["interrupted"]:  # Ctrl-C: a checkpoint was saved; a rerun continues from it
        return {"interrupted": True, "run": str(output / "run"), "steps": steps}
    final = output / "checkpoint"
    shutil.rmtree(final, ignore_errors=True)
    shutil.copytree(summary["checkpoint"], final, ignore=shutil.ignore_patterns("trainer_state.*"))
    byte_lengths = np.array(
        [len(tokenizer.token_bytes(i)) for i in range(tokenizer.vocab_size)], dtype=np.float64
    )
    result = {
        "checkpoint": str(final),
        "val_bits_per_byte": summary.get("val", {}).get("bits_per_byte"),
        "val_loss": summary.get("val", {}).get("loss"),
        "unigram_bits_per_byte": unigram_bits_per_byte(
            data_dir, tokenizer.vocab_size, byte_lengths
        ),
        "steps": steps,
    }
    atomic_write_json(output / "quickstart.json", result, indent=2)
    return result
