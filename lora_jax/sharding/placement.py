"""Placement: put host values, batches and a fresh or existing training state on a mesh."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import NamedSharding, Sharding

from lora_jax.config import LoraConfig
from lora_jax.init import init
from lora_jax.sharding.layout import TrainShardings, _axis_sizes, _size
from lora_jax.tree import Adapter


def shard(tree: Any, shardings: Any) -> Any:
    """Place ``tree`` by ``shardings`` (a pytree like it, or one ``Sharding`` for all).

    Example:
        >>> import jax, numpy as np
        >>> from jax.sharding import NamedSharding, PartitionSpec
        >>> from lora_jax import sharding
        >>> mesh = sharding.make_mesh(devices=jax.devices()[:1])
        >>> placed = sharding.shard({"w": np.arange(4.0)}, NamedSharding(mesh, PartitionSpec("data")))
        >>> placed["w"].sharding.spec, placed["w"]
        (P('data',), Array([0., 1., 2., 3.], dtype=float32))

    Host values (numpy, or arrays on one local device) are cut into the
    shards this process owns, so on several hosts each process passes the
    same full value and only its part is transferred. Arrays already spread
    over the mesh are resharded with ``jax.device_put``.
    """
    def put(x: Any, sharding: Sharding) -> Any:
        if sharding.is_fully_addressable or (isinstance(x, jax.Array) and not x.is_fully_addressable):
            return jax.device_put(x, sharding)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    if isinstance(shardings, Sharding):
        return jax.tree.map(lambda x: put(x, shardings), tree)
    return jax.tree.map(put, tree, shardings)


def shard_batch(batch: Any, sharding: NamedSharding) -> Any:
    """Global arrays from this process's rows of the batch (every leaf split on axis 0).

    Example:
        >>> import jax, numpy as np
        >>> from lora_jax import sharding
        >>> mesh = sharding.make_mesh(devices=jax.devices()[:1])
        >>> batch = sharding.shard_batch({"input_ids": np.zeros((4, 16), np.int32)},
        ...                              sharding.batch_sharding(mesh))
        >>> batch["input_ids"].shape, batch["input_ids"].sharding.spec
        ((4, 16), P('data',))

    With one process ``batch`` is the whole batch; with several, each passes
    its own consecutive rows (process ``i`` holds rows ``i*n .. (i+1)*n - 1``
    of the global batch when the data axis runs across processes in order).
    """
    spec = sharding.spec
    data_size = _size(spec[0], _axis_sizes(sharding.mesh)) if len(spec) else 1

    def put(x: Any) -> jax.Array:
        x = np.asarray(x)
        if jax.process_count() == 1 and (x.ndim == 0 or x.shape[0] % data_size):
            raise ValueError(
                f"A batch leaf of shape {x.shape} cannot be split over the data axis of size "
                f"{data_size}; use a batch size that is a multiple of {data_size}."
            )
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree.map(put, batch)


def shard_train_state(config: LoraConfig, params: Any, optimizer: optax.GradientTransformation,
                      shardings: TrainShardings, *, key: jax.Array | None = None,
                      adapter: Adapter | None = None) -> tuple[Any, Adapter, Any]:
    """``(params, adapter, opt_state)`` placed on the mesh by ``shardings``.

    Example:
        >>> import jax, numpy as np, optax, lora_jax
        >>> from lora_jax import sharding
        >>> params = {"q_proj": {"kernel": np.ones((16, 8), np.float32)}}
        >>> config = lora_jax.LoraConfig(r=4, target_modules=["q_proj"])
        >>> adamw = optax.adamw(1e-3)
        >>> layouts = sharding.train_shardings(
        ...     config, params, adamw, sharding.make_mesh(devices=jax.devices()[:1]), "fsdp")
        >>> params, adapter, opt_state = sharding.shard_train_state(
        ...     config, params, adamw, layouts, adapter=lora_jax.init(config, params,
        ...                                                           jax.random.key(1)))
        >>> adapter["q_proj"]["lora_A"].sharding.spec, opt_state[0].mu["q_proj"]["lora_B"].shape
        (P('data', None), (4, 8))

    Give ``key`` to make a fresh adapter (``lora_jax.init``), created directly
    in its shards, or ``adapter`` to place an existing one. The optimizer
    state is created in place from the sharded adapter.
    """
    if (key is None) == (adapter is None):
        raise ValueError("Pass exactly one of key= (a fresh adapter) or adapter= (an existing one).")
    params = shard(params, shardings.params)
    if adapter is None:
        shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
        adapter = jax.jit(lambda k: init(config, shapes, k), out_shardings=shardings.adapter)(key)
    else:
        adapter = shard(adapter, shardings.adapter)
    opt_state = jax.jit(optimizer.init, out_shardings=shardings.opt_state)(adapter)
    return params, adapter, opt_state
