"""Data through Hugging Face ``datasets``: every kind of source reads the same records, offline only."""

from __future__ import annotations

import json
import socket

import datasets
import numpy as np
import pytest

from lora_jax.train import DataError, load_records
from lora_jax.train.records import DataFields, RecordStream, held_out

ROWS = [{"prompt": f"{i} + 1 =", "response": f" {i + 1}"} for i in range(23)]
# Cells a CSV reader likes to turn into numbers, dates or missing values: they must stay text.
TRICKY = [{"prompt": "007", "response": " 5"}, {"prompt": "NA", "response": "null"},
          {"prompt": "2024-01-02", "response": "1e3"}, {"prompt": "a, \"quoted\"\nline", "response": "True"}]


def strip_sources(records):
    return [{k: v for k, v in r.items() if k != "source"} for r in records]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The same rows as JSONL, Parquet, CSV and `save_to_disk` (Dataset and DatasetDict)."""
    root = tmp_path_factory.mktemp("sources")
    rows = ROWS + TRICKY
    (root / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    dataset = datasets.Dataset.from_list(rows)
    dataset.to_parquet(str(root / "d.parquet"))
    dataset.to_csv(str(root / "d.csv"), index=False)
    dataset.save_to_disk(str(root / "saved"))
    datasets.DatasetDict({"train": dataset, "test": dataset.select(range(3))}).save_to_disk(str(root / "dict"))
    return root


@pytest.mark.parametrize("name", ["d.jsonl", "d.parquet", "d.csv", "saved", "dict"])
def test_every_kind_of_source_reads_the_same_records(files, name):
    records = load_records([files / name])
    assert strip_sources(records) == ROWS + TRICKY  # the reference: the rows as written
    assert all(str(files / name) in r["source"] for r in records)


def test_a_json_file_holding_one_array_reads_the_same_records(files, tmp_path):
    datasets.Dataset.from_list(ROWS).to_json(str(tmp_path / "array.json"), lines=False)
    records = load_records([tmp_path / "array.json"])
    assert strip_sources(records) == ROWS and records[2]["source"] == f"{tmp_path / 'array.json'} item 3"
    (tmp_path / "bad.json").write_text('[{"text": "a"},\n {"text": }]')
    with pytest.raises(DataError, match=r"bad\.json:2: not valid JSON"):
        load_records([tmp_path / "bad.json"])
    (tmp_path / "odd.json").write_text('[{"text": "a"}, 5]')
    with pytest.raises(DataError, match=r"odd\.json item 2: expected a JSON object, found a int"):
        load_records([tmp_path / "odd.json"])


def test_csv_and_parquet_records_name_their_row(files):
    assert load_records([files / "d.csv"])[4]["source"] == f"{files / 'd.csv'} row 5"
    assert load_records([files / "d.parquet"])[0]["source"] == f"{files / 'd.parquet'} row 1"


def test_a_dataset_dict_takes_the_split_asked_for(files):
    assert len(load_records([files / "dict"], split="test")) == 3
    with pytest.raises(DataError, match=r"dict: no split 'validation'; it has \['train', 'test'\] \(choose one with --split\)"):
        load_records([files / "dict"], split="validation")


def test_a_dataset_dict_without_train_needs_a_split(tmp_path):
    small = datasets.Dataset.from_list(ROWS[:2])
    datasets.DatasetDict({"a": small, "b": small}).save_to_disk(str(tmp_path / "two"))
    with pytest.raises(DataError, match=r"no 'train' split; it has \['a', 'b'\]"):
        load_records([tmp_path / "two"])
    datasets.DatasetDict({"only": small}).save_to_disk(str(tmp_path / "one"))
    assert len(load_records([tmp_path / "one"])) == 2  # a single split needs no name


def test_a_directory_of_parquet_and_csv_files_reads_them_in_order(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    datasets.Dataset.from_list(ROWS[:10]).to_parquet(str(folder / "a.parquet"))
    datasets.Dataset.from_list(ROWS[10:]).to_csv(str(folder / "b.csv"), index=False)
    assert strip_sources(load_records([folder])) == ROWS


def test_python_datasets_and_iterables_are_sources(files):
    dataset = datasets.Dataset.from_list(ROWS)
    expected = ROWS
    assert strip_sources(load_records(dataset)) == expected
    assert strip_sources(load_records(dataset.to_iterable_dataset())) == expected
    assert strip_sources(load_records(datasets.DatasetDict({"train": dataset}))) == expected
    assert strip_sources(load_records(list(ROWS))) == expected
    assert strip_sources(load_records(r for r in ROWS)) == expected  # a generator, read once
    assert strip_sources(load_records([dataset, files / "d.jsonl"])) == expected + ROWS + TRICKY


def test_map_style_columns_are_found_by_the_field_names():
    raw = datasets.Dataset.from_dict({"q": ["What is 2+2?", "Capital of France?"], "a": ["4", "Paris"]})
    mapped = raw.map(lambda row: {"question": f"Q: {row['q']}", "answer": f" A: {row['a']}"})  # added columns
    records = load_records(mapped, fields=DataFields(prompt="question", response="answer"))
    assert strip_sources(records) == [{"prompt": "Q: What is 2+2?", "response": " A: 4"},
                                      {"prompt": "Q: Capital of France?", "response": " A: Paris"}]
    texts = load_records(mapped, fields=DataFields(text="q"))
    assert [r["text"] for r in texts] == ["What is 2+2?", "Capital of France?"]
    chats = datasets.Dataset.from_dict({"conversation": [[{"role": "user", "content": "hi"},
                                                          {"role": "assistant", "content": "hello"}]]})
    (chat,) = load_records(chats, fields=DataFields(messages="conversation"))
    assert chat["messages"][1] == {"role": "assistant", "content": "hello"}


def test_a_missing_column_names_the_column_the_flag_and_the_row():
    dataset = datasets.Dataset.from_dict({"q": ["x"], "a": ["y"]})
    with pytest.raises(DataError, match=r"dataset row 1: no 'question' column \(--prompt-field\); found \['a', 'q'\]"):
        load_records(dataset, fields=DataFields(prompt="question", response="a"))


def test_field_flags_that_do_not_make_one_form_are_refused():
    with pytest.raises(DataError, match="go together; got only --response-field"):
        DataFields(response="a")
    with pytest.raises(DataError, match="Choose one form of record"):
        DataFields(text="t", messages="m")


def test_field_names_apply_to_jsonl_too(tmp_path):
    file = tmp_path / "qa.jsonl"
    file.write_text(json.dumps({"question": "2+2?", "answer": "4"}) + "\n")
    (record,) = load_records([file], fields=DataFields(prompt="question", response="answer"))
    assert record == {"prompt": "2+2?", "response": "4", "source": f"{file}:1"}


def test_columns_missing_in_some_rows_of_a_table_mean_absent():
    # A table gives every row every column: None in "prompt" means this row is plain text.
    mixed = datasets.Dataset.from_list([{"text": "plain", "prompt": None, "response": None},
                                        {"text": None, "prompt": "Q", "response": "A"}])
    assert strip_sources(load_records(mixed)) == [{"text": "plain"}, {"prompt": "Q", "response": "A"}]


# -- bad files: one error naming the file (and line or row) ----------------------------------------

def test_a_broken_parquet_file_is_named(tmp_path):
    file = tmp_path / "broken.parquet"
    file.write_bytes(b"PAR1 this is not parquet at all")
    with pytest.raises(DataError, match=r"broken\.parquet: not a readable Parquet file"):
        load_records([file])


def test_a_csv_with_a_ragged_line_is_named(tmp_path):
    file = tmp_path / "ragged.csv"
    file.write_text("prompt,response\na,b\nc,d,e,f\n")
    with pytest.raises(DataError, match=r"ragged\.csv: not a readable CSV file .*line 3"):
        load_records([file])


def test_a_csv_row_with_an_empty_required_cell_names_its_row(tmp_path):
    file = tmp_path / "cols.csv"
    file.write_text("question,answer\nQ1,A1\n")
    with pytest.raises(DataError, match=r"cols\.csv row 1: expected \"text\""):
        load_records([file])


def test_a_saved_dataset_directory_that_is_damaged_is_named(files, tmp_path):
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(files / "saved", damaged)
    for arrow in damaged.glob("*.arrow"):
        arrow.write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"damaged: cannot read the dataset written by `save_to_disk`"):
        load_records([damaged])


# -- offline: a Hub name without a local copy is an error, never a download ------------------------

def test_a_hub_name_without_a_local_copy_is_a_clear_error_and_touches_no_network(monkeypatch, tmp_path):
    attempts = []

    def refuse(self, address):
        attempts.append(address)
        raise OSError("network access attempted in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", lambda address, *a, **k: refuse(None, address))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DataError, match=r"someone/no-such-dataset: no such data file or directory, and no local copy "
                                        r"of a Hugging Face Hub dataset .* never downloads"):
        load_records(["someone/no-such-dataset"])
    assert attempts == []


def test_a_missing_file_with_a_data_suffix_is_not_taken_for_a_hub_name(tmp_path):
    with pytest.raises(DataError, match=r"train\.parquet: no such data file"):
        load_records(["train.parquet"])


# -- streaming reads: the same records, from any index -----------------------------------------------

@pytest.mark.parametrize("name", ["d.jsonl", "d.parquet", "d.csv", "saved"])
def test_a_stream_reads_the_same_records_from_any_index(files, name):
    everything = load_records([files / name])
    stream = RecordStream([files / name, files / name])
    assert stream.count() == 2 * len(everything)
    for start in (0, 3, len(everything) - 1, len(everything) + 2, 2 * len(everything)):
        assert list(stream.records(start)) == (everything * 2)[start:]


def test_held_out_records_are_chosen_one_by_one_from_the_seed():
    indices = np.arange(50_000)
    mask = held_out(indices, 0.1, seed=3)
    assert abs(mask.mean() - 0.1) < 0.01
    shuffled = np.random.default_rng(0).permutation(indices)
    np.testing.assert_array_equal(held_out(shuffled, 0.1, seed=3), mask[shuffled])  # per index, any order
    assert (held_out(indices, 0.1, seed=4) != mask).any()
    assert not held_out(indices, 0.0, seed=3).any()
