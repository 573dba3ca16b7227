"""Several adapters in one directory, in PEFT's multi-adapter layout.

PEFT's ``save_pretrained`` on a model with several adapters writes the adapter
named "default" at the top of the directory and every other one in a
sub-folder ``<dir>/<name>/``; each folder is an ordinary adapter directory.
:func:`save_peft_set` writes a ``{name: (adapter, config)}`` set that way and
:func:`load_peft_set` reads one back (written by lora_jax or by PEFT). In
PyTorch the adapters are then selectable by name::

    model = PeftModel.from_pretrained(base, directory)               # the top one, as "default"
    model.load_adapter(f"{directory}/{name}", adapter_name=name)     # each other one
    model.set_adapter(name)
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import jax.numpy as jnp

from lora_jax.adapters import AdapterPair, adapter_pair
from lora_jax.peft.card import model_card
from lora_jax.peft.export import to_peft
from lora_jax.peft.files import (
    CONFIG_NAME,
    DEFAULT_ADAPTER_NAME,
    adapter_dir_for_save,
    check_adapter_name,
    write_adapter,
)
from lora_jax.peft.keys import ENTRY_KEYS
from lora_jax.peft.load import LoadedPeft, load_peft
from lora_jax.peft.naming import NameMap


def save_peft_set(
    path: str | os.PathLike,
    adapters: Mapping[str, AdapterPair],
    params: Any = None,
    *,
    default: str | None = None,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
    name_map: NameMap = None,
    save_embedding_layers: bool | Literal["auto"] = "auto",
    dtype: Any = jnp.float32,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Write a set of named adapters as one PEFT multi-adapter directory.

    Example:
        >>> import tempfile, jax, jax.numpy as jnp, lora_jax
        >>> params = {"q": {"kernel": jnp.ones((4, 6))}, "v": {"kernel": jnp.ones((4, 6))}}
        >>> qv = lora_jax.LoraConfig(r=2, target_modules=["q", "v"])
        >>> q3 = lora_jax.LoraConfig(r=3, lora_alpha=6, target_modules=["q"])
        >>> adapters = {"chat": (lora_jax.init(qv, params, jax.random.key(0)), qv),
        ...             "sql": (lora_jax.init(q3, params, jax.random.key(1)), q3)}
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     folders = lora_jax.save_peft_set(tmp, adapters, params, default="chat")
        ...     print({name: str(folder.relative_to(tmp)) for name, folder in folders.items()})
        ...     loaded = lora_jax.load_peft_set(tmp, params, default="chat")
        {'chat': '.', 'sql': 'sql'}
        >>> sorted(loaded), loaded["sql"].config.r
        (['chat', 'sql'], 3)

    Args:
        path: the directory.
        adapters: ``{name: (adapter, config)}``; each name is a plain folder
            name, and each adapter is written as :func:`lora_jax.save_peft`
            writes one.
        params: the base params (shapes suffice unless full tensors are written),
            as for :func:`lora_jax.save_peft`.
        default: the adapter written at the top of the directory (PEFT loads
            it as "default"). Unset, an adapter named "default" goes there if
            the set has one, and every other adapter goes in ``path/<name>/``.
        base_model_name_or_path, task_type, name_map, save_embedding_layers,
            dtype: as for :func:`lora_jax.save_peft`, for every adapter.
        overwrite: replace the files of these adapters where their folders are
            not empty. Other sub-folders of ``path`` are left as they are.

    Returns:
        ``{name: folder}`` for every adapter written.

    Every adapter is checked and converted before any file is written, so a
    bad name, a folder in the way, or an adapter that does not fit
    ``params`` leaves the directory untouched; errors name the adapter.
    """
    if not isinstance(adapters, Mapping) or not adapters:
        raise ValueError("save_peft_set needs a non-empty dict of name -> (adapter, LoraConfig).")
    for name in adapters:
        check_adapter_name(name)
    top = _top_adapter(adapters, default)
    folders = {}
    for name in adapters:
        folders[name] = adapter_dir_for_save(path, DEFAULT_ADAPTER_NAME if name == top else name, overwrite)
    converted = {}
    for name, value in adapters.items():
        adapter, config = adapter_pair(value, name)
        try:
            converted[name] = to_peft(
                adapter, config, params, base_model_name_or_path=base_model_name_or_path, task_type=task_type,
                name_map=name_map, save_embedding_layers=save_embedding_layers, dtype=dtype,
            )
        except ValueError as err:
            raise type(err)(f"Adapter {name!r}: {err}") from None
    # One card per directory, as PEFT writes it: it describes the top adapter (or the first one).
    card_name = top if top is not None else next(iter(adapters))
    card_config = adapters[card_name][1]
    a_parts = tuple("." + ENTRY_KEYS["lora_A"].part(is_embedding) for is_embedding in (False, True))
    num_modules = sum(k.endswith(a_parts) for k in converted[card_name][0])
    for name, (tensors, peft_config) in converted.items():
        write_adapter(folders[name], tensors, peft_config, Path(path),
                      lambda: model_card(card_config, num_modules, base_model_name_or_path, task_type))
    return folders


def _top_adapter(adapters: Mapping[str, AdapterPair], default: str | None) -> str | None:
    if default is None:
        return DEFAULT_ADAPTER_NAME if DEFAULT_ADAPTER_NAME in adapters else None
    if default not in adapters:
        raise ValueError(f"default={default!r} is not one of the adapters ({', '.join(adapters)}).")
    if default != DEFAULT_ADAPTER_NAME and DEFAULT_ADAPTER_NAME in adapters:
        raise ValueError(
            f"The set has an adapter named {DEFAULT_ADAPTER_NAME!r}, which PEFT's layout puts at the top of the "
            f"directory, and default={default!r} asks for another one there; rename one of them."
        )
    return default


def load_peft_set(
    path: str | os.PathLike,
    params: Any,
    *,
    default: str = DEFAULT_ADAPTER_NAME,
    names: Sequence[str] | None = None,
    name_map: NameMap = None,
    dtype: Any = jnp.float32,
    in_axes: Mapping[str, int] | None = None,
    kernel_names: Sequence[str] = ("kernel", "embedding"),
) -> dict[str, LoadedPeft]:
    """Read every adapter of a PEFT multi-adapter directory: ``{name: (adapter, config)}``.

    Example:
        >>> import tempfile, jax, jax.numpy as jnp, lora_jax
        >>> params = {"q": {"kernel": jnp.ones((4, 6))}}
        >>> config = lora_jax.LoraConfig(r=2, target_modules=["q"])
        >>> adapter = lora_jax.init(config, params, jax.random.key(0))
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     _ = lora_jax.save_peft(tmp, adapter, config, params)                        # the top one
        ...     _ = lora_jax.save_peft(tmp, adapter, config, params, adapter_name="other")  # tmp/other/
        ...     adapters = lora_jax.load_peft_set(tmp, params)
        >>> list(adapters)
        ['default', 'other']
        >>> other_adapter, other_config = adapters["other"]

    Args:
        path: the directory: an adapter at the top and/or named adapters in
            sub-folders (every sub-folder with an ``adapter_config.json``).
        params: the base params every adapter applies to.
        default: the name given to the adapter at the top ("default", as PEFT).
        names: load only these adapters (e.g. to skip a trainer's
            ``checkpoint-*`` folders); all of them by default.
        name_map, dtype, in_axes, kernel_names: as for :func:`lora_jax.load_peft`.

    Returns:
        ``{name: LoadedPeft}``, the top adapter first, then the others by name.
        Each value unpacks as ``(adapter, config)``; its ``.params`` are
        ``params`` with that adapter's full tensors (``modules_to_save``,
        biases) written in.

    Raises ``FileNotFoundError`` when the directory holds no adapter or lacks
    one of ``names`` (listing what it holds), and what :func:`lora_jax.load_peft`
    raises for an adapter that cannot be read (the error names its folder).
    """
    check_adapter_name(default)
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"No adapter directory at {root}.")
    found: dict[str, Path] = {}  # name -> its folder
    if (root / CONFIG_NAME).is_file():
        found[default] = root
    for sub in sorted(p for p in root.iterdir() if (p / CONFIG_NAME).is_file()):
        if sub.name in found:
            raise ValueError(f"{root} has a sub-folder {sub.name!r} and a top-level adapter named {default!r} "
                             "by default=; pass another default= name.")
        found[sub.name] = sub
    if not found:
        raise FileNotFoundError(f"{root} holds no adapter: neither it nor a sub-folder has an {CONFIG_NAME}.")
    if names is not None:
        if isinstance(names, str):
            raise TypeError(f"names must be a list of adapter names, got the string {names!r}.")
        missing = [n for n in names if n not in found]
        if missing:
            raise FileNotFoundError(f"{root} has no adapter {missing[0]!r}; it holds {', '.join(found)}.")
        found = {n: found[n] for n in found if n in set(names)}
    return {
        name: load_peft(folder, params, name_map=name_map, dtype=dtype, in_axes=in_axes, kernel_names=kernel_names)
        for name, folder in found.items()
    }
