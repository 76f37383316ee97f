"""The arithmetic of one pretraining step, each part against an independent reference:
gradient accumulation averages its micro-batches (gradients and the logged loss, which is
F.cross_entropy of the step's windows), `optim.grad_clip` bounds the gradients the
optimizer steps with while the reported norm is the pre-clip one, `lr_at` is the warmup +
cosine schedule of transformers' `get_cosine_with_min_lr_schedule_with_warmup` (the last
step at the final lr), and weight decay shrinks matrices and embeddings only."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from atlas_server.model import Transformer, load_preset
from atlas_server.tokenizer.corpus import stdlib_sample
from trainer.config import load_train_config
from trainer.data import prepare_data
from trainer.loop import Dist, lr_at, param_groups, setup, train_step


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, byte_tokenizer) -> Path:
    """Byte-level token shards of a small, fixed stdlib sample."""
    root = tmp_path_factory.mktemp("step_math")
    corpus = root / "corpus"
    corpus.mkdir()
    for i, text in enumerate(stdlib_sample(20_000, docstring_share=0.5)):
        (corpus / f"d{i:03d}.txt").write_text(text)
    tokenizer = byte_tokenizer.save(root / "atlas_tokenizer.json")
    out = root / "tokens"
    prepare_data([str(corpus)], tokenizer, out, 0.1, workers=1, progress=False)
    return out


def config(data_dir: Path, out: Path, *extra: str):
    return load_train_config(
        None,
        [
            f'data.path="{data_dir}"',
            f'run.out_dir="{out}"',
            'model.preset="gpt2-tiny"',
            "data.seq_len=16",
            "schedule.max_steps=4",
            "schedule.warmup_steps=0",
            'run.precision="fp32"',
            "run.compile=false",
            "run.tensorboard=false",
            "run.threads=1",
            *extra,
        ],
    )


def first_step(cfg) -> dict:
    """Set up a run and take its first step, recording what an independent check needs: the
    model before the step, the step's micro-batches, the gradients the optimizer steps
    with, the logged loss (loss_sum / grad_accum, as Progress logs it) and the grad norm."""
    run = setup(cfg, Dist())
    before = copy.deepcopy(run.model)
    batches: list = []
    cut = run.train_data.step_batches

    def recorded(per_rank, accum):
        batches.extend(cut(per_rank, accum))
        return batches[-accum:]

    run.train_data.step_batches = recorded
    grads: dict[str, torch.Tensor] = {}
    step = run.optimizer.step

    def capture(*args, **kwargs):
        grads.update({n: p.grad.clone() for n, p in run.model.named_parameters()})
        return step(*args, **kwargs)

    run.optimizer.step = capture
    loss_sum, grad_norm, _ = train_step(run)
    inputs = torch.cat([b[0] for b in batches])
    targets = torch.cat([b[1] for b in batches])
    return {
        "loss": float(loss_sum) / cfg.data.grad_accum,
        "grad_norm": float(grad_norm),
        "grads": grads,
        "inputs": inputs,
        "targets": targets,
        "before": before,
    }


def reference_loss_and_grads(model, inputs, targets) -> tuple[float, dict[str, torch.Tensor]]:
    """The mean next-token cross-entropy over all the windows at once, and its gradients."""
    model = copy.deepcopy(model)
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(inputs).float().flatten(0, 1), targets.flatten())
    loss.backward()
    return float(loss.detach()), {n: p.grad for n, p in model.named_parameters()}


def total_norm(grads: dict[str, torch.Tensor]) -> float:
    return float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads.values()])))


def test_accumulation_averages_micro_batches_like_one_batch(tmp_path, data_dir):
    # No clipping: clipped to one norm, summed and averaged gradients would look alike.
    one = first_step(config(data_dir, tmp_path / "one", "data.micro_batch=4", "optim.grad_clip=0"))
    two = first_step(
        config(
            data_dir,
            tmp_path / "two",
            "data.micro_batch=2",
            "data.grad_accum=2",
            "optim.grad_clip=0",
        )
    )
    # The same windows, the same initial weights.
    assert torch.equal(one["inputs"], two["inputs"]) and torch.equal(one["targets"], two["targets"])
    for (name, p), q in zip(
        one["before"].named_parameters(), two["before"].parameters(), strict=True
    ):
        assert torch.equal(p, q), name
    loss, grads = reference_loss_and_grads(one["before"], one["inputs"], one["targets"])
    assert loss > 1.0  # a random model: about log(vocab)
    for got in (one, two):
        assert got["loss"] == pytest.approx(loss, rel=1e-5)
        assert got["grad_norm"] == pytest.approx(total_norm(grads), rel=1e-4)
        for name, grad in grads.items():
            torch.testing.assert_close(got["grads"][name], grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("accum", [1, 2])
def test_grad_clip_bounds_the_step_and_the_pre_clip_norm_is_reported(tmp_path, data_dir, accum):
    clip = 1e-3
    got = first_step(
        config(
            data_dir,
            tmp_path / "run",
            f"data.micro_batch={4 // accum}",
            f"data.grad_accum={accum}",
            f"optim.grad_clip={clip}",
        )
    )
    _, grads = reference_loss_and_grads(got["before"], got["inputs"], got["targets"])
    norm = total_norm(grads)
    assert norm > 10 * clip  # so the clip is what bounds the step
    assert got["grad_norm"] == pytest.approx(norm, rel=1e-4)  # the norm before clipping
    stepped = total_norm(got["grads"])
    assert clip * (1 - 1e-3) <= stepped <= clip * (1 + 1e-5)
    for name, grad in grads.items():  # scaled down, direction kept
        torch.testing.assert_close(got["grads"][name], grad * (clip / norm), rtol=1e-4, atol=1e-10)


def schedule(max_steps: int, warmup: int, min_lr_ratio: float, lr: float = 3e-4):
    return load_train_config(
        None,
        [
            'schedule.kind="cosine"',
            f"schedule.max_steps={max_steps}",
            f"schedule.warmup_steps={warmup}",
            f"optim.lr={lr}",
            f"optim.min_lr_ratio={min_lr_ratio}",
        ],
    )


@pytest.mark.parametrize(
    ("max_steps", "warmup", "min_lr_ratio"), [(100, 10, 0.1), (50, 0, 0.0), (37, 5, 0.25)]
)
def test_cosine_schedule_matches_transformers_at_every_step(max_steps, warmup, min_lr_ratio):
    from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

    lr = 3e-4
    cfg = schedule(max_steps, warmup, min_lr_ratio, lr)
    # The project's conventions, mapped onto transformers' schedule: 0-based step s of the
    # warmup trains at lr * (s + 1) / warmup (step 0 is not wasted at lr 0), i.e. at
    # transformers' step s + 1; the decay reaches the final lr at the last step, max_steps
    # - 1 (step max_steps never runs), i.e. num_training_steps = max_steps - 1.
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    hf = get_cosine_with_min_lr_schedule_with_warmup(
        opt, warmup, max_steps - 1, min_lr_rate=min_lr_ratio
    ).lr_lambdas[0]
    for s in range(max_steps):
        expected = lr * (hf(s + 1) if s < warmup else hf(s))
        assert lr_at(s, cfg) == pytest.approx(expected, rel=1e-12, abs=1e-18), s
    assert lr_at(max_steps - 1, cfg) == pytest.approx(lr * min_lr_ratio, rel=1e-12, abs=1e-18)
    assert lr_at(warmup, cfg) == pytest.approx(lr, rel=1e-12)


def test_cosine_decay_at_its_quarter_and_half_is_the_closed_form():
    # 40 decay steps after a warmup of 4 (steps 4..44): a quarter in, cos(pi/4); halfway,
    # the middle of the range. A linear decay would give 0.75 and 0.5 of the range.
    cfg = schedule(45, 4, 0.1, lr=1.0)
    low = 0.1
    assert lr_at(14, cfg) == pytest.approx(low + (1 - low) * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_at(14, cfg) == pytest.approx(low + (1 - low) * 0.8535533905932737)
    assert lr_at(24, cfg) == pytest.approx(low + (1 - low) * 0.5)
    assert lr_at(34, cfg) == pytest.approx(low + (1 - low) * 0.1464466094067262)


@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny"])
def test_decay_groups_hold_matrices_and_embeddings_only(preset, byte_tokenizer):
    model = Transformer(load_preset(preset, vocab_size=byte_tokenizer.vocab_size))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    shapes = dict(model.named_parameters())
    assert decayed == {n for n, p in shapes.items() if p.dim() >= 2}
    assert kept == {n for n, p in shapes.items() if p.dim() < 2}
    assert "tok_emb.weight" in decayed  # embeddings decay, as GPT-2/nanoGPT (docs/training.md)
    assert any("norm" in n for n in kept) and not any("norm" in n for n in decayed)
    if preset == "gpt2-tiny":
        assert "pos_emb.weight" in decayed
        assert any(n.endswith(".bias") for n in kept)
        assert not any(n.endswith(".bias") for n in decayed)


def test_adamw_step_with_zero_grads_shrinks_matrices_and_leaves_norms_and_biases(
    tmp_path, data_dir
):
    lr, wd = 0.1, 0.5
    run = setup(
        config(data_dir, tmp_path / "run", f"optim.lr={lr}", f"optim.weight_decay={wd}"), Dist()
    )
    # LayerNorm starts at weight 1, bias 0: make them values a decay would visibly move.
    with torch.no_grad():
        for p in run.model.parameters():
            if p.dim() < 2:
                p.add_(torch.linspace(0.5, 1.5, p.numel()).view_as(p))
    before = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    for p in run.model.parameters():
        p.grad = torch.zeros_like(p)
    run.optimizer.step()
    after = dict(run.model.named_parameters())
    matrices = [n for n, p in before.items() if p.dim() >= 2]
    assert "tok_emb.weight" in matrices and "pos_emb.weight" in matrices
    for name, p in before.items():
        if p.dim() >= 2:  # decoupled decay: p * (1 - lr * wd), the Adam update being 0
            torch.testing.assert_close(after[name].detach(), p * (1 - lr * wd), rtol=1e-6, atol=0)
        else:
            assert torch.equal(after[name].detach(), p), name
