"""Hugging Face checkpoints in and out: config.json + safetensors (single or sharded),
GGUF files, random init from a config; and the inverse, torch-layout state dicts.

A param path maps to a Hugging Face tensor name by joining the path with dots and
renaming the leaf: ``kernel``, ``embedding`` and ``scale`` become ``weight`` (``kernel``
transposed, except GPT-2's Conv1D kernels, which torch already stores as (in, out)).
A ``param`` leaf is a bare torch parameter named by its module path, stored with its
last two axes swapped (MoE routers and expert stacks; see
:mod:`lora_jax.peft.parameters`). Scanned layers (a leading layer axis under
``model.layers``) are stacked on load and unstacked on export. Expert stacks load
from either transformers' fused tensors or its original per-expert ones
(``ModelFamily.tensor_pieces``) and are saved per expert, as transformers saves them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from lora_jax.quantize import QuantConfig, dequantize, quantize_array, select_kernels
from lora_jax.quantize import stack as stack_quantized

from . import bert, gemma, gpt2, llama, opt, phi3, qwen3, qwen3_moe
from .blocks import remat_policy
from .errors import MissingTensorError, ModelLoadError, QuantizeError, UnsupportedModelError
from .family import PARAMETER_LEAF, BuildSettings, ModelFamily, ParamPath
from .gguf import GGUFTensors, read_gguf
from .hf_files import SafetensorsCheckpoint, checkpoint_files, read_json_object, refuse_remote_code
from .layers import Dtype

Params = dict[str, Any]

_LEAF_TO_HF = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}


# Every family this package implements; a new family is one module ending in FAMILY.
_FAMILIES: dict[str, ModelFamily] = {
    model_type: module.FAMILY
    for module in (llama, gpt2, bert, opt, gemma, qwen3, phi3, qwen3_moe)
    for model_type in module.FAMILY.model_types
}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(sorted(_FAMILIES))
# Model types a family knows and refuses, with the reason (e.g. multimodal Gemma 3).
_REFUSED: dict[str, str] = {
    model_type: reason
    for family in _FAMILIES.values()
    for model_type, reason in family.refused.items()
}


@dataclasses.dataclass
class Model:
    """A Flax module, its params and the Hugging Face config they came from.

    ``model(*args, **kwargs)`` is ``module.apply({"params": params}, *args, **kwargs)``.

    Attributes:
        module: the linen module (``LlamaForCausalLM``, ``GPT2LMHeadModel``, ``BertModel``,
            ``BertForSequenceClassification``).
        params: the params tree (no ``{"params": ...}`` wrapper), mirroring torch names.
        config: the Hugging Face ``config.json`` content as a dict.
        source: the directory or ``.gguf`` file it was loaded from, for ``tokenizer()``.

    Example:
        >>> from lora_jax import models
        >>> model = models.from_config({"model_type": "gpt2", "n_embd": 16, "n_layer": 1,
        ...     "n_head": 2, "vocab_size": 20, "n_positions": 8})
        >>> type(model.module).__name__, model([[1, 2, 3]]).shape
        ('GPT2LMHeadModel', (1, 3, 20))
    """

    module: nn.Module
    params: Params
    config: dict[str, Any]
    source: str | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # Nested lists would reach jit as many scalar leaves; make them arrays first.
        args = tuple(np.asarray(a) if isinstance(a, (list, tuple)) else a for a in args)
        kwargs = {
            k: np.asarray(v) if isinstance(v, (list, tuple)) else v for k, v in kwargs.items()
        }
        return _jitted_apply(self.module)({"params": self.params}, *args, **kwargs)

    def tokenizer(self) -> Any:
        """The transformers tokenizer stored with the checkpoint (see ``load_tokenizer``).

        Example:
            >>> from lora_jax import models
            >>> model = models.from_config({"model_type": "gpt2", "n_embd": 16, "n_layer": 1,
            ...     "n_head": 2, "vocab_size": 20, "n_positions": 8})
            >>> model.tokenizer()
            Traceback (most recent call last):
            ...
            ValueError: this model was not loaded from disk, so it has no tokenizer
        """
        if self.source is None:
            raise ValueError("this model was not loaded from disk, so it has no tokenizer")
        return load_tokenizer(self.source)


@functools.lru_cache(maxsize=32)
def _jitted_apply(module: nn.Module) -> Callable[..., Any]:
    # Op-by-op (eager) apply compiles every primitive separately: seconds even for tiny
    # models. One jit per module (modules are hashable) is much faster.
    # A quantized model (``from_pretrained(..., quantize=)``) is dequantized inside the call.
    def apply(variables: Any, *args: Any, **kwargs: Any) -> Any:
        return module.apply(dequantize(variables), *args, **kwargs)

    return jax.jit(apply)


# --------------------------------------------------------------------------- configs


def config_to_dict(config: Any) -> dict[str, Any]:
    """A plain ``config.json``-style dict from a dict, a transformers config object, or a
    path to a checkpoint directory / config.json.

    Example:
        >>> from lora_jax.models import config_to_dict
        >>> config_to_dict({"model_type": "gpt2", "n_embd": 32})["n_embd"]
        32
    """
    if isinstance(config, dict):
        return dict(config)
    if isinstance(config, (str, Path)):
        path = Path(config)
        return read_json_object(path / "config.json" if path.is_dir() else path)
    if hasattr(config, "to_dict"):
        return config.to_dict()
    raise TypeError(
        f"expected a config dict, a transformers config or a path, got {type(config).__name__}"
    )


def _family(config: dict[str, Any]) -> ModelFamily:
    model_type = config.get("model_type")
    if model_type is None:
        raise ModelLoadError(
            f"the config has no model_type; expected one of {list(SUPPORTED_MODEL_TYPES)}"
        )
    if isinstance(model_type, str) and model_type in _REFUSED:
        raise UnsupportedModelError(
            f"{_REFUSED[model_type]}; supported model types: {list(SUPPORTED_MODEL_TYPES)}"
        )
    if not isinstance(model_type, str) or model_type not in _FAMILIES:
        raise UnsupportedModelError(
            f"unsupported model_type {model_type!r}; supported: {list(SUPPORTED_MODEL_TYPES)}"
        )
    return _FAMILIES[model_type]


def _architecture(config: dict[str, Any], architecture: str | None) -> str | None:
    if architecture is not None:
        return architecture
    architectures = config.get("architectures") or [None]
    return architectures[0]


def build_module(
    config: Any,
    *,
    dtype: Dtype = jnp.float32,
    compute_dtype: Dtype | None = None,
    scan_layers: bool = False,
    architecture: str | None = None,
    remat: str = "none",
    **options: Any,
) -> nn.Module:
    """The linen module for a Hugging Face config, without params.

    Args:
        config: dict, transformers config, or checkpoint directory.
        dtype: dtype the params are stored in.
        compute_dtype: dtype of activations; defaults to ``dtype``.
        scan_layers: Llama family only: one ``nn.scan``-ed decoder layer.
        architecture: e.g. "BertForSequenceClassification"; default from the config.
        remat: per-layer rematerialisation in the backward pass: "none", "dots" (keep
            the projections' outputs), "full" (keep each layer's input) or "offload"
            ("dots" kept in host memory; GPU/TPU). See
            :func:`~lora_jax.models.blocks.remat_policy`.

    Example:
        >>> from lora_jax.models import build_module
        >>> module = build_module({"model_type": "gpt2", "n_embd": 32, "n_layer": 1,
        ...     "n_head": 4, "vocab_size": 50})
        >>> type(module).__name__
        'GPT2LMHeadModel'
    """
    config = config_to_dict(config)
    family = _family(config)
    # Accept "bfloat16", np.float32, jnp.bfloat16 alike; module fields must be hashable.
    dtype = jnp.dtype(dtype)
    compute_dtype = dtype if compute_dtype is None else jnp.dtype(compute_dtype)
    remat_policy(remat)  # an unknown name (or offload on CPU) is refused before building
    settings = BuildSettings(dtype=compute_dtype, param_dtype=dtype, scan_layers=scan_layers,
                             architecture=_architecture(config, architecture), remat=remat)
    return family.build(config, settings, **options)


def from_config(
    config: Any,
    *,
    seed: int = 0,
    dtype: Dtype = jnp.float32,
    compute_dtype: Dtype | None = None,
    scan_layers: bool = False,
    architecture: str | None = None,
    remat: str = "none",
) -> Model:
    """A randomly initialised model, for tests: kernels and embeddings normal(0,
    ``initializer_range``), norm scales one, biases zero; same ``seed``, same params.
    The options are :func:`build_module`'s.

    Example:
        >>> from lora_jax.models import from_config
        >>> model = from_config({"model_type": "llama", "hidden_size": 32,
        ...     "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        ...     "vocab_size": 50})
        >>> model.params["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"].shape
        (32, 32)
    """
    config = config_to_dict(config)
    module = build_module(config, dtype=dtype, compute_dtype=compute_dtype,
                          scan_layers=scan_layers, architecture=architecture, remat=remat)
    shapes = jax.eval_shape(
        lambda: module.init(jax.random.key(0), *_family(config).dummy_inputs())
    )["params"]
    # Filled with numpy rather than module.init: compiling the init's many random draws
    # takes seconds on CPU, and this also mirrors transformers' init (normal weights,
    # unit norm scales, zero biases).
    rng = np.random.default_rng(seed)
    # OPT calls it init_std.
    std = float(config.get("initializer_range", config.get("init_std", 0.02)))
    family = _family(config)

    def fill(path: ParamPath, spec: jax.ShapeDtypeStruct) -> jax.Array:
        if path[-1] in ("kernel", "embedding", PARAMETER_LEAF):
            value = rng.standard_normal(spec.shape, dtype=np.float32) * np.float32(std)
        elif path[-1] == "scale":
            value = np.full(spec.shape, family.norm_scale_fill, np.float32)
        else:
            value = np.zeros(spec.shape, np.float32)
        return jnp.asarray(value, dtype=spec.dtype)

    params = unflatten_dict({p: fill(p, s) for p, s in flatten_dict(shapes).items()})
    return Model(module, params, config)


# --------------------------------------------------------------------------- loading


def _hf_name(path: ParamPath) -> str:
    if path[-1] == PARAMETER_LEAF:
        return ".".join(path[:-1])
    return ".".join((*path[:-1], _LEAF_TO_HF[path[-1]]))


def _torch_layout(path: ParamPath, family: ModelFamily) -> Callable[[Any], Any]:
    """The map between a param and its torch tensor (its own inverse): a transpose for
    ``nn.Linear`` kernels, the last two axes swapped for bare parameters, else none."""
    if path[-1] == PARAMETER_LEAF:
        return lambda array: np.swapaxes(array, -1, -2)
    if path[-1] == "kernel" and family.transposed(path):
        return lambda array: array.T
    return lambda array: array


def _candidate_names(name: str, prefix: str) -> list[str]:
    """Names a tensor may have in a checkpoint: as is, without / with the base-model
    prefix, and with old BERT LayerNorm leaf names (gamma / beta)."""
    names = [name, name[len(prefix) :] if name.startswith(prefix) else prefix + name]
    if ".LayerNorm." in name:
        names += [n.replace(".weight", ".gamma").replace(".bias", ".beta") for n in names]
    return names


def _load_params(
    module: nn.Module,
    family: ModelFamily,
    checkpoint: Any,
    dtype: Dtype,
    source: str,
    quantize: QuantConfig | str | None = None,
) -> Params:
    """Params for ``module`` filled from ``checkpoint`` (``keys()``, ``get(name)`` in
    torch layout and ``describe(name)`` for errors), with every shape checked against
    what the module expects; the kernels ``quantize`` selects are quantized as read."""
    expected = jax.eval_shape(lambda: module.init(jax.random.key(0), *family.dummy_inputs()))[
        "params"
    ]
    available = set(checkpoint.keys())
    used: set[str] = set()
    scan = family.scan_node
    quantized = _quantized_paths(expected, quantize, scan, source)

    def read(name: str, torch_shape: tuple[int, ...], path: ParamPath, shape: tuple[int, ...]) -> np.ndarray:
        used.add(name)
        array = checkpoint.get(name)
        if not jnp.issubdtype(array.dtype, jnp.floating):
            raise ModelLoadError(
                f"{source}: tensor {checkpoint.describe(name)} has dtype {array.dtype}; "
                f"expected floating-point weights (param {'.'.join(path)})"
            )
        if tuple(array.shape) != torch_shape:
            raise ModelLoadError(
                f"{source}: tensor {checkpoint.describe(name)} has shape {tuple(array.shape)}, expected "
                f"{torch_shape} (param {'.'.join(path)} of shape {tuple(shape)})"
            )
        return array

    def find(name: str) -> str | None:
        return next((n for n in _candidate_names(name, family.base_prefix) if n in available), None)

    def fetch(path: ParamPath, shape: tuple[int, ...]) -> np.ndarray:
        name = _hf_name(path)
        layout = _torch_layout(path, family)
        torch_shape = tuple(layout(np.empty(shape, np.int8)).shape)
        found = find(name)
        if found is not None:
            return layout(read(found, torch_shape, path, shape))
        groups = family.tensor_pieces(name, torch_shape[0]) if torch_shape else None
        pieces = [[find(n) for n in group] for group in groups or []]
        if not groups or any(n is None for group in pieces for n in group):
            sample = sorted(available)[:5]
            also = f" or its per-expert pieces such as {groups[0][0]!r}" if groups else ""
            raise MissingTensorError(
                f"{source}: no tensor {name!r}{also} (param {'.'.join(path)}, shape {shape}) in the "
                f"checkpoint; it has {len(available)} tensors, e.g. {sample}"
            )
        # An expert stack in per-expert tensors: stack each group, concatenate the groups.
        piece_shape = (torch_shape[1] // len(groups), *torch_shape[2:])
        joined = np.concatenate([np.stack([read(n, piece_shape, path, shape) for n in group])
                                 for group in pieces], axis=1)
        return layout(joined)

    def fetch_blocks(path: ParamPath, shape: tuple[int, ...]) -> Any:
        """The GGUF blocks of a kernel (None when its type is not kept), shape-checked."""
        found = find(_hf_name(path))
        if found is None:
            return None  # fetch() names what is missing
        used.add(found)
        blocks = checkpoint.get_blocks(found, dtype)
        if blocks is not None and tuple(blocks.shape) != tuple(shape):
            raise ModelLoadError(
                f"{source}: tensor {checkpoint.describe(found)} holds a kernel of shape "
                f"{tuple(blocks.shape)}, expected {tuple(shape)} (param {'.'.join(path)})"
            )
        return blocks

    def fetch_quantized(path: ParamPath, shape: tuple[int, ...]) -> Any:
        if quantize == "gguf":
            return fetch_blocks(path, shape)
        config = quantize if isinstance(quantize, QuantConfig) else QuantConfig(quantize)
        array = fetch(path, shape)
        try:
            leaf = quantize_array(array, config.scheme, blocksize=config.blocksize,
                                  double_quant=config.double_quant,
                                  num_in=config.num_in(".".join(path[:-1]), path[-1]),
                                  name=".".join(path))
        except ValueError as err:
            raise QuantizeError(f"{source}: cannot quantize tensor {_hf_name(path)!r} as {config.scheme}: "
                                f"{err}") from None
        # Quantized from the file's values; dequantizes to the param dtype, as a plain
        # kernel would be stored.
        return dataclasses.replace(leaf, dtype=np.dtype(dtype))

    flat: dict[ParamPath, Any] = {}
    kept_float: list[str] = []
    for path, spec in flatten_dict(expected).items():
        stacked = scan is not None and path[: len(scan)] == scan and not path[len(scan)].isdigit()
        layer_paths = ([(*scan, str(i), *path[len(scan):]) for i in range(spec.shape[0])]
                       if stacked else [path])
        shape = spec.shape[1:] if stacked else spec.shape
        if path in quantized:
            leaves = [fetch_quantized(p, shape) for p in layer_paths]
            same = len({type(leaf) for leaf in leaves}) == 1
            if all(leaf is not None for leaf in leaves) and same:
                flat[path] = stack_quantized(leaves) if stacked else leaves[0]
                continue
            kept_float.append(".".join(path))  # a GGUF type that is not kept: as float below
        layers = [fetch(p, shape) for p in layer_paths]
        flat[path] = jnp.asarray(np.stack(layers) if stacked else layers[0], dtype=dtype)
    if quantize == "gguf":
        _check_gguf_kept(source, checkpoint, quantized, kept_float)

    unexpected = sorted(n for n in available - used if not family.ignored.fullmatch(n))
    if unexpected:
        warnings.warn(
            f"{source}: {len(unexpected)} checkpoint tensors are not used by "
            f"{type(module).__name__}: {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}",
            stacklevel=3,
        )
    return unflatten_dict(flat)


def _quantized_paths(expected: Any, quantize: QuantConfig | str | None, scan: ParamPath | None,
                     source: str) -> set[ParamPath]:
    """The param paths of the kernels ``quantize`` selects (``"gguf"``: the default selection)."""
    if quantize is None:
        return set()
    config = QuantConfig() if quantize == "gguf" else quantize
    if isinstance(config, str):
        config = QuantConfig(config)
    if scan is not None and config.stacked_modules is None:
        # Scanned layers are quantized one layer at a time here; selection sees them as modules.
        config = dataclasses.replace(config, stacked_modules=r"(?!)")
    try:
        paths = select_kernels(expected, config)
    except ValueError as err:
        raise QuantizeError(f"{source}: cannot quantize this model's kernels: {err}") from None
    return {tuple(getattr(k, "key", getattr(k, "name", None)) for k in path) for path in paths}


def _check_gguf_kept(source: str, checkpoint: Any, quantized: set[ParamPath],
                     kept_float: list[str]) -> None:
    if not isinstance(checkpoint, GGUFTensors):
        raise QuantizeError(f"{source}: quantize='gguf' keeps a GGUF file's quantized blocks; this "
                             "model is not a .gguf file (use quantize='nf4', 'int8', ... instead)")
    if kept_float and len(kept_float) == len(quantized):
        raise QuantizeError(
            f"{source}: quantize='gguf' found no linear kernel stored as "
            f"{' / '.join(GGUFTensors.KEPT_TYPES)} (e.g. {kept_float[0]} is not): nothing to keep "
            "quantized; load without quantize= (or with quantize='nf4') instead"
        )
    if kept_float:
        warnings.warn(
            f"{source}: {len(kept_float)} kernels are not stored as "
            f"{' / '.join(GGUFTensors.KEPT_TYPES)} in every layer and are dequantized instead: "
            f"{kept_float[:4]}{' ...' if len(kept_float) > 4 else ''}",
            stacklevel=4,
        )


def _find_gguf(path: Path) -> Path | None:
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and not (path / "config.json").is_file():
        found = sorted(path.glob("*.gguf"))
        if len(found) == 1:
            return found[0]
    return None


def from_pretrained(
    path: str | Path,
    *,
    dtype: Dtype = jnp.float32,
    compute_dtype: Dtype | None = None,
    scan_layers: bool = False,
    architecture: str | None = None,
    remat: str = "none",
    quantize: QuantConfig | str | None = None,
) -> Model:
    """Load a local Hugging Face checkpoint directory or a GGUF file.

    A directory needs ``config.json`` and ``model.safetensors`` (or a sharded
    ``model.safetensors.index.json``); a ``.gguf`` file (or a directory holding exactly
    one) is dequantised to ``dtype``. Nothing is downloaded.

    Args:
        path: the directory or ``.gguf`` file.
        dtype: dtype of the params (float32 or bfloat16).
        compute_dtype: dtype of activations; defaults to ``dtype``.
        scan_layers: Llama family only: stack the decoder layers for ``nn.scan``.
        architecture: override ``config.architectures[0]`` (e.g. load a BERT classifier
            checkpoint as the bare "BertModel").
        remat: per-layer rematerialisation for training (see :func:`build_module`).
        quantize: a frozen base for QLoRA: a scheme of :mod:`lora_jax.quantize` ("nf4",
            "fp4", "int8", "int4") or a :class:`~lora_jax.quantize.QuantConfig`, applied
            to each selected kernel as it is read (by default every linear kernel but the
            output head), so the float model is never held whole; or ``"gguf"``: keep a
            GGUF file's Q8_0 / Q4_0 / Q4_1 linear kernels as they are stored, the exact
            weights llama.cpp runs (other tensors are dequantized as usual). Quantized
            kernels dequantize to ``dtype``; train them with :func:`lora_jax.lora`.

    Returns:
        ``Model(module, params, config, source)``.

    Example:
        >>> import tempfile
        >>> from lora_jax import models
        >>> tiny = models.from_config({"model_type": "llama", "hidden_size": 16,
        ...     "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        ...     "vocab_size": 30})
        >>> path = models.save_pretrained(tempfile.mkdtemp(), tiny.config, tiny.params)
        >>> model = models.from_pretrained(path, scan_layers=True)
        >>> model.params["model"]["layers"]["self_attn"]["q_proj"]["kernel"].shape
        (2, 16, 16)
        >>> model([[1, 2, 3]]).shape
        (1, 3, 30)

        A QLoRA base, NF4 with double quantization:

        >>> from lora_jax.quantize import QuantConfig
        >>> base = models.from_pretrained(path, quantize=QuantConfig("nf4", blocksize=64,
        ...                                                          double_quant=True))
        >>> base.params["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]
        NF4Array(shape=(16, 16), dtype=float32, blocksize=64, double_quant=True, nbytes=140)
        >>> base([[1, 2, 3]]).shape
        (1, 3, 30)

    With a real checkpoint: ``models.from_pretrained("/models/SmolLM2-135M-Instruct")``
    or ``models.from_pretrained("SmolLM2-135M-Instruct.Q4_1.gguf")`` (dequantized), or
    ``from_pretrained("SmolLM2-135M-Instruct.Q4_1.gguf", quantize="gguf")`` (its Q4_1
    blocks kept).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if isinstance(quantize, str) and quantize != "gguf":
        try:  # an unknown scheme is refused before anything is read
            quantize = QuantConfig(quantize)
        except ValueError as err:
            raise QuantizeError(f"quantize={quantize!r}: {err}") from None
    elif quantize is not None and not isinstance(quantize, (str, QuantConfig)):
        raise TypeError(f"quantize must be a scheme name, 'gguf' or a QuantConfig, got {quantize!r}")
    gguf_file = _find_gguf(path)
    if quantize == "gguf" and gguf_file is None:
        raise QuantizeError(f"{path}: quantize='gguf' keeps a GGUF file's quantized blocks; this is not "
                             "a .gguf file (use quantize='nf4', 'int8', ... instead)")
    if gguf_file is not None:
        config, checkpoint = read_gguf(gguf_file)
        source = config_source = str(gguf_file)
        family = _family(config)
    elif path.is_dir() and (path / "config.json").is_file():
        refuse_remote_code(path)
        config = config_to_dict(path)
        source, config_source = str(path), str(path / "config.json")
        # An unsupported model_type is the clearer error; raise it before reading weights.
        family = _with_source(config_source, _family, config)
        checkpoint = SafetensorsCheckpoint(checkpoint_files(path))
    else:
        raise FileNotFoundError(
            f"{path} is not a model: expected a directory with config.json and "
            "model.safetensors (or model.safetensors.index.json), or a .gguf file"
        )
    options = family.build_options(checkpoint.keys())
    module = _with_source(config_source, functools.partial(
        build_module, dtype=dtype, compute_dtype=compute_dtype, scan_layers=scan_layers,
        architecture=architecture, remat=remat, **options), config)
    params = _load_params(module, family, checkpoint, module.param_dtype, source, quantize)
    return Model(module, params, config, source)


def _with_source(source: str, build: Callable[[dict[str, Any]], Any], config: dict[str, Any]) -> Any:
    """``build(config)``, with the file the config came from at the front of a config error."""
    try:
        return build(config)
    except ModelLoadError as err:
        if str(err).startswith(source):
            raise
        raise type(err)(f"{source}: {err}") from None


def load_tokenizer(source: str | Path) -> Any:
    """The transformers ``AutoTokenizer`` of a checkpoint directory or GGUF file (offline).

    A directory (or the GGUF file's directory) whose ``config.json`` or
    ``tokenizer_config.json`` has an ``auto_map`` is refused: its tokenizer is code.

    Example:
        >>> import json, pathlib, tempfile
        >>> from tokenizers import Tokenizer, models as bpe
        >>> from lora_jax.models import load_tokenizer
        >>> directory = pathlib.Path(tempfile.mkdtemp())
        >>> Tokenizer(bpe.BPE({"a": 0, "b": 1, "ab": 2}, [("a", "b")])).save(
        ...     str(directory / "tokenizer.json"))
        >>> _ = (directory / "tokenizer_config.json").write_text(
        ...     json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
        >>> load_tokenizer(directory)("ab")["input_ids"]
        [2]

    A GGUF file carries its tokenizer: ``load_tokenizer("SmolLM2.Q4_1.gguf")``.
    """
    from transformers import AutoTokenizer

    path = Path(source)
    gguf_file = _find_gguf(path)
    directory = gguf_file.parent if gguf_file is not None else path
    refuse_remote_code(directory)  # transformers would otherwise ask on stdin
    options: dict[str, Any] = {"local_files_only": True, "trust_remote_code": False}
    if gguf_file is not None:
        options["gguf_file"] = gguf_file.name
    return AutoTokenizer.from_pretrained(str(directory), **options)


# --------------------------------------------------------------------------- export


def _unwrap(params: Params) -> Params:
    # Accept flax's {"params": ...} variables as well as the bare tree.
    if set(params) == {"params"}:
        return params["params"]
    return params


def to_hf_state_dict(config: Any, params: Params) -> dict[str, np.ndarray]:
    """Params as a transformers checkpoint state dict: torch names and layouts, numpy arrays.

    Scanned layers are unstacked; tied LM heads are left out (transformers re-ties them);
    fused expert stacks are written per expert, as transformers' ``save_pretrained`` does.

    Example:
        >>> from lora_jax.models import from_config, to_hf_state_dict
        >>> model = from_config({"model_type": "gpt2", "n_embd": 32, "n_layer": 1,
        ...     "n_head": 4, "vocab_size": 50, "n_positions": 16})
        >>> state = to_hf_state_dict(model.config, model.params)
        >>> state["transformer.h.0.attn.c_attn.weight"].shape
        (32, 96)
    """
    family = _family(config_to_dict(config))
    scan = family.scan_node
    state: dict[str, np.ndarray] = {}
    for path, value in flatten_dict(_unwrap(params)).items():
        array = np.asarray(value)
        layout = _torch_layout(path, family)
        if scan is not None and path[: len(scan)] == scan and not path[len(scan)].isdigit():
            per_layer = [(_hf_name((*scan, str(i), *path[len(scan):])), layer)
                         for i, layer in enumerate(array)]
        else:
            per_layer = [(_hf_name(path), array)]
        for name, tensor in per_layer:
            tensor = layout(tensor)
            groups = family.tensor_pieces(name, tensor.shape[0]) if tensor.ndim else None
            if groups is None:
                state[name] = np.ascontiguousarray(tensor)
                continue
            for group, part in zip(groups, np.split(tensor, len(groups), axis=1)):
                for piece_name, piece in zip(group, part):
                    state[piece_name] = np.ascontiguousarray(piece)
    return state


def save_pretrained(path: str | Path, config: Any, params: Params) -> Path:
    """Write ``config.json`` + ``model.safetensors`` that transformers loads.

    The safetensors metadata is ``{"format": "pt"}``; ``config.json`` gets the
    ``architectures`` and ``dtype`` matching ``params``.

    Example:
        >>> import tempfile
        >>> from lora_jax.models import from_config, save_pretrained
        >>> model = from_config({"model_type": "gpt2", "n_embd": 32, "n_layer": 1,
        ...     "n_head": 4, "vocab_size": 50, "n_positions": 16})
        >>> out = save_pretrained(tempfile.mkdtemp(), model.config, model.params)
        >>> sorted(p.name for p in out.iterdir())
        ['config.json', 'model.safetensors']
    """
    from safetensors.numpy import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = config_to_dict(config)
    params = _unwrap(params)
    state = to_hf_state_dict(config, params)
    config["architectures"] = [_family(config).architecture(config["model_type"], params)]
    float_dtypes = {
        str(a.dtype)
        for a in state.values()
        if np.issubdtype(a.dtype, np.floating) or str(a.dtype) == "bfloat16"
    }
    if len(float_dtypes) == 1:
        config["dtype"] = float_dtypes.pop()
        config.pop("torch_dtype", None)
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path
