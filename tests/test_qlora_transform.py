"""lora() on a quantized base (QLoRA): the same outputs and adapter gradients as on the
dequantized float32 base, no fallback, packed codes untouched, and no dequantized kernel
kept alive across layers (XLA's compiled memory says so)."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax
from lora_jax import models
from lora_jax.quantize import dequantize, is_quantized, quantize

HF = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
          num_key_value_heads=2, vocab_size=96, tie_word_embeddings=True, rope_theta=10000.0,
          max_position_embeddings=64)
IDS = np.random.default_rng(0).integers(0, 96, (2, 12)).astype(np.int32)
STACKED = r"model\.layers\..*"


def setup(scan: bool, scheme: str, **options):
    model = models.from_config(HF, scan_layers=scan)
    extra = dict(stacked_modules=STACKED) if scan else {}
    quantized = quantize(model.params, scheme, **extra, **options)
    config = lora_jax.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, **extra)
    adapter = lora_jax.init(config, model.params, jax.random.key(0))
    apply = lora_jax.lora(lambda p, x: model.module.apply({"params": p}, x), config)
    return quantized, adapter, apply


@pytest.mark.parametrize("scan, scheme, options", [
    (False, "nf4", dict(double_quant=True)), (True, "nf4", dict(double_quant=True)), (True, "fp4", {}),
    (False, "int8", {}), (False, "int4", dict(blocksize=32))])
def test_quantized_base_matches_the_dequantized_float_base(scan, scheme, options):
    quantized, adapter, apply = setup(scan, scheme, **options)
    base = dequantize(quantized)  # float32 kernels with exactly the quantized values
    loss = lambda p, ad: jnp.mean(jnp.sin(apply(p, ad, IDS)))  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("error", lora_jax.LoraFallbackWarning)
        out = jax.jit(apply)(quantized, adapter, IDS)
        grads = jax.jit(jax.grad(loss, argnums=1))(quantized, adapter)
    np.testing.assert_allclose(out, apply(base, adapter, IDS), rtol=1e-5, atol=1e-5)
    want = jax.grad(loss, argnums=1)(base, adapter)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6), grads, want)


def test_training_lowers_the_loss_and_leaves_the_packed_codes_bitwise():
    quantized, adapter, apply = setup(False, "nf4", double_quant=True)
    before = [np.asarray(x).copy() for x in jax.tree.leaves(quantized)]
    optimizer = optax.adam(1e-2)

    @jax.jit
    def step(adapter, state):
        loss, grads = jax.value_and_grad(lambda a: jnp.mean(apply(quantized, a, IDS) ** 2))(adapter)
        updates, state = optimizer.update(grads, state, adapter)
        return optax.apply_updates(adapter, updates), state, loss

    state = optimizer.init(adapter)
    losses = []
    for _ in range(8):
        adapter, state, loss = step(adapter, state)
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]
    for old, new in zip(before, jax.tree.leaves(quantized)):
        np.testing.assert_array_equal(old, np.asarray(new))


def _step_memory(layers: int, scan: bool, scheme: str | None) -> tuple[float, float]:
    hf = dict(HF, hidden_size=128, intermediate_size=512, num_hidden_layers=layers, num_key_value_heads=4,
              vocab_size=128)
    module = models.build_module(hf, scan_layers=scan)
    ids = jnp.zeros((1, 8), jnp.int32)
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), ids))["params"]
    params = jax.tree.map(lambda s: np.full(s.shape, 0.01, s.dtype), shapes)
    extra = dict(stacked_modules=STACKED) if scan else {}
    frozen = quantize(params, scheme, **extra) if scheme else params
    config = lora_jax.LoraConfig(r=4, target_modules="all-linear", **extra)
    adapter = lora_jax.init(config, params, jax.random.key(1))
    apply = lora_jax.lora(lambda p, x: module.apply({"params": p}, x), config)
    grad = jax.jit(jax.grad(lambda a, p, x: jnp.mean(apply(p, a, x) ** 2)))
    memory = grad.lower(adapter, frozen, ids).compile().memory_analysis()
    return memory.argument_size_in_bytes, memory.temp_size_in_bytes


@pytest.mark.parametrize("scan", [False, True])
def test_no_dequantized_kernel_outlives_its_layer(scan):
    # one layer's kernels dequantized to float32: q, k, v, o (128x128) + gate, up, down (128x512)
    layer_bytes = 4 * (4 * 128 * 128 + 3 * 128 * 512)
    _, temp2 = _step_memory(2, scan, "nf4")
    args4, temp4 = _step_memory(4, scan, "nf4")
    assert temp4 - temp2 <= layer_bytes, (temp2, temp4, layer_bytes)  # 2 more layers, < 1 layer's weights
    float_args4, _ = _step_memory(4, scan, None)
    kernel_params = 4 * layer_bytes / 4
    # NF4 packs 0.5 bytes/param + 4/64 bytes of absmax: the frozen kernels shrink accordingly
    assert float_args4 - args4 == pytest.approx(kernel_params * (4 - 0.5625), rel=0.01)


def test_mixed_adapter_batch_on_a_quantized_base():
    quantized, adapter, apply = setup(False, "nf4")
    model = models.from_config(HF)
    config = lora_jax.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    other = lora_jax.init(config, model.params, jax.random.key(7))
    stacked = lora_jax.stack_adapters({"x": (adapter, config), "y": (other, config)}, quantized)
    mixed = lora_jax.lora(lambda p, x: model.module.apply({"params": p}, x), stacked.config)
    out = jax.jit(mixed)(quantized, stacked.adapter, IDS, adapter_ids=stacked.ids(["y", "x"]))
    np.testing.assert_allclose(out[1], apply(quantized, adapter, IDS)[1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[0], apply(quantized, other, IDS)[0], rtol=1e-5, atol=1e-5)


def test_merge_into_a_quantized_base_needs_dequantize():
    quantized, adapter, apply = setup(False, "nf4")
    config = lora_jax.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    with pytest.raises(ValueError, match=r"Cannot fold the adapter into quantized kernels \(model\.layers\.0"):
        lora_jax.merge(quantized, adapter, config)
    merged = lora_jax.merge(quantized, adapter, config, dequantize=True)
    assert not any(is_quantized(x) for x in jax.tree.leaves(merged, is_leaf=is_quantized))
    model = models.from_config(HF)
    np.testing.assert_allclose(model.module.apply({"params": merged}, IDS), apply(quantized, adapter, IDS),
                               rtol=1e-4, atol=1e-4)
