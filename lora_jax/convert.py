"""A PiSSA / OLoRA adapter trained on its residual base, as a plain LoRA for the original base.

PEFT's ``save_pretrained(..., path_initial_model_for_weight_conversion=...)``
(``LoraModel.subtract_mutated_init``): the base-changing inits start from
``W = W_res + s * A0 @ B0`` and train to ``W_res + s * A @ B``, so the update
relative to the original ``W`` is ``s * (A @ B - A0 @ B0)``. That is a LoRA of
rank 2r: ``A' = [A, A0]`` and ``B' = [B; -B0]``, with ``r`` doubled and
``lora_alpha`` raised so the scaling stays ``s``.
"""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp
import numpy as np

from lora_jax.config import LoraConfig
from lora_jax.tree import Adapter


def _doubled_alpha(alpha: float, use_rslora: bool) -> float:
    """The alpha that keeps ``alpha / r`` (or ``alpha / sqrt(r)``) when r doubles."""
    return alpha * math.sqrt(2.0) if use_rslora else 2 * alpha


def original_base_config(config: LoraConfig) -> LoraConfig:
    """``config`` for the converted adapter: ranks doubled, alphas raised to keep each scaling.

    Example:
        >>> from lora_jax import LoraConfig, original_base_config
        >>> c = original_base_config(LoraConfig(r=4, lora_alpha=8, target_modules=["q"], init_lora_weights="pissa"))
        >>> c.r, c.lora_alpha, c.init_lora_weights
        (8, 16, True)

    PEFT doubles ``r``, ``lora_alpha`` (by ``sqrt(2)`` with ``use_rslora``),
    every ``rank_pattern`` value and every ``alpha_pattern`` value, and sets
    ``init_lora_weights=True``. PEFT refuses ``use_rslora`` together with
    rank or alpha patterns because it doubles ``alpha_pattern`` values even
    with rslora; here every alpha is raised by the factor that keeps its own
    module's scaling, so that combination converts too.
    """
    return config.replace(
        r=2 * config.r,
        lora_alpha=_doubled_alpha(config.lora_alpha, config.use_rslora),
        rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
        alpha_pattern={k: _doubled_alpha(v, config.use_rslora) for k, v in config.alpha_pattern.items()},
        init_lora_weights=True,
        loftq_config={},
    )


def _concat(x: Any, y: Any, axis: int) -> Any:
    if isinstance(x, np.ndarray) and isinstance(y, np.ndarray):
        return np.concatenate([x, y], axis=axis)
    return jnp.concatenate([jnp.asarray(x), jnp.asarray(y).astype(jnp.result_type(x))], axis=axis)


def convert_to_original_base(adapter: Adapter, initial_adapter: Adapter,
                             config: LoraConfig) -> tuple[Adapter, LoraConfig]:
    """``(adapter', config')``: a rank-2r LoRA for the ORIGINAL base equal to ``adapter`` on the residual one.

    Example:
        >>> import jax, jax.numpy as jnp, numpy as np
        >>> import lora_jax
        >>> w = jnp.asarray(np.random.default_rng(0).normal(size=(8, 8)), jnp.float32)
        >>> params = {"params": {"dense": {"kernel": w}}}
        >>> config = lora_jax.LoraConfig(r=2, target_modules=["dense"], init_lora_weights="olora")
        >>> initial, residual = lora_jax.init_with_base(config, params, jax.random.key(0))
        >>> trained = jax.tree.map(lambda x: x + 0.1, initial)        # stands in for training
        >>> converted, plain_config = lora_jax.convert_to_original_base(trained, initial, config)
        >>> converted["dense"]["lora_A"].shape, plain_config.r
        ((8, 4), 4)
        >>> on_residual = lora_jax.merge(residual, trained, config)["params"]["dense"]["kernel"]
        >>> on_original = lora_jax.merge(params, converted, plain_config)["params"]["dense"]["kernel"]
        >>> bool(jnp.allclose(on_original, on_residual, atol=1e-5))
        True

    Args:
        adapter: the trained adapter (on the params :func:`lora_jax.init_with_base` returned).
        initial_adapter: the adapter ``init_with_base`` returned, before training.
        config: the config both were made with.

    Returns:
        The converted adapter, ``A' = concat([A, A0], rank axis)`` and
        ``B' = concat([B, -B0], rank axis)`` per module, and
        :func:`original_base_config` of ``config`` (``init_lora_weights=True``).
        Modules whose base was not rewritten (embedding tables, inits True /
        "gaussian") have ``A0 @ B0 = 0`` or are converted exactly all the same.

    Raises:
        ValueError: the two adapters do not have the same modules and shapes,
            or ``config`` uses LoftQ (its base is quantized, not ``W - s A0 B0``)
            or DoRA (its update is not linear in A and B).
    """
    if config.use_dora:
        raise ValueError("convert_to_original_base: a DoRA adapter (use_dora=True) has no plain LoRA equivalent.")
    if config.init_lora_weights == "loftq":
        raise ValueError(
            "convert_to_original_base: a LoftQ base is the quantized kernel, not W - s * A0 @ B0, so the "
            "converted adapter would not reproduce it; keep the LoftQ base and adapter together."
        )
    if set(adapter) != set(initial_adapter):
        raise ValueError(
            "convert_to_original_base: the trained and initial adapters cover different modules: "
            f"only trained {sorted(set(adapter) - set(initial_adapter))[:8]}, "
            f"only initial {sorted(set(initial_adapter) - set(adapter))[:8]}."
        )
    converted: Adapter = {}
    for name, pair in adapter.items():
        start = initial_adapter[name]
        for key in ("lora_A", "lora_B"):
            if key not in pair or key not in start:
                raise ValueError(f"convert_to_original_base: adapter[{name!r}] or the initial one has no {key!r}.")
            if np.shape(pair[key]) != np.shape(start[key]):
                raise ValueError(
                    f"convert_to_original_base: adapter[{name!r}][{key!r}] has shape {np.shape(pair[key])} "
                    f"but the initial adapter's is {np.shape(start[key])}."
                )
        extra = sorted(set(pair) - {"lora_A", "lora_B"})
        if extra:
            raise ValueError(f"convert_to_original_base: adapter[{name!r}] has keys {extra} a plain LoRA lacks.")
        rank_axis_b = 1 if config.is_stacked(name) else 0
        converted[name] = {
            "lora_A": _concat(pair["lora_A"], start["lora_A"], axis=-1),
            "lora_B": _concat(pair["lora_B"], -start["lora_B"], axis=rank_axis_b),
        }
    return converted, original_base_config(config)
