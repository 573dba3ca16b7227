"""`lora()`: run any params-pytree function with LoRA on the efficient path.

How it works: ``apply_fn`` is traced once to a jaxpr, then evaluated by a small
interpreter in which each targeted kernel is a symbolic :class:`LoraValue`
(W, A, B, s). A ``dot_general`` on such a value becomes the base dot plus two
thin dots, ``x @ W + s * (x @ A) @ B``, so neither ``W + s * A @ B`` nor the
dense gradient of W is ever formed. Casts, reshapes and transposes of the
kernel are carried into A and B; jit, remat, scan, cond and while bodies are
interpreted recursively; an embedding ``gather`` gathers rows of A. Any other
use of a LoRA value materialises the exact dense kernel for that use and
warns once, so results are never wrong, only slower.

Each ``dot_general`` on a targeted kernel is brought into one canonical layout and
computed by :func:`lora_jax.linear.lora_dot`, whose hand-written backward keeps the
large operands in their natural layout and skips gradients nobody asked for.

This is the one module that touches JAX internals (jaxpr equations and their
params, through ``jax.extend.core``); every primitive it handles is covered by tests.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jcore

from lora_jax import dora, tables
from lora_jax.config import LoraConfig, pattern_key
from lora_jax.linear import (
    DotSpec,
    QuantizedView,
    dense_kernel,
    dora_column_norms,
    dora_dot,
    lora_dot,
)
from lora_jax.merge import lora_delta
from lora_jax.quantize import is_quantized
from lora_jax.tree import Adapter, check_adapter, find_targets, select_modules


class LoraFallbackWarning(UserWarning):
    """A targeted kernel was used in a way that needs the dense ``W + s*A@B``.

    Python's default warning filter shows each distinct message once; use
    ``warnings.simplefilter("error", LoraFallbackWarning)`` to make any fallback an error.
    """


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LoraValue:
    """The kernel ``W + scaling * A @ B`` kept as its parts.

    ``w`` has shape ``lead + a_dims + b_dims``; ``a`` is ``lead + a_dims + (r,)``
    and ``b`` is ``lead + (r,) + b_dims``. ``lead`` are stacked-layer axes.
    ``key`` (shape ``lead``) drives dropout on the LoRA branch, or is None.

    In a mixed-adapter batch ``a`` and ``b`` carry a slot axis after ``lead``
    (``lead + (slots,) + ...``), ``rows`` (shape ``lead + (batch,)``) holds each
    example's slot (-1: the base alone) and ``slot_scaling`` (``lead + (slots,)``)
    each slot's scaling, which then replaces ``scaling``.

    ``magnitude`` is DoRA's ``m`` (shape ``lead`` + the kernel's output dims), or None.
    ``transposed``: a transpose swapped the roles, so A now holds the kernel's original
    output axes (where DoRA's magnitude lives). ``tied_head`` is set for an embedding
    table, saying what a tied-head use (a dot contracting its original output axes)
    sees: ``"base"``, W alone (PEFT's ``ensure_weight_tying=False``), or ``"adapted"``.
    """


    w: Any
    a: Any
    b: Any
    key: Any
    num_lead: int = dataclasses.field(metadata={"static": True})
    scaling: float = dataclasses.field(metadata={"static": True})
    name: str = dataclasses.field(metadata={"static": True})
    dropout: float = dataclasses.field(metadata={"static": True})
    rows: Any = None
    slot_scaling: Any = None
    magnitude: Any = None
    transposed: bool = dataclasses.field(default=False, metadata={"static": True})
    tied_head: str = dataclasses.field(default="", metadata={"static": True})

    @property
    def ab_lead(self) -> int:
        """Axes of ``a`` and ``b`` before the kernel's own: lead, and the slot axis if mixed."""
        return self.num_lead + (self.rows is not None)

    @property
    def num_a(self) -> int:
        return self.a.ndim - self.ab_lead - 1

    @property
    def num_b(self) -> int:
        return self.b.ndim - self.ab_lead - 1

    def replace(self, **changes: Any) -> LoraValue:
        return dataclasses.replace(self, **changes)

    def dense(self) -> jax.Array:
        """The exact kernel ``W + s * A @ B`` in W's dtype (the fallback); a quantized
        kernel is dequantized (and ``W`` alone when it has no adapter)."""
        w = dense_kernel(self.w)
        if self.a is None:
            return w
        if self.rows is not None:
            raise NotImplementedError(
                f"lora_jax: in a mixed-adapter batch every use of a targeted kernel must be a dot or an "
                f"embedding lookup; {self.name!r} is used otherwise, and one dense kernel cannot hold a "
                "different adapter per example.")
        delta = lora_delta(self.a, self.b, self.num_lead, self.scaling)
        full = w.astype(jnp.float32) + delta
        if self.magnitude is not None:
            full = dora.rescale(full, self.magnitude, self.num_lead, self.num_a,
                                magnitude_on_inputs=self.transposed)
        return full.astype(w.dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TableValue:
    """A frozen table ``w`` whose lookups see ``rows`` (see :mod:`lora_jax.tables`).

    ``indices`` are the trainable tokens (``rows`` is ``(n, dim)``) or None (``rows``
    is a trained copy shaped like ``w``); ``token_axis`` is ``w``'s axis indexed by
    token id. A dot that keeps the token axis free is an output head: trainable tokens
    replace its columns for those tokens; a trained copy leaves it on ``w`` (PEFT's
    ``ensure_weight_tying=False``).
    """

    w: Any
    rows: Any
    name: str = dataclasses.field(metadata={"static": True})
    indices: tuple[int, ...] | None = dataclasses.field(metadata={"static": True})
    token_axis: int = dataclasses.field(metadata={"static": True})
    is_embedding: bool = dataclasses.field(metadata={"static": True})

    def replace(self, **changes: Any) -> TableValue:
        return dataclasses.replace(self, **changes)

    def dense(self) -> jax.Array:
        """The table the lookup sees, in w's dtype (the fallback)."""
        return tables.with_rows(self.w, self.rows, self.indices, self.token_axis)


_SYMBOLIC = (LoraValue, TableValue)


def lora(apply_fn: Callable[..., Any], config: LoraConfig) -> Callable[..., Any]:
    """Wrap ``apply_fn(params, *args, **kwargs)`` as ``fn(params, adapter, *args, **kwargs)``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import lora_jax
        >>> params = {"proj": {"kernel": jnp.ones((4, 3))}}
        >>> model_apply = lambda p, x: jnp.tanh(x @ p["proj"]["kernel"])
        >>> config = lora_jax.LoraConfig(r=2, target_modules=["proj"])
        >>> adapter = lora_jax.init(config, params, jax.random.key(0))
        >>> apply = lora_jax.lora(model_apply, config)
        >>> x = jnp.ones((5, 4))
        >>> jax.jit(apply)(params, adapter, x).shape
        (5, 3)
        >>> grads = jax.grad(lambda ad: jnp.sum(apply(params, ad, x)))(adapter)
        >>> grads["proj"]["lora_A"].shape, grads["proj"]["lora_B"].shape
        ((4, 2), (2, 3))

    The result equals ``apply_fn(merge(params, adapter, config), ...)`` but is
    computed as ``x @ W + s * (x @ A) @ B``. It composes with ``jax.jit``,
    ``jax.grad`` and ``jax.vmap``. Pass ``lora_rng=key`` to apply
    ``config.lora_dropout`` to the input of the LoRA branch; without it there
    is no dropout (evaluation). Array arguments are traced; other Python
    values (flags such as ``train=True``) are passed through as constants.

    Mixed-adapter batches: with a stacked adapter (:func:`lora_jax.stack_adapters`)
    and ``adapter_ids`` (one slot per example along the inputs' leading axis, -1 for
    the base model alone), each example runs through its own adapter in one pass.

    Quantized bases (QLoRA): kernels of ``params`` may be
    :class:`lora_jax.quantize.QuantizedArray` leaves, targeted or not. The model is
    traced with plain arrays of their shape, and each kernel is dequantized where a
    dot uses it, in the forward and again in the backward pass, so no dequantized
    kernel is kept alive between the two.

    Variants, each through the same rules: DoRA (``use_dora``; the entry's
    ``lora_magnitude`` rescales each output column by ``m / ||W + s*A@B||``, the
    norm from low-rank terms, see :func:`lora_jax.linear.dora_dot`); convolutions
    (``conv_general_dilated`` on a targeted kernel becomes ``conv(x, W) + s *
    conv1x1(conv(x, A), B)`` as PEFT's Conv layers); trainable tokens and trained
    copies of ``modules_to_save`` tables (:mod:`lora_jax.tables`). A targeted
    embedding table that is also the tied output head (a dot contracting its
    embedding axis) keeps W alone in the head unless ``ensure_weight_tying``, as PEFT
    does; a :class:`TiedEmbeddingWarning` says which applies. Mixed-adapter batches
    take none of these variants (PEFT's mixed batches refuse DoRA too).
    """


    @functools.wraps(apply_fn)
    def apply(params: Any, adapter: Adapter, *args: Any, lora_rng: jax.Array | None = None,
              adapter_ids: Any = None, **kwargs: Any) -> Any:
        if adapter_ids is None:
            fit = tables.fit_adapter(config, params, adapter)
            targets, lora_part, table_part, table_targets = fit.targets, fit.lora_part, fit.table_part, fit.tables
            slots = None
        else:
            if config.use_dora or config.trainable_token_indices is not None or tables.copy_targets(config, params):
                raise ValueError(
                    "lora_jax: mixed-adapter batches (adapter_ids=) take plain LoRA adapters only: not DoRA "
                    "(as PEFT), trainable tokens or modules_to_save table copies.")
            targets, slots = _mixed_targets(config, params, adapter, adapter_ids)
            lora_part, table_part, table_targets = adapter, {}, {}
        by_path = {t.path: t for t in targets.values()}
        tables_by_path = {t.path: t for t in table_targets.values()}
        closed, out_tree, paths_leaves, traced_leaves = _trace(apply_fn, params, args, kwargs)

        use_dropout = lora_rng is not None and config.lora_dropout > 0
        invals = []
        for index, (path, leaf) in enumerate(paths_leaves):
            target = by_path.get(path)
            w = QuantizedView.of(leaf) if is_quantized(leaf) else leaf
            if target is None:
                table = tables_by_path.get(path)
                if table is not None:  # a table with trained rows (dequantized once if quantized)
                    w = TableValue(w=dense_kernel(w), rows=table_part[table.module_name][table.key],
                                   name=table.module_name, indices=table.indices, token_axis=table.token_axis,
                                   is_embedding=table.leaf_name == tables.TABLE)
                elif w is not leaf:  # a frozen quantized kernel: dequantized where it is used
                    w = LoraValue(w=w, a=None, b=None, key=None, num_lead=len(leaf.lead_shape),
                                  scaling=0.0, name=_module_label(path), dropout=0.0)
                invals.append(w)
                continue
            pair = lora_part[target.module_name]
            key = None
            if use_dropout:
                key = jax.random.fold_in(lora_rng, index)
                if target.num_lead:
                    key = jax.random.split(key, target.lead_shape)
            value = LoraValue(
                w=w, a=pair["lora_A"], b=pair["lora_B"], key=key, num_lead=target.num_lead,
                scaling=target.scaling, name=target.module_name,
                dropout=config.lora_dropout if use_dropout else 0.0,
                magnitude=pair.get(dora.MAGNITUDE),
                tied_head=("adapted" if config.ensure_weight_tying else "base") if target.is_embedding else "",
            )
            invals.append(value if slots is None else _with_slots(value, pair, slots))
        outs = _eval_jaxpr(closed.jaxpr, closed.consts, invals + traced_leaves)
        outs = _materialize(outs, "output")
        return jax.tree.unflatten(out_tree, outs)

    return apply


def _mixed_targets(config: LoraConfig, params: Any, adapter: Adapter,
                   adapter_ids: Any) -> tuple[dict[str, Any], jax.Array]:
    """Targets of a stacked adapter (one slot's shapes), checked; and the ids as int32."""
    first = next(iter(adapter.values()), None)
    if not isinstance(first, dict) or "scaling" not in first:
        raise ValueError("adapter_ids needs a stacked adapter from lora_jax.stack_adapters (entries with "
                         "'lora_A', 'lora_B' and 'scaling' with a leading slot axis).")
    one_slot = {m: {k: jax.ShapeDtypeStruct(np.shape(v)[1:], jnp.float32) for k, v in entry.items()
                    if k != "scaling"} for m, entry in adapter.items()}
    targets = find_targets(config, params, one_slot)
    check_adapter(targets, one_slot)
    num_slots = {m: np.shape(entry["scaling"]) for m, entry in adapter.items()}
    if len(set(num_slots.values())) != 1 or len(next(iter(num_slots.values()))) != 1:
        raise ValueError(f"A stacked adapter needs the same number of slots in every module; got {num_slots}.")
    (slots,) = next(iter(num_slots.values()))
    for m, entry in adapter.items():
        for k in ("lora_A", "lora_B"):
            if np.shape(entry[k])[0] != slots:
                raise ValueError(f"adapter[{m!r}][{k!r}] has {np.shape(entry[k])[0]} slots, "
                                 f"its scaling {slots}.")
    ids = jnp.asarray(adapter_ids)
    if ids.ndim != 1 or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"adapter_ids must be a 1-D integer array (one slot per example), got shape "
                         f"{tuple(ids.shape)} and dtype {ids.dtype}.")
    if not isinstance(ids, jax.core.Tracer):
        bad = [int(i) for i in np.asarray(ids) if not -1 <= int(i) < slots]
        if bad:
            raise ValueError(f"adapter_ids {bad} are out of range: this stack has slots 0..{slots - 1} "
                             "(-1 = the base model alone).")
    return targets, ids.astype(jnp.int32)


def _with_slots(value: LoraValue, entry: dict[str, Any], ids: jax.Array) -> LoraValue:
    """``value`` for a mixed batch: the slot axis of A and B moved after the lead axes,
    ids and scalings broadcast over the lead axes (so ``scan`` slices them with the layers)."""
    n = value.num_lead
    lead_shape = tuple(np.shape(value.w)[:n])
    scaling = jnp.asarray(entry["scaling"], jnp.float32)
    return value.replace(a=jnp.moveaxis(value.a, 0, n), b=jnp.moveaxis(value.b, 0, n),
                         rows=jnp.broadcast_to(ids, lead_shape + ids.shape),
                         slot_scaling=jnp.broadcast_to(scaling, lead_shape + scaling.shape))


def _module_label(path: Any) -> str:
    from lora_jax.tree import split_path

    return ".".join(split_path(path))


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct))


def _trace(apply_fn: Callable[..., Any], params: Any, args: tuple[Any, ...],
           kwargs: dict[str, Any]) -> tuple[jcore.ClosedJaxpr, Any, list[Any], list[Any]]:
    """Trace ``apply_fn(params, *args, **kwargs)`` with params leaves and array args as inputs.

    Returns the closed jaxpr, the output treedef, params' ``(path, leaf)`` pairs and
    the traced argument leaves; the jaxpr's inputs are params leaves, then those.
    Non-array arguments (flags, strings) are closed over as constants.
    """
    paths_leaves, params_def = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_quantized)
    call_leaves, call_def = jax.tree.flatten((args, kwargs))
    traced = [i for i, x in enumerate(call_leaves) if _is_array(x)]

    def flat_fn(param_leaves: list[Any], traced_leaves: list[Any]) -> Any:
        leaves = list(call_leaves)
        for i, x in zip(traced, traced_leaves):
            leaves[i] = x
        call_args, call_kwargs = jax.tree.unflatten(call_def, leaves)
        return apply_fn(jax.tree.unflatten(params_def, param_leaves), *call_args, **call_kwargs)

    traced_leaves = [call_leaves[i] for i in traced]
    # A quantized kernel is traced as a plain array of its shape: the model never sees codes.
    param_leaves = [jax.ShapeDtypeStruct(leaf.shape, leaf.dtype) if is_quantized(leaf) else leaf
                    for _, leaf in paths_leaves]
    closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(param_leaves, traced_leaves)
    return closed, jax.tree.structure(out_shape), paths_leaves, traced_leaves


def infer_in_axes(config: LoraConfig, apply_fn: Callable[..., Any], params: Any, *args: Any,
                  **kwargs: Any) -> LoraConfig:
    """``config`` with ``in_axes`` read off how ``apply_fn`` contracts each N-D kernel.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> params = {"out": {"kernel": jnp.ones((2, 4, 8))}}      # (heads, head_dim, d), no bias
        >>> model_apply = lambda p, h: jnp.einsum("bhk,hkd->bd", h, p["out"]["kernel"])
        >>> config = LoraConfig(r=2, target_modules=["out"])
        >>> infer_in_axes(config, model_apply, params, jax.ShapeDtypeStruct((3, 2, 4), jnp.float32)).in_axes
        {'out': 2}

    Only shapes are traced (``args`` may be ``jax.ShapeDtypeStruct``s). A kernel
    the model contracts on its leading ``n`` axes (after any stacked-layer axis)
    gets ``n`` input axes; a kernel used by ``conv_general_dilated`` with its output
    channels last (Flax's HWIO) is added to ``conv_modules`` (all axes but the last
    are inputs); entries already in ``config.in_axes`` win; 2-D kernels and kernels
    used otherwise keep the default of one input axis.
    """
    selected, kernels = select_modules(config, params)
    candidates = {}
    for module_name in selected:
        path, _, leaf = kernels[module_name]
        if len(np.shape(leaf)) > 2:
            candidates[path] = (module_name, 1 if config.is_stacked(module_name) else 0)
    closed, _, paths_leaves, _ = _trace(apply_fn, params, args, kwargs)
    env = {var: candidates[path] for var, (path, _) in zip(closed.jaxpr.invars, paths_leaves)
           if path in candidates}
    found: dict[str, set[int]] = {}
    _contractions(closed.jaxpr, env, found)
    in_axes = dict(config.in_axes)
    convs = [m for m, counts in found.items() if counts == {_CONV}]
    for module_name, counts in found.items():
        if len(counts) == 1 and min(counts) > 1 and pattern_key(in_axes, module_name) is None:
            in_axes[re.escape(module_name)] = counts.pop()
    if convs:
        old = config.conv_modules
        if old is None:
            conv_modules: Any = tuple(convs)
        elif isinstance(old, str):
            conv_modules = "(?:" + "|".join([old] + [re.escape(m) for m in convs]) + ")"
        else:
            conv_modules = tuple(dict.fromkeys(tuple(old) + tuple(convs)))
        return config.replace(in_axes=in_axes, conv_modules=conv_modules)
    return config.replace(in_axes=in_axes)


_CONV = -1  # recorded in place of a count: the kernel is a convolution kernel


def _contractions(jaxpr: jcore.Jaxpr, env: dict[Any, tuple[str, int]], found: dict[str, set[int]]) -> None:
    """Record, per kernel, how many leading (non-stacked) axes each dot contracts."""
    for eqn in jaxpr.eqns:
        tracked = [env.get(v) if not isinstance(v, jcore.Literal) else None for v in eqn.invars]
        if not any(tracked):
            continue
        name = eqn.primitive.name
        if name in ("convert_element_type", "copy", "sharding_constraint"):
            env[eqn.outvars[0]] = tracked[0]
        elif name == "dot_general":
            (lc, rc), _ = eqn.params["dimension_numbers"]
            for info, contract in zip(tracked, (lc, rc)):
                if info is not None:
                    module_name, lead = info
                    if sorted(contract) == list(range(lead, lead + len(contract))):
                        found.setdefault(module_name, set()).add(len(contract))
        elif name == "conv_general_dilated" and tracked[1] is not None and tracked[1][1] == 0:
            rhs_spec = eqn.params["dimension_numbers"].rhs_spec
            kind = _CONV if rhs_spec[0] == len(rhs_spec) - 1 else 0  # 0: a layout with no low-rank form
            found.setdefault(tracked[1][0], set()).add(kind)
        else:
            for inner, inner_vals in _subjaxprs(eqn, tracked):
                _contractions(inner, {v: t for v, t in zip(inner.invars, inner_vals) if t}, found)


def _subjaxprs(eqn: jcore.JaxprEqn, tracked: list[Any]) -> list[tuple[jcore.Jaxpr, list[Any]]]:
    """Inner jaxprs of call and control-flow equations, with what flows into their inputs."""
    params = eqn.params
    name = eqn.primitive.name
    if name == "jit":
        return [(params["jaxpr"].jaxpr, tracked)]
    if name == "closed_call":
        return [(params["call_jaxpr"].jaxpr, tracked)]
    if name == "remat2":
        return [(params["jaxpr"], tracked)]
    if name == "scan":
        n_fixed = params["num_consts"] + params["num_carry"]
        xs = [(t[0], t[1] - 1) if t and t[1] else None for t in tracked[n_fixed:]]
        return [(params["jaxpr"].jaxpr, tracked[:n_fixed] + xs)]
    if name == "cond":
        return [(branch.jaxpr, tracked[1:]) for branch in params["branches"]]
    if name == "while":
        n_cond, n_body = params["cond_nconsts"], params["body_nconsts"]
        carry = tracked[n_cond + n_body :]
        return [(params["body_jaxpr"].jaxpr, tracked[n_cond : n_cond + n_body] + carry)]
    return []


# -- the interpreter --------------------------------------------------------------------

def _eval_jaxpr(jaxpr: jcore.Jaxpr, consts: Sequence[Any], args: Sequence[Any]) -> list[Any]:
    env: dict[Any, Any] = {}

    def read(var: Any) -> Any:
        return var.val if isinstance(var, jcore.Literal) else env[var]

    def write(var: Any, value: Any) -> None:
        if not isinstance(var, jcore.DropVar):
            env[var] = value

    for var, value in zip(jaxpr.constvars, consts):
        write(var, value)
    for var, value in zip(jaxpr.invars, args):
        write(var, value)
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        name = eqn.primitive.name
        if not any(isinstance(x, _SYMBOLIC) for x in invals):
            outvals = _bind(eqn, invals)
        elif name in _CALL_RULES:
            outvals = _CALL_RULES[name](eqn, invals)
        elif any(isinstance(x, LoraValue) for x in invals):
            if any(isinstance(x, TableValue) for x in invals):
                invals = _materialize(invals, name)
            outvals = _RULES.get(name, _fallback)(eqn, invals)
        else:
            outvals = _TABLE_RULES.get(name, _fallback)(eqn, invals)
        if not eqn.primitive.multiple_results:
            outvals = [outvals]
        for var, value in zip(eqn.outvars, outvals):
            write(var, value)
    return [read(v) for v in jaxpr.outvars]


def _bind(eqn: jcore.JaxprEqn, invals: Sequence[Any]) -> Any:
    return eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))


def _warn_fallback(name: str, primitive: str, hint: str = "") -> None:
    # The message is the same for every trace of the same use, so the default filter
    # shows it once; stacklevel=1 keys that on this line, not on the user's many call sites.
    warnings.warn(
        f"lora_jax: kernel {name!r} is used by `{primitive}`, which the LoRA interpreter does not "
        "rewrite; it materialises W + s*A@B for that use (correct, but it costs a dense kernel and "
        f"its gradient).{hint}",
        LoraFallbackWarning,
        stacklevel=1,
    )


class TiedEmbeddingWarning(UserWarning):
    """A trained embedding table is also used as the tied output head; says what the head sees.

    PEFT's ``ensure_weight_tying=False`` (the default): a LoRA or ``modules_to_save`` on
    the embedding changes only the input lookup; trainable tokens are followed by the head.
    """


def _warn_tied_head(name: str, what: str, follows: bool) -> None:
    if follows:
        behaviour = ("the head follows the trained table" + (
            " (ensure_weight_tying=True)" if what != "trainable tokens" else " (PEFT ties trainable tokens)"))
    else:
        behaviour = ("the head keeps the original table and only the input lookup is trained "
                     "(ensure_weight_tying=False, PEFT's default; set it True for the head to follow)")
    warnings.warn(f"lora_jax: embedding {name!r} ({what}) is also the tied output head: {behaviour}.",
                  TiedEmbeddingWarning, stacklevel=1)


def _materialize(values: Sequence[Any], primitive: str, hint: str = "") -> list[Any]:
    out = []
    for value in values:
        if isinstance(value, TableValue):
            _warn_fallback(value.name, primitive, hint)
            value = value.dense()
        elif isinstance(value, LoraValue):
            if value.a is not None:  # a frozen quantized kernel is just dequantized, quietly
                _warn_fallback(value.name, primitive, hint)
            value = value.dense()
        out.append(value)
    return out


def _fallback(eqn: jcore.JaxprEqn, invals: Sequence[Any]) -> Any:
    return _bind(eqn, _materialize(invals, eqn.primitive.name))


# -- rules: kernel-shaped ops carried into A and B -------------------------------------------

def _kernel_op(eqn: jcore.JaxprEqn, w: Any) -> Any:
    """``eqn`` applied to the kernel: bound for an array, recorded on a quantized view."""
    if not isinstance(w, QuantizedView):
        return _bind(eqn, [w])
    name = eqn.primitive.name
    if name == "convert_element_type":
        return w.astype(eqn.params["new_dtype"])
    if name == "reshape":
        return w.reshape(tuple(eqn.params["new_sizes"]))
    if name == "transpose":
        return w.transpose(tuple(eqn.params["permutation"]))
    return w  # copies and sharding constraints leave the values alone


def _convert_element_type(eqn: jcore.JaxprEqn, invals: Sequence[Any]) -> Any:
    (value,) = invals
    if not jnp.issubdtype(eqn.params["new_dtype"], jnp.floating):
        return _fallback(eqn, invals)
    # A and B keep their dtype; they are cast to the kernel's dtype where used.
    return value.replace(w=_kernel_op(eqn, value.w))


def _same_shape_op(eqn: jcore.JaxprEqn, invals: Sequence[Any]) -> Any:
    """Ops that leave the kernel's values alone (copies, sharding constraints)."""
    (value,) = invals
    return value.replace(w=_kernel_op(eqn, value.w))


def _transpose(eqn: jcore.JaxprEqn, invals: Sequence[Any]) -> Any:
    (value,) = invals
    perm = tuple(eqn.params["permutation"])
    lead = value.num_lead
    head, rest = perm[:lead], perm[lead:]
    if head != tuple(range(lead)):
        return _fallback(eqn, invals)
    if value.a is None:  # a frozen quantized kernel (e.g. a tied table used as the head)
        return value.replace(w=_kernel_op(eqn, value.w))
    na, nb = value.num_a, value.num_b
    ab = value.ab_lead  # A's and B's own axes start here (after lead, and a mixed batch's slots)
    ab_axes, off = tuple(range(ab)), ab - lead
    a_range, b_range = range(lead, lead + na), range(lead + na, lead + na + nb)
    w = _kernel_op(eqn, value.w)
    m = value.magnitude  # lead + the axes it lives on (DoRA takes no mixed batch: no slot axis)
    lead_axes = tuple(range(lead))
    if all(p in a_range for p in rest[:na]):  # (a..., b...) with each group permuted
        a = value.a.transpose(ab_axes + tuple(p + off for p in rest[:na]) + (ab + na,))
        b = value.b.transpose(ab_axes + (ab,) + tuple(p - na + 1 + off for p in rest[na:]))
        if m is not None:  # the magnitude follows the axes it lives on
            m = m.transpose(lead_axes + (rest[:na] if value.transposed else tuple(p - na for p in rest[na:])))
        return value.replace(w=w, a=a, b=b, magnitude=m)
    if all(p in b_range for p in rest[:nb]):  # (b..., a...): K^T = B^T A^T swaps roles
        new_a = value.b.transpose(ab_axes + tuple(p - na + 1 + off for p in rest[:nb]) + (ab,))
        new_b = value.a.transpose(ab_axes + (ab + na,) + tuple(p + off for p in rest[nb:]))
        if m is not None:
            m = m.transpose(lead_axes + (rest[nb:] if value.transposed else tuple(p - na for p in rest[:nb])))
        return value.replace(w=w, a=new_a, b=new_b, magnitude=m, transposed=not value.transposed)
    return _fallback(eqn, invals)


def _reshape(eqn: jcore.JaxprEqn, invals: Sequence[Any]) -> Any:
    (value,) = invals
    if eqn.params.get("dimensions") is not None:
        return _fallback(eqn, invals)
    new_sizes = tuple(eqn.params["new_sizes"])
    lead = value.num_lead
    if new_sizes[:lead] != value.w.shape[:lead]:
        return _fallback(eqn, invals)
    if value.a is None:
        return value.replace(w=_kernel_op(eqn, value.w))
    ab = value.ab_lead
    ab_shape = value.a.shape[:ab]  # lead axes, and a mixed batch's slot axis
    a_dims, r = value.a.shape[ab:-1], value.a.shape[-1]
    b_dims = value.b.shape[ab + 1 :]
    body = new_sizes[lead:]
    for split in range(1, len(body)):
        if math.prod(body[:split]) == math.prod(a_dims) and math.prod(body[split:]) == math.prod(b_dims):
            m = value.magnitude
            if m is not None:
                m = m.reshape(new_sizes[:lead] + (body[:split] if value.transposed else body[split:]))
            return value.replace(
                w=_kernel_op(eqn, value.w),
                a=value.a.reshape(ab_shape + body[:split] + (r,)),
                b=value.b.reshape(ab_shape + (r,) + body[split:]),
                magnitude=m,
            )
    return _fallback(eqn, invals)


def _dropout(x: jax.Array, key: Any, rate: float, num_lead: int) -> jax.Array | None:
    """Inverted dropout of the LoRA branch's input, or None when there is none.

    ``key`` has the kernel's stacked shape: each stacked slice draws its own mask.
    """
    if key is None or rate == 0.0:
        return None

    def drop(k: Any, rows: jax.Array) -> jax.Array:
        keep = jax.random.bernoulli(k, 1.0 - rate, rows.shape)
        return jnp.where(keep, rows / (1.0 - rate), jnp.zeros((), rows.dtype))

    for _ in range(num_lead):
        drop = jax.vmap(drop)
    return drop(key, x)


def _dot_general(eqn: jcore.JaxprEqn, invals: Sequence[Any]) -> Any:
    """``x . K`` with K = W + s A B  ->  ``x . W + s (x . A) . B`` (or via B first).

    The dot is brought into :mod:`lora_jax.linear`'s canonical layout: x's batch
    (stacked) axes, then its free axes flattened to M, then its contracted axes in the
    kernel's order flattened to K; the result is reshaped (and, for a kernel on the
    left, transposed) back into the layout ``dot_general`` gives.
    """
    lhs, rhs = invals
    if isinstance(lhs, LoraValue) and isinstance(rhs, LoraValue):
        return _fallback(eqn, invals)
    kernel_is_lhs = isinstance(lhs, LoraValue)
    value, x = (lhs, rhs) if kernel_is_lhs else (rhs, lhs)
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    k_contract, x_contract = (lc, rc) if kernel_is_lhs else (rc, lc)
    k_batch, x_batch = (lb, rb) if kernel_is_lhs else (rb, lb)
    n = value.num_lead
    if value.a is None:  # a frozen (quantized) kernel: split it where this dot contracts it
        na = _frozen_split(value.w.ndim, n, k_contract)
        if na is None:
            return _fallback(eqn, invals)
        nb = value.w.ndim - n - na
    else:
        na, nb = value.num_a, value.num_b
    lead = tuple(range(n))
    # Stacked (lead) axes of K are either batch axes of the dot or free axes (a vmap over
    # layers with a shared input gives the latter); other batch axes have no low-rank form.
    if tuple(k_batch) == lead:
        shared_x = False
    elif not k_batch and n:
        shared_x = True
    else:
        return _fallback(eqn, invals)
    a_axes, b_axes = set(range(n, n + na)), set(range(n + na, n + na + nb))
    if set(k_contract) == a_axes:  # x contracts with A: (x . A) . B
        w_transposed = False
    elif set(k_contract) == b_axes:  # x contracts with B (e.g. a tied embedding as output head)
        w_transposed = True
    else:
        hint = (f" The dot contracts kernel axes {tuple(k_contract)} but the adapter splits it after "
                f"{na} input axes: set LoraConfig.in_axes={{{value.name.rsplit('.', 1)[-1]!r}: "
                f"{len(k_contract)}}} if those are its input axes.")
        return _bind(eqn, _materialize(invals, eqn.primitive.name, hint))

    # The kernel's original output axes are B's, or A's after a role-swapping transpose.
    contracts_outputs = w_transposed != value.transposed
    if value.tied_head and contracts_outputs:  # a targeted embedding table as tied output head
        _warn_tied_head(value.name, "LoRA", follows=value.tied_head == "adapted")
        if value.tied_head == "base":
            return _bind(eqn, [dense_kernel(value.w) if v is value else v for v in invals])
    if value.magnitude is not None and contracts_outputs:
        hint = " DoRA's magnitude runs along the axes this dot contracts, which has no low-rank form."
        return _bind(eqn, _materialize(invals, eqn.primitive.name, hint))

    # x -> (*lead, M, K) (or (M, K) when shared): contracted axes in the kernel's axis order.
    order = sorted(range(len(k_contract)), key=lambda i: k_contract[i])
    x_con = tuple(x_contract[i] for i in order)
    x_free = tuple(d for d in range(x.ndim) if d not in x_batch and d not in x_contract)
    perm = tuple(x_batch) + x_free + x_con
    xt = x if perm == tuple(range(x.ndim)) else x.transpose(perm)
    lead_shape = tuple(value.w.shape[:n])
    free_shape = tuple(x.shape[d] for d in x_free)
    rows = math.prod(free_shape)
    if value.a is None:
        a_dims, b_dims = tuple(value.w.shape[n:n + na]), tuple(value.w.shape[n + na:])
    else:
        ab = value.ab_lead
        a_dims, b_dims = tuple(value.a.shape[ab:-1]), tuple(value.b.shape[ab + 1 :])
    k_size = math.prod(b_dims if w_transposed else a_dims)
    xc = _reshape(xt, (rows, k_size) if shared_x else lead_shape + (rows, k_size))
    if value.rows is not None:
        return _mixed_dot(eqn, value, x, xc, free_shape, a_dims, b_dims,
                          w_transposed, kernel_is_lhs, shared_x)

    dtype = value.w.dtype
    w = _reshape(value.w, lead_shape + (math.prod(a_dims), math.prod(b_dims)))
    if value.a is None:
        y = lora_dot(xc, None, w, None, None, _spec(eqn, value, shared_x, w_transposed))
        return _to_dot_layout(y, lead_shape, free_shape, b_dims if not w_transposed else a_dims,
                              shared_x, kernel_is_lhs)
    rank = value.a.shape[-1]
    a = _reshape(value.a, lead_shape + (math.prod(a_dims), rank)).astype(dtype)
    b = _reshape(value.b, lead_shape + (rank, math.prod(b_dims))).astype(dtype)
    if w_transposed:  # K^T = W^T + s B^T A^T: B^T plays A's part
        first, second, k_free = jnp.swapaxes(b, -1, -2), jnp.swapaxes(a, -1, -2), a_dims
    else:
        first, second, k_free = a, b, b_dims
    broadcast = shared_x and value.key is not None and value.dropout > 0
    if broadcast:  # each stacked slice drops its own mask: give x the lead axes after all
        xc, shared_x = jnp.broadcast_to(xc, lead_shape + xc.shape), False
    xd = _dropout(xc, value.key, value.dropout, n)
    spec = _spec(eqn, value, shared_x, w_transposed)
    if value.magnitude is None:
        y = lora_dot(xc, xd, w, first, second, spec)
    else:
        magnitude = value.magnitude.reshape(lead_shape + (math.prod(k_free),))
        y = dora_dot(xc, xd, w, first, second, magnitude, spec)
    if broadcast:  # (*lead, M, N) -> (M, *lead, N), the shared layout
        y, shared_x = jnp.moveaxis(y, tuple(range(n)), tuple(range(1, n + 1))), True
    return _to_dot_layout(y, lead_shape, free_shape, k_free, shared_x, kernel_is_lhs)


def _frozen_split(ndim: int, num_lead: int, k_contract: Sequence[int]) -> int | None:
    """How many leading (after lead) axes of a frozen kernel count as its input, given the
    axes a dot contracts: the contracted block if it is a prefix, the rest if a suffix."""
    contract = sorted(k_contract)
    if not contract or any(a < num_lead for a in contract):
        return None
    if contract == list(range(num_lead, num_lead + len(contract))) and len(contract) < ndim - num_lead:
        return len(contract)
    if contract == list(range(ndim - len(contract), ndim)) and len(contract) < ndim - num_lead:
        return ndim - num_lead - len(contract)
    return None


def _to_dot_layout(y: jax.Array, lead_shape: tuple[int, ...], free_shape: tuple[int, ...],
                   k_free: tuple[int, ...], shared_x: bool, kernel_is_lhs: bool) -> jax.Array:
    """The canonical result back in dot_general's layout: (batch, x_free, k_free) for a
    kernel on the right, (batch, k_free, x_free) on the left; with a shared input the
    lead axes are the kernel's free axes."""
    n = len(lead_shape)
    if shared_x:
        y = y.reshape(free_shape + lead_shape + k_free)
        if kernel_is_lhs:
            nf = len(free_shape)
            y = y.transpose(tuple(range(nf, y.ndim)) + tuple(range(nf)))
        return y
    y = y.reshape(lead_shape + free_shape + k_free)
    if kernel_is_lhs:
        nf, nk = len(free_shape), len(k_free)
        y = y.transpose(tuple(range(n)) + tuple(range(n + nf, n + nf + nk)) + tuple(range(n, n + nf)))
    return y


def _mixed_dot(eqn: jcore.JaxprEqn, value: LoraValue, x: jax.Array, xc: jax.Array,
               free_shape: tuple[int, ...], a_dims: tuple[int, ...], b_dims: tuple[int, ...],
               w_transposed: bool, kernel_is_lhs: bool, shared_x: bool) -> jax.Array:
    """A dot in a mixed-adapter batch: the base dot once, each example's rows through
    its own slot's A and B (gathered per example: the thin dots batch over examples)."""
    n = value.num_lead
    batch = value.rows.shape[-1]
    if shared_x or not free_shape or free_shape[0] != batch:
        raise ValueError(
            f"lora_jax: mixed-adapter batch: {value.name!r} is applied to an input whose leading free axis "
            f"({free_shape[:1]}) is not the batch of {batch} examples that adapter_ids describes; "
            "mixed batches need each targeted dot's input to keep examples on its leading axis.")
    dtype = value.w.dtype
    lead_shape = tuple(value.w.shape[:n])
    w = _reshape(value.w, lead_shape + (math.prod(a_dims), math.prod(b_dims)))
    base = lora_dot(xc, None, w, None, None, _spec(eqn, value, False, w_transposed))
    slot_a = value.a.reshape(value.a.shape[: n + 1] + (math.prod(a_dims), value.a.shape[-1])).astype(dtype)
    slot_b = value.b.reshape(value.b.shape[: n + 2] + (math.prod(b_dims),)).astype(dtype)
    if w_transposed:
        first, second, k_free = jnp.swapaxes(slot_b, -1, -2), jnp.swapaxes(slot_a, -1, -2), a_dims
    else:
        first, second, k_free = slot_a, slot_b, b_dims
    rows_a, rows_b, row_scaling = _per_example(value, first, second)
    x4 = xc.reshape(lead_shape + (batch, -1, xc.shape[-1]))
    xd = _dropout(x4, value.key, value.dropout, n)
    x4 = x4 if xd is None else xd
    both = tuple(range(n + 1))  # lead axes and the example axis batch every thin dot
    low = lax.dot_general(x4, rows_a, (((n + 2,), (n + 1,)), (both, both)))        # lead, B, T, r
    delta = lax.dot_general(low, rows_b, (((n + 2,), (n + 1,)), (both, both)))     # lead, B, T, N
    delta = delta * row_scaling[..., None, None].astype(delta.dtype)
    y = base + delta.reshape(base.shape).astype(base.dtype)
    return _to_dot_layout(y, lead_shape, free_shape, k_free, False, kernel_is_lhs)


def _per_example(value: LoraValue, *slotted: jax.Array) -> list[jax.Array]:
    """Each example's slot of every array in ``slotted`` (slot axis after lead), and each
    example's scaling: 0 for the base alone (id -1), NaN for an id outside the stack, so a
    bad id traced under jit shows in the output instead of running some other adapter."""
    n = value.num_lead
    ids = value.rows
    slots = value.slot_scaling.shape[-1]
    valid = (ids >= 0) & (ids < slots)
    safe = jnp.clip(ids, 0, slots - 1)
    out = []
    for array in slotted:
        index = safe.reshape(safe.shape + (1,) * (array.ndim - n - 1))
        out.append(jnp.take_along_axis(array, index, axis=n))
    scaling = jnp.take_along_axis(value.slot_scaling, safe, axis=n)
    out.append(jnp.where(valid, scaling, jnp.where(ids == -1, 0.0, jnp.nan)))
    return out


def _reshape(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return x if tuple(x.shape) == shape else x.reshape(shape)


def _spec(eqn: jcore.JaxprEqn, value: LoraValue, shared_x: bool, w_transposed: bool) -> DotSpec:
    return DotSpec(num_lead=value.num_lead, scaling=value.scaling, shared_x=shared_x,
                   w_transposed=w_transposed, precision=eqn.params.get("precision"),
                   preferred_element_type=eqn.params.get("preferred_element_type"))


def _gather(eqn: jcore.JaxprEqn, invals: Sequence[Any]) -> Any:
    """Embedding lookup ``E[ids]`` with E = W + s A B  ->  ``W[ids] + s A[ids] B``."""
    value, indices = invals
    if isinstance(indices, _SYMBOLIC) or value.a is None or value.num_lead or value.num_a != 1 \
            or value.num_b != 1 or (value.magnitude is not None and value.transposed):
        return _fallback(eqn, invals)
    if value.rows is not None:
        return _mixed_gather(eqn, value, indices)
    if not _row_lookup(eqn, tuple(value.w.shape)):
        return _fallback(eqn, invals)
    base = _bind(eqn, [dense_kernel(value.w), indices])
    a = value.a.astype(value.w.dtype)
    params = dict(eqn.primitive.get_bind_params(eqn.params), slice_sizes=(1, a.shape[1]))
    a_rows = eqn.primitive.bind(a, indices, **params)
    b = value.b.astype(value.w.dtype)
    delta = jnp.matmul(a_rows, b)
    out = base + (value.scaling * delta).astype(base.dtype)
    if value.magnitude is None:
        return out
    # DoRA: m / ||W + s A B|| per embedding dimension, the norm over the vocabulary (PEFT).
    norms = dora_column_norms(value.w, a, b, DotSpec(scaling=value.scaling))
    return (out * (value.magnitude.astype(jnp.float32) / norms)).astype(out.dtype)


def _mixed_gather(eqn: jcore.JaxprEqn, value: LoraValue, indices: jax.Array) -> jax.Array:
    """Embedding lookup in a mixed-adapter batch: row ``t`` of example ``i`` adds
    ``s_i * A_i[t] @ B_i`` (each example gathers from its own slot's A)."""
    batch = value.rows.shape[-1]
    dnums = eqn.params["dimension_numbers"]
    simple = (dnums.collapsed_slice_dims == (0,) and dnums.start_index_map == (0,)
              and not dnums.operand_batching_dims and indices.shape[-1:] == (1,)
              and tuple(eqn.params["slice_sizes"]) == (1, value.w.shape[1]))
    if not simple or indices.ndim < 2 or indices.shape[0] != batch:
        raise ValueError(
            f"lora_jax: mixed-adapter batch: the lookup in {value.name!r} has token ids of shape "
            f"{tuple(indices.shape)}, not (batch={batch}, ...); mixed batches need examples on the "
            "leading axis.")
    base = _bind(eqn, [dense_kernel(value.w), indices])
    rows_b, row_scaling = _per_example(value, value.b)
    ids = jnp.clip(value.rows, 0, value.slot_scaling.shape[-1] - 1)
    tokens = jnp.clip(indices[..., 0], 0, value.w.shape[0] - 1)
    example = ids.reshape((batch,) + (1,) * (tokens.ndim - 1))
    rows_a = value.a[example, tokens].astype(value.w.dtype)                  # batch, ..., r
    delta = jnp.einsum("b...r,brd->b...d", rows_a, rows_b.astype(value.w.dtype))
    delta = delta * row_scaling.reshape((batch,) + (1,) * (delta.ndim - 1)).astype(delta.dtype)
    return base + delta.astype(base.dtype)


def _row_lookup(eqn: jcore.JaxprEqn, table_shape: tuple[int, ...]) -> bool:
    """Whether a ``gather`` takes whole rows of a 2-D table by row index (an embedding lookup)."""
    dnums = eqn.params["dimension_numbers"]
    out_ndim = eqn.outvars[0].aval.ndim
    return (len(table_shape) == 2 and dnums.collapsed_slice_dims == (0,) and dnums.start_index_map == (0,)
            and not dnums.operand_batching_dims and tuple(dnums.offset_dims) == (out_ndim - 1,)
            and tuple(eqn.params["slice_sizes"]) == (1, table_shape[1]))


# -- rules: convolutions --------------------------------------------------------------------

def _conv(eqn: jcore.JaxprEqn, invals: Sequence[Any]) -> Any:
    """``conv(x, K)`` with K = W + s A B  ->  ``conv(x, W) + s * conv1x1(conv(x, A), B)``, as PEFT's Conv.

    A is a conv kernel with W's window and r output channels, run with W's strides and
    padding but no dilation (PEFT builds lora_A without it; a dilated kernel therefore
    needs 'same' padding, as in PEFT); B is a 1x1 conv, i.e. a dot over the channels.
    DoRA rescales each output channel by ``m / ||W + s A B||`` (norm over window and inputs).
    """
    x, value = invals
    params = eqn.params
    dn = params["dimension_numbers"]
    nd = len(value.w.shape) if isinstance(value, LoraValue) else 0
    if isinstance(x, _SYMBOLIC) or not isinstance(value, LoraValue) or value.a is None or value.num_lead \
            or value.transposed or value.num_b != 1 or value.num_a != nd - 1 or dn.rhs_spec[0] != nd - 1 \
            or params["feature_group_count"] != 1 or params["batch_group_count"] != 1 \
            or any(d != 1 for d in params["lhs_dilation"]):
        hint = (" LoRA on a conv needs an ungrouped, non-transposed conv whose kernel ends in its output "
                "channels (Flax's HWIO), split after all but the last axis (LoraConfig.conv_modules).")
        return _bind(eqn, _materialize(invals, eqn.primitive.name, hint))
    w = dense_kernel(value.w)
    dtype = w.dtype
    a, b = value.a.astype(dtype), value.b.astype(dtype)
    xd = _dropout(x, value.key, value.dropout, 0)
    x_low = x if xd is None else xd
    conv = functools.partial(
        lax.conv_general_dilated, window_strides=params["window_strides"], lhs_dilation=params["lhs_dilation"],
        dimension_numbers=dn, precision=params.get("precision"),
        preferred_element_type=params.get("preferred_element_type"))
    base = _bind(eqn, [x, w])
    u = conv(x_low, a, padding=_lora_a_padding(params, x.shape, w.shape, dn),
             rhs_dilation=(1,) * (nd - 2))
    channel = dn.out_spec[1]
    low = lax.dot_general(u, b, (((channel,), (0,)), ((), ())), precision=params.get("precision"),
                          preferred_element_type=params.get("preferred_element_type"))
    low = jnp.moveaxis(low, -1, channel)
    if low.shape != base.shape:
        raise ValueError(
            f"lora_jax: the LoRA branch of conv {value.name!r} gives shape {low.shape} but the conv gives "
            f"{base.shape}: PEFT's lora_A has the kernel's window, strides and padding but no dilation "
            f"(rhs_dilation={tuple(params['rhs_dilation'])}), so a dilated conv needs 'same' padding."
        )
    if value.magnitude is None:
        return base + (value.scaling * low).astype(base.dtype)
    k_in = math.prod(value.a.shape[:-1])
    norms = dora_column_norms(w.reshape(k_in, -1), a.reshape(k_in, -1), b, DotSpec(scaling=value.scaling))
    scale = (value.magnitude.astype(jnp.float32) / norms).reshape(
        tuple(-1 if i == channel else 1 for i in range(base.ndim)))
    if xd is None:
        return ((base + value.scaling * low) * scale).astype(base.dtype)
    base_dropped = conv(xd, w, padding=params["padding"], rhs_dilation=params["rhs_dilation"])
    return (base + (scale - 1) * base_dropped + scale * value.scaling * low).astype(base.dtype)


def _lora_a_padding(params: dict[str, Any], x_shape: tuple[int, ...], w_shape: tuple[int, ...],
                    dn: Any) -> Any:
    """The padding of PEFT's lora_A conv: the base's, recomputed for A's undilated window when
    the base pads 'same' for its dilated one (torch's padding='same')."""
    dilation, pads, strides = params["rhs_dilation"], params["padding"], params["window_strides"]
    if all(d == 1 for d in dilation):
        return pads
    spatial = [x_shape[i] for i in dn.lhs_spec[2:]]
    window = [w_shape[i] for i in dn.rhs_spec[2:]]
    dilated = [(k - 1) * d + 1 for k, d in zip(window, dilation)]
    same = lax.padtype_to_pads(spatial, dilated, strides, "SAME")
    if [tuple(p) for p in pads] == [tuple(p) for p in same]:
        return lax.padtype_to_pads(spatial, window, strides, "SAME")
    return pads


# -- rules: embedding tables with trained rows (lora_jax.tables) -----------------------------

def _table_cast(eqn: jcore.JaxprEqn, invals: Sequence[Any]) -> Any:
    (value,) = invals
    if not jnp.issubdtype(eqn.params["new_dtype"], jnp.floating):
        return _fallback(eqn, invals)
    return value.replace(w=_bind(eqn, [value.w]))


def _table_same_shape_op(eqn: jcore.JaxprEqn, invals: Sequence[Any]) -> Any:
    (value,) = invals
    return value.replace(w=_bind(eqn, [value.w]))


def _table_transpose(eqn: jcore.JaxprEqn, invals: Sequence[Any]) -> Any:
    (value,) = invals
    if np.ndim(value.w) != 2:
        return _fallback(eqn, invals)
    rows = value.rows if value.indices is not None else value.rows.T
    return value.replace(w=_bind(eqn, [value.w]), rows=rows, token_axis=1 - value.token_axis)


def _table_gather(eqn: jcore.JaxprEqn, invals: Sequence[Any]) -> Any:
    """A lookup of rows: from the trained copy, or the table's rows with the trainable ones swapped in."""
    value, indices = invals
    if isinstance(indices, _SYMBOLIC) or value.token_axis != 0 or not _row_lookup(eqn, np.shape(value.w)):
        return _fallback(eqn, invals)
    if value.indices is None:
        return _bind(eqn, [value.rows.astype(value.w.dtype), indices])
    base = _bind(eqn, [value.w, indices])
    count = len(value.indices)
    # slot[token] = its position among the trainable tokens, or `count` (no trainable row).
    slot = jnp.full((value.w.shape[0],), count, jnp.int32).at[jnp.asarray(value.indices)].set(
        jnp.arange(count, dtype=jnp.int32))
    ids = indices[..., 0]
    slots = jnp.take(slot, ids, mode="fill", fill_value=count)
    padded = jnp.concatenate([value.rows.astype(base.dtype), jnp.zeros((1, base.shape[-1]), base.dtype)])
    swapped = jnp.take(padded, slots, axis=0)
    return jnp.where((slots < count)[..., None], swapped, base)


def _table_dot(eqn: jcore.JaxprEqn, invals: Sequence[Any]) -> Any:
    """A dot keeping the table's token axis free is an output head over the tokens."""
    lhs, rhs = invals
    if isinstance(lhs, TableValue) and isinstance(rhs, TableValue):
        return _fallback(eqn, invals)
    table_is_lhs = isinstance(lhs, TableValue)
    value = lhs if table_is_lhs else rhs
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    contract, batch = (lc, lb) if table_is_lhs else (rc, rb)
    axis = value.token_axis
    if axis in contract or axis in batch:  # a one-hot lookup, or a batched use: no cheap form
        return _fallback(eqn, invals)
    with_w = [value.w if v is value else v for v in invals]
    if value.indices is None:  # a trained copy: the head keeps the frozen table (ensure_weight_tying=False)
        _warn_tied_head(value.name, "modules_to_save", follows=False)
        return _bind(eqn, with_w)
    if value.is_embedding and value.token_axis == 0:
        _warn_tied_head(value.name, "trainable tokens", follows=True)
    base = _bind(eqn, with_w)
    rows = value.rows.astype(value.w.dtype)
    rows = rows if value.token_axis == 0 else rows.T
    swapped = _bind(eqn, [rows if v is value else v for v in invals])
    # Where the token axis lands in dot_general's output: (batch, lhs free, rhs free).
    other = rhs if table_is_lhs else lhs
    other_contract, other_batch = (rc, rb) if table_is_lhs else (lc, lb)
    free = [d for d in range(np.ndim(value.w)) if d not in contract and d not in batch]
    out_axis = len(batch) + free.index(axis)
    if not table_is_lhs:
        out_axis += np.ndim(other) - len(other_contract) - len(other_batch)
    index = (slice(None),) * out_axis + (jnp.asarray(value.indices),)
    return base.at[index].set(swapped.astype(base.dtype))



# -- rules: control flow and calls ----------------------------------------------------------

def _inline_call(jaxpr_param: str) -> Callable[..., Any]:
    def rule(eqn: jcore.JaxprEqn, invals: Sequence[Any]) -> Any:
        closed = eqn.params[jaxpr_param]
        return _materialize(_eval_jaxpr(closed.jaxpr, closed.consts, invals), eqn.primitive.name)
    return rule


def _remat(eqn: jcore.JaxprEqn, invals: Sequence[Any]) -> Any:
    jaxpr = eqn.params["jaxpr"]

    def body(*args: Any) -> list[Any]:
        return _materialize(_eval_jaxpr(jaxpr, (), args), eqn.primitive.name)

    return jax.checkpoint(body, prevent_cse=eqn.params["prevent_cse"],
                          policy=eqn.params["policy"])(*invals)


def _scan(eqn: jcore.JaxprEqn, invals: Sequence[Any]) -> Any:
    params = eqn.params
    closed = params["jaxpr"]
    n_consts, n_carry = params["num_consts"], params["num_carry"]
    consts = list(invals[:n_consts])
    carry = _materialize(invals[n_consts : n_consts + n_carry], "scan carry")
    xs = []
    for x in invals[n_consts + n_carry :]:
        if isinstance(x, LoraValue):
            if x.num_lead == 0:  # scanning over a kernel's own axes: no low-rank form per slice
                x = _materialize([x], "scan over kernel axes")[0]
            else:  # the scan slices the leading axis off W, A, B and the dropout keys
                x = x.replace(num_lead=x.num_lead - 1)
        elif isinstance(x, TableValue):  # a table's slices have no rows of their own
            x = _materialize([x], "scan over a table")[0]
        xs.append(x)

    def body(carry: list[Any], x: list[Any]) -> tuple[list[Any], list[Any]]:
        outs = _materialize(_eval_jaxpr(closed.jaxpr, closed.consts, consts + carry + x), "scan")
        return outs[:n_carry], outs[n_carry:]

    carry_out, ys = lax.scan(body, carry, xs, length=params["length"],
                             reverse=params["reverse"], unroll=params["unroll"])
    return list(carry_out) + list(ys)


def _while(eqn: jcore.JaxprEqn, invals: Sequence[Any]) -> Any:
    params = eqn.params
    cond_jaxpr, body_jaxpr = params["cond_jaxpr"], params["body_jaxpr"]
    n_cond, n_body = params["cond_nconsts"], params["body_nconsts"]
    cond_consts = list(invals[:n_cond])
    body_consts = list(invals[n_cond : n_cond + n_body])
    init = _materialize(invals[n_cond + n_body :], "while carry")

    def cond(carry: list[Any]) -> Any:
        return _eval_jaxpr(cond_jaxpr.jaxpr, cond_jaxpr.consts, cond_consts + carry)[0]

    def body(carry: list[Any]) -> list[Any]:
        outs = _eval_jaxpr(body_jaxpr.jaxpr, body_jaxpr.consts, body_consts + carry)
        return _materialize(outs, "while")

    return list(lax.while_loop(cond, body, init))


def _cond(eqn: jcore.JaxprEqn, invals: Sequence[Any]) -> Any:
    index, *operands = invals
    if isinstance(index, LoraValue):
        return _fallback(eqn, invals)

    def branch_fn(closed: jcore.ClosedJaxpr) -> Callable[..., list[Any]]:
        def run(ops: list[Any]) -> list[Any]:
            return _materialize(_eval_jaxpr(closed.jaxpr, closed.consts, ops), "cond")
        return run

    return list(lax.switch(index, [branch_fn(b) for b in eqn.params["branches"]], operands))


_Rule = Callable[[jcore.JaxprEqn, Sequence[Any]], Any]
# Call-like and control-flow primitives: their bodies are interpreted with any symbolic values.
_CALL_RULES: dict[str, _Rule] = {
    "jit": _inline_call("jaxpr"),
    "closed_call": _inline_call("call_jaxpr"),
    "remat2": _remat,
    "scan": _scan,
    "while": _while,
    "cond": _cond,
}
_RULES: dict[str, _Rule] = {
    "dot_general": _dot_general,
    "conv_general_dilated": _conv,
    "convert_element_type": _convert_element_type,
    "transpose": _transpose,
    "reshape": _reshape,
    "gather": _gather,
    "copy": _same_shape_op,
    "sharding_constraint": _same_shape_op,
}
_TABLE_RULES: dict[str, _Rule] = {
    "dot_general": _table_dot,
    "convert_element_type": _table_cast,
    "transpose": _table_transpose,
    "gather": _table_gather,
    "copy": _table_same_shape_op,
    "sharding_constraint": _table_same_shape_op,
}
