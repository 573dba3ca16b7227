"""Read llama.cpp GGUF files as a Hugging Face config plus Hugging Face-named tensors.

Only the tensor names and the config are translated here; turning them into a params
tree is the same code path as for safetensors (see ``loading.py``). Quantised tensors
(Q4_1, Q8_0, ...) are dequantised to float32 with ``gguf.quants.dequantize`` when first
asked for, so a big file is never fully expanded in memory at once; or, for a loader
asked to keep them (``from_pretrained(path, quantize="gguf")``), a Q8_0 / Q4_0 / Q4_1
linear weight is handed over as its blocks (:meth:`GGUFTensors.get_blocks`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ModelLoadError, UnsupportedModelError

_REQUIRED = object()

# GGUF architecture name -> Hugging Face model_type. Mistral checkpoints convert to "llama".
SUPPORTED_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}

_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_PATTERN = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def hf_tensor_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor, or None for tensors we do not map.

    Example:
        >>> from lora_jax.models.gguf import hf_tensor_name
        >>> hf_tensor_name("blk.3.attn_q.weight")
        'model.layers.3.self_attn.q_proj.weight'
    """
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    match = _LAYER_PATTERN.fullmatch(gguf_name)
    if match is None or match.group(2) not in _LAYER_TENSORS:
        return None
    layer, part, leaf = match.groups()
    return f"model.layers.{layer}.{_LAYER_TENSORS[part]}.{leaf}"


def unpermute_rotary_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's reordering of Q/K projection rows (or biases).

    llama.cpp's rotary kernel rotates adjacent pairs (2j, 2j+1) of each head, Hugging
    Face rotates (j, j + head_dim/2); its converter therefore interleaves the two halves
    of each head's rows. This puts them back: per head, (half, 2) -> (2, half).

    Example:
        >>> import numpy as np
        >>> from lora_jax.models.gguf import unpermute_rotary_rows
        >>> unpermute_rotary_rows(np.array([0, 2, 1, 3]), num_heads=1)
        array([0, 1, 2, 3])
    """
    half = weight.shape[0] // num_heads // 2
    grouped = weight.reshape(num_heads, half, 2, *weight.shape[1:])
    return grouped.swapaxes(1, 2).reshape(weight.shape)


class GGUFTensors:
    """Hugging Face-named, lazily dequantised float32 tensors of a GGUF file.

    ``keys()`` lists the Hugging Face names; ``get(name)`` returns a numpy array in torch
    layout ((out, in) for linear weights).

    Example:
        >>> import pathlib, tempfile
        >>> import gguf, numpy as np
        >>> from lora_jax.models.gguf import GGUFTensors
        >>> path = str(pathlib.Path(tempfile.mkdtemp()) / "tiny.gguf")
        >>> writer = gguf.GGUFWriter(path, "llama")
        >>> writer.add_tensor("output_norm.weight", np.arange(4, dtype=np.float32))
        >>> writer.write_header_to_file(); writer.write_kv_data_to_file()
        >>> writer.write_tensors_to_file(); writer.close()
        >>> tensors = GGUFTensors(gguf.GGUFReader(path), {}, rotary_permuted=False)
        >>> tensors.keys(), tensors.get("model.norm.weight")
        (['model.norm.weight'], array([0., 1., 2., 3.], dtype=float32))
        >>> tensors.describe("model.norm.weight")
        "'output_norm.weight' (read as 'model.norm.weight')"
    """

    def __init__(self, reader: Any, config: dict[str, Any], rotary_permuted: bool) -> None:
        self._reader_tensors = {}
        for tensor in reader.tensors:
            name = hf_tensor_name(tensor.name)
            if name is not None:
                self._reader_tensors[name] = tensor
        self._config = config
        self._rotary_permuted = rotary_permuted

    def keys(self) -> list[str]:
        """The Hugging Face names of the tensors this file maps (see the class example)."""
        return list(self._reader_tensors)

    def describe(self, name: str) -> str:
        """The GGUF tensor behind ``name``, for error messages (see the class example)."""
        return f"{self._reader_tensors[name].name!r} (read as {name!r})"

    def get(self, name: str) -> np.ndarray:
        """The tensor ``name``, dequantised to float32 in torch layout (see the class example)."""
        from gguf.quants import dequantize

        tensor = self._reader_tensors[name]
        # GGUF lists dimensions fastest-first; torch layout is the reverse.
        shape = tuple(reversed(tensor.shape.tolist()))
        try:
            array = dequantize(tensor.data, tensor.tensor_type)
            array = np.asarray(array, dtype=np.float32).reshape(shape)
            if self._rotary_permuted and (".q_proj." in name or ".k_proj." in name):
                heads_key = "num_attention_heads" if ".q_proj." in name else "num_key_value_heads"
                array = unpermute_rotary_rows(array, self._config[heads_key])
        except (ValueError, NotImplementedError, TypeError, KeyError) as err:
            raise ModelLoadError(
                f"GGUF tensor {tensor.name!r} ({tensor.tensor_type.name}, shape {shape}) "
                f"cannot be read as {name!r}: {type(err).__name__}: {err}"
            ) from None
        return array


    # GGUF block types a linear kernel can keep as its quantized frozen base (lora_jax.quantize).
    KEPT_TYPES = ("Q8_0", "Q4_0", "Q4_1")

    def get_blocks(self, name: str, dtype: Any = np.float32) -> Any:
        """Tensor ``name`` as its GGUF blocks, a quantized Flax kernel ``(in, out)``; None
        unless it is a 2-D Q8_0 / Q4_0 / Q4_1 tensor (see :data:`KEPT_TYPES`).

        The blocks are the file's bytes; Q/K rows are reordered exactly as :meth:`get`
        reorders the dequantized rows, so ``get_blocks(name).dequantize()`` equals
        ``get(name).T`` bit for bit.

        Example:
            >>> import pathlib, tempfile
            >>> import gguf, numpy as np
            >>> from lora_jax.models.gguf import GGUFTensors
            >>> path = str(pathlib.Path(tempfile.mkdtemp()) / "tiny.gguf")
            >>> writer = gguf.GGUFWriter(path, "llama")
            >>> weight = np.linspace(-1, 1, 4 * 64, dtype=np.float32).reshape(4, 64)   # (out, in)
            >>> blocks = gguf.quants.quantize(weight, gguf.GGMLQuantizationType.Q8_0)
            >>> writer.add_tensor("blk.0.ffn_up.weight", blocks, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            >>> writer.write_header_to_file(); writer.write_kv_data_to_file()
            >>> writer.write_tensors_to_file(); writer.close()
            >>> tensors = GGUFTensors(gguf.GGUFReader(path), {}, rotary_permuted=False)
            >>> name = "model.layers.0.mlp.up_proj.weight"
            >>> kernel = tensors.get_blocks(name)
            >>> kernel
            Q8_0Array(shape=(64, 4), dtype=float32, nbytes=272)
            >>> bool((np.asarray(kernel.dequantize()) == tensors.get(name).T).all())
            True
        """
        from lora_jax.quantize import from_gguf_tensor

        tensor = self._reader_tensors[name]
        if tensor.tensor_type.name not in self.KEPT_TYPES or len(tensor.shape) != 2:
            return None
        rows = None
        if self._rotary_permuted and (".q_proj." in name or ".k_proj." in name):
            heads_key = "num_attention_heads" if ".q_proj." in name else "num_key_value_heads"
            rows = unpermute_rotary_rows(np.arange(int(tensor.shape[1])), self._config[heads_key])
        try:
            return from_gguf_tensor(tensor, rows=rows, dtype=dtype)
        except (ValueError, KeyError) as err:
            raise ModelLoadError(
                f"GGUF tensor {tensor.name!r} ({tensor.tensor_type.name}, GGUF shape "
                f"{tuple(tensor.shape.tolist())}) cannot be kept quantized as {name!r}: {err}"
            ) from None


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def _number(reader: Any, path: Path, key: str, kind: type, default: Any = _REQUIRED) -> Any:
    """A numeric metadata field as ``kind``; missing (without a default) or not a
    number is one clear error naming the file and the key."""
    value = _field(reader, key)
    if value is None:
        if default is _REQUIRED:
            raise ModelLoadError(f"{path}: GGUF metadata has no {key!r}; expected a number")
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ModelLoadError(f"{path}: GGUF metadata {key!r} is {value!r}; expected a number")
    return kind(value)


def _open(path: Path) -> Any:
    """A ``gguf.GGUFReader``, or one clear error for a file that is not a readable GGUF."""
    import gguf

    with open(path, "rb") as file:
        magic = file.read(4)
    if magic != b"GGUF":
        raise ModelLoadError(
            f"{path} is not a GGUF file: it starts with {magic!r}, expected b'GGUF'"
        )
    try:
        return gguf.GGUFReader(str(path))
    # The reader indexes a memory map with the header's counts and offsets; a crafted
    # or truncated header fails in any of these ways.
    except (ValueError, IndexError, KeyError, TypeError, OverflowError, OSError) as err:
        raise ModelLoadError(
            f"{path} is not a readable GGUF file ({type(err).__name__}: {err}); expected a "
            "complete GGUF v2/v3 file as llama.cpp writes it (an interrupted download "
            "leaves it truncated)"
        ) from None


def read_gguf(path: str | Path) -> tuple[dict[str, Any], GGUFTensors]:
    """The Hugging Face ``config.json`` dict and the tensors of a GGUF file.

    Example:
        >>> config, tensors = read_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")  # doctest: +SKIP
        >>> config["model_type"], tensors.get("model.norm.weight").shape  # doctest: +SKIP
        ('llama', (576,))
        >>> import pathlib, tempfile
        >>> from lora_jax.models.gguf import read_gguf
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "cut.gguf"
        >>> _ = path.write_bytes(b"GGUF" + bytes([3, 0, 0, 0, 5]))  # a header cut short
        >>> read_gguf(path)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        lora_jax.models.errors.ModelLoadError: .../cut.gguf is not a readable GGUF file ...
    """
    path = Path(path)
    reader = _open(path)
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"{path}: unsupported GGUF architecture {arch!r}; supported: "
            f"{sorted(SUPPORTED_ARCHITECTURES)}"
        )
    tensor_names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in tensor_names:
        raise UnsupportedModelError(
            f"{path}: per-dimension RoPE frequency factors (rope_freqs.weight, Llama 3.1 "
            "style) are not supported from GGUF; load the Hugging Face safetensors instead"
        )
    heads = _number(reader, path, f"{arch}.attention.head_count", int)
    hidden = _number(reader, path, f"{arch}.embedding_length", int)
    vocab = _number(reader, path, f"{arch}.vocab_size", int, None)
    if vocab is None:
        tokens = _field(reader, "tokenizer.ggml.tokens")
        embedding = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
        if tokens is not None:
            vocab = len(tokens)
        elif embedding is not None:
            vocab = int(embedding.shape[1])
        else:
            raise ModelLoadError(
                f"{path}: no vocabulary size: expected {arch}.vocab_size, "
                "tokenizer.ggml.tokens or a token_embd.weight tensor"
            )
    config: dict[str, Any] = {
        "model_type": SUPPORTED_ARCHITECTURES[arch],
        "architectures": [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[arch]],
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": _number(reader, path, f"{arch}.feed_forward_length", int),
        "num_hidden_layers": _number(reader, path, f"{arch}.block_count", int),
        "num_attention_heads": heads,
        "num_key_value_heads": _number(reader, path, f"{arch}.attention.head_count_kv", int,
                                       heads),
        "head_dim": _number(reader, path, f"{arch}.attention.key_length", int,
                            hidden // heads if heads else None),
        "max_position_embeddings": _number(reader, path, f"{arch}.context_length", int, 2048),
        "rms_norm_eps": _number(reader, path, f"{arch}.attention.layer_norm_rms_epsilon", float,
                                1e-6),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "hidden_act": "silu",
        "rope_parameters": {
            "rope_theta": _number(reader, path, f"{arch}.rope.freq_base", float, 10000.0),
            "rope_type": "default",
        },
    }
    scaling = _field(reader, f"{arch}.rope.scaling.type")
    if scaling == "linear":
        config["rope_parameters"].update(
            rope_type="linear",
            factor=_number(reader, path, f"{arch}.rope.scaling.factor", float),
        )
    elif scaling not in (None, "none"):
        raise UnsupportedModelError(
            f"{path}: unsupported GGUF rope scaling {scaling!r}; supported: 'none', 'linear'"
        )
    for ours, theirs in (
        ("bos_token_id", "bos_token_id"),
        ("eos_token_id", "eos_token_id"),
        ("pad_token_id", "padding_token_id"),
    ):
        value = _number(reader, path, f"tokenizer.ggml.{theirs}", int, None)
        if value is not None:
            config[ours] = value
    # llama.cpp permutes Q/K rows only for architectures whose rotary kernel is the
    # "normal" (adjacent pairs) one; Qwen2 uses the NeoX layout and is stored as is.
    return config, GGUFTensors(reader, config, rotary_permuted=arch == "llama")
