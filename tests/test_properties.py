"""Property tests: lora() equals the dense formula; merge then unmerge round-trips."""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import lora_jax

DTYPES = {"float32": (jnp.float32, 1e-5), "bfloat16": (jnp.bfloat16, 3e-2)}


@st.composite
def cases(draw):
    d_in = draw(st.integers(1, 12))
    d_out = draw(st.integers(1, 12))
    rank = draw(st.integers(1, min(d_in, d_out)))
    batch = draw(st.integers(1, 5))
    transposed = draw(st.booleans())  # use the kernel as x @ W.T after a transpose
    kernel_first = draw(st.booleans())  # W on the left of the dot
    dtype = draw(st.sampled_from(sorted(DTYPES)))
    alpha = draw(st.sampled_from([1.0, 8.0, 16.0]))
    rslora = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    return d_in, d_out, rank, batch, transposed, kernel_first, dtype, alpha, rslora, seed


def make(d_in, d_out, rank, batch, dtype, alpha, rslora, seed):
    k = jax.random.split(jax.random.key(seed), 3)
    params = {"lin": {"kernel": jax.random.normal(k[0], (d_in, d_out)).astype(dtype)}}
    config = lora_jax.LoraConfig(r=rank, lora_alpha=alpha, use_rslora=rslora, target_modules=["lin"],
                                 init_lora_weights=False)
    adapter = lora_jax.init(config, params, k[1])
    return params, config, adapter, k[2]


@settings(max_examples=25, deadline=None)
@given(cases())
def test_lora_equals_dense_formula(case):
    d_in, d_out, rank, batch, transposed, kernel_first, dtype_name, alpha, rslora, seed = case
    dtype, tol = DTYPES[dtype_name]
    params, config, adapter, key = make(d_in, d_out, rank, batch, dtype, alpha, rslora, seed)

    def apply(p, x):
        w = p["lin"]["kernel"]
        if transposed:
            w_t = w.T  # (out, in): contract with its second axis
            return w_t @ x.T if kernel_first else x @ w_t.T
        return (x @ w) if not kernel_first else (w.T @ x.T).T

    x = jax.random.normal(key, (batch, d_in)).astype(dtype)
    out = jax.jit(lora_jax.lora(apply, config))(params, adapter, x)
    a = np.asarray(adapter["lin"]["lora_A"], np.float64)
    b = np.asarray(adapter["lin"]["lora_B"], np.float64)
    scale = alpha / (np.sqrt(rank) if rslora else rank)
    w = np.asarray(params["lin"]["kernel"], np.float64) + scale * a @ b
    xs = np.asarray(x, np.float64)
    ref = (w.T @ xs.T) if (transposed and kernel_first) else xs @ w
    magnitude = np.abs(xs) @ np.abs(w)
    bound = tol * (1 + (magnitude.T if transposed and kernel_first else magnitude))
    assert np.all(np.abs(np.asarray(out, np.float64) - ref) <= bound)


@settings(max_examples=25, deadline=None)
@given(cases())
def test_merge_then_unmerge_round_trips(case):
    d_in, d_out, rank, batch, _, _, dtype_name, alpha, rslora, seed = case
    params, config, adapter, _ = make(d_in, d_out, rank, batch, jnp.float32, alpha, rslora, seed)
    restored = lora_jax.unmerge(lora_jax.merge(params, adapter, config), adapter, config)
    w = np.asarray(params["lin"]["kernel"])
    delta = np.abs(np.asarray(adapter["lin"]["lora_A"]) @ np.asarray(adapter["lin"]["lora_B"])) * alpha
    np.testing.assert_allclose(restored["lin"]["kernel"], w, rtol=0, atol=float(1e-6 * (1 + np.abs(w).max() + delta.max())))
