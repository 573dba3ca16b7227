"""--overwrite replaces only what lora_jax wrote: nothing of the user's is ever deleted.

The reported case: ``lora-jax import ADAPTER --output . --overwrite`` emptied the
working directory. Every command that writes a directory (import, export,
merge, finetune) now refuses a directory with files it did not write.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import pytest
from cli_helpers import one_line_error, run_cli

import lora_jax
from lora_jax.train import write_lora_adapter
from lora_jax.train.outputs import MARKER_FILE
from lora_jax.train.tiny import save_tiny, tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny model, a PEFT adapter for it and the same adapter as a `lora-jax import` directory."""
    root = tmp_path_factory.mktemp("overwrite")
    tokenizer = tiny_tokenizer(["hello world", "the quick brown fox"], vocab_size=280)
    model = tiny_model(len(tokenizer), hidden_size=32, layers=1)
    model_dir = save_tiny(root / "model", model, tokenizer)
    config = lora_jax.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    adapter = lora_jax.init(config, model.params, jax.random.key(0))
    adapter = {k: {"lora_A": v["lora_A"], "lora_B": jnp.full_like(v["lora_B"], 0.01)} for k, v in adapter.items()}
    peft_dir = lora_jax.save_peft(root / "peft", adapter, config, model.params,
                                  base_model_name_or_path=str(model_dir), task_type="CAUSAL_LM")
    imported = write_lora_adapter(root / "imported", adapter, config, {}, str(model_dir))
    return {"model": model_dir, "peft": peft_dir, "imported": imported, "root": root}


def user_files(directory):
    """A directory of someone's work: files, a folder, a dotfile."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "notes.txt").write_text("my notes")
    (directory / "data").mkdir()
    (directory / "data" / "train.jsonl").write_text('{"text": "mine"}\n')
    (directory / ".gitignore").write_text("*.pyc\n")
    return snapshot(directory)


def snapshot(directory):
    return {str(p.relative_to(directory)): p.read_bytes() if p.is_file() else None
            for p in sorted(directory.rglob("*"))}


def test_import_into_the_working_directory_with_overwrite_deletes_nothing(assets, tmp_path, capsys, monkeypatch):
    work = tmp_path / "work"
    before = user_files(work)
    monkeypatch.chdir(work)
    code, _, err = run_cli(capsys, "import", assets["peft"], "--model", assets["model"], "--output", ".",
                           "--overwrite")
    line = one_line_error(err)
    assert code == 2 and "holds files lora_jax did not write (.gitignore and 2 more)" in line, line
    assert snapshot(work) == before


@pytest.mark.parametrize("command", ["import", "export", "merge", "finetune"])
def test_every_command_refuses_to_overwrite_a_directory_of_foreign_files(assets, tmp_path, capsys, command):
    output = tmp_path / "mine"
    before = user_files(output)
    argv = {
        "import": ["import", assets["peft"], "--model", assets["model"]],
        "export": ["export", assets["imported"]],
        "merge": ["merge", "--adapter", assets["peft"], "--model", assets["model"]],
        "finetune": ["finetune", "--tiny", "--model", assets["model"], "--data", tmp_path / "none.jsonl"],
    }[command]
    code, _, err = run_cli(capsys, *argv, "--output", output, "--overwrite")
    line = one_line_error(err)
    assert code == 2 and str(output) in line and ".gitignore" in line and "did not write" in line, line
    assert snapshot(output) == before


def test_overwrite_replaces_its_own_files_and_keeps_the_users(assets, tmp_path, capsys):
    output = tmp_path / "imported"
    code, _, err = run_cli(capsys, "import", assets["peft"], "--output", output)
    assert code == 0, err
    assert json.loads((output / MARKER_FILE).read_text())["command"] == "import"
    (output / "notes.txt").write_text("added by the user")
    (output / "lora_config.json").write_text("{}")  # what --overwrite must replace
    code, _, err = run_cli(capsys, "import", assets["peft"], "--output", output, "--overwrite")
    assert code == 0, err
    assert (output / "notes.txt").read_text() == "added by the user"
    assert json.loads((output / "lora_config.json").read_text())["lora_config"]["r"] == 2


def test_without_overwrite_an_output_with_files_is_refused(assets, tmp_path, capsys):
    output = tmp_path / "peft"
    code, _, err = run_cli(capsys, "export", assets["imported"], "--output", output)
    assert code == 0, err
    before = snapshot(output)
    code, _, err = run_cli(capsys, "export", assets["imported"], "--output", output)
    assert code == 2 and "pass --overwrite" in one_line_error(err)
    assert snapshot(output) == before


def test_overwrite_never_replaces_another_commands_output(assets, tmp_path, capsys):
    output = tmp_path / "imported"
    assert run_cli(capsys, "import", assets["peft"], "--output", output)[0] == 0
    before = snapshot(output)
    code, _, err = run_cli(capsys, "export", assets["imported"], "--output", output, "--overwrite")
    assert code == 2 and "`lora-jax import`, not of `lora-jax export`" in one_line_error(err)
    assert snapshot(output) == before


def test_an_output_that_is_a_file_is_refused(assets, tmp_path, capsys):
    target = tmp_path / "adapter.txt"
    target.write_text("not a directory")
    code, _, err = run_cli(capsys, "export", assets["imported"], "--output", target, "--overwrite")
    assert code == 2 and "is not a directory" in one_line_error(err)
    assert target.read_text() == "not a directory"


def test_an_unmarked_output_of_the_same_command_can_be_overwritten(assets, tmp_path, capsys):
    # What `lora-jax export` wrote before outputs were marked: only its own files.
    output = lora_jax.save_peft(tmp_path / "old", *lora_jax.load_peft(assets["peft"],
                                                                         _params(assets["model"])))
    assert not (output / MARKER_FILE).exists()
    code, _, err = run_cli(capsys, "export", assets["imported"], "--output", output, "--overwrite")
    assert code == 0, err


def test_a_directory_of_unknown_purpose_with_only_lookalike_names_is_refused(assets, tmp_path, capsys):
    # README.md is a name export writes, but without adapter_config.json this is not an export.
    output = tmp_path / "docs"
    output.mkdir()
    (output / "README.md").write_text("# my project")
    code, _, err = run_cli(capsys, "export", assets["imported"], "--output", output, "--overwrite")
    assert code == 2 and "does not look like the output of `lora-jax export`" in one_line_error(err)
    assert (output / "README.md").read_text() == "# my project"


def _params(model_dir):
    from lora_jax import models

    return models.from_pretrained(model_dir).params
