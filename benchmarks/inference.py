"""Inference with a LoRA adapter: base model vs merged weights vs unmerged (x@W + s(x@A)@B).

Three ways to serve the same Llama-architecture model, r=8 on q_proj and v_proj:

- ``base``: the plain model, no adapter (the reference cost);
- ``merged``: ``lora_jax.merge(params, adapter)`` once, then the plain model: same program
  as ``base``, so the same FLOPs and latency;
- ``unmerged``: ``lora_jax.lora(module.apply)`` with the adapter kept apart (what
  mixed-adapter serving or training-time evaluation needs).

Measured: per-token decode latency at batch 1 (one jitted KV-cached step, as
``lora_jax.models.generate`` runs it in its decode loop) and prefill latency at batch 32,
each with XLA's compiled FLOPs. Checks: merged logits equal the base model run on weights
merged independently in numpy (float64), unmerged logits match merged ones, and merged
compiled FLOPs equal the base model's. Timings are interleaved round by round so the three
variants share the machine's background load; latencies are medians and the ratios to
``base`` are medians of per-round ratios (``merged`` runs the very program ``base`` runs,
so its ratio shows how much noise is left).

Usage::

    python benchmarks/inference.py            # smollm2-135m shape
    python benchmarks/inference.py --smoke    # tiny shape, seconds
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402

RANK = 8
TARGETS = "q,v"
# size, prompt length, decode steps per round (the first, after a fresh cache copy, is not
# timed), prefill batch x seq, rounds of decode and of prefill
FULL = dict(size="smollm2-135m", prompt=64, decode_steps=16, prefill_batch=32, prefill_seq=64, rounds=8,
            prefill_rounds=5)
SMOKE = dict(size="tiny", prompt=8, decode_steps=4, prefill_batch=32, prefill_seq=16, rounds=1, prefill_rounds=1)
VARIANTS = {"base": "base model", "merged": "merged (W + s*A@B)", "unmerged": "unmerged LoRA (lora_jax.lora)"}


def make_adapter(config: Any, params: Any) -> Any:
    """An adapter with a non-zero B (a trained adapter's shape of values), so merging changes outputs."""
    import jax

    import lora_jax

    adapter = lora_jax.init(config, params, jax.random.key(1))
    keys = iter(jax.random.split(jax.random.key(2), len(adapter)))
    return {name: {"lora_A": pair["lora_A"], "lora_B": 0.01 * jax.random.normal(next(keys), pair["lora_B"].shape)}
            for name, pair in adapter.items()}


def reference_merge(params: Any, adapter: Any, config: Any) -> Any:
    """``W + s*A@B`` in numpy float64, independently of lora_jax.merge."""
    import jax
    import numpy as np

    import lora_jax

    targets = {t.path: t for t in lora_jax.find_targets(config, params).values()}

    def fold(path: Any, w: Any) -> Any:
        target = targets.get(path)
        if target is None:
            return w
        pair = adapter[target.module_name]
        a, b = np.asarray(pair["lora_A"], np.float64), np.asarray(pair["lora_B"], np.float64)
        return np.asarray(np.asarray(w, np.float64) + target.scaling * a @ b, np.float32)

    return jax.tree_util.tree_map_with_path(fold, params)


def build(spec: dict[str, Any]) -> dict[str, Any]:
    """Params, adapter, the three variants' compiled decode/prefill steps and their inputs."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import lora_jax

    size = common.SIZES[spec["size"]]
    module, params = common.jax_model(size["hf"])
    config = common.lora_config(TARGETS, RANK)
    adapter = make_adapter(config, params)
    merged = lora_jax.merge(params, adapter, config)
    max_len = spec["prompt"] + spec["decode_steps"]

    def apply(p: Any, ids: Any, mask: Any, positions: Any, cache: Any) -> Any:
        return module.apply({"params": p}, ids, attention_mask=mask, positions=positions, cache=cache)

    lora_apply = lora_jax.lora(apply, config)

    def prefill_fn(call: Callable[..., Any], length: int) -> Callable[..., Any]:
        def prefill(p: Any, ids: Any) -> Any:
            batch, seq = ids.shape
            cache = module.init_cache(batch, length)
            mask = jnp.ones((batch, length), jnp.int32)
            positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
            logits, cache = call(p, ids, mask, positions, cache)
            return logits[:, -1], cache
        return prefill

    def decode_fn(call: Callable[..., Any]) -> Callable[..., Any]:
        def decode(p: Any, token: Any, cache: Any) -> Any:
            batch = token.shape[0]
            mask = jnp.ones((batch, max_len), jnp.int32)
            positions = jnp.broadcast_to(cache["index"], (batch, 1))
            logits, cache = call(p, token, mask, positions, cache)
            return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)[:, None], cache
        return decode

    # The adapter is an argument of the unmerged program (not a baked-in constant), so a
    # new adapter needs no recompilation.
    calls = {"base": apply, "merged": apply,
             "unmerged": lambda params_and_adapter, *a: lora_apply(*params_and_adapter, *a)}
    variant_params = {"base": params, "merged": merged, "unmerged": (params, adapter)}
    rng = np.random.default_rng(0)
    prompt = jnp.asarray(rng.integers(0, size["hf"]["vocab_size"], (1, spec["prompt"]), dtype=np.int32))
    prefill_ids = jnp.asarray(rng.integers(0, size["hf"]["vocab_size"], (spec["prefill_batch"], spec["prefill_seq"]),
                                           dtype=np.int32))
    built: dict[str, Any] = {"params": params, "adapter": adapter, "merged": merged, "config": config,
                             "module": module, "prompt": prompt, "prefill_ids": prefill_ids, "variants": {}}
    for name, call in calls.items():
        p = variant_params[name]
        # Each variant is lowered and compiled on its own, so the FLOP counts are three readings.
        decode, decode_stats = common.compile_stats(jax.jit(decode_fn(call), donate_argnums=(2,)), p,
                                                    prompt[:, :1], module.init_cache(1, max_len))
        prefill, prefill_stats = common.compile_stats(jax.jit(prefill_fn(call, spec["prefill_seq"])), p, prefill_ids)
        fill_prompt = jax.jit(prefill_fn(call, max_len))
        _, prompt_cache = fill_prompt(p, prompt)
        built["variants"][name] = dict(params=p, decode=decode, prefill=prefill, prompt_cache=prompt_cache,
                                       decode_stats=decode_stats, prefill_stats=prefill_stats)
    return built


def check_outputs(built: dict[str, Any]) -> dict[str, Any]:
    """Full-sequence logits: merged vs numpy-merged weights, unmerged vs merged, base vs merged."""
    import jax
    import numpy as np

    module, ids = built["module"], built["prefill_ids"][:4]
    forward = jax.jit(lambda p, x: module.apply({"params": p}, x))
    reference = reference_merge(built["params"], built["adapter"], built["config"])
    lora_forward = jax.jit(lambda p, a, x: __import__("lora_jax").lora(
        lambda q, y: module.apply({"params": q}, y), built["config"])(p, a, x))
    merged = np.asarray(forward(built["merged"], ids))
    by_reference = np.asarray(forward(reference, ids))
    unmerged = np.asarray(lora_forward(built["params"], built["adapter"], ids))
    base = np.asarray(forward(built["params"], ids))
    scale = float(np.max(np.abs(merged)))
    checks = {
        "merged_vs_reference_max_abs": float(np.max(np.abs(merged - by_reference))),
        "unmerged_vs_merged_max_abs": float(np.max(np.abs(unmerged - merged))),
        "base_vs_merged_max_abs": float(np.max(np.abs(base - merged))),
        "logit_scale": scale,
    }
    # float32 logits through dozens of layers: a few ulps of the logit scale, not bitwise.
    tolerance = 1e-4 * max(scale, 1.0)
    checks["tolerance"] = tolerance
    assert checks["merged_vs_reference_max_abs"] <= tolerance, checks
    assert checks["unmerged_vs_merged_max_abs"] <= tolerance, checks
    assert checks["base_vs_merged_max_abs"] > 100 * tolerance, ("the adapter must change the outputs", checks)
    return checks


def time_variants(built: dict[str, Any], spec: dict[str, Any]) -> dict[str, dict[str, list[float]]]:
    """Decode (per token, batch 1) and prefill seconds of every variant, interleaved by round."""
    import jax

    times: dict[str, dict[str, list[list[float]]]] = {n: {"decode": [], "prefill": []} for n in built["variants"]}

    def decode_round(v: dict[str, Any]) -> list[float]:
        cache = jax.tree.map(lambda x: x.copy(), v["prompt_cache"])
        token = built["prompt"][:, -1:]
        state = {"token": token, "cache": cache}

        def one() -> None:
            state["token"], state["cache"] = v["decode"](v["params"], state["token"], state["cache"])
            state["token"].block_until_ready()

        one()  # warm: first call after a fresh cache copy
        return common.time_steps(one, spec["decode_steps"] - 1)

    def prefill_once(v: dict[str, Any]) -> None:
        jax.block_until_ready(v["prefill"](v["params"], built["prefill_ids"]))

    for v in built["variants"].values():  # warm-up
        prefill_once(v)
        decode_round(v)
    for _ in range(spec["rounds"]):
        for name, v in built["variants"].items():
            times[name]["decode"].append(decode_round(v))
    for _ in range(spec["prefill_rounds"]):
        for name, v in built["variants"].items():
            times[name]["prefill"].append(common.time_steps(lambda v=v: prefill_once(v), 1))
    return times


def table(rows: list[dict[str, Any]], spec: dict[str, Any]) -> str:
    f = common.fmt
    headers = ["variant", "decode ms/token (batch 1)", "decode vs base", "decode MFLOP/token",
               f"prefill ms (batch {spec['prefill_batch']} x {spec['prefill_seq']})", "prefill vs base",
               "prefill GFLOP", "prefill GFLOP vs base"]
    body = [[r["label"], f(r["decode_ms"], 2), f(r["decode_vs_base"], 3), f(r["decode_gflops"] * 1e3, 1),
             f(r["prefill_ms"], 0), f(r["prefill_vs_base"], 3), f(r["prefill_gflops"], 2),
             f(r["prefill_gflops_vs_base"], 5)] for r in rows]
    return common.markdown_table(headers, body)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shape (seconds)")
    parser.add_argument("--out-dir", type=Path, default=common.RESULTS, help="where JSON and PNG go")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    common.limit_threads()
    started = time.perf_counter()
    spec = SMOKE if args.smoke else FULL
    built = build(spec)
    checks = check_outputs(built)
    times = time_variants(built, spec)
    rows = []
    for name, v in built["variants"].items():
        decode, prefill = times[name]["decode"], times[name]["prefill"]
        rows.append({
            "variant": name, "label": VARIANTS[name],
            "decode_ms": 1e3 * common.median([t for r in decode for t in r]), "decode_round_times_s": decode,
            "prefill_ms": 1e3 * common.median([t for r in prefill for t in r]), "prefill_round_times_s": prefill,
            "decode_gflops": v["decode_stats"]["gflops"], "prefill_gflops": v["prefill_stats"]["gflops"],
            "decode_compiled_mib": v["decode_stats"]["total_mib"],
            "prefill_compiled_mib": v["prefill_stats"]["total_mib"],
        })
    base = rows[0]
    for row in rows:
        # Paired by round (see common.paired_ratio); merged vs base shows the leftover noise.
        row["decode_vs_base"] = common.paired_ratio(row["decode_round_times_s"], base["decode_round_times_s"])
        row["prefill_vs_base"] = common.paired_ratio(row["prefill_round_times_s"], base["prefill_round_times_s"])
        row["decode_gflops_vs_base"] = row["decode_gflops"] / base["decode_gflops"]
        row["prefill_gflops_vs_base"] = row["prefill_gflops"] / base["prefill_gflops"]
    by_name = {r["variant"]: r for r in rows}
    checks["merged_flops_equal_base"] = (by_name["merged"]["decode_gflops"] == base["decode_gflops"]
                                         and by_name["merged"]["prefill_gflops"] == base["prefill_gflops"])
    assert checks["merged_flops_equal_base"], rows
    stem = "inference_smoke" if args.smoke else "inference"
    size = common.SIZES[spec["size"]]
    payload = {"environment": common.environment(), "smoke": args.smoke, "size": spec["size"],
               "shape": size["hf"], "rank": RANK, "targets": TARGETS, "spec": spec, "checks": checks,
               "rows": rows, "runtime_s": time.perf_counter() - started}
    common.write_json(args.out_dir / f"{stem}.json", payload)
    if not args.no_plot:
        import plots

        plots.inference(rows, args.out_dir / f"{stem}.png")
    print(f"**{spec['size']}**, LoRA r={RANK} on {TARGETS}, decode after a {spec['prompt']}-token prompt:\n")
    print(table(rows, spec))
    print(f"\nmerged vs numpy-merged weights: max |diff| {checks['merged_vs_reference_max_abs']:.2e}; "
          f"unmerged vs merged: {checks['unmerged_vs_merged_max_abs']:.2e} (logit scale {checks['logit_scale']:.2f}); "
          f"merged FLOPs == base FLOPs: {checks['merged_flops_equal_base']}")
    print(f"\nwrote {args.out_dir / (stem + '.json')} in {payload['runtime_s']:.0f} s")
    return payload


if __name__ == "__main__":
    main()
