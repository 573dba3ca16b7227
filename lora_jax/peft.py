"""Hugging Face PEFT's LoRA adapter format, in and out.

    lora_jax.save_peft("out/adapter", adapter, config, params)
    # PyTorch: PeftModel.from_pretrained(torch_model, "out/adapter")
    adapter, config = loaded = lora_jax.load_peft("out/adapter", params)
    params = loaded.params  # with any modules_to_save / bias tensors of the file

The format (peft 0.21): a directory with ``adapter_config.json``,
``adapter_model.safetensors`` (metadata ``{"format": "pt"}``) and a model card.
Tensor keys are ``base_model.model.<torch module path>.<part>``:

==============================  ==========================  ======================
part                            torch shape                 lora_jax leaf
==============================  ==========================  ======================
``lora_A.weight``               (r, in_features)            ``A.T``  (A is (in, r))
``lora_B.weight``               (out_features, r)           ``B.T``  (B is (r, out))
``lora_embedding_A``            (r, num_embeddings)         ``A.T``  (embedding tables)
``lora_embedding_B``            (embedding_dim, r)          ``B.T``
``base_layer.bias``             (out,)                      bias of a targeted module
``bias`` / ``weight``           as in torch                 ``modules_to_save``, ``bias="all"``
``base_layer.weight``           as in torch                 a targeted embedding's table
==============================  ==========================  ======================

How lora_jax names map to those keys (see the functions for details):

* **Module paths.** A lora_jax module name *is* the torch module path when the
  params tree mirrors PyTorch's names. Otherwise ``name_map`` (a callable, or a
  dict whose keys replace a dotted prefix) maps names to torch paths; loading
  applies the same map to every module of ``params`` and inverts it.
* **Stacked (scanned) layers.** ``model.layers.self_attn.q_proj`` with a leading
  layer axis of size L is written as L modules ``model.layers.{i}.self_attn.q_proj``:
  the index goes after the first path component named by ``layers_pattern``
  (PEFT's defaults: ``layers``, ``h``, ``block``, ``blocks``, ``layer``), or
  replaces a literal ``{layer}`` that ``name_map`` put in the path. Loading
  recognises a numbered path whose un-numbered form is a module of ``params``
  and stacks the layers back (every layer must be present).
* **N-D kernels** (``DenseGeneral``): the input axes and the output axes are each
  flattened in row-major order, so a ``(d, heads, head_dim)`` kernel exports as
  a torch ``Linear(d, heads * head_dim)``; loading reshapes back, choosing the
  smallest number of leading input axes that fits (``in_axes`` overrides).
* **Full tensors** (``modules_to_save``, biases): torch ``weight`` is a Flax
  ``kernel`` transposed (N-D kernels flattened as above), or an ``embedding`` /
  norm ``scale`` as it is; ``bias`` and other leaves keep their name and shape.
  Kernels are always written in ``nn.Linear`` layout (``fan_in_fan_out`` only
  concerns the LoRA factors), so a GPT-2 ``Conv1D`` module, whose torch weight
  is (in, out), cannot be a ``modules_to_save`` entry.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from lora_jax.config import DEFAULT_LAYERS_PATTERNS, LoraConfig, layer_index, matches, pattern_key
from lora_jax.tree import Adapter, KeyPath, Target, check_adapter, find_targets, named_leaves

PEFT_FORMAT_VERSION = "0.21.2"
CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
KEY_PREFIX = "base_model.model."
LAYER_PLACEHOLDER = "{layer}"
TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
# PEFT's EMBEDDING_LAYER_NAMES: naming one in target_modules makes its
# save_embedding_layers="auto" save the targeted embeddings' base tables.
_PEFT_EMBEDDING_NAMES = ("embed_tokens", "lm_head")
# Names that suggest an embedding table when save_peft has no params to look at.
_EMBEDDING_HINTS = ("embed_tokens", "wte", "wpe", "word_embeddings", "position_embeddings",
                    "token_type_embeddings", "embed_positions", "embeddings", "embedding", "shared")

NameMap = Callable[[str], str] | Mapping[str, str] | None

# Every key peft 0.21's LoraConfig writes, with its default.
_PEFT_CONFIG_DEFAULTS: dict[str, Any] = {
    "alora_invocation_tokens": None, "alpha_pattern": {}, "arrow_config": None,
    "auto_mapping": None, "base_model_name_or_path": None, "bias": "none",
    "corda_config": None, "ensure_weight_tying": False, "eva_config": None,
    "exclude_modules": None, "fan_in_fan_out": False, "inference_mode": True,
    "init_lora_weights": True, "kasa_config": None, "layer_replication": None,
    "layers_pattern": None, "layers_to_transform": None, "loftq_config": {},
    "lora_alpha": 8, "lora_bias": False, "lora_dropout": 0.0, "lora_ga_config": None,
    "megatron_config": None, "megatron_core": "megatron.core", "modules_to_save": None,
    "monteclora_config": None, "peft_type": "LORA", "peft_version": PEFT_FORMAT_VERSION,
    "qalora_group_size": 16, "r": 8, "rank_pattern": {}, "revision": None,
    "target_modules": None, "target_parameters": None, "task_type": None,
    "trainable_token_indices": None, "use_bdlora": None, "use_dora": False,
    "use_qalora": False, "use_rslora": False, "velora_config": None,
}

# adapter_config.json settings that change what the adapter computes in ways
# lora_jax does not implement: loading refuses them rather than load wrong maths.
_UNSUPPORTED_SETTINGS = {
    "use_dora": "DoRA (use_dora=true) is not supported yet",
    "lora_bias": "a bias on lora_B (lora_bias=true) is not supported",
    "use_qalora": "QA-LoRA (use_qalora=true) is not supported",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) is not supported",
    "arrow_config": "Arrow routing (arrow_config) is not supported",
    "use_bdlora": "block-diagonal LoRA (use_bdlora) is not supported",
    "monteclora_config": "MonteCLoRA (monteclora_config) is not supported",
    "kasa_config": "KaSA (kasa_config) is not supported",
    "trainable_token_indices": "trainable tokens (trainable_token_indices) are not supported",
    "layer_replication": "layer_replication is not supported",
    "target_parameters": "LoRA on bare parameters (target_parameters) is not supported",
}
# Initialisations after which PEFT's base weights differ from the pretrained ones.
_BASE_MUTATING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")


class LoadedPeft(tuple):
    """What :func:`load_peft` returns: unpacks as ``adapter, config``, plus ``.params``.

    Attributes:
        adapter: ``{module_name: {"lora_A": A, "lora_B": B}}`` for ``params``.
        config: a :class:`LoraConfig` under which ``lora``, ``merge`` and
            ``trainable_mask`` see exactly the modules of the file.
        params: the given params with the file's full tensors written in
            (``modules_to_save``, trained biases, saved embedding tables);
            leaves the file does not touch are the same objects as before.
            Use it in place of the params you passed when the file has any.
    """

    params: Any

    def __new__(cls, adapter: Adapter, config: LoraConfig, params: Any) -> LoadedPeft:
        loaded = super().__new__(cls, (adapter, config))
        loaded.params = params
        return loaded

    @property
    def adapter(self) -> Adapter:
        return self[0]

    @property
    def config(self) -> LoraConfig:
        return self[1]


# -- module paths ---------------------------------------------------------------------------

def _path_mapper(name_map: NameMap) -> Callable[[str], str]:
    """lora_jax module name -> torch module path, from ``name_map``."""
    if name_map is None:
        return lambda name: name
    if isinstance(name_map, Mapping):
        table = dict(name_map)

        def by_prefix(name: str) -> str:
            parts = name.split(".")
            for cut in range(len(parts), 0, -1):
                head = ".".join(parts[:cut])
                if head in table:
                    return ".".join(p for p in [table[head], *parts[cut:]] if p)
            return name

        return by_prefix
    if callable(name_map):
        def call(name: str) -> str:
            path = name_map(name)
            if not isinstance(path, str):
                raise TypeError(f"name_map({name!r}) returned {path!r}; it must return a torch module path.")
            return path

        return call
    raise TypeError(f"name_map must be a callable, a dict or None, got {type(name_map).__name__}.")


def _layer_patterns(layers_pattern: str | Sequence[str] | None) -> tuple[str, ...]:
    if layers_pattern is None:
        return tuple(DEFAULT_LAYERS_PATTERNS)
    return (layers_pattern,) if isinstance(layers_pattern, str) else tuple(layers_pattern)


def _with_layer(path: str, index: int, patterns: tuple[str, ...], module_name: str) -> str:
    """``path`` of layer ``index`` of a stacked module (see the module docstring)."""
    if LAYER_PLACEHOLDER in path:
        return path.replace(LAYER_PLACEHOLDER, str(index))
    parts = path.split(".")
    for j, part in enumerate(parts):
        if part in patterns:
            return ".".join(parts[: j + 1] + [str(index)] + parts[j + 1 :])
    raise ValueError(
        f"Stacked module {module_name!r} (torch path {path!r}) has no path component named one of "
        f"{patterns}, so save_peft cannot tell where the layer index goes. Set "
        "LoraConfig.layers_pattern to the name of the layer container, or pass a name_map that "
        f"returns a path containing '{LAYER_PLACEHOLDER}'."
    )


def _layer_paths(path: str, num_lead: int, size: int, patterns: tuple[str, ...],
                 module_name: str) -> list[tuple[int | None, str]]:
    if not num_lead:
        return [(None, path)]
    return [(i, _with_layer(path, i, patterns, module_name)) for i in range(size)]


def _stack_container(module_name: str, patterns: tuple[str, ...]) -> str | None:
    """``model.layers`` for ``model.layers.self_attn.q_proj`` (an un-numbered container)."""
    parts = module_name.split(".")
    for j, part in enumerate(parts[:-1]):
        if part in patterns and not parts[j + 1].isdigit():
            return ".".join(parts[: j + 1])
    return None


def _in_modules(spec: Sequence[str], module_name: str) -> bool:
    """Whether ``module_name`` or one of its ancestors matches ``spec`` (PEFT's rule)."""
    parts = module_name.split(".")
    return any(matches(tuple(spec), ".".join(parts[:i])) for i in range(1, len(parts) + 1))


def _closest(wanted: str, names: Sequence[str], n: int = 8) -> str:
    found = difflib.get_close_matches(wanted, list(names), n=n, cutoff=0.0)
    return ", ".join(found) if found else "(none)"


# -- export ---------------------------------------------------------------------------------

def _to_numpy(x: Any) -> np.ndarray:
    return np.asarray(jax.device_get(x))


def _torch_leaf(leaf_name: str) -> str:
    return "weight" if leaf_name in ("kernel", "embedding", "scale") else leaf_name


def _kernel_to_torch(value: np.ndarray, num_in: int) -> np.ndarray:
    """A Flax kernel ``in_shape + out_shape`` as a torch Linear weight (out, in)."""
    if value.ndim < 2:
        return value
    fan_in = math.prod(value.shape[:num_in])
    return value.reshape(fan_in, -1).T


def _targets_without_params(config: LoraConfig, adapter: Adapter) -> dict[str, Target]:
    targets = {}
    for name, pair in adapter.items():
        if name.rsplit(".", 1)[-1] in _EMBEDDING_HINTS:
            raise ValueError(
                f"Module {name!r} looks like an embedding table, whose PEFT keys differ from a "
                "kernel's (lora_embedding_A/B); pass params (or jax.eval_shape of them) to save_peft "
                "so it can tell."
            )
        a, b = pair["lora_A"], pair["lora_B"]
        lead = 1 if config.is_stacked(name) else 0
        rank = a.shape[-1]
        if config.rank(name) != rank:
            raise ValueError(
                f"adapter[{name!r}]['lora_A'] has rank {rank} (shape {tuple(a.shape)}), but the "
                f"config gives {name} rank {config.rank(name)}."
            )
        shape = tuple(a.shape[:-1]) + tuple(b.shape[lead + 1 :])
        targets[name] = Target(
            module_name=name, path=(), leaf_name="kernel", shape=shape, dtype=a.dtype,
            num_lead=lead, num_in=a.ndim - 1 - lead, rank=rank, scaling=config.scaling(name),
        )
    return targets


def _save_embedding_bases(config: LoraConfig, mode: bool | str, module_paths: Sequence[str]) -> bool:
    """PEFT's ``save_embedding_layers``: "auto" is True when an embedding name is targeted."""
    if mode != "auto":
        return bool(mode)
    spec = config.target_modules
    if isinstance(spec, str):
        if spec == "all-linear":
            return False
        return any(matches(spec, p) for p in module_paths
                   if any(re.match(rf"(.*\.)?{e}$", p) for e in _PEFT_EMBEDDING_NAMES))
    return any(e in spec for e in _PEFT_EMBEDDING_NAMES)


def _stacked_lead(targets: Mapping[str, Target], patterns: tuple[str, ...],
                  to_torch: Callable[[str], str]) -> Callable[[str, Any], int]:
    """``lead(module, leaf)``: the number of layers if ``module`` is stacked, else 0.

    A module is stacked if it is a stacked target, lies in the same un-numbered
    layer container (``model.layers``) as one, or ``name_map`` gives it a
    ``{layer}`` placeholder.
    """
    containers = {}
    for name, target in targets.items():
        container = _stack_container(name, patterns) if target.num_lead else None
        if container is not None:
            containers[container] = target.lead_shape[0]
    sizes = {t.lead_shape[0] for t in targets.values() if t.num_lead}

    def lead(module: str, leaf: Any) -> int:
        if module in targets:
            return targets[module].lead_shape[0] if targets[module].num_lead else 0
        shape = tuple(np.shape(leaf))
        found = [size for container, size in containers.items() if module.startswith(container + ".")
                 and not module[len(container) + 1 :].split(".")[0].isdigit()]
        if LAYER_PLACEHOLDER in to_torch(module):
            found.append(next(iter(sizes)) if len(sizes) == 1 else (shape[0] if shape else 0))
        if not found:
            return 0
        if shape[:1] != (found[0],):
            raise ValueError(
                f"Module {module!r} lies in stacked layers ({found[0]} layers) but its leaf has shape "
                f"{shape}, without that leading layer axis."
            )
        return found[0]

    return lead


def _full_tensors(
    params: Any, config: LoraConfig, targets: Mapping[str, Target], to_torch: Callable[[str], str],
    patterns: tuple[str, ...], save_embedding_layers: bool | str,
) -> tuple[list[tuple[str, np.ndarray, str]], list[str]]:
    """``([(key, tensor, source)], module_paths)``: the full tensors to write, and
    every torch module path of ``params`` (for checking ``target_modules``)."""
    leaves = list(named_leaves(params))
    lead = _stacked_lead(targets, patterns, to_torch)

    def torch_paths(module: str, leaf: Any) -> list[tuple[int | None, str]]:
        size = lead(module, leaf)
        return _layer_paths(to_torch(module), 1 if size else 0, size, patterns, module)

    all_paths: set[str] = set()
    for _, module, _, leaf in leaves:
        for _, path in torch_paths(module, leaf) if module else []:
            parts = path.split(".")
            all_paths.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    module_paths = sorted(all_paths)
    save_bases = _save_embedding_bases(config, save_embedding_layers, module_paths)

    saved = tuple(config.modules_to_save or ())
    for name in targets:
        if saved and _in_modules(saved, name):
            raise ValueError(
                f"Module {name!r} is both a LoRA target and in modules_to_save={saved!r}; PEFT cannot "
                "hold both. Drop it from one of them."
            )
    out = []
    for _, module, leaf_name, leaf in leaves:
        target = targets.get(module)
        if saved and _in_modules(saved, module):
            part = _torch_leaf(leaf_name)
        elif leaf_name == "bias" and (config.bias == "all" or (config.bias == "lora_only" and target)):
            part = "base_layer.bias" if target else "bias"
        elif save_bases and target is not None and leaf_name == target.leaf_name and (
                target.is_embedding or module.rsplit(".", 1)[-1] == "lm_head"):
            part = "base_layer.weight"
        else:
            continue
        value = _to_numpy(leaf)
        num_in = target.num_in if target else config.num_in_axes(module)
        for index, path in torch_paths(module, leaf):
            v = value if index is None else value[index]
            if leaf_name == "kernel":
                v = _kernel_to_torch(v, num_in)
            elif leaf_name == "bias":
                v = v.reshape(-1)  # the bias of an N-D (DenseGeneral) kernel, flattened like its output
            out.append((f"{path}.{part}", v, f"params leaf {module}.{leaf_name}"))
    return out, module_paths


def to_peft(
    adapter: Adapter,
    config: LoraConfig,
    params: Any = None,
    *,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
    name_map: NameMap = None,
    save_embedding_layers: bool | Literal["auto"] = "auto",
    dtype: Any = jnp.float32,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """:func:`save_peft` in memory: the PEFT state dict and the ``adapter_config.json`` dict.

    Example::

        tensors, peft_config = to_peft(adapter, config, params)
        tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape  # (r, in)
    """
    if task_type is not None and task_type not in TASK_TYPES:
        raise ValueError(f"task_type must be one of {TASK_TYPES} or None, got {task_type!r}.")
    to_torch = _path_mapper(name_map)
    patterns = _layer_patterns(config.layers_pattern)
    if params is None:
        if config.modules_to_save or config.bias != "none" or save_embedding_layers is True:
            raise ValueError(
                f"save_peft needs params to write modules_to_save={config.modules_to_save!r}, "
                f"bias={config.bias!r} or save_embedding_layers=True tensors; pass the params tree."
            )
        targets = _targets_without_params(config, adapter)
    else:
        targets = find_targets(config, params)
    check_adapter(targets, adapter)

    items: list[tuple[str, np.ndarray, str]] = []
    exported: dict[str, Target] = {}  # torch path -> target, one per layer of a stacked target
    for name, target in targets.items():
        a, b = _to_numpy(adapter[name]["lora_A"]), _to_numpy(adapter[name]["lora_B"])
        size = target.lead_shape[0] if target.num_lead else 0
        names = ("lora_embedding_A", "lora_embedding_B") if target.is_embedding else (
            "lora_A.weight", "lora_B.weight")
        for index, path in _layer_paths(to_torch(name), target.num_lead, size, patterns, name):
            a_i, b_i = (a, b) if index is None else (a[index], b[index])
            # (in..., r) -> (r, in) and (r, out...) -> (out, r): torch nn.Linear orientation.
            items.append((f"{path}.{names[0]}", a_i.reshape(-1, target.rank).T, f"adapter[{name!r}]"))
            items.append((f"{path}.{names[1]}", b_i.reshape(target.rank, -1).T, f"adapter[{name!r}]"))
            exported[path] = target
    module_paths = saved_paths = None
    if params is not None:
        full, module_paths = _full_tensors(params, config, targets, to_torch, patterns, save_embedding_layers)
        items += full
        if config.modules_to_save and name_map is not None:
            modules = [m for _, m, _, _ in named_leaves(params)]
            saved_paths = _saved_torch_paths(config.modules_to_save, modules, to_torch)

    tensors: dict[str, np.ndarray] = {}
    origin: dict[str, str] = {}
    for key, value, source in items:
        key = KEY_PREFIX + key
        if key in tensors:
            raise ValueError(
                f"{source} and {origin[key]} both map to the PEFT key {key!r}; name_map must give every "
                "module its own torch path."
            )
        tensors[key] = np.ascontiguousarray(value.astype(np.dtype(dtype)))
        origin[key] = source
    names_unchanged = name_map is None and not any(t.num_lead for t in targets.values())
    peft_config = _peft_config(config, exported, module_paths, names_unchanged,
                               base_model_name_or_path, task_type, saved_paths)
    return tensors, peft_config


def _saved_torch_paths(spec: Sequence[str], modules: Sequence[str],
                       to_torch: Callable[[str], str]) -> list[str]:
    """Torch paths of the modules that ``modules_to_save`` entries select (not their children)."""
    selected = set()
    for module in modules:
        parts = module.split(".")
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            if matches(tuple(spec), prefix):
                selected.add(prefix)
                break
    return sorted({to_torch(m) for m in selected})


def _peft_config(
    config: LoraConfig,
    exported: Mapping[str, Target],
    module_paths: Sequence[str] | None,
    names_unchanged: bool,
    base_model_name_or_path: str | None,
    task_type: str | None,
    saved_paths: Sequence[str] | None,
) -> dict[str, Any]:
    """adapter_config.json: the config's own patterns where PEFT reads them the same on
    the torch paths, otherwise exact module paths."""
    out = dict(_PEFT_CONFIG_DEFAULTS)
    out.update(
        r=config.r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
        use_rslora=config.use_rslora, fan_in_fan_out=config.fan_in_fan_out, bias=config.bias,
        init_lora_weights=config.init_lora_weights, base_model_name_or_path=base_model_name_or_path,
        task_type=task_type,
    )
    paths = sorted(exported)
    spec = config.target_modules
    keep_spec = False
    if spec != "all-linear":
        if module_paths is not None:
            selected = {p for p in module_paths if matches(spec, p)}
            if config.exclude_modules is not None:
                selected = {p for p in selected if not matches(config.exclude_modules, p)}
            if config.layers_to_transform is not None:
                keep = set(config.layers_to_transform)
                selected = {p for p in selected if layer_index(p, config.layers_pattern) in keep}
            keep_spec = selected == set(paths)
        else:
            keep_spec = names_unchanged
    if keep_spec:
        out["target_modules"] = spec if isinstance(spec, str) else list(spec)
        out["exclude_modules"] = (config.exclude_modules if isinstance(config.exclude_modules, str)
                                  or config.exclude_modules is None else list(config.exclude_modules))
        out["layers_to_transform"] = (None if config.layers_to_transform is None
                                      else list(config.layers_to_transform))
        out["layers_pattern"] = (config.layers_pattern if isinstance(config.layers_pattern, str)
                                 or config.layers_pattern is None else list(config.layers_pattern))
    else:
        out["target_modules"] = paths

    def peft_value(patterns: Mapping[str, Any], default: Any, path: str) -> Any:
        key = pattern_key(patterns, path)
        return default if key is None else patterns[key]

    consistent = all(
        peft_value(config.rank_pattern, config.r, p) == t.rank
        and peft_value(config.alpha_pattern, config.lora_alpha, p) == config.alpha(t.module_name)
        for p, t in exported.items()
    )
    if consistent:
        out["rank_pattern"] = dict(config.rank_pattern)
        out["alpha_pattern"] = dict(config.alpha_pattern)
    else:
        def key(path: str) -> str:  # PEFT matches keys as suffixes: anchor if another path ends alike
            return ("^" if any(q != path and q.endswith("." + path) for q in paths) else "") + path

        out["rank_pattern"] = {key(p): t.rank for p, t in sorted(exported.items()) if t.rank != config.r}
        out["alpha_pattern"] = {
            key(p): config.alpha(t.module_name) for p, t in sorted(exported.items())
            if config.alpha(t.module_name) != config.lora_alpha
        }

    if config.modules_to_save:
        out["modules_to_save"] = list(config.modules_to_save if saved_paths is None else saved_paths)
    return out


def _model_card(config: LoraConfig, num_modules: int, base_model: str | None, task_type: str | None) -> str:
    import lora_jax  # the package is fully imported by the time this runs

    front = []
    if base_model:
        front.append(f"base_model: {json.dumps(base_model)}")
    front.append("library_name: peft")
    if task_type == "CAUSAL_LM":
        front.append("pipeline_tag: text-generation")
    tags = sorted(["lora", "lora_jax"] + ([f"base_model:adapter:{base_model}"] if base_model else []))
    front.append("tags:")
    front.extend(f"- {json.dumps(tag)}" for tag in tags)
    lines = [
        "---", *front, "---", "",
        "# LoRA adapter", "",
        "A LoRA adapter in Hugging Face PEFT's format, written by lora_jax (JAX). Load it with",
        "`peft.PeftModel.from_pretrained(base_model, path)` in PyTorch or",
        "`lora_jax.load_peft(path, params)` in JAX.", "",
        f"- Base model: {base_model or 'not recorded'}",
        f"- Rank r = {config.r}, lora_alpha = {config.lora_alpha}"
        + (" (rsLoRA scaling)" if config.use_rslora else ""),
        f"- Adapted modules: {num_modules}", "",
        "### Framework versions", "",
        f"- PEFT {PEFT_FORMAT_VERSION} (adapter format)",
        f"- lora_jax {getattr(lora_jax, '__version__', 'unknown')}", "",
    ]
    return "\n".join(lines)


def save_peft(
    path: str | os.PathLike,
    adapter: Adapter,
    config: LoraConfig,
    params: Any = None,
    *,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
    adapter_name: str = "default",
    name_map: NameMap = None,
    save_embedding_layers: bool | Literal["auto"] = "auto",
    dtype: Any = jnp.float32,
    overwrite: bool = False,
) -> Path:
    """Write ``adapter`` as a PEFT adapter directory that ``PeftModel.from_pretrained`` loads.

    Example::

        lora_jax.save_peft("out/adapter", adapter, config, params,
                           base_model_name_or_path="HuggingFaceTB/SmolLM2-135M")
        # in PyTorch:
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(...), "out/adapter")

    Args:
        path: the adapter directory. ``adapter_name`` other than "default"
            writes to ``path/adapter_name`` as PEFT does.
        adapter, config: what :func:`lora_jax.init` and training produced.
        params: the base params. Needed for ``modules_to_save``, ``bias`` other
            than "none", embedding tables and ``save_embedding_layers``; shapes
            (``jax.eval_shape``) suffice when only the adapter is written.
        base_model_name_or_path, task_type: recorded in adapter_config.json
            (``task_type`` is PEFT's, e.g. "CAUSAL_LM").
        name_map: lora_jax module name -> torch module path, as a callable or
            a dict of dotted prefixes (``{"decoder": "model"}``); see the
            module docstring for stacked layers and ``{layer}``.
        save_embedding_layers: PEFT's option: also write the base table of each
            targeted embedding (and a targeted ``lm_head``) as
            ``<module>.base_layer.weight``. "auto" does so when
            ``target_modules`` names ``embed_tokens`` or ``lm_head``, as PEFT
            does for transformers models.
        dtype: dtype of every tensor written (float32 by default).
        overwrite: replace the adapter files in an existing non-empty directory.

    Returns:
        The directory the adapter was written to.

    ``target_modules``, ``rank_pattern`` and ``alpha_pattern`` are written as
    given when PEFT's matching on the torch paths selects the same modules with
    the same ranks; otherwise (stacked layers, ``name_map``, "all-linear")
    they are written as exact torch module paths, so PEFT adapts exactly the
    modules whose tensors are in the file.
    """
    out_dir = Path(path) if adapter_name == "default" else Path(path) / adapter_name
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a directory.")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        found = sorted(p.name for p in out_dir.iterdir())
        raise FileExistsError(
            f"{out_dir} is not empty (contains {', '.join(found[:6])}{', ...' if len(found) > 6 else ''}); "
            "pass overwrite=True to replace the adapter files, or choose another directory."
        )
    tensors, peft_config = to_peft(
        adapter, config, params, base_model_name_or_path=base_model_name_or_path, task_type=task_type,
        name_map=name_map, save_embedding_layers=save_embedding_layers, dtype=dtype,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    safetensors.numpy.save_file(tensors, str(out_dir / SAFETENSORS_NAME), metadata={"format": "pt"})
    with open(out_dir / CONFIG_NAME, "w") as f:
        json.dump(peft_config, f, indent=2, sort_keys=True)
        f.write("\n")
    stale = out_dir / BIN_NAME  # PEFT reads safetensors first, other loaders may not
    if stale.exists():
        stale.unlink()
    card = Path(path) / "README.md"
    if not card.exists():
        num_modules = sum(k.endswith((".lora_A.weight", ".lora_embedding_A")) for k in tensors)
        card.write_text(_model_card(config, num_modules, base_model_name_or_path, task_type))
    return out_dir


# -- import ---------------------------------------------------------------------------------

_LINEAR_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)(?:\.(?P<name>[^.]+))?\.weight$")
_EMBEDDING_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_embedding_A|lora_embedding_B)(?:\.(?P<name>[^.]+))?$")
_LORA_BIAS_KEY = re.compile(r"\.lora_B(?:\.[^.]+)?\.bias$")
_SAVED_COPY_KEY = re.compile(r"^(?P<module>.+)\.modules_to_save\.(?P<rest>.+)$")
_FULL_KEY = re.compile(r"^(?P<module>.+?)(?:\.base_layer)?\.(?P<leaf>[^.]+)$")


def _check_peft_config(peft_config: Mapping[str, Any], source: str) -> None:
    peft_type = peft_config.get("peft_type")
    if peft_type is None:
        raise ValueError(f"{source} has no peft_type; it is not a PEFT adapter config.")
    if str(peft_type).upper() != "LORA":
        raise ValueError(f"{source} is a {peft_type} adapter; lora_jax reads only peft_type LORA.")
    for key, why in _UNSUPPORTED_SETTINGS.items():
        if peft_config.get(key):
            raise ValueError(f"{source}: {why} ({key}={peft_config[key]!r}).")
    init = peft_config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_MUTATING_INITS):
        raise ValueError(
            f"{source}: init_lora_weights={init!r} changes the base model's weights in PEFT, so this "
            "adapter only works on that modified base. Convert it to a plain LoRA in PEFT with "
            "save_pretrained(..., path_initial_model_for_weight_conversion=...) first."
        )
    if peft_config.get("bias", "none") not in ("none", "all", "lora_only"):
        raise ValueError(f"{source}: bias={peft_config['bias']!r} is not one of 'none', 'all', 'lora_only'.")


def _split_dims(body: tuple[int, ...], fan_in: int, fan_out: int, forced: int | None) -> int | None:
    """How many leading axes of ``body`` are input axes so that they hold ``fan_in`` values."""
    choices = [forced] if forced is not None else range(1, len(body))
    for k in choices:
        if 1 <= k < len(body) and math.prod(body[:k]) == fan_in and math.prod(body[k:]) == fan_out:
            return k
    return None


@dataclasses.dataclass
class _Factors:
    """``lora_A`` / ``lora_B`` of one module (one layer of it, if stacked) and their keys."""

    torch_path: str
    a: tuple[str, np.ndarray] | None = None
    b: tuple[str, np.ndarray] | None = None


class _ParamsIndex:
    """The modules and leaves of ``params``, and the torch path of each module."""

    def __init__(self, params: Any, to_torch: Callable[[str], str], patterns: tuple[str, ...],
                 source: str) -> None:
        self.patterns = patterns
        self.source = source
        self.leaves: dict[tuple[str, str], tuple[KeyPath, Any]] = {}
        self.leaves_of: dict[str, list[str]] = {}
        self.by_torch: dict[str, str] = {}
        for path, module, leaf_name, leaf in named_leaves(params):
            self.leaves[(module, leaf_name)] = (path, leaf)
            if module in self.leaves_of:
                self.leaves_of[module].append(leaf_name)
                continue
            self.leaves_of[module] = [leaf_name]
            if not module:
                continue
            torch_path = to_torch(module)
            if torch_path in self.by_torch:
                raise ValueError(
                    f"name_map maps both {self.by_torch[torch_path]!r} and {module!r} to {torch_path!r}; "
                    "it must give every module its own torch path."
                )
            self.by_torch[torch_path] = module

    def resolve(self, torch_path: str, key: str) -> tuple[str, int | None]:
        """``(module, layer)`` for a torch path; ``layer`` is set for a stacked module."""
        if torch_path in self.by_torch:
            return self.by_torch[torch_path], None
        parts = torch_path.split(".")
        for j, part in enumerate(parts):
            if not part.isdigit():
                continue
            candidates = [".".join(parts[:j] + [LAYER_PLACEHOLDER] + parts[j + 1 :])]
            if j > 0 and parts[j - 1] in self.patterns:
                candidates.append(".".join(parts[:j] + parts[j + 1 :]))
            for candidate in candidates:
                if candidate in self.by_torch:
                    return self.by_torch[candidate], int(part)
        raise ValueError(
            f"{self.source}: key {key!r} is for module {torch_path!r}, which the params do not have. "
            f"Closest modules of the params (as torch paths): {_closest(torch_path, list(self.by_torch))}. "
            "If the params tree names modules differently from PyTorch, pass name_map."
        )


def _check_layers(layers: Sequence[int | None], shape: tuple[int, ...], what: str, source: str) -> bool:
    """Whether ``layers`` are the complete layer set of a stacked leaf (raise if partial)."""
    if None in layers:
        if len(layers) > 1:
            raise ValueError(f"{source}: {what} has both per-layer and un-numbered keys.")
        return False
    size = shape[0] if shape else 0
    if sorted(layers) != list(range(size)):
        raise ValueError(
            f"{source}: stacked {what} of shape {shape} has {size} layers, but the file has keys for "
            f"layers {sorted(layers)}. A stacked leaf needs every layer; unroll the layers "
            "(e.g. scan_layers=False) to load this adapter."
        )
    return True


def _sort_keys(tensors: Mapping[str, Any], index: _ParamsIndex, source: str) -> tuple[
        dict[str, dict[int | None, _Factors]], dict[tuple[str, str], dict[int | None, tuple[str, np.ndarray]]]]:
    """Split PEFT keys into LoRA factors per module and full tensors per (module, torch leaf)."""
    factors: dict[str, dict[int | None, _Factors]] = {}
    full: dict[tuple[str, str], dict[int | None, tuple[str, np.ndarray]]] = {}
    names_inside: set[str] = set()
    copies = []
    for key, value in tensors.items():
        bare = key.removeprefix(KEY_PREFIX)
        if "lora_magnitude_vector" in bare:
            raise ValueError(f"{source}: key {key!r} is a DoRA magnitude vector; DoRA is not supported yet.")
        if _LORA_BIAS_KEY.search(bare):
            raise ValueError(f"{source}: key {key!r} is a lora_B bias (lora_bias=True), which is not supported.")
        if "trainable_tokens" in bare or ".token_adapter." in bare:
            raise ValueError(f"{source}: key {key!r} holds trainable tokens, which are not supported.")
        if ".original_module." in bare:
            continue  # PEFT's frozen copy inside a modules_to_save wrapper (bias="all")
        found = _LINEAR_KEY.match(bare) or _EMBEDDING_KEY.match(bare)
        if found:
            if found["name"]:
                names_inside.add(found["name"])
            module, layer = index.resolve(found["module"], key)
            entry = factors.setdefault(module, {}).setdefault(layer, _Factors(found["module"]))
            if found["part"].endswith("A"):
                entry.a = (key, np.asarray(value))
            else:
                entry.b = (key, np.asarray(value))
            continue
        copy = _SAVED_COPY_KEY.match(bare)
        if copy:
            copies.append((key, copy["module"], copy["rest"], np.asarray(value)))
            continue
        found = _FULL_KEY.match(bare)
        if not found:
            raise ValueError(f"{source}: key {key!r} names no module; expected '<module path>.<tensor>'.")
        module, layer = index.resolve(found["module"], key)
        full.setdefault((module, found["leaf"]), {})[layer] = (key, np.asarray(value))
    if len(names_inside) > 1:
        raise ValueError(
            f"{source}: keys carry several adapter names {sorted(names_inside)} "
            "('.lora_A.<name>.weight'); save one adapter per directory."
        )
    if names_inside:
        warnings.warn(
            f"{source}: keys contain the adapter name {next(iter(names_inside))!r} "
            "('.lora_A.<name>.weight'); lora_jax strips it, but PEFT itself would ignore these keys.",
            UserWarning, stacklevel=4,
        )
    # With bias="all" PEFT also writes '<module>.modules_to_save.bias' beside '<module>.bias':
    # use such a copy only where the plain key is missing.
    for key, module_path, rest, value in copies:
        parts = rest.split(".")
        if len(parts) > 1 and parts[0] in names_inside | {"default"}:
            parts = parts[1:]
        found = _FULL_KEY.match(".".join([module_path, *parts]))
        module, layer = index.resolve(found["module"], key)
        full.setdefault((module, found["leaf"]), {}).setdefault(layer, (key, value))
    return factors, full


def _forced_in_axes(in_axes: Mapping[str, int], module: str) -> int | None:
    key = pattern_key(in_axes, module)
    return None if key is None else int(in_axes[key])


def _adapter_pair(
    module: str, layers: Mapping[int | None, _Factors], index: _ParamsIndex, peft_config: Mapping[str, Any],
    in_axes: Mapping[str, int], kernel_names: Sequence[str], source: str,
) -> tuple[dict[str, np.ndarray], int, float, int, bool]:
    """``(pair, rank, alpha, num_in, stacked)`` for one adapted module."""
    kernel = [n for n in index.leaves_of[module] if n in kernel_names]
    first = next(iter(layers.values()))
    some_key = (first.a or first.b)[0]
    if len(kernel) != 1:
        raise ValueError(
            f"{source}: key {some_key!r} adapts module {module!r}, whose leaves are "
            f"{sorted(index.leaves_of[module])}; it needs exactly one kernel leaf named one of "
            f"{tuple(kernel_names)} (pass kernel_names= to load_peft)."
        )
    leaf_name = kernel[0]
    shape = tuple(np.shape(index.leaves[(module, leaf_name)][1]))
    stacked = _check_layers(list(layers), shape, f"kernel {module}.{leaf_name}", source)
    body = shape[1:] if stacked else shape
    r = int(peft_config.get("r", 8))
    alpha = peft_config.get("lora_alpha", 8)
    rank_pattern = peft_config.get("rank_pattern") or {}
    alpha_pattern = peft_config.get("alpha_pattern") or {}
    a_list, b_list, seen = [], [], None
    for layer in sorted(layers, key=lambda i: -1 if i is None else i):
        entry = layers[layer]
        if entry.a is None or entry.b is None:
            have = (entry.a or entry.b)[0]
            raise ValueError(f"{source}: {have!r} has no matching lora_{'B' if entry.b is None else 'A'} tensor.")
        (key_a, lora_a), (key_b, lora_b) = entry.a, entry.b
        if lora_a.ndim != 2 or lora_b.ndim != 2 or lora_a.shape[0] != lora_b.shape[1]:
            raise ValueError(
                f"{source}: {key_a!r} has shape {tuple(lora_a.shape)} and {key_b!r} has shape "
                f"{tuple(lora_b.shape)}; expected (r, in_features) and (out_features, r)."
            )
        rank, fan_in, fan_out = lora_a.shape[0], lora_a.shape[1], lora_b.shape[0]
        num_in = _split_dims(body, fan_in, fan_out, _forced_in_axes(in_axes, module))
        if num_in is None:
            hint = ""
            if len(body) == 2 and body == (fan_out, fan_in):
                hint = (" The kernel looks transposed: lora_jax expects Flax kernels laid out (in, out), "
                        "the transpose of torch's nn.Linear weight.")
            raise ValueError(
                f"{source}: {key_a!r} {tuple(lora_a.shape)} and {key_b!r} {tuple(lora_b.shape)} form a LoRA "
                f"for in_features={fan_in}, out_features={fan_out}, which does not fit kernel "
                f"{module}.{leaf_name} of shape {shape}" + (" (after its layer axis)" if stacked else "")
                + "." + hint
            )
        key = pattern_key(rank_pattern, entry.torch_path)
        want = r if key is None else int(rank_pattern[key])
        if rank != want:
            given_by = "r" if key is None else f"rank_pattern[{key!r}]"
            raise ValueError(
                f"{source}: {key_a!r} has shape {tuple(lora_a.shape)}, i.e. rank {rank}, but the config's "
                f"{given_by} gives {entry.torch_path} rank {want}."
            )
        key = pattern_key(alpha_pattern, entry.torch_path)
        layer_alpha = alpha if key is None else alpha_pattern[key]
        if seen is not None and seen != (rank, layer_alpha):
            raise ValueError(
                f"{source}: the layers of stacked module {module!r} differ in (rank, lora_alpha): {seen} vs "
                f"{(rank, layer_alpha)} at {entry.torch_path}. A stacked adapter needs one rank and alpha "
                "for all layers; unroll the layers to load it."
            )
        seen = (rank, layer_alpha)
        a_list.append(lora_a.T.reshape(body[:num_in] + (rank,)))
        b_list.append(lora_b.T.reshape((rank,) + body[num_in:]))
    pair = {"lora_A": np.stack(a_list) if stacked else a_list[0],
            "lora_B": np.stack(b_list) if stacked else b_list[0]}
    return pair, seen[0], seen[1], num_in, stacked


def _full_update(
    module: str, torch_leaf: str, layers: Mapping[int | None, tuple[str, np.ndarray]], index: _ParamsIndex,
    in_axes: Mapping[str, int], source: str,
) -> tuple[KeyPath, jax.Array]:
    """The params leaf a full tensor replaces, and its new value in that leaf's layout and dtype."""
    some_key = next(iter(layers.values()))[0]
    names = index.leaves_of.get(module, [])
    if torch_leaf == "weight":
        choices = [n for n in ("kernel", "embedding", "scale", "weight") if n in names]
    else:
        choices = [torch_leaf] if torch_leaf in names else []
    if not choices:
        raise ValueError(
            f"{source}: key {some_key!r} has no counterpart in module {module!r}, whose leaves are {sorted(names)}."
        )
    leaf_name = choices[0]
    path, leaf = index.leaves[(module, leaf_name)]
    shape = tuple(np.shape(leaf))
    stacked = _check_layers(list(layers), shape, f"leaf {module}.{leaf_name}", source)
    body = shape[1:] if stacked else shape
    values = []
    for layer in sorted(layers, key=lambda i: -1 if i is None else i):
        key, value = layers[layer]
        if leaf_name == "kernel" and value.ndim == 2:  # torch (out, in) -> Flax (in..., out...)
            num_in = _split_dims(body, value.shape[1], value.shape[0], _forced_in_axes(in_axes, module))
            value = value.T if num_in is None else value.T.reshape(body)
        elif leaf_name == "bias" and value.ndim == 1 and value.size == math.prod(body):
            value = value.reshape(body)
        if tuple(value.shape) != body:
            raise ValueError(
                f"{source}: {key!r} has shape {tuple(layers[layer][1].shape)}, which does not fit "
                f"{module}.{leaf_name} of shape {shape}" + (" (per layer)" if stacked else "")
                + (" (torch's (out, in) weight is transposed to Flax's (in, out) kernel)"
                   if leaf_name == "kernel" else "") + "."
            )
        values.append(value)
    value = np.stack(values) if stacked else values[0]
    return path, jnp.asarray(value, dtype=getattr(leaf, "dtype", None))


def _exact_key(name: str, names: Sequence[str]) -> str:
    """A ``rank_pattern``-style key that matches ``name`` and no other of ``names``."""
    clash = any(other != name and other.endswith("." + name) for other in names)
    return ("^" if clash else "") + re.escape(name)


def _exact_spec(names: Sequence[str], all_names: Sequence[str]) -> tuple[str, ...] | str:
    """A ``target_modules``-style spec that selects exactly ``names`` among ``all_names``."""
    chosen = set(names)
    if any(o not in chosen and any(o.endswith("." + n) for n in names) for o in all_names):
        return "(?:" + "|".join(re.escape(n) for n in names) + ")"
    return tuple(names)


def from_peft(
    tensors: Mapping[str, Any],
    peft_config: Mapping[str, Any],
    params: Any,
    *,
    name_map: NameMap = None,
    dtype: Any = jnp.float32,
    in_axes: Mapping[str, int] | None = None,
    kernel_names: Sequence[str] = ("kernel", "embedding"),
    source: str = "adapter",
) -> LoadedPeft:
    """:func:`load_peft` on a state dict and config dict already in memory.

    Example::

        tensors = safetensors.numpy.load_file("adapter/adapter_model.safetensors")
        adapter, config, params = from_peft(tensors, json.load(open("adapter/adapter_config.json")), params)

    ``source`` names the adapter in error messages.
    """
    _check_peft_config(peft_config, source)
    in_axes = dict(in_axes or {})
    kernel_names = tuple(kernel_names)
    index = _ParamsIndex(params, _path_mapper(name_map), _layer_patterns(peft_config.get("layers_pattern")),
                         source)
    factors, full = _sort_keys(tensors, index, source)
    if not factors:
        raise ValueError(f"{source} holds no LoRA tensors (keys ending in .lora_A.weight or .lora_embedding_A).")

    adapter: Adapter = {}
    ranks, alphas, num_ins, stacked = {}, {}, {}, []
    for module, layers in factors.items():
        pair, ranks[module], alphas[module], num_ins[module], is_stacked = _adapter_pair(
            module, layers, index, peft_config, in_axes, kernel_names, source)
        adapter[module] = {k: jnp.asarray(v, dtype) for k, v in pair.items()}
        if is_stacked:
            stacked.append(module)

    saved_spec = tuple(peft_config.get("modules_to_save") or ())
    updates, saved = {}, []
    for (module, torch_leaf), layers in full.items():
        path, value = _full_update(module, torch_leaf, layers, index, in_axes, source)
        updates[path] = value
        torch_module = _FULL_KEY.match(next(iter(layers.values()))[0].removeprefix(KEY_PREFIX))["module"]
        if saved_spec and _in_modules(saved_spec, torch_module):
            saved.append(module)
    new_params = jax.tree_util.tree_map_with_path(lambda p, x: updates.get(p, x), params)

    # A config that selects exactly the modules of the file, with PEFT's ranks and scalings.
    kernel_modules = list(dict.fromkeys(m for (m, n) in index.leaves if n in kernel_names))
    names = [m for m in kernel_modules if m in adapter]  # in tree order
    r, alpha = int(peft_config.get("r", 8)), peft_config.get("lora_alpha", 8)
    use_rslora = bool(peft_config.get("use_rslora", False))
    init = peft_config.get("init_lora_weights", True)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=_exact_spec(names, kernel_modules),
        lora_dropout=float(peft_config.get("lora_dropout") or 0.0),
        use_rslora=use_rslora,
        rank_pattern={_exact_key(m, kernel_modules): ranks[m] for m in names if ranks[m] != r},
        alpha_pattern={_exact_key(m, kernel_modules): alphas[m] for m in names if alphas[m] != alpha},
        init_lora_weights=init if init in (True, False, "gaussian") else True,
        bias=peft_config.get("bias") or "none",
        modules_to_save=tuple(dict.fromkeys(saved)) or None,
        fan_in_fan_out=bool(peft_config.get("fan_in_fan_out", False)),
        kernel_names=kernel_names,
        in_axes={_exact_key(m, kernel_modules): num_ins[m] for m in names if num_ins[m] != 1},
        stacked_modules=_exact_spec(stacked, kernel_modules) if stacked else None,
        layers_pattern=peft_config.get("layers_pattern") or None,
    )
    targets = find_targets(config, new_params)
    check_adapter(targets, adapter)
    for module, target in targets.items():  # guards the exact patterns built above
        want = alphas[module] / (math.sqrt(ranks[module]) if use_rslora else ranks[module])
        assert math.isclose(target.scaling, want, rel_tol=1e-9), (module, target.scaling, want)
    return LoadedPeft(adapter, config, new_params)


def _resolve_dir(path: str | os.PathLike, adapter_name: str | None) -> Path:
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"No adapter directory at {root}.")
    if adapter_name not in (None, "default"):
        sub = root / adapter_name
        if (sub / CONFIG_NAME).exists():
            return sub
        if (root / CONFIG_NAME).exists() and adapter_name is not None:
            raise FileNotFoundError(
                f"{root} has no sub-folder {adapter_name!r} with an {CONFIG_NAME}; it holds the "
                "default adapter (leave adapter_name unset)."
            )
    if (root / CONFIG_NAME).exists():
        return root
    found = sorted(p.name for p in root.iterdir() if (p / CONFIG_NAME).exists())
    if found:
        raise FileNotFoundError(
            f"{root} has no {CONFIG_NAME} of its own but holds the named adapters {found}; "
            "pass adapter_name= to choose one."
        )
    raise FileNotFoundError(f"{root} has no {CONFIG_NAME}; it is not a PEFT adapter directory.")


def _read_bin(file: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise ImportError(
            f"{file} is a pickled PyTorch file. lora_jax never unpickles; it reads such files only via "
            "torch.load(weights_only=True), and torch is not installed. Convert it once where PyTorch is: "
            "PeftModel.from_pretrained(base, dir).save_pretrained(dir, safe_serialization=True), or "
            "safetensors.torch.save_file(torch.load(f, weights_only=True), "
            "'adapter_model.safetensors', metadata={'format': 'pt'})."
        ) from None
    state = torch.load(str(file), map_location="cpu", weights_only=True)
    out = {}
    for key, tensor in state.items():
        tensor = tensor.detach().cpu()
        if tensor.is_floating_point() and tensor.dtype not in (torch.float16, torch.float32, torch.float64):
            tensor = tensor.float()  # bfloat16 and friends: exact in float32
        out[key] = tensor.numpy()
    return out


def load_peft(
    path: str | os.PathLike,
    params: Any,
    *,
    adapter_name: str | None = None,
    name_map: NameMap = None,
    dtype: Any = jnp.float32,
    in_axes: Mapping[str, int] | None = None,
    kernel_names: Sequence[str] = ("kernel", "embedding"),
) -> LoadedPeft:
    """Read a PEFT LoRA adapter directory (e.g. trained in PyTorch) for ``params``.

    Example::

        adapter, config, params = lora_jax.load_peft("my-adapter", params)
        logits = lora_jax.lora(model.apply, config)(params, adapter, tokens)

    Args:
        path: the adapter directory (``adapter_config.json`` and
            ``adapter_model.safetensors``, or ``adapter_model.bin``, read only
            through ``torch.load(weights_only=True)``).
        params: the base params the adapter was trained on.
        adapter_name: reads ``path/adapter_name`` (PEFT's layout for a named
            adapter); unset or "default" reads ``path``.
        name_map: lora_jax module name -> torch module path, as for
            :func:`save_peft`; it is applied to every module of ``params``
            and inverted.
        dtype: dtype of the returned A and B (float32 by default). Full
            tensors take the dtype of the params leaf they replace.
        in_axes: module-name pattern -> number of input axes, for N-D kernels
            whose split cannot be told from the shapes.
        kernel_names: the leaf names that hold weights in ``params``.

    Returns:
        :class:`LoadedPeft` ``(adapter, config, params)``. The config targets
        exactly the modules with tensors in the file (its ``target_modules``
        lists them), with their ranks and ``lora_alpha`` as PEFT computes them;
        ``modules_to_save`` and trained biases (``bias``) are written into the
        returned params, and ``config.modules_to_save`` / ``config.bias`` keep
        them trainable under ``trainable_mask``.

    Raises ``ValueError`` naming the key for what cannot be represented
    exactly: peft_type other than LORA, DoRA, ``lora_bias``, trainable
    tokens, base-modifying inits (PiSSA, OLoRA, ...), tensors whose shape
    does not fit the kernel, modules the params lack, or stacked layers with
    missing layers. Keys that still carry an adapter name
    (``.lora_A.default.weight``) are accepted with a warning and the name
    is stripped. Unknown adapter_config.json keys are ignored.
    """
    folder = _resolve_dir(path, adapter_name)
    with open(folder / CONFIG_NAME) as f:
        peft_config = json.load(f)
    weights = folder / SAFETENSORS_NAME
    if weights.exists():
        tensors = safetensors.numpy.load_file(str(weights))
    elif (folder / BIN_NAME).exists():
        weights = folder / BIN_NAME
        tensors = _read_bin(weights)
    else:
        raise FileNotFoundError(f"{folder} has {CONFIG_NAME} but neither {SAFETENSORS_NAME} nor {BIN_NAME}.")
    return from_peft(tensors, peft_config, params, name_map=name_map, dtype=dtype, in_axes=in_axes,
                     kernel_names=kernel_names, source=str(weights))

