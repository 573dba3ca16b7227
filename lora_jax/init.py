"""Adapter initialisation: A and B for every targeted kernel, nothing else."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax.config import LoraConfig
from lora_jax.tree import Adapter, Target, find_targets, warn_guessed_splits


def init(config: LoraConfig, params: Any, key: jax.Array, dtype: Any = jnp.float32, *,
         apply_fn: Any = None, example_args: tuple[Any, ...] = ()) -> Adapter:
    """A fresh adapter for ``params``: ``{module_name: {"lora_A": A, "lora_B": B}}``.

    Example::

        config = LoraConfig(r=4, target_modules=["Dense_0"])
        adapter = init(config, {"params": {"Dense_0": {"kernel": w}}}, jax.random.key(0))
        adapter["Dense_0"]["lora_A"].shape  # (in, 4); lora_B is (4, out) and zero

    A kernel of shape ``lead + in + out`` gets A ``lead + in + (r,)`` and B
    ``lead + (r,) + out``, where ``lead`` is the stacked-layer axis of
    ``stacked_modules`` and ``in`` is the first axis unless ``in_axes`` says
    more (see :class:`~lora_jax.config.LoraConfig`). Initialisation follows
    PEFT: with ``init_lora_weights=True`` A is kaiming-uniform with bound
    ``1/sqrt(fan_in)`` and B is zero, so the model starts unchanged;
    ``"gaussian"`` draws A from N(0, 1/r); ``False`` makes B random too.
    Embedding tables (leaf ``embedding``) get A = 0 and B ~ N(0, 1) as in PEFT.
    Only shapes of ``params`` are read: it may hold ``jax.ShapeDtypeStruct``s.

    An N-D kernel (``DenseGeneral``) splits into input and output axes as
    :func:`~lora_jax.tree.find_targets` says (``in_axes``, else a bias beside it).
    Where neither tells, pass the model as ``apply_fn`` with ``example_args``
    (arrays or ``jax.ShapeDtypeStruct``s; only shapes are traced) and the split is
    read off how the model contracts each kernel; without it an
    :class:`~lora_jax.tree.InAxesWarning` names the kernel. The adapter carries its
    split in its shapes, so ``lora``, ``merge`` and ``save_peft`` follow it.
    """
    if apply_fn is not None:
        from lora_jax.transform import infer_in_axes

        targets = find_targets(infer_in_axes(config, apply_fn, params, *example_args), params)
    else:
        targets = find_targets(config, params)
        warn_guessed_splits(config, params, targets)
    keys = jax.random.split(key, len(targets))
    return {
        name: _init_pair(config.init_lora_weights, target, k, dtype)
        for (name, target), k in zip(targets.items(), keys)
    }


def _init_pair(mode: bool | str, target: Target, key: jax.Array, dtype: Any) -> dict[str, jax.Array]:
    key_a, key_b = jax.random.split(key)
    a_shape, b_shape = target.a_shape, target.b_shape
    fan_in = math.prod(target.in_shape)
    if target.is_embedding:
        if mode is False:
            return {"lora_A": jax.random.normal(key_a, a_shape, dtype),
                    "lora_B": jax.random.normal(key_b, b_shape, dtype)}
        return {"lora_A": jnp.zeros(a_shape, dtype), "lora_B": jax.random.normal(key_b, b_shape, dtype)}
    if mode == "gaussian":
        a = jax.random.normal(key_a, a_shape, dtype) / target.rank
    else:
        # torch's kaiming_uniform_(a=sqrt(5)) on a (r, in) weight: bound 1/sqrt(in).
        bound = 1.0 / math.sqrt(fan_in)
        a = jax.random.uniform(key_a, a_shape, dtype, -bound, bound)
    if mode is False:
        bound_b = 1.0 / math.sqrt(target.rank)
        b = jax.random.uniform(key_b, b_shape, dtype, -bound_b, bound_b)
    else:
        b = jnp.zeros(b_shape, dtype)
    return {"lora_A": a, "lora_B": b}
