"""QLoRA through lora_jax.train: the training step on a quantized base lowers the loss, leaves the
packed codes bitwise as they were, falls back nowhere, and gives the adapter the gradients of the
same step on the dequantized float32 base; prepare_for_kbit_training keeps norms in float32."""

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax
from lora_jax import models
from lora_jax.quantize import dequantize, is_quantized, quantize
from lora_jax.train import TrainConfig, train
from lora_jax.train.kbit import prepare_for_kbit_training
from lora_jax.train.step import init_state, make_loss_fn, make_optimizer, trainable_leaves
from lora_jax.train.tokenize import Example

HF = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
          num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)
CONFIG = lora_jax.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")


def counting_examples(n=16, length=12):
    return [Example(((np.arange(length) + i) % 64).astype(np.int32), np.ones(length, bool)) for i in range(n)]


@pytest.fixture(scope="module")
def model():
    return models.from_config(HF, seed=2)


@pytest.mark.parametrize("scheme, options", [("nf4", dict(double_quant=True)), ("int8", {})])
def test_training_on_a_quantized_base_lowers_the_loss_and_keeps_the_codes(model, scheme, options):
    base = quantize(model.params, scheme, **options)
    packed = [np.array(x) for x in jax.tree.leaves(base)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", lora_jax.LoraFallbackWarning)
        result = train(model.module, base, CONFIG, counting_examples(),
                       config=TrainConfig(max_steps=12, batch_size=4, seq_len=12, learning_rate=3e-2, warmup_steps=0,
                                          remat="full"),
                       eval_examples=counting_examples(4), progress=False, log=lambda message: None)
    assert result.eval_after["loss"] < result.eval_before["loss"] - 0.1
    for before, after in zip(packed, jax.tree.leaves(base)):
        np.testing.assert_array_equal(before, np.asarray(after))  # bit for bit, dtypes included
        assert before.dtype == np.asarray(after).dtype


def test_adapter_gradients_equal_those_on_the_dequantized_float32_base(model):
    base = quantize(model.params, "nf4", double_quant=True)
    float_base = dequantize(base, jnp.float32)  # float32 kernels holding exactly the NF4 values
    adapter = lora_jax.init(CONFIG.replace(init_lora_weights=False), model.params, jax.random.key(3))
    trainable = {"adapter": adapter, "params": trainable_leaves(model.params, CONFIG)}
    batch = {"input_ids": jnp.asarray(counting_examples(2)[0].input_ids[None].repeat(2, 0)),
             "attention_mask": jnp.ones((2, 12), jnp.int32), "loss_mask": jnp.ones((2, 12), bool)}
    loss = make_loss_fn(model.module, CONFIG, remat="full")  # as quantized runs train
    grad = jax.jit(jax.grad(lambda t, p: loss(t, p, batch, None)[0]))
    with warnings.catch_warnings():
        warnings.simplefilter("error", lora_jax.LoraFallbackWarning)
        got = grad(trainable, base)["adapter"]
    want = grad(trainable, float_base)["adapter"]
    # float32 on both sides; only the order of the sums differs (hand-written backward vs autodiff).
    for name in want:
        for part in ("lora_A", "lora_B"):
            g, w = np.asarray(got[name][part]), np.asarray(want[name][part])
            np.testing.assert_allclose(g, w, rtol=0, atol=1e-5 * np.abs(w).max(), err_msg=f"{name}.{part}")


def test_prepare_for_kbit_training_keeps_norms_float32_and_codes_as_they_are(model):
    base = quantize(model.params, "nf4")
    frozen = prepare_for_kbit_training(base, "bfloat16")
    for path, leaf in jax.tree_util.tree_flatten_with_path(frozen, is_leaf=is_quantized)[0]:
        name = jax.tree_util.keystr(path)
        if is_quantized(leaf):
            assert leaf.dtype == jnp.bfloat16 and leaf.dequantize().dtype == jnp.bfloat16, name
        elif name.endswith("['scale']"):
            assert leaf.dtype == jnp.float32, name   # norms: float32, as PEFT keeps them
        else:
            assert leaf.dtype == jnp.bfloat16, name  # embeddings (and an unquantized head): compute dtype
    kernel = base["model"]["layers"]["0"]["mlp"]["up_proj"]["kernel"]
    prepared = frozen["model"]["layers"]["0"]["mlp"]["up_proj"]["kernel"]
    assert all(a is b for a, b in zip(jax.tree.leaves(kernel), jax.tree.leaves(prepared)))
    np.testing.assert_array_equal(np.asarray(prepared.dequantize(jnp.float32)),
                                  np.asarray(kernel.dequantize(jnp.float32)))


def test_a_bfloat16_qlora_run_trains_with_float32_norms(model):
    base = quantize(model.params, "nf4")
    module = models.build_module(HF, compute_dtype=jnp.bfloat16)
    bf16_model = dataclasses.replace(model, module=module)
    result = train(bf16_model.module, base, CONFIG, counting_examples(),
                   config=TrainConfig(max_steps=8, batch_size=4, seq_len=12, learning_rate=3e-2, warmup_steps=0,
                                      dtype="bfloat16", remat="full"),
                   eval_examples=counting_examples(4), progress=False, log=lambda message: None)
    assert result.eval_after["loss"] < result.eval_before["loss"]
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(result.adapter))  # adapters stay float32


def test_cast_floating_keeps_packed_children_of_quantized_kernels(model):
    from lora_jax.train import cast_floating

    base = quantize(model.params, "nf4", double_quant=True)
    cast = cast_floating(base, jnp.bfloat16)
    kernel = cast["model"]["layers"]["0"]["self_attn"]["o_proj"]["kernel"]
    original = base["model"]["layers"]["0"]["self_attn"]["o_proj"]["kernel"]
    assert kernel.dtype == jnp.bfloat16
    assert [x.dtype for x in jax.tree.leaves(kernel)] == [x.dtype for x in jax.tree.leaves(original)]
    assert cast["model"]["norm"]["scale"].dtype == jnp.bfloat16


def test_train_state_and_counts_see_a_quantized_kernel_as_one_frozen_leaf(model):
    base = quantize(model.params, "nf4")
    config = CONFIG.replace(modules_to_save=["lm_head"])
    leaves = trainable_leaves(base, config)
    assert sorted(leaves) == ["lm_head.kernel"]
    adapter = lora_jax.init(config, base, jax.random.key(0))
    state = init_state(adapter, leaves, make_optimizer(1e-3, 10), seed=0)
    assert not any(is_quantized(x) for x in jax.tree.leaves(state.trainable, is_leaf=is_quantized))
    counts = lora_jax.count_parameters(base, adapter, config)
    plain = lora_jax.count_parameters(model.params, adapter, config)
    assert counts == plain  # a quantized kernel counts its parameters, not its packed bytes


def test_a_quantized_tied_embedding_trains_without_fallback(model):
    # Not bitsandbytes' default, but lora() takes it: the lookup dequantizes the table, the tied
    # head reads it transposed through the quantized path.
    tied = models.from_config(dict(HF, tie_word_embeddings=True), seed=2)
    base = quantize(tied.params, "nf4", target_modules=r".*(embed_tokens|_proj)", kernel_names=("kernel", "embedding"))
    assert is_quantized(base["model"]["embed_tokens"]["embedding"])
    adapter = lora_jax.init(CONFIG.replace(init_lora_weights=False), tied.params, jax.random.key(1))
    apply = lora_jax.lora(lambda p, x: tied.module.apply({"params": p}, x), CONFIG)
    ids = np.arange(10, dtype=np.int32).reshape(1, 10)
    grad = jax.jit(jax.grad(lambda a, p: apply(p, a, ids).mean()))
    with warnings.catch_warnings():
        warnings.simplefilter("error", lora_jax.LoraFallbackWarning)
        got = grad(adapter, base)
    want = grad(adapter, dequantize(base))
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-5 * float(np.abs(w).max()))
