"""The hand-written LoRA backward (lora_jax.linear) against autodiff of the dense formula.

Every case the dot rule handles: kernel on either side of the dot, stacked axes as batch
or as free (shared-input) axes, N-D kernels, dtype casts, dropout, scan and remat bodies,
a tied embedding used as the output head, and gradients of the frozen params and of the
inputs (which LoRA training does not ask for, but a user may).
"""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax
from lora_jax.linear import DotSpec, lora_dot


def dense_params(params, adapter, config):
    """W + s*A@B for every target, written here with jnp so jax.grad can differentiate it."""
    targets = lora_jax.find_targets(config, params, adapter)
    by_path = {t.path: t for t in targets.values()}

    def add(path, w):
        t = by_path.get(path)
        if t is None:
            return w
        a, b = adapter[t.module_name]["lora_A"], adapter[t.module_name]["lora_B"]
        lead = t.lead_shape
        a2 = a.reshape(lead + (-1, t.rank))
        b2 = b.reshape(lead + (t.rank, -1))
        delta = jnp.einsum("...ir,...ro->...io", a2, b2, precision="highest").reshape(t.shape)
        return (w.astype(jnp.float32) + t.scaling * delta).astype(w.dtype)

    return jax.tree_util.tree_map_with_path(add, params)


def random_adapter(config, params, seed=1):
    return lora_jax.init(config.replace(init_lora_weights=False), params, jax.random.key(seed))


def check_grads(apply, params, config, *args, argnums=(0,), rtol=1e-4, atol=1e-4):
    """Gradients of a scalar loss w.r.t. the adapter (and optionally params / inputs) match."""
    adapter = random_adapter(config, params)
    lora_apply = lora_jax.lora(apply, config)

    def loss_lora(ad, p, *xs):
        return jnp.sum(jnp.sin(lora_apply(p, ad, *xs).astype(jnp.float32)))

    def loss_dense(ad, p, *xs):
        return jnp.sum(jnp.sin(apply(dense_params(p, ad, config), *xs).astype(jnp.float32)))

    with warnings.catch_warnings():
        warnings.simplefilter("error", lora_jax.LoraFallbackWarning)
        got = jax.jit(jax.grad(loss_lora, argnums))(adapter, params, *args)
    want = jax.grad(loss_dense, argnums)(adapter, params, *args)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                                                         rtol=rtol, atol=atol), got, want)


def normal(key, shape, scale=1.0):
    return scale * jax.random.normal(jax.random.key(key), shape)


# -- lora_dot itself, every layout -----------------------------------------------------------

def _reference_dot(x, xd, w, a, b, spec):
    wk = jnp.swapaxes(w, -1, -2) if spec.w_transposed else w
    if spec.shared_x:
        return (jnp.einsum("mk,...kn->m...n", x, wk)
                + spec.scaling * jnp.einsum("mk,...kr,...rn->m...n", xd, a, b))
    return jnp.einsum("...mk,...kn->...mn", x, wk) + spec.scaling * jnp.einsum("...mk,...kr,...rn->...mn", xd, a, b)


@pytest.mark.parametrize("num_lead, shared_x, w_transposed, dropout", [
    (0, False, False, False), (0, False, True, True), (0, False, False, True), (1, False, True, False),
    (1, True, False, True), (1, True, True, False), (2, False, False, True), (2, True, True, True),
])
def test_lora_dot_gradients_match_autodiff_of_the_formula(num_lead, shared_x, w_transposed, dropout):
    lead = (3, 2)[:num_lead]
    m, k, n, r = 5, 4, 6, 2
    x = normal(0, (m, k) if shared_x else lead + (m, k))
    keep = (jax.random.uniform(jax.random.key(9), x.shape) > 0.3).astype(jnp.float32)
    w = normal(1, lead + ((n, k) if w_transposed else (k, n)))
    a, b = normal(2, lead + (k, r)), normal(3, lead + (r, n))
    spec = DotSpec(num_lead=num_lead, scaling=0.7, shared_x=shared_x, w_transposed=w_transposed)
    cotangent = normal(4, _reference_dot(x, x, w, a, b, spec).shape)

    def ours(x, w, a, b):
        return jnp.sum(lora_dot(x, x * keep if dropout else None, w, a, b, spec) * cotangent)

    def formula(x, w, a, b):
        return jnp.sum(_reference_dot(x, x * keep if dropout else x, w, a, b, spec) * cotangent)

    for argnums in [(0, 1, 2, 3), (2, 3)]:
        got = jax.jit(jax.grad(ours, argnums))(x, w, a, b)
        want = jax.grad(formula, argnums)(x, w, a, b)
        for g, v in zip(got, want):
            np.testing.assert_allclose(g, v, rtol=1e-4, atol=1e-4)


def test_lora_dot_backward_skips_the_weight_gradient_of_a_frozen_kernel():
    x, w, a, b = normal(0, (64, 32)), normal(1, (32, 48)), normal(2, (32, 4)), normal(3, (4, 48))
    spec = DotSpec(scaling=2.0)
    step = jax.jit(jax.grad(lambda a, b: jnp.sum(lora_dot(x, None, w, a, b, spec) ** 2), (0, 1)))
    hlo = step.lower(a, b).compile().as_text()
    # no dot produces a (32, 48) kernel-shaped result: dW is never formed
    assert "f32[32,48]{1,0} dot(" not in hlo and "f32[48,32]{1,0} dot(" not in hlo


# -- through lora(): every case of the dot rule ------------------------------------------------

def test_kernel_on_the_right_and_on_the_left_of_the_dot():
    params = {"right": {"kernel": normal(0, (6, 5))}, "left": {"kernel": normal(1, (5, 7))}}

    def apply(p, x):
        h = jnp.tanh(x @ p["right"]["kernel"])                      # (b, 6) . (6, 5)
        return jnp.einsum("io,bi->ob", p["left"]["kernel"], h)       # kernel as the dot's lhs

    config = lora_jax.LoraConfig(r=2, lora_alpha=3, target_modules=["right", "left"])
    check_grads(apply, params, config, normal(2, (4, 6)), argnums=(0, 1, 2))


def test_stacked_kernels_as_batch_axes_and_as_shared_input_free_axes():
    params = {"experts": {"kernel": normal(0, (3, 8, 5), 0.3)}, "mix": {"kernel": normal(1, (3, 5, 4), 0.3)}}

    def apply(p, x):
        # shared input: every expert sees the same rows (lead axis = a free axis of the dot)
        h = jax.vmap(lambda w: jnp.tanh(x @ w))(p["experts"]["kernel"])          # (3, b, 5)
        # per-expert input: the lead axis is a batch axis of the dot
        return jax.vmap(lambda w, hh: hh @ w)(p["mix"]["kernel"], h)             # (3, b, 4)

    config = lora_jax.LoraConfig(r=2, target_modules=["experts", "mix"], stacked_modules=["experts", "mix"])
    check_grads(apply, params, config, normal(2, (6, 8)), argnums=(0, 1, 2))


def test_nd_kernels_split_by_their_bias_need_no_in_axes():
    class Attn(nn.Module):
        @nn.compact
        def __call__(self, x):
            q = nn.DenseGeneral((2, 4), name="query")(x)               # kernel (8, 2, 4), bias (2, 4)
            return nn.DenseGeneral(8, axis=(-2, -1), name="out")(q)     # kernel (2, 4, 8), bias (8,)

    model = Attn()
    x = normal(0, (3, 5, 8))
    params = model.init(jax.random.key(1), x)
    config = lora_jax.LoraConfig(r=2, target_modules="all-linear")   # no in_axes
    with warnings.catch_warnings():
        warnings.simplefilter("error", lora_jax.InAxesWarning)
        adapter = lora_jax.init(config, params, jax.random.key(0))
    assert adapter["out"]["lora_A"].shape == (2, 4, 2) and adapter["out"]["lora_B"].shape == (2, 8)
    check_grads(model.apply, params, config, x, argnums=(0, 1, 2))


def test_init_reads_the_split_off_the_model_when_no_bias_says_it():
    class Out(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.DenseGeneral(6, axis=(-2, -1), use_bias=False, name="out")(x)  # kernel (2, 4, 6)

    model = Out()
    x = normal(0, (3, 2, 4))
    params = model.init(jax.random.key(1), x)
    config = lora_jax.LoraConfig(r=2, target_modules=["out"])
    with pytest.warns(lora_jax.InAxesWarning, match="'out' of shape \\(2, 4, 6\\)"):
        guessed = lora_jax.init(config, params, jax.random.key(0))
    assert guessed["out"]["lora_A"].shape == (2, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adapter = lora_jax.init(config, params, jax.random.key(0), apply_fn=model.apply,
                                example_args=(jax.ShapeDtypeStruct(x.shape, x.dtype),))
    assert adapter["out"]["lora_A"].shape == (2, 4, 2)
    # lora() and merge() read the split from the adapter's shapes: efficient and exact
    adapter = lora_jax.init(config.replace(init_lora_weights=False), params, jax.random.key(1),
                            apply_fn=model.apply, example_args=(x,))
    with warnings.catch_warnings():
        warnings.simplefilter("error", lora_jax.LoraFallbackWarning)
        out = jax.jit(lora_jax.lora(model.apply, config))(params, adapter, x)
    np.testing.assert_allclose(out, model.apply(lora_jax.merge(params, adapter, config), x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out, model.apply(dense_params(params, adapter, config), x), rtol=1e-5, atol=1e-5)


def test_bf16_compute_with_fp32_params_and_adapter():
    class BF16(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.Dense(16, dtype=jnp.bfloat16, name="up")(x)
            return nn.Dense(8, dtype=jnp.bfloat16, name="down")(jnp.tanh(h))

    model = BF16()
    x = normal(0, (4, 12))
    params = model.init(jax.random.key(1), x)
    config = lora_jax.LoraConfig(r=4, target_modules=["up", "down"])
    check_grads(model.apply, params, config, x, rtol=0.05, atol=0.05)


def test_scan_and_remat_bodies():
    layers, d = 3, 8
    params = {"blocks": {"mlp": {"kernel": normal(0, (layers, d, d), 1 / np.sqrt(d))}}}

    def apply(p, x):
        @jax.checkpoint
        def body(h, kernel):
            return jnp.tanh(h @ kernel), None
        return jax.lax.scan(body, x, p["blocks"]["mlp"]["kernel"])[0]

    config = lora_jax.LoraConfig(r=2, target_modules=["mlp"], stacked_modules=["mlp"])
    check_grads(apply, params, config, normal(1, (4, d)), argnums=(0, 1, 2))


def test_tied_embedding_as_input_lookup_and_output_head():
    params = {"embed": {"embedding": normal(0, (30, 10))}, "proj": {"kernel": normal(1, (10, 10), 0.3)}}

    def apply(p, ids):
        h = jnp.take(p["embed"]["embedding"], ids, axis=0)
        h = jnp.tanh(h @ p["proj"]["kernel"])
        return h @ p["embed"]["embedding"].T   # contracts the embedding's output axis: B first

    # ensure_weight_tying=True: the head follows the adapted table (False keeps W there: test_tied_embeddings.py).
    config = lora_jax.LoraConfig(r=2, lora_alpha=3, target_modules=["embed", "proj"], ensure_weight_tying=True)
    check_grads(apply, params, config, jnp.array([[1, 4, 29], [0, 7, 7]]), argnums=(0, 1))


def test_dropout_gradients_match_the_formula_with_the_same_mask():
    # rate 0.5 on a 2-D dot: recover the mask lora() drew from its output difference, then
    # differentiate the plain formula with that mask.
    params = {"f": {"kernel": normal(0, (6, 6))}}
    config = lora_jax.LoraConfig(r=6, target_modules=["f"], lora_dropout=0.5)
    adapter = random_adapter(config, params)
    x = normal(1, (4, 6))
    rng = jax.random.key(3)
    apply = lora_jax.lora(lambda p, x: x @ p["f"]["kernel"], config)
    s = config.scaling("f")
    a, b, w = adapter["f"]["lora_A"], adapter["f"]["lora_B"], params["f"]["kernel"]
    # with an invertible A @ B (r = in = out), the dropped input is recoverable exactly enough
    low = (apply(params, adapter, x, lora_rng=rng) - x @ w) / s
    xd = np.linalg.lstsq(np.asarray(a @ b).T, np.asarray(low).T, rcond=None)[0].T
    keep = np.abs(xd) > 1e-3
    assert 0.2 < keep.mean() < 0.8  # it really dropped some inputs
    keep = jnp.asarray(keep, jnp.float32)

    def ours(ad):
        return jnp.sum(jnp.sin(apply(params, ad, x, lora_rng=rng)))

    def formula(ad):
        xdrop = x * keep / 0.5
        return jnp.sum(jnp.sin(x @ w + s * (xdrop @ ad["f"]["lora_A"]) @ ad["f"]["lora_B"]))

    got, want = jax.grad(ours)(adapter), jax.grad(formula)(adapter)
    jax.tree.map(lambda g, v: np.testing.assert_allclose(g, v, rtol=1e-3, atol=1e-3), got, want)
