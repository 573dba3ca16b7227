"""Several named adapters over one base: a plain ``dict`` of ``name -> (adapter, config)``.

There is no container class. A set of adapters is an ordinary dict whose values
are ``(adapter, LoraConfig)`` pairs (what :func:`lora_jax.load_peft` returns
unpacks as one), so adding, selecting and deleting are dict operations.

Example:
    >>> import jax, jax.numpy as jnp
    >>> import lora_jax
    >>> params = {"q": {"kernel": jnp.zeros((8, 8))}, "v": {"kernel": jnp.zeros((8, 8))}}
    >>> qv = lora_jax.LoraConfig(r=2, target_modules=["q", "v"])
    >>> q4 = lora_jax.LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["q"])
    >>> adapters = {"qv": (lora_jax.init(qv, params, jax.random.key(0)), qv)}
    >>> adapters["q4"] = (lora_jax.init(q4, params, jax.random.key(1)), q4)        # add
    >>> adapters["mix"] = lora_jax.weighted_adapter(adapters, [0.5, 0.5], "cat")   # add a combination
    >>> adapter, config = adapters["mix"]                                          # select
    >>> del adapters["qv"]                                                         # delete
    >>> sorted(adapters), config.r
    (['mix', 'q4'], 6)

Each adapter keeps its own config: ranks, ``lora_alpha``, targets and rsLoRA may
differ from one adapter to the next. :func:`check_adapters` says, naming the
adapter and module, when an adapter does not fit the base params (typically an
adapter trained on another base model).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lora_jax.config import LoraConfig
from lora_jax.tables import fit_adapter
from lora_jax.tree import Adapter, Target

AdapterPair = tuple[Adapter, LoraConfig]
AdapterSet = dict[str, AdapterPair]


def adapter_pair(value: Any, name: str) -> AdapterPair:
    """``value`` as an ``(adapter, config)`` pair, or a ``TypeError`` naming adapter ``name``.

    Example:
        >>> import jax.numpy as jnp
        >>> from lora_jax import LoraConfig
        >>> from lora_jax.adapters import adapter_pair
        >>> pair = ({"q": {"lora_A": jnp.zeros((4, 2)), "lora_B": jnp.zeros((2, 3))}},
        ...         LoraConfig(r=2, target_modules=["q"]))
        >>> adapter, config = adapter_pair(pair, "a")
        >>> config.r
        2
        >>> adapter_pair({"q": {}}, "b")
        Traceback (most recent call last):
        ...
        TypeError: adapters['b'] must be an (adapter, LoraConfig) pair such as lora_jax.load_peft returns, got a dict.
    """
    if not isinstance(value, tuple) or len(value) != 2:
        raise TypeError(
            f"adapters[{name!r}] must be an (adapter, LoraConfig) pair such as lora_jax.load_peft returns, "
            f"got a {type(value).__name__}."
        )
    adapter, config = value
    if not isinstance(config, LoraConfig):
        raise TypeError(
            f"adapters[{name!r}] must be an (adapter, LoraConfig) pair; its second item is a "
            f"{type(config).__name__}."
        )
    if not isinstance(adapter, dict):
        raise TypeError(
            f"adapters[{name!r}]: the adapter must be a dict of module name -> {{'lora_A', 'lora_B'}}, "
            f"got a {type(adapter).__name__}."
        )
    return adapter, config


def check_adapters(adapters: Mapping[str, AdapterPair], params: Any) -> dict[str, dict[str, Target]]:
    """Check that every named adapter fits ``params``; return each one's targets.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from lora_jax import LoraConfig, check_adapters, init
        >>> params = {"q": {"kernel": jnp.zeros((8, 6))}, "v": {"kernel": jnp.zeros((8, 6))}}
        >>> qv = LoraConfig(r=2, target_modules=["q", "v"])
        >>> q4 = LoraConfig(r=4, target_modules=["q"])
        >>> adapters = {"qv": (init(qv, params, jax.random.key(0)), qv),
        ...             "q4": (init(q4, params, jax.random.key(1)), q4)}
        >>> {name: list(targets) for name, targets in check_adapters(adapters, params).items()}
        {'qv': ['q', 'v'], 'q4': ['q']}
        >>> other_base = {"q": {"kernel": jnp.zeros((16, 6))}, "v": {"kernel": jnp.zeros((8, 6))}}
        >>> check_adapters(adapters, other_base)
        Traceback (most recent call last):
        ...
        ValueError: Adapter 'qv' does not fit these params (an adapter for another base model?): adapter['q']['lora_A'] has shape (8, 2), but kernel q.kernel of shape (16, 6) with rank 2 needs (16, 2).

    Args:
        adapters: ``{name: (adapter, config)}``.
        params: the base params all of them should apply to (shapes suffice).

    Returns:
        ``{name: {module_name: Target}}`` as :func:`lora_jax.find_targets` gives them.

    Raises ``ValueError`` naming the adapter (and, from the checks underneath,
    the module and shapes) when its config selects nothing in ``params`` or its
    A / B shapes do not fit the kernels.
    """
    if not isinstance(adapters, Mapping):
        raise TypeError(f"adapters must be a dict of name -> (adapter, LoraConfig), got {type(adapters).__name__}.")
    out = {}
    for name, value in adapters.items():
        adapter, config = adapter_pair(value, name)
        try:
            targets = fit_adapter(config, params, adapter).targets
        except ValueError as err:
            raise ValueError(
                f"Adapter {name!r} does not fit these params (an adapter for another base model?): {err}"
            ) from None
        out[name] = targets
    return out
