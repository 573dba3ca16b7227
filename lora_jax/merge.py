"""Fold ``s * A @ B`` into the kernels (merge) and take it out again (unmerge)."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax.config import LoraConfig
from lora_jax.quantize import is_quantized
from lora_jax.tree import Adapter, check_adapter, find_targets


def lora_delta(a: jax.Array, b: jax.Array, num_lead: int, scaling: float) -> jax.Array:
    """``scaling * A @ B`` in float32 with the kernel's shape ``lead + in + out``.

    Example:
        >>> import jax.numpy as jnp
        >>> lora_delta(jnp.ones((3, 1)), jnp.ones((1, 2)), num_lead=0, scaling=0.5).tolist()
        [[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]]

    The product runs at full float32 precision (``Precision.HIGHEST``), so
    TPUs do not round it through bfloat16.
    """
    lead, rank = a.shape[:num_lead], a.shape[-1]
    in_shape, out_shape = a.shape[num_lead:-1], b.shape[num_lead + 1 :]
    a2 = a.reshape(lead + (math.prod(in_shape), rank)).astype(jnp.float32)
    b2 = b.reshape(lead + (rank, math.prod(out_shape))).astype(jnp.float32)
    delta = jnp.matmul(a2, b2, precision=jax.lax.Precision.HIGHEST)
    return scaling * delta.reshape(lead + in_shape + out_shape)


def _fold(params: Any, adapter: Adapter, config: LoraConfig, sign: float, dequantize: bool) -> Any:
    targets = find_targets(config, params, adapter)
    check_adapter(targets, adapter)
    by_path = {t.path: t for t in targets.values()}
    if not dequantize:
        leaves = dict(jax.tree_util.tree_flatten_with_path(params, is_leaf=is_quantized)[0])
        quantized = [t.module_name for t in targets.values() if is_quantized(leaves.get(t.path))]
        if quantized:
            raise ValueError(
                f"Cannot fold the adapter into quantized kernels ({', '.join(quantized[:4])}"
                f"{' ...' if len(quantized) > 4 else ''}): W + s*A@B is not representable in their "
                "codes. Pass dequantize=True to merge into dequantized (original-dtype) kernels, or "
                "keep the adapter unmerged.")

    def fold(path: Any, w: Any) -> Any:
        if is_quantized(w):
            w = w.dequantize()
        target = by_path.get(path)
        if target is None:
            return w
        pair = adapter[target.module_name]
        delta = lora_delta(pair["lora_A"], pair["lora_B"], target.num_lead, target.scaling)
        return (w.astype(jnp.float32) + sign * delta).astype(w.dtype)

    return jax.tree_util.tree_map_with_path(fold, params, is_leaf=is_quantized)



def merge(params: Any, adapter: Adapter, config: LoraConfig, *, dequantize: bool = False) -> Any:
    """Params with ``W + s * A @ B`` in every targeted kernel, for the plain apply_fn.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from lora_jax import LoraConfig, init, lora
        >>> params = {"proj": {"kernel": jnp.ones((3, 2))}}
        >>> config = LoraConfig(r=1, lora_alpha=2, target_modules=["proj"], init_lora_weights=False)
        >>> adapter = init(config, params, jax.random.key(0))
        >>> merged = merge(params, adapter, config)
        >>> apply = lambda p, x: x @ p["proj"]["kernel"]
        >>> x = jnp.ones((1, 3))
        >>> bool(jnp.allclose(apply(merged, x), lora(apply, config)(params, adapter, x), atol=1e-6))
        True

    The sum is formed in float32 and cast back to each kernel's dtype, so
    bfloat16 kernels lose no more than one rounding. Leaves that are not
    targeted are returned as they are (not copied). Jit it, with
    ``donate_argnums=0`` to update in place.

    A QLoRA base (quantized kernels, :mod:`lora_jax.quantize`) needs
    ``dequantize=True``: every quantized kernel is dequantized to its original dtype,
    targeted ones with ``s * A @ B`` added in float32 (re-quantizing the merged kernel
    would add a new quantization error, so it is left to the caller).
    """
    return _fold(params, adapter, config, 1.0, dequantize)


def unmerge(params: Any, adapter: Adapter, config: LoraConfig, *, dequantize: bool = False) -> Any:
    """Undo :func:`merge`: ``W - s * A @ B`` in every targeted kernel.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from lora_jax import LoraConfig, init
        >>> params = {"proj": {"kernel": jnp.ones((3, 2))}}
        >>> config = LoraConfig(r=1, target_modules=["proj"], init_lora_weights=False)
        >>> adapter = init(config, params, jax.random.key(0))
        >>> back = unmerge(merge(params, adapter, config), adapter, config)
        >>> bool(jnp.allclose(back["proj"]["kernel"], 1.0, atol=1e-6))
        True
    """
    return _fold(params, adapter, config, -1.0, dequantize)
