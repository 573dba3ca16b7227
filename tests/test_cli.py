"""The ``lora-jax`` command in process: finetune --tiny, generate, merge, export / import, info, errors."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from cli_helpers import chat_assets, one_line_error, run_cli

import lora_jax
from lora_jax import models
from lora_jax.cli import main
from lora_jax.train import Checkpoints


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny Hugging Face model directory and a JSONL chat file (150 conversations)."""
    return chat_assets(tmp_path_factory.mktemp("cli"), conversations=150)


@pytest.fixture(scope="module")
def finished_run(assets):
    """One tiny fine-tuning run through the CLI, shared by the tests that read its outputs."""
    output = assets["root"] / "run"
    code = main(["finetune", "--tiny", "--model", str(assets["model"]), "--data", str(assets["data"]),
                 "--output", str(output), "--steps", "12", "--lr", "2e-2", "--no-progress", "--samples", "1",
                 "--max-new-tokens", "6", "--save-every", "6"])
    assert code == 0
    return output


# -- finetune ---------------------------------------------------------------------------------

def test_finetune_writes_adapter_metrics_curve_and_summary(finished_run):
    names = {p.name for p in finished_run.iterdir()}
    assert {"adapter", "checkpoints", "metrics.jsonl", "loss_curve.png", "run.json", "summary.json"} <= names
    summary = json.loads((finished_run / "summary.json").read_text())
    assert summary["steps"] == 12
    assert summary["eval_after"]["perplexity"] < summary["eval_before"]["perplexity"]
    assert len(summary["samples"]) == 1 and {"prompt", "before", "after"} <= set(summary["samples"][0])
    peft_config = json.loads((finished_run / "adapter" / "adapter_config.json").read_text())
    assert peft_config["peft_type"] == "LORA" and peft_config["r"] == 4
    assert sorted(peft_config["target_modules"]) == ["q_proj", "v_proj"]
    records = [json.loads(line) for line in (finished_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 13))
    assert all(r["tokens_per_s"] is None or r["tokens_per_s"] > 0 for r in records if "loss" in r)


def test_peft_adapter_reproduces_the_trained_model(finished_run, assets):
    model = models.from_pretrained(assets["model"])
    loaded = lora_jax.load_peft(finished_run / "adapter", model.params)
    adapter, config = loaded.adapter, loaded.config
    state, _ = Checkpoints(finished_run / "checkpoints", read_only=True).restore_raw()
    for name, pair in state["trainable"]["adapter"].items():
        np.testing.assert_allclose(adapter[name]["lora_A"], pair["lora_A"], atol=1e-7)
        np.testing.assert_allclose(adapter[name]["lora_B"], pair["lora_B"], atol=1e-7)
    assert any(np.abs(pair["lora_B"]).max() > 0 for pair in adapter.values())
    assert config.r == 4


def test_generate_with_adapter_and_base(finished_run, capsys):
    code, out, _ = run_cli(capsys, "generate", "--adapter", finished_run / "adapter", "--compare",
                           "--max-new-tokens", "5", "What is AI?")
    assert code == 0
    assert "> What is AI?" in out and "[base]" in out and "[adapter]" in out


def test_merge_writes_a_checkpoint_that_transformers_loads(finished_run, assets, tmp_path, capsys):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    code, out, _ = run_cli(capsys, "merge", "--adapter", finished_run / "adapter", "--output", tmp_path / "merged")
    assert code == 0 and "Merged 4 LoRA modules" in out
    base = models.from_pretrained(assets["model"])
    loaded = lora_jax.load_peft(finished_run / "adapter", base.params)
    adapter, config = loaded.adapter, loaded.config
    ids = np.array([[5, 17, 42, 7, 99, 3]], np.int32)
    expected = lora_jax.lora(base.module.apply, config)({"params": base.params}, adapter, ids)
    torch_model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        got = torch_model(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(got, np.asarray(expected), atol=2e-4)


def test_export_then_import_round_trips_the_adapter(finished_run, assets, tmp_path, capsys):
    code, out, _ = run_cli(capsys, "export", finished_run, "--step", "6", "--output", tmp_path / "peft6")
    assert code == 0 and "(step 6)" in out
    code, out, _ = run_cli(capsys, "import", tmp_path / "peft6", "--output", tmp_path / "imported")
    assert code == 0 and "4 LoRA modules fit" in out
    code, out, _ = run_cli(capsys, "export", tmp_path / "imported", "--output", tmp_path / "again")
    assert code == 0
    params = models.from_pretrained(assets["model"]).params
    first = lora_jax.load_peft(tmp_path / "peft6", params).adapter
    second = lora_jax.load_peft(tmp_path / "again", params).adapter
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second)):
        np.testing.assert_array_equal(a, b)


def test_info_lists_targeted_modules_and_trainable_share(assets, capsys):
    code, out, _ = run_cli(capsys, "info", "--model", assets["model"], "--target-modules", "all-linear", "-r", "4")
    assert code == 0
    assert "model.layers.{0,1}.self_attn.q_proj" in out and "mlp.down_proj" in out
    assert "lm_head" not in out.split("->", 1)[1]  # all-linear leaves the (tied) output head out
    assert "trainable params:" in out and "trainable%" in out


# -- bad input: one clear line each -------------------------------------------------------------

def test_missing_data_file_names_it(tmp_path, assets, capsys):
    code, _, err = run_cli(capsys, "finetune", "--model", assets["model"], "--data", tmp_path / "nope.jsonl",
                           "--output", tmp_path / "out")
    assert code == 2 and "nope.jsonl: no such data file" in one_line_error(err)


@pytest.mark.parametrize("content, expected", [
    (b"", "the file is empty"),
    (b'{"text": "fine"}\n{"text": "\xff"}\n', ":2: not valid UTF-8"),
    (b'{"text": "fine"}\n{"text": \n', ":2: not valid JSON"),
    (b'{"text": "fine"}\n{"txt": "typo"}\n', ":2: expected \"text\""),
])
def test_bad_data_file_names_file_and_line(tmp_path, assets, capsys, content, expected):
    data = tmp_path / "data.jsonl"
    data.write_bytes(content)
    code, _, err = run_cli(capsys, "finetune", "--model", assets["model"], "--data", data,
                           "--output", tmp_path / "out")
    line = one_line_error(err)
    assert code == 2 and "data.jsonl" in line and expected in line


def test_model_path_that_is_not_a_model_says_what_was_expected(tmp_path, assets, capsys):
    (tmp_path / "notamodel").mkdir()
    (tmp_path / "notamodel" / "readme.txt").write_text("hi")
    code, _, err = run_cli(capsys, "finetune", "--model", tmp_path / "notamodel", "--data", assets["data"],
                           "--output", tmp_path / "out")
    line = one_line_error(err)
    assert code == 2 and "notamodel" in line and "config.json" in line and ".gguf" in line


def test_existing_output_needs_overwrite(tmp_path, assets, capsys):
    output = tmp_path / "out"
    output.mkdir()
    (output / "notes.txt").write_text("mine")
    code, _, err = run_cli(capsys, "finetune", "--tiny", "--model", assets["model"], "--data", assets["data"],
                           "--output", output)
    assert code == 2 and "--overwrite" in one_line_error(err)
    assert (output / "notes.txt").read_text() == "mine"


def test_resume_with_a_different_setting_names_it(finished_run, capsys):
    code, _, err = run_cli(capsys, "finetune", "--output", finished_run, "--resume", "--lr", "0.5")
    line = one_line_error(err)
    assert code == 2 and "lr: run 0.02, now 0.5" in line


def test_adapter_that_is_not_an_adapter(tmp_path, assets, capsys):
    code, _, err = run_cli(capsys, "generate", "--model", assets["model"], "--adapter", tmp_path, "hi")
    assert code == 2 and "not an adapter directory" in one_line_error(err)


def test_finetune_can_start_from_an_existing_adapter(finished_run, assets, tmp_path, capsys):
    code, _, err = run_cli(capsys, "finetune", "--tiny", "--model", assets["model"], "--data", assets["data"],
                           "--output", tmp_path / "more", "--init-adapter", finished_run / "adapter",
                           "--steps", "2", "--no-progress", "--samples", "0")
    assert code == 0, err
    summary = json.loads((tmp_path / "more" / "summary.json").read_text())
    first = json.loads((finished_run / "summary.json").read_text())
    # It starts where the first run ended, not from a fresh adapter.
    np.testing.assert_allclose(summary["eval_before"]["loss"], first["eval_after"]["loss"], rtol=1e-4)


def test_the_python_api_trains_the_same_adapter_as_the_command(finished_run, assets, tmp_path):
    from lora_jax.train import FinetuneSettings, finetune

    result = finetune(FinetuneSettings(tiny=True, model=assets["model"], data=[assets["data"]], output=tmp_path / "run",
                                       steps=12, lr=2e-2, progress=False, samples=1, max_new_tokens=6, save_every=6),
                      log=lambda message: None)
    assert result.step == 12 and not result.interrupted
    assert json.loads((tmp_path / "run" / "run.json").read_text()) == json.loads((finished_run / "run.json").read_text())
    from safetensors.numpy import load_file

    got = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    expected = load_file(str(finished_run / "adapter" / "adapter_model.safetensors"))
    assert sorted(got) == sorted(expected)
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
