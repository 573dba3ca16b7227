"""This machine's matmul FLOP/s: the physical limit every step benchmark is measured against.

Times jit-compiled square matmuls ``C = A @ B`` (n x n, 2 n^3 FLOPs; XLA's own
``cost_analysis`` count is recorded beside it) of a few sizes, in float32 and bfloat16,
on the same threads the step benchmarks use (``common.limit_threads``: 2 cores on CPU).
Each size runs until it has ``--min-reps`` timed calls and at least ``--min-seconds`` of
them; the size's rate is ``2 n^3 / median call time``. The peak of a dtype is the best
size's rate: what XLA's dot reaches on this backend with these threads.

bfloat16: GPUs and TPUs multiply it natively; on CPU ``bf16_native`` says whether the
processor advertises bf16 dot instructions (``avx512_bf16`` / ``amx_bf16``), and the
measured rate says whether XLA:CPU uses them (it may convert to float32 instead).

Other benchmarks read the figure from this script's JSON (``--peak PATH``) or run this
script in the same run (``--peak measure``, their default) and report each step's achieved
GFLOP/s (XLA FLOPs / median step time) as a fraction of ``peak_gflops_per_s[dtype]``.

Usage::

    python benchmarks/peak.py                 # ~30 s on 2 quiet CPU cores; results/peak.json
    python benchmarks/peak.py --smoke         # small sizes, a few seconds
    python benchmarks/peak.py --all-threads   # every core the process may use (GPU hosts)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402

DTYPES = ("float32", "bfloat16")
CPU_SIZES = (512, 1024, 2048, 3072)
ACCELERATOR_SIZES = (2048, 4096, 8192, 16384)
SMOKE_SIZES = (128, 256)


def cpu_bf16_flags() -> list[str]:
    """The bf16 dot instruction sets this CPU advertises (Linux ``/proc/cpuinfo``)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags |= set(line.split(":", 1)[1].split())
    return sorted(flags & {"avx512_bf16", "amx_bf16", "avx_vnni_bf16"})


def measure_size(n: int, dtype: str, min_reps: int, min_seconds: float) -> dict[str, Any]:
    """Rate of one jit'd n x n matmul: compile once, warm up once, then time calls."""
    import jax
    import jax.numpy as jnp

    ka, kb = jax.random.split(jax.random.key(n))
    a = jax.random.normal(ka, (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(kb, (n, n), jnp.float32).astype(dtype)
    compiled = jax.jit(jnp.matmul).lower(a, b).compile()
    xla_flops = compiled.cost_analysis()["flops"]
    compiled(a, b).block_until_ready()
    times: list[float] = []
    while len(times) < min_reps or sum(times) < min_seconds:
        start = time.perf_counter()
        compiled(a, b).block_until_ready()
        times.append(time.perf_counter() - start)
        if len(times) >= 200:
            break
    flops = 2.0 * n**3
    seconds = common.median(times)
    return {"dtype": dtype, "n": n, "gflop": flops / 1e9, "xla_gflop": xla_flops / 1e9, "times_s": times,
            "median_s": seconds, "gflops_per_s": flops / seconds / 1e9,
            "best_gflops_per_s": flops / min(times) / 1e9}


def measure(sizes: tuple[int, ...], dtypes: tuple[str, ...] = DTYPES, min_reps: int = 5,
            min_seconds: float = 1.0) -> dict[str, Any]:
    """Every size in every dtype; ``peak_gflops_per_s`` = each dtype's best size's rate."""
    import jax

    rows = []
    for dtype in dtypes:
        for n in sizes:
            row = measure_size(n, dtype, min_reps, min_seconds)
            rows.append(row)
            print(f"[peak] {dtype} n={n}: {row['gflops_per_s']:.1f} GFLOP/s", file=sys.stderr)
    peak = {dtype: max(r["gflops_per_s"] for r in rows if r["dtype"] == dtype) for dtype in dtypes}
    backend = jax.default_backend()
    flags = cpu_bf16_flags() if backend == "cpu" else []
    return {"rows": rows, "peak_gflops_per_s": peak,
            "peak_size": {d: max((r for r in rows if r["dtype"] == d), key=lambda r: r["gflops_per_s"])["n"]
                          for d in dtypes},
            "device_kind": jax.devices()[0].device_kind, "device_count_used": 1,
            "bf16_native": backend != "cpu" or bool(flags), "cpu_bf16_flags": flags}


def table(result: dict[str, Any]) -> str:
    f = common.fmt
    rows = [[r["dtype"], r["n"], f(r["gflop"], 2), f(r["median_s"] * 1e3, 2), f(r["gflops_per_s"], 1),
             f(r["best_gflops_per_s"], 1)] for r in result["rows"]]
    return common.markdown_table(["dtype", "n", "GFLOP", "median ms", "GFLOP/s (median)", "GFLOP/s (best)"], rows)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="small sizes, a few seconds")
    parser.add_argument("--out-dir", type=Path, default=common.RESULTS, help="where the JSON goes")
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="matmul sizes n (n x n @ n x n)")
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES))
    parser.add_argument("--min-reps", type=int, default=5)
    parser.add_argument("--min-seconds", type=float, default=1.0, help="least timed seconds per size")
    parser.add_argument("--all-threads", action="store_true",
                        help=f"do not pin to {common.THREADS} cores (accelerator hosts)")
    parser.add_argument("--no-plot", action="store_true", help="accepted for symmetry; draws nothing")
    args = parser.parse_args(argv)
    if not args.all_threads:
        common.limit_threads()
    import jax

    started = time.perf_counter()
    if args.sizes:
        sizes = tuple(args.sizes)
    elif args.smoke:
        sizes = SMOKE_SIZES
    else:
        sizes = CPU_SIZES if jax.default_backend() == "cpu" else ACCELERATOR_SIZES
    min_seconds = 0.05 if args.smoke else args.min_seconds
    min_reps = 2 if args.smoke else args.min_reps
    result = measure(sizes, tuple(args.dtypes), min_reps, min_seconds)
    env = common.environment()
    env["threads"] = None if args.all_threads else common.THREADS
    payload = {"environment": env, "smoke": args.smoke, **result, "runtime_s": time.perf_counter() - started}
    stem = "peak_smoke" if args.smoke else "peak"
    common.write_json(args.out_dir / f"{stem}.json", payload)
    print(table(result))
    peaks = ", ".join(f"{d} {v:.1f} GFLOP/s" for d, v in result["peak_gflops_per_s"].items())
    print(f"\npeak: {peaks} (bf16 native: {result['bf16_native']})")
    print(f"wrote {args.out_dir / (stem + '.json')} in {payload['runtime_s']:.0f} s")
    return payload


if __name__ == "__main__":
    main()
