"""How a lora_jax training step scales: with rank, with the modules targeted, with depth.

On a small Llama-architecture model (so the whole sweep takes minutes on two cores):

- rank 1, 2, 4, ..., 256 on q_proj and v_proj: median step time (AdamW), XLA FLOPs and
  compiled memory, against full fine-tuning and the frozen-base floor;
- targets q,v -> q,k,v,o -> all-linear at rank 8;
- compile time of the LoRA step against the number of layers, with the layers unrolled
  (one copy per layer in the program) and scanned (``scan_layers=True``: one ``nn.scan``ed
  layer, LoRA factors stacked along the layer axis). ``trace`` is the time to trace the
  step, run the LoRA interpreter and lower to HLO (also shown for the same step without
  LoRA, full fine-tuning); ``compile`` is XLA's.

All variants are compiled in this one process and then timed round by round, so they
share the machine's background load; step time is the median over rounds. Each row's
achieved GFLOP/s is also given as ``fraction_of_peak`` of ``benchmarks/peak.py``'s float32
matmul peak (``--peak measure``, the default, runs it first; or ``--peak PATH``).

Usage::

    python benchmarks/scaling.py            # minutes
    python benchmarks/scaling.py --smoke    # seconds
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402

# Wide enough that rank 256 fits every targeted kernel (v_proj is 512 x 256).
MODEL = dict(model_type="llama", hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=4, vocab_size=4096, tie_word_embeddings=True,
             rope_theta=10000.0, max_position_embeddings=1024)
FULL = dict(hf=MODEL, batch=4, seq=64, ranks=[1, 2, 4, 8, 16, 32, 64, 128, 256],
            targets=["q,v", "q,k,v,o", "all-linear"], depths=[1, 2, 4, 8, 16, 32], rounds=10, steps=2)
SMOKE = dict(hf=common.SIZES["tiny"]["hf"], batch=2, seq=32, ranks=[2, 8], targets=["q,v", "all-linear"],
             depths=[1, 2], rounds=1, steps=2)
TARGET_RANK = 8


def compile_variant(kind: str, spec: dict[str, Any], targets: str | None = None, rank: int = TARGET_RANK,
                    *, layers: int | None = None, scanned: bool = False, abstract: bool = False) -> tuple[Any, Any, dict[str, Any]]:
    """Compile one training step; ``(compiled, (trainable, opt_state, frozen, ids), stats)``."""
    import jax
    import jax.numpy as jnp

    hf = dict(spec["hf"], num_hidden_layers=layers or spec["hf"]["num_hidden_layers"])
    module, params = common.jax_model(hf, abstract=abstract, scan_layers=scanned)
    config = common.lora_config(targets, rank, scanned=scanned) if targets else None
    step, (trainable, opt_state, frozen) = common.jax_train_step(kind, module, params, config)
    size = dict(hf=hf, batch=spec["batch"], seq=spec["seq"])
    ids = (jax.ShapeDtypeStruct((spec["batch"], spec["seq"]), jnp.int32) if abstract
           else jnp.asarray(common.token_batch(size)))
    compiled, stats = common.compile_stats(step, trainable, opt_state, frozen, ids)
    stats["trainable_params"] = sum(x.size for x in jax.tree.leaves(trainable))
    return compiled, (trainable, opt_state, frozen, ids), stats


def lower_time(kind: str, spec: dict[str, Any], *, layers: int, scanned: bool) -> float:
    """Seconds to trace and lower (not compile) a step without LoRA, for comparison."""
    import jax
    import jax.numpy as jnp

    hf = dict(spec["hf"], num_hidden_layers=layers)
    module, params = common.jax_model(hf, abstract=True, scan_layers=scanned)
    step, args = common.jax_train_step(kind, module, params)
    ids = jax.ShapeDtypeStruct((spec["batch"], spec["seq"]), jnp.int32)
    start = time.perf_counter()
    step.lower(*args, ids)
    return time.perf_counter() - start


def runner(compiled: Any, args: tuple[Any, ...]) -> Any:
    state = list(args)

    def run() -> None:
        state[0], state[1], loss = compiled(*state)
        loss.block_until_ready()

    return run


def sweep(spec: dict[str, Any], peak: dict[str, Any] | None = None) -> dict[str, Any]:
    """Rank and target sweeps (compiled, then timed together) and the depth sweep (compiled only)."""
    variants: dict[str, dict[str, Any]] = {}
    variants["full"] = dict(kind="full")
    variants["frozen"] = dict(kind="frozen")
    for rank in spec["ranks"]:
        variants[f"rank{rank}"] = dict(kind="lora", targets="q,v", rank=rank)
    for targets in spec["targets"]:
        if targets != "q,v" or TARGET_RANK not in spec["ranks"]:
            variants[f"targets:{targets}"] = dict(kind="lora", targets=targets, rank=TARGET_RANK)

    runs, stats = {}, {}
    for name, v in variants.items():
        compiled, args, stats[name] = compile_variant(v["kind"], spec, v.get("targets"), v.get("rank", TARGET_RANK))
        runs[name] = runner(compiled, args)
        common.time_steps(runs[name], 2)  # warm-up
    times: dict[str, list[list[float]]] = {name: [] for name in runs}
    for _ in range(spec["rounds"]):
        for name, run in runs.items():
            times[name].append(common.time_steps(run, spec["steps"]))

    def row(name: str) -> dict[str, Any]:
        v = variants[name]
        flat = [t for round_times in times[name] for t in round_times]
        return {"variant": name, "kind": v["kind"], "targets": v.get("targets"), "rank": v.get("rank"),
                "step_ms": 1e3 * common.median(flat), "round_times_s": times[name], **stats[name]}

    full, frozen = row("full"), row("frozen")
    ranks = [row(f"rank{r}") for r in spec["ranks"]]
    targets = []
    for t in spec["targets"]:
        targets.append(row(f"rank{TARGET_RANK}") if f"targets:{t}" not in variants else row(f"targets:{t}"))
        targets[-1]["targets"] = t
    for r in [*ranks, *targets, frozen]:
        r["time_vs_full"] = common.paired_ratio(r["round_times_s"], full["round_times_s"])
        r["time_vs_floor"] = common.paired_ratio(r["round_times_s"], frozen["round_times_s"])
        r["gflops_vs_full"] = r["gflops"] / full["gflops"]
        r["gflops_vs_floor"] = r["gflops"] / frozen["gflops"]
        r["total_mib_vs_full"] = r["total_mib"] / full["total_mib"]
    for r in [*ranks, *targets, full, frozen]:
        r["achieved_gflops_per_s"] = r["gflops"] / (r["step_ms"] / 1e3)
        r["fraction_of_peak"] = common.fraction_of_peak(r["achieved_gflops_per_s"], peak, "float32")

    depth = []
    for layers in spec["depths"]:
        for scanned in (False, True):
            _, _, s = compile_variant("lora", spec, "q,v", TARGET_RANK, layers=layers, scanned=scanned, abstract=True)
            plain_lower_s = lower_time("full", spec, layers=layers, scanned=scanned)
            depth.append({"layers": layers, "scanned": scanned, "lower_s": s["lower_s"], "compile_s": s["compile_s"],
                          "plain_lower_s": plain_lower_s, "gflops": s["gflops"], "total_mib": s["total_mib"]})
            print(f"[scaling] depth {layers} {'scanned' if scanned else 'unrolled'}: trace {s['lower_s']:.1f} s "
                  f"(no LoRA {plain_lower_s:.1f} s), compile {s['compile_s']:.1f} s", file=sys.stderr)
    return {"full": full, "frozen": frozen, "rank": ranks, "targets": targets, "depth": depth}


def tables(result: dict[str, Any]) -> str:
    f = common.fmt
    head = ["variant", "trainable params", "step ms", "time / full", "time / floor", "GFLOP", "GFLOP / full",
            "GFLOP / floor", "compiled MiB", "compiled / full", "of peak"]

    def line(label: str, r: dict[str, Any]) -> list[str]:
        share = r.get("fraction_of_peak")
        return [label, f"{r['trainable_params']:,}", f(r["step_ms"], 1), f(r.get("time_vs_full", 1.0)),
                f(r.get("time_vs_floor")),
                f(r["gflops"], 2), f(r.get("gflops_vs_full", 1.0), 3), f(r.get("gflops_vs_floor"), 3),
                f(r["total_mib"], 1), f(r.get("total_mib_vs_full", 1.0), 3),
                "-" if share is None else f"{100 * share:.0f}%"]

    full, frozen = result["full"], result["frozen"]
    rank_rows = [line(f"LoRA q,v r={r['rank']}", r) for r in result["rank"]]
    rank_rows += [line("full fine-tuning", full), line("frozen-base floor", frozen)]
    target_rows = [line(f"LoRA {r['targets']} r={r['rank']}", r) for r in result["targets"]]
    depth_head = ["layers", "unrolled: trace s", "unrolled: compile s", "unrolled: trace s without LoRA",
                  "scanned: trace s", "scanned: compile s", "scanned: trace s without LoRA"]
    depth_rows = []
    for layers in sorted({r["layers"] for r in result["depth"]}):
        u = next(r for r in result["depth"] if r["layers"] == layers and not r["scanned"])
        s = next(r for r in result["depth"] if r["layers"] == layers and r["scanned"])
        depth_rows.append([layers, f(u["lower_s"], 1), f(u["compile_s"], 1), f(u["plain_lower_s"], 1),
                           f(s["lower_s"], 1), f(s["compile_s"], 1), f(s["plain_lower_s"], 1)])
    return "\n\n".join([
        "Rank (q,v):\n\n" + common.markdown_table(head, rank_rows),
        "Targets:\n\n" + common.markdown_table(head, target_rows),
        "Compile time of the LoRA q,v step vs depth:\n\n" + common.markdown_table(depth_head, depth_rows),
    ])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shape, two ranks (seconds)")
    parser.add_argument("--out-dir", type=Path, default=common.RESULTS, help="where JSON and PNG go")
    common.add_peak_argument(parser)
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    common.limit_threads()
    started = time.perf_counter()
    spec = SMOKE if args.smoke else FULL
    peak = common.resolve_peak(args.peak, args.out_dir, args.smoke)
    result = sweep(spec, peak)
    stem = "scaling_smoke" if args.smoke else "scaling"
    payload = {"environment": common.environment(), "smoke": args.smoke, "peak": peak,
               "spec": {k: v for k, v in spec.items()}, **result, "runtime_s": time.perf_counter() - started}
    common.write_json(args.out_dir / f"{stem}.json", payload)
    if not args.no_plot:
        import plots

        plots.scaling(result, args.out_dir / f"{stem}.png")
    hf = spec["hf"]
    print(f"Model: hidden {hf['hidden_size']}, {hf['num_hidden_layers']} layers, vocab {hf['vocab_size']}; "
          f"batch {spec['batch']} x seq {spec['seq']}; AdamW; {common.THREADS} threads.\n")
    print(tables(result))
    print(f"\nwrote {args.out_dir / (stem + '.json')} in {payload['runtime_s']:.0f} s")
    return payload


if __name__ == "__main__":
    main()
