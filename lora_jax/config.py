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
# init_lora_weights values that rewrite the base kernels (the adapter alone is not the update).
BASE_CHANGING_INITS = ("pissa", "pissa_niter_<k>", "olora", "loftq")
SUPPORTED_INITS = (True, False, "gaussian") + BASE_CHANGING_INITS
# PEFT 0.21 initialisations lora_jax does not implement (data-driven or other variants).
UNSUPPORTED_PEFT_INITS = ("eva", "corda", "orthogonal", "lora_ga", "mica")
# PEFT's LoftQConfig fields and defaults; PEFT's loftq_init quantizes to NF4 (4) or int8 (8).
LOFTQ_DEFAULTS = {"loftq_bits": 4, "loftq_iter": 1}
LOFTQ_BITS = (4, 8)
# PEFT's default names for the container of numbered layers (layers_to_transform).
DEFAULT_LAYERS_PATTERNS = ("layers", "h", "block", "blocks", "layer")
# Heads that "all-linear" leaves out, as PEFT leaves out the output embedding.
OUTPUT_HEAD_NAMES = ("lm_head",)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA settings with PEFT's field names and meaning.

    Example:
        >>> from lora_jax import LoraConfig
        >>> config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
        >>> config.scaling("model.layers.0.self_attn.q_proj")
        2.0
        >>> LoraConfig(target_modules=["q"], init_lora_weights="pissa_niter_4").changes_base
        True

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
            (A ~ N(0, 1/r), zero B), False (both random: not a no-op), or one
            that rewrites the base kernel (use :func:`lora_jax.init_with_base`):
            "pissa" (principal singular vectors), "pissa_niter_<k>"
            (randomized SVD, k subspace iterations), "olora" (QR), "loftq"
            (quantized base + SVD of the error). PEFT's "eva", "corda",
            "orthogonal", "lora_ga" and "mica" are not implemented.
        loftq_config: with "loftq" only: ``{"loftq_bits": 4 or 8,
            "loftq_iter": n >= 1}`` (PEFT's LoftQConfig; missing keys take
            its defaults 4 and 1).
        use_dora: DoRA (Liu et al. 2024): a trained magnitude per output
            feature rescales ``W + s * A @ B``.
        trainable_token_indices: train only these rows of an embedding: a
            list of token ids (the input embedding) or a dict
            ``{embedding module name: [token ids]}``.
        ensure_weight_tying: keep a tied embedding and output head tied
            (adapters and ``modules_to_save`` follow the embedding); PEFT's
            default False changes only the input lookup.
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
        conv_modules: modules (matched like ``target_modules``) whose kernels
            are convolution kernels laid out like Flax's ``nn.Conv``
            (``window... + (in, out)``): they split after all but the last
            axis and are written to PEFT as ``nn.Conv*d`` LoRA (lora_A
            ``(r, in, *window)``, lora_B ``(out, r, 1...)``). ``init`` with
            ``apply_fn=`` finds convs itself; ``save_peft`` treats a 4-D or 5-D
            kernel split that way as a Conv2d/Conv3d even without this field
            (a Conv1d's 3-D kernel needs it).
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
    conv_modules: str | Sequence[str] | None = None
    use_dora: bool = False
    loftq_config: Mapping[str, int] = dataclasses.field(default_factory=dict)
    trainable_token_indices: Sequence[int] | Mapping[str, Sequence[int]] | None = None
    ensure_weight_tying: bool = False

    def __post_init__(self) -> None:
        # Normalise lists to tuples so configs compare and hash by value.
        for name in ("target_modules", "exclude_modules", "modules_to_save",
                     "layers_pattern", "stacked_modules", "conv_modules", "kernel_names"):
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
        object.__setattr__(self, "init_lora_weights", _check_init(self.init_lora_weights))
        object.__setattr__(self, "loftq_config", _check_loftq(self.loftq_config, self.init_lora_weights))
        object.__setattr__(self, "trainable_token_indices", _check_token_indices(self.trainable_token_indices))
        for name in ("use_dora", "ensure_weight_tying"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ValueError(f"LoraConfig.{name} must be True or False, got {getattr(self, name)!r}.")
            object.__setattr__(self, name, bool(getattr(self, name)))
        if isinstance(self.init_lora_weights, str) and self.init_lora_weights.startswith("pissa"):
            # PiSSA splits each singular value as sqrt(S / s) into A and B: s must be positive.
            for where, alpha in (("lora_alpha", self.lora_alpha), *(
                    (f"alpha_pattern[{k!r}]", v) for k, v in self.alpha_pattern.items())):
                if alpha <= 0:
                    raise ValueError(
                        f"LoraConfig.{where} must be positive with init_lora_weights="
                        f"{self.init_lora_weights!r} (PiSSA divides the singular values by the scaling), "
                        f"got {alpha!r}."
                    )
        if not _is_number(self.lora_dropout) or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"LoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}.")
        if self.target_modules is None:
            raise ValueError(
                "LoraConfig.target_modules is required: a list of module names such as "
                "['q_proj', 'v_proj'], a regex string, or 'all-linear'."
            )
        for name in ("target_modules", "exclude_modules", "stacked_modules", "conv_modules"):
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

    def is_conv(self, module_name: str) -> bool:
        """Whether ``conv_modules`` names ``module_name`` (a convolution kernel)."""
        return self.conv_modules is not None and matches(self.conv_modules, module_name)

    @property
    def changes_base(self) -> bool:
        """Whether ``init_lora_weights`` rewrites the base kernels (PiSSA, OLoRA, LoftQ).

        Such an adapter only reproduces the model on the rewritten base that
        :func:`lora_jax.init_with_base` returns.

        Example:
            >>> from lora_jax import LoraConfig
            >>> LoraConfig(target_modules=["q"], init_lora_weights="olora").changes_base
            True
            >>> LoraConfig(target_modules=["q"]).changes_base
            False
        """
        init = self.init_lora_weights
        return isinstance(init, str) and (init.startswith("pissa") or init in ("olora", "loftq"))

    def pissa_niter(self) -> int | None:
        """The subspace iterations of ``"pissa_niter_<k>"``; None for exact PiSSA or another init.

        Example:
            >>> from lora_jax import LoraConfig
            >>> LoraConfig(target_modules=["q"], init_lora_weights="pissa_niter_16").pissa_niter()
            16
        """
        init = self.init_lora_weights
        if isinstance(init, str) and init.startswith(_PISSA_NITER):
            return int(init[len(_PISSA_NITER):])
        return None

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form of every field (lists for tuples, also inside dicts).

        Example:
            >>> from lora_jax import LoraConfig
            >>> LoraConfig(target_modules=("q", "v"), trainable_token_indices=[3, 5]).to_dict()["trainable_token_indices"]
            [3, 5]
        """
        return {field.name: _plain(getattr(self, field.name)) for field in dataclasses.fields(self)}

    def replace(self, **changes: Any) -> LoraConfig:
        return dataclasses.replace(self, **changes)


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_positive_int(value: Any) -> bool:
    return _is_int(value) and value > 0


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


_PISSA_NITER = "pissa_niter_"
# PEFT compares these two case-insensitively (``init_lora_weights.lower()``).
_CASE_FREE_INITS = ("gaussian", "olora")


def _check_init(value: Any) -> bool | str:
    """``init_lora_weights`` normalised (``"Gaussian"`` -> ``"gaussian"``), or a ValueError."""
    supported = ", ".join(repr(v) for v in SUPPORTED_INITS)
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if not isinstance(value, str):
        raise ValueError(f"LoraConfig.init_lora_weights must be a bool or a string (one of {supported}), "
                         f"got {value!r}.")
    if value.lower() in _CASE_FREE_INITS:
        return value.lower()
    if value in ("pissa", "loftq"):
        return value
    if value.startswith(_PISSA_NITER):
        digits = value[len(_PISSA_NITER):]
        if re.fullmatch(r"[0-9]+", digits) is None:
            raise ValueError(
                f"LoraConfig.init_lora_weights={value!r}: the number of subspace iterations after "
                f"'pissa_niter_' must be a non-negative integer, e.g. 'pissa_niter_16'."
            )
        return f"{_PISSA_NITER}{int(digits)}"
    if value.lower() in UNSUPPORTED_PEFT_INITS:
        raise ValueError(
            f"LoraConfig.init_lora_weights={value!r} is a PEFT initialisation lora_jax does not implement; "
            f"supported: {supported}."
        )
    raise ValueError(f"LoraConfig.init_lora_weights must be one of {supported}, got {value!r}.")


def _check_loftq(loftq_config: Any, init: bool | str) -> dict[str, int]:
    """``loftq_config`` with PEFT's defaults filled in; empty unless ``init`` is ``"loftq"``."""
    if loftq_config is None:
        loftq_config = {}
    if not isinstance(loftq_config, Mapping):
        raise ValueError(f"LoraConfig.loftq_config must be a dict such as {LOFTQ_DEFAULTS}, got {loftq_config!r}.")
    if init != "loftq":
        if loftq_config:
            raise ValueError(
                f"LoraConfig.loftq_config={dict(loftq_config)!r} is set but init_lora_weights is "
                f"{init!r}; it only applies with init_lora_weights='loftq'."
            )
        return {}
    if not loftq_config:
        raise ValueError(
            "LoraConfig.init_lora_weights='loftq' needs loftq_config, e.g. "
            f"loftq_config={LOFTQ_DEFAULTS} (PEFT's LoftQConfig defaults)."
        )
    unknown = sorted(set(loftq_config) - set(LOFTQ_DEFAULTS))
    if unknown:
        raise ValueError(f"LoraConfig.loftq_config has unknown keys {unknown}; known: {sorted(LOFTQ_DEFAULTS)}.")
    out = {**LOFTQ_DEFAULTS, **loftq_config}
    if not _is_int(out["loftq_bits"]) or out["loftq_bits"] not in LOFTQ_BITS:
        raise ValueError(f"LoraConfig.loftq_config['loftq_bits'] must be one of {LOFTQ_BITS} "
                         f"(NF4 or int8, as PEFT), got {out['loftq_bits']!r}.")
    if not _is_positive_int(out["loftq_iter"]):
        raise ValueError(f"LoraConfig.loftq_config['loftq_iter'] must be a positive integer, "
                         f"got {out['loftq_iter']!r}.")
    return {k: int(v) for k, v in out.items()}


def _token_ids(where: str, ids: Any) -> tuple[int, ...]:
    if isinstance(ids, (str, bytes)) or not isinstance(ids, (Sequence, np.ndarray)):
        raise ValueError(f"LoraConfig.{where} must be a list of token ids, got {ids!r}.")
    ids = tuple(ids)
    bad = [i for i in ids if not _is_int(i) or i < 0]
    if bad or not ids:
        raise ValueError(f"LoraConfig.{where} must be a non-empty list of non-negative token ids, got {list(ids)!r}.")
    repeated = sorted({int(i) for i in ids if ids.count(i) > 1})
    if repeated:
        raise ValueError(f"LoraConfig.{where} lists token ids {repeated} more than once.")
    return tuple(int(i) for i in ids)


def _check_token_indices(value: Any) -> tuple[int, ...] | dict[str, tuple[int, ...]] | None:
    """PEFT's two forms: token ids for the input embedding, or ``{module name: token ids}``."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        if not value:
            raise ValueError("LoraConfig.trainable_token_indices is an empty dict; give {module name: [token ids]}.")
        out = {}
        for name, ids in value.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"LoraConfig.trainable_token_indices keys must be module names, got {name!r}.")
            out[name] = _token_ids(f"trainable_token_indices[{name!r}]", ids)
        return out
    return _token_ids("trainable_token_indices", value)


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
