"""``--streaming``: data read, tokenized and batched as training goes, in bounded memory, resuming bitwise."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from lora_jax.train import read_chatterbot
from lora_jax.train.records import RecordStream, held_out
from lora_jax.train.streaming import StreamingBatches, scan_stream
from lora_jax.train.tiny import save_tiny, texts_of, tiny_model, tiny_tokenizer
from lora_jax.train.tokenize import Example


def by_number(records):
    """A stand-in tokenizer: record "n ..." -> ids (n + 1) repeated, so each row says which record it is."""
    out = []
    for record in records:
        n = int(record["text"].split()[0])
        length = 3 + n % 9
        out.append(Example(np.full(length, n + 1, np.int32), np.ones(length, bool), record["source"]))
    return out


def write_numbered(path: Path, count: int, pad: int = 0) -> Path:
    with path.open("w") as f:
        for i in range(count):
            f.write(json.dumps({"text": f"{i} " + "x" * pad}) + "\n")
    return path


def make(path, **options):
    settings = dict(batch_size=4, seq_len=16, seed=7, pad_id=0, window=25, eval_fraction=0.1)
    settings.update(options)
    return StreamingBatches(RecordStream([path]), by_number, **settings)


def rows_of(batch):
    """The record numbers in a batch's rows (padding rows left out)."""
    ids = batch["input_ids"].reshape(-1, batch["input_ids"].shape[-1])
    mask = batch["attention_mask"].reshape(ids.shape)
    return [int(row[0]) - 1 for row, m in zip(ids, mask) if m.any()]


def test_an_epoch_trains_on_every_record_that_is_not_held_out_exactly_once(tmp_path):
    file = write_numbered(tmp_path / "d.jsonl", 203)
    batches = make(file)
    seen, step = [], 0
    while True:
        batch = batches.batch(step)
        if batches.position(step).epoch == 1:
            break
        seen += rows_of(batch)
        step += 1
    count, held, evals = scan_stream(RecordStream([file]), eval_fraction=0.1, seed=7, max_eval=1000)
    held_numbers = {int(r["text"].split()[0]) for r in evals}
    assert (count, len(held_numbers)) == (203, held) and 5 < held < 40
    assert sorted(seen) == sorted(set(range(203)) - held_numbers)  # each training record once, no held-out one


def test_each_epoch_and_window_has_its_own_order(tmp_path):
    file = write_numbered(tmp_path / "d.jsonl", 100)
    batches = make(file, eval_fraction=0.0, window=50)
    epochs: dict[int, list[int]] = {}
    for step in range(3 * 25):  # 13 batches an epoch (2 windows of 50 rows: 13 + 13 with a short one each)
        batch = batches.batch(step)
        epochs.setdefault(batches.position(step).epoch, []).extend(rows_of(batch))
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(100))
    assert epochs[0] != epochs[1]
    assert set(epochs[0][:50]) == set(range(50))  # a record stays in its window: windows come in file order
    assert epochs[0][:50] != list(range(50))      # and is shuffled inside it


def test_a_resume_from_any_saved_position_serves_the_same_batches_bitwise(tmp_path):
    file = write_numbered(tmp_path / "d.jsonl", 130)
    reference = make(file, grad_accum=2, packing=True, batch_size=2)
    batches, positions = [], []
    for step in range(60):  # several epochs
        positions.append(json.loads(json.dumps(reference.data_position(step))))  # as a checkpoint stores it
        batches.append(reference.batch(step))
    for resume_step in (1, 7, 16, 17, 33, 59):
        resumed = make(file, grad_accum=2, packing=True, batch_size=2)
        resumed.resume_at(resume_step, positions[resume_step])
        for step in range(resume_step, min(resume_step + 12, 60)):
            got = resumed.batch(step)
            for key in ("input_ids", "attention_mask", "loss_mask"):
                np.testing.assert_array_equal(got[key], batches[step][key], err_msg=f"{key}, step {step}")


def test_a_jump_without_a_position_replays_to_the_same_batch(tmp_path):
    file = write_numbered(tmp_path / "d.jsonl", 60)
    reference = make(file)
    expected = [reference.batch(step)["input_ids"] for step in range(30)]
    np.testing.assert_array_equal(make(file).batch(23)["input_ids"], expected[23])


def test_a_resume_refuses_data_that_changed_under_the_checkpoint(tmp_path):
    file = write_numbered(tmp_path / "d.jsonl", 100)
    batches = make(file)
    for step in range(10):
        batches.batch(step)
    position = batches.data_position(10)
    lines = file.read_text().splitlines()
    lines[position["window"] * 25 + 3] = json.dumps({"text": "999 changed"})
    file.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"the data of epoch 0, window \d is not what the checkpoint's run read"):
        make(file).resume_at(10, position)
    with pytest.raises(ValueError, match="windows of 25 records, this one 30"):
        make(file, window=30).resume_at(10, position)


def test_held_out_records_from_the_scan_are_the_ones_the_rule_picks(tmp_path):
    file = write_numbered(tmp_path / "d.jsonl", 5000)
    count, held, evals = scan_stream(RecordStream([file]), eval_fraction=0.05, seed=1, max_eval=30)
    picked = np.flatnonzero(held_out(np.arange(5000), 0.05, seed=1))
    assert count == 5000 and held == len(picked)
    assert [int(r["text"].split()[0]) for r in evals] == picked[:30].tolist()  # the first 30, in order


# -- bounded memory ------------------------------------------------------------------------------------

def traced_peak(function) -> int:
    tracemalloc.start()
    try:
        function()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_streaming_an_epoch_of_a_large_file_keeps_one_window_in_memory(tmp_path):
    file = write_numbered(tmp_path / "big.jsonl", 30_000, pad=400)  # ~12 MB of JSON lines
    size = file.stat().st_size
    assert size > 12e6
    batches = make(file, window=200, eval_fraction=0.01)

    def one_epoch():
        step = 0
        while True:
            batches.batch(step)
            if batches.position(step).epoch == 1:
                return
            step += 1

    peak = traced_peak(one_epoch)
    # Reading it all (load_records) would hold far more than the file; the stream holds one window.
    assert peak < size / 10, f"{peak / 1e6:.1f} MB traced while streaming a {size / 1e6:.0f} MB file"


def test_streaming_a_parquet_file_reads_it_in_pieces(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    count = 50_000
    file = tmp_path / "big.parquet"
    pq.write_table(pa.table({"text": [f"{i} " + "y" * 200 for i in range(count)]}), file,
                   row_group_size=2000)  # a Parquet file is read a row group at a time
    small = tmp_path / "small.parquet"
    pq.write_table(pa.table({"text": ["0 warm-up"]}), small)
    assert len(list(RecordStream([small]).records())) == 1  # imports done before memory is traced
    peak_arrow = 0

    def read_all():
        nonlocal peak_arrow
        for index, _ in enumerate(RecordStream([file]).records()):
            if index % 500 == 0:
                peak_arrow = max(peak_arrow, pa.total_allocated_bytes())
        assert index == count - 1

    text_bytes = count * 200
    peak = traced_peak(read_all)
    assert peak < text_bytes / 10 and peak_arrow < text_bytes / 5, (peak, peak_arrow)


# -- a real run: killed, resumed, the same adapter ---------------------------------------------------

STEPS = 40


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("streaming")
    records = read_chatterbot(strict=False)[::7][:200]
    tokenizer = tiny_tokenizer(texts_of(records), vocab_size=320)
    model_dir = save_tiny(root / "model", tiny_model(len(tokenizer), hidden_size=32), tokenizer)
    data = root / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in records))
    env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(sys.path),
               JAX_COMPILATION_CACHE_DIR=str(root / "xla-cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               XLA_FLAGS="--xla_backend_optimization_level=0")
    return {"model": model_dir, "data": data, "root": root, "env": env}


def streaming_run(setup, output: Path) -> list[str]:
    return [sys.executable, "-m", "lora_jax", "finetune", "--tiny", "--model", str(setup["model"]),
            "--data", str(setup["data"]), "--output", str(output), "--streaming", "--shuffle-buffer", "30",
            "--steps", str(STEPS), "--save-every", "3", "--keep", "2", "--dropout", "0.1", "--buckets", "1",
            "--no-progress", "--samples", "0", "--eval-every", "0", "--max-examples", "100"]


def finished_steps(output: Path) -> list[int]:
    directory = output / "checkpoints"
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.is_dir() else []


@pytest.mark.slow  # three training processes
def test_a_killed_streaming_run_resumes_to_the_same_adapter_bitwise(setup):
    whole = setup["root"] / "whole"
    done = subprocess.run(streaming_run(setup, whole), env=setup["env"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "streamed in windows of 30" in done.stderr
    epochs = {json.loads(line).get("epoch") for line in (whole / "metrics.jsonl").read_text().splitlines()}
    assert {0, 1} <= epochs  # the run went past the end of the data into a second epoch

    killed = setup["root"] / "killed"
    process = subprocess.Popen(streaming_run(setup, killed), env=setup["env"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not finished_steps(killed):
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline, "no checkpoint within 240 s"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert not (killed / "adapter").exists(), "the run finished before it was killed"
    resumed = subprocess.run([sys.executable, "-m", "lora_jax", "finetune", "--output", str(killed), "--resume",
                              "--no-progress", "--samples", "0"], env=setup["env"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    expected = load_file(str(whole / "adapter" / "adapter_model.safetensors"))
    got = load_file(str(killed / "adapter" / "adapter_model.safetensors"))
    assert sorted(got) == sorted(expected)
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
