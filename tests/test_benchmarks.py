"""Every benchmark script runs end to end in --smoke mode and writes JSON, a PNG and a table.

The scripts run as subprocesses writing to a temporary ``--out-dir``, so
``benchmarks/results/`` is never overwritten. Only deterministic readings are
checked here (XLA FLOPs, compiled memory, parameter counts, output equality),
never wall times.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def run_smoke(script: str, out_dir: Path) -> tuple[dict, str]:
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / f"{script}.py"), "--smoke", "--out-dir", str(out_dir)],
        capture_output=True, text=True, timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert (out_dir / f"{script}_smoke.png").stat().st_size > 10_000
    assert "|---|" in proc.stdout  # the Markdown table
    return json.loads((out_dir / f"{script}_smoke.json").read_text()), proc.stdout


def test_train_step_smoke_compares_every_variant_on_the_same_model(tmp_path):
    data, _ = run_smoke("train_step", tmp_path)
    rows = {r["variant"]: r for r in data["results"]["tiny"]}
    assert set(rows) == {"lora_qv", "lora_all", "naive_qv", "full", "frozen", "peft_qv", "peft_all", "torch_full"}
    # One architecture on both sides, and the same adapter sizes as PEFT.
    assert len({r["total_params"] for r in rows.values()}) == 1
    assert rows["lora_qv"]["trainable_params"] == rows["peft_qv"]["trainable_params"]
    assert rows["lora_all"]["trainable_params"] == rows["peft_all"]["trainable_params"]
    assert rows["full"]["trainable_params"] == rows["torch_full"]["trainable_params"]
    for row in rows.values():
        assert row["step_ms"] > 0 and len(row["step_times_s"]) == 2 and row["peak_rss_mib"] > 0
    # The LoRA step needs fewer FLOPs and less memory than full fine-tuning, and stays at the floor.
    assert rows["lora_qv"]["gflops"] < rows["full"]["gflops"]
    assert rows["lora_qv"]["total_mib"] < rows["full"]["total_mib"]
    assert rows["lora_qv"]["gflops_vs_floor"] <= 1.05


def test_inference_smoke_merged_equals_base_flops_and_unmerged_outputs(tmp_path):
    data, _ = run_smoke("inference", tmp_path)
    checks = data["checks"]
    assert checks["merged_flops_equal_base"]
    assert checks["unmerged_vs_merged_max_abs"] <= checks["tolerance"]
    assert checks["merged_vs_reference_max_abs"] <= checks["tolerance"]
    rows = {r["variant"]: r for r in data["rows"]}
    assert set(rows) == {"base", "merged", "unmerged"}
    # The unmerged adapter adds two thin dots per target: a small FLOP overhead, never a dense kernel.
    assert 1.0 < rows["unmerged"]["decode_gflops_vs_base"] < 1.2


def test_scaling_smoke_sweeps_rank_targets_and_depth(tmp_path):
    data, _ = run_smoke("scaling", tmp_path)
    ranks = data["rank"]
    assert [r["rank"] for r in ranks] == data["spec"]["ranks"]
    flops = [r["gflops"] for r in ranks]
    assert flops == sorted(flops) and flops[-1] < data["full"]["gflops"]
    params = [r["trainable_params"] for r in ranks]
    assert params[1] * ranks[0]["rank"] == params[0] * ranks[1]["rank"]  # A and B grow linearly in r
    assert [r["targets"] for r in data["targets"]] == data["spec"]["targets"]
    assert {(r["layers"], r["scanned"]) for r in data["depth"]} == {
        (d, s) for d in data["spec"]["depths"] for s in (False, True)}


@pytest.mark.parametrize("script", ["train_step", "inference", "scaling"])
def test_benchmark_script_help(script):
    proc = subprocess.run([sys.executable, str(BENCHMARKS / f"{script}.py"), "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--smoke" in proc.stdout and "--out-dir" in proc.stdout
