"""One training step side by side: lora_jax LoRA, JAX full fine-tuning, naive merge, qwix, PyTorch PEFT.

Every variant trains the same Llama-architecture model (one Hugging Face config dict
builds both the Flax model and transformers' ``LlamaForCausalLM``) on the same token
batch with AdamW, on the same two cores. A step is forward + backward + optimizer update.

- ``lora_qv`` / ``lora_all``: ``lora_jax.lora`` with r=8 on q_proj, v_proj / on all-linear;
- ``naive_qv``: the adapter trains through ``apply(merge(params, adapter))`` inside the step;
- ``full``: JAX full fine-tuning;
- ``frozen``: JAX with every weight frozen and only the RMSNorm scales training: forward
  plus activation gradients, no weight gradient of any dot, i.e. the frozen-base floor
  a LoRA step cannot go below (it includes the first layer's input gradient, which a
  LoRA step does not need);
- ``peft_qv`` / ``peft_all``: PyTorch PEFT ``get_peft_model`` with the same rank and targets;
- ``torch_full``: PyTorch full fine-tuning, for scale;
- ``qwix_qv`` / ``qwix_all``: qwix 0.1.8 (the JAX peer) ``apply_lora_to_model`` with the same
  rank, alpha and targets on the same linen module and base params.

Step settings: ``--remat POLICY`` (``none``, ``dots``, ``full`` or a ``jax.checkpoint_policies``
name) and ``--chunked-loss`` apply to every JAX variant alike; not given, they are the
``lora-jax finetune`` defaults of the installed lora_jax. Per-layer remat and the chunked
LM loss are used where lora_jax.models has them (see ``common.apply_model_settings``);
otherwise remat wraps the whole forward in ``jax.checkpoint`` as lora_jax.train does, and a
chunked loss is refused. The torch variants use Hugging Face gradient checkpointing when
remat is on. What was applied is recorded per row (``step_settings``).

Peak: ``benchmarks/peak.py`` runs first (``--peak measure``, the default; or ``--peak PATH``
to read an earlier result) and every row gets its achieved GFLOP/s (XLA FLOPs, or torch's
matmul FLOPs, over the median step time) as ``fraction_of_peak`` of the float32 matmul peak.
The issue-10 targets (ratios of medians from the same run, FLOP and memory ratios, fraction of
peak) are checked in ``targets`` and printed as a table.

Each variant runs in its own process, so its peak RSS is its own. All processes stay
alive and the parent asks them in turn for a few timed steps per round, so background
load on the machine is shared across variants; the step time is the median of all
timed steps. FLOPs and memory of the JAX variants are XLA's (``cost_analysis``,
``memory_analysis``) and deterministic. The ``llama-1b`` shape is compiled from abstract
params (never run): FLOPs and memory only.

Usage::

    python benchmarks/train_step.py            # tiny, smollm2-135m (run), llama-1b (compiled): ~10 min quiet
    python benchmarks/train_step.py --smoke    # tiny only, 2 timed steps per variant
    python benchmarks/train_step.py --sizes smollm2-135m llama-1b --remat dots --chunked-loss
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402

VARIANTS: dict[str, dict[str, Any]] = {
    "lora_qv": dict(label="lora_jax LoRA q,v", framework="jax", kind="lora", targets="q,v", torch="peft_qv",
                    qwix="qwix_qv"),
    "lora_all": dict(label="lora_jax LoRA all-linear", framework="jax", kind="lora", targets="all-linear",
                     torch="peft_all", qwix="qwix_all"),
    "naive_qv": dict(label="JAX naive merge q,v", framework="jax", kind="naive", targets="q,v", torch="peft_qv"),
    "full": dict(label="JAX full FT", framework="jax", kind="full", targets=None, torch="torch_full"),
    "frozen": dict(label="JAX frozen-base floor", framework="jax", kind="frozen", targets=None, torch=None),
    "peft_qv": dict(label="PyTorch PEFT q,v", framework="torch", targets="q,v"),
    "peft_all": dict(label="PyTorch PEFT all-linear", framework="torch", targets="all-linear"),
    "torch_full": dict(label="PyTorch full FT", framework="torch", targets=None),
    "qwix_qv": dict(label="qwix LoRA q,v", framework="jax", kind="qwix", targets="q,v", torch="peft_qv"),
    "qwix_all": dict(label="qwix LoRA all-linear", framework="jax", kind="qwix", targets="all-linear",
                     torch="peft_all"),
}
RUN_SIZES = ("tiny", "smollm2-135m")
# Every variant lives in its own process while the rounds run; on the 135M shape ten such
# processes need ~25 GB, more than this 24 GiB machine, so by default the two variants no
# target needs (naive merge, torch full FT) are left out there (add them with --variants).
DEFAULT_LEFT_OUT = {"smollm2-135m": ("naive_qv", "torch_full")}
COMPILE_ONLY_SIZES = ("llama-1b",)
# (rounds, timed steps per round, warm-up steps) in full mode; smoke: one round of 2.
TIMING = {"tiny": (10, 5, 3), "smollm2-135m": (8, 1, 2)}
SMOKE_TIMING = (1, 2, 1)
RANK = 8


# -- child side ---------------------------------------------------------------------------------

def build_jax(variant: dict[str, Any], size: dict[str, Any], warmup: int, compile_only: bool,
              settings: common.StepSettings) -> tuple[Callable[[], None], dict[str, Any]]:
    """Compile the variant's step and warm it up; ``(run one step, stats)``."""
    import jax
    import jax.numpy as jnp

    module, params = common.jax_model(size["hf"], abstract=compile_only, settings=settings)
    if variant["kind"] == "qwix":
        step, (trainable, opt_state, frozen) = common.qwix_train_step(module, params, variant["targets"], RANK,
                                                                      settings=settings)
    else:
        config = common.lora_config(variant["targets"], RANK) if variant["targets"] else None
        step, (trainable, opt_state, frozen) = common.jax_train_step(variant["kind"], module, params, config,
                                                                     settings=settings)
    if compile_only:
        ids: Any = jax.ShapeDtypeStruct((size["batch"], size["seq"]), jnp.int32)
    else:
        ids = jnp.asarray(common.token_batch(size))
    compiled, stats = common.compile_stats(step, trainable, opt_state, frozen, ids)
    stats["trainable_params"] = sum(x.size for x in jax.tree.leaves(trainable))
    stats["total_params"] = sum(x.size for x in jax.tree.leaves(params))
    stats["step_settings"] = common.settings_applied(module, settings)
    stats["compute_dtype"] = "float32"
    if compile_only:
        return lambda: None, stats
    state = {"trainable": trainable, "opt_state": opt_state}
    losses = []

    def run() -> None:
        state["trainable"], state["opt_state"], loss = compiled(state["trainable"], state["opt_state"], frozen, ids)
        losses.append(loss)
        loss.block_until_ready()

    common.time_steps(run, warmup)
    # Every variant starts from the same model (B = 0 for the adapters), so the first losses agree.
    stats["first_loss"] = float(losses[0]) if losses else None
    losses.clear()
    return run, stats


def build_torch(variant: dict[str, Any], size: dict[str, Any], warmup: int,
                settings: common.StepSettings) -> tuple[Callable[[], None], dict[str, Any]]:
    """transformers' LlamaForCausalLM (+ PEFT) with torch AdamW, warmed up; ``(run one step, stats)``.

    With remat on, Hugging Face gradient checkpointing (per decoder layer, nothing saved).
    """
    common.torch_threads()
    import peft
    import torch
    import transformers
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    hf = {k: v for k, v in size["hf"].items() if k != "model_type"}
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf))
    total = sum(p.numel() for p in model.parameters())
    if settings.remat != "none":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if variant["targets"]:
        targets = common.TARGETS[variant["targets"]]
        model = peft.get_peft_model(model, peft.LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=targets,
                                                           lora_dropout=0.0))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=common.LEARNING_RATE, weight_decay=common.WEIGHT_DECAY)
    ids = torch.from_numpy(common.token_batch(size)).long()

    def run() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()

    first = []

    def first_run() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        first.append(loss.item())
        loss.backward()
        optimizer.step()

    first_run()
    common.time_steps(run, max(warmup - 1, 0))
    counter = FlopCounterMode(display=False)
    with counter:
        run()
    stats = {
        "trainable_params": sum(p.numel() for p in trainable),
        "total_params": total,
        "torch_matmul_gflops": counter.get_total_flops() / 1e9,
        "attn_implementation": model.config._attn_implementation,
        "gradient_checkpointing": settings.remat != "none",
        "first_loss": first[0],
    }
    return run, stats


def child_main(args: argparse.Namespace) -> None:
    """Host the variants named in ``--child`` (comma-separated) and serve timing requests."""
    size = common.SIZES[args.size]
    settings = common.StepSettings(**json.loads(args.settings))
    runs, ready = {}, {}
    for name in args.child.split(","):
        variant = VARIANTS[name]
        if variant["framework"] == "jax":
            runs[name], ready[name] = build_jax(variant, size, args.warmup, args.compile_only, settings)
        else:
            runs[name], ready[name] = build_torch(variant, size, args.warmup, settings)
    common.serve(runs, ready)


# -- parent side ---------------------------------------------------------------------------------

def start_children(size_name: str, groups: list[list[str]], warmup: int, compile_only: bool,
                   jobs: int, settings: common.StepSettings) -> tuple[dict[str, common.Child], dict[str, dict[str, Any]]]:
    """Start one process per group of variants, ``jobs`` at a time; wait until each is
    compiled and warmed up. Returns ``variant -> its process`` and each variant's stats."""
    children: dict[str, common.Child] = {}
    ready: dict[str, dict[str, Any]] = {}
    started: list[common.Child] = []

    def start(group: list[str]) -> None:
        argv = [__file__, "--child", ",".join(group), "--size", size_name, "--warmup", str(warmup),
                "--settings", json.dumps(dataclasses.asdict(settings))]
        if compile_only:
            argv.append("--compile-only")
        child = common.Child(",".join(group), argv)
        started.append(child)
        ready.update(child.receive()["ready"])
        for name in group:
            children[name] = child

    try:
        with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
            list(pool.map(start, groups))
    except BaseException:
        for child in started:
            child.kill()
        raise
    names = [name for group in groups for name in group]
    return {name: children[name] for name in names}, ready


def group_variants(names: list[str], shared: bool) -> list[list[str]]:
    """One process per variant, or (``shared``) all torch variants in one process and the JAX
    ones in two (so that two compile at once on two cores)."""
    if not shared:
        return [[name] for name in names]
    jax_names = [n for n in names if VARIANTS[n]["framework"] == "jax"]
    half = (len(jax_names) + 1) // 2
    groups = [[n for n in names if VARIANTS[n]["framework"] == "torch"], jax_names[:half], jax_names[half:]]
    return [g for g in groups if g]


def measure_size(size_name: str, names: list[str], timing: tuple[int, int, int], compile_only: bool,
                 jobs: int, shared: bool, settings: common.StepSettings,
                 peak: dict[str, Any] | None) -> list[dict[str, Any]]:
    size = common.SIZES[size_name]
    if compile_only:
        names = [n for n in names if VARIANTS[n]["framework"] == "jax"]
    rounds, steps, warmup = timing
    start = time.perf_counter()
    groups = group_variants(names, shared)
    children, ready = start_children(size_name, groups, warmup, compile_only, jobs, settings)
    processes = {id(child): child for child in children.values()}
    try:
        times = {} if compile_only else common.run_interleaved(children, rounds, steps)
        finished = {key: child.close() for key, child in processes.items()}
    finally:
        for child in processes.values():
            child.kill()
    print(f"[train_step] {size_name}: {len(names)} variants in {time.perf_counter() - start:.0f} s", file=sys.stderr)

    tokens = size["batch"] * size["seq"]
    rows = []
    for name in names:
        variant = VARIANTS[name]
        row: dict[str, Any] = {"size": size_name, "variant": name, "label": variant["label"],
                               "framework": variant["framework"], "targets": variant["targets"],
                               "rank": RANK if variant["targets"] else None,
                               "batch": size["batch"], "seq": size["seq"], "compiled_only": compile_only,
                               **ready[name]}
        if not compile_only:
            row["round_times_s"] = times[name]
            row["step_times_s"] = [t for round_times in times[name] for t in round_times]
            row["step_ms"] = 1e3 * common.median(row["step_times_s"])
            row["min_step_ms"] = 1e3 * min(row["step_times_s"])
            flops = row.get("gflops", row.get("torch_matmul_gflops"))
            row["achieved_gflops_per_s"] = flops / (row["step_ms"] / 1e3)
            row["fraction_of_peak"] = common.fraction_of_peak(row["achieved_gflops_per_s"], peak, "float32")
            row["tokens_per_s"] = tokens / (row["step_ms"] / 1e3)
            row["peak_rss_mib"] = finished[id(children[name])]["peak_rss_mib"]
            row["rss_shared_with"] = [n for n in names if children[n] is children[name] and n != name]
        rows.append(row)
    add_ratios(rows)
    return rows


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Ratios against JAX full fine-tuning, the frozen floor, the matching PyTorch and qwix variants."""
    by_name = {r["variant"]: r for r in rows}
    full, floor = by_name.get("full"), by_name.get("frozen")
    for row in rows:
        if full and row["framework"] == "jax":
            row["gflops_vs_full"] = row["gflops"] / full["gflops"]
            row["total_mib_vs_full"] = row["total_mib"] / full["total_mib"]
            row["peak_mib_vs_full"] = row["peak_mib"] / full["peak_mib"]
        if floor and row["framework"] == "jax":
            row["gflops_vs_floor"] = row["gflops"] / floor["gflops"]
        qwix = by_name.get(VARIANTS[row["variant"]].get("qwix") or "")
        if qwix:
            row["qwix_counterpart"] = qwix["variant"]
            row["gflops_vs_qwix"] = row["gflops"] / qwix["gflops"]
            row["total_mib_vs_qwix"] = row["total_mib"] / qwix["total_mib"]
        if "round_times_s" not in row:
            continue
        # Time ratios pair rounds (see common.paired_ratio); step_ms is the plain median.
        if full:
            row["time_vs_full"] = common.paired_ratio(row["round_times_s"], full["round_times_s"])
        if floor:
            row["time_vs_floor"] = common.paired_ratio(row["round_times_s"], floor["round_times_s"])
        counterpart = by_name.get(VARIANTS[row["variant"]].get("torch") or "")
        if counterpart and "round_times_s" in counterpart:
            row["time_vs_torch"] = common.paired_ratio(row["round_times_s"], counterpart["round_times_s"])
            row["torch_counterpart"] = counterpart["variant"]
        if qwix and "round_times_s" in qwix:
            row["time_vs_qwix"] = common.paired_ratio(row["round_times_s"], qwix["round_times_s"])


# Issue 10's targets: (name, variant, field, op, threshold, shapes where the issue sets it).
# Every target is also checked on the other shapes measured, marked required=False there.
ISSUE_SHAPES = ("smollm2-135m",)
TARGETS = (
    ("all-linear LoRA time / JAX full FT", "lora_all", "time_vs_full", "<=", 0.70, ISSUE_SHAPES),
    ("all-linear LoRA time / PEFT all-linear", "lora_all", "time_vs_torch", "<=", 0.70, ISSUE_SHAPES),
    ("q,v LoRA time / PEFT q,v", "lora_qv", "time_vs_torch", "<=", 0.65, ISSUE_SHAPES),
    ("q,v LoRA time / qwix q,v", "lora_qv", "time_vs_qwix", "<=", 1.00, ISSUE_SHAPES),
    ("all-linear LoRA time / qwix all-linear", "lora_all", "time_vs_qwix", "<=", 0.80, ISSUE_SHAPES),
    ("q,v LoRA GFLOP / frozen floor", "lora_qv", "gflops_vs_floor", "<=", 1.05, ("smollm2-135m", "llama-1b")),
    ("all-linear LoRA GFLOP / frozen floor", "lora_all", "gflops_vs_floor", "<=", 1.05,
     ("smollm2-135m", "llama-1b")),
    ("q,v LoRA achieved fraction of matmul peak", "lora_qv", "fraction_of_peak", ">=", 0.80, ISSUE_SHAPES),
    ("all-linear LoRA achieved fraction of matmul peak", "lora_all", "fraction_of_peak", ">=", 0.80, ISSUE_SHAPES),
    ("all-linear LoRA compiled memory / JAX full FT", "lora_all", "total_mib_vs_full", "<=", 0.35,
     ("smollm2-135m", "llama-1b")),
)
TIMED_FIELDS = ("time_vs_full", "time_vs_torch", "time_vs_qwix", "fraction_of_peak")


def check_targets(results: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Each target on each measured size (``met`` None where a variant or timing is missing)."""
    checks = []
    for size_name, rows in results.items():
        by_name = {r["variant"]: r for r in rows}
        compiled_only = bool(rows) and rows[0]["compiled_only"]
        for name, variant, key, op, threshold, shapes in TARGETS:
            if compiled_only and key in TIMED_FIELDS:
                continue
            value = by_name.get(variant, {}).get(key)
            checks.append(common.target(name, value, op, threshold, size=size_name, variant=variant, field=key,
                                        required=size_name in shapes))
    return checks


def table_run(rows: list[dict[str, Any]]) -> str:
    f = common.fmt
    headers = ["variant", "trainable params", "step ms", "tokens/s", "time / JAX full", "time / floor",
               "time / PyTorch", "time / qwix", "GFLOP", "GFLOP / full", "GFLOP / floor", "GFLOP/s",
               "of peak", "compiled MiB", "compiled / full", "XLA peak MiB", "peak RSS MiB"]
    body = []
    for r in rows:
        gflop = f(r.get("gflops"), 1) if "gflops" in r else f"{r['torch_matmul_gflops']:.1f}*"
        share = r.get("fraction_of_peak")
        body.append([r["label"], f"{r['trainable_params']:,}", f(r["step_ms"], 1), f(r["tokens_per_s"], 0),
                     f(r.get("time_vs_full")), f(r.get("time_vs_floor")), f(r.get("time_vs_torch")),
                     f(r.get("time_vs_qwix")), gflop, f(r.get("gflops_vs_full")), f(r.get("gflops_vs_floor"), 3),
                     f(r.get("achieved_gflops_per_s"), 1), "-" if share is None else f"{100 * share:.0f}%",
                     f(r.get("total_mib"), 0), f(r.get("total_mib_vs_full"), 3), f(r.get("peak_mib"), 0),
                     f(r["peak_rss_mib"], 0)])
    return common.markdown_table(headers, body)


def table_compiled(rows: list[dict[str, Any]]) -> str:
    f = common.fmt
    headers = ["variant", "trainable params", "GFLOP", "GFLOP / full", "GFLOP / floor", "compiled MiB",
               "compiled / full", "XLA peak MiB", "XLA peak / full", "compile s"]
    body = [[r["label"], f"{r['trainable_params']:,}", f(r["gflops"], 0), f(r.get("gflops_vs_full"), 3),
             f(r.get("gflops_vs_floor"), 3), f(r["total_mib"], 0), f(r.get("total_mib_vs_full"), 3),
             f(r["peak_mib"], 0), f(r.get("peak_mib_vs_full"), 3), f(r["lower_s"] + r["compile_s"], 1)]
            for r in rows]
    return common.markdown_table(headers, body)


def report(results: dict[str, list[dict[str, Any]]], targets: list[dict[str, Any]],
           peak: dict[str, Any] | None, settings: dict[str, Any]) -> str:
    parts = []
    for size_name, rows in results.items():
        size = common.SIZES[size_name]
        hf = size["hf"]
        shape = (f"hidden {hf['hidden_size']}, {hf['num_hidden_layers']} layers, {hf['num_attention_heads']}/"
                 f"{hf['num_key_value_heads']} heads, vocab {hf['vocab_size']}; batch {size['batch']} x seq {size['seq']}")
        if rows and rows[0]["compiled_only"]:
            parts.append(f"**{size_name}** ({shape}), compiled only, rank {RANK}:\n\n{table_compiled(rows)}")
        else:
            parts.append(f"**{size_name}** ({shape}), rank {RANK}, {common.THREADS} threads:\n\n{table_run(rows)}")
    peak_line = ("float32 matmul peak (not measured: --peak none)" if peak is None else
                 f"float32 matmul peak, {peak['peak_gflops_per_s'].get('float32', float('nan')):.1f} GFLOP/s "
                 f"({peak['source']})")
    notes = ("`compiled MiB` = XLA arguments + outputs - donated aliases + temporaries (what the step "
             "needs); `XLA peak MiB` = `memory_analysis().peak_memory_in_bytes`, which on XLA:CPU "
             "leaves out temporaries (activations, gradients). `*` PyTorch matmul FLOPs from "
             "`torch.utils.flop_counter` (XLA also counts elementwise ops). `floor` = frozen-base step. "
             "`step ms` is the median of all timed steps; the time ratios are medians of per-round ratios "
             "(variants timed in turn, round after round). `of peak` = GFLOP/s over the " + peak_line + ". "
             f"Step settings: remat {settings['remat']} ({settings['remat_applied']}), chunked loss "
             f"{settings['chunked_loss_applied']}; from {settings['settings_source']}.")
    required = [dict(t, target=f"{t['target']} ({t['size']})") for t in targets if t["required"]]
    required = required or [dict(t, target=f"{t['target']} ({t['size']})") for t in targets]
    return "\n\n".join(parts + ["Targets (issue 10, on the shapes it names):\n\n" + common.targets_table(required),
                                 notes])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shape only, 2 timed steps (seconds)")
    parser.add_argument("--out-dir", type=Path, default=common.RESULTS, help="where JSON and PNG go")
    parser.add_argument("--sizes", nargs="+", choices=list(common.SIZES), default=None)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=None)
    parser.add_argument("--jobs", type=int, default=2, help="processes compiling at once")
    parser.add_argument("--shared-process", action="store_true",
                        help="the JAX variants in two processes, the torch ones in a third (default in "
                             "--smoke: faster start; peak RSS is then per process, not per variant)")
    parser.add_argument("--remat", default=None,
                        help="remat policy for every variant: none, dots, full or a jax.checkpoint_policies "
                             "name (default: the lora-jax finetune default)")
    parser.add_argument("--chunked-loss", action=argparse.BooleanOptionalAction, default=None,
                        help="chunked LM head + loss where lora_jax.models has it (default: the CLI's)")
    common.add_peak_argument(parser)
    parser.add_argument("--no-plot", action="store_true")
    # child mode (internal)
    parser.add_argument("--child", help=argparse.SUPPRESS)  # comma-separated variant names
    parser.add_argument("--size", choices=list(common.SIZES), help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, default=3, help=argparse.SUPPRESS)
    parser.add_argument("--compile-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--settings", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    common.limit_threads()
    if args.child:
        child_main(args)
        return {}

    started = time.perf_counter()
    settings = common.resolve_step_settings(args.remat, args.chunked_loss)
    # The peak is measured first, while nothing else runs.
    peak = common.resolve_peak(args.peak, args.out_dir, args.smoke)
    sizes = args.sizes or (["tiny"] if args.smoke else [*RUN_SIZES, *COMPILE_ONLY_SIZES])
    results = {}
    for size_name in sizes:
        names = args.variants or [n for n in VARIANTS if n not in DEFAULT_LEFT_OUT.get(size_name, ())]
        timing = SMOKE_TIMING if args.smoke else TIMING.get(size_name, (3, 2, 2))
        results[size_name] = measure_size(size_name, names, timing, size_name in COMPILE_ONLY_SIZES, args.jobs,
                                          args.smoke or args.shared_process, settings, peak)
    targets = check_targets(results)
    applied = next(r["step_settings"] for rows in results.values() for r in rows if "step_settings" in r)
    stem = "train_step_smoke" if args.smoke else "train_step"
    payload = {"environment": common.environment(), "smoke": args.smoke, "rank": RANK,
               "optimizer": {"name": "adamw", "lr": common.LEARNING_RATE, "weight_decay": common.WEIGHT_DECAY},
               "step_settings": applied, "peak": peak, "targets": targets,
               "sizes": {name: common.SIZES[name] for name in sizes}, "results": results,
               "runtime_s": time.perf_counter() - started}
    common.write_json(args.out_dir / f"{stem}.json", payload)
    if not args.no_plot:
        import plots

        plots.train_step(results, args.out_dir / f"{stem}.png")
        plots.train_step_targets(targets, args.out_dir / f"{stem}_targets.png")
    print(report(results, targets, peak, applied))
    print(f"\nwrote {args.out_dir / (stem + '.json')} in {payload['runtime_s']:.0f} s")
    return payload


if __name__ == "__main__":
    main()
