"""Grounded prompts with numbered sources, and citations parsed back from the answer.

What it does: renders retrieved chunks as numbered sources `[1] (source — heading) text`
with an instruction to answer from them and cite as [n]; for chat, the sources go into a
system message placed before the conversation. After generation, `extract_citations`
finds [n] markers (also [1, 3] and [2][4]), maps valid numbers to their chunks and counts
the numbers that refer to no given source as dropped; `given_sources` lists every source
the prompt numbered, cited or not.
What it does not do: retrieval or generation.
"""

from __future__ import annotations

import re
from typing import Any

from .types import RetrievedChunk

INSTRUCTION = (
    "Answer the question using only the numbered sources below. Cite the sources you use as [n]. "
    "If the sources do not contain the answer, say that you do not know."
)
_MARK = re.compile(r"\[(\d+(?:\s*,\s*\d+)*)\]")


def render_sources(chunks: list[RetrievedChunk]) -> str:
    lines = []
    for i, r in enumerate(chunks, 1):
        where = r.chunk.source + (f" — {r.chunk.heading}" if r.chunk.heading else "")
        lines.append(f"[{i}] ({where}) {r.chunk.text}")
    return "\n\n".join(lines)


def grounded_prompt(question: str, chunks: list[RetrievedChunk]) -> str:
    return f"{INSTRUCTION}\n\nSources:\n{render_sources(chunks)}\n\nQuestion: {question}\nAnswer:"


def grounded_messages(
    messages: list[dict[str, Any]], chunks: list[RetrievedChunk]
) -> list[dict[str, Any]]:
    system = {"role": "system", "content": f"{INSTRUCTION}\n\nSources:\n{render_sources(chunks)}"}
    return [system, *messages]


def extract_citations(text: str, chunks: list[RetrievedChunk]) -> tuple[list[dict[str, Any]], int]:
    cited: list[int] = []
    dropped = 0
    for m in _MARK.finditer(text):
        for number in (int(x) for x in m.group(1).split(",")):
            if 1 <= number <= len(chunks):
                if number not in cited:
                    cited.append(number)
            else:
                dropped += 1
    return [source_json(n, chunks[n - 1]) for n in cited], dropped


def source_json(number: int, r: RetrievedChunk) -> dict[str, Any]:
    """One source as the response shows it; `id` is its number [n] in the prompt."""
    return {
        "id": number,
        "chunk_id": r.chunk.id,
        "source": r.chunk.source,
        "heading": r.chunk.heading,
        "span": [r.chunk.start, r.chunk.end],
        "score": r.score,
        "text": r.chunk.text,
    }


def given_sources(chunks: list[RetrievedChunk]) -> list[dict[str, Any]]:
    """Every source the grounded prompt numbered, in prompt order (cited or not)."""
    return [source_json(n, r) for n, r in enumerate(chunks, 1)]


def last_user_text(messages: list[dict[str, Any]]) -> str:
    for m in reversed(messages):
        if m.get("role") == "user":
            content = m.get("content")
            if isinstance(content, list):
                texts = (p.get("text") for p in content if isinstance(p, dict))
                return "".join(t for t in texts if isinstance(t, str))
            return content or ""
    return ""
