"""Two runs on one --output: the second refuses, naming the first's pid; a lock left by a dead
process is taken over, with a message. (A real second finetune process is in test_cli_resume.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from cli_helpers import one_line_error

from lora_jax.cli import main
from lora_jax.train import OutputError, RunLock
from lora_jax.train.outputs import LOCK_FILE

HOLD_LOCK = ("import sys, time\nfrom lora_jax.train.outputs import RunLock\n"
             "RunLock(sys.argv[1]).acquire()\nprint('locked', flush=True)\ntime.sleep(600)\n")


@pytest.fixture()
def data(tmp_path):
    file = tmp_path / "data.jsonl"
    file.write_text("".join(json.dumps({"prompt": f"{i} plus one is", "response": f" {i + 1}"}) + "\n"
                            for i in range(60)))
    return file


@pytest.fixture()
def holder(tmp_path):
    """Another process holding the lock on tmp_path / "run"."""
    output = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(output)], stdout=subprocess.PIPE, text=True,
                               env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert process.stdout.readline().strip() == "locked"
    yield output, process
    process.kill()
    process.wait()


def test_a_run_on_a_locked_output_refuses_naming_the_pid(holder, data, capsys):
    output, process = holder
    for extra in ([], ["--resume"], ["--overwrite"]):
        code = main(["finetune", "--tiny", "--data", str(data), "--output", str(output), "--samples", "0", *extra])
        line = one_line_error(capsys.readouterr().err)
        assert code == 2 and f"is in use by another lora-jax run (pid {process.pid}" in line, line
    assert sorted(p.name for p in output.iterdir()) == [LOCK_FILE]


def test_a_stale_lock_of_a_dead_process_is_taken_over(holder, data, capsys):
    output, process = holder
    process.send_signal(signal.SIGKILL)  # dies holding it: the lock file stays, with its pid
    process.wait()
    assert (output / LOCK_FILE).read_text().split()[0] == str(process.pid)
    code = main(["finetune", "--tiny", "--data", str(data), "--output", str(output), "--steps", "2",
                 "--samples", "0", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert f"Taking over the lock {output / LOCK_FILE} left by pid {process.pid}, which is no longer running." in err
    assert not (output / LOCK_FILE).exists()  # released when the run ended


def test_the_lock_is_exclusive_within_one_process_too(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(OutputError, match=f"pid {os.getpid()}"):
            RunLock(tmp_path).acquire()
    RunLock(tmp_path).acquire()  # free again
