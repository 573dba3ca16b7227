"""Mixed-adapter batches: each example through its own adapter in one pass, against PEFT's
``model(input_ids, adapter_names=[...])`` and ``generate(..., adapter_names=...)``."""

from __future__ import annotations

import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from hf_oracle import quiet  # noqa: E402

import lora_jax  # noqa: E402
from lora_jax import models  # noqa: E402

# Three adapters with different ranks, alphas, rsLoRA and targets (one on the embedding).
PEFT_CONFIGS = {
    "one": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "two": dict(r=2, lora_alpha=3, target_modules=["q_proj", "k_proj", "o_proj", "down_proj"], use_rslora=True),
    "three": dict(r=6, lora_alpha=6, target_modules=["gate_proj", "up_proj", "embed_tokens", "v_proj"]),
}
ROWS = ["__base__", "one", "two", "three", "one", "two"]
IDS = np.array([[1, 5, 9, 3, 2, 7, 60, 11], [4, 4, 8, 1, 0, 2, 3, 5], [9, 8, 7, 6, 5, 4, 3, 2],
                [1, 2, 3, 4, 5, 6, 7, 8], [10, 20, 30, 40, 50, 60, 1, 2], [3, 1, 4, 1, 5, 9, 2, 6]],
               dtype=np.int32)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny torch Llama with three PEFT adapters (random B so they matter), saved; the
    same base and adapters in lora_jax."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=False, rope_theta=10000.0)
    base = transformers.AutoModelForCausalLM.from_config(config).eval()
    base_dir = str(tmp_path_factory.mktemp("base"))
    quiet(base.save_pretrained, base_dir)
    names = list(PEFT_CONFIGS)
    model = peft.get_peft_model(base, peft.LoraConfig(**PEFT_CONFIGS[names[0]], init_lora_weights=False),
                                adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, peft.LoraConfig(**PEFT_CONFIGS[name], init_lora_weights=False))
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "lora_" in pname:
                p.normal_(0.0, 0.3)
    adapter_dir = str(tmp_path_factory.mktemp("adapters"))
    quiet(model.save_pretrained, adapter_dir, selected_adapters=names)
    model.eval()
    flax_model = models.from_pretrained(base_dir)
    adapters = {}
    for name in names:
        adapters[name] = tuple(lora_jax.load_peft(adapter_dir, flax_model.params, adapter_name=name))
    return {"peft": model, "flax": flax_model, "adapters": adapters}


def lora_apply(flax_model, config):
    return lora_jax.lora(lambda p, ids, **kw: flax_model.module.apply({"params": p}, ids, **kw), config)


def test_mixed_batch_matches_peft_and_each_row_matches_its_adapter_alone(setup):
    model, flax_model, adapters = setup["peft"], setup["flax"], setup["adapters"]
    with torch.no_grad():
        expected = model(torch.as_tensor(IDS, dtype=torch.long), adapter_names=ROWS).logits.numpy()
    stacked = lora_jax.stack_adapters(adapters, flax_model.params)
    ids = stacked.ids(ROWS)
    with warnings.catch_warnings():
        warnings.simplefilter("error", lora_jax.LoraFallbackWarning)
        got = jax.jit(lora_apply(flax_model, stacked.config))(flax_model.params, stacked.adapter, IDS,
                                                              adapter_ids=ids)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)
    for row, name in enumerate(ROWS):
        if name == "__base__":
            alone = flax_model.module.apply({"params": flax_model.params}, IDS[row:row + 1])
        else:
            adapter, config = adapters[name]
            alone = lora_apply(flax_model, config)(flax_model.params, adapter, IDS[row:row + 1])
        np.testing.assert_allclose(got[row:row + 1], alone, atol=1e-5, rtol=1e-5)


def test_mixed_batch_greedy_generation_matches_peft(setup):
    model, flax_model, adapters = setup["peft"], setup["flax"], setup["adapters"]
    prompts = IDS[:, :5]
    with torch.no_grad():
        expected = model.generate(input_ids=torch.as_tensor(prompts, dtype=torch.long),
                                  attention_mask=torch.ones(prompts.shape, dtype=torch.long),
                                  adapter_names=ROWS, max_new_tokens=12, do_sample=False,
                                  eos_token_id=None, pad_token_id=0).numpy()
    stacked = lora_jax.stack_adapters(adapters, flax_model.params)
    apply = lora_apply(flax_model, stacked.config)

    def with_adapters(variables, *args, **kwargs):  # adapters and ids as arguments: one compile
        v = variables["params"]
        return apply(v["base"], v["adapter"], *args, adapter_ids=v["ids"], **kwargs)

    got = models.generate(flax_model.module, {"base": flax_model.params, "adapter": stacked.adapter,
                                              "ids": stacked.ids(ROWS)},
                          prompts, max_new_tokens=12, apply_fn=with_adapters, stop_token_ids=())
    np.testing.assert_array_equal(np.asarray(got), expected)


def test_one_compiled_apply_serves_swapped_adapters_without_recompiling(setup):
    flax_model, adapters = setup["flax"], setup["adapters"]
    stacked = lora_jax.stack_adapters({"one": adapters["one"], "two": adapters["two"]}, flax_model.params, max_rank=6,
                                      target_modules=list(lora_jax.stack_adapters(adapters, flax_model.params).adapter))
    traces = []

    def counted(p, ids, **kw):
        traces.append(1)  # runs once per trace (= per compilation of the jitted apply)
        return flax_model.module.apply({"params": p}, ids, **kw)

    fn = jax.jit(lora_jax.lora(counted, stacked.config))
    ids = stacked.ids(["one", "two", "__base__", "one", "two", "one"])
    first = fn(flax_model.params, stacked.adapter, IDS, adapter_ids=ids)
    swapped = lora_jax.replace_adapter(stacked, "two", adapters["three"], flax_model.params, name="three")
    second = fn(flax_model.params, swapped.adapter, IDS,
                adapter_ids=swapped.ids(["one", "three", "__base__", "one", "three", "one"]))
    assert len(traces) == 1
    adapter_c, config_c = adapters["three"]
    alone = lora_apply(flax_model, config_c)(flax_model.params, adapter_c, IDS[1:2])
    np.testing.assert_allclose(second[1:2], alone, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(second[0], first[0], atol=1e-6)


def test_training_several_adapters_at_once_each_on_its_own_rows(setup):
    flax_model, adapters = setup["flax"], setup["adapters"]
    stacked = lora_jax.stack_adapters({"one": adapters["one"], "two": adapters["two"]}, flax_model.params)
    apply = lora_apply(flax_model, stacked.config)
    rows = ["one", "one", "two", "__base__"]

    def loss(stacked_adapter, ids):
        return jnp.sum(jnp.sin(apply(flax_model.params, stacked_adapter, IDS[:4], adapter_ids=ids)))

    grad = jax.jit(jax.grad(loss))
    grads = grad(stacked.adapter, stacked.ids(rows))
    # slot 0 ("a") gets exactly the gradient of adapter a alone on its rows (padded to the stack's rank)
    adapter_a, config_a = adapters["one"]
    alone = jax.jit(jax.grad(lambda ad: jnp.sum(jnp.sin(lora_apply(flax_model, config_a)(flax_model.params, ad,
                                                                                    IDS[:2])))))(adapter_a)
    for module, entry in alone.items():
        r = entry["lora_A"].shape[-1]
        np.testing.assert_allclose(grads[module]["lora_A"][0][..., :r], entry["lora_A"], atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(grads[module]["lora_B"][0][:r], entry["lora_B"], atol=1e-4, rtol=1e-4)
    # a slot no row uses gets no gradient
    only_b = grad(stacked.adapter, stacked.ids(["two", "two", "__base__", "two"]))  # same shapes: no recompile
    assert all(float(jnp.abs(e["lora_A"][0]).max()) == 0.0 for e in only_b.values())


def test_scanned_layers_run_mixed_batches(setup):
    flax_model, adapters = setup["flax"], setup["adapters"]
    scanned = models.from_pretrained(flax_model.source, scan_layers=True)
    stacked_unrolled = lora_jax.stack_adapters(adapters, flax_model.params)
    ids = stacked_unrolled.ids(ROWS)
    want = lora_apply(flax_model, stacked_unrolled.config)(flax_model.params, stacked_unrolled.adapter, IDS,
                                                           adapter_ids=ids)
    scanned_adapters = {}
    for name, (adapter, config) in adapters.items():
        loaded = lora_jax.load_peft(_saved(adapter, config, flax_model, name), scanned.params)
        scanned_adapters[name] = tuple(loaded)
    stacked = lora_jax.stack_adapters(scanned_adapters, scanned.params)
    got = jax.jit(lora_apply(scanned, stacked.config))(scanned.params, stacked.adapter, IDS, adapter_ids=ids)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def _saved(adapter, config, flax_model, name):
    import tempfile

    path = os.path.join(tempfile.mkdtemp(), name)
    lora_jax.save_peft(path, adapter, config, flax_model.params)
    return path


def test_bad_ids_and_misfit_adapters_are_named(setup):
    flax_model, adapters = setup["flax"], setup["adapters"]
    stacked = lora_jax.stack_adapters(adapters, flax_model.params)
    apply = lora_apply(flax_model, stacked.config)
    with pytest.raises(ValueError, match=r"adapter_ids \[3\] are out of range: this stack has slots 0..2"):
        apply(flax_model.params, stacked.adapter, IDS[:2], adapter_ids=np.array([0, 3]))
    with pytest.raises(ValueError, match="No adapter named 'zz'"):
        stacked.ids(["one", "zz"])
    with pytest.raises(ValueError, match="1-D integer array"):
        apply(flax_model.params, stacked.adapter, IDS[:2], adapter_ids=np.array([[0, 1]]))
    with pytest.raises(ValueError, match="stacked adapter"):
        apply(flax_model.params, adapters["one"][0], IDS[:2], adapter_ids=np.array([0, 0]))
    # under jit an out-of-range id cannot raise: its row comes out NaN rather than some other adapter's
    out = jax.jit(apply)(flax_model.params, stacked.adapter, IDS[:2], adapter_ids=jnp.array([0, 7]))
    assert np.isfinite(out[0]).all() and np.isnan(out[1]).all()
    # an adapter made for another base is named
    other = {m: {k: v[..., :1] if k == "lora_A" else v for k, v in e.items()} for m, e in adapters["one"][0].items()}
    with pytest.raises(ValueError, match=r"adapters\['bad'\] does not fit these params"):
        lora_jax.stack_adapters({"bad": (other, adapters["one"][1])}, flax_model.params)
    with pytest.raises(ValueError, match=r"adapters\['three'\] has rank 6 on .* above the stack's max_rank 4"):
        lora_jax.stack_adapters(adapters, flax_model.params, max_rank=4)
