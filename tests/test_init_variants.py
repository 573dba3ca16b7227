"""PiSSA, pissa_niter and OLoRA initialisations, and the conversion to the original base.

Reference: PyTorch PEFT 0.21 on a tiny torch model (``nn.Linear`` layers and a GPT-2
``Conv1D`` with ``fan_in_fan_out``) whose weights the JAX params mirror (kernel =
Linear weight.T = Conv1D weight). Singular / QR vectors are unique only up to sign,
so the factors are compared after aligning signs, and the sign-free products
``s * A @ B`` and residual kernels directly.
"""

from __future__ import annotations

import copy
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
from transformers.pytorch_utils import Conv1D  # noqa: E402

import lora_jax  # noqa: E402
from lora_jax import LoraConfig  # noqa: E402

IN, HID, OUT, FUSED, VOCAB = 12, 10, 16, 20, 9
TOL = 1e-5


class TorchModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = torch.nn.Linear(IN, HID)
        self.up = torch.nn.Linear(HID, OUT, bias=False)
        self.c_attn = Conv1D(FUSED, IN)  # weight (IN, FUSED), GPT-2 layout
        self.embed = torch.nn.Embedding(VOCAB, IN)


def torch_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> TorchModel:
    torch.manual_seed(seed)
    model = TorchModel()
    with torch.no_grad():
        model.c_attn.weight.normal_()  # Conv1D starts at std 0.02: make its spectrum O(1) too
        model.c_attn.bias.normal_()
    return model.to(dtype)


def mirror(model: TorchModel) -> dict:
    """The JAX params of ``model``: kernel = Linear weight.T, = Conv1D weight."""
    def np32(t: torch.Tensor) -> np.ndarray:
        return t.detach().float().numpy().copy()

    return {"params": {
        "q": {"kernel": np32(model.q.weight.T), "bias": np32(model.q.bias)},
        "up": {"kernel": np32(model.up.weight.T)},
        "c_attn": {"kernel": np32(model.c_attn.weight), "bias": np32(model.c_attn.bias)},
        "embed": {"embedding": np32(model.embed.weight)},
    }}


def apply(params: dict, x: jax.Array, ids: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    p = params["params"]
    h = x @ p["q"]["kernel"] + p["q"]["bias"]
    return h @ p["up"]["kernel"], x @ p["c_attn"]["kernel"] + p["c_attn"]["bias"], p["embed"]["embedding"][ids]


def reference_outputs(params: dict, x: np.ndarray, ids: np.ndarray) -> list[np.ndarray]:
    """``apply`` in float64 numpy: the independent reference."""
    p = jax.tree.map(lambda v: np.asarray(v, np.float64), params)["params"]
    x = np.asarray(x, np.float64)
    h = x @ p["q"]["kernel"] + p["q"]["bias"]
    return [h @ p["up"]["kernel"], x @ p["c_attn"]["kernel"] + p["c_attn"]["bias"], p["embed"]["embedding"][ids]]


def inputs(seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(5, IN)).astype(np.float32), rng.integers(0, VOCAB, size=(5,))


def peft_model(model: TorchModel, init: str, targets: list[str], **kwargs) -> torch.nn.Module:
    config = peft.LoraConfig(r=kwargs.pop("r", 3), lora_alpha=kwargs.pop("lora_alpha", 6), target_modules=targets,
                             init_lora_weights=init, **kwargs)
    return peft.get_peft_model(model, config)


def peft_factors(layer: torch.nn.Module) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """PEFT's ``(lora_A.weight, lora_B.weight, base weight, scaling)`` of a LoRA layer."""
    return (layer.lora_A["default"].weight.detach().float().numpy(),
            layer.lora_B["default"].weight.detach().float().numpy(),
            layer.base_layer.weight.detach().float().numpy(),
            layer.scaling["default"])


def assert_factors_match(a: np.ndarray, b: np.ndarray, peft_a: np.ndarray, peft_b: np.ndarray) -> None:
    """A = lora_A.T and B = lora_B.T up to a sign per rank component (paired in A and B).

    A single singular vector moves by ~eps * sigma_1 / gap between two float32 SVDs, more
    than the sign-free products do, hence 1e-4 here and 1e-5 on products and residuals.
    """
    signs = np.sign(np.sum(np.asarray(a) * peft_a.T, axis=0))
    assert np.all(signs != 0)
    np.testing.assert_allclose(np.asarray(a) * signs, peft_a.T, atol=1e-4, rtol=0)
    np.testing.assert_allclose(signs[:, None] * np.asarray(b), peft_b.T, atol=1e-4, rtol=0)


# -- PiSSA and OLoRA against PEFT ----------------------------------------------------------------

@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_linear_init_matches_peft_and_starts_at_the_base_output(init):
    model = torch_model()
    params = mirror(model)
    original = copy.deepcopy(params)
    config = LoraConfig(r=3, lora_alpha=6, target_modules=["q", "up", "embed"], init_lora_weights=init)
    adapter, residual = lora_jax.init_with_base(config, params, jax.random.key(0))
    pm = peft_model(model, init, ["q", "up", "embed"])

    for name in ("q", "up"):
        layer = getattr(pm.base_model.model, name)
        peft_a, peft_b, peft_w, s = peft_factors(layer)
        assert s == config.scaling(name) == 2.0
        a, b = np.asarray(adapter[name]["lora_A"]), np.asarray(adapter[name]["lora_B"])
        np.testing.assert_allclose(s * (a @ b).T, s * peft_b @ peft_a, atol=TOL, rtol=0)
        np.testing.assert_allclose(np.asarray(residual["params"][name]["kernel"]).T, peft_w, atol=TOL, rtol=0)
        assert_factors_match(a, b, peft_a, peft_b)
    # the input to `init_with_base` is untouched; an embedding keeps its base and the plain init
    jax.tree.map(np.testing.assert_array_equal, params, original)
    np.testing.assert_array_equal(residual["params"]["embed"]["embedding"], params["params"]["embed"]["embedding"])
    assert not np.any(np.asarray(adapter["embed"]["lora_A"]))

    x, ids = inputs()
    got = lora_jax.lora(apply, config)(residual, adapter, x, ids)
    for g, want in zip(got, reference_outputs(original, x, ids)):
        np.testing.assert_allclose(np.asarray(g), want, atol=TOL, rtol=0)


def test_pissa_on_gpt2_conv1d_with_fan_in_fan_out_matches_peft():
    model = torch_model()
    params = mirror(model)
    config = LoraConfig(r=4, lora_alpha=2, target_modules=["c_attn"], init_lora_weights="pissa", fan_in_fan_out=True)
    adapter, residual = lora_jax.init_with_base(config, params, jax.random.key(0))
    pm = peft_model(model, "pissa", ["c_attn"], r=4, lora_alpha=2, fan_in_fan_out=True)
    peft_a, peft_b, peft_w, s = peft_factors(pm.base_model.model.c_attn)
    assert peft_a.shape == (4, IN) and peft_b.shape == (FUSED, 4) and peft_w.shape == (IN, FUSED)
    a, b = np.asarray(adapter["c_attn"]["lora_A"]), np.asarray(adapter["c_attn"]["lora_B"])
    np.testing.assert_allclose(residual["params"]["c_attn"]["kernel"], peft_w, atol=TOL, rtol=0)  # Conv1D: (in, out)
    np.testing.assert_allclose(s * a @ b, s * (peft_b @ peft_a).T, atol=TOL, rtol=0)
    assert_factors_match(a, b, peft_a, peft_b)

    x, ids = inputs()
    torch_out = pm.base_model.model.c_attn(torch.from_numpy(x)).detach().numpy()
    got = lora_jax.lora(apply, config)(residual, adapter, x, ids)[1]
    want = reference_outputs(params, x, ids)[1]
    np.testing.assert_allclose(np.asarray(got), want, atol=TOL, rtol=0)
    np.testing.assert_allclose(torch_out, want, atol=TOL, rtol=0)


def test_olora_on_an_in_out_kernel_is_peft_olora_on_the_equivalent_linear():
    """PEFT 0.21's olora_init ignores fan_in_fan_out; lora_jax decomposes the (out, in) weight as for Linear."""
    model = torch_model()
    params = mirror(model)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], init_lora_weights="olora", fan_in_fan_out=True)
    adapter, residual = lora_jax.init_with_base(config, params, jax.random.key(0))

    linear = torch.nn.Sequential()
    linear.add_module("c_attn", torch.nn.Linear(IN, FUSED))
    with torch.no_grad():
        linear.c_attn.weight.copy_(model.c_attn.weight.T)
    pm = peft.get_peft_model(linear, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"],
                                                     init_lora_weights="olora"))
    peft_a, peft_b, peft_w, _ = peft_factors(pm.base_model.model.c_attn)
    a, b = np.asarray(adapter["c_attn"]["lora_A"]), np.asarray(adapter["c_attn"]["lora_B"])
    np.testing.assert_allclose(np.asarray(residual["params"]["c_attn"]["kernel"]).T, peft_w, atol=TOL, rtol=0)
    assert_factors_match(a, b, peft_a, peft_b)
    np.testing.assert_allclose(b @ b.T, np.eye(4), atol=TOL)  # OLoRA's B has orthonormal rows

    x, ids = inputs()
    got = lora_jax.lora(apply, config)(residual, adapter, x, ids)[1]
    np.testing.assert_allclose(np.asarray(got), reference_outputs(params, x, ids)[1], atol=TOL, rtol=0)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_bfloat16_kernels_give_peft_dtypes_residual_and_float32_factors_rounded_to_bfloat16(init):
    model = torch_model(dtype=torch.bfloat16)
    params = {"params": {"q": {"kernel": jnp.asarray(model.q.weight.detach().float().numpy().T, jnp.bfloat16)}}}
    config = LoraConfig(r=3, lora_alpha=6, target_modules=["q"], init_lora_weights=init)
    adapter, residual = lora_jax.init_with_base(config, params, jax.random.key(0))
    pm = peft_model(model, init, ["q"])
    layer = pm.base_model.model.q
    assert layer.lora_A["default"].weight.dtype == torch.float32 and layer.base_layer.weight.dtype == torch.bfloat16
    peft_a, peft_b, peft_w, s = peft_factors(layer)

    kernel = residual["params"]["q"]["kernel"]
    a, b = adapter["q"]["lora_A"], adapter["q"]["lora_B"]
    assert kernel.dtype == jnp.bfloat16 and a.dtype == b.dtype == jnp.float32
    for factor in (a, b):  # PEFT moves A and B to the base dtype, then get_peft_model casts them back
        np.testing.assert_array_equal(factor, factor.astype(jnp.bfloat16).astype(jnp.float32))
    # float32 decompositions agree to ~1e-6, then one bfloat16 rounding (relative 2^-8)
    np.testing.assert_allclose(np.asarray(kernel, np.float32).T, peft_w, atol=2e-2, rtol=2e-2)
    np.testing.assert_allclose(s * (np.asarray(a) @ np.asarray(b)).T, s * peft_b @ peft_a, atol=2e-2, rtol=2e-2)


def test_stacked_and_nd_kernels_are_decomposed_per_layer_on_the_flattened_matrix():
    rng = np.random.default_rng(3)
    layers, d, heads, head_dim = 3, 8, 2, 5
    stacked = rng.normal(size=(layers, d, heads, head_dim)).astype(np.float32)
    params = {"params": {"model": {"layers": {"attn": {"kernel": stacked}}}}}
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["attn"], stacked_modules=["attn"],
                        init_lora_weights="pissa")
    adapter, residual = lora_jax.init_with_base(config, params, jax.random.key(0))
    name = "model.layers.attn"
    assert adapter[name]["lora_A"].shape == (layers, d, 2)
    assert adapter[name]["lora_B"].shape == (layers, 2, heads, head_dim)
    for i in range(layers):
        linear = torch.nn.Sequential()
        linear.add_module("attn", torch.nn.Linear(d, heads * head_dim, bias=False))
        with torch.no_grad():
            linear.attn.weight.copy_(torch.from_numpy(stacked[i].reshape(d, heads * head_dim).T))
        pm = peft.get_peft_model(linear, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["attn"],
                                                         init_lora_weights="pissa"))
        peft_a, peft_b, peft_w, _ = peft_factors(pm.base_model.model.attn)
        a = np.asarray(adapter[name]["lora_A"][i])
        b = np.asarray(adapter[name]["lora_B"][i]).reshape(2, heads * head_dim)
        assert_factors_match(a, b, peft_a, peft_b)
        np.testing.assert_allclose(
            np.asarray(residual["params"]["model"]["layers"]["attn"]["kernel"][i]).reshape(d, -1).T,
            peft_w, atol=TOL, rtol=0)


# -- pissa_niter_<k>: properties (its factors are random) ---------------------------------------

def decaying_matrix(seed: int, rows: int = 24, cols: int = 16) -> np.ndarray:
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.normal(size=(rows, cols)))
    v, _ = np.linalg.qr(rng.normal(size=(cols, cols)))
    return ((u * 0.5 ** np.arange(cols)) @ v.T).astype(np.float32)


def niter_init(kernel: np.ndarray, niter: int, key: int, r: int = 3, alpha: float = 6):
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=["w"], init_lora_weights=f"pissa_niter_{niter}")
    adapter, residual = lora_jax.init_with_base(config, {"params": {"w": {"kernel": kernel}}}, jax.random.key(key))
    return (np.asarray(adapter["w"]["lora_A"]), np.asarray(adapter["w"]["lora_B"]),
            np.asarray(residual["params"]["w"]["kernel"]), config.scaling("w"))


@pytest.mark.parametrize("niter", [0, 2])
def test_pissa_niter_residual_plus_adapter_is_the_kernel_with_orthogonal_factors(niter):
    kernel = np.random.default_rng(0).normal(size=(24, 16)).astype(np.float32)
    a, b, residual, s = niter_init(kernel, niter, key=0)
    np.testing.assert_allclose(residual.astype(np.float64) + s * (a.astype(np.float64) @ b), kernel, atol=TOL, rtol=0)
    # A = V_r sqrt(S_r / s), B = sqrt(S_r / s) U_r^T: both Gram matrices are diag(S_r / s)
    gram_a, gram_b = a.T @ a, b @ b.T
    np.testing.assert_allclose(gram_a, np.diag(np.diag(gram_a)), atol=1e-4)
    np.testing.assert_allclose(gram_a, gram_b, atol=1e-4)
    singular = np.linalg.svd(kernel.astype(np.float64), compute_uv=False)
    approx = s * np.diag(gram_a)
    assert np.all(approx <= singular[:3] * (1 + 1e-5))  # a projection never exceeds the true singular values
    # Eckart-Young: no rank-3 approximation beats the truncated SVD
    best = math.sqrt(np.sum(singular[3:] ** 2))
    assert np.linalg.norm(kernel - s * a @ b) >= best * (1 - 1e-5)


def test_pissa_niter_uses_the_key_and_converges_to_exact_pissa_like_peft():
    kernel = decaying_matrix(0)
    a0, b0, _, s = niter_init(kernel, 0, key=0)
    a0_again, _, _, _ = niter_init(kernel, 0, key=0)
    a0_other, b0_other, _, _ = niter_init(kernel, 0, key=1)
    np.testing.assert_array_equal(a0, a0_again)
    assert not np.allclose(s * a0 @ b0, s * a0_other @ b0_other, atol=1e-3)

    exact_config = LoraConfig(r=3, lora_alpha=6, target_modules=["w"], init_lora_weights="pissa")
    exact, exact_residual = lora_jax.init_with_base(exact_config, {"params": {"w": {"kernel": kernel}}},
                                                    jax.random.key(0))
    a16, b16, residual16, _ = niter_init(kernel, 16, key=0)
    exact_product = s * np.asarray(exact["w"]["lora_A"]) @ np.asarray(exact["w"]["lora_B"])
    np.testing.assert_allclose(s * a16 @ b16, exact_product, atol=1e-5, rtol=0)
    np.testing.assert_allclose(residual16, np.asarray(exact_residual["params"]["w"]["kernel"]), atol=1e-5)

    linear = torch.nn.Sequential()
    linear.add_module("w", torch.nn.Linear(24, 16, bias=False))
    with torch.no_grad():
        linear.w.weight.copy_(torch.from_numpy(kernel.T))
    torch.manual_seed(0)
    pm = peft.get_peft_model(linear, peft.LoraConfig(r=3, lora_alpha=6, target_modules=["w"],
                                                     init_lora_weights="pissa_niter_16"))
    peft_a, peft_b, _, _ = peft_factors(pm.base_model.model.w)
    np.testing.assert_allclose(s * a16 @ b16, s * (peft_b @ peft_a).T, atol=1e-5, rtol=0)


# -- the rank-doubling conversion to the original base ------------------------------------------

def perturbed(adapter: dict, seed: int) -> dict:
    """The adapter after 'training': every factor moved by random noise."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda v: np.asarray(v) + 0.3 * rng.normal(size=np.shape(v)).astype(np.float32), adapter)


def float64_lora_outputs(params: dict, adapter: dict, config: LoraConfig, x: np.ndarray, ids: np.ndarray):
    """``apply`` on W + s * A @ B formed in float64: the reference for a trained adapter."""
    merged = jax.tree.map(lambda v: np.asarray(v, np.float64), params)
    for name, pair in adapter.items():
        leaf = "embedding" if name == "embed" else "kernel"
        a, b = np.asarray(pair["lora_A"], np.float64), np.asarray(pair["lora_B"], np.float64)
        merged["params"][name][leaf] = merged["params"][name][leaf] + config.scaling(name) * a @ b
    return reference_outputs(merged, x, ids)


@pytest.mark.parametrize("init,extra", [
    ("pissa", {}),
    ("olora", {}),
    ("pissa_niter_2", {}),
    # PEFT refuses this combination in the conversion; each module's scaling is kept here
    ("pissa", {"use_rslora": True, "rank_pattern": {"up": 2}, "alpha_pattern": {"q": 3.0}}),
])
def test_converted_adapter_on_the_original_base_equals_the_trained_adapter_on_the_residual(init, extra):
    params = mirror(torch_model())
    config = LoraConfig(r=3, lora_alpha=6, target_modules=["q", "up", "c_attn", "embed"], init_lora_weights=init,
                        **extra)
    initial, residual = lora_jax.init_with_base(config, params, jax.random.key(0))
    trained = perturbed(initial, seed=5)
    converted, plain = lora_jax.convert_to_original_base(trained, initial, config)

    assert plain.init_lora_weights is True and not plain.changes_base
    for name in trained:
        assert plain.rank(name) == 2 * config.rank(name)
        assert math.isclose(plain.scaling(name), config.scaling(name), rel_tol=1e-12)
        assert converted[name]["lora_A"].shape[-1] == 2 * config.rank(name)
    x, ids = inputs()
    want = float64_lora_outputs(residual, trained, config, x, ids)
    got = lora_jax.lora(apply, plain)(params, converted, x, ids)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), w, atol=1e-4, rtol=1e-5)


def test_conversion_of_a_stacked_adapter_concatenates_on_the_rank_axis():
    rng = np.random.default_rng(4)
    kernel = rng.normal(size=(2, 8, 6)).astype(np.float32)
    params = {"params": {"layers": {"mlp": {"kernel": kernel}}}}
    config = LoraConfig(r=2, target_modules=["mlp"], stacked_modules=["mlp"], init_lora_weights="olora")
    initial, residual = lora_jax.init_with_base(config, params, jax.random.key(0))
    trained = perturbed(initial, seed=1)
    converted, plain = lora_jax.convert_to_original_base(trained, initial, config)
    assert converted["layers.mlp"]["lora_B"].shape == (2, 4, 6)
    s = config.scaling("layers.mlp")
    want = np.asarray(residual["params"]["layers"]["mlp"]["kernel"], np.float64) + s * np.einsum(
        "lir,lro->lio", trained["layers.mlp"]["lora_A"].astype(np.float64), trained["layers.mlp"]["lora_B"])
    got = lora_jax.merge(params, converted, plain)["params"]["layers"]["mlp"]["kernel"]
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)


def test_conversion_refuses_adapters_that_do_not_pair_up_and_loftq():
    params = {"params": {"w": {"kernel": np.eye(6, dtype=np.float32)}, "v": {"kernel": np.eye(6, dtype=np.float32)}}}
    config = LoraConfig(r=2, target_modules=["w", "v"], init_lora_weights="olora")
    initial, _ = lora_jax.init_with_base(config, params, jax.random.key(0))
    with pytest.raises(ValueError, match="different modules"):
        lora_jax.convert_to_original_base({"w": initial["w"]}, initial, config)
    bad = {**initial, "v": {"lora_A": np.zeros((6, 3)), "lora_B": initial["v"]["lora_B"]}}
    with pytest.raises(ValueError, match=r"adapter\['v'\]\['lora_A'\] has shape \(6, 3\)"):
        lora_jax.convert_to_original_base(bad, initial, config)
    loftq = LoraConfig(r=2, target_modules=["w"], init_lora_weights="loftq", loftq_config={"loftq_bits": 4})
    with pytest.raises(ValueError, match="LoftQ"):
        lora_jax.convert_to_original_base(initial, initial, loftq)


# -- which function to call ----------------------------------------------------------------------

@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora", "loftq"])
def test_plain_init_refuses_base_changing_inits_and_names_init_with_base(init):
    extra = {"loftq_config": {"loftq_bits": 4}} if init == "loftq" else {}
    config = LoraConfig(r=2, target_modules=["w"], init_lora_weights=init, **extra)
    with pytest.raises(ValueError, match="init_with_base"):
        lora_jax.init(config, {"params": {"w": {"kernel": np.eye(4, dtype=np.float32)}}}, jax.random.key(0))


def test_init_with_base_for_plain_inits_is_init_and_leaves_params_alone():
    params = {"params": {"w": {"kernel": np.eye(4, dtype=np.float32)}}}
    config = LoraConfig(r=2, target_modules=["w"], init_lora_weights="gaussian")
    adapter, out = lora_jax.init_with_base(config, params, jax.random.key(3))
    assert out is params
    jax.tree.map(np.testing.assert_array_equal, adapter, lora_jax.init(config, params, jax.random.key(3)))


def test_init_with_base_needs_kernel_values_and_floating_kernels():
    config = LoraConfig(r=2, target_modules=["w"], init_lora_weights="pissa")
    shapes = {"params": {"w": {"kernel": jax.ShapeDtypeStruct((4, 4), jnp.float32)}}}
    with pytest.raises(ValueError, match=r"values of targeted kernel w\.kernel"):
        lora_jax.init_with_base(config, shapes, jax.random.key(0))
    ints = {"params": {"w": {"kernel": np.eye(4, dtype=np.int8)}}}
    with pytest.raises(ValueError, match="w.kernel has dtype int8"):
        lora_jax.init_with_base(config, ints, jax.random.key(0))


def test_loftq_returns_its_quantized_base():  # tests/test_loftq.py checks it against PEFT
    config = LoraConfig(r=2, lora_alpha=2, target_modules=["w"], init_lora_weights="loftq",
                        loftq_config={"loftq_iter": 2})
    adapter, out = lora_jax.init_with_base(config, {"params": {"w": {"kernel": np.eye(64, dtype=np.float32)}}},
                                           jax.random.key(0))
    assert type(out["params"]["w"]["kernel"]).__name__ == "NF4Array"
    assert adapter["w"]["lora_A"].shape == (64, 2)


def test_variants_of_phase_two_are_honoured_by_init_rather_than_ignored():
    # Phase 2 implemented them (tests/test_dora.py, tests/test_trainable_tokens.py): init creates their
    # entries, or says why it cannot.
    params = {"params": {"w": {"kernel": np.eye(4, dtype=np.float32)}}}
    adapter = lora_jax.init(LoraConfig(r=2, target_modules=["w"], use_dora=True), params, jax.random.key(0))
    np.testing.assert_allclose(adapter["w"]["lora_magnitude"], np.ones(4))
    with pytest.raises(ValueError, match="trainable_token_indices"):
        lora_jax.init(LoraConfig(r=2, target_modules=["w"], trainable_token_indices=[1, 2]), params,
                      jax.random.key(0))
