"""A tiny Llama-shaped model as plain functions, for the sharding tests.

Param names mirror transformers' Llama (``model.layers.0.self_attn.q_proj``),
so the tensor-parallel presets recognise them. The attention projections are
N-D kernels: q/k/v ``(dim, heads, head_dim)`` with a bias, o ``(heads,
head_dim, dim)`` (two input axes: ``in_axes={"o_proj": 2}``). With
``scan=True`` the layers are stacked under ``model.layers`` with a leading
layer axis and run by ``lax.scan``.

Imported by test_sharding.py (one device), sharded_cases.py (8 simulated
devices) and multihost_worker.py (several processes); it needs no device count.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax


@dataclasses.dataclass(frozen=True)
class TinyConfig:
    vocab: int = 64
    dim: int = 32
    heads: int = 4
    head_dim: int = 8
    ffn: int = 64
    layers: int = 2
    scan: bool = False


TARGETS = ["embed_tokens", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
           "down_proj"]


def lora_config(cfg: TinyConfig) -> lora_jax.LoraConfig:
    return lora_jax.LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS, in_axes={"o_proj": 2},
        stacked_modules=r"model\.layers\..*" if cfg.scan else None,
    )


def _layer_params(rng: np.random.Generator, cfg: TinyConfig) -> dict[str, Any]:
    d, h, hd, f = cfg.dim, cfg.heads, cfg.head_dim, cfg.ffn

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)

    def norm_scale() -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(d)).astype(np.float32)

    return {
        "input_layernorm": {"scale": norm_scale()},
        "self_attn": {
            "q_proj": {"kernel": w(d, h, hd), "bias": 0.1 * w(h, hd)},
            "k_proj": {"kernel": w(d, h, hd), "bias": 0.1 * w(h, hd)},
            "v_proj": {"kernel": w(d, h, hd), "bias": np.zeros((h, hd), np.float32)},
            "o_proj": {"kernel": w(h * hd, d).reshape(h, hd, d)},
        },
        "post_attention_layernorm": {"scale": norm_scale()},
        "mlp": {"gate_proj": {"kernel": w(d, f)}, "up_proj": {"kernel": w(d, f)},
                "down_proj": {"kernel": w(f, d)}},
    }


def init_params(cfg: TinyConfig, seed: int = 0) -> dict[str, Any]:
    """Host (numpy) params: random with numpy, so building them compiles nothing."""
    rng = np.random.default_rng(seed)
    layers = [_layer_params(rng, cfg) for _ in range(cfg.layers)]
    if cfg.scan:
        stacked = jax.tree.map(lambda *xs: np.stack(xs), *layers)
    else:
        stacked = {str(i): layer for i, layer in enumerate(layers)}
    return {"params": {
        "model": {
            "embed_tokens": {"embedding": rng.standard_normal((cfg.vocab, cfg.dim)).astype(np.float32)},
            "layers": stacked,
            "norm": {"scale": np.ones(cfg.dim, np.float32)},
        },
        "lm_head": {"kernel": (rng.standard_normal((cfg.dim, cfg.vocab)) / np.sqrt(cfg.dim)).astype(np.float32)},
    }}


def init_adapter(cfg: TinyConfig, params: Any, seed: int = 1) -> dict[str, Any]:
    """Host adapter with A and B both random, so every gradient is non-zero from step 1."""
    rng = np.random.default_rng(seed)
    targets = lora_jax.find_targets(lora_config(cfg), params)
    return {name: {"lora_A": (0.1 * rng.standard_normal(t.a_shape)).astype(np.float32),
                   "lora_B": (0.1 * rng.standard_normal(t.b_shape)).astype(np.float32)}
            for name, t in targets.items()}


def _rms_norm(x: jax.Array, scale: jax.Array) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6) * scale


def _layer(x: jax.Array, p: dict[str, Any]) -> jax.Array:
    attn = p["self_attn"]
    h = _rms_norm(x, p["input_layernorm"]["scale"])
    q = jnp.einsum("btd,dhk->bthk", h, attn["q_proj"]["kernel"]) + attn["q_proj"]["bias"]
    k = jnp.einsum("btd,dhk->bthk", h, attn["k_proj"]["kernel"]) + attn["k_proj"]["bias"]
    v = jnp.einsum("btd,dhk->bthk", h, attn["v_proj"]["kernel"]) + attn["v_proj"]["bias"]
    t = x.shape[1]
    scores = jnp.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(q.shape[-1])
    causal = jnp.tril(jnp.ones((t, t), bool))
    scores = jnp.where(causal, scores, -1e9)
    out = jnp.einsum("bhqs,bshk->bqhk", jax.nn.softmax(scores, axis=-1), v)
    x = x + jnp.einsum("bthk,hkd->btd", out, attn["o_proj"]["kernel"])
    mlp = p["mlp"]
    h = _rms_norm(x, p["post_attention_layernorm"]["scale"])
    gated = jax.nn.silu(h @ mlp["gate_proj"]["kernel"]) * (h @ mlp["up_proj"]["kernel"])
    return x + gated @ mlp["down_proj"]["kernel"]


def apply(params: dict[str, Any], input_ids: jax.Array) -> jax.Array:
    """Logits ``(batch, seq, vocab)``; layers unrolled or scanned as the tree says."""
    p = params["params"]
    x = p["model"]["embed_tokens"]["embedding"][input_ids]
    layers = p["model"]["layers"]
    if "0" in layers:
        for i in range(len(layers)):
            x = _layer(x, layers[str(i)])
    else:
        x, _ = jax.lax.scan(lambda x, layer: (_layer(x, layer), None), x, layers)
    x = _rms_norm(x, p["model"]["norm"]["scale"])
    return x @ p["lm_head"]["kernel"]


def make_loss(cfg: TinyConfig):
    lora_apply = lora_jax.lora(apply, lora_config(cfg))

    def loss_fn(params: Any, adapter: Any, batch: dict[str, jax.Array]) -> jax.Array:
        logits = lora_apply(params, adapter, batch["input_ids"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()

    return loss_fn


def optimizer() -> optax.GradientTransformation:
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2))


def batch(cfg: TinyConfig, size: int = 8, seq: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    ids = np.random.default_rng(seed).integers(0, cfg.vocab, (size, seq + 1)).astype(np.int32)
    return {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}


def setup(cfg: TinyConfig) -> tuple[Any, Any]:
    """``(params, adapter)`` as numpy arrays, the same in every process."""
    params = init_params(cfg)
    return params, init_adapter(cfg, params)


def train_one_device(cfg: TinyConfig, steps: int = 3) -> tuple[list[float], Any]:
    """The reference: ``steps`` adapter updates with plain ``jax.jit`` on one device."""
    params, adapter = setup(cfg)
    tx = optimizer()
    opt_state = tx.init(adapter)
    loss_fn = make_loss(cfg)

    @jax.jit
    def step(adapter: Any, opt_state: Any, b: Any) -> tuple[Any, Any, jax.Array]:
        loss, grads = jax.value_and_grad(loss_fn, argnums=1)(params, adapter, b)
        updates, opt_state = tx.update(grads, opt_state, adapter)
        return optax.apply_updates(adapter, updates), opt_state, loss

    losses = []
    for i in range(steps):
        adapter, opt_state, loss = step(adapter, opt_state, batch(cfg, seed=i))
        losses.append(float(loss))
    return losses, jax.tree.map(np.asarray, adapter)
