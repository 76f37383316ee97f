"""DPO: the loss against the papers' formulas and TRL's implementation, response-only
log-probs, a few optimisation steps, and the stored reference log-probs."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from atlas_server.model import Transformer, load_preset
from trainer.chat_data import IGNORE, ChatMLRenderer, PreferencePair, tokenize_pair
from trainer.dpo import (
    PairBatch,
    StaleReferenceError,
    dpo_step_loss,
    frozen_copy,
    preference_loss,
    reference_logps,
    reference_path,
    sequence_logps,
    token_logps,
)

PAIRS = [
    (
        "What does abs do?",
        "Return the absolute value of the argument.",
        "Return the number of items.",
    ),
    (
        "What does len do?",
        "Return the number of items in a container.",
        "Write the text to a file.",
    ),
    ("What does min do?", "Return the smallest item.", "Return the largest item in an iterable."),
    (
        "What does chr do?",
        "Return a Unicode string of one character.",
        "Return the integer ordinal.",
    ),
]


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


@pytest.fixture(scope="module")
def pairs(byte_tokenizer):
    renderer = ChatMLRenderer(byte_tokenizer)
    return [
        tokenize_pair(PreferencePair(({"role": "user", "content": q},), c, r, f"t:{i}"), renderer)
        for i, (q, c, r) in enumerate(PAIRS)
    ]


def tiny(byte_tokenizer, preset="gpt2-tiny", seed=0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(load_preset(preset, vocab_size=byte_tokenizer.vocab_size))


# --- the loss -----------------------------------------------------------------------------------
def test_the_loss_equals_the_papers_formulas_computed_by_hand():
    pc, pr = torch.tensor([-10.0, -7.0]), torch.tensor([-12.5, -6.0])
    rc, rr = torch.tensor([-11.0, -7.5]), torch.tensor([-11.5, -7.0])
    beta = 0.1
    # h = (pc - rc) - (pr - rr): pair 0: 1 - (-1) = 2; pair 1: 0.5 - 1 = -0.5
    hs = [2.0, -0.5]
    dpo = preference_loss(pc, pr, rc, rr, beta)
    expected = sum(-log_sigmoid(beta * h) for h in hs) / 2  # Rafailov et al. 2023, eq. 7
    assert dpo.loss.item() == pytest.approx(expected, rel=1e-6)
    eps = 0.2  # conservative DPO: labels flipped with probability eps
    cdpo = preference_loss(pc, pr, rc, rr, beta, label_smoothing=eps)
    expected = (
        sum(-(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h) for h in hs) / 2
    )
    assert cdpo.loss.item() == pytest.approx(expected, rel=1e-6)
    ipo = preference_loss(pc, pr, rc, rr, beta, loss_type="ipo")  # Azar et al. 2023, eq. 17
    assert ipo.loss.item() == pytest.approx(((2 - 5) ** 2 + (-0.5 - 5) ** 2) / 2, rel=1e-6)
    m = dpo.metrics()
    assert m["reward_chosen"] == pytest.approx(beta * (1.0 + 0.5) / 2)
    assert m["reward_rejected"] == pytest.approx(beta * (-1.0 + 1.0) / 2)
    assert m["reward_margin"] == pytest.approx(beta * (2.0 - 0.5) / 2)
    assert m["preference_accuracy"] == 0.5


def test_a_margin_within_rounding_is_a_tie_not_a_preference():
    """Cached reference log-probs come from batches padded otherwise than the policy's:
    with policy == reference they differ in the last bits, and step 1's accuracy was
    0.075-0.25 instead of 0. A margin of one fp32 ulp of the sums is a tie; 1e-3 nats is
    a preference, as is the same on IPO's per-token averages."""
    ref = torch.tensor([-150.0, -150.0, -150.0, -5.0])  # [4]
    ulp = torch.tensor([1.5258789e-05, 0.0, 0.0, 4.7683716e-07])
    real = torch.tensor([0.0, 1e-3, -1e-3, 1e-4])
    for policy_chosen, accuracy in ((ref + ulp, 0.0), (ref + real, 0.5)):
        out = preference_loss(policy_chosen, ref, ref, ref, beta=0.1)
        assert out.metrics()["preference_accuracy"] == accuracy
        assert out.preferred.tolist() == [False, accuracy > 0, False, accuracy > 0]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"beta": 0.0},
        {"label_smoothing": 0.5},
        {"loss_type": "hinge"},
        {"loss_type": "ipo", "label_smoothing": 0.1},
    ],
)
def test_bad_loss_settings_are_refused(kwargs):
    t = torch.zeros(1)
    with pytest.raises(ValueError):
        preference_loss(t, t, t, t, **kwargs)


class FakeTRLModel:
    """Stands in for the Hugging Face model TRL 1.x's DPOTrainer._compute_loss calls: it
    returns per-token log-probs (TRL's fused LM head puts 0 at unlabelled positions, as
    token_logps does) and the extra statistics TRL logs (unused by the loss)."""

    training = True

    def __init__(self, per_token: torch.Tensor) -> None:
        self.per_token = per_token

    def __call__(self, **kwargs):
        zeros = torch.zeros_like(self.per_token)
        return SimpleNamespace(
            log_probs=self.per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool()
        )


def trl_loss(per_token, labels, ref_chosen, ref_rejected, loss_type, beta, smoothing):
    """TRL's own DPO loss on the given log-probs.

    TRL 1.x computes the loss inside DPOTrainer._compute_loss(model, inputs), which reads a
    handful of trainer attributes and calls the model; building a whole trainer would need a
    Hugging Face model and dataset. So the method is called on a minimal object holding just
    those attributes, with precomputed reference log-probs (its `precompute_ref_log_probs`
    path) and a model that returns our per-token log-probs. Returns (loss, logged metrics)."""
    from trl import DPOTrainer

    metrics = defaultdict(lambda: defaultdict(list))
    model = FakeTRLModel(per_token)
    trainer = SimpleNamespace(
        model=model,
        accelerator=SimpleNamespace(
            device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x
        ),
        aux_loss_enabled=False,
        precompute_ref_logps=True,
        ld_alpha=None,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=smoothing,
        use_weighting=False,
        _metrics=metrics,
        _total_train_tokens=0,
        _tp_size=1,
    )
    # TRL's batch holds the unshifted sequences; completion_mask[t] marks response token t,
    # which our shifted labels mark at position t - 1.
    rows, T = labels.shape
    completion = torch.zeros(rows, T + 1, dtype=torch.long)
    completion[:, 1:] = (labels != IGNORE).long()
    inputs = {
        "input_ids": torch.zeros(rows, T + 1, dtype=torch.long),
        "attention_mask": torch.ones(rows, T + 1, dtype=torch.long),
        "completion_mask": completion,
        "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected,
    }
    loss = DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    return loss, {k: v[-1] for k, v in metrics["train"].items()}


@pytest.mark.parametrize("loss_type,smoothing", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0)])
def test_the_loss_equals_trls_on_the_same_log_probs(byte_tokenizer, pairs, loss_type, smoothing):
    model = tiny(byte_tokenizer)
    batch = PairBatch.from_pairs(pairs, range(len(pairs)), pad_id=0)
    with torch.no_grad():
        per_token = token_logps(model, batch)  # [2B, T]
    gen = torch.Generator().manual_seed(1)
    ref_sums = per_token.sum(1) + torch.randn(2 * len(pairs), generator=gen) * 3.0  # [2B]
    ref_chosen, ref_rejected = ref_sums.split(len(pairs))
    beta = 0.3
    counts = (batch.labels != IGNORE).sum(1)  # [2B]

    sums = per_token.sum(1)
    if loss_type == "ipo":  # length-averaged, policy and reference alike
        sums, ref_c, ref_r = sums / counts, *(ref_sums / counts).split(len(pairs))
    else:
        ref_c, ref_r = ref_chosen, ref_rejected
    ours = preference_loss(*sums.split(len(pairs)), ref_c, ref_r, beta, smoothing, loss_type)

    if smoothing:
        # TRL 1.x has dropped label smoothing from its sigmoid loss; its "aot" loss applies
        # the same conservative smoothing to *sorted* deltas, which for a single pair is
        # exactly conservative DPO. So compare pair by pair.
        B = len(pairs)
        theirs = []
        for i in range(B):
            rows = [i, B + i]
            one = (ref_chosen[i : i + 1], ref_rejected[i : i + 1])
            loss, _ = trl_loss(per_token[rows], batch.labels[rows], *one, "aot", beta, smoothing)
            theirs.append(loss)
        assert ours.loss.item() == pytest.approx(torch.stack(theirs).mean().item(), rel=1e-5)
        return
    loss, logged = trl_loss(
        per_token, batch.labels, ref_chosen, ref_rejected, loss_type, beta, smoothing
    )
    assert ours.loss.item() == pytest.approx(loss.item(), rel=1e-5)
    if loss_type == "sigmoid":  # TRL logs rewards of summed log-probs
        m = ours.metrics()
        assert m["reward_margin"] == pytest.approx(logged["rewards/margins"], rel=1e-5)
        assert m["preference_accuracy"] == pytest.approx(logged["rewards/accuracies"])
        assert m["reward_chosen"] == pytest.approx(logged["rewards/chosen"], rel=1e-5)


# --- log-probs of the response ---------------------------------------------------------------------
def test_sequence_logps_sum_the_response_tokens_only_whatever_the_padding(byte_tokenizer, pairs):
    model = tiny(byte_tokenizer, "llama-tiny")
    batch = PairBatch.from_pairs(pairs, [0, 1, 3], pad_id=0)  # rows of different lengths
    with torch.no_grad():
        got = sequence_logps(model, batch)
        got_avg = sequence_logps(model, batch, average=True)
        rows = [(pairs[i].chosen_ids, pairs[i].chosen_mask, PAIRS[i][1]) for i in (0, 1, 3)]
        rows += [(pairs[i].rejected_ids, pairs[i].rejected_mask, PAIRS[i][2]) for i in (0, 1, 3)]
        for row, (ids, mask, answer) in enumerate(rows):
            logits = model(torch.from_numpy(ids[:-1])[None])[0].double()  # unpadded, alone
            logp = torch.log_softmax(logits, -1)
            picked = [float(logp[t - 1, ids[t]]) for t in range(1, len(ids)) if mask[t]]
            assert len(picked) == len(answer) + 1  # the answer's bytes and <|im_end|>, no prompt
            assert got[row].item() == pytest.approx(sum(picked), rel=1e-5)
            assert got_avg[row].item() == pytest.approx(sum(picked) / len(picked), rel=1e-5)


def test_dpo_steps_move_the_policy_towards_the_chosen_answers(byte_tokenizer, pairs):
    policy = tiny(byte_tokenizer)
    reference = frozen_copy(policy)
    batch = PairBatch.from_pairs(pairs, range(len(pairs)), pad_id=0)
    with torch.no_grad():
        ref = sequence_logps(reference, batch).split(len(pairs))
    optimizer = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    first = None
    for _ in range(8):
        out = dpo_step_loss(policy, batch, *ref, beta=0.5)
        first = first or out.metrics()
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    last = dpo_step_loss(policy, batch, *ref, beta=0.5).metrics()
    assert first["loss"] == pytest.approx(math.log(2), rel=1e-5)  # policy == reference at start
    assert last["loss"] < first["loss"] - 0.05
    assert last["reward_margin"] > 0 and last["preference_accuracy"] == 1.0
    assert not any(p.grad is not None for p in reference.parameters())


# --- stored reference log-probs ---------------------------------------------------------------------
def test_reference_log_probs_are_stored_reused_and_refused_when_stale(
    tmp_path, byte_tokenizer, pairs
):
    reference = tiny(byte_tokenizer)
    path = reference_path(tmp_path / "prefs.jsonl")
    assert path.name == "prefs.jsonl.ref-logps.safetensors"
    stored = reference_logps(path, reference, pairs, pad_id=0, batch_size=3, progress=False)
    assert path.is_file() and stored.chosen.shape == (len(pairs),)

    # The stored numbers are the frozen model's own, batch by batch.
    batch = PairBatch.from_pairs(pairs, [2, 0], pad_id=0)
    with torch.no_grad():
        live = sequence_logps(reference, batch).split(2)
    for a, b in zip(stored.for_batch(batch), live, strict=True):
        torch.testing.assert_close(a, b)

    # Reused without running the model.
    def refuse(*_a, **_k):
        raise AssertionError("the model ran although the stored log-probs were valid")

    reference.forward = refuse
    again = reference_logps(path, reference, pairs, pad_id=0)
    assert torch.equal(again.chosen, stored.chosen) and torch.equal(again.rejected, stored.rejected)
    del reference.forward

    changed = tiny(byte_tokenizer, seed=1)  # other weights
    with pytest.raises(StaleReferenceError, match="reference weights sha256"):
        reference_logps(path, changed, pairs, pad_id=0)
    with pytest.raises(StaleReferenceError, match="data sha256"):
        reference_logps(path, reference, pairs[:3], pad_id=0)
    with pytest.raises(StaleReferenceError, match="average=false, now true"):
        reference_logps(path, reference, pairs, pad_id=0, average=True)
    fresh = reference_logps(path, changed, pairs, pad_id=0, recompute=True, progress=False)
    assert not torch.equal(fresh.chosen, stored.chosen)
    assert reference_logps(path, changed, pairs, pad_id=0).chosen.equal(fresh.chosen)

    path.write_bytes(b"not a safetensors file")
    with pytest.raises(Exception, match="not a readable safetensors file"):
        reference_logps(path, changed, pairs, pad_id=0)
