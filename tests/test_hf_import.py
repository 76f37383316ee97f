"""Hugging Face import: random-initialised transformers models give the same logits in Atlas."""

from __future__ import annotations

import json

import pytest
import torch
from hf_models import hf_gpt2, hf_llama
from typer.testing import CliRunner

from atlas_server.checkpoint import load_checkpoint
from atlas_server.cli import app
from atlas_server.hf_import import HFImportError, import_hf
from atlas_server.tokenizer.corpus import stdlib_sample
from atlas_server.tokenizer.hf_format import tokenizer_from_hf_json

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")


@pytest.fixture(scope="module")
def hf_bpe_json(tmp_path_factory):
    """A GPT-2-style byte-level BPE tokenizer.json trained with HF `tokenizers` on stdlib text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(stdlib_sample(300_000), trainer)
    path = tmp_path_factory.mktemp("hftok") / "tokenizer.json"
    tok.save(str(path))
    return path


def _save_hf(model, folder, tokenizer_json=None):
    model.save_pretrained(folder, safe_serialization=True)
    if tokenizer_json is not None:
        (folder / "tokenizer.json").write_text(tokenizer_json.read_text())
    return folder


def _assert_same_logits(hf_model, atlas_dir, vocab):
    ckpt = load_checkpoint(atlas_dir)
    ids = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf_model(ids).logits
        got = ckpt.model(ids)
    assert (expected - got).abs().max().item() <= 1e-4
    # greedy continuation through the KV cache matches transformers' generate
    prompt = ids[0, :8]
    with torch.no_grad():
        hf_out = hf_model.generate(prompt[None], max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert ckpt.model.generate(prompt.tolist(), 8) == hf_out[0, 8:].tolist()


@pytest.mark.parametrize("tie", [True, False])
def test_gpt2_import_matches_transformers_logits(tmp_path, hf_bpe_json, tie):
    vocab = json.loads(hf_bpe_json.read_text())["model"]["vocab"]
    model = hf_gpt2(len(vocab), tie)
    src = _save_hf(model, tmp_path / "hf", hf_bpe_json)
    import_hf(src, tmp_path / "atlas")
    _assert_same_logits(model, tmp_path / "atlas", len(vocab))


@pytest.mark.parametrize(("kv_heads", "tie"), [(4, False), (2, False), (1, True)])
def test_llama_import_matches_transformers_logits(tmp_path, hf_bpe_json, kv_heads, tie):
    model = hf_llama(600, kv_heads, tie)
    src = _save_hf(model, tmp_path / "hf", hf_bpe_json)
    import_hf(src, tmp_path / "atlas")
    _assert_same_logits(model, tmp_path / "atlas", 600)


def test_imported_tokenizer_matches_hf_tokenizers_on_real_text(hf_bpe_json):
    from tokenizers import Tokenizer as HFTokenizer

    ours = tokenizer_from_hf_json(hf_bpe_json)
    theirs = HFTokenizer.from_file(str(hf_bpe_json))
    texts = stdlib_sample(200_000, stride=3) + ["naïve café 東京 🙂 \r\n\t  x  123456"]
    for text in texts:
        assert ours.encode(text) == theirs.encode(text, add_special_tokens=False).ids
    # HF matches added tokens in any text; Atlas does so only when they are allowed.
    special = "a<|endoftext|>b"
    assert ours.encode(special, allowed_special="all") == theirs.encode(special).ids
    assert ours.special_tokens["<|endoftext|>"] == theirs.token_to_id("<|endoftext|>")


def test_import_without_tokenizer_names_the_fix(tmp_path):
    src = _save_hf(hf_gpt2(300), tmp_path / "hf")
    with pytest.raises(HFImportError, match="--tokenizer"):
        import_hf(src, tmp_path / "atlas")
    assert not (tmp_path / "atlas").exists()


def test_import_refuses_unsupported_architecture(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(HFImportError, match="bert"):
        import_hf(tmp_path / "hf", tmp_path / "atlas")


def test_import_refuses_pickled_weights(tmp_path):
    src = tmp_path / "hf"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(hf_gpt2(300).config.to_dict()))
    (src / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(HFImportError, match="pickled"):
        import_hf(src, tmp_path / "atlas")


def test_cli_import_hf_and_inspect(tmp_path, hf_bpe_json):
    vocab = len(json.loads(hf_bpe_json.read_text())["model"]["vocab"])
    src = _save_hf(hf_gpt2(vocab), tmp_path / "hf", hf_bpe_json)
    runner = CliRunner()
    result = runner.invoke(app, ["checkpoint", "import-hf", str(src), str(tmp_path / "atlas")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["checkpoint", "inspect", str(tmp_path / "atlas"), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["parameters"]["total"] == sum(p.numel() for p in hf_gpt2(vocab).parameters())
    bad = runner.invoke(
        app, ["checkpoint", "import-hf", str(tmp_path / "missing"), str(tmp_path / "x")]
    )
    assert bad.exit_code == 1 and bad.output.startswith("error:")


LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def test_llama3_style_split_regex_tokenizer_matches_hf_tokenizers(tmp_path):
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    theirs = HFTokenizer(models.BPE())
    theirs.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    theirs.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=450,
        special_tokens=["<|begin_of_text|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    theirs.train_from_iterator(stdlib_sample(100_000), trainer)
    theirs.save(str(tmp_path / "tokenizer.json"))
    ours = tokenizer_from_hf_json(tmp_path / "tokenizer.json")
    for text in stdlib_sample(60_000, stride=5) + ["12345 ÉCOLE it's\n\n  x"]:
        assert ours.encode(text) == theirs.encode(text, add_special_tokens=False).ids


def test_sharded_safetensors_import_matches_transformers_logits(tmp_path, hf_bpe_json):
    vocab = len(json.loads(hf_bpe_json.read_text())["model"]["vocab"])
    model = hf_gpt2(vocab, tie=False)
    model.save_pretrained(tmp_path / "hf", safe_serialization=True, max_shard_size="100KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    import_hf(tmp_path / "hf", tmp_path / "atlas", tokenizer_file=str(hf_bpe_json))
    _assert_same_logits(model, tmp_path / "atlas", vocab)


def _edit_hf_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope scaling"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope scaling"),
        ({"attention_bias": True}, "attention_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
    ],
)
def test_llama_import_refuses_unsupported_options(tmp_path, hf_bpe_json, changes, message):
    src = _save_hf(hf_llama(600, 2, False), tmp_path / "hf", hf_bpe_json)
    _edit_hf_config(src, **changes)
    with pytest.raises(HFImportError, match=message):
        import_hf(src, tmp_path / "atlas")
    assert not (tmp_path / "atlas").exists()


def test_sentencepiece_style_tokenizer_is_refused_with_the_fix(tmp_path, hf_bpe_json):
    src = _save_hf(hf_gpt2(600), tmp_path / "hf", hf_bpe_json)
    data = json.loads((src / "tokenizer.json").read_text())
    data["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first"}
    (src / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(HFImportError, match="Metaspace.*--tokenizer FILE"):
        import_hf(src, tmp_path / "atlas")


def test_missing_shard_is_named(tmp_path, hf_bpe_json):
    model = hf_gpt2(600)
    model.save_pretrained(tmp_path / "hf", safe_serialization=True, max_shard_size="100KB")
    shard = sorted((tmp_path / "hf").glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(HFImportError, match=shard.name):
        import_hf(tmp_path / "hf", tmp_path / "atlas", tokenizer_file=str(hf_bpe_json))
