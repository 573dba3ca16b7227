"""Integer schemes: bitsandbytes' row-wise int8 and grouped symmetric int4.

Both work on the PyTorch-orientation matrix ``(out, in)`` of a kernel (see
:mod:`lora_jax.quantize.base`), so a *row* is one output feature: an int8 scale is
per output feature (bitsandbytes' ``SCB``), an int4 group runs along the input axis
of one output feature.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.quantize.base import (
    QuantizedArray,
    array_to_matrix,
    check_num_in,
    child,
    host_float32,
    matrix_dims,
    per_slice,
    register,
)

F32 = np.float32
# bitsandbytes dequantizes int8 by multiplying with this float32 reciprocal of 127.
_INV_127 = F32(7.874015718698502e-3)


class RowQuantizedArray(QuantizedArray):
    """Arrays whose stored matrix has one independent row per output feature."""

    def take_rows(self, rows: Any) -> RowQuantizedArray:
        """The same array with the stored matrix's rows reordered: row i becomes ``rows[i]``.

        Rows are output features (for ``num_in > 0``), and each row's codes and scales
        are its own, so permuting rows is exact on the packed data.

        Example:
            >>> import numpy as np
            >>> from lora_jax.quantize import quantize_array
            >>> kernel = np.array([[1.0, 2.0, 3.0], [-1.0, -2.0, -3.0]], np.float32)  # (in, out)
            >>> q = quantize_array(kernel, "int8").take_rows([2, 0, 1])
            >>> np.asarray(q.dequantize()).round(4).tolist()
            [[3.0, 1.0, 2.0], [-3.0, -1.0, -2.0]]
        """
        rows = np.asarray(rows)
        count = matrix_dims(self.slice_shape, self.num_in)[0]
        if rows.shape != (count,) or sorted(rows.tolist()) != list(range(count)):
            raise ValueError(f"take_rows needs a permutation of range({count}) (the stored "
                             f"matrix has {count} rows), got shape {rows.shape}.")
        axis = len(self.lead_shape)
        return jax.tree.map(lambda x: jnp.take(x, rows, axis=axis), self)


@register
@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Int8Array(RowQuantizedArray):
    """bitsandbytes' vector-wise int8: ``codes`` int8 ``(out, in)``, ``scale`` float32 ``(out,)``.

    ``scale`` is each output feature's absmax (bitsandbytes' ``SCB``), ``codes`` are
    ``round(w * ((1 / absmax) * 127))`` (half to even, each step rounded to float32 as
    PyTorch evaluates ``127.0 / absmax``) and the value is
    ``codes * scale * (1/127)`` in float32: exactly ``int8_vectorwise_quant`` /
    ``int8_vectorwise_dequant`` of the PyTorch ``(out, in)`` weight. An all-zero row
    gets scale 0 and codes 0. ``Linear8bitLt`` casts its weight to float16 first;
    quantize a float16 array to reproduce its ``CB``/``SCB``.

    Example:
        >>> import numpy as np
        >>> from lora_jax.quantize import quantize_array
        >>> q = quantize_array(np.array([[0.5, -1.0], [1.0, 2.0]], np.float32), "int8")
        >>> np.asarray(q.codes).tolist(), np.asarray(q.scale).tolist()  # rows = outputs
        ([[64, 127], [-64, 127]], [1.0, 2.0])
    """

    scheme: ClassVar[str] = "int8"
    _slice_ndim: ClassVar[int] = 2
    codes: Any = child(default=None)
    scale: Any = child(default=None)
    slice_shape: tuple[int, ...] = ()
    dtype: Any = np.dtype(np.float32)
    num_in: int = 1

    def _dequantize_slice(self, codes: Any, scale: Any) -> jax.Array:
        matrix = (codes.astype(jnp.float32) * scale[:, None]) * _INV_127
        return self._matrix_to_slice(matrix)


def quantize_int8(x: Any, *, num_in: int = 1, num_lead: int = 0,
                  name: str = "array") -> Int8Array:
    """``x`` as an :class:`Int8Array` (bitsandbytes' ``int8_vectorwise_quant``, threshold 0).

    Example:
        >>> import numpy as np
        >>> from lora_jax.quantize.integer import quantize_int8
        >>> quantize_int8(np.zeros((3, 2), np.float32)).scale.tolist()
        [0.0, 0.0]
    """
    array = host_float32(x, name)
    dtype = np.dtype(getattr(x, "dtype", array.dtype))
    check_num_in(array.shape[num_lead:], num_in)

    def one_layer(layer: np.ndarray) -> Int8Array:
        matrix = array_to_matrix(layer, num_in)
        absmax = np.abs(matrix).max(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            # torch evaluates 127.0 / absmax as reciprocal(absmax) * 127: two roundings.
            scaled = matrix * ((F32(1) / absmax) * F32(127))[:, None]
        codes = np.where(absmax[:, None] == 0, 0, np.rint(scaled)).astype(np.int8)
        return Int8Array(codes=jnp.asarray(codes), scale=jnp.asarray(absmax.astype(F32)),
                         slice_shape=tuple(layer.shape), dtype=dtype, num_in=num_in)

    return per_slice(one_layer, array, num_lead)


@register
@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Int4Array(RowQuantizedArray):
    """Grouped symmetric int4: per output feature, groups of ``group_size`` input values.

    Definition, per group g of a row of the ``(out, in)`` matrix (the last group of a
    row is shorter when ``in % group_size != 0``): ``scale = float32(absmax_g / 7)``,
    ``q = clip(round_half_even(w / scale), -7, 7)`` with the quotient taken in float64,
    value ``= float32(q * scale)``; an all-zero group has scale 0 and q 0. Codes are
    stored as ``q + 8`` in 4 bits, two per byte, the even column in the low nibble
    (rows of odd length are padded). ``codes`` uint8 ``(out, ceil(in/2))``, ``scale``
    float32 ``(out, ceil(in/group_size))``.

    Example:
        >>> import numpy as np
        >>> from lora_jax.quantize import quantize_array
        >>> q = quantize_array(np.linspace(-1, 1, 256, dtype=np.float32).reshape(256, 1), "int4")
        >>> q, float(np.abs(np.asarray(q.dequantize()).ravel() - np.linspace(-1, 1, 256)).max()) < 0.08
        (Int4Array(shape=(256, 1), dtype=float32, group_size=128, nbytes=136), True)
    """

    scheme: ClassVar[str] = "int4"
    _slice_ndim: ClassVar[int] = 2
    codes: Any = child(default=None)
    scale: Any = child(default=None)
    slice_shape: tuple[int, ...] = ()
    dtype: Any = np.dtype(np.float32)
    num_in: int = 1
    group_size: int = 128

    def _dequantize_slice(self, codes: Any, scale: Any) -> jax.Array:
        rows, cols = matrix_dims(self.slice_shape, self.num_in)
        packed = codes.astype(jnp.int32)
        q = jnp.stack([packed & 0xF, packed >> 4], axis=-1).reshape(rows, -1)[:, :cols] - 8
        groups = scale.shape[-1]
        q = jnp.pad(q, ((0, 0), (0, groups * self.group_size - cols)))
        matrix = q.reshape(rows, groups, self.group_size).astype(jnp.float32) * scale[..., None]
        return self._matrix_to_slice(matrix.reshape(rows, -1)[:, :cols])

    def _static_repr(self) -> str:
        return f"group_size={self.group_size}"


def quantize_int4(x: Any, *, group_size: int = 128, num_in: int = 1, num_lead: int = 0,
                  name: str = "array") -> Int4Array:
    """``x`` as an :class:`Int4Array` (grouped symmetric int4, see its definition).

    Example:
        >>> import numpy as np
        >>> from lora_jax.quantize.integer import quantize_int4
        >>> q = quantize_int4(np.full((4, 2), 0.5, np.float32), group_size=2)
        >>> q.scale.shape, np.asarray(q.dequantize()).tolist()[0]
        ((2, 2), [0.5, 0.5])
    """
    from lora_jax.quantize.bnb4bit import is_power_of_two

    if not is_power_of_two(group_size) or group_size < 2:
        raise ValueError(f"int4 group size {group_size!r} is not a power of two >= 2 "
                         "(the default is 128).")
    array = host_float32(x, name)
    dtype = np.dtype(getattr(x, "dtype", array.dtype))
    check_num_in(array.shape[num_lead:], num_in)

    def one_layer(layer: np.ndarray) -> Int4Array:
        matrix = array_to_matrix(layer, num_in)
        rows, cols = matrix.shape
        groups = -(-cols // group_size)
        padded = np.zeros((rows, groups * group_size), F32)
        padded[:, :cols] = matrix
        blocks = padded.reshape(rows, groups, group_size)
        scale = np.abs(blocks).max(axis=2) / F32(7)
        safe = np.where(scale == 0, 1.0, scale.astype(np.float64))
        q = np.clip(np.rint(blocks / safe[..., None]), -7, 7).astype(np.int64)
        q = q.reshape(rows, -1)[:, :cols] + 8
        if cols % 2:
            q = np.pad(q, ((0, 0), (0, 1)), constant_values=8)
        packed = (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8)
        return Int4Array(codes=jnp.asarray(packed), scale=jnp.asarray(scale.astype(F32)),
                         slice_shape=tuple(layer.shape), dtype=dtype, num_in=num_in,
                         group_size=group_size)

    return per_slice(one_layer, array, num_lead)
