"""Phi-3 (4k-context variants) against transformers' PyTorch implementation and PEFT, on
tiny random checkpoints: fused qkv_proj / gate_up_proj, partial rotary embeddings,
sliding windows, and LongRoPE refused."""

import json

import numpy as np
import peft
import pytest
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
            num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128,
            bos_token_id=1, eos_token_id=2, pad_token_id=0)


@pytest.fixture(scope="module")
def phi3(tmp_path_factory):
    model = torch_model(transformers.Phi3Config(**TINY))
    return save(model, tmp_path_factory.mktemp("phi3")), model


def test_logits_match_torch_with_padding_unrolled_and_scanned(phi3):
    path, reference = phi3
    ids, mask = left_padded(VOCAB)
    expected = torch_logits(reference, ids, mask)
    for scan in (False, True):
        model = models.from_pretrained(path, scan_layers=scan)
        assert type(model.module).__name__ == "Phi3ForCausalLM"
        assert_close_on_tokens(model(ids, attention_mask=mask), expected, mask)
    layer = models.from_pretrained(path).params["model"]["layers"]["0"]
    assert layer["self_attn"]["qkv_proj"]["kernel"].shape == (32, (4 + 2 * 2) * 8)
    assert layer["mlp"]["gate_up_proj"]["kernel"].shape == (32, 2 * 48)
    assert set(layer["self_attn"]) == {"qkv_proj", "o_proj"}


def test_partial_rotary_and_sliding_window_match_torch(tmp_path):
    config = transformers.Phi3Config(**{**TINY, "num_key_value_heads": 4}, partial_rotary_factor=0.5,
                                     sliding_window=5)
    reference = torch_model(config)
    model = models.from_pretrained(save(reference, tmp_path))
    assert model.module.config.sliding_windows == (5, 5)
    assert dict(model.module.config.rope)["partial_rotary_factor"] == 0.5
    ids, mask = left_padded(VOCAB, seq=16, seed=1)
    assert_close_on_tokens(model(ids, attention_mask=mask), torch_logits(reference, ids, mask), mask)


def test_greedy_generation_equals_transformers_generate(tmp_path):
    # A wide init gives peaked next-token distributions: no near-ties in the argmax. No
    # eos: transformers' min_new_tokens would forbid it, lora_jax's loop does not.
    reference = torch_model(transformers.Phi3Config(**{**TINY, "eos_token_id": None}, initializer_range=0.2))
    path = save(reference, tmp_path)
    ids, mask = left_padded(VOCAB, seq=7, seed=2)
    ours = our_greedy(models.from_pretrained(path), ids, mask, 20)
    np.testing.assert_array_equal(ours, torch_greedy(reference, ids, mask, 20))


@pytest.mark.parametrize("targets", [["qkv_proj", "gate_up_proj"], "all-linear"])
def test_peft_adapters_on_the_fused_modules_both_ways(phi3, tmp_path, targets):
    path, _ = phi3
    model = models.from_pretrained(path)
    ids, mask = left_padded(VOCAB, seed=3)
    adapter_round_trip(
        model, path, tmp_path, ids, mask,
        ours=LoraConfig(r=4, lora_alpha=8, target_modules=targets, alpha_pattern={"gate_up_proj": 3}),
        theirs=peft.LoraConfig(r=4, lora_alpha=16, target_modules=targets, rank_pattern={"gate_up_proj": 2}),
    )


def test_bfloat16_tracks_float32_as_closely_as_transformers(phi3):
    path, _ = phi3
    assert_bfloat16_tracks_float32(path, *left_padded(VOCAB, seed=5))


def test_save_pretrained_loads_in_transformers(phi3, tmp_path):
    path, reference = phi3
    model = models.from_pretrained(path, scan_layers=True)
    reloaded = load_torch(models.save_pretrained(tmp_path, model.config, model.params))
    assert type(reloaded).__name__ == "Phi3ForCausalLM"
    for name, tensor in reference.state_dict().items():
        np.testing.assert_array_equal(reloaded.state_dict()[name].numpy(), tensor.numpy(), err_msg=name)


@pytest.mark.parametrize("rope", [{"type": "longrope"}, {"type": "su"}, {"rope_type": "longrope"}])
def test_longrope_is_refused_listing_what_is_supported(rope):
    rope = {**rope, "short_factor": [1.0] * 4, "long_factor": [2.0] * 4}
    config = {"model_type": "phi3", **TINY, "rope_scaling": rope, "original_max_position_embeddings": 32}
    with pytest.raises(models.UnsupportedModelError, match=r"LongRoPE.*supported: \['default'\]"):
        models.from_config(config)


def test_checkpoint_disagreeing_with_its_config_names_the_tensor_and_both_shapes(phi3, tmp_path):
    path, _ = phi3
    (tmp_path / "model.safetensors").symlink_to(f"{path}/model.safetensors")
    config = json.loads(open(f"{path}/config.json").read())
    config["num_key_value_heads"] = 4  # the checkpoint's qkv_proj holds 2 KV heads
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(models.ModelLoadError, match=r"tensor 'model\.layers\.0\.self_attn\.qkv_proj\.weight'.*"
                       r"has shape \(64, 32\), expected \(96, 32\)"):
        models.from_pretrained(tmp_path)


def test_unsupported_model_type_lists_the_supported_ones():
    with pytest.raises(models.UnsupportedModelError, match=r"'phi3small'.*'phi3'.*'qwen3', 'qwen3_moe'"):
        models.from_config({"model_type": "phi3small", **TINY})
