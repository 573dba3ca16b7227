"""Checkpoints of sharded pytrees with orbax: each process writes and reads its own shards,
and a checkpoint restores onto a mesh of any shape."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
from jax.sharding import Sharding

from lora_jax.sharding.layout import _key_names


def save_sharded(directory: str | os.PathLike[str], tree: Any) -> None:
    """Save a pytree of (sharded) arrays with orbax; each process writes its own shards.

    Example:
        >>> import os, tempfile, numpy as np
        >>> from lora_jax import sharding
        >>> path = os.path.join(tempfile.mkdtemp(), "step_100")
        >>> adapter = {"q_proj": {"lora_A": np.ones((8, 2), np.float32)}}
        >>> sharding.save_sharded(path, {"adapter": adapter, "step": np.int32(100)})
        >>> sharding.checkpoint_shapes(path)["step"]
        ShapeDtypeStruct(shape=(), dtype=int32)

    Every process must call it with the same directory. An existing
    checkpoint there is replaced. Returns when the write is complete.
    """
    import orbax.checkpoint as ocp  # orbax is slow to import; only checkpoints need it

    path = Path(directory).absolute()
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, tree, force=True)
        checkpointer.wait_until_finished()


def checkpoint_shapes(directory: str | os.PathLike[str]) -> Any:
    """The saved tree as ``jax.ShapeDtypeStruct``s (named tuples come back as dicts).

    Example:
        >>> import tempfile, jax, numpy as np
        >>> from lora_jax import sharding
        >>> path = tempfile.mkdtemp() + "/params"
        >>> sharding.save_sharded(path, {"w": np.zeros((4, 8), np.float32)})
        >>> shapes = sharding.checkpoint_shapes(path)
        >>> shapes
        {'w': ShapeDtypeStruct(shape=(4, 8), dtype=float32)}
        >>> mesh = sharding.make_mesh(devices=jax.devices()[:1])
        >>> restored = sharding.restore_sharded(path, sharding.param_shardings(shapes, mesh, "fsdp"))
        >>> restored["w"].sharding.spec
        P(None, 'data')
    """
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as checkpointer:
        metadata = checkpointer.metadata(Path(directory).absolute()).item_metadata.tree
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), metadata)


def restore_sharded(directory: str | os.PathLike[str], target: Any) -> Any:
    """Read a :func:`save_sharded` checkpoint onto any mesh (each process reads its shards).

    Example:
        >>> import pathlib, tempfile, jax, numpy as np
        >>> from jax.sharding import NamedSharding, PartitionSpec
        >>> from lora_jax import sharding
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "adapter"
        >>> sharding.save_sharded(path, {"q_proj": {"lora_A": np.ones((8, 2), np.float32)}})
        >>> mesh = sharding.make_mesh(devices=jax.devices()[:1])
        >>> restored = sharding.restore_sharded(path, NamedSharding(mesh, PartitionSpec()))
        >>> bool((restored["q_proj"]["lora_A"] == 1.0).all())
        True
        >>> target = {"q_proj": {"lora_A": jax.ShapeDtypeStruct(
        ...     (8, 2), np.float16, sharding=NamedSharding(mesh, PartitionSpec("data")))}}
        >>> sharding.restore_sharded(path, target)["q_proj"]["lora_A"].dtype  # cast on read
        dtype('float16')

    ``target`` is a pytree like the saved one with a ``Sharding`` at each
    leaf (shapes and dtypes come from the checkpoint), or with
    ``jax.ShapeDtypeStruct``s that carry a ``sharding`` (which may change the
    dtype), or a single ``Sharding`` for every leaf. The mesh may differ from
    the one the checkpoint was saved from, in shape and in size.
    """
    import orbax.checkpoint as ocp

    path = Path(directory).absolute()
    with ocp.StandardCheckpointer() as checkpointer:
        saved = checkpointer.metadata(path).item_metadata.tree
        if isinstance(target, Sharding):
            abstract = jax.tree.map(
                lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=target), saved)
        else:
            abstract = _abstract_target(target, saved, path)
        return checkpointer.restore(path, abstract)


def _abstract_target(target: Any, saved: Any, path: Path) -> Any:
    saved_by_name = {_key_names(p): m for p, m in jax.tree_util.tree_flatten_with_path(saved)[0]}

    def abstract(key_path: tuple[Any, ...], leaf: Any) -> jax.ShapeDtypeStruct:
        if isinstance(leaf, jax.ShapeDtypeStruct):
            if leaf.sharding is None:
                raise ValueError(f"restore target {'.'.join(_key_names(key_path))} has no sharding.")
            return leaf
        names = _key_names(key_path)
        if names not in saved_by_name:
            raise ValueError(
                f"restore target {'.'.join(names)} is not in the checkpoint at {path}; it holds "
                f"{', '.join('.'.join(n) for n in list(saved_by_name)[:8])}"
                + (" ..." if len(saved_by_name) > 8 else "") + "."
            )
        meta = saved_by_name[names]
        return jax.ShapeDtypeStruct(tuple(meta.shape), meta.dtype, sharding=leaf)

    return jax.tree_util.tree_map_with_path(
        abstract, target, is_leaf=lambda x: isinstance(x, (Sharding, jax.ShapeDtypeStruct)))
