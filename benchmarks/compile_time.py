"""Compile time of ``lora(apply_fn)`` against the base model's, layers unrolled and scanned.

On the SmolLM2-135M shape (30 layers), from abstract params (``ShapeDtypeStruct``s:
nothing is allocated, nothing runs), each program is built afresh (a new ``jax.jit`` of new
closures, so no trace or executable is reused) and its two phases are timed:

- ``lower_s``: tracing, the LoRA interpreter (for the LoRA programs) and lowering to StableHLO;
- ``compile_s``: XLA's compilation of that module.

Programs, each with the layers unrolled (one copy per layer) and with ``scan_layers=True``
(one ``nn.scan``-ed layer, LoRA factors stacked along the layer axis):

- training steps (AdamW, ``common.jax_train_step``): LoRA q,v, LoRA all-linear, JAX full
  fine-tuning (the base model's own training step) and the frozen-base step;
- forward passes: ``lora(apply_fn)`` with a q,v and an all-linear adapter, and ``apply_fn``.

The programs are compiled in turn, round after round, so slow minutes of the machine fall
on all of them; the ratios are medians of per-round ratios. Issue 10's target: the LoRA
program's lower + compile seconds at most 1.5x the base model's (the full fine-tuning step
for steps, ``apply_fn`` for forwards), unrolled and scanned. Compile time is wall time: run
it on a quiet machine (``uptime`` load under 1).

Usage::

    python benchmarks/compile_time.py            # 135M shape, 3 rounds: ~4 min on 2 quiet cores
    python benchmarks/compile_time.py --smoke    # tiny shape, one round, seconds
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402

RANK = 8
# name -> (program, step kind or None for a forward, targets or None, the base it is compared to)
PROGRAMS: dict[str, dict[str, Any]] = {
    "step_lora_qv": dict(program="step", kind="lora", targets="q,v", base="step_full", label="LoRA q,v step"),
    "step_lora_all": dict(program="step", kind="lora", targets="all-linear", base="step_full",
                          label="LoRA all-linear step"),
    "step_full": dict(program="step", kind="full", targets=None, base=None, label="full fine-tuning step (base)"),
    "step_frozen": dict(program="step", kind="frozen", targets=None, base="step_full", label="frozen-base step"),
    "forward_lora_qv": dict(program="forward", targets="q,v", base="forward_base", label="lora(apply_fn) q,v"),
    "forward_lora_all": dict(program="forward", targets="all-linear", base="forward_base",
                             label="lora(apply_fn) all-linear"),
    "forward_base": dict(program="forward", targets=None, base=None, label="apply_fn (base)"),
}
LAYOUTS = {"unrolled": False, "scanned": True}
FULL = dict(size="smollm2-135m", rounds=3, warmup=True, programs=list(PROGRAMS))
SMOKE = dict(size="tiny", rounds=1, warmup=False,
             programs=["step_lora_qv", "step_full", "forward_lora_qv", "forward_base"])
TARGET_RATIO = 1.5


def build(name: str, size: dict[str, Any], scanned: bool) -> tuple[Callable[..., Any], tuple[Any, ...]]:
    """A fresh jitted program and its abstract arguments."""
    import jax
    import jax.numpy as jnp

    import lora_jax

    spec = PROGRAMS[name]
    module, params = common.jax_model(size["hf"], abstract=True, scan_layers=scanned)
    ids = jax.ShapeDtypeStruct((size["batch"], size["seq"]), jnp.int32)
    config = common.lora_config(spec["targets"], RANK, scanned=scanned) if spec["targets"] else None
    if spec["program"] == "step":
        step, args = common.jax_train_step(spec["kind"], module, params, config)
        return step, (*args, ids)

    def apply(p: Any, x: Any) -> Any:
        return module.apply({"params": p}, x)

    if config is None:
        return jax.jit(apply), (params, ids)
    adapter = jax.eval_shape(lambda: lora_jax.init(config, params, jax.random.key(1)))
    return jax.jit(lora_jax.lora(apply, config)), (params, adapter, ids)


def time_compile(name: str, size: dict[str, Any], scanned: bool) -> dict[str, float]:
    fn, args = build(name, size, scanned)
    start = time.perf_counter()
    lowered = fn.lower(*args)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    done = time.perf_counter()
    gflops = compiled.cost_analysis()["flops"] / 1e9
    del compiled, lowered, fn, args
    gc.collect()
    return {"lower_s": lowered_at - start, "compile_s": done - lowered_at, "total_s": done - start, "gflops": gflops}


def measure(size_name: str, rounds: int, names: list[str], layouts: list[str], warmup: bool = True) -> dict[str, Any]:
    size = common.SIZES[size_name]
    # Warm-up: the first compile in a process pays one-off costs (LLVM set-up, cached
    # lowerings of library functions); do one small program of each kind first.
    for warm in ("step_lora_qv", "forward_lora_qv") if warmup else ():
        time_compile(warm, common.SIZES["tiny"], False)
    times: dict[tuple[str, str], list[dict[str, float]]] = {(n, lay): [] for lay in layouts for n in names}
    for r in range(rounds):
        for layout in layouts:
            for name in names:
                t = time_compile(name, size, LAYOUTS[layout])
                times[(name, layout)].append(t)
                print(f"[compile_time] round {r + 1}/{rounds} {layout} {name}: lower {t['lower_s']:.1f} s, "
                      f"compile {t['compile_s']:.1f} s", file=sys.stderr)
    rows = []
    for (name, layout), runs in times.items():
        spec = PROGRAMS[name]
        row: dict[str, Any] = {"program": name, "label": spec["label"], "layout": layout, "kind": spec["program"],
                               "targets": spec["targets"], "base": spec["base"], "rounds": runs,
                               "lower_s": common.median([t["lower_s"] for t in runs]),
                               "compile_s": common.median([t["compile_s"] for t in runs]),
                               "total_s": common.median([t["total_s"] for t in runs]),
                               "gflops": runs[0]["gflops"]}
        base = times.get((spec["base"], layout)) if spec["base"] else None
        if base:
            row["total_vs_base"] = common.median([a["total_s"] / b["total_s"] for a, b in zip(runs, base)])
            row["lower_vs_base"] = common.median([a["lower_s"] / b["lower_s"] for a, b in zip(runs, base)])
            row["compile_vs_base"] = common.median([a["compile_s"] / b["compile_s"] for a, b in zip(runs, base)])
        frozen = times.get(("step_frozen", layout))
        if spec["program"] == "step" and frozen and name != "step_frozen":
            row["total_vs_frozen"] = common.median([a["total_s"] / b["total_s"] for a, b in zip(runs, frozen)])
        rows.append(row)
    layers = size["hf"]["num_hidden_layers"]
    checks = [common.target(f"{r['label']} compile / base ({r['layout']}, {layers} layers)", r.get("total_vs_base"),
                            "<=", TARGET_RATIO, program=r["program"], layout=r["layout"],
                            required=size_name == "smollm2-135m")
              for r in rows if r["targets"]]
    return {"rows": rows, "targets": checks}


def table(rows: list[dict[str, Any]]) -> str:
    f = common.fmt
    headers = ["program", "layout", "lower s", "XLA compile s", "total s", "total / base", "lower / base",
               "compile / base", "total / frozen step", "GFLOP"]
    body = [[r["label"], r["layout"], f(r["lower_s"]), f(r["compile_s"]), f(r["total_s"]), f(r.get("total_vs_base")),
             f(r.get("lower_vs_base")), f(r.get("compile_vs_base")), f(r.get("total_vs_frozen")), f(r["gflops"], 1)]
            for r in rows]
    return common.markdown_table(headers, body)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shape, one round (seconds)")
    parser.add_argument("--out-dir", type=Path, default=common.RESULTS, help="where JSON and PNG go")
    parser.add_argument("--size", choices=list(common.SIZES), default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--programs", nargs="+", choices=list(PROGRAMS), default=None,
                        help="default: all (smoke: LoRA q,v and the base, step and forward)")
    parser.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), default=list(LAYOUTS))
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    common.limit_threads()
    started = time.perf_counter()
    spec = dict(SMOKE if args.smoke else FULL)
    spec["size"] = args.size or spec["size"]
    spec["rounds"] = args.rounds or spec["rounds"]
    spec["programs"] = args.programs or spec["programs"]
    result = measure(spec["size"], spec["rounds"], spec["programs"], args.layouts, spec["warmup"])
    stem = "compile_time_smoke" if args.smoke else "compile_time"
    payload = {"environment": common.environment(), "smoke": args.smoke, "size": spec["size"],
               "shape": common.SIZES[spec["size"]], "rank": RANK, "spec": spec, **result,
               "runtime_s": time.perf_counter() - started}
    common.write_json(args.out_dir / f"{stem}.json", payload)
    if not args.no_plot:
        import plots

        plots.compile_time(result["rows"], args.out_dir / f"{stem}.png")
    print(f"**{spec['size']}**, rank {RANK}, {common.THREADS} threads, median of {spec['rounds']} round(s):\n")
    print(table(result["rows"]))
    print("\nTargets (issue 10):\n\n" + common.targets_table(result["targets"]))
    print(f"\nwrote {args.out_dir / (stem + '.json')} in {payload['runtime_s']:.0f} s")
    return payload


if __name__ == "__main__":
    main()
