"""Quantized frozen kernels (QLoRA): NF4/FP4 and int8 as bitsandbytes stores them, int4, GGUF blocks.

    quantized = lora_jax.quantize.quantize(params, "nf4", double_quant=True)
    kernel = quantized["dense"]["kernel"].dequantize()     # jit-able, exact
    lora_jax.quantize.quantized_bytes(quantized)           # bytes before / after

Every quantized leaf is a :class:`QuantizedArray`: a registered pytree whose children
are the packed codes and scales and whose one-layer shape and original dtype are
static. Quantization runs once on the host (numpy); ``dequantize`` is jax.numpy.

Schemes and their references (the tests compare bit for bit):

* ``nf4`` / ``fp4`` (:class:`NF4Array`, :class:`FP4Array`): bitsandbytes 0.50.2's
  ``quantize_4bit`` / ``dequantize_4bit``, with or without double quantization.
* ``int8`` (:class:`Int8Array`): bitsandbytes' ``int8_vectorwise_quant``.
* ``int4`` (:class:`Int4Array`): grouped symmetric int4 (float64 reference).
* GGUF ``Q8_0`` / ``Q4_0`` / ``Q4_1`` (:func:`from_gguf_tensor`): ``gguf.quants.dequantize``.
"""

from lora_jax.quantize.base import QuantizedArray, is_quantized, stack
from lora_jax.quantize.bnb4bit import FP4Array, NF4Array
from lora_jax.quantize.ggml import (
    Q4_0Array,
    Q4_1Array,
    Q8_0Array,
    from_gguf_blocks,
    from_gguf_tensor,
)
from lora_jax.quantize.integer import Int4Array, Int8Array
from lora_jax.quantize.params import (
    SCHEMES,
    QuantConfig,
    dequantize,
    describe_quantization,
    quantize,
    quantize_array,
    quantized_bytes,
    select_kernels,
)

__all__ = [
    "FP4Array",
    "Int4Array",
    "Int8Array",
    "NF4Array",
    "Q4_0Array",
    "Q4_1Array",
    "Q8_0Array",
    "QuantConfig",
    "QuantizedArray",
    "SCHEMES",
    "dequantize",
    "describe_quantization",
    "from_gguf_blocks",
    "from_gguf_tensor",
    "is_quantized",
    "quantize",
    "quantize_array",
    "quantized_bytes",
    "select_kernels",
    "stack",
]
