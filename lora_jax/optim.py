"""Optax for trees that mix frozen and trainable leaves."""

from __future__ import annotations

from typing import Any

import jax
import optax


def masked_optimizer(tx: optax.GradientTransformation, trainable: Any) -> optax.GradientTransformation:
    """``tx`` on leaves where ``trainable`` is True; zero updates and no state elsewhere.

    Example::

        mask = lora_jax.trainable_mask(params, config)        # modules_to_save, biases
        opt = lora_jax.masked_optimizer(optax.adamw(1e-3), mask)
        state = opt.init(params)                               # AdamW state for the mask only

    ``trainable`` is a pytree of bools over the params (or a function of the
    params returning one). Frozen leaves get ``optax.set_to_zero()``, so
    ``optax.apply_updates`` leaves them bitwise unchanged.
    """
    def labels(params: Any) -> Any:
        mask = trainable(params) if callable(trainable) else trainable
        return jax.tree.map(lambda m: "trainable" if m else "frozen", mask)

    return optax.multi_transform({"trainable": tx, "frozen": optax.set_to_zero()}, labels)
