"""``lora-jax finetune --quantize``: a QLoRA run end to end (recorded, resumable, its adapter's model card
notes the base), the flags refused before anything is written, ``info`` bytes before/after, and
``merge --quantize`` merging into the weights the adapter was trained on."""

from __future__ import annotations

import json

import numpy as np
import pytest
from cli_helpers import chat_assets, one_line_error, run_cli

import lora_jax
from lora_jax import models
from lora_jax.cli import main
from lora_jax.quantize import QuantConfig, quantize, quantized_bytes
from lora_jax.train import FinetuneSettings, finetune
from lora_jax.train.tiny import save_tiny


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny Hugging Face model directory and a JSONL chat file."""
    return chat_assets(tmp_path_factory.mktemp("qlora_cli"), hidden_size=64)


FLAGS = ("--steps", "8", "--lr", "2e-2", "--no-progress", "--samples", "0", "--save-every", "4",
         "--max-eval", "8")


@pytest.fixture(scope="module")
def qlora_run(assets):
    output = assets["root"] / "qlora"
    code = main(["finetune", "--tiny", "--model", str(assets["model"]), "--data", str(assets["data"]),
                 "--output", str(output), "--quantize", "nf4", "--double-quant", "--target-modules", "all-linear",
                 *FLAGS])
    assert code == 0
    return output


def test_qlora_finetune_records_the_scheme_turns_remat_on_and_notes_it_in_the_card(qlora_run, assets):
    run = json.loads((qlora_run / "run.json").read_text())
    assert run["quantize"] == "nf4" and run["double_quant"] is True and run["remat"] == "full"
    summary = json.loads((qlora_run / "summary.json").read_text())
    assert summary["eval_after"]["loss"] < summary["eval_before"]["loss"]
    card = (qlora_run / "adapter" / "README.md").read_text()
    assert "Trained on a quantized base (QLoRA): NF4 (bitsandbytes format, blocks of 64, double quantization)" in card
    peft_config = json.loads((qlora_run / "adapter" / "adapter_config.json").read_text())
    assert peft_config["base_model_name_or_path"] == str(assets["model"])
    # The adapter is a plain LoRA adapter: it loads on the float base as well.
    base = models.from_pretrained(assets["model"])
    assert len(lora_jax.load_peft(qlora_run / "adapter", base.params).adapter) == 14


def test_an_unquantized_run_json_keeps_its_old_keys(tmp_path):
    record = FinetuneSettings(tiny=True).resolved().record()
    assert "quantize" not in record and "double_quant" not in record and record["remat"] == "full"


def test_resume_refuses_another_quantization(qlora_run, capsys):
    code, _, err = run_cli(capsys, "finetune", "--output", qlora_run, "--resume", "--quantize", "int8")
    line = one_line_error(err)
    assert code == 2 and 'quantize: run "nf4", now "int8"' in line
    code, _, err = run_cli(capsys, "finetune", "--output", qlora_run, "--resume", "--double-quant")
    assert code == 0  # the same settings: nothing left to do but finish


def test_merge_quantize_merges_into_the_trained_weights(qlora_run, assets, tmp_path, capsys):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    code, out, _ = run_cli(capsys, "merge", "--adapter", qlora_run / "adapter", "--output", tmp_path / "merged",
                           "--quantize", "nf4", "--double-quant")
    assert code == 0 and "Merged 14 LoRA modules" in out
    base = models.from_pretrained(assets["model"], quantize=QuantConfig("nf4", double_quant=True))
    adapter, config = lora_jax.load_peft(qlora_run / "adapter", base.params)
    ids = np.array([[5, 17, 42, 7, 99, 3]], np.int32)
    expected = lora_jax.lora(base.module.apply, config)({"params": base.params}, adapter, ids)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        got = merged(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(got, np.asarray(expected), atol=2e-5)


def test_info_shows_the_base_bytes_before_and_after(assets, capsys):
    code, out, _ = run_cli(capsys, "info", "--model", assets["model"], "--quantize", "nf4", "--double-quant")
    assert code == 0
    report = quantized_bytes(quantize(models.from_pretrained(assets["model"]).params, "nf4", double_quant=True))
    line = next(line for line in out.splitlines() if line.startswith("base weights:"))
    assert f"{report['before'] / 2**20:.2f} MiB -> {report['after'] / 2**20:.2f} MiB with --quantize nf4" in line
    assert f"{report['bytes_per_quantized_param']:.4f} bytes/param" in line
    code, out, _ = run_cli(capsys, "info", "--model", assets["model"])
    assert code == 0 and "base weights:" in out and "--quantize" not in out


# -- refused before anything is written ------------------------------------------------------------

@pytest.mark.parametrize("flags, expected", [
    (("--quantize", "nf8"), "--quantize: invalid choice: 'nf8'"),
    (("--quantize", "int8", "--double-quant"), "--double-quant applies to nf4/fp4"),
    (("--double-quant",), "--double-quant quantizes the absmax values of a 4-bit base; pass --quantize nf4"),
    (("--quantize", "gguf"), "--quantize gguf keeps a .gguf model's own Q8_0/Q4_0/Q4_1 blocks"),
    (("--quantize", "nf4", "--mesh", "1"), "sharding a quantized base is not supported yet"),
    (("--quantize", "nf4", "--modules-to-save", "down_proj"), "--modules-to-save 'down_proj' would train quantized"),
])
def test_bad_quantize_flags_are_one_line_and_write_nothing(assets, tmp_path, capsys, flags, expected):
    output = tmp_path / "run"
    code, _, err = run_cli(capsys, "finetune", "--tiny", "--model", assets["model"], "--data", assets["data"],
                           "--output", output, *flags, *FLAGS)
    line = one_line_error(err)
    assert code == 2 and expected in line, line
    assert not output.exists()


def test_a_model_whose_kernels_cannot_be_quantized_is_refused_naming_the_tensor(assets, tmp_path, capsys):

    model = models.from_pretrained(assets["model"])
    model.params["model"]["layers"]["1"]["mlp"]["up_proj"]["kernel"] = \
        model.params["model"]["layers"]["1"]["mlp"]["up_proj"]["kernel"].at[3, 5].set(np.nan)
    broken = save_tiny(tmp_path / "broken", model, models.load_tokenizer(assets["model"]))
    output = tmp_path / "run"
    code, _, err = run_cli(capsys, "finetune", "--model", broken, "--data", assets["data"], "--output", output,
                           "--quantize", "nf4", *FLAGS)
    line = one_line_error(err)
    assert code == 2 and "--quantize nf4" in line and "model.layers.1.mlp.up_proj.weight" in line, line
    assert "non-finite value" in line and not output.exists()


def test_python_finetune_takes_the_same_settings(assets, tmp_path):
    result = finetune(FinetuneSettings(tiny=True, model=assets["model"], data=[assets["data"]], output=tmp_path / "r",
                                       quantize="int8", steps=2, samples=0, max_eval=4, progress=False),
                      log=lambda message: None)
    assert result.settings.quantize == "int8" and result.settings.remat == "full"
    assert "int8 (bitsandbytes row-wise format)" in (result.adapter_dir / "README.md").read_text()
