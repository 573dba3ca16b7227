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

This is the one module that touches JAX internals (jaxpr equations and their
params); every primitive it handles is covered by tests.
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

from lora_jax.config import LoraConfig, pattern_key
from lora_jax.merge import lora_delta
from lora_jax.tree import Adapter, check_adapter, find_targets, select_modules


class LoraFallbackWarning(UserWarning):
    """A targeted kernel was used in a way that needs the dense ``W + s*A@B``."""


_warned: set[tuple[str, str]] = set()


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LoraValue:
    """The kernel ``W + scaling * A @ B`` kept as its parts.

    ``w`` has shape ``lead + a_dims + b_dims``; ``a`` is ``lead + a_dims + (r,)``
    and ``b`` is ``lead + (r,) + b_dims``. ``lead`` are stacked-layer axes.
    ``key`` (shape ``lead``) drives dropout on the LoRA branch, or is None.
    """

    w: Any
    a: Any
    b: Any
    key: Any
    num_lead: int = dataclasses.field(metadata={"static": True})
    scaling: float = dataclasses.field(metadata={"static": True})
    name: str = dataclasses.field(metadata={"static": True})
    dropout: float = dataclasses.field(metadata={"static": True})

    @property
    def num_a(self) -> int:
        return self.a.ndim - self.num_lead - 1

    @property
    def num_b(self) -> int:
        return self.b.ndim - self.num_lead - 1

    def replace(self, **changes: Any) -> LoraValue:
        return dataclasses.replace(self, **changes)

    def dense(self) -> jax.Array:
        """The exact kernel ``W + s * A @ B`` in W's dtype (the fallback)."""
        delta = lora_delta(self.a, self.b, self.num_lead, self.scaling)
        return (self.w.astype(jnp.float32) + delta).astype(self.w.dtype)


def lora(apply_fn: Callable[..., Any], config: LoraConfig) -> Callable[..., Any]:
    """Wrap ``apply_fn(params, *args, **kwargs)`` as ``fn(params, adapter, *args, **kwargs)``.

    Example::

        adapter = lora_jax.init(config, params, jax.random.key(0))
        apply = lora_jax.lora(model.apply, config)
        logits = jax.jit(apply)(params, adapter, tokens)
        grads = jax.grad(lambda ad: loss(apply(params, ad, tokens)))(adapter)

    The result equals ``apply_fn(merge(params, adapter, config), ...)`` but is
    computed as ``x @ W + s * (x @ A) @ B``. It composes with ``jax.jit``,
    ``jax.grad`` and ``jax.vmap``. Pass ``lora_rng=key`` to apply
    ``config.lora_dropout`` to the input of the LoRA branch; without it there
    is no dropout (evaluation). Array arguments are traced; other Python
    values (flags such as ``train=True``) are passed through as constants.
    """

    @functools.wraps(apply_fn)
    def apply(params: Any, adapter: Adapter, *args: Any, lora_rng: jax.Array | None = None,
              **kwargs: Any) -> Any:
        targets = find_targets(config, params)
        check_adapter(targets, adapter)
        by_path = {t.path: t for t in targets.values()}
        closed, out_tree, paths_leaves, traced_leaves = _trace(apply_fn, params, args, kwargs)

        use_dropout = lora_rng is not None and config.lora_dropout > 0
        invals = []
        for index, (path, leaf) in enumerate(paths_leaves):
            target = by_path.get(path)
            if target is None:
                invals.append(leaf)
                continue
            pair = adapter[target.module_name]
            key = None
            if use_dropout:
                key = jax.random.fold_in(lora_rng, index)
                if target.num_lead:
                    key = jax.random.split(key, target.lead_shape)
            invals.append(LoraValue(
                w=leaf, a=pair["lora_A"], b=pair["lora_B"], key=key, num_lead=target.num_lead,
                scaling=target.scaling, name=target.module_name,
                dropout=config.lora_dropout if use_dropout else 0.0,
            ))
        outs = _eval_jaxpr(closed.jaxpr, closed.consts, invals + traced_leaves)
        outs = _materialize(outs, "output")
        return jax.tree.unflatten(out_tree, outs)

    return apply


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct))


def _trace(apply_fn: Callable[..., Any], params: Any, args: tuple[Any, ...],
           kwargs: dict[str, Any]) -> tuple[jcore.ClosedJaxpr, Any, list[Any], list[Any]]:
    """Trace ``apply_fn(params, *args, **kwargs)`` with params leaves and array args as inputs.

    Returns the closed jaxpr, the output treedef, params' ``(path, leaf)`` pairs and
    the traced argument leaves; the jaxpr's inputs are params leaves, then those.
    Non-array arguments (flags, strings) are closed over as constants.
    """
    paths_leaves, params_def = jax.tree_util.tree_flatten_with_path(params)
    call_leaves, call_def = jax.tree.flatten((args, kwargs))
    traced = [i for i, x in enumerate(call_leaves) if _is_array(x)]

    def flat_fn(param_leaves: list[Any], traced_leaves: list[Any]) -> Any:
        leaves = list(call_leaves)
        for i, x in zip(traced, traced_leaves):
            leaves[i] = x
        call_args, call_kwargs = jax.tree.unflatten(call_def, leaves)
        return apply_fn(jax.tree.unflatten(params_def, param_leaves), *call_args, **call_kwargs)

    traced_leaves = [call_leaves[i] for i in traced]
    param_leaves = [leaf for _, leaf in paths_leaves]
    closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(param_leaves, traced_leaves)
    return closed, jax.tree.structure(out_shape), paths_leaves, traced_leaves


def infer_in_axes(config: LoraConfig, apply_fn: Callable[..., Any], params: Any, *args: Any,
                  **kwargs: Any) -> LoraConfig:
    """``config`` with ``in_axes`` read off how ``apply_fn`` contracts each N-D kernel.

    Example::

        config = LoraConfig(r=8, target_modules="all-linear")
        config = infer_in_axes(config, model.apply, params, x)
        config.in_axes  # e.g. {"block0\\.attn\\.out": 2} for a (heads, head_dim, d) kernel

    Only shapes are traced (``args`` may be ``jax.ShapeDtypeStruct``s). A kernel
    the model contracts on its leading ``n`` axes (after any stacked-layer axis)
    gets ``n`` input axes; entries already in ``config.in_axes`` win; 2-D
    kernels and kernels used otherwise keep the default of one input axis.
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
    for module_name, counts in found.items():
        if len(counts) == 1 and counts != {1} and pattern_key(in_axes, module_name) is None:
            in_axes[re.escape(module_name)] = counts.pop()
    return config.replace(in_axes=in_axes)


def _contractions(jaxpr: jcore.Jaxpr, env: dict[Any, tuple[str, int]], found: dict[str, set[int]]) -> None:
    """Record, per kernel, how many leading (non-stacked) axes each dot contracts."""
    for eqn in jaxpr.eqns:
        tracked = [env.get(v) if not isinstance(v, jcore.Literal) else None for v in eqn.invars]
        if not any(tracked):
            continue
        name = eqn.primitive.name
        if name in ("convert_element_type", "copy", "copy_p", "sharding_constraint"):
            env[eqn.outvars[0]] = tracked[0]
        elif name == "dot_general":
            (lc, rc), _ = eqn.params["dimension_numbers"]
            for info, contract in zip(tracked, (lc, rc)):
                if info is not None:
                    module_name, lead = info
                    if sorted(contract) == list(range(lead, lead + len(contract))):
                        found.setdefault(module_name, set()).add(len(contract))
        else:
            for inner, inner_vals in _subjaxprs(eqn, tracked):
                _contractions(inner, {v: t for v, t in zip(inner.invars, inner_vals) if t}, found)


def _subjaxprs(eqn: jcore.JaxprEqn, tracked: list[Any]) -> list[tuple[jcore.Jaxpr, list[Any]]]:
    """Inner jaxprs of call and control-flow equations, with what flows into their inputs."""
    params = eqn.params
    name = eqn.primitive.name
    if name in ("pjit", "jit"):
        return [(params["jaxpr"].jaxpr, tracked)]
    if name == "closed_call":
        return [(params["call_jaxpr"].jaxpr, tracked)]
    if name in ("checkpoint", "remat2"):
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
        if any(isinstance(x, LoraValue) for x in invals):
            rule = _RULES.get(eqn.primitive.name, _fallback)
            outvals = rule(eqn, invals)
        else:
            outvals = _bind(eqn, invals)
        if not eqn.primitive.multiple_results:
            outvals = [outvals]
        for var, value in zip(eqn.outvars, outvals):
            write(var, value)
    return [read(v) for v in jaxpr.outvars]


def _bind(eqn: jcore.JaxprEqn, invals: Sequence[Any]) -> Any:
    params = eqn.primitive.get_bind_params(eqn.params)
    if isinstance(params, tuple):  # older JAX returns (subfuns, params)
        subfuns, params = params
        return eqn.primitive.bind(*subfuns, *invals, **params)
    return eqn.primitive.bind(*invals, **params)


def _warn_once(name: str, primitive: str, hint: str = "") -> None:
    if (name, primitive) in _warned:
        return
    _warned.add((name, primitive))
    warnings.warn(
        f"lora_jax: kernel {name!r} is used by `{primitive}`, which the LoRA interpreter does not "
        "rewrite; it materialises W + s*A@B for that use (correct, but it costs a dense kernel and "
        f"its gradient).{hint}",
        LoraFallbackWarning,
        stacklevel=4,
    )


def _materialize(values: Sequence[Any], primitive: str, hint: str = "") -> list[Any]:
    out = []
    for value in values:
        if isinstance(value, LoraValue):
            _warn_once(value.name, primitive, hint)
            value = value.dense()
        out.append(value)
    return out


def _fallback(eqn: jcore.JaxprEqn, invals: Sequence[Any]) -> Any:
    return _bind(eqn, _materialize(invals, eqn.primitive.name))


# -- rules: kernel-shaped ops carried into A and B -------------------------------------------

def _convert_element_type(eqn: jcore.JaxprEqn, invals: Sequence[Any]) -> Any:
    (value,) = invals
    if not jnp.issubdtype(eqn.params["new_dtype"], jnp.floating):
        return _fallback(eqn, invals)
    # A and B keep their dtype; they are cast to the kernel's dtype where used.
    return value.replace(w=_bind(eqn, [value.w]))


def _same_shape_op(eqn: jcore.JaxprEqn, invals: Sequence[Any]) -> Any:
    """Ops that leave the kernel's values alone (copies, sharding constraints)."""
    (value,) = invals
    return value.replace(w=_bind(eqn, [value.w]))


def _transpose(eqn: jcore.JaxprEqn, invals: Sequence[Any]) -> Any:
    (value,) = invals
    perm = tuple(eqn.params["permutation"])
    lead, na, nb = value.num_lead, value.num_a, value.num_b
    head, rest = perm[:lead], perm[lead:]
    if head != tuple(range(lead)):
        return _fallback(eqn, invals)
    lead_axes = tuple(range(lead))
    a_range, b_range = range(lead, lead + na), range(lead + na, lead + na + nb)
    w = _bind(eqn, [value.w])
    if all(p in a_range for p in rest[:na]):  # (a..., b...) with each group permuted
        a = value.a.transpose(lead_axes + rest[:na] + (lead + na,))
        b = value.b.transpose(lead_axes + (lead,) + tuple(p - na + 1 for p in rest[na:]))
        return value.replace(w=w, a=a, b=b)
    if all(p in b_range for p in rest[:nb]):  # (b..., a...): K^T = B^T A^T swaps roles
        new_a = value.b.transpose(lead_axes + tuple(p - na + 1 for p in rest[:nb]) + (lead,))
        new_b = value.a.transpose(lead_axes + (lead + na,) + rest[nb:])
        return value.replace(w=w, a=new_a, b=new_b)
    return _fallback(eqn, invals)


def _reshape(eqn: jcore.JaxprEqn, invals: Sequence[Any]) -> Any:
    (value,) = invals
    if eqn.params.get("dimensions") is not None:
        return _fallback(eqn, invals)
    new_sizes = tuple(eqn.params["new_sizes"])
    lead = value.num_lead
    lead_shape = value.w.shape[:lead]
    if new_sizes[:lead] != lead_shape:
        return _fallback(eqn, invals)
    a_dims, r = value.a.shape[lead:-1], value.a.shape[-1]
    b_dims = value.b.shape[lead + 1 :]
    body = new_sizes[lead:]
    for split in range(1, len(body)):
        if math.prod(body[:split]) == math.prod(a_dims) and math.prod(body[split:]) == math.prod(b_dims):
            return value.replace(
                w=_bind(eqn, [value.w]),
                a=value.a.reshape(lead_shape + body[:split] + (r,)),
                b=value.b.reshape(lead_shape + (r,) + body[split:]),
            )
    return _fallback(eqn, invals)


def _dropout(x: jax.Array, value: LoraValue) -> jax.Array:
    if value.key is None or value.dropout == 0.0:
        return x
    keep = jax.random.bernoulli(value.key, 1.0 - value.dropout, x.shape)
    return jnp.where(keep, x / (1.0 - value.dropout), jnp.zeros((), x.dtype))


def _dot_general(eqn: jcore.JaxprEqn, invals: Sequence[Any]) -> Any:
    """``x . K`` with K = W + s A B  ->  ``x . W + s (x . A) . B`` (or via B first)."""
    lhs, rhs = invals
    if isinstance(lhs, LoraValue) and isinstance(rhs, LoraValue):
        return _fallback(eqn, invals)
    kernel_is_lhs = isinstance(lhs, LoraValue)
    value, x = (lhs, rhs) if kernel_is_lhs else (rhs, lhs)
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    k_contract, x_contract = (lc, rc) if kernel_is_lhs else (rc, lc)
    k_batch, x_batch = (lb, rb) if kernel_is_lhs else (rb, lb)
    lead, na, nb = value.num_lead, value.num_a, value.num_b
    # Stacked (lead) axes of K are either batch axes of the dot or free axes (a vmap over
    # layers gives one or the other); in both cases they pair A's and B's lead axes.
    lead_is_batch = tuple(k_batch) == tuple(range(lead))
    if not (lead_is_batch or (not k_batch and lead)):
        return _fallback(eqn, invals)
    a_axes, b_axes = set(range(lead, lead + na)), set(range(lead + na, lead + na + nb))
    if set(k_contract) == a_axes:  # x contracts with A: (x . A) . B
        first, second = value.a, value.b
        first_contract = tuple(k_contract)
        second_contract = lead  # B's rank axis
    elif set(k_contract) == b_axes:  # x contracts with B (e.g. a tied embedding as output head)
        first, second = value.b, value.a
        first_contract = tuple(k - na + 1 for k in k_contract)  # K axis -> B axis
        second_contract = lead + na
    else:
        hint = (f" The dot contracts kernel axes {tuple(k_contract)} but the adapter splits it after "
                f"{na} input axes: set LoraConfig.in_axes={{{value.name.rsplit('.', 1)[-1]!r}: "
                f"{len(k_contract)}}} if those are its input axes.")
        return _bind(eqn, _materialize(invals, eqn.primitive.name, hint))

    base = _bind(eqn, [lhs.w if kernel_is_lhs else lhs, rhs if kernel_is_lhs else rhs.w])
    dtype = value.w.dtype
    first, second = first.astype(dtype), second.astype(dtype)
    x = _dropout(x, value)
    kw = dict(precision=eqn.params.get("precision"),
              preferred_element_type=eqn.params.get("preferred_element_type"))
    lead_axes = tuple(range(lead))
    first_batch, x_batch = (lead_axes, tuple(x_batch)) if lead_is_batch else ((), ())
    x_contract = tuple(x_contract)
    if kernel_is_lhs:
        # low: (lead, r, x_free); delta: (lead, k_free, x_free) = the dot's output layout
        low = lax.dot_general(first, x, ((first_contract, x_contract), (first_batch, x_batch)), **kw)
        delta = lax.dot_general(second, low.astype(dtype), (((second_contract,), (lead,)), (lead_axes, lead_axes)), **kw)
    elif lead_is_batch:
        # low: (lead, x_free, r); delta: (lead, x_free, k_free) = the dot's output layout
        low = lax.dot_general(x, first, ((x_contract, first_contract), (x_batch, first_batch)), **kw)
        delta = lax.dot_general(low.astype(dtype), second, (((low.ndim - 1,), (second_contract,)), (lead_axes, lead_axes)), **kw)
    else:
        # low: (x_free, lead, r); delta: (lead, x_free, k_rest) -> the dot's (x_free, lead, k_rest)
        low = lax.dot_general(x, first, ((x_contract, first_contract), ((), ())), **kw)
        n_free = low.ndim - lead - 1
        delta = lax.dot_general(low.astype(dtype), second, (((low.ndim - 1,), (second_contract,)),
                                (tuple(range(n_free, n_free + lead)), lead_axes)), **kw)
        delta = delta.transpose(tuple(range(lead, lead + n_free)) + lead_axes
                                + tuple(range(lead + n_free, delta.ndim)))
    return base + (value.scaling * delta).astype(base.dtype)


def _gather(eqn: jcore.JaxprEqn, invals: Sequence[Any]) -> Any:
    """Embedding lookup ``E[ids]`` with E = W + s A B  ->  ``W[ids] + s A[ids] B``."""
    value, indices = invals
    if isinstance(indices, LoraValue) or value.num_lead or value.num_a != 1 or value.num_b != 1:
        return _fallback(eqn, invals)
    dnums = eqn.params["dimension_numbers"]
    out_ndim = eqn.outvars[0].aval.ndim
    rows = dnums.collapsed_slice_dims == (0,) and dnums.start_index_map == (0,)
    if not (rows and not dnums.operand_batching_dims and tuple(dnums.offset_dims) == (out_ndim - 1,)
            and tuple(eqn.params["slice_sizes"]) == (1, value.w.shape[1])):
        return _fallback(eqn, invals)
    base = _bind(eqn, [value.w, indices])
    a = value.a.astype(value.w.dtype)
    params = dict(eqn.primitive.get_bind_params(eqn.params), slice_sizes=(1, a.shape[1]))
    a_rows = eqn.primitive.bind(a, indices, **params)
    delta = jnp.matmul(a_rows, value.b.astype(value.w.dtype))
    return base + (value.scaling * delta).astype(base.dtype)


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


_RULES: dict[str, Callable[[jcore.JaxprEqn, Sequence[Any]], Any]] = {
    "dot_general": _dot_general,
    "convert_element_type": _convert_element_type,
    "transpose": _transpose,
    "reshape": _reshape,
    "gather": _gather,
    "copy": _same_shape_op,
    "copy_p": _same_shape_op,
    "sharding_constraint": _same_shape_op,
    "pjit": _inline_call("jaxpr"),
    "jit": _inline_call("jaxpr"),
    "closed_call": _inline_call("call_jaxpr"),
    "checkpoint": _remat,
    "remat2": _remat,
    "scan": _scan,
    "while": _while,
    "cond": _cond,
}
