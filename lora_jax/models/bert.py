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
import re
from collections.abc import Collection
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from .blocks import AttentionConfig, ConfigModule, SelfAttention, layer_stack
from .errors import ModelLoadError, UnsupportedModelError
from .family import BuildSettings, ConfigReader, ModelFamily
from .layers import activation, causal_mask

MODEL_TYPES = ("bert",)


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Architecture of a BERT model, read from a Hugging Face config.

    Example:
        >>> from lora_jax.models import BertConfig
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
        """Read a ``config.json`` dict of model_type bert.

        Example:
            >>> from lora_jax.models import BertConfig
            >>> BertConfig.from_hf({"hidden_size": 32, "num_attention_heads": 4,
            ...     "num_hidden_layers": 1, "intermediate_size": 64, "vocab_size": 99,
            ...     "id2label": {"0": "no", "1": "maybe", "2": "yes"}}).num_labels
            3
        """
        read = ConfigReader(config, "bert")
        position_type = read.str("position_embedding_type", "absolute")
        if position_type != "absolute":
            raise UnsupportedModelError(
                f"unsupported position_embedding_type {position_type!r}; supported: ['absolute']"
            )
        hidden, heads = read.int("hidden_size"), read.int("num_attention_heads")
        if hidden % heads:
            raise ModelLoadError(
                f"the bert config has hidden_size={hidden}, which num_attention_heads={heads} "
                "does not divide"
            )
        id2label = config.get("id2label")
        num_labels = len(id2label) if id2label else read.int("num_labels", 2)
        return cls(
            vocab_size=read.int("vocab_size"),
            hidden_size=hidden,
            num_hidden_layers=read.int("num_hidden_layers"),
            num_attention_heads=heads,
            intermediate_size=read.int("intermediate_size"),
            max_position_embeddings=read.int("max_position_embeddings", 512),
            type_vocab_size=read.int("type_vocab_size", 2),
            hidden_act=read.str("hidden_act", "gelu"),
            layer_norm_eps=read.float("layer_norm_eps", 1e-12),
            num_labels=num_labels,
            add_pooling_layer=add_pooling_layer,
            initializer_range=read.float("initializer_range", 0.02),
        )

    @property
    def head_dim(self) -> int:
        """Width of one attention head, ``hidden_size // num_attention_heads``.

        Example:
            >>> from lora_jax.models import BertConfig
            >>> BertConfig.from_hf({"hidden_size": 32, "num_attention_heads": 4,
            ...     "num_hidden_layers": 1, "intermediate_size": 64, "vocab_size": 99}).head_dim
            8
        """
        return self.hidden_size // self.num_attention_heads

    @property
    def attention(self) -> AttentionConfig:
        """``attention.self``: query/key/value with biases; the output projection is
        ``attention.output.dense`` (:class:`BertResidualOutput`).

        Example:
            >>> from lora_jax.models import BertConfig
            >>> BertConfig.from_hf({"hidden_size": 32, "num_attention_heads": 4,
            ...     "num_hidden_layers": 1, "intermediate_size": 64,
            ...     "vocab_size": 99}).attention.names[:3]
            ('query', 'key', 'value')
        """
        return AttentionConfig(
            num_heads=self.num_attention_heads,
            num_kv_heads=self.num_attention_heads,
            head_dim=self.head_dim,
            features=None,
            qkv_bias=True,
            names=("query", "key", "value", ""),
            initializer_range=self.initializer_range,
        )


class BertModelOutput(NamedTuple):
    """``last_hidden_state`` (batch, seq, hidden); ``pooler_output`` (batch, hidden) or
    None for a model without a pooler.

    Example:
        >>> import jax.numpy as jnp
        >>> from lora_jax.models import BertModelOutput
        >>> BertModelOutput(jnp.zeros((1, 3, 8)), None).pooler_output is None
        True
    """

    last_hidden_state: jax.Array
    pooler_output: jax.Array | None


class BertEmbeddings(ConfigModule):
    """Word + position + token-type embeddings, then LayerNorm.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from lora_jax.models.bert import BertConfig, BertEmbeddings
        >>> cfg = BertConfig.from_hf({"hidden_size": 8, "num_attention_heads": 2,
        ...     "num_hidden_layers": 1, "intermediate_size": 16, "vocab_size": 20})
        >>> ids = jnp.zeros((1, 3), jnp.int32)
        >>> x, params = jax.eval_shape(BertEmbeddings(cfg).init_with_output,
        ...                            jax.random.key(0), ids, ids, ids)
        >>> x.shape, sorted(params["params"])  # doctest: +NORMALIZE_WHITESPACE
        ((1, 3, 8), ['LayerNorm', 'position_embeddings', 'token_type_embeddings',
                     'word_embeddings'])
    """

    config: BertConfig

    @nn.compact
    def __call__(self, input_ids, token_type_ids, positions):
        cfg = self.config
        x = self.embed(cfg.vocab_size, cfg.hidden_size, "word_embeddings")(input_ids)
        x = x + self.embed(cfg.max_position_embeddings, cfg.hidden_size,
                           "position_embeddings")(positions)
        x = x + self.embed(cfg.type_vocab_size, cfg.hidden_size,
                           "token_type_embeddings")(token_type_ids)
        return self.layer_norm(cfg.layer_norm_eps, "LayerNorm")(x)


class BertResidualOutput(ConfigModule):
    """``LayerNorm(dense(h) + residual)``: transformers' ``BertSelfOutput`` / ``BertOutput``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from lora_jax.models.bert import BertConfig, BertResidualOutput
        >>> cfg = BertConfig.from_hf({"hidden_size": 8, "num_attention_heads": 2,
        ...     "num_hidden_layers": 1, "intermediate_size": 16, "vocab_size": 20})
        >>> h = jnp.ones((1, 3, 16))
        >>> out, params = jax.eval_shape(BertResidualOutput(cfg).init_with_output,
        ...     jax.random.key(0), h, jnp.ones((1, 3, 8)))
        >>> out.shape, params["params"]["dense"]["kernel"].shape
        ((1, 3, 8), (16, 8))
    """

    config: BertConfig

    @nn.compact
    def __call__(self, h, residual):
        h = self.dense(self.config.hidden_size, "dense")(h)
        return self.layer_norm(self.config.layer_norm_eps, "LayerNorm")(h + residual)


class BertLayer(ConfigModule):
    """Post-norm encoder layer: attention, then the feed-forward block.

    Called as ``layer(x, layer_cache, mask)`` like a decoder layer of
    :func:`~lora_jax.models.blocks.layer_stack`; an encoder has no KV cache, so
    ``layer_cache`` is None and comes back as it went in.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from lora_jax.models.bert import BertConfig, BertLayer
        >>> cfg = BertConfig.from_hf({"hidden_size": 8, "num_attention_heads": 2,
        ...     "num_hidden_layers": 1, "intermediate_size": 16, "vocab_size": 20})
        >>> (x, _), params = jax.eval_shape(BertLayer(cfg).init_with_output,
        ...     jax.random.key(0), jnp.ones((1, 3, 8)), None, None)
        >>> x.shape, sorted(params["params"])
        ((1, 3, 8), ['attention', 'intermediate', 'output'])
    """

    config: BertConfig

    @nn.compact
    def __call__(self, x, layer_cache, mask):
        x = _BertAttention(self.config, name="attention", **self.kw)(x, mask)
        h = _BertIntermediate(self.config, name="intermediate", **self.kw)(x)
        return BertResidualOutput(self.config, name="output", **self.kw)(h, x), layer_cache


class _BertAttention(ConfigModule):
    """``attention.self`` + ``attention.output``."""

    config: BertConfig

    @nn.compact
    def __call__(self, x, mask):
        h, _ = SelfAttention(self.config.attention, name="self", **self.kw)(x, mask)
        return BertResidualOutput(self.config, name="output", **self.kw)(h, x)


class _BertIntermediate(ConfigModule):
    """``act(dense(x))`` into the intermediate width."""

    config: BertConfig

    @nn.compact
    def __call__(self, x):
        h = self.dense(self.config.intermediate_size, "dense")(x)
        return activation(self.config.hidden_act)(h)


class _BertEncoder(ConfigModule):
    """``encoder.layer.<i>``: the unrolled layer stack."""

    config: BertConfig
    remat: str = "none"

    @nn.compact
    def __call__(self, x, mask):
        layers = layer_stack(BertLayer, self.config, self.config.num_hidden_layers, scan=False,
                             num_args=1, name="layer", remat=self.remat, **self.kw)
        return layers(x, None, mask)[0]


class _BertPooler(ConfigModule):
    """``tanh(dense(h[:, 0]))``: the [CLS] token's hidden state, transformed."""

    config: BertConfig

    @nn.compact
    def __call__(self, h):
        return jnp.tanh(self.dense(self.config.hidden_size, "dense")(h[:, 0]))


class BertModel(ConfigModule):
    """BERT encoder; ``__call__`` returns ``BertModelOutput(last_hidden_state, pooler_output)``.

    Args of ``__call__``:
        input_ids: (batch, seq) token ids.
        attention_mask: (batch, seq), 1 for real tokens, 0 for padding; None = all real.
        token_type_ids: (batch, seq) segment ids; default zeros.
        positions: (batch, seq) position ids; default ``arange(seq)``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from lora_jax.models import BertConfig, BertModel
        >>> model = BertModel(BertConfig.from_hf({"hidden_size": 32, "num_attention_heads": 4,
        ...     "num_hidden_layers": 2, "intermediate_size": 64, "vocab_size": 99}))
        >>> ids = jnp.zeros((1, 5), jnp.int32)
        >>> params = model.init(jax.random.key(0), ids)["params"]
        >>> model.apply({"params": params}, ids).pooler_output.shape
        (1, 32)
    """

    config: BertConfig
    remat: str = "none"

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, positions=None):
        cfg = self.config
        batch, seq = input_ids.shape
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        slots = jnp.arange(seq, dtype=jnp.int32)
        if positions is None:
            positions = jnp.broadcast_to(slots[None], (batch, seq))
        x = BertEmbeddings(cfg, name="embeddings", **self.kw)(input_ids, token_type_ids, positions)
        mask = causal_mask(attention_mask, causal=False)
        x = _BertEncoder(cfg, remat=self.remat, name="encoder", **self.kw)(x, mask)
        pooled = _BertPooler(cfg, name="pooler", **self.kw)(x) if cfg.add_pooling_layer else None
        return BertModelOutput(x, pooled)


class BertForSequenceClassification(ConfigModule):
    """BERT + a linear classifier on the pooled output; ``__call__`` returns float32
    logits (batch, num_labels). Same arguments as ``BertModel``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from lora_jax.models import BertConfig, BertForSequenceClassification
        >>> model = BertForSequenceClassification(BertConfig.from_hf({"hidden_size": 32,
        ...     "num_attention_heads": 4, "num_hidden_layers": 1, "intermediate_size": 64,
        ...     "vocab_size": 99, "num_labels": 3}))
        >>> ids = jnp.zeros((2, 5), jnp.int32)
        >>> params = model.init(jax.random.key(0), ids)["params"]
        >>> model.apply({"params": params}, ids).shape
        (2, 3)
    """

    config: BertConfig
    remat: str = "none"

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, positions=None):
        out = BertModel(self.config, remat=self.remat, name="bert", **self.kw)(
            input_ids, attention_mask, token_type_ids, positions
        )
        logits = self.dense(self.config.num_labels, "classifier")(out.pooler_output)
        return logits.astype(jnp.float32)


def build(config: dict[str, Any], settings: BuildSettings, *,
          add_pooling_layer: bool = True) -> BertModel | BertForSequenceClassification:
    """The module for a Hugging Face BERT config dict.

    ``settings.architecture`` "BertForSequenceClassification" gives the classifier;
    anything else the bare encoder (``BertModel``), with a pooler if
    ``add_pooling_layer``.

    Example:
        >>> from lora_jax.models import bert
        >>> from lora_jax.models.family import BuildSettings
        >>> config = {"hidden_size": 8, "num_attention_heads": 2, "num_hidden_layers": 1,
        ...     "intermediate_size": 16, "vocab_size": 20}
        >>> settings = BuildSettings(architecture="BertForSequenceClassification")
        >>> type(bert.build(config, settings)).__name__
        'BertForSequenceClassification'
    """
    if settings.scan_layers:
        raise NotImplementedError("scan_layers=True is implemented for the Llama family only")
    if settings.architecture == "BertForSequenceClassification":
        return BertForSequenceClassification(BertConfig.from_hf(config), remat=settings.remat,
                                             **settings.dtypes)
    return BertModel(BertConfig.from_hf(config, add_pooling_layer), remat=settings.remat,
                     **settings.dtypes)


def _architecture(model_type: str, params: Any) -> str:
    return "BertForSequenceClassification" if "classifier" in params else "BertModel"


def _pooling_option(tensor_names: Collection[str]) -> dict[str, Any]:
    # Checkpoints of BERT heads other than the classifier may lack the pooler.
    pooler = {"pooler.dense.weight", "bert.pooler.dense.weight"}
    return {"add_pooling_layer": bool(pooler & set(tensor_names))}


FAMILY = ModelFamily(
    model_types=MODEL_TYPES,
    build=build,
    base_prefix="bert.",
    architecture=_architecture,
    ignored=re.compile(r".*position_ids$|^cls\..*"),
    build_options=_pooling_option,
)
