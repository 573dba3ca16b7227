"""Qwen3 decoders: the Llama layout with an RMSNorm on every query and key head.

Param tree (mirrors transformers' ``Qwen3ForCausalLM``): Llama's (see
:mod:`lora_jax.models.llama`) plus, in every layer::

    model.layers.<i>.self_attn.q_norm.scale    (head_dim,)   normalises each query head
    model.layers.<i>.self_attn.k_norm.scale    (head_dim,)   and each key head, before RoPE

q/k/v/o have a bias only with ``attention_bias`` (the released checkpoints have none),
the MLP never. ``head_dim`` comes from the config and defaults to 128 as in
transformers' ``Qwen3Config`` (not ``hidden_size / num_attention_heads``); the small
checkpoints tie the LM head to the embeddings. Sliding-window layers follow
``use_sliding_window`` and ``layer_types`` (or ``max_window_layers``), as Qwen2's.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .blocks import AttentionConfig
from .family import BuildSettings, ConfigReader, ModelFamily
from .llama import FAMILY as LLAMA_FAMILY
from .llama import LlamaConfig, LlamaForCausalLM, sliding_windows

MODEL_TYPES = ("qwen3",)
# transformers' Qwen3Config.head_dim default; a config.json without head_dim means this.
DEFAULT_HEAD_DIM = 128


@dataclasses.dataclass(frozen=True)
class Qwen3Config(LlamaConfig):
    """A Qwen3 ``config.json`` as the module needs it: :class:`LlamaConfig`'s fields, and
    q/k norms in every attention block.

    Example:
        >>> from lora_jax.models.qwen3 import Qwen3Config
        >>> cfg = Qwen3Config.from_hf({"model_type": "qwen3", "hidden_size": 64,
        ...     "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        ...     "vocab_size": 100})
        >>> cfg.head_dim, cfg.qkv_bias, cfg.attention.qk_norm_eps
        (128, False, 1e-06)
    """

    @classmethod
    def from_hf(cls, config: dict[str, Any]) -> Qwen3Config:
        """Read a ``config.json`` dict of model_type qwen3.

        Example:
            >>> from lora_jax.models.qwen3 import Qwen3Config
            >>> Qwen3Config.from_hf({"model_type": "qwen3", "hidden_size": 64, "head_dim": 16,
            ...     "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4,
            ...     "vocab_size": 100, "use_sliding_window": True, "sliding_window": 32,
            ...     "max_window_layers": 2}).sliding_windows
            (None, None, 32)
        """
        config = dict(config)
        read = ConfigReader(config, config.get("model_type", "qwen3"))
        config["head_dim"] = read.int("head_dim", DEFAULT_HEAD_DIM)
        base = super().from_hf(config)  # q/k/v/o biases from attention_bias, as Llama
        return dataclasses.replace(
            base, mlp_bias=False,
            sliding_windows=sliding_windows(config, "qwen3", base.num_hidden_layers))

    @property
    def attention(self) -> AttentionConfig:
        """Llama's attention with an RMSNorm (this config's ``rms_norm_eps``) on each query
        and key head.

        Example:
            >>> from lora_jax.models.qwen3 import Qwen3Config
            >>> Qwen3Config.from_hf({"hidden_size": 32, "intermediate_size": 64, "head_dim": 8,
            ...     "num_hidden_layers": 1, "num_attention_heads": 4, "vocab_size": 10,
            ...     "rms_norm_eps": 1e-5}).attention.qk_norm_eps
            1e-05
        """
        return dataclasses.replace(super().attention, qk_norm_eps=self.rms_norm_eps)


class Qwen3ForCausalLM(LlamaForCausalLM):
    """A Qwen3 causal LM: :class:`~lora_jax.models.llama.LlamaForCausalLM` with a
    :class:`Qwen3Config` (same call, cache and outputs).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from lora_jax.models.qwen3 import Qwen3Config, Qwen3ForCausalLM
        >>> cfg = Qwen3Config.from_hf({"hidden_size": 32, "intermediate_size": 64, "head_dim": 8,
        ...     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        ...     "vocab_size": 50, "tie_word_embeddings": True})
        >>> logits, params = jax.eval_shape(Qwen3ForCausalLM(cfg).init_with_output,
        ...     jax.random.key(0), jnp.zeros((1, 5), jnp.int32))
        >>> logits.shape, params["params"]["model"]["layers"]["0"]["self_attn"]["k_norm"]["scale"].shape
        ((1, 5, 50), (8,))
    """


def build(config: dict[str, Any], settings: BuildSettings) -> Qwen3ForCausalLM:
    """The causal LM for a qwen3 ``config.json`` dict.

    Example:
        >>> from lora_jax.models import qwen3
        >>> from lora_jax.models.family import BuildSettings
        >>> qwen3.build({"model_type": "qwen3", "hidden_size": 16, "intermediate_size": 32,
        ...     "num_hidden_layers": 2, "num_attention_heads": 2, "vocab_size": 10},
        ...     BuildSettings()).config.head_dim
        128
    """
    return Qwen3ForCausalLM(Qwen3Config.from_hf(config), settings.scan_layers, remat=settings.remat,
                            **settings.dtypes)


FAMILY = ModelFamily(
    model_types=MODEL_TYPES,
    build=build,
    base_prefix="model.",
    architecture=lambda model_type, params: "Qwen3ForCausalLM",
    scan_node=LLAMA_FAMILY.scan_node,
    ignored=LLAMA_FAMILY.ignored,
)
