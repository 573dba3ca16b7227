"""Bad adapter files and arguments get one clear error naming the file / key, before anything is written.

Each case is what a hostile or unlucky user hands ``save_peft`` / ``load_peft``: adapter
names that escape the directory, NaN weights, truncated or foreign files, malformed
``adapter_config.json``, pickles, tensors of the wrong dtype or rank. The error is a
single line that names the file (and the key) and says what was expected; no raw
SafetensorError / IndexError / TypeError / JSONDecodeError / KeyError reaches the user.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

import lora_jax
from lora_jax import LoraConfig
from lora_jax.peft import PeftFormatError, from_peft, load_peft, save_peft

PREFIX = "base_model.model."
Q0 = f"{PREFIX}model.layers.0.q_proj"
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


def tiny_params() -> dict:
    rng = np.random.default_rng(0)
    layer = lambda: {"q_proj": {"kernel": jnp.asarray(rng.normal(size=(4, 4)), jnp.float32),  # noqa: E731
                                "bias": jnp.zeros(4)}}
    return {"model": {"layers": [layer(), layer()]},
            "classifier": {"kernel": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32), "bias": jnp.zeros(3)}}


def tiny_adapter(config: LoraConfig, params: dict) -> dict:
    rng = np.random.default_rng(1)
    return {name: {"lora_A": jnp.asarray(rng.normal(size=t.a_shape), jnp.float32),
                   "lora_B": jnp.asarray(rng.normal(size=t.b_shape), jnp.float32)}
            for name, t in lora_jax.find_targets(config, params).items()}


CONFIG_Q = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], modules_to_save=["classifier"])


@pytest.fixture()
def params() -> dict:
    return tiny_params()


@pytest.fixture()
def adapter_dir(tmp_path, params) -> Path:
    """A valid adapter directory to corrupt."""
    out = tmp_path / "adapter"
    save_peft(out, tiny_adapter(CONFIG_Q, params), CONFIG_Q, params)
    return out


def one_line_error(exc_type, call, *fragments):
    """Run ``call``; it must raise ``exc_type`` with a one-line message containing every fragment."""
    with pytest.raises(exc_type) as info:
        call()
    message = str(info.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert str(fragment) in message, (fragment, message)
    return message


def tree_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def read_tensors(folder: Path) -> dict:
    return safetensors.numpy.load_file(str(folder / WEIGHTS))


def write_tensors(folder: Path, tensors: dict) -> None:
    safetensors.numpy.save_file(tensors, str(folder / WEIGHTS), metadata={"format": "pt"})


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / CONFIG).read_text())
    config.update(changes)
    (folder / CONFIG).write_text(json.dumps(config))


# -- adapter names: a plain folder name or nothing is written / read ------------------------------

BAD_NAMES = ["../x", "../../etc", "a/b", "a\\b", "..", ".", "", "/tmp/abs", "x\0y", " x", "C:x", 5]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_save_refuses_adapter_name_that_is_not_a_folder_name_before_writing(tmp_path, params, name):
    root = tmp_path / "root"
    adapter = tiny_adapter(CONFIG_Q, params)
    one_line_error(ValueError, lambda: save_peft(root, adapter, CONFIG_Q, params, adapter_name=name),
                   "adapter_name", "plain folder name")
    assert list(tmp_path.iterdir()) == []  # neither root nor anything beside it was created


@pytest.mark.parametrize("name", BAD_NAMES)
def test_load_refuses_adapter_name_that_is_not_a_folder_name(adapter_dir, params, name):
    one_line_error(ValueError, lambda: load_peft(adapter_dir, params, adapter_name=name),
                   "adapter_name", "plain folder name")


def test_save_into_existing_file_is_refused_and_file_kept(tmp_path, params):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    adapter = tiny_adapter(CONFIG_Q, params)
    for name in ("default", "sub"):
        one_line_error(FileExistsError, lambda n=name: save_peft(target, adapter, CONFIG_Q, params, adapter_name=n),
                       str(target), "not a directory")
    assert target.read_text() == "mine"


def test_unknown_named_adapter_lists_the_ones_there(tmp_path, params):
    adapter = tiny_adapter(CONFIG_Q, params)
    save_peft(tmp_path, adapter, CONFIG_Q, params, adapter_name="one")
    one_line_error(FileNotFoundError, lambda: load_peft(tmp_path, params, adapter_name="two"), "'two'", "['one']")


# -- non-finite weights ------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("key", [f"{Q0}.lora_B.weight", f"{Q0}.lora_A.weight", f"{PREFIX}classifier.weight"])
def test_load_refuses_non_finite_tensor_naming_key_and_count(adapter_dir, params, key, bad):
    tensors = read_tensors(adapter_dir)
    value = tensors[key].copy()
    value.flat[[0, 2]] = bad
    write_tensors(adapter_dir, dict(tensors, **{key: value}))
    one_line_error(PeftFormatError, lambda: load_peft(adapter_dir, params),
                   adapter_dir / WEIGHTS, repr(key), f"2 non-finite value(s) (NaN or inf) of {value.size}")


def test_load_refuses_non_finite_bfloat16_tensor(adapter_dir, params):
    tensors = read_tensors(adapter_dir)
    value = tensors[f"{Q0}.lora_A.weight"].astype(jnp.bfloat16)
    value[1, 1] = np.nan
    write_tensors(adapter_dir, dict(tensors, **{f"{Q0}.lora_A.weight": value}))
    one_line_error(PeftFormatError, lambda: load_peft(adapter_dir, params), "lora_A.weight", "1 non-finite")


def test_save_refuses_non_finite_adapter_naming_module_before_writing(tmp_path, params):
    adapter = tiny_adapter(CONFIG_Q, params)
    name = "model.layers.1.q_proj"
    adapter[name]["lora_A"] = adapter[name]["lora_A"].at[0, 0].set(jnp.nan).at[1, 1].set(jnp.inf)
    one_line_error(ValueError, lambda: save_peft(tmp_path / "out", adapter, CONFIG_Q, params),
                   f"adapter['{name}']['lora_A']", "2 non-finite")
    assert not (tmp_path / "out").exists()


def test_save_refuses_non_finite_modules_to_save_leaf(tmp_path, params):
    adapter = tiny_adapter(CONFIG_Q, params)
    params["classifier"]["kernel"] = params["classifier"]["kernel"].at[0, 0].set(jnp.inf)
    one_line_error(ValueError, lambda: save_peft(tmp_path / "out", adapter, CONFIG_Q, params),
                   "params leaf classifier.kernel", "1 non-finite")
    assert not (tmp_path / "out").exists()


def test_save_refuses_values_beyond_the_requested_dtype(tmp_path, params):
    adapter = tiny_adapter(CONFIG_Q, params)
    name = "model.layers.0.q_proj"
    adapter[name]["lora_B"] = adapter[name]["lora_B"] * 1e6
    one_line_error(ValueError, lambda: save_peft(tmp_path / "out", adapter, CONFIG_Q, params, dtype=jnp.float16),
                   f"adapter['{name}']['lora_B']", "float16", "dtype=jnp.float32")
    assert not (tmp_path / "out").exists()


def test_failed_overwrite_keeps_the_previous_adapter(adapter_dir, params):
    before = tree_of(adapter_dir)
    adapter = tiny_adapter(CONFIG_Q, params)
    adapter["model.layers.0.q_proj"]["lora_A"] = adapter["model.layers.0.q_proj"]["lora_A"] * jnp.nan
    with pytest.raises(ValueError, match="non-finite"):
        save_peft(adapter_dir, adapter, CONFIG_Q, params, overwrite=True)
    assert tree_of(adapter_dir) == before


# -- unreadable safetensors -----------------------------------------------------------------------

def truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


@pytest.mark.parametrize("corrupt, reason", [
    (truncated, "safetensors"),
    (lambda data: data[:-1], "safetensors"),
    (lambda data: b"", "is empty"),
    (lambda data: b"\x01\x02\x03", "only 3 bytes"),
    (lambda data: b"this is not a safetensors file, just some text", "safetensors"),
    (lambda data: (10**12).to_bytes(8, "little") + b"{}", "safetensors"),
    (lambda data: (20).to_bytes(8, "little") + b'{"x": [1, 2, 3]}    ', "safetensors"),
    (lambda data: b"PK\x03\x04" + data[4:], "safetensors"),
])
def test_unreadable_safetensors_named_with_what_was_expected(adapter_dir, params, corrupt, reason):
    file = adapter_dir / WEIGHTS
    file.write_bytes(corrupt(file.read_bytes()))
    message = one_line_error(PeftFormatError, lambda: load_peft(adapter_dir, params), file, reason)
    assert "expected a safetensors file" in message
    assert "SafetensorError" not in message


def test_safetensors_path_that_is_a_directory(adapter_dir, params):
    (adapter_dir / WEIGHTS).unlink()
    (adapter_dir / WEIGHTS).mkdir()
    one_line_error(PeftFormatError, lambda: load_peft(adapter_dir, params), adapter_dir / WEIGHTS, "not a regular file")


def test_safetensors_without_lora_tensors(adapter_dir, params):
    write_tensors(adapter_dir, {k: v for k, v in read_tensors(adapter_dir).items() if "lora_" not in k})
    one_line_error(PeftFormatError, lambda: load_peft(adapter_dir, params), adapter_dir / WEIGHTS, "no LoRA tensors")


# -- malformed adapter_config.json -----------------------------------------------------------------

@pytest.mark.parametrize("text, fragments", [
    ('{"peft_type": "LORA", "r": 8,}', ["not valid JSON", "line 1, column 30"]),
    ('{"peft_type": "LORA",\n "r": 8\n "lora_alpha": 16}', ["not valid JSON", "line 3, column 2"]),
    ("", ["not valid JSON", "line 1, column 1"]),
    ("[1, 2]", ["expected a JSON object", "found [1, 2] (a list)"]),
    ('"LORA"', ["expected a JSON object", '"LORA" (a string)']),
    ("8", ["expected a JSON object", "8 (an integer)"]),
    ("null", ["expected a JSON object", "found null"]),
])
def test_config_that_is_not_a_json_object(adapter_dir, params, text, fragments):
    (adapter_dir / CONFIG).write_text(text)
    one_line_error(PeftFormatError, lambda: load_peft(adapter_dir, params), adapter_dir / CONFIG, *fragments)


def test_config_that_is_not_text(adapter_dir, params):
    (adapter_dir / CONFIG).write_bytes(b"\xff\xfe\x00binary")
    one_line_error(PeftFormatError, lambda: load_peft(adapter_dir, params), adapter_dir / CONFIG, "not UTF-8")


def test_config_path_that_is_a_directory(adapter_dir, params):
    (adapter_dir / CONFIG).unlink()
    (adapter_dir / CONFIG).mkdir()
    one_line_error(PeftFormatError, lambda: load_peft(adapter_dir, params), adapter_dir / CONFIG, "cannot be read")


@pytest.mark.parametrize("change, fragments", [
    ({"r": "eight"}, ['"r" is "eight" (a string)', "positive integer"]),
    ({"r": 0}, ['"r" is 0', "positive integer"]),
    ({"r": -2}, ['"r" is -2', "positive integer"]),
    ({"r": 2.5}, ['"r" is 2.5 (a number)', "positive integer"]),
    ({"r": True}, ['"r" is true (a boolean)', "positive integer"]),
    ({"r": None}, ['"r" is null', "positive integer"]),
    ({"lora_alpha": "16"}, ['"lora_alpha" is "16" (a string)', "finite number"]),
    ({"lora_alpha": float("nan")}, ['"lora_alpha" is NaN', "finite number"]),
    ({"lora_alpha": [16]}, ['"lora_alpha" is [16] (a list)', "finite number"]),
    ({"target_modules": 5}, ['"target_modules" is 5', "list of module names"]),
    ({"target_modules": "q_proj("}, ['"target_modules"', "valid regex"]),
    ({"target_modules": ["q_proj", 3]}, ['"target_modules"', "list of module names"]),
    ({"rank_pattern": []}, ['"rank_pattern" is [] (a list)', "an object mapping module patterns to ranks"]),
    ({"rank_pattern": {"q_proj": "2"}}, ['rank_pattern["q_proj"] is "2" (a string)', "positive integer"]),
    ({"rank_pattern": {"[q": 2}}, ['rank_pattern key "[q"', "valid regex"]),
    ({"alpha_pattern": {"q_proj": None}}, ['alpha_pattern["q_proj"] is null', "finite number"]),
    ({"alpha_pattern": "q_proj=4"}, ['"alpha_pattern" is "q_proj=4"', "an object"]),
    ({"use_rslora": "false"}, ['"use_rslora" is "false" (a string)', "true or false"]),
    ({"fan_in_fan_out": 1}, ['"fan_in_fan_out" is 1', "true or false"]),
    ({"use_dora": "no"}, ['"use_dora" is "no"', "true or false"]),
    ({"modules_to_save": "classifier"}, ['"modules_to_save" is "classifier" (a string)', "list of module names"]),
    ({"layers_pattern": 5}, ['"layers_pattern" is 5', "layer container name"]),
    ({"layers_to_transform": [0, "1"]}, ['"layers_to_transform"', "layer indices"]),
    ({"lora_dropout": 1.5}, ['"lora_dropout" is 1.5', "[0, 1)"]),
    ({"lora_dropout": "0.1"}, ['"lora_dropout" is "0.1"', "[0, 1)"]),
    ({"bias": None}, ['"bias" is null', '"none" or "all" or "lora_only"']),
    ({"bias": "some"}, ['"bias" is "some"', '"lora_only"']),
    ({"init_lora_weights": 1}, ['"init_lora_weights" is 1', "true, false"]),
    ({"task_type": 3}, ['"task_type" is 3', "CAUSAL_LM"]),
    ({"peft_type": 5}, ["is a 5 (an integer) adapter", "only peft_type LORA"]),
    ({"peft_type": ["LORA"]}, ['["LORA"] (a list) adapter', "only peft_type LORA"]),
])
def test_config_value_of_wrong_type_names_file_key_and_expectation(adapter_dir, params, change, fragments):
    edit_config(adapter_dir, **change)
    one_line_error(PeftFormatError, lambda: load_peft(adapter_dir, params), adapter_dir / CONFIG, *fragments)


def test_config_without_peft_type(adapter_dir, params):
    config = json.loads((adapter_dir / CONFIG).read_text())
    del config["peft_type"]
    (adapter_dir / CONFIG).write_text(json.dumps(config))
    one_line_error(PeftFormatError, lambda: load_peft(adapter_dir, params), adapter_dir / CONFIG, "no peft_type")


def test_missing_optional_keys_take_peft_defaults_and_unknown_keys_are_ignored(adapter_dir, params):
    # PEFT fills r=8, lora_alpha=8 for absent keys; the file's tensors have rank 2, so r is
    # needed here, but everything else may be missing, and unknown keys of any type are ignored.
    (adapter_dir / CONFIG).write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "modules_to_save": ["classifier"],
         "future_option": [1, {"x": None}], "another": "eight"}))
    adapter, config = load_peft(adapter_dir, params)
    assert set(adapter) == {"model.layers.0.q_proj", "model.layers.1.q_proj"}
    assert config.scaling("model.layers.0.q_proj") == 2.0


def test_in_memory_config_and_tensors_are_checked_too(params):
    tensors = {f"{Q0}.lora_A.weight": np.ones((2, 4), np.float32), f"{Q0}.lora_B.weight": np.ones((4, 2), np.float32)}
    one_line_error(PeftFormatError, lambda: from_peft(tensors, ["LORA"], params), "adapter", "JSON object")
    one_line_error(PeftFormatError, lambda: from_peft(tensors, {"peft_type": "LORA", "r": "2"}, params), '"r" is "2"')
    one_line_error(PeftFormatError, lambda: from_peft([1, 2], {"peft_type": "LORA", "r": 2}, params), "mapping")
    one_line_error(PeftFormatError, lambda: from_peft({3: np.ones(2)}, {"peft_type": "LORA", "r": 2}, params),
                   "tensor key 3")


# -- tensors of the wrong dtype or rank -----------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.bool_, np.uint8])
def test_lora_factor_with_non_float_dtype_refused(adapter_dir, params, dtype):
    tensors = read_tensors(adapter_dir)
    key = f"{Q0}.lora_A.weight"
    write_tensors(adapter_dir, dict(tensors, **{key: tensors[key].astype(dtype)}))
    one_line_error(PeftFormatError, lambda: load_peft(adapter_dir, params),
                   adapter_dir / WEIGHTS, repr(key), f"dtype {np.dtype(dtype)}", "floating-point")


def test_full_tensor_with_non_float_dtype_for_float_leaf_refused(adapter_dir, params):
    tensors = read_tensors(adapter_dir)
    key = f"{PREFIX}classifier.weight"
    write_tensors(adapter_dir, dict(tensors, **{key: np.ones(tensors[key].shape, np.int64)}))
    one_line_error(PeftFormatError, lambda: load_peft(adapter_dir, params),
                   repr(key), "dtype int64", "classifier.kernel (float32)")


@pytest.mark.parametrize("part, shape", [("lora_A", (8,)), ("lora_A", (2, 4, 1)), ("lora_B", ()), ("lora_B", (4, 2, 2))])
def test_lora_factor_of_wrong_rank_refused(adapter_dir, params, part, shape):
    tensors = read_tensors(adapter_dir)
    key = f"{Q0}.{part}.weight"
    write_tensors(adapter_dir, dict(tensors, **{key: np.ones(shape, np.float32)}))
    one_line_error(PeftFormatError, lambda: load_peft(adapter_dir, params),
                   repr(key), f"shape {shape}", "expected (r, in_features) and (out_features, r)")


def test_key_that_names_no_module(adapter_dir, params):
    tensors = read_tensors(adapter_dir)
    write_tensors(adapter_dir, dict(tensors, **{f"{PREFIX}weight": np.ones(2, np.float32)}))
    one_line_error(PeftFormatError, lambda: load_peft(adapter_dir, params), f"'{PREFIX}weight'", "names no module")


# -- adapter_model.bin: never unpickled -------------------------------------------------------------

class NotATensor:
    """An arbitrary object: pickling it means torch.load(weights_only=True) must refuse."""


def to_bin(adapter_dir: Path, payload) -> Path:
    torch = pytest.importorskip("torch")
    (adapter_dir / WEIGHTS).unlink(missing_ok=True)
    torch.save(payload, str(adapter_dir / "adapter_model.bin"))
    return adapter_dir / "adapter_model.bin"


def torch_state(adapter_dir: Path) -> dict:
    torch = pytest.importorskip("torch")
    return {k: torch.from_numpy(v) for k, v in read_tensors(adapter_dir).items()}


def test_bin_with_blocked_pickle_gets_our_one_line_message(adapter_dir, params):
    state = torch_state(adapter_dir)
    file = to_bin(adapter_dir, dict(state, extra=NotATensor()))
    message = one_line_error(PeftFormatError, lambda: load_peft(adapter_dir, params),
                             file, "never unpickles arbitrary objects", "safe_serialization=True")
    assert "weights_only=False" not in message


def test_bin_that_is_not_a_state_dict(adapter_dir, params):
    torch = pytest.importorskip("torch")
    file = to_bin(adapter_dir, [torch.ones(2)])
    one_line_error(PeftFormatError, lambda: load_peft(adapter_dir, params), file, "holds a list", "state dict")
    file = to_bin(adapter_dir, {"x": 3})
    one_line_error(PeftFormatError, lambda: load_peft(adapter_dir, params), file, "entry 'x' is a int")


@pytest.mark.parametrize("corrupt", [truncated, lambda data: b"", lambda data: b"garbage" * 10])
def test_unreadable_bin_named(adapter_dir, params, corrupt):
    file = to_bin(adapter_dir, torch_state(adapter_dir))
    file.write_bytes(corrupt(file.read_bytes()))
    one_line_error(PeftFormatError, lambda: load_peft(adapter_dir, params), file, "cannot be read by torch.load")


def test_bin_without_torch_names_the_file(adapter_dir, params, monkeypatch):
    file = to_bin(adapter_dir, torch_state(adapter_dir))
    monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
    one_line_error(ImportError, lambda: load_peft(adapter_dir, params), file, "never unpickles", "torch is not installed")


def test_bin_bfloat16_state_dict_loads(adapter_dir, params):
    torch = pytest.importorskip("torch")
    expected = read_tensors(adapter_dir)
    to_bin(adapter_dir, {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in expected.items()})
    adapter, _ = load_peft(adapter_dir, params)
    a = np.asarray(adapter["model.layers.0.q_proj"]["lora_A"])
    np.testing.assert_allclose(a, expected[f"{Q0}.lora_A.weight"].T, rtol=1e-2)


def test_peft_format_error_is_a_value_error_so_existing_handlers_catch_it():
    assert issubclass(PeftFormatError, ValueError)


# -- siblings found by trying more bad inputs -------------------------------------------------------

def test_two_keys_for_one_factor_refused(adapter_dir, params):
    tensors = read_tensors(adapter_dir)
    key = f"{Q0}.lora_A.weight"
    write_tensors(adapter_dir, dict(tensors, **{f"{Q0}.lora_A.default.weight": tensors[key]}))
    one_line_error(PeftFormatError, lambda: load_peft(adapter_dir, params),
                   repr(key), "lora_A.default.weight", "one key per tensor")
    write_tensors(adapter_dir, dict(tensors, **{f"{PREFIX}classifier.base_layer.weight": tensors[f"{PREFIX}classifier.weight"]}))
    one_line_error(PeftFormatError, lambda: load_peft(adapter_dir, params), "classifier.base_layer.weight",
                   "one key per tensor")


def test_config_nested_too_deeply(adapter_dir, params):
    (adapter_dir / CONFIG).write_text("[" * 100_000)
    one_line_error(PeftFormatError, lambda: load_peft(adapter_dir, params), adapter_dir / CONFIG, "nested too deeply")


def crafted_safetensors(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + data


def test_safetensors_dtype_numpy_cannot_hold(adapter_dir, params):
    file = adapter_dir / WEIGHTS
    file.write_bytes(crafted_safetensors(
        {f"{Q0}.lora_A.weight": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}}, b"ab"))
    one_line_error(PeftFormatError, lambda: load_peft(adapter_dir, params), file, "F8_E4M3", "lora_A.weight")


def test_safetensors_with_inconsistent_offsets(adapter_dir, params):
    file = adapter_dir / WEIGHTS
    file.write_bytes(crafted_safetensors(
        {f"{Q0}.lora_A.weight": {"dtype": "F32", "shape": [2, 4], "data_offsets": [0, 8]}}, b"12345678"))
    one_line_error(PeftFormatError, lambda: load_peft(adapter_dir, params), file, "invalid shape, data type, or offset")


def test_complex_tensor_refused(adapter_dir, params):
    tensors = read_tensors(adapter_dir)
    key = f"{PREFIX}classifier.bias"
    write_tensors(adapter_dir, dict(tensors, **{key: tensors[key].astype(np.complex64)}))
    one_line_error(PeftFormatError, lambda: load_peft(adapter_dir, params), repr(key), "complex64", "real numeric")


def test_interrupted_save_keeps_previous_files_and_leaves_no_temporary(adapter_dir, params, monkeypatch):
    before = tree_of(adapter_dir)

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.numpy, "save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        save_peft(adapter_dir, tiny_adapter(CONFIG_Q, params), CONFIG_Q, params, overwrite=True)
    assert tree_of(adapter_dir) == before


def test_config_with_utf8_bom_still_reads(adapter_dir, params):
    text = (adapter_dir / CONFIG).read_text()
    (adapter_dir / CONFIG).write_bytes(b"\xef\xbb\xbf" + text.encode())
    adapter, _ = load_peft(adapter_dir, params)
    assert set(adapter) == {"model.layers.0.q_proj", "model.layers.1.q_proj"}
