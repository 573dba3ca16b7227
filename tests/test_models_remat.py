"""Per-layer remat in lora_jax.models: the same loss and gradients as without it (LoRA through the
interpreter and full fine-tuning, unrolled and scanned, every family), less compiled memory."""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax
from lora_jax import models
from lora_jax.models.blocks import check_offload_supported, remat_policy
from lora_jax.train.step import compiler_options

LLAMA = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, vocab_size=64, tie_word_embeddings=True)
GPT2 = dict(model_type="gpt2", n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=16)
BERT = dict(model_type="bert", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, vocab_size=64, architectures=["BertForSequenceClassification"],
            num_labels=3)
IDS = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 8)), jnp.int32)
MASK = jnp.array([[1] * 8, [1] * 6 + [0] * 2], jnp.int32)


def mean_output(out):
    """A scalar of the model's float32 output that depends on every logit."""
    return jnp.mean(jnp.tanh(out) * jnp.arange(out.shape[-1], dtype=jnp.float32))


def loss_and_grads(hf, remat, *, scan=False, lora_targets="all-linear"):
    model = models.from_config(hf, remat=remat, scan_layers=scan)

    def apply(p, ids, mask):
        return model.module.apply({"params": p}, ids, attention_mask=mask)

    if lora_targets is None:  # full fine-tuning
        return jax.jit(jax.value_and_grad(lambda p: mean_output(apply(p, IDS, MASK))))(model.params)
    stacked = dict(stacked_modules=r"model\.layers\..*") if scan else {}
    config = lora_jax.LoraConfig(r=2, lora_alpha=4, target_modules=lora_targets, **stacked)
    adapter = lora_jax.init(config, model.params, jax.random.key(1))
    adapter = jax.tree.map(lambda x: x + 0.05, adapter)  # B != 0: the adapter matters
    lora_apply = lora_jax.lora(apply, config)
    with warnings.catch_warnings():
        warnings.simplefilter("error", lora_jax.LoraFallbackWarning)
        return jax.jit(jax.value_and_grad(
            lambda a: mean_output(lora_apply(model.params, a, IDS, MASK))))(adapter)


def assert_same(a, b):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    np.testing.assert_allclose(loss_a, loss_b, rtol=1e-6, atol=1e-7)
    # float32 recomputation may sum in another order: 1e-5 of the gradients' scale (some
    # leaves' true gradient is ~0, e.g. a layer the output barely depends on)
    scale = max(float(np.abs(y).max()) for y in jax.tree.leaves(grads_b))
    for x, y in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("scan", [False, True])
def test_llama_remat_policies_keep_lora_loss_and_grads(scan):
    plain = loss_and_grads(LLAMA, "none", scan=scan)
    for remat in ("dots", "full"):
        assert_same(loss_and_grads(LLAMA, remat, scan=scan), plain)


def test_llama_full_fine_tuning_grads_under_remat():
    assert_same(loss_and_grads(LLAMA, "full", lora_targets=None), loss_and_grads(LLAMA, "none", lora_targets=None))


@pytest.mark.parametrize("hf", [GPT2, BERT], ids=["gpt2", "bert"])
def test_other_families_keep_lora_loss_and_grads(hf):
    assert_same(loss_and_grads(hf, "full"), loss_and_grads(hf, "none"))


def test_remat_changes_no_param_and_no_output():
    plain = models.from_config(LLAMA)
    rematted = models.from_config(LLAMA, remat="full")
    assert jax.tree.structure(plain.params) == jax.tree.structure(rematted.params)
    np.testing.assert_array_equal(plain(IDS, attention_mask=MASK), rematted(IDS, attention_mask=MASK))


@functools.cache
def temp_bytes(remat, *, scan):
    """Compiled temporaries of a LoRA gradient on a shape where activations dominate."""
    hf = dict(LLAMA, hidden_size=64, intermediate_size=128, num_hidden_layers=4)
    model = models.from_config(hf, remat=remat, scan_layers=scan)
    stacked = dict(stacked_modules=r"model\.layers\..*") if scan else {}
    config = lora_jax.LoraConfig(r=4, target_modules="all-linear", **stacked)
    adapter = lora_jax.init(config, model.params, jax.random.key(0))
    lora_apply = lora_jax.lora(lambda p, ids: model.module.apply({"params": p}, ids), config)
    ids = jnp.zeros((4, 64), jnp.int32)
    grad = jax.jit(jax.grad(lambda a: mean_output(lora_apply(model.params, a, ids))),
                   compiler_options=compiler_options(backend=jax.default_backend()))  # lora_jax.train's
    return grad.lower(adapter).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("scan", [False, True])
def test_full_remat_lowers_compiled_temporaries(scan):
    assert temp_bytes("full", scan=scan) < 0.7 * temp_bytes("none", scan=scan)


def test_dots_remat_lowers_compiled_temporaries_less_than_full():
    assert temp_bytes("full", scan=False) < temp_bytes("dots", scan=False) < temp_bytes("none", scan=False)


def test_unknown_policy_and_offload_on_cpu_are_refused_before_building():
    with pytest.raises(ValueError, match="expected one of 'none', 'dots', 'full', 'offload'"):
        models.build_module(LLAMA, remat="dots_saveable")
    with pytest.raises(ValueError, match="on the cpu backend device memory is host memory"):
        check_offload_supported("cpu")
    if jax.default_backend() == "cpu":
        with pytest.raises(ValueError, match="'offload'"):
            models.from_config(LLAMA, remat="offload")


def test_dots_keeps_the_tagged_projections_and_full_keeps_only_the_input(capsys):
    from jax.ad_checkpoint import checkpoint_name, print_saved_residuals

    def layer(x):
        return jnp.sum(jnp.sin(checkpoint_name(jnp.sin(x) @ x, "projection")) * jnp.sin(x))

    saved = {}
    for name in ("dots", "full"):
        print_saved_residuals(jax.checkpoint(layer, policy=remat_policy(name)), jnp.ones((3, 3)))
        saved[name] = capsys.readouterr().out.strip().splitlines()
    assert saved["full"] == ["f32[3,3] from the argument x"]
    assert saved["dots"][0] == "f32[3,3] from the argument x"
    assert len(saved["dots"]) == 2 and "named 'projection'" in saved["dots"][1]


EVERY_FAMILY = {
    "llama": LLAMA,
    "mistral": dict(LLAMA, model_type="mistral", sliding_window=4),
    "qwen2": dict(LLAMA, model_type="qwen2"),
    "qwen3": dict(LLAMA, model_type="qwen3", head_dim=8),
    "phi3": dict(LLAMA, model_type="phi3"),
    "qwen3_moe": dict(LLAMA, model_type="qwen3_moe", num_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=8),
    "gemma2": dict(LLAMA, model_type="gemma2", head_dim=8),
    "gemma3_text": dict(LLAMA, model_type="gemma3_text", head_dim=8),
    "opt": dict(model_type="opt", hidden_size=32, ffn_dim=64, num_attention_heads=4, num_hidden_layers=2,
                vocab_size=64, max_position_embeddings=16),
    "gpt2": GPT2,
    "bert": BERT,
}


def test_the_table_covers_every_supported_family():
    assert set(EVERY_FAMILY) <= set(models.SUPPORTED_MODEL_TYPES)
    def family(model_type):
        return models.loading._family({"model_type": model_type}).build.__module__

    assert {family(t) for t in models.SUPPORTED_MODEL_TYPES} == {family(t) for t in EVERY_FAMILY}


@pytest.mark.parametrize("model_type", sorted(EVERY_FAMILY))
def test_every_family_rematerialises_its_layers_and_returns_hidden_states(model_type):
    hf = EVERY_FAMILY[model_type]
    module = models.build_module(hf, remat="full")
    params = jax.eval_shape(lambda: module.init(jax.random.key(0), IDS))["params"]

    def loss(p):
        out = module.apply({"params": p}, IDS)
        return mean_output(out if isinstance(out, jax.Array) else out[0])

    text = str(jax.make_jaxpr(jax.grad(loss))(params))
    assert "checkpoint" in text or "remat" in text
    if hasattr(module, "init_cache"):  # a causal LM
        out = jax.eval_shape(lambda p: module.apply({"params": p}, IDS, return_hidden=True), params)
        assert isinstance(out, models.LMHidden) and out.hidden.shape == (*IDS.shape, out.hidden.shape[-1])
        logits = jax.eval_shape(lambda p: module.apply({"params": p}, IDS), params)
        assert logits.shape == (*IDS.shape, hf["vocab_size"]) and logits.dtype == jnp.float32
        assert out.softcap == getattr(module.config, "final_logit_softcapping", None)
