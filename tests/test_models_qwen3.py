"""Qwen3 against transformers' PyTorch implementation and PEFT, on tiny random checkpoints:
per-head q/k norms, head_dim from the config (128 by default), tied and sliding-window
variants."""

import json

import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from hf_oracle import (
    adapter_round_trip,
    assert_bfloat16_tracks_float32,
    assert_close_on_tokens,
    left_padded,
    load_torch,
    our_greedy,
    save,
    torch_greedy,
    torch_logits,
    torch_model,
)

from lora_jax import LoraConfig, models

VOCAB = 64
TINY = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, max_position_embeddings=128,
            rope_theta=1000000.0)
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    """Untied, GQA, head_dim 16 while hidden / heads is 8."""
    model = torch_model(transformers.Qwen3Config(**TINY))
    return save(model, tmp_path_factory.mktemp("qwen3")), model


def test_logits_match_torch_with_padding_unrolled_and_scanned(qwen3):
    path, reference = qwen3
    ids, mask = left_padded(VOCAB)
    expected = torch_logits(reference, ids, mask)
    for scan in (False, True):
        model = models.from_pretrained(path, scan_layers=scan)
        assert type(model.module).__name__ == "Qwen3ForCausalLM"
        assert_close_on_tokens(model(ids, attention_mask=mask), expected, mask)
    attn = models.from_pretrained(path).params["model"]["layers"]["0"]["self_attn"]
    assert attn["q_norm"]["scale"].shape == (16,) and attn["q_proj"]["kernel"].shape == (32, 64)
    assert set(attn["q_proj"]) == {"kernel"}


def test_tied_sliding_window_attention_bias_variant_matches_torch(tmp_path):
    config = transformers.Qwen3Config(**{**TINY, "num_hidden_layers": 3}, tie_word_embeddings=True,
                                      attention_bias=True, use_sliding_window=True, sliding_window=4,
                                      max_window_layers=1)
    reference = torch_model(config)
    model = models.from_pretrained(save(reference, tmp_path))
    assert "lm_head" not in model.params
    assert model.module.config.sliding_windows == (None, 4, 4)
    assert set(model.params["model"]["layers"]["1"]["self_attn"]["o_proj"]) == {"bias", "kernel"}
    ids, mask = left_padded(VOCAB, seq=16, seed=1)
    assert_close_on_tokens(model(ids, attention_mask=mask), torch_logits(reference, ids, mask), mask)


def test_head_dim_defaults_to_128_as_in_transformers():
    config = {k: v for k, v in TINY.items() if k != "head_dim"}
    reference = transformers.Qwen3Config(**config)
    model = models.from_config({"model_type": "qwen3", **config})
    assert model.module.config.head_dim == reference.head_dim == 128
    q = model.params["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]
    assert q.shape == (32, 4 * 128)


def test_greedy_generation_equals_transformers_generate(tmp_path):
    # A wide init gives peaked next-token distributions: no near-ties in the argmax.
    reference = torch_model(transformers.Qwen3Config(**TINY, initializer_range=0.2))
    path = save(reference, tmp_path)
    ids, mask = left_padded(VOCAB, seq=7, seed=2)
    ours = our_greedy(models.from_pretrained(path), ids, mask, 20)
    np.testing.assert_array_equal(ours, torch_greedy(reference, ids, mask, 20))
    np.testing.assert_array_equal(our_greedy(models.from_pretrained(path, scan_layers=True), ids, mask, 20), ours)


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], "all-linear"])
def test_peft_adapters_both_ways(qwen3, tmp_path, targets):
    path, _ = qwen3
    model = models.from_pretrained(path)
    ids, mask = left_padded(VOCAB, seed=3)
    adapter_round_trip(
        model, path, tmp_path, ids, mask,
        ours=LoraConfig(r=4, lora_alpha=8, target_modules=targets, rank_pattern={"v_proj": 2}),
        theirs=peft.LoraConfig(r=4, lora_alpha=16, target_modules=targets, use_rslora=True),
    )


def test_save_pretrained_loads_in_transformers_float32_and_bfloat16(qwen3, tmp_path):
    path, reference = qwen3
    ids, mask = left_padded(VOCAB, seed=4)
    for scan in (False, True):
        model = models.from_pretrained(path, scan_layers=scan)
        reloaded = load_torch(models.save_pretrained(tmp_path / f"scan{scan}", model.config, model.params))
        assert type(reloaded).__name__ == "Qwen3ForCausalLM"
        for name, tensor in reference.state_dict().items():
            np.testing.assert_array_equal(reloaded.state_dict()[name].numpy(), tensor.numpy(), err_msg=name)
    assert_bfloat16_tracks_float32(path, ids, mask)
    half = models.from_pretrained(path, dtype=jnp.bfloat16)
    reloaded = load_torch(models.save_pretrained(tmp_path / "bf16", half.config, half.params))
    assert str(reloaded.dtype) == "torch.bfloat16"
    for name, tensor in reference.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor.to(torch.bfloat16)), name


def test_unsupported_rope_type_lists_what_is_supported():
    config = {"model_type": "qwen3", **TINY,
              "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}}
    with pytest.raises(models.UnsupportedModelError, match=r"'yarn'.*supported: \['default', 'linear', 'llama3'\]"):
        models.from_config(config)


def test_checkpoint_disagreeing_with_its_config_names_the_tensor_and_both_shapes(qwen3, tmp_path):
    path, _ = qwen3
    (tmp_path / "model.safetensors").symlink_to(f"{path}/model.safetensors")
    config = json.loads(open(f"{path}/config.json").read())
    config["head_dim"] = 8  # the checkpoint's heads are 16 wide
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(models.ModelLoadError, match=r"tensor 'model\.layers\.0\.self_attn\.k_norm\.weight'.*"
                       r"has shape \(16,\), expected \(8,\)"):
        models.from_pretrained(tmp_path)
