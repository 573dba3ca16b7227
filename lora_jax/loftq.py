"""LoftQ (Li et al. 2023): a quantized base and a LoRA that corrects its quantization error.

``init_lora_weights="loftq"`` with ``loftq_config={"loftq_bits": 4, "loftq_iter": k}``,
as peft 0.21's ``loftq_init`` defines it, on each targeted kernel's torch weight ``W``::

    residual = W
    repeat k times:
        Q = quantize(residual)              # bitsandbytes NF4 (blocks of 64, no double quant),
                                            # or its row-wise int8 of the float16 weight (8 bits)
        U, S, Vh = svd(W - dequantize(Q))   # float32
        L, R = U[:, :r] sqrt(S[:r]), sqrt(S[:r]) Vh[:r]
        residual = W - L @ R
    base = Q (its dequantized values are PEFT's new base weight), lora_A = R, lora_B = L

PEFT 0.21 quantizes with bitsandbytes itself (``Params4bit`` / ``Int8Params``; the
NF4 quantizer of its own that older PEFT versions had is gone). lora_jax's NF4 and int8
are bitsandbytes' bit for bit, so the base here *is* the quantized array PEFT's
dequantized weight came from: a :class:`~lora_jax.quantize.NF4Array` (or
:class:`~lora_jax.quantize.Int8Array`) ready for QLoRA training, whose ``dequantize()``
equals PEFT's weight exactly after one iteration, and up to the SVD's float32 rounding
after more (the quantizer then sees ``W - L @ R``).

As in PEFT, ``L @ R`` is not divided by the LoRA scaling: the initial model is
``Q + s * L @ R``, LoftQ's approximation of ``W`` when ``s = lora_alpha / r = 1``
(a :class:`LoftQScalingWarning` says so otherwise). Embedding tables are refused (PEFT
0.21's LoftQ fails on them).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.config import LoraConfig
from lora_jax.quantize import QuantizedArray, is_quantized, quantize_array
from lora_jax.tree import Adapter, Target, find_targets

NF4_BLOCKSIZE = 64  # bitsandbytes' Params4bit default, what PEFT's LoftQ quantizes with


class LoftQScalingWarning(UserWarning):
    """LoftQ's correction ``L @ R`` is applied with a LoRA scaling other than 1.

    Example:
        >>> from lora_jax.loftq import LoftQScalingWarning
        >>> issubclass(LoftQScalingWarning, UserWarning)
        True
    """


def loftq_factors(weight: Any, rank: int, *, bits: int = 4, iterations: int = 1,
                  num_in: int = 1) -> tuple[np.ndarray, np.ndarray, QuantizedArray]:
    """``(A, B, base)`` of one kernel: LoftQ's alternating quantization and SVD (peft's ``loftq_init``).

    ``weight`` is one layer's kernel ``in_shape + out_shape`` (``num_in`` input axes);
    A is ``(prod(in), rank)``, B ``(rank, prod(out))`` in float32, ``base`` the quantized
    kernel. ``base.dequantize() + A @ B`` approximates the kernel better than the
    quantized kernel alone, and more so with more iterations.

    Example:
        >>> import numpy as np
        >>> from lora_jax.loftq import loftq_factors
        >>> kernel = np.random.default_rng(0).normal(size=(128, 64)).astype(np.float32)
        >>> errors = []
        >>> for iterations in (1, 4):
        ...     a, b, base = loftq_factors(kernel, 8, iterations=iterations)
        ...     errors.append(np.linalg.norm(kernel - np.asarray(base.dequantize()) - a @ b))
        >>> plain = np.linalg.norm(kernel - np.asarray(loftq_factors(kernel, 8)[2].dequantize()))
        >>> base, bool(errors[1] < errors[0] < plain)
        (NF4Array(shape=(128, 64), dtype=float32, blocksize=64, double_quant=False, nbytes=4608), True)
    """
    if bits not in (4, 8):
        raise ValueError(f"loftq_bits must be 4 (NF4) or 8 (int8), as in PEFT; got {bits!r}.")
    if not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"loftq_iter must be an integer >= 1, got {iterations!r}.")
    kernel = np.asarray(weight, np.float32)
    fan_in = math.prod(kernel.shape[:num_in])
    fan_out = kernel.size // fan_in
    target = kernel.reshape(fan_in, fan_out)
    residual = kernel
    for i in range(iterations):
        if bits == 4:
            base = quantize_array(residual, "nf4", blocksize=NF4_BLOCKSIZE, num_in=num_in)
        else:
            # bitsandbytes' Int8Params casts the weight to float16 before quantizing it.
            base = quantize_array(residual.astype(np.float16), "int8", num_in=num_in)
        dequantized = np.asarray(base.dequantize(jnp.float32)).reshape(fan_in, fan_out)
        # The torch weight is the transpose: its U is our Vh.T, its Vh our U.T.
        u, s, vh = np.linalg.svd(target - dequantized, full_matrices=False)
        root = np.sqrt(s[:rank])
        a = (u[:, :rank] * root).astype(np.float32)           # R.T: lora_A
        b = (root[:, None] * vh[:rank]).astype(np.float32)    # L.T: lora_B
        if i + 1 < iterations:
            residual = (target - a @ b).reshape(kernel.shape)
    return a, b, _with_dtype(base, np.dtype(getattr(weight, "dtype", np.float32)))


def _with_dtype(base: QuantizedArray, dtype: np.dtype) -> QuantizedArray:
    import dataclasses

    return base if base.dtype == dtype else dataclasses.replace(base, dtype=dtype)


def loftq_init_with_base(config: LoraConfig, params: Any, dtype: Any = jnp.float32) -> tuple[Adapter, Any]:
    """``(adapter, params)`` for ``init_lora_weights="loftq"``: targeted kernels become their
    LoftQ-quantized base (:func:`loftq_factors`), everything else is returned as it is.

    Example:
        >>> import jax.numpy as jnp, numpy as np
        >>> from lora_jax import LoraConfig, init_with_base, lora
        >>> params = {"dense": {"kernel": jnp.asarray(np.random.default_rng(0).normal(size=(64, 32)), jnp.float32)}}
        >>> config = LoraConfig(r=4, lora_alpha=4, target_modules=["dense"], init_lora_weights="loftq",
        ...                     loftq_config={"loftq_bits": 4, "loftq_iter": 2})
        >>> adapter, base = init_with_base(config, params, None)
        >>> base["dense"]["kernel"]
        NF4Array(shape=(64, 32), dtype=float32, blocksize=64, double_quant=False, nbytes=1152)
        >>> x = jnp.ones((1, 64))
        >>> out = lora(lambda p, x: x @ p["dense"]["kernel"], config)(base, adapter, x)
        >>> bool(jnp.abs(out - x @ params["dense"]["kernel"]).max() < jnp.abs(x @ params["dense"]["kernel"]).max())
        True
    """
    bits, iterations = config.loftq_config["loftq_bits"], config.loftq_config["loftq_iter"]
    targets = find_targets(config, params)
    leaves = dict(jax.tree_util.tree_flatten_with_path(params, is_leaf=is_quantized)[0])
    odd = sorted({t.scaling for t in targets.values() if not math.isclose(t.scaling, 1.0)})
    if odd:
        warnings.warn(
            f"init_lora_weights='loftq' with LoRA scaling {odd[0]:g} (lora_alpha / r): LoftQ's factors "
            "approximate W - Q without the scaling (as PEFT defines them), so the initial model is "
            f"Q + {odd[0]:g} * L @ R; set lora_alpha = r for Q + L @ R ~ W.", LoftQScalingWarning, stacklevel=3)
    adapter: Adapter = {}
    new_kernels: dict[Any, Any] = {}
    for name, target in targets.items():
        leaf = _kernel_values(target, leaves[target.path])
        layers = leaf.reshape((-1,) + tuple(target.shape[target.num_lead:]))
        pieces = [loftq_factors(layer, target.rank, bits=bits, iterations=iterations, num_in=target.num_in)
                  for layer in layers]
        a = np.stack([p[0] for p in pieces]).reshape(target.a_shape)
        b = np.stack([p[1] for p in pieces]).reshape(target.b_shape)
        if target.num_lead:
            from lora_jax.quantize import stack

            base = stack([p[2] for p in pieces])
        else:
            base = pieces[0][2]
        adapter[name] = {"lora_A": jnp.asarray(a, dtype), "lora_B": jnp.asarray(b, dtype)}
        new_kernels[target.path] = base
    new_params = jax.tree_util.tree_map_with_path(lambda path, x: new_kernels.get(path, x), params,
                                                  is_leaf=is_quantized)
    return adapter, new_params


def _kernel_values(target: Target, leaf: Any) -> np.ndarray:
    where = f"{target.module_name}.{target.leaf_name}"
    if target.is_embedding:
        raise ValueError(f"init_lora_weights='loftq' targets the embedding table {where}; PEFT 0.21's LoftQ "
                         "supports linear layers only (its Embedding layer fails), so leave embeddings out of "
                         "target_modules.")
    if is_quantized(leaf):
        raise ValueError(f"init_lora_weights='loftq' quantizes {where} itself; it is already quantized "
                         f"({leaf!r}): pass the float params.")
    if isinstance(leaf, jax.ShapeDtypeStruct) or not hasattr(leaf, "dtype"):
        raise ValueError(f"init_with_base needs the values of targeted kernel {where} to decompose it "
                         f"(init_lora_weights='loftq'); got {type(leaf).__name__}.")
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
        raise ValueError(f"init_lora_weights='loftq' decomposes a floating-point kernel; {where} has dtype "
                         f"{leaf.dtype}.")
    return np.asarray(leaf)
