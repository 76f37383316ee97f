"""Train the small model behind the evaluation report in docs/evaluation.md (a stand-in).

The report should run on the quickstart checkpoint (`atlas-train quickstart`); it did not
exist while the evaluation suites were written, so this script trains a comparable small
model: Llama-style (RoPE, RMSNorm, SwiGLU, GQA), d_model 192, 4 layers, byte-level
tokenizer, 2048-token context, on docstrings of the top-level standard-library modules,
for 300 s on 2 CPU threads (sequence length 256, batch 16, AdamW). Deterministic data
and init (seed 0); the number of steps depends on the machine's speed.

    python docs/eval_report/make_demo_model.py OUTPUT_DIR [SECONDS]
"""

from __future__ import annotations

import ast
import sys
import sysconfig
import time
from pathlib import Path

import torch

from atlas_server.checkpoint import save_checkpoint
from atlas_server.model import Transformer, load_preset
from atlas_server.tokenizer import byte_level_tokenizer


def stdlib_docstrings() -> list[str]:
    docs = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.FunctionDef | ast.ClassDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 80:
                    docs.append(doc)
    return docs


def main(output: str, seconds: float = 300.0) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    tok = byte_level_tokenizer()
    ids: list[int] = []
    for doc in stdlib_docstrings():
        ids += tok.encode_ordinary(doc) + [tok.eot_id]
    data = torch.tensor(ids)
    config = load_preset(
        "llama-tiny",
        vocab_size=tok.vocab_size,
        d_model=192,
        n_layers=4,
        n_heads=6,
        n_kv_heads=2,
        max_seq_len=2048,
    )
    model = Transformer(config)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.1, betas=(0.9, 0.95))
    seq, batch, start, step = 256, 16, time.time(), 0
    while time.time() - start < seconds:
        progress = (time.time() - start) / seconds
        for group in opt.param_groups:  # warm-up, then linear decay to 10%
            group["lr"] = 2e-3 * min(1.0, (step + 1) / 50) * max(0.1, 1 - progress)
        starts = torch.randint(0, len(data) - seq - 1, (batch,))
        x = torch.stack([data[i : i + seq] for i in starts])  # [B, T]
        y = torch.stack([data[i + 1 : i + seq + 1] for i in starts])  # [B, T]
        loss = model.loss(x, y)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
    provenance = {"source": "docs/eval_report/make_demo_model.py", "steps": step, "seq_len": seq}
    save_checkpoint(output, model, tok, provenance)
    print(
        f"saved {output} after {step} steps; last training loss {loss.item() / 0.6931:.3f} bits/byte"
    )


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else 300.0)
