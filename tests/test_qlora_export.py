"""Merging and exporting a QLoRA adapter: ``save_merged`` dequantizes the base in float32 and adds
``s*A@B`` (transformers computes base + adapter from the checkpoint); re-quantizing warns with the new
error, measured against bitsandbytes' own re-quantization; ``save_peft`` writes the adapter as for a float
base, with the quantization noted in the model card."""

import json

import jax
import numpy as np
import pytest

import lora_jax
from lora_jax import models
from lora_jax.quantize import QuantConfig, quantize

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

HF = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
          num_key_value_heads=2, vocab_size=96, tie_word_embeddings=False, max_position_embeddings=64)
IDS = np.random.default_rng(1).integers(0, 96, (2, 10))
CONFIG = lora_jax.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)


@pytest.fixture(scope="module")
def qlora():
    model = models.from_config(HF, seed=5)
    base = quantize(model.params, "nf4", double_quant=True)
    # A trained adapter's size: B random (PEFT's init_lora_weights=False), scaled down.
    adapter = jax.tree.map(lambda x: 0.3 * x, lora_jax.init(CONFIG, model.params, jax.random.key(2)))
    tuned = lora_jax.lora(lambda p, x: model.module.apply({"params": p}, x), CONFIG)(base, adapter, IDS)
    return model, base, adapter, np.asarray(tuned)


def torch_logits(path):
    merged = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        return merged(torch.tensor(IDS)).logits.float().numpy(), merged


def test_merged_qlora_checkpoint_computes_base_plus_adapter_in_transformers(qlora, tmp_path):
    model, base, adapter, tuned = qlora
    out = models.save_merged(tmp_path / "merged", base, adapter, CONFIG, model.config)
    got, merged = torch_logits(out)
    assert merged.dtype == torch.float32 and json.loads((out / "config.json").read_text())["dtype"] == "float32"
    np.testing.assert_allclose(got, tuned, rtol=0, atol=2e-5)
    # bfloat16 on request: the same model to bfloat16's precision.
    out16 = models.save_merged(tmp_path / "merged16", base, adapter, CONFIG, model.config, dtype="bfloat16")
    got16, merged16 = torch_logits(out16)
    assert merged16.dtype == torch.bfloat16
    assert np.abs(got16 - tuned).max() < 2e-2 * np.abs(tuned).max()


def test_requantizing_warns_with_the_error_bitsandbytes_would_add(qlora, tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    model, base, adapter, tuned = qlora
    merged = lora_jax.merge(base, adapter, CONFIG, dequantize=True)
    with pytest.warns(models.RequantizeWarning, match=r"re-quantizing 14 merged kernels adds a new quantization "
                                                      r"error: max \|error\| (\S+), \|\|error\|\| / \|\|W\|\| = (\S+)") as record:
        out = models.save_merged(tmp_path / "requantized", base, adapter, CONFIG, model.config, requantize="nf4")
    message = str(record[0].message)
    written, _ = torch_logits(out)
    state = models.to_hf_state_dict(HF, merged)
    err2 = ref2 = 0.0
    max_abs = 0.0
    from safetensors.numpy import load_file

    tensors = load_file(out / "model.safetensors")
    for name, weight in state.items():
        if not name.endswith("proj.weight"):
            continue
        # bitsandbytes' own NF4 round trip of the merged torch weight: what load_in_4bit would give.
        w = torch.tensor(np.ascontiguousarray(weight, np.float32))
        packed, quant_state = bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4")
        expected = bnb.functional.dequantize_4bit(packed, quant_state).numpy()
        np.testing.assert_array_equal(tensors[name], expected, err_msg=name)
        diff = expected.astype(np.float64) - weight
        err2, ref2 = err2 + float((diff ** 2).sum()), ref2 + float((weight.astype(np.float64) ** 2).sum())
        max_abs = max(max_abs, float(np.abs(diff).max()))
    assert f"max |error| {max_abs:.3g}" in message
    assert f"||error|| / ||W|| = {(err2 / ref2) ** 0.5:.3g}" in message
    # The re-quantized model no longer computes base + adapter.
    assert np.abs(written - tuned).max() > 10 * 2e-5


def test_requantize_is_checked_before_anything_is_written(qlora, tmp_path):
    model, base, adapter, _ = qlora
    with pytest.raises(ValueError, match="Unknown quantization scheme 'nf5'"):
        models.save_merged(tmp_path / "x", base, adapter, CONFIG, model.config, requantize="nf5")
    assert not (tmp_path / "x").exists()


def test_merge_into_a_quantized_tree_needs_dequantize(qlora):
    model, base, adapter, _ = qlora
    with pytest.raises(ValueError, match=r"Cannot fold the adapter into quantized kernels .*dequantize=True"):
        lora_jax.merge(base, adapter, CONFIG)


def test_save_peft_writes_the_adapter_unchanged_with_the_quantization_in_the_card(qlora, tmp_path):
    model, base, adapter, _ = qlora
    quantized = lora_jax.save_peft(tmp_path / "q", adapter, CONFIG, base, base_model_name_or_path="org/tiny",
                                   task_type="CAUSAL_LM")
    plain = lora_jax.save_peft(tmp_path / "f", adapter, CONFIG, model.params, base_model_name_or_path="org/tiny",
                               task_type="CAUSAL_LM")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (quantized / name).read_bytes() == (plain / name).read_bytes(), name
    assert json.loads((quantized / "adapter_config.json").read_text())["base_model_name_or_path"] == "org/tiny"
    card = (quantized / "README.md").read_text()
    assert "Trained on a quantized base (QLoRA): NF4 (bitsandbytes format, blocks of 64, double quantization): " \
           "14 kernels" in card
    assert "QLoRA" not in (plain / "README.md").read_text()


def test_from_pretrained_quantize_then_save_merged_in_one_go(qlora, tmp_path):
    model, _, adapter, tuned = qlora
    directory = models.save_pretrained(tmp_path / "hf", HF, model.params)
    loaded = models.from_pretrained(directory, quantize=QuantConfig("nf4", double_quant=True))
    out = models.save_merged(tmp_path / "merged", loaded, adapter, CONFIG)
    np.testing.assert_allclose(torch_logits(out)[0], tuned, rtol=0, atol=2e-5)
