"""Query-likelihood scoring: all of a query's candidates in one engine call vs one at a time.

What it does: loads a random-weight checkpoint (gpt2-tiny with a 1024-token context and a
byte tokenizer, or `--checkpoint DIR`) into an engine as `atlas serve` does, takes
`--candidates` passages of real text (standard-library docstrings, about 600 characters
each) and times scoring them for one question the way the `query-likelihood` reranker
does (mean log p(question | passage)): with `EngineScorer.score_texts(pairs)`, every
candidate submitted at once, and, as the baseline measured in the same run, one
`score_texts([pair])` call per candidate, which is what the reranker did before (and what
the one-pair `ctx.score_text` still costs). The two alternate for `--repeats` rounds; it
prints JSON with the median seconds per query of each and their ratio, and checks that
both give the same scores.
Run: `python bench/bench_rerank_scoring.py` (about a minute on 2 cores).
What it does not do: retrieval or HTTP (tests/test_rag_server.py covers the route).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from atlas_server.api import ServerState  # noqa: E402
from atlas_server.api.scoring import EngineScorer  # noqa: E402
from atlas_server.config import RAGSection, ServerConfig  # noqa: E402
from atlas_server.tokenizer.corpus import stdlib_sample  # noqa: E402


def build_checkpoint(folder: Path) -> Path:
    import torch

    from atlas_server.checkpoint import save_checkpoint
    from atlas_server.model import Transformer, load_preset
    from atlas_server.tokenizer import byte_level_tokenizer

    torch.manual_seed(0)
    tokenizer = byte_level_tokenizer()
    model = Transformer(load_preset("gpt2-tiny", vocab_size=tokenizer.vocab_size, max_seq_len=1024))
    return save_checkpoint(folder / "gpt2-tiny-1024", model, tokenizer)


def passages(n: int, chars: int = 600) -> list[str]:
    text = " ".join(" ".join(doc.split()) for doc in stdlib_sample(n * chars * 2, 1.0))
    return [text[i * chars : (i + 1) * chars] for i in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", help="atlas checkpoint (default: a random gpt2-tiny)")
    parser.add_argument("--candidates", type=int, default=16, help="candidates per query")
    parser.add_argument("--repeats", type=int, default=5, help="alternating rounds")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint or str(build_checkpoint(Path(tmp)))
        state = ServerState(config=ServerConfig(rag=RAGSection(enabled=False)))
        state.load(checkpoint)
        try:
            scorer = EngineScorer(state)
            question = " Which function keeps a list sorted after an insertion?"
            pairs = [(f"Passage: {p}\nQuestion:", question) for p in passages(args.candidates)]
            scorer.score_texts(pairs[:2])  # warm up
            batched, single = [], []
            for round_ in range(args.repeats):
                for label, times in (("batched", batched), ("one at a time", single)):
                    start = time.perf_counter()
                    if label == "batched":
                        together = scorer.score_texts(pairs)
                    else:
                        alone = [scorer.score_texts([pair])[0] for pair in pairs]
                    times.append(time.perf_counter() - start)
                    print(f"round {round_ + 1}/{args.repeats} {label}: {times[-1]:.3f} s",
                          file=sys.stderr, flush=True)  # fmt: skip
        finally:
            state.shutdown()
    worst = max(abs(a - b) for a, b in zip(together, alone, strict=True))
    result = {
        "checkpoint": checkpoint if args.checkpoint else "random gpt2-tiny, 1024 positions",
        "candidates": args.candidates,
        "prompt_tokens": [len(state.tokenizer.encode(p + q)) for p, q in pairs[:1]][0],
        "median_s_batched": round(statistics.median(batched), 4),
        "median_s_one_at_a_time": round(statistics.median(single), 4),
        "speedup": round(statistics.median(single) / statistics.median(batched), 2),
        "max_score_difference": worst,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
