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
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .layers import (
    SUPPORTED_ROPE_TYPES,
    Dtype,
    RMSNorm,
    activation,
    apply_rope,
    dense_init,
    dot_product_attention,
    empty_kv_cache,
    make_attention_mask,
    output_logits,
    rope_angles,
    rope_inverse_frequencies,
    slots_and_positions,
    update_kv_cache,
)

MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture of a Llama-family model, read from a Hugging Face config.

    Hashable, so modules holding it can be static arguments of ``jax.jit``.

    Example:
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
        """Read a ``config.json`` dict of model_type llama, mistral or qwen2."""
        model_type = config.get("model_type", "llama")
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        layers = int(config["num_hidden_layers"])
        if model_type == "qwen2":
            qkv_bias, o_bias, mlp_bias = True, False, False
        elif model_type == "mistral":
            qkv_bias, o_bias, mlp_bias = False, False, False
        else:
            attention_bias = bool(config.get("attention_bias", False))
            qkv_bias, o_bias = attention_bias, attention_bias
            mlp_bias = bool(config.get("mlp_bias", False))
        return cls(
            vocab_size=int(config["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(config["intermediate_size"]),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            hidden_act=config.get("hidden_act", "silu"),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=mlp_bias,
            sliding_windows=_sliding_windows(config, model_type, layers),
            rope=tuple(sorted(_rope_parameters(config).items())),
            initializer_range=float(config.get("initializer_range", 0.02)),
        )


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
        raise ValueError(
            f"unsupported rope_type {rope['rope_type']!r}; supported: {list(SUPPORTED_ROPE_TYPES)}"
        )
    if float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError("partial_rotary_factor != 1 is not supported by the Llama family")
    return rope


def _sliding_windows(config: dict[str, Any], model_type: str, layers: int) -> tuple:
    if model_type == "mistral":
        # MistralConfig defaults to a 4096 window when the key is absent.
        window = config.get("sliding_window", 4096)
        return (int(window) if window else None,) * layers
    if model_type == "qwen2":
        window = config.get("sliding_window")
        if not config.get("use_sliding_window", False) or not window:
            return (None,) * layers
        layer_types = config.get("layer_types")
        if layer_types is None:
            first = int(config.get("max_window_layers", layers))
            layer_types = ["sliding_attention" if i >= first else "full" for i in range(layers)]
        return tuple(int(window) if t == "sliding_attention" else None for t in layer_types)
    return (None,) * layers


class LlamaAttention(nn.Module):
    """Grouped-query self-attention with RoPE.

    ``rope`` is ``(cos, sin)`` from ``rope_angles``; ``mask`` is boolean (batch or 1, 1,
    queries, keys); with a ``layer_cache`` the keys are every cache slot and this call's
    keys/values are written at slot ``index``.
    """

    config: LlamaConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, rope, mask, layer_cache, index):
        cfg = self.config

        def proj(features: int, bias: bool, name: str) -> nn.Dense:
            return nn.Dense(
                features,
                use_bias=bias,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                kernel_init=dense_init(cfg.initializer_range),
                name=name,
            )

        batch, seq, _ = x.shape
        q = proj(cfg.num_attention_heads * cfg.head_dim, cfg.qkv_bias, "q_proj")(x)
        k = proj(cfg.num_key_value_heads * cfg.head_dim, cfg.qkv_bias, "k_proj")(x)
        v = proj(cfg.num_key_value_heads * cfg.head_dim, cfg.qkv_bias, "v_proj")(x)
        q = q.reshape(batch, seq, cfg.num_attention_heads, cfg.head_dim)
        k = k.reshape(batch, seq, cfg.num_key_value_heads, cfg.head_dim)
        v = v.reshape(batch, seq, cfg.num_key_value_heads, cfg.head_dim)
        q = apply_rope(q, *rope)
        k = apply_rope(k, *rope)
        if layer_cache is not None:
            k, v, layer_cache = update_kv_cache(layer_cache, k, v, index)
        out = dot_product_attention(q, k, v, mask, scale=cfg.head_dim**-0.5)
        return proj(cfg.hidden_size, cfg.o_bias, "o_proj")(out), layer_cache


class LlamaMLP(nn.Module):
    """Gated MLP: ``down(act(gate(x)) * up(x))``."""

    config: LlamaConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config

        def proj(features: int, name: str) -> nn.Dense:
            return nn.Dense(
                features,
                use_bias=cfg.mlp_bias,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                kernel_init=dense_init(cfg.initializer_range),
                name=name,
            )

        act = activation(cfg.hidden_act)
        hidden = act(proj(cfg.intermediate_size, "gate_proj")(x))
        hidden = hidden * proj(cfg.intermediate_size, "up_proj")(x)
        return proj(cfg.hidden_size, "down_proj")(hidden)


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block: attention and MLP, each with a residual connection."""

    config: LlamaConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, layer_cache, rope, mask, index):
        # Argument order fits nn.scan: carry, then the scanned cache, then broadcasts.
        cfg = self.config
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        h = RMSNorm(cfg.rms_norm_eps, name="input_layernorm", **kw)(x)
        h, layer_cache = LlamaAttention(cfg, name="self_attn", **kw)(
            h, rope, mask, layer_cache, index
        )
        x = x + h
        h = RMSNorm(cfg.rms_norm_eps, name="post_attention_layernorm", **kw)(x)
        x = x + LlamaMLP(cfg, name="mlp", **kw)(h)
        return x, layer_cache


class LlamaLayers(nn.Module):
    """The unrolled decoder stack, named ``layers``, with children ``"0"``, ``"1"``, ..."""

    config: LlamaConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, layer_caches, rope, masks, index):
        # Like the scanned layer's signature, with one mask per layer (windows may differ).
        cfg = self.config
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        new_caches = []
        for i in range(cfg.num_hidden_layers):
            layer_cache = None if layer_caches is None else layer_caches[i]
            x, layer_cache = LlamaDecoderLayer(cfg, name=str(i), **kw)(
                x, layer_cache, rope, masks[i], index
            )
            new_caches.append(layer_cache)
        return x, None if layer_caches is None else tuple(new_caches)


class LlamaModel(nn.Module):
    """Embeddings, decoder stack and final norm (transformers' ``LlamaModel``)."""

    config: LlamaConfig
    scan_layers: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

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
        if self.scan_layers:
            if len(set(windows)) > 1:
                raise NotImplementedError(
                    "scan_layers=True needs the same attention window in every layer; this "
                    f"config mixes {sorted(set(windows), key=str)}. Use scan_layers=False."
                )
            # The scanned layer itself is "layers": its params sit directly under
            # model.layers with a leading layer axis, no index level.
            self.layers = nn.scan(
                LlamaDecoderLayer,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
                length=cfg.num_hidden_layers,
            )(cfg, **kw)
        else:
            self.layers = LlamaLayers(cfg, **kw)
        self.norm = RMSNorm(cfg.rms_norm_eps, **kw)

    def __call__(self, input_ids, attention_mask=None, positions=None, cache=None):
        cfg = self.config
        query_slots, key_slots, positions = slots_and_positions(input_ids, positions, cache)
        x = self.embed_tokens(input_ids)
        # RoPE angles and masks once per call, shared by all layers.
        rope = rope_angles(positions, rope_inverse_frequencies(cfg.head_dim, dict(cfg.rope)))
        windows = cfg.sliding_windows or (None,) * cfg.num_hidden_layers
        masks = {
            w: make_attention_mask(query_slots, key_slots, attention_mask, sliding_window=w)
            for w in set(windows)
        }
        index = None if cache is None else cache["index"]
        layer_caches = None if cache is None else cache["layers"]
        if self.scan_layers:
            x, new_layers = self.layers(x, layer_caches, rope, masks[windows[0]], index)
        else:
            per_layer = tuple(masks[w] for w in windows)
            x, new_layers = self.layers(x, layer_caches, rope, per_layer, index)
        x = self.norm(x)
        if cache is None:
            return x, None
        new_cache = {"index": cache["index"] + input_ids.shape[1], "layers": new_layers}
        return x, new_cache


class LlamaForCausalLM(nn.Module):
    """A Llama-family causal LM; ``__call__`` returns float32 logits.

    Args of ``__call__``:
        input_ids: (batch, seq) int token ids.
        attention_mask: 1 for real tokens, 0 for padding; (batch, seq) without a cache,
            (batch, max_length) covering every cache slot with one. None = all real.
        positions: (batch, seq) RoPE positions; default ``cache index + arange(seq)``.
        cache: a KV cache from ``init_cache``; then the call returns ``(logits, cache)``.

    Example:
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

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, positions=None, cache=None):
        cfg = self.config
        model = LlamaModel(
            cfg, self.scan_layers, dtype=self.dtype, param_dtype=self.param_dtype, name="model"
        )
        hidden, new_cache = model(input_ids, attention_mask, positions, cache)
        logits = output_logits(hidden, model.embed_tokens, tied=cfg.tie_word_embeddings,
                               vocab_size=cfg.vocab_size, initializer_range=cfg.initializer_range,
                               dtype=self.dtype, param_dtype=self.param_dtype)
        return logits if cache is None else (logits, new_cache)

    def init_cache(self, batch_size: int, max_length: int, dtype: Dtype = None) -> dict:
        """A zeroed KV cache for ``batch_size`` rows of up to ``max_length`` tokens."""
        cfg = self.config
        return empty_kv_cache(
            cfg.num_hidden_layers,
            batch_size,
            max_length,
            cfg.num_key_value_heads,
            cfg.head_dim,
            dtype or self.dtype,
            stacked=self.scan_layers,
        )


def build(
    config: dict[str, Any],
    *,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    scan_layers: bool = False,
    architecture: str | None = None,
) -> LlamaForCausalLM:
    """The module for a Hugging Face config dict (``architecture`` is accepted for a
    uniform signature; every Llama-family checkpoint is a causal LM here)."""
    del architecture
    return LlamaForCausalLM(
        LlamaConfig.from_hf(config), scan_layers, dtype=dtype, param_dtype=param_dtype
    )


def dummy_inputs() -> tuple[np.ndarray]:
    """Inputs that ``module.init`` / ``jax.eval_shape`` can trace the model with."""
    return (np.zeros((1, 1), np.int32),)
