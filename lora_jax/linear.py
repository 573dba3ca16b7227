"""``x · K`` for a LoRA'd kernel ``K = W + s·A@B``: the forward and a hand-written backward.

The interpreter in :mod:`lora_jax.transform` brings every ``dot_general`` on a targeted
kernel into one canonical form and calls :func:`lora_dot`::

    x   (*lead, M, K)     rows of the input, contracted axes flattened into K
    W   (*lead, K, N)     the frozen kernel (or (*lead, N, K) with ``w_transposed``)
    A   (*lead, K, r)     B (*lead, r, N)
    y = x @ W + s * (xd @ A) @ B          (*lead, M, N)

``xd`` is the LoRA branch's input: ``x`` itself, or ``x`` after dropout. ``lead`` holds
stacked-layer axes that the dot batches over. With ``shared_x`` the input has no lead
axes and every slice of a stacked kernel sees the same rows (a ``vmap`` over layers or
experts); the output is then ``(M, *lead, N)``, the layout ``dot_general`` gives.

Why a custom backward: JAX's transpose of the second thin dot computes ``dB = uᵀ g``
with the small ``u = xd @ A`` (M x r) on the left, so XLA:CPU writes the large gradient
``g`` (M x N) transposed, in a copy fused into whatever produced it. Here every
gradient dot keeps the large operand on the left in its natural layout, the weight
gradient of W is computed only when W is really differentiated (``symbolic_zeros``),
and the input gradient only when the input is. The residuals are ``xd``, the small
``u`` and the kernel as it was passed: a quantized kernel (any
:class:`lora_jax.quantize.QuantizedArray`) is dequantized again in the backward pass
instead of being kept alive, dequantized, as a residual.

DoRA (:func:`dora_dot`) is ``lora_dot`` followed by a per-column scale
``m / ||W + s·A@B||`` whose norms come from ``||W||²``, ``Aᵀ W`` and ``Aᵀ A``
(:func:`dora_column_norms`): never the dense ``W + s·A@B`` nor its gradient.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax


@dataclasses.dataclass(frozen=True)
class DotSpec:
    """Static description of one canonical LoRA dot (see the module docstring).

    Attributes:
        num_lead: number of stacked axes the dot batches over.
        scaling: ``s`` in ``x @ W + s * (xd @ A) @ B``.
        shared_x: the input has no lead axes; the output is ``(M, *lead, N)``.
        w_transposed: W is stored ``(*lead, N, K)`` (a kernel used through its transpose,
            such as a tied embedding as output head).
        precision, preferred_element_type: as the model's ``dot_general`` asked.
    """

    num_lead: int = 0
    scaling: float = 1.0
    shared_x: bool = False
    w_transposed: bool = False
    precision: Any = None
    preferred_element_type: Any = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedView:
    """A quantized kernel as the model sees it: casts, reshapes and transposes recorded,
    applied only when it is dequantized (inside :func:`lora_dot`, forward and backward).

    ``ops`` act on the axes after the stacked ones, so ``lax.scan`` can slice the
    layers off ``base`` (a :class:`lora_jax.quantize.QuantizedArray`) as for any array.

    Example:
        >>> import jax.numpy as jnp
        >>> from lora_jax.quantize import quantize_array
        >>> view = QuantizedView.of(quantize_array(jnp.ones((64, 6)), "int8"))
        >>> view = view.reshape((64, 2, 3)).astype(jnp.bfloat16)
        >>> view.shape, view.dtype, dense_kernel(view).shape
        ((64, 2, 3), dtype(bfloat16), (64, 2, 3))
    """

    base: Any
    body: tuple[int, ...] = dataclasses.field(metadata={"static": True})
    dtype: Any = dataclasses.field(metadata={"static": True})
    ops: tuple[tuple[str, tuple[int, ...]], ...] = dataclasses.field(metadata={"static": True})

    @classmethod
    def of(cls, base: Any) -> QuantizedView:
        return cls(base, tuple(base.slice_shape), base.dtype, ())

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.base.lead_shape) + self.body

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def astype(self, dtype: Any) -> QuantizedView:
        return dataclasses.replace(self, dtype=jnp.dtype(dtype))

    def reshape(self, shape: tuple[int, ...]) -> QuantizedView:
        """Reshape keeping the stacked axes (``shape`` includes them)."""
        lead = self.base.lead_shape
        body = tuple(shape[len(lead):])
        return dataclasses.replace(self, body=body, ops=self.ops + (("reshape", body),))

    def transpose(self, perm: tuple[int, ...]) -> QuantizedView:
        """Transpose keeping the stacked axes first (``perm`` includes them)."""
        n = len(self.base.lead_shape)
        body_perm = tuple(p - n for p in perm[n:])
        body = tuple(self.body[p] for p in body_perm)
        return dataclasses.replace(self, body=body, ops=self.ops + (("transpose", body_perm),))

    def dequantize(self, dtype: Any = None) -> jax.Array:
        x = self.base.dequantize(self.dtype if dtype is None else dtype)
        n = len(self.base.lead_shape)
        for op, arg in self.ops:
            if op == "reshape":
                x = x.reshape(x.shape[:n] + arg)
            else:
                x = x.transpose(tuple(range(n)) + tuple(p + n for p in arg))
        return x


def dense_kernel(w: Any, dtype: Any = None) -> jax.Array:
    """``w`` as an array: quantized kernels are dequantized, arrays are returned as they are."""
    if hasattr(w, "dequantize"):
        return w.dequantize(dtype)
    return w if dtype is None else w.astype(dtype)


def lora_dot(x: jax.Array, xd: jax.Array | None, w: Any, a: jax.Array, b: jax.Array,
             spec: DotSpec) -> jax.Array:
    """``x @ W + s * (xd @ A) @ B`` in the canonical layout, with the hand-written backward.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> x, w = jnp.ones((4, 3)), jnp.ones((3, 5))
        >>> a, b = jnp.ones((3, 2)), jnp.ones((2, 5))
        >>> y = lora_dot(x, None, w, a, b, DotSpec(scaling=0.5))
        >>> bool(jnp.allclose(y, x @ w + 0.5 * (x @ a) @ b))
        True

    Args:
        x: the input, ``(*lead, M, K)`` (``(M, K)`` with ``spec.shared_x``).
        xd: the LoRA branch's input (after dropout), shaped like ``x``; None = ``x``.
        w: the frozen kernel, an array or a quantized array (dequantized where used).
        a, b: the factors, already in the compute dtype; both None for a frozen kernel
            without an adapter (a quantized kernel is still dequantized in place).
        spec: the static :class:`DotSpec`.
    """
    if xd is None:
        return _lora_dot_same_input(x, w, a, b, spec)
    return _lora_dot(x, xd, w, a, b, spec)


# -- dimension numbers ---------------------------------------------------------------------------

def _lead(spec: DotSpec) -> tuple[int, ...]:
    return tuple(range(spec.num_lead))


def _x_rows_axis(spec: DotSpec) -> int:
    """The M axis of x (and of the canonical output, before ``shared_x``'s transpose)."""
    return 0 if spec.shared_x else spec.num_lead


def _dot(lhs: jax.Array, rhs: jax.Array, contract: tuple[tuple[int, ...], tuple[int, ...]],
         batch: tuple[tuple[int, ...], tuple[int, ...]], spec: DotSpec) -> jax.Array:
    return lax.dot_general(lhs, rhs, (contract, batch), precision=spec.precision,
                           preferred_element_type=spec.preferred_element_type)


def _base(x: jax.Array, w: jax.Array, spec: DotSpec) -> jax.Array:
    """``x @ W``: (*lead, M, N), or (M, *lead, N) with shared_x."""
    n = spec.num_lead
    k_axis = n + 1 if spec.w_transposed else n
    x_k = x.ndim - 1
    if spec.shared_x:
        out = _dot(x, w, ((x_k,), (k_axis,)), ((), ()), spec)  # (M, *lead, N)
        return out
    return _dot(x, w, ((x_k,), (k_axis,)), (_lead(spec), _lead(spec)), spec)


def _low(x: jax.Array, a: jax.Array, spec: DotSpec) -> jax.Array:
    """``u = x @ A``: (*lead, M, r) in both layouts (small, so shared_x transposes it)."""
    n = spec.num_lead
    if spec.shared_x:
        u = _dot(x, a, ((x.ndim - 1,), (n,)), ((), ()), spec)  # (M, *lead, r)
        return jnp.moveaxis(u, 0, n)
    return _dot(x, a, ((x.ndim - 1,), (n,)), (_lead(spec), _lead(spec)), spec)


def _delta(u: jax.Array, b: jax.Array, spec: DotSpec) -> jax.Array:
    """``u @ B`` in the output's layout."""
    n = spec.num_lead
    out = _dot(u, b, ((u.ndim - 1,), (n,)), (_lead(spec), _lead(spec)), spec)  # (*lead, M, N)
    return jnp.moveaxis(out, n, 0) if spec.shared_x else out


def _tied(w: Any, anchor: jax.Array) -> Any:
    """A quantized kernel made to depend on ``anchor`` (this layer's input or output
    cotangent) without changing its values; arrays are returned as they are.

    Without this, XLA sees every dequantization depend on the params alone: it merges the
    backward pass's dequantization with the forward's (CSE) and may schedule them all
    early, so every layer's dequantized kernel is alive at once, which is the memory
    QLoRA exists to save. (``lax.optimization_barrier`` does not survive XLA:CPU's
    pipeline.) Adding ``anchor[0] * 0`` to each packed child is exact for finite
    anchors, and XLA does not fold ``x * 0`` for floats.
    """
    if not hasattr(w, "dequantize"):
        return w
    zero = anchor.reshape(-1)[0].astype(jnp.float32) * 0
    return jax.tree.map(lambda child: child + zero.astype(child.dtype), w)


def _forward(x: jax.Array, xd: jax.Array, w: Any, a: jax.Array, b: jax.Array,
             spec: DotSpec) -> tuple[jax.Array, jax.Array]:
    wd = dense_kernel(_tied(w, x))
    base = _base(x, wd, spec)
    if a is None:
        return base, None
    u = _low(xd, a, spec)
    delta = _delta(u, b, spec)
    return base + (spec.scaling * delta).astype(base.dtype), u


# -- backward ------------------------------------------------------------------------------------

def _gradients(x: jax.Array, xd: jax.Array, w: Any, a: jax.Array, b: jax.Array, u: jax.Array,
               g: jax.Array, spec: DotSpec, need: tuple[bool, bool, bool, bool, bool]
               ) -> tuple[Any, Any, Any, Any, Any]:
    """Cotangents of (x, xd, w, a, b) for output cotangent ``g``; None where not needed."""
    need_x, need_xd, need_w, need_a, need_b = need
    if a is None:  # a frozen kernel without an adapter: only the base dot
        need_xd = need_a = need_b = False
    n = spec.num_lead
    lead = _lead(spec)
    s = spec.scaling
    if spec.shared_x:
        # g is (M, *lead, N): batch over lead sits at axes 1..n of g.
        g_lead, g_rows, g_n = tuple(range(1, n + 1)), 0, n + 1
    else:
        g_lead, g_rows, g_n = lead, n, n + 1
    gx = gxd = gw = ga = gb = None

    if need_a or need_xd:
        # gu = s * g @ Bᵀ: (*lead, M, r); g (large) on the left, contracted on its minor axis.
        gu = s * _dot(g, b, ((g_n,), (n + 1,)), (g_lead, lead), spec).astype(a.dtype)
    if need_x or need_w:
        wd = dense_kernel(_tied(w, g))
    if need_x:
        w_n = n if spec.w_transposed else n + 1
        if spec.shared_x:  # contract the lead axes too: every slice adds to the same rows
            gx = _dot(g, wd, (g_lead + (g_n,), lead + (w_n,)), ((), ()), spec)
        else:
            gx = _dot(g, wd, ((g_n,), (w_n,)), (g_lead, lead), spec)
    if need_xd:
        if spec.shared_x:
            gxd = _dot(gu, a, (lead + (n + 1,), lead + (n + 1,)), ((), ()), spec)
        else:
            gxd = _dot(gu, a, ((n + 1,), (n + 1,)), (lead, lead), spec)
    if need_a:
        # dA = xdᵀ gu: xd (large) on the left, contracted over its rows.
        x_rows = _x_rows_axis(spec)
        if spec.shared_x:
            ga = _dot(xd, gu, ((x_rows,), (n,)), ((), ()), spec)  # (K, *lead, r)
            ga = jnp.moveaxis(ga, 0, n)
        else:
            ga = _dot(xd, gu, ((x_rows,), (n,)), (lead, lead), spec)  # (*lead, K, r)
    if need_b:
        # dB = s uᵀ g, computed as (s gᵀ u)ᵀ: the large g on the left, the small result transposed.
        gbt = _dot(g, u, ((g_rows,), (n,)), (g_lead, lead), spec)  # (*lead, N, r)
        gb = s * jnp.swapaxes(gbt, -1, -2)
    if need_w:
        x_rows = _x_rows_axis(spec)
        if spec.shared_x:
            gw = _dot(x, g, ((x_rows,), (g_rows,)), ((), ()), spec)  # (K, *lead, N)
            gw = jnp.moveaxis(gw, 0, n)
        else:
            gw = _dot(x, g, ((x_rows,), (g_rows,)), (lead, g_lead), spec)  # (*lead, K, N)
        if spec.w_transposed:
            gw = jnp.swapaxes(gw, -1, -2)
    return gx, gxd, gw, ga, gb


def _cast_like(value: Any, like: Any) -> Any:
    if value is None:
        return None
    return value.astype(like.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _lora_dot(x, xd, w, a, b, spec):
    return _forward(x, xd, w, a, b, spec)[0]


def _unwrap(primal: Any) -> tuple[Any, bool]:
    """A ``symbolic_zeros`` primal (a pytree of ``CustomVJPPrimal``s, or None): its value and
    whether any of its leaves is differentiated. Quantized kernels hold integer codes,
    which are never differentiated."""
    leaves, treedef = jax.tree.flatten(primal, is_leaf=lambda x: hasattr(x, "perturbed"))
    values = [leaf.value for leaf in leaves]
    perturbed = any(leaf.perturbed for leaf in leaves)
    return jax.tree.unflatten(treedef, values), perturbed


def _lora_dot_fwd(x, xd, w, a, b, spec):
    (x, px), (xd, pxd), (w, pw), (a, pa), (b, pb) = map(_unwrap, (x, xd, w, a, b))
    need = (px, pxd, pw and not hasattr(w, "dequantize"), pa, pb)
    y, u = _forward(x, xd, w, a, b, spec)
    # Keep only what the backward pass needs: x only for dW, xd only for dA.
    residuals = (x if need[2] else None, xd if need[3] else None, w, a, b,
                 u if need[4] else None, need)
    return y, residuals


def _lora_dot_bwd(spec, residuals, g):
    x, xd, w, a, b, u, need = residuals
    gx, gxd, gw, ga, gb = _gradients(x, xd, w, a, b, u, g, spec, need)
    return (gx, gxd, gw, _cast_like(ga, a), _cast_like(gb, b))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _lora_dot_same_input(x, w, a, b, spec):
    return _forward(x, x, w, a, b, spec)[0]


def _lora_dot_same_input_fwd(x, w, a, b, spec):
    (x, px), (w, pw), (a, pa), (b, pb) = map(_unwrap, (x, w, a, b))
    need = (px, False, pw and not hasattr(w, "dequantize"), pa, pb)
    y, u = _forward(x, x, w, a, b, spec)
    residuals = (x if (need[2] or need[3]) else None, w, a, b, u if need[4] else None, need)
    return y, residuals


def _lora_dot_same_input_bwd(spec, residuals, g):
    x, w, a, b, u, need = residuals
    need_x, _, need_w, need_a, need_b = need
    # One input feeds both branches: its cotangent is g Wᵀ + gu Aᵀ, in one sum.
    gx, gxd, gw, ga, gb = _gradients(x, x, w, a, b, u, g, spec,
                                     (need_x, need_x, need_w, need_a, need_b))
    if gx is not None and gxd is not None:
        gx = gx + gxd.astype(gx.dtype)
    return (gx, gw, _cast_like(ga, a), _cast_like(gb, b))


_lora_dot.defvjp(_lora_dot_fwd, _lora_dot_bwd, symbolic_zeros=True)
_lora_dot_same_input.defvjp(_lora_dot_same_input_fwd, _lora_dot_same_input_bwd, symbolic_zeros=True)


# -- DoRA ----------------------------------------------------------------------------------------

def base_dot(x: jax.Array, w: Any, spec: DotSpec) -> jax.Array:
    """``x @ W`` alone, in :func:`lora_dot`'s layout (plain autodiff: W is frozen).

    Example:
        >>> import jax.numpy as jnp
        >>> base_dot(jnp.ones((2, 3)), jnp.ones((3, 4)), DotSpec()).shape
        (2, 4)
    """
    return _base(x, dense_kernel(w), spec)


def dora_column_norms(w: Any, a: jax.Array, b: jax.Array, spec: DotSpec) -> jax.Array:
    """``||W + s·A@B||`` over the contracted axis K, per output column: ``(*lead, N)``.

    Example:
        >>> import jax.numpy as jnp, numpy as np
        >>> rng = np.random.default_rng(0)
        >>> w, a, b = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((5, 3), (5, 2), (2, 3)))
        >>> norms = dora_column_norms(w, a, b, DotSpec(scaling=0.5))
        >>> bool(jnp.allclose(norms, jnp.linalg.norm(w + 0.5 * a @ b, axis=0), atol=1e-5))
        True

    Computed as ``Σ_k W² + 2s·Σ_r (AᵀW)⊙B + s²·Σ_r B⊙((AᵀA)B)``: besides one pass over
    W's squares, ``2rKN + 2r²(K + N)`` multiply-adds. In ``spec.w_transposed`` layout W
    is ``(*lead, N, K)``. The caller treats the result as a constant (DoRA detaches it).
    """
    n = spec.num_lead
    lead = _lead(spec)
    wd = lax.stop_gradient(dense_kernel(w))
    a, b = lax.stop_gradient(a), lax.stop_gradient(b)
    f32 = jnp.float32
    k_axis = n + 1 if spec.w_transposed else n
    squares = jnp.sum(jnp.square(wd.astype(f32)), axis=k_axis)                  # (*lead, N)
    # AᵀW: (*lead, r, N), contracting K of A with K of W.
    a_w = lax.dot_general(a, wd, (((n,), (k_axis,)), (lead, lead)), precision=spec.precision,
                          preferred_element_type=f32)
    gram = lax.dot_general(a, a, (((n,), (n,)), (lead, lead)), precision=spec.precision,
                           preferred_element_type=f32)                           # (*lead, r, r)
    b32 = b.astype(f32)
    gram_b = lax.dot_general(gram, b32, (((n + 1,), (n,)), (lead, lead)), precision=spec.precision,
                             preferred_element_type=f32)                         # (*lead, r, N)
    s = spec.scaling
    total = squares + 2.0 * s * jnp.sum(a_w * b32, axis=n) + s * s * jnp.sum(b32 * gram_b, axis=n)
    return jnp.sqrt(jnp.maximum(total, 0.0))


def dora_dot(x: jax.Array, xd: jax.Array | None, w: Any, a: jax.Array, b: jax.Array,
             magnitude: jax.Array, spec: DotSpec) -> jax.Array:
    """DoRA's ``x · (m ⊙ (W + s·A@B) / ||W + s·A@B||)`` in :func:`lora_dot`'s layout.

    Example:
        >>> import jax.numpy as jnp, numpy as np
        >>> rng = np.random.default_rng(0)
        >>> x, w, a, b = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((4, 5), (5, 3), (5, 2), (2, 3)))
        >>> m = jnp.array([1.0, 2.0, 3.0])
        >>> k = w + 0.5 * a @ b
        >>> y = dora_dot(x, None, w, a, b, m, DotSpec(scaling=0.5))
        >>> bool(jnp.allclose(y, x @ (m * k / jnp.linalg.norm(k, axis=0)), atol=1e-5))
        True

    The norm is detached from the gradient (DoRA section 4.3, as PEFT). With dropout
    (``xd`` not None) this is PEFT's training forward: ``x @ W + (c - 1) * (xd @ W) +
    c * s * (xd @ A) @ B`` with ``c = m / ||W + s·A@B||``, which costs a second base dot.

    Args:
        x, xd, w, a, b, spec: as for :func:`lora_dot` (``a`` and ``b`` are the factors
            in the dot's order: ``(*lead, K, r)`` and ``(*lead, r, N)``).
        magnitude: ``(*lead, N)``, one magnitude per output column.
    """
    norms = dora_column_norms(w, a, b, spec)
    scale = (magnitude.astype(jnp.float32) / norms)
    if not spec.shared_x:  # (*lead, M, N): broadcast over the rows
        scale = jnp.expand_dims(scale, spec.num_lead)
    if xd is None:
        y = lora_dot(x, None, w, a, b, spec)
        return (y * scale).astype(y.dtype)
    y = lora_dot(xd, None, w, a, b, spec)
    rest = base_dot(x - xd, w, spec)
    return (y * scale).astype(y.dtype) + rest
