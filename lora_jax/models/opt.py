"""OPT decoders (Meta's ``facebook/opt-*``), pre- and post-layer-norm.

Param tree (mirrors transformers' ``OPTForCausalLM``)::

    model.decoder.embed_tokens.embedding                (vocab, word_embed_proj_dim)  also the tied head
    model.decoder.embed_positions.embedding             (max_position_embeddings + 2, hidden)
    model.decoder.project_in.kernel                     (word_embed_proj_dim, hidden)  [1]
    model.decoder.layers.<i>.self_attn.{q,k,v,out}_proj.kernel  (hidden, hidden)  + bias [2]
    model.decoder.layers.<i>.self_attn_layer_norm.{scale,bias}  (hidden,)  [3]
    model.decoder.layers.<i>.fc1.kernel                 (hidden, ffn_dim)  + bias [2]
    model.decoder.layers.<i>.fc2.kernel                 (ffn_dim, hidden)  + bias [2]
    model.decoder.layers.<i>.final_layer_norm.{scale,bias}      (hidden,)  [3]
    model.decoder.final_layer_norm.{scale,bias}         (hidden,)  pre-layer-norm models only [3]
    model.decoder.project_out.kernel                    (hidden, word_embed_proj_dim)  [1]
    lm_head.kernel                                      (word_embed_proj_dim, vocab)  untied only

[1] only when ``word_embed_proj_dim != hidden_size`` (opt-350m); [2] with ``enable_bias``
(the default); [3] with ``layer_norm_elementwise_affine`` (the default).

Position ids come from the attention mask as transformers computes them (the count of
real tokens so far, minus one), plus OPT's offset of 2 into ``embed_positions``, so left
padding gives each row the positions it would have unpadded. With ``scan_layers=True``
the ``<i>`` level disappears and every leaf under ``model.decoder.layers`` gains a
leading layer axis.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from .blocks import AttentionConfig, ConfigModule, SelfAttention, layer_stack
from .errors import ModelLoadError
from .family import BuildSettings, ConfigReader, ModelFamily
from .layers import (
    Dtype,
    activation,
    causal_lm_output,
    empty_kv_cache,
    make_attention_mask,
    next_cache,
    output_head,
    slots_and_positions,
    split_cache,
)

MODEL_TYPES = ("opt",)

# OPT's positional table has two extra rows at the front: position p is row p + 2
# (a fairseq padding_idx convention kept by every checkpoint).
POSITION_OFFSET = 2

# torch's nn.LayerNorm default; OPT configs have no epsilon field.
_LAYER_NORM_EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class OPTConfig:
    """Architecture of an OPT model, read from a Hugging Face config.

    Absent keys take transformers' ``OPTConfig`` defaults (opt-125m's shape).

    Example:
        >>> from lora_jax.models import OPTConfig
        >>> cfg = OPTConfig.from_hf({"hidden_size": 64, "num_attention_heads": 4,
        ...     "word_embed_proj_dim": 32, "do_layer_norm_before": False})
        >>> cfg.head_dim, cfg.word_embed_proj_dim, cfg.final_layer_norm
        (16, 32, False)
    """

    vocab_size: int = 50272
    hidden_size: int = 768
    num_hidden_layers: int = 12
    ffn_dim: int = 3072
    num_attention_heads: int = 12
    max_position_embeddings: int = 2048
    word_embed_proj_dim: int = 768
    do_layer_norm_before: bool = True
    # The decoder's own final LayerNorm (pre-layer-norm models, unless removed).
    final_layer_norm: bool = True
    activation_function: str = "relu"
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02

    @classmethod
    def from_hf(cls, config: dict[str, Any]) -> OPTConfig:
        """Read a ``config.json`` dict of model_type opt.

        Example:
            >>> from lora_jax.models import OPTConfig
            >>> OPTConfig.from_hf({"activation_function": "swiglu"})
            Traceback (most recent call last):
            ...
            lora_jax.models.errors.UnsupportedModelError: unsupported activation 'swiglu'; supported: [...]
        """
        read = ConfigReader(config, "opt")
        hidden = read.int("hidden_size", 768)
        heads = read.int("num_attention_heads", 12)
        if hidden % heads:
            raise ModelLoadError(
                f"the opt config has hidden_size={hidden}, which num_attention_heads={heads} "
                "does not divide"
            )
        pre_norm = read.bool("do_layer_norm_before", True)
        act = read.str("activation_function", "relu")
        activation(act)  # an unsupported activation fails here, before any weights are read
        return cls(
            vocab_size=read.int("vocab_size", 50272),
            hidden_size=hidden,
            num_hidden_layers=read.int("num_hidden_layers", 12),
            ffn_dim=read.int("ffn_dim", 3072),
            num_attention_heads=heads,
            max_position_embeddings=read.int("max_position_embeddings", 2048),
            word_embed_proj_dim=read.int("word_embed_proj_dim", None) or hidden,
            do_layer_norm_before=pre_norm,
            # transformers keeps `_remove_final_layer_norm` for checkpoints fine-tuned
            # before v4.20.1 (metaseq PR 164).
            final_layer_norm=pre_norm and not read.bool("_remove_final_layer_norm", False),
            activation_function=act,
            enable_bias=read.bool("enable_bias", True),
            layer_norm_elementwise_affine=read.bool("layer_norm_elementwise_affine", True),
            tie_word_embeddings=read.bool("tie_word_embeddings", True),
            initializer_range=read.float("init_std", 0.02),
        )

    @property
    def head_dim(self) -> int:
        """Width of one attention head, ``hidden_size // num_attention_heads``.

        Example:
            >>> from lora_jax.models import OPTConfig
            >>> OPTConfig().head_dim
            64
        """
        return self.hidden_size // self.num_attention_heads

    @property
    def projects_embeddings(self) -> bool:
        """Whether ``project_in`` / ``project_out`` map between the embedding width and
        the hidden width (opt-350m).

        Example:
            >>> from lora_jax.models import OPTConfig
            >>> OPTConfig(word_embed_proj_dim=512, hidden_size=1024).projects_embeddings
            True
        """
        return self.word_embed_proj_dim != self.hidden_size

    @property
    def attention(self) -> AttentionConfig:
        """The self-attention of every layer: q/k/v/out_proj, biases with ``enable_bias``.

        Example:
            >>> from lora_jax.models import OPTConfig
            >>> OPTConfig().attention.names
            ('q_proj', 'k_proj', 'v_proj', 'out_proj')
        """
        return AttentionConfig(
            num_heads=self.num_attention_heads,
            num_kv_heads=self.num_attention_heads,
            head_dim=self.head_dim,
            features=self.hidden_size,
            qkv_bias=self.enable_bias,
            out_bias=self.enable_bias,
            names=("q_proj", "k_proj", "v_proj", "out_proj"),
            initializer_range=self.initializer_range,
        )


class OPTDecoderLayer(ConfigModule):
    """Attention then ``fc1`` / ``fc2``, each with a residual; LayerNorm before each
    (``do_layer_norm_before``) or after each residual sum (opt-350m).

    Called as ``layer(x, layer_cache, mask, index)``; returns ``(x, layer_cache)``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from lora_jax.models.opt import OPTConfig, OPTDecoderLayer
        >>> cfg = OPTConfig(hidden_size=16, ffn_dim=32, num_attention_heads=2)
        >>> (x, _), params = jax.eval_shape(OPTDecoderLayer(cfg).init_with_output,
        ...     jax.random.key(0), jnp.ones((1, 3, 16)), None, None, None)
        >>> x.shape, sorted(params["params"])
        ((1, 3, 16), ['fc1', 'fc2', 'final_layer_norm', 'self_attn', 'self_attn_layer_norm'])
    """

    config: OPTConfig

    def _norm(self, name: str) -> nn.LayerNorm:
        cfg = self.config
        return self.layer_norm(_LAYER_NORM_EPS, name, cfg.layer_norm_elementwise_affine)

    @nn.compact
    def __call__(self, x, layer_cache, mask, index):
        cfg = self.config
        pre = cfg.do_layer_norm_before
        h = self._norm("self_attn_layer_norm")(x) if pre else x
        h, layer_cache = SelfAttention(cfg.attention, name="self_attn", **self.kw)(
            h, mask, None, layer_cache, index
        )
        x = x + h
        if not pre:
            x = self._norm("self_attn_layer_norm")(x)
        h = self._norm("final_layer_norm")(x) if pre else x
        h = activation(cfg.activation_function)(self.dense(cfg.ffn_dim, "fc1", cfg.enable_bias)(h))
        x = x + self.dense(cfg.hidden_size, "fc2", cfg.enable_bias)(h)
        if not pre:
            x = self._norm("final_layer_norm")(x)
        return x, layer_cache


def positions_from_mask(attention_mask: jax.Array, query_slots: jax.Array) -> jax.Array:
    """transformers' OPT position ids: real tokens counted so far minus one (-1 on padding),
    at the slots ``query_slots`` of a mask over every key slot.

    Example:
        >>> import jax.numpy as jnp
        >>> from lora_jax.models.opt import positions_from_mask
        >>> positions_from_mask(jnp.array([[0, 0, 1, 1, 1]]), jnp.arange(5))
        Array([[-1, -1,  0,  1,  2]], dtype=int32)
    """
    mask = attention_mask.astype(jnp.int32)
    counted = jnp.cumsum(mask, axis=1) * mask - 1
    return jnp.take(counted, query_slots, axis=1)


class OPTDecoder(ConfigModule):
    """Embeddings, decoder layers, final norm and projections (transformers'
    ``OPTDecoder``); ``__call__`` returns ``(hidden, cache)`` (cache None without one).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from lora_jax.models.opt import OPTConfig, OPTDecoder
        >>> cfg = OPTConfig(hidden_size=16, ffn_dim=32, num_attention_heads=2, vocab_size=10,
        ...     num_hidden_layers=2, word_embed_proj_dim=8, max_position_embeddings=6)
        >>> (hidden, _), params = jax.eval_shape(OPTDecoder(cfg).init_with_output,
        ...     jax.random.key(0), jnp.zeros((1, 3), jnp.int32))
        >>> hidden.shape, params["params"]["embed_positions"]["embedding"].shape
        ((1, 3, 8), (8, 16))
    """

    config: OPTConfig
    scan_layers: bool = False
    remat: str = "none"

    def setup(self) -> None:
        cfg = self.config
        self.embed_tokens = self.embed(cfg.vocab_size, cfg.word_embed_proj_dim, None)
        self.embed_positions = self.embed(cfg.max_position_embeddings + POSITION_OFFSET,
                                          cfg.hidden_size, None)
        if cfg.projects_embeddings:
            self.project_in = self.dense(cfg.hidden_size, None, use_bias=False)
            self.project_out = self.dense(cfg.word_embed_proj_dim, None, use_bias=False)
        self.layers = layer_stack(OPTDecoderLayer, cfg, cfg.num_hidden_layers,
                                  scan=self.scan_layers, num_args=2, remat=self.remat, **self.kw)
        if cfg.final_layer_norm:
            self.final_layer_norm = self.layer_norm(_LAYER_NORM_EPS, None,
                                                    cfg.layer_norm_elementwise_affine)

    def __call__(self, input_ids, attention_mask=None, positions=None, cache=None):
        cfg = self.config
        query_slots, key_slots, default_positions = slots_and_positions(
            input_ids, positions, cache)
        if positions is None and attention_mask is not None:
            positions = positions_from_mask(attention_mask, query_slots)
        else:
            positions = default_positions
        x = self.embed_tokens(input_ids)
        if cfg.projects_embeddings:
            x = self.project_in(x)
        x = x + self.embed_positions(positions + POSITION_OFFSET)
        mask = make_attention_mask(query_slots, key_slots, attention_mask)
        index, layer_caches = split_cache(cache)
        x, new_layers = self.layers(x, layer_caches, mask, index)
        if cfg.final_layer_norm:
            x = self.final_layer_norm(x)
        if cfg.projects_embeddings:
            x = self.project_out(x)
        return x, next_cache(cache, new_layers, input_ids.shape[1])


class OPTModel(ConfigModule):
    """The ``model`` level of ``OPTForCausalLM``: holds the decoder (mirrors torch's
    ``OPTModel``); ``__call__`` is the decoder's.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from lora_jax.models.opt import OPTConfig, OPTModel
        >>> cfg = OPTConfig(hidden_size=16, ffn_dim=32, num_attention_heads=2, vocab_size=10,
        ...     num_hidden_layers=1, max_position_embeddings=8)
        >>> params = jax.eval_shape(OPTModel(cfg).init, jax.random.key(0),
        ...     jnp.zeros((1, 3), jnp.int32))
        >>> list(params["params"])
        ['decoder']
    """

    config: OPTConfig
    scan_layers: bool = False
    remat: str = "none"

    def setup(self) -> None:
        self.decoder = OPTDecoder(self.config, scan_layers=self.scan_layers, remat=self.remat,
                                  **self.kw)

    def __call__(self, input_ids, attention_mask=None, positions=None, cache=None):
        return self.decoder(input_ids, attention_mask, positions, cache)


class OPTForCausalLM(ConfigModule):
    """An OPT causal LM; same call convention as ``LlamaForCausalLM`` (float32 logits,
    ``(logits, cache)`` when a cache is passed). ``positions`` default to transformers'
    positions from ``attention_mask``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from lora_jax.models import OPTConfig, OPTForCausalLM
        >>> model = OPTForCausalLM(OPTConfig(hidden_size=32, ffn_dim=64, num_attention_heads=4,
        ...     num_hidden_layers=2, vocab_size=50, max_position_embeddings=16))
        >>> ids = jnp.zeros((1, 5), jnp.int32)
        >>> params = model.init(jax.random.key(0), ids)["params"]
        >>> model.apply({"params": params}, ids).shape, "lm_head" in params
        ((1, 5, 50), False)
    """

    config: OPTConfig
    scan_layers: bool = False
    remat: str = "none"

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, positions=None, cache=None,
                 return_hidden=False, labels=None):
        model = OPTModel(self.config, scan_layers=self.scan_layers, remat=self.remat, name="model",
                         **self.kw)
        hidden, new_cache = model(input_ids, attention_mask, positions, cache)
        out = output_head(hidden, model.decoder.embed_tokens, self.config,
                          param_dtype=self.param_dtype, dtype=self.dtype)
        out = causal_lm_output(out, return_hidden=return_hidden, labels=labels)
        return out if cache is None else (out, new_cache)

    def init_cache(self, batch_size: int, max_length: int, dtype: Dtype = None) -> dict:
        """A zeroed KV cache for ``batch_size`` rows of up to ``max_length`` tokens.

        Example:
            >>> from lora_jax.models import OPTConfig, OPTForCausalLM
            >>> model = OPTForCausalLM(OPTConfig(hidden_size=16, num_attention_heads=2,
            ...     num_hidden_layers=2), scan_layers=True)
            >>> model.init_cache(1, 8)["layers"]["k"].shape
            (2, 1, 8, 2, 8)
        """
        cfg = self.config
        return empty_kv_cache(cfg.num_hidden_layers, batch_size, max_length,
                              cfg.num_attention_heads, cfg.head_dim, dtype or self.dtype,
                              stacked=self.scan_layers)


def build(config: dict[str, Any], settings: BuildSettings) -> OPTForCausalLM:
    """The causal LM for a Hugging Face OPT config dict.

    Example:
        >>> from lora_jax.models import opt
        >>> from lora_jax.models.family import BuildSettings
        >>> opt.build({"model_type": "opt", "hidden_size": 16, "num_attention_heads": 2},
        ...           BuildSettings(scan_layers=True)).scan_layers
        True
    """
    return OPTForCausalLM(OPTConfig.from_hf(config), scan_layers=settings.scan_layers,
                          remat=settings.remat, **settings.dtypes)


FAMILY = ModelFamily(
    model_types=MODEL_TYPES,
    build=build,
    base_prefix="model.",
    architecture=lambda model_type, params: "OPTForCausalLM",
    scan_node=("model", "decoder", "layers"),
    ignored=re.compile(r"^lm_head\.weight$"),
)
