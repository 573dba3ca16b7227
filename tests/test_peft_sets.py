"""Multi-adapter directories in PEFT's layout, both ways, against PyTorch PEFT.

A tiny random Llama carries three adapters of different ranks, targets and
rsLoRA. lora_jax's set directory loads in PEFT with every adapter selectable by
name (logits within 1e-4 of lora_jax's), and a directory PEFT's
``save_pretrained`` wrote with several adapters loads back into lora_jax.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from hf_oracle import quiet  # noqa: E402

import lora_jax  # noqa: E402
from lora_jax import LoraConfig, load_peft_set, models, save_peft_set  # noqa: E402

IDS = np.array([[1, 5, 9, 3, 2, 7, 60, 11], [4, 4, 8, 15, 16, 23, 42, 0]], dtype=np.int32)
# Names that are not substrings of PEFT's "lora_" prefix (PEFT warns about those).
SET = {
    "chat": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "code": dict(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "k_proj", "o_proj"],
                 rank_pattern={"o_proj": 2}),
    "math": dict(r=2, lora_alpha=3, target_modules=["gate_proj", "up_proj", "down_proj"],
                 alpha_pattern={"down_proj": 5}),
}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> str:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    out = str(tmp_path_factory.mktemp("llama"))
    quiet(model.save_pretrained, out)
    return out


@pytest.fixture(scope="module")
def model(llama_dir) -> models.Model:
    return models.from_pretrained(llama_dir)


def base(llama_dir):
    return quiet(transformers.AutoModelForCausalLM.from_pretrained, llama_dir).eval()


def torch_logits(peft_model) -> np.ndarray:
    with torch.no_grad():
        return peft_model(torch.as_tensor(IDS, dtype=torch.long)).logits.numpy()


def lora_logits(model: models.Model, params, adapter, config) -> np.ndarray:
    apply = lora_jax.lora(lambda p, ids: model.module.apply({"params": p}, ids), config)
    return np.asarray(jax.jit(apply)(params, adapter, IDS))


def random_set(params) -> dict:
    rng = np.random.default_rng(0)
    out = {}
    for name, kwargs in SET.items():
        config = LoraConfig(**kwargs)
        adapter = {m: {"lora_A": jnp.asarray(rng.normal(0, 0.3, t.a_shape), jnp.float32),
                       "lora_B": jnp.asarray(rng.normal(0, 0.3, t.b_shape), jnp.float32)}
                   for m, t in lora_jax.find_targets(config, params).items()}
        out[name] = (adapter, config)
    return out


def test_set_written_by_lora_jax_is_selectable_in_peft(llama_dir, model, tmp_path):
    adapters = random_set(model.params)
    folders = save_peft_set(tmp_path, adapters, model.params, default="chat",
                            base_model_name_or_path=llama_dir, task_type="CAUSAL_LM")
    assert folders == {"chat": tmp_path, "code": tmp_path / "code", "math": tmp_path / "math"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "code", "math"]

    peft_model = quiet(peft.PeftModel.from_pretrained, base(llama_dir), str(tmp_path))  # the top one: "default"
    for name in ("code", "math"):
        quiet(peft_model.load_adapter, str(tmp_path / name), adapter_name=name)
    logits = {}
    for name, peft_name in (("chat", "default"), ("code", "code"), ("math", "math")):
        peft_model.set_adapter(peft_name)
        logits[name] = torch_logits(peft_model)
        adapter, config = adapters[name]
        np.testing.assert_allclose(lora_logits(model, model.params, adapter, config), logits[name],
                                   atol=1e-4, rtol=1e-4, err_msg=name)
    assert not np.allclose(logits["chat"], logits["code"], atol=1e-3)  # the adapters really differ

    # from_pretrained(..., adapter_name=) on a sub-folder reads it on its own, too.
    alone = quiet(peft.PeftModel.from_pretrained, base(llama_dir), str(tmp_path / "code"), adapter_name="code")
    np.testing.assert_allclose(torch_logits(alone), logits["code"], atol=1e-5)

    loaded = load_peft_set(tmp_path, model.params, default="chat")
    assert list(loaded) == ["chat", "code", "math"]
    for name, (adapter, config) in adapters.items():
        assert sorted(loaded[name].adapter) == sorted(adapter)
        for module, pair in adapter.items():
            np.testing.assert_array_equal(loaded[name].adapter[module]["lora_B"], pair["lora_B"])
            assert loaded[name].config.scaling(module) == pytest.approx(config.scaling(module))


def test_set_written_by_peft_loads_every_adapter(llama_dir, model, tmp_path):
    peft_model = quiet(peft.get_peft_model, base(llama_dir), peft.LoraConfig(**SET["chat"]))  # "default"
    for name in ("code", "math"):
        quiet(peft_model.add_adapter, name, peft.LoraConfig(**SET[name]))
    torch.manual_seed(3)
    with torch.no_grad():
        for pname, p in peft_model.named_parameters():
            if "lora_" in pname:
                p.normal_(0.0, 0.3)
    quiet(peft_model.save_pretrained, str(tmp_path))
    assert (tmp_path / "code" / "adapter_config.json").is_file()
    assert json.loads((tmp_path / "math" / "adapter_config.json").read_text())["r"] == 2

    adapters = load_peft_set(tmp_path, model.params)
    assert list(adapters) == ["default", "code", "math"]
    for name in adapters:
        peft_model.set_adapter(name)
        adapter, config = adapters[name]
        np.testing.assert_allclose(lora_logits(model, adapters[name].params, adapter, config),
                                   torch_logits(peft_model.eval()), atol=1e-4, rtol=1e-4, err_msg=name)
    only = load_peft_set(tmp_path, model.params, names=["math"])
    assert list(only) == ["math"]


def test_weighted_combination_saved_in_a_set_loads_in_peft(llama_dir, model, tmp_path):
    adapters = random_set(model.params)
    adapters["mix"] = lora_jax.weighted_adapter({k: adapters[k] for k in ("chat", "code")}, [0.6, 0.4], "cat",
                                                params=model.params)
    save_peft_set(tmp_path, {k: adapters[k] for k in ("chat", "mix")}, model.params)  # no "default": sub-folders only
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "chat", "mix"]
    peft_model = quiet(peft.PeftModel.from_pretrained, base(llama_dir), str(tmp_path / "mix"), adapter_name="mix")
    adapter, config = adapters["mix"]
    np.testing.assert_allclose(lora_logits(model, model.params, adapter, config), torch_logits(peft_model),
                               atol=1e-4, rtol=1e-4)


def test_bad_sets_are_refused_before_anything_is_written(model, tmp_path):
    adapters = random_set(model.params)
    target = tmp_path / "out"
    with pytest.raises(ValueError, match=r"adapter_name '\.\./x' is not a plain folder name"):
        save_peft_set(target, {"chat": adapters["chat"], "../x": adapters["code"]}, model.params)
    with pytest.raises(ValueError, match=r"default='other' is not one of the adapters \(chat, code\)"):
        save_peft_set(target, {k: adapters[k] for k in ("chat", "code")}, model.params, default="other")
    with pytest.raises(ValueError, match="has an adapter named 'default'.*default='chat'"):
        save_peft_set(target, {"default": adapters["code"], "chat": adapters["chat"]}, model.params, default="chat")
    other_base = {**adapters["math"][0]}
    module = "model.layers.0.mlp.up_proj"
    other_base[module] = {"lora_A": jnp.zeros((16, 2)), "lora_B": other_base[module]["lora_B"]}
    with pytest.raises(ValueError, match=r"Adapter 'math': adapter\['model.layers.0.mlp.up_proj'\]\['lora_A'\] "
                                         r"has shape \(16, 2\)"):
        save_peft_set(target, {"chat": adapters["chat"], "math": (other_base, adapters["math"][1])}, model.params)
    with pytest.raises(TypeError, match=r"adapters\['code'\] must be an \(adapter, LoraConfig\) pair"):
        save_peft_set(target, {"chat": adapters["chat"], "code": adapters["code"][0]}, model.params)
    assert not target.exists()

    save_peft_set(target, {k: adapters[k] for k in ("chat", "code")}, model.params)
    before = (target / "code" / "adapter_model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="is not empty"):
        save_peft_set(target, {"math": adapters["math"], "code": adapters["chat"]}, model.params)
    assert not (target / "math").exists()
    assert (target / "code" / "adapter_model.safetensors").read_bytes() == before
    save_peft_set(target, {"code": adapters["chat"]}, model.params, overwrite=True)
    assert load_peft_set(target, model.params)["code"].config.r == 4  # replaced; "chat" kept
    assert list(load_peft_set(target, model.params)) == ["chat", "code"]


def test_loading_a_set_names_what_is_missing(model, tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no adapter"):
        load_peft_set(tmp_path, model.params)
    adapters = random_set(model.params)
    save_peft_set(tmp_path, {"chat": adapters["chat"]}, model.params)
    with pytest.raises(FileNotFoundError, match="has no adapter 'code'; it holds chat"):
        load_peft_set(tmp_path, model.params, names=["code"])
