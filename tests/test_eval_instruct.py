"""The `instruct` suite end to end against an in-process server on a tiny model: the chat
answers are the model's own greedy continuations of the ChatML prompt the trainer renders,
and the preference log-likelihoods read through /tokenize + /v1/completions equal the
trainer's DPO response log-probs of the same pairs. References nobody here wrote:
rouge-score (ROUGE-L) and the model's logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from servers import serving

from atlas_server.api import ServerState, create_app
from atlas_server.checkpoint import load_checkpoint, save_checkpoint
from atlas_server.config import ServerConfig
from atlas_server.model import Transformer, load_preset
from atlas_server.tokenizer import IM_END
from eval_suites.errors import SuiteConfigError
from eval_suites.runner import RunOptions, run_suite
from trainer.chat_data import ChatMLRenderer, PreferencePair, tokenize_pair
from trainer.dpo import PairBatch, sequence_logps

QA = [
    ("What does abs do?", "Return the absolute value."),
    ("What does len do?", "Return the number of items."),
    ("What does min do?", "Return the smallest item."),
    ("What does chr do?", "Return a one-character string."),
]
MAX_TOKENS = 24


def chat(q: str, a: str, record_id: str) -> dict:
    return {
        "id": record_id,
        "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
    }


def greedy_answer(model: Transformer, tokenizer, question: str) -> tuple[str, bool]:
    """The model's greedy reply to the ChatML prompt the trainer's renderer gives, and
    whether it ended with <|im_end|> within MAX_TOKENS."""
    ids, _ = ChatMLRenderer(tokenizer)([{"role": "user", "content": question}])
    ids += [tokenizer.special_tokens["<|im_start|>"], *tokenizer.encode("assistant\n")]
    out = model.generate(ids, MAX_TOKENS)
    end = tokenizer.special_tokens[IM_END]
    stopped = end in out
    return tokenizer.decode(out[: out.index(end)] if stopped else out).strip(), stopped


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, byte_tokenizer) -> Path:
    """gpt2-tiny with weights scaled up, so greedy text varies token to token."""
    torch.manual_seed(0)
    model = Transformer(load_preset("gpt2-tiny", vocab_size=byte_tokenizer.vocab_size))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8.0)
    root = tmp_path_factory.mktemp("instruct-ckpt")
    return save_checkpoint(root / "tiny", model.eval(), byte_tokenizer, {"source": "test"})


@pytest.fixture(scope="module")
def files(tmp_path_factory, checkpoint, byte_tokenizer) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("instruct-data")
    model = load_checkpoint(checkpoint).model
    # One reference is the model's own greedy reply: exact match must find exactly that one.
    own, _ = greedy_answer(model, byte_tokenizer, QA[0][0])
    assert own
    answers = [chat(QA[0][0], own, "f0")] + [
        chat(q, a, f"f{i}") for i, (q, a) in enumerate(QA) if i
    ]
    (folder / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in answers))
    pairs = [
        {"id": f"p{i}", "prompt": q, "chosen": a, "rejected": QA[(i + 1) % len(QA)][1]}
        for i, (q, a) in enumerate(QA)
    ]
    (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    return {name: folder / f"{name}.jsonl" for name in ("heldout", "pairs")}


@pytest.fixture(scope="module")
def server(checkpoint):
    state = ServerState(config=ServerConfig(), model_name="tiny", checkpoint_path=str(checkpoint))
    with serving(create_app(state)) as base:
        yield base


def run(tmp_path: Path, url: str, *overrides: str) -> dict:
    out = run_suite(
        RunOptions(
            suite="instruct",
            base_url=url,
            # A folder per call: a folder holding a complete run is refused.
            output=tmp_path / f"run-{len(list(tmp_path.glob('run-*')))}",
            cache_path=tmp_path / "cache.sqlite",
            overrides=overrides,
        )
    )
    results = json.loads((out / "results.json").read_text())
    results["_samples"] = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    results["_dir"] = out
    return results


def test_answers_and_preferences_are_scored_through_the_api(
    tmp_path, server, files, checkpoint, byte_tokenizer
):
    from rouge_score import rouge_scorer

    results = run(
        tmp_path,
        server,
        f"data='{files['heldout']}'",
        f"pairs='{files['pairs']}'",
        f"max_tokens={MAX_TOKENS}",
    )
    metrics = results["metrics"]
    model = load_checkpoint(checkpoint).model
    answers = {s["id"]: s for s in results["_samples"] if s["kind"] == "answer"}
    assert len(answers) == len(QA)
    stops = 0
    for i, (q, _) in enumerate(QA):  # what the chat endpoint fed the model is what we render
        text, stopped = greedy_answer(model, byte_tokenizer, q)
        assert answers[f"f{i}"]["prediction"] == text
        assert answers[f"f{i}"]["finish_reason"] == ("stop" if stopped else "length")
        stops += stopped
    assert metrics["exact_match"]["value"] == pytest.approx(1 / len(QA))
    assert metrics["stopped"]["value"] == pytest.approx(stops / len(QA))
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    expected = [
        scorer.score(s["reference"], s["prediction"])["rougeL"].fmeasure for s in answers.values()
    ]
    assert metrics["rougeL"]["value"] == pytest.approx(sum(expected) / len(expected))
    assert metrics["rougeL"]["higher_is_better"] is True

    # The served log-likelihoods are the trainer's own response log-probs of the same pairs.
    renderer = ChatMLRenderer(byte_tokenizer)
    pairs = {s["id"]: s for s in results["_samples"] if s["kind"] == "pair"}
    assert len(pairs) == len(QA)
    wins, margins = 0, []
    for i, (q, a) in enumerate(QA):
        sample = pairs[f"p{i}"]
        pair = tokenize_pair(
            PreferencePair(({"role": "user", "content": q},), a, sample["rejected"], "x"), renderer
        )
        with torch.no_grad():
            chosen, rejected = sequence_logps(model, PairBatch.from_pairs([pair], [0], 0))
        assert sample["chosen_logprob"] == pytest.approx(chosen.item(), abs=1e-3)
        assert sample["rejected_logprob"] == pytest.approx(rejected.item(), abs=1e-3)
        assert sample["chosen_tokens"] == int(pair.chosen_mask.sum()) == len(a) + 1
        wins += chosen.item() > rejected.item()
        margins.append(chosen.item() - rejected.item())
    assert metrics["preference_accuracy"]["value"] == pytest.approx(wins / len(QA))
    assert metrics["logprob_margin"]["value"] == pytest.approx(sum(margins) / len(QA), abs=1e-3)

    assert (results["_dir"] / "instruct.png").read_bytes()[:4] == b"\x89PNG"
    assert "| preference_accuracy |" in (results["_dir"] / "report.md").read_text()
    assert results["details"]["pairs"] == len(QA) and results["details"]["plot"] == "instruct.png"


def test_the_default_data_parses_and_a_bad_record_stops_the_run_in_one_line(tmp_path, server):
    from eval_suites.suites.base import data_path
    from eval_suites.suites.instruct import load_items, load_pairs

    assert len(load_items(data_path("instruct/sft_heldout.jsonl"))) >= 50
    assert len(load_pairs(data_path("instruct/prefs_heldout.jsonl"))) >= 50
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(chat("q", "a", "ok")) + "\n" + '{"messages": [{"role": "user"}]}\n')
    with pytest.raises(SuiteConfigError, match=rf"{bad}:2: messages\[0\] has no content"):
        run(tmp_path, server, f"data='{bad}'", "pairs=''")


def test_conversations_that_do_not_fit_the_context_are_skipped_and_counted(tmp_path, server):
    """`max_context_tokens` (every suite has it) and fitting: a conversation too long for the
    context is skipped and listed in context_fit, never the end of the run; if none fits, a
    one-line error says so."""
    data = tmp_path / "mixed.jsonl"
    rows = [chat("What does f1 do?", "Return it.", "short"), chat("why? " * 80, "Because.", "long")]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = run(tmp_path, server, f"data='{data}'", "pairs=''", "max_tokens=8",
                  "max_context_tokens=200")  # fmt: skip
    assert [s["id"] for s in results["_samples"]] == ["short"]
    fit = results["context_fit"]
    assert fit["max_model_len"] == 200 and fit["items_skipped"] == 1
    assert fit["skipped"][0]["id"] == "long"
    with pytest.raises(SuiteConfigError, match="instruct"):
        run(tmp_path, server, f"data='{data}'", "pairs=''", "max_tokens=300")
