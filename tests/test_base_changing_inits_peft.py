"""PiSSA / OLoRA adapters with PEFT: trained in lora_jax, converted for the ORIGINAL base, loaded by
PyTorch PEFT; and PEFT's own PiSSA / OLoRA adapters loaded by re-running the decomposition as PEFT does."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hf_oracle import quiet

import lora_jax
from lora_jax import LoraConfig, models

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

IDS = np.array([[1, 5, 9, 3, 2, 7, 60, 11], [4, 4, 8, 15, 16, 23, 42, 0]], dtype=np.int32)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> str:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    out = str(tmp_path_factory.mktemp("llama"))
    quiet(transformers.AutoModelForCausalLM.from_config(config).save_pretrained, out)
    return out


def torch_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(IDS, dtype=torch.long)).logits.numpy()


def train(model, params, adapter, config, steps=4):
    """A few Adam steps of next-token loss on IDS: the adapter moves away from its start."""
    apply = lora_jax.lora(lambda p, x: model.module.apply({"params": p}, x), config)

    def loss(ad):
        logits = apply(params, ad, IDS[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, IDS[:, 1:]).mean()

    opt = optax.adam(3e-2)
    state = opt.init(adapter)
    step = jax.jit(lambda ad, st: (lambda g: opt.update(g, st, ad))(jax.grad(loss)(ad)))
    for _ in range(steps):
        updates, state = step(adapter, state)
        adapter = optax.apply_updates(adapter, updates)
    return adapter


# k_proj is 32 -> 16: rank 10 converts to rank 20 > min(in, out), which PEFT allows.
TARGETS = dict(target_modules=["q_proj", "k_proj", "down_proj"], r=10, lora_alpha=20)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_trained_adapter_converted_for_the_original_base_loads_in_peft_with_matching_logits(llama_dir, tmp_path, init):
    model = models.from_pretrained(llama_dir)
    config = LoraConfig(init_lora_weights=init, **TARGETS)
    initial, residual = lora_jax.init_with_base(config, model.params, jax.random.key(0))
    trained = train(model, residual, initial, config)
    assert max(float(jnp.abs(t - i).max()) for t, i in zip(jax.tree.leaves(trained), jax.tree.leaves(initial))) > 1e-2
    ours = np.asarray(lora_jax.lora(lambda p, x: model.module.apply({"params": p}, x), config)(residual, trained, IDS))

    lora_jax.save_peft(tmp_path, trained, config, residual, initial_adapter=initial)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (saved["r"], saved["lora_alpha"], saved["init_lora_weights"]) == (20, 40, True)
    base = quiet(transformers.AutoModelForCausalLM.from_pretrained, llama_dir)  # the unmodified model
    loaded = quiet(peft.PeftModel.from_pretrained, base, str(tmp_path)).eval()
    np.testing.assert_allclose(torch_logits(loaded), ours, atol=1e-4, rtol=1e-4)
    # and back: the plain rank-2r adapter on the original params gives the same logits
    adapter, plain = lora_jax.load_peft(tmp_path, model.params)
    back = lora_jax.lora(lambda p, x: model.module.apply({"params": p}, x), plain)(model.params, adapter, IDS)
    np.testing.assert_allclose(back, ours, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_peft_adapter_saved_with_its_init_loads_by_rerunning_the_decomposition(llama_dir, tmp_path, init):
    base = quiet(transformers.AutoModelForCausalLM.from_pretrained, llama_dir)
    theirs = quiet(peft.get_peft_model, base, peft.LoraConfig(init_lora_weights=init, **TARGETS))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    quiet(theirs.save_pretrained, str(tmp_path))  # no conversion: PEFT re-runs the init on load
    expected = torch_logits(theirs.eval())
    model = models.from_pretrained(llama_dir)
    adapter, config = loaded = lora_jax.load_peft(tmp_path, model.params)
    assert config.init_lora_weights == init
    got = lora_jax.lora(lambda p, x: model.module.apply({"params": p}, x), config)(loaded.params, adapter, IDS)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_initial_adapter_is_only_for_base_changing_inits(llama_dir, tmp_path):
    model = models.from_pretrained(llama_dir)
    config = LoraConfig(**TARGETS)
    adapter = lora_jax.init(config, model.params, jax.random.key(0))
    with pytest.raises(ValueError, match="initial_adapter converts an adapter trained on a rewritten base"):
        lora_jax.save_peft(tmp_path, adapter, config, model.params, initial_adapter=adapter)
    assert not any(tmp_path.iterdir())  # nothing written


def test_an_olora_file_for_a_fan_in_fan_out_model_is_refused():
    # PEFT 0.21's OLoRA ignores fan_in_fan_out, so the base it rebuilds is not lora_jax's.
    params = {"h": {"c_attn": {"kernel": jnp.asarray(np.random.default_rng(0).normal(size=(6, 9)), jnp.float32)}}}
    tensors = {"base_model.model.h.c_attn.lora_A.weight": np.zeros((2, 6), np.float32),
               "base_model.model.h.c_attn.lora_B.weight": np.zeros((9, 2), np.float32)}
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "init_lora_weights": "olora", "fan_in_fan_out": True}
    with pytest.raises(ValueError, match="olora.*fan_in_fan_out.*path_initial_model_for_weight_conversion"):
        lora_jax.from_peft(tensors, config, params)
    loaded = lora_jax.from_peft(tensors, dict(config, fan_in_fan_out=False), params)  # an (in, out) kernel is fine
    np.testing.assert_allclose(loaded.params["h"]["c_attn"]["kernel"] + 0.0, np.asarray(
        lora_jax.init_with_base(loaded.config, params, jax.random.key(0))[1]["h"]["c_attn"]["kernel"]))
