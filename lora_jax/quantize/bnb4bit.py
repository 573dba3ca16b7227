"""bitsandbytes' 4-bit formats (NF4, FP4), bit for bit, with optional double quantization.

The format (bitsandbytes 0.50.2, ``quantize_4bit`` / ``dequantize_4bit``):

* The weight, in PyTorch's ``(out, in)`` orientation, is flattened row-major and cut
  into blocks of ``blocksize`` values (32 ... 4096, default 64). Blocks run over the
  flattened array, so a block can span two rows when ``in % blocksize != 0``.
* **Tail block**: when the size is not a multiple of ``blocksize`` the last block is
  shorter; it gets its own absmax (floored at float32(1e-38)), and its values are
  divided by that absmax, where full blocks are multiplied by ``1 / absmax`` (the two
  roundings differ; both are reproduced).
* Each value is scaled into [-1, 1] and mapped to the nearest of 16 code values;
  a value exactly halfway between two codes takes the lower code (bitsandbytes'
  ``torch.bucketize`` against the midpoints). Two codes share a byte, the first in
  the high nibble; an odd count is padded with the code of 0.0.
* Double quantization (``compress_statistics=True``): the float32 absmax values are
  centred by their mean (``offset``) and quantized with bitsandbytes' 8-bit dynamic
  code in blocks of 256, as its CPU kernel does (a 65536-entry lookup table).
  Dequantization computes ``code8[q] * absmax2`` rounded to float32 and then adds the
  offset, in two roundings.

The offset is the float32 mean computed in the order PyTorch's single-threaded CPU
sum uses. bitsandbytes' own offset on CPU depends on torch's thread count once there
are 32768 blocks or more (2M weights at blocksize 64); ours is its 1-thread value.

Quantization runs once on the host in numpy (so codes are identical on every
backend); dequantization is jax.numpy and jit-able.
"""

from __future__ import annotations

import dataclasses
import functools
import math
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
BLOCKSIZES_4BIT = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256  # bitsandbytes quantizes the absmax values in blocks of 256
_ABSMAX_FLOOR = F32(1e-38)  # floor of a tail block's absmax (a float32 subnormal)

# NF4: the 16 quantiles of N(0, 1) normalised to [-1, 1] (QLoRA, Dettmers et al. 2023),
# as the float32 values bitsandbytes stores.
NF4_CODE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=F32)


def _fp4_code() -> np.ndarray:
    """bitsandbytes' FP4: sign bit 3, then 2 exponent bits and 1 mantissa bit.

    Magnitudes by the 3 low bits: 0b000 -> 0, 0b001 -> 1/16 (subnormal), and
    ``(1 + m/2) * 2**(4 - e)`` for exponent e = 1..3 (8, 12, 4, 6, 2, 3), divided by
    the largest (12). Code 8 ("minus zero") holds +0.0, as in bitsandbytes' table.
    """
    magnitudes = [0.0, 0.0625] + [(1 + m / 2) * 2.0 ** (4 - e) for e in (1, 2, 3) for m in (0, 1)]
    table = np.array(magnitudes + [-v if v else 0.0 for v in magnitudes], dtype=F32)
    return table / F32(12)


FP4_CODE = _fp4_code()


# -- PyTorch's float32 arithmetic that bitsandbytes' results depend on --------------------

def _fma_f32(a: np.ndarray, b: Any, c: Any) -> np.ndarray:
    """``a * b + c`` rounded once to float32 (exact in float64 for these operands)."""
    return (np.asarray(a, np.float64) * np.float64(b) + np.float64(c)).astype(F32)


def _torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps, dtype=float32)`` on CPU, bit for bit.

    PyTorch fills the first half as ``start + step * i`` and the second as
    ``end - step * (steps - 1 - i)``, each a fused multiply-add.
    """
    first, last = F32(start), F32(end)
    step = (last - first) / F32(steps - 1)
    index = np.arange(steps)
    head = _fma_f32(index, step, first)
    tail = _fma_f32(steps - 1 - index, -step, last)
    return np.where(index < steps // 2, head, tail)


def _dynamic_code() -> np.ndarray:
    """bitsandbytes' signed 8-bit dynamic code (``create_dynamic_map()``), 256 sorted values.

    For exponent i = 0..6 the code holds ``±10**(i - 6) * m`` for the midpoints m of
    ``2**i + 1`` linearly spaced points in [0.1, 1]; then 0 and 1.
    """
    values = [F32(0.0), F32(1.0)]
    for i in range(7):
        edges = _torch_linspace_f32(0.1, 1.0, 2 ** i + 1)
        midpoints = (edges[:-1] + edges[1:]) / F32(2)
        scale = F32(10.0 ** (i - 6))
        values += list(scale * midpoints) + list(-scale * midpoints)
    return np.sort(np.array(values, dtype=F32))


DYNAMIC_CODE = _dynamic_code()


def _ceil_log2(x: int) -> int:
    return 1 if x <= 2 else (x - 1).bit_length()


def _cascade_rows(rows: np.ndarray) -> np.ndarray:
    """PyTorch's ``multi_row_sum``: a 4-level cascade of sequential float32 sums over axis 0."""
    size = rows.shape[0]
    level_power = max(4, _ceil_log2(size) // 4)
    step, mask = 1 << level_power, (1 << level_power) - 1
    acc = np.zeros((4,) + rows.shape[1:], F32)
    i = 0
    while i + step <= size:
        acc[0] = np.cumsum(rows[i : i + step], axis=0, dtype=F32)[-1]
        i += step
        for level in range(1, 4):
            acc[level] += acc[level - 1]
            acc[level - 1] = 0
            if i & (mask << (level * level_power)):
                break
    if i < size:
        acc[0] = np.cumsum(rows[i:], axis=0, dtype=F32)[-1]
    for level in range(1, 4):
        acc[0] += acc[level]
    return acc[0]


def _row_sum(items: np.ndarray) -> np.ndarray:
    """PyTorch's ``row_sum``: 4 interleaved cascades, leftovers into the first, then combined."""
    size_ilp = items.shape[0] // 4
    if size_ilp:
        partial = _cascade_rows(items[: size_ilp * 4].reshape((size_ilp, 4) + items.shape[1:]))
    else:
        partial = np.zeros((4,) + items.shape[1:], F32)
    for i in range(size_ilp * 4, items.shape[0]):
        partial[0] += items[i]
    for k in range(1, 4):
        partial[0] += partial[k]
    return partial[0]


def _torch_serial_sum_f32(x: np.ndarray, lanes: int = 8) -> F32:
    """``torch.sum`` of a contiguous float32 vector on CPU in one thread (8-float vectors)."""
    if x.size < lanes:
        return F32(0) + _row_sum(x)
    num_vectors = x.size // lanes
    vector_sum = _row_sum(x[: num_vectors * lanes].reshape(num_vectors, lanes))
    total = F32(0)
    for value in x[num_vectors * lanes :]:
        total = F32(total + value)
    for value in vector_sum:
        total = F32(total + value)
    return F32(0) + total


def torch_cpu_mean_f32(x: np.ndarray, threads: int = 1) -> F32:
    """``torch.mean`` of a float32 vector on CPU, bit for bit, as with ``threads`` torch threads.

    PyTorch sums in one pass for fewer than 32768 values; above that each thread sums
    a contiguous chunk and the partial sums are summed again.

    Example:
        >>> import numpy as np
        >>> from lora_jax.quantize.bnb4bit import torch_cpu_mean_f32
        >>> float(torch_cpu_mean_f32(np.array([1.0, 2.0, 4.0], np.float32)))
        2.3333332538604736
    """
    x = np.ascontiguousarray(x, dtype=F32)
    n = x.size
    grain = 32768
    if n < grain or threads == 1:
        total = _torch_serial_sum_f32(x)
    else:
        tasks = min(threads, -(-n // grain))
        chunk = -(-n // tasks)
        partials = np.zeros(threads, F32)
        for t in range(tasks):
            partials[t] = F32(0) + _torch_serial_sum_f32(x[t * chunk : min(n, (t + 1) * chunk)])
        total = _torch_serial_sum_f32(partials)
    return F32(total / F32(n))


# -- quantization (host, numpy) ---------------------------------------------------------

def _blockwise_absmax_scaled(flat: np.ndarray, blocksize: int) -> tuple[np.ndarray, np.ndarray]:
    """``(absmax per block, values scaled into [-1, 1])`` the way bitsandbytes' 4-bit
    quantizer computes them (full blocks multiply by 1/absmax, the tail block divides)."""
    full = flat.size - flat.size % blocksize
    blocks = flat[:full].reshape(-1, blocksize)
    absmax = np.abs(blocks).max(axis=1) if full else np.zeros(0, F32)
    inverse = F32(1) / np.maximum(absmax, _ABSMAX_FLOOR)
    scaled = [np.clip(blocks * inverse[:, None], -1, 1).reshape(-1)]
    if full < flat.size:
        tail_absmax = np.maximum(np.abs(flat[full:]).max(), _ABSMAX_FLOOR)
        absmax = np.append(absmax, tail_absmax)
        scaled.append(np.clip(flat[full:] / tail_absmax, -1, 1))
    return absmax.astype(F32), np.concatenate(scaled)


def _nearest_code_4bit(scaled: np.ndarray, code: np.ndarray) -> np.ndarray:
    """Index of the nearest code value; exact midpoints go to the lower value."""
    order = np.argsort(code, kind="stable")
    ordered = code[order]
    midpoints = (ordered[:-1] + ordered[1:]) / F32(2)
    rank = np.zeros(scaled.shape, np.uint8)  # how many midpoints lie strictly below the value
    for midpoint in midpoints:
        rank += scaled > midpoint
    if np.array_equal(order, np.arange(order.size)):
        return rank
    return order.astype(np.uint8)[rank]


def pack_nibbles_high_first(codes: np.ndarray) -> np.ndarray:
    """Two 4-bit codes per byte, the first in the high nibble (``len`` must be even)."""
    return ((codes[0::2] << 4) | codes[1::2]).astype(np.uint8)


def quantize_4bit_flat(flat: np.ndarray, code: np.ndarray,
                       blocksize: int) -> tuple[np.ndarray, np.ndarray]:
    """``(packed codes, absmax)`` of a flat float32 vector: ``bnb.functional.quantize_4bit``."""
    absmax, scaled = _blockwise_absmax_scaled(flat, blocksize)
    if scaled.size % 2:
        scaled = np.append(scaled, F32(0))
    return pack_nibbles_high_first(_nearest_code_4bit(scaled, code)), absmax


@functools.lru_cache(maxsize=4)
def _lookup_table_8bit(code_bytes: bytes) -> np.ndarray:
    """bitsandbytes' CPU quantizer's table: 65536 points of [-1, 1] -> nearest code index.

    Point i is ``-1 + 2i/65535``; its entry is the first code whose upper midpoint is
    not below it.
    """
    code = np.frombuffer(code_bytes, F32)
    midpoints = F32(0.5) * (code[:-1] + code[1:])
    points = F32(-1.0) + (F32(2.0) * np.arange(65536, dtype=F32)) / F32(65535)
    return np.searchsorted(midpoints, points, side="left").astype(np.uint8)


def quantize_blockwise_8bit(x: np.ndarray, code: np.ndarray,
                            blocksize: int) -> tuple[np.ndarray, np.ndarray]:
    """``(codes, absmax)``: bitsandbytes' CPU ``quantize_blockwise`` of a float32 vector.

    Each value times ``1/absmax`` indexes the table at ``trunc((v + 1) * 0.5 * 65535 + 0.5)``
    (whether the compiler fuses the last multiply-add does not matter: both give the same
    index for every float32 in [-1, 1], checked exhaustively); an all-zero block gets
    absmax 0 and codes 0.
    """
    table = _lookup_table_8bit(np.ascontiguousarray(code, F32).tobytes())
    num_blocks = -(-x.size // blocksize)
    blocks = np.zeros(num_blocks * blocksize, F32)
    blocks[: x.size] = x
    blocks = blocks.reshape(num_blocks, blocksize)
    absmax = np.abs(blocks).max(axis=1)
    inverse = F32(1) / np.where(absmax == 0, F32(1), absmax)
    normalised = np.clip(blocks * inverse[:, None], -1, 1)
    point = (normalised + F32(1)) * F32(0.5) * F32(65535) + F32(0.5)
    codes = np.where(absmax[:, None] == 0, np.uint8(0), table[point.astype(np.uint16)])
    return codes.reshape(-1)[: x.size].astype(np.uint8), absmax.astype(F32)


# -- dequantization (jax.numpy) ---------------------------------------------------------

def _round_to_f32(x: jax.Array) -> jax.Array:
    """``x`` materialised, so XLA cannot fuse the product that made it into a following add.

    XLA contracts ``a * b + c`` into one fused multiply-add (one rounding), while
    bitsandbytes rounds ``a * b`` to float32 first; an identity scatter is an op
    XLA does not fuse into its consumers, so the product is rounded on its own.
    """
    index = jnp.arange(x.shape[0])
    return jnp.zeros_like(x).at[index].set(x, unique_indices=True, indices_are_sorted=True)


def _blockwise_scale(values: jax.Array, absmax: jax.Array, blocksize: int) -> jax.Array:
    """``values[i] * absmax[i // blocksize]`` for a flat vector (the tail block included)."""
    n = values.shape[0]
    padded = jnp.pad(values, (0, absmax.shape[0] * blocksize - n))
    return (padded.reshape(-1, blocksize) * absmax[:, None]).reshape(-1)[:n]


def unpack_nibbles_high_first(packed: jax.Array, n: int) -> jax.Array:
    """The ``n`` 4-bit codes of :func:`pack_nibbles_high_first` as int32."""
    packed = packed.astype(jnp.int32)
    return jnp.stack([packed >> 4, packed & 0xF], axis=-1).reshape(-1)[:n]


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Bnb4bitArray(QuantizedArray):
    """Fields and code of :class:`NF4Array` and :class:`FP4Array` (which set the code book)."""

    code: ClassVar[np.ndarray]
    _slice_ndim: ClassVar[int] = 1
    codes: Any = child(default=None)
    absmax: Any = child(default=None)
    absmax_codes: Any = child(default=None)
    absmax_scale: Any = child(default=None)
    absmax_offset: Any = child(default=None)
    slice_shape: tuple[int, ...] = ()
    dtype: Any = np.dtype(np.float32)
    num_in: int = 1
    blocksize: int = 64

    @property
    def double_quant(self) -> bool:
        return self.absmax is None

    def absmax_values(self) -> jax.Array:
        """The float32 absmax of every block (reconstructed when double quantized)."""
        fn = self._absmax_slice
        for _ in self.lead_shape:
            fn = jax.vmap(fn)
        return fn(self.absmax, self.absmax_codes, self.absmax_scale, self.absmax_offset)

    @staticmethod
    def _absmax_slice(absmax: Any, absmax_codes: Any, absmax_scale: Any,
                      absmax_offset: Any) -> jax.Array:
        if absmax is not None:
            return absmax
        values = jnp.asarray(DYNAMIC_CODE)[absmax_codes.astype(jnp.int32)]
        centred = _round_to_f32(_blockwise_scale(values, absmax_scale, NESTED_BLOCKSIZE))
        return centred + absmax_offset

    def _dequantize_slice(self, codes: Any, absmax: Any, absmax_codes: Any,
                          absmax_scale: Any, absmax_offset: Any) -> jax.Array:
        n = math.prod(self.slice_shape)
        scale = self._absmax_slice(absmax, absmax_codes, absmax_scale, absmax_offset)
        values = jnp.asarray(self.code)[unpack_nibbles_high_first(codes, n)]
        flat = _blockwise_scale(values, scale, self.blocksize)
        rows, cols = matrix_dims(self.slice_shape, self.num_in)
        return self._matrix_to_slice(flat.reshape(rows, cols))

    def _static_repr(self) -> str:
        return f"blocksize={self.blocksize}, double_quant={self.double_quant}"


@register
@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class NF4Array(Bnb4bitArray):
    """An NF4 array (bitsandbytes ``quant_type="nf4"``); see the module docstring for the format.

    Children (one layer; stacked layers add leading axes): ``codes`` uint8
    ``(ceil(n/2),)``; ``absmax`` float32 ``(ceil(n/blocksize),)``, or with double
    quantization ``absmax=None`` and ``absmax_codes`` uint8 (one per block),
    ``absmax_scale`` float32 (one per 256 blocks), ``absmax_offset`` float32 ``()``.

    Example:
        >>> import jax.numpy as jnp
        >>> from lora_jax.quantize import quantize_array
        >>> kernel = jnp.linspace(-1.0, 1.0, 128 * 3).reshape(128, 3)
        >>> q = quantize_array(kernel, "nf4", blocksize=64)
        >>> q
        NF4Array(shape=(128, 3), dtype=float32, blocksize=64, double_quant=False, nbytes=216)
        >>> float(abs(q.dequantize() - kernel).max()) < 0.16  # half the widest code gap (0.30)
        True
    """

    code: ClassVar[np.ndarray] = NF4_CODE
    scheme: ClassVar[str] = "nf4"


@register
@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class FP4Array(Bnb4bitArray):
    """An FP4 array (bitsandbytes ``quant_type="fp4"``): same layout as :class:`NF4Array`.

    Example:
        >>> import jax.numpy as jnp
        >>> from lora_jax.quantize import quantize_array
        >>> q = quantize_array(jnp.ones((64, 2)), "fp4", double_quant=True)
        >>> q.double_quant, q.dequantize().tolist()[0]
        (True, [1.0, 1.0])
    """

    code: ClassVar[np.ndarray] = FP4_CODE
    scheme: ClassVar[str] = "fp4"


def is_power_of_two(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) \
        and value > 0 and value & (value - 1) == 0


def check_blocksize_4bit(blocksize: Any) -> None:
    """Raise ``ValueError`` unless ``blocksize`` is one bitsandbytes' 4-bit quantizer allows."""
    if is_power_of_two(blocksize) and blocksize in BLOCKSIZES_4BIT:
        return
    kind = "outside bitsandbytes' range" if is_power_of_two(blocksize) else "not a power of two"
    raise ValueError(f"blocksize {blocksize!r} is {kind}; nf4/fp4 need one of "
                     f"{BLOCKSIZES_4BIT} (bitsandbytes' allowed block sizes).")


def quantize_4bit(x: Any, quant_type: str = "nf4", *, blocksize: int = 64,
                  double_quant: bool = False, num_in: int = 1, num_lead: int = 0,
                  name: str = "array") -> Bnb4bitArray:
    """``x`` as an :class:`NF4Array` / :class:`FP4Array`, bit-identical to bitsandbytes.

    ``num_in`` input axes (after ``num_lead`` layer axes) say how the array maps to a
    PyTorch weight: the codes equal ``quantize_4bit(torch_weight)``'s, where
    ``torch_weight`` is the ``(out, in)`` transpose of the Flax kernel (``num_in=0``:
    the array itself).

    Example:
        >>> import numpy as np
        >>> from lora_jax.quantize.bnb4bit import quantize_4bit
        >>> q = quantize_4bit(np.ones((64, 4), np.float32), "nf4")
        >>> q.codes.shape, q.absmax.tolist()
        ((128,), [1.0, 1.0, 1.0, 1.0])
    """
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}.")
    check_blocksize_4bit(blocksize)
    array = host_float32(x, name)
    dtype = np.dtype(getattr(x, "dtype", array.dtype))
    check_num_in(array.shape[num_lead:], num_in)
    cls = NF4Array if quant_type == "nf4" else FP4Array

    def one_layer(layer: np.ndarray) -> Bnb4bitArray:
        flat = array_to_matrix(layer, num_in).reshape(-1)
        packed, absmax = quantize_4bit_flat(flat, cls.code, blocksize)
        nested: dict[str, Any] = {"absmax": jnp.asarray(absmax)}
        if double_quant:
            offset = torch_cpu_mean_f32(absmax)
            codes8, scale8 = quantize_blockwise_8bit(absmax - offset, DYNAMIC_CODE,
                                                     NESTED_BLOCKSIZE)
            nested = {"absmax": None, "absmax_codes": jnp.asarray(codes8),
                      "absmax_scale": jnp.asarray(scale8),
                      "absmax_offset": jnp.asarray(F32(offset))}
        return cls(codes=jnp.asarray(packed), **nested, slice_shape=tuple(layer.shape),
                   dtype=dtype, num_in=num_in, blocksize=blocksize)

    return per_slice(one_layer, array, num_lead)
