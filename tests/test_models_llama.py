"""Llama-family models (Llama 3 rope scaling, SmolLM2-like tied, Mistral, Qwen2) against
transformers' PyTorch implementation on tiny random checkpoints."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from lora_jax import models

VOCAB = 128
TINY = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    max_position_embeddings=256,
)


def llama3_config(**overrides):
    rope = {
        "rope_type": "llama3",
        "rope_theta": 50000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    }
    return transformers.LlamaConfig(**{**TINY, "rope_parameters": rope, **overrides})


def build_torch(config, seed=0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    # Random init leaves biases at zero; make them matter for the comparison.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.5)
    return model


def torch_logits(model, ids, mask=None):
    with torch.no_grad():
        mask_t = None if mask is None else torch.tensor(mask)
        return model(torch.tensor(ids), attention_mask=mask_t).logits.float().numpy()


def batch_with_left_padding(seq=24, batch=3, seed=0):
    rng = np.random.RandomState(seed)
    ids = rng.randint(0, VOCAB, (batch, seq))
    mask = np.ones((batch, seq), np.int64)
    mask[1, :5] = 0
    mask[2, :11] = 0
    return ids, mask


def assert_close_on_tokens(ours, ref, mask, atol=1e-4):
    # Padded query positions attend to nothing and are meaningless in both frameworks.
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(ours)[valid], ref[valid], atol=atol, rtol=0)


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory):
    torch_model = build_torch(llama3_config(tie_word_embeddings=False))
    path = tmp_path_factory.mktemp("llama3")
    torch_model.save_pretrained(path)
    return path, torch_model


def test_llama3_rope_untied_logits_match_torch_with_padding(llama3_dir):
    path, torch_model = llama3_dir
    ids, mask = batch_with_left_padding()
    model = models.from_pretrained(path)
    assert "lm_head" in model.params
    assert_close_on_tokens(
        model(ids, attention_mask=mask), torch_logits(torch_model, ids, mask), mask
    )


def test_scan_layers_gives_unrolled_logits_and_stacked_kernels(llama3_dir):
    path, _ = llama3_dir
    ids, mask = batch_with_left_padding()
    unrolled = models.from_pretrained(path)
    scanned = models.from_pretrained(path, scan_layers=True)
    q = scanned.params["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert q.shape == (2, 64, 64)
    np.testing.assert_array_equal(
        q[1], unrolled.params["model"]["layers"]["1"]["self_attn"]["q_proj"]["kernel"]
    )
    np.testing.assert_allclose(
        scanned(ids, attention_mask=mask), unrolled(ids, attention_mask=mask), atol=1e-5
    )


def test_smollm2_like_tied_embeddings_have_no_lm_head(tmp_path):
    config = transformers.LlamaConfig(
        **{**TINY, "num_key_value_heads": 1}, tie_word_embeddings=True, rope_theta=100000.0
    )
    torch_model = build_torch(config)
    torch_model.save_pretrained(tmp_path)
    model = models.from_pretrained(tmp_path)
    assert "lm_head" not in model.params
    ids = np.random.RandomState(1).randint(0, VOCAB, (2, 16))
    np.testing.assert_allclose(model(ids), torch_logits(torch_model, ids), atol=1e-4, rtol=0)


def test_mistral_sliding_window_matches_torch(tmp_path):
    # A window shorter than the sequence, so the sliding mask really changes the result.
    config = transformers.MistralConfig(**TINY, sliding_window=6, rope_theta=10000.0)
    torch_model = build_torch(config)
    torch_model.save_pretrained(tmp_path)
    model = models.from_pretrained(tmp_path)
    assert model.module.config.sliding_windows == (6, 6)
    ids = np.random.RandomState(2).randint(0, VOCAB, (2, 20))
    np.testing.assert_allclose(model(ids), torch_logits(torch_model, ids), atol=1e-4, rtol=0)


def test_qwen2_qkv_biases_match_torch_with_sharded_checkpoint(tmp_path):
    config = transformers.Qwen2Config(**TINY, rope_theta=1000000.0)
    torch_model = build_torch(config)
    torch_model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    model = models.from_pretrained(tmp_path)
    attn = model.params["model"]["layers"]["0"]["self_attn"]
    assert {"bias", "kernel"} == set(attn["q_proj"]) and set(attn["o_proj"]) == {"kernel"}
    ids, mask = batch_with_left_padding(seed=3)
    assert_close_on_tokens(
        model(ids, attention_mask=mask), torch_logits(torch_model, ids, mask), mask
    )


def test_linear_rope_scaling_and_old_style_config_keys():
    # Older config.json files keep rope_theta / rope_scaling at the top level.
    old = {
        **TINY,
        "model_type": "llama",
        "rope_theta": 500.0,
        "rope_scaling": {"type": "linear", "factor": 2.0},
    }
    cfg = models.LlamaConfig.from_hf(old)
    assert dict(cfg.rope) == {"rope_theta": 500.0, "rope_type": "linear", "factor": 2.0}
    new = transformers.LlamaConfig(
        **TINY, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}
    )
    torch_model = build_torch(new)
    model = models.from_config(old)
    state = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    model.params = _params_from_torch_state(model, state)
    ids = np.random.RandomState(4).randint(0, VOCAB, (1, 30))
    np.testing.assert_allclose(model(ids), torch_logits(torch_model, ids), atol=1e-4, rtol=0)


def _params_from_torch_state(model, state):
    """Independent of our loader: fill the param tree by name from a torch state dict."""

    def leaf(path, value):
        names = [p.key for p in path]
        key = ".".join(names[:-1]) + ".weight" if names[-1] != "bias" else ".".join(names)
        array = state[key]
        return jnp.asarray(array.T if names[-1] == "kernel" else array)

    return jax.tree_util.tree_map_with_path(leaf, model.params)


def test_save_pretrained_round_trips_through_transformers(llama3_dir, tmp_path):
    path, torch_model = llama3_dir
    ids, mask = batch_with_left_padding(seed=5)
    for scan in (False, True):
        model = models.from_pretrained(path, scan_layers=scan)
        out_dir = models.save_pretrained(tmp_path / f"scan{scan}", model.config, model.params)
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(out_dir).eval()
        assert type(reloaded).__name__ == "LlamaForCausalLM"
        for name, tensor in torch_model.state_dict().items():
            np.testing.assert_array_equal(reloaded.state_dict()[name].numpy(), tensor.numpy())
        np.testing.assert_allclose(
            torch_logits(reloaded, ids, mask), torch_logits(torch_model, ids, mask), atol=1e-6
        )


def test_to_hf_state_dict_is_torch_layout(llama3_dir):
    path, torch_model = llama3_dir
    state = models.to_hf_state_dict(*_config_and_params(models.from_pretrained(path)))
    reference = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    assert set(state) == set(reference)
    for name, value in reference.items():
        np.testing.assert_array_equal(state[name], value, err_msg=name)


def _config_and_params(model):
    return model.config, model.params


def test_bfloat16_params_load_and_track_float32(llama3_dir, tmp_path):
    path, torch_model = llama3_dir
    ids = np.random.RandomState(6).randint(0, VOCAB, (2, 12))
    full = models.from_pretrained(path)
    half = models.from_pretrained(path, dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(half.params)} == {jnp.dtype(jnp.bfloat16)}
    logits = half(ids)
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, full(ids), atol=0.1)
    # bf16 storage with float32 compute.
    mixed = models.from_pretrained(path, dtype=jnp.bfloat16, compute_dtype=jnp.float32)
    np.testing.assert_allclose(mixed(ids), full(ids), atol=0.05)
    # Saved in bf16, transformers loads bf16 tensors equal to the torch ones rounded.
    out = models.save_pretrained(tmp_path, half.config, half.params)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.dtype == torch.bfloat16
    for name, tensor in torch_model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor.to(torch.bfloat16)), name


def test_random_init_from_transformers_config_has_torch_module_paths():
    model = models.from_config(llama3_config(tie_word_embeddings=False), seed=1)
    flat = {
        ".".join(p.key for p in path)
        for path, _ in jax.tree_util.tree_leaves_with_path(model.params)
    }
    assert "model.layers.1.self_attn.q_proj.kernel" in flat
    assert "model.layers.0.mlp.down_proj.kernel" in flat
    assert "model.embed_tokens.embedding" in flat
    assert "lm_head.kernel" in flat
