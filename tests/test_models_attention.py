"""Attention through jax.nn.dot_product_attention: the same numbers as the einsum it replaced,
grouped-query heads without repeated keys/values, structured masks for uncached passes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax.models.layers import (
    AttentionMask,
    attention_implementation,
    causal_mask,
    dot_product_attention,
    make_attention_mask,
)


def einsum_attention(query, key, value, mask, *, scale):
    """lora_jax's attention before jax.nn.dot_product_attention (kept here as the reference)."""
    batch, q_len, heads, head_dim = query.shape
    kv_heads = key.shape[2]
    grouped = query.reshape(batch, q_len, kv_heads, heads // kv_heads, head_dim)
    scores = jnp.einsum("bqkgd,btkd->bkgqt", grouped, key).astype(jnp.float32) * scale
    if mask is not None:
        scores = jnp.where(mask[:, :, None], scores, float(np.finfo(np.float32).min))
    probs = jax.nn.softmax(scores, axis=-1).astype(value.dtype)
    out = jnp.einsum("bkgqt,btkd->bqkgd", probs, value)
    return out.reshape(batch, q_len, heads * head_dim)


def numpy_attention(query, key, value, mask, scale):
    """Softmax attention in float64 numpy, each query head reading KV head ``h // group``."""
    q, k, v = (np.asarray(t, np.float64) for t in (query, key, value))
    group = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
    scores = np.where(np.asarray(mask), scores, -1e30)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.einsum("bhqk,bkhd->bqhd", probs, v)
    return out.reshape(out.shape[0], out.shape[1], -1)


def heads(seed, batch=2, q_len=7, k_len=7, num_heads=6, kv_heads=2, head_dim=8):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(batch, q_len, num_heads, head_dim)).astype(np.float32)
    k = rng.normal(size=(batch, k_len, kv_heads, head_dim)).astype(np.float32)
    v = rng.normal(size=(batch, k_len, kv_heads, head_dim)).astype(np.float32)
    return jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)


PADDING = jnp.array([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])  # left padding in row 0


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("causal", [True, False])
def test_structured_mask_equals_the_einsum_path_and_float64(window, causal):
    q, k, v = heads(0)
    mask = causal_mask(PADDING, sliding_window=window, causal=causal)
    new = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, mask, scale=0.3))(q, k, v)
    dense = mask.dense(7)
    old = jax.jit(lambda q, k, v: einsum_attention(q, k, v, dense, scale=0.3))(q, k, v)
    np.testing.assert_allclose(new, old, atol=1e-6, rtol=0)
    # Rows of real queries against float64 (a fully masked padding query is uniform in both).
    real = np.asarray(dense).any(-1)[:, 0]
    reference = numpy_attention(q, k, v, dense, 0.3)
    np.testing.assert_allclose(np.asarray(new)[real], reference[real], atol=2e-6)


def test_cached_mask_equals_the_einsum_path():
    # Three queries at slots 4..6 of a 10-slot cache, keys over every slot.
    q, _, _ = heads(1, q_len=3)
    _, k, v = heads(2, k_len=10)
    padding = jnp.array([[0, 1, 1, 1, 1, 1, 1, 0, 0, 0], [1] * 10])
    mask = make_attention_mask(4 + jnp.arange(3), jnp.arange(10), padding, sliding_window=4)
    new = dot_product_attention(q, k, v, mask, scale=0.25)
    old = einsum_attention(q, k, v, mask, scale=0.25)
    np.testing.assert_allclose(new, old, atol=1e-6, rtol=0)
    np.testing.assert_allclose(new, numpy_attention(q, k, v, mask, 0.25), atol=2e-6)


def test_grouped_query_heads_are_not_repeated():
    q, _, _ = heads(3, batch=1, q_len=5, num_heads=6, kv_heads=2, head_dim=4)
    _, k, v = heads(4, batch=1, k_len=10, num_heads=6, kv_heads=2, head_dim=4)
    jaxpr = jax.make_jaxpr(lambda q, k, v: dot_product_attention(q, k, v, None, scale=0.5))(q, k, v)
    kv_size = k.size

    def shapes(jaxpr):
        for eqn in jaxpr.eqns:
            for var in eqn.outvars:
                yield var.aval.shape
            for sub in jax.core.jaxprs_in_params(eqn.params):
                yield from shapes(sub)

    # A repeated K or V would hold keys (10) x head_dim (4) for every query head: bigger than K.
    repeated = [s for s in shapes(jaxpr.jaxpr) if 10 in s and 4 in s and np.prod(s) > kv_size]
    assert repeated == []


def test_a_bfloat16_cache_serves_float32_queries():
    q, k, v = heads(5)
    mask = causal_mask(None).dense(7)
    out = dot_product_attention(q, k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), mask, scale=0.3)
    assert out.dtype == jnp.float32
    reference = einsum_attention(q, k.astype(jnp.bfloat16).astype(jnp.float32),
                                 v.astype(jnp.bfloat16).astype(jnp.float32), mask, scale=0.3)
    np.testing.assert_allclose(out, reference, atol=1e-6)


def test_cudnn_is_asked_for_only_on_gpu_in_half_precision():
    on_gpu = jax.default_backend() == "gpu"
    assert attention_implementation(jnp.zeros((1, 2, 4, 64), jnp.float32)) is None
    half = attention_implementation(jnp.zeros((1, 2, 4, 64), jnp.bfloat16))
    assert half == ("cudnn" if on_gpu else None)
    assert attention_implementation(jnp.zeros((1, 2, 4, 12), jnp.bfloat16)) is None  # width cuDNN refuses


def test_attention_mask_is_a_pytree_with_static_flags():
    mask = AttentionMask(PADDING, causal=True, sliding_window=4)
    leaves, treedef = jax.tree.flatten(mask)
    assert len(leaves) == 1 and jax.tree.unflatten(treedef, leaves) == mask
    assert jax.tree.flatten(AttentionMask(None, causal=False))[0] == []
