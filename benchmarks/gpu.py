"""The training-step table on a GPU in bfloat16, with MFU: lora_jax vs full fine-tuning vs qwix.

NOT YET RUN: no GPU was lent to the task that wrote this script; it is tested in ``--smoke``
mode on CPU only. On a GPU machine run it once (one command, < 8 minutes on an H200):

    python benchmarks/gpu.py --out-dir benchmarks/results     # writes gpu.json and gpu.png
    python benchmarks/gpu.py --smoke --out-dir /tmp/gpu       # tiny shape, CPU is fine (seconds)

For the SmolLM2-135M and Llama-3.2-1B shapes (``common.SIZES``), params and activations in
bfloat16 (LoRA factors and their AdamW state in float32, as lora_jax.init makes them; qwix
makes its factors in the base's dtype), batch 8 x 1024 tokens by default, the variants:

- ``lora_qv`` / ``lora_all``: lora_jax LoRA r=8 on q_proj, v_proj / on every linear layer;
- ``full``: JAX full fine-tuning (AdamW moments in the params' dtype, optax's default);
- ``frozen``: only the RMSNorm scales train, the frozen-base floor;
- ``qwix_qv`` / ``qwix_all``: qwix 0.1.8 LoRA with the same rank, alpha and targets.

All variants live in this one process (``XLA_PYTHON_CLIENT_PREALLOCATE=false``, so their
buffers share the GPU); they are lowered one by one and compiled in parallel threads, then
timed round after round (each round: ``--steps`` steps of every variant in turn), so the time
ratios are medians of per-round ratios. Recorded per variant: median step ms, tokens/s, XLA
FLOPs (``gflops``: the optimised program's ``cost_analysis``; ``gflops_hlo``: the lowered
module's, which counts every dot as 2mnk whatever library call the backend turns it into),
compiled memory (arguments + outputs - aliased + temporaries), and MFU = ``gflops_hlo`` per
second over the bf16 dense peak: the nominal one of the device (H100/H200 SXM: 989 TFLOP/s)
and the one ``benchmarks/peak.py``'s matmul measures on this device at the start of the run.
Step settings (``--remat``, ``--chunked-loss``) work as in ``train_step.py``.

The JSON is rewritten after each shape, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402

RANK = 8
VARIANTS: dict[str, dict[str, Any]] = {
    "lora_qv": dict(label="lora_jax LoRA q,v", kind="lora", targets="q,v", qwix="qwix_qv"),
    "lora_all": dict(label="lora_jax LoRA all-linear", kind="lora", targets="all-linear", qwix="qwix_all"),
    "full": dict(label="JAX full FT", kind="full", targets=None),
    "frozen": dict(label="JAX frozen-base floor", kind="frozen", targets=None),
    "qwix_qv": dict(label="qwix LoRA q,v", kind="qwix", targets="q,v"),
    "qwix_all": dict(label="qwix LoRA all-linear", kind="qwix", targets="all-linear"),
}
FULL = dict(sizes=["smollm2-135m", "llama-1b"], batch=8, seq=1024, rounds=5, steps=5, warmup=2)
# Smoke: one variant of each kind (the all-linear ones take the same code paths).
SMOKE = dict(sizes=["tiny"], batch=2, seq=32, rounds=1, steps=2, warmup=1,
             variants=["lora_qv", "full", "frozen", "qwix_qv"])
# Dense bfloat16 tensor-core peaks from the vendors' data sheets (TFLOP/s, no sparsity).
NOMINAL_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "GH200": 989.0, "A100": 312.0,
                       "L40S": 362.0, "L4": 121.0}


def nominal_peak_tflops(device_kind: str) -> float | None:
    """The data-sheet bf16 peak of a device kind such as ``"NVIDIA H200"`` (None if unknown).

    Example:
        >>> nominal_peak_tflops("NVIDIA H100 80GB HBM3")
        989.0
        >>> nominal_peak_tflops("cpu") is None
        True
    """
    kind = device_kind.upper()
    for name in sorted(NOMINAL_BF16_TFLOPS, key=len, reverse=True):
        if name in kind:
            return NOMINAL_BF16_TFLOPS[name]
    return None


def build_variant(name: str, module: Any, params: Any, settings: common.StepSettings) -> tuple[Any, tuple[Any, ...]]:
    """``(jitted step, (trainable, opt_state, frozen))``; the trainable tree is a private copy,
    because the step donates it and the variants share one base ``params``."""
    import jax

    variant = VARIANTS[name]
    if variant["kind"] == "qwix":
        step, (trainable, opt_state, frozen) = common.qwix_train_step(module, params, variant["targets"], RANK,
                                                                      settings=settings)
    else:
        config = common.lora_config(variant["targets"], RANK) if variant["targets"] else None
        step, (trainable, opt_state, frozen) = common.jax_train_step(variant["kind"], module, params, config,
                                                                     settings=settings)
    trainable = jax.tree.map(lambda x: x.copy(), trainable)
    opt_state = jax.tree.map(lambda x: x.copy(), opt_state)
    return step, (trainable, opt_state, frozen)


def measure_size(size_name: str, spec: dict[str, Any], names: list[str], settings: common.StepSettings,
                 peaks: dict[str, float | None]) -> list[dict[str, Any]]:
    """Build, compile (in parallel), warm up and time every variant on one shape."""
    import jax
    import jax.numpy as jnp

    size = dict(common.SIZES[size_name], batch=spec["batch"], seq=spec["seq"])
    started = time.perf_counter()
    module, params = common.jax_model(size["hf"], settings=settings, dtype="bfloat16")
    ids = jnp.asarray(common.token_batch(size))
    built, lowered, stats = {}, {}, {}
    for name in names:
        step, args = build_variant(name, module, params, settings)
        start = time.perf_counter()
        lowered[name] = step.lower(*args, ids)
        lower_s = time.perf_counter() - start
        try:
            hlo = lowered[name].cost_analysis() or {}
        except Exception:  # a backend without HLO cost analysis: fall back to the compiled count below
            hlo = {}
        stats[name] = {"lower_s": lower_s, "gflops_hlo": hlo.get("flops", float("nan")) / 1e9,
                       "trainable_params": sum(x.size for x in jax.tree.leaves(args[0])),
                       "total_params": sum(x.size for x in jax.tree.leaves(params)),
                       "trainable_dtype": str(jax.tree.leaves(args[0])[0].dtype)}
        built[name] = args

    def compile_one(name: str) -> Any:
        start = time.perf_counter()
        compiled = lowered[name].compile()
        stats[name]["compile_s"] = time.perf_counter() - start
        return compiled

    # XLA:GPU compiles mostly on the host's cores (16 on an H200 machine): in parallel. On a
    # 2-core CPU host parallel compiles only fight over the cores: one at a time.
    workers = 1 if jax.default_backend() == "cpu" else len(names)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        compiled = dict(zip(names, pool.map(compile_one, names)))
    print(f"[gpu] {size_name}: compiled {len(names)} variants in {time.perf_counter() - started:.0f} s", file=sys.stderr)

    runs = {}
    for name in names:
        memory = compiled[name].memory_analysis()
        cost = compiled[name].cost_analysis() or {}
        mib = 2**20
        stats[name].update(
            gflops=cost.get("flops", float("nan")) / 1e9,
            argument_mib=memory.argument_size_in_bytes / mib, temp_mib=memory.temp_size_in_bytes / mib,
            total_mib=(memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
                       + memory.temp_size_in_bytes) / mib,
            step_settings=common.settings_applied(module, settings))
        state = list(built[name])
        exe = compiled[name]

        def run(state: list[Any] = state, exe: Any = exe) -> None:
            state[0], state[1], loss = exe(state[0], state[1], state[2], ids)
            loss.block_until_ready()

        common.time_steps(run, spec["warmup"])
        runs[name] = run
    times: dict[str, list[list[float]]] = {name: [] for name in names}
    for _ in range(spec["rounds"]):
        for name, run in runs.items():
            times[name].append(common.time_steps(run, spec["steps"]))
    print(f"[gpu] {size_name}: done in {time.perf_counter() - started:.0f} s", file=sys.stderr)

    tokens = size["batch"] * size["seq"]
    rows = []
    for name in names:
        flat = [t for r in times[name] for t in r]
        row: dict[str, Any] = {"size": size_name, "variant": name, "label": VARIANTS[name]["label"],
                               "targets": VARIANTS[name]["targets"], "rank": RANK if VARIANTS[name]["targets"] else None,
                               "batch": size["batch"], "seq": size["seq"], "dtype": "bfloat16", **stats[name],
                               "round_times_s": times[name], "step_ms": 1e3 * common.median(flat)}
        seconds = row["step_ms"] / 1e3
        row["tokens_per_s"] = tokens / seconds
        hlo_known = row["gflops_hlo"] == row["gflops_hlo"] and row["gflops_hlo"] > 0
        row["mfu_flops_source"] = "lowered HLO" if hlo_known else "compiled program"
        row["achieved_tflops_per_s"] = (row["gflops_hlo"] if hlo_known else row["gflops"]) / seconds / 1e3
        for key, peak in peaks.items():
            row[f"mfu_{key}"] = row["achieved_tflops_per_s"] / peak if peak else None
        rows.append(row)
    by_name = {r["variant"]: r for r in rows}
    full, floor = by_name.get("full"), by_name.get("frozen")
    for row in rows:
        if full:
            row["time_vs_full"] = common.paired_ratio(row["round_times_s"], full["round_times_s"])
            row["total_mib_vs_full"] = row["total_mib"] / full["total_mib"]
        if floor:
            row["time_vs_floor"] = common.paired_ratio(row["round_times_s"], floor["round_times_s"])
            row["gflops_vs_floor"] = row["gflops_hlo"] / floor["gflops_hlo"]
        qwix = by_name.get(VARIANTS[row["variant"]].get("qwix") or "")
        if qwix:
            row["time_vs_qwix"] = common.paired_ratio(row["round_times_s"], qwix["round_times_s"])
            row["total_mib_vs_qwix"] = row["total_mib"] / qwix["total_mib"]
    del compiled, runs, built, params
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    f = common.fmt

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.1f}%"

    headers = ["variant", "step ms", "tokens/s", "time / full", "time / floor", "time / qwix", "GFLOP (HLO)",
               "GFLOP / floor", "TFLOP/s", "MFU (nominal)", "MFU (measured peak)", "compiled MiB", "compiled / full",
               "compile s"]
    body = [[r["label"], f(r["step_ms"], 1), f(r["tokens_per_s"], 0), f(r.get("time_vs_full")),
             f(r.get("time_vs_floor")), f(r.get("time_vs_qwix")), f(r["gflops_hlo"], 2 if r["gflops_hlo"] < 10 else 0), f(r.get("gflops_vs_floor"), 3),
             f(r["achieved_tflops_per_s"], 3 if r["achieved_tflops_per_s"] < 1 else 1), pct(r.get("mfu_nominal")), pct(r.get("mfu_measured")),
             f(r["total_mib"], 0), f(r.get("total_mib_vs_full"), 3), f(r["lower_s"] + r["compile_s"], 1)]
            for r in rows]
    return common.markdown_table(headers, body)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shape, 2 steps (runs on CPU)")
    parser.add_argument("--out-dir", type=Path, default=common.RESULTS, help="where JSON and PNG go")
    parser.add_argument("--sizes", nargs="+", choices=list(common.SIZES), default=None)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=None,
                        help="default: all (smoke: lora_qv full frozen qwix_qv)")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--remat", default=None, help="as train_step.py (default: the lora-jax finetune default)")
    parser.add_argument("--chunked-loss", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--no-measure-peak", action="store_true", help="MFU against the nominal peak only")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    # Several variants' buffers share the device; XLA's default grabs 75% for the first.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if args.smoke:
        common.limit_threads()  # CPU smoke runs share this machine's two cores
    import jax
    import peak as peak_benchmark

    started = time.perf_counter()
    spec = dict(SMOKE if args.smoke else FULL)
    spec.setdefault("variants", list(VARIANTS))
    for key in ("sizes", "batch", "seq", "rounds", "variants"):
        if getattr(args, key) is not None:
            spec[key] = getattr(args, key)
    settings = common.resolve_step_settings(args.remat, args.chunked_loss)
    device = jax.devices()[0]
    peaks: dict[str, float | None] = {"nominal": nominal_peak_tflops(device.device_kind)}
    measured_peak = None
    if not args.no_measure_peak:
        sizes = peak_benchmark.SMOKE_SIZES if device.platform == "cpu" else (4096, 8192)
        measured_peak = peak_benchmark.measure(sizes, ("bfloat16",), min_reps=3, min_seconds=0.2)
        peaks["measured"] = measured_peak["peak_gflops_per_s"]["bfloat16"] / 1e3
    stem = "gpu_smoke" if args.smoke else "gpu"
    payload: dict[str, Any] = {
        "environment": {**common.environment(), "device_kind": device.device_kind, "platform": device.platform,
                        "threads": common.THREADS if args.smoke else None},
        "smoke": args.smoke, "spec": spec, "rank": RANK, "peak_tflops": peaks, "peak_measurement": measured_peak,
        "step_settings": None, "results": {}}
    for size_name in spec["sizes"]:
        rows = measure_size(size_name, spec, spec["variants"], settings, peaks)
        payload["results"][size_name] = rows
        payload["step_settings"] = rows[0]["step_settings"]
        payload["runtime_s"] = time.perf_counter() - started
        common.write_json(args.out_dir / f"{stem}.json", payload)
    if not args.no_plot:
        import plots

        plots.gpu(payload["results"], args.out_dir / f"{stem}.png")
    for size_name, rows in payload["results"].items():
        print(f"**{size_name}** on {device.device_kind}, bf16, batch {spec['batch']} x {spec['seq']}, rank {RANK}:\n")
        print(table(rows) + "\n")
    nominal = "-" if peaks["nominal"] is None else f"{peaks['nominal']:.0f}"
    measured = "-" if peaks.get("measured") is None else f"{peaks['measured']:.1f}"
    print(f"MFU = HLO FLOPs per second / bf16 peak (nominal {nominal} TFLOP/s; measured matmul {measured} TFLOP/s).")
    print(f"\nwrote {args.out_dir / (stem + '.json')} in {payload['runtime_s']:.0f} s")
    return payload


if __name__ == "__main__":
    main()
