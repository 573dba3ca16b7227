"""LoraConfig <-> adapter_config.json: every PEFT field, both ways, and as PEFT itself reads it."""

from __future__ import annotations

import json
import warnings

import jax
import jax.numpy as jnp
import pytest

import lora_jax
from lora_jax import LoraConfig
from lora_jax.peft.adapter_config import PEFT_FIELDS, lora_config_from_peft, to_adapter_config

peft = pytest.importorskip("peft")

PARAMS = {"model": {
    "embed_tokens": {"embedding": jnp.ones((16, 8))},
    "layers": {str(i): {"self_attn": {name: {"kernel": jnp.ones((8, 8)), "bias": jnp.zeros(8)}
                                      for name in ("q_proj", "k_proj", "v_proj")}} for i in range(3)},
    "norm": {"scale": jnp.ones(8)},
}}

CONFIGS = {
    "everything": LoraConfig(
        r=4, lora_alpha=12, target_modules=["q_proj", "v_proj"], exclude_modules=["k_proj"], lora_dropout=0.1,
        use_rslora=True, rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 3.0}, init_lora_weights="gaussian",
        bias="lora_only", modules_to_save=["norm"], layers_to_transform=[0, 2], layers_pattern="layers",
        fan_in_fan_out=False, use_dora=True, trainable_token_indices=[3, 9], ensure_weight_tying=True),
    "regex_and_dict_tokens": LoraConfig(
        r=2, target_modules=r".*\.(q_proj|k_proj)", init_lora_weights=False, bias="all",
        trainable_token_indices={"model.embed_tokens": [1, 2, 3]}),
    "pissa": LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights="pissa"),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_save_peft_writes_every_field_and_it_reads_back_equal(tmp_path, name):
    config = CONFIGS[name]
    if config.changes_base:
        adapter, params = lora_jax.init_with_base(config, PARAMS, jax.random.key(0))
    else:
        adapter, params = lora_jax.init(config, PARAMS, jax.random.key(0)), PARAMS
    lora_jax.save_peft(tmp_path, adapter, config, params)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    back = lora_config_from_peft(written)
    for field in PEFT_FIELDS:
        assert getattr(back, field) == getattr(config, field), field
    # PEFT reads the same values from the same file
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.LoraConfig.from_pretrained(str(tmp_path))
    for field in PEFT_FIELDS:
        value = getattr(theirs, field)
        value = sorted(value) if isinstance(value, set) else value
        want = config.to_dict()[field]
        want = sorted(want) if field == "target_modules" and isinstance(want, list) else want
        assert value == want, field


def test_loftq_settings_round_trip():
    config = LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="loftq", loftq_config={"loftq_iter": 3})
    written = json.loads(json.dumps(to_adapter_config(config, {}, None, True, None, None, None)))
    assert written["loftq_config"] == {"loftq_bits": 4, "loftq_iter": 3}
    assert lora_config_from_peft(written) == config


def test_a_setting_lora_jax_cannot_represent_is_refused_naming_it():
    with pytest.raises(ValueError, match="lora_bias"):
        lora_config_from_peft({"peft_type": "LORA", "target_modules": ["q"], "lora_bias": True})
    with pytest.raises(ValueError, match=r'"use_dora" is "yes"'):
        lora_config_from_peft({"peft_type": "LORA", "target_modules": ["q"], "use_dora": "yes"})
