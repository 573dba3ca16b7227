"""lora_jax adapter -> PEFT: :func:`to_peft` (in memory) and :func:`save_peft` (a directory).

Each adapter entry is written per :data:`~lora_jax.peft.keys.ENTRY_KEYS` in
torch ``nn.Linear`` orientation (``lora_A.weight`` (r, in), ``lora_B.weight``
(out, r)); N-D kernels flatten their input and output axes row-major; stacked
layers become one key per layer (:mod:`lora_jax.peft.naming`). Full tensors
(``modules_to_save``, trained biases, saved embedding tables) follow torch's
names: a Flax ``kernel`` is a transposed ``weight``, an ``embedding`` or norm
``scale`` is ``weight`` as it is. Kernels are always written in ``nn.Linear``
layout (``fan_in_fan_out`` only concerns the LoRA factors), so a GPT-2
``Conv1D`` module, whose torch weight is (in, out), cannot be a
``modules_to_save`` entry.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import dora, tables
from lora_jax.config import LoraConfig, matches
from lora_jax.convert import convert_to_original_base
from lora_jax.peft.adapter_config import TASK_TYPES, to_adapter_config
from lora_jax.peft.card import model_card
from lora_jax.peft.files import DEFAULT_ADAPTER_NAME, adapter_dir_for_save, write_adapter
from lora_jax.peft.keys import ENTRY_KEYS, KEY_PREFIX, TOKENS_PART
from lora_jax.peft.naming import (
    LAYER_PLACEHOLDER,
    NameMap,
    in_modules,
    layer_paths,
    layer_patterns,
    path_mapper,
    stack_container,
)
from lora_jax.peft.parameters import check_moe_module_names, is_parameter, parameter_tensors
from lora_jax.quantize import describe_quantization
from lora_jax.tree import Adapter, Target, check_adapter, find_targets, named_leaves

# PEFT's EMBEDDING_LAYER_NAMES: naming one in target_modules makes its
# save_embedding_layers="auto" save the targeted embeddings' base tables.
_PEFT_EMBEDDING_NAMES = ("embed_tokens", "lm_head")
# Names that suggest an embedding table when save_peft has no params to look at.
_EMBEDDING_HINTS = ("embed_tokens", "wte", "wpe", "word_embeddings", "position_embeddings",
                    "token_type_embeddings", "embed_positions", "embeddings", "embedding", "shared")

# The torch path of the output head PEFT ties to the input embedding (transformers' _tied_weights_keys).
TIED_HEAD = "lm_head"


def is_conv(config: LoraConfig, target: Target) -> bool:
    """Whether ``target`` is written as PEFT's ``nn.Conv*d`` LoRA: a ``conv_modules`` kernel, or a
    4-D / 5-D kernel split after all axes but the last (Flax's ``nn.Conv`` HWIO / DHWIO).

    Example:
        >>> import jax.numpy as jnp
        >>> from lora_jax import LoraConfig, find_targets
        >>> params = {"conv": {"kernel": jnp.zeros((3, 3, 4, 8)), "bias": jnp.zeros(8)}}
        >>> config = LoraConfig(r=2, target_modules=["conv"])
        >>> is_conv(config, find_targets(config, params)["conv"])
        True
    """
    body = len(target.shape) - target.num_lead
    if target.is_embedding:
        return False
    return config.is_conv(target.module_name) or (body >= 4 and target.num_in == body - 1)


def _torch_layout(entry: str, value: np.ndarray, target: Target, conv: bool) -> np.ndarray:
    """One layer's adapter entry in torch layout.

    Linear: A (in..., r) -> (r, in), B (r, out...) -> (out, r), magnitude -> (out,).
    Conv: A (*window, in, r) -> (r, in, *window), B (r, out) -> (out, r, 1...), magnitude ->
    (1, out, 1...) as PEFT's DoRA keeps the dims of the conv weight's norm.
    """
    rank, windows = target.rank, len(target.in_shape) - 1
    if entry == "lora_A":
        if conv:
            nd = value.ndim
            return value.transpose((nd - 1, nd - 2) + tuple(range(nd - 2)))
        return value.reshape(-1, rank).T
    if entry == "lora_B":
        out = value.reshape(rank, -1).T
        return out.reshape(out.shape + (1,) * windows) if conv else out
    flat = value.reshape(-1)
    return flat.reshape((1, -1) + (1,) * windows) if conv else flat


def _to_numpy(x: Any) -> np.ndarray:
    return np.asarray(jax.device_get(x))


def _torch_leaf(leaf_name: str) -> str:
    return "weight" if leaf_name in ("kernel", "embedding", "scale") else leaf_name


def _kernel_to_torch(value: np.ndarray, num_in: int, conv: bool = False) -> np.ndarray:
    """A Flax kernel ``in_shape + out_shape`` as a torch Linear weight (out, in), or a conv
    kernel ``(*window, in, out)`` as a torch conv weight ``(out, in, *window)``."""
    if value.ndim < 2:
        return value
    if conv:
        nd = value.ndim
        return value.transpose((nd - 1, nd - 2) + tuple(range(nd - 2)))
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
        container = stack_container(name, patterns) if target.num_lead else None
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
    patterns: tuple[str, ...], save_embedding_layers: bool | str, copies: Mapping[str, Any],
) -> tuple[list[tuple[str, np.ndarray, str]], list[str]]:
    """``([(key, tensor, source)], module_paths)``: the full tensors to write, and
    every torch module path of ``params`` (for checking ``target_modules``).

    ``copies``: module -> the adapter's trained copy of its table, written in place of
    the params leaf (a ``modules_to_save`` table with ``ensure_weight_tying=False``)."""
    leaves = list(named_leaves(params))
    lead = _stacked_lead(targets, patterns, to_torch)

    def torch_paths(module: str, leaf: Any) -> list[tuple[int | None, str]]:
        size = lead(module, leaf)
        return layer_paths(to_torch(module), 1 if size else 0, size, patterns, module)

    all_paths: set[str] = set()
    for _, module, _, leaf in leaves:
        for _, path in torch_paths(module, leaf) if module else []:
            parts = path.split(".")
            all_paths.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    module_paths = sorted(all_paths)
    save_bases = _save_embedding_bases(config, save_embedding_layers, module_paths)

    saved = tuple(config.modules_to_save or ())
    for name in targets:
        if saved and in_modules(saved, name):
            raise ValueError(
                f"Module {name!r} is both a LoRA target and in modules_to_save={saved!r}; PEFT cannot "
                "hold both. Drop it from one of them."
            )
    out = []
    for _, module, leaf_name, leaf in leaves:
        target = targets.get(module)
        if saved and in_modules(saved, module):
            part = _torch_leaf(leaf_name)
        elif leaf_name == "bias" and (config.bias == "all" or (config.bias == "lora_only" and target)):
            part = "base_layer.bias" if target else "bias"
        elif save_bases and target is not None and leaf_name == target.leaf_name and (
                target.is_embedding or module.rsplit(".", 1)[-1] == "lm_head"):
            part = "base_layer.weight"
        else:
            continue
        copied = module in copies and leaf_name == "embedding"
        value = _to_numpy(copies[module] if copied else leaf)
        source = f"adapter[{module!r}]['embedding']" if copied else f"params leaf {module}.{leaf_name}"
        num_in = target.num_in if target else config.num_in_axes(module)
        conv = is_conv(config, target) if target else (
            config.is_conv(module) or value.ndim - (1 if lead(module, leaf) else 0) >= 4)
        for index, path in torch_paths(module, leaf):
            v = value if index is None else value[index]
            if leaf_name == "kernel":
                v = _kernel_to_torch(v, num_in, conv)
            elif leaf_name == "bias":
                v = v.reshape(-1)  # the bias of an N-D (DenseGeneral) kernel, flattened like its output
            out.append((f"{path}.{part}", v, source))
    return out, module_paths


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


def _finite_tensor(value: np.ndarray, dtype: np.dtype, source: str) -> np.ndarray:
    """``value`` as ``dtype``, refusing NaN/inf (a diverged run) and values ``dtype`` cannot hold."""
    if not jnp.issubdtype(value.dtype, jnp.inexact):
        return np.ascontiguousarray(value.astype(dtype))
    bad = int(np.count_nonzero(~np.isfinite(value)))
    if bad:
        raise ValueError(
            f"{source} holds {bad} non-finite value(s) (NaN or inf) of {value.size}; refusing to save an "
            "adapter that would load as garbage (did training diverge?)."
        )
    with np.errstate(over="ignore"):  # an overflow is reported below, naming the tensor
        out = np.ascontiguousarray(value.astype(dtype))
    if jnp.issubdtype(out.dtype, jnp.inexact) and not np.isfinite(out).all():
        raise ValueError(
            f"{source} has values up to {float(np.abs(value).max()):.4g}, beyond the range of "
            f"dtype={np.dtype(dtype).name}; save with dtype=jnp.float32."
        )
    return out


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
    initial_adapter: Adapter | None = None,
    tied_head: str | None = TIED_HEAD,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """:func:`save_peft` in memory: the PEFT state dict and the ``adapter_config.json`` dict.

    Example:
        >>> import jax, jax.numpy as jnp, lora_jax
        >>> params = {"model": {"q_proj": {"kernel": jnp.ones((4, 6))}}}
        >>> config = lora_jax.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"])
        >>> adapter = lora_jax.init(config, params, jax.random.key(0))
        >>> from lora_jax.peft import to_peft
        >>> tensors, peft_config = to_peft(adapter, config, params)
        >>> {key: value.shape for key, value in sorted(tensors.items())}
        {'base_model.model.model.q_proj.lora_A.weight': (2, 4), 'base_model.model.model.q_proj.lora_B.weight': (6, 2)}
        >>> peft_config["r"], peft_config["lora_alpha"], peft_config["target_modules"]
        (2, 4, ['q_proj'])

    Args:
        adapter, config, params: as for :func:`save_peft`.
        base_model_name_or_path, task_type, name_map, save_embedding_layers, dtype,
            initial_adapter, tied_head: as for :func:`save_peft`.

    Returns:
        ``(tensors, peft_config)``: PEFT key -> numpy array, and the config dict.
        Raises ``ValueError`` naming the module for an adapter or params leaf
        holding NaN or inf, a value ``dtype`` cannot hold, an adapter entry
        PEFT's format has no key for, and two modules that map to one key.
    """
    if task_type is not None and task_type not in TASK_TYPES:
        raise ValueError(f"task_type must be one of {TASK_TYPES} or None, got {task_type!r}.")
    to_torch = path_mapper(name_map)
    patterns = layer_patterns(config.layers_pattern)
    lora_part, table_part = tables.split_adapter(adapter, ())
    if initial_adapter is not None:
        if not config.changes_base:
            raise ValueError(
                f"initial_adapter converts an adapter trained on a rewritten base (init_lora_weights 'pissa', "
                f"'pissa_niter_<k>', 'olora') to one for the original base; this config has "
                f"init_lora_weights={config.init_lora_weights!r}, whose base is the original already."
            )
        lora_part, config = convert_to_original_base(lora_part, tables.split_adapter(initial_adapter, ())[0],
                                                     config)
    if params is None:
        if config.modules_to_save or config.bias != "none" or save_embedding_layers is True \
                or config.trainable_token_indices is not None or table_part:
            raise ValueError(
                f"save_peft needs params to write modules_to_save={config.modules_to_save!r}, "
                f"bias={config.bias!r}, trainable tokens or save_embedding_layers=True tensors; pass the "
                "params tree."
            )
        targets = _targets_without_params(config, lora_part)
    else:
        targets = find_targets(config, params, lora_part)
    check_adapter(targets, lora_part)
    dora.check_magnitudes(targets, lora_part, config.use_dora)
    table_targets = tables.table_targets(config, params, targets) if params is not None else {}
    tables.check_tables(table_targets, table_part)

    # Bare torch parameters (MoE experts, routers) are PEFT target_parameters, keyed apart.
    parameters = {name: target for name, target in targets.items() if is_parameter(target)}
    targets = {name: target for name, target in targets.items() if name not in parameters}
    items, exported_parameters = parameter_tensors(parameters, lora_part, config, to_torch, patterns)
    exported: dict[str, Target] = {}  # torch path -> target, one per layer of a stacked target
    for name, target in targets.items():
        unknown = sorted(set(lora_part[name]) - set(ENTRY_KEYS))
        if unknown:
            raise ValueError(
                f"adapter[{name!r}] has entries {unknown} that PEFT's LoRA format has no key for "
                f"(known: {sorted(ENTRY_KEYS)}); they would be silently dropped."
            )
        values = {entry: _to_numpy(value) for entry, value in lora_part[name].items()}
        conv = is_conv(config, target)
        size = target.lead_shape[0] if target.num_lead else 0
        for index, path in layer_paths(to_torch(name), target.num_lead, size, patterns, name):
            for entry, value in values.items():
                value = value if index is None else value[index]
                items.append((f"{path}.{ENTRY_KEYS[entry].part(target.is_embedding)}",
                              _torch_layout(entry, value, target, conv), f"adapter[{name!r}][{entry!r}]"))
            exported[path] = target
    for name, table in table_targets.items():
        if table.indices is not None:
            items.append((f"{to_torch(name)}.{TOKENS_PART}", _to_numpy(table_part[name][table.key]),
                          f"adapter[{name!r}][{table.key!r}]"))
    module_paths = saved_paths = None
    if params is not None:
        check_moe_module_names(targets, params)
        copies = {name: table_part[name][t.key] for name, t in table_targets.items() if t.indices is None}
        full, module_paths = _full_tensors(params, config, targets, to_torch, patterns, save_embedding_layers,
                                           copies)
        items += full
        items += _tied_head_tensors(config, targets, lora_part, items, params, module_paths, to_torch, tied_head)
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
        tensors[key] = _finite_tensor(value, np.dtype(dtype), source)
        origin[key] = source
    names_unchanged = name_map is None and not any(t.num_lead for t in targets.values())
    token_paths = {to_torch(name): t.indices for name, t in table_targets.items() if t.indices is not None}
    peft_config = to_adapter_config(config, exported, module_paths, names_unchanged and not parameters,
                                    base_model_name_or_path, task_type, saved_paths,
                                    parameters=exported_parameters, token_paths=token_paths)
    return tensors, peft_config


def _tied_head_tensors(config: LoraConfig, targets: Mapping[str, Target], lora_part: Adapter,
                       items: list[tuple[str, np.ndarray, str]], params: Any, module_paths: Sequence[str],
                       to_torch: Callable[[str], str], tied_head: str | None) -> list[tuple[str, np.ndarray, str]]:
    """The keys PEFT writes for a tied output head with ``ensure_weight_tying=True``.

    PEFT then gives the head (``lm_head``) a LoRA whose factors are the input embedding's,
    transposed (``lm_head.lora_A.weight`` = ``lora_embedding_B``ᵀ, ``lora_B`` =
    ``lora_embedding_A``ᵀ) beside a copy of its base table, and saves a
    ``modules_to_save`` table under the head's name too. lora_jax writes the same when
    the params have no module at ``tied_head`` (their head is the embedding table itself).
    """
    if not config.ensure_weight_tying or tied_head is None or tied_head in module_paths:
        return []
    out = []
    lora_tables = [n for n, t in targets.items() if t.is_embedding and _is_input_embedding(n) and not t.num_lead]
    for name in lora_tables:
        if config.use_dora:
            raise ValueError(
                f"DoRA on the tied embedding {name!r} with ensure_weight_tying=True: PEFT gives the tied head "
                "its own magnitude, which a shared table cannot hold; set ensure_weight_tying=False or leave "
                "the embedding out of target_modules."
            )
        source = f"adapter[{name!r}] (as the tied {tied_head})"
        out += [(f"{tied_head}.lora_A.weight", _to_numpy(lora_part[name]["lora_B"]), source),
                (f"{tied_head}.lora_B.weight", _to_numpy(lora_part[name]["lora_A"]), source)]
    saved = tuple(config.modules_to_save or ())
    saved_tables = [m for _, m, leaf_name, _ in named_leaves(params)
                    if saved and leaf_name == "embedding" and in_modules(saved, m) and _is_input_embedding(m)]
    copies = {f"{to_torch(n)}.base_layer.weight": "base_layer.weight" for n in lora_tables}
    copies.update({f"{to_torch(n)}.weight": "weight" for n in saved_tables})
    for key, value, source in items:
        if key in copies:
            out.append((f"{tied_head}.{copies[key]}", value, f"{source} (as the tied {tied_head})"))
    return out


def _is_input_embedding(module: str) -> bool:
    last = module.rsplit(".", 1)[-1]
    return last in tables.INPUT_EMBEDDING_NAMES


def save_peft(
    path: str | os.PathLike,
    adapter: Adapter,
    config: LoraConfig,
    params: Any = None,
    *,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
    adapter_name: str = DEFAULT_ADAPTER_NAME,
    name_map: NameMap = None,
    save_embedding_layers: bool | Literal["auto"] = "auto",
    dtype: Any = jnp.float32,
    overwrite: bool = False,
    initial_adapter: Adapter | None = None,
    tied_head: str | None = TIED_HEAD,
) -> Path:
    """Write ``adapter`` as a PEFT adapter directory that ``PeftModel.from_pretrained`` loads.

    Example:
        >>> import tempfile, jax, jax.numpy as jnp, lora_jax
        >>> params = {"model": {"q_proj": {"kernel": jnp.ones((4, 6))}}}
        >>> config = lora_jax.LoraConfig(r=2, target_modules=["q_proj"])
        >>> adapter = lora_jax.init(config, params, jax.random.key(0))
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     folder = lora_jax.save_peft(tmp, adapter, config, params, task_type="CAUSAL_LM")
        ...     sorted(p.name for p in folder.iterdir())
        ['README.md', 'adapter_config.json', 'adapter_model.safetensors']

        In PyTorch: ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(...), folder)``.

    Args:
        path: the adapter directory. ``adapter_name`` other than "default"
            writes to ``path/adapter_name`` as PEFT does.
        adapter, config: what :func:`lora_jax.init` and training produced.
        params: the base params. Needed for ``modules_to_save``, ``bias`` other
            than "none", embedding tables and ``save_embedding_layers``; shapes
            (``jax.eval_shape``) suffice when only the adapter is written.
        base_model_name_or_path, task_type: recorded in adapter_config.json
            (``task_type`` is PEFT's, e.g. "CAUSAL_LM"). When ``params`` is a
            quantized base (QLoRA, :mod:`lora_jax.quantize`) the model card notes
            how it was quantized; the adapter is written as for any base.
        adapter_name: PEFT's adapter name; a plain folder name (no ``/``,
            ``\\``, ``..``), refused otherwise before anything is written.
        name_map: lora_jax module name -> torch module path, as a callable or
            a dict of dotted prefixes (``{"decoder": "model"}``); see
            :mod:`lora_jax.peft.naming` for stacked layers and ``{layer}``.
        save_embedding_layers: PEFT's option: also write the base table of each
            targeted embedding (and a targeted ``lm_head``) as
            ``<module>.base_layer.weight``. "auto" does so when
            ``target_modules`` names ``embed_tokens`` or ``lm_head``, as PEFT
            does for transformers models.
        dtype: dtype of every tensor written (float32 by default).
        overwrite: replace the adapter files in an existing non-empty directory
            (other files there are kept).
        initial_adapter: for a PiSSA / OLoRA adapter (``init_lora_weights`` that
            rewrites the base): the adapter :func:`lora_jax.init_with_base`
            returned. The file is then the plain LoRA of rank 2r for the
            *original* base (:func:`lora_jax.convert_to_original_base`, PEFT's
            ``path_initial_model_for_weight_conversion``), which loads on the
            unmodified model in PyTorch. Without it a PiSSA / OLoRA file records
            its init, and PEFT re-runs the decomposition on load.
        tied_head: the torch path of the output head tied to the input
            embedding. With ``ensure_weight_tying=True``, params that have no
            module there (their head is the embedding table) get the head keys
            PEFT writes: ``<head>.lora_A/B.weight`` (the embedding's factors,
            transposed), ``<head>.base_layer.weight`` and a ``modules_to_save``
            table's ``<head>.weight``. None writes none.

    Returns:
        The directory the adapter was written to.

    ``target_modules``, ``rank_pattern`` and ``alpha_pattern`` are written as
    given when PEFT's matching on the torch paths selects the same modules with
    the same ranks; otherwise (stacked layers, ``name_map``, "all-linear")
    they are written as exact torch module paths, so PEFT adapts exactly the
    modules whose tensors are in the file. Every check (including NaN or inf
    in the adapter) runs before anything is written.
    """
    out_dir = adapter_dir_for_save(path, adapter_name, overwrite)
    tensors, peft_config = to_peft(
        adapter, config, params, base_model_name_or_path=base_model_name_or_path, task_type=task_type,
        name_map=name_map, save_embedding_layers=save_embedding_layers, dtype=dtype,
        initial_adapter=initial_adapter, tied_head=tied_head,
    )
    a_parts = tuple("." + ENTRY_KEYS["lora_A"].part(is_embedding) for is_embedding in (False, True))
    num_modules = sum(k.endswith(a_parts) for k in tensors)
    quantization = describe_quantization(params) if params is not None else None
    write_adapter(out_dir, tensors, peft_config, Path(path),
                  lambda: model_card(config, num_modules, base_model_name_or_path, task_type, quantization))
    return out_dir
