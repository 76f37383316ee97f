"""Time to first token with and without prefix caching, over HTTP, on two chat-like loads.

What it does: builds the GPT-2 124M-shaped random-weight checkpoint of bench_serving.py
(fp32), starts `atlas serve` with `engine.prefix_caching` on, then off (RAG off both
times), and streams `/v1/completions` (token-id prompts, greedy) one request at a time:
1. shared system prompt: 16 requests, each a 384-token system prompt plus its own
   32-token question, 16 output tokens;
2. a conversation: 8 turns, each prompt the previous prompt and answer plus 48 new
   tokens (from 48 to 608 prompt tokens), 32 output tokens per answer.
Prints JSON and a Markdown table of the median time to first token (TTFT) and the
cached-token count from `usage.prompt_tokens_details`, with the on/off ratio.
Run: `python bench/bench_prefix_cache.py` (under a minute on 2 cores).
What it does not do: concurrent load (bench_serving.py), or compare with other servers.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_serving import build_checkpoint, free_port, serve  # noqa: E402
from progress import Progress  # noqa: E402

SYSTEM, QUESTION, QUESTIONS, QUESTION_OUTPUT = 384, 32, 16, 16
TURNS, TURN_INPUT, TURN_OUTPUT = 8, 48, 32


def stream_completion(base: str, prompt: list[int], max_tokens: int) -> tuple[float, list, int]:
    """(seconds to the first token, generated token ids, cached prompt tokens)."""
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
        "logprobs": 0,  # the chosen tokens' text, so the answer can be resent as ids
    }
    start, ttft, tokens, cached = time.perf_counter(), None, [], 0
    with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=300) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                cached = event["usage"]["prompt_tokens_details"]["cached_tokens"]
            for choice in event["choices"]:
                if choice["text"] and ttft is None:
                    ttft = time.perf_counter() - start
                tokens += (choice.get("logprobs") or {}).get("tokens", [])
    return ttft, tokens, cached


def run_loads(base: str, rng: random.Random) -> dict:
    ids = lambda n: [rng.randrange(256, 50000) for _ in range(n)]  # noqa: E731
    system = ids(SYSTEM)
    shared = [
        stream_completion(base, system + ids(QUESTION), QUESTION_OUTPUT) for _ in range(QUESTIONS)
    ]
    prompt, turns = [], []
    for _ in range(TURNS):
        prompt += ids(TURN_INPUT)
        ttft, answer, cached = stream_completion(base, prompt, TURN_OUTPUT)
        turns.append((ttft, cached, len(prompt)))
        # The visible tokenizer decodes id i as "t<i> " (bench_serving.py), so the answer's
        # token texts give back its ids.
        prompt += [int(t[1:-1]) for t in answer]
    return {
        "shared_system_prompt": {
            "median_ttft_ms": 1e3 * statistics.median(t for t, _, _ in shared[1:]),
            "median_cached_tokens": statistics.median(c for _, _, c in shared[1:]),
        },
        "conversation": {
            "median_ttft_ms": 1e3 * statistics.median(t for t, _, _ in turns[1:]),
            "last_turn_ttft_ms": 1e3 * turns[-1][0],
            "last_turn_prompt_tokens": turns[-1][2],
            "last_turn_cached_tokens": turns[-1][1],
        },
    }


def main() -> None:
    # No options: the loads are fixed (the constants above); a parser so that `--help` and
    # a mistyped argument do not start minutes of building and serving.
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    results = {}
    progress = Progress(__file__, phases=5)
    with tempfile.TemporaryDirectory() as tmp:
        progress.phase("building a random-weight gpt2-124m checkpoint")
        checkpoint, model = build_checkpoint(Path(tmp))
        del model
        for caching in (True, False):
            progress.phase(f"starting atlas serve, prefix caching {'on' if caching else 'off'}")
            config = Path(tmp) / f"caching-{caching}.toml"
            config.write_text(
                f"[engine]\nprefix_caching = {str(caching).lower()}\n\n[rag]\nenabled = false\n"
            )
            port = free_port()
            server = serve(checkpoint, port, max_running=16, config=config)
            try:
                base = f"http://127.0.0.1:{port}"
                stream_completion(base, [300, 301, 302], 2)  # warm-up
                progress.phase(
                    f"caching {'on' if caching else 'off'}: {QUESTIONS} requests sharing a"
                    f" {SYSTEM}-token system prompt, then a {TURNS}-turn conversation"
                )
                results["on" if caching else "off"] = run_loads(base, random.Random(0))
            finally:
                server.terminate()
                server.wait(60)
    results["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(json.dumps(results, indent=2))
    on, off = results["on"], results["off"]
    rows = [
        ("shared 384-token system prompt, median TTFT", "shared_system_prompt", "median_ttft_ms"),
        ("conversation, median TTFT of turns 2-8", "conversation", "median_ttft_ms"),
        ("conversation, TTFT of turn 8", "conversation", "last_turn_ttft_ms"),
    ]
    print("\n| load | caching on, ms | off, ms | off / on |\n|---|---:|---:|---:|")
    for label, load, key in rows:
        a, b = on[load][key], off[load][key]
        print(f"| {label} | {a:.0f} | {b:.0f} | {b / a:.1f}x |")
    print(
        f"cached tokens with caching on: {on['shared_system_prompt']['median_cached_tokens']:.0f} "
        f"of {SYSTEM + QUESTION} (system prompt), {on['conversation']['last_turn_cached_tokens']} "
        f"of {on['conversation']['last_turn_prompt_tokens']} (turn 8)"
    )
    progress.done()


if __name__ == "__main__":
    main()
