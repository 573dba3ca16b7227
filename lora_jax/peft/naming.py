"""lora_jax module names <-> torch module paths.

A lora_jax module name *is* the torch module path when the params tree mirrors
PyTorch's names. Otherwise ``name_map`` (a callable, or a dict whose keys
replace a dotted prefix) maps names to torch paths; loading applies the same
map to every module of ``params`` and inverts it.

Stacked (scanned) layers: ``model.layers.self_attn.q_proj`` with a leading
layer axis of size L is L torch modules ``model.layers.{i}.self_attn.q_proj``.
The index goes after the first path component named by ``layers_pattern``
(PEFT's defaults: ``layers``, ``h``, ``block``, ``blocks``, ``layer``), or
replaces a literal ``{layer}`` that ``name_map`` put in the path.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from lora_jax.config import DEFAULT_LAYERS_PATTERNS, matches
from lora_jax.tree import KeyPath, named_leaves

LAYER_PLACEHOLDER = "{layer}"

NameMap = Callable[[str], str] | Mapping[str, str] | None


def path_mapper(name_map: NameMap) -> Callable[[str], str]:
    """The function lora_jax module name -> torch module path that ``name_map`` describes.

    Example:
        >>> from lora_jax.peft.naming import path_mapper
        >>> to_torch = path_mapper({"decoder": "model"})
        >>> to_torch("decoder.layers.0.q_proj")
        'model.layers.0.q_proj'
        >>> path_mapper(None)("lm_head")
        'lm_head'

    Args:
        name_map: None (names are torch paths), a dict whose keys replace the
            longest matching dotted prefix, or a callable.

    Returns:
        A callable that raises ``TypeError`` if a user callable returns a non-string.
    """
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


def layer_patterns(layers_pattern: str | Sequence[str] | None) -> tuple[str, ...]:
    """The names of layer containers: ``layers_pattern``, or PEFT's defaults when None.

    Example:
        >>> from lora_jax.peft.naming import layer_patterns
        >>> layer_patterns("h")
        ('h',)
        >>> "layers" in layer_patterns(None)
        True
    """
    if layers_pattern is None:
        return tuple(DEFAULT_LAYERS_PATTERNS)
    return (layers_pattern,) if isinstance(layers_pattern, str) else tuple(layers_pattern)


def _with_layer(path: str, index: int, patterns: tuple[str, ...], module_name: str) -> str:
    """``path`` of layer ``index`` of a stacked module."""
    if LAYER_PLACEHOLDER in path:
        return path.replace(LAYER_PLACEHOLDER, str(index))
    parts = path.split(".")
    for j, part in enumerate(parts):
        if part in patterns and j + 1 < len(parts) and parts[j + 1].isdigit():
            raise ValueError(
                f"Stacked module {module_name!r} (torch path {path!r}) already names its layer, so its "
                "leading axis is not a layer axis. An MoE expert stack (a bare torch parameter) is "
                "written as PEFT's target_parameters: pass params (or jax.eval_shape of them) to "
                "save_peft so that it can tell."
            )
        if part in patterns:
            return ".".join(parts[: j + 1] + [str(index)] + parts[j + 1 :])
    raise ValueError(
        f"Stacked module {module_name!r} (torch path {path!r}) has no path component named one of "
        f"{patterns}, so save_peft cannot tell where the layer index goes. Set "
        "LoraConfig.layers_pattern to the name of the layer container, or pass a name_map that "
        f"returns a path containing '{LAYER_PLACEHOLDER}'."
    )


def layer_paths(path: str, num_lead: int, size: int, patterns: tuple[str, ...],
                module_name: str) -> list[tuple[int | None, str]]:
    """``[(layer, torch path)]`` of a module: one un-numbered path, or one per stacked layer.

    Example:
        >>> from lora_jax.peft.naming import layer_paths
        >>> layer_paths("model.layers.q_proj", 1, 2, ("layers",), "model.layers.q_proj")
        [(0, 'model.layers.0.q_proj'), (1, 'model.layers.1.q_proj')]
        >>> layer_paths("lm_head", 0, 0, ("layers",), "lm_head")
        [(None, 'lm_head')]

    Args:
        path: the module's torch path (``name_map`` applied).
        num_lead: 1 if the module is stacked, else 0.
        size: the number of stacked layers.
        patterns: the layer container names (:func:`layer_patterns`).
        module_name: the lora_jax name, for the error message.

    Returns:
        The paths; raises ``ValueError`` when a stacked path has no container.
    """
    if not num_lead:
        return [(None, path)]
    return [(i, _with_layer(path, i, patterns, module_name)) for i in range(size)]


def stack_container(module_name: str, patterns: tuple[str, ...]) -> str | None:
    """The un-numbered layer container of a stacked module name, or None.

    Example:
        >>> from lora_jax.peft.naming import stack_container
        >>> stack_container("model.layers.self_attn.q_proj", ("layers",))
        'model.layers'
        >>> stack_container("model.layers.0.self_attn.q_proj", ("layers",)) is None
        True
    """
    parts = module_name.split(".")
    for j, part in enumerate(parts[:-1]):
        if part in patterns and not parts[j + 1].isdigit():
            return ".".join(parts[: j + 1])
    return None


def in_modules(spec: Sequence[str], module_name: str) -> bool:
    """Whether ``module_name`` or one of its ancestors matches ``spec`` (PEFT's ``modules_to_save`` rule).

    Example:
        >>> from lora_jax.peft.naming import in_modules
        >>> in_modules(["classifier"], "model.classifier.dense")
        True
        >>> in_modules(["classifier"], "model.score")
        False
    """
    parts = module_name.split(".")
    return any(matches(tuple(spec), ".".join(parts[:i])) for i in range(1, len(parts) + 1))


def _closest(wanted: str, names: Sequence[str], n: int = 8) -> str:
    found = difflib.get_close_matches(wanted, list(names), n=n, cutoff=0.0)
    return ", ".join(found) if found else "(none)"


class ParamsIndex:
    """The modules and leaves of ``params``, and the lora_jax module behind each torch path.

    Example:
        >>> import numpy as np
        >>> from lora_jax.peft.naming import ParamsIndex, path_mapper
        >>> params = {"model": {"layers": {"q_proj": {"kernel": np.zeros((2, 4, 4))}}}}
        >>> index = ParamsIndex(params, path_mapper(None), ("layers",), "adapter")
        >>> index.resolve("model.layers.1.q_proj", "base_model.model.model.layers.1.q_proj.lora_A.weight")
        ('model.layers.q_proj', 1)
        >>> index.leaves_of["model.layers.q_proj"]
        ['kernel']

    Args:
        params: the params tree (arrays or shapes).
        to_torch: lora_jax module name -> torch path (:func:`path_mapper`).
        patterns: layer container names (:func:`layer_patterns`).
        source: names the adapter in error messages.
    """

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
        """``(module, layer)`` for a torch path; ``layer`` is set for a stacked module.

        A numbered path (``model.layers.3.q_proj``) resolves to a stacked module
        when its un-numbered form (or the ``{layer}`` form of ``name_map``) is a
        module of the params. Raises ``ValueError`` naming ``key`` and the
        closest modules otherwise.
        """
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
