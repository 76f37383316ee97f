"""Chat and preference data: reading and checking records, ChatML ids as the server renders
them, assistant masks, and packing (document ids, restarting positions, skipped-not-cut)."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import msgspec
import numpy as np
import pytest

from atlas_server.api.schemas import ChatMessage
from atlas_server.chat_template import ChatTemplate
from atlas_server.tokenizer import IM_END, train_from_texts
from atlas_server.tokenizer.corpus import stdlib_sample
from atlas_server.tokenizer.train import TrainConfig
from trainer.chat_data import (
    IGNORE,
    ChatDataError,
    ChatMLRenderer,
    Conversation,
    TokenizedChat,
    pack_conversations,
    read_conversations,
    read_preferences,
    read_records,
    tokenize_conversation,
    tokenize_pair,
)

CONVERSATIONS = [
    [
        {"role": "system", "content": "You answer questions about Python."},
        {"role": "user", "content": "What does json.dumps do?"},
        {"role": "assistant", "content": "Serialize obj to a JSON formatted str."},
    ],
    [
        {"role": "user", "content": "Hi <|im_end|> there"},  # typed special-token text
        {"role": "assistant", "content": "Hello."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "And "}, {"type": "text", "text": "you?"}],
        },
        {"role": "assistant", "content": "\n\n  indented answer, ünïcödé ✓"},
    ],
    [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}],
]


@pytest.fixture(scope="module")
def bpe_tokenizer():
    texts = list(stdlib_sample(100_000, docstring_share=0.5))
    return train_from_texts(
        texts + ["\n\n\n  \n\n"] * 50, TrainConfig(vocab_size=400), progress=False
    )


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def server_ids(tokenizer, messages) -> list[int]:
    # What /v1/chat/completions does: the wire schema, then the server's chat template.
    wire = [msgspec.to_builtins(msgspec.convert(m, ChatMessage)) for m in messages]
    return ChatTemplate.chatml(tokenizer).prompt_ids(wire, add_generation_prompt=False)


def text_of(messages) -> list[dict]:
    """Messages as the reader normalises them (text parts joined)."""
    return [
        {"role": m["role"], "content": m["content"]}
        if isinstance(m["content"], str)
        else {"role": m["role"], "content": "".join(p["text"] for p in m["content"])}
        for m in messages
    ]


@pytest.mark.parametrize("which", ["byte", "bpe"])
def test_chatml_ids_equal_what_the_chat_endpoint_renders(which, byte_tokenizer, bpe_tokenizer):
    tokenizer = byte_tokenizer if which == "byte" else bpe_tokenizer
    renderer = ChatMLRenderer(tokenizer)
    for messages in CONVERSATIONS:
        ids, mask = renderer(text_of(messages))
        assert ids == server_ids(tokenizer, messages)
        assert len(mask) == len(ids)


def test_the_mask_covers_each_assistant_answer_and_its_end_token(byte_tokenizer, bpe_tokenizer):
    for tokenizer in (byte_tokenizer, bpe_tokenizer):
        renderer = ChatMLRenderer(tokenizer)
        for messages in CONVERSATIONS:
            ids, mask = renderer(text_of(messages))
            trained = [t for t, m in zip(ids, mask, strict=True) if m]
            answers = [m["content"] for m in messages if m["role"] == "assistant"]
            decoded = tokenizer.decode(trained)
            # Every answer and its <|im_end|>, in order, and nothing else.
            pattern = "".join(re.escape(a + IM_END) for a in answers)
            assert re.fullmatch(pattern, decoded), (decoded, answers)


def test_an_answer_that_starts_with_newlines_is_trained_on_whole(bpe_tokenizer):
    # The template is encoded in pieces cut at the generation prompt, so the newlines that
    # start an answer are tokens of the answer, not merged into the role header.
    renderer = ChatMLRenderer(bpe_tokenizer)
    ids, mask = renderer([{"role": "assistant", "content": "\n\n  x"}])
    trained = bpe_tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if m])
    assert trained == "\n\n  x" + IM_END
    assert any(b"\n\n" in bpe_tokenizer.token_bytes(t) for t, m in zip(ids, mask, strict=True) if m)


def test_conversations_are_read_with_weights(tmp_path):
    path = write_jsonl(
        tmp_path / "chat.jsonl",
        [
            {"messages": CONVERSATIONS[0], "id": "extra top-level keys are fine"},
            "",
            {
                "messages": [
                    {"role": "user", "content": "q1"},
                    {"role": "assistant", "content": "context only", "weight": 0},
                    {"role": "user", "content": "q2"},
                    {"role": "assistant", "content": "learn this"},
                ]
            },
        ],
    )
    convs = read_conversations([str(path)])
    assert [c.origin for c in convs] == [f"{path}:1", f"{path}:3"]
    assert convs[1].trained == (False, False, False, True)


def test_trained_mask_skips_assistant_messages_of_weight_zero(byte_tokenizer):
    conv = Conversation(
        (
            {"role": "user", "content": "q1"},
            {"role": "assistant", "content": "AAA"},
            {"role": "user", "content": "q2"},
            {"role": "assistant", "content": "BBB"},
        ),
        (False, False, False, True),
        "x:1",
    )
    ex = tokenize_conversation(conv, ChatMLRenderer(byte_tokenizer))
    assert byte_tokenizer.decode(ex.ids[ex.mask].tolist()) == "BBB" + IM_END


def test_every_bad_record_is_named_with_its_line_and_problem(tmp_path):
    good = {"messages": CONVERSATIONS[0]}
    path = write_jsonl(
        tmp_path / "bad.jsonl",
        [
            good,
            "{not json",
            {"messages": [{"role": "bot", "content": "x"}]},
            {"messages": [{"role": "user", "content": "only a question"}]},
            {"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]},
            {"messages": [{"role": "user", "content": "q", "weight": 1}]},
            {"messages": [{"role": "assistant", "content": "a", "tool_calls": []}]},
            {"conversation": []},
            good,
        ],
    )
    with path.open("ab") as f:
        f.write(b'{"messages": "\xff\xfe"}\n')
    with pytest.raises(ChatDataError) as info:
        read_conversations([str(path)])
    message = str(info.value)
    assert message.startswith("8 bad record(s): ")
    assert f"{path}:2: not valid JSON" in message
    assert f"{path}:3: messages[0].role is 'bot'" in message
    assert f"{path}:4: no assistant message with weight 1" in message
    assert f"{path}:5: messages[0].content must be a string" in message
    assert f"{path}:6: messages[0].weight must be 0 or 1" in message
    assert "(and 3 more)" in message
    with pytest.raises(ChatDataError, match=rf"{path}:10: not valid UTF-8"):
        read_records([str(path)], lambda record, origin: record)


def test_preference_records_in_every_accepted_shape(tmp_path):
    assistant = lambda text: {"role": "assistant", "content": text}  # noqa: E731
    path = write_jsonl(
        tmp_path / "prefs.jsonl",
        [
            {
                "prompt": "What does abs do?",
                "chosen": "Return the absolute value.",
                "rejected": "No.",
            },
            {
                "messages": [{"role": "user", "content": "q"}],
                "chosen": assistant("good"),
                "rejected": [assistant("bad")],
            },
            {"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b"},
        ],
    )
    pairs = read_preferences([str(path)])
    assert pairs[0].prompt == ({"role": "user", "content": "What does abs do?"},)
    assert (pairs[1].chosen, pairs[1].rejected) == ("good", "bad")
    assert pairs[2].prompt == ({"role": "user", "content": "q"},)


@pytest.mark.parametrize(
    "record,problem",
    [
        ({"prompt": "q", "messages": [], "chosen": "a", "rejected": "b"}, "exactly one of"),
        ({"prompt": "q", "chosen": "a"}, 'missing "rejected"'),
        ({"prompt": "q", "chosen": "same", "rejected": "same"}, "same text"),
        (
            {"prompt": "q", "chosen": {"role": "user", "content": "a"}, "rejected": "b"},
            "must be an assistant",
        ),
        ({"prompt": "q", "chosen": ["a", "b"], "rejected": "b"}, "exactly one assistant message"),
        ({"prompt": "", "chosen": "a", "rejected": "b"}, "prompt is empty"),
    ],
)
def test_bad_preference_records_are_refused(tmp_path, record, problem):
    path = write_jsonl(tmp_path / "p.jsonl", [record])
    with pytest.raises(ChatDataError, match=problem) as info:
        read_preferences([str(path)])
    assert f"{path}:1: " in str(info.value)


def test_a_local_hugging_face_dataset_and_parquet_are_read(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "ds"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"messages": c} for c in CONVERSATIONS[:1] * 3])
    convs = read_conversations([f"hf:{folder}"])
    assert len(convs) == 3 and convs[2].origin == f"hf:{folder} row 3"
    table = pa.Table.from_pylist(
        [
            {"prompt": "q", "chosen": "a", "rejected": "b"},
            {"prompt": "q", "chosen": "a", "rejected": "a"},
        ]
    )
    pq.write_table(table, tmp_path / "prefs.parquet")
    with pytest.raises(ChatDataError, match=r"prefs.parquet row 2: chosen and rejected"):
        read_preferences([str(tmp_path)])  # a folder: its .jsonl and .parquet files


def test_non_data_files_are_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ChatDataError, match="notes.txt: chat and preference data are .jsonl"):
        read_conversations([str(tmp_path / "notes.txt")])
    with pytest.raises(ChatDataError, match="holds no .jsonl or .parquet"):
        read_conversations([str(tmp_path)])


def test_the_pair_mask_covers_only_the_final_response(byte_tokenizer):
    from trainer.chat_data import PreferencePair

    pair = PreferencePair(
        (
            {"role": "user", "content": "q1"},
            {"role": "assistant", "content": "earlier answer"},
            {"role": "user", "content": "q2"},
        ),
        "right",
        "wrong",
        "x:1",
    )
    ex = tokenize_pair(pair, ChatMLRenderer(byte_tokenizer))
    assert byte_tokenizer.decode(ex.chosen_ids[ex.chosen_mask].tolist()) == "right" + IM_END
    assert byte_tokenizer.decode(ex.rejected_ids[ex.rejected_mask].tolist()) == "wrong" + IM_END
    # Both sequences share the prompt's ids up to the response.
    n = int(np.argmax(ex.chosen_mask))
    assert ex.chosen_ids[:n].tolist() == ex.rejected_ids[:n].tolist()


# --- packing --------------------------------------------------------------------------------
def example(length: int, first: int, origin: str = "x") -> TokenizedChat:
    ids = np.arange(first, first + length, dtype=np.int64)
    mask = np.zeros(length, dtype=bool)
    mask[length // 2 :] = True
    return TokenizedChat(ids, mask, origin)


def test_packing_keeps_conversations_whole_with_their_own_positions_and_documents(caplog):
    examples = [
        example(6, 100),
        example(9, 200),
        example(4, 300),
        example(30, 400, "long:7"),
        example(3, 500),
    ]
    with caplog.at_level(logging.WARNING):
        rows, stats = pack_conversations(examples, seq_len=10, pad_id=0)
    # First fit: row 0 takes 5 + 3 (+2), row 1 takes 8; the 29-position one is skipped.
    assert rows.examples == [[0, 2, 4], [1]]
    assert stats.skipped_too_long == 1 and stats.skipped == ["long:7 (30 tokens)"]
    assert "skipped 1 of 5 conversations longer than seq_len + 1 = 11 tokens" in caplog.text
    assert rows.doc_ids[0].tolist() == [1] * 5 + [2] * 3 + [3] * 2
    assert rows.positions[0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 0, 1]
    assert rows.inputs[0].tolist() == [100, 101, 102, 103, 104, 300, 301, 302, 500, 501]
    assert rows.doc_ids[1].tolist() == [1] * 8 + [0] * 2  # padding is its own document
    assert rows.positions[1, 8:].tolist() == [0, 1] and rows.inputs[1, 8:].tolist() == [0, 0]
    # Labels are the next token where it is trained on, and never cross a conversation.
    assert rows.labels[0].tolist() == [IGNORE, IGNORE, 103, 104, 105, IGNORE, 302, 303, 501, 502]
    assert (rows.labels[1, 8:] == IGNORE).all()
    assert stats.tokens == 18 and stats.trained_tokens == int((rows.labels != IGNORE).sum())
    assert stats.fill == pytest.approx(18 / 20)


def test_packing_the_same_input_twice_gives_the_same_rows():
    examples = [example(n, 10 * n) for n in (5, 7, 3, 8, 2, 6, 4)]
    a, _ = pack_conversations(examples, 12, 0)
    b, _ = pack_conversations(examples, 12, 0)
    assert (
        a.examples == b.examples and (a.inputs == b.inputs).all() and (a.labels == b.labels).all()
    )
