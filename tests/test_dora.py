"""DoRA through the transform: the dense formula with a detached norm, merge, and the efficient step."""

import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax
from lora_jax.linear import DotSpec, dora_column_norms, dora_dot

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import dora_flops  # noqa: E402
import flops  # noqa: E402


def normal(seed, shape, scale=1.0):
    return jnp.asarray(scale * np.random.default_rng(seed).normal(size=shape), jnp.float32)


def dense_dora(params, adapter, config):
    """m * (W + s A B) / stop_gradient(||W + s A B||), norm over the input axes: written out here."""
    targets = lora_jax.find_targets(config, params, adapter)
    by_path = {t.path: t for t in targets.values()}

    def dense(path, w):
        t = by_path.get(path)
        if t is None:
            return w
        e = adapter[t.module_name]
        a = e["lora_A"].reshape(t.lead_shape + (-1, t.rank))
        b = e["lora_B"].reshape(t.lead_shape + (t.rank, -1))
        full = w + t.scaling * jnp.einsum("...ir,...ro->...io", a, b, precision="highest").reshape(t.shape)
        axes = tuple(range(t.num_lead, t.num_lead + t.num_in))
        norm = jax.lax.stop_gradient(jnp.sqrt(jnp.sum(full**2, axis=axes, keepdims=True)))
        return e["lora_magnitude"].reshape(t.lead_shape + (1,) * t.num_in + t.out_shape) * full / norm

    return jax.tree_util.tree_map_with_path(dense, params)


def trained(adapter, seed=5):
    """An adapter moved off its start, as by training (B != 0, m != ||W||)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: x + jnp.asarray(rng.normal(0, 0.3, x.shape), x.dtype), adapter)


LAYERS, D = 3, 6
PARAMS = {
    "embed": {"embedding": normal(0, (13, D))},
    "right": {"kernel": normal(1, (D, D), 0.4)},
    "left": {"kernel": normal(2, (D, D), 0.4)},
    "general": {"kernel": normal(3, (2, 3, D), 0.4)},
    "stack": {"kernel": normal(4, (LAYERS, D, D), 0.4)},
    "experts": {"kernel": normal(5, (LAYERS, D, D), 0.4)},
}
CONFIG = lora_jax.LoraConfig(r=2, lora_alpha=3, use_dora=True, init_lora_weights=False,
                             target_modules=["embed", "right", "left", "general", "stack", "experts"],
                             in_axes={"general": 2}, stacked_modules=["stack", "experts"])


def apply(p, ids):
    h = jnp.take(p["embed"]["embedding"], ids, axis=0)                        # lookup
    h = jnp.tanh(h @ p["right"]["kernel"])                                    # kernel on the right
    h = jnp.tanh(jnp.einsum("io,bi->bo", p["left"]["kernel"], h))             # kernel on the left
    h = jnp.tanh(jnp.einsum("bhk,hkd->bd", h.reshape(-1, 2, 3), p["general"]["kernel"]))  # 2 input axes
    h = jax.lax.scan(lambda c, k: (jnp.tanh(c @ k), None), h, p["stack"]["kernel"])[0]   # stacked layers
    experts = jax.vmap(lambda k: h @ k)(p["experts"]["kernel"])               # one input, every slice
    return jnp.sum(jnp.tanh(experts), axis=0)


IDS = jnp.array([0, 3, 12, 7, 7])


def test_dora_output_and_gradients_match_the_dense_formula_with_a_detached_norm():
    adapter = trained(lora_jax.init(CONFIG, PARAMS, jax.random.key(0)))
    lora_apply = lora_jax.lora(apply, CONFIG)
    with warnings.catch_warnings():
        warnings.simplefilter("error", lora_jax.LoraFallbackWarning)
        out = jax.jit(lora_apply)(PARAMS, adapter, IDS)
        grads = jax.jit(jax.grad(lambda ad: jnp.sum(jnp.sin(lora_apply(PARAMS, ad, IDS)))))(adapter)
    np.testing.assert_allclose(out, apply(dense_dora(PARAMS, adapter, CONFIG), IDS), atol=2e-5, rtol=1e-5)
    want = jax.grad(lambda ad: jnp.sum(jnp.sin(apply(dense_dora(PARAMS, ad, CONFIG), IDS))))(adapter)
    for name in adapter:
        for part in ("lora_A", "lora_B", "lora_magnitude"):
            np.testing.assert_allclose(grads[name][part], want[name][part], atol=2e-4, rtol=1e-3,
                                       err_msg=f"{name}.{part}")


def test_the_norm_gets_no_gradient():
    # With the norm detached, y = m * (x K) / n is linear in m: d/dm of sum(y) is sum(x K) / n.
    params = {"f": {"kernel": normal(0, (4, 3))}}
    config = lora_jax.LoraConfig(r=2, target_modules=["f"], use_dora=True, init_lora_weights=False)
    adapter = trained(lora_jax.init(config, params, jax.random.key(1)))
    x = normal(1, (5, 4))
    apply_fn = lora_jax.lora(lambda p, x: x @ p["f"]["kernel"], config)
    e = adapter["f"]
    k = np.asarray(params["f"]["kernel"] + config.scaling("f") * e["lora_A"] @ e["lora_B"], np.float64)
    n = np.linalg.norm(k, axis=0)
    grad_m = jax.grad(lambda ad: jnp.sum(apply_fn(params, ad, x)))(adapter)["f"]["lora_magnitude"]
    np.testing.assert_allclose(grad_m, np.sum(np.asarray(x, np.float64) @ k, axis=0) / n, rtol=1e-4, atol=1e-5)
    # and B's gradient is m/n * s * A^T x^T 1, with no term from the norm
    grad_b = jax.grad(lambda ad: jnp.sum(apply_fn(params, ad, x)))(adapter)["f"]["lora_B"]
    m = np.asarray(e["lora_magnitude"], np.float64)
    want_b = config.scaling("f") * (np.asarray(e["lora_A"], np.float64).T @ np.asarray(x, np.float64).T
                                    @ np.ones((5, 3))) * (m / n)
    np.testing.assert_allclose(grad_b, want_b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("num_lead, w_transposed", [(0, False), (0, True), (1, False), (2, True)])
def test_column_norms_from_low_rank_terms_equal_the_dense_norms(num_lead, w_transposed):
    lead = (2, 3)[:num_lead]
    w = normal(0, lead + ((7, 5) if w_transposed else (5, 7)))
    a, b = normal(1, lead + (5, 3)), normal(2, lead + (3, 7))
    w_kn = np.swapaxes(np.asarray(w, np.float64), -1, -2) if w_transposed else np.asarray(w, np.float64)
    dense = w_kn + 0.7 * np.asarray(a, np.float64) @ np.asarray(b, np.float64)
    got = dora_column_norms(w, a, b, DotSpec(num_lead=num_lead, scaling=0.7, w_transposed=w_transposed))
    np.testing.assert_allclose(got, np.linalg.norm(dense, axis=-2), rtol=1e-5)


def test_dropout_gives_peft_training_forward():
    # PEFT with dropout: x W + (c - 1) (xd W) + c s (xd A) B, with c = m / ||W + s A B||.
    x, w, a, b = normal(0, (4, 5)), normal(1, (5, 3)), normal(2, (5, 2)), normal(3, (2, 3))
    keep = np.random.default_rng(4).random((4, 5)) > 0.4
    xd = jnp.where(keep, x / 0.6, 0.0)
    m = jnp.array([0.5, 2.0, 1.5])
    s = 1.5
    got = dora_dot(x, xd, w, a, b, m, DotSpec(scaling=s))
    x64, xd64, w64, a64, b64 = (np.asarray(v, np.float64) for v in (x, xd, w, a, b))
    c = np.asarray(m, np.float64) / np.linalg.norm(w64 + s * a64 @ b64, axis=0)
    want = x64 @ w64 + (c - 1) * (xd64 @ w64) + c * s * ((xd64 @ a64) @ b64)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_initial_magnitude_is_the_kernel_norm_so_the_model_starts_unchanged():
    config = CONFIG.replace(init_lora_weights=True)
    adapter = lora_jax.init(config, PARAMS, jax.random.key(0))
    np.testing.assert_allclose(adapter["right"]["lora_magnitude"], np.linalg.norm(PARAMS["right"]["kernel"], axis=0),
                               rtol=1e-6)
    np.testing.assert_allclose(adapter["general"]["lora_magnitude"],
                               np.linalg.norm(np.asarray(PARAMS["general"]["kernel"]).reshape(6, D), axis=0),
                               rtol=1e-6)
    np.testing.assert_allclose(adapter["stack"]["lora_magnitude"], np.linalg.norm(PARAMS["stack"]["kernel"], axis=1),
                               rtol=1e-6)
    # an embedding's magnitude is per embedding dimension, its norm over the vocabulary (PEFT)
    np.testing.assert_allclose(adapter["embed"]["lora_magnitude"], np.linalg.norm(PARAMS["embed"]["embedding"], axis=0),
                               rtol=1e-6)
    out = lora_jax.lora(apply, config)(PARAMS, adapter, IDS)
    np.testing.assert_allclose(out, apply(PARAMS, IDS), atol=1e-5)


def test_merged_dora_equals_unmerged_and_unmerge_with_the_norms_restores_the_kernels():
    adapter = trained(lora_jax.init(CONFIG, PARAMS, jax.random.key(0)))
    merged = lora_jax.merge(PARAMS, adapter, CONFIG)
    np.testing.assert_allclose(apply(merged, IDS), lora_jax.lora(apply, CONFIG)(PARAMS, adapter, IDS), atol=2e-5)
    norms = lora_jax.dora_norms(PARAMS, adapter, CONFIG)
    back = lora_jax.unmerge(merged, adapter, CONFIG, dora_norms=norms)
    for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(PARAMS)):
        np.testing.assert_allclose(x, y, atol=2e-5)
    with pytest.raises(ValueError, match="dora_norms"):
        lora_jax.unmerge(merged, adapter, CONFIG)


def test_dora_adapter_and_config_must_agree():
    adapter = lora_jax.init(CONFIG, PARAMS, jax.random.key(0))
    plain = {k: {p: v for p, v in e.items() if p != "lora_magnitude"} for k, e in adapter.items()}
    with pytest.raises(ValueError, match=r"adapter\['embed'\] has no 'lora_magnitude'.*use_dora=True"):
        lora_jax.lora(apply, CONFIG)(PARAMS, plain, IDS)
    with pytest.raises(ValueError, match=r"DoRA magnitude.*use_dora=False"):
        lora_jax.lora(apply, CONFIG.replace(use_dora=False))(PARAMS, adapter, IDS)
    bad = dict(adapter, right=dict(adapter["right"], lora_magnitude=jnp.ones(D + 1)))
    with pytest.raises(ValueError, match=r"\['lora_magnitude'\] has shape \(7,\).*\(6,\)"):
        lora_jax.lora(apply, CONFIG)(PARAMS, bad, IDS)
    with pytest.raises(ValueError, match="needs the values of kernel"):
        lora_jax.init(CONFIG, jax.eval_shape(lambda: PARAMS), jax.random.key(0))


@pytest.fixture(scope="module")
def flop_rows():
    with warnings.catch_warnings():
        warnings.simplefilter("error", lora_jax.LoraFallbackWarning)
        return {name: dora_flops.measure(name, spec) for name, spec in flops.model_configs(smoke=False).items()}


@pytest.mark.slow  # compiles 12 full-size gradient steps (~30 s on 2 cores)
@pytest.mark.parametrize("model", ["mlp", "transformer", "scanned"])
def test_dora_step_has_no_kernel_shaped_dot_and_costs_within_10_percent_of_lora(flop_rows, model):
    row = flop_rows[model]
    assert row["dora_naive_kernel_shaped_dots"] > 0  # the detector sees the dense form's weight gradient
    assert row["dora_kernel_shaped_dots"] == 0
    assert row["dora_over_lora"] <= 1.10, row
    assert row["naive_over_dora"] >= 1.2, row  # the dense form costs a weight-sized gradient more


@pytest.mark.slow  # compiles 12 small steps
def test_dora_flops_benchmark_smoke(tmp_path):
    out = tmp_path / "dora_flops.json"
    rows = dora_flops.main(["--smoke", "--out", str(out)])
    assert out.exists() and {r["model"] for r in rows} == {"mlp", "transformer", "scanned"}
    assert all(r["dora_kernel_shaped_dots"] == 0 for r in rows)


def test_dora_on_a_quantized_base_is_the_formula_on_the_dequantized_kernel():
    from lora_jax.quantize import quantize_array

    w = normal(0, (64, 32))
    params = {"f": {"kernel": quantize_array(w, "int8")}}
    config = lora_jax.LoraConfig(r=2, target_modules=["f"], use_dora=True, init_lora_weights=False)
    adapter = trained(lora_jax.init(config, params, jax.random.key(0)))
    dequantized = {"f": {"kernel": params["f"]["kernel"].dequantize()}}
    np.testing.assert_allclose(adapter["f"]["lora_magnitude"] - 0.0, trained(  # magnitudes start from the codes
        lora_jax.init(config, dequantized, jax.random.key(0)))["f"]["lora_magnitude"], rtol=1e-6)
    x = normal(1, (5, 64))
    with warnings.catch_warnings():
        warnings.simplefilter("error", lora_jax.LoraFallbackWarning)
        got = lora_jax.lora(lambda p, x: x @ p["f"]["kernel"], config)(params, adapter, x)
    want = x @ dense_dora(dequantized, adapter, config)["f"]["kernel"]
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-5)
