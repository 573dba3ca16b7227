"""Real ``lora-jax finetune`` processes: SIGKILL then --resume ends where an uninterrupted run
ends; SIGINT saves a checkpoint and exits cleanly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from lora_jax.train import read_chatterbot
from lora_jax.train.tiny import save_tiny, texts_of, tiny_model, tiny_tokenizer

STEPS = 60


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    records = read_chatterbot(strict=False)[::7][:200]
    tokenizer = tiny_tokenizer(texts_of(records), vocab_size=320)
    model_dir = save_tiny(root / "model", tiny_model(len(tokenizer), hidden_size=32), tokenizer)
    data = root / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in records))
    env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu",
               # Separate processes: a shared compilation cache and cheap XLA optimisation keep them quick.
               JAX_COMPILATION_CACHE_DIR=str(root / "xla-cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               XLA_FLAGS="--xla_backend_optimization_level=0")
    return {"model": model_dir, "data": data, "root": root, "env": env}


def finetune(setup, output: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lora_jax", "finetune", "--tiny", "--model", str(setup["model"]),
            "--data", str(setup["data"]), "--output", str(output), "--steps", str(STEPS),
            "--save-every", "3", "--keep", "2", "--dropout", "0.1", "--buckets", "1", "--no-progress",
            "--samples", "0",
            *extra]


def finished_steps(output: Path) -> list[int]:
    """Checkpoints orbax has finalised (renamed from their temporary names)."""
    directory = output / "checkpoints"
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def start_and_wait_for_checkpoint(setup, output: Path, *extra: str) -> subprocess.Popen:
    process = subprocess.Popen(finetune(setup, output, *extra), env=setup["env"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not finished_steps(output):
        if process.poll() is not None:
            pytest.fail(f"finetune ended before its first checkpoint:\n{process.stderr.read()}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("no checkpoint within 240 s")
        time.sleep(0.01)
    return process


def adapter_tensors(output: Path) -> dict[str, np.ndarray]:
    return load_file(str(output / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def whole(setup):
    """The uninterrupted reference run."""
    output = setup["root"] / "whole"
    done = subprocess.run(finetune(setup, output), env=setup["env"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return output


def test_sigkill_then_resume_matches_an_uninterrupted_run(setup, whole):
    killed = setup["root"] / "killed"
    process = start_and_wait_for_checkpoint(setup, killed)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL
    assert not (killed / "adapter").exists(), "the run finished before it was killed"
    assert 0 < finished_steps(killed)[-1] < STEPS

    resumed = subprocess.run([sys.executable, "-m", "lora_jax", "finetune", "--output", str(killed),
                              "--resume", "--no-progress", "--samples", "0"],
                             env=setup["env"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    expected, got = adapter_tensors(whole), adapter_tensors(killed)
    assert sorted(expected) == sorted(got)
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=0, atol=1e-6, err_msg=key)
    metrics = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines() if line]
    assert [r["step"] for r in metrics if "loss" in r] == list(range(1, STEPS + 1))


def test_sigint_saves_a_checkpoint_and_exits_cleanly(setup):
    output = setup["root"] / "interrupted"
    process = start_and_wait_for_checkpoint(setup, output)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    if process.returncode == 0:
        pytest.skip("the run finished before SIGINT arrived")
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert "Interrupted at step" in stderr and "--resume" in stderr
    step = int(stderr.split("Interrupted at step ")[1].split("/")[0])
    assert finished_steps(output)[-1] == step


def test_data_parallel_mesh_trains_the_same_adapter(setup, whole):
    output = setup["root"] / "mesh"
    env = dict(setup["env"], XLA_FLAGS=setup["env"]["XLA_FLAGS"] + " --xla_force_host_platform_device_count=2")
    done = subprocess.run(finetune(setup, output, "--mesh", "2"), env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    expected, got = adapter_tensors(whole), adapter_tensors(output)
    for key in expected:  # only the order of the batch reduction differs
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-4, atol=1e-5, err_msg=key)


def test_a_second_run_on_the_same_output_refuses_while_the_first_runs(setup, capsys):
    from lora_jax.cli import main

    busy = setup["root"] / "busy"
    process = start_and_wait_for_checkpoint(setup, busy, "--steps", "100000")
    try:
        code = main(["finetune", "--output", str(busy), "--resume", "--no-progress", "--samples", "0"])
        err = capsys.readouterr().err
    finally:
        process.kill()
        process.communicate()
    assert code == 2 and f"is in use by another lora-jax run (pid {process.pid}" in err, err
