"""Data reading, loss masks and batching for lora_jax.train (no model involved)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lora_jax.train import (
    BatchLoader,
    DataError,
    Example,
    bucket_lengths,
    encode,
    eval_batches,
    read_chatterbot,
    read_records,
    split,
)
from lora_jax.train.tiny import texts_of, tiny_tokenizer

CHATS = [
    {"messages": [{"role": "user", "content": "What is AI?"},
                  {"role": "assistant", "content": "Machines that think."}]},
    {"messages": [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "Hello"},
                  {"role": "assistant", "content": "Hi there."},
                  {"role": "user", "content": "How are you?"},
                  {"role": "assistant", "content": "Fine, thanks."}]},
]


@pytest.fixture(scope="module")
def tokenizer():
    texts = texts_of(CHATS) + ["The quick brown fox jumps over the lazy dog."] * 3
    return tiny_tokenizer(texts, vocab_size=300)


def write(path, text: str | bytes):
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


# -- reading and its errors -------------------------------------------------------------------

def test_jsonl_reads_all_three_record_forms_with_sources(tmp_path):
    file = write(tmp_path / "d.jsonl", "\n".join([
        json.dumps({"text": "plain"}),
        "",
        json.dumps({"prompt": "2+2=", "response": "4"}),
        json.dumps(CHATS[0]),
    ]))
    records = read_records(file)
    assert [sorted(r) for r in records] == [["source", "text"], ["prompt", "response", "source"],
                                            ["messages", "source"]]
    assert [r["source"] for r in records] == [f"{file}:1", f"{file}:3", f"{file}:4"]


def test_missing_file_error_names_the_file(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: no such data file"):
        read_records(tmp_path / "nope.jsonl")


def test_empty_file_error_names_the_file(tmp_path):
    file = write(tmp_path / "empty.jsonl", "  \n")
    with pytest.raises(DataError, match=r"empty\.jsonl: the file is empty"):
        read_records(file)


def test_non_utf8_error_names_file_line_and_byte(tmp_path):
    file = write(tmp_path / "latin.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin\.jsonl:2: not valid UTF-8 \(byte 0xe9 at column 14\)"):
        read_records(file)


def test_malformed_json_error_names_file_and_line(tmp_path):
    file = write(tmp_path / "bad.jsonl", '{"text": "ok"}\n{"text": "unterminated}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid JSON"):
        read_records(file)


@pytest.mark.parametrize("line, message", [
    ('["a", "b"]', "expected a JSON object, found a list"),
    ('{"question": "x"}', "found keys \\['question'\\]"),
    ('{"prompt": "x"}', "must both be strings"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', "messages\\[0\\] must be"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "no assistant turn"),
])
def test_records_of_the_wrong_shape_say_what_is_expected(tmp_path, line, message):
    file = write(tmp_path / "d.jsonl", '{"text": "fine"}\n' + line + "\n")
    with pytest.raises(DataError, match=rf"d\.jsonl:2: .*{message}"):
        read_records(file)


def test_txt_file_is_one_text_record(tmp_path):
    file = write(tmp_path / "book.txt", "Line one.\nLine two.\n")
    assert read_records(file) == [{"text": "Line one.\nLine two.\n", "source": str(file)}]


def test_chatterbot_yaml_becomes_user_assistant_turns(tmp_path):
    file = write(tmp_path / "mini.yml", "categories:\n- mini\nconversations:\n"
                 "- - Hi\n  - Hello!\n- - One\n  - Two\n  - Three\n")
    records = read_chatterbot(file)
    assert records[0]["messages"] == [{"role": "user", "content": "Hi"},
                                      {"role": "assistant", "content": "Hello!"}]
    assert [m["role"] for m in records[1]["messages"]] == ["user", "assistant"]  # trailing user turn dropped
    assert records[1]["source"] == f"{file}:6" and records[0]["category"] == "mini"


def test_chatterbot_malformed_conversation_names_its_line(tmp_path):
    file = write(tmp_path / "bad.yml", "conversations:\n- - Hi\n  - Hello!\n- Not a list\n")
    with pytest.raises(DataError, match=r"bad\.yml:4: a conversation must be a list"):
        read_chatterbot(file)
    assert len(read_chatterbot(file, strict=False)) == 1


def test_packaged_chatterbot_corpus_reads_offline():
    records = read_chatterbot(strict=False)
    assert len(records) > 1900
    assert {"ai", "food", "sports"} <= {r["category"] for r in records}


# -- loss masks -------------------------------------------------------------------------------

def test_text_is_all_targets_and_ends_with_eos(tokenizer):
    (example,) = encode([{"text": "The quick brown fox."}], tokenizer, 64)
    assert example.loss_mask.all()
    assert example.input_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(example.input_ids[:-1]) == "The quick brown fox."


def test_prompt_response_masks_the_prompt(tokenizer):
    (example,) = encode([{"prompt": "The quick ", "response": "brown fox."}], tokenizer, 64)
    targets = example.input_ids[example.loss_mask]
    assert tokenizer.decode(targets[:-1]) == "brown fox."
    assert targets[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(example.input_ids[~example.loss_mask]) == "The quick "


def test_chat_mask_covers_exactly_the_assistant_turns(tokenizer):
    (example,) = encode([CHATS[1]], tokenizer, 256)
    full = tokenizer.apply_chat_template(CHATS[1]["messages"], tokenize=False)
    assert tokenizer.decode(example.input_ids) == full
    # The targets are the two assistant contents, each through its end-of-turn marker.
    spans, current = [], []
    for token, target in zip(example.input_ids, example.loss_mask):
        if target:
            current.append(int(token))
        elif current:
            spans.append(tokenizer.decode(current))
            current = []
    spans += [tokenizer.decode(current)] if current else []
    assert spans == ["Hi there.<|im_end|>\n", "Fine, thanks.<|im_end|>\n"]


def test_long_examples_are_cut_and_text_is_chunked(tokenizer):
    long_text = " ".join(["the quick brown fox"] * 40)
    examples = encode([{"text": long_text}], tokenizer, 16)
    assert len(examples) > 3 and all(len(e) <= 16 for e in examples)
    (chat,) = encode([CHATS[1]], tokenizer, 40)
    assert len(chat) == 40


def test_examples_without_targets_after_cutting_are_dropped(tokenizer):
    record = {"prompt": "the quick brown fox " * 20, "response": "dog"}
    assert encode([record], tokenizer, 8) == []


# -- splitting and batching ----------------------------------------------------------------------

def test_split_is_deterministic_and_disjoint():
    items = list(range(100))
    train_a, held_a = split(items, 0.1, seed=3)
    train_b, held_b = split(items, 0.1, seed=3)
    assert (train_a, held_a) == (train_b, held_b)
    assert len(held_a) == 10 and sorted(train_a + held_a) == items
    assert split(items, 0.1, seed=4)[1] != held_a


def make_examples(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [Example(rng.integers(3, 50, n).astype(np.int32), np.arange(n) >= n // 2)
            for n in lengths]


def test_batches_are_a_pure_function_of_the_step():
    examples = make_examples(np.random.default_rng(0).integers(4, 40, 50))
    a = BatchLoader(examples, batch_size=4, seq_len=32, seed=1, pad_id=0, grad_accum=2)
    b = BatchLoader(examples, batch_size=4, seq_len=32, seed=1, pad_id=0, grad_accum=2)
    for step in (0, 5, a.steps_per_epoch + 2, 3):
        for key in ("input_ids", "attention_mask", "loss_mask"):
            np.testing.assert_array_equal(a.batch(step)[key], b.batch(step)[key])
    assert a.batch(0)["input_ids"].shape[:2] == (2, 4)
    assert a.batch(0)["input_ids"].shape[2] in bucket_lengths(32)


def test_an_epoch_sees_every_example_once_without_packing():
    examples = make_examples(range(4, 31))
    loader = BatchLoader(examples, batch_size=4, seq_len=32, seed=0, pad_id=0)
    rows = []
    for step in range(loader.steps_per_epoch):
        batch = loader.batch(step)
        ids, mask = batch["input_ids"].reshape(-1, batch["input_ids"].shape[-1]), \
            batch["attention_mask"].reshape(-1, batch["input_ids"].shape[-1])
        rows += [tuple(r[m == 1]) for r, m in zip(ids, mask) if m.any()]
    assert sorted(rows) == sorted(tuple(e.input_ids) for e in examples)
    assert loader.position(loader.steps_per_epoch + 1).epoch == 1


def test_packing_fills_rows_and_masks_the_first_token_of_each_example():
    examples = make_examples([10] * 12)
    loader = BatchLoader(examples, batch_size=2, seq_len=32, seed=0, pad_id=0, packing=True)
    batch = loader.batch(0)
    assert batch["input_ids"].shape == (1, 2, 32)
    row_mask = batch["loss_mask"][0, 0]
    assert batch["attention_mask"][0, 0].sum() == 30  # three examples of 10
    assert not row_mask[0] and not row_mask[10] and not row_mask[20]
    # Within an example the targets are its second half.
    assert row_mask[5:10].all() and not row_mask[1:5].any()


def test_eval_batches_cover_all_examples_in_a_fixed_order():
    examples = make_examples([5, 30, 12, 7, 20])
    batches = eval_batches(examples, batch_size=2, seq_len=32, pad_id=0)
    total = sum(int(b["attention_mask"].sum()) for b in batches)
    assert total == 5 + 30 + 12 + 7 + 20
    assert [b["input_ids"].shape[-1] for b in batches] == [16, 32, 32]
