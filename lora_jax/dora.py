"""DoRA (Liu et al. 2024, arXiv 2402.09353): a trained magnitude per output feature.

A DoRA'd kernel is ``m ⊙ (W + s·A@B) / ||W + s·A@B||``: the norm runs over the
kernel's input axes (PEFT: over the input axis of the torch weight), one value per
output feature, and is detached from the gradient (paper section 4.3, as PEFT).
The adapter entry holds ``m`` as ``"lora_magnitude"``, shaped ``lead + out_shape``;
it starts at ``||W + s·A@B||`` (``||W||`` when B = 0), so the model starts unchanged.

Inside a training step :func:`lora_jax.linear.dora_dot` computes the norms from
low-rank terms. The dense forms here take the kernel ``W + s·A@B`` already formed
(initialisation, merging and the interpreter's fallback form it anyway).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.tree import Adapter, Target

MAGNITUDE = "lora_magnitude"


def column_norms(kernel: jax.Array, num_lead: int, num_in: int) -> jax.Array:
    """``||kernel||`` over its input axes, in float32: shape ``lead + out_shape``.

    Example:
        >>> import jax.numpy as jnp
        >>> column_norms(jnp.array([[3.0, 0.0], [4.0, 1.0]]), num_lead=0, num_in=1).tolist()
        [5.0, 1.0]
    """
    axes = tuple(range(num_lead, num_lead + num_in))
    return jnp.sqrt(jnp.sum(jnp.square(jnp.asarray(kernel).astype(jnp.float32)), axis=axes))


def rescale(kernel: jax.Array, magnitude: jax.Array, num_lead: int, num_in: int,
            magnitude_on_inputs: bool = False) -> jax.Array:
    """DoRA's ``m ⊙ K / stop_gradient(||K||)`` for a dense ``K = W + s·A@B``, in float32.

    Example:
        >>> import jax.numpy as jnp
        >>> k = jnp.array([[3.0, 0.0], [4.0, 2.0]])
        >>> rescale(k, jnp.array([10.0, 1.0]), num_lead=0, num_in=1).tolist()
        [[6.0, 0.0], [8.0, 1.0]]

    ``K`` is ``lead + in + out`` with ``num_in`` input axes. ``magnitude_on_inputs``:
    the kernel was transposed inside the model, so its leading (non-lead) axes are the
    original output axes; the magnitude runs along them and the norm over the rest.
    """
    full = jnp.asarray(kernel).astype(jnp.float32)
    body = full.ndim - num_lead
    if magnitude_on_inputs:
        norm_axes = tuple(range(num_lead + num_in, full.ndim))
        m = magnitude.reshape(magnitude.shape + (1,) * (body - num_in))
    else:
        norm_axes = tuple(range(num_lead, num_lead + num_in))
        m = magnitude.reshape(magnitude.shape[:num_lead] + (1,) * num_in + magnitude.shape[num_lead:])
    norms = jax.lax.stop_gradient(jnp.sqrt(jnp.sum(jnp.square(full), axis=norm_axes, keepdims=True)))
    return m.astype(jnp.float32) * full / norms


def magnitude_shape(target: Target) -> tuple[int, ...]:
    """``lead + out_shape``: one magnitude per output feature (per stacked layer).

    Example:
        >>> import jax.numpy as jnp
        >>> from lora_jax import LoraConfig, find_targets
        >>> params = {"o": {"kernel": jnp.zeros((2, 4, 8)), "bias": jnp.zeros(8)}}   # (heads, head_dim, d)
        >>> magnitude_shape(find_targets(LoraConfig(r=2, target_modules=["o"]), params)["o"])
        (8,)
    """
    return target.lead_shape + target.out_shape


def check_magnitudes(targets: dict[str, Target], adapter: Adapter, use_dora: bool) -> None:
    """Raise ``ValueError`` unless every entry has a magnitude of the right shape exactly when ``use_dora``.

    Example:
        >>> import jax.numpy as jnp
        >>> from lora_jax import LoraConfig, find_targets
        >>> params = {"q": {"kernel": jnp.ones((4, 3))}}
        >>> targets = find_targets(LoraConfig(r=1, target_modules=["q"]), params)
        >>> check_magnitudes(targets, {"q": {"lora_A": jnp.ones((4, 1)), "lora_B": jnp.ones((1, 3))}}, True)
        Traceback (most recent call last):
        ...
        ValueError: adapter['q'] has no 'lora_magnitude', but the config has use_dora=True; DoRA needs one magnitude per output feature, shape (3,) (lora_jax.init creates it).
    """
    for name, target in targets.items():
        entry = adapter[name]
        want = magnitude_shape(target)
        if MAGNITUDE not in entry:
            if use_dora:
                raise ValueError(
                    f"adapter[{name!r}] has no {MAGNITUDE!r}, but the config has use_dora=True; DoRA needs one "
                    f"magnitude per output feature, shape {want} (lora_jax.init creates it)."
                )
            continue
        if not use_dora:
            raise ValueError(
                f"adapter[{name!r}] has a DoRA magnitude {MAGNITUDE!r}, but the config has use_dora=False; "
                "set use_dora=True to apply it, or drop it for plain LoRA."
            )
        got = tuple(np.shape(entry[MAGNITUDE]))
        if got != want:
            raise ValueError(
                f"adapter[{name!r}][{MAGNITUDE!r}] has shape {got}, but kernel {name}.{target.leaf_name} of "
                f"shape {target.shape} needs one magnitude per output feature: {want}."
            )


def kernel_values(target: Target, kernel: Any, why: str) -> jax.Array:
    """The values of a targeted kernel (dequantized), or a ``ValueError`` saying ``why`` they are needed.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from lora_jax import LoraConfig, find_targets
        >>> params = {"q": {"kernel": jnp.ones((4, 3))}}
        >>> target = find_targets(LoraConfig(r=1, target_modules=["q"]), params)["q"]
        >>> kernel_values(target, params["q"]["kernel"], "DoRA").shape
        (4, 3)
        >>> kernel_values(target, jax.ShapeDtypeStruct((4, 3), jnp.float32), "DoRA")
        Traceback (most recent call last):
        ...
        ValueError: DoRA needs the values of kernel q.kernel; got ShapeDtypeStruct. Pass the params themselves (under jax.eval_shape, pass them as an argument of the traced function).
    """
    if isinstance(kernel, jax.ShapeDtypeStruct) or not hasattr(kernel, "dtype"):
        raise ValueError(
            f"{why} needs the values of kernel {target.module_name}.{target.leaf_name}; got "
            f"{type(kernel).__name__}. Pass the params themselves (under jax.eval_shape, pass them as an "
            "argument of the traced function)."
        )
    if hasattr(kernel, "dequantize"):
        return kernel.dequantize()
    return jnp.asarray(kernel)
