"""`LoraConfig`: PEFT's LoRA settings, and how they match module names.

Module names are the dotted key path of a kernel's parent in the params tree
(``model.layers.0.self_attn.q_proj``); see :mod:`lora_jax.tree`. The matching
rules below are PEFT's, so a config written for PEFT selects the same modules
here when the params tree mirrors the PyTorch module names.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

BIAS_MODES = ("none", "all", "lora_only")
# PEFT's default names for the container of numbered layers (layers_to_transform).
DEFAULT_LAYERS_PATTERNS = ("layers", "h", "block", "blocks", "layer")
# Heads that "all-linear" leaves out, as PEFT leaves out the output embedding.
OUTPUT_HEAD_NAMES = ("lm_head",)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA settings with PEFT's field names and meaning.

    Example::

        config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
        config.scaling("model.layers.0.self_attn.q_proj")  # 16 / 8 = 2.0

    Fields shared with ``peft.LoraConfig``:
        r: rank of the update.
        lora_alpha: the update is scaled by ``lora_alpha / r``
            (``lora_alpha / sqrt(r)`` with ``use_rslora``).
        target_modules: a string is a regex ``re.fullmatch``-ed against the
            module name; a list matches a name exactly or as a dotted suffix;
            ``"all-linear"`` selects every ``kernel`` except the output head.
        exclude_modules: same forms as ``target_modules``; matches are skipped.
        lora_dropout: dropout on the LoRA branch input (needs an rng at apply).
        use_rslora: rank-stabilised scaling ``lora_alpha / sqrt(r)``.
        rank_pattern / alpha_pattern: per-module overrides; a key ``k`` applies
            to a module name ``n`` when ``re.match(rf"(.*\\.)?({k})$", n)``.
        init_lora_weights: True (kaiming-uniform A, zero B), "gaussian"
            (A ~ N(0, 1/r), zero B) or False (both random: not a no-op).
        bias: "none", "all" (every bias trains) or "lora_only" (biases of
            targeted modules train).
        modules_to_save: modules trained in full (e.g. a classifier head).
        layers_to_transform / layers_pattern: restrict to numbered layers.
        fan_in_fan_out: recorded for PEFT export (GPT-2's Conv1D); a JAX
            kernel is always (in, out), so it does not change the maths here.

    Fields of lora_jax only:
        kernel_names: leaf names that hold a module's weight.
        in_axes: module-name pattern -> number of leading input axes of an
            N-D kernel (default 1, i.e. ``(in, *out)``). A DenseGeneral
            output projection of shape ``(heads, head_dim, d)`` needs 2.
            Patterns match like ``rank_pattern`` keys.
        stacked_modules: modules (matched like ``target_modules``) whose
            kernels carry a leading layer axis, as from ``nn.scan`` /
            ``nnx.scan``; their adapters get the same leading axis.
    """

    r: int = 8
    lora_alpha: float = 8
    target_modules: str | Sequence[str] | None = None
    exclude_modules: str | Sequence[str] | None = None
    lora_dropout: float = 0.0
    use_rslora: bool = False
    rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=dict)
    init_lora_weights: bool | str = True
    bias: str = "none"
    modules_to_save: Sequence[str] | None = None
    layers_to_transform: int | Sequence[int] | None = None
    layers_pattern: str | Sequence[str] | None = None
    fan_in_fan_out: bool = False
    kernel_names: Sequence[str] = ("kernel", "embedding")
    in_axes: Mapping[str, int] = dataclasses.field(default_factory=dict)
    stacked_modules: str | Sequence[str] | None = None

    def __post_init__(self) -> None:
        # Normalise lists to tuples so configs compare and hash by value.
        for name in ("target_modules", "exclude_modules", "modules_to_save",
                     "layers_pattern", "stacked_modules", "kernel_names"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                object.__setattr__(self, name, tuple(value))
        if isinstance(self.layers_to_transform, int):
            object.__setattr__(self, "layers_to_transform", (self.layers_to_transform,))
        elif self.layers_to_transform is not None:
            object.__setattr__(self, "layers_to_transform", tuple(self.layers_to_transform))
        for name in ("rank_pattern", "alpha_pattern", "in_axes"):
            object.__setattr__(self, name, dict(getattr(self, name) or {}))

        if not _is_positive_int(self.r):
            raise ValueError(f"LoraConfig.r must be a positive integer, got {self.r!r}.")
        for key, rank in self.rank_pattern.items():
            if not _is_positive_int(rank):
                raise ValueError(
                    f"LoraConfig.rank_pattern[{key!r}] must be a positive integer, got {rank!r}."
                )
        _check_finite_number("lora_alpha", self.lora_alpha)
        for key, alpha in self.alpha_pattern.items():
            _check_finite_number(f"alpha_pattern[{key!r}]", alpha)
        for key, count in self.in_axes.items():
            if not _is_positive_int(count):
                raise ValueError(f"LoraConfig.in_axes[{key!r}] must be a positive integer, got {count!r}.")
        if self.layers_to_transform is not None:
            bad = [i for i in self.layers_to_transform if not _is_int(i) or i < 0]
            if bad:
                raise ValueError(
                    "LoraConfig.layers_to_transform must hold non-negative layer indices, "
                    f"got {list(self.layers_to_transform)!r}."
                )
        if self.bias not in BIAS_MODES:
            raise ValueError(f"LoraConfig.bias must be one of {BIAS_MODES}, got {self.bias!r}.")
        if not (isinstance(self.init_lora_weights, bool) or self.init_lora_weights == "gaussian"):
            raise ValueError(
                "LoraConfig.init_lora_weights must be True, False or 'gaussian', "
                f"got {self.init_lora_weights!r}."
            )
        if not _is_number(self.lora_dropout) or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"LoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}.")
        if self.target_modules is None:
            raise ValueError(
                "LoraConfig.target_modules is required: a list of module names such as "
                "['q_proj', 'v_proj'], a regex string, or 'all-linear'."
            )
        for name in ("target_modules", "exclude_modules", "stacked_modules"):
            value = getattr(self, name)
            if isinstance(value, str) and value != "all-linear":
                try:
                    re.compile(value)
                except re.error as err:
                    raise ValueError(f"LoraConfig.{name} is not a valid regex: {value!r} ({err}).") from None

    # -- per-module values ---------------------------------------------------

    def rank(self, module_name: str) -> int:
        """The rank for ``module_name`` (``rank_pattern`` first, then ``r``)."""
        key = pattern_key(self.rank_pattern, module_name)
        return self.r if key is None else self.rank_pattern[key]

    def alpha(self, module_name: str) -> float:
        """``lora_alpha`` for ``module_name`` (``alpha_pattern`` first)."""
        key = pattern_key(self.alpha_pattern, module_name)
        return self.lora_alpha if key is None else self.alpha_pattern[key]

    def scaling(self, module_name: str) -> float:
        """The factor ``s`` in ``x @ W + s * (x @ A) @ B`` for ``module_name``."""
        rank = self.rank(module_name)
        denominator = math.sqrt(rank) if self.use_rslora else rank
        return self.alpha(module_name) / denominator

    def num_in_axes(self, module_name: str) -> int:
        """How many leading kernel axes are input axes (``in_axes`` or 1)."""
        key = pattern_key(self.in_axes, module_name)
        return 1 if key is None else int(self.in_axes[key])

    def is_stacked(self, module_name: str) -> bool:
        return self.stacked_modules is not None and matches(self.stacked_modules, module_name)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form of every field (lists for tuples)."""
        out = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            out[field.name] = list(value) if isinstance(value, tuple) else value
        return out

    def replace(self, **changes: Any) -> LoraConfig:
        return dataclasses.replace(self, **changes)


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_positive_int(value: Any) -> bool:
    return _is_int(value) and value > 0


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _check_finite_number(name: str, value: Any) -> None:
    """``lora_alpha``-like values: a finite real number (a string or NaN would train wrong)."""
    if not _is_number(value) or not math.isfinite(value):
        raise ValueError(f"LoraConfig.{name} must be a finite number, got {value!r}.")


def matches(spec: str | Sequence[str], module_name: str) -> bool:
    """PEFT's rule: a string is a full regex match, a list an exact or suffix match."""
    if isinstance(spec, str):
        return re.fullmatch(spec, module_name) is not None
    return any(module_name == key or module_name.endswith("." + key) for key in spec)


def pattern_key(patterns: Mapping[str, Any], module_name: str) -> str | None:
    """The first key of ``rank_pattern``-style ``patterns`` that matches ``module_name``."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return None


def layer_index(module_name: str, layers_pattern: str | Sequence[str] | None) -> int | None:
    """The number after ``.{layers_pattern}.`` in ``module_name``, as PEFT finds it."""
    if layers_pattern is None:
        patterns: Sequence[str] = DEFAULT_LAYERS_PATTERNS
    elif isinstance(layers_pattern, str):
        patterns = (layers_pattern,)
    else:
        patterns = layers_pattern
    for pattern in patterns:
        found = re.match(rf"(.*\.)?{pattern}\.(\d+)\.", module_name + ".")
        if found:
            return int(found.group(2))
    return None
