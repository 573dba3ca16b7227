"""Per-device memory of a sharded training step: LoRA vs full fine-tuning, DP / FSDP / TP.

Compiles (never runs) one training step of a Llama-shaped model on a
simulated 8-device CPU mesh, from abstract params (``jax.ShapeDtypeStruct``:
nothing is allocated), and reads XLA's ``compiled.memory_analysis()``, which
is per device for a sharded program. For each shape, strategy and mode:

- ``lora``: ``lora_jax.lora`` step, r=16 on every linear layer, frozen base
  params, float32 adapter and AdamW state, laid out by ``lora_jax.sharding``;
- ``full``: full fine-tuning of the same model, AdamW over every param
  (optax's default: moments in the params' dtype), same layouts.

Params are bfloat16 and float32 (``--dtypes``). The CPU backend computes
bfloat16 matmuls in float32 and keeps float32 copies of the weights among its
temporaries, which GPUs and TPUs do not; the float32 rows show the strategies
without that artefact. Arguments (params, adapter, optimizer state, batch) are
exact on any backend.

Usage::

    python benchmarks/sharding_memory.py           # llama-1b and llama-8b; JSON to results/
    python benchmarks/sharding_memory.py --smoke   # a tiny shape, seconds

The model is a plain-function Llama (RMSNorm, GQA attention, SwiGLU MLP,
``lax.scan`` over stacked layers with per-layer remat; RoPE is left out, it
has no parameters); param names mirror transformers' so the tensor-parallel
presets apply.
"""

from __future__ import annotations

import os
import sys

if "jax" not in sys.modules:  # 8 simulated devices; must precede the jax import
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

import lora_jax  # noqa: E402
from lora_jax import sharding  # noqa: E402

RESULTS = Path(__file__).parent / "results"
DEVICES = 8


@dataclasses.dataclass(frozen=True)
class Shape:
    vocab: int
    dim: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    layers: int
    tied: bool
    batch: int  # global batch (sequences)
    seq: int
    rank: int = 16  # LoRA rank on every linear layer


SHAPES = {
    "llama-1b": Shape(vocab=128256, dim=2048, heads=32, kv_heads=8, head_dim=64, ffn=8192,
                      layers=16, tied=True, batch=8, seq=1024),      # Llama-3.2-1B
    "llama-8b": Shape(vocab=128256, dim=4096, heads=32, kv_heads=8, head_dim=128, ffn=14336,
                      layers=32, tied=False, batch=8, seq=1024),     # Llama-3-8B
    "smoke": Shape(vocab=512, dim=128, heads=8, kv_heads=8, head_dim=16, ffn=256, layers=2,
                   tied=False, batch=8, seq=32, rank=4),
}
# (strategy, (data, model)) on the 8 devices.
LAYOUTS = {"dp": (8, 1), "fsdp": (8, 1), "tp": (1, 8), "fsdp_tp": (2, 4)}


def abstract_params(shape: Shape, dtype: Any) -> dict[str, Any]:
    """The params tree as ``jax.ShapeDtypeStruct``s (stacked layers under ``model.layers``)."""
    def leaf(*dims: int) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(dims, dtype)

    d, L = shape.dim, shape.layers
    q_out, kv_out = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    tree = {
        "model": {
            "embed_tokens": {"embedding": leaf(shape.vocab, d)},
            "layers": {
                "input_layernorm": {"scale": leaf(L, d)},
                "self_attn": {
                    "q_proj": {"kernel": leaf(L, d, q_out)},
                    "k_proj": {"kernel": leaf(L, d, kv_out)},
                    "v_proj": {"kernel": leaf(L, d, kv_out)},
                    "o_proj": {"kernel": leaf(L, q_out, d)},
                },
                "post_attention_layernorm": {"scale": leaf(L, d)},
                "mlp": {
                    "gate_proj": {"kernel": leaf(L, d, shape.ffn)},
                    "up_proj": {"kernel": leaf(L, d, shape.ffn)},
                    "down_proj": {"kernel": leaf(L, shape.ffn, d)},
                },
            },
            "norm": {"scale": leaf(d)},
        },
    }
    if not shape.tied:
        tree["lm_head"] = {"kernel": leaf(d, shape.vocab)}
    return {"params": tree}


def _rms_norm(x: jax.Array, scale: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + 1e-5)
    return (x32 * scale.astype(jnp.float32)).astype(x.dtype)


def make_apply(shape: Shape):
    def layer(x: jax.Array, p: dict[str, Any]) -> jax.Array:
        b, t, _ = x.shape
        attn = p["self_attn"]
        h = _rms_norm(x, p["input_layernorm"]["scale"])
        q = (h @ attn["q_proj"]["kernel"]).reshape(b, t, shape.heads, shape.head_dim)
        k = (h @ attn["k_proj"]["kernel"]).reshape(b, t, shape.kv_heads, shape.head_dim)
        v = (h @ attn["v_proj"]["kernel"]).reshape(b, t, shape.kv_heads, shape.head_dim)
        out = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        x = x + out.reshape(b, t, -1) @ attn["o_proj"]["kernel"]
        mlp = p["mlp"]
        h = _rms_norm(x, p["post_attention_layernorm"]["scale"])
        gated = jax.nn.silu(h @ mlp["gate_proj"]["kernel"]) * (h @ mlp["up_proj"]["kernel"])
        return x + gated @ mlp["down_proj"]["kernel"]

    def apply(params: dict[str, Any], input_ids: jax.Array) -> jax.Array:
        p = params["params"]
        embedding = p["model"]["embed_tokens"]["embedding"]
        x = embedding[input_ids]
        body = jax.checkpoint(lambda x, lp: (layer(x, lp), None))
        x, _ = jax.lax.scan(body, x, p["model"]["layers"])
        x = _rms_norm(x, p["model"]["norm"]["scale"])
        head = embedding.T if shape.tied else p["lm_head"]["kernel"]
        return x @ head

    return apply


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()


def lora_config(rank: int) -> lora_jax.LoraConfig:
    return lora_jax.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear",
                               stacked_modules=r"model\.layers\..*")


def with_shardings(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


def compile_lora_step(shape: Shape, mesh: Any, strategy: str, dtype: Any):
    config = lora_config(shape.rank)
    params = abstract_params(shape, dtype)
    tx = optax.adamw(1e-4)
    s = sharding.train_shardings(config, params, tx, mesh, strategy)
    adapter = jax.eval_shape(lambda: lora_jax.init(config, params, jax.random.key(0)))
    opt_state = jax.eval_shape(tx.init, adapter)
    apply = lora_jax.lora(make_apply(shape), config)

    def loss_fn(params: Any, adapter: Any, batch: dict[str, jax.Array]) -> jax.Array:
        return cross_entropy(apply(params, adapter, batch["input_ids"]), batch["labels"])

    step = sharding.make_sharded_step(loss_fn, tx, s)
    batch = _abstract_batch(shape, s.batch)
    return step.lower(with_shardings(params, s.params), with_shardings(adapter, s.adapter),
                      with_shardings(opt_state, s.opt_state), batch).compile()


def compile_full_step(shape: Shape, mesh: Any, strategy: str, dtype: Any):
    params = abstract_params(shape, dtype)
    tx = optax.adamw(1e-4)
    # The config only marks the stacked layer axis; nothing is adapted here.
    p_shardings = sharding.param_shardings(params, mesh, strategy, config=lora_config(shape.rank))
    o_shardings = sharding.optimizer_shardings(tx, params, p_shardings)
    opt_state = jax.eval_shape(tx.init, params)
    batch_sharding = sharding.batch_sharding(mesh)
    apply = make_apply(shape)

    def step(params: Any, opt_state: Any, batch: dict[str, jax.Array]) -> tuple[Any, Any, Any]:
        def loss_fn(params: Any) -> jax.Array:
            return cross_entropy(apply(params, batch["input_ids"]), batch["labels"])

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    replicated = NamedSharding(mesh, PartitionSpec())
    jitted = jax.jit(step, in_shardings=(p_shardings, o_shardings, batch_sharding),
                     out_shardings=(p_shardings, o_shardings, replicated), donate_argnums=(0, 1))
    return jitted.lower(with_shardings(params, p_shardings), with_shardings(opt_state, o_shardings),
                        _abstract_batch(shape, batch_sharding)).compile()


def _abstract_batch(shape: Shape, batch_sharding: Any) -> dict[str, jax.ShapeDtypeStruct]:
    ids = jax.ShapeDtypeStruct((shape.batch, shape.seq), jnp.int32, sharding=batch_sharding)
    return {"input_ids": ids, "labels": ids}


def measure(name: str, shape: Shape, strategy: str, mode: str, dtype: str) -> dict[str, Any]:
    mesh = sharding.make_mesh(*LAYOUTS[strategy])
    start = time.perf_counter()
    compile_step = compile_lora_step if mode == "lora" else compile_full_step
    compiled = compile_step(shape, mesh, strategy, jnp.dtype(dtype))
    seconds = time.perf_counter() - start
    mem = compiled.memory_analysis()
    arguments, outputs = mem.argument_size_in_bytes, mem.output_size_in_bytes
    aliased, temp = mem.alias_size_in_bytes, mem.temp_size_in_bytes
    return {
        "model": name, "dtype": dtype, "strategy": strategy, "mesh": list(LAYOUTS[strategy]),
        "mode": mode, "argument_bytes": arguments, "output_bytes": outputs, "alias_bytes": aliased,
        "temp_bytes": temp,
        # Everything the step holds at once, at most: inputs, outputs that do not reuse a
        # donated input, and XLA's scratch buffers.
        "total_bytes": arguments + outputs - aliased + temp,
        "xla_peak_bytes": getattr(mem, "peak_memory_in_bytes", None),
        "compile_seconds": round(seconds, 2),
    }


def markdown(records: list[dict[str, Any]]) -> str:
    """A table of per-device bytes (GiB, or MiB when everything is under 1 GiB)."""
    small = max(r["total_bytes"] for r in records) < 2**30
    unit, scale = ("MiB", 2**20) if small else ("GiB", 2**30)
    lines = [
        f"| model | params | strategy | mesh (data, model) | mode | params + state {unit} "
        f"| temporaries {unit} | total {unit} |",
        "|---|---|---|---|---|---:|---:|---:|",
    ]
    for r in records:
        lines.append(f"| {r['model']} | {r['dtype']} | {r['strategy']} | {tuple(r['mesh'])} | "
                     f"{r['mode']} | "
                     f"{r['argument_bytes'] / scale:.2f} | {r['temp_bytes'] / scale:.2f} | "
                     f"{r['total_bytes'] / scale:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny shape only (seconds)")
    parser.add_argument("--models", nargs="+", choices=list(SHAPES), default=None)
    parser.add_argument("--strategies", nargs="+", choices=list(LAYOUTS), default=list(LAYOUTS))
    parser.add_argument("--modes", nargs="+", choices=("lora", "full"), default=["lora", "full"])
    parser.add_argument("--dtypes", nargs="+", choices=("bfloat16", "float32"), default=None,
                        help="params dtypes (default: both; bfloat16 with --smoke)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default: results/sharding_memory[_smoke].json)")
    args = parser.parse_args(argv)
    if jax.device_count() != DEVICES:
        raise SystemExit(f"needs {DEVICES} devices, found {jax.device_count()}: run it as a "
                         "script, so XLA_FLAGS is set before jax is imported")
    models = args.models or (["smoke"] if args.smoke else ["llama-1b", "llama-8b"])
    out = args.out or RESULTS / ("sharding_memory_smoke.json" if args.smoke else "sharding_memory.json")

    dtypes = args.dtypes or (["bfloat16"] if args.smoke else ["bfloat16", "float32"])

    records = []
    for dtype in dtypes:
        for name in models:
            for strategy in args.strategies:
                for mode in args.modes:
                    record = measure(name, SHAPES[name], strategy, mode, dtype)
                    records.append(record)
                    print(f"{name} {dtype} {strategy} {mode}: "
                          f"{record['total_bytes'] / 2**30:.3f} GiB/device "
                          f"(compiled in {record['compile_seconds']} s)", file=sys.stderr,
                          flush=True)
    result = {
        "description": "per-device bytes from compiled.memory_analysis() of one training step "
                       f"on {DEVICES} simulated CPU devices; LoRA (rank per shape) on all "
                       "linear layers with float32 adapter and AdamW state, frozen base; full "
                       "fine-tuning with optax.adamw (moments in the params' dtype); total = "
                       "arguments + outputs - aliased + temporaries. CPU temporaries of "
                       "bfloat16 runs include float32 copies of the weights (CPU matmuls run "
                       "in float32), which GPU/TPU do not make",
        "jax": jax.__version__,
        "shapes": {name: dataclasses.asdict(SHAPES[name]) for name in models},
        "records": records,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(records))


if __name__ == "__main__":
    main()
