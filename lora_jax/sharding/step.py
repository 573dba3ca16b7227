"""The sharded train step and the sharded merge: jitted with the layouts of a mesh."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax
from jax.sharding import NamedSharding, PartitionSpec

from lora_jax.config import LoraConfig
from lora_jax.merge import merge
from lora_jax.sharding.layout import TrainShardings
from lora_jax.tree import Adapter


def make_sharded_step(loss_fn: Callable[..., Any], optimizer: optax.GradientTransformation,
                      shardings: TrainShardings, *, has_aux: bool = False,
                      donate: bool = True) -> Callable[..., Any]:
    """A jitted train step over the adapter with the layouts of ``shardings``.

    Example:
        >>> import jax, jax.numpy as jnp, numpy as np, optax, lora_jax
        >>> from lora_jax import sharding
        >>> mesh = sharding.make_mesh(devices=jax.devices()[:1])
        >>> params = {"dense": {"kernel": np.full((8, 2), 0.1, np.float32)}}
        >>> config = lora_jax.LoraConfig(r=2, target_modules=["dense"])
        >>> optimizer = optax.sgd(0.01)
        >>> shardings = sharding.train_shardings(config, params, optimizer, mesh, "fsdp")
        >>> params, adapter, opt_state = sharding.shard_train_state(
        ...     config, params, optimizer, shardings, key=jax.random.key(0))
        >>> apply = lora_jax.lora(lambda p, x: x @ p["dense"]["kernel"], config)
        >>> def loss_fn(params, adapter, batch):
        ...     return jnp.mean((apply(params, adapter, batch["x"]) - batch["y"]) ** 2)
        >>> step = sharding.make_sharded_step(loss_fn, optimizer, shardings)
        >>> batch = sharding.shard_batch({"x": np.ones((4, 8), np.float32),
        ...                               "y": np.zeros((4, 2), np.float32)}, shardings.batch)
        >>> adapter, opt_state, first = step(params, adapter, opt_state, batch)
        >>> adapter, opt_state, second = step(params, adapter, opt_state, batch)
        >>> bool(second < first)
        True

    The step is ``step(params, adapter, opt_state, batch, rng=None)`` and
    returns ``(adapter, opt_state, loss)``, plus ``aux`` with ``has_aux``.
    ``loss_fn(params, adapter, batch)`` returns the mean loss (or
    ``(loss, aux)``); when the step gets an ``rng`` (for LoRA dropout) it is
    called as ``loss_fn(params, adapter, batch, rng)``. Inputs must already
    be laid out as ``shardings`` says (:func:`shard_train_state`,
    :func:`shard_batch`); the loss and ``aux`` come back replicated, so every
    process can read them. With ``donate`` the old adapter and optimizer
    state buffers are reused for the new ones.
    """
    replicated = NamedSharding(shardings.batch.mesh, PartitionSpec())

    def train_step(params: Any, adapter: Adapter, opt_state: Any, batch: Any,
                   rng: jax.Array | None) -> tuple[Any, ...]:
        def loss_of(adapter: Adapter) -> tuple[Any, Any]:
            args = (params, adapter, batch) if rng is None else (params, adapter, batch, rng)
            out = loss_fn(*args)
            return out if has_aux else (out, None)

        (loss, aux), grads = jax.value_and_grad(loss_of, has_aux=True)(adapter)
        updates, opt_state = optimizer.update(grads, opt_state, adapter)
        adapter = optax.apply_updates(adapter, updates)
        return (adapter, opt_state, loss, aux) if has_aux else (adapter, opt_state, loss)

    outs = (shardings.adapter, shardings.opt_state, replicated) + ((replicated,) if has_aux else ())
    jitted = jax.jit(
        train_step,
        in_shardings=(shardings.params, shardings.adapter, shardings.opt_state, shardings.batch,
                      None),
        out_shardings=outs,
        donate_argnums=(1, 2) if donate else (),
    )

    def step(params: Any, adapter: Adapter, opt_state: Any, batch: Any,
             rng: jax.Array | None = None) -> tuple[Any, ...]:
        return jitted(params, adapter, opt_state, batch, rng)

    # step.lower(...).compile().memory_analysis() and friends, as on a jitted function.
    step.lower = lambda params, adapter, opt_state, batch, rng=None: jitted.lower(  # type: ignore[attr-defined]
        params, adapter, opt_state, batch, rng)
    return step


def sharded_merge(params: Any, adapter: Adapter, config: LoraConfig, shardings: Any = None, *,
                  donate: bool = True) -> Any:
    """:func:`lora_jax.merge` on the mesh: each merged kernel keeps W's sharding.

    Example:
        >>> import jax, numpy as np, lora_jax
        >>> from lora_jax import sharding
        >>> mesh = sharding.make_mesh(devices=jax.devices()[:1])
        >>> params = {"v_proj": {"kernel": np.ones((8, 4), np.float32)}}
        >>> params = sharding.shard(params, sharding.param_shardings(params, mesh, "fsdp"))
        >>> config = lora_jax.LoraConfig(r=2, target_modules=["v_proj"])
        >>> adapter = jax.tree.map(lambda x: x + 0.1,  # as if trained: B is not zero
        ...                        lora_jax.init(config, params, jax.random.key(0)))
        >>> expected = lora_jax.merge(params, adapter, config)["v_proj"]["kernel"]
        >>> merged = sharding.sharded_merge(params, adapter, config)  # params are donated
        >>> merged["v_proj"]["kernel"].sharding.spec
        P('data', None)
        >>> bool(np.allclose(merged["v_proj"]["kernel"], expected))
        True

    ``shardings`` (a pytree like ``params``) defaults to the params' own.
    With ``donate`` (the default) the old params' buffers are reused, so
    merging needs no second copy of the model, and ``params`` must not be
    used afterwards.
    """
    if shardings is None:
        shardings = jax.tree.map(lambda x: x.sharding, params)
    merge_fn = jax.jit(lambda p, a: merge(p, a, config), out_shardings=shardings,
                       donate_argnums=(0,) if donate else ())
    return merge_fn(params, adapter)
