"""atlas-eval pieces that need no server: config, cache keys, windows, items, scoring, compare."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from eval_suites.cache import ResponseCache, request_key
from eval_suites.compare import compare_runs
from eval_suites.config import load_suite_config, parse_set_option
from eval_suites.errors import ResultsError, SuiteConfigError
from eval_suites.results import write_run
from eval_suites.suites.base import DATA_DIR
from eval_suites.suites.generation import GenerationConfig
from eval_suites.suites.generation import build_items as build_generation_items
from eval_suites.suites.hallucination import (
    HallucinationConfig,
    Judgements,
    build_items,
    contains_answer,
    score_answer,
)
from eval_suites.suites.perplexity import PerplexityConfig, rolling_windows, summarise
from eval_suites.support import LexicalJudge, calibrate, load_pairs, numbers_in


def facts() -> list[dict]:
    path = DATA_DIR / "hallucination" / "facts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def hallucination_config(**overrides) -> HallucinationConfig:
    return load_suite_config(
        "hallucination", HallucinationConfig, overrides=[f"{k}={v}" for k, v in overrides.items()]
    )


# --- config -------------------------------------------------------------------------------------
def test_set_option_parses_toml_literals_and_falls_back_to_strings():
    assert parse_set_option("window=128") == ("window", 128)
    assert parse_set_option("tasks=['heading']") == ("tasks", ["heading"])
    assert parse_set_option("api=chat") == ("api", "chat")
    with pytest.raises(SuiteConfigError, match="key=value"):
        parse_set_option("window")


def test_config_rejects_unknown_keys_and_wrong_types_naming_them():
    with pytest.raises(SuiteConfigError, match="unknown perplexity option.*windw"):
        load_suite_config("perplexity", PerplexityConfig, overrides=["windw=3"])
    with pytest.raises(SuiteConfigError, match="'window' must be int"):
        load_suite_config("perplexity", PerplexityConfig, overrides=["window='big'"])
    cfg = load_suite_config("perplexity", PerplexityConfig, overrides=["window=64", "stride=16"])
    assert (cfg.window, cfg.stride, cfg.max_tokens) == (64, 16, 1)


def test_config_file_layer_is_validated(tmp_path: Path):
    user = tmp_path / "g.toml"
    user.write_text('tasks = ["heading", "poetry"]\n')
    with pytest.raises(SuiteConfigError, match="poetry"):
        load_suite_config("generation", GenerationConfig, user_file=user)


# --- cache --------------------------------------------------------------------------------------
def test_cache_key_is_canonical_and_separates_servers_and_models(tmp_path: Path):
    a = request_key("http://x", "m", "/v1/completions", {"prompt": "p", "max_tokens": 1})
    assert a == request_key("http://x", "m", "/v1/completions", {"max_tokens": 1, "prompt": "p"})
    assert a != request_key("http://y", "m", "/v1/completions", {"prompt": "p", "max_tokens": 1})
    assert a != request_key("http://x", "n", "/v1/completions", {"prompt": "p", "max_tokens": 1})
    cache = ResponseCache(tmp_path / "c.sqlite")
    cache.put(a, "/v1/completions", {"prompt": "p"}, {"choices": [{"text": "t"}]})
    cache.close()
    reopened = ResponseCache(tmp_path / "c.sqlite")
    assert reopened.get(a) == {"choices": [{"text": "t"}]} and len(reopened) == 1


# --- perplexity windows -----------------------------------------------------------------------------
@pytest.mark.parametrize("n_tokens,window", [(1, 8), (8, 8), (9, 8), (50, 8), (100, 31)])
def test_disjoint_windows_equal_lm_eval_rolling_windows(n_tokens: int, window: int):
    tokens = list(range(1000, 1000 + n_tokens))
    ours = rolling_windows(tokens, prefix=7, window=window, stride=window)
    # lm-eval: loglikelihood_rolling with max_length = W + 1 uses max_seq_len = W.
    theirs = [
        make_disjoint_window(w)
        for w in get_rolling_token_windows(
            tokens, prefix_token=7, max_seq_len=window, context_len=1
        )
    ]
    assert [(w.prompt[: -w.scored], w.prompt[-w.scored :]) for w in ours] == theirs


@pytest.mark.parametrize("stride", [1, 3, 8])
def test_strided_windows_score_every_token_once_with_bounded_prompts(stride: int):
    tokens = list(range(40))
    windows = rolling_windows(tokens, prefix=99, window=8, stride=stride)
    scored = [t for w in windows for t in w.prompt[-w.scored :]]
    assert scored == tokens
    assert all(len(w.prompt) <= 9 for w in windows)
    # Every later window sees the full W + 1 prompt tokens of context.
    assert all(len(w.prompt) == 9 for w in windows[1:])


# --- generation items -------------------------------------------------------------------------------
def test_generation_items_are_deterministic_and_disjoint_from_shots():
    cfg = load_suite_config("generation", GenerationConfig)
    records = [json.loads(x) for x in (DATA_DIR / cfg.data).read_text().splitlines() if x]
    shots_a, items_a = build_generation_items(records, cfg, seed=1)
    shots_b, items_b = build_generation_items(records, cfg, seed=1)
    _, items_c = build_generation_items(records, cfg, seed=2)
    assert items_a == items_b and items_a != items_c
    for task in cfg.tasks:
        assert len(items_a[task]) == cfg.num_items
        assert not {i.id for i in shots_a[task]} & {i.id for i in items_a[task]}
    heading = items_a["heading"][0]
    record = next(r for r in records if heading.id.startswith(r["id"]))
    assert heading.reference == record["question"] and heading.reference.endswith("?")


# --- hallucination items and scoring ----------------------------------------------------------------
def test_hallucination_items_follow_the_template_bank():
    cfg = hallucination_config()
    items = build_items(facts(), cfg, seed=0)
    assert items == build_items(facts(), cfg, seed=0)
    assert [i.id for i in items] != [i.id for i in build_items(facts(), cfg, seed=1)]
    kinds = [i.kind for i in items]
    assert (
        len(items),
        kinds.count("answerable"),
        kinds.count("counterfactual"),
        kinds.count("unanswerable"),
    ) == (48, 24, 12, 12)
    answerable = [i for i in items if i.kind == "answerable"]
    assert {n: sum(i.distractors == n for i in answerable) for n in (0, 2, 4)} == {0: 8, 2: 8, 4: 8}
    assert {p: sum(i.position == p for i in answerable) for p in ("first", "middle", "last")} == {
        "first": 6,
        "middle": 6,
        "last": 4,
    }
    for item in items:
        texts = [s.text for s in item.sources]
        if item.kind == "unanswerable":
            assert item.gold == "unanswerable" and not item.gold_indices
        else:
            (gold,) = item.gold_indices
            assert contains_answer(texts[gold - 1], item.gold)
            assert not any(
                contains_answer(t, item.gold) for i, t in enumerate(texts, 1) if i != gold
            )
        if item.kind == "counterfactual":
            assert item.world != item.gold and not any(
                contains_answer(t, item.world) for t in texts
            )


def score(item, answer: str) -> dict:
    judgements = Judgements(LexicalJudge(0.65))
    from eval_suites.suites.hallucination import needed_pairs

    judgements.fill(needed_pairs(item, answer))
    return score_answer(item, answer, judgements)


def test_alce_citation_scores_on_hand_written_answers():
    items = build_items(facts(), hallucination_config(), seed=0)
    item = next(i for i in items if i.kind == "answerable" and i.distractors == 2)
    (gold,) = item.gold_indices
    other = 1 if gold != 1 else 2
    sentence = item.sources[gold - 1].text.split(". ")[0]
    good = score(item, f"{sentence} [{gold}].")
    assert good["correct"] in (True, False) and good["cited_sentences_supported"] == 1
    assert good["precise_citations"] == 1 and good["valid_citations"] == 1 and good["cites_gold"]
    # An extra, irrelevant citation: recall holds, that citation is imprecise.
    extra = score(item, f"{sentence} [{gold}][{other}].")
    assert (
        extra["cited_sentences_supported"] == 1
        and extra["precise_citations"] == 1
        and extra["citations"] == 2
    )
    # A citation to a source that was not given counts against recall, precision and validity.
    invalid = score(item, f"{sentence} [{gold}][9].")
    assert invalid["cited_sentences_supported"] == 0 and invalid["precise_citations"] == 0
    assert (invalid["citations"], invalid["valid_citations"]) == (2, 1)
    # Citing only a distractor: the sentence is not supported by its citation.
    wrong = score(item, f"{sentence} [{other}].")
    assert wrong["cited_sentences_supported"] == 0 and wrong["supported_sentences"] == 1


def test_abstention_counterfactual_and_number_rules():
    items = build_items(facts(), hallucination_config(), seed=0)
    unanswerable = next(i for i in items if i.kind == "unanswerable")
    assert score(unanswerable, "The sources do not contain the answer: unanswerable.")["correct"]
    assert not score(unanswerable, "It was 1889 [1].")["correct"]
    cf = next(i for i in items if i.kind == "counterfactual")
    follows = score(cf, f"{cf.gold} [{cf.gold_indices[0]}].")
    overrides = score(cf, f"{cf.world}.")
    assert follows["adherent"] and not follows["override"]
    assert overrides["override"] and not overrides["adherent"]
    invented = score(cf, "It happened in 4321 [1].")
    assert (invented["numbers"], invented["unsupported_numbers"]) == (1, 1)
    assert numbers_in("about 6,650 km and four chambers") == {"6650", "4"}


def test_lexical_support_proxy_is_calibrated_on_the_fixture():
    passages = {f["id"]: f["passage"].format(answer=f["answer"]) for f in facts()}
    claims, texts, labels = load_pairs(DATA_DIR / "hallucination" / "support_pairs.jsonl", passages)
    assert len(claims) >= 40 and 0.3 < sum(labels) / len(labels) < 0.7
    result = calibrate(LexicalJudge(0.65), claims, texts, labels)
    # Better than always answering the majority label, and LOO never beats in-sample.
    assert result.accuracy > max(sum(labels), len(labels) - sum(labels)) / len(labels)
    assert result.loo_accuracy <= result.best_accuracy


# --- compare ------------------------------------------------------------------------------------------
def fake_run(tmp_path: Path, name: str, suite: str, metrics: dict, levels=None) -> Path:
    results = {
        "suite": suite,
        "metrics": {
            k: {"value": v, "higher_is_better": h, "description": ""}
            for k, (v, h) in metrics.items()
        },
        "details": {"levels": levels or []},
        "run": {"seed": 0, "limit": None, "duration_s": 1.0, "started_at": "t"},
        "server": {"base_url": f"http://127.0.0.1:1/{name}", "model": name},
    }
    write_run(tmp_path / name, results, [])
    return tmp_path / name


def level(concurrency: int, ttft: float) -> dict:
    percentiles = {"median_ttft_ms": ttft, "p90_ttft_ms": ttft * 2, "p99_ttft_ms": ttft * 3}
    return {
        "load": f"concurrency {concurrency}",
        "concurrency": concurrency,
        "summary": percentiles,
    }


def test_compare_writes_a_table_with_the_best_value_in_bold_and_pngs(tmp_path: Path):
    runs = [
        fake_run(tmp_path, "a", "perplexity", {"bits_per_byte": (2.5, False)}),
        fake_run(tmp_path, "b", "perplexity", {"bits_per_byte": (3.0, False)}),
        fake_run(
            tmp_path,
            "c",
            "latency",
            {"output_throughput": (10.0, True)},
            [level(1, 5.0), level(4, 9.0)],
        ),
    ]
    table, files = compare_runs(runs, tmp_path / "out", ["atlas", "hf", "atlas-lat"])
    assert "| bits_per_byte | **2.5000** | 3.0000 | ↓ |" in table
    assert "| atlas-lat | concurrency 4 |" in table
    pngs = [f for f in files if f.suffix == ".png"]
    assert {p.name for p in pngs} == {
        "perplexity_metrics.png",
        "latency_metrics.png",
        "latency_percentiles.png",
    }
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    with pytest.raises(ResultsError, match="no results.json"):
        compare_runs([tmp_path], None, [])


def test_compare_bolds_no_winner_for_values_equal_at_the_shown_precision(tmp_path: Path):
    runs = [
        fake_run(tmp_path, "a", "perplexity", {"nll": (553906.7000001, False)}),
        fake_run(tmp_path, "b", "perplexity", {"nll": (553906.7000000, False)}),
    ]
    table, _ = compare_runs(runs, tmp_path / "out", ["atlas", "hf"])
    assert "**" not in table.split("| nll |")[1].splitlines()[0]


# --- CLI surface ------------------------------------------------------------------------------------------
def test_list_shows_every_suite_with_its_metrics_and_help_has_examples():
    from typer.testing import CliRunner

    from eval_suites.cli import app
    from eval_suites.suites import SUITES

    runner = CliRunner()
    listing = runner.invoke(app, ["list"])
    assert listing.exit_code == 0
    for name, suite in SUITES.items():
        assert name in listing.output and ", ".join(suite.metrics) in listing.output
    for command in ("run", "compare", "list"):
        help_text = runner.invoke(app, [command, "--help"]).output
        assert "Example" in help_text and "atlas-eval" in help_text


def test_run_rejects_bad_invocations_in_one_line(tmp_path: Path):
    from typer.testing import CliRunner

    from eval_suites.cli import app

    runner = CliRunner()
    unknown = runner.invoke(app, ["run", "poetry", "--base-url", "http://127.0.0.1:9"])
    assert unknown.exit_code == 1 and "unknown suite 'poetry'" in unknown.output
    both = runner.invoke(app, ["run", "perplexity"])
    assert both.exit_code == 1 and "exactly one of --base-url" in both.output
    bad_set = runner.invoke(
        app,
        [
            "run",
            "perplexity",
            "--base-url",
            "http://127.0.0.1:9",
            "--set",
            "windw=3",
            "-o",
            str(tmp_path),
        ],
    )
    assert bad_set.exit_code == 1 and "windw" in bad_set.output


@pytest.mark.parametrize(
    "content,message",
    [
        ("{not json", "not valid JSON"),
        ('["a list"]', "not an atlas-eval results file"),
        ('{"metrics": {}}', "not an atlas-eval results file"),
    ],
)
def test_compare_rejects_broken_results_files(tmp_path: Path, content: str, message: str):
    (tmp_path / "results.json").write_text(content)
    with pytest.raises(ResultsError, match=message):
        compare_runs([tmp_path], tmp_path / "out", [])


def test_compare_needs_one_label_per_run(tmp_path: Path):
    run = fake_run(tmp_path, "a", "perplexity", {"bits_per_byte": (2.5, False)})
    with pytest.raises(ResultsError, match="one per run"):
        compare_runs([run], tmp_path / "out", ["x", "y"])


def labelled_run(folder: Path, model: str, started: str, checkpoint=None, port=8000) -> Path:
    results = {
        "suite": "perplexity",
        "metrics": {"bits_per_byte": {"value": 2.0, "higher_is_better": False}},
        "run": {"seed": 0, "limit": None, "duration_s": 1.0, "started_at": started},
        "server": {
            "base_url": f"http://127.0.0.1:{port}",
            "model": model,
            "checkpoint": checkpoint,
        },
    }
    write_run(folder, results, [])
    return folder


def default_labels(dirs: list[Path]) -> list[str]:
    from eval_suites.compare import labels_for
    from eval_suites.results import load_results

    return labels_for([load_results(d) for d in dirs], [], dirs)


def test_two_runs_of_one_model_get_labels_told_apart_by_their_folders(tmp_path: Path):
    before = labelled_run(tmp_path / "ppl-before", "quickstart", "2026-11-24T17:00:00+00:00")
    after = labelled_run(tmp_path / "ppl-after", "quickstart", "2026-11-24T18:00:00+00:00")
    assert default_labels([before, after]) == [
        "quickstart@127.0.0.1:8000 · ppl-before",
        "quickstart@127.0.0.1:8000 · ppl-after",
    ]
    # Different models need nothing more than model@host.
    other = labelled_run(tmp_path / "x", "other", "t")
    assert default_labels([before, other]) == [
        "quickstart@127.0.0.1:8000",
        "other@127.0.0.1:8000",
    ]


def test_checkpoint_runs_are_labelled_without_their_random_port(tmp_path: Path):
    # `atlas-eval run perplexity --checkpoint A/checkpoint` twice, default output folders.
    a = labelled_run(tmp_path / "perplexity-20261124T170000Z", "checkpoint", "t1", "/a", 41233)
    b = labelled_run(tmp_path / "perplexity-20261124T180000Z", "checkpoint", "t2", "/b", 39811)
    assert default_labels([a, b]) == [
        "checkpoint · 20261124T170000Z",
        "checkpoint · 20261124T180000Z",
    ]


def test_runs_in_same_named_folders_fall_back_to_start_time_then_number(tmp_path: Path):
    a = labelled_run(tmp_path / "1" / "run", "m", "2026-11-24T17:00:00+00:00")
    b = labelled_run(tmp_path / "2" / "run", "m", "2026-11-24T18:00:00+00:00")
    c = labelled_run(tmp_path / "3" / "run", "m", "2026-11-24T18:00:00+00:00")
    host = "m@127.0.0.1:8000 · run"
    assert default_labels([a, b, c]) == [
        f"{host} · 2026-11-24T17:00:00+00:00",
        f"{host} · 2026-11-24T18:00:00+00:00",
        f"{host} · 2026-11-24T18:00:00+00:00 #2",
    ]


def test_given_labels_are_kept_and_repeats_numbered(tmp_path: Path):
    from eval_suites.compare import labels_for
    from eval_suites.results import load_results

    runs = [load_results(labelled_run(tmp_path / n, "m", "t")) for n in ("a", "b")]
    assert labels_for(runs, ["atlas", "atlas"]) == ["atlas", "atlas #2"]


def test_metric_panels_use_a_log_scale_when_a_bar_would_vanish():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from eval_suites.compare import scale_panel

    fig, (wide, narrow, zeros) = plt.subplots(1, 3)
    assert scale_panel(wide, [44475.0, 31.0]) and wide.get_yscale() == "log"
    assert not scale_panel(narrow, [2.35, 1.1]) and narrow.get_yscale() == "linear"
    assert not scale_panel(zeros, [0.0, 0.0]) and zeros.get_ylim() == (0.0, 1.0)
    plt.close(fig)


def test_the_figure_title_clears_the_first_row_of_panels(tmp_path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from eval_suites.compare import metric_bars_figure
    from eval_suites.results import load_results

    # As many panels as the latency suite reports (29: 8 rows), where tight_layout failed.
    metrics = {f"c1/metric_{i}": (float(i + 1), True) for i in range(29)}
    run = load_results(fake_run(tmp_path, "lat", "latency", metrics))
    fig = metric_bars_figure("latency", [("atlas", run), ("hf", run)])
    renderer = fig.canvas.get_renderer()
    fig.draw(renderer)
    title_bottom = fig._suptitle.get_window_extent(renderer).y0
    first_row = [ax for ax in fig.axes if ax.get_subplotspec().rowspan.start == 0]
    assert len(first_row) == 4
    assert all(title_bottom >= ax.title.get_window_extent(renderer).y1 for ax in first_row)
    plt.close(fig)


# --- latency config -------------------------------------------------------------------------------------
def test_latency_levels_headlines_and_guards(tmp_path: Path):
    from eval_suites.suites.latency import (
        LatencyConfig,
        headline_levels,
        levels_of,
        load_lengths,
        require_loopback,
    )

    cfg = load_suite_config(
        "latency", LatencyConfig, overrides=["concurrencies=[4,1,2]", "request_rates=[0.5]"]
    )
    levels = levels_of(cfg)
    assert [lv.key for lv in levels] == ["c1", "c2", "c4", "rate0.5"]
    assert [lv.key for lv in headline_levels(levels)] == ["c1", "c4", "rate0.5"]
    with pytest.raises(SuiteConfigError, match="concurrencies"):
        load_suite_config("latency", LatencyConfig, overrides=["concurrencies=[0]"])
    for url in ("http://127.0.0.1:8000", "http://localhost:1", "http://[::1]:80"):
        require_loopback(url)
    with pytest.raises(SuiteConfigError, match="loopback"):
        require_loopback("http://example.com:8000")
    lengths = tmp_path / "lengths.jsonl"
    lengths.write_text('{"input_len": 5, "output_len": 7}\n{"input_len": 9}\n')
    with pytest.raises(SuiteConfigError, match="input_len"):
        load_lengths(lengths)


def test_nli_judge_loads_a_local_cross_encoder(tmp_path: Path):
    """The optional NLI path, with a tiny random BERT cross-encoder built here (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    from eval_suites.support import NLIJudge

    words = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        *sorted({w for f in facts() for w in f["passage"].lower().split()}),
    ]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    config = BertConfig(
        vocab_size=len(words),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=3,
        id2label={0: "contradiction", 1: "entailment", 2: "neutral"},
        label2id={"contradiction": 0, "entailment": 1, "neutral": 2},
    )
    BertForSequenceClassification(config).save_pretrained(tmp_path / "nli")
    tokenizer.save_pretrained(tmp_path / "nli")
    judge = NLIJudge(0.5, str(tmp_path / "nli"))
    passages = {f["id"]: f["passage"].format(answer=f["answer"]) for f in facts()}
    claims, texts, labels = load_pairs(DATA_DIR / "hallucination" / "support_pairs.jsonl", passages)
    scores = judge.scores(claims[:6], texts[:6])
    assert len(scores) == 6 and all(0.0 <= s <= 1.0 for s in scores)
    assert calibrate(judge, claims[:6], texts[:6], labels[:6]).pairs == 6
    with pytest.raises(SuiteConfigError, match="not a local directory"):
        hallucination_config(nli_model="'cross-encoder/nli-deberta'")


def test_perplexity_documents_need_text_and_number_their_lines_without_an_id(tmp_path: Path):
    """docs/training.md's held-out files are plain {"text": ...} records: a missing id was
    a KeyError traceback in the middle of the run."""
    from eval_suites.errors import SuiteConfigError
    from eval_suites.suites.perplexity import load_documents

    data = tmp_path / "heldout.jsonl"
    data.write_text('{"text": "def f(): pass"}\n\n{"text": "x = 1", "id": "mine"}\n')
    assert [(d["id"], d["text"]) for d in load_documents(data, None)] == [
        ("line-1", "def f(): pass"),
        ("mine", "x = 1"),
    ]
    data.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(SuiteConfigError, match=r'heldout.jsonl:2: no "text" string'):
        load_documents(data, None)


def test_a_perplexity_past_floats_range_is_infinite_not_a_crash():
    """Found by an audit: 800 nats a word made math.exp raise OverflowError after the run."""
    sample = {"loglikelihood": -8000.0, "tokens": 100, "bytes": 1000, "words": 10}
    metrics = summarise([sample])
    assert metrics["word_perplexity"]["value"] == float("inf")
    assert metrics["token_perplexity"]["value"] == pytest.approx(math.exp(80))  # 80 nats a token
    assert metrics["bits_per_byte"]["value"] == pytest.approx(8 / math.log(2))
