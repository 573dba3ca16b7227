"""QLoRA: the LoRA training step on float32, bfloat16, int8 and NF4 frozen bases, and qwix QLoRA.

One LoRA recipe (r=8, alpha=16, every linear layer by default: the QLoRA paper's), the
same AdamW and batch, on bases stored in different formats:

- ``lora_f32``: float32 params, float32 compute;
- ``lora_bf16``: bfloat16 params and compute (the usual QLoRA baseline);
- ``lora_int8``: ``lora_jax.quantize.quantize(bf16 params, "int8")`` (bitsandbytes' row-wise int8);
- ``lora_nf4`` / ``lora_nf4_dq``: NF4, blocks of 64, without / with double quantization;
- ``lora_nf4_embed``: NF4 on the (tied) embedding table too, which bitsandbytes and
  ``lora-jax finetune --quantize`` leave in bfloat16 (a fifth of Llama-3.2-1B's parameters);
- ``qwix_bf16`` / ``qwix_nf4``: qwix 0.1.8 LoRA on the same linen module and bf16 base, the
  latter with ``weight_qtype="nf4"`` and ``tile_size=64`` on the same kernels (qwix QLoRA).

The quantized bases keep norms and embeddings in bfloat16 and compute in bfloat16; lora_jax's
factors and their AdamW state are float32, qwix's take the base's dtype. Every variant's
adapter starts at B = 0, so the first losses show how far each base is from the float one.

Recorded per variant: XLA's compiled memory (``argument_mib`` + ``temp_mib`` = what issue 11
calls compiled memory; ``total_mib`` also counts outputs minus donated aliases), FLOPs, the
frozen tree's bytes (and bytes per quantized param), and on the SmolLM2-135M shape the
median step time (variants timed in turn, round after round) with its fraction of the
matmul peak (``benchmarks/peak.py``, in the compute dtype). The Llama-3.2-1B shape is
compiled from abstract params only (its quantized layout is taken from one quantized
layer, so nothing 1B-sized is allocated).

A row lora_jax cannot build is recorded as ``skipped`` with the error that stopped it (the
quantized rows were, until ``lora()`` took quantized params).

Layer scaling (compile only, the Llama-3.2-1B width at 8 and 16 layers, scanned and
unrolled, NF4, one 8-token row so that activations do not grow the temporaries): the
frozen kernels' argument bytes per parameter (all argument bytes less the adapter, AdamW
state, batch and unquantized leaves) against the packed size + scales, and how much the
temporaries grow from 8 to 16 layers against one layer's dequantized kernels (in the
compute dtype): no dequantized kernel may outlive its layer.

Targets (issue 11): NF4 compiled memory <= 0.40x the bf16-base step's on the 1B shape;
NF4 step time <= 1.3x the bf16-base step's on CPU; against qwix NF4: at least as fast and
at most as much memory; frozen-kernel argument bytes within 5% of the packed size + scales;
temporaries growing by at most one layer's dequantized kernels from 8 to 16 layers.

Usage::

    python benchmarks/qlora.py              # 135M (run) + 1B (compiled): ~10 min on 2 quiet cores
    python benchmarks/qlora.py --smoke      # tiny shape, seconds
    python benchmarks/qlora.py --targets q,v --remat full
    python benchmarks/qlora.py --sizes llama-1b --no-layer-scaling   # compile-only figures only
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402

RANK = 8
VARIANTS: dict[str, dict[str, Any]] = {
    "lora_f32": dict(label="lora_jax LoRA, float32 base", side="lora_jax", dtype="float32", scheme=None),
    "lora_bf16": dict(label="lora_jax LoRA, bfloat16 base", side="lora_jax", dtype="bfloat16", scheme=None),
    "lora_int8": dict(label="lora_jax LoRA, int8 base", side="lora_jax", dtype="bfloat16", scheme="int8"),
    "lora_nf4": dict(label="lora_jax QLoRA, NF4 base", side="lora_jax", dtype="bfloat16", scheme="nf4"),
    "lora_nf4_dq": dict(label="lora_jax QLoRA, NF4 + double quant", side="lora_jax", dtype="bfloat16",
                        scheme="nf4", double_quant=True),
    "lora_nf4_embed": dict(label="lora_jax QLoRA, NF4 incl. embedding", side="lora_jax", dtype="bfloat16",
                           scheme="nf4", embedding=True),
    "qwix_bf16": dict(label="qwix LoRA, bfloat16 base", side="qwix", dtype="bfloat16", scheme=None),
    "qwix_nf4": dict(label="qwix QLoRA, NF4 (tile 64)", side="qwix", dtype="bfloat16", scheme="nf4"),
}
RUN_SIZES = ("smollm2-135m",)
COMPILE_ONLY_SIZES = ("llama-1b",)
FULL = dict(sizes=[*RUN_SIZES, *COMPILE_ONLY_SIZES], rounds=5, steps=1, warmup=2)
SMOKE = dict(sizes=["tiny"], rounds=1, steps=2, warmup=1, variants=["lora_f32", "lora_bf16", "lora_nf4", "qwix_nf4"])
QWIX_TILE = 64  # bitsandbytes' NF4 block size


def lora_jax_quantize() -> Any:
    """``lora_jax.quantize.quantize`` if the installed lora_jax has it, else None."""
    try:
        from lora_jax.quantize import quantize
    except ImportError:
        return None
    return quantize


EMBEDDING_TARGETS = r".*(embed_tokens|_proj)"  # with kernel_names ("kernel", "embedding")
STACKED = r"model\.layers\..*"


def quantize_options(variant: dict[str, Any]) -> dict[str, Any]:
    options: dict[str, Any] = {"double_quant": True} if variant.get("double_quant") else {}
    if variant.get("embedding"):
        options.update(target_modules=EMBEDDING_TARGETS, kernel_names=("kernel", "embedding"))
    return options


def abstract_4bit(like: Any, shape: tuple[int, ...]) -> Any:
    """An abstract NF4/FP4 array of ``shape`` laid out as ``like`` (same scheme, block size,
    double quantization): packed codes, then the absmax of each block (or its 8-bit codes,
    one scale per 256 blocks and an offset)."""
    import dataclasses
    import math

    import jax
    import numpy as np

    n = math.prod(shape)
    blocks = -(-n // like.blocksize)
    sds = jax.ShapeDtypeStruct
    children: dict[str, Any] = {"codes": sds(((n + 1) // 2,), np.uint8)}
    if like.double_quant:
        children.update(absmax_codes=sds((blocks,), np.uint8), absmax_scale=sds((-(-blocks // 256),), np.float32),
                        absmax_offset=sds((), np.float32))
    else:
        children["absmax"] = sds((blocks,), np.float32)
    return dataclasses.replace(like, **children, slice_shape=tuple(shape))


def abstract_quantized(hf: dict[str, Any], scheme: str, options: dict[str, Any], dtype: str,
                       scan_layers: bool = False) -> Any:
    """The abstract (``ShapeDtypeStruct``) quantized params of the whole model.

    ``quantize`` runs on the host in numpy, so it cannot run under ``jax.eval_shape``;
    every layer has the same shapes, so one layer is quantized for real (from ones: the
    values do not matter to shapes) and its layout stands for all of them (scanned: its
    layer axis is widened). A quantized embedding table is quantized on a 64-row stand-in
    and laid out for the real vocabulary (NF4/FP4 only), so nothing vocabulary-sized is
    allocated.
    """
    import jax
    import numpy as np

    from lora_jax.quantize import is_quantized

    quantize = lora_jax_quantize()
    small = dict(hf, num_hidden_layers=1, vocab_size=64)
    _, one_layer = common.jax_model(small, abstract=True, dtype=dtype, scan_layers=scan_layers)
    extra = {"stacked_modules": STACKED} if scan_layers else {}
    quantized = quantize(jax.tree.map(lambda s: np.ones(s.shape, s.dtype), one_layer), scheme, **options, **extra)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), quantized)
    _, full = common.jax_model(dict(hf, num_hidden_layers=1), abstract=True, dtype=dtype, scan_layers=scan_layers)
    full_shapes = dict(jax.tree_util.tree_flatten_with_path(full)[0])

    def full_size(path: Any, leaf: Any) -> Any:  # vocabulary-sized leaves at their real size
        shape = full_shapes[path].shape
        if not is_quantized(leaf):
            return jax.ShapeDtypeStruct(shape, leaf.dtype)
        if tuple(leaf.shape) == tuple(shape):
            return leaf
        if scheme not in ("nf4", "fp4"):
            raise ValueError(f"an abstract quantized embedding is laid out for nf4/fp4 only, not {scheme!r}")
        return abstract_4bit(leaf, shape)

    abstract = jax.tree_util.tree_map_with_path(full_size, abstract, is_leaf=is_quantized)
    layers = hf["num_hidden_layers"]
    if scan_layers:  # widen the stacked layer axis of every leaf under model.layers
        widen = lambda x: jax.ShapeDtypeStruct((layers,) + x.shape[1:], x.dtype)  # noqa: E731
        stacked = jax.tree.map(widen, abstract["model"]["layers"])
    else:
        stacked = {str(i): abstract["model"]["layers"]["0"] for i in range(layers)}
    return {**abstract, "model": {**abstract["model"], "layers": stacked}}


def tree_bytes(tree: Any) -> int:
    """Bytes of every array leaf (abstract or concrete) of ``tree``."""
    import jax
    import numpy as np

    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def build_variant(name: str, size: dict[str, Any], targets: str, settings: common.StepSettings,
                  compile_only: bool, bases: dict[str, Any], warmup: int) -> tuple[Callable[[], None] | None, dict[str, Any]]:
    """Compile one variant's step (and warm it up when run); ``(run one step or None, stats)``."""
    import jax
    import jax.numpy as jnp

    variant = VARIANTS[name]
    dtype = variant["dtype"]
    if dtype not in bases:  # one base per dtype, shared by the variants (nothing donates it)
        bases[dtype] = common.jax_model(size["hf"], abstract=compile_only, settings=settings, dtype=dtype)
    module, params = bases[dtype]
    stats: dict[str, Any] = {"compute_dtype": dtype, "scheme": variant["scheme"]}
    if variant["side"] == "qwix":
        step, (trainable, opt_state, frozen) = common.qwix_train_step(
            module, params, targets, RANK, settings=settings, weight_qtype=variant["scheme"],
            tile_size=QWIX_TILE if variant["scheme"] else None)
    else:
        frozen_params = params
        if variant["scheme"]:
            quantize = lora_jax_quantize()
            if quantize is None:
                raise NotImplementedError("the installed lora_jax has no lora_jax.quantize")
            options = quantize_options(variant)
            if compile_only:
                frozen_params = abstract_quantized(size["hf"], variant["scheme"], options, dtype)
            else:
                from lora_jax.quantize import quantized_bytes

                frozen_params = quantize(params, variant["scheme"], **options)
                stats["quantized_bytes"] = quantized_bytes(frozen_params)
        config = common.lora_config(targets, RANK)
        step, (trainable, opt_state, frozen) = common.jax_train_step("lora", module, frozen_params, config,
                                                                     settings=settings)
    ids: Any = (jax.ShapeDtypeStruct((size["batch"], size["seq"]), jnp.int32) if compile_only
                else jnp.asarray(common.token_batch(size)))
    compiled, compile_stats = common.compile_stats(step, trainable, opt_state, frozen, ids)
    stats.update(compile_stats)
    stats["args_plus_temps_mib"] = stats["argument_mib"] + stats["temp_mib"]
    stats["frozen_mib"] = tree_bytes(frozen) / 2**20
    stats["trainable_params"] = sum(x.size for x in jax.tree.leaves(trainable))
    stats["trainable_dtype"] = str(jax.tree.leaves(trainable)[0].dtype)
    stats["step_settings"] = common.settings_applied(module, settings)
    if compile_only:
        return None, stats
    state = {"trainable": trainable, "opt_state": opt_state}
    losses: list[Any] = []

    def run() -> None:
        state["trainable"], state["opt_state"], loss = compiled(state["trainable"], state["opt_state"], frozen, ids)
        losses.append(loss)
        loss.block_until_ready()

    common.time_steps(run, max(warmup, 1))
    stats["first_loss"] = float(losses[0])
    losses.clear()
    return run, stats


def measure_size(size_name: str, spec: dict[str, Any], names: list[str], targets: str,
                 settings: common.StepSettings, peak: dict[str, Any] | None) -> list[dict[str, Any]]:
    import gc

    compile_only = size_name in COMPILE_ONLY_SIZES
    size = common.SIZES[size_name]
    runs: dict[str, Callable[[], None]] = {}
    rows: dict[str, dict[str, Any]] = {}
    bases: dict[str, Any] = {}
    for name in names:
        variant = VARIANTS[name]
        row: dict[str, Any] = {"size": size_name, "variant": name, "label": variant["label"], "side": variant["side"],
                               "targets": targets, "rank": RANK, "batch": size["batch"], "seq": size["seq"],
                               "compiled_only": compile_only}
        try:
            run, stats = build_variant(name, size, targets, settings, compile_only, bases, spec["warmup"])
        except Exception as error:  # a scheme lora_jax cannot run yet: say why, keep going
            row["skipped"] = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
            row["traceback_tail"] = traceback.format_exc().splitlines()[-3:]
            print(f"[qlora] {size_name} {name}: skipped ({row['skipped']})", file=sys.stderr)
            rows[name] = row
            gc.collect()
            continue
        row.update(stats)
        rows[name] = row
        if run is not None:
            runs[name] = run
        print(f"[qlora] {size_name} {name}: compiled ({stats['args_plus_temps_mib']:.0f} MiB args + temps)",
              file=sys.stderr)
    times = {name: [] for name in runs}
    for _ in range(spec["rounds"]):
        for name, run in runs.items():
            times[name].append(common.time_steps(run, spec["steps"]))
    for name, round_times in times.items():
        row = rows[name]
        row["round_times_s"] = round_times
        row["step_ms"] = 1e3 * common.median([t for r in round_times for t in r])
        row["achieved_gflops_per_s"] = row["gflops"] / (row["step_ms"] / 1e3)
        row["fraction_of_peak"] = common.fraction_of_peak(row["achieved_gflops_per_s"], peak, row["compute_dtype"])
    add_ratios(rows)
    return list(rows.values())


def add_ratios(rows: dict[str, dict[str, Any]]) -> None:
    """Memory and time against the bf16-base LoRA step (and each lora_jax row's qwix peer)."""
    bf16 = rows.get("lora_bf16")
    peers = {"lora_nf4": "qwix_nf4", "lora_nf4_dq": "qwix_nf4", "lora_bf16": "qwix_bf16"}
    for name, row in rows.items():
        if "skipped" in row:
            continue
        if bf16 and "skipped" not in bf16:
            row["args_plus_temps_vs_bf16"] = row["args_plus_temps_mib"] / bf16["args_plus_temps_mib"]
            row["total_mib_vs_bf16"] = row["total_mib"] / bf16["total_mib"]
            if "round_times_s" in row and "round_times_s" in bf16:
                row["time_vs_bf16"] = common.paired_ratio(row["round_times_s"], bf16["round_times_s"])
        peer = rows.get(peers.get(name, ""))
        if peer and "skipped" not in peer:
            row["qwix_counterpart"] = peer["variant"]
            row["args_plus_temps_vs_qwix"] = row["args_plus_temps_mib"] / peer["args_plus_temps_mib"]
            if "round_times_s" in row and "round_times_s" in peer:
                row["time_vs_qwix"] = common.paired_ratio(row["round_times_s"], peer["round_times_s"])


SCALING = dict(size="llama-1b", layers=(8, 16), tokens=8)
SMOKE_SCALING = dict(size="tiny", layers=(2, 4), tokens=8)


def layer_scaling(size_name: str, layer_counts: tuple[int, int], tokens: int, targets: str,
                  settings: common.StepSettings) -> list[dict[str, Any]]:
    """NF4 LoRA step compiled at two depths, scanned and unrolled: frozen-kernel argument
    bytes per parameter and the growth of the temporaries (see the module docstring)."""
    import gc

    import jax
    import jax.numpy as jnp
    import numpy as np

    from lora_jax.quantize import is_quantized

    hf = common.SIZES[size_name]["hf"]
    rows = []
    for scan in (False, True):
        by_depth: dict[int, dict[str, Any]] = {}
        for layers in layer_counts:
            hf_n = dict(hf, num_hidden_layers=layers)
            module, _ = common.jax_model(hf_n, abstract=True, settings=settings, dtype="bfloat16", scan_layers=scan)
            frozen = abstract_quantized(hf_n, "nf4", {}, "bfloat16", scan_layers=scan)
            config = common.lora_config(targets, RANK, scanned=scan)
            step, (trainable, opt_state, frozen) = common.jax_train_step("lora", module, frozen, config,
                                                                         settings=settings)
            ids = jax.ShapeDtypeStruct((1, tokens), jnp.int32)
            _, stats = common.compile_stats(step, trainable, opt_state, frozen, ids)
            leaves = jax.tree.leaves(frozen, is_leaf=is_quantized)
            kernels = [leaf for leaf in leaves if is_quantized(leaf)]
            others = tree_bytes([leaf for leaf in leaves if not is_quantized(leaf)])
            others += tree_bytes(trainable) + tree_bytes(opt_state) + tokens * 4
            kernel_params = sum(k.size for k in kernels)
            by_depth[layers] = {
                "argument_mib": stats["argument_mib"], "temp_mib": stats["temp_mib"],
                "kernel_params": kernel_params,
                "kernel_argument_bytes_per_param": (stats["argument_mib"] * 2**20 - others) / kernel_params,
                "packed_bytes_per_param": sum(k.nbytes for k in kernels) / kernel_params,
                # One layer's quantized kernels, dequantized in the compute dtype.
                "one_layer_dequantized_mib": kernel_params / layers * np.dtype(jnp.bfloat16).itemsize / 2**20,
            }
            print(f"[qlora] layer scaling {size_name} {'scanned' if scan else 'unrolled'} {layers} layers: "
                  f"{stats['argument_mib']:.0f} MiB args, {stats['temp_mib']:.0f} MiB temps", file=sys.stderr)
            gc.collect()
        low, high = (by_depth[n] for n in layer_counts)
        growth = high["temp_mib"] - low["temp_mib"]
        rows.append({
            "size": size_name, "scanned": scan, "layers": list(layer_counts), "tokens": tokens,
            "by_layers": {str(n): v for n, v in by_depth.items()},
            "kernel_argument_bytes_per_param": high["kernel_argument_bytes_per_param"],
            "packed_bytes_per_param": high["packed_bytes_per_param"],
            "kernel_bytes_vs_packed": high["kernel_argument_bytes_per_param"] / high["packed_bytes_per_param"],
            "temp_growth_mib": growth, "one_layer_dequantized_mib": high["one_layer_dequantized_mib"],
            "temp_growth_vs_one_layer": growth / high["one_layer_dequantized_mib"],
        })
    return rows


def scaling_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    checks = []
    for row in rows:
        kind = "scanned" if row["scanned"] else "unrolled"
        required = row["size"] == SCALING["size"]
        checks.append(common.target(f"NF4 frozen-kernel argument bytes / packed size ({kind}), within 5%",
                                    abs(row["kernel_bytes_vs_packed"] - 1), "<=", 0.05, size=row["size"],
                                    required=required))
        checks.append(common.target(f"NF4 temps growth {row['layers'][0]} -> {row['layers'][1]} layers / one layer's "
                                    f"dequantized kernels ({kind})", row["temp_growth_vs_one_layer"], "<=", 1.0,
                                    size=row["size"], required=required))
    return checks


def scaling_table(rows: list[dict[str, Any]]) -> str:
    f = common.fmt
    headers = ["layers", "args MiB", "temps MiB", "kernel arg bytes / param", "packed bytes / param",
               "temps growth MiB", "one layer dequantized MiB", "growth / one layer"]
    body = []
    for r in rows:
        low, high = (r["by_layers"][str(n)] for n in r["layers"])
        body.append([f"{r['layers'][0]} -> {r['layers'][1]} ({'scanned' if r['scanned'] else 'unrolled'})",
                     f"{f(low['argument_mib'], 0)} -> {f(high['argument_mib'], 0)}",
                     f"{f(low['temp_mib'], 0)} -> {f(high['temp_mib'], 0)}",
                     f(r["kernel_argument_bytes_per_param"], 4), f(r["packed_bytes_per_param"], 4),
                     f(r["temp_growth_mib"], 1), f(r["one_layer_dequantized_mib"], 1),
                     f(r["temp_growth_vs_one_layer"], 3)])
    return common.markdown_table(headers, body)


def check_targets(results: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    checks = []
    for size_name, rows in results.items():
        nf4 = next((r for r in rows if r["variant"] == "lora_nf4"), {})
        big, run = size_name in COMPILE_ONLY_SIZES, size_name in RUN_SIZES
        checks.append(common.target("NF4 compiled memory (args + temps) / bf16 base", nf4.get("args_plus_temps_vs_bf16"),
                                    "<=", 0.40, size=size_name, required=big))
        embed = next((r for r in rows if r["variant"] == "lora_nf4_embed"), {})
        if embed:  # not the selection (bitsandbytes leaves embeddings alone): for comparison
            checks.append(common.target("NF4 incl. embedding compiled memory / bf16 base",
                                        embed.get("args_plus_temps_vs_bf16"), "<=", 0.40, size=size_name,
                                        required=False))
        if not (rows and rows[0]["compiled_only"]):
            checks.append(common.target("NF4 step time / bf16 base", nf4.get("time_vs_bf16"), "<=", 1.3,
                                        size=size_name, required=run))
            checks.append(common.target("lora_jax NF4 time / qwix NF4", nf4.get("time_vs_qwix"), "<=", 1.0,
                                        size=size_name, required=run))
        checks.append(common.target("lora_jax NF4 memory / qwix NF4", nf4.get("args_plus_temps_vs_qwix"), "<=", 1.0,
                                    size=size_name, required=run or big))
    return checks


def table(rows: list[dict[str, Any]]) -> str:
    f = common.fmt
    headers = ["variant", "step ms", "time / bf16", "time / qwix", "of peak", "args MiB", "temps MiB",
               "args + temps MiB", "vs bf16", "vs qwix", "frozen MiB", "GFLOP", "first loss"]
    body = []
    for r in rows:
        if "skipped" in r:
            body.append([r["label"], f"skipped: {r['skipped'][:80]}", *["-"] * (len(headers) - 2)])
            continue
        share = r.get("fraction_of_peak")
        body.append([r["label"], f(r.get("step_ms"), 0), f(r.get("time_vs_bf16")), f(r.get("time_vs_qwix")),
                     "-" if share is None else f"{100 * share:.0f}%", f(r["argument_mib"], 0), f(r["temp_mib"], 0),
                     f(r["args_plus_temps_mib"], 0), f(r.get("args_plus_temps_vs_bf16"), 3),
                     f(r.get("args_plus_temps_vs_qwix"), 3), f(r["frozen_mib"], 0), f(r["gflops"], 1),
                     f(r.get("first_loss"), 4)])
    return common.markdown_table(headers, body)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shape, 2 steps (seconds)")
    parser.add_argument("--out-dir", type=Path, default=common.RESULTS, help="where JSON and PNG go")
    parser.add_argument("--sizes", nargs="+", choices=list(common.SIZES), default=None)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=None)
    parser.add_argument("--targets", choices=list(common.TARGETS), default="all-linear")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--remat", default=None, help="as train_step.py (default: the lora-jax finetune default)")
    parser.add_argument("--chunked-loss", action=argparse.BooleanOptionalAction, default=None)
    common.add_peak_argument(parser)
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--no-layer-scaling", action="store_true",
                        help="skip the 8 -> 16 layer NF4 compile (kernel bytes per param, temps growth)")
    args = parser.parse_args(argv)
    common.limit_threads()
    started = time.perf_counter()
    spec = dict(SMOKE if args.smoke else FULL)
    spec.setdefault("variants", list(VARIANTS))
    for key in ("sizes", "variants", "rounds"):
        if getattr(args, key) is not None:
            spec[key] = getattr(args, key)
    settings = common.resolve_step_settings(args.remat, args.chunked_loss)
    peak = common.resolve_peak(args.peak, args.out_dir, args.smoke)
    results = {size_name: measure_size(size_name, spec, spec["variants"], args.targets, settings, peak)
               for size_name in spec["sizes"]}
    targets = check_targets(results)
    scaling: list[dict[str, Any]] = []
    if not args.no_layer_scaling:
        plan = SMOKE_SCALING if args.smoke else SCALING
        scaling = layer_scaling(plan["size"], plan["layers"], plan["tokens"], args.targets, settings)
        targets += scaling_targets(scaling)
    stem = "qlora_smoke" if args.smoke else "qlora"
    payload = {"environment": common.environment(), "smoke": args.smoke, "rank": RANK, "targets_modules": args.targets,
               "lora_jax_quantize": lora_jax_quantize() is not None, "spec": spec, "peak": peak,
               "step_settings": next((r["step_settings"] for rows in results.values() for r in rows
                                      if "step_settings" in r), None),
               "sizes": {name: common.SIZES[name] for name in spec["sizes"]}, "results": results,
               "layer_scaling": scaling, "targets": targets, "runtime_s": time.perf_counter() - started}
    common.write_json(args.out_dir / f"{stem}.json", payload)
    if not args.no_plot:
        import plots

        plots.qlora(results, targets, args.out_dir / f"{stem}.png")
    for size_name, rows in results.items():
        kind = "compiled only" if rows and rows[0]["compiled_only"] else f"{common.THREADS} threads"
        print(f"**{size_name}**, LoRA r={RANK} on {args.targets}, {kind}:\n\n{table(rows)}\n")
    if scaling:
        print(f"**NF4 layer scaling**, {scaling[0]['size']} width, {scaling[0]['tokens']} tokens, compiled only:\n\n"
              f"{scaling_table(scaling)}\n")
    print("Targets (issue 11):\n\n" + common.targets_table(targets))
    print(f"\nwrote {args.out_dir / (stem + '.json')} in {payload['runtime_s']:.0f} s")
    return payload


if __name__ == "__main__":
    main()
