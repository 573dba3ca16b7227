"""BERT encoder, with pooled output and a sequence-classification head.

Param tree of ``BertModel`` (mirrors transformers' ``BertModel``)::

    embeddings.word_embeddings.embedding                      (vocab, hidden)
    embeddings.position_embeddings.embedding                  (max_positions, hidden)
    embeddings.token_type_embeddings.embedding                (type_vocab, hidden)
    embeddings.LayerNorm.{scale,bias}                         (hidden,)
    encoder.layer.<i>.attention.self.{query,key,value}.kernel (hidden, hidden)  + bias
    encoder.layer.<i>.attention.output.dense.kernel           (hidden, hidden)  + bias
    encoder.layer.<i>.attention.output.LayerNorm.{scale,bias} (hidden,)
    encoder.layer.<i>.intermediate.dense.kernel               (hidden, intermediate) + bias
    encoder.layer.<i>.output.dense.kernel                     (intermediate, hidden) + bias
    encoder.layer.<i>.output.LayerNorm.{scale,bias}           (hidden,)
    pooler.dense.kernel                                       (hidden, hidden)  + bias

``BertForSequenceClassification`` nests all of that under ``bert`` and adds
``classifier.kernel`` (hidden, num_labels) + bias. The models run in inference mode:
there is no dropout.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .layers import Dtype, activation, dense_init, dot_product_attention, make_attention_mask

MODEL_TYPES = ("bert",)


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Architecture of a BERT model, read from a Hugging Face config.

    Example:
        >>> BertConfig.from_hf({"hidden_size": 32, "num_attention_heads": 4,
        ...     "num_hidden_layers": 2, "intermediate_size": 64, "vocab_size": 99}).num_labels
        2
    """

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    num_labels: int = 2
    add_pooling_layer: bool = True
    initializer_range: float = 0.02

    @classmethod
    def from_hf(cls, config: dict[str, Any], add_pooling_layer: bool = True) -> BertConfig:
        """Read a ``config.json`` dict of model_type bert."""
        position_type = config.get("position_embedding_type", "absolute")
        if position_type != "absolute":
            raise ValueError(
                f"unsupported position_embedding_type {position_type!r}; supported: ['absolute']"
            )
        id2label = config.get("id2label")
        num_labels = len(id2label) if id2label else int(config.get("num_labels", 2))
        return cls(
            vocab_size=int(config["vocab_size"]),
            hidden_size=int(config["hidden_size"]),
            num_hidden_layers=int(config["num_hidden_layers"]),
            num_attention_heads=int(config["num_attention_heads"]),
            intermediate_size=int(config["intermediate_size"]),
            max_position_embeddings=int(config.get("max_position_embeddings", 512)),
            type_vocab_size=int(config.get("type_vocab_size", 2)),
            hidden_act=config.get("hidden_act", "gelu"),
            layer_norm_eps=float(config.get("layer_norm_eps", 1e-12)),
            num_labels=num_labels,
            add_pooling_layer=add_pooling_layer,
            initializer_range=float(config.get("initializer_range", 0.02)),
        )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


class BertModelOutput(NamedTuple):
    """``last_hidden_state`` (batch, seq, hidden); ``pooler_output`` (batch, hidden) or
    None for a model without a pooler."""

    last_hidden_state: jax.Array
    pooler_output: jax.Array | None


def _dense(cfg: BertConfig, features: int, name: str, dtype, param_dtype) -> nn.Dense:
    return nn.Dense(
        features,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=dense_init(cfg.initializer_range),
        name=name,
    )


def _layer_norm(cfg: BertConfig, dtype, param_dtype, name: str = "LayerNorm") -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=cfg.layer_norm_eps,
        use_fast_variance=False,
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
    )


class BertEmbeddings(nn.Module):
    """Word + position + token-type embeddings, then LayerNorm."""

    config: BertConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids, token_type_ids, positions):
        cfg = self.config
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        init = dense_init(cfg.initializer_range)
        x = nn.Embed(
            cfg.vocab_size, cfg.hidden_size, embedding_init=init, name="word_embeddings", **kw
        )(input_ids)
        x = x + nn.Embed(
            cfg.max_position_embeddings,
            cfg.hidden_size,
            embedding_init=init,
            name="position_embeddings",
            **kw,
        )(positions)
        x = x + nn.Embed(
            cfg.type_vocab_size,
            cfg.hidden_size,
            embedding_init=init,
            name="token_type_embeddings",
            **kw,
        )(token_type_ids)
        return _layer_norm(cfg, **kw)(x)


class BertSelfAttention(nn.Module):
    """Bidirectional multi-head attention over the unpadded tokens."""

    config: BertConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask):
        cfg = self.config
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        batch, seq, _ = x.shape
        shape = (batch, seq, cfg.num_attention_heads, cfg.head_dim)
        q = _dense(cfg, cfg.hidden_size, "query", **kw)(x).reshape(shape)
        k = _dense(cfg, cfg.hidden_size, "key", **kw)(x).reshape(shape)
        v = _dense(cfg, cfg.hidden_size, "value", **kw)(x).reshape(shape)
        return dot_product_attention(q, k, v, mask, scale=cfg.head_dim**-0.5)


class BertResidualOutput(nn.Module):
    """``LayerNorm(dense(h) + residual)``: transformers' ``BertSelfOutput`` / ``BertOutput``."""

    config: BertConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, h, residual):
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        h = _dense(self.config, self.config.hidden_size, "dense", **kw)(h)
        return _layer_norm(self.config, **kw)(h + residual)


class BertLayer(nn.Module):
    """Post-norm encoder layer: attention, then the feed-forward block."""

    config: BertConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask):
        cfg = self.config
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        attention = _BertAttention(cfg, name="attention", **kw)
        x = attention(x, mask)
        h = _BertIntermediate(cfg, name="intermediate", **kw)(x)
        return BertResidualOutput(cfg, name="output", **kw)(h, x)


class _BertAttention(nn.Module):
    """``attention.self`` + ``attention.output``."""

    config: BertConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask):
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        h = BertSelfAttention(self.config, name="self", **kw)(x, mask)
        return BertResidualOutput(self.config, name="output", **kw)(h, x)


class _BertIntermediate(nn.Module):
    """``act(dense(x))`` into the intermediate width."""

    config: BertConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        h = _dense(self.config, self.config.intermediate_size, "dense", **kw)(x)
        return activation(self.config.hidden_act)(h)


class _BertLayers(nn.Module):
    """The layer stack, named ``layer``, with children ``"0"``, ``"1"``, ..."""

    config: BertConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask):
        for i in range(self.config.num_hidden_layers):
            x = BertLayer(self.config, dtype=self.dtype, param_dtype=self.param_dtype, name=str(i))(
                x, mask
            )
        return x


class _BertEncoder(nn.Module):
    config: BertConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask):
        return _BertLayers(
            self.config, dtype=self.dtype, param_dtype=self.param_dtype, name="layer"
        )(x, mask)


class _BertPooler(nn.Module):
    """``tanh(dense(h[:, 0]))``: the [CLS] token's hidden state, transformed."""

    config: BertConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, h):
        dense = _dense(self.config, self.config.hidden_size, "dense", self.dtype, self.param_dtype)
        return jnp.tanh(dense(h[:, 0]))


class BertModel(nn.Module):
    """BERT encoder; ``__call__`` returns ``BertModelOutput(last_hidden_state, pooler_output)``.

    Args of ``__call__``:
        input_ids: (batch, seq) token ids.
        attention_mask: (batch, seq), 1 for real tokens, 0 for padding; None = all real.
        token_type_ids: (batch, seq) segment ids; default zeros.
        positions: (batch, seq) position ids; default ``arange(seq)``.

    Example:
        >>> model = BertModel(BertConfig.from_hf({"hidden_size": 32, "num_attention_heads": 4,
        ...     "num_hidden_layers": 2, "intermediate_size": 64, "vocab_size": 99}))
        >>> ids = jnp.zeros((1, 5), jnp.int32)
        >>> params = model.init(jax.random.key(0), ids)["params"]
        >>> model.apply({"params": params}, ids).pooler_output.shape
        (1, 32)
    """

    config: BertConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, positions=None):
        cfg = self.config
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        batch, seq = input_ids.shape
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        slots = jnp.arange(seq, dtype=jnp.int32)
        if positions is None:
            positions = jnp.broadcast_to(slots[None], (batch, seq))
        x = BertEmbeddings(cfg, name="embeddings", **kw)(input_ids, token_type_ids, positions)
        mask = make_attention_mask(slots, slots, attention_mask, causal=False)
        x = _BertEncoder(cfg, name="encoder", **kw)(x, mask)
        pooled = _BertPooler(cfg, name="pooler", **kw)(x) if cfg.add_pooling_layer else None
        return BertModelOutput(x, pooled)


class BertForSequenceClassification(nn.Module):
    """BERT + a linear classifier on the pooled output; ``__call__`` returns float32
    logits (batch, num_labels). Same arguments as ``BertModel``.

    Example:
        >>> model = BertForSequenceClassification(BertConfig.from_hf({"hidden_size": 32,
        ...     "num_attention_heads": 4, "num_hidden_layers": 1, "intermediate_size": 64,
        ...     "vocab_size": 99, "num_labels": 3}))
        >>> ids = jnp.zeros((2, 5), jnp.int32)
        >>> params = model.init(jax.random.key(0), ids)["params"]
        >>> model.apply({"params": params}, ids).shape
        (2, 3)
    """

    config: BertConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, positions=None):
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        out = BertModel(self.config, name="bert", **kw)(
            input_ids, attention_mask, token_type_ids, positions
        )
        logits = _dense(self.config, self.config.num_labels, "classifier", **kw)(out.pooler_output)
        return logits.astype(jnp.float32)


def build(
    config: dict[str, Any],
    *,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    scan_layers: bool = False,
    architecture: str | None = None,
    add_pooling_layer: bool = True,
) -> BertModel | BertForSequenceClassification:
    """The module for a Hugging Face BERT config dict.

    ``architecture`` "BertForSequenceClassification" gives the classifier; anything else
    the bare encoder (``BertModel``).
    """
    if scan_layers:
        raise NotImplementedError("scan_layers=True is implemented for the Llama family only")
    if architecture == "BertForSequenceClassification":
        return BertForSequenceClassification(
            BertConfig.from_hf(config), dtype=dtype, param_dtype=param_dtype
        )
    return BertModel(
        BertConfig.from_hf(config, add_pooling_layer), dtype=dtype, param_dtype=param_dtype
    )


def dummy_inputs() -> tuple[np.ndarray]:
    """Inputs that ``module.init`` / ``jax.eval_shape`` can trace the model with."""
    return (np.zeros((1, 1), np.int32),)
