"""Damaged checkpoints and a full disk: resume falls back to the newest intact checkpoint, says
which it skipped and why, and still ends bitwise where an uninterrupted run ends."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from orbax.checkpoint._src.handlers import json_checkpoint_handler

from lora_jax import LoraConfig
from lora_jax.train import CheckpointError, Checkpoints, Example, TrainConfig, train
from lora_jax.train.tiny import tiny_model

MODEL = tiny_model(32, hidden_size=32, layers=1)
CONFIG = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.1)
TRAIN = TrainConfig(max_steps=8, batch_size=2, seq_len=16, learning_rate=1e-2, warmup_steps=2,
                    save_every=3, keep=2, num_buckets=1)


def apply_fn(params, ids, mask):
    return MODEL.module.apply({"params": params}, ids, attention_mask=mask)


def examples(n: int = 12, seed: int = 0) -> list[Example]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(5, 16))
        ids = (rng.integers(32) + np.arange(length)) % 32
        out.append(Example(ids.astype(np.int32), np.arange(length) >= 1))
    return out


def run(output, **kwargs):
    defaults = dict(config=TRAIN, eval_examples=examples(3, seed=9), output_dir=output, progress=False,
                    log=lambda message: None)
    return train(apply_fn, MODEL.params, CONFIG, examples(), **{**defaults, **kwargs})


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    return run(tmp_path_factory.mktemp("whole") / "run")


def assert_same_adapter(a, b):
    for x, y in zip(jax.tree.leaves(a.adapter), jax.tree.leaves(b.adapter), strict=True):
        np.testing.assert_array_equal(x, y)


def step_dirs(output: Path) -> list[str]:
    return sorted(p.name for p in (output / "checkpoints").iterdir())


def truncate_arrays(step_dir: Path) -> None:
    files = [f for f in (step_dir / "state" / "d").iterdir() if f.is_file()]
    assert files
    for file in files:
        with open(file, "r+b") as f:
            f.truncate(file.stat().st_size // 2)


DAMAGE = {
    "its state item is missing": lambda d: shutil.rmtree(d / "state"),
    "its meta item is missing": lambda d: shutil.rmtree(d / "meta"),
    "a truncated array file": truncate_arrays,
    "an empty meta file": lambda d: (d / "meta" / "metadata").write_text(""),
    "no array metadata": lambda d: (d / "state" / "_METADATA").unlink(),
    "an empty checkpoint directory": lambda d: (shutil.rmtree(d), d.mkdir()),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_resume_skips_a_damaged_newest_checkpoint_saying_which_and_why(tmp_path, damage):
    checkpoints = Checkpoints(tmp_path / "checkpoints", keep=3)
    state = {"adapter": {"q": {"lora_A": np.arange(12.0).reshape(6, 2), "lora_B": np.ones((2, 6))}},
             "step": np.asarray(0)}
    for step in (1, 2, 3):
        checkpoints.save(step, {**state, "step": np.asarray(step)}, {"settings": {"lr": 0.01}, "step": step})
    checkpoints.close()
    DAMAGE[damage](tmp_path / "checkpoints" / "3")
    messages: list[str] = []
    checkpoints = Checkpoints(tmp_path / "checkpoints", keep=3)
    restored, meta = checkpoints.resume(state, {"lr": 0.01}, log=messages.append)
    assert len(messages) == 1 and messages[0].startswith("Skipped checkpoint 3 (") \
        and messages[0].endswith("); resuming from checkpoint 2."), messages
    expected_reason = {"its state item is missing": "its state item is missing",
                       "its meta item is missing": "its meta item is missing",
                       "an empty checkpoint directory": "its meta item is missing",
                       "an empty meta file": "its meta file is not valid JSON",
                       "a truncated array file": "cut short or damaged",
                       "no array metadata": "a file is missing"}[damage]
    assert expected_reason in messages[0], messages[0]
    assert int(restored["step"]) == 2 and meta["step"] == 2
    np.testing.assert_array_equal(restored["adapter"]["q"]["lora_A"], state["adapter"]["q"]["lora_A"])
    assert checkpoints.all_steps() == [1, 2] and step_dirs(tmp_path) == ["1", "2"]  # the damaged one is gone
    checkpoints.close()


def test_a_run_resumed_past_a_damaged_checkpoint_ends_bitwise(tmp_path, whole):
    output = tmp_path / "run"
    stopped = run(output, on_step=lambda record: record["step"] == 7)
    assert stopped.interrupted and Checkpoints(output / "checkpoints").all_steps() == [6, 7]
    truncate_arrays(output / "checkpoints" / "7")
    messages: list[str] = []
    resumed = run(output, resume=True, log=messages.append)
    assert any(m.startswith("Skipped checkpoint 7 (cannot read ") for m in messages), messages
    assert resumed.step == 8
    assert_same_adapter(resumed, whole)
    assert step_dirs(output) == ["6", "8"]


def test_resume_with_no_intact_checkpoint_names_each_and_why(tmp_path):
    output = tmp_path / "run"
    run(output, on_step=lambda record: record["step"] == 7)
    shutil.rmtree(output / "checkpoints" / "7" / "state")
    (output / "checkpoints" / "6" / "meta" / "metadata").write_text("{cut off")
    with pytest.raises(CheckpointError, match=r"No intact checkpoint to resume in .*checkpoints \(checkpoint 7: "
                                              r"its state item is missing; checkpoint 6: its meta file is not valid"):
        run(output, resume=True)


def test_a_different_setting_is_still_refused_not_skipped(tmp_path):
    output = tmp_path / "run"
    run(output, on_step=lambda record: record["step"] == 4)
    other = TrainConfig(**{**TRAIN.__dict__, "learning_rate": 5e-3})
    with pytest.raises(CheckpointError, match=r"learning_rate: checkpoint 0.01, now 0.005"):
        run(output, config=other, resume=True)
    assert step_dirs(output) == ["3", "4"]


def disk_full_at(monkeypatch, step: int) -> None:
    """Writing checkpoint ``step`` fails as a full disk does (the meta item's write raises ENOSPC)."""
    original = json_checkpoint_handler.JsonCheckpointHandler._save_fn

    async def full_disk(self, x, directory):
        if f"/{step}.orbax-checkpoint-tmp" in str(directory):
            raise OSError(errno.ENOSPC, "No space left on device", str(directory))
        return await original(self, x, directory)

    monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", full_disk)


def test_a_full_disk_is_one_error_naming_the_checkpoint_and_leaves_nothing_partial(tmp_path, whole, monkeypatch,
                                                                                   capfd):
    output = tmp_path / "run"
    disk_full_at(monkeypatch, 6)
    with pytest.raises(CheckpointError) as raised:
        run(output)
    message = str(raised.value)
    assert f"{output.absolute() / 'checkpoints' / '6'}: could not write the checkpoint: no space left on device" \
        in message and "checkpoint 3 is the newest intact one" in message and "--resume" in message
    err = capfd.readouterr().err
    assert "Traceback" not in err and "ERROR" not in err, err  # orbax's background threads stay quiet
    assert step_dirs(output) == ["3"]  # no partial checkpoint, not even a temporary directory

    monkeypatch.undo()  # space freed
    messages: list[str] = []
    resumed = run(output, resume=True, log=messages.append)
    assert resumed.step == 8 and not resumed.interrupted
    assert_same_adapter(resumed, whole)
