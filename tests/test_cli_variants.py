"""``lora-jax finetune`` with the LoRA variants: --use-dora, --trainable-token-indices,
--ensure-weight-tying and --loraplus-ratio; the adapters checked in PyTorch + PEFT."""

from __future__ import annotations

import json

import numpy as np
import pytest
from cli_helpers import chat_assets, one_line_error, run_cli
from hf_oracle import assert_close_on_tokens, left_padded, lora_logits, peft_loaded, torch_logits
from safetensors.numpy import load_file

import lora_jax
from lora_jax import models
from lora_jax.cli import main

TOKENS = [3, 7, 11]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return chat_assets(tmp_path_factory.mktemp("variants"))


def finetune(capsys, assets, output, *flags):
    return run_cli(capsys, "finetune", "--tiny", "--model", assets["model"], "--data", assets["data"],
                   "--output", output, "--no-progress", "--samples", "0", *flags)


@pytest.fixture(scope="module")
def dora_run(assets):
    """DoRA on q/v plus three trained embedding rows of the tied table, through the CLI."""
    output = assets["root"] / "dora"
    code = main([str(a) for a in ("finetune", "--tiny", "--model", assets["model"], "--data", assets["data"],
                                  "--output", output, "--no-progress", "--samples", "0", "--steps", "6",
                                  "--lr", "2e-2", "--use-dora", "--trainable-token-indices", "3,7,11",
                                  "--ensure-weight-tying")])
    assert code == 0
    return output


def test_dora_and_trainable_tokens_are_written_in_peft_format(dora_run, assets):
    config = json.loads((dora_run / "adapter" / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["ensure_weight_tying"] is True
    assert config["trainable_token_indices"] == TOKENS
    tensors = load_file(str(dora_run / "adapter" / "adapter_model.safetensors"))
    assert any("lora_magnitude_vector" in key for key in tensors)
    rows = [v for k, v in tensors.items() if "trainable_tokens_delta" in k]
    assert len(rows) == 1 and rows[0].shape == (3, 32)
    # The rows trained: they are no longer the base model's rows.
    base = models.from_pretrained(assets["model"])
    embedding = np.asarray(base.params["model"]["embed_tokens"]["embedding"])
    assert np.abs(rows[0] - embedding[TOKENS]).max() > 1e-3
    run = json.loads((dora_run / "run.json").read_text())
    assert run["use_dora"] is True and run["trainable_token_indices"] == "3,7,11"


def test_peft_gives_the_logits_of_the_trained_dora_adapter(dora_run, assets):
    base = models.from_pretrained(assets["model"])
    loaded = lora_jax.load_peft(dora_run / "adapter", base.params)
    assert loaded.config.use_dora and loaded.config.ensure_weight_tying
    ids, mask = left_padded(base.config["vocab_size"])
    ids[0, :3] = TOKENS  # the trained rows are looked up (and, tied, read by the head)
    ours = lora_logits(base, loaded.params, loaded.adapter, loaded.config, ids, mask)
    theirs = torch_logits(peft_loaded(assets["model"], dora_run / "adapter"), ids, mask)
    assert_close_on_tokens(ours, theirs, mask, atol=1e-4)


def first_step_adapter(capsys, assets, output, *flags):
    """The adapter after one constant-rate AdamW step from B = 0."""
    code, _, err = finetune(capsys, assets, output, "--steps", "1", "--warmup", "0", "--schedule", "constant",
                            "--lr", "1e-2", "--max-grad-norm", "0", "--eval-every", "0", *flags)
    assert code == 0, err
    tensors = load_file(str(output / "adapter" / "adapter_model.safetensors"))
    return ({k: v for k, v in tensors.items() if "lora_A" in k}, {k: v for k, v in tensors.items() if "lora_B" in k})


def test_loraplus_ratio_gives_b_that_many_times_a_first_adam_step(assets, tmp_path, capsys):
    # Adam's first step moves every parameter with a non-zero gradient by lr * sign(g);
    # from B = 0 only B has a gradient, so |B| is the rate B learns at.
    plain_a, plain_b = first_step_adapter(capsys, assets, tmp_path / "plain")
    plus_a, plus_b = first_step_adapter(capsys, assets, tmp_path / "plus", "--loraplus-ratio", "8")
    for key in plain_a:
        np.testing.assert_array_equal(plus_a[key], plain_a[key])  # no gradient reaches A at B = 0
    for key in plain_b:  # the same gradient, the same Adam step, scaled by the ratio
        np.testing.assert_allclose(plus_b[key], 8 * plain_b[key], rtol=1e-5, atol=1e-9)
    plain = np.concatenate([np.abs(v).ravel() for v in plain_b.values()])
    assert (plain > 0.9e-2).mean() > 0.8 and plain.max() <= 1e-2 * (1 + 1e-6)  # lr * |g| / (|g| + eps)
    run = json.loads((tmp_path / "plus" / "run.json").read_text())
    assert run["loraplus_ratio"] == 8.0 and "loraplus_ratio" not in json.loads(
        (tmp_path / "plain" / "run.json").read_text())
    # A finished run resumes only with its own ratio.
    code, _, err = finetune(capsys, assets, tmp_path / "plus", "--resume", "--loraplus-ratio", "4")
    assert code == 2 and "loraplus_ratio: run 8.0, now 4.0" in one_line_error(err)


@pytest.mark.parametrize("flags, expected", [
    (["--loraplus-ratio", "0"], "--loraplus-ratio: expected a finite number > 0, got 0.0"),
    (["--trainable-token-indices", "3,x"], "--trainable-token-indices: expected comma-separated token ids"),
    (["--trainable-token-indices", "3,100000"], "100000"),
])
def test_bad_variant_flags_are_refused_before_anything_is_written(assets, tmp_path, capsys, flags, expected):
    code, _, err = finetune(capsys, assets, tmp_path / "run", *flags)
    assert code == 2 and expected in one_line_error(err)
    assert not (tmp_path / "run").exists()
