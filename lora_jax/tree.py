"""Module names over params trees, LoRA targets, and trainable masks.

A leaf's *module name* is the dotted key path of its parent, with a leading
``params`` collection dropped, sequence indices written as numbers and NNX's
trailing ``.value`` removed::

    {"params": {"model": {"layers": {"0": {"q_proj": {"kernel": W}}}}}}
    -> module "model.layers.0.q_proj", leaf "kernel"

A *target* is a kernel leaf that gets an adapter. Everything here runs on
shapes only, so it is cheap at trace time.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np

from lora_jax.config import OUTPUT_HEAD_NAMES, LoraConfig, layer_index, matches, pattern_key
from lora_jax.quantize import is_quantized

KeyPath = tuple[Any, ...]
Adapter = dict[str, dict[str, jax.Array]]

_COLLECTION = "params"
_VARIABLE_ATTRS = ("value", "raw_value")  # NNX Variable wrappers in key paths


def _key_str(key: Any) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def split_path(path: KeyPath) -> tuple[str, str]:
    """``(module_name, leaf_name)`` for a ``jax.tree`` key path."""
    names = [_key_str(k) for k in path]
    while len(names) > 1 and isinstance(path[len(names) - 1], jax.tree_util.GetAttrKey) \
            and names[-1] in _VARIABLE_ATTRS:
        names.pop()
    if len(names) > 1 and names[0] == _COLLECTION:
        names = names[1:]
    return ".".join(names[:-1]), names[-1]


def named_leaves(params: Any) -> Iterator[tuple[KeyPath, str, str, Any]]:
    """Yield ``(key_path, module_name, leaf_name, leaf)`` for every leaf.

    A quantized kernel (:class:`lora_jax.quantize.QuantizedArray`) is one leaf.
    """
    for path, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_quantized)[0]:
        module_name, leaf_name = split_path(path)
        yield path, module_name, leaf_name, leaf


def module_names(params: Any, config: LoraConfig | None = None) -> list[str]:
    """Names of the modules that hold a kernel (``config.kernel_names``)."""
    kernel_names = (config or _DEFAULT_CONFIG).kernel_names
    return list(dict.fromkeys(
        m for _, m, leaf_name, _ in named_leaves(params) if leaf_name in kernel_names
    ))


@dataclasses.dataclass(frozen=True)
class Target:
    """A kernel that gets an adapter, and how its axes split.

    The kernel's shape is ``lead + in_shape + out_shape``: ``lead`` holds the
    stacked-layer axis (``nn.scan``), ``in_shape`` the axes the model contracts
    with its input. A has shape ``lead + in_shape + (rank,)`` and B has shape
    ``lead + (rank,) + out_shape``, so ``A @ B`` has the kernel's shape.
    """

    module_name: str
    path: KeyPath
    leaf_name: str
    shape: tuple[int, ...]
    dtype: Any
    num_lead: int
    num_in: int
    rank: int
    scaling: float

    @property
    def lead_shape(self) -> tuple[int, ...]:
        return self.shape[: self.num_lead]

    @property
    def in_shape(self) -> tuple[int, ...]:
        return self.shape[self.num_lead : self.num_lead + self.num_in]

    @property
    def out_shape(self) -> tuple[int, ...]:
        return self.shape[self.num_lead + self.num_in :]

    @property
    def a_shape(self) -> tuple[int, ...]:
        return self.lead_shape + self.in_shape + (self.rank,)

    @property
    def b_shape(self) -> tuple[int, ...]:
        return self.lead_shape + (self.rank,) + self.out_shape

    @property
    def is_embedding(self) -> bool:
        return self.leaf_name == "embedding"


_DEFAULT_CONFIG = LoraConfig(target_modules="all-linear")


class InAxesWarning(UserWarning):
    """An N-D kernel's split into input and output axes had to be guessed.

    Pass ``LoraConfig.in_axes``, or give :func:`lora_jax.init` the model
    (``apply_fn=``, ``example_args=``) so it can read the split off the traced model.
    """


def warn_guessed_splits(config: LoraConfig, params: Any, targets: dict[str, Target]) -> None:
    """Warn for every N-D target whose split is the default guess: no ``in_axes`` entry
    and no bias beside it to read the output axes from."""
    biases = None
    for name, target in targets.items():
        if len(target.shape) - target.num_lead <= 2 or pattern_key(config.in_axes, name) is not None \
                or config.is_conv(name):
            continue
        biases = bias_shapes(params) if biases is None else biases
        if name in biases:
            continue
        warnings.warn(
            f"lora_jax: kernel {name!r} of shape {target.shape} has no bias to read its output axes "
            f"from; assuming {target.num_in} input axis (A {target.a_shape}, B {target.b_shape}). If "
            "the model contracts more of its axes (e.g. a DenseGeneral output projection), pass "
            f"LoraConfig.in_axes={{{name.rsplit('.', 1)[-1]!r}: n}} or lora_jax.init(..., apply_fn=, "
            "example_args=) to read the split off the model; otherwise that dot falls back to the "
            "dense kernel.",
            InAxesWarning,
            stacklevel=3,
        )


def _describe_names(wanted: str, names: list[str], limit: int = 12) -> str:
    ordered = sorted(names, key=lambda n: -difflib.SequenceMatcher(None, wanted, n).ratio())
    shown = ", ".join(ordered[:limit])
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return f"module names with a kernel, closest first: {shown}{more}"


def select_modules(config: LoraConfig, params: Any) -> tuple[list[str], dict[str, tuple[KeyPath, str, Any]]]:
    """Module names ``config`` targets (before shape checks), and ``{module: (path, leaf_name, leaf)}``
    for every kernel leaf."""
    candidates: dict[str, tuple[KeyPath, str, Any]] = {}
    for path, module_name, leaf_name, leaf in named_leaves(params):
        if leaf_name not in config.kernel_names:
            continue
        if module_name in candidates:
            raise ValueError(
                f"Module {module_name!r} holds two kernel leaves ({candidates[module_name][1]!r} "
                f"and {leaf_name!r}); set LoraConfig.kernel_names to pick one."
            )
        candidates[module_name] = (path, leaf_name, leaf)
    names = list(candidates)
    if not names:
        raise ValueError(
            f"No leaf of the params tree is named one of {tuple(config.kernel_names)}; "
            "set LoraConfig.kernel_names to the name your model gives its weights."
        )

    spec = config.target_modules
    if spec == "all-linear":
        selected = [
            n for n in names
            if candidates[n][1] == "kernel" and n.rsplit(".", 1)[-1] not in OUTPUT_HEAD_NAMES
        ]
    else:
        selected = [n for n in names if matches(spec, n)]
        if not isinstance(spec, str):
            for key in spec:
                if not any(matches((key,), n) for n in names):
                    raise ValueError(
                        f"target_modules entry {key!r} matches no module; {_describe_names(key, names)}."
                    )
        elif not selected:
            raise ValueError(
                f"target_modules regex {spec!r} matches no module; {_describe_names(spec, names)}."
            )
    if config.exclude_modules is not None:
        selected = [n for n in selected if not matches(config.exclude_modules, n)]
    if config.layers_to_transform is not None:
        keep = set(config.layers_to_transform)
        present = {layer_index(n, config.layers_pattern) for n in selected} - {None}
        missing = sorted(keep - present)
        if missing and present:
            raise ValueError(
                f"layers_to_transform {missing} names layers the targeted modules do not have; "
                f"their layer indices are {min(present)}..{max(present)} "
                f"(layers_pattern={config.layers_pattern!r})."
            )
        selected = [n for n in selected if layer_index(n, config.layers_pattern) in keep]
        if any(config.is_stacked(n) for n in selected):
            raise ValueError(
                "layers_to_transform cannot pick layers out of stacked (scanned) kernels; "
                "unroll the layers or drop layers_to_transform."
            )
    if not selected:
        raise ValueError(
            f"LoraConfig selects no module (target_modules={spec!r}, "
            f"exclude_modules={config.exclude_modules!r}, "
            f"layers_to_transform={config.layers_to_transform!r}); {_describe_names(str(spec), names)}."
        )
    return selected, candidates


def find_targets(config: LoraConfig, params: Any, adapter: Adapter | None = None) -> dict[str, Target]:
    """The kernels ``config`` selects in ``params``, by module name, in tree order.

    Example:
        >>> import jax.numpy as jnp
        >>> params = {"params": {"q": {"kernel": jnp.zeros((8, 4))}, "o": {"kernel": jnp.zeros((4, 8))}}}
        >>> targets = find_targets(LoraConfig(r=2, target_modules=["q"]), params)
        >>> targets["q"].a_shape, targets["q"].b_shape
        ((8, 2), (2, 4))

    How an N-D kernel splits into input and output axes (``Target.num_in``), first
    rule that applies: ``config.in_axes``; ``config.conv_modules`` (all axes but the
    last); the ``lora_A`` of ``adapter`` when one is
    given (an adapter carries its split in its shapes); a ``bias`` beside the kernel
    (a bias has the output's shape, so ``(heads, head_dim, d)`` with a ``(d,)`` bias has
    two input axes); otherwise one input axis. :func:`lora_jax.init` can also read the
    split off the model (``apply_fn=``).

    Raises ``ValueError`` naming what is wrong when a target, pattern or
    ``modules_to_save`` entry matches nothing, a rank does not fit its
    kernel, or a selected leaf is not an array of rank >= 2. A rank above
    min(in, out) is accepted when ``adapter`` already has it (PEFT allows any
    rank; a PiSSA/OLoRA adapter converted to the original base has rank 2r).
    """
    selected, candidates = select_modules(config, params)
    for field in ("rank_pattern", "alpha_pattern", "in_axes"):
        for key in getattr(config, field):
            if not any(pattern_key({key: None}, n) for n in selected):
                raise ValueError(
                    f"{field} key {key!r} matches no targeted module; targeted: {', '.join(selected[:12])}"
                    + (" ..." if len(selected) > 12 else "") + "."
                )
    if config.stacked_modules is not None and not any(config.is_stacked(n) for n in selected):
        raise ValueError(f"stacked_modules {config.stacked_modules!r} matches no targeted module.")
    check_modules_to_save(config, params)

    biases = bias_shapes(params) if any(
        len(np.shape(candidates[n][2])) > 2 + config.is_stacked(n) for n in selected) else {}
    targets = {}
    for name in selected:
        path, leaf_name, leaf = candidates[name]
        entry = adapter.get(name) if isinstance(adapter, dict) else None
        targets[name] = _make_target(config, name, path, leaf_name, leaf,
                                     _num_in_axes(config, name, leaf, entry, biases.get(name)), entry)
    return targets


def bias_shapes(params: Any) -> dict[str, tuple[int, ...]]:
    """``{module_name: shape}`` of every ``bias`` leaf."""
    return {m: tuple(np.shape(leaf)) for _, m, leaf_name, leaf in named_leaves(params) if leaf_name == "bias"}


def _num_in_axes(config: LoraConfig, name: str, kernel: Any, entry: Any, bias_shape: Any) -> int:
    """The number of input axes of ``name``'s kernel (see :func:`find_targets`)."""
    if pattern_key(config.in_axes, name) is not None:
        return config.num_in_axes(name)
    num_lead = 1 if config.is_stacked(name) else 0
    ndim = len(np.shape(kernel))
    if config.is_conv(name) and ndim - num_lead >= 2:  # window... + (in, out): all but the last axis
        return ndim - num_lead - 1
    a = entry.get("lora_A") if isinstance(entry, dict) else None
    if a is not None and 1 <= np.ndim(a) - num_lead - 1 < ndim - num_lead:
        return np.ndim(a) - num_lead - 1
    if bias_shape is not None and ndim - num_lead > 2:
        out_ndim = len(bias_shape) - num_lead
        if 1 <= out_ndim < ndim - num_lead and tuple(np.shape(kernel))[ndim - out_ndim:] == bias_shape[num_lead:]:
            return ndim - num_lead - out_ndim
    return 1


def _make_target(config: LoraConfig, name: str, path: KeyPath, leaf_name: str, leaf: Any,
                 num_in: int, entry: Any = None) -> Target:
    shape = getattr(leaf, "shape", None)
    num_lead = 1 if config.is_stacked(name) else 0
    if shape is None or len(shape) < 2 + num_lead:
        what = f"shape {tuple(shape)}" if shape is not None else f"a {type(leaf).__name__}"
        need = "rank >= 3 (a stacked layer axis, then in and out)" if num_lead else "rank >= 2"
        raise ValueError(f"Targeted leaf {name}.{leaf_name} is {what}; LoRA needs an array of {need}.")
    if not 1 <= num_in < len(shape) - num_lead:
        raise ValueError(
            f"in_axes gives {name} {num_in} input axes, but its kernel of shape {tuple(shape)} "
            f"has {len(shape) - num_lead} axes to split into input and output."
        )
    rank = config.rank(name)
    fan_in = math.prod(shape[num_lead : num_lead + num_in])
    fan_out = math.prod(shape[num_lead + num_in :])
    given = entry.get("lora_A") if isinstance(entry, dict) else None
    if rank > min(fan_in, fan_out) and (given is None or np.shape(given)[-1:] != (rank,)):
        raise ValueError(
            f"Rank {rank} for {name} exceeds min(in, out) = min({fan_in}, {fan_out}) of its kernel "
            f"{tuple(shape)}; use r <= {min(fan_in, fan_out)} (rank_pattern can lower one module)."
        )
    return Target(
        module_name=name, path=path, leaf_name=leaf_name, shape=tuple(shape),
        dtype=getattr(leaf, "dtype", None), num_lead=num_lead, num_in=num_in, rank=rank,
        scaling=config.scaling(name),
    )


def check_adapter(targets: dict[str, Target], adapter: Adapter) -> None:
    """Raise ``ValueError`` unless ``adapter`` has exactly the A/B shapes ``targets`` need."""
    if not isinstance(adapter, dict):
        raise TypeError(f"adapter must be a dict of module name -> {{'lora_A', 'lora_B'}}, got {type(adapter).__name__}.")
    missing = [n for n in targets if n not in adapter]
    extra = [n for n in adapter if n not in targets]
    if missing or extra:
        raise ValueError(
            "The adapter does not fit the params and config: "
            + (f"missing modules {missing[:8]}" if missing else "")
            + ("; " if missing and extra else "")
            + (f"modules not targeted in these params {extra[:8]}" if extra else "")
            + ". Was it made with lora_jax.init for this model and config?"
        )
    for name, target in targets.items():
        entry = adapter[name]
        for key, want in (("lora_A", target.a_shape), ("lora_B", target.b_shape)):
            if key not in entry:
                raise ValueError(f"adapter[{name!r}] has no {key!r} (keys: {sorted(entry)}).")
            got = tuple(np.shape(entry[key]))
            if got != want:
                raise ValueError(
                    f"adapter[{name!r}][{key!r}] has shape {got}, but kernel {name}.{target.leaf_name} "
                    f"of shape {target.shape} with rank {target.rank} needs {want}."
                )


# -- trainable masks, partition / combine ----------------------------------------

def _under(spec: tuple[str, ...], module_name: str) -> bool:
    """Whether ``module_name`` is one of ``spec``'s modules or inside one."""
    parts = module_name.split(".")
    return any(matches(spec, ".".join(parts[:i])) for i in range(1, len(parts) + 1))


def check_modules_to_save(config: LoraConfig, params: Any) -> None:
    if not config.modules_to_save:
        return
    modules = list(dict.fromkeys(m for _, m, _, _ in named_leaves(params)))
    for key in config.modules_to_save:
        if not any(_under((key,), m) for m in modules):
            raise ValueError(f"modules_to_save entry {key!r} matches no module; {_describe_names(key, modules)}.")


def trainable_mask(params: Any, config: LoraConfig) -> Any:
    """A pytree of bools over ``params``: True for leaves that train in full.

    These are the leaves of ``modules_to_save`` and, with ``bias="all"`` or
    ``"lora_only"``, the biases; the kernels themselves stay frozen (their
    update lives in the adapter). An embedding table in ``modules_to_save`` with
    ``ensure_weight_tying=False`` stays frozen too: its trained copy lives in the
    adapter (:mod:`lora_jax.tables`), so that a tied output head keeps the original.

    Example:
        >>> import jax.numpy as jnp
        >>> params = {"params": {"q": {"kernel": jnp.zeros((4, 4)), "bias": jnp.zeros(4)}}}
        >>> mask = trainable_mask(params, LoraConfig(target_modules=["q"], bias="all"))
        >>> mask
        {'params': {'q': {'bias': True, 'kernel': False}}}
        >>> trainable, frozen = partition(params, mask)
        >>> trainable["params"]["q"]["kernel"] is None, frozen["params"]["q"]["bias"] is None
        (True, True)
    """
    targeted = set(find_targets(config, params)) if config.bias == "lora_only" else set()
    saved = tuple(config.modules_to_save or ())

    def is_trainable(path: KeyPath, _: Any) -> bool:
        module_name, leaf_name = split_path(path)
        if saved and _under(saved, module_name):
            return leaf_name != "embedding" or config.ensure_weight_tying
        if leaf_name == "bias":
            return config.bias == "all" or module_name in targeted
        return False

    # A quantized kernel is one (frozen) leaf, not its packed codes and scales.
    return jax.tree_util.tree_map_with_path(is_trainable, params, is_leaf=is_quantized)


def partition(tree: Any, mask: Any) -> tuple[Any, Any]:
    """Split ``tree`` by a bool ``mask`` into ``(selected, rest)``, ``None`` elsewhere."""
    selected = jax.tree.map(lambda x, m: x if m else None, tree, mask, is_leaf=is_quantized)
    rest = jax.tree.map(lambda x, m: None if m else x, tree, mask, is_leaf=is_quantized)
    return selected, rest


def combine(*trees: Any) -> Any:
    """Rejoin trees from :func:`partition`: each leaf from the first tree not ``None`` there."""
    def first(*leaves: Any) -> Any:
        return next((leaf for leaf in leaves if leaf is not None), None)

    return jax.tree.map(first, *trees, is_leaf=lambda x: x is None or is_quantized(x))


# -- counting ------------------------------------------------------------------------

def _size(tree: Any, keep: Callable[[Any], bool] | None = None) -> int:
    leaves = jax.tree.leaves(tree, is_leaf=is_quantized)
    return sum(int(np.prod(np.shape(x))) for x in leaves if keep is None or keep(x))


def count_parameters(params: Any, adapter: Adapter, config: LoraConfig | None = None) -> dict[str, float]:
    """``{"trainable": N, "all": M, "trainable%": P}`` as PEFT counts them.

    The adapter counts towards both; with ``config``, leaves that train in
    full (``modules_to_save``, biases) count as trainable too.
    """
    adapter_size = _size(adapter)
    trainable = adapter_size
    if config is not None:
        trainable += _size(partition(params, trainable_mask(params, config))[0])
    total = _size(params) + adapter_size
    return {"trainable": trainable, "all": total, "trainable%": 100.0 * trainable / max(total, 1)}


def print_trainable_parameters(params: Any, adapter: Adapter, config: LoraConfig | None = None) -> None:
    """Print ``trainable params: N || all params: M || trainable%: P`` like PEFT."""
    c = count_parameters(params, adapter, config)
    print(f"trainable params: {c['trainable']:,d} || all params: {c['all']:,d} || "
          f"trainable%: {c['trainable%']:.4f}")
