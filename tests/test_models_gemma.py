"""Gemma 2 (attention and final soft-capping, sliding/global layers, query_pre_attn_scalar)
and Gemma 3 text (q/k norms, local/global RoPE bases, linear RoPE scaling on global layers,
attention biases, untied head) against transformers' PyTorch models on tiny random
checkpoints: logits, greedy generation, PEFT adapters both ways, save_pretrained."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh, AxisType, PartitionSpec

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import hf_oracle  # noqa: E402
from hf_oracle import (  # noqa: E402
    on_tokens,
    quiet,  # noqa: E402
    torch_logits,
)

import lora_jax  # noqa: E402
from lora_jax import LoraConfig, models, sharding  # noqa: E402
from lora_jax.models.errors import ModelLoadError, UnsupportedModelError  # noqa: E402
from lora_jax.peft import load_peft, save_peft  # noqa: E402

VOCAB = 96
TINY = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
            initializer_range=0.1, pad_token_id=0, eos_token_id=None, bos_token_id=None,
            sliding_window=4)
VARIANTS = {
    # Layers sliding, full, sliding; caps small enough to bind; scale by 1/sqrt(24), not 1/4.
    "gemma2": (transformers.Gemma2Config, dict(
        num_hidden_layers=3, query_pre_attn_scalar=24, attn_logit_softcapping=3.0,
        final_logit_softcapping=4.0)),
    # Layers sliding, full, sliding, full; the global ones with 4x linear RoPE scaling.
    "gemma3": (transformers.Gemma3TextConfig, dict(
        num_hidden_layers=4, sliding_window_pattern=2, rope_theta=50_000.0,
        rope_local_base_freq=100.0, rope_scaling={"rope_type": "linear", "factor": 4.0},
        attention_bias=True, tie_word_embeddings=False)),
}
GEMMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def torch_gemma(name):
    config_class, overrides = VARIANTS[name]
    torch.manual_seed(0)
    config = config_class(**{**TINY, **overrides})
    # Eager attention: the reference's softmax over fully padded rows stays finite.
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():  # visible biases and (1 + scale) norms, so a mistake shows
        for pname, param in model.named_parameters():
            if pname.endswith("bias") or "norm" in pname:
                param.normal_(0.0, 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """``get(name) -> (name, checkpoint directory, torch model)``, each saved once."""
    saved = {}

    def get(name):
        if name not in saved:
            model = torch_gemma(name)
            path = tmp_path_factory.mktemp(name)
            quiet(model.save_pretrained, path)
            saved[name] = name, path, model
        return saved[name]

    return get


@pytest.fixture(params=sorted(VARIANTS))
def variant(request, checkpoints):
    return checkpoints(request.param)


def padded_batch(seed=0, seq=20, pads=(0, 4, 9)):
    return hf_oracle.padded_batch(VOCAB, seed, seq, pads, low=1)


def test_logits_match_torch_with_padding_unrolled_and_scanned(variant):
    name, path, torch_model = variant
    ids, mask = padded_batch()
    expected = torch_logits(torch_model, ids, mask)
    assert np.abs(expected).max() > 1.0  # logits big enough for 1e-4 to mean something
    for scan in (False, True):
        model = models.from_pretrained(path, scan_layers=scan)
        np.testing.assert_allclose(on_tokens(model(ids, attention_mask=mask), mask),
                                   on_tokens(expected, mask), atol=1e-4, rtol=0,
                                   err_msg=f"{name} scan_layers={scan}")


# What each variant's features do: turning one off moves the logits well past 1e-4, so
# the comparison with transformers above covers it.
GLOBAL_ROPE = {"rope_type": "linear", "factor": 4.0, "rope_theta": 50_000.0}
FEATURES = {
    "gemma2": {
        "attention soft cap": {"attn_logit_softcapping": None},
        "final soft cap": {"final_logit_softcapping": None},
        "sliding window": {"sliding_window": 1000},
        "query_pre_attn_scalar": {"query_pre_attn_scalar": 16},
    },
    "gemma3": {
        "local rope base": {"rope_parameters": {
            "full_attention": GLOBAL_ROPE,
            "sliding_attention": {"rope_type": "default", "rope_theta": 50_000.0}}},
        "global rope scaling": {"rope_parameters": {
            "full_attention": {"rope_type": "default", "rope_theta": 50_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}}},
        "sliding window": {"sliding_window": 1000},
    },
}


def test_each_variant_feature_changes_the_logits(variant):
    name, path, _ = variant
    ids, mask = padded_batch(seed=1)
    model = models.from_pretrained(path)
    base = on_tokens(model(ids, attention_mask=mask), mask)
    for label, change in FEATURES[name].items():
        config = {**model.config, **change}
        changed = models.Model(models.build_module(config), model.params, config)
        changed = on_tokens(changed(ids, attention_mask=mask), mask)
        assert np.abs(changed - base).max() > 1e-2, label


def test_param_tree_mirrors_torch_module_names(variant):
    name, path, torch_model = variant
    model = models.from_pretrained(path)
    leaf = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}
    ours = set()
    for key_path, _ in jax.tree_util.tree_leaves_with_path(model.params):
        names = [k.key for k in key_path]
        ours.add(".".join(names[:-1] + [leaf[names[-1]]]))
    theirs = set(torch_model.state_dict())
    if torch_model.config.tie_word_embeddings:
        theirs.discard("lm_head.weight")
    assert ours == theirs
    attn = model.params["model"]["layers"]["0"]["self_attn"]
    assert ("q_norm" in attn) == (name == "gemma3")


def test_greedy_generation_is_token_identical_to_transformers(variant):
    name, path, torch_model = variant
    ids, mask = padded_batch(seed=2, seq=7, pads=(0, 2, 5))
    model = models.from_pretrained(path)
    ours = np.asarray(models.generate(model, None, ids, attention_mask=mask, max_new_tokens=20,
                                      stop_token_ids=()))
    with torch.no_grad():
        theirs = torch_model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask),
                                      max_new_tokens=20, min_new_tokens=20, do_sample=False,
                                      pad_token_id=0).numpy()
    np.testing.assert_array_equal(ours, theirs, err_msg=name)
    if name == "gemma3":  # scanned layers with their kinds as scanned arguments
        scanned = models.from_pretrained(path, scan_layers=True)
        np.testing.assert_array_equal(
            models.generate(scanned, None, ids, attention_mask=mask, max_new_tokens=20,
                            stop_token_ids=()), ours)


def test_save_pretrained_loads_in_transformers_with_the_same_tensors(variant, tmp_path):
    name, path, torch_model = variant
    ids, mask = padded_batch(seed=3)
    for scan in (False, True):
        model = models.from_pretrained(path, scan_layers=scan)
        out = models.save_pretrained(tmp_path / f"scan{scan}", model.config, model.params)
        reloaded = quiet(transformers.AutoModelForCausalLM.from_pretrained, out,
                         attn_implementation="eager").eval()
        assert type(reloaded).__name__ == type(torch_model).__name__
        for tensor_name, tensor in torch_model.state_dict().items():
            np.testing.assert_array_equal(reloaded.state_dict()[tensor_name].numpy(),
                                          tensor.numpy(), err_msg=tensor_name)
        np.testing.assert_allclose(torch_logits(reloaded, ids, mask),
                                   torch_logits(torch_model, ids, mask), atol=1e-6)


def test_bfloat16_params_track_float32_and_transformers_bf16(variant):
    name, path, _ = variant
    ids, mask = padded_batch(seed=4)
    full = on_tokens(models.from_pretrained(path)(ids, attention_mask=mask), mask)
    half = models.from_pretrained(path, dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(half.params)} == {jnp.dtype(jnp.bfloat16)}
    logits = half(ids, attention_mask=mask)
    assert logits.dtype == jnp.float32
    scale = np.abs(full).max()
    assert np.abs(on_tokens(logits, mask) - full).max() < 0.05 * scale
    # transformers in bfloat16 on the same weights lands as close to float32 as we do.
    torch_half = quiet(transformers.AutoModelForCausalLM.from_pretrained, path,
                       dtype=torch.bfloat16, attn_implementation="eager").eval()
    torch_error = np.abs(on_tokens(torch_logits(torch_half, ids, mask), mask) - full).max()
    assert np.abs(on_tokens(logits, mask) - full).max() < 2 * torch_error + 1e-3


# -- PEFT ---------------------------------------------------------------------------------

def random_adapter(config, params, seed=0):
    rng = np.random.default_rng(seed)
    return {name: {"lora_A": jnp.asarray(rng.normal(0, 0.2, t.a_shape), jnp.float32),
                   "lora_B": jnp.asarray(rng.normal(0, 0.2, t.b_shape), jnp.float32)}
            for name, t in lora_jax.find_targets(config, params).items()}


def lora_logits(model, params, adapter, config, ids, mask):
    apply = lora_jax.lora(lambda p, i, m: model.module.apply({"params": p}, i, attention_mask=m),
                          config)
    return np.asarray(jax.jit(apply)(params, adapter, ids, mask))


@pytest.mark.parametrize("name, targets", [
    ("gemma2", ["q_proj", "v_proj"]),
    ("gemma3", "all-linear"),
])
def test_peft_adapters_both_ways(checkpoints, name, targets, tmp_path):
    _, path, _ = checkpoints(name)
    ids, mask = padded_batch(seed=5)
    model = models.from_pretrained(path)
    # lora_jax -> PeftModel.
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, rank_pattern={"q_proj": 2})
    adapter = random_adapter(config, model.params)
    save_peft(tmp_path / "ours", adapter, config, model.params, task_type="CAUSAL_LM")
    base = quiet(transformers.AutoModelForCausalLM.from_pretrained, path,
                 attn_implementation="eager")
    in_peft = peft.PeftModel.from_pretrained(base, str(tmp_path / "ours")).eval()
    ours = lora_logits(model, model.params, adapter, config, ids, mask)
    np.testing.assert_allclose(on_tokens(ours, mask),
                               on_tokens(torch_logits(in_peft, ids, mask), mask),
                               atol=1e-4, rtol=0)
    # A PEFT adapter with random weights -> lora_jax (all-linear: unrolled and scanned).
    base = quiet(transformers.AutoModelForCausalLM.from_pretrained, path,
                 attn_implementation="eager")
    base_logits = on_tokens(torch_logits(base, ids, mask), mask)
    theirs = peft.get_peft_model(base, peft.LoraConfig(
        r=4, lora_alpha=16, target_modules=targets, use_rslora=True, init_lora_weights=False))
    torch.manual_seed(1)
    with torch.no_grad():
        for param in theirs.parameters():
            if param.requires_grad:
                param.normal_(0.0, 0.2)
    quiet(theirs.save_pretrained, str(tmp_path / "theirs"))
    expected = on_tokens(torch_logits(theirs.eval(), ids, mask), mask)
    assert np.abs(expected - base_logits).max() > 0.1  # the adapter matters
    for scan in (False, True) if targets == "all-linear" else (False,):
        model = models.from_pretrained(path, scan_layers=scan)
        loaded = load_peft(tmp_path / "theirs", model.params)
        assert len(loaded.adapter) == (7 if scan else 28 if targets == "all-linear" else 6)
        got = lora_logits(model, loaded.params, loaded.adapter, loaded.config, ids, mask)
        np.testing.assert_allclose(on_tokens(got, mask), expected, atol=1e-4, rtol=0,
                                   err_msg=f"scan_layers={scan}")


# -- sharding -------------------------------------------------------------------------------

def test_tensor_parallel_splits_projections_by_their_roles():
    model = models.from_config({"model_type": "gemma3_text", **TINY, "num_hidden_layers": 2},
                               scan_layers=True)
    mesh = AbstractMesh((1, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    config = LoraConfig(target_modules="all-linear", stacked_modules=r"model\.layers\..*")
    specs = sharding.param_specs(model.params, mesh, "tp", config=config)
    layer = specs["model"]["layers"]
    for column in (layer["self_attn"]["q_proj"], layer["mlp"]["gate_proj"], layer["mlp"]["up_proj"]):
        assert column["kernel"] == PartitionSpec(None, None, "model")
    for row in (layer["self_attn"]["o_proj"], layer["mlp"]["down_proj"]):
        assert row["kernel"] == PartitionSpec(None, "model", None)
    assert layer["self_attn"]["q_norm"]["scale"] == PartitionSpec(None, None)


# -- random init and bad input ------------------------------------------------------------

def test_random_init_has_identity_norms_and_runs_scanned():
    config = {"model_type": "gemma2", **TINY, "num_hidden_layers": 3}
    model = models.from_config(config, seed=0)
    norm = model.params["model"]["layers"]["1"]["post_feedforward_layernorm"]["scale"]
    np.testing.assert_array_equal(norm, 0.0)  # (1 + scale) norms start at the identity
    scanned = models.from_config(config, seed=0, scan_layers=True)
    layers = model.params["model"]["layers"]
    scanned.params = {**model.params, "model": {**model.params["model"], "layers": jax.tree.map(
        lambda *x: jnp.stack(x), layers["0"], layers["1"], layers["2"])}}
    ids, mask = padded_batch(seed=6)
    np.testing.assert_allclose(on_tokens(scanned(ids, attention_mask=mask), mask),
                               on_tokens(model(ids, attention_mask=mask), mask), atol=1e-5)


def test_multimodal_gemma3_is_refused_naming_the_text_model_type(tmp_path):
    config = transformers.Gemma3Config(text_config={**TINY, "num_hidden_layers": 2}).to_dict()
    with pytest.raises(UnsupportedModelError, match=r"'gemma3' is the multimodal "
                       r"Gemma3ForConditionalGeneration.*'gemma3_text'.*supported model types: "
                       r"\[.*'gemma2', 'gemma3_text'.*\]"):
        models.from_config(config)
    (tmp_path / "config.json").write_text(__import__("json").dumps(config))
    with pytest.raises(UnsupportedModelError, match="config.json: model_type 'gemma3'"):
        models.from_pretrained(tmp_path)  # before looking for weights: there are none


def test_unsupported_model_type_and_rope_type_list_the_supported_ones():
    with pytest.raises(UnsupportedModelError, match=r"unsupported model_type 'gemma'; "
                       r"supported: \[.*'gemma2', 'gemma3_text'.*'opt'.*\]"):
        models.from_config({"model_type": "gemma", **TINY})
    yarn = {"model_type": "gemma3_text", **TINY, "num_hidden_layers": 2,
            "rope_scaling": {"rope_type": "yarn", "factor": 2.0}}
    with pytest.raises(UnsupportedModelError, match=r"unsupported rope_type 'yarn' in the "
                       r"gemma3_text rope of full_attention layers; supported: "
                       r"\['default', 'linear', 'llama3'\]"):
        models.from_config(yarn)
    with pytest.raises(ModelLoadError, match=r"layer_types=\['full_attention'\]; expected a list "
                       r"of 2 entries"):
        models.from_config({"model_type": "gemma2", **TINY, "num_hidden_layers": 2,
                            "layer_types": ["full_attention"]})
    with pytest.raises(UnsupportedModelError, match="use_bidirectional_attention"):
        models.from_config({"model_type": "gemma3_text", **TINY, "num_hidden_layers": 2,
                            "use_bidirectional_attention": True})


def test_shape_disagreeing_with_config_names_tensor_and_both_shapes(tmp_path):
    from safetensors.numpy import load_file, save_file

    model = models.from_config({"model_type": "gemma3_text", **TINY, "num_hidden_layers": 2})
    out = models.save_pretrained(tmp_path, model.config, model.params)
    state = load_file(out / "model.safetensors")
    state["model.layers.1.self_attn.k_norm.weight"] = np.zeros(8, np.float32)
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"'model\.layers\.1\.self_attn\.k_norm\.weight' \(in "
                       r"model\.safetensors\) has shape \(8,\), expected \(16,\)"):
        models.from_pretrained(out, scan_layers=True)
