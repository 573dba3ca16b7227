"""PEFT adapter interop: lora_jax <-> Hugging Face PEFT on a tiny model, checked in PyTorch.

The torch model below names its modules like a transformers decoder
(``model.layers.0.self_attn.q_proj``, ``model.embed_tokens``, ``lm_head``) plus a
``classifier`` head for ``modules_to_save``; the JAX model is the same function over
a params tree that mirrors those names (kernel = weight.T).
"""

from __future__ import annotations

import copy
import json
import os
import re
import sys
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import lora_jax  # noqa: E402
from lora_jax import LoraConfig  # noqa: E402
from lora_jax.peft import from_peft, load_peft, save_peft, to_peft  # noqa: E402

VOCAB, DIM, HEADS, LAYERS, CLASSES = 11, 8, 2, 2, 3
HEAD_DIM = DIM // HEADS
PREFIX = "base_model.model."


def unpack(loaded):
    """``adapter, config, params`` from a LoadedPeft (which unpacks as ``adapter, config``)."""
    return loaded.adapter, loaded.config, loaded.params


# -- the torch model ---------------------------------------------------------------------------

class Attention(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = torch.nn.Linear(DIM, DIM, bias=True)
        self.k_proj = torch.nn.Linear(DIM, DIM, bias=True)
        self.v_proj = torch.nn.Linear(DIM, DIM, bias=False)
        self.o_proj = torch.nn.Linear(DIM, DIM, bias=True)


class MLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up_proj = torch.nn.Linear(DIM, 2 * DIM, bias=False)
        self.down_proj = torch.nn.Linear(2 * DIM, DIM, bias=True)


class Layer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.self_attn = Attention()
        self.mlp = MLP()
        self.norm = torch.nn.LayerNorm(DIM)


class Inner(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = torch.nn.Embedding(VOCAB, DIM)
        self.layers = torch.nn.ModuleList([Layer() for _ in range(LAYERS)])


class TinyLM(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.model = Inner()
        self.lm_head = torch.nn.Linear(DIM, VOCAB, bias=False)
        self.classifier = torch.nn.Linear(DIM, CLASSES, bias=True)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.model.embed_tokens(ids)
        for layer in self.model.layers:
            attn = layer.self_attn
            a = attn.q_proj(h) * torch.sigmoid(attn.k_proj(h)) + attn.v_proj(h)
            h = h + attn.o_proj(a)
            h = h + layer.mlp.down_proj(torch.tanh(layer.mlp.up_proj(layer.norm(h))))
        return torch.cat([self.lm_head(h).flatten(1), self.classifier(h.mean(1))], axis=-1)


def torch_model(seed: int = 0) -> TinyLM:
    torch.manual_seed(seed)
    model = TinyLM().eval()
    with torch.no_grad():  # non-trivial norm parameters
        for layer in model.model.layers:
            layer.norm.weight.uniform_(0.5, 1.5)
            layer.norm.bias.normal_(0.0, 0.1)
    return model


# -- the JAX model (same function, params tree mirrors the torch names) -------------------------

def dense(p: dict, x: jax.Array) -> jax.Array:
    y = x @ p["kernel"]
    return y + p["bias"] if "bias" in p else y


def layer_norm(p: dict, x: jax.Array) -> jax.Array:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / jnp.sqrt(var + 1e-5) * p["scale"] + p["bias"]


def block(p: dict, h: jax.Array) -> jax.Array:
    attn = p["self_attn"]
    a = dense(attn["q_proj"], h) * jax.nn.sigmoid(dense(attn["k_proj"], h)) + dense(attn["v_proj"], h)
    h = h + dense(attn["o_proj"], a)
    return h + dense(p["mlp"]["down_proj"], jnp.tanh(dense(p["mlp"]["up_proj"], layer_norm(p["norm"], h))))


def head(params: dict, h: jax.Array) -> jax.Array:
    logits = dense(params["lm_head"], h).reshape(h.shape[0], -1)
    return jnp.concatenate([logits, dense(params["classifier"], h.mean(1))], axis=-1)


def jax_apply(params: dict, ids: jax.Array) -> jax.Array:
    h = params["model"]["embed_tokens"]["embedding"][ids]
    for p in params["model"]["layers"]:
        h = block(p, h)
    return head(params, h)


def jax_apply_stacked(params: dict, ids: jax.Array) -> jax.Array:
    h = params["model"]["embed_tokens"]["embedding"][ids]
    h, _ = jax.lax.scan(lambda h, p: (block(p, h), None), h, params["model"]["layers"])
    return head(params, h)


def to_jax(model: TinyLM) -> dict:
    """The params tree of ``model``: kernel = weight.T, LayerNorm weight -> scale."""
    sd = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}

    def lin(name: str) -> dict:
        out = {"kernel": jnp.asarray(sd[f"{name}.weight"].T)}
        if f"{name}.bias" in sd:
            out["bias"] = jnp.asarray(sd[f"{name}.bias"])
        return out

    layers = []
    for i in range(LAYERS):
        pre = f"model.layers.{i}"
        layers.append({
            "self_attn": {n: lin(f"{pre}.self_attn.{n}") for n in ("q_proj", "k_proj", "v_proj", "o_proj")},
            "mlp": {n: lin(f"{pre}.mlp.{n}") for n in ("up_proj", "down_proj")},
            "norm": {"scale": jnp.asarray(sd[f"{pre}.norm.weight"]), "bias": jnp.asarray(sd[f"{pre}.norm.bias"])},
        })
    return {
        "model": {"embed_tokens": {"embedding": jnp.asarray(sd["model.embed_tokens.weight"])}, "layers": layers},
        "lm_head": lin("lm_head"),
        "classifier": lin("classifier"),
    }


def stack_layers(params: dict) -> dict:
    out = dict(params)
    out["model"] = dict(params["model"], layers=jax.tree.map(lambda *xs: jnp.stack(xs), *params["model"]["layers"]))
    return out


IDS = np.array([[1, 4, 7, 2, 9], [3, 3, 0, 10, 5]], dtype=np.int32)
TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj", "embed_tokens", "lm_head"]


def rich_config(**changes) -> LoraConfig:
    """rank_pattern, alpha_pattern, rsLoRA, embeddings, bias="lora_only", modules_to_save."""
    fields = dict(
        r=4, lora_alpha=8, target_modules=TARGETS, use_rslora=True,
        rank_pattern={"v_proj": 2, "layers.1.self_attn.q_proj": 3}, alpha_pattern={"o_proj": 5, "lm_head": 3},
        bias="lora_only", modules_to_save=["classifier"], init_lora_weights=False,
    )
    fields.update(changes)
    return LoraConfig(**fields)


def random_adapter(config: LoraConfig, params: dict, seed: int = 1) -> dict:
    """A non-zero adapter (numpy RNG: cheaper than per-shape JAX dispatch on tiny tests)."""
    rng = np.random.default_rng(seed)
    return {name: {"lora_A": jnp.asarray(rng.normal(0.0, 0.3, t.a_shape), jnp.float32),
                   "lora_B": jnp.asarray(rng.normal(0.0, 0.3, t.b_shape), jnp.float32)}
            for name, t in lora_jax.find_targets(config, params).items()}


def trained(params: dict, config: LoraConfig, seed: int = 1) -> tuple[dict, dict]:
    """A random adapter and params whose trainable leaves (modules_to_save, biases) moved."""
    rng = np.random.default_rng(seed + 100)
    mask = lora_jax.trainable_mask(params, config)
    params = jax.tree.map(
        lambda x, m: x + jnp.asarray(rng.normal(0.0, 0.3, x.shape), x.dtype) if m else x, params, mask)
    return random_adapter(config, params, seed), params


def torch_outputs(model: torch.nn.Module) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(IDS, dtype=torch.long)).numpy()


def peft_load(adapter_dir, seed: int = 0, **kwargs) -> peft.PeftModel:
    return peft.PeftModel.from_pretrained(torch_model(seed), str(adapter_dir), **kwargs).eval()


def read_dir(adapter_dir) -> tuple[dict, dict]:
    tensors = safetensors.numpy.load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        return tensors, json.load(f)


@pytest.fixture(scope="module")
def base() -> tuple[TinyLM, dict]:
    model = torch_model()
    return model, to_jax(model)


def train_in_torch(out: str, **changes) -> np.ndarray:
    """Save an adapter trained (randomised) in PyTorch PEFT; return the PEFT model's outputs."""
    fields = dict(
        r=4, lora_alpha=8, target_modules=TARGETS, use_rslora=True,
        rank_pattern={"v_proj": 2, "layers.1.self_attn.q_proj": 3}, alpha_pattern={"o_proj": 5},
        bias="lora_only", modules_to_save=["classifier"],
    )
    fields.update(changes)
    peft_model = peft.get_peft_model(torch_model(), peft.LoraConfig(**fields))
    torch.manual_seed(3)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:  # LoRA factors, the classifier copy, targeted biases
                p.normal_(0.0, 0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model.save_pretrained(out)
    return torch_outputs(peft_model.eval())


@pytest.fixture(scope="module")
def torch_trained_dir(tmp_path_factory) -> tuple[str, np.ndarray]:
    """rank_pattern (one layer differs), alpha_pattern, rsLoRA, embeddings, lora_only bias, classifier."""
    out = str(tmp_path_factory.mktemp("torch_trained"))
    return out, train_in_torch(out)


# -- (a) lora_jax -> PEFT -----------------------------------------------------------------------

def test_saved_adapter_loads_in_peft_with_same_outputs(base, tmp_path):
    model, params = base
    config = rich_config()
    adapter, params = trained(params, config)
    expected = jax.jit(lora_jax.lora(jax_apply, config))(params, adapter, IDS)

    save_peft(tmp_path, adapter, config, params, save_embedding_layers=False)
    got = torch_outputs(peft_load(tmp_path))
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)
    # Sanity: the adapter changes the outputs, so the comparison is not vacuous.
    assert np.abs(torch_outputs(model) - np.asarray(expected)).max() > 1e-2


def test_bias_all_exports_every_bias(base, tmp_path):
    _, params = base
    config = rich_config(bias="all", modules_to_save=None)
    adapter, params = trained(params, config)
    expected = lora_jax.lora(jax_apply, config)(params, adapter, IDS)
    save_peft(tmp_path, adapter, config, params, save_embedding_layers=False)
    tensors, _ = read_dir(tmp_path)
    assert PREFIX + "model.layers.0.self_attn.k_proj.bias" in tensors  # not targeted: plain key
    assert PREFIX + "model.layers.0.self_attn.q_proj.base_layer.bias" in tensors  # targeted
    assert PREFIX + "model.layers.1.norm.bias" in tensors
    np.testing.assert_allclose(torch_outputs(peft_load(tmp_path)), expected, atol=1e-4, rtol=1e-4)


# -- (b) PEFT -> lora_jax -----------------------------------------------------------------------

def test_peft_trained_adapter_loads_with_same_outputs(base, torch_trained_dir):
    _, params = base
    adapter_dir, expected = torch_trained_dir
    adapter, config, new_params = unpack(load_peft(adapter_dir, params))
    got = jax.jit(lora_jax.lora(jax_apply, config))(new_params, adapter, IDS)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)
    # The file's exact modules, ranks and scalings; modules_to_save and biases stay trainable.
    targets = lora_jax.find_targets(config, new_params)
    assert set(targets) == set(adapter)
    assert len(targets) == 4 * LAYERS + 2
    assert targets["model.layers.1.self_attn.q_proj"].rank == 3
    assert targets["model.layers.0.self_attn.v_proj"].scaling == pytest.approx(8 / np.sqrt(2))
    assert targets["model.layers.0.self_attn.o_proj"].scaling == pytest.approx(5 / 2)
    mask = lora_jax.trainable_mask(new_params, config)
    assert mask["classifier"]["kernel"] and mask["model"]["layers"][0]["self_attn"]["q_proj"]["bias"]
    assert not mask["model"]["layers"][0]["self_attn"]["k_proj"]["bias"]
    # Leaves the file does not touch are passed through, not copied.
    assert new_params["model"]["layers"][0]["mlp"]["up_proj"]["kernel"] is params["model"]["layers"][0]["mlp"]["up_proj"]["kernel"]
    # The documented two-value form unpacks too (design.md section 4).
    adapter2, config2 = load_peft(adapter_dir, params)
    assert config2 == config and set(adapter2) == set(adapter)


def test_peft_bias_all_with_modules_to_save_loads(base, tmp_path):
    # PEFT then also writes 'classifier.modules_to_save.bias' and 'classifier.original_module.bias'.
    expected = train_in_torch(str(tmp_path), bias="all")
    keys = read_dir(tmp_path)[0]
    assert f"{PREFIX}classifier.original_module.bias" in keys and f"{PREFIX}classifier.modules_to_save.bias" in keys
    adapter, config, params = unpack(load_peft(tmp_path, base[1]))
    assert config.bias == "all"
    np.testing.assert_allclose(lora_jax.lora(jax_apply, config)(params, adapter, IDS), expected, atol=1e-4, rtol=1e-4)


def test_merge_of_loaded_adapter_matches_peft(base, torch_trained_dir):
    _, params = base
    adapter_dir, expected = torch_trained_dir
    adapter, config, new_params = unpack(load_peft(adapter_dir, params))
    merged = lora_jax.merge(new_params, adapter, config)
    np.testing.assert_allclose(jax_apply(merged, IDS), expected, atol=1e-4, rtol=1e-4)


# -- (c) round trip -------------------------------------------------------------------------------

def test_save_then_load_is_bitwise(base, tmp_path):
    _, params = base
    config = rich_config()
    adapter, params = trained(params, config)
    save_peft(tmp_path, adapter, config, params)
    loaded, config2, params2 = unpack(load_peft(tmp_path, base[1]))
    assert jax.tree.structure(loaded) == jax.tree.structure(adapter)
    for x, y in zip(jax.tree.leaves(adapter), jax.tree.leaves(loaded)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    t1, t2 = lora_jax.find_targets(config, params), lora_jax.find_targets(config2, params2)
    assert {n: (t.rank, t.scaling) for n, t in t1.items()} == {n: (t.rank, t.scaling) for n, t in t2.items()}
    assert config2.bias == "lora_only" and config2.use_rslora and config2.modules_to_save == ("classifier",)


def test_dtype_is_float32_unless_asked(base, tmp_path):
    _, params = base
    config = LoraConfig(r=2, target_modules=["q_proj"])
    adapter = jax.tree.map(lambda x: x.astype(jnp.bfloat16), random_adapter(config, params))
    save_peft(tmp_path / "f32", adapter, config, params)
    save_peft(tmp_path / "bf16", adapter, config, params, dtype=jnp.bfloat16)
    assert {v.dtype for v in read_dir(tmp_path / "f32")[0].values()} == {np.dtype(np.float32)}
    assert {v.dtype for v in read_dir(tmp_path / "bf16")[0].values()} == {np.dtype(jnp.bfloat16)}
    loaded, _, _ = unpack(load_peft(tmp_path / "bf16", params, dtype=jnp.bfloat16))
    assert loaded["model.layers.0.self_attn.q_proj"]["lora_A"].dtype == jnp.bfloat16


# -- (d) same layout as PEFT's own save -----------------------------------------------------------

def test_files_match_peft_layout(base, tmp_path):
    model, params = base
    config = rich_config()
    adapter, params = trained(params, config)
    save_peft(tmp_path / "ours", adapter, config, params, save_embedding_layers=False)

    peft_config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS, use_rslora=True,
        rank_pattern=dict(config.rank_pattern), alpha_pattern=dict(config.alpha_pattern),
        bias="lora_only", modules_to_save=["classifier"],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.get_peft_model(copy.deepcopy(model), peft_config).save_pretrained(str(tmp_path / "theirs"))

    ours, our_config = read_dir(tmp_path / "ours")
    theirs, their_config = read_dir(tmp_path / "theirs")
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    assert set(our_config) == set(their_config)
    for key in ("peft_type", "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "bias",
                "modules_to_save", "fan_in_fan_out", "use_dora", "lora_bias", "inference_mode"):
        assert our_config[key] == their_config[key], key
    assert set(our_config["target_modules"]) == set(their_config["target_modules"])
    assert sorted(os.listdir(tmp_path / "ours")) == sorted(os.listdir(tmp_path / "theirs"))
    with safetensors.safe_open(str(tmp_path / "ours" / "adapter_model.safetensors"), "np") as f:
        assert f.metadata() == {"format": "pt"}
    card = (tmp_path / "ours" / "README.md").read_text()
    assert "library_name: peft" in card and "lora" in card


def test_named_adapter_goes_in_subfolder(base, tmp_path):
    _, params = base
    config = LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
    adapter = random_adapter(config, params)
    out = save_peft(tmp_path, adapter, config, params, adapter_name="mine")
    assert out == tmp_path / "mine" and (out / "adapter_config.json").exists()
    loaded, _, _ = unpack(load_peft(tmp_path, params, adapter_name="mine"))
    np.testing.assert_array_equal(loaded["model.layers.0.self_attn.q_proj"]["lora_B"],
                                  adapter["model.layers.0.self_attn.q_proj"]["lora_B"])
    with pytest.raises(FileNotFoundError, match=r"adapter_name=.*|\['mine'\]"):
        load_peft(tmp_path, params)
    peft_model = peft.PeftModel.from_pretrained(torch_model(), str(out), adapter_name="mine").eval()
    expected = lora_jax.lora(jax_apply, config)(params, adapter, IDS)
    np.testing.assert_allclose(torch_outputs(peft_model), expected, atol=1e-4, rtol=1e-4)


# -- (e) fan_in_fan_out, stacked layers, N-D kernels, name_map --------------------------------------

class GPT2Block(torch.nn.Module):
    def __init__(self) -> None:
        from transformers.pytorch_utils import Conv1D

        super().__init__()
        self.attn = torch.nn.Module()
        self.attn.c_attn = Conv1D(3 * DIM, DIM)  # weight (in, out)
        self.attn.c_proj = Conv1D(DIM, 3 * DIM)
        self.mlp = torch.nn.Module()
        self.mlp.c_fc = Conv1D(2 * DIM, DIM)
        self.mlp.c_proj = Conv1D(DIM, 2 * DIM)


class TinyGPT2(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.transformer = torch.nn.Module()
        self.transformer.wte = torch.nn.Embedding(VOCAB, DIM)
        self.transformer.h = torch.nn.ModuleList([GPT2Block() for _ in range(LAYERS)])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.transformer.wte(ids)
        for blk in self.transformer.h:
            h = h + blk.attn.c_proj(torch.tanh(blk.attn.c_attn(h)))
            h = h + blk.mlp.c_proj(torch.tanh(blk.mlp.c_fc(h)))
        return h @ self.transformer.wte.weight.T


def gpt2_apply(params: dict, ids: jax.Array) -> jax.Array:
    wte = params["transformer"]["wte"]["embedding"]
    h = wte[ids]
    for blk in params["transformer"]["h"]:
        h = h + dense(blk["attn"]["c_proj"], jnp.tanh(dense(blk["attn"]["c_attn"], h)))
        h = h + dense(blk["mlp"]["c_proj"], jnp.tanh(dense(blk["mlp"]["c_fc"], h)))
    return h @ wte.T


def gpt2_models() -> tuple[TinyGPT2, dict]:
    torch.manual_seed(5)
    model = TinyGPT2().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    sd = {k: jnp.asarray(v.detach().numpy()) for k, v in model.state_dict().items()}
    conv = lambda n: {"kernel": sd[f"{n}.weight"], "bias": sd[f"{n}.bias"]}  # noqa: E731  Conv1D is (in, out)
    params = {"transformer": {"wte": {"embedding": sd["transformer.wte.weight"]}, "h": [
        {"attn": {n: conv(f"transformer.h.{i}.attn.{n}") for n in ("c_attn", "c_proj")},
         "mlp": {n: conv(f"transformer.h.{i}.mlp.{n}") for n in ("c_fc", "c_proj")}}
        for i in range(LAYERS)]}}
    return model, params


def test_gpt2_conv1d_fan_in_fan_out_both_ways(tmp_path):
    model, params = gpt2_models()
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
                        init_lora_weights=False)
    adapter = random_adapter(config, params)
    save_peft(tmp_path / "ours", adapter, config, params)
    assert read_dir(tmp_path / "ours")[1]["fan_in_fan_out"] is True
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "ours")).eval()
    expected = lora_jax.lora(gpt2_apply, config)(params, adapter, IDS)
    np.testing.assert_allclose(torch_outputs(peft_model), expected, atol=1e-4, rtol=1e-4)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns that fan_in_fan_out is set for Conv1D
        theirs = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
            r=3, lora_alpha=6, target_modules=["c_attn", "mlp.c_proj"], fan_in_fan_out=True))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.3)
    theirs.save_pretrained(str(tmp_path / "theirs"))
    adapter2, config2, params2 = unpack(load_peft(tmp_path / "theirs", params))
    assert config2.fan_in_fan_out
    got = lora_jax.lora(gpt2_apply, config2)(params2, adapter2, IDS)
    np.testing.assert_allclose(got, torch_outputs(theirs.eval()), atol=1e-4, rtol=1e-4)


def stacked_config(**changes) -> LoraConfig:
    fields = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
                  rank_pattern={"v_proj": 2}, stacked_modules=r"model\.layers\..*", bias="lora_only",
                  init_lora_weights=False)
    fields.update(changes)
    return LoraConfig(**fields)


def test_stacked_adapter_exports_per_layer_keys_and_imports_back(base, tmp_path):
    _, params = base
    stacked = stack_layers(params)
    config = stacked_config()
    adapter, stacked = trained(stacked, config)
    assert adapter["model.layers.self_attn.q_proj"]["lora_A"].shape == (LAYERS, DIM, 4)
    expected = jax.jit(lora_jax.lora(jax_apply_stacked, config))(stacked, adapter, IDS)

    save_peft(tmp_path, adapter, config, stacked, save_embedding_layers=False)
    tensors, peft_config = read_dir(tmp_path)
    for i in range(LAYERS):
        assert tensors[f"{PREFIX}model.layers.{i}.self_attn.q_proj.lora_A.weight"].shape == (4, DIM)
        assert tensors[f"{PREFIX}model.layers.{i}.self_attn.v_proj.lora_B.weight"].shape == (DIM, 2)
        assert f"{PREFIX}model.layers.{i}.self_attn.q_proj.base_layer.bias" in tensors
    assert not any(re.search(r"layers\.self_attn", k) for k in tensors)
    assert peft_config["rank_pattern"] == {"v_proj": 2}
    np.testing.assert_allclose(torch_outputs(peft_load(tmp_path)), expected, atol=1e-4, rtol=1e-4)

    loaded, config2, stacked2 = unpack(load_peft(tmp_path, stack_layers(base[1])))
    assert config2.is_stacked("model.layers.self_attn.q_proj")
    for x, y in zip(jax.tree.leaves(adapter), jax.tree.leaves(loaded)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    for x, y in zip(jax.tree.leaves(stacked), jax.tree.leaves(stacked2)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_peft_adapter_loads_into_stacked_params(base, tmp_path):
    expected = train_in_torch(str(tmp_path), rank_pattern={"v_proj": 2})
    adapter, config, params = unpack(load_peft(tmp_path, stack_layers(base[1])))
    assert adapter["model.layers.self_attn.q_proj"]["lora_A"].shape == (LAYERS, DIM, 4)
    assert config.bias == "lora_only" and config.modules_to_save == ("classifier",)
    got = jax.jit(lora_jax.lora(jax_apply_stacked, config))(params, adapter, IDS)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_stacked_layers_with_different_ranks_refused(base, torch_trained_dir):
    adapter_dir, _ = torch_trained_dir
    params = stack_layers(base[1])
    with pytest.raises(ValueError, match=r"model\.layers\.self_attn\.q_proj.*differ in \(rank, lora_alpha\)"):
        load_peft(adapter_dir, params)


def nd_params(params: dict) -> dict:
    """q_proj as a DenseGeneral kernel (d, heads, head_dim), o_proj as (heads, head_dim, d)."""
    out = copy.deepcopy(jax.tree.map(lambda x: x, params))
    for p in out["model"]["layers"]:
        p["self_attn"]["q_proj"]["kernel"] = p["self_attn"]["q_proj"]["kernel"].reshape(DIM, HEADS, HEAD_DIM)
        p["self_attn"]["q_proj"]["bias"] = p["self_attn"]["q_proj"]["bias"].reshape(HEADS, HEAD_DIM)
        p["self_attn"]["o_proj"]["kernel"] = p["self_attn"]["o_proj"]["kernel"].reshape(HEADS, HEAD_DIM, DIM)
    return out


def nd_apply(params: dict, ids: jax.Array) -> jax.Array:
    h = params["model"]["embed_tokens"]["embedding"][ids]
    for p in params["model"]["layers"]:
        attn = p["self_attn"]
        q = jnp.einsum("bsd,dhk->bshk", h, attn["q_proj"]["kernel"]) + attn["q_proj"]["bias"]
        k = dense(attn["k_proj"], h).reshape(q.shape)
        v = dense(attn["v_proj"], h).reshape(q.shape)
        a = q * jax.nn.sigmoid(k) + v
        h = h + jnp.einsum("bshk,hkd->bsd", a, attn["o_proj"]["kernel"]) + attn["o_proj"]["bias"]
        h = h + dense(p["mlp"]["down_proj"], jnp.tanh(dense(p["mlp"]["up_proj"], layer_norm(p["norm"], h))))
    return head(params, h)


def test_nd_kernels_flatten_for_export_and_restore_on_import(base, tmp_path):
    _, params = base
    params = nd_params(params)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "o_proj"], in_axes={"o_proj": 2},
                        bias="lora_only", init_lora_weights=False)
    adapter, params = trained(params, config)
    assert adapter["model.layers.0.self_attn.o_proj"]["lora_A"].shape == (HEADS, HEAD_DIM, 2)
    expected = lora_jax.lora(nd_apply, config)(params, adapter, IDS)
    save_peft(tmp_path, adapter, config, params)
    tensors, _ = read_dir(tmp_path)
    assert tensors[f"{PREFIX}model.layers.0.self_attn.o_proj.lora_A.weight"].shape == (2, DIM)
    assert tensors[f"{PREFIX}model.layers.0.self_attn.q_proj.base_layer.bias"].shape == (DIM,)
    np.testing.assert_allclose(torch_outputs(peft_load(tmp_path)), expected, atol=1e-4, rtol=1e-4)

    loaded, config2, params2 = unpack(load_peft(tmp_path, nd_params(base[1])))
    assert config2.num_in_axes("model.layers.1.self_attn.o_proj") == 2
    for x, y in zip(jax.tree.leaves(adapter), jax.tree.leaves(loaded)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    np.testing.assert_array_equal(params2["model"]["layers"][0]["self_attn"]["q_proj"]["bias"],
                                  params["model"]["layers"][0]["self_attn"]["q_proj"]["bias"])


def renamed(params: dict) -> dict:
    """The same model under other names: net.tok, net.blocks.<i>.attn.wq, ..."""
    rename = {"self_attn": "attn", "q_proj": "wq", "k_proj": "wk", "v_proj": "wv", "o_proj": "wo"}

    def walk(tree):
        if isinstance(tree, dict):
            return {rename.get(k, k): walk(v) for k, v in tree.items()}
        if isinstance(tree, list):
            return [walk(v) for v in tree]
        return tree

    return {"net": {"tok": params["model"]["embed_tokens"], "blocks": walk(params["model"]["layers"])},
            "lm_head": params["lm_head"], "classifier": params["classifier"]}


def torch_name(name: str) -> str:
    name = name.replace("net.tok", "model.embed_tokens").replace("net.blocks", "model.layers")
    name = name.replace(".attn.", ".self_attn.")
    return re.sub(r"\.w([qkvo])$", r".\1_proj", name)


def renamed_apply(params: dict, ids: jax.Array) -> jax.Array:
    back = {"model": {"embed_tokens": params["net"]["tok"], "layers": [
        {"self_attn": {f"{c}_proj": blk["attn"][f"w{c}"] for c in "qkvo"}, "mlp": blk["mlp"], "norm": blk["norm"]}
        for blk in params["net"]["blocks"]]}, "lm_head": params["lm_head"], "classifier": params["classifier"]}
    return jax_apply(back, ids)


def test_name_map_hook_both_ways(base, tmp_path, torch_trained_dir):
    _, params = base
    params = renamed(params)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["wq", "wv", "tok"], modules_to_save=["classifier"],
                        rank_pattern={"wv": 1}, alpha_pattern={"tok": 3}, init_lora_weights=False)
    adapter, params = trained(params, config)
    expected = lora_jax.lora(renamed_apply, config)(params, adapter, IDS)
    save_peft(tmp_path, adapter, config, params, name_map=torch_name, save_embedding_layers=False)
    tensors, peft_config = read_dir(tmp_path)
    assert f"{PREFIX}model.layers.1.self_attn.v_proj.lora_B.weight" in tensors
    assert f"{PREFIX}model.embed_tokens.lora_embedding_A" in tensors
    assert "model.layers.0.self_attn.q_proj" in peft_config["target_modules"]  # exact torch paths
    assert peft_config["rank_pattern"] == {f"model.layers.{i}.self_attn.v_proj": 1 for i in range(LAYERS)}
    assert peft_config["alpha_pattern"] == {"model.embed_tokens": 3}
    np.testing.assert_allclose(torch_outputs(peft_load(tmp_path)), expected, atol=1e-4, rtol=1e-4)

    loaded, _, _ = unpack(load_peft(tmp_path, renamed(base[1]), name_map=torch_name))
    assert set(loaded) == set(adapter)
    adapter_dir, expected = torch_trained_dir
    adapter2, config2, params2 = unpack(load_peft(adapter_dir, renamed(base[1]), name_map=torch_name))
    assert "net.blocks.1.attn.wq" in adapter2
    got = lora_jax.lora(renamed_apply, config2)(params2, adapter2, IDS)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_name_map_dict_replaces_prefixes(base, tmp_path):
    _, params = base
    params = {"decoder": params["model"], "lm_head": params["lm_head"], "classifier": params["classifier"]}
    config = LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
    adapter = random_adapter(config, params)
    save_peft(tmp_path, adapter, config, params, name_map={"decoder": "model"})
    assert f"{PREFIX}model.layers.0.self_attn.q_proj.lora_A.weight" in read_dir(tmp_path)[0]
    loaded, config2, _ = unpack(load_peft(tmp_path, params, name_map={"decoder": "model"}))
    assert set(loaded) == {"decoder.layers.0.self_attn.q_proj", "decoder.layers.1.self_attn.q_proj"}


def test_save_without_params_writes_linear_adapter(base, tmp_path):
    _, params = base
    config = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    adapter = random_adapter(config, params)
    save_peft(tmp_path / "a", adapter, config)
    save_peft(tmp_path / "b", adapter, config, params)
    assert read_dir(tmp_path / "a") [0].keys() == read_dir(tmp_path / "b")[0].keys()
    assert read_dir(tmp_path / "a")[1] == read_dir(tmp_path / "b")[1]
    bad = LoraConfig(r=2, target_modules=["embed_tokens"])
    with pytest.raises(ValueError, match="embed_tokens.*pass params"):
        save_peft(tmp_path / "c", random_adapter(bad, params), bad)


def test_in_memory_to_and_from_peft(base):
    _, params = base
    config = rich_config()
    adapter, params = trained(params, config)
    tensors, peft_config = to_peft(adapter, config, params)
    assert f"{PREFIX}model.embed_tokens.base_layer.weight" in tensors  # save_embedding_layers="auto"
    loaded, _, params2 = unpack(from_peft(tensors, peft_config, base[1]))
    np.testing.assert_array_equal(loaded["lm_head"]["lora_A"], adapter["lm_head"]["lora_A"])
    np.testing.assert_array_equal(params2["classifier"]["kernel"], params["classifier"]["kernel"])


# -- (f) what cannot be represented is refused, naming the culprit -------------------------------

@pytest.fixture()
def saved(base, tmp_path) -> tuple[str, dict, dict]:
    _, params = base
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "embed_tokens"], init_lora_weights=False)
    adapter = random_adapter(config, params)
    save_peft(tmp_path, adapter, config, params, save_embedding_layers=False)
    tensors, peft_config = read_dir(tmp_path)
    return str(tmp_path), tensors, peft_config


def rewrite(adapter_dir: str, tensors: dict | None = None, peft_config: dict | None = None) -> None:
    if tensors is not None:
        safetensors.numpy.save_file(tensors, os.path.join(adapter_dir, "adapter_model.safetensors"),
                                    metadata={"format": "pt"})
    if peft_config is not None:
        with open(os.path.join(adapter_dir, "adapter_config.json"), "w") as f:
            json.dump(peft_config, f)


@pytest.mark.parametrize("change, message", [
    ({"peft_type": "IA3"}, "IA3 adapter"),
    ({"peft_type": None}, "no peft_type"),
    ({"use_dora": True}, "DoRA"),
    ({"lora_bias": True}, "lora_bias"),
    ({"trainable_token_indices": [1, 2]}, "trainable_token_indices"),
    ({"init_lora_weights": "pissa_niter_4"}, "pissa_niter_4.*path_initial_model_for_weight_conversion"),
])
def test_unsupported_config_refused(base, saved, change, message):
    adapter_dir, _, peft_config = saved
    peft_config.update(change)
    rewrite(adapter_dir, peft_config={k: v for k, v in peft_config.items() if v is not None or k != "peft_type"})
    with pytest.raises(ValueError, match=message):
        load_peft(adapter_dir, base[1])


def test_unknown_config_keys_are_ignored(base, saved):
    adapter_dir, _, peft_config = saved
    rewrite(adapter_dir, peft_config=dict(peft_config, some_future_option={"x": 1}, another=True))
    adapter, _, _ = unpack(load_peft(adapter_dir, base[1]))
    assert "model.layers.0.self_attn.q_proj" in adapter


def test_shape_mismatch_names_key_and_shapes(base, saved):
    adapter_dir, tensors, _ = saved
    key = f"{PREFIX}model.layers.1.self_attn.q_proj.lora_A.weight"
    tensors[key] = np.zeros((2, DIM + 1), np.float32)
    rewrite(adapter_dir, tensors)
    with pytest.raises(ValueError, match=re.escape(key) + r".*\(2, 9\).*in_features=9.*\(8, 8\)"):
        load_peft(adapter_dir, base[1])


def test_transposed_kernel_is_diagnosed(base, saved):
    adapter_dir, tensors, _ = saved
    params = copy.deepcopy(base[1])
    params["model"]["layers"][0]["mlp"]["up_proj"]["kernel"] = params["model"]["layers"][0]["mlp"]["up_proj"]["kernel"].T
    key = f"{PREFIX}model.layers.0.mlp.up_proj"
    tensors[key + ".lora_A.weight"] = np.zeros((2, DIM), np.float32)
    tensors[key + ".lora_B.weight"] = np.zeros((2 * DIM, 2), np.float32)
    rewrite(adapter_dir, tensors)
    with pytest.raises(ValueError, match=r"up_proj\.lora_A\.weight.*\(16, 8\).*looks transposed"):
        load_peft(adapter_dir, params)


def test_rank_disagreeing_with_config_names_key(base, saved):
    adapter_dir, tensors, peft_config = saved
    rewrite(adapter_dir, peft_config=dict(peft_config, rank_pattern={"layers.1.self_attn.q_proj": 3}))
    with pytest.raises(ValueError, match=r"layers\.1\.self_attn\.q_proj\.lora_A\.weight.*rank 2.*rank_pattern"):
        load_peft(adapter_dir, base[1])


def test_missing_module_lists_closest_names(base, saved):
    adapter_dir, tensors, _ = saved
    old = f"{PREFIX}model.layers.0.self_attn.q_proj"
    for part in ("lora_A.weight", "lora_B.weight"):
        tensors[f"{PREFIX}model.layers.0.self_attn.query.{part}"] = tensors.pop(f"{old}.{part}")
    rewrite(adapter_dir, tensors)
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.self_attn\.query'.*Closest.*model\.layers\.0\.self_attn"):
        load_peft(adapter_dir, base[1])


def test_adapter_name_inside_keys_is_stripped_with_warning(base, saved):
    adapter_dir, tensors, _ = saved
    plain, _, _ = unpack(load_peft(adapter_dir, base[1]))
    named = {re.sub(r"\.(lora_[AB])\.weight$", r".\1.default.weight",
                    re.sub(r"(lora_embedding_[AB])$", r"\1.default", k)): v for k, v in tensors.items()}
    rewrite(adapter_dir, named)
    with pytest.warns(UserWarning, match="adapter name 'default'"):
        loaded, _, _ = unpack(load_peft(adapter_dir, base[1]))
    for x, y in zip(jax.tree.leaves(plain), jax.tree.leaves(loaded)):
        np.testing.assert_array_equal(x, y)
    named[f"{PREFIX}model.layers.1.self_attn.q_proj.lora_A.other.weight"] = named.pop(
        f"{PREFIX}model.layers.1.self_attn.q_proj.lora_A.default.weight")
    rewrite(adapter_dir, named)
    with pytest.raises(ValueError, match=r"several adapter names \['default', 'other'\]"):
        load_peft(adapter_dir, base[1])


def test_dora_and_lora_bias_keys_refused(base, saved):
    adapter_dir, tensors, _ = saved
    key = f"{PREFIX}model.layers.0.self_attn.q_proj.lora_magnitude_vector"
    rewrite(adapter_dir, dict(tensors, **{key: np.ones(DIM, np.float32)}))
    with pytest.raises(ValueError, match=re.escape(key) + ".*DoRA"):
        load_peft(adapter_dir, base[1])
    key = f"{PREFIX}model.layers.0.self_attn.q_proj.lora_B.bias"
    rewrite(adapter_dir, dict(tensors, **{key: np.ones(DIM, np.float32)}))
    with pytest.raises(ValueError, match=re.escape(key) + ".*lora_bias"):
        load_peft(adapter_dir, base[1])


def test_full_tensor_of_wrong_shape_names_key(base, saved):
    adapter_dir, tensors, _ = saved
    key = f"{PREFIX}classifier.weight"
    rewrite(adapter_dir, dict(tensors, **{key: np.ones((CLASSES + 1, DIM), np.float32)}))
    with pytest.raises(ValueError, match=re.escape(key) + r".*\(4, 8\).*classifier\.kernel.*\(8, 3\)"):
        load_peft(adapter_dir, base[1])


def test_stacked_params_need_every_layer(base, saved):
    adapter_dir, tensors, _ = saved
    del tensors[f"{PREFIX}model.layers.1.self_attn.q_proj.lora_A.weight"]
    del tensors[f"{PREFIX}model.layers.1.self_attn.q_proj.lora_B.weight"]
    rewrite(adapter_dir, tensors)
    with pytest.raises(ValueError, match=r"model\.layers\.self_attn\.q_proj\.kernel.*layers \[0\]"):
        load_peft(adapter_dir, stack_layers(base[1]))


def test_missing_lora_b_named(base, saved):
    adapter_dir, tensors, _ = saved
    del tensors[f"{PREFIX}model.layers.1.self_attn.q_proj.lora_B.weight"]
    rewrite(adapter_dir, tensors)
    with pytest.raises(ValueError, match=r"layers\.1\.self_attn\.q_proj\.lora_A\.weight.*no matching lora_B"):
        load_peft(adapter_dir, base[1])


def test_existing_directory_needs_overwrite(base, saved):
    adapter_dir, _, _ = saved
    _, params = base
    config = LoraConfig(r=2, target_modules=["q_proj"])
    adapter = random_adapter(config, params)
    with pytest.raises(FileExistsError, match="not empty.*overwrite=True"):
        save_peft(adapter_dir, adapter, config, params)
    save_peft(adapter_dir, adapter, config, params, overwrite=True)
    assert set(load_peft(adapter_dir, params).adapter) == set(adapter)


def test_stacked_export_without_layer_container_name_refused(base, tmp_path):
    _, params = base
    params = {"stack": stack_layers(params)["model"]["layers"]}
    config = LoraConfig(r=2, target_modules=["q_proj"], stacked_modules=["q_proj"], bias="all")
    adapter, params = trained(params, config)
    with pytest.raises(ValueError, match=r"'stack\.self_attn\.q_proj'.*layers_pattern.*\{layer\}"):
        save_peft(tmp_path, adapter, config, params)
    name_map = {"stack": "model.layers.{layer}"}
    save_peft(tmp_path, adapter, config, params, name_map=name_map)
    tensors = read_dir(tmp_path)[0]
    assert tensors[f"{PREFIX}model.layers.1.self_attn.q_proj.lora_A.weight"].shape == (2, DIM)
    assert tensors[f"{PREFIX}model.layers.1.self_attn.k_proj.bias"].shape == (DIM,)  # not targeted, still split
    stacked = {"stack": stack_layers(base[1])["model"]["layers"]}
    loaded, _, params2 = unpack(load_peft(tmp_path, stacked, name_map=name_map))
    np.testing.assert_array_equal(loaded["stack.self_attn.q_proj"]["lora_A"], adapter["stack.self_attn.q_proj"]["lora_A"])
    for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
        np.testing.assert_array_equal(x, y)


def test_name_map_must_be_one_to_one(base, saved):
    adapter_dir, _, _ = saved
    with pytest.raises(ValueError, match="name_map maps both"):
        load_peft(adapter_dir, base[1], name_map=lambda n: "same")


def test_bin_read_with_weights_only_torch_load(base, saved, monkeypatch):
    adapter_dir, tensors, _ = saved
    expected, _, _ = unpack(load_peft(adapter_dir, base[1]))
    os.remove(os.path.join(adapter_dir, "adapter_model.safetensors"))
    torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, os.path.join(adapter_dir, "adapter_model.bin"))
    loaded, _, _ = unpack(load_peft(adapter_dir, base[1]))
    for x, y in zip(jax.tree.leaves(expected), jax.tree.leaves(loaded)):
        np.testing.assert_array_equal(x, y)
    monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
    with pytest.raises(ImportError, match="never unpickles.*safe_serialization"):
        load_peft(adapter_dir, base[1])


def test_peft_module_does_not_import_torch():
    import subprocess

    code = ("import sys, lora_jax.peft; "
            "bad = [m for m in ('torch', 'peft', 'lora_jax.models') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
