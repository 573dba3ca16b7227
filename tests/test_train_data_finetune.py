"""The same tiny run from JSONL, Parquet, CSV, a saved ``datasets`` dataset and mapped columns: the same adapter."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
from safetensors.numpy import load_file

from lora_jax.cli import main
from lora_jax.train import FinetuneSettings, finetune, read_chatterbot
from lora_jax.train.tiny import save_tiny, texts_of, tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Question/answer pairs (quotes, commas and all) in every format, and a tiny model that knows their words."""
    root = tmp_path_factory.mktemp("data-runs")
    chats = read_chatterbot(strict=False)[::11][:120]
    rows = [{"prompt": c["messages"][0]["content"], "response": c["messages"][1]["content"]} for c in chats]
    tokenizer = tiny_tokenizer(texts_of(chats), vocab_size=320)
    model = save_tiny(root / "model", tiny_model(len(tokenizer), hidden_size=32), tokenizer)
    (root / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = datasets.Dataset.from_list(rows)
    table.to_parquet(str(root / "qa.parquet"))
    table.to_csv(str(root / "qa.csv"), index=False)
    table.save_to_disk(str(root / "qa-saved"))
    # The columns under other names, and a `.map` that builds the ones to train on.
    renamed = table.rename_columns({"prompt": "q", "response": "a"})
    renamed.map(lambda row: {"question": row["q"], "answer": row["a"], "n": len(row["a"])}).save_to_disk(
        str(root / "qa-mapped"))
    return {"root": root, "model": model, "rows": rows}


def run(assets, name, *extra):
    output = assets["root"] / f"run-{name}"
    code = main(["finetune", "--tiny", "--model", str(assets["model"]), "--data", str(assets["root"] / name),
                 "--output", str(output), "--steps", "4", "--lr", "2e-2", "--no-progress", "--samples", "0",
                 "--eval-every", "0", *map(str, extra)])
    assert code == 0
    return load_file(str(output / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def from_jsonl(assets):
    return run(assets, "qa.jsonl")


@pytest.mark.parametrize("name, extra", [
    ("qa.parquet", ()), ("qa.csv", ()), ("qa-saved", ()),
    ("qa-mapped", ("--prompt-field", "question", "--response-field", "answer")),
])
def test_every_format_trains_the_bitwise_same_adapter_as_jsonl(assets, from_jsonl, name, extra):
    got = run(assets, name, *extra)
    assert sorted(got) == sorted(from_jsonl)
    assert any(np.abs(v).max() > 0 for k, v in got.items() if "lora_B" in k)  # it trained
    for key in from_jsonl:
        np.testing.assert_array_equal(got[key], from_jsonl[key], err_msg=f"{name}: {key}")


def test_a_python_dataset_object_trains_the_same_adapter(assets, from_jsonl, tmp_path):
    dataset = datasets.Dataset.from_list(assets["rows"])
    result = finetune(FinetuneSettings(tiny=True, model=assets["model"], data=dataset, output=tmp_path / "run",
                                       steps=4, lr=2e-2, progress=False, samples=0, eval_every=0),
                      log=lambda message: None)
    got = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    for key in from_jsonl:
        np.testing.assert_array_equal(got[key], from_jsonl[key], err_msg=key)
    run_json = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run_json["data"] == ["datasets.Dataset (120 rows: prompt, response)"]


def test_the_field_flags_are_recorded_and_a_resume_must_keep_them(assets, capsys):
    output = assets["root"] / "run-qa-mapped"
    run_json = json.loads((output / "run.json").read_text())
    assert (run_json["prompt_field"], run_json["response_field"]) == ("question", "answer")
    assert "text_field" not in run_json  # unset data settings stay out, as in older runs' run.json
    code = main(["finetune", "--output", str(output), "--resume", "--prompt-field", "q", "--response-field", "a"])
    err = capsys.readouterr().err
    assert code == 2 and 'prompt_field: run "question", now "q"' in err, err


def test_a_missing_column_is_refused_before_anything_is_written(assets, tmp_path, capsys):
    code = main(["finetune", "--tiny", "--model", str(assets["model"]), "--data", str(assets["root"] / "qa-mapped"),
                 "--output", str(tmp_path / "out"), "--prompt-field", "question", "--response-field", "reply"])
    err = capsys.readouterr().err
    assert code == 2 and "qa-mapped row 1: no 'reply' column (--response-field)" in err, err
    assert not (tmp_path / "out").exists()
