"""Flax (linen) models that load Hugging Face checkpoints.

Param trees mirror the PyTorch module names, so the dotted path of a kernel's parent is
the torch module name (``model.layers.0.self_attn.q_proj``) and maps to PEFT keys with
no table. Linear kernels are (in, out); embeddings (vocab, dim); norms ``scale`` (+
``bias`` for LayerNorm).

Example:
    >>> from lora_jax import models
    >>> model = models.from_pretrained("/path/to/hf-dir")  # doctest: +SKIP
    >>> logits = model(input_ids)  # doctest: +SKIP
    >>> out = models.generate(model, None, input_ids, max_new_tokens=20)  # doctest: +SKIP

Supported ``model_type``: llama (incl. SmolLM2, Llama 3 rope scaling), mistral, qwen2,
gpt2, bert; GGUF files of architecture llama or qwen2.
"""

from .bert import BertConfig, BertForSequenceClassification, BertModel, BertModelOutput
from .export import save_merged
from .generation import generate, sample_logits
from .gguf import read_gguf
from .gpt2 import GPT2Config, GPT2LMHeadModel
from .llama import LlamaConfig, LlamaForCausalLM
from .loading import (
    SUPPORTED_MODEL_TYPES,
    Model,
    build_module,
    config_to_dict,
    from_config,
    from_pretrained,
    load_tokenizer,
    save_pretrained,
    to_hf_state_dict,
)

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "BertConfig",
    "BertForSequenceClassification",
    "BertModel",
    "BertModelOutput",
    "GPT2Config",
    "GPT2LMHeadModel",
    "LlamaConfig",
    "LlamaForCausalLM",
    "Model",
    "build_module",
    "config_to_dict",
    "from_config",
    "from_pretrained",
    "generate",
    "load_tokenizer",
    "read_gguf",
    "sample_logits",
    "save_merged",
    "save_pretrained",
    "to_hf_state_dict",
]
