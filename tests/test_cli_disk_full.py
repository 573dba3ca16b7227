"""A full disk during ``lora-jax finetune``: one line naming the path, nothing partial left that
looks valid, and ``--resume`` after freeing space ends bitwise where an uninterrupted run ends.

The disk is made full portably: the write raises ``OSError(ENOSPC)``, as the
kernel's write does (the checkpoint's meta item, written by orbax's
background thread; or the metrics log, written by the loop).
"""

from __future__ import annotations

import errno
import json

import pytest
from cli_helpers import chat_assets
from orbax.checkpoint._src.handlers import json_checkpoint_handler
from safetensors.numpy import load_file

from lora_jax.cli import main
from lora_jax.train import MetricsLog


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return chat_assets(tmp_path_factory.mktemp("disk-full"))


def finetune(assets, output, *extra):
    return main(["finetune", "--tiny", "--model", str(assets["model"]), "--data", str(assets["data"]),
                 "--output", str(output), "--steps", "8", "--save-every", "3", "--keep", "2", "--dropout", "0.1",
                 "--buckets", "1", "--samples", "0", "--no-progress", *extra])


@pytest.fixture(scope="module")
def whole(assets):
    output = assets["root"] / "whole"
    assert finetune(assets, output) == 0
    return load_file(str(output / "adapter" / "adapter_model.safetensors"))


def one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("lora-jax: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err and "ERROR" not in err.replace("lora-jax: error:", ""), err
    return lines[0]


def resume_and_compare(assets, output, whole, capfd):
    assert finetune(assets, output, "--resume") == 0, capfd.readouterr().err
    got = load_file(str(output / "adapter" / "adapter_model.safetensors"))
    assert sorted(got) == sorted(whole)
    for key in whole:  # bitwise
        assert (got[key] == whole[key]).all(), key
    steps = [json.loads(line)["step"] for line in (output / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == list(range(1, 9))


def test_a_full_disk_while_checkpointing(assets, whole, tmp_path, monkeypatch, capfd):
    original = json_checkpoint_handler.JsonCheckpointHandler._save_fn

    async def full_disk(self, x, directory):
        if "/6.orbax-checkpoint-tmp" in str(directory):
            raise OSError(errno.ENOSPC, "No space left on device", str(directory))
        return await original(self, x, directory)

    monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", full_disk)
    output = tmp_path / "run"
    capfd.readouterr()
    assert finetune(assets, output) == 2
    line = one_line_error(capfd.readouterr().err)
    assert f"{output.absolute() / 'checkpoints' / '6'}: could not write the checkpoint: no space left on device" \
        in line and "--resume" in line, line
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == ["3"]
    assert not (output / "adapter").exists()

    monkeypatch.undo()  # space freed
    resume_and_compare(assets, output, whole, capfd)


def test_a_full_disk_while_logging_metrics(assets, whole, tmp_path, monkeypatch, capfd):
    original = MetricsLog.write

    def full_disk(self, record):
        if record.get("step") == 5 and "loss" in record:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
        return original(self, record)

    monkeypatch.setattr(MetricsLog, "write", full_disk)
    output = tmp_path / "run"
    capfd.readouterr()
    assert finetune(assets, output) == 1
    line = one_line_error(capfd.readouterr().err)
    assert f"{output / 'metrics.jsonl'}: no space left on device" in line, line

    monkeypatch.undo()
    resume_and_compare(assets, output, whole, capfd)
