"""XLA FLOPs of a DoRA gradient step: lora_jax's DoRA vs the naive dense form vs plain LoRA.

For each model of ``benchmarks/flops.py`` this compiles (never runs) the gradient
w.r.t. the adapter of:

- ``lora``: plain LoRA through ``lora_jax.lora``;
- ``dora``: DoRA through ``lora_jax.lora`` (``x@W + s(x@A)@B`` scaled by ``m / ||W + sAB||``,
  the norms from ``||W||²``, ``AᵀW`` and ``AᵀA``);
- ``dora_naive``: DoRA written densely, ``apply(m * (W + sAB) / stop_gradient(||W + sAB||))``
  (what a straightforward port of PEFT's formula costs under jit);
- ``floor``: the input gradient with every weight frozen (the least any adapter step costs).

Usage::

    python benchmarks/dora_flops.py            # full sizes, writes benchmarks/results/dora_flops.json
    python benchmarks/dora_flops.py --smoke    # tiny sizes, seconds
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

import lora_jax

sys.path.insert(0, str(Path(__file__).parent))
import flops  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def dense_dora_params(params: Any, adapter: Any, config: lora_jax.LoraConfig) -> Any:
    """Every targeted kernel replaced by its dense DoRA form (the naive step)."""
    targets = lora_jax.find_targets(config, params, adapter)
    by_path = {t.path: t for t in targets.values()}

    def dense(path: Any, w: Any) -> Any:
        t = by_path.get(path)
        if t is None:
            return w
        entry = adapter[t.module_name]
        full = w + lora_jax.lora_delta(entry["lora_A"], entry["lora_B"], t.num_lead, t.scaling)
        axes = tuple(range(t.num_lead, t.num_lead + t.num_in))
        norm = jax.lax.stop_gradient(jnp.sqrt(jnp.sum(full**2, axis=axes, keepdims=True)))
        magnitude = entry["lora_magnitude"].reshape(t.lead_shape + (1,) * t.num_in + t.out_shape)
        return magnitude * full / norm

    return jax.tree_util.tree_map_with_path(dense, params)


def gradient_steps(model: Any, x_shape: tuple[int, ...], lora_kwargs: dict[str, Any]) -> dict[str, Any]:
    x = jax.ShapeDtypeStruct(x_shape, jnp.float32)
    params = jax.eval_shape(model.init, jax.random.key(0), x)
    plain = lora_jax.LoraConfig(**lora_kwargs)
    config = plain.replace(use_dora=True)

    def make(cfg: lora_jax.LoraConfig) -> Any:
        # DoRA's initial magnitude reads the kernels: pass the params as an argument of the traced init.
        return jax.eval_shape(lambda p: lora_jax.init(cfg, p, jax.random.key(1), apply_fn=model.apply,
                                                      example_args=(x,)), params)

    adapter, dora_adapter = make(plain), make(config)

    def loss(y: jax.Array) -> jax.Array:
        return jnp.mean(y.astype(jnp.float32) ** 2)

    lora_apply = lora_jax.lora(model.apply, plain)
    dora_apply = lora_jax.lora(model.apply, config)
    steps: dict[str, tuple[Callable[..., Any], tuple[Any, ...]]] = {
        "lora": (jax.grad(lambda a, p, x: loss(lora_apply(p, a, x))), (adapter, params, x)),
        "dora": (jax.grad(lambda a, p, x: loss(dora_apply(p, a, x))), (dora_adapter, params, x)),
        "dora_naive": (jax.grad(lambda a, p, x: loss(model.apply(dense_dora_params(p, a, config), x))),
                       (dora_adapter, params, x)),
        "floor": (jax.grad(lambda x, p: loss(model.apply(p, x))), (x, params)),
    }
    return {"steps": steps, "config": config, "params": params, "adapter": dora_adapter}


def measure(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    built = gradient_steps(spec["model"], spec["x"], spec["lora"])
    row: dict[str, Any] = {"model": name, "input": list(spec["x"]), "rank": built["config"].r}
    shapes = flops.kernel_shapes(built["config"], built["params"], built["adapter"])
    for kind, (fn, args) in built["steps"].items():
        compiled = flops.compile_step(fn, args)
        row[f"{kind}_gflops"] = compiled.cost_analysis()["flops"] / 1e9
        if kind in ("dora", "dora_naive"):
            row[f"{kind}_kernel_shaped_dots"] = len(flops.kernel_shaped_dots(compiled.as_text(), shapes))
    row["dora_over_lora"] = row["dora_gflops"] / row["lora_gflops"]
    row["dora_over_floor"] = row["dora_gflops"] / row["floor_gflops"]
    row["naive_over_dora"] = row["dora_naive_gflops"] / row["dora_gflops"]
    return row


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | LoRA GFLOP | DoRA GFLOP | naive DoRA GFLOP | floor GFLOP | DoRA/LoRA | naive/DoRA | "
             "kernel-shaped dots DoRA / naive |", "|" + "---|" * 8]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['lora_gflops']:.2f} | {r['dora_gflops']:.2f} | {r['dora_naive_gflops']:.2f} | "
            f"{r['floor_gflops']:.2f} | {r['dora_over_lora']:.3f} | {r['naive_over_dora']:.3f} | "
            f"{r['dora_kernel_shaped_dots']} / {r['dora_naive_kernel_shaped_dots']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (seconds)")
    parser.add_argument("--out", type=Path, default=None, help="JSON output path")
    args = parser.parse_args(argv)
    rows = [measure(name, spec) for name, spec in flops.model_configs(args.smoke).items()]
    out = args.out or RESULTS / ("dora_flops_smoke.json" if args.smoke else "dora_flops.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"backend": jax.default_backend(), "jax": jax.__version__, "rows": rows},
                              indent=2) + "\n")
    print(table(rows))
    print(f"\nwrote {out}")
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
