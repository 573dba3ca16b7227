"""Array-level pieces shared by the model families: norms, activations, RoPE, masks,
attention, the KV cache and the LM head. The linen blocks built from them
(self-attention, MLPs, the layer stack) are in :mod:`lora_jax.models.blocks`.

Everything here is plain JAX on arrays (plus one tiny linen module, `RMSNorm`), so
the jaxpr a model traces to contains only ordinary primitives: `dot_general` for
every projection, `gather` for embedding lookups, `dynamic_update_slice` for the KV
cache. That keeps the models friendly to jaxpr-level transforms such as LoRA.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .errors import UnsupportedModelError

Dtype = Any

# A large negative number rather than -inf: a fully masked row (a padding query)
# then softmaxes to a uniform distribution instead of NaN (the soft-capped path).
_MASK_VALUE = float(np.finfo(np.float32).min)


class RMSNorm(nn.Module):
    """Root-mean-square norm as in Llama: ``x / rms(x) * scale``, statistics in float32.

    The param is ``scale`` of shape (dim,) (Hugging Face calls it ``weight``). With
    ``unit_offset`` it is Gemma's norm, ``x / rms(x) * (1 + scale)`` all in float32 and
    cast at the end (then ``scale`` starts at zero).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from lora_jax.models.layers import RMSNorm
        >>> y, params = RMSNorm(eps=0.0).init_with_output(jax.random.key(0),
        ...                                                jnp.full((2, 8), 2.0))
        >>> y[0, :3], params["params"]["scale"].shape
        (Array([1., 1., 1.], dtype=float32), (8,))
        >>> gemma = RMSNorm(eps=0.0, unit_offset=True)
        >>> gemma.apply({"params": {"scale": jnp.full(8, 0.5)}}, jnp.full((2, 8), 2.0))[0, :3]
        Array([1.5, 1.5, 1.5], dtype=float32)
    """

    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    unit_offset: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.zeros if self.unit_offset else nn.initializers.ones
        scale = self.param("scale", init, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.unit_offset:
            # Gemma scales in float32 and casts last (transformers PR 29402).
            return (normed * (1.0 + scale.astype(jnp.float32))).astype(self.dtype)
        # Hugging Face's Llama normalises in float32, casts back to the input dtype, then scales.
        return normed.astype(self.dtype) * scale.astype(self.dtype)


def _gelu_tanh(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=True)


def _gelu_exact(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=False)


def _quick_gelu(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(1.702 * x)


# Names as in transformers' ACT2FN (`hidden_act` / `activation_function` in config.json).
_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": _gelu_exact,
    "gelu_new": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "quick_gelu": _quick_gelu,
    "relu": jax.nn.relu,
    "tanh": jnp.tanh,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The activation function a Hugging Face config names.

    Example:
        >>> import jax.numpy as jnp
        >>> from lora_jax.models.layers import activation
        >>> activation("silu")(jnp.zeros(2))
        Array([0., 0.], dtype=float32)
    """
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise UnsupportedModelError(
            f"unsupported activation {name!r}; supported: {sorted(_ACTIVATIONS)}"
        ) from None


# ----------------------------------------------------------------------------- RoPE

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def rope_inverse_frequencies(head_dim: int, rope: dict[str, Any]) -> np.ndarray:
    """Inverse frequencies (head_dim // 2,) for rotary embeddings, float32.

    ``rope`` holds ``rope_theta``, ``rope_type`` and the scaling fields of that type, as in
    transformers' ``config.rope_parameters``. Supported types: "default", "linear" (divide
    by ``factor``) and "llama3" (Llama 3.1's wavelength-dependent smoothing). With a
    ``partial_rotary_factor`` below 1 only the first ``int(head_dim * factor)`` dims of
    each head rotate (Phi-3 style): there are half as many frequencies as those.

    Example:
        >>> from lora_jax.models.layers import rope_inverse_frequencies
        >>> rope_inverse_frequencies(4, {"rope_theta": 10000.0, "rope_type": "default"})
        array([1.  , 0.01], dtype=float32)
        >>> rope_inverse_frequencies(8, {"rope_theta": 100.0, "partial_rotary_factor": 0.5})
        array([1. , 0.1], dtype=float32)
    """
    rope_type = rope.get("rope_type", "default")
    theta = float(rope.get("rope_theta", 10000.0))
    head_dim = int(head_dim * float(rope.get("partial_rotary_factor", 1.0)))
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim
    inv_freq = (1.0 / (theta**exponents)).astype(np.float32)
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return (inv_freq / float(rope["factor"])).astype(np.float32)
    if rope_type == "llama3":
        factor = float(rope["factor"])
        low_freq_factor = float(rope["low_freq_factor"])
        high_freq_factor = float(rope["high_freq_factor"])
        old_context = float(rope["original_max_position_embeddings"])
        low_freq_wavelen = old_context / low_freq_factor
        high_freq_wavelen = old_context / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths are stretched by `factor`, short ones kept, the band between
        # interpolated smoothly (Llama 3.1 paper, section on long context).
        scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        return np.where(is_medium, smoothed, scaled).astype(np.float32)
    raise UnsupportedModelError(
        f"unsupported rope_type {rope_type!r}; supported: {list(SUPPORTED_ROPE_TYPES)}"
    )


def rope_angles(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """``(cos, sin)`` of the rotary angles, each (batch, seq, 1, head_dim), float32.

    Computed once per forward pass and shared by every layer's ``apply_rope``.

    Example:
        >>> import jax.numpy as jnp, numpy as np
        >>> from lora_jax.models.layers import rope_angles
        >>> cos, sin = rope_angles(jnp.array([[0, 1]]), np.array([1.0, 0.5], np.float32))
        >>> cos.shape, sin[0, 1, 0]
        ((1, 2, 1, 4), Array([0.84147096, 0.47942555, 0.84147096, 0.47942555], dtype=float32))
    """
    freqs = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)
    angles = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate ``x`` (batch, seq, heads, head_dim) by the angles from ``rope_angles``.

    Uses Hugging Face's "rotate half" layout: the first and second halves of each head
    form the (real, imaginary) pairs. Angles narrower than the head (partial rotary
    embeddings) rotate its first ``cos.shape[-1]`` dims and pass the rest through.

    Example:
        >>> import jax.numpy as jnp, numpy as np
        >>> from lora_jax.models.layers import apply_rope, rope_angles
        >>> x = jnp.array([[[[1.0, 0.0]]]])  # one head of width 2: the pair (1, 0)
        >>> cos, sin = rope_angles(jnp.array([[1]]), np.array([np.pi / 2], np.float32))
        >>> jnp.round(apply_rope(x, cos, sin), 6)  # rotated by 90 degrees
        Array([[[[-0.,  1.]]]], dtype=float32)
    """
    rotary_dim = cos.shape[-1]
    if rotary_dim < x.shape[-1]:
        rotary, passed = x[..., :rotary_dim], x[..., rotary_dim:]
        return jnp.concatenate([apply_rope(rotary, cos, sin), passed], axis=-1)
    x32 = x.astype(jnp.float32)
    first, second = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-second, first], axis=-1)
    return (x32 * cos + rotated * sin).astype(x.dtype)


# ------------------------------------------------------------------------ attention


def soft_cap(x: jax.Array, cap: float | None) -> jax.Array:
    """``cap * tanh(x / cap)``: squashes ``x`` smoothly into (-cap, cap); None leaves it.

    Gemma 2 caps attention scores and final logits this way.

    Example:
        >>> import jax.numpy as jnp
        >>> from lora_jax.models.layers import soft_cap
        >>> soft_cap(jnp.array([0.0, 1e6]), 30.0), soft_cap(jnp.array([100.0]), None)
        (Array([ 0., 30.], dtype=float32), Array([100.], dtype=float32))
    """
    if cap is None:
        return x
    return jnp.tanh(x / cap) * cap


def make_attention_mask(
    query_slots: jax.Array,
    key_slots: jax.Array,
    padding_mask: jax.Array | None,
    *,
    causal: bool = True,
    sliding_window: int | None = None,
) -> jax.Array:
    """Boolean mask (batch or 1, 1, q, k): True where a query may attend to a key.

    Slots are positions in the (cached) sequence buffer, not RoPE positions: with left
    padding they differ, and causality is about buffer order.

    Example:
        >>> import jax.numpy as jnp
        >>> from lora_jax.models.layers import make_attention_mask
        >>> slots = jnp.arange(3)
        >>> make_attention_mask(slots, slots, jnp.array([[0, 1, 1]]))[0, 0].astype(int)
        Array([[0, 0, 0],
               [0, 1, 0],
               [0, 1, 1]], dtype=int32)

    Args:
        query_slots: (q,) buffer index of each query.
        key_slots: (k,) buffer index of each key.
        padding_mask: (batch, k) with 1 for real tokens, 0 for padding; or None.
        causal: forbid attending to later slots.
        sliding_window: if set, a query sees only the last ``sliding_window`` slots
            (itself included), as transformers' Mistral / Qwen2.
    """
    mask = jnp.ones((query_slots.shape[0], key_slots.shape[0]), dtype=bool)
    if causal:
        mask = mask & (key_slots[None, :] <= query_slots[:, None])
    if sliding_window is not None:
        mask = mask & (key_slots[None, :] > query_slots[:, None] - sliding_window)
    mask = mask[None, None]
    if padding_mask is not None:
        mask = mask & (padding_mask[:, None, None, :] != 0)
    return mask


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionMask:
    """Which keys each query may see, in the structured form ``jax.nn.dot_product_attention``
    takes: a causal flag and a sliding window (static), plus the keys' padding.

    For the forward pass without a KV cache, where query ``i`` and key ``i`` are the same
    slot; a cached call uses an explicit boolean mask from :func:`make_attention_mask`.
    Attention built from flags lets cuDNN skip the masked blocks instead of reading a
    mask. Use :func:`causal_mask` to build one.

    Example:
        >>> import jax.numpy as jnp
        >>> from lora_jax.models.layers import AttentionMask
        >>> mask = AttentionMask(jnp.array([[0, 1, 1]]), causal=True, sliding_window=2)
        >>> mask.dense(3)[0, 0].astype(int)        # the same mask as an explicit array
        Array([[0, 0, 0],
               [0, 1, 0],
               [0, 1, 1]], dtype=int32)

    Attributes:
        padding: (batch, keys), 1 for real tokens and 0 for padding; or None.
        causal: a query sees no later slot.
        sliding_window: a query sees only the last ``sliding_window`` slots (itself
            included), or None for no window.
    """

    padding: jax.Array | None
    causal: bool = dataclasses.field(default=True, metadata={"static": True})
    sliding_window: int | None = dataclasses.field(default=None, metadata={"static": True})

    def dense(self, length: int) -> jax.Array:
        """The explicit boolean mask (batch or 1, 1, length, length) of :func:`make_attention_mask`."""
        slots = jnp.arange(length, dtype=jnp.int32)
        return make_attention_mask(slots, slots, self.padding, causal=self.causal,
                                   sliding_window=self.sliding_window)


def causal_mask(padding_mask: jax.Array | None, *, sliding_window: int | None = None,
                causal: bool = True) -> AttentionMask:
    """The :class:`AttentionMask` of a forward pass without a KV cache.

    Example:
        >>> import jax.numpy as jnp
        >>> from lora_jax.models.layers import causal_mask
        >>> causal_mask(jnp.ones((2, 5)), sliding_window=4).sliding_window
        4
    """
    return AttentionMask(padding_mask, causal=causal, sliding_window=sliding_window)


def dot_product_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    mask: jax.Array | AttentionMask | None,
    *,
    scale: float,
    softcap: float | None = None,
) -> jax.Array:
    """Softmax attention with grouped-query heads through ``jax.nn.dot_product_attention``.

    Scores and softmax are float32. Keys and values keep their own (fewer) heads: each
    KV head serves ``heads // kv_heads`` query heads without being repeated. On a GPU with
    bfloat16 / float16 inputs this is cuDNN's fused flash attention, elsewhere XLA's.

    Example:
        >>> import jax.numpy as jnp
        >>> from lora_jax.models.layers import dot_product_attention
        >>> query = jnp.ones((1, 2, 4, 8))           # 4 query heads
        >>> key = value = jnp.ones((1, 2, 2, 8))     # served by 2 KV heads
        >>> dot_product_attention(query, key, value, None, scale=8**-0.5).shape
        (1, 2, 32)

    Args:
        query: (batch, q, heads, head_dim).
        key, value: (batch, k, kv_heads, head_dim); ``heads`` must be a multiple of
            ``kv_heads``.
        mask: an :class:`AttentionMask` (no KV cache), or a boolean array broadcastable
            to (batch, 1, q, k) with True = attend, or None (every key).
        scale: multiplier of the scores, usually ``head_dim ** -0.5``.
        softcap: if set, scaled scores pass through :func:`soft_cap` before the mask
            (Gemma 2's ``attn_logit_softcapping``).

    Returns:
        (batch, q, heads * head_dim) in the dtype of ``value`` (of the promoted dtype if
        query, key and value differ, e.g. a bfloat16 KV cache with float32 compute).
    """
    batch, q_len, heads, head_dim = query.shape
    dtype = jnp.result_type(query, key, value)
    query, key, value = (t.astype(dtype) for t in (query, key, value))
    if softcap is not None:  # jax.nn.dot_product_attention has no soft-capping
        dense = mask.dense(key.shape[1]) if isinstance(mask, AttentionMask) else mask
        out = _softcapped_attention(query, key, value, dense, scale, softcap)
        return out.reshape(batch, q_len, heads * head_dim)
    options: dict[str, Any] = {"scale": scale}
    if isinstance(mask, AttentionMask):
        if mask.padding is not None:
            options["mask"] = (mask.padding != 0)[:, None, None, :]
        options["is_causal"] = mask.causal
        if mask.sliding_window is not None:
            # (left, right) window: the last `sliding_window` slots, and every later one
            # unless causal forbids them anyway.
            right = 0 if mask.causal else key.shape[1]
            options["local_window_size"] = (mask.sliding_window - 1, right)
    elif mask is not None:
        options["mask"] = mask
    out = _fused_attention(query, key, value, options)
    return out.reshape(batch, q_len, heads * head_dim)


def _softcapped_attention(query: jax.Array, key: jax.Array, value: jax.Array, mask: jax.Array | None,
                          scale: float, softcap: float) -> jax.Array:
    """Grouped-query attention with soft-capped scores (float32), KV heads not repeated:
    (batch, q, kv_heads, group, head_dim)."""
    batch, q_len, heads, head_dim = query.shape
    kv_heads = key.shape[2]
    grouped = query.reshape(batch, q_len, kv_heads, heads // kv_heads, head_dim)
    scores = jnp.einsum("bqkgd,btkd->bkgqt", grouped, key).astype(jnp.float32) * scale
    scores = soft_cap(scores, softcap)
    if mask is not None:
        scores = jnp.where(mask[:, :, None], scores, _MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(value.dtype)
    return jnp.einsum("bkgqt,btkd->bqkgd", probs, value)


# cuDNN's fused attention takes half-precision inputs with these head widths.
_CUDNN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def attention_implementation(query: jax.Array) -> str | None:
    """The ``implementation`` of ``jax.nn.dot_product_attention`` for these queries.

    ``"cudnn"`` (fused flash attention) on a GPU backend for bfloat16 / float16 heads of a
    width cuDNN supports, else None (XLA's implementation; ``None`` in jax 0.10 never
    picks cuDNN by itself).

    Example:
        >>> import jax.numpy as jnp
        >>> from lora_jax.models.layers import attention_implementation
        >>> attention_implementation(jnp.ones((1, 2, 4, 8), jnp.float32)) is None   # never for float32
        True
    """
    head_dim = query.shape[-1]
    if jnp.dtype(query.dtype) not in _CUDNN_DTYPES or head_dim % 8 or head_dim > 128:
        return None
    return "cudnn" if jax.default_backend() == "gpu" else None


def _fused_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                     options: dict[str, Any]) -> jax.Array:
    implementation = attention_implementation(query)
    if implementation == "cudnn":
        try:
            return jax.nn.dot_product_attention(query, key, value, implementation="cudnn", **options)
        except (ValueError, NotImplementedError, RuntimeError):
            pass  # a shape, mask or device cuDNN refuses at trace time: XLA's is exact too
    return jax.nn.dot_product_attention(query, key, value, **options)


def update_kv_cache(
    layer_cache: dict[str, jax.Array], key: jax.Array, value: jax.Array, index: jax.Array
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """Write ``key``/``value`` (batch, s, kv_heads, head_dim) at slot ``index`` of the cache.

    Returns the full cached keys and values (batch, max_length, kv_heads, head_dim) and
    the updated layer cache.

    Example:
        >>> import jax.numpy as jnp
        >>> from lora_jax.models.layers import update_kv_cache
        >>> cache = {"k": jnp.zeros((1, 4, 1, 2)), "v": jnp.zeros((1, 4, 1, 2))}
        >>> k, v, cache = update_kv_cache(cache, jnp.ones((1, 2, 1, 2)),
        ...                               jnp.ones((1, 2, 1, 2)), jnp.int32(1))
        >>> k[0, :, 0, 0]
        Array([0., 1., 1., 0.], dtype=float32)
    """
    start = (0, index, 0, 0)
    k = jax.lax.dynamic_update_slice(layer_cache["k"], key.astype(layer_cache["k"].dtype), start)
    v = jax.lax.dynamic_update_slice(layer_cache["v"], value.astype(layer_cache["v"].dtype), start)
    return k, v, {"k": k, "v": v}


def attend(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    mask: jax.Array | None,
    *,
    scale: float,
    rope: tuple[jax.Array, jax.Array] | None = None,
    layer_cache: dict[str, jax.Array] | None = None,
    index: jax.Array | None = None,
    softcap: float | None = None,
) -> tuple[jax.Array, dict[str, jax.Array] | None]:
    """Attention from projected heads: RoPE (if given), the KV-cache write (if a cache is
    given), then :func:`dot_product_attention`; returns ``(output, layer_cache)``.

    Example:
        >>> import jax.numpy as jnp
        >>> from lora_jax.models.layers import attend
        >>> q = k = v = jnp.ones((1, 3, 2, 4))
        >>> out, cache = attend(q, k, v, None, scale=0.5)
        >>> out.shape, cache
        ((1, 3, 8), None)

    Args:
        query: (batch, q, heads, head_dim).
        key, value: (batch, q, kv_heads, head_dim), this call's tokens.
        mask: boolean, broadcastable to (batch, 1, q, keys).
        scale: multiplier of the scores.
        rope: ``(cos, sin)`` from :func:`rope_angles`, applied to queries and keys.
        layer_cache: ``{"k", "v"}`` of the layer; then the keys are every cache slot.
        index: cache slot of this call's first token.
        softcap: soft cap of the scaled scores (see :func:`dot_product_attention`).
    """
    if rope is not None:
        query = apply_rope(query, *rope)
        key = apply_rope(key, *rope)
    if layer_cache is not None:
        key, value, layer_cache = update_kv_cache(layer_cache, key, value, index)
    out = dot_product_attention(query, key, value, mask, scale=scale, softcap=softcap)
    return out, layer_cache


def empty_kv_cache(
    num_layers: int,
    batch_size: int,
    max_length: int,
    kv_heads: int,
    head_dim: int,
    dtype: Dtype,
    *,
    stacked: bool,
) -> dict[str, Any]:
    """A zeroed KV cache: ``{"index": int32 scalar, "layers": ...}``.

    ``layers`` is a tuple of ``{"k", "v"}`` per layer (unrolled models) or one
    ``{"k", "v"}`` with a leading layer axis (scanned models). ``index`` is the next
    free slot, shared by the whole batch (rows are left-aligned by padding).

    Example:
        >>> import jax.numpy as jnp
        >>> from lora_jax.models.layers import empty_kv_cache
        >>> cache = empty_kv_cache(3, 2, 16, 4, 8, jnp.bfloat16, stacked=True)
        >>> cache["layers"]["k"].shape, cache["layers"]["k"].dtype
        ((3, 2, 16, 4, 8), dtype(bfloat16))
    """
    shape = (batch_size, max_length, kv_heads, head_dim)
    if stacked:
        layers: Any = {
            "k": jnp.zeros((num_layers, *shape), dtype),
            "v": jnp.zeros((num_layers, *shape), dtype),
        }
    else:
        layers = tuple(
            {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(num_layers)
        )
    return {"index": jnp.zeros((), jnp.int32), "layers": layers}


def slots_and_positions(
    input_ids: jax.Array, positions: jax.Array | None, cache: dict[str, Any] | None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Query slots (s,), key slots (k,) and positions (batch, s) for a forward pass.

    Without a cache the keys are this call's tokens; with one they are every slot of the
    fixed-size buffer, and this call's tokens occupy ``index .. index + s - 1``.

    Example:
        >>> import jax.numpy as jnp
        >>> from lora_jax.models.layers import empty_kv_cache, slots_and_positions
        >>> cache = dict(empty_kv_cache(1, 1, 6, 1, 2, jnp.float32, stacked=False),
        ...              index=jnp.int32(2))
        >>> query_slots, key_slots, positions = slots_and_positions(
        ...     jnp.zeros((1, 3), jnp.int32), None, cache)
        >>> query_slots, key_slots.shape, positions
        (Array([2, 3, 4], dtype=int32), (6,), Array([[2, 3, 4]], dtype=int32))
    """
    batch, seq = input_ids.shape
    start = jnp.zeros((), jnp.int32) if cache is None else cache["index"]
    query_slots = start + jnp.arange(seq, dtype=jnp.int32)
    if cache is None:
        key_slots = query_slots
    else:
        key_slots = jnp.arange(_cache_length(cache), dtype=jnp.int32)
    if positions is None:
        positions = jnp.broadcast_to(query_slots[None, :], (batch, seq))
    return query_slots, key_slots, positions


def _cache_length(cache: dict[str, Any]) -> int:
    return jax.tree.leaves(cache["layers"])[0].shape[-3]


def split_cache(cache: dict[str, Any] | None) -> tuple[jax.Array | None, Any]:
    """``(index, layers)`` of a KV cache, or ``(None, None)`` without one.

    Example:
        >>> from lora_jax.models.layers import empty_kv_cache, split_cache
        >>> index, layers = split_cache(empty_kv_cache(2, 1, 8, 1, 4, "float32", stacked=False))
        >>> int(index), len(layers)
        (0, 2)
    """
    if cache is None:
        return None, None
    return cache["index"], cache["layers"]


def next_cache(cache: dict[str, Any] | None, layers: Any, num_tokens: int) -> dict[str, Any] | None:
    """The cache after a call that wrote ``num_tokens`` tokens into ``layers`` (None stays None).

    Example:
        >>> from lora_jax.models.layers import empty_kv_cache, next_cache
        >>> cache = empty_kv_cache(1, 1, 8, 1, 4, "float32", stacked=True)
        >>> int(next_cache(cache, cache["layers"], 3)["index"])
        3
    """
    if cache is None:
        return None
    return {"index": cache["index"] + num_tokens, "layers": layers}


def dense_init(stddev: float) -> Callable[..., jax.Array]:
    """Normal(0, stddev) init, as transformers' ``initializer_range`` (random init only).

    Example:
        >>> import jax
        >>> from lora_jax.models.layers import dense_init
        >>> dense_init(0.02)(jax.random.key(0), (64, 64)).std() < 0.03
        Array(True, dtype=bool)
    """
    return nn.initializers.normal(stddev)


# ------------------------------------------------------------------------- LM head


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LMHidden:
    """A causal LM's final hidden states and its output head: what a loss needs to compute
    the logits itself (``model(..., return_hidden=True)``), e.g. chunk by chunk.

    ``head`` is the params leaf as stored (so a LoRA interpreter tracing the model sees the
    head's dot on it): the ``lm_head`` kernel (dim, vocab), or with ``tied`` the embedding
    table (vocab, dim).

    Example:
        >>> import jax.numpy as jnp
        >>> from lora_jax.models.layers import LMHidden
        >>> out = LMHidden(jnp.ones((1, 3, 4)), jnp.eye(4, 6), tied=False)
        >>> out.logits().shape, out.logits().dtype
        ((1, 3, 6), dtype('float32'))

    Attributes:
        hidden: (batch, seq, dim), in the compute dtype.
        head: (dim, vocab), or (vocab, dim) with ``tied``.
        tied: ``head`` is the embedding table (its transpose is the output projection).
        softcap: the logits pass through :func:`soft_cap` with this cap (Gemma 2's
            ``final_logit_softcapping``), or None.
    """

    hidden: jax.Array
    head: jax.Array
    tied: bool = dataclasses.field(default=False, metadata={"static": True})
    softcap: float | None = dataclasses.field(default=None, metadata={"static": True})

    def logits(self) -> jax.Array:
        """float32 logits (batch, seq, vocab): exactly what the model returns without
        ``return_hidden`` (see the class example)."""
        return head_logits(self.hidden, self.head, tied=self.tied, softcap=self.softcap)

    def loss(self, labels: jax.Array, weights: jax.Array, *, chunk_size: int | None = 1024) -> jax.Array:
        """``sum(weights * nll(labels))`` through :func:`chunked_lm_loss` (None: the full logits at once).

        Example:
            >>> import jax.numpy as jnp
            >>> from lora_jax.models.layers import LMHidden
            >>> out = LMHidden(jnp.zeros((1, 3, 4)), jnp.zeros((4, 8)))     # uniform over 8 tokens
            >>> round(float(out.loss(jnp.array([[1, 2, 3]]), jnp.ones((1, 3)))), 4)   # 3 * log(8)
            6.2383
        """
        return chunked_lm_loss(self.hidden, self.head, labels, weights, tied=self.tied,
                               chunk_size=chunk_size, softcap=self.softcap)


def head_logits(hidden: jax.Array, head: jax.Array, *, tied: bool,
                softcap: float | None = None) -> jax.Array:
    """float32 logits of ``hidden`` through an ``lm_head`` kernel (dim, vocab) or, ``tied``,
    an embedding table (vocab, dim); the head is cast to the hidden states' dtype first,
    the float32 logits soft-capped if ``softcap`` is given.

    The same dot as ``nn.Dense`` / ``nn.Embed.attend``: ``head`` is contracted on its
    ``dim`` axis where it lies, with no transposed copy.

    Example:
        >>> import jax.numpy as jnp
        >>> from lora_jax.models.layers import head_logits
        >>> table = jnp.arange(6.0).reshape(3, 2)           # (vocab 3, dim 2)
        >>> head_logits(jnp.ones((1, 2)), table, tied=True)
        Array([[1., 5., 9.]], dtype=float32)
    """
    head = head.astype(hidden.dtype)
    contract = 1 if tied else 0
    logits = jax.lax.dot_general(hidden, head, (((hidden.ndim - 1,), (contract,)), ((), ())))
    return soft_cap(logits.astype(jnp.float32), softcap)


def token_nll(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """``-log softmax(logits)[label]`` per row, in float32.

    Example:
        >>> import jax.numpy as jnp
        >>> from lora_jax.models.layers import token_nll
        >>> token_nll(jnp.zeros((2, 4)), jnp.array([0, 3]))      # log(4) each
        Array([1.3862944, 1.3862944], dtype=float32)
    """
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - picked


def chunked_lm_loss(hidden: jax.Array, head: jax.Array, labels: jax.Array, weights: jax.Array, *,
                    tied: bool = False, chunk_size: int | None = 1024,
                    softcap: float | None = None) -> jax.Array:
    """``sum(weights * nll)`` of the LM head's logits, computed ``chunk_size`` tokens at a time.

    The (tokens x vocab) float32 logits are never held at once, nor their gradient: a
    ``lax.scan`` over token chunks computes each chunk's logits, log-softmax and weighted
    NLL under ``jax.checkpoint``, and the backward pass recomputes one chunk's logits at a
    time. The value and the gradients (of ``hidden`` and ``head``) are those of the full
    computation. The head's dot is a plain ``dot_general`` on the ``head`` leaf, so
    :func:`lora_jax.lora` computes a LoRA'd head (or tied embedding) on the efficient path.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from lora_jax.models.layers import chunked_lm_loss, head_logits, token_nll
        >>> hidden = jax.random.normal(jax.random.key(0), (2, 5, 4))
        >>> head = jax.random.normal(jax.random.key(1), (4, 7))
        >>> labels, weights = jnp.arange(10).reshape(2, 5) % 7, jnp.ones((2, 5))
        >>> full = jnp.sum(token_nll(head_logits(hidden, head, tied=False), labels))
        >>> bool(jnp.allclose(chunked_lm_loss(hidden, head, labels, weights, chunk_size=3), full))
        True

    Args:
        hidden: (..., dim) final hidden states.
        head: (dim, vocab), or (vocab, dim) with ``tied``.
        labels: (...) target token ids, aligned with ``hidden`` (shift before calling).
        weights: (...) weight of each token's NLL (0 = not a target).
        tied: ``head`` is an embedding table.
        chunk_size: tokens per chunk; None (or at least the token count) for one chunk.
            The tokens are padded up to whole chunks with zero weights.
        softcap: soft-cap the logits (see :func:`head_logits`), or None.

    Returns:
        float32 scalar: the weighted NLL sum (divide by ``weights.sum()`` for the mean).
    """
    dim = hidden.shape[-1]
    rows = hidden.reshape(-1, dim)
    labels = labels.reshape(-1).astype(jnp.int32)
    weights = weights.reshape(-1).astype(jnp.float32)
    tokens = rows.shape[0]
    if chunk_size is None or chunk_size >= tokens:
        return jnp.sum(token_nll(head_logits(rows, head, tied=tied, softcap=softcap), labels) * weights)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
    chunks = -(-tokens // chunk_size)
    pad = chunks * chunk_size - tokens
    if pad:
        rows = jnp.pad(rows, ((0, pad), (0, 0)))
        labels, weights = jnp.pad(labels, (0, pad)), jnp.pad(weights, (0, pad))

    # Saves nothing but its inputs: the backward pass recomputes this chunk's logits.
    @functools.partial(jax.checkpoint, policy=jax.checkpoint_policies.nothing_saveable,
                       prevent_cse=False)
    def chunk_loss(head: jax.Array, rows: jax.Array, labels: jax.Array, weights: jax.Array) -> jax.Array:
        logits = head_logits(rows, head, tied=tied, softcap=softcap)
        return jnp.sum(token_nll(logits, labels) * weights)

    def step(total: jax.Array, chunk: tuple[jax.Array, jax.Array, jax.Array]) -> tuple[jax.Array, None]:
        return total + chunk_loss(head, *chunk), None

    xs = (rows.reshape(chunks, chunk_size, dim), labels.reshape(chunks, chunk_size),
          weights.reshape(chunks, chunk_size))
    total, _ = jax.lax.scan(step, jnp.zeros((), jnp.float32), xs)
    return total


# Labels equal to this are not targets (transformers' ``ignore_index``), and the tokens per
# chunk of the loss a causal LM computes for ``labels=`` (lora_jax.train's default too).
IGNORE_INDEX = -100
LOSS_CHUNK = 128


def labels_loss(out: LMHidden, labels: jax.Array, *,
                chunk_size: int | None = LOSS_CHUNK) -> tuple[jax.Array, jax.Array]:
    """``(nll_sum, target_count)`` of next-token prediction, as transformers' ``labels=``.

    Position ``t`` predicts ``labels[..., t + 1]``; labels equal to ``IGNORE_INDEX`` (-100)
    are not targets (prompt tokens, padding). The logits are computed ``chunk_size`` tokens
    at a time (:func:`chunked_lm_loss`); divide for the mean.

    Example:
        >>> import jax.numpy as jnp
        >>> from lora_jax.models.layers import LMHidden, labels_loss
        >>> out = LMHidden(jnp.zeros((1, 4, 2)), jnp.zeros((2, 8)))       # uniform over 8 tokens
        >>> nll, count = labels_loss(out, jnp.array([[5, -100, 3, 4]]))   # targets 3 and 4
        >>> round(float(nll / count), 4), int(count)                      # log(8)
        (2.0794, 2)
    """
    targets = labels[..., 1:].astype(jnp.int32)
    weights = (targets != IGNORE_INDEX).astype(jnp.float32)
    targets = jnp.where(targets == IGNORE_INDEX, 0, targets)
    # Shift by padding the targets, not slicing the hidden states: the last position predicts nothing.
    pad = [(0, 0)] * (targets.ndim - 1) + [(0, 1)]
    nll = chunked_lm_loss(out.hidden, out.head, jnp.pad(targets, pad), jnp.pad(weights, pad), tied=out.tied,
                          chunk_size=chunk_size, softcap=out.softcap)
    return nll, jnp.sum(weights)


def causal_lm_output(out: LMHidden, *, return_hidden: bool = False,
                     labels: jax.Array | None = None) -> Any:
    """What a causal LM's ``__call__`` returns: the loss with ``labels``, ``out`` itself with
    ``return_hidden``, else the float32 logits.

    Example:
        >>> import jax.numpy as jnp
        >>> from lora_jax.models.layers import LMHidden, causal_lm_output
        >>> out = LMHidden(jnp.zeros((1, 3, 2)), jnp.zeros((2, 5)))
        >>> causal_lm_output(out).shape, type(causal_lm_output(out, return_hidden=True)).__name__
        ((1, 3, 5), 'LMHidden')
    """
    if labels is not None:
        return labels_loss(out, labels)
    return out if return_hidden else out.logits()


class _HeadKernel(nn.Module):
    """The ``kernel`` (in, vocab) param of an untied ``lm_head``, as ``nn.Dense`` stores it."""

    vocab_size: int
    kernel_init: Callable[..., jax.Array]
    param_dtype: Dtype

    @nn.compact
    def __call__(self, features: int) -> jax.Array:
        return self.param("kernel", self.kernel_init, (features, self.vocab_size), self.param_dtype)


def output_head(hidden: jax.Array, embedding: nn.Embed, config: Any, *, param_dtype: Dtype,
                dtype: Dtype | None = None, softcap: float | None = None) -> LMHidden:
    """The :class:`LMHidden` of a causal LM: its last hidden states and its output head.

    The head is the ``embedding`` table when ``config.tie_word_embeddings``, else an
    ``lm_head`` kernel (``config.vocab_size`` outputs, init normal(0,
    ``config.initializer_range``); the params of an ``nn.Dense`` without bias) created in
    the calling module's scope: call it from a compact ``__call__``. ``hidden`` is cast to
    the compute ``dtype`` if given (as ``nn.Dense`` casts its input); ``softcap`` soft-caps
    the logits (:class:`LMHidden`).

    Example:
        >>> import types, jax, jax.numpy as jnp, flax.linen as nn
        >>> from lora_jax.models.layers import output_head
        >>> config = types.SimpleNamespace(tie_word_embeddings=False, vocab_size=10,
        ...                                initializer_range=0.02)
        >>> class Head(nn.Module):
        ...     @nn.compact
        ...     def __call__(self, x):
        ...         embedding = nn.Embed(10, 4, name="embed")
        ...         return output_head(embedding(x), embedding, config, param_dtype=jnp.float32)
        >>> out, params = jax.eval_shape(Head().init_with_output, jax.random.key(0),
        ...                              jnp.zeros((1, 3), int))
        >>> logits = jax.eval_shape(lambda out: out.logits(), out)
        >>> out.hidden.shape, logits.shape, params["params"]["lm_head"]["kernel"].shape
        ((1, 3, 4), (1, 3, 10), (4, 10))
    """
    if dtype is not None:
        hidden = hidden.astype(dtype)
    if config.tie_word_embeddings:
        return LMHidden(hidden, embedding.embedding, tied=True, softcap=softcap)
    kernel = _HeadKernel(config.vocab_size, dense_init(config.initializer_range), param_dtype,
                         name="lm_head")(hidden.shape[-1])
    return LMHidden(hidden, kernel, tied=False, softcap=softcap)


def output_logits(hidden: jax.Array, embedding: nn.Embed, config: Any, *, dtype: Dtype,
                  param_dtype: Dtype) -> jax.Array:
    """float32 logits of a causal LM's last hidden states: ``output_head(...).logits()``.

    Through the ``embedding`` table when ``config.tie_word_embeddings``, else through
    an ``lm_head`` kernel (see :func:`output_head`) created in the calling module's
    scope: call it from a compact ``__call__``. ``hidden`` is in the compute dtype
    ``dtype``.

    Example:
        >>> import types, jax, jax.numpy as jnp, flax.linen as nn
        >>> from lora_jax.models.layers import output_logits
        >>> config = types.SimpleNamespace(tie_word_embeddings=False, vocab_size=10,
        ...                                initializer_range=0.02)
        >>> class Head(nn.Module):
        ...     @nn.compact
        ...     def __call__(self, x):
        ...         embedding = nn.Embed(10, 4, name="embed")
        ...         return output_logits(embedding(x), embedding, config,
        ...                              dtype=jnp.float32, param_dtype=jnp.float32)
        >>> logits, params = jax.eval_shape(Head().init_with_output, jax.random.key(0),
        ...                                 jnp.zeros((1, 3), int))
        >>> logits.shape, params["params"]["lm_head"]["kernel"].shape
        ((1, 3, 10), (4, 10))
    """
    return output_head(hidden, embedding, config, param_dtype=param_dtype, dtype=dtype).logits()
