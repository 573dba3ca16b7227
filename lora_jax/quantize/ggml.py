"""llama.cpp's GGUF block formats Q8_0, Q4_0 and Q4_1, kept quantized.

A GGUF tensor lists its dimensions fastest first: a linear weight is ``(ne0, ne1) =
(in, out)``, stored as ``out`` rows of ``in`` values, i.e. PyTorch's ``(out, in)``
weight row-major. Each row is cut into blocks of 32 values (``in % 32 == 0``):

* Q8_0 (34 bytes): float16 ``d``, 32 int8 ``q``; value ``d * q``.
* Q4_0 (18 bytes): float16 ``d``, 16 bytes; value ``d * (q - 8)``.
* Q4_1 (20 bytes): float16 ``d``, float16 ``m``, 16 bytes; value ``d * q + m``.

In the 4-bit formats byte j holds value j in its low nibble and value j + 16 in its
high nibble. The arrays here keep exactly these bytes, split into their fields
(``scale`` = d, ``minimum`` = m, ``codes``), and ``dequantize`` computes what
``gguf.quants.dequantize`` computes, in float32, bit for bit (``d * q`` is exact in
float32, so a fused multiply-add cannot change Q4_1's result).

Orientation: by default (``transpose=True``) the array stands for the Flax kernel
``(in, out)``, the transpose of the stored rows, applied at dequantize time; with
``transpose=False`` it has numpy's view of the tensor (reversed GGUF dims), which is
right for an embedding table ``(vocab, hidden)``. Rows are output features, so
llama.cpp's Q/K row permutation is undone exactly on the packed blocks with
``take_rows`` (see :func:`from_gguf_tensor`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.quantize.base import child, register
from lora_jax.quantize.integer import RowQuantizedArray

BLOCK_VALUES = 32


class GGMLArray(RowQuantizedArray):
    """Common code of the GGUF block arrays."""

    ggml_type: ClassVar[int]
    block_bytes: ClassVar[int]
    _slice_ndim: ClassVar[int] = 3

    def _values(self, codes: Any) -> jax.Array:
        """Per-block code values as float32 ``(rows, blocks, 32)``."""
        raise NotImplementedError

    def to_gguf_bytes(self) -> np.ndarray:
        """The GGUF block bytes of one layer, ``(rows, blocks * block_bytes)`` uint8 (host)."""
        if self.lead_shape:
            raise ValueError(f"to_gguf_bytes works on one layer; this array has layer axes "
                             f"{self.lead_shape} (index it first).")
        parts = []
        for name in self._byte_fields:
            field = np.ascontiguousarray(np.asarray(getattr(self, name)))
            parts.append(field.view(np.uint8).reshape(field.shape[0], field.shape[1], -1))
        return np.concatenate(parts, axis=-1).reshape(parts[0].shape[0], -1)


def _nibbles_low_then_high(codes: jax.Array) -> jax.Array:
    packed = codes.astype(jnp.int32)
    return jnp.concatenate([packed & 0xF, packed >> 4], axis=-1)


@register
@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Q8_0Array(GGMLArray):  # noqa: N801  (llama.cpp's name)
    """GGUF Q8_0 blocks: ``codes`` int8 ``(rows, blocks, 32)``, ``scale`` float16 ``(rows, blocks)``.

    Example:
        >>> import numpy as np
        >>> from lora_jax.quantize import from_gguf_blocks, from_gguf_tensor
        >>> block = np.concatenate([np.float16(0.5).reshape(1).view(np.uint8),
        ...                         np.arange(32, dtype=np.int8).view(np.uint8)])
        >>> q = from_gguf_blocks(block, "Q8_0", (32, 1), transpose=False)
        >>> q.shape, np.asarray(q.dequantize())[0, :3].tolist()
        ((1, 32), [0.0, 0.5, 1.0])
    """

    scheme: ClassVar[str] = "q8_0"
    ggml_type: ClassVar[int] = 8
    block_bytes: ClassVar[int] = 34
    _byte_fields: ClassVar[tuple[str, ...]] = ("scale", "codes")
    codes: Any = child(default=None)
    scale: Any = child(default=None)
    slice_shape: tuple[int, ...] = ()
    dtype: Any = np.dtype(np.float32)
    num_in: int = 1

    def _dequantize_slice(self, codes: Any, scale: Any) -> jax.Array:
        values = codes.astype(jnp.float32) * scale.astype(jnp.float32)[..., None]
        return self._matrix_to_slice(values.reshape(values.shape[0], -1))


@register
@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Q4_0Array(GGMLArray):  # noqa: N801
    """GGUF Q4_0 blocks: ``codes`` uint8 ``(rows, blocks, 16)``, ``scale`` float16 ``(rows, blocks)``.

    Example:
        >>> import numpy as np
        >>> from lora_jax.quantize import from_gguf_blocks, from_gguf_tensor
        >>> block = np.concatenate([np.float16(1.0).reshape(1).view(np.uint8),
        ...                         np.full(16, 0x9F, np.uint8)])   # low 15 -> 7, high 9 -> 1
        >>> q = from_gguf_blocks(block, "Q4_0", (32, 1), transpose=False)
        >>> np.asarray(q.dequantize())[0, [0, 16]].tolist()
        [7.0, 1.0]
    """

    scheme: ClassVar[str] = "q4_0"
    ggml_type: ClassVar[int] = 2
    block_bytes: ClassVar[int] = 18
    _byte_fields: ClassVar[tuple[str, ...]] = ("scale", "codes")
    codes: Any = child(default=None)
    scale: Any = child(default=None)
    slice_shape: tuple[int, ...] = ()
    dtype: Any = np.dtype(np.float32)
    num_in: int = 1

    def _dequantize_slice(self, codes: Any, scale: Any) -> jax.Array:
        q = (_nibbles_low_then_high(codes) - 8).astype(jnp.float32)
        values = scale.astype(jnp.float32)[..., None] * q
        return self._matrix_to_slice(values.reshape(values.shape[0], -1))


@register
@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Q4_1Array(GGMLArray):  # noqa: N801
    """GGUF Q4_1 blocks: ``codes`` uint8 ``(rows, blocks, 16)``; ``scale``, ``minimum`` float16.

    Example:
        >>> import numpy as np
        >>> from lora_jax.quantize import from_gguf_blocks, from_gguf_tensor
        >>> block = np.concatenate([np.float16(0.5).reshape(1).view(np.uint8),
        ...                         np.float16(-1.0).reshape(1).view(np.uint8),
        ...                         np.full(16, 0x40, np.uint8)])  # low 0, high 4
        >>> q = from_gguf_blocks(block, "Q4_1", (32, 1), transpose=False)
        >>> np.asarray(q.dequantize())[0, [0, 16]].tolist()
        [-1.0, 1.0]
    """

    scheme: ClassVar[str] = "q4_1"
    ggml_type: ClassVar[int] = 3
    block_bytes: ClassVar[int] = 20
    _byte_fields: ClassVar[tuple[str, ...]] = ("scale", "minimum", "codes")
    codes: Any = child(default=None)
    scale: Any = child(default=None)
    minimum: Any = child(default=None)
    slice_shape: tuple[int, ...] = ()
    dtype: Any = np.dtype(np.float32)
    num_in: int = 1

    def _dequantize_slice(self, codes: Any, scale: Any, minimum: Any) -> jax.Array:
        q = _nibbles_low_then_high(codes).astype(jnp.float32)
        values = scale.astype(jnp.float32)[..., None] * q + minimum.astype(jnp.float32)[..., None]
        return self._matrix_to_slice(values.reshape(values.shape[0], -1))


GGML_ARRAYS: dict[int, type[GGMLArray]] = {cls.ggml_type: cls for cls in (Q8_0Array, Q4_0Array,
                                                                         Q4_1Array)}
_GGML_NAMES = {"Q8_0": 8, "Q4_0": 2, "Q4_1": 3}


def _ggml_type_id(tensor_type: Any) -> int:
    if isinstance(tensor_type, str):
        key = tensor_type.upper()
        if key not in _GGML_NAMES:
            raise ValueError(f"GGUF tensor type {tensor_type!r} is not kept quantized; "
                             f"supported: {sorted(_GGML_NAMES)} (dequantize others with gguf).")
        return _GGML_NAMES[key]
    type_id = int(tensor_type)
    if type_id not in GGML_ARRAYS:
        label = getattr(tensor_type, "name", type_id)
        raise ValueError(f"GGUF tensor type {label} is not kept quantized; supported: "
                         f"{sorted(_GGML_NAMES)} (dequantize others with gguf).")
    return type_id


def from_gguf_blocks(data: Any, tensor_type: Any, shape: Any, *, transpose: bool = True,
                     dtype: Any = np.float32, name: str = "GGUF tensor") -> GGMLArray:
    """A GGUF tensor's raw block bytes as a :class:`Q8_0Array` / :class:`Q4_0Array` / :class:`Q4_1Array`.

    Args:
        data: the block bytes (any uint8 array or bytes; ``GGUFReader``'s ``tensor.data``).
        tensor_type: ``gguf.GGMLQuantizationType``, its integer id or a name ("Q4_1").
        shape: GGUF dimensions, fastest first (``tensor.shape``: ``(in, out)``).
        transpose: stand for the Flax kernel ``(in, out)`` (2-D tensors); False keeps
            numpy's ``reversed(shape)`` view (embedding tables).
        dtype: the dtype ``dequantize()`` returns by default.

    Example:
        >>> import numpy as np
        >>> from lora_jax.quantize import from_gguf_blocks, from_gguf_tensor
        >>> block = np.concatenate([np.float16(2.0).reshape(1).view(np.uint8),
        ...                         np.ones(32, np.int8).view(np.uint8)])
        >>> q = from_gguf_blocks(np.tile(block, 3), "Q8_0", (32, 3))   # (in, out) kernel
        >>> q.shape, q.to_gguf_bytes().shape
        ((32, 3), (3, 34))
    """
    cls = GGML_ARRAYS[_ggml_type_id(tensor_type)]
    dims = tuple(int(d) for d in np.asarray(shape).reshape(-1))
    if not dims or dims[0] % BLOCK_VALUES:
        raise ValueError(f"{name}: GGUF shape {dims} needs a first dimension divisible by "
                         f"{BLOCK_VALUES} for {cls.scheme.upper()} blocks.")
    rows, blocks = int(np.prod(dims[1:], dtype=np.int64)), dims[0] // BLOCK_VALUES
    if isinstance(data, (bytes, bytearray, memoryview)):
        raw = np.frombuffer(data, np.uint8)
    else:
        raw = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
    if raw.size != rows * blocks * cls.block_bytes:
        raise ValueError(f"{name}: {raw.size} bytes do not hold a {cls.scheme.upper()} tensor of "
                         f"GGUF shape {dims} ({rows} rows x {blocks} blocks x "
                         f"{cls.block_bytes} bytes = {rows * blocks * cls.block_bytes}).")
    if transpose and len(dims) != 2:
        raise ValueError(f"{name}: transpose=True needs a 2-D GGUF tensor (a linear weight), got "
                         f"shape {dims}; pass transpose=False.")
    block = raw.reshape(rows, blocks, cls.block_bytes)
    fields: dict[str, Any] = {}
    offset = 0
    for field in cls._byte_fields:
        if field == "codes":
            width = cls.block_bytes - offset
            codes = block[..., offset:]
            fields["codes"] = codes.view(np.int8) if cls is Q8_0Array else codes
        else:
            width = 2
            fields[field] = np.ascontiguousarray(block[..., offset : offset + 2]).view(
                np.float16).reshape(rows, blocks)
        offset += width
    slice_shape = dims if transpose else tuple(reversed(dims))
    return cls(**{k: jnp.asarray(np.ascontiguousarray(v)) for k, v in fields.items()},
               slice_shape=slice_shape, dtype=np.dtype(dtype), num_in=1 if transpose else 0)


def from_gguf_tensor(tensor: Any, *, transpose: bool = True, dtype: Any = np.float32,
                     rows: Any = None) -> GGMLArray:
    """A ``gguf.GGUFReader`` tensor (Q8_0 / Q4_0 / Q4_1) as a quantized array.

    ``rows`` reorders the output rows (the stored matrix's rows) exactly, e.g. to undo
    llama.cpp's rotary permutation of Q/K: ``rows=unpermute_rotary_rows(np.arange(out),
    num_heads)`` gives the array of ``unpermute_rotary_rows(weight, num_heads)``.

    Example:
        >>> import numpy as np, types
        >>> from lora_jax.quantize import from_gguf_tensor
        >>> block = np.concatenate([np.float16(1.0).reshape(1).view(np.uint8),
        ...                         np.arange(32, dtype=np.int8).view(np.uint8)])
        >>> tensor = types.SimpleNamespace(name="blk.0.attn_q.weight", tensor_type=8,
        ...                                shape=np.array([32, 2]), data=np.stack([block] * 2))
        >>> from_gguf_tensor(tensor, rows=[1, 0])
        Q8_0Array(shape=(32, 2), dtype=float32, nbytes=68)
    """
    array = from_gguf_blocks(tensor.data, tensor.tensor_type, tensor.shape, transpose=transpose,
                             dtype=dtype, name=getattr(tensor, "name", "GGUF tensor"))
    return array if rows is None else array.take_rows(rows)

