"""Adapters on disk for the training tools: PEFT directories and lora_jax's own orbax format.

``lora-jax import`` stores a checked PEFT adapter as a *lora_jax adapter
directory*: the arrays as an orbax checkpoint (``adapter/``) and
``lora_config.json`` (the :class:`~lora_jax.LoraConfig` and the base model's
path). :func:`load_adapter` reads either kind::

    write_lora_adapter("imported", adapter, config, trainable_params, base_model="path/to/model")
    adapter, config, trainable_params = load_adapter("imported", params)   # or a PEFT directory
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from lora_jax.config import LoraConfig
from lora_jax.train.pretrained import ModelFilesError, default_model_path

LORA_CONFIG_FILE = "lora_config.json"
LORA_ADAPTER_ITEM = "adapter"
PEFT_CONFIG_FILE = "adapter_config.json"


def write_lora_adapter(directory: str | Path, adapter: Any, config: LoraConfig, trainable: dict[str, Any],
                       base_model: str | None) -> Path:
    """A lora_jax adapter directory: orbax arrays + ``lora_config.json``.

    Example:
        >>> import tempfile, numpy as np
        >>> from lora_jax import LoraConfig
        >>> adapter = {"q_proj": {"lora_A": np.ones((8, 2), np.float32), "lora_B": np.zeros((2, 8), np.float32)}}
        >>> directory = write_lora_adapter(tempfile.mkdtemp() + "/imported", adapter,
        ...                                LoraConfig(r=2, target_modules=["q_proj"]), {}, None)
        >>> sorted(p.name for p in directory.iterdir())
        ['adapter', 'lora_config.json']
    """
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tree = {"adapter": jax.tree.map(np.asarray, adapter), "params": jax.tree.map(np.asarray, trainable)}
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save((directory / LORA_ADAPTER_ITEM).absolute(), tree, force=True)
    (directory / LORA_CONFIG_FILE).write_text(json.dumps(
        {"lora_config": config.to_dict(), "base_model_name_or_path": base_model}, indent=2) + "\n")
    return directory


def read_lora_adapter(directory: str | Path) -> tuple[Any, LoraConfig, dict[str, Any]]:
    """``(adapter, config, trainable_params)`` of a lora_jax adapter directory.

    Example:
        >>> import tempfile, numpy as np
        >>> from lora_jax import LoraConfig
        >>> adapter = {"q_proj": {"lora_A": np.ones((8, 2), np.float32), "lora_B": np.zeros((2, 8), np.float32)}}
        >>> directory = write_lora_adapter(tempfile.mkdtemp(), adapter, LoraConfig(r=2, target_modules=["q_proj"]),
        ...                                {}, None)
        >>> adapter, config, trainable = read_lora_adapter(directory)
        >>> adapter["q_proj"]["lora_A"].shape, config.r, trainable
        ((8, 2), 2, {})
    """
    import orbax.checkpoint as ocp

    directory = Path(directory)
    meta = _read_json_object(directory / LORA_CONFIG_FILE)
    if not isinstance(meta.get("lora_config"), dict):
        raise ModelFilesError(f"{directory / LORA_CONFIG_FILE}: expected a \"lora_config\" object "
                              "(as `lora-jax import` writes).")
    config = lora_config_from_dict(meta["lora_config"], directory / LORA_CONFIG_FILE)
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            tree = checkpointer.restore((directory / LORA_ADAPTER_ITEM).absolute())
    except Exception as err:  # noqa: BLE001 - orbax raises many kinds; name the directory instead
        raise ModelFilesError(f"{directory / LORA_ADAPTER_ITEM}: cannot read the adapter arrays "
                              f"({' '.join(str(err).split())[:200]}).") from None
    if not isinstance(tree, dict) or not isinstance(tree.get("adapter"), dict):
        raise ModelFilesError(f"{directory / LORA_ADAPTER_ITEM}: expected an \"adapter\" tree.")
    return tree["adapter"], config, dict(tree.get("params") or {})


def lora_config_from_dict(values: dict[str, Any], where: str | Path = "lora config") -> LoraConfig:
    """A :class:`LoraConfig` from its ``to_dict()`` form; a bad value names ``where``.

    Example:
        >>> lora_config_from_dict({"r": 4, "target_modules": ["q"], "unknown_key": 1}).r
        4
        >>> lora_config_from_dict({"r": "eight", "target_modules": ["q"]}, "run/lora_config.json")
        Traceback (most recent call last):
        ...
        lora_jax.train.pretrained.ModelFilesError: run/lora_config.json: LoraConfig.r must be a positive integer, got 'eight'.
    """
    fields = {f.name for f in dataclasses.fields(LoraConfig)}
    try:
        return LoraConfig(**{k: v for k, v in values.items() if k in fields})
    except (TypeError, ValueError) as err:
        raise ModelFilesError(f"{where}: {' '.join(str(err).split())}") from None


def _read_json_object(file: Path) -> dict[str, Any]:
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelFilesError(f"{file}: no such file.") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelFilesError(f"{file}: not valid JSON ({err}).") from None
    if not isinstance(value, dict):
        raise ModelFilesError(f"{file}: expected a JSON object, found a {type(value).__name__}.")
    return value


def adapter_base_model(adapter_dir: str | Path) -> str | None:
    """``base_model_name_or_path`` from a PEFT config or a lora_jax adapter directory.

    Example:
        >>> import json, tempfile; from pathlib import Path
        >>> adapter_dir = Path(tempfile.mkdtemp())
        >>> _ = (adapter_dir / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/m"}))
        >>> adapter_base_model(adapter_dir)
        '/m'
    """
    for name in (PEFT_CONFIG_FILE, LORA_CONFIG_FILE):
        file = Path(adapter_dir) / name
        if file.exists():
            base = _read_json_object(file).get("base_model_name_or_path")
            return base if isinstance(base, str) and base else None
    return None


def resolve_base_model(model: str | Path | None, adapter_dir: str | Path | None) -> Path:
    """The base model to load: ``model`` if given, else the adapter's own, else the default one.

    Example:
        >>> resolve_base_model("path/to/model", None)
        PosixPath('path/to/model')
    """
    if model:
        return Path(model)
    if adapter_dir is not None:
        base = adapter_base_model(adapter_dir)
        if base and Path(base).exists():
            return Path(base)
        if base:
            raise ModelFilesError(f"The adapter's base model {base!r} is not a local path; pass --model.")
    return default_model_path()


def load_adapter(adapter_dir: str | Path, params: Any) -> tuple[Any, LoraConfig, dict[str, Any]]:
    """``(adapter, lora_config, trainable_params)`` from a PEFT or lora_jax adapter directory.

    ``trainable_params`` are the full tensors of the file (``modules_to_save``,
    biases) by dotted leaf name; put them in with
    :func:`~lora_jax.train.step.with_leaves`.

    Example:
        >>> import tempfile, numpy as np
        >>> from lora_jax import LoraConfig
        >>> params = {"q_proj": {"kernel": np.zeros((8, 8), np.float32)}}
        >>> adapter = {"q_proj": {"lora_A": np.ones((8, 2), np.float32), "lora_B": np.zeros((2, 8), np.float32)}}
        >>> directory = write_lora_adapter(tempfile.mkdtemp(), adapter, LoraConfig(r=2, target_modules=["q_proj"]),
        ...                                {}, None)
        >>> loaded, config, _ = load_adapter(directory, params)
        >>> sorted(loaded), config.target_modules
        (['q_proj'], ('q_proj',))
    """
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise ModelFilesError(f"{adapter_dir}: no such adapter directory (expected adapter_config.json + "
                              "adapter_model.safetensors, or a `lora-jax import` directory).")
    if (adapter_dir / PEFT_CONFIG_FILE).exists():
        from lora_jax.peft import load_peft

        loaded = load_peft(adapter_dir, params)
        return loaded.adapter, loaded.config, _changed_leaves(params, loaded.params)
    if (adapter_dir / LORA_CONFIG_FILE).exists():
        adapter, config, trainable = read_lora_adapter(adapter_dir)
        _check_leaf_names(trainable, params, adapter_dir / LORA_ADAPTER_ITEM)
        return adapter, config, trainable
    raise ModelFilesError(f"{adapter_dir}: not an adapter directory (expected adapter_config.json + "
                          f"adapter_model.safetensors, or {LORA_CONFIG_FILE} from `lora-jax import`).")


def read_run_checkpoint(run_dir: str | Path, step: int | None = None) -> tuple[Any, LoraConfig, dict[str, Any],
                                                                          str | None, int]:
    """``(adapter, lora_config, trainable_params, base_model, step)`` of a finetune run's checkpoint.

    ``step`` defaults to the newest; ``run_dir`` may also be its ``checkpoints/``.

    Example:
        >>> import json, tempfile, numpy as np; from pathlib import Path
        >>> from lora_jax import LoraConfig
        >>> from lora_jax.train.checkpoint import Checkpoints
        >>> run = Path(tempfile.mkdtemp())
        >>> _ = (run / "run.json").write_text(json.dumps({"model": "/models/m"}))
        >>> checkpoints = Checkpoints(run / "checkpoints")
        >>> adapter = {"q": {"lora_A": np.ones((4, 2), np.float32), "lora_B": np.zeros((2, 4), np.float32)}}
        >>> config = LoraConfig(r=2, target_modules=["q"]).to_dict()
        >>> checkpoints.save(6, {"trainable": {"adapter": adapter, "params": {}}}, {"settings": {"lora": config}})
        >>> checkpoints.wait()
        >>> _, config, trainable, base, step = read_run_checkpoint(run)
        >>> config.r, trainable, base, step
        (2, {}, '/models/m', 6)
    """
    from lora_jax.train.checkpoint import CheckpointError, Checkpoints
    from lora_jax.train.settings import RUN_FILE, base_model_path, read_run_file

    source = Path(run_dir)
    run_dir = source.parent if source.name == "checkpoints" else source
    if not (run_dir / "checkpoints").is_dir():
        raise ModelFilesError(f"{source}: not a run directory (no checkpoints/) nor a `lora-jax import` "
                              f"directory (no {LORA_CONFIG_FILE}).")
    checkpoints = Checkpoints(run_dir / "checkpoints", read_only=True)
    try:
        steps = checkpoints.all_steps()
        chosen = step if step is not None else (steps[-1] if steps else None)
        if chosen is None or chosen not in steps:
            raise CheckpointError(f"{run_dir / 'checkpoints'}: no checkpoint for step {step} (steps: {steps}).")
        state, meta = checkpoints.restore_raw(chosen)
    finally:
        checkpoints.close()
    where = run_dir / "checkpoints" / str(chosen)
    lora = ((meta.get("settings") or {}).get("lora")) if isinstance(meta, dict) else None
    trainable = state.get("trainable") if isinstance(state, dict) else None
    if not isinstance(lora, dict) or not isinstance(trainable, dict) or "adapter" not in trainable:
        raise CheckpointError(f"{where}: not a lora_jax training checkpoint (no LoRA settings or adapter).")
    settings = read_run_file(run_dir / RUN_FILE) if (run_dir / RUN_FILE).exists() else {}
    base = base_model_path(settings["model"], run_dir) if settings.get("model") else None
    return (trainable["adapter"], lora_config_from_dict(lora, where), dict(trainable.get("params") or {}),
            base, chosen)


def _check_leaf_names(trainable: dict[str, Any], params: Any, where: Path) -> None:
    import jax

    from lora_jax.train.step import leaf_name

    known = {leaf_name(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
    unknown = sorted(set(trainable) - known)
    if unknown:
        raise ModelFilesError(f"{where}: full tensors {unknown[:4]} are not leaves of the base model; "
                              "is it the adapter of another model?")


def _changed_leaves(old: Any, new: Any) -> dict[str, Any]:
    """Leaves of ``new`` that are different objects from ``old``'s (what load_peft wrote)."""
    import jax

    from lora_jax.train.step import leaf_name

    out = {}
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(old)[0], jax.tree.leaves(new)):
        if a is not b:
            out[leaf_name(path)] = b
    return out
