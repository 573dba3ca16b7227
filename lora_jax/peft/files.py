"""Adapter directories on disk: where they are, and reading and writing their files.

A directory holds ``adapter_config.json``, ``adapter_model.safetensors`` and a
model card; a non-default adapter name is a sub-folder ``<dir>/<name>/``.
Every failure to read names the file and what was expected
(:class:`~lora_jax.peft.errors.PeftFormatError`); nothing from a file is ever
unpickled, and files are replaced atomically, so an interrupted save leaves
the previous file whole.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import safetensors.numpy

from lora_jax.peft.errors import PeftFormatError

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
CARD_NAME = "README.md"
DEFAULT_ADAPTER_NAME = "default"


def check_adapter_name(adapter_name: Any) -> None:
    """Refuse an adapter name that is not a plain folder name (it would read or write elsewhere).

    Example:
        >>> from lora_jax.peft.files import check_adapter_name
        >>> check_adapter_name("mine")
        >>> check_adapter_name("../x")
        Traceback (most recent call last):
        ...
        ValueError: adapter_name '../x' is not a plain folder name: it contains a path separator. Use letters, digits, '-', '_' or '.', e.g. adapter_name='mine'.

    Args:
        adapter_name: the name given to :func:`save_peft` / :func:`load_peft`.

    Returns:
        None; raises ``ValueError`` for a non-string, an empty name, ``.`` or
        ``..``, a name with ``/``, ``\\``, ``:`` or NUL, or surrounding spaces.
    """
    why = None
    if not isinstance(adapter_name, str):
        why = f"it is of type {type(adapter_name).__name__}, not a string"
    elif not adapter_name:
        why = "it is empty"
    elif adapter_name in (".", ".."):
        why = "it names a directory itself, not a sub-folder"
    elif any(sep in adapter_name for sep in ("/", "\\")):
        why = "it contains a path separator"
    elif "\0" in adapter_name or ":" in adapter_name:
        why = "it contains a NUL or ':' character"
    elif adapter_name != adapter_name.strip():
        why = "it starts or ends with whitespace"
    if why is not None:
        raise ValueError(
            f"adapter_name {adapter_name!r} is not a plain folder name: {why}. Use letters, digits, "
            "'-', '_' or '.', e.g. adapter_name='mine'."
        )


def adapter_dir_for_save(path: str | os.PathLike, adapter_name: str, overwrite: bool) -> Path:
    """The folder :func:`save_peft` writes to, after checking it may write there.

    Example:
        >>> import tempfile
        >>> from lora_jax.peft.files import adapter_dir_for_save
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     print(adapter_dir_for_save(tmp, "mine", overwrite=False).relative_to(tmp))
        mine

    Args:
        path: the adapter directory.
        adapter_name: "default" writes to ``path``, any other name to ``path/adapter_name``.
        overwrite: whether a non-empty folder may have its adapter files replaced.

    Returns:
        The folder (not created yet). Raises ``ValueError`` for a bad adapter
        name and ``FileExistsError`` for a file in the way or a non-empty
        folder without ``overwrite``.
    """
    check_adapter_name(adapter_name)
    root = Path(path)
    if root.exists() and not root.is_dir():
        raise FileExistsError(f"{root} exists and is not a directory.")
    out_dir = root if adapter_name == DEFAULT_ADAPTER_NAME else root / adapter_name
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a directory.")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        found = sorted(p.name for p in out_dir.iterdir())
        raise FileExistsError(
            f"{out_dir} is not empty (contains {', '.join(found[:6])}{', ...' if len(found) > 6 else ''}); "
            "pass overwrite=True to replace the adapter files, or choose another directory."
        )
    return out_dir


def find_adapter_dir(path: str | os.PathLike, adapter_name: str | None) -> Path:
    """The folder holding the adapter ``adapter_name`` under ``path`` (PEFT's layout).

    Example:
        >>> import pathlib, tempfile
        >>> from lora_jax.peft.files import CONFIG_NAME, find_adapter_dir
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     (pathlib.Path(tmp) / "mine").mkdir()
        ...     _ = (pathlib.Path(tmp) / "mine" / CONFIG_NAME).write_text("{}")
        ...     print(find_adapter_dir(tmp, "mine").name)
        mine

    Args:
        path: the adapter directory.
        adapter_name: None or "default" for ``path`` itself; another plain
            folder name for ``path/adapter_name``. When ``path`` holds only
            named adapters, leaving it unset is an error that lists them.

    Returns:
        The folder; raises ``FileNotFoundError`` naming what the directory
        holds when there is no such adapter.
    """
    if adapter_name is not None:
        check_adapter_name(adapter_name)
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"No adapter directory at {root}.")
    named = sorted(p.name for p in root.iterdir() if (p / CONFIG_NAME).is_file())
    if adapter_name not in (None, DEFAULT_ADAPTER_NAME):
        sub = root / adapter_name
        if (sub / CONFIG_NAME).exists():
            return sub
        if (root / CONFIG_NAME).exists():
            raise FileNotFoundError(
                f"{root} has no sub-folder {adapter_name!r} with an {CONFIG_NAME}; it holds the "
                "default adapter (leave adapter_name unset)."
            )
        if named:
            raise FileNotFoundError(
                f"{root} has no sub-folder {adapter_name!r} with an {CONFIG_NAME}; its named adapters "
                f"are {named}."
            )
    if (root / CONFIG_NAME).exists():
        return root
    if named:
        raise FileNotFoundError(
            f"{root} has no {CONFIG_NAME} of its own but holds the named adapters {named}; "
            "pass adapter_name= to choose one."
        )
    raise FileNotFoundError(f"{root} has no {CONFIG_NAME}; it is not a PEFT adapter directory.")


def read_config(folder: Path) -> Any:
    """The parsed ``adapter_config.json`` of ``folder``, or one clear error naming the file.

    Example:
        >>> import pathlib, tempfile
        >>> from lora_jax.peft.files import CONFIG_NAME, read_config
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     _ = (pathlib.Path(tmp) / CONFIG_NAME).write_text('{"peft_type": "LORA"}')
        ...     read_config(pathlib.Path(tmp))
        {'peft_type': 'LORA'}

    Returns:
        The JSON value (checked to be an object by
        :func:`~lora_jax.peft.adapter_config.read_settings`). Raises
        :class:`PeftFormatError` for a file that cannot be read, is not
        UTF-8 text, or is not JSON (with the line and column).
    """
    file = folder / CONFIG_NAME
    expected = "expected a JSON object such as PEFT's save_pretrained writes"
    try:
        text = file.read_text(encoding="utf-8-sig")  # tolerate the BOM some editors add
    except UnicodeDecodeError as err:
        raise PeftFormatError(f"{file} is not UTF-8 text (byte {err.start}); {expected}.") from None
    except OSError as err:
        raise PeftFormatError(f"{file} cannot be read ({err.strerror or err}); {expected}.") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise PeftFormatError(
            f"{file} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg}); {expected}."
        ) from None
    except RecursionError:
        raise PeftFormatError(f"{file} is nested too deeply to be an adapter config; {expected}.") from None


def _read_safetensors(file: Path) -> dict[str, np.ndarray]:
    expected = ("expected a safetensors file (an 8-byte header length, a JSON header, then the tensor "
                "data); it may be truncated or not a safetensors file at all, so re-export it")
    if not file.is_file():
        raise PeftFormatError(f"{file} is not a regular file; {expected}.")
    size = file.stat().st_size
    if size < 8:
        raise PeftFormatError(f"{file} is {'empty' if size == 0 else f'only {size} bytes'}; {expected}.")
    try:
        return safetensors.numpy.load_file(str(file))
    except AttributeError:  # safetensors.numpy looks up np.<dtype> for dtypes such as F8_E4M3
        odd = _unreadable_dtypes(file)
        raise PeftFormatError(
            f"{file} holds tensors of a dtype numpy cannot represent ({odd}); expected float32, float16 "
            "or bfloat16 tensors."
        ) from None
    except (safetensors.SafetensorError, OSError, ValueError, TypeError, KeyError) as err:
        reason = str(err).removeprefix("Error while deserializing header: ")
        raise PeftFormatError(f"{file} cannot be read as safetensors ({reason}); {expected}.") from None


def _unreadable_dtypes(file: Path) -> str:
    """``key: dtype`` for the tensors of a safetensors header whose dtype is not a plain one."""
    plain = {"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8", "BOOL"}
    try:
        with open(file, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        found = [f"{key!r}: {info['dtype']}" for key, info in header.items()
                 if key != "__metadata__" and info.get("dtype") not in plain]
    except (OSError, ValueError, TypeError, AttributeError, KeyError):
        return "unknown"
    return ", ".join(found[:4]) + (", ..." if len(found) > 4 else "") or "unknown"


def _read_bin(file: Path) -> dict[str, np.ndarray]:
    convert = ("Convert it once where PyTorch is: PeftModel.from_pretrained(base, dir).save_pretrained("
               "dir, safe_serialization=True), or safetensors.torch.save_file(torch.load(f, "
               "weights_only=True), 'adapter_model.safetensors', metadata={'format': 'pt'}).")
    try:
        import torch
    except ImportError:
        raise ImportError(
            f"{file} is a pickled PyTorch file. lora_jax never unpickles; it reads such files only via "
            f"torch.load(weights_only=True), and torch is not installed. {convert}"
        ) from None
    import pickle

    try:
        state = torch.load(str(file), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch wraps every unpickler failure in the same paragraph; what was refused is inside it.
        blocked = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if blocked is None:
            raise PeftFormatError(
                f"{file} cannot be read by torch.load (not a valid PyTorch pickle); expected a PyTorch "
                "state dict of tensors. It may be truncated or not a PyTorch file; re-export it, "
                "preferably as adapter_model.safetensors."
            ) from None
        raise PeftFormatError(
            f"{file} holds a pickled {blocked[1]} object, which torch.load(weights_only=True) refuses; "
            "lora_jax never unpickles arbitrary objects (that could run code from the file). If you "
            "trust its source, convert it in PyTorch to adapter_model.safetensors, keeping only its tensors "
            "(PeftModel.from_pretrained(base, dir).save_pretrained(dir, safe_serialization=True))."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        reason = str(err).split("\n")[0][:200] or type(err).__name__
        raise PeftFormatError(
            f"{file} cannot be read by torch.load ({reason}); expected a PyTorch state dict of tensors. "
            "It may be truncated; re-export it, preferably as adapter_model.safetensors."
        ) from None
    if not isinstance(state, Mapping):
        raise PeftFormatError(f"{file} holds a {type(state).__name__}; expected a state dict of tensors.")
    out = {}
    for key, tensor in state.items():
        if not isinstance(key, str) or not isinstance(tensor, torch.Tensor):
            raise PeftFormatError(
                f"{file}: entry {key!r} is a {type(tensor).__name__}; expected string keys and tensors."
            )
        tensor = tensor.detach().cpu()
        if tensor.is_floating_point() and tensor.dtype not in (torch.float16, torch.float32, torch.float64):
            tensor = tensor.float()  # bfloat16 and friends: exact in float32
        out[key] = tensor.numpy()
    return out


def read_tensors(folder: Path) -> tuple[dict[str, np.ndarray], Path]:
    """``(tensors, file)``: the adapter's state dict, from safetensors or, failing that, a ``.bin``.

    Example:
        >>> import pathlib, tempfile, numpy as np, safetensors.numpy
        >>> from lora_jax.peft.files import SAFETENSORS_NAME, read_tensors
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     safetensors.numpy.save_file({"x": np.ones(2, np.float32)}, f"{tmp}/{SAFETENSORS_NAME}")
        ...     tensors, file = read_tensors(pathlib.Path(tmp))
        ...     print(list(tensors), file.name)
        ['x'] adapter_model.safetensors

    Returns:
        The tensors as numpy arrays and the file they came from. A ``.bin``
        is read only through ``torch.load(weights_only=True)`` (``ImportError``
        without torch); unreadable files raise :class:`PeftFormatError`.
    """
    weights = folder / SAFETENSORS_NAME
    if weights.exists():
        return _read_safetensors(weights), weights
    weights = folder / BIN_NAME
    if weights.exists():
        return _read_bin(weights), weights
    raise FileNotFoundError(f"{folder} has {CONFIG_NAME} but neither {SAFETENSORS_NAME} nor {BIN_NAME}.")


def _replace_atomically(file: Path, write: Callable[[str], None]) -> None:
    """Write ``file`` through ``write(tmp_path)`` then rename it into place."""
    # A plain new name (not mkstemp, whose files are private) so the file gets the usual permissions.
    tmp = str(file.with_name(f".{file.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"))
    try:
        write(tmp)
        os.replace(tmp, file)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_adapter(out_dir: Path, tensors: Mapping[str, np.ndarray], peft_config: Mapping[str, Any],
                  card_dir: Path, card: Callable[[], str]) -> None:
    """Write the safetensors file, ``adapter_config.json`` and (if absent) the model card.

    Example:
        >>> import pathlib, tempfile, numpy as np
        >>> from lora_jax.peft.files import write_adapter
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     folder = pathlib.Path(tmp)
        ...     write_adapter(folder, {"x": np.ones(2, np.float32)}, {"peft_type": "LORA"}, folder, lambda: "card")
        ...     sorted(p.name for p in folder.iterdir())
        ['README.md', 'adapter_config.json', 'adapter_model.safetensors']

    Args:
        out_dir: the adapter folder (created if missing).
        tensors: the state dict (safetensors metadata ``{"format": "pt"}``, as PEFT writes).
        peft_config: the ``adapter_config.json`` dict.
        card_dir: where ``README.md`` goes (the top directory for named adapters).
        card: makes the model card text; an existing ``README.md`` is kept.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    _replace_atomically(out_dir / SAFETENSORS_NAME, lambda tmp: safetensors.numpy.save_file(
        dict(tensors), tmp, metadata={"format": "pt"}))
    config_text = json.dumps(peft_config, indent=2, sort_keys=True) + "\n"
    _replace_atomically(out_dir / CONFIG_NAME, lambda tmp: Path(tmp).write_text(config_text, encoding="utf-8"))
    stale = out_dir / BIN_NAME  # PEFT reads safetensors first, other loaders may not
    if stale.exists():
        stale.unlink()
    card_file = card_dir / CARD_NAME
    if not card_file.exists():
        card_file.write_text(card(), encoding="utf-8")
