"""SFT: attention within documents, loss on assistant tokens only, packed == unpacked."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from atlas_server.model import Transformer, load_preset
from atlas_server.model.attention import document_causal_mask
from trainer.chat_data import (
    IGNORE,
    ChatMLRenderer,
    Conversation,
    pack_conversations,
    tokenize_conversation,
)
from trainer.sft import PackedLoader, SFTBatch, sft_loss

QUESTIONS = [
    ("What does abs do?", "Return the absolute value of the argument."),
    ("What does len do?", "Return the number of items in a container."),
    ("What does json.dumps do?", "Serialize obj to a JSON formatted str."),
    ("Say hi.", "Hi!"),
    (
        "What does sorted do?",
        "Return a new list containing all items from the iterable in ascending order.",
    ),
]


def conversations() -> list[Conversation]:
    out = []
    for i, (q, a) in enumerate(QUESTIONS):
        messages = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        trained = (False, True)
        if i % 2:  # some multi-turn ones, with a system prompt
            messages = [{"role": "system", "content": "Be brief."}, *messages]
            messages += [
                {"role": "user", "content": "Thanks"},
                {"role": "assistant", "content": "You're welcome."},
            ]
            trained = (False, False, True, False, True)
        out.append(Conversation(tuple(messages), trained, f"test:{i}"))
    return out


@pytest.fixture(scope="module", params=["gpt2-tiny", "llama-tiny"])
def model(request, byte_tokenizer) -> Transformer:
    torch.manual_seed(0)
    m = Transformer(load_preset(request.param, vocab_size=byte_tokenizer.vocab_size))
    with torch.no_grad():  # larger weights than the init scale: logits that differ by context
        for p in m.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    return m.train()


@pytest.fixture(scope="module")
def examples(byte_tokenizer):
    renderer = ChatMLRenderer(byte_tokenizer)
    return [tokenize_conversation(c, renderer) for c in conversations()]


def test_document_mask_is_causal_within_documents_only():
    mask = document_causal_mask(torch.tensor([[1, 1, 2, 2, 2, 0]]))[0, 0]
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [0, 0, 1, 0, 0, 0],
            [0, 0, 1, 1, 0, 0],
            [0, 0, 1, 1, 1, 0],
            [0, 0, 0, 0, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask, expected)


def test_a_packed_row_gives_each_document_the_logits_it_gets_alone(model, examples):
    rows, _ = pack_conversations(examples, seq_len=512, pad_id=0)
    assert len(rows.inputs) == 1 and len(rows.examples[0]) == len(examples)
    batch = SFTBatch.from_rows(rows, [0])
    with torch.no_grad():
        packed = model.eval()(batch.inputs, positions=batch.positions, doc_ids=batch.doc_ids)[0]
        at = 0
        for ex in examples:
            alone = model(torch.from_numpy(ex.ids[:-1])[None])[0]  # [n-1, V]
            n = len(ex.ids) - 1
            torch.testing.assert_close(packed[at : at + n], alone, rtol=1e-5, atol=1e-5)
            at += n
    model.train()


def test_the_loss_equals_a_hand_computation_over_assistant_tokens(model, examples):
    ex = examples[1]  # two trained answers, an untrained system prompt and questions
    rows, _ = pack_conversations([ex], seq_len=len(ex.ids) - 1, pad_id=0)
    loss = sft_loss(model, SFTBatch.from_rows(rows, [0]))
    with torch.no_grad():
        logits = model(torch.from_numpy(ex.ids[:-1])[None])[0].double()  # [n-1, V]
    logp = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    trained = [i for i in range(len(ex.ids) - 1) if ex.mask[i + 1]]
    assert 0 < len(trained) < len(ex.ids) // 2
    by_hand = -sum(float(logp[i, ex.ids[i + 1]]) for i in trained) / len(trained)
    assert loss.tokens == len(trained)
    assert loss.mean.item() == pytest.approx(by_hand, rel=1e-5)


def test_positions_outside_the_assistant_mask_get_no_gradient(model, examples):
    rows, _ = pack_conversations(examples, seq_len=256, pad_id=0)
    batch = SFTBatch.from_rows(rows, range(len(rows.inputs)))
    captured = {}

    def keep(_module, _args, output):
        output.retain_grad()
        captured["logits"] = output

    handle = model.register_forward_hook(keep)
    try:
        model.zero_grad()
        sft_loss(model, batch).mean.backward()
    finally:
        handle.remove()
    grad = captured["logits"].grad  # [B, L, V]
    ignored = batch.labels == IGNORE
    assert ignored.any() and (~ignored).any()
    assert torch.count_nonzero(grad[ignored]) == 0
    assert (grad[~ignored].abs().sum(-1) > 0).all()
    # And a different token at an ignored label changes nothing.
    changed = SFTBatch(batch.inputs, batch.labels.clone(), batch.positions, batch.doc_ids)
    changed.labels[ignored] = IGNORE
    assert sft_loss(model, changed).total.item() == pytest.approx(
        sft_loss(model, batch).total.item(), rel=1e-6
    )


def loss_and_grads(model, batches: list[SFTBatch]) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad()
    total, tokens = 0.0, 0
    parts = [sft_loss(model, b) for b in batches]
    tokens = sum(p.tokens for p in parts)
    for p in parts:  # one global mean over every trained token, as a training loop does
        (p.total / tokens).backward()
        total += p.total.item()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return total / tokens, grads


def test_packed_loss_and_gradients_equal_the_unpacked_ones(model, examples):
    packed_rows, stats = pack_conversations(examples, seq_len=300, pad_id=0)
    assert len(packed_rows.inputs) < len(examples) and stats.skipped_too_long == 0
    packed = [SFTBatch.from_rows(packed_rows, range(len(packed_rows.inputs)))]
    alone = []
    for ex in examples:  # one conversation per row, no padding, default positions, no mask
        ids = torch.from_numpy(ex.ids)[None]
        labels = torch.where(torch.from_numpy(ex.mask[1:])[None], ids[:, 1:], IGNORE)
        n = ids.shape[1] - 1
        positions = torch.arange(n)[None]
        alone.append(SFTBatch(ids[:, :-1], labels, positions, torch.ones(1, n, dtype=torch.long)))
    packed_loss, packed_grads = loss_and_grads(model, packed)
    alone_loss, alone_grads = loss_and_grads(model, alone)
    assert packed_loss == pytest.approx(alone_loss, rel=1e-5)
    for name, g in alone_grads.items():
        torch.testing.assert_close(packed_grads[name], g, rtol=1e-4, atol=1e-6)

    # Without the document mask the packed rows attend across conversations: another loss.
    crossing = SFTBatch(
        packed[0].inputs, packed[0].labels, packed[0].positions, torch.ones_like(packed[0].doc_ids)
    )
    crossed_loss, crossed_grads = loss_and_grads(model, [crossing])
    assert crossed_loss != pytest.approx(alone_loss, rel=1e-5)
    with pytest.raises(AssertionError):
        for name, g in alone_grads.items():
            torch.testing.assert_close(crossed_grads[name], g, rtol=1e-4, atol=1e-6)


def test_packed_loader_is_seeded_resumable_and_split_by_rank(examples):
    rows, _ = pack_conversations(examples * 4, seq_len=64 * 3, pad_id=0)
    assert len(rows.inputs) >= 4
    a = PackedLoader(rows, seed=7)
    first = [a.next_batch(2).inputs for _ in range(3)]
    b = PackedLoader(rows, seed=7)
    b.next_batch(2)
    state = b.state_dict()
    c = PackedLoader(rows, seed=7)
    c.load_state_dict(state)
    assert torch.equal(c.next_batch(2).inputs, first[1])
    r0, r1 = PackedLoader(rows, 7, rank=0, world=2), PackedLoader(rows, 7, rank=1, world=2)
    assert torch.equal(torch.cat([r0.next_batch(1).inputs, r1.next_batch(1).inputs]), first[0])
    assert (
        not torch.equal(PackedLoader(rows, seed=8).next_batch(2).inputs, first[0])
        or len(rows.inputs) < 3
    )
    assert np.unique(np.concatenate([t.numpy() for t in first])).size > 1
    # The epoch's order is drawn once, not for every micro-batch.
    from trainer.loader import epoch_permutation

    epoch_permutation.cache_clear()
    d = PackedLoader(rows, seed=11)
    for _ in range(len(rows.inputs) // 2):
        d.next_batch(1)
    assert epoch_permutation.cache_info().misses == 1
