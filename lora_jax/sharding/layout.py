"""Layouts: device meshes and the ``PartitionSpec`` of every frozen param, adapter leaf
and optimizer-state leaf.

Everything here works on shapes, so it runs on ``jax.ShapeDtypeStruct`` trees for
models too big to hold on one host, and on ``AbstractMesh``es, which need no devices.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Literal, NamedTuple

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec, Sharding

from lora_jax import tables
from lora_jax.config import LoraConfig
from lora_jax.dora import MAGNITUDE
from lora_jax.init import init
from lora_jax.tree import Adapter, find_targets, named_leaves

Strategy = Literal["dp", "fsdp", "tp", "fsdp_tp"]
STRATEGIES = ("dp", "fsdp", "tp", "fsdp_tp")
Rule = tuple[str, Any]  # (regex searched in "module.leaf", PartitionSpec or tuple)
AxisName = str | tuple[str, ...]

# Last component of a module name -> how tensor parallelism splits its kernel.
COLUMN_PARALLEL = (
    "q_proj", "k_proj", "v_proj", "qkv_proj", "gate_proj", "up_proj", "gate_up_proj",
    "c_attn", "c_fc", "query", "key", "value", "fc1", "wi", "wi_0", "wi_1", "w1", "w3",
    "lm_head",
)
ROW_PARALLEL = ("o_proj", "down_proj", "out_proj", "c_proj", "fc2", "wo", "w2")
# Parent module of MoE expert stacks (..., experts, in, out): tensor parallelism splits the
# expert axis (expert parallelism), so each device runs whole experts and no gate/up pair
# of a fused gate_up_proj is cut apart.
EXPERT_PARALLEL = ("experts",)

_KERNEL_NAMES = ("kernel", "embedding")


def _is_spec_leaf(x: Any) -> bool:
    return isinstance(x, (PartitionSpec, Sharding))


def _shape(x: Any) -> tuple[int, ...]:
    shape = getattr(x, "shape", None)  # arrays and jax.ShapeDtypeStruct
    return tuple(shape) if shape is not None else tuple(np.shape(x))


# -- meshes --------------------------------------------------------------------------------

def make_mesh(data: int = -1, model: int = 1, *, devices: Sequence[Any] | None = None,
              data_axis: str = "data", model_axis: str = "model") -> Mesh:
    """A ``(data, model)`` device mesh with ``Auto`` axis types.

    Example:
        >>> import jax
        >>> from lora_jax import sharding
        >>> mesh = sharding.make_mesh(devices=jax.devices()[:1])  # all given devices on data
        >>> dict(mesh.shape), mesh.axis_types
        ({'data': 1, 'model': 1}, (Auto, Auto))
        >>> sharding.make_mesh(data=2, model=4, devices=jax.devices()[:1])
        Traceback (most recent call last):
        ...
        ValueError: A 2 x 4 mesh needs 8 devices; 1 given.

    On 8 devices ``make_mesh(data=2, model=4)`` is 2-way data by 4-way model, and
    ``make_mesh()`` puts every device on the data axis.

    ``-1`` for ``data`` takes every device that ``model`` leaves. ``Auto`` axes
    let XLA choose the layout of intermediates; ``jax.make_mesh``'s default
    ``Explicit`` axes make a LoRA train step fail with "Contracting dimensions
    are sharded and it is ambiguous ...".
    """
    devices = list(jax.devices() if devices is None else devices)
    if data == -1:
        if model <= 0 or len(devices) % model:
            raise ValueError(f"model={model} does not divide the {len(devices)} devices.")
        data = len(devices) // model
    if data * model != len(devices):
        raise ValueError(f"A {data} x {model} mesh needs {data * model} devices; {len(devices)} given.")
    auto = (jax.sharding.AxisType.Auto,) * 2
    return jax.make_mesh((data, model), (data_axis, model_axis), axis_types=auto, devices=devices)


def _axis_sizes(mesh: Any) -> dict[str, int]:
    """``{axis name: size}`` of a Mesh, an AbstractMesh or a plain mapping."""
    shape = mesh if isinstance(mesh, Mapping) else mesh.shape
    return {str(name): int(size) for name, size in shape.items()}


def _names(axis: AxisName | None) -> tuple[str, ...]:
    if axis is None:
        return ()
    return (axis,) if isinstance(axis, str) else tuple(axis)


def _size(axis: AxisName | None, sizes: Mapping[str, int]) -> int:
    return math.prod(sizes[name] for name in _names(axis))


# -- parameter layouts ----------------------------------------------------------------------

def param_specs(params: Any, mesh: Any, strategy: Strategy = "fsdp",
                rules: Sequence[Rule] | None = None, *, config: LoraConfig | None = None,
                data_axis: AxisName = "data", model_axis: str = "model") -> Any:
    """A ``PartitionSpec`` for every leaf of ``params`` (a pytree like ``params``).

    Example:
        >>> import jax, numpy as np
        >>> from lora_jax import sharding
        >>> kernel = jax.ShapeDtypeStruct((64, 64), np.float32)  # shapes only
        >>> params = {"layers": {"0": {"q_proj": {"kernel": kernel}, "o_proj": {"kernel": kernel}}}}
        >>> specs = sharding.param_specs(params, {"data": 2, "model": 4}, "fsdp_tp")
        >>> specs["layers"]["0"]["q_proj"]["kernel"]  # input over data, output over model
        P('data', 'model')
        >>> specs["layers"]["0"]["o_proj"]["kernel"]  # row-parallel: input over model
        P('model', 'data')

    Args:
        params: the frozen params, arrays or ``jax.ShapeDtypeStruct`` (shapes only).
        mesh: a ``Mesh``, ``AbstractMesh`` or ``{axis name: size}``.
        strategy: ``"dp"``, ``"fsdp"``, ``"tp"`` or ``"fsdp_tp"`` (module docstring).
        rules: ``(regex, spec)`` pairs tried first, in order; the regex is
            ``re.search``-ed in ``"module_name.leaf_name"`` (such as
            ``"model.layers.0.self_attn.q_proj.kernel"``) and the first match
            wins. A spec may have fewer entries than the leaf has axes (the
            rest are replicated) but not more.
        config: the ``LoraConfig``; its ``stacked_modules`` mark leaves whose
            leading layer axis must stay whole (a ``lax.scan`` slices it), and
            its ``in_axes`` say which kernel axes are inputs for tensor
            parallelism. Without it kernels are taken as ``(in, *out)``.
        data_axis: mesh axis (or tuple of axes) for the batch and FSDP.
        model_axis: mesh axis for tensor parallelism.

    Raises ``ValueError`` for an unknown strategy, a mesh without the axes the
    strategy needs, or a rule whose spec does not fit its leaf.
    """
    sizes = _axis_sizes(mesh)
    if strategy not in STRATEGIES:
        raise ValueError(f"Unknown sharding strategy {strategy!r}; choose one of {STRATEGIES}.")
    needed = []
    if strategy in ("fsdp", "fsdp_tp"):
        needed += list(_names(data_axis))
    if strategy in ("tp", "fsdp_tp"):
        needed.append(model_axis)
    missing = [name for name in needed if name not in sizes]
    if missing:
        raise ValueError(
            f"Strategy {strategy!r} needs mesh axes {tuple(needed)}, but the mesh has axes "
            f"{tuple(sizes)}; build it with make_mesh(data=..., model=...) or pass "
            "data_axis= / model_axis= naming your axes."
        )
    compiled_rules = [(re.compile(pattern), spec) for pattern, spec in (rules or ())]
    kernel_names = tuple(config.kernel_names) if config is not None else _KERNEL_NAMES

    specs = []
    for _, module_name, leaf_name, leaf in named_leaves(params):
        specs.append(_leaf_spec(module_name, leaf_name, _shape(leaf), sizes, strategy, compiled_rules,
                                config, kernel_names, data_axis, model_axis))
    return jax.tree.unflatten(jax.tree.structure(params), specs)


def param_shardings(params: Any, mesh: Mesh, strategy: Strategy = "fsdp",
                    rules: Sequence[Rule] | None = None, *, config: LoraConfig | None = None,
                    data_axis: AxisName = "data", model_axis: str = "model") -> Any:
    """:func:`param_specs` as ``NamedSharding``s on ``mesh``.

    Example:
        >>> import jax, numpy as np
        >>> from lora_jax import sharding
        >>> mesh = sharding.make_mesh(devices=jax.devices()[:1])
        >>> params = {"q_proj": {"kernel": np.zeros((64, 32), np.float32)}}
        >>> shardings = sharding.param_shardings(params, mesh, "fsdp")
        >>> shardings["q_proj"]["kernel"].spec
        P('data', None)
        >>> sharding.shard(params, shardings)["q_proj"]["kernel"].sharding.spec
        P('data', None)
    """
    _check_auto_axes(mesh)
    specs = param_specs(params, mesh, strategy, rules, config=config, data_axis=data_axis,
                        model_axis=model_axis)
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs, is_leaf=_is_spec_leaf)


def _check_auto_axes(mesh: Any) -> None:
    explicit = [name for name, kind in zip(mesh.axis_names, getattr(mesh, "axis_types", ()))
                if kind == jax.sharding.AxisType.Explicit]
    if explicit:
        raise ValueError(
            f"Mesh axes {explicit} have AxisType.Explicit (jax.make_mesh's default), with which "
            "a LoRA train step fails to partition its matmuls; build the mesh with "
            "lora_jax.sharding.make_mesh(...) or jax.make_mesh(..., "
            "axis_types=(jax.sharding.AxisType.Auto,) * n)."
        )


def _leaf_spec(module_name: str, leaf_name: str, shape: tuple[int, ...], sizes: dict[str, int],
               strategy: str, rules: list[tuple[re.Pattern[str], Any]],
               config: LoraConfig | None, kernel_names: tuple[str, ...],
               data_axis: AxisName, model_axis: str) -> PartitionSpec:
    full_name = f"{module_name}.{leaf_name}" if module_name else leaf_name
    for pattern, spec in rules:
        if pattern.search(full_name):
            return _fit_rule(pattern.pattern, spec, full_name, shape, sizes)

    ndim = len(shape)
    entries: list[Any] = [None] * ndim
    stacked = config is not None and config.is_stacked(module_name)
    num_lead = 1 if stacked and ndim >= 2 else 0
    if strategy in ("tp", "fsdp_tp"):
        num_in = config.num_in_axes(module_name) if config is not None else 1
        model_size = sizes[model_axis]
        expert_axis = _expert_axis(module_name, ndim)
        axes = [expert_axis] if expert_axis is not None else _tensor_parallel_axes(
            module_name, leaf_name, ndim, num_lead, num_in, kernel_names)
        for axis in axes:
            if shape[axis] % model_size == 0:
                entries[axis] = model_axis
                break
    if strategy in ("fsdp", "fsdp_tp"):
        data_size = _size(data_axis, sizes)
        free = [axis for axis in range(num_lead, ndim)
                if entries[axis] is None and shape[axis] % data_size == 0]
        if free:
            largest = max(free, key=lambda axis: shape[axis])  # first of equal sizes
            entries[largest] = data_axis
    return PartitionSpec(*entries)


def _expert_axis(module_name: str, ndim: int) -> int | None:
    """The expert axis of an expert stack (``EXPERT_PARALLEL``), else None."""
    parts = module_name.split(".")
    if len(parts) >= 2 and parts[-2] in EXPERT_PARALLEL and ndim >= 3:
        return ndim - 3
    return None


def _tensor_parallel_axes(module_name: str, leaf_name: str, ndim: int, num_lead: int,
                          num_in: int, kernel_names: tuple[str, ...]) -> list[int]:
    """Axes that tensor parallelism may split, most wanted first."""
    role = module_name.rsplit(".", 1)[-1]
    if leaf_name == "embedding":  # (vocab, dim): vocab first
        return list(range(num_lead, ndim))
    if leaf_name in kernel_names and ndim >= num_lead + 2:
        num_in = min(num_in, ndim - num_lead - 1)
        inputs = list(range(num_lead, num_lead + num_in))
        outputs = list(range(num_lead + num_in, ndim))
        if role in COLUMN_PARALLEL:
            return outputs
        if role in ROW_PARALLEL:
            return inputs
        return []
    if leaf_name == "bias" and role in COLUMN_PARALLEL:  # bias has the output axes
        return list(range(num_lead, ndim))
    return []


def _fit_rule(pattern: str, spec: Any, full_name: str, shape: tuple[int, ...],
              sizes: dict[str, int]) -> PartitionSpec:
    entries = list(spec) if spec is not None else []
    if len(entries) > len(shape):
        raise ValueError(
            f"Sharding rule {pattern!r} gives {full_name} the spec {PartitionSpec(*entries)} "
            f"with {len(entries)} entries, but the leaf has shape {shape} ({len(shape)} axes); "
            "write a spec with at most one entry per axis, or a narrower regex "
            "(e.g. ending in r'\\.kernel$')."
        )
    used: list[str] = []
    fitted = []
    for axis, entry in enumerate(entries):
        names = _names(entry)
        unknown = [name for name in names if name not in sizes]
        if unknown:
            raise ValueError(
                f"Sharding rule {pattern!r} for {full_name} names mesh axes {unknown}, "
                f"but the mesh has axes {tuple(sizes)}."
            )
        twice = [name for name in names if name in used]
        if twice:
            raise ValueError(
                f"Sharding rule {pattern!r} for {full_name} uses mesh axis {twice[0]!r} twice "
                f"in {PartitionSpec(*entries)}."
            )
        used += names
        size = math.prod(sizes[name] for name in names)
        if names and shape[axis] % size:
            warnings.warn(
                f"Sharding rule {pattern!r}: axis {axis} of {full_name} (shape {shape}) has "
                f"size {shape[axis]}, which mesh axes {names} of size {size} do not divide; "
                "that axis is replicated instead.",
                stacklevel=4,
            )
            entry = None
        fitted.append(entry)
    return PartitionSpec(*fitted)


# -- adapter and optimizer layouts ------------------------------------------------------------

def adapter_shardings(config: LoraConfig, params: Any, params_shardings: Any = None) -> Any:
    """The adapter's layout derived from the kernels' (a pytree like the adapter).

    Example:
        >>> import jax, numpy as np, lora_jax
        >>> from jax.sharding import AbstractMesh, AxisType
        >>> from lora_jax import sharding
        >>> mesh = AbstractMesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
        >>> params = {"q_proj": {"kernel": jax.ShapeDtypeStruct((64, 64), np.float32)}}
        >>> config = lora_jax.LoraConfig(r=4, target_modules=["q_proj"])
        >>> specs = sharding.param_specs(params, mesh, "tp", config=config)
        >>> sharding.adapter_shardings(config, params, specs)
        {'q_proj': {'lora_A': P(None, None), 'lora_B': P(None, 'model')}}

    For a kernel of layout ``lead + in + out``, A ``lead + in + (r,)`` gets
    ``P(*lead, *in, None)`` and B ``lead + (r,) + out`` gets
    ``P(*lead, None, *out)``: the low-rank products then need no more
    communication than the base matmul. ``params_shardings`` is a pytree like
    ``params`` of ``PartitionSpec``s or ``NamedSharding``s (the result has the
    same kind); left out, each kernel's own ``.sharding`` is used.
    """
    targets = find_targets(config, params)
    if params_shardings is None:
        by_path = {path: leaf.sharding for path, leaf in
                   jax.tree_util.tree_flatten_with_path(params)[0] if hasattr(leaf, "sharding")}
    else:
        flat = jax.tree_util.tree_flatten_with_path(params_shardings, is_leaf=_is_spec_leaf)[0]
        by_path = dict(flat)
    out = {}
    for name, target in targets.items():
        if target.path not in by_path:
            raise ValueError(
                f"No sharding for kernel {name}.{target.leaf_name}: params_shardings must be a "
                "pytree like params (e.g. from param_shardings), or params must hold sharded arrays."
            )
        out[name] = _split_kernel_sharding(by_path[target.path], target.num_lead, target.num_in,
                                           len(target.shape), name, dora=config.use_dora)
    for name, table in tables.table_targets(config, params, targets).items():
        sharding = by_path.get(table.path)
        if table.key == tables.TABLE and sharding is not None:  # a trainable copy: laid out as the table
            out[name] = {table.key: sharding}
        else:  # a few trainable rows: small, replicated
            out[name] = {table.key: _replicated_like([sharding])}
    return out


def _split_kernel_sharding(sharding: Any, num_lead: int, num_in: int, ndim: int,
                           name: str, dora: bool = False) -> dict[str, Any]:
    if isinstance(sharding, PartitionSpec):
        spec, wrap = sharding, (lambda s: s)
    elif isinstance(sharding, NamedSharding):
        spec = sharding.spec
        mesh, kind = sharding.mesh, sharding.memory_kind

        def wrap(s: PartitionSpec) -> NamedSharding:
            return NamedSharding(mesh, s, memory_kind=kind)
    elif isinstance(sharding, Sharding) and sharding.is_fully_replicated:  # e.g. one device
        return {"lora_A": sharding, "lora_B": sharding, **({MAGNITUDE: sharding} if dora else {})}
    else:
        raise TypeError(
            f"Kernel {name} has sharding {sharding!r}; adapter_shardings needs a PartitionSpec, "
            "a NamedSharding or a fully replicated sharding."
        )
    entries = list(spec) + [None] * (ndim - len(spec))
    lead = entries[:num_lead]
    ins = entries[num_lead : num_lead + num_in]
    outs = entries[num_lead + num_in :]
    out = {"lora_A": wrap(PartitionSpec(*lead, *ins, None)), "lora_B": wrap(PartitionSpec(*lead, None, *outs))}
    if dora:  # one magnitude per output feature: laid out as the kernel's output axes
        out[MAGNITUDE] = wrap(PartitionSpec(*lead, *outs))
    return out


def _key_names(path: tuple[Any, ...]) -> tuple[str, ...]:
    names = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                names.append(str(getattr(key, attr)))
                break
        else:
            names.append(str(key))
    return tuple(names)


def optimizer_shardings(optimizer: optax.GradientTransformation, trainable: Any,
                        trainable_shardings: Any) -> Any:
    """The layout of ``optimizer.init(trainable)``: each moment like its parameter.

    Example:
        >>> import jax, numpy as np, optax
        >>> from jax.sharding import PartitionSpec as P
        >>> from lora_jax import sharding
        >>> adapter = {"q_proj": {"lora_A": jax.ShapeDtypeStruct((64, 4), np.float32),
        ...                       "lora_B": jax.ShapeDtypeStruct((4, 64), np.float32)}}
        >>> specs = {"q_proj": {"lora_A": P(None, None), "lora_B": P(None, "model")}}
        >>> adam, _ = sharding.optimizer_shardings(optax.adam(1e-3), adapter, specs)
        >>> adam.count, adam.mu["q_proj"]["lora_B"]
        (P(), P(None, 'model'))

    With a real mesh, ``jax.jit(optimizer.init, out_shardings=...)(adapter)`` then
    creates the state in place.

    A state leaf whose key path ends with a parameter's key path and has that
    parameter's shape (Adam's ``mu`` and ``nu``, momentum, ...) gets the
    parameter's sharding; anything else (step counts, scalars) is replicated.
    ``trainable`` may hold ``jax.ShapeDtypeStruct``s.
    """
    state_shapes = jax.eval_shape(optimizer.init, trainable)
    param_leaves = jax.tree_util.tree_flatten_with_path(trainable)[0]
    sharding_leaves = jax.tree.leaves(trainable_shardings, is_leaf=_is_spec_leaf)
    if len(param_leaves) != len(sharding_leaves):
        raise ValueError(
            f"trainable has {len(param_leaves)} leaves but trainable_shardings has "
            f"{len(sharding_leaves)}; they must be pytrees of the same structure."
        )
    by_path = {_key_names(path): (_shape(leaf), sharding)
               for (path, leaf), sharding in zip(param_leaves, sharding_leaves)}
    replicated = _replicated_like(sharding_leaves)

    def pick(path: tuple[Any, ...], leaf: Any) -> Any:
        names = _key_names(path)
        for start in range(len(names)):
            hit = by_path.get(names[start:])
            if hit is not None and hit[0] == tuple(leaf.shape):
                return hit[1]
        return replicated

    return jax.tree_util.tree_map_with_path(pick, state_shapes)


def _replicated_like(shardings: Sequence[Any]) -> Any:
    for sharding in shardings:
        if isinstance(sharding, NamedSharding):
            return NamedSharding(sharding.mesh, PartitionSpec())
        if isinstance(sharding, Sharding) and sharding.is_fully_replicated:
            return sharding
    return PartitionSpec()


def batch_sharding(mesh: Mesh, data_axis: AxisName = "data") -> NamedSharding:
    """Split the leading (batch) axis over ``data_axis``; replicated if the mesh lacks it.

    Example:
        >>> import jax
        >>> from lora_jax import sharding
        >>> mesh = sharding.make_mesh(devices=jax.devices()[:1])
        >>> sharding.batch_sharding(mesh).spec, sharding.batch_sharding(mesh, "fsdp").spec
        (P('data',), P())
    """
    sizes = _axis_sizes(mesh)
    if all(name in sizes for name in _names(data_axis)):
        return NamedSharding(mesh, PartitionSpec(data_axis))
    return NamedSharding(mesh, PartitionSpec())


# -- the training state on a mesh -------------------------------------------------------------

class TrainShardings(NamedTuple):
    """Where each part of a LoRA training state lives (pytrees of ``NamedSharding``).

    Example:
        >>> from lora_jax import sharding
        >>> sharding.TrainShardings._fields
        ('params', 'adapter', 'opt_state', 'batch')
    """

    params: Any
    adapter: Any
    opt_state: Any
    batch: NamedSharding


def train_shardings(config: LoraConfig, params: Any, optimizer: optax.GradientTransformation,
                    mesh: Mesh, strategy: Strategy = "fsdp", rules: Sequence[Rule] | None = None,
                    *, adapter: Adapter | None = None, data_axis: AxisName = "data",
                    model_axis: str = "model") -> TrainShardings:
    """Layouts of the frozen params, the adapter, its optimizer state and the batch.

    Example:
        >>> import jax, numpy as np, optax, lora_jax
        >>> from lora_jax import sharding
        >>> mesh = sharding.make_mesh(devices=jax.devices()[:1])
        >>> params = {"q_proj": {"kernel": jax.ShapeDtypeStruct((64, 32), np.float32)}}
        >>> config = lora_jax.LoraConfig(r=4, target_modules=["q_proj"])
        >>> shardings = sharding.train_shardings(config, params, optax.adamw(1e-3), mesh, "fsdp")
        >>> shardings.adapter["q_proj"]["lora_A"].spec, shardings.batch.spec
        (P('data', None), P('data',))

    ``params`` (and ``adapter``, if given; else the adapter :func:`lora_jax.init`
    would make) may be ``jax.ShapeDtypeStruct``s. See :func:`param_specs` for
    ``strategy``, ``rules`` and the axis names.
    """
    p = param_shardings(params, mesh, strategy, rules, config=config, data_axis=data_axis,
                        model_axis=model_axis)
    a = adapter_shardings(config, params, p)
    if adapter is None:
        adapter = jax.eval_shape(lambda: init(config, params, jax.random.key(0)))
    o = optimizer_shardings(optimizer, adapter, a)
    return TrainShardings(params=p, adapter=a, opt_state=o, batch=batch_sharding(mesh, data_axis))
