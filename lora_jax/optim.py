"""Optax for LoRA trees: frozen/trainable masks and LoRA+ learning-rate groups."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import jax
import optax

from lora_jax.config import LoraConfig
from lora_jax.tree import find_targets

# LoRA+ parameter groups, named as in peft.optimizers.create_loraplus_optimizer.
LORAPLUS_GROUPS = ("groupA", "groupB", "groupB_no_decay", "embedding")
# Adapter leaves that belong to LoRA's B side / DoRA's magnitude.
_ADAPTER_A = "lora_A"
_ADAPTER_B = "lora_B"
_DORA_MAGNITUDE = "lora_magnitude"


def masked_optimizer(tx: optax.GradientTransformation, trainable: Any) -> optax.GradientTransformation:
    """``tx`` on leaves where ``trainable`` is True; zero updates and no state elsewhere.

    Example:
        >>> import jax.numpy as jnp, optax
        >>> from lora_jax import masked_optimizer
        >>> params = {"head": {"kernel": jnp.ones((2, 2))}, "body": {"kernel": jnp.ones((2, 2))}}
        >>> opt = masked_optimizer(optax.sgd(0.1), {"head": {"kernel": True}, "body": {"kernel": False}})
        >>> grads = {"head": {"kernel": jnp.ones((2, 2))}, "body": {"kernel": jnp.ones((2, 2))}}
        >>> updates, _ = opt.update(grads, opt.init(params), params)
        >>> round(float(updates["head"]["kernel"][0, 0]), 6), float(updates["body"]["kernel"][0, 0])
        (-0.1, 0.0)

    ``trainable`` is a pytree of bools over the params (or a function of the
    params returning one), e.g. :func:`lora_jax.trainable_mask`. Frozen leaves
    get ``optax.set_to_zero()``, so ``optax.apply_updates`` leaves them bitwise
    unchanged.
    """
    def labels(params: Any) -> Any:
        mask = trainable(params) if callable(trainable) else trainable
        return jax.tree.map(lambda m: "trainable" if m else "frozen", mask)

    return optax.multi_transform({"trainable": tx, "frozen": optax.set_to_zero()}, labels)


# -- LoRA+ ----------------------------------------------------------------------------------

def _path_names(path: tuple[Any, ...]) -> list[str]:
    names = []
    for key in path:
        for attr in ("key", "idx", "name"):
            if hasattr(key, attr):
                names.append(str(getattr(key, attr)))
                break
        else:
            names.append(str(key))
    return names


def _is_stacked(config: LoraConfig, dotted_module: str) -> bool:
    """Whether some dotted suffix of ``dotted_module`` (it may start with container keys) is stacked."""
    parts = dotted_module.split(".")
    return any(config.is_stacked(".".join(parts[i:])) for i in range(len(parts)))


def loraplus_groups(tree: Any, config: LoraConfig, params: Any) -> Any:
    """The LoRA+ group of every leaf of ``tree``, by PEFT's ``create_loraplus_optimizer`` rules.

    Example:
        >>> import jax.numpy as jnp
        >>> from lora_jax import LoraConfig, loraplus_groups
        >>> params = {"params": {"embed": {"embedding": jnp.ones((10, 4))}, "q": {"kernel": jnp.ones((4, 4))}}}
        >>> config = LoraConfig(r=2, target_modules=["embed", "q"])
        >>> adapter = {"embed": {"lora_A": jnp.zeros((10, 2)), "lora_B": jnp.zeros((2, 4))},
        ...            "q": {"lora_A": jnp.zeros((4, 2)), "lora_B": jnp.zeros((2, 4))}}
        >>> groups = loraplus_groups({"adapter": adapter, "params": {"q.bias": jnp.zeros(4)}}, config, params)
        >>> groups["adapter"]["q"], groups["adapter"]["embed"]["lora_A"], groups["params"]["q.bias"]
        ({'lora_A': 'groupA', 'lora_B': 'groupB'}, 'embedding', 'groupB_no_decay')

    ``tree`` is what the optimizer sees: an adapter, a params (sub)tree, or a
    container of both such as ``{"adapter": ..., "params": ...}``. The groups:

    * ``"embedding"``: ``lora_A`` / ``lora_B`` of a targeted embedding table
      (PEFT: every parameter of a LoRA ``Embedding`` layer);
    * ``"groupB"`` / ``"groupB_no_decay"``: ``lora_B``, DoRA's
      ``lora_magnitude`` and every other 1-D leaf (biases, norm scales;
      a stacked module's leading layer axis does not count); they decay
      unless the path contains ``"bias"`` or the leaf is the ``scale`` of a
      module that also has a ``bias`` (a LayerNorm: transformers exempts
      ``nn.LayerNorm`` weights, not RMSNorm's);
    * ``"groupA"``: everything else (``lora_A``, full kernels of
      ``modules_to_save``).
    """
    return _groups(tree, config, _embedding_modules(config, params))


def _embedding_modules(config: LoraConfig, params: Any) -> frozenset[str]:
    return frozenset(name for name, t in find_targets(config, params).items() if t.is_embedding)


def _groups(tree: Any, config: LoraConfig, embeddings: frozenset[str]) -> Any:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    dotted = [".".join(_path_names(path)) for path, _ in flat]
    with_bias = {name.rsplit(".", 1)[0] for name in dotted if name.rsplit(".", 1)[-1] == "bias"}

    def group(path: tuple[Any, ...], leaf: Any) -> str:
        names = _path_names(path)
        leaf_name = names[-1]
        module = names[-2] if len(names) > 1 else ""
        if leaf_name in (_ADAPTER_A, _ADAPTER_B, _DORA_MAGNITUDE):
            if module in embeddings and leaf_name != _DORA_MAGNITUDE:
                return "embedding"
            return "groupA" if leaf_name == _ADAPTER_A else "groupB"
        full_name = ".".join(names)
        module_path = full_name.rsplit(".", 1)[0] if "." in full_name else ""
        ndim = len(getattr(leaf, "shape", ())) - (1 if _is_stacked(config, module_path) else 0)
        if ndim != 1:
            return "groupA"
        leaf_last = full_name.rsplit(".", 1)[-1]
        no_decay = "bias" in full_name or (leaf_last == "scale" and module_path in with_bias)
        return "groupB_no_decay" if no_decay else "groupB"

    return jax.tree_util.tree_map_with_path(group, tree)


def _scaled(learning_rate: optax.ScalarOrSchedule, factor: float) -> optax.ScalarOrSchedule:
    if callable(learning_rate):
        return lambda count: factor * learning_rate(count)
    return factor * learning_rate


def _takes_weight_decay(factory: Callable[..., Any]) -> bool:
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False
    return "weight_decay" in parameters


def _check_rate(name: str, value: Any) -> None:
    if callable(value):
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"loraplus: {name} must be a non-negative number or an optax schedule, got {value!r}.")


def loraplus(
    optimizer: Callable[..., optax.GradientTransformation],
    learning_rate: optax.ScalarOrSchedule,
    loraplus_lr_ratio: float,
    *,
    config: LoraConfig,
    params: Any,
    loraplus_lr_embedding: optax.ScalarOrSchedule = 1e-6,
    loraplus_weight_decay: float = 0.0,
    **optimizer_kwargs: Any,
) -> optax.GradientTransformation:
    """LoRA+ (Hayou et al. 2024): B learns ``loraplus_lr_ratio`` times faster than A.

    Example:
        >>> import jax, jax.numpy as jnp, optax
        >>> from lora_jax import LoraConfig, loraplus
        >>> params = {"params": {"q": {"kernel": jnp.ones((4, 4))}}}
        >>> config = LoraConfig(r=2, target_modules=["q"])
        >>> adapter = {"q": {"lora_A": jnp.ones((4, 2)), "lora_B": jnp.ones((2, 4))}}
        >>> opt = loraplus(optax.sgd, 0.01, 16.0, config=config, params=params)
        >>> updates, _ = opt.update(jax.tree.map(jnp.ones_like, adapter), opt.init(adapter))
        >>> round(float(updates["q"]["lora_A"][0, 0]), 6), round(float(updates["q"]["lora_B"][0, 0]), 6)
        (-0.01, -0.16)

    The optax form of ``peft.optimizers.create_loraplus_optimizer(model,
    optimizer_cls, lr=learning_rate, loraplus_lr_ratio=...)``: one
    ``optimizer(learning_rate=..., **optimizer_kwargs)`` per group of
    :func:`loraplus_groups`, joined with ``optax.multi_transform``:

    =====================  ==================================  =======================
    group                  learning rate                       weight decay
    =====================  ==================================  =======================
    ``groupA``             ``learning_rate``                   loraplus_weight_decay
    ``embedding``          ``loraplus_lr_embedding``           loraplus_weight_decay
    ``groupB``             ``loraplus_lr_ratio * lr``          loraplus_weight_decay
    ``groupB_no_decay``    ``loraplus_lr_ratio * lr``          0
    =====================  ==================================  =======================

    As in PEFT, each group's weight decay replaces the optimizer's own
    (``optax.adamw``'s default 1e-4 does not apply). ``learning_rate`` may be
    a schedule; B follows ``ratio * schedule(step)``. ``loraplus_lr_embedding``
    is its own number or schedule (a float stays constant; under a
    transformers ``Trainer`` scheduler PEFT's embedding rate follows the
    schedule's factor, so pass a schedule for that). Each group keeps its own
    optimizer state, so put global-norm clipping outside:
    ``optax.chain(optax.clip_by_global_norm(1.0), loraplus(...))``.

    Args:
        optimizer: an optax optimizer *factory* called with ``learning_rate=``
            (and ``weight_decay=`` when it takes one), e.g. ``optax.adamw``,
            ``optax.sgd`` or ``functools.partial(optax.adamw, b2=0.95)``.
        learning_rate: A's learning rate (PEFT's ``lr``), a number or schedule.
        loraplus_lr_ratio: B's learning rate over A's (the paper suggests 16).
        config, params: the LoRA config and the base params (shapes suffice),
            to know which adapters are embeddings and which modules are stacked.
        loraplus_lr_embedding: the learning rate of embedding adapters.
        loraplus_weight_decay: weight decay of every group but ``groupB_no_decay``;
            needs an optimizer that takes ``weight_decay`` (e.g. ``optax.adamw``)
            unless 0.
        **optimizer_kwargs: passed to every ``optimizer(...)`` call (not
            ``learning_rate`` or ``weight_decay``).
    """
    if isinstance(optimizer, optax.GradientTransformation) or not callable(optimizer):
        raise TypeError(
            "loraplus needs an optimizer factory such as optax.adamw (it builds one optimizer per "
            f"learning-rate group), not {type(optimizer).__name__}; put clipping outside: "
            "optax.chain(optax.clip_by_global_norm(1.0), loraplus(optax.adamw, ...))."
        )
    for name in ("learning_rate", "weight_decay"):
        if name in optimizer_kwargs:
            raise ValueError(
                f"loraplus: pass {name} as {'learning_rate' if name == 'learning_rate' else 'loraplus_weight_decay'}, "
                "not inside the optimizer's keyword arguments (each LoRA+ group sets its own)."
            )
    _check_rate("learning_rate", learning_rate)
    _check_rate("loraplus_lr_embedding", loraplus_lr_embedding)
    if callable(loraplus_lr_ratio) or isinstance(loraplus_lr_ratio, bool) \
            or not isinstance(loraplus_lr_ratio, (int, float)) \
            or not math.isfinite(loraplus_lr_ratio) or loraplus_lr_ratio <= 0:
        raise ValueError(f"loraplus: loraplus_lr_ratio must be a positive number, got {loraplus_lr_ratio!r}.")
    if isinstance(loraplus_weight_decay, bool) or not isinstance(loraplus_weight_decay, (int, float)) \
            or not math.isfinite(loraplus_weight_decay) or loraplus_weight_decay < 0:
        raise ValueError(f"loraplus: loraplus_weight_decay must be a non-negative number, got {loraplus_weight_decay!r}.")
    takes_decay = _takes_weight_decay(optimizer)
    if loraplus_weight_decay and not takes_decay:
        raise ValueError(
            f"loraplus: loraplus_weight_decay={loraplus_weight_decay} needs an optimizer that takes "
            f"weight_decay (e.g. optax.adamw); {getattr(optimizer, '__name__', optimizer)!r} does not."
        )

    def build(lr: optax.ScalarOrSchedule, weight_decay: float) -> optax.GradientTransformation:
        if takes_decay:
            return optimizer(learning_rate=lr, weight_decay=weight_decay, **optimizer_kwargs)
        return optimizer(learning_rate=lr, **optimizer_kwargs)

    rate_b = _scaled(learning_rate, float(loraplus_lr_ratio))
    transforms = {
        "groupA": build(learning_rate, loraplus_weight_decay),
        "embedding": build(loraplus_lr_embedding, loraplus_weight_decay),
        "groupB": build(rate_b, loraplus_weight_decay),
        "groupB_no_decay": build(rate_b, 0.0),
    }
    embeddings = _embedding_modules(config, params)
    return optax.multi_transform(transforms, lambda tree: _groups(tree, config, embeddings))
