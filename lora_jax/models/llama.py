"""Llama-family decoders: Llama 2/3, SmolLM2, Mistral, Qwen2.

Param tree (mirrors transformers' ``LlamaForCausalLM`` module names)::

    model.embed_tokens.embedding                      (vocab, hidden)
    model.layers.<i>.input_layernorm.scale            (hidden,)
    model.layers.<i>.self_attn.{q,k,v,o}_proj.kernel  (in, out)   [+ bias: Qwen2 q/k/v,
                                                                   Llama attention_bias]
    model.layers.<i>.post_attention_layernorm.scale   (hidden,)
    model.layers.<i>.mlp.{gate,up,down}_proj.kernel   (in, out)   [+ bias: mlp_bias]
    model.norm.scale                                  (hidden,)
    lm_head.kernel                                    (hidden, vocab)  untied only

With ``scan_layers=True`` the ``<i>`` level disappears and every leaf under
``model.layers`` gains a leading layer axis, e.g. ``model.layers.self_attn.q_proj.kernel``
of shape (num_layers, hidden, heads * head_dim).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, ClassVar

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
    RMSNorm,
    causal_lm_output,
    causal_mask,
    dense_init,
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
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
MODEL_TYPES = tuple(ARCHITECTURES)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture of a Llama-family model, read from a Hugging Face config.

    Hashable, so modules holding it can be static arguments of ``jax.jit``.

    Example:
        >>> from lora_jax.models import LlamaConfig
        >>> cfg = LlamaConfig.from_hf({"model_type": "llama", "hidden_size": 64,
        ...     "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        ...     "vocab_size": 100})
        >>> cfg.head_dim, cfg.num_key_value_heads
        (16, 4)
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    # One entry per layer: None for full attention, else the window length.
    sliding_windows: tuple[int | None, ...] = ()
    # The RoPE settings as sorted (key, value) pairs, to stay hashable.
    rope: tuple[tuple[str, Any], ...] = (("rope_theta", 10000.0), ("rope_type", "default"))
    initializer_range: float = 0.02

    @classmethod
    def from_hf(cls, config: dict[str, Any]) -> LlamaConfig:
        """Read a ``config.json`` dict of model_type llama, mistral or qwen2.

        Example:
            >>> from lora_jax.models.llama import LlamaConfig
            >>> LlamaConfig.from_hf({"model_type": "qwen2", "hidden_size": 64,
            ...     "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            ...     "vocab_size": 100}).qkv_bias
            True
        """
        model_type = config.get("model_type", "llama")
        read = ConfigReader(config, model_type)
        heads = read.int("num_attention_heads")
        hidden = read.int("hidden_size")
        layers = read.int("num_hidden_layers")
        kv_heads = read.int("num_key_value_heads", None) or heads
        head_dim = read.int("head_dim", None)
        if head_dim is None:
            if hidden % heads:
                raise ModelLoadError(
                    f"the {model_type} config has hidden_size={hidden}, which "
                    f"num_attention_heads={heads} does not divide; give head_dim explicitly"
                )
            head_dim = hidden // heads
        if heads % kv_heads:
            raise ModelLoadError(
                f"the {model_type} config has num_attention_heads={heads}, which is not a "
                f"multiple of num_key_value_heads={kv_heads}"
            )
        if model_type == "qwen2":
            qkv_bias, o_bias, mlp_bias = True, False, False
        elif model_type == "mistral":
            qkv_bias, o_bias, mlp_bias = False, False, False
        else:
            attention_bias = read.bool("attention_bias", False)
            qkv_bias, o_bias = attention_bias, attention_bias
            mlp_bias = read.bool("mlp_bias", False)
        return cls(
            vocab_size=read.int("vocab_size"),
            hidden_size=hidden,
            intermediate_size=read.int("intermediate_size"),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=read.float("rms_norm_eps", 1e-6),
            hidden_act=read.str("hidden_act", "silu"),
            tie_word_embeddings=read.bool("tie_word_embeddings", False),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=mlp_bias,
            sliding_windows=sliding_windows(config, model_type, layers),
            rope=tuple(sorted(_rope_parameters(config).items())),
            initializer_range=read.float("initializer_range", 0.02),
        )

    @property
    def attention(self) -> AttentionConfig:
        """The self-attention block of every layer.

        Example:
            >>> from lora_jax.models import LlamaConfig
            >>> LlamaConfig.from_hf({"hidden_size": 64, "intermediate_size": 128,
            ...     "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2,
            ...     "vocab_size": 100}).attention.num_kv_heads
            2
        """
        return AttentionConfig(
            num_heads=self.num_attention_heads,
            num_kv_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            features=self.hidden_size,
            qkv_bias=self.qkv_bias,
            out_bias=self.o_bias,
            initializer_range=self.initializer_range,
        )

    @property
    def mlp(self) -> MLPConfig:
        """The gated MLP of every layer.

        Example:
            >>> from lora_jax.models import LlamaConfig
            >>> LlamaConfig.from_hf({"hidden_size": 64, "intermediate_size": 128,
            ...     "num_hidden_layers": 2, "num_attention_heads": 8, "vocab_size": 100,
            ...     "mlp_bias": True}).mlp.use_bias
            True
        """
        return MLPConfig(self.intermediate_size, self.hidden_size, self.hidden_act,
                         use_bias=self.mlp_bias, initializer_range=self.initializer_range)


def _rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """RoPE settings from either transformers-5 ``rope_parameters`` or older
    ``rope_theta`` + ``rope_scaling`` fields."""
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    rope.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    rope_type = rope.pop("type", None)
    rope.setdefault("rope_type", rope_type or "default")
    if rope["rope_type"] == "llama3":
        rope.setdefault(
            "original_max_position_embeddings", config.get("max_position_embeddings", 8192)
        )
    if rope["rope_type"] not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"unsupported rope_type {rope['rope_type']!r}; supported: {list(SUPPORTED_ROPE_TYPES)}"
        )
    read = ConfigReader(rope, f"{config.get('model_type', 'llama')} rope")
    read.float("rope_theta")
    for key in _ROPE_FIELDS[rope["rope_type"]]:
        read.float(key)
    if read.float("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedModelError(
            "partial_rotary_factor != 1 is not supported by the Llama family"
        )
    return rope


# The scaling fields each rope type needs (rope_theta aside).
_ROPE_FIELDS = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def sliding_windows(config: dict[str, Any], model_type: str, layers: int) -> tuple:
    """Each layer's attention window (None = full attention) as the config of
    ``model_type`` defines it: Mistral's in every layer, Qwen2/Qwen3's from
    ``use_sliding_window`` and ``layer_types`` (or ``max_window_layers``), else none.

    Example:
        >>> from lora_jax.models.llama import sliding_windows
        >>> sliding_windows({"use_sliding_window": True, "sliding_window": 8,
        ...                  "max_window_layers": 1}, "qwen3", 3)
        (None, 8, 8)
    """
    if model_type == "mistral":
        # MistralConfig defaults to a 4096 window when the key is absent.
        window = config.get("sliding_window", 4096)
        return (int(window) if window else None,) * layers
    if model_type in ("qwen2", "qwen3"):
        window = config.get("sliding_window")
        if not config.get("use_sliding_window", False) or not window:
            return (None,) * layers
        layer_types = config.get("layer_types")
        if layer_types is None:
            first = int(config.get("max_window_layers", layers))
            layer_types = ["sliding_attention" if i >= first else "full" for i in range(layers)]
        return tuple(int(window) if t == "sliding_attention" else None for t in layer_types)
    return (None,) * layers


class LlamaDecoderLayer(ConfigModule):
    """Pre-norm block: attention and MLP, each with a residual connection.

    Called as ``layer(x, layer_cache, rope, mask, index)`` (the argument order of
    :func:`~lora_jax.models.blocks.layer_stack`); returns ``(x, layer_cache)``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from lora_jax.models.llama import LlamaConfig, LlamaDecoderLayer
        >>> cfg = LlamaConfig.from_hf({"hidden_size": 16, "intermediate_size": 32,
        ...     "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 10})
        >>> (x, _), params = jax.eval_shape(LlamaDecoderLayer(cfg).init_with_output,
        ...     jax.random.key(0), jnp.ones((1, 3, 16)), None, None, None, None)
        >>> x.shape, sorted(params["params"])
        ((1, 3, 16), ['input_layernorm', 'mlp', 'post_attention_layernorm', 'self_attn'])
    """

    config: LlamaConfig

    @nn.compact
    def __call__(self, x, layer_cache, rope, mask, index):
        cfg = self.config
        h = self.rms_norm(cfg.rms_norm_eps, "input_layernorm")(x)
        h, layer_cache = SelfAttention(cfg.attention, name="self_attn", **self.kw)(
            h, mask, rope, layer_cache, index
        )
        x = x + h
        h = self.rms_norm(cfg.rms_norm_eps, "post_attention_layernorm")(x)
        x = x + MLP(cfg.mlp, name="mlp", **self.kw)(h)
        return x, layer_cache


class LlamaModel(nn.Module):
    """Embeddings, decoder stack and final norm (transformers' ``LlamaModel``);
    ``__call__`` returns ``(hidden, cache)`` (cache None without one).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from lora_jax.models.llama import LlamaConfig, LlamaModel
        >>> cfg = LlamaConfig.from_hf({"hidden_size": 16, "intermediate_size": 32,
        ...     "num_hidden_layers": 2, "num_attention_heads": 2, "vocab_size": 10})
        >>> model = LlamaModel(cfg, scan_layers=True)
        >>> (hidden, _), params = jax.eval_shape(model.init_with_output,
        ...     jax.random.key(0), jnp.zeros((1, 3), jnp.int32))
        >>> hidden.shape, params["params"]["layers"]["mlp"]["up_proj"]["kernel"].shape
        ((1, 3, 16), (2, 16, 32))
    """

    config: LlamaConfig
    scan_layers: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: str = "none"
    # The layer of the stack; a family with another layer (Qwen3-MoE) subclasses and swaps it.
    decoder_layer: ClassVar[type[nn.Module]] = LlamaDecoderLayer

    def setup(self) -> None:
        cfg = self.config
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        self.embed_tokens = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            embedding_init=dense_init(cfg.initializer_range),
            **kw,
        )
        windows = cfg.sliding_windows or (None,) * cfg.num_hidden_layers
        if self.scan_layers and len(set(windows)) > 1:
            raise NotImplementedError(
                "scan_layers=True needs the same attention window in every layer; this "
                f"config mixes {sorted(set(windows), key=str)}. Use scan_layers=False."
            )
        # Scanned, the stack itself is "layers": its params sit directly under
        # model.layers with a leading layer axis, no index level.
        self.layers = layer_stack(self.decoder_layer, cfg, cfg.num_hidden_layers,
                                  scan=self.scan_layers, num_args=3, remat=self.remat, **kw)
        self.norm = RMSNorm(cfg.rms_norm_eps, **kw)

    def __call__(self, input_ids, attention_mask=None, positions=None, cache=None):
        cfg = self.config
        query_slots, key_slots, positions = slots_and_positions(input_ids, positions, cache)
        x = self.embed_tokens(input_ids)
        # RoPE angles and masks once per call, shared by all layers.
        rope = rope_angles(positions, rope_inverse_frequencies(cfg.head_dim, dict(cfg.rope)))
        windows = cfg.sliding_windows or (None,) * cfg.num_hidden_layers
        if cache is None:  # flags, which fused attention kernels use to skip masked blocks
            masks = {w: causal_mask(attention_mask, sliding_window=w) for w in set(windows)}
        else:  # this call's tokens sit at slots index.. of the cache buffer: explicit masks
            masks = {
                w: make_attention_mask(query_slots, key_slots, attention_mask, sliding_window=w)
                for w in set(windows)
            }
        mask = masks[windows[0]] if self.scan_layers else PerLayer(masks[w] for w in windows)
        index, layer_caches = split_cache(cache)
        x, new_layers = self.layers(x, layer_caches, rope, mask, index)
        return self.norm(x), next_cache(cache, new_layers, input_ids.shape[1])


class LlamaForCausalLM(nn.Module):
    """A Llama-family causal LM; ``__call__`` returns float32 logits.

    Args of ``__call__``:
        input_ids: (batch, seq) int token ids.
        attention_mask: 1 for real tokens, 0 for padding; (batch, seq) without a cache,
            (batch, max_length) covering every cache slot with one. None = all real.
        positions: (batch, seq) RoPE positions; default ``cache index + arange(seq)``.
        cache: a KV cache from ``init_cache``; then the call returns ``(logits, cache)``.
        return_hidden: return an :class:`~lora_jax.models.layers.LMHidden` (final hidden
            states and the head's params leaf) instead of the logits, for a loss that
            computes them chunk by chunk (:func:`~lora_jax.models.chunked_lm_loss`).
        labels: (batch, seq) token ids, -100 where not a target: then the call returns
            ``(nll_sum, target_count)`` of next-token prediction, its logits computed 128
            tokens at a time (:func:`~lora_jax.models.layers.labels_loss`).

    Fields ``scan_layers`` (one ``nn.scan``-ed layer) and ``remat`` (per-layer
    rematerialisation, see :func:`~lora_jax.models.blocks.remat_policy`) change how the
    forward and backward passes run, not the params or the values.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from lora_jax.models import LlamaConfig, LlamaForCausalLM
        >>> cfg = LlamaConfig.from_hf({"hidden_size": 32, "intermediate_size": 64,
        ...     "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 50})
        >>> model = LlamaForCausalLM(cfg)
        >>> ids = jnp.zeros((1, 5), jnp.int32)
        >>> params = model.init(jax.random.key(0), ids)["params"]
        >>> model.apply({"params": params}, ids).shape
        (1, 5, 50)
    """

    config: LlamaConfig
    scan_layers: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: str = "none"
    base_model: ClassVar[type[nn.Module]] = LlamaModel  # swapped by subclasses, like decoder_layer

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, positions=None, cache=None,
                 return_hidden=False, labels=None):
        model = self.base_model(
            self.config, self.scan_layers, dtype=self.dtype, param_dtype=self.param_dtype,
            remat=self.remat, name="model",
        )
        hidden, new_cache = model(input_ids, attention_mask, positions, cache)
        out = output_head(hidden, model.embed_tokens, self.config, param_dtype=self.param_dtype,
                          dtype=self.dtype)
        out = causal_lm_output(out, return_hidden=return_hidden, labels=labels)
        return out if cache is None else (out, new_cache)

    def init_cache(self, batch_size: int, max_length: int, dtype: Dtype = None) -> dict:
        """A zeroed KV cache for ``batch_size`` rows of up to ``max_length`` tokens.

        Example:
            >>> from lora_jax.models import LlamaConfig, LlamaForCausalLM
            >>> cfg = LlamaConfig.from_hf({"hidden_size": 16, "intermediate_size": 32,
            ...     "num_hidden_layers": 2, "num_attention_heads": 2, "vocab_size": 10})
            >>> LlamaForCausalLM(cfg).init_cache(1, 8)["layers"][0]["k"].shape
            (1, 8, 2, 8)
        """
        cfg = self.config
        return empty_kv_cache(cfg.num_hidden_layers, batch_size, max_length,
                              cfg.num_key_value_heads, cfg.head_dim, dtype or self.dtype,
                              stacked=self.scan_layers)


def build(config: dict[str, Any], settings: BuildSettings) -> LlamaForCausalLM:
    """The causal LM for a Hugging Face config dict (every Llama-family checkpoint is a
    causal LM here, so ``settings.architecture`` is not looked at).

    Example:
        >>> from lora_jax.models import llama
        >>> from lora_jax.models.family import BuildSettings
        >>> llama.build({"model_type": "mistral", "hidden_size": 16, "intermediate_size": 32,
        ...     "num_hidden_layers": 2, "num_attention_heads": 2, "vocab_size": 10,
        ...     "sliding_window": 64}, BuildSettings()).config.sliding_windows
        (64, 64)
    """
    return LlamaForCausalLM(LlamaConfig.from_hf(config), settings.scan_layers, remat=settings.remat,
                            **settings.dtypes)


FAMILY = ModelFamily(
    model_types=MODEL_TYPES,
    build=build,
    base_prefix="model.",
    architecture=lambda model_type, params: ARCHITECTURES[model_type],
    scan_node=("model", "layers"),
    ignored=re.compile(r".*rotary_emb\.inv_freq$|^lm_head\.weight$"),
)
