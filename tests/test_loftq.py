"""LoftQ (init_lora_weights="loftq"): the quantized base and correcting adapter of PEFT 0.21's
loftq_init (which quantizes with bitsandbytes), bit for bit after one iteration; the error falls
with iterations; the base trains as a QLoRA base."""

import contextlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax
from lora_jax import LoraConfig
from lora_jax.loftq import LoftQScalingWarning, loftq_factors
from lora_jax.quantize import Int8Array, NF4Array, is_quantized

torch = pytest.importorskip("torch")
bnb = pytest.importorskip("bitsandbytes")
loftq_utils = pytest.importorskip("peft.utils.loftq_utils")


@contextlib.contextmanager
def cuda_is_cpu():
    """Run PEFT's own loftq_init here: it moves tensors to "cuda" (bitsandbytes quantizes a
    parameter when it is moved off the host), so map that device to the CPU."""
    classes = (torch.Tensor, bnb.nn.Params4bit, bnb.nn.Int8Params)
    originals = {cls: cls.to for cls in classes}
    own = {cls for cls in classes if "to" in vars(cls)}

    def on_cpu(original):
        def to(self, *args, **kwargs):
            args = tuple("cpu" if a in ("cuda", "xpu") else a for a in args)
            if kwargs.get("device") in ("cuda", "xpu"):
                kwargs["device"] = "cpu"
            return original(self, *args, **kwargs)
        return to

    try:
        for cls, original in originals.items():
            cls.to = on_cpu(original)
        yield
    finally:
        for cls, original in originals.items():
            if cls in own:
                cls.to = original
            else:
                del cls.to  # inherited again


def peft_loftq(weight, rank, bits, iterations):
    """``(dequantized base, lora_A, lora_B)`` of PEFT's loftq_init on a torch (out, in) weight."""
    with cuda_is_cpu():
        base, a, b = loftq_utils.loftq_init(torch.tensor(weight), num_bits=bits, reduced_rank=rank,
                                            num_iter=iterations)
    return base.numpy(), a.numpy(), b.numpy()


WEIGHT = (np.random.default_rng(0).normal(size=(96, 128)) * 0.05).astype(np.float32)  # torch (out, in)


@pytest.mark.parametrize("bits, base_class", [(4, NF4Array), (8, Int8Array)])
def test_one_iteration_equals_peft_loftq_bit_for_bit_in_the_base(bits, base_class):
    peft_base, peft_a, peft_b = peft_loftq(WEIGHT, 8, bits, 1)
    a, b, base = loftq_factors(WEIGHT.T, 8, bits=bits, iterations=1)  # the Flax kernel is (in, out)
    assert isinstance(base, base_class)
    np.testing.assert_array_equal(np.asarray(base.dequantize()).T, peft_base)
    # A @ B is the rank-8 SVD of the same residual (singular vectors only up to sign): equal
    # within float32 SVD rounding (numpy's vs torch's LAPACK).
    np.testing.assert_allclose((a @ b).T, peft_b @ peft_a, rtol=0, atol=1e-4 * np.abs(peft_b @ peft_a).max())


@pytest.mark.parametrize("bits", [4, 8])
def test_more_iterations_equal_peft_up_to_svd_rounding(bits):
    peft_base, peft_a, peft_b = peft_loftq(WEIGHT, 8, bits, 3)
    a, b, base = loftq_factors(WEIGHT.T, 8, bits=bits, iterations=3)
    # The quantizer now sees W - L @ R, which both compute from their own SVD: block scales
    # may differ in the last bit, codes hardly ever.
    np.testing.assert_allclose(np.asarray(base.dequantize()).T, peft_base, rtol=0, atol=1e-6)
    np.testing.assert_allclose((a @ b).T, peft_b @ peft_a, rtol=0, atol=1e-4 * np.abs(peft_b @ peft_a).max())


def test_error_falls_with_iterations_and_beats_the_quantized_base_alone():
    kernel = WEIGHT.T
    plain = np.linalg.norm(kernel - np.asarray(lora_jax.quantize.quantize_array(kernel, "nf4").dequantize()))
    errors = []
    for iterations in (1, 2, 4, 8):
        a, b, base = loftq_factors(kernel, 8, iterations=iterations)
        errors.append(float(np.linalg.norm(kernel - np.asarray(base.dequantize()) - a @ b)))
    assert errors[0] < plain
    assert all(later <= earlier * (1 + 1e-6) for earlier, later in zip(errors, errors[1:])), errors
    assert errors[-1] < errors[0]


HF = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
          num_key_value_heads=2, vocab_size=96, max_position_embeddings=64)


@pytest.mark.parametrize("scan", [False, True])
def test_init_with_base_quantizes_the_targets_and_the_adapter_corrects_them(scan):
    from lora_jax import models

    model = models.from_config(HF, scan_layers=scan, seed=1)
    extra = dict(stacked_modules=r"model\.layers\..*") if scan else {}
    config = LoraConfig(r=8, lora_alpha=8, target_modules="all-linear", init_lora_weights="loftq",
                        loftq_config={"loftq_bits": 4, "loftq_iter": 2}, **extra)
    adapter, base = lora_jax.init_with_base(config, model.params, jax.random.key(0))
    kinds = {type(x).__name__ for x in jax.tree.leaves(base, is_leaf=is_quantized) if is_quantized(x)}
    assert kinds == {"NF4Array"}
    assert base["model"]["embed_tokens"]["embedding"] is model.params["model"]["embed_tokens"]["embedding"]
    apply = lambda p, x: model.module.apply({"params": p}, x)  # noqa: E731
    ids = np.random.default_rng(0).integers(0, 96, (2, 10))
    want = apply(model.params, ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error", lora_jax.LoraFallbackWarning)
        corrected = lora_jax.lora(apply, config)(base, adapter, ids)
    quantized_only = apply(lora_jax.quantize.dequantize(base), ids)
    assert float(jnp.abs(corrected - want).mean()) < float(jnp.abs(quantized_only - want).mean())
    # Stacked kernels: layer by layer, the factors of that layer's kernel alone.
    if scan:
        layer = np.asarray(model.params["model"]["layers"]["self_attn"]["q_proj"]["kernel"][1])
        a, b, one = loftq_factors(layer, 8, iterations=2)
        np.testing.assert_array_equal(adapter["model.layers.self_attn.q_proj"]["lora_A"][1], a)
        np.testing.assert_array_equal(base["model"]["layers"]["self_attn"]["q_proj"]["kernel"].dequantize()[1],
                                      one.dequantize())


def test_scaling_other_than_one_warns_as_peft_applies_it():
    params = {"dense": {"kernel": jnp.asarray(WEIGHT.T)}}
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["dense"], init_lora_weights="loftq",
                        loftq_config={"loftq_bits": 4})
    with pytest.warns(LoftQScalingWarning, match="scaling 2"):
        lora_jax.init_with_base(config, params, jax.random.key(0))


def test_bad_loftq_inputs_are_refused_naming_the_kernel():
    config = LoraConfig(r=2, target_modules=["w"], init_lora_weights="loftq", loftq_config={"loftq_iter": 2})
    quantized = lora_jax.quantize.quantize({"w": {"kernel": jnp.ones((64, 8))}}, "nf4")
    with pytest.raises(ValueError, match=r"w\.kernel.*already quantized"):
        lora_jax.init_with_base(config, quantized, jax.random.key(0))
    with pytest.raises(ValueError, match=r"values of targeted kernel w\.kernel"):
        lora_jax.init_with_base(config, {"w": {"kernel": jax.ShapeDtypeStruct((64, 8), jnp.float32)}},
                                jax.random.key(0))
    embed = LoraConfig(r=2, target_modules=["embed"], init_lora_weights="loftq", loftq_config={"loftq_bits": 4})
    with pytest.raises(ValueError, match=r"embedding table embed\.embedding"):
        lora_jax.init_with_base(embed, {"embed": {"embedding": jnp.ones((10, 64))}}, jax.random.key(0))
    with pytest.raises(ValueError, match="loftq_bits must be 4"):
        loftq_factors(WEIGHT, 2, bits=2)
