"""lora(): outputs and gradients against the dense formula computed independently in numpy."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lora_jax
from lora_jax.transform import LoraFallbackWarning


def dense_reference(params, adapter, config):
    """W + s * A @ B for every targeted kernel, in float64 numpy (independent of merge())."""
    flat = {}
    for name, target in lora_jax.find_targets(config, params).items():
        a = np.asarray(adapter[name]["lora_A"], np.float64)
        b = np.asarray(adapter[name]["lora_B"], np.float64)
        lead = target.lead_shape
        a2 = a.reshape(lead + (-1, a.shape[-1]))
        b2 = b.reshape(lead + (b.shape[len(lead)], -1))
        delta = (a2 @ b2).reshape(target.shape)
        flat[target.path] = delta * config.scaling(name)

    def add(path, w):
        if path not in flat:
            return w
        return jnp.asarray(np.asarray(w, np.float64) + flat[path], w.dtype)

    return jax.tree_util.tree_map_with_path(add, params)


def random_adapter(config, params, seed=1):
    """An adapter with non-zero B so the LoRA branch matters."""
    return lora_jax.init(config.replace(init_lora_weights=False), params, jax.random.key(seed))


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(24, name="fc1")(x))
        x = nn.Dense(16, name="fc2")(x)
        return nn.Dense(5, name="head")(x)


def _linen_setup():
    model = MLP()
    x = jax.random.normal(jax.random.key(0), (6, 12))
    params = model.init(jax.random.key(1), x)
    return model.apply, params, x


def _plain_setup():
    k = jax.random.split(jax.random.key(2), 3)
    params = {"layer1": {"kernel": jax.random.normal(k[0], (12, 20)), "bias": jnp.ones(20)},
              "layer2": {"kernel": jax.random.normal(k[1], (20, 7))}}

    def apply(p, x):
        h = jnp.tanh(x @ p["layer1"]["kernel"] + p["layer1"]["bias"])
        return h @ p["layer2"]["kernel"]

    return apply, params, jax.random.normal(k[2], (4, 12))


class NNXNet(nnx.Module):
    def __init__(self, rngs):
        self.inp = nnx.Linear(12, 16, rngs=rngs)
        self.layers = nnx.List([nnx.Linear(16, 16, rngs=rngs) for _ in range(2)])
        self.out = nnx.Linear(16, 6, rngs=rngs)

    def __call__(self, x):
        x = nnx.gelu(self.inp(x))
        for layer in self.layers:
            x = nnx.gelu(layer(x))
        return self.out(x)


def _nnx_setup():
    graphdef, state = nnx.split(NNXNet(nnx.Rngs(0)))

    def apply(state, x):
        return nnx.merge(graphdef, state)(x)

    return apply, state, jax.random.normal(jax.random.key(3), (5, 12))


SETUPS = {"linen": _linen_setup, "plain": _plain_setup, "nnx": _nnx_setup}


@pytest.mark.parametrize("kind", SETUPS)
def test_zero_b_gives_base_output_bitwise(kind):
    apply, params, x = SETUPS[kind]()
    config = lora_jax.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    adapter = lora_jax.init(config, params, jax.random.key(0))
    assert all(not np.any(np.asarray(p["lora_B"])) for p in adapter.values())
    base = jax.jit(apply)(params, x)
    out = jax.jit(lora_jax.lora(apply, config))(params, adapter, x)
    # x@W + s*((x@A)@0) adds exact zeros: bitwise equal on CPU.
    np.testing.assert_array_equal(np.asarray(out), np.asarray(base))


@pytest.mark.parametrize("kind", SETUPS)
def test_lora_matches_dense_reference_and_its_gradient(kind):
    apply, params, x = SETUPS[kind]()
    config = lora_jax.LoraConfig(r=3, lora_alpha=6, target_modules="all-linear",
                                 rank_pattern={"layers.1|layer2|fc2": 2})
    adapter = random_adapter(config, params)
    lora_apply = lora_jax.lora(apply, config)
    out = jax.jit(lora_apply)(params, adapter, x)
    ref = apply(dense_reference(params, adapter, config), x)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)

    # d loss / d A and d B match the dense formula's gradient through W + s*A@B.
    def loss_lora(ad):
        return jnp.sum(jnp.sin(lora_apply(params, ad, x)))

    def loss_dense(ad):
        return jnp.sum(jnp.sin(apply(lora_jax.merge(params, ad, config), x)))

    g = jax.jit(jax.grad(loss_lora))(adapter)
    g_ref = jax.grad(loss_dense)(adapter)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), g, g_ref)


def test_vmap_over_lora_apply():
    apply, params, _ = _plain_setup()
    config = lora_jax.LoraConfig(r=2, target_modules=["layer1"])
    adapter = random_adapter(config, params)
    xs = jax.random.normal(jax.random.key(9), (3, 4, 12))
    out = jax.vmap(lambda x: lora_jax.lora(apply, config)(params, adapter, x))(xs)
    ref = jax.vmap(lambda x: apply(dense_reference(params, adapter, config), x))(xs)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_bf16_compute_with_fp32_adapter():
    class BF16(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(8, dtype=jnp.bfloat16, name="proj")(x)

    model = BF16()
    x = jax.random.normal(jax.random.key(0), (4, 16))
    params = model.init(jax.random.key(1), x)
    config = lora_jax.LoraConfig(r=4, lora_alpha=4, target_modules=["proj"])
    adapter = random_adapter(config, params)
    out = lora_jax.lora(model.apply, config)(params, adapter, x)
    assert out.dtype == jnp.bfloat16
    ref = model.apply(dense_reference(params, adapter, config), x.astype(np.float32))
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), rtol=0.05, atol=0.05)
    grads = jax.grad(lambda ad: jnp.sum(lora_jax.lora(model.apply, config)(params, ad, x).astype(jnp.float32)))(adapter)
    assert grads["proj"]["lora_A"].dtype == jnp.float32


def test_nested_jit_remat_and_transposed_kernel():
    w = jax.random.normal(jax.random.key(0), (10, 6))
    emb = jax.random.normal(jax.random.key(1), (30, 10))
    params = {"proj": {"kernel": w}, "embed": {"embedding": emb}}

    @jax.jit
    def inner(kernel, h):
        return jax.checkpoint(lambda k, h: jnp.tanh(h @ k))(kernel, h)

    def apply(p, ids):
        h = jnp.take(p["embed"]["embedding"], ids, axis=0)  # gather rows
        h = inner(p["proj"]["kernel"], h) @ p["proj"]["kernel"].T  # nested jit + remat + K^T
        return h @ p["embed"]["embedding"].T  # tied embedding as output head: contracts its out axis

    # ensure_weight_tying=True: the tied head follows the adapted table (tests/test_tied_embeddings.py has False).
    config = lora_jax.LoraConfig(r=2, lora_alpha=3, target_modules=["proj", "embed"], ensure_weight_tying=True)
    adapter = random_adapter(config, params)
    ids = jnp.array([[1, 4, 29], [0, 7, 7]])
    with warnings.catch_warnings():
        warnings.simplefilter("error", LoraFallbackWarning)
        out = jax.jit(lora_jax.lora(apply, config))(params, adapter, ids)
        jaxpr = jax.make_jaxpr(lora_jax.lora(apply, config))(params, adapter, ids)
    ref = apply(dense_reference(params, adapter, config), ids)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-4)
    assert "remat" in str(jaxpr) or "checkpoint" in str(jaxpr)


def test_scan_over_stacked_layers_slices_a_and_b():
    layers, d = 3, 8
    w = jax.random.normal(jax.random.key(0), (layers, d, d)) / np.sqrt(d)
    params = {"blocks": {"mlp": {"kernel": w}}}

    def apply(p, x):
        def body(h, kernel):
            return jnp.tanh(h @ kernel), None
        return jax.lax.scan(body, x, p["blocks"]["mlp"]["kernel"])[0]

    config = lora_jax.LoraConfig(r=2, target_modules=["mlp"], stacked_modules=["mlp"])
    adapter = random_adapter(config, params)
    assert adapter["blocks.mlp"]["lora_A"].shape == (layers, d, 2)
    assert adapter["blocks.mlp"]["lora_B"].shape == (layers, 2, d)
    x = jax.random.normal(jax.random.key(1), (4, d))
    with warnings.catch_warnings():
        warnings.simplefilter("error", LoraFallbackWarning)
        out = jax.jit(lora_jax.lora(apply, config))(params, adapter, x)
    np.testing.assert_allclose(out, apply(dense_reference(params, adapter, config), x), rtol=1e-5, atol=1e-5)


def test_reshaped_kernel_and_densegeneral_in_axes():
    class Attn(nn.Module):
        @nn.compact
        def __call__(self, x):
            q = nn.DenseGeneral((2, 4), name="query")(x)  # kernel (8, 2, 4)
            return nn.DenseGeneral(8, axis=(-2, -1), name="out")(q)  # kernel (2, 4, 8)

    model = Attn()
    x = jax.random.normal(jax.random.key(0), (3, 5, 8))
    params = model.init(jax.random.key(1), x)
    config = lora_jax.LoraConfig(r=2, target_modules=["query", "out"], in_axes={"out": 2})
    adapter = random_adapter(config, params)
    assert adapter["query"]["lora_A"].shape == (8, 2) and adapter["query"]["lora_B"].shape == (2, 2, 4)
    assert adapter["out"]["lora_A"].shape == (2, 4, 2) and adapter["out"]["lora_B"].shape == (2, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LoraFallbackWarning)
        out = jax.jit(lora_jax.lora(model.apply, config))(params, adapter, x)
    np.testing.assert_allclose(out, model.apply(dense_reference(params, adapter, config), x),
                               rtol=1e-5, atol=1e-5)


def test_cond_and_while_bodies_use_the_kernel():
    w = jax.random.normal(jax.random.key(0), (6, 6)) / 3
    params = {"f": {"kernel": w}}

    def apply(p, x, flag):
        k = p["f"]["kernel"]
        y = jax.lax.cond(flag, lambda h: h @ k, lambda h: -(h @ k), x)
        return jax.lax.fori_loop(0, 3, lambda i, h: jnp.tanh(h @ k), y)

    config = lora_jax.LoraConfig(r=2, target_modules=["f"])
    adapter = random_adapter(config, params)
    x = jax.random.normal(jax.random.key(1), (2, 6))
    for flag in (True, False):
        with warnings.catch_warnings():
            warnings.simplefilter("error", LoraFallbackWarning)
            out = jax.jit(lora_jax.lora(apply, config))(params, adapter, x, jnp.asarray(flag))
        ref = apply(dense_reference(params, adapter, config), x, flag)
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_unhandled_primitive_falls_back_exactly_and_warns_once():
    w = jax.random.normal(jax.random.key(0), (5, 4))
    params = {"odd": {"kernel": w}}

    def apply(p, x):
        return x @ jnp.cumsum(p["odd"]["kernel"], axis=0)  # cumsum of a kernel: no low-rank rule

    config = lora_jax.LoraConfig(r=2, target_modules=["odd"])
    adapter = random_adapter(config, params)
    x = jax.random.normal(jax.random.key(1), (3, 5))
    fn = lora_jax.lora(apply, config)
    with pytest.warns(LoraFallbackWarning, match="'odd'.*cumsum") as record:
        warnings.simplefilter("default", LoraFallbackWarning)  # Python's default: each message once
        out1 = fn(params, adapter, x)
        out2 = jax.jit(fn)(params, adapter, x)
    assert len([r for r in record if issubclass(r.category, LoraFallbackWarning)]) == 1
    ref = apply(dense_reference(params, adapter, config), x)
    np.testing.assert_allclose(out1, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out2, ref, rtol=1e-5, atol=1e-5)


def test_dropout_only_with_rng_and_only_on_the_lora_branch():
    apply, params, x = _plain_setup()
    config = lora_jax.LoraConfig(r=4, target_modules=["layer1", "layer2"], lora_dropout=0.5)
    zero_b = lora_jax.init(config, params, jax.random.key(0))
    fn = jax.jit(lora_jax.lora(apply, config))
    # B = 0: dropout on the LoRA input cannot touch the base path.
    np.testing.assert_array_equal(fn(params, zero_b, x, lora_rng=jax.random.key(5)), apply(params, x))
    adapter = random_adapter(config, params)
    no_rng = fn(params, adapter, x)
    np.testing.assert_allclose(no_rng, apply(dense_reference(params, adapter, config), x), rtol=1e-5, atol=1e-5)
    a = fn(params, adapter, x, lora_rng=jax.random.key(1))
    b = fn(params, adapter, x, lora_rng=jax.random.key(1))
    c = fn(params, adapter, x, lora_rng=jax.random.key(2))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c) and not np.allclose(a, no_rng)


def test_static_python_arguments_pass_through():
    class Drop(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            x = nn.Dense(4, name="d")(x)
            return x * 2 if train else x

    model = Drop()
    x = jnp.ones((2, 3))
    params = model.init(jax.random.key(0), x, train=False)
    config = lora_jax.LoraConfig(r=1, target_modules=["d"])
    adapter = random_adapter(config, params)
    fn = lora_jax.lora(model.apply, config)
    np.testing.assert_allclose(fn(params, adapter, x, train=True), 2 * fn(params, adapter, x, train=False))


def test_einsum_projections_and_vmapped_stacked_kernels():
    k = jax.random.split(jax.random.key(0), 4)
    params = {"wq": {"kernel": jax.random.normal(k[0], (8, 2, 4))},
              "wo": {"kernel": jax.random.normal(k[1], (2, 4, 8))},
              "experts": {"kernel": jax.random.normal(k[2], (3, 8, 5))}}

    def apply(p, x):
        q = jnp.einsum("bsd,dhk->bshk", x, p["wq"]["kernel"])
        h = jnp.einsum("bshk,hkd->bsd", q, p["wo"]["kernel"])
        # one expert per leading slice: a dot with the stacked axis as a batch axis
        return jax.vmap(lambda w, hh: hh @ w, in_axes=(0, None))(p["experts"]["kernel"], h)

    config = lora_jax.LoraConfig(r=2, target_modules=["wq", "wo", "experts"], in_axes={"wo": 2},
                                 stacked_modules=["experts"])
    adapter = random_adapter(config, params)
    x = jax.random.normal(k[3], (2, 3, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error", LoraFallbackWarning)
        out = jax.jit(lora_jax.lora(apply, config))(params, adapter, x)
    np.testing.assert_allclose(out, apply(dense_reference(params, adapter, config), x), rtol=1e-5, atol=1e-4)


def test_kernel_contracted_on_unexpected_axes_is_exact_and_names_in_axes():
    params = {"out": {"kernel": jax.random.normal(jax.random.key(0), (2, 4, 8))}}

    def apply(p, x):
        return jnp.einsum("bhk,hkd->bd", x, p["out"]["kernel"])  # contracts two input axes

    config = lora_jax.LoraConfig(r=2, target_modules=["out"])  # default: one input axis
    adapter = random_adapter(config, params)
    x = jax.random.normal(jax.random.key(1), (3, 2, 4))
    with pytest.warns(LoraFallbackWarning, match="in_axes"):
        out = lora_jax.lora(apply, config)(params, adapter, x)
    np.testing.assert_allclose(out, apply(dense_reference(params, adapter, config), x), rtol=1e-5, atol=1e-4)


def test_infer_in_axes_reads_how_the_model_contracts_each_kernel():
    class Block(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            return x + nn.MultiHeadDotProductAttention(num_heads=2, name="attn")(x, x), None

    model = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=2)

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return model(name="blocks")(x, None)[0]

    net = Net()
    x = jax.random.normal(jax.random.key(0), (2, 5, 8))
    params = net.init(jax.random.key(1), x)
    config = lora_jax.LoraConfig(r=2, target_modules="all-linear", stacked_modules=r"blocks\..*")
    shapes = jax.ShapeDtypeStruct(x.shape, x.dtype)
    inferred = lora_jax.infer_in_axes(config, net.apply, params, shapes)
    assert inferred.in_axes == {r"blocks\.attn\.out": 2}
    adapter = random_adapter(inferred, params)
    assert adapter["blocks.attn.out"]["lora_A"].shape == (2, 2, 4, 2)  # (layers, heads, head_dim, r)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LoraFallbackWarning)
        out = jax.jit(lora_jax.lora(net.apply, inferred))(params, adapter, x)
    np.testing.assert_allclose(out, net.apply(dense_reference(params, adapter, inferred), x), rtol=1e-5, atol=1e-4)
