"""The errors the model loaders raise for input they cannot use: one line naming the file,
key or tensor, what was found and what was expected.

All are ``ValueError``s; a missing tensor is also a ``KeyError`` and an unsupported
architecture also a ``NotImplementedError``, as they were before these classes existed.
"""

from __future__ import annotations


class ModelLoadError(ValueError):
    """A model directory, checkpoint, GGUF file or config that cannot be used as it is.

    Example:
        >>> from lora_jax.models.errors import ModelLoadError
        >>> issubclass(ModelLoadError, ValueError)
        True
    """


class MissingTensorError(ModelLoadError, KeyError):
    """A tensor the model needs is not in the checkpoint.

    Example:
        >>> from lora_jax.models.errors import MissingTensorError
        >>> str(MissingTensorError("model.safetensors: no tensor 'lm_head.weight'"))
        "model.safetensors: no tensor 'lm_head.weight'"
    """

    def __str__(self) -> str:
        # KeyError's str() is the repr of its argument; this message is prose.
        return str(self.args[0]) if self.args else ""


class UnsupportedModelError(ModelLoadError, NotImplementedError):
    """A model_type, architecture, rope type or other variant lora_jax does not implement.

    Example:
        >>> from lora_jax.models.errors import UnsupportedModelError
        >>> issubclass(UnsupportedModelError, NotImplementedError)
        True
    """


class QuantizeError(ModelLoadError):
    """The model's kernels cannot be quantized as asked (``from_pretrained(..., quantize=)``).

    Example:
        >>> from lora_jax.models.errors import QuantizeError
        >>> issubclass(QuantizeError, ValueError)
        True
    """
