"""Loader behaviour that is not about one family's numerics: errors, GGUF files,
tokenizers, and the package's import hygiene."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import ast
import json
import subprocess
import sys
from pathlib import Path

import gguf
import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from lora_jax import models

LLAMA = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 80,
    "rms_norm_eps": 1e-5,
    "rope_theta": 20000.0,
    "tie_word_embeddings": False,
    "initializer_range": 0.1,
}


@pytest.fixture(scope="module")
def llama():
    return models.from_config(LLAMA, seed=0)


@pytest.fixture
def saved_llama(llama, tmp_path):
    return models.save_pretrained(tmp_path / "llama", llama.config, llama.params)


def test_missing_path_and_non_model_directory_say_what_was_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        models.from_pretrained(tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(FileNotFoundError, match=r"config\.json.*model\.safetensors.*\.gguf"):
        models.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a model"):
        models.from_pretrained(tmp_path / "notes.txt")


def test_config_without_weights_names_the_expected_files(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA))
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors\.index\.json"):
        models.from_pretrained(tmp_path)


def test_unsupported_model_type_lists_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=r"'t5'.*bert.*gpt2.*llama.*mistral.*qwen2"):
        models.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="unsupported rope_type 'yarn'"):
        models.from_config({**LLAMA, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})


def test_missing_tensor_is_named(saved_llama):
    state = load_file(saved_llama / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, saved_llama / "model.safetensors")
    with pytest.raises(KeyError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        models.from_pretrained(saved_llama)


def test_misshaped_tensor_names_key_and_both_shapes(saved_llama):
    state = load_file(saved_llama / "model.safetensors")
    state["model.layers.0.self_attn.k_proj.weight"] = np.zeros((64, 64), np.float32)
    save_file(state, saved_llama / "model.safetensors")
    with pytest.raises(ValueError, match=r"k_proj\.weight.*\(64, 64\).*expected \(32, 64\)"):
        models.from_pretrained(saved_llama)


def test_unused_checkpoint_tensors_warn(saved_llama, llama):
    state = load_file(saved_llama / "model.safetensors")
    state["model.extra_head.weight"] = np.zeros((3,), np.float32)
    save_file(state, saved_llama / "model.safetensors")
    with pytest.warns(UserWarning, match="extra_head"):
        loaded = models.from_pretrained(saved_llama)
    for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(llama.params)):
        np.testing.assert_array_equal(a, b)


def llama_cpp_permute(weight, heads):
    """What llama.cpp's converter does to Q/K rows (the reference we must invert)."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


GGUF_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def write_gguf(path, config, state, arch, permute):
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(256)
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_eos_token_id(7)
    for name, value in state.items():
        if name == "model.embed_tokens.weight":
            # Quantised like real files: exercises dequantisation and its reshaping.
            q8 = gguf.quants.quantize(value, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(
                "token_embd.weight",
                q8,
                raw_shape=q8.shape,
                raw_dtype=gguf.GGMLQuantizationType.Q8_0,
            )
            continue
        if name == "model.norm.weight":
            gguf_name = "output_norm.weight"
        elif name == "lm_head.weight":
            gguf_name = "output.weight"
        else:
            parts = name.split(".")
            module, leaf = ".".join(parts[3:-1]), parts[-1]
            gguf_name = f"blk.{parts[2]}.{GGUF_NAMES[module]}.{leaf}"
            if permute and module in ("self_attn.q_proj", "self_attn.k_proj"):
                heads = config[
                    "num_attention_heads" if "q_proj" in module else "num_key_value_heads"
                ]
                value = llama_cpp_permute(value, heads)
        writer.add_tensor(gguf_name, np.ascontiguousarray(value, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gguf_file_loads_with_rotary_rows_restored(arch, tmp_path):
    config = {**LLAMA, "model_type": arch}
    reference = models.from_config(config, seed=3)
    if arch == "qwen2":  # q/k/v biases are random too
        reference.params = jax.tree_util.tree_map_with_path(
            lambda p, x: x + 0.3 if p[-1].key == "bias" else x, reference.params
        )
    state = models.to_hf_state_dict(config, reference.params)
    path = tmp_path / "tiny.gguf"
    write_gguf(path, config, state, arch, permute=arch == "llama")

    loaded = models.from_pretrained(path)
    assert loaded.config["model_type"] == arch
    assert loaded.config["eos_token_id"] == 7
    assert not loaded.config["tie_word_embeddings"]
    embed = state["model.embed_tokens.weight"]
    q8 = gguf.quants.dequantize(
        gguf.quants.quantize(embed, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    )
    np.testing.assert_array_equal(loaded.params["model"]["embed_tokens"]["embedding"], q8)
    # Everything else is stored exactly, so after the embedding swap the logits agree.
    reference.params["model"]["embed_tokens"]["embedding"] = q8
    ids = np.random.RandomState(0).randint(0, 80, (2, 11))
    np.testing.assert_allclose(loaded(ids), reference(ids), atol=1e-5, rtol=0)


def test_tokenizer_comes_from_the_checkpoint_directory(saved_llama, tmp_path):
    from tokenizers import Tokenizer, pre_tokenizers, trainers
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(tok_models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=80, special_tokens=["<unk>"])
    tokenizer.train_from_iterator(["the capital of france is paris"] * 10, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer).save_pretrained(saved_llama)
    model = models.from_pretrained(saved_llama)
    ids = model.tokenizer()("the capital")["input_ids"]
    assert ids == tokenizer.encode("the capital").ids


def test_package_imports_without_torch_and_without_the_core():
    # torch / peft made unimportable: the models must still import, build and run.
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['peft'] = None\n"
        "from lora_jax import models\n"
        "m = models.from_config({'model_type': 'gpt2', 'n_embd': 16, 'n_layer': 1,"
        " 'n_head': 2, 'vocab_size': 20, 'n_positions': 8})\n"
        "print(m([[1, 2, 3]]).shape)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "(1, 3, 20)" in result.stdout
    # Models never reach into the rest of lora_jax (the core must not depend on them,
    # and they need nothing from it). The merged export is the one bridge: it merges
    # with the core's merge(), and imports only core modules (no training code).
    # Import statements are checked, so docstring examples may import lora_jax.models.
    # Loaders may build quantized frozen kernels (lora_jax.quantize: QLoRA bases, GGUF
    # blocks kept as they are); that package needs nothing but lora_jax.config.
    package = Path(models.__file__).parent
    for source in package.glob("*.py"):
        imported = set()
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.level <= 1, (source.name, node.module)
                if node.level == 0:
                    imported.add(node.module)
            elif isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
        lora_jax_imports = {m for m in imported if m.split(".")[0] == "lora_jax"}
        if source.name == "export.py":
            assert lora_jax_imports == {"lora_jax.config", "lora_jax.merge", "lora_jax.quantize", "lora_jax.tree"}
        else:
            assert not lora_jax_imports - {"lora_jax.models", "lora_jax.quantize"}, (source.name, lora_jax_imports)
