"""Compiled memory of one training step: LoRA all-linear against full fine-tuning (compile only).

For the SmolLM2-135M and Llama-3.2-1B shapes of ``common.SIZES``, every variant is
lowered and compiled from abstract params (nothing is allocated or run) and measured with
XLA's ``memory_analysis()``: arguments + outputs - aliased (donated) + temporaries, the
memory the step needs. Both sides get the same settings: per-layer remat
(``lora_jax.models.build_module(remat=...)``), the chunked LM head + cross-entropy
(``return_hidden=True`` + ``lora_jax.train.step.lm_loss(loss_chunk=...)``) and the XLA:CPU
scheduler (``lora_jax.train.step.compiler_options``). The step is the one
``lora_jax.train`` compiles: AdamW, the loss inside ``lora_jax.lora`` for LoRA; full
fine-tuning trains every param through the same loss.

Usage::

    python benchmarks/memory_targets.py                       # both shapes, the settings grid
    python benchmarks/memory_targets.py --sizes smollm2-135m --settings cli
    python benchmarks/memory_targets.py --smoke               # tiny shape, two settings

Deterministic: the figures do not depend on the machine's load.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402

RANK = 8
KINDS = ("lora_all", "full")
# name -> (remat, loss_chunk, cpu_scheduler). "before" is lora_jax before per-layer remat,
# the chunked loss and the scheduler option; "cli" is what `lora-jax finetune` uses by default.
SETTINGS: dict[str, tuple[str, int | None, str]] = {
    "before": ("none", None, "concurrency"),
    "scheduler": ("none", None, "memory"),
    "chunked": ("none", 128, "concurrency"),
    "dots": ("dots", 128, "concurrency"),
    "full-remat": ("full", 128, "concurrency"),
    "full-remat-chunk-256": ("full", 256, "concurrency"),
    "full-remat-memory": ("full", 128, "memory"),
}
DEFAULT_SIZES = ("smollm2-135m", "llama-1b")


def cli_settings() -> tuple[str, int | None, str]:
    """``(remat, loss_chunk, cpu_scheduler)`` of ``lora-jax finetune``'s defaults."""
    import dataclasses

    from lora_jax.train.settings import FinetuneSettings

    defaults = {f.name: f.metadata["default"] for f in dataclasses.fields(FinetuneSettings)}
    chunk = defaults["chunked_loss"] or None
    return defaults["remat"] or "none", chunk, defaults["xla_cpu_scheduler"]


def settings_table() -> dict[str, tuple[str, int | None, str]]:
    """Every named setting, ``"cli"`` included."""
    return {**SETTINGS, "cli": cli_settings()}


def compiled_step(kind: str, hf: dict[str, Any], batch: int, seq: int, *, remat: str,
                  loss_chunk: int | None, cpu_scheduler: str, scan: bool = False) -> Any:
    """The compiled step (``jax.stages.Compiled``) of ``kind`` with these settings."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import lora_jax
    from lora_jax import models
    from lora_jax.train.step import compiler_options, lm_loss

    module = models.build_module(hf, remat=remat, scan_layers=scan)
    params = jax.eval_shape(lambda: module.init(jax.random.key(0), np.zeros((1, 1), np.int32)))["params"]
    ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    optimizer = optax.adamw(common.LEARNING_RATE, weight_decay=common.WEIGHT_DECAY)

    def mean_loss(p: Any, ids: jax.Array) -> jax.Array:
        out = module.apply({"params": p}, ids, return_hidden=loss_chunk is not None)
        nll, count = lm_loss(out, ids, jnp.ones(ids.shape, bool), loss_chunk=loss_chunk)
        return nll / count

    if kind == "lora_all":
        config = common.lora_config("all-linear", RANK, scanned=scan)
        trainable = jax.eval_shape(lambda: lora_jax.init(config, params, jax.random.key(1)))
        frozen = params
        lora_loss = lora_jax.lora(mean_loss, config)

        def loss(adapter: Any, frozen: Any, ids: jax.Array) -> jax.Array:
            return lora_loss(frozen, adapter, ids)
    elif kind == "full":
        trainable, frozen = params, {}

        def loss(p: Any, frozen: Any, ids: jax.Array) -> jax.Array:
            return mean_loss(p, ids)
    else:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")

    def step(trainable: Any, opt_state: Any, frozen: Any, ids: jax.Array) -> tuple[Any, Any, Any]:
        value, grads = jax.value_and_grad(loss)(trainable, frozen, ids)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, value

    opt_state = jax.eval_shape(optimizer.init, trainable)
    jitted = jax.jit(step, donate_argnums=(0, 1), compiler_options=compiler_options(cpu_scheduler))
    return jitted.lower(trainable, opt_state, frozen, ids).compile()


def measure(kind: str, size: str, settings: tuple[str, int | None, str], *,
            scan: bool = False) -> dict[str, float]:
    """MiB of the compiled step: ``total`` (arguments + outputs - aliased + temporaries) and parts."""
    spec = common.SIZES[size]
    remat, loss_chunk, scheduler = settings
    compiled = compiled_step(kind, spec["hf"], spec["batch"], spec["seq"], remat=remat,
                             loss_chunk=loss_chunk, cpu_scheduler=scheduler, scan=scan)
    memory = compiled.memory_analysis()
    mib = 2**20
    total = (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
             + memory.temp_size_in_bytes)
    return {"total_mib": total / mib, "argument_mib": memory.argument_size_in_bytes / mib,
            "output_mib": memory.output_size_in_bytes / mib, "alias_mib": memory.alias_size_in_bytes / mib,
            "temp_mib": memory.temp_size_in_bytes / mib, "gflops": compiled.cost_analysis()["flops"] / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=list(DEFAULT_SIZES), choices=sorted(common.SIZES))
    parser.add_argument("--settings", nargs="+", default=[*SETTINGS, "cli"],
                        help=f"names from {[*SETTINGS, 'cli']}")
    parser.add_argument("--smoke", action="store_true", help="tiny shape, 'before' and 'cli' only")
    parser.add_argument("--json", type=Path, default=common.RESULTS / "memory_targets.json")
    args = parser.parse_args()
    sizes, names = (["tiny"], ["before", "cli"]) if args.smoke else (args.sizes, args.settings)
    table = settings_table()
    unknown = [n for n in names if n not in table]
    if unknown:
        parser.error(f"unknown --settings {unknown}; expected names from {sorted(table)}")

    rows, results = [], []
    for size in sizes:
        for name in names:
            measured = {kind: measure(kind, size, table[name]) for kind in KINDS}
            ratio = measured["lora_all"]["total_mib"] / measured["full"]["total_mib"]
            remat, chunk, scheduler = table[name]
            results.append({"size": size, "settings": name, "remat": remat, "loss_chunk": chunk,
                            "cpu_scheduler": scheduler, **{k: v for k, v in measured.items()},
                            "lora_over_full": ratio})
            lora, full = measured["lora_all"], measured["full"]
            rows.append([size, name, remat, chunk or "-", scheduler,
                         f"{lora['total_mib']:.0f} ({lora['temp_mib']:.0f})",
                         f"{full['total_mib']:.0f} ({full['temp_mib']:.0f})", f"**{ratio:.3f}**"])
            print(common.markdown_table(["shape", "settings", "remat", "loss chunk", "scheduler",
                                         "LoRA MiB (temps)", "full FT MiB (temps)", "LoRA / full"], rows[-1:]),
                  flush=True)
    print()
    print(common.markdown_table(["shape", "settings", "remat", "loss chunk", "scheduler",
                                 "LoRA MiB (temps)", "full FT MiB (temps)", "LoRA / full"], rows))
    if not args.smoke:
        common.write_json(args.json, {"environment": common.environment(), "rank": RANK, "results": results})


if __name__ == "__main__":
    main()
