"""``--report-to tensorboard|wandb``: the logged scalars, read back by the tools' own readers; nothing sent."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from lora_jax.cli import main
from lora_jax.train import read_chatterbot
from lora_jax.train.progress import MovingAverage, smoothed
from lora_jax.train.reporting import Reporter, parse_report_to, peak_memory_bytes
from lora_jax.train.tiny import save_tiny, texts_of, tiny_model, tiny_tokenizer

STEPS = 6


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("logging")
    chats = read_chatterbot(strict=False)[::13][:100]
    tokenizer = tiny_tokenizer(texts_of(chats), vocab_size=320)
    model = save_tiny(root / "model", tiny_model(len(tokenizer), hidden_size=32), tokenizer)
    data = root / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": c["messages"]}) + "\n" for c in chats))
    return {"root": root, "model": model, "data": data}


def finetune_args(assets, output, *extra):
    return ["finetune", "--tiny", "--model", str(assets["model"]), "--data", str(assets["data"]), "--output",
            str(output), "--steps", str(STEPS), "--no-progress", "--samples", "0", *map(str, extra)]


def metrics(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tensorboard_run(assets):
    output = assets["root"] / "tb"
    assert main(finetune_args(assets, output, "--report-to", "tensorboard", "--logging-steps", "2",
                              "--eval-steps", "2")) == 0
    return output


def scalars(logdir: Path) -> dict[str, dict[int, float]]:
    """Every scalar in the event files, as TensorBoard itself reads them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logdir))
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def test_tensorboard_event_files_hold_the_logged_scalars(tensorboard_run):
    logged = scalars(tensorboard_run / "tensorboard")
    steps = [r for r in metrics(tensorboard_run) if "loss" in r]
    evals = {r["step"]: r for r in metrics(tensorboard_run) if "eval_loss" in r}
    assert {"train/loss", "train/learning_rate", "train/grad_norm", "train/tokens_per_s", "train/step_time",
            "train/epoch", "eval/loss", "eval/perplexity"} <= set(logged)
    # Means over each window of --logging-steps 2 steps, against the per-step metrics.jsonl.
    for end in (2, 4, 6):
        window = [r for r in steps if end - 2 < r["step"] <= end]
        np.testing.assert_allclose(logged["train/loss"][end], np.mean([r["loss"] for r in window]), rtol=1e-6)
        np.testing.assert_allclose(logged["train/grad_norm"][end], np.mean([r["grad_norm"] for r in window]),
                                   rtol=1e-6)
        np.testing.assert_allclose(logged["train/learning_rate"][end], window[-1]["lr"], rtol=1e-6)
        tokens = sum(r["tokens"] for r in window) / sum(r["seconds"] for r in window)
        np.testing.assert_allclose(logged["train/tokens_per_s"][end], tokens, rtol=1e-5)
    assert sorted(logged["train/loss"]) == [2, 4, 6]
    # Held-out loss on the --eval-steps schedule: before, at 2 and 4, and after.
    assert sorted(logged["eval/loss"]) == sorted(evals) == [0, 2, 4, 6]
    for step, record in evals.items():
        np.testing.assert_allclose(logged["eval/loss"][step], record["eval_loss"], rtol=1e-6)
        np.testing.assert_allclose(logged["eval/perplexity"][step], np.exp(record["eval_loss"]), rtol=1e-5)
    assert "train/peak_memory_bytes" not in logged or logged["train/peak_memory_bytes"][2] > 0  # CPU: none


@pytest.mark.slow  # a run and its resume
def test_a_resumed_run_replaces_the_steps_it_trains_again_in_tensorboard(assets, tmp_path):
    output = tmp_path / "tb"
    assert main(finetune_args(assets, output, "--report-to", "tensorboard", "--save-every", "3",
                              "--eval-every", "0")) == 0
    # As if killed after logging step 6 but before its checkpoint: the resume trains 4-6 again.
    shutil.rmtree(output / "checkpoints" / str(STEPS))
    assert main(["finetune", "--output", str(output), "--resume", "--no-progress", "--samples", "0"]) == 0
    steps = [step for step, _ in scalar_events(output / "tensorboard", "train/loss")]
    assert steps == list(range(1, STEPS + 1))  # one value a step: the first run's 4-6 were purged
    losses = {r["step"]: r["loss"] for r in metrics(output) if "loss" in r}
    for step, value in scalar_events(output / "tensorboard", "train/loss"):
        np.testing.assert_allclose(value, losses[step], rtol=1e-6)
    # The resumed run's event file says so itself (a purge from step 4), whatever reads it.
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    second = sorted((output / "tensorboard").iterdir())[-1]
    starts = [e.step for e in EventFileLoader(str(second)).Load()
              if e.HasField("session_log") and e.session_log.status == e.session_log.START]
    assert starts == [4]


def scalar_events(logdir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logdir))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


# -- Weights & Biases, offline: a run directory, and no network touched -------------------------------

class ConnectionCounter:
    """A local TCP listener that counts connections: where every HTTP(S) request of the child is sent."""

    def __init__(self):
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(16)
        self.port = self.server.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            self.connections += 1
            client.close()

    def close(self):
        self.server.close()


GUARD = """
import socket, sys
refused = []
def guarded(self, address):
    if self.family == socket.AF_UNIX or (isinstance(address, tuple) and address[0] in ("127.0.0.1", "::1")):
        return real(self, address)
    refused.append(address)
    raise OSError("network access refused by the test")
real = socket.socket.connect
socket.socket.connect = guarded
from lora_jax.cli import main
code = main(sys.argv[1:])
print("REFUSED", refused, file=sys.stderr)
sys.exit(code)
"""


@pytest.mark.slow  # a traced subprocess starting wandb's service
def test_wandb_writes_an_offline_run_and_touches_no_network(assets, tmp_path):
    pytest.importorskip("wandb")
    output = tmp_path / "wb"
    counter = ConnectionCounter()
    proxy = f"http://127.0.0.1:{counter.port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path / "home"), PYTHONPATH=os.pathsep.join(sys.path), JAX_PLATFORMS="cpu",
               HTTP_PROXY=proxy, HTTPS_PROXY=proxy, http_proxy=proxy, https_proxy=proxy, NO_PROXY="",
               WANDB_BASE_URL=proxy)  # any request wandb (or its service process) made would land here
    command = [sys.executable, "-c", GUARD, *finetune_args(assets, output, "--report-to", "wandb")]
    strace = shutil.which("strace")
    trace = tmp_path / "connect.trace"
    if strace and subprocess.run([strace, "-f", "-qq", "-e", "trace=connect", "-o", os.devnull, "true"],
                                 capture_output=True).returncode == 0:
        command = [strace, "-f", "-qq", "-e", "trace=connect", "-o", str(trace), *command]
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    finally:
        counter.close()
    assert done.returncode == 0, done.stderr
    assert "REFUSED []" in done.stderr  # nothing in the training process tried the network
    assert counter.connections == 0     # nor wandb's service process, through the proxy or base URL
    if trace.exists():                  # nor any process at all: every connect(2) is to a local socket
        connects = [line for line in trace.read_text().splitlines() if "connect(" in line]
        assert connects and all("AF_UNIX" in line or "127.0.0.1" in line for line in connects), connects
    runs = list((output / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    (log,) = runs[0].glob("run-*.wandb")
    data = log.read_bytes()
    assert b"train/loss" in data and b"eval/loss" in data


def test_a_missing_logging_package_is_named_before_anything_is_written(monkeypatch, tmp_path, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorboardX" else real(name, *a))
    code = main(["finetune", "--tiny", "--output", str(tmp_path / "out"), "--report-to", "tensorboard"])
    err = capsys.readouterr().err
    assert code == 2 and "--report-to tensorboard needs the tensorboardX package" in err
    assert "pip install 'lora-jax[logging]'" in err and not (tmp_path / "out").exists()


def test_report_to_names_are_checked(capsys, tmp_path):
    code = main(["finetune", "--report-to", "mlflow", "--output", str(tmp_path / "out")])
    assert code == 2 and "--report-to: expected 'none', 'all' or" in capsys.readouterr().err
    assert parse_report_to("tensorboard, wandb") == ("tensorboard", "wandb")


# -- what is logged, and the moving average --------------------------------------------------------------

class Collected:
    def __init__(self):
        self.logged, self.closed = [], False

    def scalars(self, values, step):
        self.logged.append((step, dict(values)))

    def close(self):
        self.closed = True


def test_the_reporter_logs_window_means_peak_memory_and_every_evaluation():
    writer = Collected()
    reporter = Reporter([writer], logging_steps=3, memory=lambda: 12345)
    losses = [4.0, 3.0, 2.5, 2.0, 1.0]
    for step, loss in enumerate(losses, start=1):
        reporter.write({"step": step, "loss": loss, "lr": 0.1 * step, "grad_norm": step, "tokens": 10 * step,
                        "seconds": 0.5, "epoch": 0})
    reporter.write({"step": 5, "eval_loss": 1.5, "eval_perplexity": float(np.exp(1.5))})
    reporter.close()
    (s1, first), (s2, evaluation), (s3, last) = writer.logged
    assert (s1, s2, s3) == (3, 5, 5) and writer.closed
    assert first["train/loss"] == pytest.approx(np.mean(losses[:3]))
    assert first["train/tokens_per_s"] == pytest.approx((10 + 20 + 30) / 1.5)
    assert first["train/learning_rate"] == pytest.approx(0.3) and first["train/peak_memory_bytes"] == 12345
    assert last["train/loss"] == pytest.approx(1.5) and last["train/grad_norm"] == pytest.approx(4.5)
    assert evaluation == {"eval/loss": 1.5, "eval/perplexity": pytest.approx(np.exp(1.5))}


def test_peak_memory_is_reported_only_where_the_backend_has_it():
    import jax

    stats = jax.local_devices()[0].memory_stats()
    if stats is None:
        assert peak_memory_bytes() is None
    else:
        assert peak_memory_bytes() == stats.get("peak_bytes_in_use", stats.get("bytes_in_use"))


def test_the_moving_average_is_debiased():
    values = np.random.default_rng(0).normal(3.0, 1.0, 50)
    beta = 0.9
    for t in range(1, 51):  # the reference: the weighted mean, weights beta**age, normalised
        weights = beta ** np.arange(t - 1, -1, -1)
        np.testing.assert_allclose(smoothed(list(values), beta)[t - 1], weights @ values[:t] / weights.sum(),
                                   rtol=1e-12)
    average = MovingAverage(beta)
    assert [average.update(2.0) for _ in range(5)] == pytest.approx([2.0] * 5)  # no climb from 0 or the first


def test_the_loss_curve_shows_every_evaluation(tensorboard_run):
    evals = [r for r in metrics(tensorboard_run) if "eval_loss" in r]
    assert len(evals) > 2  # --eval-steps: more than the before and after points
    assert (tensorboard_run / "loss_curve.png").stat().st_size > 1000
