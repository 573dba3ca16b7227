"""DoRA adapters both ways with PyTorch PEFT 0.21 on tiny Llama and GPT-2 (fan_in_fan_out) models."""

from __future__ import annotations

import json
import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from hf_oracle import quiet  # noqa: E402

import lora_jax  # noqa: E402
from lora_jax import LoraConfig, models  # noqa: E402

IDS = np.array([[1, 5, 9, 3, 2, 7, 60, 11]], dtype=np.int32)


def checkpoint(tmp_path_factory, name, config) -> str:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    out = str(tmp_path_factory.mktemp(name))
    quiet(model.save_pretrained, out)
    return out


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> str:
    return checkpoint(tmp_path_factory, "llama", transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False))


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> str:
    return checkpoint(tmp_path_factory, "gpt2", transformers.GPT2Config(
        vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32))


def torch_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(IDS, dtype=torch.long)).logits.numpy()


def lora_logits(model, params, adapter, config) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("error", lora_jax.LoraFallbackWarning)
        apply = lora_jax.lora(lambda p, ids: model.module.apply({"params": p}, ids), config)
        return np.asarray(jax.jit(apply)(params, adapter, IDS))


def peft_dora_model(base_dir: str, **lora_kwargs):
    base = quiet(transformers.AutoModelForCausalLM.from_pretrained, base_dir)
    model = quiet(peft.get_peft_model, base, peft.LoraConfig(use_dora=True, **lora_kwargs))
    initial = {n: p.detach().numpy().copy() for n, p in model.named_parameters() if "lora_magnitude" in n}
    torch.manual_seed(1)
    with torch.no_grad():  # as after training: B != 0 and magnitudes moved
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * (0.05 if "magnitude" in name else 0.2))
    return model.eval(), initial


def trained(adapter, seed=3):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: x + jnp.asarray(rng.normal(0, 0.2, x.shape), x.dtype), adapter)


LLAMA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"])


def test_peft_dora_llama_adapter_loads_with_matching_logits_and_initial_magnitudes(llama_dir, tmp_path):
    theirs, initial = peft_dora_model(llama_dir, **LLAMA)
    quiet(theirs.save_pretrained, str(tmp_path))
    keys = safetensors.numpy.load_file(str(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector" in keys
    model = models.from_pretrained(llama_dir)
    adapter, config = loaded = lora_jax.load_peft(tmp_path, model.params)
    assert config.use_dora
    np.testing.assert_allclose(lora_logits(model, loaded.params, adapter, config), torch_logits(theirs),
                               atol=1e-4, rtol=1e-4)
    # lora_jax's initial magnitudes are PEFT's: ||W|| over the input axis (over the vocabulary for embeddings)
    ours = lora_jax.init(LoraConfig(use_dora=True, **LLAMA), model.params, jax.random.key(0))
    for name, value in initial.items():
        module = name.removeprefix("base_model.model.").split(".lora_magnitude_vector")[0]
        np.testing.assert_allclose(ours[module]["lora_magnitude"], value.reshape(-1), rtol=1e-5, atol=1e-6)


def test_lora_jax_dora_llama_adapter_runs_in_peft_with_the_keys_peft_writes(llama_dir, tmp_path):
    model = models.from_pretrained(llama_dir)
    config = LoraConfig(use_dora=True, **LLAMA)
    adapter = trained(lora_jax.init(config, model.params, jax.random.key(0)))
    lora_jax.save_peft(tmp_path / "ours", adapter, config, model.params)
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["use_dora"] is True
    base = quiet(transformers.AutoModelForCausalLM.from_pretrained, llama_dir)
    loaded = quiet(peft.PeftModel.from_pretrained, base, str(tmp_path / "ours")).eval()
    np.testing.assert_allclose(torch_logits(loaded), lora_logits(model, model.params, adapter, config),
                               atol=1e-4, rtol=1e-4)
    theirs, _ = peft_dora_model(llama_dir, **LLAMA)
    quiet(theirs.save_pretrained, str(tmp_path / "theirs"))
    ours = safetensors.numpy.load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    peft_keys = safetensors.numpy.load_file(str(tmp_path / "theirs" / "adapter_model.safetensors"))
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in peft_keys.items()}


def test_merged_dora_llama_equals_unmerged(llama_dir):
    model = models.from_pretrained(llama_dir)
    config = LoraConfig(use_dora=True, **LLAMA)
    adapter = trained(lora_jax.init(config, model.params, jax.random.key(0)))
    merged = lora_jax.merge(model.params, adapter, config)
    np.testing.assert_allclose(model.module.apply({"params": merged}, IDS),
                               lora_logits(model, model.params, adapter, config), atol=1e-4, rtol=1e-4)


def test_dora_on_gpt2_conv1d_with_fan_in_fan_out_both_ways(gpt2_dir, tmp_path):
    kwargs = dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
    theirs, _ = peft_dora_model(gpt2_dir, **kwargs)
    quiet(theirs.save_pretrained, str(tmp_path / "theirs"))
    model = models.from_pretrained(gpt2_dir)
    adapter, config = lora_jax.load_peft(tmp_path / "theirs", model.params)
    np.testing.assert_allclose(lora_logits(model, model.params, adapter, config), torch_logits(theirs),
                               atol=1e-4, rtol=1e-4)

    config = LoraConfig(use_dora=True, **kwargs)
    adapter = trained(lora_jax.init(config, model.params, jax.random.key(0)))
    lora_jax.save_peft(tmp_path / "ours", adapter, config, model.params)
    base = quiet(transformers.AutoModelForCausalLM.from_pretrained, gpt2_dir)
    loaded = quiet(peft.PeftModel.from_pretrained, base, str(tmp_path / "ours")).eval()
    np.testing.assert_allclose(torch_logits(loaded), lora_logits(model, model.params, adapter, config),
                               atol=1e-4, rtol=1e-4)
