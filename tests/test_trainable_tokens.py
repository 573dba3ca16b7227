"""Trainable tokens (``trainable_token_indices``): only the listed rows train, PEFT's format both ways."""

from __future__ import annotations

import os
import re
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import safetensors.numpy
from hf_oracle import quiet

import lora_jax
from lora_jax import LoraConfig, models

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

IDS = np.array([[1, 5, 9, 3, 2, 7, 60, 11, 5]], dtype=np.int32)
TOKENS = [5, 60, 2]


def llama_dir(tmp_path_factory, tied: bool) -> str:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tied)
    out = str(tmp_path_factory.mktemp("tied" if tied else "untied"))
    quiet(transformers.AutoModelForCausalLM.from_config(config).save_pretrained, out)
    return out


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory) -> str:
    return llama_dir(tmp_path_factory, tied=True)


@pytest.fixture(scope="module")
def untied_dir(tmp_path_factory) -> str:
    return llama_dir(tmp_path_factory, tied=False)


def torch_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(IDS, dtype=torch.long)).logits.numpy()


def lora_logits(model, params, adapter, config) -> np.ndarray:
    apply = lora_jax.lora(lambda p, x: model.module.apply({"params": p}, x), config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lora_jax.TiedEmbeddingWarning)
        warnings.simplefilter("error", lora_jax.LoraFallbackWarning)
        return np.asarray(jax.jit(apply)(params, adapter, IDS))


def peft_trained(base_dir: str, **lora_kwargs):
    base = quiet(transformers.AutoModelForCausalLM.from_pretrained, base_dir)
    model = quiet(peft.get_peft_model, base, peft.LoraConfig(**lora_kwargs))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)
    return model.eval()


def test_only_the_listed_rows_change_in_training_lookup_and_tied_head():
    rng = np.random.default_rng(0)
    params = {"embed_tokens": {"embedding": jnp.asarray(rng.normal(size=(12, 4)), jnp.float32)},
              "q": {"kernel": jnp.asarray(rng.normal(size=(4, 4)), jnp.float32)}}
    config = LoraConfig(r=2, target_modules=["q"], trainable_token_indices=[3, 7])
    adapter = lora_jax.init(config, params, jax.random.key(0))
    np.testing.assert_array_equal(adapter["embed_tokens"]["trainable_tokens"],
                                  np.asarray(params["embed_tokens"]["embedding"])[[3, 7]])

    def apply(p, ids):  # a lookup and the tied head
        h = jnp.tanh(jnp.take(p["embed_tokens"]["embedding"], ids, axis=0) @ p["q"]["kernel"])
        return h @ p["embed_tokens"]["embedding"].T

    ids = jnp.array([[3, 1, 7, 7, 11, 0]])
    targets = jax.nn.one_hot(jnp.array([[7, 3, 1, 0, 3, 7]]), 12)
    lora_apply = lora_jax.lora(apply, config)

    def loss(ad):
        return optax.softmax_cross_entropy(lora_apply(params, ad, ids), targets).mean()

    opt = optax.adam(0.1)
    state = opt.init(adapter)
    start = adapter
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lora_jax.TiedEmbeddingWarning)
        for _ in range(3):
            updates, state = opt.update(jax.grad(loss)(adapter), state)
            adapter = optax.apply_updates(adapter, updates)
        merged_params = lora_jax.merge(params, adapter, config)
        # the adapted model is the base model on the merged table: lookup and head both see the new rows
        np.testing.assert_allclose(lora_apply(params, adapter, ids), apply(merged_params, ids), atol=1e-5)
    merged = merged_params["embed_tokens"]["embedding"]
    rows = np.asarray(adapter["embed_tokens"]["trainable_tokens"])
    assert np.abs(rows - np.asarray(start["embed_tokens"]["trainable_tokens"])).min() > 1e-3  # both rows trained
    table = np.asarray(params["embed_tokens"]["embedding"])
    changed = np.nonzero(np.abs(np.asarray(merged) - table).max(axis=1) > 0)[0]
    assert changed.tolist() == [3, 7]


def test_the_lookup_never_forms_a_dense_copy_of_the_table():
    vocab, dim = 97, 5
    params = {"embed_tokens": {"embedding": jnp.ones((vocab, dim))}, "q": {"kernel": jnp.ones((dim, dim))}}
    config = LoraConfig(r=2, target_modules=["q"], trainable_token_indices=[3, 7])
    adapter = lora_jax.init(config, params, jax.random.key(0))

    def apply(p, ids):
        return jnp.take(p["embed_tokens"]["embedding"], ids, axis=0) @ p["q"]["kernel"]

    lora_apply = lora_jax.lora(apply, config)
    step = jax.jit(jax.grad(lambda ad, p, ids: jnp.sum(lora_apply(p, ad, ids)))).lower(
        adapter, params, jnp.zeros((4, 6), jnp.int32)).compile()
    table_sized = [line for line in step.as_text().splitlines()
                   if re.search(rf"= f32\[{vocab},{dim}\]", line) and "parameter(" not in line]
    assert not table_sized, table_sized


@pytest.mark.parametrize("tied", [True, False])
def test_peft_trainable_tokens_load_with_matching_logits(tied_dir, untied_dir, tmp_path, tied):
    base_dir = tied_dir if tied else untied_dir
    spec = TOKENS if tied else {"embed_tokens": TOKENS, "lm_head": [1, 5]}
    theirs = peft_trained(base_dir, r=2, target_modules=["q_proj"], trainable_token_indices=spec)
    quiet(theirs.save_pretrained, str(tmp_path))
    keys = safetensors.numpy.load_file(str(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta" in keys
    assert ("base_model.model.lm_head.token_adapter.trainable_tokens_delta" in keys) is not tied
    model = models.from_pretrained(base_dir)
    adapter, config = lora_jax.load_peft(tmp_path, model.params)
    np.testing.assert_allclose(lora_logits(model, model.params, adapter, config), torch_logits(theirs),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("tied", [True, False])
def test_lora_jax_trainable_tokens_run_in_peft(tied_dir, untied_dir, tmp_path, tied):
    base_dir = tied_dir if tied else untied_dir
    model = models.from_pretrained(base_dir)
    spec = TOKENS if tied else {"embed_tokens": TOKENS, "lm_head": [1, 5]}
    config = LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=spec)
    rng = np.random.default_rng(2)
    adapter = jax.tree.map(lambda x: x + jnp.asarray(rng.normal(0, 0.5, x.shape), x.dtype),
                           lora_jax.init(config, model.params, jax.random.key(0)))
    lora_jax.save_peft(tmp_path, adapter, config, model.params)
    base = quiet(transformers.AutoModelForCausalLM.from_pretrained, base_dir)
    loaded = quiet(peft.PeftModel.from_pretrained, base, str(tmp_path)).eval()
    np.testing.assert_allclose(torch_logits(loaded), lora_logits(model, model.params, adapter, config),
                               atol=1e-4, rtol=1e-4)


def test_bad_trainable_token_settings_name_the_problem():
    params = {"embed_tokens": {"embedding": jnp.ones((10, 4))}, "q": {"kernel": jnp.ones((4, 4))}}
    key = jax.random.key(0)
    with pytest.raises(ValueError, match=r"token ids \[10\] are beyond its 10 rows"):
        lora_jax.init(LoraConfig(target_modules=["q"], r=2, trainable_token_indices=[1, 10]), params, key)
    with pytest.raises(ValueError, match="also adapts with LoRA"):
        lora_jax.init(LoraConfig(target_modules=["embed_tokens"], r=2, trainable_token_indices=[1]), params, key)
    with pytest.raises(ValueError, match="modules_to_save trains in full"):
        lora_jax.init(LoraConfig(target_modules=["q"], r=2, trainable_token_indices=[1],
                                 modules_to_save=["embed_tokens"]), params, key)
    with pytest.raises(ValueError, match="no lm_head module.*tied"):
        lora_jax.init(LoraConfig(target_modules=["q"], r=2,
                                 trainable_token_indices={"embed_tokens": [1], "lm_head": [2]}), params, key)
    config = LoraConfig(target_modules=["q"], r=2, trainable_token_indices=[1, 2])
    adapter = lora_jax.init(config, params, key)
    del adapter["embed_tokens"]
    with pytest.raises(ValueError, match=r"no entry for 'embed_tokens'.*trainable_token_indices"):
        lora_jax.lora(lambda p, x: x @ p["q"]["kernel"], config)(params, adapter, jnp.ones((1, 4)))
