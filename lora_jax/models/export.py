"""Export a LoRA-tuned model as a plain Hugging Face checkpoint (the adapter merged in).

    lora_jax.models.save_merged("out/merged", model, adapter, config)
    # PyTorch: AutoModelForCausalLM.from_pretrained("out/merged")

The one models module that uses the core (``merge``): the core never imports it.
``lora_jax.export`` re-exports it under its old name. To ship the adapter alone, in
PEFT's format, use :func:`lora_jax.peft.save_peft`.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.config import LoraConfig
from lora_jax.merge import lora_delta, merge
from lora_jax.quantize import QuantConfig, dequantize, is_quantized, quantize
from lora_jax.tree import Adapter, find_targets

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
    requantize: QuantConfig | str | None = None,
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
        requantize: quantize the merged kernels again with this scheme (or
            :class:`~lora_jax.quantize.QuantConfig`) and write their dequantized values:
            loading the checkpoint quantized that way (e.g. transformers'
            ``load_in_4bit`` for "nf4" without double quantization) gives back the same
            codes. A :class:`RequantizeWarning` says how far that model is from
            base + adapter (the new quantization error, measured per kernel).

    A QLoRA base (quantized kernels, :mod:`lora_jax.quantize`) is dequantized in
    float32 and ``s * A @ B`` added in float32, so the checkpoint computes what the base
    plus the adapter computed in training; it is written in float32 (or ``dtype``).

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

    if requantize is not None and not isinstance(requantize, QuantConfig):
        requantize = QuantConfig(requantize)  # an unknown scheme is refused before anything is written
    # A quantized base is merged in float32: W = dequantize(codes) + s * A @ B.
    params = jax.tree.map(lambda x: dataclasses.replace(x, dtype=np.dtype(np.float32)) if is_quantized(x) else x,
                          params, is_leaf=is_quantized)
    merged = merge(params, adapter, config, dequantize=True)
    if requantize is not None:
        merged = _requantized(merged, params, adapter, config, requantize)
    if dtype is not None:
        merged = jax.tree.map(
            lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, merged)
    out = Path(save_pretrained(path, model_config, merged))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    elif source is not None:
        _copy_tokenizer(model, Path(source), out)
    return out


class RequantizeWarning(UserWarning):
    """``save_merged(..., requantize=)``: the merged model differs from base + adapter by a
    new quantization error (the message gives its size).

    Example:
        >>> from lora_jax.models import RequantizeWarning
        >>> issubclass(RequantizeWarning, UserWarning)
        True
    """


def requantization_error(merged: dict[Any, Any], requantized: dict[Any, Any],
                         deltas: dict[Any, Any]) -> dict[str, float]:
    """How far re-quantized merged kernels are from the merged ones, over all of them.

    Each argument maps a kernel's key (any hashable) to an array: ``merged`` the merged
    kernels W' = W + s*A@B, ``requantized`` the same kernels quantized again and
    dequantized, ``deltas`` the ``s * A @ B`` of the adapted ones.

    Example:
        >>> import numpy as np
        >>> merged = {"w": np.array([[1.0, 2.0]])}
        >>> error = requantization_error(merged, {"w": np.array([[1.0, 2.5]])}, {"w": np.array([[0.0, 1.0]])})
        >>> {k: round(v, 4) for k, v in error.items()}
        {'max_abs_error': 0.5, 'relative_error': 0.2236, 'error_vs_update': 0.5}

    Returns:
        ``max_abs_error``; ``relative_error`` = ||Q(W') - W'|| / ||W'||; and
        ``error_vs_update`` = ||Q(W') - W'|| / ||s A B|| over the adapted kernels (NaN
        without any): above 1, rounding moved the weights further than training did.
    """
    err2 = ref2 = adapted_err2 = update2 = max_abs = 0.0
    for key, w in merged.items():
        w64 = np.asarray(w, np.float64)
        diff = np.asarray(requantized[key], np.float64) - w64
        e2 = float(np.sum(diff * diff))
        err2, ref2 = err2 + e2, ref2 + float(np.sum(w64 * w64))
        max_abs = max(max_abs, float(np.abs(diff).max()))
        if key in deltas:
            adapted_err2 += e2
            update2 += float(np.sum(np.asarray(deltas[key], np.float64) ** 2))
    return {"max_abs_error": max_abs, "relative_error": (err2 / ref2) ** 0.5 if ref2 else 0.0,
            "error_vs_update": (adapted_err2 / update2) ** 0.5 if update2 else float("nan")}


def _requantized(merged: Any, params: Any, adapter: Adapter, config: LoraConfig,
                 requantize: QuantConfig) -> Any:
    """The merged kernels quantized again and dequantized (float32), with a warning of the error."""
    quantized = quantize(merged, requantize)
    values = dequantize(quantized, np.float32)
    flat_merged = dict(jax.tree_util.tree_flatten_with_path(merged)[0])
    flat_values = dict(jax.tree_util.tree_flatten_with_path(values)[0])
    paths = [path for path, leaf in jax.tree_util.tree_flatten_with_path(quantized, is_leaf=is_quantized)[0]
             if is_quantized(leaf)]
    deltas = {}
    for target in find_targets(config, params, adapter).values():
        if target.path in paths:
            pair = adapter[target.module_name]
            deltas[target.path] = lora_delta(pair["lora_A"], pair["lora_B"], target.num_lead, target.scaling)
    error = requantization_error({p: flat_merged[p] for p in paths}, {p: flat_values[p] for p in paths}, deltas)
    count = len(paths)
    warnings.warn(
        f"save_merged(requantize={requantize.scheme!r}): the merged model is not base + adapter any more; "
        f"re-quantizing {count} merged kernels adds a new quantization error: max |error| "
        f"{error['max_abs_error']:.3g}, ||error|| / ||W|| = {error['relative_error']:.3g}, and on the "
        f"adapted kernels ||error|| / ||s*A@B|| = {error['error_vs_update']:.3g} (above 1: rounding moves "
        "the weights further than training did). Keep the float checkpoint, or the adapter unmerged on the "
        "quantized base, to keep what was trained.",
        RequantizeWarning, stacklevel=3)
    return values


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
