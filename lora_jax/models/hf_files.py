"""The files of a Hugging Face model directory, read defensively: ``config.json``,
single or sharded safetensors, and the refusal of model-supplied code.

Every problem is one :class:`~lora_jax.models.errors.ModelLoadError` naming the file
and what was expected; nothing here executes code from the directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ModelLoadError

# Files in which transformers looks for ``auto_map`` (classes the checkpoint defines
# in its own Python files, run only with trust_remote_code=True).
CODE_MAP_FILES = ("config.json", "tokenizer_config.json")


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; a file that is not one is a clear error.

    Example:
        >>> import json, pathlib, tempfile
        >>> from lora_jax.models.hf_files import read_json_object
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "config.json"
        >>> _ = path.write_text(json.dumps({"model_type": "gpt2"}))
        >>> read_json_object(path)
        {'model_type': 'gpt2'}
        >>> _ = path.write_text("[1, 2]")
        >>> read_json_object(path)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        lora_jax.models.errors.ModelLoadError: .../config.json holds a list; expected a JSON object ({...})
    """
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ModelLoadError(f"{path} is not UTF-8 text ({err}); expected a JSON object") from None
    except json.JSONDecodeError as err:
        raise ModelLoadError(
            f"{path} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg}); "
            "expected a JSON object"
        ) from None
    if not isinstance(value, dict):
        raise ModelLoadError(
            f"{path} holds a {type(value).__name__}; expected a JSON object ({{...}})"
        )
    return value


def refuse_remote_code(directory: Path) -> None:
    """Refuse a directory whose ``config.json`` or ``tokenizer_config.json`` has an
    ``auto_map``: its model or tokenizer is Python code shipped with the checkpoint,
    which lora_jax never runs (``trust_remote_code`` is always False).

    Example:
        >>> import json, pathlib, tempfile
        >>> from lora_jax.models.hf_files import refuse_remote_code
        >>> directory = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (directory / "tokenizer_config.json").write_text(
        ...     json.dumps({"auto_map": {"AutoTokenizer": ["tok.MyTokenizer", None]}}))
        >>> refuse_remote_code(directory)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        lora_jax.models.errors.ModelLoadError: .../tokenizer_config.json has an auto_map ...
    """
    for name in CODE_MAP_FILES:
        path = directory / name
        if not path.is_file():
            continue
        auto_map = read_json_object(path).get("auto_map")
        if auto_map:
            classes = sorted(auto_map) if isinstance(auto_map, dict) else auto_map
            raise ModelLoadError(
                f"{path} has an auto_map ({classes}): this checkpoint ships its own Python "
                "code, and lora_jax never runs code from model files (trust_remote_code is "
                "always False). Use a checkpoint without auto_map; if the built-in "
                "implementation of its model_type is what you want, delete the auto_map "
                "entry from your copy."
            )


def checkpoint_files(directory: Path) -> list[Path]:
    """The safetensors files of a model directory: the shards an index lists, else
    ``model.safetensors``, else every ``*.safetensors``.

    Example:
        >>> import pathlib, tempfile
        >>> import numpy as np
        >>> from safetensors.numpy import save_file
        >>> from lora_jax.models.hf_files import checkpoint_files
        >>> directory = pathlib.Path(tempfile.mkdtemp())
        >>> save_file({"w": np.zeros(2, np.float32)}, str(directory / "model.safetensors"))
        >>> [p.name for p in checkpoint_files(directory)]
        ['model.safetensors']
    """
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        return _index_shards(index)
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    files = sorted(directory.glob("*.safetensors"))
    if files:
        return files
    raise FileNotFoundError(
        f"{directory} has config.json but no weights: expected model.safetensors, "
        "model.safetensors.index.json (sharded) or *.safetensors (PyTorch .bin files are "
        "not supported; convert them with transformers' save_pretrained)"
    )


def _index_shards(index: Path) -> list[Path]:
    weight_map = read_json_object(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map or not all(
        isinstance(v, str) for v in weight_map.values()
    ):
        raise ModelLoadError(
            f"{index} has no usable weight_map; expected "
            '{"weight_map": {"<tensor name>": "<shard>.safetensors", ...}}'
        )
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        if Path(shard).name != shard:
            raise ModelLoadError(
                f"{index} lists the shard {shard!r}; expected a file name in {index.parent}"
            )
    missing = [shard for shard in shards if not (index.parent / shard).is_file()]
    if missing:
        counts = {s: sum(v == s for v in weight_map.values()) for s in missing}
        listed = ", ".join(f"{s} ({n} tensors)" for s, n in counts.items())
        raise ModelLoadError(
            f"{index} lists {len(shards)} shards, but {index.parent} lacks {listed}; "
            "download or copy every shard"
        )
    return [index.parent / shard for shard in shards]


class SafetensorsCheckpoint:
    """Tensors of one or several (sharded) safetensors files, read as numpy on demand.

    A file that is empty, truncated or not safetensors at all is one
    :class:`~lora_jax.models.errors.ModelLoadError` naming it.

    Example:
        >>> import pathlib, tempfile
        >>> import numpy as np
        >>> from safetensors.numpy import save_file
        >>> from lora_jax.models.hf_files import SafetensorsCheckpoint
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "model.safetensors"
        >>> save_file({"w": np.ones(2, np.float32)}, str(path))
        >>> checkpoint = SafetensorsCheckpoint([path])
        >>> checkpoint.keys(), checkpoint.get("w"), checkpoint.describe("w")
        (['w'], array([1., 1.], dtype=float32), "'w' (in model.safetensors)")
        >>> _ = path.write_bytes(path.read_bytes()[:20])
        >>> SafetensorsCheckpoint([path])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        lora_jax.models.errors.ModelLoadError: .../model.safetensors is not a complete safetensors file: ...
    """

    def __init__(self, files: list[Path]) -> None:
        from safetensors import SafetensorError, safe_open

        self._errors = (SafetensorError, OSError, ValueError)
        self._where: dict[str, tuple[Path, Any]] = {}
        for path in files:
            try:
                handle = safe_open(str(path), framework="np")
                names = list(handle.keys())
            except self._errors as err:
                raise _unreadable(path, err) from None
            self._where.update((name, (path, handle)) for name in names)

    def keys(self) -> list[str]:
        """The tensor names of every file (see the class example)."""
        return list(self._where)

    def describe(self, name: str) -> str:
        """``name`` and the file holding it, for error messages (see the class example)."""
        return f"{name!r} (in {self._where[name][0].name})"

    def get(self, name: str) -> np.ndarray:
        """One tensor, as stored (torch layout; see the class example)."""
        path, handle = self._where[name]
        try:
            return handle.get_tensor(name)
        except self._errors as err:  # e.g. a dtype numpy lacks
            raise _unreadable(path, err, f"tensor {name!r}") from None


def _unreadable(path: Path, err: Exception, what: str = "") -> ModelLoadError:
    reason = str(err).strip() or type(err).__name__
    part = f" ({what})" if what else ""
    return ModelLoadError(
        f"{path} is not a complete safetensors file{part}: {reason}; expected a file as "
        "written by safetensors or transformers' save_pretrained (an interrupted download "
        "leaves it truncated; fetch it again)"
    )
