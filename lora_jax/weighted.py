"""Adapter arithmetic: one new adapter from a weighted combination of several.

:func:`weighted_adapter` is PEFT's ``LoraModel.add_weighted_adapter`` (peft
0.21) as a pure function over adapter pytrees, with PEFT's weight, rank and
density semantics. Write ``w_i`` for adapter i's weight and ``s_i`` for its
scaling (``lora_alpha / r``, or ``/ sqrt(r)`` with rsLoRA) on a module:

=======================  =========================================================  ===========
combination_type         what is combined, per module                                result rank
=======================  =========================================================  ===========
``linear``               ``A = sum sqrt(|w_i s_i|) sign(w_i s_i) A_i``,             r (equal)
                         ``B = sum sqrt(|w_i s_i|) B_i`` (a rough approximation)
``cat``                  A_i scaled by ``w_i s_i``, concatenated with the B_i        sum of r
                         along the rank axis: exactly ``sum w_i s_i B_i A_i``
``svd``                  ``sum w_i s_i B_i A_i``, truncated by SVD                  ``svd_rank``
``ties``                 as linear, but A and B each combined by TIES: keep the      r (equal)
                         top ``density`` magnitudes of each, elect a sign per
                         entry, average the agreeing weighted entries
``dare_linear``          as linear, A and B each randomly pruned to ``density``      r (equal)
                         and rescaled by ``1 / density`` (DARE)
``dare_ties``            DARE pruning, then TIES sign election and mean              r (equal)
``magnitude_prune``      as linear, A and B each pruned to the top ``density``       r (equal)
                         magnitudes
``<method>_svd``         ``ties``, ``dare_linear``, ``dare_ties`` or                 ``svd_rank``
                         ``magnitude_prune`` applied to the deltas
                         ``w_i s_i B_i A_i``, then truncated by SVD
=======================  =========================================================  ===========

"r (equal)" types need every adapter to have the same rank. A module that only
some adapters target is combined from those alone. The result is an ordinary
``(adapter, LoraConfig)`` pair with scaling 1 on every module (``lora_alpha``
equal to the rank, no rsLoRA), so :func:`lora_jax.lora`, :func:`lora_jax.merge`
and :func:`lora_jax.save_peft` take it as any other adapter.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.adapters import AdapterPair, adapter_pair, check_adapters
from lora_jax.config import LoraConfig
from lora_jax.tree import Adapter, module_names

COMBINATION_TYPES = (
    "svd", "linear", "cat", "ties", "ties_svd", "dare_ties", "dare_linear", "dare_ties_svd",
    "dare_linear_svd", "magnitude_prune", "magnitude_prune_svd",
)
MAJORITY_SIGN_METHODS = ("total", "frequency")
# PEFT's cuSOLVER driver names, as JAX's SVD algorithms (only "gesvd" also runs on CPU).
SVD_DRIVERS = {"gesvd": jax.lax.linalg.SvdAlgorithm.QR, "gesvdj": jax.lax.linalg.SvdAlgorithm.JACOBI}

# How each task-arithmetic method prunes its inputs, and whether it elects signs (TIES).
_PRUNING = {"linear": None, "magnitude_prune": "magnitude", "ties": "magnitude",
            "dare_linear": "random", "dare_ties": "random"}
_SIGN_ELECTION = ("ties", "dare_ties")
_EQUAL_RANK_TYPES = ("linear", "ties", "dare_ties", "dare_linear", "magnitude_prune")
_PLAIN_KEYS = ("lora_A", "lora_B")


@dataclasses.dataclass(frozen=True)
class _Factors:
    """One adapter's factors for one module, with the layer axes flattened to one.

    ``a`` is ``(layers, fan_in, r)`` and ``b`` is ``(layers, r, fan_out)``:
    ``layers`` is the product of the stacked-layer axes (1 when there are
    none), so every per-layer operation (top-k, SVD, quantile) runs per layer,
    as PEFT runs it per torch module.
    """

    adapter_name: str
    a: jax.Array
    b: jax.Array
    dtype: Any  # of the adapter's own lora_A (a and b are in float32 or wider)
    scaling: float
    lead: tuple[int, ...]
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]

    @property
    def rank(self) -> int:
        return self.a.shape[-1]

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        return self.lead + self.in_shape + self.out_shape


def weighted_adapter(
    adapters: Mapping[str, AdapterPair] | Sequence[AdapterPair],
    weights: Sequence[float],
    combination_type: str = "svd",
    *,
    params: Any = None,
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    svd_driver: str | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
    key: jax.Array | None = None,
) -> AdapterPair:
    """A new ``(adapter, config)`` combining ``adapters`` with ``weights``, as PEFT's ``add_weighted_adapter``.

    Example:
        >>> import jax, jax.numpy as jnp, numpy as np
        >>> from lora_jax import LoraConfig, init, merge, weighted_adapter
        >>> params = {"q": {"kernel": jnp.zeros((8, 6))}, "v": {"kernel": jnp.zeros((8, 6))}}
        >>> qv = LoraConfig(r=2, lora_alpha=4, target_modules=["q", "v"], init_lora_weights=False)
        >>> q3 = LoraConfig(r=3, lora_alpha=3, target_modules=["q"], init_lora_weights=False)
        >>> adapters = {"qv": (init(qv, params, jax.random.key(0)), qv),
        ...             "q3": (init(q3, params, jax.random.key(1)), q3)}
        >>> mix, mix_config = weighted_adapter(adapters, [1.0, -0.5], "cat")
        >>> mix_config.r, mix["q"]["lora_A"].shape  # cat: the ranks add up
        (5, (8, 5))
        >>> delta = lambda pair: merge(params, *pair)["q"]["kernel"]
        >>> bool(np.allclose(delta((mix, mix_config)),
        ...                  delta(adapters["qv"]) - 0.5 * delta(adapters["q3"]), atol=1e-6))
        True
        >>> low, low_config = weighted_adapter(adapters, [1.0, 1.0], "svd", svd_rank=1)
        >>> low["q"]["lora_B"].shape
        (1, 6)

    Args:
        adapters: ``{name: (adapter, config)}`` (names appear in error
            messages), or a sequence of pairs. All of them are combined, in
            order; select a subset with a dict comprehension.
        weights: one number per adapter; negative weights subtract.
        combination_type: one of :data:`COMBINATION_TYPES` (module docstring).
            With a single adapter PEFT always combines linearly (the weight
            times the adapter; ``density`` and ``svd_rank`` have no effect),
            and so does this function, with a warning.
        params: the base params (shapes suffice). When given, every adapter
            is checked against them first and the result's config is built to
            select exactly the combined modules there.
        svd_rank: rank of the ``*svd`` results, at most ``min(in, out)`` of
            every combined module. By default the largest rank among the
            adapters (as PEFT), lowered to ``min(in, out)`` on a module too
            small for it (as PEFT's reduced SVD does).
        svd_clamp: a quantile in [0, 1]: the SVD factors are clamped to
            ``[-q, q]``, where ``q`` is that quantile of all their entries
            (per module), as PEFT does.
        svd_full_matrices: PEFT's option; the truncated factors do not depend
            on it.
        svd_driver: PEFT's cuSOLVER driver name: ``"gesvd"`` (QR iteration,
            also on CPU) or ``"gesvdj"`` (Jacobi, GPU/TPU only); ``None`` is
            JAX's default algorithm.
        density: fraction of entries kept, in [0, 1], for the ``ties``,
            ``dare`` and ``magnitude_prune`` types (required for them, refused
            for the others). 1 keeps everything, as in PEFT.
        majority_sign_method: ``"total"`` (the sign of the sum) or
            ``"frequency"`` (the more common sign), for the ``ties`` types.
        key: a ``jax.random`` key, required by the ``dare`` types (their
            random masks); other types ignore it.

    Returns:
        ``(adapter, config)``: the config has ``r`` and ``lora_alpha`` equal
        to the result's rank (PEFT's choice, so the scaling is 1), no rsLoRA
        (PEFT 0.21 inherits ``use_rslora`` from the first adapter and so
        scales its result by ``sqrt(r)`` too much; peft#3449 fixes that), and
        ``target_modules`` listing exactly the combined modules.
        ``lora_dropout``, ``init_lora_weights`` and ``fan_in_fan_out`` come
        from the first adapter's config, as in PEFT. Full tensors that live in
        the params (``modules_to_save``, trained biases) are not combined:
        the result's config has ``bias="none"`` and no ``modules_to_save``.
        The factors have the dtype of the first adapter's ``lora_A`` and are
        computed in float32 (or wider).

    Raises ``ValueError`` naming what is wrong, before anything is computed:
    an unknown ``combination_type`` (the known ones are listed), a weight
    count that differs from the adapter count, unequal ranks for a type that
    needs equal ranks, a missing or out-of-range ``density`` or ``svd_rank``,
    options that the type does not use, or adapters whose factors for one
    module imply different kernel shapes (adapters for different base models).
    """
    named = _named_pairs(adapters)
    _check_options(named, weights, combination_type, svd_rank, svd_clamp, svd_full_matrices, svd_driver, density,
                   majority_sign_method, key)
    density = None if density is None else float(density)
    svd_clamp = None if svd_clamp is None else float(svd_clamp)
    if params is not None:
        check_adapters(named, params)
    if len(named) == 1 and combination_type != "linear":
        warnings.warn(
            f"weighted_adapter: one adapter is always combined linearly (as PEFT does); "
            f"combination_type={combination_type!r} and its options have no effect.",
            stacklevel=2,
        )
        combination_type = "linear"

    modules = _gather_modules(named)
    ranks = [_declared_rank(config) for _, config in named.values()]
    new_rank = _new_rank(named, ranks, combination_type, svd_rank)
    if combination_type in _EQUAL_RANK_TYPES:
        _check_equal_module_ranks(modules)
    _check_result_fits(modules, combination_type, new_rank, svd_rank)

    keys = iter(jax.random.split(key, len(modules)) if key is not None else [None] * len(modules))
    weight_of = dict(zip(named, (float(w) for w in weights)))
    adapter: Adapter = {}
    for name, factors in modules.items():
        module_weights = [weight_of[f.adapter_name] for f in factors]
        a, b = _combine_module(factors, module_weights, combination_type, new_rank, svd_clamp,
                               svd_driver, density, majority_sign_method, next(keys))
        first = factors[0]
        adapter[name] = {
            "lora_A": a.reshape(first.lead + first.in_shape + (a.shape[-1],)).astype(first.dtype),
            "lora_B": b.reshape(first.lead + (b.shape[1],) + first.out_shape).astype(first.dtype),
        }
    config = _result_config(named, modules, adapter, new_rank, params)
    return adapter, config


# -- checks -----------------------------------------------------------------------------------

def _named_pairs(adapters: Mapping[str, AdapterPair] | Sequence[AdapterPair]) -> dict[str, AdapterPair]:
    if isinstance(adapters, Mapping):
        items = [(str(name), value) for name, value in adapters.items()]
    elif isinstance(adapters, Sequence) and not isinstance(adapters, (str, bytes)):
        if len(adapters) == 2 and isinstance(adapters[1], LoraConfig):
            raise TypeError("adapters must be a dict or list of (adapter, LoraConfig) pairs; got one pair "
                            "(wrap it in a list).")
        items = [(f"adapters[{i}]", value) for i, value in enumerate(adapters)]
    else:
        raise TypeError(f"adapters must be a dict of name -> (adapter, LoraConfig) or a list of such pairs, "
                        f"got {type(adapters).__name__}.")
    if not items:
        raise ValueError("weighted_adapter needs at least one adapter.")
    return {name: adapter_pair(value, name) for name, value in items}


def _check_options(named: Mapping[str, AdapterPair], weights: Sequence[float], combination_type: str,
                   svd_rank: int | None, svd_clamp: float | None, svd_full_matrices: bool, svd_driver: str | None,
                   density: float | None, majority_sign_method: str, key: jax.Array | None) -> None:
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(f"Unknown combination_type {combination_type!r}; known: {', '.join(COMBINATION_TYPES)}.")
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence | np.ndarray | jax.Array):
        raise TypeError(f"weights must be a sequence of numbers, one per adapter, got {type(weights).__name__}.")
    if len(weights) != len(named):
        raise ValueError(
            f"Got {len(weights)} weights for {len(named)} adapters ({', '.join(named)}); give one weight per adapter."
        )
    for name, weight in zip(named, weights):
        if not _is_real(weight) or not math.isfinite(float(weight)):
            raise ValueError(f"The weight of adapter {name!r} must be a finite number, got {weight!r}.")

    is_svd = combination_type.endswith("svd")
    method = _method(combination_type)
    if not is_svd:
        given = [n for n, v in (("svd_rank", svd_rank), ("svd_clamp", svd_clamp), ("svd_driver", svd_driver))
                 if v is not None]
        if given:
            raise ValueError(f"{', '.join(given)} applies only to the svd combination types, "
                             f"not to combination_type={combination_type!r}.")
    if svd_rank is not None and not (_is_int(svd_rank) and svd_rank > 0):
        raise ValueError(f"svd_rank must be a positive integer, got {svd_rank!r}.")
    if svd_clamp is not None and not (_is_real(svd_clamp) and 0.0 <= float(svd_clamp) <= 1.0):
        raise ValueError(f"svd_clamp is a quantile and must be in [0, 1], got {svd_clamp!r}.")
    if not isinstance(svd_full_matrices, bool):
        raise TypeError(f"svd_full_matrices must be a bool, got {svd_full_matrices!r}.")
    if svd_driver is not None and svd_driver not in SVD_DRIVERS:
        raise ValueError(f"svd_driver must be None or one of {', '.join(SVD_DRIVERS)}, got {svd_driver!r}.")

    prunes = method is not None and _PRUNING[method] is not None
    if prunes:
        if density is None:
            raise ValueError(f"combination_type={combination_type!r} needs density (the fraction of entries "
                             "kept, in [0, 1]).")
        if not _is_real(density) or not 0.0 <= float(density) <= 1.0:
            raise ValueError(f"density must be a number in [0, 1], got {density!r}.")
        if _PRUNING[method] == "random" and float(density) == 0.0:
            raise ValueError("density=0 with a dare combination type drops every entry and then divides by 0; "
                             "use a density in (0, 1].")
    elif density is not None:
        raise ValueError(f"density applies to the ties, dare and magnitude_prune types, "
                         f"not to combination_type={combination_type!r}.")
    if majority_sign_method not in MAJORITY_SIGN_METHODS:
        raise ValueError(f"majority_sign_method must be one of {', '.join(MAJORITY_SIGN_METHODS)}, "
                         f"got {majority_sign_method!r}.")
    if majority_sign_method != "total" and method not in _SIGN_ELECTION:
        raise ValueError(f"majority_sign_method applies to the ties types, not to combination_type="
                         f"{combination_type!r}.")
    if method is not None and _PRUNING[method] == "random" and key is None and len(named) > 1:
        raise ValueError(f"combination_type={combination_type!r} draws random masks: pass key=jax.random.key(...).")


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float, np.integer, np.floating)):
        return True
    return isinstance(value, (np.ndarray, jax.Array)) and value.ndim == 0 and jnp.issubdtype(value.dtype, jnp.number)


def _method(combination_type: str) -> str | None:
    """The task-arithmetic method of a type (``svd`` is ``linear`` on deltas); None for ``cat``."""
    if combination_type == "cat":
        return None
    if combination_type == "svd":
        return "linear"
    return combination_type.removesuffix("_svd")


def _declared_rank(config: LoraConfig) -> int:
    """An adapter's rank as PEFT counts it for add_weighted_adapter: the largest it declares."""
    return max(config.r, *config.rank_pattern.values()) if config.rank_pattern else config.r


def _new_rank(named: Mapping[str, AdapterPair], ranks: list[int], combination_type: str,
              svd_rank: int | None) -> int:
    if combination_type in _EQUAL_RANK_TYPES:
        if len(set(ranks)) != 1:
            listed = ", ".join(f"{n!r}: r={r}" for n, r in zip(named, ranks))
            raise ValueError(
                f"combination_type={combination_type!r} needs every adapter to have the same rank, got {listed}; "
                "use 'cat' or an svd type to combine adapters of different ranks."
            )
        return ranks[0]
    if combination_type == "cat":
        return sum(ranks)
    return svd_rank or max(ranks)


def _gather_modules(named: Mapping[str, AdapterPair]) -> dict[str, list[_Factors]]:
    """``{module: [factors of each adapter that targets it]}``, checking shapes agree."""
    modules: dict[str, list[_Factors]] = {}
    for adapter_name, (adapter, config) in named.items():
        if config.use_dora:
            raise ValueError(f"Adapter {adapter_name!r} is a DoRA adapter (use_dora=True); weighted_adapter "
                             "combines plain LoRA adapters only (PEFT's combinations ignore the magnitude).")
        for module, entry in adapter.items():
            factors = _factors(adapter_name, module, entry, config)
            others = modules.setdefault(module, [])
            if others and (others[0].kernel_shape, others[0].lead) != (factors.kernel_shape, factors.lead):
                first = others[0]
                raise ValueError(
                    f"Adapters {first.adapter_name!r} and {adapter_name!r} do not fit the same kernel {module!r}: "
                    f"{first.adapter_name!r}'s factors make a kernel of shape {first.kernel_shape}, "
                    f"{adapter_name!r}'s one of shape {factors.kernel_shape}. Adapters for different base "
                    "models cannot be combined."
                )
            others.append(factors)
    return modules


def _factors(adapter_name: str, module: str, entry: Any, config: LoraConfig) -> _Factors:
    where = f"adapter {adapter_name!r}, module {module!r}"
    if not isinstance(entry, Mapping) or any(k not in entry for k in _PLAIN_KEYS):
        found = sorted(entry) if isinstance(entry, Mapping) else type(entry).__name__
        raise ValueError(f"{where}: expected {{'lora_A', 'lora_B'}}, found {found}.")
    extra = sorted(set(entry) - set(_PLAIN_KEYS))
    if extra:
        raise ValueError(f"{where} has {extra} besides lora_A / lora_B (e.g. DoRA's lora_magnitude); "
                         "weighted_adapter combines plain LoRA adapters only.")
    a, b = jnp.asarray(entry["lora_A"]), jnp.asarray(entry["lora_B"])
    num_lead = 1 if config.is_stacked(module) else 0
    rank = a.shape[-1] if a.ndim else 0
    if a.ndim < num_lead + 2 or b.ndim < num_lead + 2 or b.shape[num_lead] != rank \
            or a.shape[:num_lead] != b.shape[:num_lead]:
        raise ValueError(f"{where}: lora_A of shape {tuple(a.shape)} and lora_B of shape {tuple(b.shape)} "
                         f"are not a LoRA pair (A is lead + in + (r,), B is lead + (r,) + out, "
                         f"{num_lead} lead axes).")
    if config.rank(module) != rank:
        raise ValueError(f"{where}: the factors have rank {rank}, but its config gives the module rank "
                         f"{config.rank(module)}.")
    lead = tuple(a.shape[:num_lead])
    in_shape, out_shape = tuple(a.shape[num_lead:-1]), tuple(b.shape[num_lead + 1:])
    layers, fan_in, fan_out = math.prod(lead), math.prod(in_shape), math.prod(out_shape)
    compute = jnp.promote_types(a.dtype, jnp.float32)
    return _Factors(
        adapter_name=adapter_name,
        a=a.reshape(layers, fan_in, rank).astype(compute),
        b=b.reshape(layers, rank, fan_out).astype(compute), dtype=a.dtype,
        scaling=config.scaling(module), lead=lead, in_shape=in_shape, out_shape=out_shape,
    )


def _check_equal_module_ranks(modules: Mapping[str, list[_Factors]]) -> None:
    for module, factors in modules.items():
        if len({f.rank for f in factors}) > 1:
            listed = ", ".join(f"{f.adapter_name!r}: {f.rank}" for f in factors)
            raise ValueError(f"Module {module!r} has different ranks in the adapters ({listed}); this "
                             "combination type stacks the factors and needs equal ranks (use 'cat' or an svd type).")


def _check_result_fits(modules: Mapping[str, list[_Factors]], combination_type: str, new_rank: int,
                       svd_rank: int | None) -> None:
    if combination_type in _EQUAL_RANK_TYPES or (combination_type != "cat" and svd_rank is None):
        # Each module keeps its adapters' rank, or (svd by default) at most its full rank: both fit.
        return
    for module, factors in modules.items():
        fan_in, fan_out = factors[0].a.shape[1], factors[0].b.shape[2]
        if new_rank > min(fan_in, fan_out):
            what = (f"svd_rank={svd_rank}" if combination_type != "cat"
                    else f"The result rank {new_rank} ('cat' adds the adapters' ranks)")
            raise ValueError(
                f"{what} exceeds min(in, out) = min({fan_in}, {fan_out}) of module {module!r}; "
                + ("use a smaller svd_rank." if combination_type != "cat"
                   else "use an svd type with svd_rank <= that.")
            )


# -- the maths --------------------------------------------------------------------------------

def _matmul(x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.matmul(x, y, precision=jax.lax.Precision.HIGHEST)


def _prune_magnitude(x: jax.Array, density: float) -> jax.Array:
    """Keep the ``int(density * n)`` largest magnitudes of each layer ``x[l]`` (PEFT's top-k)."""
    if density >= 1.0:
        return x
    flat = x.reshape(x.shape[0], -1)
    k = int(density * flat.shape[1])
    if k == 0:
        return jnp.zeros_like(x)
    _, top = jax.lax.top_k(jnp.abs(flat), k)
    keep = jnp.zeros(flat.shape, bool).at[jnp.arange(flat.shape[0])[:, None], top].set(True)
    return jnp.where(keep, flat, 0.0).reshape(x.shape)


def _prune_random(x: jax.Array, density: float, key: jax.Array) -> jax.Array:
    """DARE: keep each entry with probability ``density`` and divide the survivors by it."""
    if density >= 1.0:
        return x
    keep = jax.random.bernoulli(key, density, x.shape)
    return jnp.where(keep, x / density, 0.0)


def _task_arithmetic(tensors: list[jax.Array], weights: Sequence[float], method: str, density: float | None,
                     majority_sign_method: str, key: jax.Array | None) -> jax.Array:
    """PEFT's merge_utils on a list of same-shape tensors: prune, (elect signs,) weight and sum."""
    pruning = _PRUNING[method]
    if pruning == "magnitude":
        tensors = [_prune_magnitude(t, density) for t in tensors]
    elif pruning == "random":
        tensors = [_prune_random(t, density, k) for t, k in zip(tensors, jax.random.split(key, len(tensors)))]
    stacked = jnp.stack(tensors)
    w = jnp.asarray(weights, stacked.dtype).reshape((-1,) + (1,) * (stacked.ndim - 1))
    if method not in _SIGN_ELECTION:
        return jnp.sum(stacked * w, axis=0)
    # TIES: the sign is elected on the unweighted (pruned) tensors, then the weighted entries
    # that agree with it are averaged.
    signs = jnp.sign(stacked)
    votes = stacked.sum(axis=0) if majority_sign_method == "total" else signs.sum(axis=0)
    agrees = signs == jnp.where(votes >= 0, 1.0, -1.0)
    total = jnp.sum(jnp.where(agrees, stacked * w, 0.0), axis=0)
    return total / jnp.maximum(agrees.sum(axis=0), 1).astype(total.dtype)


def _combine_module(factors: list[_Factors], weights: list[float], combination_type: str, new_rank: int,
                    svd_clamp: float | None, svd_driver: str | None, density: float | None,
                    majority_sign_method: str, key: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """The combined ``(a, b)`` of one module, shapes ``(layers, fan_in, k)`` and ``(layers, k, fan_out)``."""
    method = _method(combination_type)
    if combination_type == "cat":
        a = jnp.concatenate([f.a * (w * f.scaling) for f, w in zip(factors, weights)], axis=-1)
        b = jnp.concatenate([f.b for f in factors], axis=1)
        pad = new_rank - a.shape[-1]  # PEFT leaves the rows of adapters that skip this module at zero
        return jnp.pad(a, ((0, 0), (0, 0), (0, pad))), jnp.pad(b, ((0, 0), (0, pad), (0, 0)))
    if not combination_type.endswith("svd"):
        # Each side gets sqrt(|w s|); the sign goes on A only, so it is not squared away.
        products = [w * f.scaling for f, w in zip(factors, weights)]
        weights_a = [math.sqrt(abs(p)) * (1.0 if p >= 0 else -1.0) for p in products]
        weights_b = [math.sqrt(abs(p)) for p in products]
        key_a, key_b = jax.random.split(key) if key is not None else (None, None)
        a = _task_arithmetic([f.a for f in factors], weights_a, method, density, majority_sign_method, key_a)
        b = _task_arithmetic([f.b for f in factors], weights_b, method, density, majority_sign_method, key_b)
        return a, b
    deltas = [f.scaling * _matmul(f.a, f.b) for f in factors]  # (layers, fan_in, fan_out)
    delta = _task_arithmetic(deltas, weights, method, density, majority_sign_method, key)
    return _svd_factors(delta, new_rank, svd_clamp, svd_driver)


def _svd_factors(delta: jax.Array, rank: int, clamp: float | None,
                 driver: str | None) -> tuple[jax.Array, jax.Array]:
    """Rank-``rank`` factors of each layer's delta, split as PEFT splits them.

    PEFT factors the torch-layout delta ``(out, in) = U S Vh`` and sets
    ``lora_B = U S``, ``lora_A = Vh``; in lora_jax's layout that is
    ``A = Vh.T`` and ``B = (U S).T``.
    """
    torch_layout = jnp.swapaxes(delta, -1, -2)
    u, s, vh = jax.lax.linalg.svd(torch_layout, full_matrices=False,
                                  algorithm=SVD_DRIVERS.get(driver) if driver else None)
    b_torch = u[..., :rank] * s[..., None, :rank]  # (layers, out, k)
    a_torch = vh[..., :rank, :]  # (layers, k, in)
    if clamp is not None:
        everything = jnp.concatenate([b_torch.reshape(b_torch.shape[0], -1),
                                      a_torch.reshape(a_torch.shape[0], -1)], axis=1)
        high = jnp.quantile(everything, clamp, axis=1)[:, None, None]
        b_torch = jnp.clip(b_torch, -high, high)
        a_torch = jnp.clip(a_torch, -high, high)
    return jnp.swapaxes(a_torch, -1, -2), jnp.swapaxes(b_torch, -1, -2)


# -- the result's config ------------------------------------------------------------------------

def _result_config(named: Mapping[str, AdapterPair], modules: Mapping[str, list[_Factors]], adapter: Adapter,
                   new_rank: int, params: Any) -> LoraConfig:
    """PEFT's choice (``r = lora_alpha = new rank``, so scaling 1), targeting exactly ``adapter``'s modules."""
    first = next(iter(named.values()))[1]
    kernel_names = tuple(dict.fromkeys(k for _, c in named.values() for k in c.kernel_names))
    names = list(adapter)
    if params is not None:
        known = module_names(params, first.replace(kernel_names=kernel_names))
        order = {m: i for i, m in enumerate(known)}
        names.sort(key=lambda m: order.get(m, len(order)))
    else:
        known = names
    ranks = {m: adapter[m]["lora_A"].shape[-1] for m in names}
    stacked = [m for m in names if modules[m][0].lead]
    return LoraConfig(
        r=new_rank,
        lora_alpha=new_rank,
        target_modules=_exact_spec(names, known),
        lora_dropout=first.lora_dropout,
        use_rslora=False,
        rank_pattern={_exact_key(m, known): k for m, k in ranks.items() if k != new_rank},
        alpha_pattern={_exact_key(m, known): k for m, k in ranks.items() if k != new_rank},
        init_lora_weights=first.init_lora_weights,
        fan_in_fan_out=first.fan_in_fan_out,
        kernel_names=kernel_names,
        in_axes={_exact_key(m, known): len(modules[m][0].in_shape) for m in names
                 if len(modules[m][0].in_shape) != 1},
        stacked_modules=_exact_spec(stacked, known) if stacked else None,
    )


def _exact_key(name: str, known: Sequence[str]) -> str:
    """A ``rank_pattern``-style key that matches ``name`` and no other module of ``known``."""
    clash = any(other != name and other.endswith("." + name) for other in known)
    return ("^" if clash else "") + re.escape(name)


def _exact_spec(names: Sequence[str], known: Sequence[str]) -> tuple[str, ...] | str:
    """A ``target_modules`` spec selecting exactly ``names`` among ``known``: the list, or a regex
    when a list entry would also suffix-match another module."""
    chosen = set(names)
    if any(o not in chosen and any(o.endswith("." + n) for n in names) for o in known):
        return "(?:" + "|".join(re.escape(n) for n in names) + ")"
    return tuple(names)
