"""``LoraConfig`` <-> ``adapter_config.json``: the keys PEFT writes, and reading them back safely.

Writing: :func:`to_adapter_config` fills every key peft 0.21's ``LoraConfig``
writes, with the config's own patterns where PEFT reads them the same on the
torch paths, otherwise exact module paths.

Reading: :func:`read_settings` checks the type of every key lora_jax or PEFT
relies on, refuses settings lora_jax does not implement (``lora_bias``,
base-modifying inits it cannot recompute, ...), and ignores unknown keys (newer
PEFT versions add some). :func:`lora_config_for_file` builds the ``LoraConfig``
that selects exactly the modules of a file; :func:`lora_config_from_peft` reads
the settings alone, field by field.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from lora_jax.config import BIAS_MODES, LoraConfig, layer_index, matches, pattern_key
from lora_jax.peft.errors import PeftFormatError
from lora_jax.tree import Target

PEFT_FORMAT_VERSION = "0.21.2"
TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")

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
    "lora_bias": "a bias on lora_B (lora_bias=true) is not supported",
    "use_qalora": "QA-LoRA (use_qalora=true) is not supported",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) is not supported",
    "arrow_config": "Arrow routing (arrow_config) is not supported",
    "use_bdlora": "block-diagonal LoRA (use_bdlora) is not supported",
    "monteclora_config": "MonteCLoRA (monteclora_config) is not supported",
    "kasa_config": "KaSA (kasa_config) is not supported",
    "layer_replication": "layer_replication is not supported",
}
# Initialisations after which PEFT's base weights differ from the pretrained ones.
_BASE_MUTATING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")
# Of those, the ones PEFT's loading reproduces deterministically from the original base
# (it re-runs the decomposition before loading A and B), and so does load_peft.
RECOMPUTED_INITS = ("pissa", "olora")


# -- writing --------------------------------------------------------------------------------

def to_adapter_config(
    config: LoraConfig,
    exported: Mapping[str, Target],
    module_paths: Sequence[str] | None,
    names_unchanged: bool,
    base_model_name_or_path: str | None,
    task_type: str | None,
    saved_paths: Sequence[str] | None,
    parameters: Mapping[str, Target] | None = None,
    token_paths: Mapping[str, Sequence[int]] | None = None,
) -> dict[str, Any]:
    """The ``adapter_config.json`` dict PEFT needs to rebuild exactly the exported modules.

    Example:
        >>> from lora_jax import LoraConfig
        >>> from lora_jax.peft.adapter_config import to_adapter_config
        >>> config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"])
        >>> out = to_adapter_config(config, {}, None, True, None, "CAUSAL_LM", None)
        >>> out["peft_type"], out["r"], out["lora_alpha"], out["target_modules"]
        ('LORA', 4, 8, ['q_proj'])

    Args:
        config: the adapter's config.
        exported: torch module path -> target, one per exported module (and layer).
        module_paths: every torch module path of the params (and their
            ancestors), or None when saving without params.
        names_unchanged: without params, whether the torch paths are the
            lora_jax names (no ``name_map``, no stacked layers).
        base_model_name_or_path, task_type: recorded as given.
        saved_paths: torch paths of the ``modules_to_save`` modules when a
            ``name_map`` renames them, else None.
        parameters: torch parameter path -> target, one per exported bare parameter
            (PEFT's ``target_parameters``, written as exact paths).
        token_paths: torch path -> token ids of every table with trainable tokens.

    Returns:
        Every key peft 0.21 writes; ``target_modules``, ``rank_pattern`` and
        ``alpha_pattern`` are the config's when PEFT matches them to the same
        modules with the same ranks, else exact torch paths.
    """
    out = dict(_PEFT_CONFIG_DEFAULTS)
    out.update(
        r=config.r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
        use_rslora=config.use_rslora, fan_in_fan_out=config.fan_in_fan_out, bias=config.bias,
        init_lora_weights=config.init_lora_weights, base_model_name_or_path=base_model_name_or_path,
        task_type=task_type, use_dora=config.use_dora, ensure_weight_tying=config.ensure_weight_tying,
        loftq_config=dict(config.loftq_config),
    )
    tokens = config.trainable_token_indices
    if tokens is not None:
        # A plain list means "the input embedding" to PEFT too; a dict is written with torch paths.
        out["trainable_token_indices"] = list(tokens) if not isinstance(tokens, Mapping) else {
            path: list(ids) for path, ids in (token_paths or {}).items()}
    paths = sorted(exported)
    parameters = dict(parameters or {})
    spec = config.target_modules
    keep_spec = False
    if spec != "all-linear" and not parameters:  # a spec that selects parameters is not PEFT's
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

    everything = {**exported, **parameters}  # PEFT keys a parameter's rank by its path
    consistent = all(
        peft_value(config.rank_pattern, config.r, p) == t.rank
        and peft_value(config.alpha_pattern, config.lora_alpha, p) == config.alpha(t.module_name)
        for p, t in everything.items()
    )
    if consistent:
        out["rank_pattern"] = dict(config.rank_pattern)
        out["alpha_pattern"] = dict(config.alpha_pattern)
    else:
        def key(path: str) -> str:  # PEFT matches keys as suffixes: anchor if another path ends alike
            return ("^" if any(q != path and q.endswith("." + path) for q in everything) else "") + path

        out["rank_pattern"] = {key(p): t.rank for p, t in sorted(everything.items()) if t.rank != config.r}
        out["alpha_pattern"] = {
            key(p): config.alpha(t.module_name) for p, t in sorted(everything.items())
            if config.alpha(t.module_name) != config.lora_alpha
        }

    if parameters:
        out["target_parameters"] = sorted(parameters)
    if config.modules_to_save:
        out["modules_to_save"] = list(config.modules_to_save if saved_paths is None else saved_paths)
    return out


# -- reading --------------------------------------------------------------------------------

def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_regex(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        re.compile(value)
    except re.error:
        return False
    return True


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _is_module_spec(value: Any) -> bool:
    return value is None or _is_str_list(value) or (isinstance(value, str) and _is_regex(value))


def _is_layer_index(value: Any) -> bool:
    return _is_int(value) and value >= 0


def _is_token_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(_is_layer_index(i) for i in value)


# key -> (check, what is expected). Keys lora_jax reads, and the ones PEFT needs to rebuild the model.
_FIELD_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "r": (lambda v: _is_int(v) and v > 0, "a positive integer such as 8"),
    "lora_alpha": (lambda v: _is_number(v) and math.isfinite(v), "a finite number such as 16"),
    "lora_dropout": (lambda v: v is None or (_is_number(v) and 0 <= v < 1), "a number in [0, 1)"),
    "use_rslora": (lambda v: v is None or isinstance(v, bool), "true or false"),
    "fan_in_fan_out": (lambda v: v is None or isinstance(v, bool), "true or false"),
    "use_dora": (lambda v: v is None or isinstance(v, bool), "true or false"),
    "lora_bias": (lambda v: v is None or isinstance(v, bool), "true or false"),
    "inference_mode": (lambda v: v is None or isinstance(v, bool), "true or false"),
    "bias": (lambda v: isinstance(v, str) and v in BIAS_MODES, " or ".join(json.dumps(b) for b in BIAS_MODES)),
    "init_lora_weights": (lambda v: isinstance(v, (bool, str)), 'true, false or a method name such as "gaussian"'),
    "target_modules": (_is_module_spec, "a list of module names, a valid regex string, or null"),
    "exclude_modules": (_is_module_spec, "a list of module names, a valid regex string, or null"),
    "modules_to_save": (lambda v: v is None or _is_str_list(v), "a list of module names or null"),
    "layers_to_transform": (
        lambda v: v is None or _is_layer_index(v) or (isinstance(v, list) and all(map(_is_layer_index, v))),
        "a layer index, a list of layer indices, or null"),
    "layers_pattern": (lambda v: v is None or isinstance(v, str) or _is_str_list(v),
                       "a layer container name, a list of them, or null"),
    "task_type": (lambda v: v is None or isinstance(v, str), 'a string such as "CAUSAL_LM", or null'),
    "base_model_name_or_path": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "rank_pattern": (lambda v: v is None or isinstance(v, dict), "an object mapping module patterns to ranks"),
    "alpha_pattern": (lambda v: v is None or isinstance(v, dict),
                      "an object mapping module patterns to lora_alpha values"),
    "target_parameters": (lambda v: v is None or _is_str_list(v), "a list of parameter names or null"),
    "ensure_weight_tying": (lambda v: v is None or isinstance(v, bool), "true or false"),
    "trainable_token_indices": (
        lambda v: v is None or _is_token_list(v) or (isinstance(v, dict) and all(
            isinstance(k, str) and _is_token_list(ids) for k, ids in v.items())),
        "a list of token ids, an object mapping module names to lists of token ids, or null"),
    "loftq_config": (lambda v: v is None or isinstance(v, dict), "an object (PEFT's LoftQConfig) or {}"),
}
_PATTERN_VALUES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "rank_pattern": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "alpha_pattern": (lambda v: _is_number(v) and math.isfinite(v), "a finite number"),
}


def _shown(value: Any) -> str:
    """``value`` as it reads in the JSON file, with its JSON type."""
    kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "an object", type(None): "null"}.get(type(value), f"a {type(value).__name__}")
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return text if value is None else f"{text} ({kind})"


@dataclasses.dataclass(frozen=True)
class AdapterSettings:
    """The checked ``adapter_config.json`` values that loading uses, with PEFT's defaults.

    Example:
        >>> from lora_jax.peft.adapter_config import read_settings
        >>> settings = read_settings({"peft_type": "LORA", "r": 4, "rank_pattern": {"v_proj": 2}}, "cfg")
        >>> settings.rank("model.layers.0.v_proj"), settings.rank("model.layers.0.q_proj")
        ((2, "rank_pattern['v_proj']"), (4, 'r'))
        >>> settings.lora_alpha
        8
    """

    r: int = 8
    lora_alpha: float = 8
    rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=dict)
    use_rslora: bool = False
    lora_dropout: float = 0.0
    init_lora_weights: bool | str = True
    bias: str = "none"
    modules_to_save: tuple[str, ...] = ()
    fan_in_fan_out: bool = False
    layers_pattern: str | tuple[str, ...] | None = None
    target_parameters: tuple[str, ...] = ()
    use_dora: bool = False
    ensure_weight_tying: bool = False
    trainable_token_indices: tuple[int, ...] | dict[str, tuple[int, ...]] | None = None

    def rank(self, torch_path: str) -> tuple[int, str]:
        """``(rank, which key gives it)`` for a torch module path, by PEFT's ``rank_pattern`` rule."""
        key = pattern_key(self.rank_pattern, torch_path)
        return (self.r, "r") if key is None else (self.rank_pattern[key], f"rank_pattern[{key!r}]")

    def alpha(self, torch_path: str) -> float:
        """``lora_alpha`` for a torch module path, by PEFT's ``alpha_pattern`` rule."""
        key = pattern_key(self.alpha_pattern, torch_path)
        return self.lora_alpha if key is None else self.alpha_pattern[key]


def _check_fields(peft_config: Any, source: str) -> None:
    """A LORA config whose known keys have the right types and no unsupported setting, or an error."""
    if not isinstance(peft_config, Mapping):
        raise PeftFormatError(
            f"{source}: expected a JSON object of PEFT settings (keys such as \"peft_type\", \"r\"), "
            f"found {_shown(peft_config)}."
        )
    if "peft_type" not in peft_config or peft_config["peft_type"] is None:
        raise PeftFormatError(f"{source} has no peft_type; it is not a PEFT adapter config.")
    peft_type = peft_config["peft_type"]
    if not isinstance(peft_type, str) or peft_type.upper() != "LORA":
        shown = peft_type if isinstance(peft_type, str) else _shown(peft_type)
        raise PeftFormatError(f"{source} is a {shown} adapter; lora_jax reads only peft_type LORA.")
    for key, (check, expected) in _FIELD_CHECKS.items():
        if key in peft_config and not check(peft_config[key]):
            raise PeftFormatError(f"{source}: {json.dumps(key)} is {_shown(peft_config[key])}; expected {expected}.")
    for name, (check, expected) in _PATTERN_VALUES.items():
        for key, value in (peft_config.get(name) or {}).items():
            if not _is_regex(key):
                raise PeftFormatError(f"{source}: {name} key {json.dumps(key)} is not a valid regex.")
            if not check(value):
                raise PeftFormatError(f"{source}: {name}[{json.dumps(key)}] is {_shown(value)}; expected {expected}.")
    for key, why in _UNSUPPORTED_SETTINGS.items():
        if peft_config.get(key):
            raise PeftFormatError(f"{source}: {why} ({key}={peft_config[key]!r}).")


# The LoraConfig fields that adapter_config.json carries, under the same names.
PEFT_FIELDS = ("r", "lora_alpha", "target_modules", "exclude_modules", "lora_dropout", "use_rslora",
               "rank_pattern", "alpha_pattern", "init_lora_weights", "bias", "modules_to_save",
               "layers_to_transform", "layers_pattern", "fan_in_fan_out", "use_dora", "loftq_config",
               "trainable_token_indices", "ensure_weight_tying")


def lora_config_from_peft(peft_config: Mapping[str, Any], source: str = "adapter_config.json") -> LoraConfig:
    """The :class:`LoraConfig` an ``adapter_config.json`` describes, field by field (no params needed).

    Example:
        >>> from lora_jax.peft.adapter_config import lora_config_from_peft
        >>> config = lora_config_from_peft({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_dora": True,
        ...                                 "target_modules": ["v_proj", "q_proj"]})
        >>> config.r, config.use_dora, config.target_modules
        (4, True, ('v_proj', 'q_proj'))

    Every field of :data:`PEFT_FIELDS` is read with PEFT's default where the file has
    none; keys lora_jax does not know are ignored, and settings it cannot represent
    (``lora_bias``, ...) are refused with :class:`PeftFormatError`, as is a value
    :class:`LoraConfig` rejects. :func:`load_peft` builds its config from the tensors
    instead (exact module names for the given params); this reads the settings alone.
    """
    _check_fields(peft_config, source)
    fields = {name: peft_config[name] for name in PEFT_FIELDS
              if name in peft_config and peft_config[name] is not None}
    try:
        return LoraConfig(**fields)
    except ValueError as err:
        raise PeftFormatError(f"{source}: its settings do not form a valid LoraConfig: {err}") from None


def read_settings(peft_config: Any, source: str) -> AdapterSettings:
    """Check a parsed ``adapter_config.json`` and return the settings lora_jax loads by.

    Example:
        >>> from lora_jax.peft.adapter_config import read_settings
        >>> read_settings({"peft_type": "LORA", "r": 8, "lora_alpha": 16}, "cfg").lora_alpha
        16
        >>> read_settings({"peft_type": "LORA", "r": "eight"}, "cfg")
        Traceback (most recent call last):
        ...
        lora_jax.peft.errors.PeftFormatError: cfg: "r" is "eight" (a string); expected a positive integer such as 8.

    Args:
        peft_config: the JSON value of the file (an object, i.e. a dict).
        source: names the file in error messages.

    Returns:
        :class:`AdapterSettings`. Raises :class:`PeftFormatError` for a value
        that is not a dict, a missing or non-LORA ``peft_type``, a known key
        of the wrong type, and settings lora_jax cannot represent exactly.
        Unknown keys are ignored.
    """
    _check_fields(peft_config, source)
    init = peft_config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() in RECOMPUTED_INITS:
        init = init.lower()
    elif isinstance(init, str) and init.lower().startswith(_BASE_MUTATING_INITS):
        raise PeftFormatError(
            f"{source}: init_lora_weights={init!r} changes the base model's weights in PEFT in a way that "
            "cannot be recomputed from the original base, so this adapter only works on that modified base. "
            "Convert it to a plain LoRA in PEFT with save_pretrained(..., "
            "path_initial_model_for_weight_conversion=...) first."
        )
    layers_pattern = peft_config.get("layers_pattern") or None
    tokens = peft_config.get("trainable_token_indices")
    if isinstance(tokens, dict):
        tokens = {k: tuple(v) for k, v in tokens.items()}
    elif tokens is not None:
        tokens = tuple(tokens)
    return AdapterSettings(
        r=peft_config.get("r", 8),
        lora_alpha=peft_config.get("lora_alpha", 8),
        rank_pattern=dict(peft_config.get("rank_pattern") or {}),
        alpha_pattern=dict(peft_config.get("alpha_pattern") or {}),
        use_rslora=bool(peft_config.get("use_rslora", False)),
        lora_dropout=float(peft_config.get("lora_dropout") or 0.0),
        init_lora_weights=init if init in (True, False, "gaussian", *RECOMPUTED_INITS) else True,
        bias=peft_config.get("bias", "none"),
        modules_to_save=tuple(peft_config.get("modules_to_save") or ()),
        fan_in_fan_out=bool(peft_config.get("fan_in_fan_out", False)),
        layers_pattern=layers_pattern if isinstance(layers_pattern, str) or layers_pattern is None
        else tuple(layers_pattern),
        target_parameters=tuple(peft_config.get("target_parameters") or ()),
        use_dora=bool(peft_config.get("use_dora") or False),
        ensure_weight_tying=bool(peft_config.get("ensure_weight_tying") or False),
        trainable_token_indices=tokens,
    )


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


def lora_config_for_file(
    settings: AdapterSettings,
    kernel_modules: Sequence[str],
    ranks: Mapping[str, int],
    alphas: Mapping[str, float],
    num_ins: Mapping[str, int],
    stacked: Sequence[str],
    saved: Sequence[str],
    kernel_names: Sequence[str],
    convs: Sequence[str] = (),
    token_indices: Mapping[str, Sequence[int]] | None = None,
) -> LoraConfig:
    """A ``LoraConfig`` that selects exactly the file's modules, with PEFT's ranks and scalings.

    Example:
        >>> from lora_jax.peft.adapter_config import lora_config_for_file, read_settings
        >>> settings = read_settings({"peft_type": "LORA", "r": 4, "lora_alpha": 8}, "cfg")
        >>> config = lora_config_for_file(settings, ["a.q_proj", "a.v_proj"], {"a.q_proj": 2},
        ...                               {"a.q_proj": 8}, {"a.q_proj": 1}, [], [], ("kernel",))
        >>> config.target_modules, config.rank("a.q_proj"), config.scaling("a.q_proj")
        (('a.q_proj',), 2, 4.0)

    Args:
        settings: the file's checked settings.
        kernel_modules: every module of the params with a kernel, in tree order.
        ranks, alphas, num_ins: per adapted module (lora_jax name), as found in the file.
        stacked: adapted modules with a leading layer axis.
        saved: modules whose full tensors the file holds as ``modules_to_save``.
        kernel_names: the leaf names that hold weights.
        convs: adapted modules the file holds as conv LoRA.
        token_indices: lora_jax module -> token ids, for tables with trainable tokens.

    Returns:
        The config; ``target_modules``, ``rank_pattern``, ``alpha_pattern`` and
        ``in_axes`` are exact (escaped, anchored where names would clash).
    """
    names = [m for m in kernel_modules if m in ranks]  # in tree order
    r, alpha = settings.r, settings.lora_alpha
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=_exact_spec(names, kernel_modules),
        lora_dropout=settings.lora_dropout,
        use_rslora=settings.use_rslora,
        rank_pattern={_exact_key(m, kernel_modules): ranks[m] for m in names if ranks[m] != r},
        alpha_pattern={_exact_key(m, kernel_modules): alphas[m] for m in names if alphas[m] != alpha},
        init_lora_weights=settings.init_lora_weights,
        bias=settings.bias,
        modules_to_save=tuple(dict.fromkeys(saved)) or None,
        fan_in_fan_out=settings.fan_in_fan_out,
        kernel_names=tuple(kernel_names),
        in_axes={_exact_key(m, kernel_modules): num_ins[m] for m in names if num_ins[m] != 1},
        stacked_modules=_exact_spec(stacked, kernel_modules) if stacked else None,
        conv_modules=_exact_spec(convs, kernel_modules) if convs else None,
        layers_pattern=settings.layers_pattern,
        use_dora=settings.use_dora,
        ensure_weight_tying=settings.ensure_weight_tying,
        trainable_token_indices=dict(token_indices) if token_indices else None,
    )
