"""XLA FLOPs and compiled peak memory of a gradient step: full fine-tuning vs LoRA.

For each model config this compiles (never runs) four gradient computations
and reads XLA's deterministic ``cost_analysis()`` and ``memory_analysis()``:

- ``full``: gradient w.r.t. every parameter (full fine-tuning);
- ``lora``: gradient w.r.t. the adapter through ``lora_jax.lora`` (x@W + s(x@A)@B);
- ``naive``: gradient w.r.t. the adapter through ``apply(W + s*A@B)`` (merge inside the step);
- ``floor``: gradient w.r.t. the input activations only, with every weight frozen:
  the least a LoRA step can cost.

Usage::

    python benchmarks/flops.py            # full sizes, writes benchmarks/results/flops.json
    python benchmarks/flops.py --smoke    # tiny sizes, seconds
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

import lora_jax

RESULTS = Path(__file__).parent / "results"


class MLP(nn.Module):
    """Dense layers of equal width."""

    width: int
    depth: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for _ in range(self.depth):
            x = nn.relu(nn.Dense(self.width)(x))
        return x


class Block(nn.Module):
    """Pre-norm transformer block: DenseGeneral attention and a DenseGeneral MLP."""

    width: int
    heads: int

    @nn.compact
    def __call__(self, x: jax.Array, _: Any = None) -> Any:
        h = nn.LayerNorm(use_bias=False)(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads, use_bias=False, name="attn")(h, h)
        h = nn.LayerNorm(use_bias=False)(x)
        h = nn.gelu(nn.DenseGeneral(4 * self.width, use_bias=False, name="up")(h))
        return x + nn.DenseGeneral(self.width, use_bias=False, name="down")(h), None


class Transformer(nn.Module):
    width: int
    depth: int
    heads: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.depth):
            x, _ = Block(self.width, self.heads, name=f"block{i}")(x)
        return x


class ScannedTransformer(nn.Module):
    """The same blocks under ``nn.scan``: kernels carry a leading layer axis."""

    width: int
    depth: int
    heads: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        blocks = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                         length=self.depth)(self.width, self.heads, name="blocks")
        return blocks(x, None)[0]


# No in_axes: init reads the attention output kernels' split, (heads, head_dim) -> width,
# off the traced model (their biases are off, so the params alone cannot say).
ATTENTION_CONFIG = dict(target_modules="all-linear")


def model_configs(smoke: bool) -> dict[str, dict[str, Any]]:
    if smoke:
        return {
            "mlp": dict(model=MLP(64, 2), x=(48, 64), lora=dict(target_modules="all-linear", r=2)),
            "transformer": dict(model=Transformer(32, 1, 2), x=(2, 6, 32),
                                lora=dict(ATTENTION_CONFIG, r=2)),
            "scanned": dict(model=ScannedTransformer(32, 2, 2), x=(2, 6, 32),
                            lora=dict(ATTENTION_CONFIG, r=2, stacked_modules=r"blocks\..*")),
        }
    return {
        "mlp": dict(model=MLP(1024, 4), x=(2048, 1024), lora=dict(target_modules="all-linear", r=8)),
        "transformer": dict(model=Transformer(1024, 4, 8), x=(4, 96, 1024),
                            lora=dict(ATTENTION_CONFIG, r=8)),
        "scanned": dict(model=ScannedTransformer(1024, 4, 8), x=(4, 96, 1024),
                        lora=dict(ATTENTION_CONFIG, r=8, stacked_modules=r"blocks\..*")),
    }


def gradient_steps(model: nn.Module, x_shape: tuple[int, ...], lora_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The four gradient functions and abstract arguments for ``model``."""
    x = jax.ShapeDtypeStruct(x_shape, jnp.float32)
    params = jax.eval_shape(model.init, jax.random.key(0), x)
    config = lora_jax.LoraConfig(**lora_kwargs)
    adapter = jax.eval_shape(lambda: lora_jax.init(config, params, jax.random.key(1),
                                                   apply_fn=model.apply, example_args=(x,)))
    apply = lora_jax.lora(model.apply, config)

    def loss(y: jax.Array) -> jax.Array:
        return jnp.mean(y.astype(jnp.float32) ** 2)

    steps: dict[str, tuple[Callable[..., Any], tuple[Any, ...]]] = {
        "full": (jax.grad(lambda p, x: loss(model.apply(p, x))), (params, x)),
        "lora": (jax.grad(lambda a, p, x: loss(apply(p, a, x))), (adapter, params, x)),
        "naive": (jax.grad(lambda a, p, x: loss(model.apply(lora_jax.merge(p, a, config), x))),
                  (adapter, params, x)),
        "floor": (jax.grad(lambda x, p: loss(model.apply(p, x))), (x, params)),
    }
    return {"steps": steps, "config": config, "params": params, "adapter": adapter}


def compile_step(fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    return jax.jit(fn).lower(*args).compile()


def kernel_shaped_dots(hlo_text: str, shapes: set[tuple[int, ...]]) -> list[str]:
    """HLO dot/convolution instructions whose output has one of ``shapes``."""
    found = []
    for line in hlo_text.splitlines():
        match = re.search(r"=\s*\w+\[([\d,]*)\][^ ]*\s+(dot|convolution)\(", line)
        if match:
            dims = tuple(int(d) for d in match.group(1).split(",") if d)
            if dims in shapes:
                found.append(line.strip())
    return found


def kernel_shapes(config: lora_jax.LoraConfig, params: Any, adapter: Any = None) -> set[tuple[int, ...]]:
    """Every way a targeted kernel's (in, out) can appear as a 2-D or N-D array."""
    shapes = set()
    for target in lora_jax.find_targets(config, params, adapter).values():
        size_in, size_out = 1, 1
        for d in target.in_shape:
            size_in *= d
        for d in target.out_shape:
            size_out *= d
        layer = target.shape[target.num_lead:]
        shapes |= {layer, (size_in, size_out), (size_out, size_in), target.shape,
                   target.lead_shape + (size_in, size_out), target.lead_shape + (size_out, size_in)}
    return shapes


def measure(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    built = gradient_steps(spec["model"], spec["x"], spec["lora"])
    row: dict[str, Any] = {"model": name, "input": list(spec["x"]), "rank": built["config"].r}
    for kind, (fn, args) in built["steps"].items():
        compiled = compile_step(fn, args)
        memory = compiled.memory_analysis()
        row[f"{kind}_gflops"] = compiled.cost_analysis()["flops"] / 1e9
        row[f"{kind}_peak_mib"] = memory.peak_memory_in_bytes / 2**20
        if kind in ("lora", "full"):  # full fine-tuning shows the detector finds weight gradients
            shapes = kernel_shapes(built["config"], built["params"], built["adapter"])
            row[f"{kind}_kernel_shaped_dots"] = len(kernel_shaped_dots(compiled.as_text(), shapes))
    row["lora_over_full"] = row["lora_gflops"] / row["full_gflops"]
    row["lora_over_floor"] = row["lora_gflops"] / row["floor_gflops"]
    row["naive_over_full"] = row["naive_gflops"] / row["full_gflops"]
    row["lora_peak_over_full"] = row["lora_peak_mib"] / row["full_peak_mib"]
    return row


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| model | full GFLOP | LoRA GFLOP | naive-merge GFLOP | floor GFLOP | LoRA/full | "
            "LoRA/floor | naive/full | peak MiB full / LoRA / naive |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['full_gflops']:.2f} | {r['lora_gflops']:.2f} | {r['naive_gflops']:.2f} | "
            f"{r['floor_gflops']:.2f} | {r['lora_over_full']:.3f} | {r['lora_over_floor']:.3f} | "
            f"{r['naive_over_full']:.3f} | {r['full_peak_mib']:.0f} / {r['lora_peak_mib']:.0f} / "
            f"{r['naive_peak_mib']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (seconds)")
    parser.add_argument("--out", type=Path, default=None, help="JSON output path")
    args = parser.parse_args(argv)
    rows = [measure(name, spec) for name, spec in model_configs(args.smoke).items()]
    out = args.out or RESULTS / ("flops_smoke.json" if args.smoke else "flops.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"backend": jax.default_backend(), "jax": jax.__version__, "rows": rows},
                              indent=2) + "\n")
    print(table(rows))
    print(f"\nwrote {out}")
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
