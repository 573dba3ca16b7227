"""Export a LoRA-tuned model as a plain Hugging Face checkpoint (the adapter merged in).

    lora_jax.models.save_merged("out/merged", model, adapter, config)
    # PyTorch: AutoModelForCausalLM.from_pretrained("out/merged")

The one models module that uses the core (``merge``): the core never imports it.
``lora_jax.export`` re-exports it under its old name. To ship the adapter alone, in
PEFT's format, use :func:`lora_jax.peft.save_peft`.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax.config import LoraConfig
from lora_jax.merge import merge
from lora_jax.tree import Adapter

from .loading import Model, save_pretrained

# Files of a Hugging Face tokenizer, copied as they are from the model's directory.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "vocab.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja")


def save_merged(
    path: str | os.PathLike,
    model: Any,
    adapter: Adapter,
    config: LoraConfig,
    model_config: Any = None,
    *,
    params: Any = None,
    dtype: Any = None,
    tokenizer: Any = None,
    overwrite: bool = False,
) -> Path:
    """Merge ``adapter`` into the model's params and write a checkpoint transformers loads.

    Example:
        >>> import tempfile, jax, lora_jax, numpy as np
        >>> from lora_jax import models
        >>> model = models.from_config({"model_type": "llama", "hidden_size": 16,
        ...     "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
        ...     "vocab_size": 30})
        >>> config = lora_jax.LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
        >>> adapter = lora_jax.init(config, model.params, jax.random.key(0))
        >>> adapter = jax.tree.map(lambda x: x + 0.1, adapter)  # as if trained (B is not 0)
        >>> out = models.save_merged(tempfile.mkdtemp(), model, adapter, config)
        >>> sorted(p.name for p in out.iterdir())
        ['config.json', 'model.safetensors']
        >>> ids = np.array([[1, 2, 3]])
        >>> tuned = lora_jax.lora(model.module.apply, config)(
        ...     {"params": model.params}, adapter, ids)
        >>> bool(np.allclose(models.from_pretrained(out)(ids), tuned, atol=1e-5))
        True

    ``AutoModelForCausalLM.from_pretrained(out)`` in PyTorch computes the same logits.

    Args:
        path: output directory (``config.json``, ``model.safetensors`` and the tokenizer).
        model: a :class:`lora_jax.models.Model`, or a bare params tree of one
            (then ``model_config`` is required).
        adapter, config: the adapter and its :class:`LoraConfig`.
        model_config: the Hugging Face config (a dict, a transformers config or
            a checkpoint directory); defaults to ``model.config``.
        params: the params to merge into, when they differ from ``model.params``
            (trained ``modules_to_save`` / bias leaves live there).
        dtype: cast floating params to this dtype after merging (e.g.
            ``jnp.bfloat16``); by default each keeps its own.
        tokenizer: a transformers tokenizer to save beside the weights. By
            default a ``Model``'s own tokenizer files are copied when it has some.
        overwrite: write into an existing non-empty directory.

    Returns:
        The directory written.
    """
    path = Path(path)
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"{path} is not empty; pass overwrite=True or choose another directory.")
    source = None
    if isinstance(model, Model):
        params = model.params if params is None else params
        model_config = model.config if model_config is None else model_config
        source = model.source
    else:
        if params is not None:
            raise TypeError("pass the params either as `model` or as `params=`, not both.")
        params = model
    if model_config is None:
        raise TypeError("save_merged needs model_config (the Hugging Face config) when given bare params.")

    merged = merge(params, adapter, config)
    if dtype is not None:
        merged = jax.tree.map(
            lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, merged)
    out = Path(save_pretrained(path, model_config, merged))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    elif source is not None:
        _copy_tokenizer(model, Path(source), out)
    return out


def _copy_tokenizer(model: Any, source: Path, out: Path) -> None:
    if source.is_dir():
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, out / name)
        return
    try:  # a GGUF file: the tokenizer is inside it
        model.tokenizer().save_pretrained(str(out))
    except (OSError, ValueError) as err:
        warnings.warn(f"save_merged: no tokenizer written ({err}); pass tokenizer= to add one.", stacklevel=3)
