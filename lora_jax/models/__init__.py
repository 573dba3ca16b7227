"""Flax (linen) models that load Hugging Face checkpoints.

Param trees mirror the PyTorch module names, so the dotted path of a kernel's parent is
the torch module name (``model.layers.0.self_attn.q_proj``) and maps to PEFT keys with
no table. Linear kernels are (in, out); embeddings (vocab, dim); norms ``scale`` (+
``bias`` for LayerNorm).

Example:
    >>> from lora_jax import models
    >>> model = models.from_config({"model_type": "qwen2", "hidden_size": 16,
    ...     "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
    ...     "vocab_size": 30})
    >>> model([[1, 2, 3]]).shape
    (1, 3, 30)
    >>> models.generate(model, None, [[1, 2, 3]], max_new_tokens=5).shape
    (1, 8)

From disk: ``models.from_pretrained("/path/to/hf-dir")`` (config.json + safetensors)
or ``models.from_pretrained("model.Q4_1.gguf")``.

Supported ``model_type``: llama (incl. SmolLM2, Llama 3 rope scaling), mistral, qwen2,
qwen3, phi3 (4k variants), qwen3_moe, gpt2, bert, opt, gemma2, gemma3_text; GGUF files of
architecture llama or qwen2. Input these cannot use raises :class:`ModelLoadError` (a
``ValueError``) naming the file, key or tensor.

Training at scale: ``from_pretrained(path, remat="full")`` rematerialises each layer in the
backward pass (``REMAT_POLICIES``: none, dots, full, offload), and a causal LM called with
``return_hidden=True`` returns an ``LMHidden`` (final hidden states and the head's params
leaf) for ``chunked_lm_loss``, which never holds all the (tokens x vocab) logits.

Modules: ``layers`` (array maths: norms, RoPE, attention, KV cache, LM head),
``blocks`` (linen blocks: self-attention, MLP, layer stack), one module per family
(``llama``, ``qwen3``, ``phi3``, ``qwen3_moe`` with the ``moe`` block, ``gpt2``, ``bert``,
``opt``, ``gemma``; each ends with its ``FAMILY`` registration, see ``family``), ``loading``
/ ``hf_files`` / ``gguf`` (checkpoints in and out), ``generation`` and ``export`` (the merged
Hugging Face checkpoint).
"""

from .bert import BertConfig, BertForSequenceClassification, BertModel, BertModelOutput
from .blocks import REMAT_POLICIES, remat_policy
from .errors import MissingTensorError, ModelLoadError, QuantizeError, UnsupportedModelError
from .export import RequantizeWarning, save_merged
from .gemma import GemmaConfig, GemmaForCausalLM
from .generation import generate, sample_logits
from .gguf import read_gguf
from .gpt2 import GPT2Config, GPT2LMHeadModel
from .layers import LMHidden, chunked_lm_loss
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
from .opt import OPTConfig, OPTForCausalLM

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "BertConfig",
    "BertForSequenceClassification",
    "BertModel",
    "BertModelOutput",
    "GemmaConfig",
    "GemmaForCausalLM",
    "GPT2Config",
    "GPT2LMHeadModel",
    "LMHidden",
    "LlamaConfig",
    "LlamaForCausalLM",
    "MissingTensorError",
    "Model",
    "ModelLoadError",
    "OPTConfig",
    "OPTForCausalLM",
    "REMAT_POLICIES",
    "QuantizeError",
    "RequantizeWarning",
    "build_module",
    "chunked_lm_loss",
    "config_to_dict",
    "from_config",
    "from_pretrained",
    "generate",
    "load_tokenizer",
    "read_gguf",
    "remat_policy",
    "sample_logits",
    "save_merged",
    "save_pretrained",
    "to_hf_state_dict",
    "UnsupportedModelError",
]
