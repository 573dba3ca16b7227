"""Mixed-adapter batches: several adapters stacked so each example uses its own.

:func:`stack_adapters` turns named ``(adapter, config)`` pairs (see
:mod:`lora_jax.adapters`) into one *stacked adapter*: per targeted module,
``lora_A`` of shape ``(slots,) + A.shape``, ``lora_B`` of shape ``(slots,) + B.shape``
and ``scaling`` of shape ``(slots,)``, with every adapter padded with zeros to the
largest rank (exact: the padded rank columns contribute nothing) and modules an
adapter does not target left at zero. :func:`lora_jax.lora` then runs it with one
adapter id per example::

    stacked = stack_adapters({"a": (adapter_a, config_a), "b": (adapter_b, config_b)}, params)
    apply = lora_jax.lora(model.apply, stacked.config)
    out = apply(params, stacked.adapter, x, adapter_ids=stacked.ids(["a", "__base__", "b"]))

The base matmul runs once for the whole batch; each example's rows go through its
own thin A and B (gathered per example), so the cost is one adapter's, whatever the
number of adapters. Id ``-1`` (``"__base__"``, PEFT's name) is the base model alone.

Hot swap: a stacked adapter's shapes depend only on the number of slots, the
declared maximum rank and the declared target modules, so
:func:`replace_adapter` puts another adapter into a slot without changing them:
one compiled function serves every adapter (or set) that fits.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from lora_jax.config import LoraConfig
from lora_jax.tree import Adapter, check_adapter, find_targets

BASE_NAME = "__base__"  # PEFT's adapter name for "no adapter" in a mixed batch


class StackedAdapters(NamedTuple):
    """Adapters stacked for mixed batches (see the module docstring).

    Attributes:
        adapter: ``{module: {"lora_A": (slots, ...), "lora_B": (slots, ...), "scaling": (slots,)}}``,
            the array pytree to pass to ``lora(...)(params, adapter, ..., adapter_ids=ids)``.
        config: the LoraConfig ``lora()`` needs for it: the declared target modules and
            the largest rank (its ``lora_alpha`` is not used: each slot has its own scaling).
        names: the adapter in each slot (``None`` for an empty slot).
    """

    adapter: Adapter
    config: LoraConfig
    names: tuple[str | None, ...]

    def ids(self, names: Sequence[str | None]) -> np.ndarray:
        """Adapter ids for per-example adapter names (``"__base__"`` or None: the base model).

        Example:
            >>> import jax, jax.numpy as jnp
            >>> from lora_jax import LoraConfig, init
            >>> params = {"q": {"kernel": jnp.zeros((4, 4))}}
            >>> c = LoraConfig(r=2, target_modules=["q"])
            >>> stacked = stack_adapters({"x": (init(c, params, jax.random.key(0)), c)}, params)
            >>> stacked.ids(["x", "__base__", "x"]).tolist()
            [0, -1, 0]
        """
        slot = {name: i for i, name in enumerate(self.names) if name is not None}
        out = []
        for name in names:
            if name is None or name == BASE_NAME:
                out.append(-1)
            elif name in slot:
                out.append(slot[name])
            else:
                raise ValueError(f"No adapter named {name!r} in this stack; it holds "
                                 f"{[n for n in self.names if n is not None]} (or {BASE_NAME!r}).")
        return np.asarray(out, np.int32)


def stack_adapters(adapters: Mapping[str, tuple[Adapter, LoraConfig]], params: Any, *,
                   max_rank: int | None = None, target_modules: Sequence[str] | None = None,
                   slots: int | None = None) -> StackedAdapters:
    """Stack named ``(adapter, config)`` pairs for mixed-adapter batches.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import lora_jax
        >>> params = {"q": {"kernel": jnp.ones((4, 4))}, "v": {"kernel": jnp.ones((4, 4))}}
        >>> ca = lora_jax.LoraConfig(r=2, target_modules=["q"], init_lora_weights=False)
        >>> cb = lora_jax.LoraConfig(r=3, lora_alpha=6, target_modules=["q", "v"], init_lora_weights=False)
        >>> adapters = {"a": (lora_jax.init(ca, params, jax.random.key(0)), ca),
        ...             "b": (lora_jax.init(cb, params, jax.random.key(1)), cb)}
        >>> stacked = stack_adapters(adapters, params)
        >>> stacked.adapter["q"]["lora_A"].shape, stacked.adapter["v"]["scaling"].tolist()
        ((2, 4, 3), [0.0, 2.0])
        >>> f = lambda p, x: x @ p["q"]["kernel"] @ p["v"]["kernel"]
        >>> x = jnp.ones((3, 4))
        >>> out = lora_jax.lora(f, stacked.config)(params, stacked.adapter, x,
        ...                                        adapter_ids=stacked.ids(["b", "__base__", "a"]))
        >>> alone = lora_jax.lora(f, cb)(params, adapters["b"][0], x)
        >>> bool(jnp.allclose(out[0], alone[0])), bool(jnp.allclose(out[1], f(params, x)[1]))
        (True, True)

    Args:
        adapters: ``name -> (adapter, LoraConfig)``; ranks, ``lora_alpha``, targets and
            rsLoRA may differ. ``stacked_modules`` and ``kernel_names`` must agree.
        params: the base params they are for (shapes are checked against it).
        max_rank: the rank every slot is padded to (default: the largest rank present).
            Declare it to hot-swap in adapters of higher rank later.
        target_modules: module names every slot may target (default: the union of the
            adapters' targets). Declare it to hot-swap in adapters targeting other modules.
        slots: number of slots (default: one per adapter); extra slots start empty.

    Returns:
        A :class:`StackedAdapters`.
    """
    if not adapters:
        raise ValueError("stack_adapters needs at least one (adapter, config) pair.")
    names = list(adapters)
    first = _pair(adapters, names[0])[1]
    targets_by_name = {}
    for name in names:
        adapter, config = _pair(adapters, name)
        if tuple(config.kernel_names) != tuple(first.kernel_names):
            raise ValueError(f"adapters[{name!r}] has kernel_names={config.kernel_names!r}, unlike "
                             f"adapters[{names[0]!r}]; adapters in one stack must see the params the same way.")
        targets = find_targets(config, params, adapter)
        try:
            check_adapter(targets, adapter)
        except ValueError as err:
            raise ValueError(f"adapters[{name!r}] does not fit these params (an adapter for another "
                             f"base?): {err}") from None
        targets_by_name[name] = targets
    modules = list(target_modules) if target_modules is not None else list(dict.fromkeys(
        m for targets in targets_by_name.values() for m in targets))
    ranks = [t.rank for targets in targets_by_name.values() for t in targets.values()]
    rank = max(ranks) if max_rank is None else max_rank
    if not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"max_rank must be a positive integer, got {max_rank!r}.")
    slots = len(names) if slots is None else slots
    if slots < len(names):
        raise ValueError(f"slots={slots} is fewer than the {len(names)} adapters given.")
    stacked_modules = {m for targets in targets_by_name.values() for m, t in targets.items() if t.num_lead}
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=tuple(modules),
                        stacked_modules=tuple(sorted(stacked_modules)) or None, kernel_names=first.kernel_names)
    shapes = _slot_shapes(config, params, targets_by_name, modules)
    stacked = {m: {"lora_A": np.zeros((slots,) + a, np.float32),
                   "lora_B": np.zeros((slots,) + b, np.float32),
                   "scaling": np.zeros((slots,), np.float32)} for m, (a, b) in shapes.items()}
    for slot, name in enumerate(names):
        _fill(stacked, slot, name, adapters[name][0], targets_by_name[name], modules, rank)
    stacked_adapter = {m: {k: jnp.asarray(v) for k, v in entry.items()} for m, entry in stacked.items()}
    return StackedAdapters(stacked_adapter, config, tuple(names) + (None,) * (slots - len(names)))


def replace_adapter(stacked: StackedAdapters, slot: int | str, pair: tuple[Adapter, LoraConfig],
                    params: Any, *, name: str | None = None) -> StackedAdapters:
    """``stacked`` with ``pair`` in ``slot`` (an index or the name there): same shapes, so
    whatever was compiled for ``stacked`` runs it without recompiling.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from lora_jax import LoraConfig, init
        >>> params = {"q": {"kernel": jnp.zeros((4, 4))}}
        >>> c1, c2 = LoraConfig(r=1, target_modules=["q"]), LoraConfig(r=2, target_modules=["q"])
        >>> stacked = stack_adapters({"x": (init(c1, params, jax.random.key(0)), c1)}, params, max_rank=2)
        >>> swapped = replace_adapter(stacked, "x", (init(c2, params, jax.random.key(1)), c2), params, name="y")
        >>> swapped.names, swapped.adapter["q"]["lora_A"].shape == stacked.adapter["q"]["lora_A"].shape
        (('y',), True)
    """
    index = stacked.names.index(slot) if isinstance(slot, str) and slot in stacked.names else slot
    if not isinstance(index, int) or not 0 <= index < len(stacked.names):
        raise ValueError(f"No slot {slot!r} in this stack of {len(stacked.names)} slots "
                         f"(names {list(stacked.names)}).")
    new_name = name if name is not None else (slot if isinstance(slot, str) else f"slot{index}")
    adapter, config = _pair({new_name: pair}, new_name)
    targets = find_targets(config, params, adapter)
    try:
        check_adapter(targets, adapter)
    except ValueError as err:
        raise ValueError(f"adapter {new_name!r} does not fit these params: {err}") from None
    modules = list(stacked.adapter)
    arrays = {m: {k: np.array(v) for k, v in entry.items()} for m, entry in stacked.adapter.items()}
    for entry in arrays.values():
        for value in entry.values():
            value[index] = 0
    _fill(arrays, index, new_name, adapter, targets, modules, stacked.config.r)
    names = list(stacked.names)
    names[index] = new_name
    return StackedAdapters({m: {k: jnp.asarray(v) for k, v in e.items()} for m, e in arrays.items()},
                           stacked.config, tuple(names))


def _pair(adapters: Mapping[str, Any], name: str) -> tuple[Adapter, LoraConfig]:
    from lora_jax.adapters import adapter_pair

    return adapter_pair(adapters[name], name)


def _slot_shapes(config: LoraConfig, params: Any, targets_by_name: Mapping[str, Any],
                 modules: Sequence[str]) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """A and B shapes (at the stack's rank) of every declared module, with each module's
    in/out split taken from an adapter that targets it."""
    split = {}
    for targets in targets_by_name.values():
        for m, t in targets.items():
            split.setdefault(m, t.num_in)
    declared = find_targets(config.replace(in_axes={re.escape(m): n for m, n in split.items()}), params)
    shapes = {}
    for m in modules:
        t = declared[m]
        shapes[m] = (t.lead_shape + t.in_shape + (config.r,), t.lead_shape + (config.r,) + t.out_shape)
    return shapes


def _fill(stacked: dict[str, dict[str, np.ndarray]], slot: int, name: str, adapter: Adapter,
          targets: Mapping[str, Any], modules: Sequence[str], rank: int) -> None:
    for m, target in targets.items():
        if m not in stacked:
            raise ValueError(f"adapters[{name!r}] targets {m!r}, which is not among the stack's declared "
                             f"target_modules {list(modules)[:8]}.")
        if target.rank > rank:
            raise ValueError(f"adapters[{name!r}] has rank {target.rank} on {m!r}, above the stack's "
                             f"max_rank {rank}.")
        entry = stacked[m]
        a, b = np.asarray(adapter[m]["lora_A"], np.float32), np.asarray(adapter[m]["lora_B"], np.float32)
        if a.shape[:-1] != entry["lora_A"].shape[1:-1] or b.shape[:target.num_lead] + b.shape[
                target.num_lead + 1:] != entry["lora_B"].shape[1:target.num_lead + 1] + entry["lora_B"].shape[
                target.num_lead + 2:]:
            raise ValueError(f"adapters[{name!r}][{m!r}] splits its kernel as A {a.shape} / B {b.shape}, "
                             f"unlike the stack's A {entry['lora_A'].shape[1:]} / B {entry['lora_B'].shape[1:]}.")
        entry["lora_A"][(slot,) + (slice(None),) * (a.ndim - 1) + (slice(0, target.rank),)] = a
        lead = target.num_lead
        b_index = (slot,) + (slice(None),) * lead + (slice(0, target.rank),)
        entry["lora_B"][b_index] = b
        entry["scaling"][slot] = target.scaling
