"""OPT (pre-layer-norm opt-125m-like, post-layer-norm opt-350m-like with project_in/out,
and an untied, bias-free, non-affine variant) against transformers' PyTorch OPT on tiny
random checkpoints: logits, greedy generation, PEFT adapters both ways, save_pretrained."""

from __future__ import annotations

import os
import warnings

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
TINY = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, ffn_dim=48,
            num_attention_heads=4, max_position_embeddings=64, pad_token_id=1,
            bos_token_id=2, eos_token_id=None, init_std=0.2)
VARIANTS = {
    # opt-125m / 1.3b / 6.7b: layer norm before each block, a final layer norm, tied head.
    "pre_ln": dict(),
    # opt-350m: layer norm after each residual sum, embeddings of another width.
    "post_ln_projected": dict(do_layer_norm_before=False, word_embed_proj_dim=16),
    "untied_plain": dict(tie_word_embeddings=False, enable_bias=False,
                         layer_norm_elementwise_affine=False, activation_function="gelu"),
}
OPT_LINEAR = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def torch_opt(**overrides):
    torch.manual_seed(0)
    config = transformers.OPTConfig(**{**TINY, **overrides})
    model = transformers.OPTForCausalLM(config).eval()
    with torch.no_grad():  # visible biases and norms, so a mistake in either shows
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.3)
            elif "layer_norm" in name:
                param.normal_(1.0, 0.3)
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """``get(name) -> (name, checkpoint directory, torch model)``, each saved once."""
    saved = {}

    def get(name):
        if name not in saved:
            model = torch_opt(**VARIANTS[name])
            path = tmp_path_factory.mktemp(name)
            quiet(model.save_pretrained, path)
            saved[name] = name, path, model
        return saved[name]

    return get


@pytest.fixture(params=sorted(VARIANTS))
def variant(request, checkpoints):
    return checkpoints(request.param)


def padded_batch(seed=0, seq=20, pads=(0, 4, 9)):
    return hf_oracle.padded_batch(VOCAB, seed, seq, pads, low=3)


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


def test_left_padding_gives_each_row_its_unpadded_logits(variant):
    """Positions come from the mask (OPT's offset of 2 included): a padded row's logits are
    those of the same tokens alone, in transformers and here."""
    _, path, torch_model = variant
    ids, mask = padded_batch()
    model = models.from_pretrained(path)
    padded = np.asarray(model(ids, attention_mask=mask))
    alone = np.asarray(model(ids[2:, 9:]))
    np.testing.assert_allclose(padded[2, 9:], alone[0], atol=1e-4, rtol=0)
    np.testing.assert_allclose(alone, torch_logits(torch_model, ids[2:, 9:]), atol=1e-4, rtol=0)


def test_param_tree_mirrors_torch_module_names(variant):
    name, path, torch_model = variant
    model = models.from_pretrained(path)
    ours = {".".join(p.key for p in path_) for path_, _ in
            jax.tree_util.tree_leaves_with_path(model.params)}
    leaf = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}
    ours = {n.rsplit(".", 1)[0] + "." + leaf[n.rsplit(".", 1)[1]] for n in ours}
    theirs = set(torch_model.state_dict())
    if torch_model.config.tie_word_embeddings:
        theirs.discard("lm_head.weight")
    assert ours == theirs
    decoder = model.params["model"]["decoder"]
    assert ("project_in" in decoder) == (name == "post_ln_projected")
    assert ("final_layer_norm" in decoder) == (name == "pre_ln")  # untied_plain: no affine


def test_greedy_generation_is_token_identical_to_transformers(variant):
    name, path, torch_model = variant
    ids, mask = padded_batch(seed=1, seq=7, pads=(0, 2, 5))
    model = models.from_pretrained(path)
    ours = np.asarray(models.generate(model, None, ids, attention_mask=mask, max_new_tokens=20,
                                      stop_token_ids=()))
    with torch.no_grad():
        theirs = torch_model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask),
                                      max_new_tokens=20, min_new_tokens=20, do_sample=False,
                                      pad_token_id=1).numpy()
    np.testing.assert_array_equal(ours, theirs, err_msg=name)
    if name == "post_ln_projected":  # the scanned cache: one variant is enough
        scanned = models.from_pretrained(path, scan_layers=True)
        np.testing.assert_array_equal(
            models.generate(scanned, None, ids, attention_mask=mask, max_new_tokens=20,
                            stop_token_ids=()), ours)


def test_save_pretrained_loads_in_transformers_with_the_same_tensors(variant, tmp_path):
    _, path, torch_model = variant
    ids, mask = padded_batch(seed=2)
    for scan in (False, True):
        model = models.from_pretrained(path, scan_layers=scan)
        out = models.save_pretrained(tmp_path / f"scan{scan}", model.config, model.params)
        reloaded = quiet(transformers.AutoModelForCausalLM.from_pretrained, out).eval()
        assert type(reloaded).__name__ == "OPTForCausalLM"
        for name, tensor in torch_model.state_dict().items():
            np.testing.assert_array_equal(reloaded.state_dict()[name].numpy(), tensor.numpy(),
                                          err_msg=name)
        np.testing.assert_allclose(torch_logits(reloaded, ids, mask),
                                   torch_logits(torch_model, ids, mask), atol=1e-6)


def test_bfloat16_params_track_float32(variant):
    _, path, _ = variant
    ids, mask = padded_batch(seed=3)
    full = np.asarray(models.from_pretrained(path)(ids, attention_mask=mask))
    half = models.from_pretrained(path, dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(half.params)} == {jnp.dtype(jnp.bfloat16)}
    logits = half(ids, attention_mask=mask)
    assert logits.dtype == jnp.float32
    scale = np.abs(on_tokens(full, mask)).max()
    assert np.abs(on_tokens(logits, mask) - on_tokens(full, mask)).max() < 0.05 * scale


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
    ("pre_ln", ["q_proj", "v_proj"]),            # the seeds' opt-6.7b recipe
    ("post_ln_projected", "all-linear"),          # project_in / project_out too
    ("untied_plain", ["q_proj", "v_proj", "fc2"]),
])
def test_peft_adapters_both_ways(checkpoints, name, targets, tmp_path):
    _, path, _ = checkpoints(name)
    ids, mask = padded_batch(seed=4)
    model = models.from_pretrained(path)
    # lora_jax -> PeftModel.
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, rank_pattern={"q_proj": 2})
    adapter = random_adapter(config, model.params)
    if targets == "all-linear" and name == "post_ln_projected":
        assert {"model.decoder.project_in", "model.decoder.project_out"} <= set(adapter)
    save_peft(tmp_path / "ours", adapter, config, model.params, task_type="CAUSAL_LM")
    base = quiet(transformers.AutoModelForCausalLM.from_pretrained, path)
    in_peft = peft.PeftModel.from_pretrained(base, str(tmp_path / "ours")).eval()
    ours = lora_logits(model, model.params, adapter, config, ids, mask)
    np.testing.assert_allclose(on_tokens(ours, mask), on_tokens(torch_logits(in_peft, ids, mask), mask),
                               atol=1e-4, rtol=0)
    # A PEFT adapter with random weights -> lora_jax (all-linear: unrolled and scanned).
    base = quiet(transformers.AutoModelForCausalLM.from_pretrained, path)
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
        got = lora_logits(model, loaded.params, loaded.adapter, loaded.config, ids, mask)
        np.testing.assert_allclose(on_tokens(got, mask), expected, atol=1e-4, rtol=0,
                                   err_msg=f"scan_layers={scan}")


# -- sharding -------------------------------------------------------------------------------

def test_tensor_parallel_splits_attention_and_fc_by_their_roles():
    model = models.from_config({"model_type": "opt", **TINY, "word_embed_proj_dim": 16},
                               scan_layers=True)
    mesh = AbstractMesh((1, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    config = LoraConfig(target_modules="all-linear", stacked_modules=r"model\.decoder\.layers\..*")
    specs = sharding.param_specs(model.params, mesh, "tp", config=config)
    layers = specs["model"]["decoder"]["layers"]
    # Column-parallel q/k/v and fc1 (output axis), row-parallel out_proj and fc2 (input axis),
    # behind the layer axis.
    assert layers["self_attn"]["q_proj"]["kernel"] == PartitionSpec(None, None, "model")
    assert layers["self_attn"]["q_proj"]["bias"] == PartitionSpec(None, "model")
    assert layers["fc1"]["kernel"] == PartitionSpec(None, None, "model")
    assert layers["self_attn"]["out_proj"]["kernel"] == PartitionSpec(None, "model", None)
    assert layers["fc2"]["kernel"] == PartitionSpec(None, "model", None)


# -- bad input ------------------------------------------------------------------------------

def test_shape_disagreeing_with_config_names_tensor_and_both_shapes(tmp_path):
    from safetensors.numpy import load_file, save_file

    model = models.from_config({"model_type": "opt", **TINY, "word_embed_proj_dim": 16})
    out = models.save_pretrained(tmp_path, model.config, model.params)
    state = load_file(out / "model.safetensors")
    state["model.decoder.project_in.weight"] = np.zeros((32, 12), np.float32)
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"'model\.decoder\.project_in\.weight' \(in "
                       r"model\.safetensors\) has shape \(32, 12\), expected \(32, 16\)"):
        models.from_pretrained(out)


def test_unsupported_activation_lists_the_supported_ones():
    with pytest.raises(UnsupportedModelError, match=r"unsupported activation 'swiglu'; "
                       r"supported: \[.*'relu'.*\]"):
        models.from_config({"model_type": "opt", **TINY, "activation_function": "swiglu"})


def test_random_init_uses_init_std_and_mirrors_torch_names():
    model = models.from_config({"model_type": "opt", **TINY}, seed=0)
    q = np.asarray(model.params["model"]["decoder"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"])
    assert 0.15 < q.std() < 0.25  # init_std=0.2, OPT's name for initializer_range
    positions = model.params["model"]["decoder"]["embed_positions"]["embedding"]
    assert positions.shape == (64 + 2, 32)  # OPT's offset of 2


def test_hub_checkpoint_without_model_prefix_loads(checkpoints, tmp_path):
    """facebook/opt-* files on the Hub name tensors ``decoder.*`` (no ``model.``) and keep a
    tied ``lm_head.weight`` copy: both load, with no unused-tensor warning."""
    import shutil

    from safetensors.numpy import load_file, save_file

    _, path, torch_model = checkpoints("pre_ln")
    shutil.copy(path / "config.json", tmp_path / "config.json")
    state = load_file(path / "model.safetensors")
    renamed = {name.removeprefix("model."): value for name, value in state.items()}
    renamed["lm_head.weight"] = renamed["decoder.embed_tokens.weight"]
    save_file(renamed, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = models.from_pretrained(tmp_path)
    ids, mask = padded_batch(seed=5)
    np.testing.assert_allclose(on_tokens(model(ids, attention_mask=mask), mask),
                               on_tokens(torch_logits(torch_model, ids, mask), mask),
                               atol=1e-4, rtol=0)
