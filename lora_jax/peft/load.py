"""PEFT -> lora_jax: :func:`from_peft` (in memory) and :func:`load_peft` (a directory).

Keys are taken apart by :func:`~lora_jax.peft.keys.parse_key` and matched to
the modules of ``params`` through :class:`~lora_jax.peft.naming.ParamsIndex`;
numbered layers of a stacked module are stacked back (every layer must be
present). N-D kernels are reshaped back from torch's flattened (in, out),
choosing the smallest number of leading input axes that fits (``in_axes``
overrides). Every tensor must be a finite floating-point array; anything
else is refused, naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import tables
from lora_jax.config import LoraConfig, matches, pattern_key
from lora_jax.init import init_with_base
from lora_jax.peft.adapter_config import AdapterSettings, lora_config_for_file, read_settings
from lora_jax.peft.errors import PeftFormatError
from lora_jax.peft.export import TIED_HEAD
from lora_jax.peft.files import CONFIG_NAME, find_adapter_dir, read_config, read_tensors
from lora_jax.peft.keys import ENTRY_KEYS, KEY_PREFIX, full_key_parts, parse_key
from lora_jax.peft.naming import NameMap, ParamsIndex, in_modules, layer_patterns, path_mapper
from lora_jax.peft.parameters import PARAMETER_LEAF, read_parameter_factors
from lora_jax.tree import Adapter, KeyPath, check_adapter, find_targets


class LoadedPeft(tuple):
    """What :func:`load_peft` returns: unpacks as ``adapter, config``, plus ``.params``.

    Example:
        >>> import jax.numpy as jnp
        >>> from lora_jax import LoraConfig
        >>> from lora_jax.peft import LoadedPeft
        >>> loaded = LoadedPeft({}, LoraConfig(target_modules=["q_proj"]), {"w": jnp.ones(2)})
        >>> adapter, config = loaded
        >>> loaded.params["w"].shape, loaded.config is config
        ((2,), True)

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
        """The LoRA factors, ``{module_name: {"lora_A": A, "lora_B": B}}``."""
        return self[0]

    @property
    def config(self) -> LoraConfig:
        """The config that selects exactly the file's modules with PEFT's ranks and scalings."""
        return self[1]


# -- tensors --------------------------------------------------------------------------------

def _checked_tensor(key: str, value: Any, source: str, floating: bool) -> np.ndarray:
    """``value`` as a numpy array, refusing non-numeric dtypes and NaN/inf, naming ``key``."""
    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as err:
        raise PeftFormatError(f"{source}: tensor {key!r} is not an array ({err}).") from None
    if floating and not jnp.issubdtype(array.dtype, jnp.floating):
        raise PeftFormatError(
            f"{source}: tensor {key!r} has dtype {array.dtype}; expected a floating-point tensor "
            "(float32, bfloat16 or float16) for a LoRA factor."
        )
    if not (jnp.issubdtype(array.dtype, jnp.number) or array.dtype == np.bool_) \
            or jnp.issubdtype(array.dtype, jnp.complexfloating):
        raise PeftFormatError(f"{source}: tensor {key!r} has dtype {array.dtype}; expected a real numeric tensor.")
    if jnp.issubdtype(array.dtype, jnp.floating):
        bad = int(np.count_nonzero(~np.isfinite(array)))
        if bad:
            raise PeftFormatError(
                f"{source}: tensor {key!r} holds {bad} non-finite value(s) (NaN or inf) of {array.size}; "
                "expected finite weights. The adapter is broken (a diverged training run?) and would "
                "produce garbage."
            )
    return array


@dataclasses.dataclass
class _Factors:
    """The entries (``lora_A``, ``lora_B``) of one module (one layer of it, if stacked) and their keys."""

    torch_path: str
    entries: dict[str, tuple[str, np.ndarray]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class _FullTensor:
    """A whole tensor of the file (``modules_to_save``, a bias, an embedding table)."""

    key: str
    value: np.ndarray
    torch_module: str


def _check_layers(layers: Sequence[int | None], shape: tuple[int, ...], what: str, source: str) -> bool:
    """Whether ``layers`` are the complete layer set of a stacked leaf (raise if partial)."""
    if None in layers:
        if len(layers) > 1:
            raise PeftFormatError(f"{source}: {what} has both per-layer and un-numbered keys.")
        return False
    size = shape[0] if shape else 0
    if sorted(layers) != list(range(size)):
        raise ValueError(
            f"{source}: stacked {what} of shape {shape} has {size} layers, but the file has keys for "
            f"layers {sorted(layers)}. A stacked leaf needs every layer; unroll the layers "
            "(e.g. scan_layers=False) to load this adapter."
        )
    return True


def _group_keys(tensors: Mapping[str, Any], index: ParamsIndex, source: str) -> tuple[
        dict[str, dict[int | None, _Factors]], dict[tuple[str, str], dict[int | None, _FullTensor]],
        dict[str, _FullTensor]]:
    """Split PEFT keys into LoRA entries per module, full tensors per (module, torch leaf) and
    trainable-token rows per module."""
    factors: dict[str, dict[int | None, _Factors]] = {}
    full: dict[tuple[str, str], dict[int | None, _FullTensor]] = {}
    tokens: dict[str, _FullTensor] = {}
    names_inside: set[str] = set()
    copies = []
    for key, value in tensors.items():
        if not isinstance(key, str):
            raise PeftFormatError(f"{source}: tensor key {key!r} is a {type(key).__name__}; expected a string.")
        parsed = parse_key(key, source)
        if parsed is None:
            continue
        array = _checked_tensor(key, value, source, floating=parsed.kind == "entry")
        if parsed.kind == "entry":
            if parsed.adapter_name:
                names_inside.add(parsed.adapter_name)
            module, layer = index.resolve(parsed.module, key)
            layer_factors = factors.setdefault(module, {}).setdefault(layer, _Factors(parsed.module))
            if parsed.part in layer_factors.entries:
                raise PeftFormatError(
                    f"{source}: keys {layer_factors.entries[parsed.part][0]!r} and {key!r} both hold "
                    f"{parsed.part} of {parsed.module}; expected one key per tensor."
                )
            layer_factors.entries[parsed.part] = (key, array)
        elif parsed.kind == "tokens":
            module, layer = index.resolve(parsed.module, key)
            if layer is not None:
                raise PeftFormatError(f"{source}: {key!r} holds trainable tokens of a stacked layer; "
                                      "unroll the layers to load it.")
            if not jnp.issubdtype(array.dtype, jnp.floating) or array.ndim != 2:
                raise PeftFormatError(f"{source}: {key!r} has shape {array.shape} and dtype {array.dtype}; "
                                      "expected the (n_tokens, dim) floating-point rows of the trainable tokens.")
            tokens[module] = _FullTensor(key, array, parsed.module)
        elif parsed.kind == "copy":
            copies.append((parsed, array))
        else:
            module, layer = index.resolve(parsed.module, key)
            layers = full.setdefault((module, parsed.part), {})
            if layer in layers:
                raise PeftFormatError(
                    f"{source}: keys {layers[layer].key!r} and {key!r} both hold {parsed.part} of "
                    f"{parsed.module}; expected one key per tensor."
                )
            layers[layer] = _FullTensor(key, array, parsed.module)
    if len(names_inside) > 1:
        raise PeftFormatError(
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
    for parsed, array in copies:
        parts = parsed.part.split(".")
        if len(parts) > 1 and parts[0] in names_inside | {"default"}:
            parts = parts[1:]
        torch_module, leaf = full_key_parts(parsed.module, ".".join(parts))
        module, layer = index.resolve(torch_module, parsed.key)
        full.setdefault((module, leaf), {}).setdefault(layer, _FullTensor(parsed.key, array, parsed.module))
    return factors, full, tokens


# -- LoRA factors ---------------------------------------------------------------------------

def _split_dims(body: tuple[int, ...], fan_in: int, fan_out: int, forced: int | None) -> int | None:
    """How many leading axes of ``body`` are input axes so that they hold ``fan_in`` values."""
    choices = [forced] if forced is not None else range(1, len(body))
    for k in choices:
        if 1 <= k < len(body) and math.prod(body[:k]) == fan_in and math.prod(body[k:]) == fan_out:
            return k
    return None


def _forced_in_axes(in_axes: Mapping[str, int], module: str) -> int | None:
    key = pattern_key(in_axes, module)
    return None if key is None else int(in_axes[key])


def _adapter_pair(
    module: str, layers: Mapping[int | None, _Factors], index: ParamsIndex, settings: AdapterSettings,
    in_axes: Mapping[str, int], kernel_names: Sequence[str], source: str,
) -> tuple[dict[str, np.ndarray], int, float, int, bool, bool]:
    """``(entry, rank, alpha, num_in, stacked, conv)`` for one adapted module."""
    kernel = [n for n in index.leaves_of[module] if n in kernel_names]
    first = next(iter(layers.values()))
    some_key = next(iter(first.entries.values()))[0]
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
    lists: dict[str, list[np.ndarray]] = {}
    seen = None
    conv = False
    for layer in sorted(layers, key=lambda i: -1 if i is None else i):
        factors = layers[layer]
        missing = [entry for entry, key in ENTRY_KEYS.items() if key.required and entry not in factors.entries]
        if missing:
            have = next(iter(factors.entries.values()))[0]
            raise PeftFormatError(f"{source}: {have!r} has no matching {missing[0]} tensor.")
        (key_a, lora_a), (key_b, lora_b) = factors.entries["lora_A"], factors.entries["lora_B"]
        conv = lora_a.ndim > 2
        if conv:  # nn.Conv*d: lora_A (r, in, *window), lora_B (out, r, 1, ...)
            ok = lora_b.ndim == lora_a.ndim and lora_a.shape[0] == lora_b.shape[1] \
                and all(d == 1 for d in lora_b.shape[2:])
        else:
            ok = lora_a.ndim == 2 and lora_b.ndim == 2 and lora_a.shape[0] == lora_b.shape[1]
        if not ok:
            raise PeftFormatError(
                f"{source}: {key_a!r} has shape {tuple(lora_a.shape)} and {key_b!r} has shape "
                f"{tuple(lora_b.shape)}; expected (r, in_features) and (out_features, r), or a conv's "
                "(r, in, *window) and (out, r, 1, ...)."
            )
        rank, fan_out = lora_a.shape[0], lora_b.shape[0]
        if conv:
            window = tuple(lora_a.shape[2:])
            want_body = window + (lora_a.shape[1], fan_out)
            if body != want_body:
                raise ValueError(
                    f"{source}: {key_a!r} {tuple(lora_a.shape)} and {key_b!r} {tuple(lora_b.shape)} form a conv "
                    f"LoRA for a kernel (*window, in, out) = {want_body}, which does not fit kernel "
                    f"{module}.{leaf_name} of shape {shape}" + (" (after its layer axis)" if stacked else "")
                    + " (lora_jax expects Flax's nn.Conv layout, window first, then in and out channels)."
                )
            num_in = len(body) - 1
        else:
            fan_in = lora_a.shape[1]
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
        want, given_by = settings.rank(factors.torch_path)
        if rank != want:
            raise ValueError(
                f"{source}: {key_a!r} has shape {tuple(lora_a.shape)}, i.e. rank {rank}, but the config's "
                f"{given_by} gives {factors.torch_path} rank {want}."
            )
        layer_alpha = settings.alpha(factors.torch_path)
        if seen is not None and seen != (rank, layer_alpha):
            raise ValueError(
                f"{source}: the layers of stacked module {module!r} differ in (rank, lora_alpha): {seen} vs "
                f"{(rank, layer_alpha)} at {factors.torch_path}. A stacked adapter needs one rank and alpha "
                "for all layers; unroll the layers to load it."
            )
        seen = (rank, layer_alpha)
        if conv:
            nd = lora_a.ndim
            a = lora_a.transpose(tuple(range(2, nd)) + (1, 0))  # (r, in, *window) -> (*window, in, r)
        else:
            a = lora_a.T.reshape(body[:num_in] + (rank,))
        lists.setdefault("lora_A", []).append(a)
        lists.setdefault("lora_B", []).append(lora_b.reshape(lora_b.shape[:2]).T.reshape((rank,) + body[num_in:]))
        if "lora_magnitude" in factors.entries:
            key_m, magnitude = factors.entries["lora_magnitude"]
            out_shape = body[num_in:]
            if magnitude.size != math.prod(out_shape):
                raise ValueError(f"{source}: {key_m!r} has shape {tuple(magnitude.shape)}; expected one DoRA "
                                 f"magnitude per output feature of {module}.{leaf_name}: {math.prod(out_shape)}.")
            lists.setdefault("lora_magnitude", []).append(magnitude.reshape(out_shape))
    if len({len(v) for v in lists.values()}) > 1:
        raise PeftFormatError(f"{source}: only some layers of {module!r} have a lora_magnitude_vector.")
    entry = {k: np.stack(v) if stacked else v[0] for k, v in lists.items()}
    return entry, seen[0], seen[1], num_in, stacked, conv


# -- full tensors ---------------------------------------------------------------------------

def _full_update(
    module: str, torch_leaf: str, layers: Mapping[int | None, _FullTensor], index: ParamsIndex,
    in_axes: Mapping[str, int], source: str,
) -> tuple[KeyPath, jax.Array]:
    """The params leaf a full tensor replaces, and its new value in that leaf's layout and dtype."""
    some_key = next(iter(layers.values())).key
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
    leaf_dtype = getattr(leaf, "dtype", None)
    stacked = _check_layers(list(layers), shape, f"leaf {module}.{leaf_name}", source)
    body = shape[1:] if stacked else shape
    values = []
    for layer in sorted(layers, key=lambda i: -1 if i is None else i):
        key, value = layers[layer].key, layers[layer].value
        if leaf_dtype is not None and jnp.issubdtype(leaf_dtype, jnp.floating) \
                and not jnp.issubdtype(value.dtype, jnp.floating):
            raise PeftFormatError(
                f"{source}: tensor {key!r} has dtype {value.dtype}; expected a floating-point tensor "
                f"for {module}.{leaf_name} ({np.dtype(leaf_dtype).name})."
            )
        if leaf_name == "kernel" and value.ndim == 2:  # torch (out, in) -> Flax (in..., out...)
            num_in = _split_dims(body, value.shape[1], value.shape[0], _forced_in_axes(in_axes, module))
            value = value.T if num_in is None else value.T.reshape(body)
        elif leaf_name == "kernel" and value.ndim >= 3:  # a torch conv (out, in, *window) -> (*window, in, out)
            value = value.transpose(tuple(range(2, value.ndim)) + (1, 0))
        elif leaf_name == "bias" and value.ndim == 1 and value.size == math.prod(body):
            value = value.reshape(body)
        if tuple(value.shape) != body:
            raise ValueError(
                f"{source}: {key!r} has shape {tuple(layers[layer].value.shape)}, which does not fit "
                f"{module}.{leaf_name} of shape {shape}" + (" (per layer)" if stacked else "")
                + (" (torch's (out, in) weight is transposed to Flax's (in, out) kernel)"
                   if leaf_name == "kernel" else "") + "."
            )
        values.append(value)
    value = np.stack(values) if stacked else values[0]
    return path, jnp.asarray(value, dtype=leaf_dtype)


# -- variants: tied heads, trainable tokens ------------------------------------------------

def _without_tied_head(tensors: Mapping[str, Any], settings: AdapterSettings, index: ParamsIndex,
                       source: str) -> Mapping[str, Any]:
    """``tensors`` without the tied head's keys PEFT writes with ``ensure_weight_tying``, when the
    params have no such head (their head is the embedding table): each must mirror the embedding."""
    prefix = KEY_PREFIX + TIED_HEAD + "."
    if not settings.ensure_weight_tying or TIED_HEAD in index.by_torch:
        return tensors
    head = {k: v for k, v in tensors.items() if isinstance(k, str) and k.startswith(prefix)}
    if not head:
        return tensors
    embedding = [k.rsplit(".", 1)[0] for k in tensors if isinstance(k, str) and k.endswith(".lora_embedding_A")
                 and k.rsplit(".", 2)[-2] in tables.INPUT_EMBEDDING_NAMES]
    tables_saved = [k.rsplit(".", 1)[0] for k in tensors if isinstance(k, str) and k.endswith(".weight")
                    and k.rsplit(".", 2)[-2] in tables.INPUT_EMBEDDING_NAMES]
    mirrors = {}
    for module in embedding:
        mirrors[prefix + "lora_A.weight"] = (module + ".lora_embedding_B", True)
        mirrors[prefix + "lora_B.weight"] = (module + ".lora_embedding_A", True)
        mirrors[prefix + "base_layer.weight"] = (module + ".base_layer.weight", False)
    for module in tables_saved:
        mirrors.setdefault(prefix + "weight", (module + ".weight", False))
    for key, value in head.items():
        if key not in mirrors or mirrors[key][0] not in tensors:
            raise PeftFormatError(
                f"{source}: key {key!r} is for the tied output head {TIED_HEAD!r} (ensure_weight_tying=true), "
                "but the params have no such module and the file has no input-embedding tensor it mirrors."
            )
        other, transposed = mirrors[key]
        mine, theirs = np.asarray(value), np.asarray(tensors[other])
        if transposed:
            theirs = theirs.T
        if mine.shape != theirs.shape or not np.array_equal(mine, theirs):
            raise PeftFormatError(
                f"{source}: key {key!r} should mirror {other!r} (the params' output head is the tied input "
                "embedding), but its values differ; lora_jax cannot give a tied head its own weights."
            )
    return {k: v for k, v in tensors.items() if k not in head}


def _token_indices(settings: AdapterSettings, rows: Mapping[str, _FullTensor], index: ParamsIndex,
                   source: str) -> dict[str, tuple[int, ...]]:
    """lora_jax module -> token ids for each table whose trainable-token rows the file holds."""
    spec = settings.trainable_token_indices
    if spec is None:
        if rows:
            key = next(iter(rows.values())).key
            raise PeftFormatError(f"{source}: {key!r} holds trainable tokens, but adapter_config.json has no "
                                  "trainable_token_indices to say which.")
        return {}
    if not rows:
        raise PeftFormatError(f"{source}: adapter_config.json sets trainable_token_indices but the file has no "
                              "'...token_adapter.trainable_tokens_delta' tensor.")
    out = {}
    for module, tensor in rows.items():
        if isinstance(spec, dict):
            found = [ids for key, ids in spec.items() if matches((key,), tensor.torch_module)]
            if len(found) != 1:
                raise PeftFormatError(f"{source}: {tensor.key!r} has no single trainable_token_indices entry "
                                      f"naming {tensor.torch_module!r} (entries: {sorted(spec)}).")
            ids = found[0]
        elif len(rows) == 1:
            ids = spec
        else:
            raise PeftFormatError(f"{source}: trainable_token_indices is one list but the file has trainable "
                                  f"tokens for {sorted(t.torch_module for t in rows.values())}.")
        if tensor.value.shape[0] != len(ids):
            raise PeftFormatError(f"{source}: {tensor.key!r} has {tensor.value.shape[0]} rows but "
                                  f"trainable_token_indices lists {len(ids)} tokens for it.")
        out[module] = tuple(ids)
    return out


# -- public ---------------------------------------------------------------------------------

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

    Example:
        >>> import numpy as np, jax.numpy as jnp
        >>> from lora_jax.peft import from_peft
        >>> params = {"model": {"q_proj": {"kernel": jnp.ones((4, 6))}}}
        >>> tensors = {"base_model.model.model.q_proj.lora_A.weight": np.ones((2, 4), np.float32),
        ...            "base_model.model.model.q_proj.lora_B.weight": np.zeros((6, 2), np.float32)}
        >>> adapter, config = from_peft(tensors, {"peft_type": "LORA", "r": 2, "lora_alpha": 4}, params)
        >>> adapter["model.q_proj"]["lora_A"].shape, config.scaling("model.q_proj")
        ((4, 2), 2.0)

    Args:
        tensors: PEFT key -> array (e.g. ``safetensors.numpy.load_file``).
        peft_config: the parsed ``adapter_config.json``.
        params, name_map, dtype, in_axes, kernel_names: as for :func:`load_peft`.
        source: names the adapter in error messages.

    Returns:
        :class:`LoadedPeft`, as :func:`load_peft`.
    """
    settings = read_settings(peft_config, source)
    if not isinstance(tensors, Mapping):
        raise PeftFormatError(f"{source}: tensors must be a mapping of PEFT key -> array, got {type(tensors).__name__}.")
    in_axes = dict(in_axes or {})
    kernel_names = tuple(kernel_names)
    index = ParamsIndex(params, path_mapper(name_map), layer_patterns(settings.layers_pattern), source)
    # PEFT target_parameters (MoE experts, routers) first: their keys name no lora_jax module.
    wrapped, wrapped_settings, tensors = read_parameter_factors(
        tensors, settings.target_parameters, index, settings.rank, settings.alpha,
        lambda key, value: _checked_tensor(key, value, source, floating=True), source)
    tensors = _without_tied_head(tensors, settings, index, source)
    factors, full, token_rows = _group_keys(tensors, index, source)
    if not factors and not wrapped:
        raise PeftFormatError(
            f"{source} holds no LoRA tensors (keys ending in .lora_A.weight or .lora_embedding_A)."
        )

    adapter: Adapter = {}
    ranks, alphas, num_ins, stacked, convs = {}, {}, {}, [], []
    for module, entry in wrapped.items():
        adapter[module] = {k: jnp.asarray(v, dtype) for k, v in entry.items()}
        ranks[module], alphas[module], is_stacked = wrapped_settings[module]
        num_ins[module] = 1
        if is_stacked:
            stacked.append(module)
    if wrapped and PARAMETER_LEAF not in kernel_names:
        kernel_names = (*kernel_names, PARAMETER_LEAF)
    for module, layers in factors.items():
        entry, ranks[module], alphas[module], num_ins[module], is_stacked, is_conv = _adapter_pair(
            module, layers, index, settings, in_axes, kernel_names, source)
        if ("lora_magnitude" in entry) != settings.use_dora:
            parts = next(iter(layers.values())).entries
            key = parts["lora_magnitude"][0] if "lora_magnitude" in parts else parts["lora_A"][0]
            raise PeftFormatError(
                f"{source}: key {key!r} " + (
                    "has no lora_magnitude_vector beside it, but the config has use_dora=true; a DoRA adapter "
                    "needs one per module." if settings.use_dora else
                    "is a DoRA magnitude vector, but the config has use_dora=false.")
            )
        adapter[module] = {k: jnp.asarray(v, dtype) for k, v in entry.items()}
        if is_stacked:
            stacked.append(module)
        if is_conv:
            convs.append(module)
    token_indices = _token_indices(settings, token_rows, index, source)
    for module, rows in token_rows.items():
        adapter[module] = {tables.TOKENS: jnp.asarray(rows.value, dtype)}

    updates, saved = {}, []
    for (module, torch_leaf), layers in full.items():
        path, value = _full_update(module, torch_leaf, layers, index, in_axes, source)
        torch_module = next(iter(layers.values())).torch_module
        if settings.modules_to_save and in_modules(settings.modules_to_save, torch_module):
            saved.append(module)
            if torch_leaf == "weight" and "embedding" in index.leaves_of[module] and not settings.ensure_weight_tying:
                # PEFT's default: the trained table is the lookup's copy; the frozen one stays for a tied head.
                adapter[module] = {tables.TABLE: jnp.asarray(value, dtype)}
                continue
        updates[path] = value
    new_params = jax.tree_util.tree_map_with_path(lambda p, x: updates.get(p, x), params)

    kernel_modules = list(dict.fromkeys(m for (m, n) in index.leaves if n in kernel_names))
    lora_adapter = {m: adapter[m] for m in (*wrapped, *factors)}
    try:
        config = lora_config_for_file(settings, kernel_modules, ranks, alphas, num_ins, stacked, saved,
                                      kernel_names, convs, token_indices)
    except ValueError as err:
        raise PeftFormatError(f"{source}: its settings do not form a valid LoraConfig: {err}") from None
    targets = find_targets(config, new_params, lora_adapter)
    check_adapter(targets, lora_adapter)
    for module, target in targets.items():  # guards the exact patterns built above
        want = alphas[module] / (math.sqrt(ranks[module]) if settings.use_rslora else ranks[module])
        if not math.isclose(target.scaling, want, rel_tol=1e-9):
            raise RuntimeError(
                f"lora_jax bug: the config built for {source} gives {module} scaling {target.scaling}, "
                f"not the file's {want}. Please report it."
            )
    tables.check_tables(tables.table_targets(config, new_params, targets),
                        {m: e for m, e in adapter.items() if m not in lora_adapter})
    if config.changes_base:
        if config.init_lora_weights == "olora" and settings.fan_in_fan_out:
            raise PeftFormatError(
                f"{source}: init_lora_weights='olora' with fan_in_fan_out=true: PEFT 0.21 decomposes a GPT-2 "
                "Conv1D weight without transposing it, so the base it rebuilds on load is not the one lora_jax "
                "would compute. Convert the adapter in PEFT (save_pretrained(..., "
                "path_initial_model_for_weight_conversion=...)) and load that."
            )
        # PEFT re-runs PiSSA / OLoRA on the original base before loading A and B: so do we.
        _, new_params = init_with_base(config, new_params, jax.random.key(0), dtype)
    return LoadedPeft(adapter, config, new_params)


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

    Example:
        >>> import tempfile, jax, jax.numpy as jnp, lora_jax
        >>> params = {"model": {"q_proj": {"kernel": jnp.ones((4, 6))}}}
        >>> config = lora_jax.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"])
        >>> adapter = lora_jax.init(config, params, jax.random.key(0))
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     _ = lora_jax.save_peft(tmp, adapter, config, params)
        ...     adapter2, config2 = loaded = lora_jax.load_peft(tmp, params)
        >>> adapter2["model.q_proj"]["lora_A"].shape, config2.scaling("model.q_proj")
        ((4, 2), 2.0)
        >>> params = loaded.params  # with the file's modules_to_save / bias tensors, if any
        >>> apply = lora_jax.lora(lambda p, x: x @ p["model"]["q_proj"]["kernel"], config2)
        >>> apply(params, adapter2, jnp.ones((1, 4))).shape
        (1, 6)

    Args:
        path: the adapter directory (``adapter_config.json`` and
            ``adapter_model.safetensors``, or ``adapter_model.bin``, read only
            through ``torch.load(weights_only=True)``).
        params: the base params the adapter was trained on.
        adapter_name: reads ``path/adapter_name`` (PEFT's layout for a named
            adapter); unset or "default" reads ``path``. A plain folder name.
        name_map: lora_jax module name -> torch module path, as for
            :func:`save_peft`; it is applied to every module of ``params``
            and inverted.
        dtype: dtype of the returned A and B (float32 by default). Full
            tensors take the dtype of the params leaf they replace.
        in_axes: module-name pattern -> number of input axes, for N-D kernels
            whose split cannot be told from the shapes.
        kernel_names: the leaf names that hold weights in ``params``.

    Returns:
        :class:`LoadedPeft`, which unpacks as ``adapter, config`` and carries
        ``.params``. The config targets exactly the modules with tensors in
        the file (its ``target_modules`` lists them), with their ranks and
        ``lora_alpha`` as PEFT computes them; ``modules_to_save`` and trained
        biases (``bias``) are written into ``.params``, and
        ``config.modules_to_save`` / ``config.bias`` keep them trainable
        under ``trainable_mask``.

    Variants load as PEFT defines them: DoRA magnitudes (``lora_magnitude``),
    conv LoRA (lora_A ``(r, in, *window)``), trainable tokens (entries
    ``{"trainable_tokens": rows}``), a ``modules_to_save`` embedding table under
    ``ensure_weight_tying=False`` as the adapter's trained copy (``{"embedding":
    table}``, the frozen table stays in ``.params`` for a tied head). With
    ``ensure_weight_tying=True`` the tied head's keys PEFT writes (``lm_head.*``)
    are checked to mirror the embedding and dropped when the params' head is the
    table itself. A PiSSA / OLoRA file (``init_lora_weights`` "pissa" / "olora")
    is loaded as PEFT loads it: the decomposition is re-run on the given
    (original) params, and ``.params`` holds the residual kernels.

    Raises :class:`PeftFormatError` (a ``ValueError``) naming the file and
    key for an unreadable file (truncated or foreign safetensors, a blocked
    pickle, ``adapter_config.json`` that is not a JSON object or holds a
    value of the wrong type), tensors that are not finite floating-point
    matrices, and what cannot be represented exactly: peft_type other than
    LORA, ``lora_bias``, base-modifying inits other than PiSSA / OLoRA
    (``pissa_niter_<k>``, LoftQ, ...), a tied-head key that does not mirror
    the embedding. ``ValueError`` for tensors whose shape does not fit the
    kernel, modules the params lack, or stacked layers with missing layers.
    Keys that still carry an adapter name (``.lora_A.default.weight``) are
    accepted with a warning and the name is stripped. Unknown
    adapter_config.json keys are ignored.
    """
    folder = find_adapter_dir(path, adapter_name)
    peft_config = read_config(folder)
    read_settings(peft_config, str(folder / CONFIG_NAME))  # config errors name the config file
    tensors, weights = read_tensors(folder)
    return from_peft(tensors, peft_config, params, name_map=name_map, dtype=dtype, in_axes=in_axes,
                     kernel_names=kernel_names, source=str(weights))
