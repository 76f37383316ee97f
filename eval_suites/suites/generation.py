"""The `generation` suite: reference-based quality on tasks built from the Python FAQ.

Tasks, built deterministically from `data/generation/python_faq.jsonl` (question + first
answer paragraph of each Python FAQ entry, extracted by `data/build_data.py`):
  - `heading`: given an answer paragraph, write the question it answers (the section's
    heading); reference = the FAQ's own question.
  - `continuation`: given the paragraph's first sentence, continue it; reference = the rest
    of the paragraph.
Another data file (`data`) must hold the same records, `{"id", "question", "paragraph"}`:
each is checked when the file is read, before any request, and the first that is not (not
JSON, a key missing or not a string, an id repeated) stops the run with one line naming
FILE:LINE and the key (`base.read_jsonl`). The seed orders the records (a seeded
permutation of their ids); the first `num_shots` become in-context examples for every
prompt and the next `num_items` are evaluated.
Greedy decoding by default, one `/v1/completions` (or `/v1/chat/completions` with
`api = "chat"`) request per item, stopping at a blank line; the
prediction is the first non-empty line of the answer.

Fitting the server's context (`fit.py`): an item's prompt plus `max_tokens` must fit. When
it does not, the item is asked with fewer in-context examples (the last ones go first);
with none left, its source is cut at a word boundary to the longest that fits (never below
`MIN_SOURCE_CHARS`); failing that, or when the server answers that the prompt is too long,
the item is skipped: left out of the scores, listed in results.json `context_fit`. Each
sample records the examples it was given (`shots`) and whether its source was cut.

Scoring goes through metric plugins named in the config (default BLEU and chrF, computed
with sacrebleu, whose signature is recorded, and ROUGE-1/2/L/Lsum with rouge-score):
corpus scores per task and over both tasks. What it does not do: judge fluency or
factuality (see the hallucination suite) or use sampling unless configured.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..client import first_choice, gather_with_progress
from ..errors import SuiteConfigError
from ..metrics import check_metrics, compute_metric
from .base import (
    RunContext,
    Suite,
    SuiteResult,
    data_path,
    file_sha256,
    metric,
    nothing_fits,
    read_jsonl,
    stable_order,
)

__all__ = ["GenerationConfig", "GenerationSuite", "build_items", "load_records"]

TASKS = ("heading", "continuation")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(\"'])")
INSTRUCTIONS = {
    "heading": "Each answer from the Python FAQ is followed by the question it answers.",
    "continuation": "Each paragraph from the Python FAQ is split after its first sentence.",
}
LABELS = {"heading": ("Answer", "Question"), "continuation": ("Beginning", "Rest")}
# A source cut shorter than this says too little to be worth scoring: the item is skipped.
MIN_SOURCE_CHARS = 64


@dataclass(frozen=True)
class GenerationConfig:
    data: str
    tasks: tuple[str, ...]
    num_items: int  # items per task
    num_shots: int  # in-context examples per prompt
    max_source_chars: int  # longer sources are cut at a word boundary (small context windows)
    max_tokens: int
    temperature: float
    api: str  # "completions" | "chat"
    metrics: tuple[str, ...]  # metric plugin names
    max_context_tokens: int  # 0 = the server's max_model_len; set it for servers without one

    def validate(self) -> None:
        unknown = sorted(set(self.tasks) - set(TASKS))
        if unknown or not self.tasks:
            raise SuiteConfigError(
                f"generation: tasks must be a non-empty subset of {list(TASKS)}, got {unknown}"
            )
        if self.api not in ("completions", "chat"):
            raise SuiteConfigError("generation: api must be 'completions' or 'chat'")
        if self.num_items < 1 or self.num_shots < 0 or self.max_tokens < 1:
            raise SuiteConfigError(
                "generation: num_items and max_tokens must be >= 1, num_shots >= 0"
            )
        if self.max_context_tokens < 0:
            raise SuiteConfigError("generation: max_context_tokens must be >= 0 (0 = the server's)")
        check_metrics(self.metrics)


@dataclass(frozen=True)
class Item:
    id: str
    task: str
    source: str
    reference: str


@dataclass(frozen=True)
class Posed:
    """An item as it is asked: the examples it gets and its source, both fitted."""

    item: Item
    shots: int  # in-context examples given (<= num_shots)
    source_clipped: bool
    prompt: str | list[dict[str, str]]


def split_first_sentence(paragraph: str) -> tuple[str, str]:
    parts = SENTENCE_END.split(paragraph, maxsplit=1)
    return (parts[0], parts[1]) if len(parts) == 2 else (paragraph, "")


def clip(text: str, max_chars: int) -> str:
    text = " ".join(text.split())
    if len(text) <= max_chars:
        return text
    return text[:max_chars].rsplit(" ", 1)[0]


def load_records(path: Path) -> list[dict[str, str]]:
    """The data file's records, each checked before any request: a JSON object with a
    string `question` and `paragraph` and a distinct `id` (a string or an integer, used as
    a string); the first that is not stops the run with one line naming FILE:LINE."""
    records = read_jsonl(
        path,
        "generation",
        "data",
        required=("id", "question", "paragraph"),
        kinds={"id": (str, int), "question": (str,), "paragraph": (str,)},
        unique="id",
    )
    return [{**r, "id": str(r["id"])} for r in records]


def item_for(record: dict[str, str], task: str, max_chars: int) -> Item | None:
    paragraph = " ".join(record["paragraph"].split())
    if task == "heading":
        return Item(
            f"{record['id']}::heading", task, clip(paragraph, max_chars), record["question"]
        )
    first, rest = split_first_sentence(paragraph)
    if not rest:
        return None
    return Item(
        f"{record['id']}::continuation", task, clip(first, max_chars), clip(rest, max_chars)
    )


def build_items(
    records: list[dict[str, str]], cfg: GenerationConfig, seed: int
) -> tuple[dict[str, list[Item]], dict[str, list[Item]]]:
    """(shots, items) per task: a seeded order of records, shots first, then evaluated items."""
    by_id = {r["id"]: r for r in records}
    order = [by_id[i] for i in stable_order(list(by_id), seed)]
    shots: dict[str, list[Item]] = {}
    items: dict[str, list[Item]] = {}
    for task in cfg.tasks:
        candidates = [it for r in order if (it := item_for(r, task, cfg.max_source_chars))]
        shots[task] = candidates[: cfg.num_shots]
        items[task] = candidates[cfg.num_shots : cfg.num_shots + cfg.num_items]
    return shots, items


def completion_prompt(task: str, shots: list[Item], item: Item) -> str:
    left, right = LABELS[task]
    blocks = [INSTRUCTIONS[task]]
    blocks += [f"{left}: {s.source}\n{right}: {s.reference}" for s in shots]
    blocks.append(f"{left}: {item.source}\n{right}:")
    return "\n\n".join(blocks)


def chat_messages(task: str, shots: list[Item], item: Item) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": INSTRUCTIONS[task] + " Reply with one line."}]
    for s in shots:
        messages += [
            {"role": "user", "content": s.source},
            {"role": "assistant", "content": s.reference},
        ]
    messages.append({"role": "user", "content": item.source})
    return messages


class GenerationSuite(Suite):
    name = "generation"
    description = (
        "FAQ question writing and paragraph continuation, scored with BLEU, chrF and ROUGE"
    )
    metrics = ("bleu", "chrf", "rouge1", "rouge2", "rougeL", "rougeLsum")
    config_cls = GenerationConfig

    async def run(self, ctx: RunContext) -> SuiteResult:
        cfg: GenerationConfig = ctx.config
        path = data_path(cfg.data)
        records = load_records(path)
        shots, items = build_items(records, cfg, ctx.seed)
        if ctx.limit:
            items = {task: its[: ctx.limit] for task, its in items.items()}
        flat = [(task, it) for task in cfg.tasks for it in items[task]]
        answers = await gather_with_progress(
            (self.pose_and_generate(ctx, cfg, task, shots[task], it) for task, it in flat),
            desc="generation",
        )
        answered = [(task, a) for (task, _), a in zip(flat, answers, strict=True) if a]
        samples = [
            {
                "id": posed.item.id,
                "task": task,
                "source": posed.item.source,
                "reference": posed.item.reference,
                "shots": posed.shots,
                "source_clipped": posed.source_clipped,
                "prediction": text,
                "finish_reason": finish,
            }
            for task, (posed, text, finish) in answered
        ]
        if not samples:
            raise nothing_fits(self.name, ctx.fit, "items")
        metrics, signatures = score(cfg, samples)
        return SuiteResult(
            metrics=metrics,
            samples=samples,
            data_files={cfg.data: file_sha256(path)},
            details={
                "signatures": signatures,
                "items_per_task": {t: sum(s["task"] == t for s in samples) for t in cfg.tasks},
                "skipped_per_task": {
                    t: sum(it.id in ctx.fit.skipped for it in items[t]) for t in cfg.tasks
                },
                "shots": {t: [s.id for s in shots[t]] for t in cfg.tasks},
            },
        )

    async def pose_and_generate(
        self, ctx: RunContext, cfg: GenerationConfig, task: str, shots: list[Item], item: Item
    ) -> tuple[Posed, str, str | None] | None:
        posed = await pose(ctx, cfg, task, shots, item)
        if posed is None:
            return None
        answer = await ctx.fit.refused_as_too_long(item.id, self.generate(ctx, cfg, posed))
        return None if answer is None else (posed, *answer)

    async def generate(
        self, ctx: RunContext, cfg: GenerationConfig, posed: Posed
    ) -> tuple[str, str | None]:
        params: dict[str, Any] = {
            "max_tokens": cfg.max_tokens,
            "temperature": cfg.temperature,
            "seed": ctx.seed,
        }
        if cfg.api == "chat":
            response = await ctx.client.chat({"messages": posed.prompt, **params})
            choice = first_choice(response, "/v1/chat/completions")
            text = (choice.get("message") or {}).get("content") or ""
        else:
            body = {"prompt": posed.prompt, "stop": ["\n\n"], **params}
            response = await ctx.client.completion(body)
            choice = first_choice(response, "/v1/completions")
            text = choice.get("text") or ""
        return text.strip().split("\n")[0].strip(), choice.get("finish_reason")


def prompt_for(
    cfg: GenerationConfig, task: str, shots: list[Item], item: Item
) -> str | list[dict[str, str]]:
    if cfg.api == "chat":
        return chat_messages(task, shots, item)
    return completion_prompt(task, shots, item)


async def pose(
    ctx: RunContext, cfg: GenerationConfig, task: str, shots: list[Item], item: Item
) -> Posed | None:
    """Fit one item to the context (module docstring); None when it is skipped."""
    fit = ctx.fit
    for k in range(len(shots), -1, -1):
        prompt = prompt_for(cfg, task, shots[:k], item)
        if await fit.fits(prompt, cfg.max_tokens):
            fit.keep(item.id, trimmed=k < len(shots))
            return Posed(item, k, False, prompt)

    def clipped(chars: int) -> Item:
        return dataclasses.replace(item, source=clip(item.source, chars))

    chars = await fit.largest_fitting(
        lambda n: prompt_for(cfg, task, [], clipped(n)),
        MIN_SOURCE_CHARS,
        len(item.source) - 1,
        cfg.max_tokens,
    )
    if chars is None:
        what = f"the prompt without examples, its source cut to {MIN_SOURCE_CHARS} characters,"
        fit.skip(item.id, fit.too_long_reason(what, cfg.max_tokens))
        return None
    fit.keep(item.id, trimmed=True)
    return Posed(clipped(chars), 0, True, prompt_for(cfg, task, [], clipped(chars)))


def score(
    cfg: GenerationConfig, samples: list[dict[str, Any]]
) -> tuple[dict[str, dict], dict[str, str]]:
    """Corpus scores of every configured metric, per task and over all items."""
    metrics: dict[str, dict] = {}
    signatures: dict[str, str] = {}
    groups = {task: [s for s in samples if s["task"] == task] for task in cfg.tasks}
    if len(cfg.tasks) > 1:
        groups["all"] = samples
    for group, rows in groups.items():
        if not rows:
            continue
        predictions = [r["prediction"] for r in rows]
        references = [[r["reference"]] for r in rows]
        for name in cfg.metrics:
            scores, flags, signature = compute_metric(name, predictions, references)
            if signature:
                signatures[name] = signature
            for key, value in scores.items():
                metrics[f"{group}/{key}"] = metric(
                    value, flags[key], f"{name} plugin, {group} items"
                )
    return metrics, signatures
