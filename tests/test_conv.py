"""LoRA on convolutions: PEFT's Conv2d LoRA layout both ways, merge, and the efficient step."""

from __future__ import annotations

import functools
import itertools
import sys
import warnings
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import flops  # noqa: E402

CONVS = ["conv1", "conv2", "conv3"]


class FlaxNet(nn.Module):
    """The same net as TorchNet in Flax: NHWC activations, HWIO kernels."""

    width: int = 8
    use_bias: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(nn.Conv, use_bias=self.use_bias)
        x = nn.relu(conv(self.width, (3, 3), strides=2, padding=((1, 1), (1, 1)), name="conv1")(x))
        x = nn.relu(conv(self.width, (3, 3), padding="SAME", kernel_dilation=2, name="conv2")(x))
        return conv(4, (1, 1), name="conv3")(x)


class TorchNet(torch.nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, width, 3, stride=2, padding=1)
        self.conv2 = torch.nn.Conv2d(width, width, 3, padding="same", dilation=2)
        self.conv3 = torch.nn.Conv2d(width, 4, 1)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.conv3(x)


def torch_net() -> TorchNet:
    torch.manual_seed(0)
    return TorchNet().eval()


def mirror(model: torch.nn.Module) -> dict:
    """Flax params from the torch net: OIHW -> HWIO kernels."""
    out = {}
    for name in CONVS:
        conv = getattr(model, name)
        out[name] = {"kernel": jnp.asarray(conv.weight.detach().numpy().transpose(2, 3, 1, 0)),
                     "bias": jnp.asarray(conv.bias.detach().numpy())}
    return {"params": out}


X = np.random.default_rng(0).normal(size=(2, 3, 11, 11)).astype(np.float32)  # NCHW


def torch_out(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(X)).numpy().transpose(0, 2, 3, 1)  # NHWC, as Flax gives


def lora_out(params, adapter, config) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("error", lora_jax.LoraFallbackWarning)
        apply = lora_jax.lora(FlaxNet().apply, config)
        return np.asarray(jax.jit(apply)(params, adapter, X.transpose(0, 2, 3, 1)))


def trained_peft(config: peft.LoraConfig):
    model = peft.get_peft_model(torch_net(), config)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


def test_flax_net_mirrors_torch_net():
    np.testing.assert_allclose(FlaxNet().apply(mirror(torch_net()), X.transpose(0, 2, 3, 1)), torch_out(torch_net()),
                               atol=1e-5)


@pytest.mark.parametrize("use_dora", [False, True])
def test_peft_conv_adapter_loads_with_matching_outputs(tmp_path, use_dora):
    theirs = trained_peft(peft.LoraConfig(r=2, lora_alpha=6, target_modules=CONVS, use_dora=use_dora))
    theirs.save_pretrained(str(tmp_path))
    params = mirror(torch_net())
    adapter, config = lora_jax.load_peft(tmp_path, params)
    assert adapter["conv1"]["lora_A"].shape == (3, 3, 3, 2) and adapter["conv1"]["lora_B"].shape == (2, 8)
    np.testing.assert_allclose(lora_out(params, adapter, config), torch_out(theirs), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("use_dora", [False, True])
def test_lora_jax_conv_adapter_runs_in_peft(tmp_path, use_dora):
    params = mirror(torch_net())
    config = lora_jax.LoraConfig(r=2, lora_alpha=6, target_modules=CONVS, use_dora=use_dora, lora_dropout=0.1)
    x = jax.ShapeDtypeStruct((2, 11, 11, 3), jnp.float32)
    adapter = lora_jax.init(config, params, jax.random.key(0), apply_fn=FlaxNet().apply, example_args=(x,))
    rng = np.random.default_rng(2)
    adapter = jax.tree.map(lambda v: v + jnp.asarray(rng.normal(0, 0.3, v.shape), v.dtype), adapter)
    lora_jax.save_peft(tmp_path, adapter, config, params)
    loaded = peft.PeftModel.from_pretrained(torch_net(), str(tmp_path)).eval()
    np.testing.assert_allclose(torch_out(loaded), lora_out(params, adapter, config), atol=1e-4, rtol=1e-4)


def test_init_reads_the_conv_split_off_the_model_without_biases():
    net = FlaxNet(use_bias=False)  # no bias to read the split from
    x = jax.ShapeDtypeStruct((1, 11, 11, 3), jnp.float32)
    params = jax.eval_shape(net.init, jax.random.key(0), x)
    config = lora_jax.LoraConfig(r=2, target_modules=CONVS)
    with warnings.catch_warnings():
        warnings.simplefilter("error", lora_jax.InAxesWarning)
        adapter = lora_jax.init(config, params, jax.random.key(0), apply_fn=net.apply, example_args=(x,))
    assert adapter["conv2"]["lora_A"].shape == (3, 3, 8, 2)
    assert lora_jax.infer_in_axes(config, net.apply, params, x).conv_modules == tuple(CONVS)
    # without the model, conv_modules says it
    assert lora_jax.init(config.replace(conv_modules=CONVS), params, jax.random.key(0))["conv1"]["lora_A"].shape \
        == (3, 3, 3, 2)


def test_merged_conv_lora_equals_unmerged_without_dilation():
    # PEFT's lora_A has no dilation, so only undilated convs are a kernel delta (conv1, conv3).
    params = mirror(torch_net())
    config = lora_jax.LoraConfig(r=2, lora_alpha=6, target_modules=["conv1", "conv3"], init_lora_weights=False)
    adapter = lora_jax.init(config, params, jax.random.key(0))
    merged = lora_jax.merge(params, adapter, config)
    np.testing.assert_allclose(FlaxNet().apply(merged, X.transpose(0, 2, 3, 1)), lora_out(params, adapter, config),
                               atol=1e-4, rtol=1e-4)


def test_a_dilated_conv_without_same_padding_says_why_like_peft():
    class Dilated(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Conv(4, (3, 3), padding=((1, 1), (1, 1)), kernel_dilation=2, name="conv")(x)

    x = jnp.zeros((1, 9, 9, 3))
    params = Dilated().init(jax.random.key(0), x)
    config = lora_jax.LoraConfig(r=2, target_modules=["conv"])
    adapter = lora_jax.init(config, params, jax.random.key(0))
    with pytest.raises(ValueError, match=r"conv 'conv'.*no dilation.*'same' padding"):
        lora_jax.lora(Dilated().apply, config)(params, adapter, x)


def test_conv_lora_step_flops_within_5_percent_of_the_frozen_floor():
    model, x_shape = FlaxNet(width=128), (8, 32, 32, 3)
    x = jax.ShapeDtypeStruct(x_shape, jnp.float32)
    params = jax.eval_shape(model.init, jax.random.key(0), x)
    config = lora_jax.LoraConfig(r=2, target_modules=CONVS)  # every conv: LoRA/floor is 1.028 here
    adapter = jax.eval_shape(lambda: lora_jax.init(config, params, jax.random.key(1)))
    apply = lora_jax.lora(model.apply, config)

    def loss(y):
        return jnp.mean(y ** 2)

    with warnings.catch_warnings():
        warnings.simplefilter("error", lora_jax.LoraFallbackWarning)
        lora_step = flops.compile_step(jax.grad(lambda a, p, x: loss(apply(p, a, x))), (adapter, params, x))
    floor = flops.compile_step(jax.grad(lambda x, p: loss(model.apply(p, x))), (x, params))
    full = flops.compile_step(jax.grad(lambda p, x: loss(model.apply(p, x))), (params, x))
    ratio = lora_step.cost_analysis()["flops"] / floor.cost_analysis()["flops"]
    assert 0.9 <= ratio <= 1.05, ratio
    # XLA writes a conv's weight gradient in any axis order, e.g. (in, kh, kw, out)
    shapes = flops.kernel_shapes(config, params, adapter) | {
        p for t in lora_jax.find_targets(config, params, adapter).values() for p in itertools.permutations(t.shape)}
    assert flops.kernel_shaped_dots(full.as_text(), shapes)  # the detector sees full fine-tuning's dW
    assert not flops.kernel_shaped_dots(lora_step.as_text(), shapes)


def test_a_conv_in_modules_to_save_round_trips_in_torch_layout(tmp_path):
    theirs = trained_peft(peft.LoraConfig(r=2, target_modules=["conv1", "conv2"], modules_to_save=["conv3"]))
    theirs.save_pretrained(str(tmp_path / "theirs"))
    params = mirror(torch_net())
    adapter, config = loaded = lora_jax.load_peft(tmp_path / "theirs", params)
    np.testing.assert_allclose(lora_out(loaded.params, adapter, config), torch_out(theirs), atol=1e-4, rtol=1e-4)
    lora_jax.save_peft(tmp_path / "ours", adapter, config, loaded.params)
    again = peft.PeftModel.from_pretrained(torch_net(), str(tmp_path / "ours")).eval()
    np.testing.assert_allclose(torch_out(again), torch_out(theirs), atol=1e-5)
