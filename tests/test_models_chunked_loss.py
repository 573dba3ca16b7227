"""The chunked LM head + cross-entropy: the loss and gradients of the full float32 logits (optax,
float64 numpy), a LoRA'd tied head on the interpreter's efficient path, and less memory."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax
from lora_jax import models
from lora_jax.models import LMHidden, chunked_lm_loss
from lora_jax.train.step import DEFAULT_LOSS_CHUNK

VOCAB, DIM = 11, 8


def problem(seed, tied, batch=2, seq=7):
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(rng.normal(size=(batch, seq, DIM)), jnp.float32)
    shape = (VOCAB, DIM) if tied else (DIM, VOCAB)
    head = jnp.asarray(rng.normal(size=shape), jnp.float32)
    labels = jnp.asarray(rng.integers(0, VOCAB, (batch, seq)), jnp.int32)
    weights = jnp.asarray(rng.random((batch, seq)) > 0.3, jnp.float32)  # response-only style
    return hidden, head, labels, weights


def optax_loss(hidden, head, labels, weights, tied):
    logits = hidden @ (head.T if tied else head)
    return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, labels) * weights)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("chunk", [3, 5, 14, None])
def test_chunked_loss_and_grads_equal_the_full_logits(tied, chunk):
    hidden, head, labels, weights = problem(0, tied)
    chunked = jax.jit(jax.value_and_grad(
        lambda h, w: chunked_lm_loss(h, w, labels, weights, tied=tied, chunk_size=chunk), argnums=(0, 1)))
    full = jax.value_and_grad(lambda h, w: optax_loss(h, w, labels, weights, tied), argnums=(0, 1))
    (value, grads), (expected, expected_grads) = chunked(hidden, head), full(hidden, head)
    np.testing.assert_allclose(value, expected, rtol=1e-6)
    for got, want in zip(grads, expected_grads):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # and the value against float64 numpy
    h, w = np.asarray(hidden, np.float64), np.asarray(head, np.float64)
    logits = h @ (w.T if tied else w)
    log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    nll = log_z - np.take_along_axis(logits, np.asarray(labels)[..., None], -1)[..., 0]
    np.testing.assert_allclose(value, np.sum(nll * np.asarray(weights)), rtol=1e-5)


def test_zero_weights_and_padding_tokens_add_nothing():
    hidden, head, labels, weights = problem(1, False)
    weights = weights.at[0].set(0.0)
    chunked = chunked_lm_loss(hidden, head, labels, weights, chunk_size=4)
    only_row_1 = chunked_lm_loss(hidden[1:], head, labels[1:], weights[1:], chunk_size=4)
    np.testing.assert_allclose(chunked, only_row_1, rtol=1e-6)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        chunked_lm_loss(hidden, head, labels, weights, chunk_size=0)


LLAMA = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, vocab_size=50)
IDS = jnp.asarray(np.random.default_rng(2).integers(0, 50, (2, 9)), jnp.int32)


@pytest.mark.parametrize("hf", [dict(LLAMA, tie_word_embeddings=True), dict(LLAMA, tie_word_embeddings=False),
                                dict(model_type="gpt2", n_embd=32, n_layer=1, n_head=4, vocab_size=50,
                                     n_positions=16)], ids=["llama-tied", "llama-untied", "gpt2"])
def test_return_hidden_gives_the_head_of_the_logits(hf):
    model = models.from_config(hf)
    apply = jax.jit(lambda p, ids, **kw: model.module.apply({"params": p}, ids, **kw),
                    static_argnames="return_hidden")
    out = apply(model.params, IDS, return_hidden=True)
    assert isinstance(out, LMHidden) and out.hidden.shape == (2, 9, 32)
    assert out.tied == hf.get("tie_word_embeddings", True)
    leaf = model.params["model" if "model" in model.params else "transformer"]
    table = leaf["embed_tokens" if "embed_tokens" in leaf else "wte"]["embedding"]
    np.testing.assert_array_equal(out.head, table if out.tied else model.params["lm_head"]["kernel"])
    np.testing.assert_allclose(out.logits(), apply(model.params, IDS), atol=1e-6)


@pytest.mark.parametrize("targets", [["embed_tokens", "q_proj"], "all-linear"])
def test_lora_tied_head_trains_the_same_through_the_chunked_loss(targets):
    model = models.from_config(dict(LLAMA, tie_word_embeddings=True))
    config = lora_jax.LoraConfig(r=4, lora_alpha=8, target_modules=targets)
    adapter = jax.tree.map(lambda x: x + 0.05, lora_jax.init(config, model.params, jax.random.key(0)))
    labels, weights = IDS[:, 1:], jnp.ones((2, 8)).at[0, :3].set(0.0)

    def chunked(p, ids):
        out = model.module.apply({"params": p}, ids, return_hidden=True)
        return chunked_lm_loss(out.hidden[:, :-1], out.head, labels, weights, tied=out.tied, chunk_size=5)

    def full(p, ids):
        logits = model.module.apply({"params": p}, ids)[:, :-1]
        return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, labels) * weights)

    with warnings.catch_warnings():
        warnings.simplefilter("error", lora_jax.LoraFallbackWarning)  # no dense W + s*A@B anywhere
        grad_chunked = jax.jit(jax.value_and_grad(lambda a: lora_jax.lora(chunked, config)(model.params, a, IDS)))
        grad_full = jax.jit(jax.value_and_grad(lambda a: lora_jax.lora(full, config)(model.params, a, IDS)))
        (value, grads), (expected, expected_grads) = grad_chunked(adapter), grad_full(adapter)
        jaxpr = jax.make_jaxpr(grad_chunked)(adapter)
    np.testing.assert_allclose(value, expected, rtol=1e-6)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * float(np.abs(want).max()))
    # The frozen (vocab, dim) table is never merged with its adapter nor given a gradient.
    assert not any(v.aval.shape in ((50, 32), (32, 50)) for e in _all_eqns(jaxpr.jaxpr)
                   if e.primitive.name == "dot_general" for v in e.outvars)


def _all_eqns(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in jax.core.jaxprs_in_params(eqn.params):
            yield from _all_eqns(sub)


def test_bfloat16_chunks_stay_within_bfloat16_rounding_of_float32():
    hidden, head, labels, weights = problem(3, True)
    hidden, head = hidden.astype(jnp.bfloat16), head.astype(jnp.bfloat16)
    # The float32 loss of the same (bf16-rounded) inputs; each chunk's bf16 logits round on their own.
    reference = optax_loss(hidden.astype(jnp.float32), head.astype(jnp.float32), labels, weights, True)
    for chunk in (4, None):
        value = chunked_lm_loss(hidden, head, labels, weights, tied=True, chunk_size=chunk)
        assert value.dtype == jnp.float32
        np.testing.assert_allclose(value, reference, rtol=2e-3)


def test_chunks_lower_the_compiled_memory_of_the_gradient():
    tokens, dim, vocab = 512, 32, 8192
    hidden = jax.ShapeDtypeStruct((tokens, dim), jnp.float32)
    head = jax.ShapeDtypeStruct((dim, vocab), jnp.float32)
    labels = jnp.zeros((tokens,), jnp.int32)
    weights = jnp.ones((tokens,), jnp.float32)

    def temps(chunk):
        grad = jax.jit(jax.grad(lambda h, w: chunked_lm_loss(h, w, labels, weights, chunk_size=chunk)))
        return grad.lower(hidden, head).compile().memory_analysis().temp_size_in_bytes

    logits_bytes = tokens * vocab * 4
    assert temps(None) >= logits_bytes  # the full logits (and their gradient) at once
    assert temps(64) < 0.3 * logits_bytes  # one chunk: its logits and their gradient (2 x 1/8)


@pytest.mark.parametrize("hf", [dict(LLAMA, tie_word_embeddings=True),
                                dict(model_type="gemma2", hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                     head_dim=8, vocab_size=50, final_logit_softcapping=3.0)],
                         ids=["llama", "gemma2-softcapped"])
def test_labels_give_the_next_token_loss_of_the_logits(hf):
    model = models.from_config(hf)
    labels = IDS.at[0, :4].set(-100)  # the prompt of row 0 is not a target
    apply = jax.jit(lambda p, **kw: model.module.apply({"params": p}, IDS, **kw))
    nll, count = apply(model.params, labels=labels)
    logits = apply(model.params)[:, :-1]
    targets, weights = labels[:, 1:], labels[:, 1:] != -100
    expected = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(weights, targets, 0))
    assert count == weights.sum() == 13
    np.testing.assert_allclose(nll, jnp.sum(expected * weights), rtol=1e-6)
    assert models.layers.LOSS_CHUNK == DEFAULT_LOSS_CHUNK  # labels= and lora_jax.train chunk alike
