"""Quantize the frozen kernels of a params tree, dequantize it back, count its bytes."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from lora_jax.config import OUTPUT_HEAD_NAMES, matches, pattern_key
from lora_jax.quantize.base import QuantizedArray, is_quantized
from lora_jax.quantize.bnb4bit import check_blocksize_4bit, quantize_4bit
from lora_jax.quantize.integer import quantize_int4, quantize_int8

SCHEMES = ("nf4", "fp4", "int8", "int4")
DEFAULT_BLOCKSIZE = {"nf4": 64, "fp4": 64, "int4": 128}


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """Which frozen kernels to quantize, and how.

    Example:
        >>> from lora_jax.quantize import QuantConfig
        >>> QuantConfig("nf4", double_quant=True).blocksize
        64
        >>> QuantConfig("int4").blocksize      # the int4 group size
        128

    Fields:
        scheme: "nf4", "fp4" (bitsandbytes' 4-bit), "int8" (bitsandbytes' row-wise int8)
            or "int4" (grouped symmetric int4).
        blocksize: values per absmax block (nf4/fp4: 32 ... 4096, default 64) or per
            int4 group (a power of two, default 128); int8 has one scale per row.
        double_quant: quantize the nf4/fp4 absmax values too (bitsandbytes'
            ``compress_statistics``).
        target_modules / exclude_modules: ``LoraConfig``'s forms (a regex string is
            full-matched, a list matches names or dotted suffixes). Default: every
            ``kernel`` of rank >= 2 except the output head (``lm_head``); embeddings
            (``embedding`` leaves), norms and biases are never selected by default.
        stacked_modules: modules whose kernels carry a leading layer axis (``nn.scan``),
            as in ``LoraConfig``; each layer is quantized on its own.
        in_axes: module pattern -> number of input axes of an N-D kernel (default 1),
            as in ``LoraConfig``; it decides which axes form PyTorch's ``in``.
        kernel_names: leaf names that hold weights.
    """

    scheme: str = "nf4"
    blocksize: int | None = None
    double_quant: bool = False
    target_modules: str | Sequence[str] | None = None
    exclude_modules: str | Sequence[str] | None = None
    stacked_modules: str | Sequence[str] | None = None
    in_axes: Mapping[str, int] = dataclasses.field(default_factory=dict)
    kernel_names: Sequence[str] = ("kernel",)

    def __post_init__(self) -> None:
        for name in ("target_modules", "exclude_modules", "stacked_modules", "kernel_names"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                object.__setattr__(self, name, tuple(value))
            elif isinstance(value, str) and name != "kernel_names":
                try:
                    re.compile(value)
                except re.error as err:
                    raise ValueError(f"QuantConfig.{name} is not a valid regex: {value!r} "
                                     f"({err}).") from None
        if isinstance(self.kernel_names, str):
            object.__setattr__(self, "kernel_names", (self.kernel_names,))
        object.__setattr__(self, "in_axes", dict(self.in_axes or {}))
        if self.scheme not in SCHEMES:
            raise ValueError(f"Unknown quantization scheme {self.scheme!r}; known schemes: "
                             f"{', '.join(SCHEMES)}.")
        if self.blocksize is None:
            object.__setattr__(self, "blocksize", DEFAULT_BLOCKSIZE.get(self.scheme))
        elif self.scheme == "int8":
            raise ValueError(f"int8 is row-wise (one scale per output feature); blocksize "
                             f"{self.blocksize!r} does not apply. Leave it unset.")
        if self.scheme in ("nf4", "fp4"):
            check_blocksize_4bit(self.blocksize)
        elif self.scheme == "int4":
            from lora_jax.quantize.bnb4bit import is_power_of_two

            if not is_power_of_two(self.blocksize) or self.blocksize < 2:
                raise ValueError(f"int4 group size (blocksize) {self.blocksize!r} is not a power "
                                 "of two >= 2 (the default is 128).")
        if not isinstance(self.double_quant, bool):
            raise ValueError(f"QuantConfig.double_quant must be True or False, got "
                             f"{self.double_quant!r}.")
        if self.double_quant and self.scheme not in ("nf4", "fp4"):
            raise ValueError(f"double_quant applies to nf4/fp4 absmax values; scheme "
                             f"{self.scheme!r} has none.")
        for key, count in self.in_axes.items():
            if not isinstance(count, int) or isinstance(count, bool) or count < 1:
                raise ValueError(f"QuantConfig.in_axes[{key!r}] must be a positive integer, "
                                 f"got {count!r}.")

    def num_in(self, module_name: str, leaf_name: str) -> int:
        """Input axes of a kernel (0 for an embedding table, stored as is)."""
        if leaf_name == "embedding":
            return 0
        key = pattern_key(self.in_axes, module_name)
        return 1 if key is None else self.in_axes[key]

    def is_stacked(self, module_name: str) -> bool:
        return self.stacked_modules is not None and matches(self.stacked_modules, module_name)


def quantize_array(x: Any, scheme: str = "nf4", *, blocksize: int | None = None,
                   double_quant: bool = False, num_in: int = 1, num_lead: int = 0,
                   name: str = "array") -> QuantizedArray:
    """One array as a :class:`QuantizedArray` of ``scheme``.

    ``num_in`` input axes follow ``num_lead`` stacked-layer axes; see
    :mod:`lora_jax.quantize.base` for how the array maps to a PyTorch weight.

    Example:
        >>> import jax.numpy as jnp
        >>> from lora_jax.quantize import quantize_array
        >>> quantize_array(jnp.ones((128, 16)), "nf4", double_quant=True)
        NF4Array(shape=(128, 16), dtype=float32, blocksize=64, double_quant=True, nbytes=1064)
    """
    config = QuantConfig(scheme, blocksize=blocksize, double_quant=double_quant)
    return _quantize_leaf(x, config, num_in, num_lead, name)


def _quantize_leaf(x: Any, config: QuantConfig, num_in: int, num_lead: int,
                   name: str) -> QuantizedArray:
    if config.scheme in ("nf4", "fp4"):
        return quantize_4bit(x, config.scheme, blocksize=config.blocksize,
                             double_quant=config.double_quant, num_in=num_in,
                             num_lead=num_lead, name=name)
    if config.scheme == "int8":
        return quantize_int8(x, num_in=num_in, num_lead=num_lead, name=name)
    return quantize_int4(x, group_size=config.blocksize, num_in=num_in, num_lead=num_lead,
                         name=name)


def quantize(params: Any, config: QuantConfig | str = "nf4", **options: Any) -> Any:
    """``params`` with its frozen kernels replaced by :class:`QuantizedArray` leaves.

    ``config`` is a :class:`QuantConfig` or a scheme name with ``QuantConfig`` fields
    as keywords. Everything not selected (norms, biases, embeddings, the output head)
    is returned untouched. Runs on the host in numpy, once, outside ``jit``.

    Example:
        >>> import jax.numpy as jnp
        >>> from lora_jax.quantize import quantize
        >>> params = {"q_proj": {"kernel": jnp.ones((64, 8)), "bias": jnp.zeros(8)},
        ...           "lm_head": {"kernel": jnp.ones((8, 4))}}
        >>> quantized = quantize(params, "nf4")
        >>> type(quantized["q_proj"]["kernel"]).__name__, type(quantized["lm_head"]["kernel"]).__name__
        ('NF4Array', 'ArrayImpl')

    Raises:
        ValueError: an unknown scheme, a bad block size, a tree that already holds
            quantized leaves, a selected leaf that is not a floating-point array of
            rank >= 2, or a selection that matches nothing.
    """
    from lora_jax.tree import named_leaves  # tree.py imports this package

    if isinstance(config, str):
        config = QuantConfig(config, **options)
    elif options:
        config = dataclasses.replace(config, **options)
    leaves = list(named_leaves(params))
    for _, module_name, leaf_name, leaf in leaves:
        if is_quantized(leaf):
            raise ValueError(f"{_label(module_name, leaf_name)} is already quantized ({leaf!r}); "
                             "quantize the original float params (or lora_jax.quantize."
                             "dequantize them first).")
    selected = _select(config, leaves)
    by_path = {}
    for path, module_name, leaf_name, leaf in selected:
        label = _label(module_name, leaf_name)
        num_lead = 1 if config.is_stacked(module_name) else 0
        shape = tuple(np.shape(leaf))
        if len(shape) < 2 + num_lead:
            need = "rank >= 3 (a stacked layer axis, then in and out)" if num_lead else "rank >= 2"
            raise ValueError(f"{label} has shape {shape}; quantizing a kernel needs {need}.")
        by_path[path] = _quantize_leaf(leaf, config, config.num_in(module_name, leaf_name),
                                       num_lead, label)
    return jax.tree_util.tree_map_with_path(lambda p, x: by_path.get(p, x), params,
                                            is_leaf=is_quantized)


def select_kernels(params: Any, config: QuantConfig | str = "nf4", **options: Any) -> list[Any]:
    """The key paths of the leaves :func:`quantize` would quantize (``params`` may be abstract).

    Loaders use it to quantize each selected kernel as it is read, without holding the
    float model: ``params`` may hold ``jax.ShapeDtypeStruct`` leaves.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from lora_jax.quantize import select_kernels
        >>> params = {"q_proj": {"kernel": jax.ShapeDtypeStruct((64, 8), jnp.float32)},
        ...           "lm_head": {"kernel": jax.ShapeDtypeStruct((8, 4), jnp.float32)}}
        >>> [jax.tree_util.keystr(path) for path in select_kernels(params, "nf4")]
        ["['q_proj']['kernel']"]

    Raises:
        ValueError: as :func:`quantize` for a bad config or a selection that matches nothing.
    """
    from lora_jax.tree import named_leaves

    if isinstance(config, str):
        config = QuantConfig(config, **options)
    elif options:
        config = dataclasses.replace(config, **options)
    return [entry[0] for entry in _select(config, list(named_leaves(params)))]


def describe_quantization(params: Any) -> str | None:
    """A one-line account of the quantized leaves of ``params`` (None if there are none).

    Written into the model card of an adapter trained on a quantized base.

    Example:
        >>> import jax.numpy as jnp
        >>> from lora_jax.quantize import describe_quantization, quantize
        >>> params = {"a": {"kernel": jnp.ones((64, 8))}, "b": {"kernel": jnp.ones((64, 8))}}
        >>> describe_quantization(quantize(params, "nf4", double_quant=True))
        'NF4 (bitsandbytes format, blocks of 64, double quantization): 2 kernels'
        >>> describe_quantization(params) is None
        True
    """
    counts: dict[str, int] = {}
    for leaf in jax.tree.leaves(params, is_leaf=is_quantized):
        if is_quantized(leaf):
            label = _scheme_label(leaf)
            counts[label] = counts.get(label, 0) + 1
    if not counts:
        return None
    return "; ".join(f"{label}: {n} kernel{'s' if n != 1 else ''}" for label, n in counts.items())


def _scheme_label(leaf: QuantizedArray) -> str:
    scheme = leaf.scheme
    if scheme in ("nf4", "fp4"):
        extra = ", double quantization" if leaf.double_quant else ""
        return f"{scheme.upper()} (bitsandbytes format, blocks of {leaf.blocksize}{extra})"
    if scheme == "int8":
        return "int8 (bitsandbytes row-wise format)"
    if scheme == "int4":
        return f"int4 (symmetric, groups of {leaf.group_size})"
    return f"GGUF {scheme.upper()} (llama.cpp blocks, as stored in the file)"


def _label(module_name: str, leaf_name: str) -> str:
    return f"{module_name}.{leaf_name}" if module_name else leaf_name


def _select(config: QuantConfig, leaves: list) -> list:
    candidates = [entry for entry in leaves if entry[2] in config.kernel_names]
    if not candidates:
        raise ValueError(f"No leaf of the params tree is named one of {tuple(config.kernel_names)}; "
                         "set QuantConfig.kernel_names to the name your model gives its weights.")
    spec = config.target_modules
    if spec is None:
        selected = [e for e in candidates if e[2] == "kernel" and np.ndim(e[3]) >= 2
                    and e[1].rsplit(".", 1)[-1] not in OUTPUT_HEAD_NAMES]
    else:
        selected = [e for e in candidates if matches(spec, e[1])]
        names = [e[1] for e in candidates]
        keys = (spec,) if isinstance(spec, str) else spec
        for key in keys:
            if not any(matches(key if isinstance(spec, str) else (key,), n) for n in names):
                shown = ", ".join(names[:12]) + (" ..." if len(names) > 12 else "")
                raise ValueError(f"target_modules entry {key!r} matches no module with a "
                                 f"{'/'.join(config.kernel_names)} leaf; modules: {shown}.")
    if config.exclude_modules is not None:
        selected = [e for e in selected if not matches(config.exclude_modules, e[1])]
    if not selected:
        raise ValueError(f"QuantConfig selects no kernel (target_modules={spec!r}, "
                         f"exclude_modules={config.exclude_modules!r}).")
    return selected


def dequantize(params: Any, dtype: Any = None) -> Any:
    """``params`` with every :class:`QuantizedArray` leaf dequantized (jit-able).

    Example:
        >>> import jax.numpy as jnp
        >>> from lora_jax.quantize import dequantize, quantize
        >>> params = quantize({"dense": {"kernel": jnp.ones((64, 2))}}, "int8")
        >>> dequantize(params)["dense"]["kernel"].tolist()[0]
        [1.0, 1.0]
    """
    return jax.tree.map(lambda x: x.dequantize(dtype) if is_quantized(x) else x, params,
                        is_leaf=is_quantized)


def quantized_bytes(params: Any) -> dict[str, int | float]:
    """Bytes of ``params`` before and after quantization, for ``lora-jax info``.

    ``before`` counts every quantized leaf at its original dtype, ``after`` at its
    packed size (codes + scales); other leaves count the same in both.

    Example:
        >>> import jax.numpy as jnp
        >>> from lora_jax.quantize import quantize, quantized_bytes
        >>> params = quantize({"dense": {"kernel": jnp.ones((256, 64))}}, "nf4")
        >>> report = quantized_bytes(params)
        >>> report["before"], report["after"], report["bytes_per_quantized_param"]
        (65536, 9216, 0.5625)
    """
    before = after = quantized_params = quantized_leaves = 0
    for leaf in jax.tree.leaves(params, is_leaf=is_quantized):
        if is_quantized(leaf):
            original = leaf.size * np.dtype(leaf.dtype).itemsize
            before, after = before + original, after + leaf.nbytes
            quantized_params += leaf.size
            quantized_leaves += 1
        else:
            dtype = leaf.dtype if hasattr(leaf, "dtype") else np.result_type(leaf)
            size = int(np.prod(np.shape(leaf))) * np.dtype(dtype).itemsize
            before, after = before + size, after + size
    packed = sum(leaf.nbytes for leaf in jax.tree.leaves(params, is_leaf=is_quantized)
                 if is_quantized(leaf))
    return {
        "before": before,
        "after": after,
        "quantized_leaves": quantized_leaves,
        "quantized_params": quantized_params,
        "bytes_per_quantized_param": packed / quantized_params if quantized_params else 0.0,
    }
