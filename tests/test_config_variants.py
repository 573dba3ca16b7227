"""LoraConfig's variant fields (PEFT 0.21 names): accepted forms, normalisation, and errors naming the field."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lora_jax import LoraConfig


def config(**kwargs) -> LoraConfig:
    return LoraConfig(target_modules=["q"], **kwargs)


@pytest.mark.parametrize("init,stored", [
    (True, True), (False, False), ("gaussian", "gaussian"), ("Gaussian", "gaussian"),
    ("pissa", "pissa"), ("pissa_niter_0", "pissa_niter_0"), ("pissa_niter_16", "pissa_niter_16"),
    ("olora", "olora"), ("OLoRA", "olora"), (np.bool_(True), True),
])
def test_supported_inits_are_accepted_as_peft_spells_them(init, stored):
    assert config(init_lora_weights=init).init_lora_weights == stored


@pytest.mark.parametrize("init,changes", [(True, False), ("gaussian", False), ("pissa", True),
                                          ("pissa_niter_3", True), ("olora", True)])
def test_changes_base_marks_the_inits_that_rewrite_kernels(init, changes):
    assert config(init_lora_weights=init).changes_base is changes


def test_pissa_niter_reads_the_iteration_count():
    assert config(init_lora_weights="pissa_niter_7").pissa_niter() == 7
    assert config(init_lora_weights="pissa").pissa_niter() is None


@pytest.mark.parametrize("init", ["eva", "corda", "orthogonal", "lora_ga", "mica"])
def test_peft_inits_lora_jax_lacks_are_refused_with_the_supported_list(init):
    with pytest.raises(ValueError, match=rf"init_lora_weights='{init}' is a PEFT initialisation lora_jax does "
                                         r"not implement; supported: True, False, 'gaussian', 'pissa'"):
        config(init_lora_weights=init)


@pytest.mark.parametrize("init,match", [
    ("pissa_niter_", "must be a non-negative integer"),
    ("pissa_niter_-1", "must be a non-negative integer"),
    ("pissa_niter_two", "must be a non-negative integer"),
    ("kaiming", "must be one of True, False, 'gaussian'"),
    (1, "must be a bool or a string"),
    (None, "must be a bool or a string"),
])
def test_bad_init_values_name_the_field(init, match):
    with pytest.raises(ValueError, match=match):
        config(init_lora_weights=init)


@pytest.mark.parametrize("field,value", [("lora_alpha", 0), ("lora_alpha", -8), ("alpha_pattern", {"q": -1})])
def test_pissa_needs_a_positive_scaling(field, value):
    with pytest.raises(ValueError, match=rf"LoraConfig\.{field}.* must be positive with init_lora_weights='pissa'"):
        config(init_lora_weights="pissa", **{field: value})
    config(init_lora_weights="olora", **{field: value})  # OLoRA does not divide by the scaling


def test_loftq_config_takes_peft_defaults_and_only_goes_with_loftq():
    assert config(init_lora_weights="loftq", loftq_config={"loftq_iter": 3}).loftq_config == \
        {"loftq_bits": 4, "loftq_iter": 3}
    assert config().loftq_config == {}
    with pytest.raises(ValueError, match="init_lora_weights='loftq' needs loftq_config"):
        config(init_lora_weights="loftq")
    with pytest.raises(ValueError, match="loftq_config=.* is set but init_lora_weights is True"):
        config(loftq_config={"loftq_bits": 4})


@pytest.mark.parametrize("loftq,match", [
    ({"loftq_bits": 2}, r"loftq_config\['loftq_bits'\] must be one of \(4, 8\)"),
    ({"loftq_bits": "4"}, r"loftq_config\['loftq_bits'\]"),
    ({"loftq_iter": 0}, r"loftq_config\['loftq_iter'\] must be a positive integer"),
    ({"loftq_iters": 2}, r"loftq_config has unknown keys \['loftq_iters'\]"),
    ([4, 1], "loftq_config must be a dict"),
])
def test_bad_loftq_config_names_the_key(loftq, match):
    with pytest.raises(ValueError, match=match):
        config(init_lora_weights="loftq", loftq_config=loftq)


def test_trainable_token_indices_take_peft_s_two_forms():
    assert config(trainable_token_indices=[5, 2, np.int64(7)]).trainable_token_indices == (5, 2, 7)
    assert config(trainable_token_indices={"embed_tokens": [0, 1]}).trainable_token_indices == \
        {"embed_tokens": (0, 1)}
    assert config().trainable_token_indices is None


@pytest.mark.parametrize("value,match", [
    ([1, -2], r"trainable_token_indices must be a non-empty list of non-negative token ids"),
    ([], r"trainable_token_indices must be a non-empty list"),
    ([1.0], r"trainable_token_indices must be a non-empty list"),
    ([3, 3], r"lists token ids \[3\] more than once"),
    ("embed_tokens", r"trainable_token_indices must be a list of token ids"),
    (5, r"trainable_token_indices must be a list of token ids"),
    ({}, r"trainable_token_indices is an empty dict"),
    ({"embed": [True]}, r"trainable_token_indices\['embed'\] must be a non-empty list"),
    ({1: [0]}, r"trainable_token_indices keys must be module names"),
])
def test_bad_trainable_token_indices_name_the_field(value, match):
    with pytest.raises(ValueError, match=match):
        config(trainable_token_indices=value)


@pytest.mark.parametrize("field", ["use_dora", "ensure_weight_tying"])
def test_flags_must_be_bools_and_default_to_peft_s_false(field):
    assert getattr(config(), field) is False
    assert getattr(config(**{field: True}), field) is True
    with pytest.raises(ValueError, match=rf"LoraConfig\.{field} must be True or False, got 'yes'"):
        config(**{field: "yes"})


def test_variant_fields_round_trip_through_json():
    original = config(init_lora_weights="loftq", loftq_config={"loftq_bits": 8}, use_dora=True,
                      trainable_token_indices={"embed_tokens": [3, 4]}, ensure_weight_tying=True)
    plain = json.loads(json.dumps(original.to_dict()))
    assert plain["trainable_token_indices"] == {"embed_tokens": [3, 4]}
    assert plain["loftq_config"] == {"loftq_bits": 8, "loftq_iter": 1}
    assert LoraConfig(**plain) == original
