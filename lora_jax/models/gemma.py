"""Gemma 2 and Gemma 3 (text) decoders.

Param tree (mirrors transformers' ``Gemma2ForCausalLM`` / ``Gemma3ForCausalLM``)::

    model.embed_tokens.embedding                          (vocab, hidden)  also the tied head
    model.layers.<i>.input_layernorm.scale                (hidden,)
    model.layers.<i>.self_attn.{q,k,v,o}_proj.kernel      (in, out)  [+ bias: attention_bias]
    model.layers.<i>.self_attn.{q,k}_norm.scale           (head_dim,)  Gemma 3 only
    model.layers.<i>.post_attention_layernorm.scale       (hidden,)
    model.layers.<i>.pre_feedforward_layernorm.scale      (hidden,)
    model.layers.<i>.mlp.{gate,up,down}_proj.kernel       (in, out)
    model.layers.<i>.post_feedforward_layernorm.scale     (hidden,)
    model.norm.scale                                      (hidden,)
    lm_head.kernel                                        (hidden, vocab)  untied only

Every norm is Gemma's RMSNorm, ``x / rms(x) * (1 + scale)``, so a ``scale`` of zero is
the identity (and random init fills zeros). Embeddings are multiplied by
``sqrt(hidden_size)`` in the compute dtype; the MLP is GeGLU.

Layers alternate between sliding-window and global attention as ``layer_types`` says.
Gemma 2 soft-caps attention scores and final logits; Gemma 3 instead RMS-norms each
query and key head and gives sliding layers their own RoPE base
(``rope_local_base_freq``), global layers the config's (scaled) RoPE. With
``scan_layers=True`` the ``<i>`` level disappears and every leaf under ``model.layers``
gains a leading layer axis; each scanned layer gets its attention kind as a scanned
argument, so mixed sliding / global stacks scan too.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from .blocks import (
    MLP,
    AttentionConfig,
    ConfigModule,
    MLPConfig,
    PerLayer,
    SelfAttention,
    layer_stack,
)
from .errors import ModelLoadError, UnsupportedModelError
from .family import BuildSettings, ConfigReader, ModelFamily
from .layers import (
    SUPPORTED_ROPE_TYPES,
    Dtype,
    activation,
    causal_lm_output,
    empty_kv_cache,
    make_attention_mask,
    next_cache,
    output_head,
    rope_angles,
    rope_inverse_frequencies,
    slots_and_positions,
    split_cache,
)

# model_type -> the architecture save_pretrained writes.
ARCHITECTURES = {"gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}
MODEL_TYPES = tuple(ARCHITECTURES)

# Attention kinds, in the order of the stacked masks and RoPE tables a layer picks from.
LAYER_KINDS = ("full_attention", "sliding_attention")
FULL, SLIDING = 0, 1

REFUSED_MODEL_TYPES = {
    "gemma3": (
        "model_type 'gemma3' is the multimodal Gemma3ForConditionalGeneration (a vision "
        "tower beside the language model), which lora_jax.models does not implement; the "
        "text-only Gemma 3 (model_type 'gemma3_text', Gemma3ForCausalLM, e.g. gemma-3-1b) is "
        "supported"
    ),
}

# The scaling fields each rope type needs (rope_theta aside).
_ROPE_FIELDS = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}

Rope = tuple[tuple[str, Any], ...]  # RoPE settings as sorted (key, value) pairs: hashable


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
    """Architecture of a Gemma 2 or Gemma 3 text model, read from a Hugging Face config.

    Absent keys take the defaults of transformers' ``Gemma2Config`` /
    ``Gemma3TextConfig`` for that model type.

    Example:
        >>> from lora_jax.models import GemmaConfig
        >>> cfg = GemmaConfig.from_hf({"model_type": "gemma2", "hidden_size": 32,
        ...     "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
        ...     "num_key_value_heads": 2, "head_dim": 8, "vocab_size": 100})
        >>> cfg.layer_kinds, cfg.attention.softcap, cfg.final_logit_softcapping
        ((1, 0, 1), 50.0, 30.0)
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    # One entry per layer: an index into LAYER_KINDS.
    layer_kinds: tuple[int, ...]
    sliding_window: int | None = 4096
    rms_norm_eps: float = 1e-6
    hidden_activation: str = "gelu_pytorch_tanh"
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    query_pre_attn_scalar: float = 256.0
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    qk_norm: bool = False
    # RoPE of global (full-attention) and of sliding layers.
    global_rope: Rope = (("rope_theta", 10000.0), ("rope_type", "default"))
    local_rope: Rope = (("rope_theta", 10000.0), ("rope_type", "default"))
    initializer_range: float = 0.02

    @classmethod
    def from_hf(cls, config: dict[str, Any]) -> GemmaConfig:
        """Read a ``config.json`` dict of model_type gemma2 or gemma3_text.

        Example:
            >>> from lora_jax.models import GemmaConfig
            >>> cfg = GemmaConfig.from_hf({"model_type": "gemma3_text", "hidden_size": 32,
            ...     "intermediate_size": 64, "num_hidden_layers": 6, "num_attention_heads": 2,
            ...     "num_key_value_heads": 1, "head_dim": 16, "vocab_size": 100,
            ...     "rope_theta": 1e6, "rope_local_base_freq": 1e4,
            ...     "rope_scaling": {"rope_type": "linear", "factor": 8.0}})
            >>> cfg.layer_kinds, dict(cfg.global_rope), dict(cfg.local_rope)["rope_theta"]
            ((1, 1, 1, 1, 1, 0), {'factor': 8.0, 'rope_theta': 1000000.0, 'rope_type': 'linear'}, 10000.0)
        """
        model_type = config.get("model_type")
        if model_type not in MODEL_TYPES:
            raise UnsupportedModelError(
                f"GemmaConfig reads model_type {list(MODEL_TYPES)}, not {model_type!r}"
            )
        gemma3 = model_type == "gemma3_text"
        read = ConfigReader(config, model_type)
        heads = read.int("num_attention_heads", 8)
        kv_heads = read.int("num_key_value_heads", 4)
        if heads % kv_heads:
            raise ModelLoadError(
                f"the {model_type} config has num_attention_heads={heads}, which is not a "
                f"multiple of num_key_value_heads={kv_heads}"
            )
        if read.bool("use_bidirectional_attention", False):
            raise UnsupportedModelError(
                f"the {model_type} config has use_bidirectional_attention=true (an encoder such "
                "as EmbeddingGemma); lora_jax.models implements the causal decoder only"
            )
        layers = read.int("num_hidden_layers", 26)
        act = read.str("hidden_activation", None) or read.str("hidden_act", "gelu_pytorch_tanh")
        activation(act)  # an unsupported activation fails here, before any weights are read
        global_rope, local_rope = _gemma3_ropes(config) if gemma3 else (_flat_rope(config),) * 2
        return cls(
            model_type=model_type,
            vocab_size=read.int("vocab_size", 262_208 if gemma3 else 256_000),
            hidden_size=read.int("hidden_size", 2304),
            intermediate_size=read.int("intermediate_size", 9216),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=read.int("head_dim", 256),
            layer_kinds=_layer_kinds(config, model_type, layers),
            sliding_window=read.int("sliding_window", None),
            rms_norm_eps=read.float("rms_norm_eps", 1e-6),
            hidden_activation=act,
            tie_word_embeddings=read.bool("tie_word_embeddings", True),
            attention_bias=read.bool("attention_bias", False),
            query_pre_attn_scalar=read.float("query_pre_attn_scalar", 256.0),
            # transformers' Gemma 3 attention does not pass attn_logit_softcapping on, so
            # it has no effect there: read it for Gemma 2 only.
            attn_logit_softcapping=None if gemma3 else read.float("attn_logit_softcapping", 50.0),
            final_logit_softcapping=read.float("final_logit_softcapping",
                                               None if gemma3 else 30.0),
            qk_norm=gemma3,
            global_rope=global_rope,
            local_rope=local_rope,
            initializer_range=read.float("initializer_range", 0.02),
        )

    @property
    def attention(self) -> AttentionConfig:
        """The self-attention of every layer (the mask and RoPE are per layer kind).

        Example:
            >>> from lora_jax.models import GemmaConfig
            >>> cfg = GemmaConfig.from_hf({"model_type": "gemma3_text", "hidden_size": 32,
            ...     "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
            ...     "num_key_value_heads": 1, "head_dim": 16, "query_pre_attn_scalar": 16})
            >>> cfg.attention.scale, cfg.attention.qk_norm_eps, cfg.attention.softcap
            (0.25, 1e-06, None)
        """
        return AttentionConfig(
            num_heads=self.num_attention_heads,
            num_kv_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            features=self.hidden_size,
            qkv_bias=self.attention_bias,
            out_bias=self.attention_bias,
            scale=self.query_pre_attn_scalar**-0.5,
            initializer_range=self.initializer_range,
            softcap=self.attn_logit_softcapping,
            qk_norm_eps=self.rms_norm_eps if self.qk_norm else None,
            qk_norm_unit_offset=True,
        )

    @property
    def mlp(self) -> MLPConfig:
        """The GeGLU MLP of every layer.

        Example:
            >>> from lora_jax.models import GemmaConfig
            >>> GemmaConfig.from_hf({"model_type": "gemma2", "hidden_size": 32,
            ...     "num_attention_heads": 2, "num_key_value_heads": 1}).mlp.activation
            'gelu_pytorch_tanh'
        """
        return MLPConfig(self.intermediate_size, self.hidden_size, self.hidden_activation,
                         initializer_range=self.initializer_range)

    @property
    def ropes(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The RoPE settings of each of ``LAYER_KINDS`` (global, sliding).

        Example:
            >>> from lora_jax.models import GemmaConfig
            >>> cfg = GemmaConfig.from_hf({"model_type": "gemma3_text", "hidden_size": 32,
            ...     "num_attention_heads": 2, "num_key_value_heads": 1})
            >>> [rope["rope_theta"] for rope in cfg.ropes]
            [1000000.0, 10000.0]
        """
        return dict(self.global_rope), dict(self.local_rope)


def _rope(settings: dict[str, Any], where: str) -> Rope:
    """Checked RoPE settings (``type`` renamed ``rope_type``) as sorted pairs."""
    rope = dict(settings)
    rope_type = rope.pop("type", None)
    rope.setdefault("rope_type", rope_type or "default")
    if rope["rope_type"] not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"unsupported rope_type {rope['rope_type']!r} in the {where}; supported: "
            f"{list(SUPPORTED_ROPE_TYPES)}"
        )
    read = ConfigReader(rope, where)
    read.float("rope_theta")
    for key in _ROPE_FIELDS[rope["rope_type"]]:
        read.float(key)
    if read.float("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedModelError(f"partial_rotary_factor != 1 in the {where} is not supported")
    return tuple(sorted(rope.items()))


def _with_context(rope: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    if rope.get("rope_type", rope.get("type")) == "llama3":
        rope.setdefault("original_max_position_embeddings",
                        config.get("max_position_embeddings", 8192))
    return rope


def _flat_rope(config: dict[str, Any]) -> Rope:
    """Gemma 2's one RoPE: transformers-5 ``rope_parameters`` or older ``rope_theta`` +
    ``rope_scaling``."""
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    rope.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    return _rope(_with_context(rope, config), f"{config['model_type']} rope")


def _gemma3_ropes(config: dict[str, Any]) -> tuple[Rope, Rope]:
    """Gemma 3's global and local RoPE, as ``Gemma3TextConfig`` reads them: transformers-5
    ``rope_parameters`` per layer kind, else ``rope_theta`` (+ ``rope_scaling``) for global
    layers and ``rope_local_base_freq`` for sliding ones."""
    given = config.get("rope_parameters") or {}
    if not isinstance(given, dict):
        raise ModelLoadError(
            f"the gemma3_text config has rope_parameters={given!r}; expected an object"
        )
    full = dict(given.get("full_attention") or {"rope_type": "default"})
    if config.get("rope_scaling"):
        full.update(config["rope_scaling"])
    full.setdefault("rope_theta", config.get("rope_theta", 1_000_000.0))
    local = dict(given.get("sliding_attention") or {"rope_type": "default"})
    local.setdefault("rope_theta", config.get("rope_local_base_freq", 10_000.0))
    return (_rope(_with_context(full, config), "gemma3_text rope of full_attention layers"),
            _rope(_with_context(local, config), "gemma3_text rope of sliding_attention layers"))


def _layer_kinds(config: dict[str, Any], model_type: str, layers: int) -> tuple[int, ...]:
    """Index into LAYER_KINDS per layer, from ``layer_types`` or the sliding pattern
    (every ``pattern``-th layer global: 2 for Gemma 2, ``sliding_window_pattern`` or 6 for
    Gemma 3)."""
    types = config.get("layer_types")
    if types is None:
        pattern = 2
        if model_type == "gemma3_text":
            pattern = ConfigReader(config, model_type).int(
                "sliding_window_pattern", config.get("_sliding_window_pattern", 6))
        types = ["sliding_attention" if (i + 1) % pattern else "full_attention"
                 for i in range(layers)]
    if (not isinstance(types, list) or len(types) != layers
            or any(t not in LAYER_KINDS for t in types)):
        raise ModelLoadError(
            f"the {model_type} config has layer_types={types!r}; expected a list of "
            f"{layers} entries (num_hidden_layers), each one of {list(LAYER_KINDS)}"
        )
    return tuple(LAYER_KINDS.index(t) for t in types)


class GemmaDecoderLayer(ConfigModule):
    """Norms before and after both attention and MLP, each block with a residual.

    Called as ``layer(x, layer_cache, kind, ropes, masks, index)``: ``kind`` indexes
    ``LAYER_KINDS`` (a Python int unrolled, a traced scalar scanned), ``ropes`` is
    ``(cos, sin)`` and ``masks`` the attention masks, each stacked over the kinds; the
    layer takes its own. Returns ``(x, layer_cache)``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from lora_jax.models.gemma import GemmaConfig, GemmaDecoderLayer
        >>> cfg = GemmaConfig.from_hf({"model_type": "gemma2", "hidden_size": 16,
        ...     "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
        ...     "num_key_value_heads": 1, "head_dim": 8})
        >>> (x, _), params = jax.eval_shape(GemmaDecoderLayer(cfg).init_with_output,
        ...     jax.random.key(0), jnp.ones((1, 3, 16)), None, 0, None, None, None)
        >>> x.shape, sorted(params["params"])  # doctest: +NORMALIZE_WHITESPACE
        ((1, 3, 16), ['input_layernorm', 'mlp', 'post_attention_layernorm',
                      'post_feedforward_layernorm', 'pre_feedforward_layernorm', 'self_attn'])
    """

    config: GemmaConfig

    def _norm(self, name: str):
        return self.rms_norm(self.config.rms_norm_eps, name, unit_offset=True)

    @nn.compact
    def __call__(self, x, layer_cache, kind, ropes, masks, index):
        rope = None if ropes is None else (ropes[0][kind], ropes[1][kind])
        mask = None if masks is None else masks[kind]
        h = self._norm("input_layernorm")(x)
        h, layer_cache = SelfAttention(self.config.attention, name="self_attn", **self.kw)(
            h, mask, rope, layer_cache, index
        )
        x = x + self._norm("post_attention_layernorm")(h)
        h = MLP(self.config.mlp, name="mlp", **self.kw)(self._norm("pre_feedforward_layernorm")(x))
        x = x + self._norm("post_feedforward_layernorm")(h)
        return x, layer_cache


class GemmaModel(ConfigModule):
    """Scaled embeddings, decoder stack and final norm (transformers' ``Gemma2Model`` /
    ``Gemma3TextModel``); ``__call__`` returns ``(hidden, cache)`` (cache None without one).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from lora_jax.models.gemma import GemmaConfig, GemmaModel
        >>> cfg = GemmaConfig.from_hf({"model_type": "gemma3_text", "hidden_size": 16,
        ...     "intermediate_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2,
        ...     "num_key_value_heads": 1, "head_dim": 8, "vocab_size": 10})
        >>> (hidden, _), params = jax.eval_shape(GemmaModel(cfg, scan_layers=True).init_with_output,
        ...     jax.random.key(0), jnp.zeros((1, 3), jnp.int32))
        >>> hidden.shape, params["params"]["layers"]["self_attn"]["q_norm"]["scale"].shape
        ((1, 3, 16), (3, 8))
    """

    config: GemmaConfig
    scan_layers: bool = False
    remat: str = "none"

    def setup(self) -> None:
        cfg = self.config
        self.embed_tokens = self.embed(cfg.vocab_size, cfg.hidden_size, None)
        # Scanned, the stack itself is "layers", and the layer kinds are scanned with it.
        self.layers = layer_stack(GemmaDecoderLayer, cfg, cfg.num_hidden_layers,
                                  scan=self.scan_layers, num_args=4, scanned_args=[0],
                                  remat=self.remat, **self.kw)
        self.norm = self.rms_norm(cfg.rms_norm_eps, None, unit_offset=True)

    def __call__(self, input_ids, attention_mask=None, positions=None, cache=None):
        cfg = self.config
        query_slots, key_slots, positions = slots_and_positions(input_ids, positions, cache)
        x = self.embed_tokens(input_ids)
        # transformers multiplies by sqrt(hidden) rounded to the weights' dtype
        # (55.4256 becomes 55.5 in bfloat16): here the compute dtype.
        x = x * jnp.asarray(cfg.hidden_size**0.5, x.dtype)
        # RoPE tables and masks once per call, one per layer kind, shared by all layers.
        angles = [rope_angles(positions, rope_inverse_frequencies(cfg.head_dim, rope))
                  for rope in cfg.ropes]
        ropes = tuple(jnp.stack(parts) for parts in zip(*angles))
        windows = (None, cfg.sliding_window)
        masks = jnp.stack([
            make_attention_mask(query_slots, key_slots, attention_mask, sliding_window=w)
            for w in windows
        ])
        kinds = (jnp.asarray(cfg.layer_kinds, jnp.int32) if self.scan_layers
                 else PerLayer(cfg.layer_kinds))
        index, layer_caches = split_cache(cache)
        x, new_layers = self.layers(x, layer_caches, kinds, ropes, masks, index)
        return self.norm(x), next_cache(cache, new_layers, input_ids.shape[1])


class GemmaForCausalLM(ConfigModule):
    """A Gemma 2 / Gemma 3 text causal LM; same call convention as ``LlamaForCausalLM``
    (float32 logits, soft-capped when the config says so; ``(logits, cache)`` when a
    cache is passed).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from lora_jax.models import GemmaConfig, GemmaForCausalLM
        >>> cfg = GemmaConfig.from_hf({"model_type": "gemma2", "hidden_size": 32,
        ...     "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        ...     "num_key_value_heads": 2, "head_dim": 8, "vocab_size": 50})
        >>> model = GemmaForCausalLM(cfg)
        >>> ids = jnp.zeros((1, 5), jnp.int32)
        >>> params = model.init(jax.random.key(0), ids)["params"]
        >>> logits = model.apply({"params": params}, ids)
        >>> logits.shape, bool(abs(logits).max() < 30.0)  # final_logit_softcapping=30
        ((1, 5, 50), True)
    """

    config: GemmaConfig
    scan_layers: bool = False
    remat: str = "none"

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, positions=None, cache=None,
                 return_hidden=False, labels=None):
        model = GemmaModel(self.config, scan_layers=self.scan_layers, remat=self.remat,
                           name="model", **self.kw)
        hidden, new_cache = model(input_ids, attention_mask, positions, cache)
        out = output_head(hidden, model.embed_tokens, self.config, param_dtype=self.param_dtype,
                          dtype=self.dtype, softcap=self.config.final_logit_softcapping)
        out = causal_lm_output(out, return_hidden=return_hidden, labels=labels)
        return out if cache is None else (out, new_cache)

    def init_cache(self, batch_size: int, max_length: int, dtype: Dtype = None) -> dict:
        """A zeroed KV cache for ``batch_size`` rows of up to ``max_length`` tokens (every
        layer keeps all slots; sliding layers mask the old ones).

        Example:
            >>> from lora_jax.models import GemmaConfig, GemmaForCausalLM
            >>> cfg = GemmaConfig.from_hf({"model_type": "gemma2", "hidden_size": 16,
            ...     "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
            ...     "head_dim": 8})
            >>> GemmaForCausalLM(cfg).init_cache(1, 8)["layers"][0]["k"].shape
            (1, 8, 1, 8)
        """
        cfg = self.config
        return empty_kv_cache(cfg.num_hidden_layers, batch_size, max_length,
                              cfg.num_key_value_heads, cfg.head_dim, dtype or self.dtype,
                              stacked=self.scan_layers)


def build(config: dict[str, Any], settings: BuildSettings) -> GemmaForCausalLM:
    """The causal LM for a Hugging Face Gemma 2 / Gemma 3 text config dict.

    Example:
        >>> from lora_jax.models import gemma
        >>> from lora_jax.models.family import BuildSettings
        >>> gemma.build({"model_type": "gemma3_text", "hidden_size": 16,
        ...     "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1},
        ...     BuildSettings()).config.qk_norm
        True
    """
    return GemmaForCausalLM(GemmaConfig.from_hf(config), scan_layers=settings.scan_layers,
                            remat=settings.remat, **settings.dtypes)


FAMILY = ModelFamily(
    model_types=MODEL_TYPES,
    build=build,
    base_prefix="model.",
    architecture=lambda model_type, params: ARCHITECTURES[model_type],
    scan_node=("model", "layers"),
    ignored=re.compile(r".*rotary_emb\..*|.*embed_scale$|^lm_head\.weight$"),
    refused=REFUSED_MODEL_TYPES,
    norm_scale_fill=0.0,
)
