"""PEFT interop on real architectures: tiny random transformers Llama / GPT-2 models,
their weights shared into lora_jax.models, adapters checked against PeftModel logits."""

from __future__ import annotations

import json
import os
import shutil

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
from lora_jax.export import save_merged  # noqa: E402
from lora_jax.peft import load_peft, save_peft  # noqa: E402

IDS = np.array([[1, 5, 9, 3, 2, 7, 60, 11]], dtype=np.int32)
LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def unpack(loaded):
    """``adapter, config, params`` from a LoadedPeft (which unpacks as ``adapter, config``)."""
    return loaded.adapter, loaded.config, loaded.params


def checkpoint(tmp_path_factory, name: str, config) -> str:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # visible biases and norms, so mistakes show
        for pname, p in model.named_parameters():
            if pname.endswith("bias") or "norm" in pname or "ln_" in pname:
                p.normal_(0.5 if "weight" in pname else 0.0, 0.1)
    out = str(tmp_path_factory.mktemp(name))
    quiet(model.save_pretrained, out)
    return out


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> str:
    return checkpoint(tmp_path_factory, "llama", transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, rope_theta=10000.0))


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> str:
    return checkpoint(tmp_path_factory, "gpt2", transformers.GPT2Config(
        vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32))


def torch_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(IDS, dtype=torch.long)).logits.numpy()


def peft_logits(base_dir: str, adapter_dir) -> np.ndarray:
    base = quiet(transformers.AutoModelForCausalLM.from_pretrained, base_dir)
    return torch_logits(peft.PeftModel.from_pretrained(base, str(adapter_dir)).eval())


def lora_logits(model: models.Model, params, adapter, config) -> jax.Array:
    apply = lora_jax.lora(lambda p, ids: model.module.apply({"params": p}, ids), config)
    return jax.jit(apply)(params, adapter, IDS)


def random_adapter(config: LoraConfig, params, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {name: {"lora_A": jnp.asarray(rng.normal(0, 0.2, t.a_shape), jnp.float32),
                   "lora_B": jnp.asarray(rng.normal(0, 0.2, t.b_shape), jnp.float32)}
            for name, t in lora_jax.find_targets(config, params).items()}


def moved(params, config: LoraConfig, seed: int = 1):
    """``params`` with its trainable leaves (modules_to_save, biases) changed, as by training."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x, m: x + jnp.asarray(rng.normal(0, 0.2, x.shape), x.dtype) if m else x,
                        params, lora_jax.trainable_mask(params, config))


def llama_config(**changes) -> LoraConfig:
    fields = dict(r=4, lora_alpha=8, target_modules=LLAMA_LINEAR + ["embed_tokens"], use_rslora=True,
                  rank_pattern={"v_proj": 2, "layers.1.mlp.down_proj": 3}, alpha_pattern={"o_proj": 5},
                  modules_to_save=["lm_head"])
    fields.update(changes)
    return LoraConfig(**fields)


def test_base_models_agree(llama_dir, gpt2_dir):
    for path in (llama_dir, gpt2_dir):
        model = models.from_pretrained(path)
        expected = torch_logits(quiet(transformers.AutoModelForCausalLM.from_pretrained, path))
        np.testing.assert_allclose(model(IDS), expected, atol=1e-4, rtol=1e-4)


def test_llama_adapter_from_lora_jax_runs_in_peft(llama_dir, tmp_path):
    model = models.from_pretrained(llama_dir)
    config = llama_config()
    params = moved(model.params, config)
    adapter = random_adapter(config, params)
    save_peft(tmp_path / "ours", adapter, config, params, base_model_name_or_path=llama_dir,
              task_type="CAUSAL_LM")
    np.testing.assert_allclose(peft_logits(llama_dir, tmp_path / "ours"), lora_logits(model, params, adapter, config),
                               atol=1e-4, rtol=1e-4)

    # The same files, keys and shapes as PEFT writes for this config on this model.
    peft_config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_LINEAR + ["embed_tokens"],
                                  use_rslora=True, rank_pattern=dict(config.rank_pattern),
                                  alpha_pattern=dict(config.alpha_pattern), modules_to_save=["lm_head"],
                                  task_type="CAUSAL_LM")
    base = quiet(transformers.AutoModelForCausalLM.from_pretrained, llama_dir)
    quiet(peft.get_peft_model(base, peft_config).save_pretrained, str(tmp_path / "theirs"))
    ours = safetensors.numpy.load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    theirs = safetensors.numpy.load_file(str(tmp_path / "theirs" / "adapter_model.safetensors"))
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    assert "base_model.model.model.embed_tokens.base_layer.weight" in ours
    our_config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    their_config = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    assert set(our_config) == set(their_config)
    for key in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "modules_to_save", "task_type"):
        assert our_config[key] == their_config[key], key


def test_peft_trained_llama_adapter_loads_unrolled_and_scanned(llama_dir, tmp_path):
    base = quiet(transformers.AutoModelForCausalLM.from_pretrained, llama_dir)
    peft_model = peft.get_peft_model(base, peft.LoraConfig(
        r=4, lora_alpha=16, target_modules=LLAMA_LINEAR, rank_pattern={"gate_proj": 2},
        alpha_pattern={"q_proj": 3}, use_rslora=True, modules_to_save=["lm_head"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.2)
    quiet(peft_model.save_pretrained, str(tmp_path))
    expected = torch_logits(peft_model.eval())

    for scan_layers in (False, True):
        model = models.from_pretrained(llama_dir, scan_layers=scan_layers)
        adapter, config, params = unpack(load_peft(tmp_path, model.params))
        assert len(adapter) == (7 if scan_layers else 14)
        np.testing.assert_allclose(lora_logits(model, params, adapter, config), expected, atol=1e-4, rtol=1e-4)


def test_scanned_llama_adapter_exports_per_layer_and_round_trips(llama_dir, tmp_path):
    model = models.from_pretrained(llama_dir, scan_layers=True)
    config = llama_config(stacked_modules=r"model\.layers\..*", rank_pattern={"v_proj": 2}, modules_to_save=None)
    adapter = random_adapter(config, model.params)
    assert adapter["model.layers.self_attn.q_proj"]["lora_A"].shape == (2, 32, 4)
    save_peft(tmp_path, adapter, config, model.params)
    keys = safetensors.numpy.load_file(str(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in keys
    np.testing.assert_allclose(peft_logits(llama_dir, tmp_path), lora_logits(model, model.params, adapter, config),
                               atol=1e-4, rtol=1e-4)
    loaded, _, _ = unpack(load_peft(tmp_path, model.params))
    for name in adapter:
        for part in ("lora_A", "lora_B"):
            np.testing.assert_array_equal(loaded[name][part], adapter[name][part])


def test_gpt2_conv1d_adapter_both_ways(gpt2_dir, tmp_path):
    model = models.from_pretrained(gpt2_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True,
                        bias="lora_only")
    params = moved(model.params, config)
    adapter = random_adapter(config, params)
    save_peft(tmp_path / "ours", adapter, config, params)
    np.testing.assert_allclose(peft_logits(gpt2_dir, tmp_path / "ours"), lora_logits(model, params, adapter, config),
                               atol=1e-4, rtol=1e-4)

    base = quiet(transformers.AutoModelForCausalLM.from_pretrained, gpt2_dir)
    theirs = quiet(peft.get_peft_model, base, peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["c_attn", "mlp.c_proj"], fan_in_fan_out=True, bias="lora_only"))
    torch.manual_seed(2)
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.2)
    quiet(theirs.save_pretrained, str(tmp_path / "theirs"))
    adapter2, config2, params2 = unpack(load_peft(tmp_path / "theirs", model.params))
    np.testing.assert_allclose(lora_logits(model, params2, adapter2, config2), torch_logits(theirs.eval()),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_save_merged_loads_in_transformers(family, llama_dir, gpt2_dir, tmp_path):
    base_dir = llama_dir if family == "llama" else gpt2_dir
    model = models.from_pretrained(base_dir)
    if family == "llama":
        config = llama_config()
    else:
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
                            bias="all")
    params = moved(model.params, config)
    adapter = random_adapter(config, params)
    expected = lora_logits(model, params, adapter, config)
    out = save_merged(tmp_path / "merged", params, adapter, config, model.config)
    merged = quiet(transformers.AutoModelForCausalLM.from_pretrained, str(out))
    np.testing.assert_allclose(torch_logits(merged.eval()), expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_merged(tmp_path / "merged", params, adapter, config, model.config)
    # The same from a models.Model, with the trained params passed beside it.
    out = save_merged(tmp_path / "from_model", model, adapter, config, params=params)
    merged = quiet(transformers.AutoModelForCausalLM.from_pretrained, str(out))
    np.testing.assert_allclose(torch_logits(merged.eval()), expected, atol=1e-4, rtol=1e-4)


def test_save_merged_casts_dtype_and_copies_tokenizer(llama_dir, tmp_path):
    base_dir = shutil.copytree(llama_dir, tmp_path / "base")
    (base_dir / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    model = models.from_pretrained(base_dir)
    config = LoraConfig(r=2, target_modules=["q_proj"])
    adapter = random_adapter(config, model.params)
    out = save_merged(tmp_path / "merged", model, adapter, config, dtype=jnp.bfloat16)
    tensors = safetensors.numpy.load_file(str(out / "model.safetensors"))
    assert {str(v.dtype) for v in tensors.values()} == {"bfloat16"}
    assert (out / "tokenizer_config.json").exists()
    with pytest.raises(TypeError, match="model_config"):
        save_merged(tmp_path / "x", model.params, adapter, config)


FAMILIES = {
    "mistral": (lambda: transformers.MistralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, sliding_window=4),
        transformers.AutoModelForCausalLM, ["q_proj", "v_proj", "down_proj"], None),
    "qwen2": (lambda: transformers.Qwen2Config(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True),
        transformers.AutoModelForCausalLM, ["q_proj", "k_proj", "o_proj", "up_proj"], None),
    "bert": (lambda: transformers.BertConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=32, num_labels=3),
        transformers.AutoModelForSequenceClassification, ["query", "value", "dense"], ["classifier"]),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_adapter_parity_with_peft_for_other_families(family, tmp_path):
    """lora_jax -> PeftModel, and a PEFT-trained adapter -> lora_jax, for Mistral, Qwen2, BERT."""
    make_config, auto, targets, to_save = FAMILIES[family]
    torch.manual_seed(0)
    torch_model = auto.from_config(make_config()).eval()
    with torch.no_grad():  # non-zero biases so a bias mistake shows
        for pname, p in torch_model.named_parameters():
            if pname.endswith("bias"):
                p.normal_(0.0, 0.1)
    base_dir = tmp_path / "base"
    quiet(torch_model.save_pretrained, str(base_dir))
    model = models.from_pretrained(base_dir)

    def torch_out(m):
        with torch.no_grad():
            return m(torch.as_tensor(IDS, dtype=torch.long)).logits.numpy()

    def jax_out(params, adapter, config):
        return jax.jit(lora_jax.lora(lambda p, ids: model.module.apply({"params": p}, ids), config))(
            params, adapter, IDS)

    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, modules_to_save=to_save,
                        bias="lora_only", rank_pattern={targets[0]: 2})
    params = moved(model.params, config)
    adapter = random_adapter(config, params)
    save_peft(tmp_path / "ours", adapter, config, params, base_model_name_or_path=str(base_dir))
    ours = peft.PeftModel.from_pretrained(quiet(auto.from_pretrained, str(base_dir)), str(tmp_path / "ours")).eval()
    np.testing.assert_allclose(torch_out(ours), jax_out(params, adapter, config), atol=1e-4, rtol=1e-4)

    # PyTorch-side adapter with random B, trained-looking biases and head: loads and matches.
    peft_model = peft.get_peft_model(quiet(auto.from_pretrained, str(base_dir)), peft.LoraConfig(
        r=4, lora_alpha=16, target_modules=targets, modules_to_save=to_save, bias="lora_only",
        alpha_pattern={targets[-1]: 4}, use_rslora=True, init_lora_weights=False))
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    quiet(peft_model.save_pretrained, str(tmp_path / "theirs"))
    adapter2, config2, params2 = unpack(load_peft(tmp_path / "theirs", model.params))
    np.testing.assert_allclose(jax_out(params2, adapter2, config2), torch_out(peft_model.eval()),
                               atol=1e-4, rtol=1e-4)
