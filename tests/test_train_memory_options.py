"""lora_jax.train's memory options: per-layer remat of a lora_jax.models module, the chunked loss
(response-only masking kept) and the XLA:CPU scheduler change the memory, not the update."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax
from lora_jax import models
from lora_jax.train import TrainConfig, init_state, make_optimizer, make_train_step
from lora_jax.train.settings import FinetuneSettings, SettingsError
from lora_jax.train.step import (
    REMAT_POLICIES,
    compiler_options,
    make_loss_fn,
    model_apply,
    remat_policy,
)

HF = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
          num_attention_heads=4, num_key_value_heads=2, vocab_size=40, tie_word_embeddings=True)
MODEL = models.from_config(HF)
CONFIG = lora_jax.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
OPTIMIZER = make_optimizer(1e-2, 10, warmup_steps=0)


def batch(accum=1, rows=2, length=9, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 40, (accum, rows, length)).astype(np.int32)
    attention = np.ones_like(ids)
    attention[..., -2:] = 0  # padding at the end
    loss_mask = np.zeros(ids.shape, bool)
    loss_mask[..., 4:-2] = True  # the "response": only these tokens are targets
    return {"input_ids": ids, "attention_mask": attention, "loss_mask": loss_mask}


def fresh_state(optimizer=OPTIMIZER):
    adapter = lora_jax.init(CONFIG, MODEL.params, jax.random.key(0))
    adapter = jax.tree.map(lambda x: x + 0.05, adapter)
    return init_state(adapter, {}, optimizer, seed=0)


def plain_apply(params, ids, mask):
    return MODEL.module.apply({"params": params}, ids, attention_mask=mask)


def test_module_with_remat_and_chunked_loss_gives_the_plain_update():
    data = batch(accum=2)
    # SGD: the update is the gradient itself (AdamW's first step, ~lr * sign(g), would turn float32
    # reordering in a near-zero gradient component into a full step).
    sgd = optax.sgd(1.0)
    plain = make_train_step(plain_apply, CONFIG, sgd, loss_chunk=None, cpu_scheduler="concurrency", donate=False)
    expected_state, expected = plain(fresh_state(sgd), MODEL.params, data)
    for remat in ("full", "dots"):
        step = make_train_step(MODEL.module, CONFIG, sgd, remat=remat, loss_chunk=5, donate=False)
        state, metrics = step(fresh_state(sgd), MODEL.params, data)
        np.testing.assert_allclose(metrics["loss"], expected["loss"], rtol=1e-6)
        assert metrics["target_tokens"] == expected["target_tokens"] == data["loss_mask"][..., 1:].sum()
        for a, b in zip(jax.tree.leaves(state.trainable), jax.tree.leaves(expected_state.trainable)):
            np.testing.assert_allclose(a, b, atol=1e-6)


def test_chunked_loss_counts_only_response_tokens():
    data = jax.tree.map(lambda x: x[0], batch())
    state = fresh_state()
    nll, count = jax.jit(lambda t: make_loss_fn(MODEL.module, CONFIG, loss_chunk=3)(t, MODEL.params, data, None))(
        state.trainable)
    # numpy reference on the merged model's logits
    merged = lora_jax.merge(MODEL.params, state.trainable["adapter"], CONFIG)
    logits = np.asarray(plain_apply(merged, data["input_ids"], data["attention_mask"]), np.float64)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ids, mask = data["input_ids"], data["loss_mask"]
    expected = [-log_probs[b, t - 1, ids[b, t]] for b in range(2) for t in range(1, 9) if mask[b, t]]
    assert count == len(expected) == 6
    np.testing.assert_allclose(nll, sum(expected), rtol=1e-5)


def test_model_apply_returns_hidden_states_or_logits():
    ids, mask = jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32)
    out = model_apply(MODEL.module, remat="full", return_hidden=True)(MODEL.params, ids, mask)
    assert isinstance(out, models.LMHidden)
    np.testing.assert_allclose(model_apply(MODEL.module)(MODEL.params, ids, mask), out.logits(), atol=1e-6)
    with pytest.raises(TypeError, match="not a lora_jax.models module"):
        model_apply(jax.nn.relu)


def test_remat_of_a_plain_function_is_refused_with_the_way_out():
    with pytest.raises(ValueError, match=r"pass the module \(model.module\)"):
        make_train_step(plain_apply, CONFIG, OPTIMIZER, remat="full")
    with pytest.raises(ValueError, match="expected one of 'none', 'dots', 'full', 'offload'"):
        make_train_step(plain_apply, CONFIG, OPTIMIZER, remat="nothing_saveable")
    assert REMAT_POLICIES == models.REMAT_POLICIES and remat_policy("none") is None


def test_the_memory_scheduler_changes_no_value():
    data = batch()
    results = []
    for scheduler in ("memory", "concurrency"):
        step = make_train_step(MODEL.module, CONFIG, OPTIMIZER, remat="full", loss_chunk=4,
                               cpu_scheduler=scheduler, donate=False)
        results.append(step(fresh_state(), MODEL.params, data))
    (state_a, metrics_a), (state_b, metrics_b) = results
    assert float(metrics_a["loss"]) == float(metrics_b["loss"])
    for a, b in zip(jax.tree.leaves(state_a.trainable), jax.tree.leaves(state_b.trainable)):
        np.testing.assert_array_equal(a, b)
    assert compiler_options("memory", backend="cpu") == {
        "xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}
    assert compiler_options("memory", backend="gpu") is None
    with pytest.raises(ValueError, match="cpu_scheduler must be one of"):
        compiler_options("fastest")


@pytest.mark.parametrize("field, value, expected", [
    ("remat", "nothing_saveable", "remat must be None or one of"),
    ("loss_chunk", 0, "loss_chunk must be an integer >= 1 or None"),
    ("cpu_scheduler", "dfs", "cpu_scheduler must be one of"),
])
def test_train_config_refuses_bad_memory_settings(field, value, expected):
    with pytest.raises(ValueError, match=expected):
        TrainConfig(**{field: value})


def test_finetune_settings_check_the_flags_and_map_to_train_config():
    with pytest.raises(SettingsError, match="--remat"):
        FinetuneSettings(remat="bogus")
    with pytest.raises(SettingsError, match="--chunked-loss"):
        FinetuneSettings(chunked_loss=-1)
    with pytest.raises(SettingsError, match="--xla-cpu-scheduler"):
        FinetuneSettings(xla_cpu_scheduler="fastest")
    if jax.default_backend() == "cpu":
        with pytest.raises(SettingsError, match="--remat: .*'offload'"):
            FinetuneSettings(remat="offload")
    config = FinetuneSettings(remat="dots", chunked_loss=0, xla_cpu_scheduler="concurrency").resolved().train_config()
    assert (config.remat, config.loss_chunk, config.cpu_scheduler) == ("dots", None, "concurrency")
    defaults = FinetuneSettings().resolved().train_config()
    assert defaults.remat in REMAT_POLICIES and defaults.loss_chunk >= 1
    assert defaults.cpu_scheduler in ("memory", "concurrency")
