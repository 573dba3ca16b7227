"""Every benchmark script runs end to end in --smoke mode and writes JSON, a PNG and a table.

The scripts run as subprocesses writing to a temporary ``--out-dir``, so
``benchmarks/results/`` is never overwritten. Only deterministic readings are
checked here (XLA FLOPs, compiled memory, parameter counts, output equality, the
fields the README tables are filled from), never wall times.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
SCRIPTS = ["train_step", "inference", "scaling", "peak", "compile_time", "gpu", "qlora", "qlora_quality",
           "mixed_batch"]


def run_smoke(script: str, out_dir: Path, *extra: str, png: bool = True) -> tuple[dict, str]:
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / f"{script}.py"), "--smoke", "--out-dir", str(out_dir), *extra],
        capture_output=True, text=True, timeout=1200, env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    if png:
        assert (out_dir / f"{script}_smoke.png").stat().st_size > 10_000
    assert "|---|" in proc.stdout  # the Markdown table
    return json.loads((out_dir / f"{script}_smoke.json").read_text()), proc.stdout


def test_train_step_smoke_compares_every_variant_on_the_same_model(tmp_path):
    data, _ = run_smoke("train_step", tmp_path)
    rows = {r["variant"]: r for r in data["results"]["tiny"]}
    assert set(rows) == {"lora_qv", "lora_all", "naive_qv", "full", "frozen", "peft_qv", "peft_all", "torch_full",
                         "qwix_qv", "qwix_all"}
    # One architecture on both sides, and the same adapter sizes as PEFT and qwix.
    assert len({r["total_params"] for r in rows.values()}) == 1
    assert rows["lora_qv"]["trainable_params"] == rows["peft_qv"]["trainable_params"] == rows["qwix_qv"]["trainable_params"]
    assert (rows["lora_all"]["trainable_params"] == rows["peft_all"]["trainable_params"]
            == rows["qwix_all"]["trainable_params"])
    assert rows["full"]["trainable_params"] == rows["torch_full"]["trainable_params"]
    for row in rows.values():
        assert row["step_ms"] > 0 and len(row["step_times_s"]) == 2 and row["peak_rss_mib"] > 0
        assert 0 < row["fraction_of_peak"]
    # Every JAX variant starts from the same base with B = 0: the same first loss, qwix included.
    jax_losses = [r["first_loss"] for r in rows.values() if r["framework"] == "jax"]
    assert max(jax_losses) - min(jax_losses) < 1e-5
    # The LoRA step needs fewer FLOPs and less memory than full fine-tuning, and stays at the floor;
    # qwix's LoRA does the same FLOPs within 1%.
    assert rows["lora_qv"]["gflops"] < rows["full"]["gflops"]
    assert rows["lora_qv"]["total_mib"] < rows["full"]["total_mib"]
    assert rows["lora_qv"]["gflops_vs_floor"] <= 1.05
    assert abs(rows["lora_qv"]["gflops_vs_qwix"] - 1) < 0.01
    # The README's target table: every issue-10 target appears, with its threshold and verdict.
    targets = {t["target"]: t for t in data["targets"]}
    assert {"all-linear LoRA time / JAX full FT", "all-linear LoRA time / PEFT all-linear", "q,v LoRA time / PEFT q,v",
            "q,v LoRA time / qwix q,v", "all-linear LoRA time / qwix all-linear",
            "all-linear LoRA compiled memory / JAX full FT", "q,v LoRA GFLOP / frozen floor",
            "all-linear LoRA achieved fraction of matmul peak"} <= set(targets)
    memory = targets["all-linear LoRA compiled memory / JAX full FT"]
    assert memory["value"] == rows["lora_all"]["total_mib"] / rows["full"]["total_mib"] and memory["threshold"] == 0.35
    assert all(t["met"] in (True, False) and not t["required"] for t in targets.values())  # tiny: not the shapes
    assert data["peak"]["peak_gflops_per_s"]["float32"] > 0
    assert data["step_settings"]["remat"] and data["step_settings"]["settings_source"]
    assert (tmp_path / "train_step_smoke_targets.png").stat().st_size > 10_000


def test_train_step_applies_remat_to_every_variant(tmp_path):
    data, _ = run_smoke("train_step", tmp_path, "--variants", "lora_all", "full", "qwix_all", "--remat", "full",
                        "--peak", "none", "--no-plot", png=False)
    rows = {r["variant"]: r for r in data["results"]["tiny"]}
    assert data["step_settings"]["remat"] == "full" and data["step_settings"]["remat_applied"] != "off"
    assert all(r["step_settings"]["remat"] == "full" for r in rows.values())
    assert data["peak"] is None and rows["full"]["fraction_of_peak"] is None


def test_peak_smoke_counts_the_matmul_flops_xla_counts(tmp_path):
    data, _ = run_smoke("peak", tmp_path, png=False)
    assert {r["dtype"] for r in data["rows"]} == {"float32", "bfloat16"}
    for row in data["rows"]:
        assert row["gflop"] == pytest.approx(2 * row["n"] ** 3 / 1e9)
        # XLA's count is 2n^3 plus lower-order (n^2) terms
        assert row["xla_gflop"] == pytest.approx(row["gflop"], rel=4 / row["n"])
        assert row["gflops_per_s"] > 0 and len(row["times_s"]) >= 2
    for dtype, value in data["peak_gflops_per_s"].items():
        assert value == max(r["gflops_per_s"] for r in data["rows"] if r["dtype"] == dtype)
    assert isinstance(data["bf16_native"], bool)


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
    assert all(r["fraction_of_peak"] > 0 for r in ranks) and data["peak"]["peak_gflops_per_s"]["float32"] > 0
    assert {(r["layers"], r["scanned"]) for r in data["depth"]} == {
        (d, s) for d in data["spec"]["depths"] for s in (False, True)}


def test_compile_time_smoke_times_lora_and_base_programs_in_both_layouts(tmp_path):
    data, _ = run_smoke("compile_time", tmp_path)
    rows = {(r["program"], r["layout"]): r for r in data["rows"]}
    assert set(rows) == {(p, layout) for p in data["spec"]["programs"] for layout in ("unrolled", "scanned")}
    for row in rows.values():
        assert row["lower_s"] > 0 and row["compile_s"] > 0 and len(row["rounds"]) == 1
        if row["base"]:
            assert row["total_vs_base"] > 0
    # The LoRA forward adds the thin dots to the base program, nothing kernel-sized.
    for layout in ("unrolled", "scanned"):
        lora, base = rows[("forward_lora_qv", layout)], rows[("forward_base", layout)]
        assert 1.0 < lora["gflops"] / base["gflops"] < 1.1
    assert {t["layout"] for t in data["targets"]} == {"unrolled", "scanned"}
    assert all(t["threshold"] == 1.5 for t in data["targets"])


def test_gpu_smoke_reports_mfu_on_cpu(tmp_path):
    data, _ = run_smoke("gpu", tmp_path)
    rows = {r["variant"]: r for r in data["results"]["tiny"]}
    assert set(rows) == set(data["spec"]["variants"])
    assert data["peak_tflops"]["nominal"] is None  # no data-sheet peak for a CPU
    for row in rows.values():
        assert row["dtype"] == "bfloat16" and row["step_ms"] > 0 and row["total_mib"] > 0
        assert row["mfu_measured"] > 0 and row["mfu_nominal"] is None
    assert rows["lora_qv"]["trainable_dtype"] == "float32"  # fp32 adapters over a bf16 base
    assert rows["lora_qv"]["gflops_vs_floor"] <= 1.05
    assert abs(rows["lora_qv"]["gflops_hlo"] / rows["qwix_qv"]["gflops_hlo"] - 1) < 0.01


def test_qlora_smoke_runs_every_base_or_says_why_not(tmp_path):
    data, _ = run_smoke("qlora", tmp_path)
    rows = {r["variant"]: r for r in data["results"]["tiny"]}
    assert set(rows) == set(data["spec"]["variants"])
    for name in ("lora_f32", "lora_bf16", "qwix_nf4"):  # need nothing unreleased
        assert "skipped" not in rows[name], rows[name]
        assert rows[name]["args_plus_temps_mib"] == rows[name]["argument_mib"] + rows[name]["temp_mib"]
    # Packed 4-bit kernels make the frozen base smaller than the bf16 one, which is half the float32 one.
    assert rows["qwix_nf4"]["frozen_mib"] < rows["lora_bf16"]["frozen_mib"]
    assert rows["lora_bf16"]["frozen_mib"] == pytest.approx(rows["lora_f32"]["frozen_mib"] / 2)
    nf4 = rows["lora_nf4"]
    assert "skipped" not in nf4, nf4  # lora() takes quantized params
    assert nf4["frozen_mib"] < rows["lora_bf16"]["frozen_mib"]
    assert nf4["quantized_bytes"]["bytes_per_quantized_param"] == pytest.approx(0.5625)
    assert abs(nf4["first_loss"] - rows["lora_bf16"]["first_loss"]) < 0.05  # B = 0: the bases' own losses
    assert {t["target"] for t in data["targets"]} >= {"NF4 compiled memory (args + temps) / bf16 base",
                                                        "NF4 step time / bf16 base", "lora_jax NF4 time / qwix NF4"}
    # The 8 -> 16 layer measurement (here 2 -> 4 on the tiny shape), scanned and unrolled.
    scaling = {row["scanned"]: row for row in data["layer_scaling"]}
    assert set(scaling) == {False, True}
    for row in scaling.values():
        assert row["kernel_argument_bytes_per_param"] == pytest.approx(row["packed_bytes_per_param"], rel=0.05)
        assert row["packed_bytes_per_param"] == pytest.approx(0.5625)
        assert row["one_layer_dequantized_mib"] > 0 and "temp_growth_vs_one_layer" in row


def test_qlora_quality_smoke_compares_quantized_and_float_runs(tmp_path):
    data, _ = run_smoke("qlora_quality", tmp_path, "--runs-dir", str(tmp_path / "runs"), "--schemes", "nf4",
                        png=False)
    runs = {r["scheme"]: r for r in data["runs"]}
    assert set(runs) == {"float32", "nf4"}
    assert runs["nf4"]["settings"]["quantize"] == "nf4" and "quantize" not in runs["float32"]["settings"]
    assert runs["nf4"]["perplexity_vs_float32"] == pytest.approx(
        runs["nf4"]["eval_after"]["perplexity"] / runs["float32"]["eval_after"]["perplexity"])
    assert [t["threshold"] for t in data["targets"]] == [1.05]


def test_mixed_batch_smoke_matches_peft_rows_and_tokens(tmp_path):
    data, _ = run_smoke("mixed_batch", tmp_path)
    rows = {r["variant"]: r for r in data["rows"]}
    ns = data["spec"]["adapters"]
    assert {f"peft_mixed_{n}" for n in ns} <= set(rows)
    if data["lora_jax_mixed_batches"]:
        assert {f"lora_jax_mixed_{n}" for n in ns} | {"lora_jax_base", "lora_jax_single"} <= set(rows)
        for n in ns:
            check = data["checks"][str(n)]
            assert check["prefill_max_abs_diff"] <= 1e-4 * max(check["logit_scale"], 1.0)
            assert check["decode_tokens_equal_fraction"] == 1.0
            # The mixed prefill costs one adapter's FLOPs, whatever the number of adapters.
            assert rows[f"lora_jax_mixed_{n}"]["prefill_gflops"] == pytest.approx(
                rows["lora_jax_single"]["prefill_gflops"], rel=0.02)
    for row in rows.values():
        assert row["prefill_tokens_per_s"] > 0 and row["decode_tokens_per_s"] > 0
    assert len(data["targets"]) == 3


def test_qlora_abstract_layout_of_a_quantized_model_equals_quantizing_it():
    jax = pytest.importorskip("jax")
    import common
    import qlora

    if qlora.lora_jax_quantize() is None:
        pytest.skip("lora_jax.quantize is not installed")
    hf = common.SIZES["tiny"]["hf"]
    for scan in (False, True):
        for options in ({"double_quant": True}, qlora.quantize_options(qlora.VARIANTS["lora_nf4_embed"])):
            _, params = common.jax_model(hf, dtype="bfloat16", scan_layers=scan)
            extra = {"stacked_modules": qlora.STACKED} if scan else {}
            expected = qlora.lora_jax_quantize()(params, "nf4", **options, **extra)
            got = qlora.abstract_quantized(hf, "nf4", options, "bfloat16", scan_layers=scan)
            # Same tree (the quantized leaves' static shape, dtype and block size included) and the
            # same shape and dtype of every packed child.
            assert jax.tree.structure(got) == jax.tree.structure(expected)
            assert [(x.shape, x.dtype) for x in jax.tree.leaves(got)] == \
                [(x.shape, x.dtype) for x in jax.tree.leaves(expected)]


@pytest.mark.parametrize("weight_qtype", [None, "nf4"])
def test_qwix_step_compiles_from_abstract_params_with_the_same_flops(weight_qtype):
    # The 1B shape is compiled from abstract params only: that path must build the same program.
    jax = pytest.importorskip("jax")
    import common
    import jax.numpy as jnp

    size = common.SIZES["tiny"]
    ids = jnp.asarray(common.token_batch(size))
    flops = []
    for abstract in (False, True):
        module, params = common.jax_model(size["hf"], abstract=abstract, dtype="bfloat16" if weight_qtype else "float32")
        step, args = common.qwix_train_step(module, params, "q,v", 8, weight_qtype=weight_qtype,
                                            tile_size=64 if weight_qtype else None)
        flops.append(common.compile_stats(step, *args, jax.ShapeDtypeStruct(ids.shape, ids.dtype))[1]["gflops"])
    assert flops[0] == flops[1] > 0


def test_step_settings_go_to_the_model_field_or_wrap_the_forward():
    nn = pytest.importorskip("flax.linen")
    import common

    class WithRemat(nn.Module):
        remat: str = "none"

        @nn.compact
        def __call__(self, x):
            return nn.Dense(2)(x)

    settings = common.StepSettings(remat="dots")
    assert common.apply_model_settings(WithRemat(), settings).remat == "dots"
    assert common.settings_applied(WithRemat(), settings)["remat_applied"].startswith("per layer")
    assert common.settings_applied(nn.Dense(2), settings)["remat_applied"].startswith("whole forward")
    with pytest.raises(SystemExit, match="chunked"):
        common.settings_applied(nn.Dense(2), common.StepSettings(chunked_loss=True))
    defaults = common.resolve_step_settings(None, None)
    from lora_jax.train.settings import FinetuneSettings

    cli = FinetuneSettings().resolved()  # what `lora-jax finetune` runs with
    assert defaults.source.startswith("CLI defaults") and defaults.remat == cli.remat == "full"
    assert defaults.chunked_loss == bool(cli.chunked_loss)
    assert common.resolve_step_settings("full", False).source == "command line"


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_script_help(script):
    proc = subprocess.run([sys.executable, str(BENCHMARKS / f"{script}.py"), "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--smoke" in proc.stdout and "--out-dir" in proc.stdout
