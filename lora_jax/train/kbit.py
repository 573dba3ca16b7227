"""Quantized (QLoRA) runs: the frozen base as PEFT's ``prepare_model_for_kbit_training`` leaves it.

PEFT's recipe for a bitsandbytes-quantized model, and what lora_jax does instead:

* **Frozen non-quantized params in float32.** PEFT casts every parameter that is not a
  4/8-bit weight to float32, for numerically stable norms. lora_jax keeps norm scales
  and biases (floating leaves of rank <= 1, a few KiB) in float32 and, like PEFT, every
  quantized kernel dequantizes to the compute dtype. Embedding tables and an unquantized
  output head follow the compute dtype (``--dtype``): PEFT's float32 copies of them
  would cost 4 bytes per parameter, more than the whole 4-bit base of a 1B model's
  decoder (with ``--dtype float32``, the default, everything is float32 as in PEFT).
* **The loss in float32.** The logits are cast to float32 before the cross-entropy
  (:func:`lora_jax.train.step.causal_lm_loss`), whatever the compute dtype.
* **Gradient checkpointing on.** PEFT turns on the model's gradient checkpointing;
  ``lora-jax finetune`` (and :func:`lora_jax.train.finetune`) default ``--remat`` to
  ``"full"`` for every run, quantized or not: the backward pass recomputes the
  forward activations instead of keeping them, the memory that is left once the
  weights are 4-bit. (The dequantized kernels themselves are never residuals:
  :func:`lora_jax.lora` dequantizes them again in the backward pass.)
* PEFT also makes the input embeddings' output require gradients (for torch's
  reentrant checkpointing); JAX differentiates what it is asked to, so nothing is needed.

::

    base = models.from_pretrained(path, quantize=quant_config("nf4", double_quant=True))
    frozen = prepare_for_kbit_training(base.params, "bfloat16")
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax.config import matches
from lora_jax.quantize import QuantConfig, is_quantized
from lora_jax.tree import named_leaves

SCHEMES = ("nf4", "fp4", "int8", "int4", "gguf")  # --quantize: lora_jax.quantize's, or a GGUF file's own
DOUBLE_QUANT_SCHEMES = ("nf4", "fp4")


def quant_config(scheme: str, *, double_quant: bool = False) -> QuantConfig | str:
    """What ``--quantize SCHEME [--double-quant]`` asks the loader for.

    ``"gguf"`` stays a name (``models.from_pretrained(path, quantize="gguf")`` keeps a
    GGUF file's own blocks); the others become a :class:`~lora_jax.quantize.QuantConfig`
    with bitsandbytes' defaults (blocks of 64 for NF4/FP4, groups of 128 for int4).

    Example:
        >>> quant_config("nf4", double_quant=True)
        QuantConfig(scheme='nf4', blocksize=64, double_quant=True, target_modules=None, exclude_modules=None, stacked_modules=None, in_axes={}, kernel_names=('kernel',))
        >>> quant_config("gguf")
        'gguf'
        >>> quant_config("int8", double_quant=True)
        Traceback (most recent call last):
        ...
        ValueError: --double-quant applies to nf4/fp4 (it quantizes their absmax values); --quantize int8 has none.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"--quantize: expected one of {', '.join(SCHEMES)}, got {scheme!r}.")
    if double_quant and scheme not in DOUBLE_QUANT_SCHEMES:
        raise ValueError(f"--double-quant applies to nf4/fp4 (it quantizes their absmax values); "
                         f"--quantize {scheme} has none.")
    if scheme == "gguf":
        return scheme
    return QuantConfig(scheme, double_quant=double_quant)


def has_quantized(params: Any) -> bool:
    """Whether ``params`` holds a quantized kernel.

    Example:
        >>> import jax.numpy as jnp
        >>> from lora_jax.quantize import quantize
        >>> has_quantized({"w": {"kernel": jnp.ones((64, 2))}})
        False
        >>> has_quantized(quantize({"w": {"kernel": jnp.ones((64, 2))}}, "int8"))
        True
    """
    return any(is_quantized(x) for x in jax.tree.leaves(params, is_leaf=is_quantized))


def prepare_for_kbit_training(params: Any, compute_dtype: Any = "float32") -> Any:
    """The frozen params of a quantized run, as ``prepare_model_for_kbit_training`` prepares them.

    Quantized kernels dequantize to ``compute_dtype`` (their packed codes and scales are
    untouched, bit for bit); norm scales and biases (floating leaves of rank <= 1) are
    kept in float32; every other floating leaf (embeddings, an unquantized output head)
    is cast to ``compute_dtype``. See the module docstring for how this follows PEFT.

    Example:
        >>> import jax.numpy as jnp
        >>> from lora_jax.quantize import quantize
        >>> params = quantize({"q_proj": {"kernel": jnp.ones((64, 8))}, "norm": {"scale": jnp.ones(8)},
        ...                    "embed": {"embedding": jnp.ones((10, 8))}}, "nf4")
        >>> frozen = prepare_for_kbit_training(params, "bfloat16")
        >>> frozen["q_proj"]["kernel"].dtype, frozen["norm"]["scale"].dtype, frozen["embed"]["embedding"].dtype
        (dtype(bfloat16), dtype('float32'), dtype(bfloat16))
        >>> frozen["q_proj"]["kernel"].codes is params["q_proj"]["kernel"].codes
        True
    """
    dtype = jnp.dtype(compute_dtype)

    def prepare(leaf: Any) -> Any:
        if is_quantized(leaf):
            return leaf if leaf.dtype == dtype else dataclasses.replace(leaf, dtype=dtype)
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            return leaf
        target = jnp.float32 if jnp.ndim(leaf) <= 1 else dtype
        return leaf if leaf.dtype == target else jnp.asarray(leaf, target)

    return jax.tree.map(prepare, params, is_leaf=is_quantized)


def quantized_modules_to_save(params: Any, modules_to_save: str | Sequence[str] | None) -> list[str]:
    """The quantized kernels that ``modules_to_save`` would train in full (they cannot).

    Example:
        >>> import jax.numpy as jnp
        >>> from lora_jax.quantize import quantize
        >>> params = quantize({"model": {"up_proj": {"kernel": jnp.ones((64, 8))}}}, "nf4")
        >>> quantized_modules_to_save(params, ["up_proj"]), quantized_modules_to_save(params, ["lm_head"])
        (['model.up_proj'], [])
    """
    if not modules_to_save:
        return []
    return [module for _, module, _, leaf in named_leaves(params)
            if is_quantized(leaf) and _under(modules_to_save, module)]


def _under(spec: str | Sequence[str], module: str) -> bool:
    """Whether ``module`` is one of ``spec``'s modules or inside one (PEFT's matching)."""
    parts = module.split(".")
    return any(matches(spec, ".".join(parts[:i])) for i in range(1, len(parts) + 1))
