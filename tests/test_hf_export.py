"""Hugging Face export: `transformers` and `tokenizers` load the folder and agree with Atlas.

References nobody here wrote: `transformers.AutoModelForCausalLM` (logits, greedy
`generate`), `tokenizers.Tokenizer.from_file` and `transformers.AutoTokenizer` (ids on
held-out text, the chat template rendered by `apply_chat_template`).
"""

from __future__ import annotations

import functools
import json

import pytest
import torch
from typer.testing import CliRunner

from atlas_server.checkpoint import load_checkpoint, save_checkpoint
from atlas_server.cli import app
from atlas_server.hf_export import export_hf
from atlas_server.hf_import import import_hf
from atlas_server.model import Transformer, load_preset
from atlas_server.tokenizer import GPT2_SPLIT_PATTERN, TrainConfig, train_from_texts
from atlas_server.tokenizer.corpus import stdlib_sample

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

ODD_TEXTS = [
    "naïve café 東京 🙂 \r\n\t  x  123456 it's I'LL",
    "def f(x):\n        return x  # indented\n\n\n    \t\n",
    "ÉCOLE-Straße ½ ２３ —— “quotes” ‘and’ …",
    "a<|endoftext|>b<|im_start|>user\nhi<|im_end|>",
]


@functools.cache
def held_out_texts() -> list[str]:
    """stdlib documents the tokenizers below were not trained on, plus awkward strings."""
    seen = set(stdlib_sample(150_000))
    return [t for t in stdlib_sample(400_000, stride=11) if t not in seen][:60] + ODD_TEXTS


@pytest.fixture(scope="module")
def trained_tokenizer():
    """An Atlas-trained tokenizer (700 ids, Atlas's default GPT-4 split pattern)."""
    return train_from_texts(stdlib_sample(150_000), TrainConfig(vocab_size=700))


@pytest.fixture(scope="module")
def gpt2_pattern_tokenizer():
    """The same with GPT-2's split pattern (exported as the plain ByteLevel pre-tokenizer)."""
    config = TrainConfig(vocab_size=700, pattern=GPT2_SPLIT_PATTERN)
    return train_from_texts(stdlib_sample(150_000), config)


def _model(preset: str, vocab: int, tie: bool | None = None) -> Transformer:
    torch.manual_seed(0)
    overrides = {"tie_embeddings": tie} if tie is not None else {}
    model = Transformer(load_preset(preset, vocab_size=vocab, **overrides)).eval()
    with torch.no_grad():  # scaled up and random norms: greedy text varies, mix-ups show
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.mul_(6.0)
            elif "norm" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.05)
    return model


@pytest.mark.parametrize(
    ("preset", "tie", "hf_class"),
    [
        ("gpt2-tiny", None, "GPT2LMHeadModel"),
        ("gpt2-tiny", False, "GPT2LMHeadModel"),
        ("llama-tiny", None, "LlamaForCausalLM"),
        ("llama-tiny", True, "LlamaForCausalLM"),
    ],
)
def test_exported_model_loads_in_transformers_with_the_same_logits(
    tmp_path, trained_tokenizer, preset, tie, hf_class
):
    model = _model(preset, trained_tokenizer.vocab_size, tie)
    save_checkpoint(tmp_path / "atlas", model, trained_tokenizer)
    result = CliRunner().invoke(
        app, ["checkpoint", "export-hf", str(tmp_path / "atlas"), str(tmp_path / "hf")]
    )
    assert result.exit_code == 0, result.output
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == hf_class
    ids = torch.randint(
        0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(3)
    )
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert ours.abs().max() > 1.0  # logits that say something
    assert (ours - theirs).abs().max().item() <= 1e-4
    prompt = trained_tokenizer.encode("def main():\n    return")
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)
    assert model.generate(prompt, 12) == out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("which", ["trained_tokenizer", "gpt2_pattern_tokenizer"])
def test_exported_tokenizer_gives_atlas_ids_in_tokenizers_and_autotokenizer(
    tmp_path, request, which
):
    trained_tokenizer = request.getfixturevalue(which)
    model = _model("gpt2-tiny", trained_tokenizer.vocab_size)
    save_checkpoint(tmp_path / "atlas", model, trained_tokenizer)
    export_hf(tmp_path / "atlas", tmp_path / "hf")
    fast = tokenizers.Tokenizer.from_file(str(tmp_path / "hf" / "tokenizer.json"))
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    texts = held_out_texts()
    for text in texts:
        ours = trained_tokenizer.encode(text, allowed_special="all")
        assert fast.encode(text).ids == ours, text[:80]
        assert auto(text)["input_ids"] == ours, text[:80]
        assert auto.decode(ours) == trained_tokenizer.decode(ours)
    assert auto.eos_token == "<|endoftext|>"
    assert auto.eos_token_id == trained_tokenizer.special_tokens["<|endoftext|>"]
    assert (
        auto.convert_tokens_to_ids("<|im_end|>") == trained_tokenizer.special_tokens["<|im_end|>"]
    )


def test_default_chat_template_is_what_the_server_renders(tmp_path, trained_tokenizer):
    from atlas_server.chat_template import load_chat_template

    save_checkpoint(
        tmp_path / "atlas", _model("gpt2-tiny", trained_tokenizer.vocab_size), trained_tokenizer
    )
    export_hf(tmp_path / "atlas", tmp_path / "hf")
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    messages = [
        {"role": "system", "content": "Answer in one line."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3 + 3?"},
    ]
    for generation_prompt in (True, False):
        theirs = auto.apply_chat_template(
            messages, add_generation_prompt=generation_prompt, tokenize=True
        )
        theirs = list(theirs["input_ids"] if hasattr(theirs, "keys") else theirs)
        served = load_chat_template(tmp_path / "atlas", trained_tokenizer)  # what serve uses
        ours = served.prompt_ids(messages, generation_prompt)
        assert theirs == ours


def test_checkpoint_chat_template_is_exported_and_survives_a_round_trip(
    tmp_path, trained_tokenizer
):
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] | upper }}\n{{ m['content'] }}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>ASSISTANT\n{% endif %}"
    )
    model = _model("llama-tiny", trained_tokenizer.vocab_size)
    save_checkpoint(tmp_path / "atlas", model, trained_tokenizer, chat_template=template)
    export_hf(tmp_path / "atlas", tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert config["chat_template"] == template
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = auto.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert text == "<|im_start|>USER\nhi<|im_end|>\n"

    import_hf(tmp_path / "hf", tmp_path / "back")  # export, then import again
    back = load_checkpoint(tmp_path / "back")
    assert back.chat_template == template
    assert back.provenance["imported_from"] == "llama"
    ids = torch.randint(
        0, model.config.vocab_size, (1, 30), generator=torch.Generator().manual_seed(5)
    )
    with torch.no_grad():
        assert (back.model(ids) - model(ids)).abs().max().item() <= 1e-5
    for text in held_out_texts()[:20]:
        assert back.tokenizer.encode(text, allowed_special="all") == trained_tokenizer.encode(
            text, allowed_special="all"
        )


def test_bfloat16_export(tmp_path, byte_tokenizer):
    save_checkpoint(
        tmp_path / "atlas", _model("llama-tiny", byte_tokenizer.vocab_size), byte_tokenizer
    )
    export_hf(tmp_path / "atlas", tmp_path / "hf", dtype="bfloat16")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype="auto")
    assert hf.model.embed_tokens.weight.dtype == torch.bfloat16


def test_unexportable_model_is_refused_and_nothing_is_written(tmp_path, byte_tokenizer):
    config = load_preset("gpt2-tiny", vocab_size=byte_tokenizer.vocab_size)
    model = Transformer(config.replace(pos_encoding="sinusoidal"))
    save_checkpoint(tmp_path / "atlas", model, byte_tokenizer)
    result = CliRunner().invoke(
        app, ["checkpoint", "export-hf", str(tmp_path / "atlas"), str(tmp_path / "hf")]
    )
    assert result.exit_code == 1
    assert result.output.startswith("error:") and "pos_encoding=sinusoidal" in result.output
    assert not (tmp_path / "hf").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["atlas"]  # no temp folder left behind


def test_non_empty_output_is_refused_unless_overwrite(tmp_path, tiny_checkpoint):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    runner = CliRunner()
    result = runner.invoke(app, ["checkpoint", "export-hf", str(tiny_checkpoint), str(out)])
    assert result.exit_code == 1 and "--overwrite" in result.output
    assert (out / "notes.txt").read_text() == "mine"
    result = runner.invoke(
        app, ["checkpoint", "export-hf", str(tiny_checkpoint), str(out), "--overwrite"]
    )
    assert result.exit_code == 0, result.output
    assert not (out / "notes.txt").exists() and (out / "model.safetensors").is_file()


def test_whole_piece_lookup_matches_for_tokens_no_merge_reaches():
    """Atlas looks a whole pre-token up before merging (as tiktoken does): "abc" below is one
    id although no pair of its parts is in the vocabulary; the export keeps that rule."""
    from atlas_server.tokenizer import Tokenizer
    from atlas_server.tokenizer.hf_format import tokenizer_to_hf_json

    ranks = {bytes([b]): b for b in range(256)} | {b"abc": 256, b" abc": 257}
    ours = Tokenizer(ranks, {"<|endoftext|>": 258})
    theirs = tokenizers.Tokenizer.from_str(json.dumps(tokenizer_to_hf_json(ours)))
    for text in ("abc", "x abc abcd", "abc<|endoftext|>"):
        assert theirs.encode(text).ids == ours.encode(text, allowed_special="all")
    assert ours.encode("abc") == [256]


@pytest.mark.parametrize(
    ("shape", "hf_class"),
    [
        ({"pos_encoding": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False,
          "qkv_bias": True, "n_kv_heads": 2, "rope_theta": 1e6}, "Qwen2ForCausalLM"),
        ({"pos_encoding": "rope", "norm": "layernorm", "mlp": "gelu_exact", "bias": True,
          "rotary_dim": 4, "parallel_residual": True, "tie_embeddings": False},
         "GPTNeoXForCausalLM"),
        ({"pos_encoding": "rope", "norm": "layernorm", "mlp": "gelu", "bias": True,
          "parallel_residual": False}, "GPTNeoXForCausalLM"),
        ({"pos_encoding": "learned", "norm": "layernorm", "mlp": "gelu_exact", "bias": True},
         "GPT2LMHeadModel"),
    ],
)  # fmt: skip
def test_new_shapes_export_to_their_transformers_class(tmp_path, byte_tokenizer, shape, hf_class):
    from atlas_server.model import ModelConfig

    config = ModelConfig(
        vocab_size=byte_tokenizer.vocab_size, n_layers=2, d_model=64, n_heads=4, **shape
    )
    torch.manual_seed(0)
    model = Transformer(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1) if p.dim() == 1 else p.mul_(5.0)
    save_checkpoint(tmp_path / "atlas", model, byte_tokenizer)
    export_hf(tmp_path / "atlas", tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == hf_class
    ids = torch.randint(0, 259, (2, 30), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max().item() <= 1e-4
