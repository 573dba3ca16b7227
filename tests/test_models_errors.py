"""Bad model input is one clear error: a ``ModelLoadError`` (a ``ValueError``) whose one
line names the file, key or tensor and what was expected; never a raw SafetensorError,
IndexError, struct.error, KeyError or JSONDecodeError, and never a stdin prompt."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import shutil
import struct

import gguf
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from lora_jax import models
from lora_jax.models.errors import MissingTensorError, ModelLoadError, UnsupportedModelError

LLAMA = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 40,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}


def one_clear_error(excinfo, error_type, *fragments):
    """The error is ``error_type`` (a ModelLoadError), one line, names every fragment,
    and hides the library exception it replaced."""
    err = excinfo.value
    assert type(err) is error_type, type(err)
    assert isinstance(err, ModelLoadError) and isinstance(err, ValueError)
    message = str(err)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__)
    return message


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = models.from_config(LLAMA, seed=0)
    return models.save_pretrained(tmp_path_factory.mktemp("llama") / "good", model.config,
                                  model.params)


@pytest.fixture
def model_dir(saved, tmp_path):
    return shutil.copytree(saved, tmp_path / "model")


def write_config(directory, config):
    (directory / "config.json").write_text(json.dumps(config))


# -- safetensors ------------------------------------------------------------------------


@pytest.mark.parametrize("keep", [0, 20, 0.5, -1], ids=["empty", "cut_header", "cut_half",
                                                        "last_byte_missing"])
def test_empty_or_truncated_safetensors_names_the_file(model_dir, keep):
    weights = model_dir / "model.safetensors"
    data = weights.read_bytes()
    cut = {0: 0, 20: 20, 0.5: len(data) // 2, -1: len(data) - 1}[keep]
    weights.write_bytes(data[:cut])
    with pytest.raises(ModelLoadError) as excinfo:
        models.from_pretrained(model_dir)
    one_clear_error(excinfo, ModelLoadError, str(weights), "not a complete safetensors file",
                    "expected a file as written by safetensors")


def test_missing_shard_of_an_index_names_the_index_and_the_shard(model_dir):
    state = load_file(model_dir / "model.safetensors")
    (model_dir / "model.safetensors").unlink()
    names = sorted(state)
    first, second = names[:5], names[5:]
    save_file({n: state[n] for n in first}, model_dir / "model-00001-of-00002.safetensors")
    weight_map = {n: "model-00001-of-00002.safetensors" for n in first}
    weight_map.update({n: "model-00002-of-00002.safetensors" for n in second})
    (model_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ModelLoadError) as excinfo:
        models.from_pretrained(model_dir)
    one_clear_error(excinfo, ModelLoadError, "model.safetensors.index.json",
                    f"model-00002-of-00002.safetensors ({len(second)} tensors)")


@pytest.mark.parametrize("index, expected", [
    ("{not json", "is not valid JSON (line 1, column 2"),
    ("[1, 2]", "holds a list; expected a JSON object"),
    ('{"metadata": {}}', "has no usable weight_map"),
    ('{"weight_map": {"w": "../elsewhere.safetensors"}}', "expected a file name in"),
])
def test_malformed_index_names_the_index(model_dir, index, expected):
    (model_dir / "model.safetensors.index.json").write_text(index)
    with pytest.raises(ModelLoadError) as excinfo:
        models.from_pretrained(model_dir)
    one_clear_error(excinfo, ModelLoadError, "model.safetensors.index.json", expected)


def test_shape_disagreeing_with_the_config_names_tensor_shard_and_both_shapes(model_dir):
    state = load_file(model_dir / "model.safetensors")
    state["model.layers.1.mlp.down_proj.weight"] = np.zeros((32, 40), np.float32)
    save_file(state, model_dir / "model.safetensors")
    with pytest.raises(ModelLoadError) as excinfo:
        models.from_pretrained(model_dir)
    one_clear_error(excinfo, ModelLoadError, "'model.layers.1.mlp.down_proj.weight' (in "
                    "model.safetensors) has shape (32, 40), expected (32, 48)")


def test_missing_tensor_is_a_key_error_and_a_value_error_naming_it(model_dir):
    state = load_file(model_dir / "model.safetensors")
    del state["model.norm.weight"]
    save_file(state, model_dir / "model.safetensors")
    with pytest.raises(KeyError) as excinfo:
        models.from_pretrained(model_dir)
    message = one_clear_error(excinfo, MissingTensorError, "no tensor 'model.norm.weight'")
    assert not message.startswith("'")  # prose, not KeyError's repr


def test_integer_tensor_where_weights_belong_names_it_and_its_dtype(model_dir):
    state = load_file(model_dir / "model.safetensors")
    state["model.norm.weight"] = np.ones(32, np.int32)
    save_file(state, model_dir / "model.safetensors")
    with pytest.raises(ModelLoadError) as excinfo:
        models.from_pretrained(model_dir)
    one_clear_error(excinfo, ModelLoadError, "'model.norm.weight'", "dtype int32",
                    "expected floating-point weights")


# -- config.json --------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("{oops", "is not valid JSON (line 1, column 2"),
    ('["llama"]', "holds a list; expected a JSON object"),
])
def test_config_json_that_is_not_an_object_names_the_file(model_dir, text, expected):
    (model_dir / "config.json").write_text(text)
    with pytest.raises(ModelLoadError) as excinfo:
        models.from_pretrained(model_dir)
    one_clear_error(excinfo, ModelLoadError, str(model_dir / "config.json"), expected)


@pytest.mark.parametrize("change, expected", [
    ({"hidden_size": None}, "has no 'hidden_size'; expected an integer >= 1"),
    ({"hidden_size": "32"}, "hidden_size='32'; expected an integer >= 1"),
    ({"num_hidden_layers": 2.5}, "num_hidden_layers=2.5; expected an integer >= 1"),
    ({"rms_norm_eps": "small"}, "rms_norm_eps='small'; expected a finite number"),
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings='false'; expected true or false"),
    ({"num_key_value_heads": 3}, "num_attention_heads=4, which is not a multiple of "
                                 "num_key_value_heads=3"),
    ({"hidden_size": 30}, "hidden_size=30, which num_attention_heads=4 does not divide"),
])
def test_bad_config_field_names_file_key_and_what_was_expected(model_dir, change, expected):
    config = {k: v for k, v in {**LLAMA, **change}.items() if v is not None}
    write_config(model_dir, config)
    with pytest.raises(ModelLoadError) as excinfo:
        models.from_pretrained(model_dir)
    one_clear_error(excinfo, ModelLoadError, f"{model_dir / 'config.json'}: the llama config",
                    expected)


def test_unsupported_model_type_names_the_file_and_lists_supported_ones(model_dir):
    write_config(model_dir, {**LLAMA, "model_type": "t5"})
    with pytest.raises(ValueError) as excinfo:
        models.from_pretrained(model_dir)
    # The list grows with each new family; these five are always in it.
    assert {"bert", "gpt2", "llama", "mistral", "qwen2"} <= set(models.SUPPORTED_MODEL_TYPES)
    one_clear_error(excinfo, UnsupportedModelError, "config.json: unsupported model_type 't5'",
                    f"supported: {list(models.SUPPORTED_MODEL_TYPES)}")
    write_config(model_dir, {k: v for k, v in LLAMA.items() if k != "model_type"})
    with pytest.raises(ModelLoadError) as excinfo:
        models.from_pretrained(model_dir)
    one_clear_error(excinfo, ModelLoadError, "the config has no model_type; expected one of")


@pytest.mark.parametrize("rope, error_type, expected", [
    ({"rope_type": "yarn", "factor": 4.0}, UnsupportedModelError,
     "unsupported rope_type 'yarn'; supported: ['default', 'linear', 'llama3']"),
    ({"rope_type": "llama3", "factor": 8.0}, ModelLoadError,
     "the llama rope config has no 'low_freq_factor'; expected a finite number"),
    ({"rope_type": "linear", "factor": "x"}, ModelLoadError, "factor='x'; expected a finite"),
    ({"rope_type": "default", "partial_rotary_factor": 0.5}, UnsupportedModelError,
     "partial_rotary_factor != 1 is not supported"),
])
def test_unsupported_or_incomplete_rope_names_what_is_supported(model_dir, rope, error_type,
                                                              expected):
    write_config(model_dir, {**LLAMA, "rope_scaling": rope})
    with pytest.raises(ModelLoadError) as excinfo:
        models.from_pretrained(model_dir)
    one_clear_error(excinfo, error_type, "config.json", expected)


def test_unsupported_activation_lists_the_supported_ones():
    with pytest.raises(ValueError) as excinfo:
        models.from_config({**LLAMA, "hidden_act": "swiglu_9000"})
    one_clear_error(excinfo, UnsupportedModelError, "unsupported activation 'swiglu_9000'",
                    "'silu'")


# -- model-supplied code ------------------------------------------------------------------


@pytest.fixture
def no_stdin(monkeypatch):
    """Any attempt to prompt the user fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("something asked on stdin")

    monkeypatch.setattr("builtins.input", refuse)


@pytest.mark.parametrize("file_name", ["config.json", "tokenizer_config.json"])
def test_auto_map_is_refused_before_anything_runs(model_dir, file_name, no_stdin):
    path = model_dir / file_name
    content = json.loads(path.read_text()) if path.exists() else {}
    content["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    path.write_text(json.dumps(content))
    (model_dir / "tokenization_evil.py").write_text("raise SystemExit('model code ran')\n")
    with pytest.raises(ModelLoadError) as excinfo:
        models.from_pretrained(model_dir)
    one_clear_error(excinfo, ModelLoadError, f"{path} has an auto_map (['AutoTokenizer'])",
                    "never runs code from model files")
    with pytest.raises(ModelLoadError) as excinfo:
        models.load_tokenizer(model_dir)
    one_clear_error(excinfo, ModelLoadError, f"{path} has an auto_map")


def test_tokenizers_are_loaded_with_trust_remote_code_false(model_dir, monkeypatch):
    import transformers

    calls = []
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        lambda *args, **kwargs: calls.append(kwargs))
    models.load_tokenizer(model_dir)
    gguf_dir = model_dir.parent / "gguf"
    gguf_dir.mkdir()
    write_tiny_gguf(gguf_dir / "tiny.gguf")
    models.load_tokenizer(gguf_dir / "tiny.gguf")
    assert [c["trust_remote_code"] for c in calls] == [False, False]
    assert calls[1]["gguf_file"] == "tiny.gguf"


# -- GGUF ---------------------------------------------------------------------------------


def write_tiny_gguf(path, *, skip=(), arch="llama"):
    """A small float32 llama GGUF from a random model (metadata keys in ``skip`` left out)."""
    cfg = {**LLAMA, "tie_word_embeddings": True}
    state = models.to_hf_state_dict(cfg, models.from_config(cfg, seed=1).params)
    writer = gguf.GGUFWriter(str(path), arch)
    fields = {
        "block_count": (writer.add_block_count, cfg["num_hidden_layers"]),
        "embedding_length": (writer.add_embedding_length, cfg["hidden_size"]),
        "feed_forward_length": (writer.add_feed_forward_length, cfg["intermediate_size"]),
        "head_count": (writer.add_head_count, cfg["num_attention_heads"]),
        "head_count_kv": (writer.add_head_count_kv, cfg["num_key_value_heads"]),
    }
    for key, (add, value) in fields.items():
        if key not in skip:
            add(value)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for name, value in state.items():
        if name == "model.embed_tokens.weight":
            gguf_name = "token_embd.weight"
        elif name == "model.norm.weight":
            gguf_name = "output_norm.weight"
        else:
            parts = name.split(".")
            gguf_name = f"blk.{parts[2]}.{names['.'.join(parts[3:-1])]}.{parts[-1]}"
        writer.add_tensor(gguf_name, np.ascontiguousarray(value, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_tiny_gguf_of_these_tests_loads(tmp_path):
    assert models.from_pretrained(write_tiny_gguf(tmp_path / "ok.gguf")).config["vocab_size"] == 40


@pytest.mark.parametrize("fraction", [0.999, 0.5, 0.02, 0.002])
def test_truncated_gguf_names_the_file(tmp_path, fraction):
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(ModelLoadError) as excinfo:
        models.from_pretrained(path)
    one_clear_error(excinfo, ModelLoadError, f"{path} is not a readable GGUF file",
                    "expected a complete GGUF v2/v3 file")


@pytest.mark.parametrize("header", [
    struct.pack("<4sIQQ", b"GGUF", 3, 2**40, 2**40) + bytes(64),  # absurd counts
    struct.pack("<4sIQQQ", b"GGUF", 3, 0, 1, 2**62) + b"abc",  # a key of 2**62 bytes
    struct.pack("<4sI", b"GGUF", 99) + bytes(32),  # unknown version
    b"GGUF",  # magic only
], ids=["counts", "key_length", "version", "magic_only"])
def test_crafted_gguf_header_names_the_file(tmp_path, header):
    path = tmp_path / "crafted.gguf"
    path.write_bytes(header)
    with pytest.raises(ModelLoadError) as excinfo:
        models.from_pretrained(path)
    one_clear_error(excinfo, ModelLoadError, f"{path} is not a readable GGUF file")


@pytest.mark.parametrize("data", [b"", b"PK\x03\x04 a zip file"], ids=["empty", "zip"])
def test_file_without_the_gguf_magic_says_what_it_starts_with(tmp_path, data):
    path = tmp_path / "model.gguf"
    path.write_bytes(data)
    with pytest.raises(ModelLoadError) as excinfo:
        models.from_pretrained(path)
    one_clear_error(excinfo, ModelLoadError, f"{path} is not a GGUF file: it starts with "
                    f"{data[:4]!r}, expected b'GGUF'")


def test_gguf_without_a_required_metadata_key_names_it(tmp_path):
    path = write_tiny_gguf(tmp_path / "tiny.gguf", skip=("head_count",))
    with pytest.raises(ModelLoadError) as excinfo:
        models.from_pretrained(path)
    one_clear_error(excinfo, ModelLoadError,
                    f"{path}: GGUF metadata has no 'llama.attention.head_count'")


def test_gguf_tensor_disagreeing_with_its_metadata_names_both_names_and_shapes(tmp_path):
    # The metadata says 2 KV heads; the k/v tensors hold 4.
    path = write_tiny_gguf(tmp_path / "tiny.gguf", skip=("head_count_kv",))
    with pytest.raises(ModelLoadError) as excinfo:
        models.from_pretrained(path)
    one_clear_error(excinfo, ModelLoadError, "'blk.0.attn_k.weight' (read as "
                    "'model.layers.0.self_attn.k_proj.weight') has shape (16, 32), "
                    "expected (32, 32)")


def test_gguf_of_an_unsupported_architecture_lists_the_supported_ones(tmp_path):
    path = write_tiny_gguf(tmp_path / "tiny.gguf", arch="falcon")
    with pytest.raises(NotImplementedError) as excinfo:
        models.from_pretrained(path)
    one_clear_error(excinfo, UnsupportedModelError, "unsupported GGUF architecture 'falcon'",
                    "supported: ['llama', 'qwen2']")
