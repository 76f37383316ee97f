"""LoRA: starts equal to the base, trains only the adapters, saves small with provenance,
and merges into weights whose logits equal base-plus-adapter."""

from __future__ import annotations

import json

import pytest
import torch

from atlas_server.checkpoint import load_checkpoint, save_checkpoint
from atlas_server.model import Transformer, load_preset
from trainer.artifacts import weights_sha256
from trainer.lora import (
    LoRAConfig,
    LoRAError,
    LoRALinear,
    adapter_of,
    adapters_disabled,
    apply_lora,
    load_adapter,
    load_adapter_weights,
    merge_lora,
    remove_lora,
    save_adapter,
)


def base_model(byte_tokenizer, preset: str) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(load_preset(preset, vocab_size=byte_tokenizer.vocab_size))
    with torch.no_grad():  # logits that depend on the weights more than the init scale allows
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    return model.eval()


def tokens(n=40, seed=0) -> torch.Tensor:
    return torch.randint(0, 256, (2, n), generator=torch.Generator().manual_seed(seed))


def train_a_little(model: Transformer, steps: int = 4) -> None:
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = tokens(33, seed=1)
    for _ in range(steps):
        loss = model.loss(ids[:, :-1], ids[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


@pytest.fixture(params=["gpt2-tiny", "llama-tiny"])
def preset(request) -> str:
    return request.param


def test_the_adapted_model_starts_equal_to_the_base(byte_tokenizer, preset):
    model = base_model(byte_tokenizer, preset)
    with torch.no_grad():
        before = model(tokens())
    apply_lora(model, LoRAConfig(rank=4, alpha=8))
    with torch.no_grad():
        after = model(tokens())
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)


def test_only_the_adapters_train_and_the_count_is_printed(byte_tokenizer, preset, capsys):
    model = base_model(byte_tokenizer, preset)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = LoRAConfig(rank=4, alpha=8, targets=("attn.wqkv", "mlp.w_out"))
    report = apply_lora(model, config)
    c = model.config
    qkv_out = (c.n_heads + 2 * c.kv_heads) * c.head_dim
    expected = c.n_layers * config.rank * ((c.d_model + qkv_out) + (c.ff_dim + c.d_model))
    assert report.trainable == expected
    assert report.modules == [
        f"blocks.{i}.{m}" for i in range(c.n_layers) for m in ("attn.wqkv", "mlp.w_out")
    ]
    print(report)
    assert f"{expected:,} trainable parameters of {report.total:,}" in capsys.readouterr().out

    train_a_little(model)
    names = {n for n, p in model.named_parameters() if p.grad is not None}
    assert names == {n for n, _ in model.named_parameters() if "lora_" in n}
    for name, p in model.named_parameters():
        if "lora_" in name:
            assert p.grad.abs().sum() > 0, name
        else:  # base weights are untouched (their names gained ".base" inside the wrapper)
            assert torch.equal(p, frozen[name.replace(".base.", ".")]), name


def test_merged_logits_equal_base_plus_adapter_logits(tmp_path, byte_tokenizer, preset):
    model = base_model(byte_tokenizer, preset)
    report = apply_lora(model, LoRAConfig(rank=4, alpha=16, dropout=0.1))
    train_a_little(model)
    with torch.no_grad():
        adapted = model(tokens())
        with adapters_disabled(model):
            torch.testing.assert_close(
                model(tokens()), base_model(byte_tokenizer, preset)(tokens())
            )
    assert not torch.allclose(adapted, base_model(byte_tokenizer, preset)(tokens()), atol=1e-3)

    save_adapter(tmp_path / "adapter", adapter_of(model, report, {"stage": "sft"}))
    merged = merge_lora(base_model(byte_tokenizer, preset), load_adapter(tmp_path / "adapter"))
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    with torch.no_grad():
        torch.testing.assert_close(merged(tokens()), adapted, rtol=1e-5, atol=1e-5)
        # As served: packed inference copies, and through a saved checkpoint.
        torch.testing.assert_close(
            merged.prepare_for_inference()(tokens()), adapted, rtol=1e-4, atol=1e-4
        )
        ckpt = save_checkpoint(tmp_path / "merged", merged, byte_tokenizer, {"stage": "sft"})
        torch.testing.assert_close(
            load_checkpoint(ckpt).model(tokens()), adapted, rtol=1e-5, atol=1e-5
        )


def test_the_adapter_file_is_small_and_carries_its_provenance(tmp_path, byte_tokenizer):
    model = base_model(byte_tokenizer, "gpt2-tiny")
    base_hash = weights_sha256(model.state_dict())
    report = apply_lora(model, LoRAConfig(rank=2, alpha=4, targets=("attn.wqkv",)))
    train_a_little(model, steps=2)
    out = save_adapter(
        tmp_path / "a", adapter_of(model, report, {"base_checkpoint": "ckpt/", "step": 10})
    )
    sidecar = json.loads((out / "adapter.json").read_text())
    assert sidecar["config"] == {"rank": 2, "alpha": 4.0, "dropout": 0.0, "targets": ["attn.wqkv"]}
    assert sidecar["base_sha256"] == base_hash == report.base_sha256
    assert sidecar["provenance"] == {"base_checkpoint": "ckpt/", "step": 10}
    from safetensors import safe_open

    with safe_open(str(out / "adapter.safetensors"), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["base_sha256"]) == base_hash and json.loads(meta["config"])["rank"] == 2
    size = (out / "adapter.safetensors").stat().st_size
    assert size < sum(p.numel() * 4 for p in model.parameters()) / 20

    again = load_adapter(out)
    assert again.config == report.config and again.modules == report.modules
    # Loaded back into a freshly wrapped model (resuming training), it gives the same logits.
    fresh = base_model(byte_tokenizer, "gpt2-tiny")
    apply_lora(fresh, again.config)
    load_adapter_weights(fresh, again)
    with torch.no_grad():
        torch.testing.assert_close(fresh(tokens()), model(tokens()), rtol=0, atol=0)
    with pytest.raises(LoRAError, match="apply_lora with the adapter's own configuration"):
        load_adapter_weights(base_model(byte_tokenizer, "gpt2-tiny"), again)
    # Saving again replaces the directory whole.
    save_adapter(out, adapter_of(model, report))
    assert load_adapter(out).provenance == {}


def test_a_changed_file_a_wrong_base_and_unknown_targets_are_refused(tmp_path, byte_tokenizer):
    model = base_model(byte_tokenizer, "gpt2-tiny")
    with pytest.raises(LoRAError, match=r"'attn.q_proj' matches no projection; projections: \["):
        apply_lora(base_model(byte_tokenizer, "gpt2-tiny"), LoRAConfig(targets=("attn.q_proj",)))
    report = apply_lora(model, LoRAConfig(rank=2, targets=("blocks.[01].attn.wo",)))
    assert report.modules == ["blocks.0.attn.wo", "blocks.1.attn.wo"]
    out = save_adapter(tmp_path / "a", adapter_of(model, report))

    other = base_model(byte_tokenizer, "gpt2-tiny")
    with torch.no_grad():
        other.blocks[0].attn.wo.weight[0, 0] += 1.0
    with pytest.raises(LoRAError, match="trained on other base weights"):
        merge_lora(other, load_adapter(out))
    merge_lora(other, load_adapter(out), check_base=False)  # when the user says so
    with pytest.raises(LoRAError, match="not one that carries adapters"):
        merge_lora(model, load_adapter(out))

    weights = out / "adapter.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(LoRAError, match="does not match the sha256"):
        load_adapter(out)
    with pytest.raises(LoRAError, match="is missing"):
        load_adapter(tmp_path / "nothing")
    with pytest.raises(LoRAError, match="rank must be >= 1"):
        LoRAConfig(rank=0)


def test_remove_lora_gives_back_the_base_model(byte_tokenizer):
    model = base_model(byte_tokenizer, "llama-tiny")
    keys = set(model.state_dict())
    apply_lora(model, LoRAConfig(rank=2))
    remove_lora(model)
    assert set(model.state_dict()) == keys


@pytest.mark.parametrize("cross_entropy", ["chunked", "plain"])
def test_an_adapter_on_an_untied_head_trains_serves_and_merges(
    tmp_path, byte_tokenizer, cross_entropy
):
    """`lm_head` is a documented target where embeddings are untied: its adapter changes the
    logits in training (through the pretraining loss, chunked by default), in serving
    (packed inference copies) and once merged."""
    from trainer.loss import NextTokenLoss

    model = base_model(byte_tokenizer, "llama-tiny")
    assert not model.config.tie_embeddings
    report = apply_lora(model, LoRAConfig(rank=2, alpha=4, targets=("lm_head",)))
    assert report.modules == ["lm_head"]
    loss_module = NextTokenLoss(model, chunked=cross_entropy == "chunked")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = tokens(33, seed=1)
    model.train()
    for _ in range(3):
        loss = loss_module(ids[:, :-1], ids[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    assert model.lm_head.lora_B.abs().sum() > 0  # the head's adapter got gradients
    with torch.no_grad():
        adapted = model(tokens())
        assert not torch.allclose(adapted, base_model(byte_tokenizer, "llama-tiny")(tokens()))
        torch.testing.assert_close(
            model.prepare_for_inference()(tokens()), adapted, rtol=1e-4, atol=1e-4
        )
        merged = merge_lora(base_model(byte_tokenizer, "llama-tiny"), adapter_of(model, report))
        torch.testing.assert_close(merged(tokens()), adapted, rtol=1e-5, atol=1e-5)
