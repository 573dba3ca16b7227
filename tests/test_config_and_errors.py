"""LoraConfig matching follows PEFT's rules; bad input gets an early, named error."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax
from lora_jax.config import layer_index


def llama_like_params(layers=2, d=8):
    layer = {
        "self_attn": {n: {"kernel": jnp.zeros((d, d))} for n in ("q_proj", "k_proj", "v_proj", "o_proj")},
        "mlp": {n: {"kernel": jnp.zeros((d, 2 * d) if n != "down_proj" else (2 * d, d))}
                for n in ("gate_proj", "up_proj", "down_proj")},
        "input_layernorm": {"scale": jnp.ones(d)},
    }
    return {"params": {
        "model": {"embed_tokens": {"embedding": jnp.zeros((32, d))},
                  "layers": {str(i): layer for i in range(layers)}},
        "lm_head": {"kernel": jnp.zeros((d, 32))},
    }}


def targets(**kwargs):
    return list(lora_jax.find_targets(lora_jax.LoraConfig(**kwargs), llama_like_params()))


def test_module_names_drop_params_collection_and_write_indices():
    names = lora_jax.module_names(llama_like_params(layers=1))
    assert names[:3] == ["lm_head", "model.embed_tokens", "model.layers.0.mlp.down_proj"]
    assert "model.layers.0.self_attn.q_proj" in names
    assert "model.layers.0.input_layernorm" not in names  # no kernel leaf


def test_list_matches_exact_name_or_dotted_suffix():
    assert targets(target_modules=["q_proj"]) == [
        "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert targets(target_modules=["1.self_attn.v_proj"]) == ["model.layers.1.self_attn.v_proj"]
    # a suffix must start at a dot: "proj" is not a suffix match of "q_proj"
    with pytest.raises(ValueError, match="'proj' matches no module"):
        targets(target_modules=["proj"])


def test_string_is_a_full_regex_match():
    assert targets(target_modules=r".*\.0\..*_proj") == [
        f"model.layers.0.{p}" for p in ("mlp.down_proj", "mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj",
                                        "self_attn.o_proj", "self_attn.q_proj", "self_attn.v_proj")]
    with pytest.raises(ValueError, match="regex 'q_proj' matches no module"):
        targets(target_modules="q_proj")  # fullmatch against the whole name


def test_all_linear_skips_output_head_and_embeddings():
    names = targets(target_modules="all-linear")
    assert len(names) == 2 * 7 and "lm_head" not in names and "model.embed_tokens" not in names


def test_exclude_and_layers_to_transform():
    assert targets(target_modules=["q_proj", "v_proj"], exclude_modules=["v_proj"]) == [
        "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert targets(target_modules=["q_proj"], layers_to_transform=1) == ["model.layers.1.self_attn.q_proj"]
    assert targets(target_modules=["q_proj"], layers_to_transform=[0], layers_pattern="layers") == [
        "model.layers.0.self_attn.q_proj"]
    assert layer_index("transformer.h.3.attn.c_attn", None) == 3


def test_rank_and_alpha_patterns_follow_peft_matching():
    config = lora_jax.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                 rank_pattern={"q_proj": 2, r"layers\.1\.mlp\.up_proj": 3},
                                 alpha_pattern={"down_proj": 32})
    assert config.rank("model.layers.0.self_attn.q_proj") == 2
    assert config.rank("model.layers.1.mlp.up_proj") == 3
    assert config.rank("model.layers.0.mlp.up_proj") == 4
    assert config.scaling("model.layers.0.mlp.down_proj") == 32 / 4
    assert config.scaling("model.layers.0.self_attn.q_proj") == 8 / 2
    rs = config.replace(use_rslora=True)
    assert rs.scaling("model.layers.0.mlp.gate_proj") == pytest.approx(8 / math.sqrt(4))
    adapter = lora_jax.init(config, llama_like_params(), jax.random.key(0))
    assert adapter["model.layers.0.self_attn.q_proj"]["lora_A"].shape == (8, 2)
    assert adapter["model.layers.1.mlp.up_proj"]["lora_B"].shape == (3, 16)


def test_init_modes_follow_peft():
    params = {"params": {"w": {"kernel": jnp.zeros((64, 32))}, "e": {"embedding": jnp.zeros((50, 16))}}}
    kaiming = lora_jax.init(lora_jax.LoraConfig(r=8, target_modules=["w", "e"]), params, jax.random.key(0))
    a = np.asarray(kaiming["w"]["lora_A"])
    assert np.abs(a).max() <= 1 / math.sqrt(64) and np.abs(a).max() > 0.8 / math.sqrt(64)
    assert not np.any(kaiming["w"]["lora_B"])
    assert not np.any(kaiming["e"]["lora_A"]) and np.std(kaiming["e"]["lora_B"]) > 0.5
    gauss = lora_jax.init(lora_jax.LoraConfig(r=8, target_modules=["w"], init_lora_weights="gaussian"),
                          params, jax.random.key(0))
    assert np.std(gauss["w"]["lora_A"]) == pytest.approx(1 / 8, rel=0.15)
    rand = lora_jax.init(lora_jax.LoraConfig(r=8, target_modules=["w"], init_lora_weights=False),
                         params, jax.random.key(0))
    assert np.any(rand["w"]["lora_B"])


def test_print_trainable_parameters_in_peft_format(capsys):
    params = {"params": {"a": {"kernel": jnp.zeros((10, 10)), "bias": jnp.zeros(10)},
                         "head": {"kernel": jnp.zeros((10, 3))}}}
    config = lora_jax.LoraConfig(r=2, target_modules=["a"], modules_to_save=["head"])
    adapter = lora_jax.init(config, params, jax.random.key(0))
    lora_jax.print_trainable_parameters(params, adapter, config)
    trainable, total = 2 * 10 + 2 * 10 + 30, 110 + 30 + 40
    assert capsys.readouterr().out.strip() == (
        f"trainable params: {trainable} || all params: {total} || trainable%: {100 * trainable / total:.4f}")
    assert lora_jax.count_parameters(params, adapter)["trainable"] == 40


# -- bad input ----------------------------------------------------------------------------

def test_target_matching_nothing_lists_closest_names_first():
    with pytest.raises(ValueError) as err:
        targets(target_modules=["q_prj"])
    message = str(err.value)
    assert "'q_prj' matches no module" in message
    assert message.index("q_proj") < message.index("down_proj")


@pytest.mark.parametrize("kwargs, match", [
    (dict(r=0), "r must be a positive integer"),
    (dict(r=-3), "r must be a positive integer"),
    (dict(bias="some"), "bias must be one of"),
    (dict(init_lora_weights="kaiming"), "init_lora_weights must be one of True, False, 'gaussian'"),
    (dict(lora_dropout=1.5), "lora_dropout must be in"),
    (dict(target_modules=None), "target_modules is required"),
    (dict(target_modules="(unclosed"), "not a valid regex"),
])
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lora_jax.LoraConfig(**{"target_modules": ["q_proj"], **kwargs})


def test_rank_larger_than_kernel_is_refused():
    with pytest.raises(ValueError, match=r"Rank 9 for model.layers.0.self_attn.q_proj exceeds min\(in, out\) = min\(8, 8\)"):
        targets(r=9, target_modules=["q_proj"])


def test_patterns_matching_nothing_are_refused():
    with pytest.raises(ValueError, match="rank_pattern key 'qq_proj' matches no targeted module"):
        targets(target_modules=["q_proj"], rank_pattern={"qq_proj": 2})
    with pytest.raises(ValueError, match="alpha_pattern key 'v_proj' matches no targeted module"):
        targets(target_modules=["q_proj"], alpha_pattern={"v_proj": 2})
    with pytest.raises(ValueError, match="modules_to_save entry 'classifier' matches no module"):
        targets(target_modules=["q_proj"], modules_to_save=["classifier"])


def test_targeted_leaf_of_rank_one_is_refused():
    params = {"norm": {"kernel": jnp.ones(8)}}
    with pytest.raises(ValueError, match=r"norm.kernel is shape \(8,\); LoRA needs an array of rank >= 2"):
        lora_jax.init(lora_jax.LoraConfig(target_modules=["norm"]), params, jax.random.key(0))


def test_adapter_that_does_not_fit_names_key_and_both_shapes():
    params = llama_like_params()
    config = lora_jax.LoraConfig(r=2, target_modules=["q_proj"])
    adapter = lora_jax.init(config, params, jax.random.key(0))
    apply = lora_jax.lora(lambda p, x: x @ p["params"]["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"], config)
    bad = dict(adapter)
    bad["model.layers.0.self_attn.q_proj"] = {"lora_A": jnp.zeros((8, 3)), "lora_B": jnp.zeros((2, 8))}
    with pytest.raises(ValueError, match=r"\['lora_A'\] has shape \(8, 3\), but kernel model.layers.0.self_attn.q_proj.kernel of shape \(8, 8\) with rank 2 needs \(8, 2\)"):
        apply(params, bad, jnp.ones((1, 8)))
    missing = {k: v for k, v in adapter.items() if "layers.1" not in k}
    with pytest.raises(ValueError, match=r"missing modules \['model.layers.1.self_attn.q_proj'\]"):
        lora_jax.merge(params, missing, config)


def test_config_lists_become_tuples_and_round_trip_to_dict():
    config = lora_jax.LoraConfig(target_modules=["q", "v"], layers_to_transform=[0, 1])
    assert config.target_modules == ("q", "v") and config.to_dict()["target_modules"] == ["q", "v"]
    assert config == lora_jax.LoraConfig(**config.to_dict())


@pytest.mark.parametrize("field, value", [
    ("lora_alpha", float("nan")), ("lora_alpha", float("inf")), ("lora_alpha", "16"),
    ("alpha_pattern", {"q": float("nan")}), ("r", "eight"), ("r", 2.0), ("lora_dropout", "0.1"),
    ("in_axes", {"out": 0}), ("layers_to_transform", [-1]), ("layers_to_transform", ["0"]),
])
def test_config_refuses_values_that_cannot_be_meant(field, value):
    with pytest.raises(ValueError, match=f"LoraConfig.{field}"):
        lora_jax.LoraConfig(target_modules=["q"], **{field: value})


def test_layers_to_transform_beyond_the_models_layers_is_an_error():
    with pytest.raises(ValueError, match=r"layers_to_transform \[7\] names layers .* 0\.\.1"):
        targets(target_modules=["q_proj"], layers_to_transform=[1, 7])
