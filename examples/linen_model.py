"""LoRA on your own Flax linen model, in a few lines.

    python examples/linen_model.py [--tiny]

The model below knows nothing about LoRA. ``lora_jax.lora(model.apply, config)``
turns its apply into ``fn(params, adapter, x)`` computing ``x @ W + s (x @ A) @ B``
for the targeted kernels; optax trains only the adapter; ``merge`` folds it in.
"""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax


class MLP(nn.Module):
    """Any linen model: LoRA needs nothing from it but its params tree."""

    @nn.compact
    def __call__(self, x):
        x = nn.gelu(nn.Dense(64, name="up")(x))
        x = nn.gelu(nn.Dense(64, name="mid")(x))
        return nn.Dense(1, name="down")(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="few steps (for tests)")
    args = parser.parse_args()
    steps = 30 if args.tiny else 300

    # A "pretrained" model fitted to one function of 8 inputs, then adapted to a shifted one.
    model = MLP()
    x = jax.random.normal(jax.random.key(0), (512, 8))
    w = jax.random.normal(jax.random.key(1), (8, 2))
    params = model.init(jax.random.key(2), x)
    params = fit(lambda p, x: model.apply(p, x), params, x, jnp.sin(x @ w[:, :1]), steps)
    target = jnp.sin(x @ w[:, :1]) + 0.5 * jnp.tanh(x @ w[:, 1:])

    # --- the LoRA part: four lines ---
    config = lora_jax.LoraConfig(r=4, lora_alpha=8, target_modules=["up", "mid"])
    adapter = lora_jax.init(config, params, jax.random.key(3))
    apply = lora_jax.lora(model.apply, config)          # apply(params, adapter, x)
    lora_jax.print_trainable_parameters(params, adapter)

    def loss(adapter):
        return jnp.mean((apply(params, adapter, x) - target) ** 2)

    optimizer = optax.adam(1e-2)
    state = optimizer.init(adapter)

    @jax.jit
    def step(adapter, state):
        value, grads = jax.value_and_grad(loss)(adapter)  # gradients of the adapter only
        updates, state = optimizer.update(grads, state)
        return optax.apply_updates(adapter, updates), state, value

    before = float(loss(adapter))
    for _ in range(steps):
        adapter, state, value = step(adapter, state)
    print(f"mse on the new task: {before:.4f} -> {float(value):.4f}")

    merged = lora_jax.merge(params, adapter, config)     # plain model.apply, no LoRA code
    np.testing.assert_allclose(model.apply(merged, x), apply(params, adapter, x), atol=1e-5)
    print("merged model == LoRA model: ok")


def fit(apply_fn, params, x, y, steps):
    optimizer = optax.adam(1e-2)
    state = optimizer.init(params)

    @jax.jit
    def step(params, state):
        grads = jax.grad(lambda p: jnp.mean((apply_fn(p, x) - y) ** 2))(params)
        updates, state = optimizer.update(grads, state)
        return optax.apply_updates(params, updates), state

    for _ in range(steps):
        params, state = step(params, state)
    return params


if __name__ == "__main__":
    main()
