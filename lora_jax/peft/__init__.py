"""Hugging Face PEFT's LoRA adapter format, in and out.

Example:
    >>> import tempfile, jax, jax.numpy as jnp, lora_jax
    >>> params = {"model": {"q_proj": {"kernel": jnp.ones((4, 6))}}}
    >>> config = lora_jax.LoraConfig(r=2, target_modules=["q_proj"])
    >>> adapter = lora_jax.init(config, params, jax.random.key(0))
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     folder = lora_jax.save_peft(tmp, adapter, config, params)  # PeftModel.from_pretrained reads it
    ...     adapter2, config2 = loaded = lora_jax.load_peft(folder, params)
    >>> params = loaded.params  # with any modules_to_save / bias tensors of the file
    >>> sorted(adapter2) == sorted(adapter)
    True

The format (peft 0.21): a directory with ``adapter_config.json``,
``adapter_model.safetensors`` (metadata ``{"format": "pt"}``) and a model card;
a named adapter lives in a sub-folder. One job per module:

* :mod:`~lora_jax.peft.keys`: which tensor keys an adapter entry writes and
  reads (``base_model.model.<torch path>.lora_A.weight``, ...).
* :mod:`~lora_jax.peft.naming`: lora_jax module names <-> torch module paths
  (``name_map``, stacked layers, ``layers_pattern``).
* :mod:`~lora_jax.peft.adapter_config`: ``LoraConfig`` <-> ``adapter_config.json``.
* :mod:`~lora_jax.peft.files`: adapter directories, reading and writing their files.
* :mod:`~lora_jax.peft.export` (:func:`to_peft`, :func:`save_peft`) and
  :mod:`~lora_jax.peft.load` (:func:`from_peft`, :func:`load_peft`).
* :mod:`~lora_jax.peft.errors`: :class:`PeftFormatError`, raised for any file
  lora_jax cannot read, naming the file and the key.
"""

from lora_jax.peft.adapter_config import PEFT_FORMAT_VERSION, TASK_TYPES, lora_config_from_peft
from lora_jax.peft.errors import PeftFormatError
from lora_jax.peft.export import save_peft, to_peft
from lora_jax.peft.files import BIN_NAME, CONFIG_NAME, SAFETENSORS_NAME
from lora_jax.peft.keys import KEY_PREFIX
from lora_jax.peft.load import LoadedPeft, from_peft, load_peft
from lora_jax.peft.naming import LAYER_PLACEHOLDER, NameMap

__all__ = [
    "BIN_NAME",
    "CONFIG_NAME",
    "KEY_PREFIX",
    "LAYER_PLACEHOLDER",
    "PEFT_FORMAT_VERSION",
    "SAFETENSORS_NAME",
    "TASK_TYPES",
    "LoadedPeft",
    "NameMap",
    "PeftFormatError",
    "from_peft",
    "load_peft",
    "lora_config_from_peft",
    "save_peft",
    "to_peft",
]
