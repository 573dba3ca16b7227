"""QLoRA against PyTorch: a tiny Llama loaded by transformers with bitsandbytes' 4-bit NF4 (and
8-bit) quantization plus a PEFT LoRA computes what lora_jax's quantized base plus the same
adapter computes, both ways (PEFT adapter -> lora_jax, lora_jax QLoRA adapter -> PEFT).

Tolerance. transformers' ``bnb_4bit_compute_dtype`` defaults to float32 and both sides then
dequantize to the same float32 weights (lora_jax's NF4 is bitsandbytes' bit for bit), so the
logits differ only by float32 summation order: within 1e-5 here (they measure ~4e-7 at logits of
~0.5). One bitsandbytes 0.50.2 detail: on a CPU with AVX512-BF16, a ``Linear4bit`` in inference
mode repacks its weight for a bfloat16 kernel on its first call (absmax rounded to bfloat16, the
product in bfloat16) whatever the compute dtype; the tests switch that path off
(``support_avx512bf16_for_cpu = False``) to compare float32 with float32, and check the bfloat16
path separately to bfloat16's precision.
"""

import tempfile
import warnings

import jax
import numpy as np
import pytest

import lora_jax
from lora_jax import models
from lora_jax.quantize import QuantConfig, quantize_array

torch = pytest.importorskip("torch")
bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=96, tie_word_embeddings=False, max_position_embeddings=64)
IDS = np.random.default_rng(0).integers(0, 96, (2, 12))
TOLERANCE = 1e-5  # float32 against float32 (see the module docstring)


@pytest.fixture(scope="module")
def checkpoint():
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).eval()
    directory = tempfile.mkdtemp()
    model.save_pretrained(directory)
    return directory


def torch_4bit(checkpoint, double_quant, bf16_cpu_kernel=False):
    quantization = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                   bnb_4bit_use_double_quant=double_quant,
                                                   bnb_4bit_compute_dtype=torch.float32)
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=quantization,
                                                              dtype=torch.float32).eval()
    assert model.config.quantization_config.bnb_4bit_compute_dtype == torch.float32
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = module.support_avx512bf16_for_cpu and bf16_cpu_kernel
    return model


def torch_logits(model):
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.numpy()


def jax_logits(model, params, adapter, config):
    with warnings.catch_warnings():
        warnings.simplefilter("error", lora_jax.LoraFallbackWarning)
        apply = lora_jax.lora(lambda p, x: model.module.apply({"params": p}, x), config)
        return np.asarray(jax.jit(apply)(params, adapter, IDS))


@pytest.mark.parametrize("double_quant", [False, True])
def test_peft_lora_on_a_bnb_nf4_llama_gives_lora_jax_logits(checkpoint, double_quant, tmp_path):
    base = torch_4bit(checkpoint, double_quant)
    tuned = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                      init_lora_weights=False)).eval()
    want = torch_logits(tuned)
    tuned.save_pretrained(tmp_path / "adapter")

    model = models.from_pretrained(checkpoint, quantize=QuantConfig("nf4", double_quant=double_quant))
    kernel = model.params["model"]["layers"]["1"]["mlp"]["down_proj"]["kernel"]
    layer = base.model.layers[1].mlp.down_proj.base_layer  # get_peft_model wrapped it in place
    np.testing.assert_array_equal(  # the same NF4 weight (bitsandbytes dequantizes it in float32 here)
        np.asarray(kernel.dequantize()).T, bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state))
    adapter, config = lora_jax.load_peft(tmp_path / "adapter", model.params)
    got = jax_logits(model, model.params, adapter, config)
    np.testing.assert_allclose(got, want, rtol=0, atol=TOLERANCE)


def test_bnb_bfloat16_cpu_kernel_agrees_to_bfloat16_precision(checkpoint):
    model = models.from_pretrained(checkpoint, quantize="nf4")
    plain = torch_logits(torch_4bit(checkpoint, False, bf16_cpu_kernel=True))
    got = np.asarray(model(IDS))
    # bfloat16 keeps 8 bits of mantissa: a few 1e-3 at logits of ~0.5 after two layers.
    assert np.abs(got - plain).max() < 2e-2 * np.abs(plain).max()


def test_lora_jax_qlora_adapter_loads_in_peft_on_the_bnb_model(checkpoint, tmp_path):
    model = models.from_pretrained(checkpoint, quantize=QuantConfig("nf4", double_quant=True))
    config = lora_jax.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                 init_lora_weights=False)  # B random too: as if trained
    adapter = lora_jax.init(config, model.params, jax.random.key(0))
    folder = lora_jax.save_peft(tmp_path / "adapter", adapter, config, model.params, task_type="CAUSAL_LM")
    assert "Trained on a quantized base (QLoRA): NF4" in (folder / "README.md").read_text()

    tuned = peft.PeftModel.from_pretrained(torch_4bit(checkpoint, True), folder).eval()
    np.testing.assert_allclose(jax_logits(model, model.params, adapter, config), torch_logits(tuned),
                               rtol=0, atol=TOLERANCE)


def int8_of_float16_kernels(params):
    """bitsandbytes' ``Int8Params`` quantizes the float16 weight: the same here, kernels only."""
    def leaf(path, x):
        names = [getattr(k, "key", "") for k in path]
        if names[-1] != "kernel" or "lm_head" in names:
            return x
        q = quantize_array(np.asarray(x).astype(np.float16), "int8")
        import dataclasses

        return dataclasses.replace(q, dtype=np.dtype(np.float32))
    return jax.tree_util.tree_map_with_path(leaf, params)


def test_bnb_int8_llama_stores_the_same_codes_and_computes_close_logits(checkpoint):
    quantization = transformers.BitsAndBytesConfig(load_in_8bit=True)
    base = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=quantization,
                                                             dtype=torch.float32).eval()
    model = models.from_pretrained(checkpoint)
    params = int8_of_float16_kernels(model.params)
    for name in ("self_attn.q_proj", "mlp.down_proj"):
        layer = base.model.layers[0].get_submodule(name)
        kernel = params["model"]["layers"]["0"]
        for part in name.split("."):
            kernel = kernel[part]
        kernel = kernel["kernel"]
        np.testing.assert_array_equal(np.asarray(kernel.codes), layer.weight.data.numpy())  # bnb's CB
        np.testing.assert_array_equal(np.asarray(kernel.scale), layer.weight.SCB.numpy())   # and SCB
    # bitsandbytes' int8 matmul (LLM.int8()) also quantizes the activations, row-wise to int8 from
    # float16, which lora_jax's weight-only int8 does not: the logits agree to that error only.
    want = torch_logits(base)
    got = np.asarray(model.module.apply({"params": lora_jax.quantize.dequantize(params)}, IDS))
    float_error = np.abs(torch_logits(transformers.AutoModelForCausalLM.from_pretrained(checkpoint)) - want).max()
    assert np.abs(got - want).max() < 1e-2 * np.abs(want).max()
    assert np.abs(got - want).max() < 2 * float_error  # no further from bnb than the float model is
