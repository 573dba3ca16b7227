"""Qwen3-MoE against transformers' PyTorch implementation and PEFT on tiny random
checkpoints: router logits and choices, top-k renormalisation, dense and sparse layers,
fused and per-expert checkpoints, and LoRA on the expert stacks as PEFT's
``target_parameters``."""

import json
import warnings

import jax
import numpy as np
import peft
import pytest
import safetensors.numpy
import torch
import transformers
from hf_oracle import (
    adapter_round_trip,
    assert_bfloat16_tracks_float32,
    assert_close_on_tokens,
    left_padded,
    load_torch,
    lora_logits,
    our_greedy,
    peft_loaded,
    peft_trained,
    quiet,
    random_adapter,
    save,
    torch_greedy,
    torch_logits,
    torch_model,
)

import lora_jax
from lora_jax import LoraConfig, models
from lora_jax.models.moe import route
from lora_jax.transform import LoraFallbackWarning

VOCAB = 64
TINY = dict(hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128,
            num_experts=6, num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[1])
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
# The lora_jax spelling of PEFT's target_parameters=EXPERTS: the expert stacks are bare
# parameters ("param" leaves) with a leading expert axis.
EXPERT_LORA = dict(kernel_names=("kernel", "embedding", "param"), stacked_modules=r".*\.experts\..*")


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    """Sparse layers 0 and 2, a dense MLP in layer 1; top-2 of 6 experts, renormalised."""
    model = torch_model(transformers.Qwen3MoeConfig(**TINY))
    return save(model, tmp_path_factory.mktemp("qwen3_moe")), model


def test_logits_match_torch_with_padding(moe):
    path, reference = moe
    ids, mask = left_padded(VOCAB)
    model = models.from_pretrained(path)
    assert type(model.module).__name__ == "Qwen3MoeForCausalLM"
    assert_close_on_tokens(model(ids, attention_mask=mask), torch_logits(reference, ids, mask), mask)
    layers = model.params["model"]["layers"]
    assert layers["0"]["mlp"]["experts"]["gate_up_proj"]["param"].shape == (6, 32, 2 * 16)
    assert layers["0"]["mlp"]["gate"]["weight"]["param"].shape == (32, 6)
    assert sorted(layers["1"]["mlp"]) == ["down_proj", "gate_proj", "up_proj"]
    with pytest.raises(NotImplementedError, match="dense and sparse layers"):
        models.from_pretrained(path, scan_layers=True)


def test_router_logits_and_choices_equal_torch(moe):
    path, reference = moe
    ids, mask = left_padded(VOCAB, seed=1)
    with torch.no_grad():
        out = reference(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), output_router_logits=True)
    model = models.from_pretrained(path)
    _, state = jax.jit(lambda p: model.module.apply({"params": p}, ids, attention_mask=mask,
                                                    mutable=["intermediates"]))(model.params)
    layers = state["intermediates"]["model"]["layers"]
    assert sorted(layers) == ["0", "2"]  # the sparse layers, as transformers records them
    valid = mask.reshape(-1).astype(bool)
    for ours, theirs in zip((layers["0"], layers["2"]), out.router_logits):
        ours = np.asarray(ours["mlp"]["router_logits"][0]).reshape(-1, 6)
        theirs = theirs.numpy()
        np.testing.assert_allclose(ours[valid], theirs[valid], atol=1e-5, rtol=0)
        _, chosen = route(ours, 2, True)
        torch_chosen = torch.topk(torch.softmax(torch.as_tensor(theirs), -1), 2, dim=-1).indices.numpy()
        np.testing.assert_array_equal(np.sort(chosen, -1)[valid], np.sort(torch_chosen, -1)[valid])


def test_routing_without_renormalisation_and_scanned_layers_match_torch(tmp_path):
    config = transformers.Qwen3MoeConfig(**{**TINY, "num_hidden_layers": 2, "mlp_only_layers": [],
                                            "norm_topk_prob": False, "num_experts_per_tok": 3},
                                         head_dim=16)
    reference = torch_model(config)
    path = save(reference, tmp_path)
    ids, mask = left_padded(VOCAB, seed=2)
    expected = torch_logits(reference, ids, mask)
    for scan in (False, True):
        model = models.from_pretrained(path, scan_layers=scan)
        assert model.module.config.norm_topk_prob is False
        assert_close_on_tokens(model(ids, attention_mask=mask), expected, mask)


def test_fused_checkpoint_loads_like_the_per_expert_one(moe, tmp_path):
    path, reference = moe
    quiet(reference.save_pretrained, str(tmp_path), save_original_format=False)
    keys = safetensors.numpy.load_file(str(tmp_path / "model.safetensors"))
    assert "model.layers.0.mlp.experts.gate_up_proj" in keys
    fused, per_expert = models.from_pretrained(tmp_path), models.from_pretrained(path)
    for a, b in zip(jax.tree.leaves(fused.params), jax.tree.leaves(per_expert.params)):
        np.testing.assert_array_equal(a, b)


def test_bfloat16_tracks_float32_as_closely_as_transformers(moe):
    path, _ = moe
    assert_bfloat16_tracks_float32(path, *left_padded(VOCAB, seed=8))


def test_greedy_generation_equals_transformers_generate(tmp_path):
    config = transformers.Qwen3MoeConfig(**TINY, initializer_range=0.2)
    reference = torch_model(config)
    path = save(reference, tmp_path)
    ids, mask = left_padded(VOCAB, seq=7, seed=3)
    np.testing.assert_array_equal(our_greedy(models.from_pretrained(path), ids, mask, 20),
                                  torch_greedy(reference, ids, mask, 20))


def test_save_pretrained_writes_per_expert_tensors_transformers_loads(moe, tmp_path):
    path, reference = moe
    model = models.from_pretrained(path)
    out = models.save_pretrained(tmp_path, model.config, model.params)
    keys = safetensors.numpy.load_file(str(out / "model.safetensors"))
    assert "model.layers.2.mlp.experts.5.up_proj.weight" in keys
    assert "model.layers.2.mlp.experts.gate_up_proj" not in keys
    reloaded = load_torch(out)
    for name, tensor in reference.state_dict().items():
        np.testing.assert_array_equal(reloaded.state_dict()[name].numpy(), tensor.numpy(), err_msg=name)


def test_expert_lora_stays_on_the_low_rank_path_and_equals_the_merged_model(moe):
    path, _ = moe
    model = models.from_pretrained(path)
    config = LoraConfig(r=2, target_modules=["q_proj", "experts.gate_up_proj", "experts.down_proj"],
                        **EXPERT_LORA)
    adapter = random_adapter(config, model.params)
    assert adapter["model.layers.0.mlp.experts.down_proj"]["lora_A"].shape == (6, 16, 2)
    ids, mask = left_padded(VOCAB, seed=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LoraFallbackWarning)
        ours = lora_logits(model, model.params, adapter, config, ids, mask)
        apply = lora_jax.lora(lambda p, x: model.module.apply({"params": p}, x), config)
        grads = jax.jit(jax.grad(lambda a: apply(model.params, a, ids).sum()))(adapter)
    merged = lora_jax.merge(model.params, adapter, config)
    assert_close_on_tokens(ours, np.asarray(models.Model(model.module, merged, model.config)(
        ids, attention_mask=mask)), mask, atol=1e-5)
    assert float(abs(grads["model.layers.2.mlp.experts.gate_up_proj"]["lora_A"]).sum()) > 0


@pytest.mark.parametrize("parameters", [EXPERTS, EXPERTS[1:], ["mlp.gate.weight", EXPERTS[0]]])
def test_peft_target_parameters_adapters_both_ways(moe, tmp_path, parameters):
    """Both expert stacks (nested ParamWrappers), one of them, and the router."""
    path, _ = moe
    model = models.from_pretrained(path)
    ids, mask = left_padded(VOCAB, seed=5)
    names = [p.split(".", 1)[1] if p.startswith("mlp.experts") else p for p in parameters]
    adapter_round_trip(
        model, path, tmp_path, ids, mask,
        ours=LoraConfig(r=2, lora_alpha=4, target_modules=["v_proj", *names], rank_pattern={names[-1]: 3},
                        **EXPERT_LORA),
        theirs=peft.LoraConfig(r=3, lora_alpha=5, target_modules=["q_proj"], target_parameters=parameters,
                               alpha_pattern={"gate_up_proj": 2}),
    )
    written = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert written["target_modules"] == [f"model.layers.{i}.self_attn.v_proj" for i in range(3)]
    assert len(written["target_parameters"]) == 2 * len(parameters)


def test_all_linear_adapters_both_ways_on_an_all_sparse_model(tmp_path):
    """lora_jax's "all-linear" takes every kernel: the attention projections here (the
    router and the experts are bare parameters). peft 0.21 on transformers 5 resolves
    "all-linear" on an MoE model to the attention, the router and the experts (rank 2r on
    gate_up_proj, its conversion of transformers-4 adapters): both load exactly."""
    path = save(torch_model(transformers.Qwen3MoeConfig(**{**TINY, "mlp_only_layers": []})), tmp_path / "base")
    model = models.from_pretrained(path)
    config = LoraConfig(r=2, target_modules="all-linear")
    assert all(n.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "o_proj")
               for n in lora_jax.find_targets(config, model.params))
    ids, mask = left_padded(VOCAB, seed=6)
    adapter_round_trip(model, path, tmp_path, ids, mask, ours=config,
                       theirs=peft.LoraConfig(r=2, lora_alpha=4, target_modules="all-linear"))
    loaded = lora_jax.load_peft(tmp_path / "theirs", model.params)
    assert loaded.adapter["model.layers.0.mlp.experts.gate_up_proj"]["lora_A"].shape == (6, 32, 4)
    assert "model.layers.2.mlp.gate.weight" in loaded.adapter


def test_dense_mlp_adapters_of_an_moe_model_are_refused_by_save_peft(moe, tmp_path):
    """peft 0.21 would load LoRA on layer 1's dense down_proj into the experts' down_proj."""
    path, _ = moe
    model = models.from_pretrained(path)
    config = LoraConfig(r=2, target_modules=["q_proj", "down_proj"])
    adapter = random_adapter(config, model.params)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj.*as the experts' parameters"):
        lora_jax.save_peft(tmp_path / "out", adapter, config, model.params)
    assert not (tmp_path / "out").exists()


def test_expert_adapters_of_scanned_layers_are_refused_naming_the_fix(tmp_path):
    config = transformers.Qwen3MoeConfig(**{**TINY, "mlp_only_layers": []})
    path = save(torch_model(config), tmp_path / "base")
    trained = peft_trained(path, peft.LoraConfig(r=2, target_modules=[], target_parameters=EXPERTS))
    quiet(trained.save_pretrained, str(tmp_path / "adapter"))
    scanned = models.from_pretrained(path, scan_layers=True)
    with pytest.raises(ValueError, match="scanned layers.*scan_layers=False"):
        lora_jax.load_peft(tmp_path / "adapter", scanned.params)
    ours = LoraConfig(r=2, target_modules=["experts.down_proj"], **EXPERT_LORA)
    adapter = lora_jax.init(ours, scanned.params, jax.random.key(0))
    with pytest.raises(ValueError, match="scanned layers.*scan_layers=False"):
        lora_jax.save_peft(tmp_path / "ours", adapter, ours, scanned.params)
    assert not (tmp_path / "ours").exists()
    # Unrolled, the same file loads and matches PEFT.
    model = models.from_pretrained(path)
    loaded = lora_jax.load_peft(tmp_path / "adapter", model.params)
    ids, mask = left_padded(VOCAB, seed=7)
    assert_close_on_tokens(lora_logits(model, loaded.params, loaded.adapter, loaded.config, ids, mask),
                           torch_logits(peft_loaded(path, tmp_path / "adapter"), ids, mask), mask)


def test_per_expert_tensor_disagreeing_with_the_config_names_it_and_both_shapes(moe, tmp_path):
    path, _ = moe
    (tmp_path / "model.safetensors").symlink_to(f"{path}/model.safetensors")
    config = json.loads(open(f"{path}/config.json").read())
    config["moe_intermediate_size"] = 8  # the checkpoint's experts are 16 wide
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(models.ModelLoadError, match=r"tensor 'model\.layers\.0\.mlp\.experts\.0\.down_proj\.weight'"
                       r".*has shape \(32, 16\), expected \(32, 8\)"):
        models.from_pretrained(tmp_path)


def test_models_and_peft_agree_on_the_leaf_name_of_bare_parameters():
    from lora_jax.models.family import PARAMETER_LEAF
    from lora_jax.peft.parameters import PARAMETER_LEAF as PEFT_PARAMETER_LEAF

    assert PARAMETER_LEAF == PEFT_PARAMETER_LEAF == EXPERT_LORA["kernel_names"][-1]


def test_bad_moe_settings_are_refused():
    base = {"model_type": "qwen3_moe", **TINY}
    with pytest.raises(models.ModelLoadError, match="num_experts_per_tok=8, more than its num_experts=6"):
        models.from_config({**base, "num_experts_per_tok": 8})
    with pytest.raises(models.ModelLoadError, match="mlp_only_layers"):
        models.from_config({**base, "mlp_only_layers": "1"})


def test_expert_adapter_saved_without_params_is_refused_not_misnamed(moe, tmp_path):
    path, _ = moe
    model = models.from_pretrained(path)
    config = LoraConfig(r=2, target_modules=["experts.down_proj"], **EXPERT_LORA)
    adapter = random_adapter(config, model.params)
    with pytest.raises(ValueError, match="already names its layer.*pass params"):
        lora_jax.save_peft(tmp_path / "out", adapter, config)
    assert not (tmp_path / "out").exists()


def test_tensor_parallelism_splits_the_expert_axis(moe):
    from jax.sharding import PartitionSpec as P

    from lora_jax import sharding

    path, _ = moe
    shapes = jax.eval_shape(lambda: models.from_pretrained(path).params)
    config = LoraConfig(r=2, target_modules=["q_proj", "experts.down_proj"], **EXPERT_LORA)
    specs = sharding.param_specs(shapes, {"data": 2, "model": 3}, "fsdp_tp", config=config)
    experts = specs["model"]["layers"]["0"]["mlp"]["experts"]
    assert experts["down_proj"]["param"] == P("model", None, "data")  # (6 experts, 16, 32)
    assert experts["gate_up_proj"]["param"] == P("model", "data", None)  # (6, 32, 32)
    adapter = sharding.adapter_shardings(config, shapes, specs)["model.layers.0.mlp.experts.down_proj"]
    assert adapter == {"lora_A": P("model", None, None), "lora_B": P("model", None, "data")}


def test_expert_adapter_with_dropout_is_refused_as_peft_refuses_it(moe, tmp_path):
    path, _ = moe
    model = models.from_pretrained(path)
    config = LoraConfig(r=2, target_modules=["experts.down_proj"], lora_dropout=0.1, **EXPERT_LORA)
    adapter = random_adapter(config, model.params)
    with pytest.raises(ValueError, match=r"does not work with lora_dropout.*replace\(lora_dropout=0\.0\)"):
        lora_jax.save_peft(tmp_path / "out", adapter, config, model.params)
    lora_jax.save_peft(tmp_path / "out", adapter, config.replace(lora_dropout=0.0), model.params)
