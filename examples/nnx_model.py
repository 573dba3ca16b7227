"""LoRA on a Flax NNX model, via nnx.split / nnx.merge.

    python examples/nnx_model.py [--tiny]

``nnx.split`` gives a pure params pytree (module names ``up``, ``down`` as in
the model) and a graph definition; ``nnx.merge`` inside the apply function
rebuilds the module, so ``lora_jax.lora`` sees an ordinary function of params.
After training, ``nnx.update`` writes the merged weights back into the module.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import lora_jax


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.up = nnx.Linear(8, 64, rngs=rngs)
        self.mid = nnx.Linear(64, 64, rngs=rngs)
        self.down = nnx.Linear(64, 1, rngs=rngs)

    def __call__(self, x):
        return self.down(nnx.gelu(self.mid(nnx.gelu(self.up(x)))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="few steps (for tests)")
    args = parser.parse_args()
    steps = 30 if args.tiny else 300

    model = MLP(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (512, 8))
    target = jnp.sin(x[:, :1] * 2.0) + 0.3 * x[:, 1:2]

    # --- the LoRA part ---
    graphdef, params = nnx.split(model, nnx.Param)        # a pytree of the weights

    def apply_fn(params, x):
        return nnx.merge(graphdef, params)(x)              # pure: params in, output out

    config = lora_jax.LoraConfig(r=4, lora_alpha=8, target_modules=["up", "mid"])
    adapter = lora_jax.init(config, params, jax.random.key(1))
    apply = lora_jax.lora(apply_fn, config)
    lora_jax.print_trainable_parameters(params, adapter)

    optimizer = optax.adam(1e-2)
    state = optimizer.init(adapter)

    @jax.jit
    def step(adapter, state):
        value, grads = jax.value_and_grad(lambda a: jnp.mean((apply(params, a, x) - target) ** 2))(adapter)
        updates, state = optimizer.update(grads, state)
        return optax.apply_updates(adapter, updates), state, value

    before = float(jnp.mean((apply_fn(params, x) - target) ** 2))
    for _ in range(steps):
        adapter, state, value = step(adapter, state)
    print(f"mse: {before:.4f} -> {float(value):.4f}")

    # Fold the adapter into the module itself (nnx.update writes into the module's variables).
    expected = apply(params, adapter, x)
    nnx.update(model, lora_jax.merge(params, adapter, config))
    np.testing.assert_allclose(model(x), expected, atol=1e-5)
    print("nnx module with merged weights == LoRA model: ok")


if __name__ == "__main__":
    main()
