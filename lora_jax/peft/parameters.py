"""LoRA on bare torch parameters: PEFT's ``target_parameters`` (``lora.ParamWrapper``).

transformers 5 stores the experts of an MoE block (Mixtral, Qwen3-MoE, ...) as fused
``nn.Parameter`` stacks of shape (experts, out, in), not as ``nn.Linear`` modules, and
its routers as bare (experts, hidden) weights; PEFT adapts them with
``target_parameters=["mlp.experts.gate_up_proj", ...]``. In a lora_jax params tree such
a parameter is a module of its own, named by the parameter's torch path, whose one leaf
is :data:`PARAMETER_LEAF`: ``model.layers.0.mlp.experts.gate_up_proj.param``, the torch
tensor with its last two axes swapped (an (in, out) kernel, experts first). Its
adapter is an ordinary stacked one (``LoraConfig.stacked_modules``: the expert axis
leads): A (experts, in, r), B (experts, r, out).

PEFT's format for one targeted parameter ``<module>.<name>`` of E experts:

=========================  =======================  ======================================
key                        torch shape              holds
=========================  =======================  ======================================
``<m>.lora_A.weight``      (E * r, in)              row ``e * r + j``: A[e, :, j]
``<m>.lora_B.weight``      (out, r * E)             column ``j * E + e``: B[e, j, :]
=========================  =======================  ======================================

(a 2-D parameter, E = 1, is keyed like an ``nn.Linear``). ``<m>`` is ``<module>``
with one ``.base_layer`` per targeted parameter of the same module registered after
this one: PEFT wraps the parameters in registration order, each wrapper around the
previous, so with both expert stacks targeted ``gate_up_proj`` is keyed under
``experts.base_layer`` and ``down_proj`` under ``experts``. The registration order is
transformers' (:data:`REGISTRATION_ORDER`), which a params tree cannot tell.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from lora_jax.config import LoraConfig
from lora_jax.peft.errors import PeftFormatError
from lora_jax.peft.keys import parse_key
from lora_jax.peft.naming import ParamsIndex, layer_paths, stack_container
from lora_jax.tree import Target, named_leaves

# The leaf name of a bare torch parameter in a lora_jax params tree.
PARAMETER_LEAF = "param"
# The order in which transformers' fused-experts modules register their parameters
# (MixtralExperts, Qwen3MoeExperts, ...): PEFT nests its wrappers in this order.
REGISTRATION_ORDER = ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")
_WRAPPED = ".base_layer"
# Module names that peft 0.21, on a transformers-5 MoE model, rewrites from
# target_modules into target_parameters (the experts' stacks and the router): its
# conversion of adapters trained on transformers 4, where experts were nn.Linear
# modules. A dense MLP of such a model cannot be targeted in PEFT under these names.
PEFT_MOE_REMAPPED_NAMES = ("gate", "gate_proj", "up_proj", "down_proj", "w1", "w2", "w3")


def is_parameter(target: Target) -> bool:
    """Whether ``target`` is a bare torch parameter (PEFT ``target_parameters``), not a module.

    Example:
        >>> from lora_jax.tree import Target
        >>> from lora_jax.peft.parameters import is_parameter
        >>> is_parameter(Target("m.experts.down_proj", (), "param", (4, 8, 6), None, 1, 1, 2, 1.0))
        True
    """
    return target.leaf_name == PARAMETER_LEAF


def wrapper_modules(parameter_paths: Iterable[str]) -> dict[str, str]:
    """torch parameter path -> the module path PEFT keys its LoRA factors under.

    Example:
        >>> from lora_jax.peft.parameters import wrapper_modules
        >>> wrapper_modules(["l.0.experts.down_proj", "l.0.experts.gate_up_proj", "l.0.gate.weight"])
        {'l.0.experts.gate_up_proj': 'l.0.experts.base_layer', 'l.0.experts.down_proj': 'l.0.experts', 'l.0.gate.weight': 'l.0.gate'}

    Raises ``ValueError`` when several parameters of one module are targeted and some
    are not in :data:`REGISTRATION_ORDER` (their nesting in PEFT cannot be told).
    """
    by_module: dict[str, list[str]] = {}
    for path in dict.fromkeys(parameter_paths):
        module, _, name = path.rpartition(".")
        if not module:
            raise ValueError(f"PEFT cannot target the top-level parameter {path!r}; it needs a parent module.")
        by_module.setdefault(module, []).append(name)
    out = {}
    for module, names in by_module.items():
        unknown = [n for n in names if n not in REGISTRATION_ORDER]
        if len(names) > 1 and unknown:
            raise ValueError(
                f"Parameters {sorted(names)} of module {module!r} are all targeted, so PEFT nests its "
                f"wrappers in the torch module's registration order, which lora_jax knows only for "
                f"{REGISTRATION_ORDER}; target one parameter of {module!r} per adapter."
            )
        ordered = sorted(names, key=REGISTRATION_ORDER.index) if len(names) > 1 else names
        for i, name in enumerate(ordered):
            out[f"{module}.{name}"] = module + _WRAPPED * (len(ordered) - 1 - i)
    return out


def check_moe_module_names(module_names: Iterable[str], params: Any) -> None:
    """Raise ``ValueError`` if PEFT would load LoRA on ``module_names`` into other tensors.

    On a model with expert stacks (a ``param`` leaf under a module named ``experts``),
    peft 0.21 moves every target module named one of :data:`PEFT_MOE_REMAPPED_NAMES`
    to the experts' parameters, so an adapter on, e.g., a dense layer's ``down_proj``
    would silently load as LoRA on the experts.

    Example:
        >>> import numpy as np
        >>> from lora_jax.peft.parameters import check_moe_module_names
        >>> params = {"l": {"0": {"mlp": {"down_proj": {"kernel": np.zeros((4, 4))}}},
        ...                 "1": {"mlp": {"experts": {"down_proj": {"param": np.zeros((2, 4, 4))}}}}}}
        >>> check_moe_module_names(["l.0.mlp.down_proj"], params)
        Traceback (most recent call last):
        ...
        ValueError: PEFT cannot hold LoRA on ['l.0.mlp.down_proj'] of this mixture-of-experts model: peft 0.21 on transformers 5 reads target modules named gate, gate_proj, up_proj, down_proj, w1, w2 or w3 as the experts' parameters (its conversion of transformers-4 adapters). Target other modules, or save the merged model instead (lora_jax.models.save_merged).
    """
    clash = [n for n in module_names if n.rsplit(".", 1)[-1] in PEFT_MOE_REMAPPED_NAMES]
    if not clash:
        return
    has_experts = any(leaf_name == PARAMETER_LEAF and ".experts." in f".{module}"
                      for _, module, leaf_name, _ in named_leaves(params))
    if has_experts:
        raise ValueError(
            f"PEFT cannot hold LoRA on {clash[:6]}{' ...' if len(clash) > 6 else ''} of this mixture-of-experts "
            "model: peft 0.21 on transformers 5 reads target modules named "
            f"{', '.join(PEFT_MOE_REMAPPED_NAMES[:-1])} or {PEFT_MOE_REMAPPED_NAMES[-1]} as the experts' "
            "parameters (its conversion of transformers-4 adapters). Target other modules, or save the merged "
            "model instead (lora_jax.models.save_merged)."
        )


def matches_target_parameters(spec: Sequence[str], path: str) -> bool:
    """PEFT's rule for ``target_parameters``: an exact torch parameter path or a dotted suffix.

    Example:
        >>> from lora_jax.peft.parameters import matches_target_parameters
        >>> matches_target_parameters(["mlp.experts.down_proj"], "model.layers.3.mlp.experts.down_proj")
        True
    """
    return any(path == t or path.endswith("." + t) for t in spec)


# -- layout ---------------------------------------------------------------------------------

def _layer_stacked(name: str, patterns: tuple[str, ...]) -> bool:
    return stack_container(name, patterns) is not None


def _num_experts(shape: tuple[int, ...], layer_stacked: bool) -> int | None:
    """The expert count of a parameter's per-layer shape (None for a 2-D parameter)."""
    body = shape[1:] if layer_stacked else shape
    return body[0] if len(body) == 3 else None


def check_parameter_target(target: Target, patterns: tuple[str, ...]) -> None:
    """Raise ``ValueError`` unless PEFT can hold ``target``'s adapter: a 2-D parameter (per
    layer), or a 3-D expert stack whose expert axis is the adapter's one leading axis.

    Example:
        >>> from lora_jax.tree import Target
        >>> from lora_jax.peft.parameters import check_parameter_target
        >>> check_parameter_target(Target("m.layers.0.experts.down_proj", (), "param", (4, 8, 6),
        ...                               None, 0, 1, 2, 1.0), ("layers",))
        Traceback (most recent call last):
        ...
        ValueError: Expert stack m.layers.0.experts.down_proj.param of shape (4, 8, 6) needs its expert axis as the adapter's leading axis (A (experts, in, r)): add it to LoraConfig.stacked_modules.
    """
    layer_stacked = target.num_lead == 1 and _layer_stacked(target.module_name, patterns)
    ndim = len(target.shape) - layer_stacked
    where = f"{target.module_name}.{target.leaf_name} of shape {target.shape}"
    if ndim == 3 and layer_stacked:
        raise ValueError(
            f"Expert stack {where} lies in scanned layers: its adapter would need two leading axes "
            "(layers, experts), which LoraConfig.stacked_modules cannot give. Load the model with "
            "scan_layers=False to put LoRA on its experts."
        )
    if ndim == 3 and target.num_lead != 1:
        raise ValueError(
            f"Expert stack {where} needs its expert axis as the adapter's leading axis "
            "(A (experts, in, r)): add it to LoraConfig.stacked_modules."
        )
    if ndim not in (2, 3) or target.num_in != 1:
        raise ValueError(
            f"Parameter {where}: PEFT's target_parameters holds LoRA only on 2-D parameters and 3-D "
            "expert stacks (one input axis)."
        )


def to_torch_factors(a: np.ndarray, b: np.ndarray, num_experts: int | None) -> tuple[np.ndarray, np.ndarray]:
    """One layer's A and B as PEFT's ``(lora_A.weight, lora_B.weight)``.

    Example:
        >>> import numpy as np
        >>> from lora_jax.peft.parameters import to_torch_factors
        >>> lora_a, lora_b = to_torch_factors(np.zeros((4, 6, 2)), np.zeros((4, 2, 8)), 4)
        >>> lora_a.shape, lora_b.shape
        ((8, 6), (8, 8))
    """
    if num_experts is None:
        return a.T, b.T
    experts, fan_in, rank = a.shape
    return (a.transpose(0, 2, 1).reshape(experts * rank, fan_in),
            b.transpose(2, 1, 0).reshape(b.shape[2], rank * experts))


def from_torch_factors(lora_a: np.ndarray, lora_b: np.ndarray,
                       num_experts: int | None) -> tuple[np.ndarray, np.ndarray]:
    """PEFT's ``(lora_A.weight, lora_B.weight)`` as one layer's A and B (inverse of
    :func:`to_torch_factors`).

    Example:
        >>> import numpy as np
        >>> from lora_jax.peft.parameters import from_torch_factors, to_torch_factors
        >>> a, b = np.arange(48.0).reshape(4, 6, 2), np.arange(64.0).reshape(4, 2, 8)
        >>> a2, b2 = from_torch_factors(*to_torch_factors(a, b, 4), 4)
        >>> bool((a2 == a).all() and (b2 == b).all())
        True
    """
    if num_experts is None:
        return lora_a.T, lora_b.T
    rank = lora_a.shape[0] // num_experts
    return (lora_a.reshape(num_experts, rank, lora_a.shape[1]).transpose(0, 2, 1),
            lora_b.reshape(lora_b.shape[0], rank, num_experts).transpose(2, 1, 0))


# -- export ---------------------------------------------------------------------------------

def parameter_tensors(
    targets: Mapping[str, Target], adapter: Mapping[str, Mapping[str, Any]], config: LoraConfig,
    to_torch: Callable[[str], str], patterns: tuple[str, ...],
) -> tuple[list[tuple[str, np.ndarray, str]], dict[str, Target]]:
    """``([(key without prefix, tensor, source)], {torch parameter path: target})`` for the
    parameter targets: PEFT's ParamWrapper keys, one per layer of a scanned target.

    Example:
        >>> import jax, numpy as np, lora_jax
        >>> from lora_jax.peft.parameters import parameter_tensors
        >>> params = {"l": {"0": {"experts": {"down_proj": {"param": np.zeros((4, 8, 6))}}}}}
        >>> config = lora_jax.LoraConfig(r=2, target_modules=["down_proj"], kernel_names=["param"],
        ...                              stacked_modules=["down_proj"])
        >>> targets = lora_jax.find_targets(config, params)
        >>> adapter = lora_jax.init(config, params, jax.random.key(0))
        >>> items, paths = parameter_tensors(targets, adapter, config, str, ("layers",))
        >>> [(key, value.shape) for key, value, _ in items], list(paths)
        ([('l.0.experts.lora_A.weight', (8, 8)), ('l.0.experts.lora_B.weight', (6, 8))], ['l.0.experts.down_proj'])
    """
    if not targets:
        return [], {}
    for why, on in (("lora_dropout != 0", config.lora_dropout), ("fan_in_fan_out", config.fan_in_fan_out),
                    ("use_dora", config.use_dora)):
        if on:
            raise ValueError(
                f"PEFT's target_parameters (lora.ParamWrapper) does not work with {why}, so an adapter on "
                f"parameters {sorted(targets)[:4]} with it cannot be saved in PEFT's format"
                + (" (a trained adapter is the same without dropout: save it with "
                   "config.replace(lora_dropout=0.0))." if why.startswith("lora_dropout") else ".")
            )
    per_layer = []
    for name, target in targets.items():
        check_parameter_target(target, patterns)
        layer_stacked = target.num_lead == 1 and _layer_stacked(name, patterns)
        experts = _num_experts(target.shape, layer_stacked)
        a, b = (np.asarray(adapter[name][k]) for k in ("lora_A", "lora_B"))
        size = target.shape[0] if layer_stacked else 0
        for index, path in layer_paths(to_torch(name), int(layer_stacked), size, patterns, name):
            per_layer.append((path, target, experts, a if index is None else a[index],
                              b if index is None else b[index]))
    wrappers = wrapper_modules(path for path, *_ in per_layer)
    items, exported = [], {}
    for path, target, experts, a, b in per_layer:
        lora_a, lora_b = to_torch_factors(a, b, experts)
        source = f"adapter[{target.module_name!r}]"
        items.append((f"{wrappers[path]}.lora_A.weight", lora_a, source + "['lora_A']"))
        items.append((f"{wrappers[path]}.lora_B.weight", lora_b, source + "['lora_B']"))
        exported[path] = target
    return items, exported


# -- import ---------------------------------------------------------------------------------

def read_parameter_factors(
    tensors: Mapping[str, Any], target_parameters: Sequence[str], index: ParamsIndex,
    rank: Callable[[str], tuple[int, str]], alpha: Callable[[str], float],
    check: Callable[[str, Any], np.ndarray], source: str,
) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, tuple[int, float, bool]], dict[str, Any]]:
    """Take the ParamWrapper keys of ``target_parameters`` out of ``tensors``.

    Returns ``(entries, settings, rest)``: ``{module: {"lora_A", "lora_B"}}`` in lora_jax's
    layout, ``{module: (rank, lora_alpha, stacked)}`` and the other tensors. ``rank`` and
    ``alpha`` give a torch parameter path's rank (and where it comes from) and alpha, as
    ``rank_pattern`` / ``alpha_pattern`` do; ``check(key, value)`` returns a checked
    floating-point array.

    Example:
        >>> import numpy as np
        >>> from lora_jax.peft.naming import ParamsIndex
        >>> from lora_jax.peft.parameters import read_parameter_factors
        >>> params = {"l": {"0": {"experts": {"down_proj": {"param": np.zeros((4, 8, 6))}}}}}
        >>> index = ParamsIndex(params, str, ("layers",), "f")
        >>> tensors = {"base_model.model.l.0.experts.lora_A.weight": np.ones((8, 8)),
        ...            "base_model.model.l.0.experts.lora_B.weight": np.ones((6, 8))}
        >>> entries, settings, rest = read_parameter_factors(
        ...     tensors, ["down_proj"], index, lambda p: (2, "r"), lambda p: 4.0,
        ...     lambda k, v: np.asarray(v), "f")
        >>> entries["l.0.experts.down_proj"]["lora_A"].shape, settings, rest
        ((4, 8, 2), {'l.0.experts.down_proj': (2, 4.0, True)}, {})
    """
    if not target_parameters:
        return {}, {}, dict(tensors)
    # Every parameter of the params the file's target_parameters select, per layer.
    layers_of: dict[str, tuple[str, int | None]] = {}
    torch_path_of = {m: p for p, m in index.by_torch.items()}
    for (module, leaf_name), (_, leaf) in index.leaves.items():
        if leaf_name != PARAMETER_LEAF:
            continue
        path = torch_path_of[module]
        stacked = _layer_stacked(module, index.patterns)
        size = np.shape(leaf)[0] if stacked else 0
        for layer, torch_path in layer_paths(path, int(stacked), size, index.patterns, module):
            if matches_target_parameters(target_parameters, torch_path):
                layers_of[torch_path] = (module, layer)
    by_wrapper = {wrapper: path for path, wrapper in wrapper_modules(layers_of).items()}

    found: dict[str, dict[str, tuple[str, np.ndarray]]] = {}
    rest = {}
    for key, value in tensors.items():
        parsed = parse_key(key, source) if isinstance(key, str) else None
        if parsed is None or parsed.kind != "entry" or parsed.module not in by_wrapper:
            rest[key] = value
            continue
        parts = found.setdefault(by_wrapper[parsed.module], {})
        if parsed.part in parts:
            raise PeftFormatError(f"{source}: keys {parts[parsed.part][0]!r} and {key!r} both hold "
                                  f"{parsed.part} of parameter {by_wrapper[parsed.module]}.")
        parts[parsed.part] = (key, check(key, value))

    per_module: dict[str, dict[int | None, tuple[np.ndarray, np.ndarray, int, float]]] = {}
    for torch_path, parts in found.items():
        module, layer = layers_of[torch_path]
        missing = [p for p in ("lora_A", "lora_B") if p not in parts]
        if missing:
            raise PeftFormatError(f"{source}: {next(iter(parts.values()))[0]!r} has no matching {missing[0]} tensor.")
        (key_a, lora_a), (key_b, lora_b) = parts["lora_A"], parts["lora_B"]
        shape = tuple(np.shape(index.leaves[(module, PARAMETER_LEAF)][1]))
        body = shape[1:] if layer is not None else shape
        experts = _num_experts(shape, layer is not None)
        if experts is not None and layer is not None:
            raise ValueError(
                f"{source}: {key_a!r} adapts the experts {module}.{PARAMETER_LEAF} of shape {shape}, which "
                "lie in scanned layers: their adapter would need two leading axes (layers, experts). "
                "Load the model with scan_layers=False."
            )
        fan_in, fan_out = body[-2], body[-1]
        stack = experts or 1
        fits = (lora_a.ndim == 2 and lora_b.ndim == 2 and lora_a.shape[0] % stack == 0
                and lora_a.shape[0] == lora_b.shape[1] and lora_a.shape[1] == fan_in and lora_b.shape[0] == fan_out)
        if not fits:
            layout = (f"(experts * r, in) = ({stack} * r, {fan_in}) and (out, r * experts) = ({fan_out}, r * {stack})"
                      if experts else f"(r, in) = (r, {fan_in}) and (out, r) = ({fan_out}, r)")
            raise ValueError(
                f"{source}: {key_a!r} has shape {tuple(lora_a.shape)} and {key_b!r} has shape "
                f"{tuple(lora_b.shape)}, which do not fit parameter {module}.{PARAMETER_LEAF} of shape {shape} "
                f"(torch layout with its last two axes swapped); expected {layout}."
            )
        r = lora_a.shape[0] // stack
        want, given_by = rank(torch_path)
        if r != want:
            raise ValueError(f"{source}: {key_a!r} has shape {tuple(lora_a.shape)}, i.e. rank {r}, but the "
                             f"config's {given_by} gives {torch_path} rank {want}.")
        a, b = from_torch_factors(lora_a, lora_b, experts)
        per_module.setdefault(module, {})[layer] = (a, b, r, alpha(torch_path))

    entries, settings = {}, {}
    for module, layers in per_module.items():
        if None in layers:  # one module: stacked when its leading axis is the experts'
            (a, b, r, layer_alpha) = layers[None]
            entries[module] = {"lora_A": a, "lora_B": b}
            settings[module] = (r, layer_alpha, a.ndim == 3)
            continue
        size = np.shape(index.leaves[(module, PARAMETER_LEAF)][1])[0]
        if sorted(layers) != list(range(size)):
            raise ValueError(f"{source}: scanned parameter {module!r} has {size} layers, but the file has keys "
                             f"for layers {sorted(layers)}; unroll the layers (scan_layers=False) to load it.")
        if len({(r, al) for _, _, r, al in layers.values()}) > 1:
            raise ValueError(f"{source}: the layers of scanned parameter {module!r} differ in rank or lora_alpha; "
                             "unroll the layers (scan_layers=False) to load it.")
        ordered = [layers[i] for i in range(size)]
        entries[module] = {"lora_A": np.stack([x[0] for x in ordered]), "lora_B": np.stack([x[1] for x in ordered])}
        settings[module] = (ordered[0][2], ordered[0][3], True)
    return entries, settings, rest

