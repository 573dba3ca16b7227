"""Fold ``s * A @ B`` into the kernels (merge) and take it out again (unmerge); DoRA and trained tables too."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax import dora, tables
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


def _fold(params: Any, adapter: Adapter, config: LoraConfig, sign: float,
          dequantize: bool = False, norms: Mapping[str, Any] | None = None) -> Any:
    lora_part, table_part = tables.split_adapter(adapter, ())
    targets = find_targets(config, params, lora_part)
    check_adapter(targets, lora_part)
    dora.check_magnitudes(targets, lora_part, config.use_dora)
    table_targets = tables.table_targets(config, params, targets)
    tables.check_tables(table_targets, table_part)
    if sign < 0 and table_targets:
        name = next(iter(table_targets))
        raise ValueError(
            f"unmerge cannot restore {name!r}: merging wrote the adapter's rows over the table's "
            "(trainable tokens / a modules_to_save copy), and the originals are not in the adapter. "
            "Keep the params you merged into instead."
        )
    if sign < 0 and config.use_dora:
        missing = sorted(set(targets) - set(norms or {}))
        if missing:
            raise ValueError(
                f"unmerge of a DoRA adapter needs the norms ||W + s*A@B|| of the kernels before merging "
                f"(the merged kernel has lost them; PEFT caches them): pass dora_norms=lora_jax.dora_norms("
                f"params, adapter, config) computed before merge. Missing: {missing[:8]}."
            )
    by_path = {t.path: t for t in targets.values()}
    tables_by_path = {t.path: t for t in table_targets.values()}
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
            table = tables_by_path.get(path)
            if table is None:
                return w
            rows = table_part[table.module_name][table.key]
            return tables.with_rows(w, rows, table.indices, table.token_axis)
        pair = lora_part[target.module_name]
        delta = lora_delta(pair["lora_A"], pair["lora_B"], target.num_lead, target.scaling)
        w32 = w.astype(jnp.float32)
        magnitude = pair.get(dora.MAGNITUDE)
        if magnitude is None:
            return (w32 + sign * delta).astype(w.dtype)
        if sign > 0:
            return dora.rescale(w32 + delta, magnitude, target.num_lead, target.num_in).astype(w.dtype)
        # W' = (m / n) * (W + D)  =>  W = W' * n / m - D, per output feature.
        ratio = jnp.asarray(norms[target.module_name], jnp.float32) / magnitude.astype(jnp.float32)
        ratio = ratio.reshape(target.lead_shape + (1,) * target.num_in + target.out_shape)
        return (w32 * ratio - delta).astype(w.dtype)

    return jax.tree_util.tree_map_with_path(fold, params, is_leaf=is_quantized)


def dora_norms(params: Any, adapter: Adapter, config: LoraConfig) -> dict[str, jax.Array]:
    """``{module: ||W + s*A@B||}`` over each kernel's input axes: what :func:`unmerge` of DoRA needs.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from lora_jax import LoraConfig, init
        >>> params = {"proj": {"kernel": jnp.arange(6.0).reshape(3, 2)}}
        >>> config = LoraConfig(r=1, target_modules=["proj"], use_dora=True, init_lora_weights=False)
        >>> adapter = init(config, params, jax.random.key(0))
        >>> norms = dora_norms(params, adapter, config)
        >>> merged = merge(params, adapter, config)
        >>> back = unmerge(merged, adapter, config, dora_norms=norms)
        >>> bool(jnp.allclose(back["proj"]["kernel"], params["proj"]["kernel"], atol=1e-5))
        True
    """
    lora_part, _ = tables.split_adapter(adapter, ())
    targets = find_targets(config, params, lora_part)
    check_adapter(targets, lora_part)
    by_path = {t.path: t for t in targets.values()}
    out = {}
    for path, w in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_quantized)[0]:
        target = by_path.get(path)
        if target is not None:
            w = w.dequantize() if is_quantized(w) else w
            pair = lora_part[target.module_name]
            full = jnp.asarray(w).astype(jnp.float32) + lora_delta(pair["lora_A"], pair["lora_B"],
                                                                     target.num_lead, target.scaling)
            out[target.module_name] = dora.column_norms(full, target.num_lead, target.num_in)
    return out


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

    DoRA kernels become ``m * (W + s*A@B) / ||W + s*A@B||``; trainable tokens and
    trained ``modules_to_save`` copies are written into their tables. A table that
    is also a tied output head then changes the head too (as PEFT's merge does):
    with ``ensure_weight_tying=False`` the merged model differs from the adapted
    one in the head.
    """
    return _fold(params, adapter, config, 1.0, dequantize)


def unmerge(params: Any, adapter: Adapter, config: LoraConfig, *, dequantize: bool = False,
            dora_norms: Mapping[str, Any] | None = None) -> Any:
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

    A DoRA merge loses the norms ``||W + s*A@B||``; pass the :func:`dora_norms` taken
    before merging. Tables with trained rows cannot be unmerged (their original rows
    are gone): keep the params you merged into.
    """
    return _fold(params, adapter, config, -1.0, dequantize, dora_norms)
