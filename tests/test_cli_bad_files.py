"""Files lora_jax's own tools read, when they are broken: one line naming the file and what was expected."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from cli_helpers import one_line_error

import lora_jax
from lora_jax.cli import main
from lora_jax.train import Checkpoints, write_lora_adapter


@pytest.fixture()
def imported(tmp_path):
    adapter = {"q": {"lora_A": np.ones((4, 2), np.float32), "lora_B": np.zeros((2, 4), np.float32)}}
    return write_lora_adapter(tmp_path / "imported", adapter, lora_jax.LoraConfig(r=2, target_modules=["q"]),
                              {}, None)


@pytest.mark.parametrize("content, expected", [
    ("{not json", "lora_config.json: not valid JSON"),
    ("[]", "lora_config.json: expected a JSON object, found a list"),
    ('{"base_model_name_or_path": null}', 'lora_config.json: expected a "lora_config" object'),
    ('{"lora_config": {"r": "eight", "target_modules": ["q"]}}', "LoraConfig.r must be a positive integer, got 'eight'"),
    ('{"lora_config": {"r": 2, "lora_alpha": "16", "target_modules": ["q"]}}', "LoraConfig.lora_alpha must be a finite"),
])
def test_a_broken_lora_config_json_names_the_file(imported, tmp_path, capsys, content, expected):
    (imported / "lora_config.json").write_text(content)
    code = main(["export", str(imported), "--output", str(tmp_path / "out")])
    line = one_line_error(capsys.readouterr().err)
    assert code == 2 and expected in line and str(imported) in line, line
    assert not (tmp_path / "out").exists()


def test_missing_adapter_arrays_name_the_directory(imported, tmp_path, capsys):
    shutil.rmtree(imported / "adapter")
    code = main(["export", str(imported), "--output", str(tmp_path / "out")])
    line = one_line_error(capsys.readouterr().err)
    assert code == 2 and f"{imported / 'adapter'}: cannot read the adapter arrays" in line, line


def test_exporting_a_damaged_checkpoint_names_it(tmp_path, capsys):
    run = tmp_path / "run"
    checkpoints = Checkpoints(run / "checkpoints")
    checkpoints.save(4, {"trainable": {"adapter": {}, "params": {}}, "x": np.zeros(3)}, {"settings": {}})
    checkpoints.close()
    shutil.rmtree(run / "checkpoints" / "4" / "state")
    (run / "run.json").write_text(json.dumps({"model": "tiny"}))
    code = main(["export", str(run), "--output", str(tmp_path / "out")])
    line = one_line_error(capsys.readouterr().err)
    assert code == 2 and f"{run / 'checkpoints' / '4'}: cannot read the checkpoint (its state item is missing)" in line
    code = main(["export", str(run), "--output", str(tmp_path / "out"), "--step", "9"])
    assert code == 2 and "no checkpoint for step 9 (steps: [4])" in one_line_error(capsys.readouterr().err)
