"""GPT-2 with its language-model head.

Param tree (mirrors transformers' ``GPT2LMHeadModel``)::

    transformer.wte.embedding               (vocab, n_embd)   also the tied LM head
    transformer.wpe.embedding               (n_positions, n_embd)
    transformer.h.<i>.ln_1.{scale,bias}     (n_embd,)
    transformer.h.<i>.attn.c_attn.kernel    (n_embd, 3 * n_embd)  + bias
    transformer.h.<i>.attn.c_proj.kernel    (n_embd, n_embd)      + bias
    transformer.h.<i>.ln_2.{scale,bias}     (n_embd,)
    transformer.h.<i>.mlp.c_fc.kernel       (n_embd, n_inner)     + bias
    transformer.h.<i>.mlp.c_proj.kernel     (n_inner, n_embd)     + bias
    transformer.ln_f.{scale,bias}           (n_embd,)
    lm_head.kernel                          (n_embd, vocab)   only if tie_word_embeddings is false

torch's ``Conv1D`` already stores its weight as (in, out), so these kernels equal the
torch weights with no transpose.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from .blocks import MLP, ConfigModule, MLPConfig, layer_stack
from .errors import ModelLoadError
from .family import BuildSettings, ConfigReader, ModelFamily
from .layers import (
    Dtype,
    attend,
    causal_lm_output,
    causal_mask,
    empty_kv_cache,
    make_attention_mask,
    next_cache,
    output_head,
    slots_and_positions,
    split_cache,
)

MODEL_TYPES = ("gpt2",)


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """Architecture of a GPT-2 model, read from a Hugging Face config.

    Example:
        >>> from lora_jax.models import GPT2Config
        >>> GPT2Config.from_hf({"n_embd": 32, "n_layer": 2, "n_head": 4, "vocab_size": 50}).n_inner
        128
    """

    vocab_size: int
    n_positions: int
    n_embd: int
    n_layer: int
    n_head: int
    n_inner: int
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02

    @classmethod
    def from_hf(cls, config: dict[str, Any]) -> GPT2Config:
        """Read a ``config.json`` dict of model_type gpt2.

        Example:
            >>> from lora_jax.models import GPT2Config
            >>> GPT2Config.from_hf({"n_embd": 32, "n_head": 4}).n_layer
            12
        """
        read = ConfigReader(config, "gpt2")
        n_embd = read.int("n_embd", 768)
        n_head = read.int("n_head", 12)
        if n_embd % n_head:
            raise ModelLoadError(
                f"the gpt2 config has n_embd={n_embd}, which n_head={n_head} does not divide"
            )
        return cls(
            vocab_size=read.int("vocab_size", 50257),
            n_positions=read.int("n_positions", 1024),
            n_embd=n_embd,
            n_layer=read.int("n_layer", 12),
            n_head=n_head,
            n_inner=read.int("n_inner", None) or 4 * n_embd,
            activation_function=read.str("activation_function", "gelu_new"),
            layer_norm_epsilon=read.float("layer_norm_epsilon", 1e-5),
            scale_attn_weights=read.bool("scale_attn_weights", True),
            scale_attn_by_inverse_layer_idx=read.bool("scale_attn_by_inverse_layer_idx", False),
            tie_word_embeddings=read.bool("tie_word_embeddings", True),
            initializer_range=read.float("initializer_range", 0.02),
        )

    @property
    def head_dim(self) -> int:
        """Width of one attention head, ``n_embd // n_head``.

        Example:
            >>> from lora_jax.models import GPT2Config
            >>> GPT2Config.from_hf({"n_embd": 32, "n_head": 4}).head_dim
            8
        """
        return self.n_embd // self.n_head

    @property
    def mlp(self) -> MLPConfig:
        """The ``c_fc`` / ``c_proj`` MLP of every block.

        Example:
            >>> from lora_jax.models import GPT2Config
            >>> GPT2Config.from_hf({"n_embd": 32, "n_head": 4}).mlp.names
            ('c_fc', 'c_proj')
        """
        return MLPConfig(self.n_inner, self.n_embd, self.activation_function, use_bias=True,
                         names=("c_fc", "c_proj"), initializer_range=self.initializer_range)


class GPT2Attention(ConfigModule):
    """Multi-head causal self-attention with a fused ``c_attn`` projection.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from lora_jax.models.gpt2 import GPT2Attention, GPT2Config
        >>> cfg = GPT2Config.from_hf({"n_embd": 16, "n_layer": 1, "n_head": 2})
        >>> (out, _), params = jax.eval_shape(GPT2Attention(cfg).init_with_output,
        ...     jax.random.key(0), jnp.ones((1, 3, 16)), None)
        >>> out.shape, params["params"]["c_attn"]["kernel"].shape
        ((1, 3, 16), (16, 48))
    """

    config: GPT2Config
    layer_idx: int = 0

    @nn.compact
    def __call__(self, x, mask, layer_cache=None, index=None):
        cfg = self.config
        batch, seq, _ = x.shape
        qkv = self.dense(3 * cfg.n_embd, "c_attn")(x)
        q, k, v = (
            t.reshape(batch, seq, cfg.n_head, cfg.head_dim) for t in jnp.split(qkv, 3, axis=-1)
        )
        scale = cfg.head_dim**-0.5 if cfg.scale_attn_weights else 1.0
        if cfg.scale_attn_by_inverse_layer_idx:
            scale /= self.layer_idx + 1
        out, layer_cache = attend(q, k, v, mask, scale=scale, layer_cache=layer_cache,
                                  index=index)
        return self.dense(cfg.n_embd, "c_proj")(out), layer_cache


class GPT2Block(ConfigModule):
    """Pre-norm transformer block; ``block(x, layer_cache, mask, index)`` returns
    ``(x, layer_cache)``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from lora_jax.models.gpt2 import GPT2Block, GPT2Config
        >>> cfg = GPT2Config.from_hf({"n_embd": 16, "n_layer": 1, "n_head": 2})
        >>> (x, _), params = jax.eval_shape(GPT2Block(cfg).init_with_output,
        ...     jax.random.key(0), jnp.ones((1, 3, 16)), None, None, None)
        >>> x.shape, sorted(params["params"])
        ((1, 3, 16), ['attn', 'ln_1', 'ln_2', 'mlp'])
    """

    config: GPT2Config
    layer_idx: int = 0

    @nn.compact
    def __call__(self, x, layer_cache, mask, index):
        cfg = self.config
        h = self.layer_norm(cfg.layer_norm_epsilon, "ln_1")(x)
        h, layer_cache = GPT2Attention(cfg, layer_idx=self.layer_idx, name="attn", **self.kw)(
            h, mask, layer_cache, index
        )
        x = x + h
        h = self.layer_norm(cfg.layer_norm_epsilon, "ln_2")(x)
        x = x + MLP(cfg.mlp, name="mlp", **self.kw)(h)
        return x, layer_cache


class GPT2Model(ConfigModule):
    """Token + position embeddings, blocks, final norm (transformers' ``GPT2Model``);
    ``__call__`` returns ``(hidden, cache)`` (cache None without one).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from lora_jax.models.gpt2 import GPT2Config, GPT2Model
        >>> cfg = GPT2Config.from_hf({"n_embd": 16, "n_layer": 2, "n_head": 2, "n_positions": 8})
        >>> (hidden, _), params = jax.eval_shape(GPT2Model(cfg).init_with_output,
        ...     jax.random.key(0), jnp.zeros((1, 3), jnp.int32))
        >>> hidden.shape, sorted(params["params"]["h"])
        ((1, 3, 16), ['0', '1'])
    """

    config: GPT2Config

    remat: str = "none"

    def setup(self) -> None:
        cfg = self.config
        self.wte = self.embed(cfg.vocab_size, cfg.n_embd, None)
        self.wpe = self.embed(cfg.n_positions, cfg.n_embd, None)
        self.h = layer_stack(GPT2Block, cfg, cfg.n_layer, scan=False, num_args=2, remat=self.remat,
                             **self.kw)
        self.ln_f = self.layer_norm(cfg.layer_norm_epsilon, None)

    def __call__(self, input_ids, attention_mask=None, positions=None, cache=None):
        query_slots, key_slots, positions = slots_and_positions(input_ids, positions, cache)
        x = self.wte(input_ids) + self.wpe(positions)
        if cache is None:
            mask = causal_mask(attention_mask)
        else:
            mask = make_attention_mask(query_slots, key_slots, attention_mask)
        index, layer_caches = split_cache(cache)
        x, new_layers = self.h(x, layer_caches, mask, index)
        return self.ln_f(x), next_cache(cache, new_layers, input_ids.shape[1])


class GPT2LMHeadModel(ConfigModule):
    """GPT-2 causal LM; same call convention and ``remat`` field as ``LlamaForCausalLM``
    (float32 logits, ``(logits, cache)`` when a cache is passed, ``return_hidden``).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from lora_jax.models import GPT2Config, GPT2LMHeadModel
        >>> model = GPT2LMHeadModel(GPT2Config.from_hf({"n_embd": 32, "n_layer": 2,
        ...     "n_head": 4, "vocab_size": 50, "n_positions": 16}))
        >>> ids = jnp.zeros((1, 5), jnp.int32)
        >>> params = model.init(jax.random.key(0), ids)["params"]
        >>> model.apply({"params": params}, ids).shape
        (1, 5, 50)
    """

    config: GPT2Config
    remat: str = "none"

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, positions=None, cache=None,
                 return_hidden=False, labels=None):
        transformer = GPT2Model(self.config, remat=self.remat, name="transformer", **self.kw)
        hidden, new_cache = transformer(input_ids, attention_mask, positions, cache)
        out = output_head(hidden, transformer.wte, self.config, param_dtype=self.param_dtype,
                          dtype=self.dtype)
        out = causal_lm_output(out, return_hidden=return_hidden, labels=labels)
        return out if cache is None else (out, new_cache)

    def init_cache(self, batch_size: int, max_length: int, dtype: Dtype = None) -> dict:
        """A zeroed KV cache for ``batch_size`` rows of up to ``max_length`` tokens.

        Example:
            >>> from lora_jax.models import GPT2Config, GPT2LMHeadModel
            >>> model = GPT2LMHeadModel(GPT2Config.from_hf({"n_embd": 16, "n_layer": 2,
            ...     "n_head": 2}))
            >>> model.init_cache(1, 8)["layers"][1]["v"].shape
            (1, 8, 2, 8)
        """
        cfg = self.config
        return empty_kv_cache(cfg.n_layer, batch_size, max_length, cfg.n_head, cfg.head_dim,
                              dtype or self.dtype, stacked=False)


def build(config: dict[str, Any], settings: BuildSettings) -> GPT2LMHeadModel:
    """The causal LM for a Hugging Face GPT-2 config dict.

    Example:
        >>> from lora_jax.models import gpt2
        >>> from lora_jax.models.family import BuildSettings
        >>> gpt2.build({"n_embd": 16, "n_layer": 1, "n_head": 2},
        ...            BuildSettings()).config.n_positions
        1024
    """
    if settings.scan_layers:
        raise NotImplementedError("scan_layers=True is implemented for the Llama family only")
    return GPT2LMHeadModel(GPT2Config.from_hf(config), remat=settings.remat, **settings.dtypes)


def _conv1d_kept(path: tuple[str, ...]) -> bool:
    # torch's Conv1D already stores (in, out); only the untied lm_head is an nn.Linear.
    return path[0] == "lm_head"


FAMILY = ModelFamily(
    model_types=MODEL_TYPES,
    build=build,
    base_prefix="transformer.",
    architecture=lambda model_type, params: "GPT2LMHeadModel",
    transposed=_conv1d_kept,
    ignored=re.compile(r"(.*\.)?attn\.(masked_)?bias$|lm_head\.weight"),
)
