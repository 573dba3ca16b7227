"""`QuantizedArray`: the pytree every quantized frozen kernel is, and the layout they share.

Every scheme stores a 2-D *matrix* per layer in PyTorch's orientation: for a Flax
kernel of shape ``in_shape + out_shape`` (``num_in`` input axes) that matrix is the
``(prod(out_shape), prod(in_shape))`` weight a ``torch.nn.Linear`` would hold, so the
bytes equal what bitsandbytes or llama.cpp store for the same layer. ``dequantize``
rebuilds the matrix and transposes it back to the kernel. With ``num_in=0`` the array
is stored in its own row-major order (an embedding table already is ``(vocab, d)``).

Stacked (scanned) kernels keep their layer axes in front of every child array, and
only the shape of one layer (``slice_shape``) is static, so ``lax.scan`` and
``jax.vmap`` can slice a quantized leaf like any array.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, TypeVar

import jax
import jax.numpy as jnp
import numpy as np


class QuantizedArray:
    """Base class of the quantized arrays: packed codes + scales, static shape and dtype.

    Subclasses are frozen dataclasses registered as pytrees: the packed arrays are
    children, ``slice_shape`` (one layer's shape), ``dtype`` (of the original array),
    ``num_in`` and the scheme's parameters are static.

    Example:
        >>> import jax.numpy as jnp
        >>> from lora_jax.quantize import QuantizedArray, quantize_array
        >>> q = quantize_array(jnp.ones((64, 8)), "int8")
        >>> isinstance(q, QuantizedArray), q.shape, q.dequantize().shape
        (True, (64, 8), (64, 8))
    """

    scheme: ClassVar[str]
    slice_shape: tuple[int, ...]
    dtype: np.dtype
    num_in: int
    # Number of axes one layer's copy of the first child array has (the rest are layer axes).
    _slice_ndim: ClassVar[int]

    def _first_child(self) -> Any:
        return getattr(self, dataclasses.fields(self)[0].name)

    @property
    def lead_shape(self) -> tuple[int, ...]:
        """The stacked-layer axes in front of ``slice_shape`` (``()`` for one layer)."""
        shape = tuple(np.shape(self._first_child()))
        return shape[: len(shape) - self._slice_ndim]

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the original array: ``lead_shape + slice_shape``."""
        return self.lead_shape + tuple(self.slice_shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of every packed child array (codes, scales, offsets)."""
        return sum(int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize
                   for x in jax.tree.leaves(self))

    def dequantize(self, dtype: Any = None) -> jax.Array:
        """The array this stands for, in ``dtype`` (default: the original dtype).

        Pure jax.numpy, so it runs under ``jit``, ``vmap``, ``grad`` and ``lax.scan``.
        """
        fn = self._dequantize_slice
        for _ in self.lead_shape:
            fn = jax.vmap(fn)
        children = [getattr(self, f.name) for f in dataclasses.fields(self)
                    if f.metadata.get("child")]
        out = fn(*children)
        return out.astype(self.dtype if dtype is None else dtype)

    def _dequantize_slice(self, *children: Any) -> jax.Array:
        """One layer's values in float32 with shape ``slice_shape`` (subclasses)."""
        raise NotImplementedError

    def _matrix_to_slice(self, matrix: jax.Array) -> jax.Array:
        return matrix_to_array(matrix, tuple(self.slice_shape), self.num_in)

    def _static_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        extra = self._static_repr()
        return (f"{type(self).__name__}(shape={self.shape}, dtype={np.dtype(self.dtype).name}"
                f"{', ' + extra if extra else ''}, nbytes={self.nbytes})")


def child(**kwargs: Any) -> Any:
    """A dataclass field that is a pytree child (a packed array)."""
    return dataclasses.field(metadata={"child": True}, **kwargs)


Q = TypeVar("Q", bound=type)


def register(cls: Q) -> Q:
    """Register a ``QuantizedArray`` dataclass: ``child()`` fields are children, the rest static."""
    fields = dataclasses.fields(cls)
    jax.tree_util.register_dataclass(
        cls,
        data_fields=[f.name for f in fields if f.metadata.get("child")],
        meta_fields=[f.name for f in fields if not f.metadata.get("child")],
    )
    return cls


# -- the matrix a scheme stores ----------------------------------------------------------

def matrix_dims(slice_shape: Sequence[int], num_in: int) -> tuple[int, int]:
    """``(rows, cols)`` of the matrix stored for one layer of shape ``slice_shape``.

    Example:
        >>> from lora_jax.quantize.base import matrix_dims
        >>> matrix_dims((576, 192), num_in=1)   # Flax kernel (in, out) -> torch (out, in)
        (192, 576)
        >>> matrix_dims((49152, 576), num_in=0)  # an embedding table, stored as is
        (49152, 576)
    """
    if num_in:
        return math.prod(slice_shape[num_in:]), math.prod(slice_shape[:num_in])
    return math.prod(slice_shape[:-1]), slice_shape[-1]


def array_to_matrix(x: np.ndarray, num_in: int) -> np.ndarray:
    """One layer's array as the ``(rows, cols)`` matrix a scheme quantizes (host numpy)."""
    rows, cols = matrix_dims(x.shape, num_in)
    if num_in:
        return np.ascontiguousarray(x.reshape(cols, rows).T)
    return x.reshape(rows, cols)


def matrix_to_array(matrix: jax.Array, slice_shape: tuple[int, ...], num_in: int) -> jax.Array:
    """Inverse of :func:`array_to_matrix` in jax.numpy."""
    if num_in:
        return matrix.T.reshape(slice_shape)
    return matrix.reshape(slice_shape)


def check_num_in(shape: tuple[int, ...], num_in: int) -> None:
    if not isinstance(num_in, (int, np.integer)) or isinstance(num_in, bool) or num_in < 0:
        raise ValueError(f"num_in must be a non-negative integer, got {num_in!r}.")
    if not shape:
        raise ValueError("Cannot quantize a scalar (shape ()); quantize arrays of rank >= 1.")
    if num_in and num_in >= len(shape):
        raise ValueError(
            f"num_in={num_in} leaves no output axis in an array of shape {shape}; "
            "a kernel needs input axes followed by at least one output axis (use num_in=0 "
            "to quantize the array in its own row-major order).")


def stack(arrays: Sequence[QuantizedArray]) -> QuantizedArray:
    """Stack same-scheme quantized arrays along a new leading (layer) axis.

    Example:
        >>> import jax.numpy as jnp
        >>> from lora_jax.quantize import quantize_array, stack
        >>> layers = [quantize_array(jnp.full((64, 4), i + 1.0), "nf4") for i in range(3)]
        >>> stacked = stack(layers)
        >>> stacked.shape, stacked.dequantize()[2, 0, 0].item()
        ((3, 64, 4), 3.0)
    """
    if not arrays:
        raise ValueError("stack needs at least one quantized array.")
    first = arrays[0]
    treedef = jax.tree.structure(first)
    for i, other in enumerate(arrays[1:], start=1):
        if jax.tree.structure(other) != treedef:
            raise ValueError(
                f"stack: array {i} ({other!r}) differs from array 0 ({first!r}) in scheme or "
                "static parameters; only identically quantized layers stack.")
        if other.lead_shape != first.lead_shape:
            raise ValueError(f"stack: array {i} has layer axes {other.lead_shape}, array 0 has "
                             f"{first.lead_shape}.")
    return jax.tree.map(lambda *xs: jnp.stack(xs), *arrays)


def is_quantized(x: Any) -> bool:
    """Whether ``x`` is a quantized array (the ``is_leaf`` for trees holding them).

    Example:
        >>> import jax.numpy as jnp
        >>> from lora_jax.quantize import is_quantized
        >>> is_quantized(jnp.ones(3))
        False
    """
    return isinstance(x, QuantizedArray)


def host_float32(x: Any, what: str) -> np.ndarray:
    """``x`` as a finite float32 numpy array on the host, or a ValueError naming ``what``."""
    if isinstance(x, jax.core.Tracer):
        raise TypeError(
            f"{what} is a traced value; quantization runs once on concrete arrays on the host "
            "(numpy), so call it outside jit/grad/vmap.")
    dtype = np.dtype(getattr(x, "dtype", np.asarray(x).dtype))
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{what} has dtype {dtype.name}; only floating-point arrays can be "
                         "quantized.")
    array = np.asarray(x).astype(np.float32)
    if array.size == 0:
        raise ValueError(f"{what} is empty (shape {array.shape}); nothing to quantize.")
    if not np.isfinite(array).all():
        bad = tuple(int(i) for i in np.argwhere(~np.isfinite(array))[0])
        raise ValueError(f"{what} has a non-finite value at index {bad} ({array[bad]}); "
                         "quantization scales would be meaningless.")
    return array


def per_slice(fn: Callable[[np.ndarray], QuantizedArray], x: np.ndarray,
              num_lead: int) -> QuantizedArray:
    """Quantize every layer of ``x`` (``num_lead`` leading axes) with ``fn`` and stack them."""
    if num_lead == 0:
        return fn(x)
    return stack([per_slice(fn, layer, num_lead - 1) for layer in x])
