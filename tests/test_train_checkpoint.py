"""Orbax checkpoints and resume, in process (the SIGKILL test is in test_cli_resume.py)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax import LoraConfig
from lora_jax.train import (
    CheckpointError,
    Checkpoints,
    Example,
    TrainConfig,
    init_state,
    make_optimizer,
    train,
)
from lora_jax.train.tiny import tiny_model

MODEL = tiny_model(32, hidden_size=32, layers=1)
CONFIG = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], modules_to_save=["model.norm"])
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
    defaults = dict(config=TRAIN, eval_examples=examples(3, seed=9), output_dir=output, progress=False)
    return train(apply_fn, MODEL.params, CONFIG, examples(), **{**defaults, **kwargs})


def test_checkpoints_round_trip_exactly_and_keep_the_last_n(tmp_path):
    optimizer = make_optimizer(1e-3, 10)
    adapter = {"m": {"lora_A": jnp.arange(6.0).reshape(3, 2), "lora_B": jnp.ones((2, 3))}}
    state = init_state(adapter, {"head.kernel": jnp.full((2, 2), 0.5)}, optimizer, seed=7)
    checkpoints = Checkpoints(tmp_path / "ck", keep=2)
    for step in (1, 2, 3):
        checkpoints.save(step, state._replace(step=jnp.int32(step)), {"step": step, "note": "x"})
    checkpoints.wait()
    assert checkpoints.all_steps() == [2, 3]
    restored, meta = checkpoints.restore(state)
    assert meta == {"step": 3, "note": "x"} and int(restored.step) == 3
    for a, b in zip(jax.tree.leaves(state.trainable) + jax.tree.leaves(state.opt_state),
                    jax.tree.leaves(restored.trainable) + jax.tree.leaves(restored.opt_state)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(restored.rng, state.rng)
    raw, _ = checkpoints.restore_raw(2)
    np.testing.assert_array_equal(raw["trainable"]["adapter"]["m"]["lora_A"], adapter["m"]["lora_A"])


def test_check_settings_names_each_difference(tmp_path):
    checkpoints = Checkpoints(tmp_path / "ck")
    state = init_state({}, {}, make_optimizer(1e-3, 10), seed=0)
    checkpoints.save(5, state, {"settings": {"learning_rate": 0.001, "seed": 0, "r": 8}})
    checkpoints.wait()
    checkpoints.check_settings({"learning_rate": 0.001, "seed": 0, "r": 8})
    with pytest.raises(CheckpointError, match=r"learning_rate: checkpoint 0.001, now 0.002; r: checkpoint 8, now 4"):
        checkpoints.check_settings({"learning_rate": 0.002, "seed": 0, "r": 4})


def test_interrupted_and_resumed_run_ends_with_the_same_adapter(tmp_path):
    whole = run(tmp_path / "whole")
    stopped = run(tmp_path / "split", on_step=lambda record: record["step"] == 5)
    assert stopped.interrupted and stopped.step == 5
    assert Checkpoints(tmp_path / "split" / "checkpoints").latest_step() == 5
    resumed = run(tmp_path / "split", resume=True)
    assert resumed.step == 8 and not resumed.interrupted
    for a, b in zip(jax.tree.leaves(whole.adapter), jax.tree.leaves(resumed.adapter)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(whole.trainable_params["model.norm.scale"],
                                  resumed.trainable_params["model.norm.scale"])
    # The held-out numbers before training survive the resume; the metrics have each step once.
    assert resumed.eval_before == whole.eval_before
    steps = [r["step"] for r in map(json.loads, (tmp_path / "split" / "metrics.jsonl").read_text().splitlines())
             if "loss" in r]
    assert steps == list(range(1, 9))
    assert (tmp_path / "split" / "loss_curve.png").stat().st_size > 1000


def test_resume_with_a_different_setting_refuses_and_names_it(tmp_path):
    run(tmp_path / "run", on_step=lambda record: record["step"] == 3)
    other = TrainConfig(**{**TRAIN.__dict__, "learning_rate": 5e-3})
    with pytest.raises(CheckpointError, match=r"learning_rate: checkpoint 0.01, now 0.005"):
        run(tmp_path / "run", config=other, resume=True)
    with pytest.raises(CheckpointError, match=r"train_data: checkpoint"):
        train(apply_fn, MODEL.params, CONFIG, examples(seed=1), config=TRAIN, output_dir=tmp_path / "run",
              resume=True, progress=False)


def test_a_new_run_refuses_a_directory_with_checkpoints(tmp_path):
    run(tmp_path / "run", on_step=lambda record: record["step"] == 3)
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        run(tmp_path / "run")
