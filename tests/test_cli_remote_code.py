"""No code from model files ever runs: a model directory with ``auto_map`` is refused, never prompted for.

transformers asks on stdin whether to run a model's own Python files, and
``lora-jax generate`` reads prompts from stdin, so an answer could come from
the prompts. Each command refuses such a directory with one line, before
transformers sees it, and the model's code never runs.
"""

from __future__ import annotations

import io
import json
import sys

import jax
import pytest
from cli_helpers import one_line_error

import lora_jax
from lora_jax.cli import main
from lora_jax.train import ModelFilesError, load_model, load_tokenizer
from lora_jax.train.tiny import save_tiny, tiny_model, tiny_tokenizer

EVIL = "import pathlib\npathlib.Path(__file__).with_name('RAN').write_text('model code ran')\n"


def model_with_code(directory, json_file: str):
    """A tiny model directory whose ``json_file`` maps an auto class to its own ``evil.py``."""
    tokenizer = tiny_tokenizer(["hello world", "what is ai"], vocab_size=280)
    save_tiny(directory, tiny_model(len(tokenizer), hidden_size=32, layers=1), tokenizer)
    (directory / "evil.py").write_text(EVIL)
    values = json.loads((directory / json_file).read_text())
    values["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None], "AutoConfig": "evil.EvilConfig",
                          "AutoModelForCausalLM": "evil.EvilModel"}
    (directory / json_file).write_text(json.dumps(values))
    return directory


@pytest.fixture(scope="module", params=["tokenizer_config.json", "config.json"])
def evil(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("remote-code")
    model_dir = model_with_code(root / "model", request.param)
    model = tiny_model(280, hidden_size=32, layers=1)
    config = lora_jax.LoraConfig(r=2, target_modules=["q_proj"])
    adapter = lora_jax.init(config, model.params, jax.random.key(0))
    peft_dir = lora_jax.save_peft(root / "peft", adapter, config, base_model_name_or_path=str(model_dir))
    return {"model": model_dir, "peft": peft_dir, "file": request.param, "root": root}


@pytest.mark.parametrize("command", ["generate", "info", "finetune", "merge", "import"])
def test_a_model_asking_to_run_its_code_is_refused_by_every_command(evil, tmp_path, capsys, monkeypatch, command):
    # "y" first: what a user (or a prompt file) would answer transformers' question with.
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\ny\nWhat is AI?\n"))
    argv = {
        "generate": ["generate", "--model", evil["model"]],
        "info": ["info", "--model", evil["model"]],
        "finetune": ["finetune", "--tiny", "--model", evil["model"], "--data", _data(tmp_path),
                     "--output", tmp_path / "run"],
        "merge": ["merge", "--adapter", evil["peft"], "--output", tmp_path / "merged"],
        "import": ["import", evil["peft"], "--output", tmp_path / "imported"],
    }[command]
    code = main([str(a) for a in argv])
    line = one_line_error(capsys.readouterr().err)
    assert code == 2 and evil["file"] in line and "auto_map" in line and "never runs code" in line, line
    assert not (evil["model"] / "RAN").exists()
    assert not any(p.name in ("run", "merged", "imported") for p in tmp_path.iterdir())  # nothing written


def test_the_python_loaders_refuse_it_too(evil):
    with pytest.raises(ModelFilesError, match="auto_map"):
        load_model(evil["model"])
    with pytest.raises(ModelFilesError, match="auto_map"):
        load_tokenizer(lora_jax.models.Model(None, {}, {}, str(evil["model"])))
    assert not (evil["model"] / "RAN").exists()


def _data(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i} +", "response": " 1"}) + "\n" for i in range(20)))
    return data
