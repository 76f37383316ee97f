"""Hugging Face import: random-initialised transformers models give the same logits in Atlas.

Architectures: GPT-2, Llama, Qwen2 (q/k/v biases), GPT-NeoX (partial rotary, parallel
residual); each against `transformers` logits and greedy `generate`, and through Atlas's
engine (continuous batching, KV cache, CPU kernels). Tokenizers against `tokenizers` on
real text (NFC, added tokens, isolated digits). The hub path against a hub cache the tests
build (offline, `HF_HUB_OFFLINE=1`).
"""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from hf_models import hf_gpt2, hf_gpt_neox, hf_llama, hf_qwen2, llama3_style_tokenizer
from typer.testing import CliRunner

from atlas_server.checkpoint import load_checkpoint
from atlas_server.cli import app
from atlas_server.hf_import import HFImportError, import_hf
from atlas_server.model.config import ConfigError
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


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ([{"model_type": "gpt2"}], "holds a JSON list, not an object"),
        ("N_LAYER_AS_STRING", "n_layers must be int, got '2'|wrong type"),
    ],
)
def test_import_refuses_a_config_of_the_wrong_json_types(tmp_path, config, message):
    if config == "N_LAYER_AS_STRING":
        config = {**hf_gpt2(300).config.to_dict(), "n_layer": "2"}
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises((HFImportError, ConfigError), match=message):
        import_hf(tmp_path / "hf", tmp_path / "atlas")


@pytest.mark.parametrize("missing", ["n_embd", "n_head", "vocab_size"])
def test_import_names_a_missing_config_key(tmp_path, missing):
    """Found by an audit: a config.json without hidden_size or n_head was a KeyError
    traceback."""
    config = hf_gpt2(300).config.to_dict()
    del config[missing]
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(HFImportError, match=f"missing '{missing}', which a gpt2 config needs"):
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
    # the regex as Llama 3 publishes it, not Atlas's copy
    theirs = llama3_style_tokenizer(450, ["<|begin_of_text|>"], 100_000, split=LLAMA3_SPLIT)
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


# --- Qwen2 and GPT-NeoX ------------------------------------------------------------------------
@pytest.mark.parametrize(("kv_heads", "tie"), [(2, False), (1, True)])
def test_qwen2_import_matches_transformers_logits(tmp_path, hf_bpe_json, kv_heads, tie):
    model = hf_qwen2(600, kv_heads, tie)
    src = _save_hf(model, tmp_path / "hf", hf_bpe_json)
    import_hf(src, tmp_path / "atlas")
    ckpt = load_checkpoint(tmp_path / "atlas")
    assert ckpt.config.has_qkv_bias and not ckpt.config.bias and ckpt.config.rope_theta == 1e6
    _assert_same_logits(model, tmp_path / "atlas", 600)


@pytest.mark.parametrize(
    ("parallel", "rotary_pct", "act"),
    [(True, 0.25, "gelu"), (False, 1.0, "gelu_new"), (True, 0.5, "gelu_new")],
)
def test_gpt_neox_import_matches_transformers_logits(
    tmp_path, hf_bpe_json, parallel, rotary_pct, act
):
    model = hf_gpt_neox(600, parallel, rotary_pct, act)
    src = _save_hf(model, tmp_path / "hf", hf_bpe_json)
    import_hf(src, tmp_path / "atlas")
    config = load_checkpoint(tmp_path / "atlas").config
    assert config.parallel_residual == parallel and config.rope_dims == int(16 * rotary_pct)
    assert config.mlp == ("gelu_exact" if act == "gelu" else "gelu")
    _assert_same_logits(model, tmp_path / "atlas", 600)


def test_gpt_neox_config_with_transformers_4_keys(tmp_path, hf_bpe_json):
    """Pythia's config.json on the hub says rotary_pct / rotary_emb_base (no rope_parameters)."""
    model = hf_gpt_neox(600, rotary_pct=0.5)
    src = _save_hf(model, tmp_path / "hf", hf_bpe_json)
    cfg = json.loads((src / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg.update(rotary_pct=rope["partial_rotary_factor"], rotary_emb_base=rope["rope_theta"])
    (src / "config.json").write_text(json.dumps(cfg))
    import_hf(src, tmp_path / "atlas")
    assert load_checkpoint(tmp_path / "atlas").config.rope_dims == 8
    _assert_same_logits(model, tmp_path / "atlas", 600)


@pytest.mark.parametrize(
    ("builder", "changes", "message"),
    [
        (hf_qwen2, {"use_sliding_window": True}, "sliding-window"),
        (hf_gpt_neox, {"attention_bias": False}, "attention biases"),
        (hf_gpt_neox, {"hidden_act": "relu"}, "relu"),
    ],
)
def test_unsupported_options_of_the_new_architectures_are_refused(
    tmp_path, hf_bpe_json, builder, changes, message
):
    src = _save_hf(builder(600), tmp_path / "hf", hf_bpe_json)
    _edit_hf_config(src, **changes)
    with pytest.raises(HFImportError, match=message):
        import_hf(src, tmp_path / "atlas")


@pytest.mark.parametrize("builder", [hf_qwen2, hf_gpt_neox, hf_llama])
def test_imported_models_serve_through_the_engine_like_transformers_generate(
    tmp_path, hf_bpe_json, builder
):
    """Continuous batching (three requests at once), chunked prefill, the KV cache and the
    CPU kernels (prepare_for_inference) give transformers' greedy tokens."""
    import asyncio

    from atlas_server.engine import Engine, EngineConfig, SamplingParams

    hf = builder(600)
    with torch.no_grad():  # bigger weights: greedy text that varies token to token
        for name, p in hf.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.mul_(4.0)
    import_hf(_save_hf(hf, tmp_path / "hf", hf_bpe_json), tmp_path / "atlas")
    ckpt = load_checkpoint(tmp_path / "atlas")
    model = ckpt.model.prepare_for_inference()
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 600, (n,), generator=gen).tolist() for n in (5, 11, 17)]
    expected = []
    for prompt in prompts:
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False)
        expected.append(out[0, len(prompt) :].tolist())
    assert len({tuple(e) for e in expected}) > 1  # the prompts lead to different text

    engine = Engine(model, ckpt.tokenizer, EngineConfig(max_running=4, max_batched_tokens=8))
    engine.start()
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)

    async def one(prompt):
        return [t async for e in engine.submit(prompt, params) for t in e.token_ids]

    async def together():
        return await asyncio.gather(*(one(p) for p in prompts))

    try:
        got = asyncio.run(together())
    finally:
        engine.shutdown()
    assert got == expected


# --- tokenizers with NFC, added tokens, isolated digits ---------------------------------------
def _train_hf_tokenizer(pre_tokenizer, normalizer=None, vocab=500):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<|endoftext|>", "<|padding|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(stdlib_sample(150_000), trainer)
    return tok


AWKWARD = [
    "def f(x):\n        return x  # eight spaces\n\n\n    \t  tail   ",
    "cafe\u0301 vs café, Å vs A\u030a, ﬁ ligature",  # NFD input: NFC composes it
    "x = 1234567 + 89 - 0.5e10; v2 = [3, 14]",
    "naïve 東京 🙂 \r\n  x  123456 it's",
]


def test_pythia_style_tokenizer_with_nfc_and_whitespace_added_tokens(tmp_path):
    """GPT-NeoX's tokenizer: NFC, byte-level GPT-2 split, and runs of spaces as non-special
    added tokens that `tokenizers` cuts out of any text first (longest first)."""
    from tokenizers import AddedToken, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    theirs = _train_hf_tokenizer(
        pre_tokenizers.ByteLevel(add_prefix_space=False), normalizers.NFC()
    )
    theirs.add_tokens([AddedToken(" " * n, normalized=True) for n in range(24, 1, -1)])
    path = tmp_path / "tokenizer.json"
    theirs.save(str(path))
    # Pythia's file also lists the space tokens in the model's vocabulary, as raw spaces.
    data = json.loads(path.read_text())
    for added in data["added_tokens"]:
        if not added["special"]:
            data["model"]["vocab"][added["content"]] = added["id"]
    path.write_text(json.dumps(data))
    theirs = HFTokenizer.from_file(str(path))
    ours = tokenizer_from_hf_json(path)
    assert ours.normalizer == "NFC" and len(ours.added_tokens) == 23
    for text in stdlib_sample(120_000, stride=5)[-30:] + AWKWARD:
        assert ours.encode(text) == theirs.encode(text, add_special_tokens=False).ids, text[:60]
    assert ours.decode(ours.encode("a      b")) == "a      b"
    # round trip through Atlas's own file format keeps both
    (tmp_path / "atlas").mkdir()
    again = type(ours).from_file(ours.save(tmp_path / "atlas" / "atlas_tokenizer.json"))
    assert again.encode(AWKWARD[0] + AWKWARD[1]) == ours.encode(AWKWARD[0] + AWKWARD[1])


def test_smollm_style_tokenizer_with_isolated_digits(tmp_path):
    from tokenizers import pre_tokenizers

    theirs = _train_hf_tokenizer(
        pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    )
    theirs.save(str(tmp_path / "tokenizer.json"))
    ours = tokenizer_from_hf_json(tmp_path / "tokenizer.json")
    extra = ["a 1", "x  1", "x   12  y", " 3 4  5\n6", "v1.2.3 -42 ٣٤ ½"]
    for text in stdlib_sample(120_000, stride=5)[-30:] + AWKWARD + extra:
        assert ours.encode(text) == theirs.encode(text, add_special_tokens=False).ids, text[:60]


def test_qwen2_style_tokenizer_with_nfc_and_split_regex(tmp_path):
    from tokenizers import Regex, normalizers, pre_tokenizers

    qwen_split = (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
        r"|\s*[\r\n]+|\s+(?!\S)|\s+"
    )
    theirs = _train_hf_tokenizer(
        pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(qwen_split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        ),
        normalizers.NFC(),
    )
    theirs.save(str(tmp_path / "tokenizer.json"))
    ours = tokenizer_from_hf_json(tmp_path / "tokenizer.json")
    for text in stdlib_sample(120_000, stride=5)[-30:] + AWKWARD:
        assert ours.encode(text) == theirs.encode(text, add_special_tokens=False).ids, text[:60]


def test_unsupported_normalizer_and_added_token_flags_are_refused(hf_bpe_json):
    data = json.loads(hf_bpe_json.read_text())
    with pytest.raises(Exception, match="Lowercase"):
        tokenizer_from_hf_json({**data, "normalizer": {"type": "Lowercase"}})
    stripped = {"id": 600, "content": "<x>", "special": False, "lstrip": True}
    with pytest.raises(Exception, match="strips"):
        tokenizer_from_hf_json({**data, "added_tokens": [*data["added_tokens"], stripped]})


# --- the hub, offline, from a cache the test builds ---------------------------------------
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _hub_cache(root, repo_id, folder, commit=COMMIT, branch="main"):
    """The huggingface_hub cache layout: models--org--name/{refs/BRANCH, snapshots/COMMIT/,
    blobs/}, each snapshot file a relative symlink to its blob, as a download leaves it."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for f in folder.iterdir():
        blob = hashlib.sha256(f.read_bytes()).hexdigest()
        (repo / "blobs" / blob).write_bytes(f.read_bytes())
        (snapshot / f.name).symlink_to(f"../../blobs/{blob}")
    (repo / "refs").mkdir()
    (repo / "refs" / branch).write_text(commit)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path, hf_bpe_json, monkeypatch):
    """A hub cache holding `atlas-tests/tiny-qwen2` (a chat template in tokenizer_config.json)
    at COMMIT, and the env that points huggingface_hub at it, offline."""
    hf = hf_qwen2(600)
    folder = _save_hf(hf, tmp_path / "hf", hf_bpe_json)
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": "{{ messages[0]['content'] }}", "eos_token": "<|endoftext|>"})
    )
    root = tmp_path / "hub"
    _hub_cache(root, "atlas-tests/tiny-qwen2", folder)
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    env = {"HF_HUB_CACHE": str(root), "HF_HUB_OFFLINE": "1"}
    return hf, root, env


def test_import_from_the_hub_cache_offline_with_revision(tmp_path, hub_cache):
    hf, _, _ = hub_cache
    import_hf("atlas-tests/tiny-qwen2", tmp_path / "main")
    ckpt = load_checkpoint(tmp_path / "main")
    assert ckpt.provenance["source"] == "hf://atlas-tests/tiny-qwen2"
    assert ckpt.provenance["revision"] == "main" and ckpt.provenance["commit"] == COMMIT
    assert ckpt.provenance["architecture"] == "Qwen2ForCausalLM"
    assert ckpt.chat_template == "{{ messages[0]['content'] }}"
    _assert_same_logits(hf, tmp_path / "main", 600)
    import_hf("atlas-tests/tiny-qwen2", tmp_path / "pinned", revision=COMMIT)
    assert load_checkpoint(tmp_path / "pinned").provenance["commit"] == COMMIT
    with pytest.raises(HFImportError, match="not in the hub cache"):
        import_hf("atlas-tests/tiny-qwen2", tmp_path / "x", revision="v2.0")
    with pytest.raises(HFImportError, match="not in the hub cache"):
        import_hf("atlas-tests/not-there", tmp_path / "y")
    with pytest.raises(HFImportError, match="applies to hub repositories"):
        import_hf(tmp_path / "hf", tmp_path / "z", revision="main")
    assert not any((tmp_path / n).exists() for n in "xyz")


def test_a_sharded_model_imports_from_the_hub_cache(tmp_path, hf_bpe_json, monkeypatch):
    """Every shard of a cached download is a symlink into blobs/, outside the snapshot
    folder: the index's shard names are checked as written, not where the links lead."""
    hf = hf_qwen2(600)
    folder = tmp_path / "hf"
    hf.save_pretrained(folder, safe_serialization=True, max_shard_size="100KB")
    (folder / "tokenizer.json").write_text(hf_bpe_json.read_text())
    assert (folder / "model.safetensors.index.json").is_file()
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    snapshot = _hub_cache(tmp_path / "hub", "atlas-tests/sharded", folder)
    assert (snapshot / "model.safetensors.index.json").is_symlink()
    import_hf("atlas-tests/sharded", tmp_path / "atlas")
    _assert_same_logits(hf, tmp_path / "atlas", 600)


def test_cli_import_from_the_hub_then_inspect_says_what_was_imported(tmp_path, hub_cache):
    """The real command line in a fresh process: HF_HUB_CACHE and HF_HUB_OFFLINE from the
    environment, as a user would set them."""
    import os
    import subprocess
    import sys

    _, _, env = hub_cache
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "atlas_server.cli",
            "checkpoint",
            "import-hf",
            "atlas-tests/tiny-qwen2",
            str(tmp_path / "atlas"),
            "--revision",
            "main",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env},
    )
    assert run.returncode == 0, run.stderr
    result = CliRunner().invoke(app, ["checkpoint", "inspect", str(tmp_path / "atlas")])
    assert result.exit_code == 0, result.output
    assert (
        f"imported: Qwen2ForCausalLM from hf://atlas-tests/tiny-qwen2 (revision main @ {COMMIT})"
        in result.output
    )
    assert "chat template: chat_template.jinja" in result.output
    info = json.loads(
        CliRunner().invoke(app, ["checkpoint", "inspect", str(tmp_path / "atlas"), "--json"]).output
    )
    assert info["imported"]["architecture"] == "Qwen2ForCausalLM"
