"""What the loaders need to know of a model family, and typed reads of its config.

Each family module (``llama.py``, ``gpt2.py``, ``bert.py``) ends with a
``FAMILY = ModelFamily(...)`` that ``loading.py`` registers under its model types:
how to build the module from a ``config.json`` dict, how its params map to the
checkpoint's torch tensors, and which checkpoint tensors to skip.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Collection, Mapping
from typing import Any

import flax.linen as nn
import numpy as np

from .errors import ModelLoadError

ParamPath = tuple[str, ...]
# The leaf name of a bare torch nn.Parameter (an MoE router or expert stack): its torch
# name is its module path, its layout the torch tensor's with the last two axes swapped.
# lora_jax.peft.parameters.PARAMETER_LEAF is the same name (the models import no core).
PARAMETER_LEAF = "param"


def every_kernel(path: ParamPath) -> bool:
    """``ModelFamily.transposed`` of a family whose torch layers are all ``nn.Linear``.

    Example:
        >>> from lora_jax.models.family import every_kernel
        >>> every_kernel(("model", "layers", "0", "mlp", "up_proj", "kernel"))
        True
    """
    return True


def no_build_options(tensor_names: Collection[str]) -> dict[str, Any]:
    """``ModelFamily.build_options`` of a family whose checkpoints all build the same way.

    Example:
        >>> from lora_jax.models.family import no_build_options
        >>> no_build_options({"model.norm.weight"})
        {}
    """
    return {}


def no_tensor_pieces(name: str, num_experts: int) -> None:
    """``ModelFamily.tensor_pieces`` of a family whose checkpoints store every tensor whole.

    Example:
        >>> from lora_jax.models.family import no_tensor_pieces
        >>> no_tensor_pieces("model.layers.0.mlp.experts.down_proj", 8) is None
        True
    """
    return None


def token_ids() -> tuple[np.ndarray]:
    """One (1, 1) batch of token ids: enough to trace a language model's params.

    Example:
        >>> from lora_jax.models.family import token_ids
        >>> token_ids()[0].shape
        (1, 1)
    """
    return (np.zeros((1, 1), np.int32),)


@dataclasses.dataclass(frozen=True)
class BuildSettings:
    """How to build a family's module: dtypes, scanned layers and the head to put on it.

    Example:
        >>> import jax.numpy as jnp
        >>> from lora_jax.models.family import BuildSettings
        >>> BuildSettings(dtype=jnp.bfloat16, param_dtype=jnp.float32).scan_layers
        False

    Attributes:
        dtype: dtype of the activations.
        param_dtype: dtype the params are stored in.
        scan_layers: one ``nn.scan``-ed layer instead of an unrolled stack.
        architecture: the ``config.json`` architecture asked for (e.g.
            "BertForSequenceClassification"), or None.
        remat: per-layer rematerialisation of the layer stack: "none", "dots", "full"
            or "offload" (:func:`lora_jax.models.blocks.remat_policy`).
    """

    dtype: Any = np.float32
    param_dtype: Any = np.float32
    scan_layers: bool = False
    architecture: str | None = None
    remat: str = "none"

    @property
    def dtypes(self) -> dict[str, Any]:
        """``dtype`` and ``param_dtype`` as module keyword arguments.

        Example:
            >>> from lora_jax.models.family import BuildSettings
            >>> sorted(BuildSettings().dtypes)
            ['dtype', 'param_dtype']
        """
        return {"dtype": self.dtype, "param_dtype": self.param_dtype}


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    """A model family as the loaders see it.

    Example:
        >>> from lora_jax.models import gpt2
        >>> gpt2.FAMILY.model_types, gpt2.FAMILY.base_prefix
        (('gpt2',), 'transformer.')

    Attributes:
        model_types: the ``config.json`` model types this family loads.
        build: ``build(config, settings, **options)`` -> the linen module, from a
            ``config.json`` dict, :class:`BuildSettings` and ``build_options``.
        base_prefix: the base model's prefix, which checkpoints may or may not carry
            (``"model."``, ``"transformer."``, ``"bert."``).
        architecture: ``architecture(model_type, params)`` -> the ``architectures``
            entry ``save_pretrained`` writes.
        transposed: which kernels torch stores as an ``nn.Linear`` weight (out, in).
        scan_node: the node holding scanned layers (a leading layer axis), if the
            family supports ``scan_layers``.
        ignored: checkpoint tensors (buffers, tied copies) skipped without a warning.
        build_options: extra ``build`` options read from the checkpoint's tensor names.
        dummy_inputs: inputs ``module.init`` can trace the model with.
        refused: model types this family knows but does not load, each with the reason
            (e.g. a multimodal variant of a text family); the loader raises it.
        norm_scale_fill: the norm ``scale`` random init gives: 1, or 0 for norms that
            multiply by ``1 + scale`` (Gemma).
        tensor_pieces: ``tensor_pieces(name, num_experts)`` -> the tensors that store
            the fused expert stack ``name`` in transformers' original (per-expert)
            format, as groups of per-expert names: the stack is each group's tensors
            stacked on a new leading axis, the groups concatenated on axis 1; None for a
            tensor stored whole. Loading reads either form; saving writes the pieces,
            as transformers' ``save_pretrained`` does.
    """

    model_types: tuple[str, ...]
    build: Callable[..., nn.Module]
    base_prefix: str
    architecture: Callable[[str, Any], str]
    transposed: Callable[[ParamPath], bool] = every_kernel
    scan_node: ParamPath | None = None
    ignored: re.Pattern[str] = re.compile(r"(?!)")  # matches nothing
    build_options: Callable[[Collection[str]], dict[str, Any]] = no_build_options
    dummy_inputs: Callable[[], tuple[Any, ...]] = token_ids
    refused: Mapping[str, str] = dataclasses.field(default_factory=dict)
    norm_scale_fill: float = 1.0
    tensor_pieces: Callable[[str, int], list[list[str]] | None] = no_tensor_pieces


_REQUIRED = object()


class ConfigReader:
    """Typed reads of a Hugging Face config dict; a bad value is one clear error.

    Example:
        >>> from lora_jax.models.family import ConfigReader
        >>> read = ConfigReader({"hidden_size": 64, "rms_norm_eps": 1e-5}, "llama")
        >>> read.int("hidden_size"), read.float("rms_norm_eps"), read.bool("tie", False)
        (64, 1e-05, False)
        >>> read.int("num_hidden_layers")
        Traceback (most recent call last):
        ...
        lora_jax.models.errors.ModelLoadError: the llama config has no 'num_hidden_layers'; expected an integer >= 1
    """

    def __init__(self, config: Mapping[str, Any], model_type: str) -> None:
        self.config = config
        self.model_type = model_type

    def _read(self, key: str, default: Any, expected: str,
              valid: Callable[[Any], bool]) -> Any:
        value = self.config.get(key)
        if value is None:
            if default is _REQUIRED:
                raise ModelLoadError(
                    f"the {self.model_type} config has no {key!r}; expected {expected}"
                )
            return default
        if not valid(value):
            raise ModelLoadError(
                f"the {self.model_type} config has {key}={value!r}; expected {expected}"
            )
        return value

    def int(self, key: str, default: Any = _REQUIRED, *, minimum: int = 1) -> Any:
        """``config[key]`` as an int >= ``minimum`` (``default`` when absent or None).

        Example:
            >>> from lora_jax.models.family import ConfigReader
            >>> read = ConfigReader({"num_key_value_heads": None, "n_layer": 2.0}, "gpt2")
            >>> read.int("num_key_value_heads", 4), read.int("n_layer")
            (4, 2)
        """

        def valid(value: Any) -> bool:
            whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
            return whole and not isinstance(value, bool) and value >= minimum

        value = self._read(key, default, f"an integer >= {minimum}", valid)
        return value if value is default else int(value)

    def float(self, key: str, default: Any = _REQUIRED) -> Any:
        """``config[key]`` as a finite float (``default`` when absent or None).

        Example:
            >>> from lora_jax.models.family import ConfigReader
            >>> ConfigReader({"rope_theta": 10000}, "llama").float("rope_theta")
            10000.0
        """

        def valid(value: Any) -> bool:
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            return number and math.isfinite(value)

        value = self._read(key, default, "a finite number", valid)
        return value if value is default else float(value)

    def bool(self, key: str, default: Any = _REQUIRED) -> Any:
        """``config[key]`` as a bool (``default`` when absent or None).

        Example:
            >>> from lora_jax.models.family import ConfigReader
            >>> ConfigReader({"tie_word_embeddings": "no"}, "llama").bool("tie_word_embeddings")
            Traceback (most recent call last):
            ...
            lora_jax.models.errors.ModelLoadError: the llama config has tie_word_embeddings='no'; expected true or false
        """
        value = self._read(key, default, "true or false", lambda v: isinstance(v, bool))
        return value if value is default else bool(value)

    def str(self, key: str, default: Any = _REQUIRED) -> Any:
        """``config[key]`` as a str (``default`` when absent or None).

        Example:
            >>> from lora_jax.models.family import ConfigReader
            >>> ConfigReader({}, "gpt2").str("activation_function", "gelu_new")
            'gelu_new'
        """
        return self._read(key, default, "a string", lambda v: isinstance(v, str))
