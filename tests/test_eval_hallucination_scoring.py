"""The hallucination suite's scoring and data checks (docs/evaluation.md, "hallucination").

Checked against references the suite does not compute: numbers as literal strings, token F1
by the SQuAD formula written out here, answer lengths counted by hand, and a fake
OpenAI-compatible server in this file that answers every item perfectly ("oracle") or
pastes every source ("copy"), so what a perfect or a verbose model scores is known.

Covered: a corpus or calibration record with a missing or mistyped key is one line naming
FILE:LINE before any request; a short cited answer ("Athens [1].") is judged with its
question by every judge, and a short wrong one ("Sparta [1].") stays unsupported; metric
plugins score answers without citation markers; "one" in "one of the ..." is no number; the
mean answer length is reported next to every accuracy.
"""

from __future__ import annotations

import json
import re
import string
import threading
from collections import Counter
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
from servers import JSONHandler
from test_eval_cli_errors import assert_one_line_error, invoke

from eval_suites.config import load_suite_config
from eval_suites.errors import SuiteConfigError
from eval_suites.runner import RunOptions, run_suite
from eval_suites.suites.base import DATA_DIR
from eval_suites.suites.hallucination import (
    FACT_KEYS,
    HallucinationConfig,
    Item,
    Judgements,
    Source,
    build_items,
    load_facts,
    needed_pairs,
    plugin_scores,
    score_answer,
    summarise,
)
from eval_suites.support import (
    EmbeddingJudge,
    LexicalJudge,
    NLIJudge,
    calibrate,
    has_foreign_number,
    load_pairs,
    make_claim,
    numbers_in,
)

CORPUS = DATA_DIR / "hallucination" / "facts.jsonl"
PAIRS = DATA_DIR / "hallucination" / "support_pairs.jsonl"
FACTS = {f["id"]: f for f in map(json.loads, CORPUS.read_text().splitlines())}


def config(*overrides: str) -> HallucinationConfig:
    return load_suite_config("hallucination", HallucinationConfig, overrides=list(overrides))


def judges() -> list:
    cfg = config()
    return [LexicalJudge(cfg.lexical_threshold), EmbeddingJudge(cfg.embedding_threshold)]


def passage(fact_id: str, value: str | None = None) -> str:
    fact = FACTS[fact_id]
    return fact["passage"].format(answer=value or fact["answer"])


def item(fact_id: str, *others: str, question: int = 0, kind: str = "answerable") -> Item:
    """The fact's item with its gold passage first and `others` as distractors [2], [3], ..."""
    fact = FACTS[fact_id]
    sources = [Source(fact_id, fact["title"], passage(fact_id))]
    sources += [Source(o, FACTS[o]["title"], passage(o)) for o in others]
    return Item(
        f"{fact_id}/{kind}", kind, fact["questions"][question], fact["answer"], fact["answer"],
        tuple(sources), (1,), len(others), None,
    )  # fmt: skip


def scored(it: Item, answer: str, judge) -> dict:
    judgements = Judgements(judge)
    judgements.fill(needed_pairs(it, answer))
    return score_answer(it, answer, judgements)


# --- A1: data files are checked when read, before any request ---------------------------------------
def write_corpus(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


@pytest.mark.parametrize("key", FACT_KEYS)
def test_a_corpus_record_without_a_key_names_file_line_and_key(tmp_path: Path, key: str):
    good, bad = dict(FACTS["eiffel"]), dict(FACTS["everest"])
    del bad[key]
    path = write_corpus(tmp_path / "facts.jsonl", [good, "", bad])  # line 2 is blank
    with pytest.raises(SuiteConfigError) as e:
        load_facts(path)
    assert str(e.value) == f"hallucination: corpus {path}:3 lacks {key}"


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"questions": "How high is it?"}, "questions is not a list"),
        ({"questions": []}, "empty questions"),
        ({"questions": ["ok?", 3]}, "questions is not a list of non-empty strings"),
        ({"answer": 8849}, "answer is not a string"),
        ({"id": ""}, "empty id"),
        ({"passage": "Everest is high."}, "passage needs its {answer} slot"),
        ({"passage": "Everest {height} is {answer}."}, "passage needs its {answer} slot"),
        ({"passage": "Everest is {answer} {"}, "passage needs its {answer} slot"),
        ({"counterfactual": "8849"}, "counterfactual must differ from answer"),
        ({"id": "eiffel"}, "id 'eiffel' repeats line 1"),
    ],
)
def test_a_mistyped_corpus_record_names_file_line_and_key(tmp_path: Path, change, expected):
    path = write_corpus(tmp_path / "facts.jsonl", [FACTS["eiffel"], {**FACTS["everest"], **change}])
    with pytest.raises(SuiteConfigError, match=re.escape(f"{path}:2")) as e:
        load_facts(path)
    assert expected in str(e.value)


def test_a_corpus_line_that_is_not_a_json_object_names_file_and_line(tmp_path: Path):
    for line, expected in (("{bad", ":2 is not JSON"), ("[1, 2]", ":2 is not a JSON object")):
        path = write_corpus(tmp_path / "facts.jsonl", [FACTS["eiffel"], line])
        with pytest.raises(SuiteConfigError, match=re.escape(f"{path}{expected}")):
            load_facts(path)


def test_a_corpus_too_small_for_its_distractors_is_one_line():
    facts = [FACTS["eiffel"], FACTS["everest"]]
    with pytest.raises(SuiteConfigError, match="has 1 other passages .* fewer than the 2"):
        build_items(facts, config(), seed=0)
    assert len(build_items(facts, config("distractor_counts=[0, 1]"), seed=0)) == 4


@pytest.mark.parametrize(
    "record, expected",
    [
        ({"passage": "eiffel", "label": "supported"}, ":2 lacks claim"),
        ({"claim": "x", "label": "supported"}, ":2 lacks passage"),
        ({"claim": "x", "passage": "eiffel"}, ":2 lacks label"),
        ({"claim": "x", "passage": "eiffel", "label": "yes"}, ":2: label 'yes' is not"),
        ({"claim": "x", "passage": "nowhere", "label": "supported"}, ":2: passage 'nowhere' is no id"),
        ({"claim": 3, "passage": "eiffel", "label": "supported"}, ":2: claim is not a string"),
        ({"claim": "x", "passage": "eiffel", "label": "supported", "question": 1}, ":2: question is"),
    ],
)  # fmt: skip
def test_a_bad_calibration_record_names_file_line_and_key(tmp_path: Path, record, expected):
    path = tmp_path / "pairs.jsonl"
    first = {"claim": "The Eiffel Tower was completed in 1889.", "passage": "eiffel"}
    path.write_text(json.dumps({**first, "label": "supported"}) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(SuiteConfigError, match=re.escape(f"calibration {path}{expected}")):
        load_pairs(path, {f: passage(f) for f in FACTS})


# --- a fake OpenAI-compatible server that answers the suite's prompts ---------------------------------
SOURCE_LINE = re.compile(r"^\[(\d+)\] ([^:]+): (.*)$", re.M)


class OracleHandler(JSONHandler):
    """Answers each completion prompt as a perfect model would (`style` "oracle": "Athens
    [1].", the context's value on counterfactual items, "unanswerable" where the sources
    do not answer), or with every source pasted ("copy"). Counts completion requests."""

    style = "oracle"
    completions: list[str] = []

    def do_GET(self):
        if self.path == "/v1/models":
            self.reply({"data": [{"id": "fake", "object": "model", "max_model_len": 8192}]})
        else:
            self.reply({"eos_token_id": 0, "bos_token_id": 0})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/tokenize":
            self.reply({"tokens": list(body["prompt"].encode())})
            return
        self.completions.append(body["prompt"])
        self.reply({"choices": [{"index": 0, "text": self.answer(body["prompt"])}]})

    def answer(self, prompt: str) -> str:
        sources = SOURCE_LINE.findall(prompt)
        if self.style == "copy":
            return " " + " ".join(text for _, _, text in sources)
        question = prompt.rsplit("Question:", 1)[-1].split("\n")[0].strip()
        for fact in FACTS.values():
            if question == fact["unanswerable"]:
                return " unanswerable"
            if question in fact["questions"]:
                for n, title, text in sources:
                    if title == fact["title"]:
                        value = fact["counterfactual"] if fact["counterfactual"] in text else None
                        return f" {value or fact['answer']} [{n}]."
                return f" {fact['answer']}."  # closed book
        return " no idea"


def serve(style: str = "oracle"):
    handler = type("Handler", (OracleHandler,), {"style": style, "completions": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, handler, f"http://127.0.0.1:{server.server_address[1]}"


@pytest.mark.parametrize("option", ["corpus", "calibration"])
def test_a_bad_data_file_stops_the_run_in_one_line_before_any_completion(
    tmp_path: Path, option: str
):
    """Before: a KeyError traceback; for the calibration file only after every request."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"txt": "hello"}\n')
    server, handler, url = serve()
    try:
        result = invoke(
            "run", "hallucination", "--base-url", url, "--set", f"{option}='{bad}'",
            "--no-cache", "--limit", "2", "-o", tmp_path / "out",
        )  # fmt: skip
    finally:
        server.shutdown()
    lacks = "id" if option == "corpus" else "claim"
    assert_one_line_error(result, f"{bad}:1 lacks {lacks}")
    assert handler.completions == []


# --- A3: a short answer is judged with its question -------------------------------------------------
def test_a_short_sentence_becomes_question_plus_answer_and_a_full_one_stands_alone():
    q = FACTS["olympics"]["questions"][0]
    assert make_claim("Athens.", q).text == f"{q} Athens."
    assert make_claim("It was Athens, in 1896.", q).text == f"{q} It was Athens, in 1896."
    full = "The first modern Olympic Games were held in Athens in 1896."
    assert make_claim(full, q).text == full and not make_claim(full, q).question
    assert make_claim("Athens.").text == "Athens."  # no question: as it is


@pytest.mark.parametrize("judge", judges(), ids=lambda j: j.name)
def test_a_right_short_cited_answer_is_supported_and_a_wrong_one_is_not(judge):
    """Before: "Athens [1]." scored 0 with the embedding judge (the bare "Athens." against
    the whole passage); "Sparta [1]." must stay unsupported (the question alone would carry
    most of the claim)."""
    it = item("olympics", "eiffel", "dna")
    right = scored(it, "Athens [1].", judge)
    assert right["correct"] and right["sentences"] == 1
    assert right["supported_sentences"] == right["cited_sentences_supported"] == 1
    assert right["precise_citations"] == right["citations"] == 1
    wrong = scored(it, "Sparta [1].", judge)
    assert not wrong["correct"]
    assert wrong["supported_sentences"] == wrong["cited_sentences_supported"] == 0
    assert wrong["precise_citations"] == 0
    # The right answer citing only a distractor: its citation does not support it.
    elsewhere = scored(it, "Athens [2].", judge)
    assert elsewhere["cited_sentences_supported"] == 0 and elsewhere["supported_sentences"] == 1


@pytest.mark.parametrize("judge", judges(), ids=lambda j: j.name)
def test_a_short_answer_citing_an_unrelated_passage_that_holds_it_is_unsupported(judge):
    """Python and Linux were both first released in 1991: "1991 [2]." citing the Linux
    passage for the Python question must not count (before: the bare "1991." was supported
    by the lexical judge, since the Linux passage holds 1991)."""
    it = item("python", "linux", question=1)  # "When did the first public release ...?"
    assert scored(it, "1991 [1].", judge)["cited_sentences_supported"] == 1
    cites_linux = scored(it, "1991 [2].", judge)
    assert cites_linux["cited_sentences_supported"] == 0


@pytest.mark.parametrize("judge", judges(), ids=lambda j: j.name)
def test_short_wrong_values_are_unsupported_for_every_fact(judge):
    """Every fact's counterfactual value as a short cited answer to its true passage."""
    claims = [make_claim(f"{f['counterfactual']}.", f["questions"][0]) for f in FACTS.values()]
    scores = judge.scores(claims, [passage(f) for f in FACTS])
    assert all(s < judge.threshold for s in scores), scores


class StubEntailment:
    """A CrossEncoder stand-in that entails every pair and records what it was given."""

    def __init__(self):
        self.config = type("C", (), {"id2label": {0: "contradiction", 1: "entailment"}})()
        self.pairs: list = []

    def predict(self, pairs, apply_softmax):
        self.pairs += pairs
        return [[0.0, 1.0] for _ in pairs]


def test_the_nli_judge_sees_question_plus_answer_and_keeps_the_short_answer_rule(monkeypatch):
    import eval_suites.support as support

    stub = StubEntailment()
    monkeypatch.setattr(support, "_cross_encoder", lambda path: stub)
    q, text = FACTS["olympics"]["questions"][0], passage("olympics")
    judge = NLIJudge(0.5, "unused")
    scores = judge.scores([make_claim("Athens.", q), make_claim("Sparta.", q)], [text, text])
    assert scores == [1.0, 0.0]
    assert stub.pairs[0] == (text, f"{q} Athens.")


def test_the_calibration_fixture_covers_short_answers_of_both_labels():
    claims, texts, labels = load_pairs(PAIRS, {f: passage(f) for f in FACTS})
    short = [(c, t, y) for c, t, y in zip(claims, texts, labels, strict=True) if c.question]
    assert sum(y for *_, y in short) >= 20 and sum(not y for *_, y in short) >= 20
    for judge in judges():
        result = calibrate(judge, *map(list, zip(*short, strict=True)))
        assert result.accuracy >= 0.75, (judge.name, result)


# --- A4: metric plugins score answers without citation markers --------------------------------------
def squad_f1(prediction: str, gold: str) -> float:
    """SQuAD v1.1's F1, written out: normalise, then token overlap."""

    def tokens(s: str) -> list[str]:
        s = "".join(ch for ch in s.lower() if ch not in string.punctuation)
        return [w for w in s.split() if w not in ("a", "an", "the")]

    p, g = tokens(prediction), tokens(gold)
    common = sum((Counter(p) & Counter(g)).values())
    return 0.0 if not common else 2 * common / (len(p) + len(g))


def test_token_f1_scores_the_answer_without_its_citations():
    answers = ["Athens [1].", "The Athens games [1, 2].", "Athens [3][1]."]
    samples = [{"kind": "answerable", "answer": a, "gold": "Athens"} for a in answers]
    expected = [squad_f1(a, "Athens") for a in ("Athens.", "The Athens games.", "Athens.")]
    assert expected == [1.0, pytest.approx(2 / 3), 1.0]
    value = plugin_scores(config(), samples)["answerable/token_f1"]["value"]
    assert value == pytest.approx(sum(expected) / 3)  # before: (2/3 + 0.4 + 2/3) / 3


# --- A6: "one" is no number unless it counts something ----------------------------------------------
def test_one_as_a_pronoun_is_no_number_and_number_words_that_count_are():
    assert numbers_in("It is one of the largest towers.") == set()
    assert numbers_in("No one knows; one such tower stands there.") == set()
    assert numbers_in("There are about one hundred species.") == {"100"}
    assert numbers_in("Light takes about one hour.") == {"1"}
    assert numbers_in("about 6,650 km and four chambers, two atria") == {"6650", "4", "2"}
    assert not has_foreign_number("There are about one hundred species.", "about 100 species")
    assert not has_foreign_number("There are about 100 species.", "about one hundred species")
    assert has_foreign_number("It was completed in 1899.", passage("eiffel"))  # source: 1889


@pytest.mark.parametrize("judge", judges(), ids=lambda j: j.name)
def test_a_sentence_with_one_of_the_is_supported_and_a_wrong_year_is_caught(judge):
    it = item("eiffel")
    plain = scored(it, "The Eiffel Tower in Paris was completed in 1889 [1].", judge)
    one = scored(
        it, "The Eiffel Tower, one lattice tower in Paris, was completed in 1889 [1].", judge
    )
    for scores in (plain, one):
        assert (scores["supported_sentences"], scores["cited_sentences_supported"]) == (1, 1)
        assert (scores["numbers"], scores["unsupported_numbers"]) == (1, 0)
    wrong = scored(it, "The Eiffel Tower in Paris was completed in 1899 [1].", judge)
    assert (wrong["numbers"], wrong["unsupported_numbers"]) == (1, 1)
    assert wrong["supported_sentences"] == 0


# --- C4: answer length next to accuracy -------------------------------------------------------------
def test_mean_answer_length_is_reported_next_to_each_accuracy():
    cfg = config()
    answerable = [
        (item("olympics"), "Athens [1].", 1),
        (item("eiffel", "dna", "nile"), "It was completed in 1889 [1].", 5),
        (item("canberra", "dna", "nile"), f"{passage('canberra')} {passage('dna')} [1][2]", 63),
    ]
    samples = []
    for (it, answer, words), n, position in zip(
        answerable, (0, 2, 2), (None, "first", "middle"), strict=True
    ):
        assert len(re.sub(r"\s*\[\d+\]", "", answer).split()) == words  # by hand
        samples.append(
            {"kind": "answerable", "distractors": n, "position": position,
             "scores": score_answer(it, answer, None)}
        )  # fmt: skip
    metrics = {k: m["value"] for k, m in summarise(samples, cfg).items()}
    assert metrics["accuracy"] == 1.0
    assert metrics["answer_words"] == metrics["answer_words_answerable"] == (1 + 5 + 63) / 3
    assert metrics["answer_words_distractors_0"] == 1
    assert metrics["answer_words_distractors_2"] == (5 + 63) / 2
    assert metrics["answer_words_position_middle"] == 63
    assert summarise(samples, cfg)["answer_words"]["higher_is_better"] is None


# --- end to end: a perfect model, and one that pastes its sources -----------------------------------
def run_against(tmp_path: Path, style: str, *overrides: str) -> tuple[dict, list[dict]]:
    server, _, url = serve(style)
    try:
        out = run_suite(
            RunOptions(
                suite="hallucination", base_url=url, output=tmp_path / style, use_cache=False,
                overrides=overrides, limit=24,
            )
        )  # fmt: skip
    finally:
        server.shutdown()
    results = json.loads((out / "results.json").read_text())
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    return {k: m["value"] for k, m in results["metrics"].items()}, samples


def test_a_perfect_model_with_short_cited_answers_is_scored_as_supported(tmp_path: Path):
    """Before, with the default embedding judge: citation recall, precision and the
    supported-sentence ratio all 0, answerable/token_f1 0.70."""
    metrics, samples = run_against(tmp_path, "oracle")
    assert metrics["accuracy"] == metrics["counterfactual_adherence"] == 1.0
    assert metrics["citation_validity"] == metrics["gold_citation_rate"] == 1.0
    assert metrics["answerable/token_f1"] == 1.0
    # The proxy judge errs on about one judgement in five (its calibration); never on most.
    assert metrics["citation_recall"] >= 0.6 and metrics["supported_sentence_ratio"] >= 0.6
    assert metrics["unsupported_number_rate"] == 0.0
    lengths = [s["scores"]["answer_words"] for s in samples]
    assert metrics["answer_words"] == sum(lengths) / len(lengths) < 2


def test_a_model_that_pastes_its_sources_shows_in_answer_length(tmp_path: Path):
    """Containment accuracy cannot tell it from a perfect model; answer length can."""
    metrics, _ = run_against(tmp_path, "copy", "closed_book=false")
    assert metrics["accuracy"] == 1.0
    assert metrics["answer_words"] > 40 and metrics["answer_words_distractors_4"] > 100
    assert metrics["answerable/token_f1"] < 0.2
