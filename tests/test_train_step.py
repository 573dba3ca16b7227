"""The jit-compiled LoRA training step, its loss, optimizer and the loop (tiny linen LM)."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax
from lora_jax import LoraConfig
from lora_jax.train import (
    Example,
    TrainConfig,
    cast_floating,
    causal_lm_loss,
    evaluate,
    init_state,
    learning_rate_schedule,
    make_optimizer,
    make_train_step,
    train,
    trainable_leaves,
    with_leaves,
)

VOCAB, DIM = 24, 16


class TinyLM(nn.Module):
    """One causal attention block; kernels named like a transformer's."""

    @nn.compact
    def __call__(self, ids, attention_mask=None):
        x = nn.Embed(VOCAB, DIM, name="embed")(ids)
        q = nn.Dense(DIM, name="q_proj")(x)
        v = nn.Dense(DIM, name="v_proj")(x)
        scores = jnp.einsum("bqd,bkd->bqk", q, x) / math.sqrt(DIM)
        length = ids.shape[1]
        mask = jnp.tril(jnp.ones((length, length), bool))[None]
        if attention_mask is not None:
            mask = mask & (attention_mask[:, None, :] > 0)
        scores = jnp.where(mask, scores, -1e9)
        h = x + jnp.einsum("bqk,bkd->bqd", jax.nn.softmax(scores, -1), v)
        h = h + nn.Dense(DIM, name="o_proj")(nn.gelu(h))
        return nn.Dense(VOCAB, name="lm_head")(h)


MODEL = TinyLM()
PARAMS = MODEL.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
CONFIG = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"])


def apply_fn(params, ids, mask):
    return MODEL.apply({"params": params}, ids, attention_mask=mask)


def counting_examples(n: int, seed: int = 0) -> list[Example]:
    """Sequences where each token is the previous plus a per-sequence step: learnable."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length, start, stride = rng.integers(6, 16), rng.integers(VOCAB), rng.integers(1, 3)
        ids = (start + stride * np.arange(length)) % VOCAB
        out.append(Example(ids.astype(np.int32), np.arange(length) >= 2))
    return out


def make_batch(rows: int, length: int = 12, accum: int = 1, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, (accum, rows, length)).astype(np.int32)
    attention = np.ones_like(ids)
    attention[..., length - 3:] = 0  # padding at the end
    loss_mask = (rng.random(ids.shape) > 0.3) & (attention > 0)
    return {"input_ids": ids, "attention_mask": attention, "loss_mask": loss_mask}


OPTIMIZER = make_optimizer(1e-2, 10, warmup_steps=0)
# One compiled step shared by the tests that use CONFIG (compiling dominates their time).
STEP = make_train_step(apply_fn, CONFIG, OPTIMIZER, donate=False)


def fresh_state(config=CONFIG, optimizer=OPTIMIZER, seed=0, params=PARAMS):
    adapter = lora_jax.init(config, params, jax.random.key(seed))
    # B random so that the adapter already matters in the first step.
    adapter = {k: {"lora_A": v["lora_A"], "lora_B": 0.1 * jnp.ones_like(v["lora_B"])} for k, v in adapter.items()}
    return init_state(adapter, trainable_leaves(params, config), optimizer, seed), optimizer


# -- the loss ----------------------------------------------------------------------------

def test_causal_lm_loss_matches_a_numpy_reference():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, VOCAB)).astype(np.float32)
    ids = rng.integers(0, VOCAB, (2, 5))
    mask = np.array([[1, 1, 0, 1, 1], [0, 0, 1, 1, 0]], bool)
    total, count = causal_lm_loss(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(mask))
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = [-log_probs[b, t - 1, ids[b, t]] for b in range(2) for t in range(1, 5) if mask[b, t]]
    assert count == len(expected) == 5
    np.testing.assert_allclose(total, sum(expected), rtol=1e-5)


def test_step_loss_is_the_mean_nll_of_the_merged_model():
    state, _ = fresh_state()
    batch = make_batch(2)
    _, metrics = STEP(state, PARAMS, batch)

    @jax.jit
    def reference(adapter, ids, attention, loss_mask):
        logits = apply_fn(lora_jax.merge(PARAMS, adapter, CONFIG), ids, attention)
        return causal_lm_loss(logits, ids, loss_mask)

    total, count = reference(state.trainable["adapter"], batch["input_ids"][0],
                             batch["attention_mask"][0], batch["loss_mask"][0])
    np.testing.assert_allclose(metrics["loss"], total / count, rtol=1e-5)
    assert metrics["tokens"] == batch["attention_mask"].sum()


# -- what trains --------------------------------------------------------------------------------

def test_only_the_adapter_and_modules_to_save_train():
    config = CONFIG.replace(modules_to_save=("lm_head",))
    state, optimizer = fresh_state(config)
    assert sorted(state.trainable["params"]) == ["lm_head.bias", "lm_head.kernel"]
    before = jax.tree.map(np.array, state.trainable)
    step = make_train_step(apply_fn, config, optimizer)
    for _ in range(3):
        state, _ = step(state, PARAMS, make_batch(2))
    after = state.trainable
    assert not np.allclose(after["params"]["lm_head.kernel"], before["params"]["lm_head.kernel"])
    for name in ("q_proj", "v_proj", "o_proj"):
        assert not np.allclose(after["adapter"][name]["lora_B"], before["adapter"][name]["lora_B"])
    assert int(state.step) == 3
    # The frozen params are an input, never an output: nothing else can change.
    merged = with_leaves(PARAMS, after["params"])
    assert merged["q_proj"]["kernel"] is PARAMS["q_proj"]["kernel"]
    assert merged["lm_head"]["kernel"].dtype == jnp.float32


def test_gradient_accumulation_equals_one_large_batch():
    state, _ = fresh_state()
    big = make_batch(4)
    split = jax.tree.map(lambda x: x.reshape(2, 2, *x.shape[2:]), big)
    new_a, metrics_a = STEP(state, PARAMS, big)
    new_b, metrics_b = STEP(state, PARAMS, split)
    np.testing.assert_allclose(metrics_a["loss"], metrics_b["loss"], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(new_a.trainable), jax.tree.leaves(new_b.trainable)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_bfloat16_base_keeps_float32_adapter_and_close_loss():
    state, _ = fresh_state()
    batch = make_batch(2)
    new_fp32, m32 = STEP(state, PARAMS, batch)
    new_bf16, m16 = STEP(state, cast_floating(PARAMS, jnp.bfloat16), batch)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(new_bf16.trainable))
    np.testing.assert_allclose(m16["loss"], m32["loss"], rtol=2e-2)


def test_lora_dropout_is_reproducible_for_a_seed():
    config = CONFIG.replace(lora_dropout=0.5)
    batch = make_batch(2)
    step = make_train_step(apply_fn, config, OPTIMIZER, donate=False)

    def run(seed):
        state, _ = fresh_state(config, seed=0)
        state = state._replace(rng=jax.random.key_data(jax.random.key(seed)))
        return step(state, PARAMS, batch)[1]["loss"]

    assert run(1) == run(1)
    assert run(1) != run(2)


# -- the schedule -----------------------------------------------------------------------------

def test_schedule_warms_up_linearly_then_decays_to_zero():
    cosine = learning_rate_schedule(1e-3, 110, warmup_steps=10)
    np.testing.assert_allclose([cosine(0), cosine(5), cosine(10), cosine(60), cosine(110)],
                               [0.0, 5e-4, 1e-3, 5e-4, 0.0], atol=1e-9)
    linear = learning_rate_schedule(1e-3, 110, warmup_steps=10, schedule="linear")
    np.testing.assert_allclose([linear(35), linear(85)], [7.5e-4, 2.5e-4], rtol=1e-5)
    with pytest.raises(ValueError, match="schedule"):
        learning_rate_schedule(1e-3, 10, schedule="step")


# -- the loop ---------------------------------------------------------------------------------

def test_train_lowers_held_out_loss_and_is_deterministic():
    examples = counting_examples(48)
    held_out = counting_examples(8, seed=1)
    config = TrainConfig(max_steps=25, batch_size=4, seq_len=16, learning_rate=3e-2, warmup_steps=2,
                         save_every=100, num_buckets=1)
    first = train(apply_fn, PARAMS, CONFIG, examples, config=config, eval_examples=held_out, progress=False)
    second = train(apply_fn, PARAMS, CONFIG, examples, config=config, eval_examples=held_out, progress=False)
    assert first.eval_after["perplexity"] < 0.8 * first.eval_before["perplexity"]
    for a, b in zip(jax.tree.leaves(first.adapter), jax.tree.leaves(second.adapter)):
        np.testing.assert_array_equal(a, b)
    assert [r["step"] for r in first.history if "loss" in r] == list(range(1, 26))
    # The loop's held-out numbers agree with evaluate() on the returned adapter.
    again = evaluate(apply_fn, PARAMS, first.adapter, CONFIG, held_out, batch_size=4, seq_len=16)
    np.testing.assert_allclose(again["loss"], first.eval_after["loss"], rtol=1e-5)


def test_on_step_can_stop_a_run_early():
    config = TrainConfig(max_steps=20, batch_size=4, seq_len=16, save_every=100, num_buckets=1)
    result = train(apply_fn, PARAMS, CONFIG, counting_examples(16), config=config, progress=False,
                   on_step=lambda record: record["step"] == 3)
    assert result.interrupted and result.step == 3 and result.eval_after is None
