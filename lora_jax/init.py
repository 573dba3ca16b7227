"""Adapter initialisation: A and B for every targeted kernel, as PEFT initialises them.

:func:`init` draws the adapter from the kernels' shapes alone. The
initialisations that rewrite the base kernels (``"pissa"``,
``"pissa_niter_<k>"``, ``"olora"``, ``"loftq"``) go through
:func:`init_with_base`, which also returns the rewritten params: their adapter
only reproduces the model on that residual base.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import decompose, dora, tables
from lora_jax.config import LoraConfig
from lora_jax.merge import lora_delta
from lora_jax.quantize import is_quantized
from lora_jax.tree import Adapter, Target, find_targets, warn_guessed_splits


def init(config: LoraConfig, params: Any, key: jax.Array, dtype: Any = jnp.float32, *,
         apply_fn: Any = None, example_args: tuple[Any, ...] = ()) -> Adapter:
    """A fresh adapter for ``params``: ``{module_name: {"lora_A": A, "lora_B": B}}``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from lora_jax import LoraConfig, init
        >>> params = {"params": {"Dense_0": {"kernel": jnp.ones((6, 3))}}}
        >>> adapter = init(LoraConfig(r=2, target_modules=["Dense_0"]), params, jax.random.key(0))
        >>> adapter["Dense_0"]["lora_A"].shape, adapter["Dense_0"]["lora_B"].shape
        ((6, 2), (2, 3))
        >>> float(abs(adapter["Dense_0"]["lora_B"]).max())
        0.0

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
    split in its shapes, so ``lora``, ``merge`` and ``save_peft`` follow it. Conv
    kernels read off the model (``conv_general_dilated``) split after all axes but
    the last, as ``conv_modules`` says.

    Variants add entries, which need the values of the kernels they start from:
    ``use_dora=True`` adds ``"lora_magnitude"`` = ``||W + s*A@B||`` over the input axes
    (PEFT's initial DoRA magnitude); ``trainable_token_indices`` adds
    ``{table: {"trainable_tokens": rows}}`` (the listed rows, see
    :mod:`lora_jax.tables`); a ``modules_to_save`` embedding table with
    ``ensure_weight_tying=False`` adds ``{table: {"embedding": copy}}``, the copy that
    trains while a tied output head keeps the original.

    Raises:
        ValueError: ``config`` rewrites the base kernels (PiSSA, OLoRA, LoftQ);
            use :func:`init_with_base`, which returns the rewritten params.
    """
    if config.changes_base:
        raise ValueError(
            f"init_lora_weights={config.init_lora_weights!r} rewrites the base kernels, so its adapter is "
            "only right on the rewritten params; use `adapter, params = lora_jax.init_with_base(config, "
            "params, key)` and train on the params it returns."
        )
    if apply_fn is not None:
        from lora_jax.transform import infer_in_axes

        targets = find_targets(infer_in_axes(config, apply_fn, params, *example_args), params)
    else:
        targets = find_targets(config, params)
        warn_guessed_splits(config, params, targets)
    keys = jax.random.split(key, len(targets))
    adapter = {
        name: _init_pair(config.init_lora_weights, target, k, dtype)
        for (name, target), k in zip(targets.items(), keys)
    }
    return _with_variant_entries(config, params, targets, adapter, dtype)


def _with_variant_entries(config: LoraConfig, params: Any, targets: dict[str, Target], adapter: Adapter,
                          dtype: Any) -> Adapter:
    """``adapter`` with DoRA magnitudes and the entries of trained tables added."""
    if config.use_dora:
        leaves = {target.path: leaf for target, leaf in _target_leaves(targets, params)}
        for name, target in targets.items():
            kernel = dora.kernel_values(target, leaves[target.path], "use_dora=True (the initial magnitude is "
                                        "the norm of the kernel)")
            entry = adapter[name]
            full = kernel.astype(jnp.float32) + lora_delta(entry["lora_A"], entry["lora_B"], target.num_lead,
                                                           target.scaling)
            norms = dora.column_norms(full, target.num_lead, target.num_in)
            # PEFT takes the norm in the kernel's dtype, then trains it as a float parameter.
            adapter[name] = {**entry, dora.MAGNITUDE: norms.astype(kernel.dtype).astype(dtype)}
    adapter.update(tables.initial_entries(tables.table_targets(config, params, targets), params, dtype))
    return adapter


def init_with_base(config: LoraConfig, params: Any, key: jax.Array,
                   dtype: Any = jnp.float32) -> tuple[Adapter, Any]:
    """``(adapter, params)``: the adapter and the base params it must be applied to.

    Example:
        >>> import jax, jax.numpy as jnp, numpy as np
        >>> from lora_jax import LoraConfig, init_with_base, merge
        >>> w = jnp.asarray(np.random.default_rng(0).normal(size=(6, 4)), jnp.float32)
        >>> params = {"params": {"dense": {"kernel": w}}}
        >>> config = LoraConfig(r=2, lora_alpha=4, target_modules=["dense"], init_lora_weights="pissa")
        >>> adapter, residual = init_with_base(config, params, jax.random.key(0))
        >>> bool(jnp.allclose(merge(residual, adapter, config)["params"]["dense"]["kernel"], w, atol=1e-5))
        True

    For ``init_lora_weights`` True, False or ``"gaussian"`` this is
    ``(init(config, params, key, dtype), params)``. The others follow peft 0.21
    on each targeted kernel ``K`` (torch weight ``W = K.T``, N-D kernels
    flattened to (in, out), stacked kernels layer by layer), with ``s`` the
    module's scaling:

    * ``"pissa"``: ``W = U S V^T``; A and B are the top-r singular vectors
      times ``sqrt(S_r / s)`` and the kernel becomes ``K - s * A @ B``
      (see :func:`lora_jax.decompose.pissa_factors`).
    * ``"pissa_niter_<k>"``: the same on a randomized SVD with ``k`` subspace
      iterations, drawn from ``key``.
    * ``"loftq"`` (``loftq_config={"loftq_bits": 4 or 8, "loftq_iter": k}``):
      alternating quantization and SVD as PEFT's ``loftq_init``; the kernel
      becomes its quantized base, a :class:`~lora_jax.quantize.NF4Array` (4 bits)
      or :class:`~lora_jax.quantize.Int8Array` (8 bits) ready for QLoRA, and
      ``A @ B`` the rank-r SVD of what quantization lost (see :mod:`lora_jax.loftq`;
      ``key`` is not used).
    * ``"olora"``: ``W = Q R``; A = ``R[:r].T``, B = ``Q[:, :r].T`` and the
      kernel becomes ``K - s * A @ B``. (PEFT 0.21 applies OLoRA to a GPT-2
      ``Conv1D`` weight without transposing it, so its init fails or changes
      the model there; lora_jax's kernels are always (in, out) and start equal.)

    So ``lora(apply_fn, config)(params_out, adapter, x)`` equals
    ``apply_fn(params, x)`` at the start (LoftQ: approximately, its base being
    quantized; closer than the quantized base alone). The decompositions run in float32;
    the residual is cast to the kernel's dtype, and A and B are rounded to the
    kernel's dtype and then cast to ``dtype``, as PEFT moves them to the base
    layer's dtype before ``get_peft_model`` casts them back to float32.
    Targeted embedding tables keep the plain embedding init and their base, as
    in PEFT. Other leaves of ``params`` are returned as they are (not copied).

    Keep the initial adapter: :func:`lora_jax.convert_to_original_base` turns
    the trained adapter into a plain LoRA (rank 2r) for the unmodified params.

    Raises:
        ValueError: a targeted kernel is not a floating-point array with values
            (e.g. a ``jax.ShapeDtypeStruct``).
    """
    if not config.changes_base:
        return init(config, params, key, dtype), params
    if config.init_lora_weights == "loftq":
        from lora_jax.loftq import loftq_init_with_base

        return loftq_init_with_base(config, params, dtype)
    targets = find_targets(config, params)
    keys = jax.random.split(key, len(targets))
    leaves = {target.path: leaf for target, leaf in _target_leaves(targets, params)}
    adapter: Adapter = {}
    new_kernels = {}
    for (name, target), k in zip(targets.items(), keys):
        if target.is_embedding:
            adapter[name] = _init_pair(True, target, k, dtype)
            continue
        pair, residual = _base_changing_pair(config, target, leaves[target.path], k, dtype)
        adapter[name] = pair
        new_kernels[target.path] = residual
    new_params = jax.tree_util.tree_map_with_path(lambda path, leaf: new_kernels.get(path, leaf), params)
    return _with_variant_entries(config, new_params, targets, adapter, dtype), new_params


def _target_leaves(targets: dict[str, Target], params: Any) -> list[tuple[Target, Any]]:
    by_path = {t.path: t for t in targets.values()}
    found = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_quantized)[0]:
        if path in by_path:
            found.append((by_path[path], leaf))
    return found


def _base_changing_pair(config: LoraConfig, target: Target, leaf: Any, key: jax.Array,
                        dtype: Any) -> tuple[dict[str, jax.Array], Any]:
    """PiSSA / OLoRA factors of one kernel and its residual, in the shapes and dtypes of the tree."""
    where = f"{target.module_name}.{target.leaf_name}"
    if isinstance(leaf, jax.ShapeDtypeStruct) or not hasattr(leaf, "dtype"):
        raise ValueError(
            f"init_with_base needs the values of targeted kernel {where} to decompose it "
            f"(init_lora_weights={config.init_lora_weights!r}); got {type(leaf).__name__}."
        )
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
        raise ValueError(
            f"init_lora_weights={config.init_lora_weights!r} decomposes a floating-point kernel; "
            f"{where} has dtype {leaf.dtype}."
        )
    fan_in, fan_out = math.prod(target.in_shape), math.prod(target.out_shape)
    matrix = jnp.asarray(leaf).reshape(target.lead_shape + (fan_in, fan_out))
    niter = config.pissa_niter()
    if config.init_lora_weights == "pissa":
        a, b, residual = decompose.pissa_factors(matrix, target.rank, target.scaling)
    elif niter is not None:
        a, b, residual = decompose.pissa_lowrank_factors(matrix, target.rank, target.scaling, niter, key)
    else:
        a, b, residual = decompose.olora_factors(matrix, target.rank, target.scaling)
    pair = {
        "lora_A": a.astype(leaf.dtype).astype(dtype).reshape(target.a_shape),
        "lora_B": b.astype(leaf.dtype).astype(dtype).reshape(target.b_shape),
    }
    residual = residual.reshape(target.shape)
    if isinstance(leaf, np.ndarray):
        return pair, np.asarray(residual).astype(leaf.dtype)
    return pair, residual.astype(leaf.dtype)


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
