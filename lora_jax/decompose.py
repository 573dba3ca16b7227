"""Low-rank splits of a kernel for the initialisations that rewrite the base (PiSSA, OLoRA).

Each function takes kernels of shape ``lead + (in, out)`` (a batch of matrices in
Flax's (in, out) layout, e.g. the layers of a stacked kernel) and returns
``(A, B, residual)`` with A ``lead + (in, r)``, B ``lead + (r, out)`` and
``residual + scaling * A @ B == kernel`` up to float32 rounding. The maths
follows peft 0.21 (``LoraLayer.pissa_init`` / ``olora_init``), which works on
the torch weight ``W = kernel.T`` of shape (out, in); lora_jax's A and B are
PEFT's ``lora_A.weight.T`` and ``lora_B.weight.T``.

Everything runs in float32 at full matmul precision; callers cast the results.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


def _t(x: jax.Array) -> jax.Array:
    return jnp.swapaxes(x, -1, -2)


def _mm(x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.matmul(x, y, precision=_HIGHEST)


def _residual(kernel: jax.Array, a: jax.Array, b: jax.Array, scaling: float) -> jax.Array:
    return kernel - scaling * _mm(a, b)


def _split_singular(kernel: jax.Array, u: jax.Array, s: jax.Array, vh: jax.Array,
                    scaling: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """PiSSA's factors from ``W = u diag(s) vh`` (torch layout): each half gets ``sqrt(s / scaling)``."""
    root = jnp.sqrt(s / scaling)
    a = _t(vh) * root[..., None, :]          # lora_A.weight = diag(root) @ vh, transposed
    b = _t(u * root[..., None, :])           # lora_B.weight = u @ diag(root), transposed
    return a, b, _residual(kernel, a, b, scaling)


@functools.partial(jax.jit, static_argnames="rank")
def pissa_factors(kernel: jax.Array, rank: int, scaling: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """PiSSA: A and B from the top-``rank`` singular triplets; the residual loses them.

    With ``W = U S V^T`` (torch layout, descending S), PEFT sets
    ``lora_A = sqrt(S_r / s) V_r^T`` and ``lora_B = U_r sqrt(S_r / s)``, so
    ``s * lora_B @ lora_A`` is the best rank-r approximation of W and the
    residual ``W - s * lora_B @ lora_A`` keeps the minor components.

    Example:
        >>> from lora_jax.decompose import pissa_factors
        >>> import jax.numpy as jnp, numpy as np
        >>> w = jnp.asarray(np.random.default_rng(0).normal(size=(6, 5)), jnp.float32)
        >>> a, b, residual = pissa_factors(w, 2, 0.5)
        >>> a.shape, b.shape
        ((6, 2), (2, 5))
        >>> bool(jnp.allclose(residual + 0.5 * a @ b, w, atol=1e-5))
        True
    """
    kernel = kernel.astype(jnp.float32)
    u, s, vh = jnp.linalg.svd(_t(kernel), full_matrices=False)
    return _split_singular(kernel, u[..., :rank], s[..., :rank], vh[..., :rank, :], scaling)


def _orthonormal_basis(x: jax.Array) -> jax.Array:
    return jnp.linalg.qr(x)[0]


@functools.partial(jax.jit, static_argnames=("rank", "niter"))
def randomized_svd(matrix: jax.Array, rank: int, niter: int, key: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A rank-``rank`` SVD ``matrix ~ u diag(s) vh`` by randomized subspace iteration.

    Halko, Martinsson & Tropp (2011), algorithms 4.4 and 5.1, as
    ``torch.svd_lowrank(matrix, q=rank, niter=niter)`` (no oversampling):
    project a tall ``matrix`` onto ``rank`` Gaussian directions, orthonormalise,
    refine with ``niter`` power iterations (each one QR after ``A^T`` and after
    ``A``), then take the exact SVD of the small projected matrix. Batched over
    leading axes, with independent draws per matrix.

    Example:
        >>> from lora_jax.decompose import randomized_svd
        >>> import jax, jax.numpy as jnp
        >>> m = jnp.diag(jnp.array([5.0, 3.0, 1.0, 0.1]))
        >>> u, s, vh = randomized_svd(m, 2, 4, jax.random.key(0))
        >>> [round(float(x), 4) for x in s]
        [5.0, 3.0]
    """
    matrix = matrix.astype(jnp.float32)
    rows, cols = matrix.shape[-2:]
    tall = rows >= cols
    a = matrix if tall else _t(matrix)
    omega = jax.random.normal(key, a.shape[:-2] + (a.shape[-1], rank), jnp.float32)
    q = _orthonormal_basis(_mm(a, omega))
    for _ in range(niter):
        q = _orthonormal_basis(_mm(_t(a), q))
        q = _orthonormal_basis(_mm(a, q))
    u_small, s, vh = jnp.linalg.svd(_mm(_t(q), a), full_matrices=False)
    u = _mm(q, u_small)
    if tall:
        return u, s, vh
    return _t(vh), s, _t(u)


@functools.partial(jax.jit, static_argnames=("rank", "niter"))
def pissa_lowrank_factors(kernel: jax.Array, rank: int, scaling: float, niter: int,
                          key: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``"pissa_niter_<k>"``: PiSSA on the :func:`randomized_svd` of the torch-layout weight.

    The factors approximate :func:`pissa_factors`'s (more closely as ``niter``
    grows) and depend on ``key``; ``residual + scaling * A @ B`` is the kernel
    for any draw.

    Example:
        >>> from lora_jax.decompose import pissa_lowrank_factors
        >>> import jax, jax.numpy as jnp
        >>> w = jnp.diag(jnp.array([5.0, 3.0, 1.0, 0.1]))
        >>> a, b, residual = pissa_lowrank_factors(w, 2, 1.0, 4, jax.random.key(0))
        >>> bool(jnp.allclose(residual + a @ b, w, atol=1e-6))
        True
        >>> bool(jnp.allclose(residual, jnp.diag(jnp.array([0.0, 0.0, 1.0, 0.1])), atol=1e-3))
        True
    """
    kernel = kernel.astype(jnp.float32)
    u, s, vh = randomized_svd(_t(kernel), rank, niter, key)
    return _split_singular(kernel, u, s, vh, scaling)


@functools.partial(jax.jit, static_argnames="rank")
def olora_factors(kernel: jax.Array, rank: int, scaling: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """OLoRA (Büyükakyüz 2024): A and B from the first ``rank`` columns of a QR of the weight.

    With ``W = Q R`` (torch layout, reduced QR), PEFT sets ``lora_A = R[:r]``
    and ``lora_B = Q[:, :r]`` (orthonormal columns, not divided by the
    scaling) and the residual is ``W - s * Q[:, :r] @ R[:r]``.

    Example:
        >>> from lora_jax.decompose import olora_factors
        >>> import jax.numpy as jnp
        >>> w = jnp.array([[2.0, 0.0, 1.0], [0.0, 3.0, 1.0]])
        >>> a, b, residual = olora_factors(w, 1, 2.0)
        >>> bool(jnp.allclose(residual + 2.0 * a @ b, w, atol=1e-6))
        True
        >>> bool(jnp.allclose(b @ b.T, jnp.eye(1), atol=1e-6))
        True
    """
    kernel = kernel.astype(jnp.float32)
    q, r = jnp.linalg.qr(_t(kernel))
    a = _t(r[..., :rank, :])
    b = _t(q[..., :, :rank])
    return a, b, _residual(kernel, a, b, scaling)
