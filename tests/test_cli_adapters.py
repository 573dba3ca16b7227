"""``lora-jax generate`` with several adapters (one mixed batch) and ``lora-jax combine``."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from cli_helpers import run_cli

import lora_jax
from lora_jax import models
from lora_jax.train import read_chatterbot
from lora_jax.train.generation import TextGenerator
from lora_jax.train.tiny import save_tiny, texts_of, tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny model directory and two PEFT adapters of different ranks and targets."""
    root = tmp_path_factory.mktemp("adapters")
    records = read_chatterbot(strict=False)[::40][:40]
    tokenizer = tiny_tokenizer(texts_of(records), vocab_size=300)
    model_dir = save_tiny(root / "model", tiny_model(len(tokenizer), hidden_size=32), tokenizer)
    model = models.from_pretrained(model_dir)
    configs = {"qv": lora_jax.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                         init_lora_weights=False),
               "mlp": lora_jax.LoraConfig(r=4, lora_alpha=4, target_modules=["up_proj", "down_proj", "q_proj"],
                                          init_lora_weights=False)}
    dirs = {}
    for i, (name, config) in enumerate(configs.items()):
        adapter = jax.tree.map(lambda x: 3 * x, lora_jax.init(config, model.params, jax.random.key(i)))
        dirs[name] = lora_jax.save_peft(root / name, adapter, config, model.params,
                                        base_model_name_or_path=str(model_dir), task_type="CAUSAL_LM")
    return {"model_dir": model_dir, "dirs": dirs, "root": root, "model": model, "tokenizer": tokenizer}


def alone(assets, name, prompt):
    model, tokenizer = assets["model"], assets["tokenizer"]
    if name == "base":
        return TextGenerator(model, tokenizer, max_new_tokens=6)([prompt])[0]
    adapter, config = lora_jax.load_peft(assets["dirs"][name], model.params)
    return TextGenerator(model, tokenizer, config, max_new_tokens=6)([prompt], adapter=adapter)[0]


def test_generate_routes_each_prompt_to_its_adapter_in_one_batch(assets, capsys):
    prompts = ["What is AI?", "Tell me a joke.", "Hello"]
    code, out, err = run_cli(capsys, "generate", "--model", assets["model_dir"],
                             "--adapter", f"qv={assets['dirs']['qv']}", "--adapter", f"mlp={assets['dirs']['mlp']}",
                             "--use", "mlp", "--use", "base", "--use", "qv", "--max-new-tokens", 6, *prompts)
    assert code == 0, err
    lines = [line for line in out.splitlines() if line.startswith("[")]
    for line, prompt, name in zip(lines, prompts, ["mlp", "base", "qv"]):
        assert line.startswith(f"[{name}]")
        assert line[len(name) + 2:].strip() == alone(assets, name, prompt)


def test_generate_with_several_adapters_and_no_use_shows_each_adapter(assets, capsys):
    code, out, err = run_cli(capsys, "generate", "--model", assets["model_dir"], "--compare",
                             "--adapter", f"qv={assets['dirs']['qv']}", "--adapter", f"mlp={assets['dirs']['mlp']}",
                             "--max-new-tokens", 6, "What is AI?")
    assert code == 0, err
    assert [line.split("]")[0] + "]" for line in out.splitlines() if line.startswith("[")] == [
        "[base]", "[qv]", "[mlp]"]


@pytest.mark.parametrize("argv, message", [
    (["--use", "nope"], "--use 'nope': no such adapter; the adapters are qv, mlp, base"),
    (["--use", "qv", "--use", "mlp"], "--use was given 2 times for 3 prompts"),
])
def test_generate_refuses_bad_routes_naming_them(assets, capsys, argv, message):
    code, _, err = run_cli(capsys, "generate", "--model", assets["model_dir"],
                           "--adapter", f"qv={assets['dirs']['qv']}", "--adapter", f"mlp={assets['dirs']['mlp']}",
                           *argv, "a", "b", "c")
    assert code == 2 and message in err


def test_combine_writes_the_weighted_adapter_as_peft(assets, capsys):
    out_dir = assets["root"] / "combined"
    code, out, err = run_cli(capsys, "combine", "--model", assets["model_dir"],
                             "--adapter", f"qv={assets['dirs']['qv']}", "--adapter", f"mlp={assets['dirs']['mlp']}",
                             "--weights", 0.7, 0.3, "--type", "cat", "--output", out_dir)
    assert code == 0, err
    params = assets["model"].params
    pairs = {name: tuple(lora_jax.load_peft(d, params)) for name, d in assets["dirs"].items()}
    want, want_config = lora_jax.weighted_adapter(pairs, [0.7, 0.3], "cat")
    got, got_config = lora_jax.load_peft(out_dir, params)
    merged = lora_jax.merge(params, got, got_config)
    expected = lora_jax.merge(params, want, want_config)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), merged, expected)
    assert json.loads((out_dir / "adapter_config.json").read_text())["r"] == 6
    # the output directory is ours now: a second run needs --overwrite, then replaces it
    code, _, err = run_cli(capsys, "combine", "--model", assets["model_dir"], "--adapter", str(assets["dirs"]["qv"]),
                           "--weights", 1.0, "--type", "linear", "--output", out_dir)
    assert code == 2 and "--overwrite" in err


def test_combine_refuses_mismatched_weights_before_loading_anything(assets, capsys, tmp_path):
    code, _, err = run_cli(capsys, "combine", "--adapter", f"qv={assets['dirs']['qv']}", "--weights", 0.5, 0.5,
                           "--output", tmp_path / "x")
    assert code == 2 and "--weights has 2 values for 1 adapters" in err and not (tmp_path / "x").exists()
