"""Interop guards: ids, options and files the Hugging Face / GGUF conversions must not lose.

Each test is a defect a QA pass found (special tokens renumbered on export, GPT-2 attention
options ignored, BOS/EOS dropped, outputs that deleted their inputs, a pre-tokenizer option
ignored, tensors dropped, malformed shard indexes), checked against `tokenizers`,
`transformers` and the `gguf` reader where they are the reference.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from hf_models import hf_gpt2, hf_llama, llama3_style_tokenizer
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from atlas_server.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from atlas_server.cli import app
from atlas_server.commands.checkpoint import check_output
from atlas_server.gguf_export import QWEN2_SPLIT_PATTERN, export_gguf
from atlas_server.hf_arch import HFConversionError, model_config_from_hf
from atlas_server.hf_export import export_hf
from atlas_server.hf_import import HFImportError, import_hf, load_hf_weights
from atlas_server.model import Transformer, load_preset
from atlas_server.tokenizer import TokenizerError, TrainConfig, train_from_texts
from atlas_server.tokenizer.corpus import stdlib_sample
from atlas_server.tokenizer.hf_format import tokenizer_from_hf_json, tokenizer_to_hf_json

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
gguf = pytest.importorskip("gguf")

runner = CliRunner()
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
    "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TEXTS = [
    "<|im_start|>user\nhi there<|im_end|>\n",
    "<|endoftext|>def f(x):\n        return x  # 1234567",
    "naïve 東京 🙂 \r\n  x  it's<|im_end|>",
]


def _hf_tokenizer(style: str):
    """A small byte-level BPE tokenizer shaped like GPT-2's, Pythia's, SmolLM2's or Qwen2's."""
    from tokenizers import (
        AddedToken,
        Regex,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )
    from tokenizers import Tokenizer as HFTokenizer

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    pre, norm, first = byte_level, None, []
    if style == "pythia":  # specials at 0 and 1, NFC, runs of spaces added at the end
        first, norm = ["<|endoftext|>", "<|padding|>"], normalizers.NFC()
    elif style == "smollm":  # specials at 0, 1, 2; digits one by one
        first = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        pre = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(False)]
        )
    elif style == "qwen2":  # a split regex, NFC, specials after the vocabulary
        norm = normalizers.NFC()
        pre = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tok = HFTokenizer(models.BPE())
    tok.normalizer, tok.pre_tokenizer, tok.decoder = norm, pre, decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=first,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(stdlib_sample(60_000), trainer)
    if style in ("gpt2", "qwen2"):  # specials appended after the vocabulary, as theirs are
        tok.add_special_tokens(
            ["<|endoftext|>", "<|im_start|>", "<|im_end|>"][: 1 + 2 * (style == "qwen2")]
        )
    if style == "pythia":
        tok.add_tokens([AddedToken(" " * n, normalized=True) for n in range(2, 8)])
    return tok


@pytest.mark.parametrize("style", ["gpt2", "pythia", "smollm", "qwen2"])
def test_exported_tokenizer_keeps_every_added_token_id(style):
    """tokenizers ignores an added token's id unless the vocabulary holds it: SmolLM2's
    specials at 0, 1, 2 came back at the end of the vocabulary."""
    original = _hf_tokenizer(style)
    atlas = tokenizer_from_hf_json(json.loads(original.to_str()))
    exported = tokenizers.Tokenizer.from_str(json.dumps(tokenizer_to_hf_json(atlas)))
    for token in original.get_added_tokens_decoder().values():
        assert exported.token_to_id(token.content) == original.token_to_id(token.content)
    for text in TEXTS:
        assert exported.encode(text).ids == original.encode(text).ids
    assert exported.get_vocab_size() == original.get_vocab_size()


def _hf_folder(folder, tokenizer, tokenizer_config, **config):
    """A tiny HF Llama model folder holding `tokenizer` (a `tokenizers.Tokenizer`)."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=64,
        **config,
    )
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return folder


def test_smollm_style_export_keeps_ids_chat_template_and_eos(tmp_path):
    src = _hf_folder(
        tmp_path / "hf",
        _hf_tokenizer("smollm"),
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": "<|im_start|>",
            "eos_token": "<|im_end|>",
            "chat_template": CHATML,
        },
        bos_token_id=1,
        eos_token_id=2,
    )
    import_hf(src, tmp_path / "atlas")
    export_hf(tmp_path / "atlas", tmp_path / "out")
    theirs = transformers.AutoTokenizer.from_pretrained(src)
    ours = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    messages = [{"role": "user", "content": "hi 42"}, {"role": "assistant", "content": "ok"}]

    def chat(tok):
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    assert chat(ours) == chat(theirs)
    for text in TEXTS:
        assert ours(text)["input_ids"] == theirs(text)["input_ids"]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    assert (ours.bos_token_id, ours.eos_token_id) == (1, 2)


def test_gpt2_attention_options_atlas_lacks_are_refused():
    base = hf_gpt2(300).config.to_dict()
    for option, value in (("scale_attn_weights", False), ("scale_attn_by_inverse_layer_idx", True)):
        with pytest.raises(HFConversionError, match=option):
            model_config_from_hf({**base, option: value})
    model_config_from_hf({**base, "reorder_and_upcast_attn": True})  # same numbers, upcast


def _llama3_folder(folder, instruct: bool = False):
    """Llama 3's shape: <|begin_of_text|> (id 0) added before every text by a
    TemplateProcessing, <|end_of_text|> (id 1) the EOS; neither is <|endoftext|>. The
    Instruct shape adds <|eot_id|> (id 2): the tokenizer's eos_token, and a second id in
    generation_config.json's eos list."""
    from tokenizers import processors

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"][: 2 + instruct]
    tok = llama3_style_tokenizer(400, specials, 60_000)
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A",
        pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
        special_tokens=[("<|begin_of_text|>", 0)],
    )
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>" if instruct else "<|end_of_text|>",
        "add_bos_token": True,
    }
    folder = _hf_folder(folder, tok, config, bos_token_id=0, eos_token_id=1)
    if instruct:
        generation = json.loads((folder / "generation_config.json").read_text())
        generation["eos_token_id"] = [1, 2]
        (folder / "generation_config.json").write_text(json.dumps(generation))
    return folder


def test_llama3_instruct_keeps_its_tokenizers_eos_as_llama_cpp_converts_it(tmp_path):
    src = _llama3_folder(tmp_path / "hf", instruct=True)
    expected = gguf.SpecialVocab(src, load_merges=False).special_token_ids  # llama.cpp's converter
    assert expected["eos"] == 2
    assert (
        runner.invoke(app, ["checkpoint", "import-hf", str(src), str(tmp_path / "ck")]).exit_code
        == 0
    )
    fields = _gguf_fields(export_gguf(tmp_path / "ck", tmp_path / "m.gguf"))
    assert fields["tokenizer.ggml.eos_token_id"] == expected["eos"]
    assert fields["tokenizer.ggml.bos_token_id"] == expected["bos"]
    export_hf(tmp_path / "ck", tmp_path / "out")
    theirs = transformers.AutoTokenizer.from_pretrained(src)
    ours = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert (ours.eos_token, ours.eos_token_id) == (theirs.eos_token, theirs.eos_token_id)
    generation = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [1, 2]  # both still end a generation


def test_llama3_bos_and_eos_survive_import_export_hf_and_gguf(tmp_path):
    src = _llama3_folder(tmp_path / "hf")
    imported = runner.invoke(app, ["checkpoint", "import-hf", str(src), str(tmp_path / "ck")])
    assert imported.exit_code == 0, imported.output
    assert "note: the source tokenizer adds id [0] before every text" in imported.output
    ckpt = load_checkpoint(tmp_path / "ck")
    theirs = transformers.AutoTokenizer.from_pretrained(src)
    assert theirs("Hello world")["input_ids"] == [0, *ckpt.tokenizer.encode("Hello world")]

    export_hf(tmp_path / "ck", tmp_path / "out")
    ours = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    for text in ["Hello world", "", "日本語 42"]:
        assert ours(text)["input_ids"] == theirs(text)["input_ids"]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    generation = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (0, 1)
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (0, [1])
    assert (ours.bos_token, ours.eos_token) == ("<|begin_of_text|>", "<|end_of_text|>")

    fields = _gguf_fields(export_gguf(tmp_path / "ck", tmp_path / "m.gguf"))
    assert fields["tokenizer.ggml.bos_token_id"] == 0
    assert fields["tokenizer.ggml.eos_token_id"] == 1
    assert fields["tokenizer.ggml.add_bos_token"] is True


def _gguf_fields(path) -> dict:
    reader = gguf.GGUFReader(path)
    return {name: field.contents() for name, field in reader.fields.items()}


def test_atlas_tokenizer_with_its_own_eos_name_gets_gguf_and_hf_eos(tmp_path):
    """Without the keys llama.cpp takes id 11 for BOS and EOS: an ordinary byte here."""
    tok = train_from_texts(
        stdlib_sample(20_000), TrainConfig(vocab_size=300, special_tokens=("<|eos|>",))
    )
    eos = tok.special_tokens["<|eos|>"]
    save_checkpoint(tmp_path / "ck", Transformer(load_preset("gpt2-tiny", vocab_size=300)), tok)
    fields = _gguf_fields(export_gguf(tmp_path / "ck", tmp_path / "m.gguf"))
    assert fields["tokenizer.ggml.eos_token_id"] == fields["tokenizer.ggml.bos_token_id"] == eos
    export_hf(tmp_path / "ck", tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["eos_token_id"] == eos
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "out").eos_token_id == eos


@pytest.fixture
def own_checkpoint(tmp_path, tiny_checkpoint):
    """A copy of the session's tiny checkpoint, for tests that may (wrongly) delete it."""
    return shutil.copytree(tiny_checkpoint, tmp_path / "ck")


def _refused(args, *survivors):
    result = runner.invoke(app, ["checkpoint", *map(str, args)])
    assert result.exit_code == 1 and result.output.startswith("error: "), result.output
    assert len(result.output.strip().splitlines()) == 1
    for path in survivors:
        assert path.exists(), f"{path} was deleted"


def test_outputs_that_are_or_hold_an_input_are_refused_even_with_overwrite(
    tmp_path, own_checkpoint
):
    ck = own_checkpoint
    _refused(["export-hf", ck, ck, "--overwrite"], ck / "model.safetensors")
    run = tmp_path / "run"
    shutil.copytree(ck, run / "checkpoint")
    (run / "notes.txt").write_text("mine")
    _refused(["export-hf", run / "checkpoint", run, "--overwrite"], run / "notes.txt")
    link = tmp_path / "link"
    link.symlink_to(run, target_is_directory=True)  # the same folder by another name
    _refused(["export-hf", link / "checkpoint", run, "--overwrite"], run / "checkpoint")
    hf = tmp_path / "models" / "llama"
    hf.mkdir(parents=True)
    (hf / "config.json").write_text("{}")
    _refused(["import-hf", hf, tmp_path / "models", "--overwrite"], hf / "config.json")
    adapter = tmp_path / "runs" / "lora" / "checkpoints" / "step_000008"
    adapter.mkdir(parents=True)
    (adapter / "adapter.safetensors").write_bytes(b"x")
    _refused(
        ["merge-lora", ck, adapter, tmp_path / "runs" / "lora", "--overwrite"],
        adapter / "adapter.safetensors",
    )
    _refused(
        ["init", "--preset", "gpt2-tiny", "--tokenizer", ck / "atlas_tokenizer.json",
         "--output", ck, "--overwrite"],
        ck / "model.safetensors",
    )  # fmt: skip
    before = (ck / "model.safetensors").read_bytes()
    _refused(["export-gguf", ck, ck / "model.safetensors", "--overwrite"])
    assert (ck / "model.safetensors").read_bytes() == before
    # an earlier GGUF export inside the checkpoint is an output, not an input: it may be replaced
    earlier = run / "checkpoint" / "model.gguf"
    earlier.write_bytes(b"GGUF" + bytes(60))
    check_output(earlier, True, [run / "checkpoint"], folder=False)
    with pytest.raises(CheckpointError, match="is part of the input"):
        check_output(run / "checkpoint" / "config.json", True, [run / "checkpoint"], folder=False)
    with pytest.raises(HFConversionError, match="holds the checkpoint"):
        export_hf(run / "checkpoint", run, overwrite=True)
    assert (run / "notes.txt").exists()


def test_byte_level_without_its_regex_is_refused():
    data = json.loads(_hf_tokenizer("gpt2").to_str())
    data["pre_tokenizer"]["use_regex"] = False  # tokenizers: the whole text is one piece
    with pytest.raises(TokenizerError, match="use_regex=false"):
        tokenizer_from_hf_json(data)


def test_tensors_the_config_does_not_use_are_refused(tmp_path):
    src, tok = tmp_path / "hf", _hf_tokenizer("gpt2")
    hf_llama(tok.get_vocab_size()).save_pretrained(src)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))
    tok.save(str(src / "tokenizer.json"))
    with pytest.raises(HFImportError, match=r"9 tensors .*model\.layers\.1\."):
        import_hf(src, tmp_path / "out")


def test_tied_config_with_a_different_head_in_the_file_is_untied_as_transformers_does(
    tmp_path,
):
    src, tok = tmp_path / "hf", _hf_tokenizer("gpt2")
    vocab = tok.get_vocab_size()
    hf_gpt2(vocab, tie=True).save_pretrained(src)
    tensors = load_file(src / "model.safetensors")
    tensors["lm_head.weight"] = torch.randn(vocab, 48, generator=torch.Generator().manual_seed(0))
    tensors["transformer.h.0.attn.bias"] = torch.ones(1, 1, 64, 64)  # a mask buffer: ignored
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    tok.save(str(src / "tokenizer.json"))
    import_hf(src, tmp_path / "ck")
    hf = transformers.AutoModelForCausalLM.from_pretrained(src).eval()
    ids = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (hf(ids).logits - load_checkpoint(tmp_path / "ck").model(ids)).abs().max()
    assert diff.item() <= 1e-4


@pytest.mark.parametrize(
    "index, message",
    [
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "holds a JSON list, not an object"),
        ('{"metadata": {}}', "has no weight_map"),
        ('{"weight_map": ["model.safetensors"]}', "has no weight_map"),
        ('{"weight_map": {"x": "/etc/passwd"}}', "outside the model folder"),
        ('{"weight_map": {"x": "../elsewhere/model.safetensors"}}', "outside the model folder"),
    ],
)
def test_malformed_shard_index_is_one_line_naming_the_file(tmp_path, index, message):
    (tmp_path / "model.safetensors.index.json").write_text(index)
    with pytest.raises(HFImportError, match=message) as error:
        load_hf_weights(tmp_path)
    assert "model.safetensors.index.json" in str(error.value)
    assert "attribute" not in str(error.value)  # no Python internals ('list' has no .get)


def test_tokenizer_errors_name_the_file_and_the_fix_once(tmp_path, own_checkpoint):
    src = tmp_path / "hf"
    hf_llama(300).save_pretrained(src)
    (src / "tokenizer.json").write_text("{bad")
    with pytest.raises(HFImportError) as error:
        import_hf(src, tmp_path / "out")
    assert str(error.value).count(str(src / "tokenizer.json")) == 1
    (src / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordPiece", "vocab": {}}}))
    with pytest.raises(HFImportError) as error:
        import_hf(src, tmp_path / "out")
    assert str(error.value).count("pass --tokenizer FILE") == 1
    result = runner.invoke(
        app, ["tokenizer", "encode", "-t", str(own_checkpoint / "config.json"), "hi"]
    )
    assert result.exit_code == 1 and "Tokenizer.from_file" not in result.output
    assert "neither an Atlas tokenizer" in result.output
    assert os.path.exists(own_checkpoint / "config.json")


def test_imported_llama3_is_served_with_its_bos_as_transformers_scores_it(tmp_path):
    """The completions endpoint reads a text prompt as HF's tokenizer encodes it, BOS
    first, and scores it as transformers does; `add_special_tokens: false` and token-id
    prompts are sent as they are; /tokenize follows vLLM (BOS for a prompt, not for
    messages whose template writes it)."""
    import httpx
    from servers import serving

    from atlas_server.api import ServerState, create_app
    from atlas_server.config import ModelSection, RAGSection, ServerConfig

    src = _llama3_folder(tmp_path / "hf", instruct=True)
    (src / "chat_template.jinja").write_text(
        "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|eot_id|>"
        "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    )
    import_hf(src, tmp_path / "ck")
    theirs = transformers.AutoTokenizer.from_pretrained(src)
    reference = transformers.LlamaForCausalLM.from_pretrained(src).eval()
    text = "Hello world, said the parser."
    expected_ids = theirs(text)["input_ids"]
    assert expected_ids[0] == 0  # <|begin_of_text|>
    with torch.no_grad():
        logits = reference(torch.tensor([expected_ids])).logits[0]  # (T, vocab)
    expected_lp = torch.log_softmax(logits.double(), -1)[:-1].gather(
        1, torch.tensor(expected_ids[1:])[:, None]
    )[:, 0]  # (T-1,)

    config = ServerConfig(
        model=ModelSection(device="cpu", dtype="float32"), rag=RAGSection(enabled=False)
    )
    state = ServerState(config=config, model_name="l3", checkpoint_path=str(tmp_path / "ck"))
    with (
        serving(create_app(state), ready=lambda status: status == 200) as base,
        httpx.Client(base_url=base, timeout=60) as http,
    ):

        def score(**extra):
            body = {"prompt": text, "max_tokens": 0, "echo": True, "logprobs": 0, **extra}
            r = http.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            return r.json()

        out = score()
        lp = out["choices"][0]["logprobs"]
        assert out["usage"]["prompt_tokens"] == len(expected_ids)
        assert lp["tokens"][0] == "<|begin_of_text|>" and lp["token_logprobs"][0] is None
        assert torch.allclose(
            torch.tensor(lp["token_logprobs"][1:], dtype=torch.float64), expected_lp, atol=1e-4
        )
        # The echo shows the BOS it read, and every offset points into that text.
        echoed = out["choices"][0]["text"]
        assert echoed == "<|begin_of_text|>" + text
        starts = zip(lp["text_offset"], lp["tokens"], strict=True)
        assert [echoed[o:][: len(t)] for o, t in starts] == lp["tokens"]

        bare = score(add_special_tokens=False)
        assert bare["usage"]["prompt_tokens"] == len(expected_ids) - 1
        assert bare["choices"][0]["text"] == text
        ids = score(prompt=expected_ids[1:])  # token ids: nothing added
        assert ids["usage"]["prompt_tokens"] == len(expected_ids) - 1
        # Too long for the context: the error counts the BOS the client did not send.
        long = http.post("/v1/completions", json={"prompt": text * 20, "max_tokens": 1})
        assert long.status_code == 400
        assert "including 1 the model's tokenizer adds" in long.json()["error"]["message"]
        body = {"prompt": text * 20, "max_tokens": 1, "add_special_tokens": False}
        assert "tokenizer adds" not in http.post("/v1/completions", json=body).text

        tokenize = lambda body: http.post("/tokenize", json=body).json()["tokens"]  # noqa: E731
        assert tokenize({"prompt": text}) == expected_ids
        assert tokenize({"prompt": text, "add_special_tokens": False}) == expected_ids[1:]
        messages = [{"role": "user", "content": "hi"}]
        chat = tokenize({"messages": messages})
        assert chat == theirs.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        assert chat[0] == 0  # the template's own BOS, and only one
        assert tokenize({"messages": messages, "add_special_tokens": True}) == [0, *chat]
        info = http.get("/tokenizer_info").json()
        assert (info["bos_token_id"], info["bos_token"]) == (0, "<|begin_of_text|>")

        # atlas-eval's perplexity puts the BOS before each document, as lm-eval and HF's
        # tokenizer do: its log-likelihoods equal transformers' over theirs(text).
        from eval_suites.runner import RunOptions, run_suite

        docs = ["The parser reads a line.", "Hello world, said the module."]
        data = tmp_path / "docs.jsonl"
        data.write_text(
            "".join(json.dumps({"id": str(i), "text": d}) + "\n" for i, d in enumerate(docs))
        )
        out = run_suite(
            RunOptions(
                suite="perplexity", base_url=base, output=tmp_path / "ppl", use_cache=False,
                overrides=(f"data='{data}'",),
            )
        )  # fmt: skip
        results = json.loads((out / "results.json").read_text())
        assert results["details"]["prefix_token_id"] == 0
        samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
        for sample, doc in zip(samples, docs, strict=True):
            ids = theirs(doc)["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(reference(torch.tensor([ids])).logits[0].double(), -1)
            expected = logp[:-1].gather(1, torch.tensor(ids[1:])[:, None]).sum().item()
            assert sample["loglikelihood"] == pytest.approx(expected, abs=1e-4)


def test_an_imported_llama3_can_be_continued_on_documents_framed_as_its_tokenizer_frames_them(
    tmp_path,
):
    """Domain adaptation of an imported Llama 3: prepare-data with its checkpoint as the
    tokenizer used to refuse (no <|endoftext|>); now each document is what HF's tokenizer
    encodes (BOS first) followed by <|end_of_text|>, and pretraining from it runs."""
    import numpy as np

    from trainer.config import load_train_config
    from trainer.data import prepare_data, read_shard
    from trainer.loop import train

    src = _llama3_folder(tmp_path / "hf")
    import_hf(src, tmp_path / "ck")
    theirs = transformers.AutoTokenizer.from_pretrained(src)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    texts = [t for t in stdlib_sample(8_000) if t.strip()][:12]
    for i, text in enumerate(texts):
        (corpus / f"d{i:02d}.txt").write_text(text, encoding="utf-8")
    # The tokenizer file inside the checkpoint, as docs/training.md's example passes it.
    manifest = prepare_data(
        [str(corpus)], tmp_path / "ck" / "atlas_tokenizer.json", tmp_path / "tokens", 0.0,
        workers=1, progress=False,
    )  # fmt: skip
    assert manifest["document_framing"] == {"before": [0], "after": [1]}
    # The same model's tokenizer given as the HF folder's tokenizer.json frames alike.
    from_hf = prepare_data(
        [str(corpus)], src / "tokenizer.json", tmp_path / "tokens-hf", 0.0, workers=1,
        progress=False,
    )  # fmt: skip
    assert from_hf["document_framing"] == manifest["document_framing"]
    assert from_hf["train_tokens"] == manifest["train_tokens"]
    # atlas-eval's --tokenizer counts a prompt as the server sends it, BOS included.
    from eval_suites.tokens import LocalTokenizer

    for file in (tmp_path / "ck" / "atlas_tokenizer.json", src / "tokenizer.json"):
        assert LocalTokenizer(file).count(texts[0]) == len(theirs(texts[0])["input_ids"]), file
    # A checkpoint whose config.json has no provenance (it loads) frames with EOS alone.
    bare = shutil.copytree(tmp_path / "ck", tmp_path / "bare")
    meta = json.loads((bare / "config.json").read_text())
    del meta["provenance"]
    (bare / "config.json").write_text(json.dumps(meta))
    from atlas_server.checkpoint import text_adds_of

    assert text_adds_of(bare / "atlas_tokenizer.json") == ([], [])
    tokens = np.concatenate(
        [read_shard(tmp_path / "tokens" / s["file"]) for s in manifest["train"]]
    )
    documents = np.split(tokens, np.flatnonzero(tokens == 1) + 1)[:-1]  # each ends with EOS
    expected = sorted(
        theirs(text)["input_ids"] + [1] for text in (p.read_text() for p in corpus.iterdir())
    )
    assert sorted(d.tolist() for d in documents) == expected

    summary = train(
        load_train_config(
            None,
            [
                f'model.init_from="{tmp_path / "ck"}"',
                f'data.path="{tmp_path / "tokens"}"',
                f'run.out_dir="{tmp_path / "run"}"',
                "data.seq_len=32", "data.micro_batch=2", "schedule.max_steps=2",
                "schedule.warmup_steps=1", "run.checkpoint_every=2", "run.eval_every=2",
                "run.sample_tokens=0", "run.threads=1",
            ],
        ),
        progress=False,
    )  # fmt: skip
    assert len(summary["losses"]) == 2
    tuned = load_checkpoint(summary["checkpoint"])
    assert tuned.provenance["tokenizer_adds"] == {"before": [0], "after": []}


def test_a_damaged_tokenizer_adds_record_is_ignored_not_put_around_every_prompt(tmp_path):
    """The server puts the recorded ids around every text prompt; a record that is not a
    table of this tokenizer's special ids (hand-edited, another tokenizer's) must not
    break or change every request."""
    from atlas_server.checkpoint import text_adds_of
    from atlas_server.hf_export import special_ids

    tok = train_from_texts(stdlib_sample(5_000), TrainConfig(vocab_size=270))
    eot = tok.special_tokens["<|endoftext|>"]
    for record in ([0], {"before": [10**6]}, {"before": "x"}, {"before": [1.5]}, {"before": [5]}):
        ids = special_ids(tok, {"tokenizer_adds": record})
        assert (ids.before, ids.after) == ([], []), record  # 5 is a byte, not a special id
    assert special_ids(tok, {"tokenizer_adds": {"before": [eot]}}).before == [eot]
    model = Transformer(load_preset("gpt2-tiny", vocab_size=tok.vocab_size))
    save_checkpoint(tmp_path / "ck", model, tok, {"tokenizer_adds": [0]})
    assert text_adds_of(tmp_path / "ck" / "atlas_tokenizer.json") == ([], [])
