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
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .layers import (
    Dtype,
    activation,
    dense_init,
    dot_product_attention,
    empty_kv_cache,
    make_attention_mask,
    output_logits,
    slots_and_positions,
    update_kv_cache,
)

MODEL_TYPES = ("gpt2",)


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """Architecture of a GPT-2 model, read from a Hugging Face config.

    Example:
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
        """Read a ``config.json`` dict of model_type gpt2."""
        n_embd = int(config.get("n_embd", 768))
        return cls(
            vocab_size=int(config.get("vocab_size", 50257)),
            n_positions=int(config.get("n_positions", 1024)),
            n_embd=n_embd,
            n_layer=int(config.get("n_layer", 12)),
            n_head=int(config.get("n_head", 12)),
            n_inner=int(config.get("n_inner") or 4 * n_embd),
            activation_function=config.get("activation_function", "gelu_new"),
            layer_norm_epsilon=float(config.get("layer_norm_epsilon", 1e-5)),
            scale_attn_weights=bool(config.get("scale_attn_weights", True)),
            scale_attn_by_inverse_layer_idx=bool(
                config.get("scale_attn_by_inverse_layer_idx", False)
            ),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", True)),
            initializer_range=float(config.get("initializer_range", 0.02)),
        )

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def _dense(cfg: GPT2Config, features: int, name: str, dtype, param_dtype) -> nn.Dense:
    return nn.Dense(
        features,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=dense_init(cfg.initializer_range),
        name=name,
    )


def _layer_norm(cfg: GPT2Config, name: str, dtype, param_dtype) -> nn.LayerNorm:
    # Exact two-pass variance, as torch's LayerNorm.
    return nn.LayerNorm(
        epsilon=cfg.layer_norm_epsilon,
        use_fast_variance=False,
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
    )


class GPT2Attention(nn.Module):
    """Multi-head causal self-attention with a fused ``c_attn`` projection."""

    config: GPT2Config
    layer_idx: int = 0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, padding_mask, query_slots, key_slots, layer_cache, index):
        cfg = self.config
        batch, seq, _ = x.shape
        qkv = _dense(cfg, 3 * cfg.n_embd, "c_attn", self.dtype, self.param_dtype)(x)
        q, k, v = (
            t.reshape(batch, seq, cfg.n_head, cfg.head_dim) for t in jnp.split(qkv, 3, axis=-1)
        )
        if layer_cache is not None:
            k, v, layer_cache = update_kv_cache(layer_cache, k, v, index)
        scale = cfg.head_dim**-0.5 if cfg.scale_attn_weights else 1.0
        if cfg.scale_attn_by_inverse_layer_idx:
            scale /= self.layer_idx + 1
        mask = make_attention_mask(query_slots, key_slots, padding_mask)
        out = dot_product_attention(q, k, v, mask, scale=scale)
        return _dense(cfg, cfg.n_embd, "c_proj", self.dtype, self.param_dtype)(out), layer_cache


class GPT2MLP(nn.Module):
    """``c_proj(act(c_fc(x)))``."""

    config: GPT2Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        h = _dense(cfg, cfg.n_inner, "c_fc", self.dtype, self.param_dtype)(x)
        h = activation(cfg.activation_function)(h)
        return _dense(cfg, cfg.n_embd, "c_proj", self.dtype, self.param_dtype)(h)


class GPT2Block(nn.Module):
    """Pre-norm transformer block."""

    config: GPT2Config
    layer_idx: int = 0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, padding_mask, query_slots, key_slots, layer_cache, index):
        cfg = self.config
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        h = _layer_norm(cfg, "ln_1", **kw)(x)
        h, layer_cache = GPT2Attention(cfg, self.layer_idx, name="attn", **kw)(
            h, padding_mask, query_slots, key_slots, layer_cache, index
        )
        x = x + h
        h = _layer_norm(cfg, "ln_2", **kw)(x)
        x = x + GPT2MLP(cfg, name="mlp", **kw)(h)
        return x, layer_cache


class GPT2Blocks(nn.Module):
    """The block stack, named ``h``, with children ``"0"``, ``"1"``, ..."""

    config: GPT2Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, padding_mask, query_slots, key_slots, layer_caches, index):
        new_caches = []
        for i in range(self.config.n_layer):
            layer_cache = None if layer_caches is None else layer_caches[i]
            block = GPT2Block(
                self.config, i, dtype=self.dtype, param_dtype=self.param_dtype, name=str(i)
            )
            x, layer_cache = block(x, padding_mask, query_slots, key_slots, layer_cache, index)
            new_caches.append(layer_cache)
        return x, None if layer_caches is None else tuple(new_caches)


class GPT2Model(nn.Module):
    """Token + position embeddings, blocks, final norm (transformers' ``GPT2Model``)."""

    config: GPT2Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self) -> None:
        cfg = self.config
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        init = dense_init(cfg.initializer_range)
        self.wte = nn.Embed(cfg.vocab_size, cfg.n_embd, embedding_init=init, **kw)
        self.wpe = nn.Embed(cfg.n_positions, cfg.n_embd, embedding_init=init, **kw)
        self.h = GPT2Blocks(cfg, **kw)
        self.ln_f = nn.LayerNorm(epsilon=cfg.layer_norm_epsilon, use_fast_variance=False, **kw)

    def __call__(self, input_ids, attention_mask=None, positions=None, cache=None):
        query_slots, key_slots, positions = slots_and_positions(input_ids, positions, cache)
        x = self.wte(input_ids) + self.wpe(positions)
        index = None if cache is None else cache["index"]
        layer_caches = None if cache is None else cache["layers"]
        x, new_layers = self.h(x, attention_mask, query_slots, key_slots, layer_caches, index)
        x = self.ln_f(x)
        if cache is None:
            return x, None
        return x, {"index": cache["index"] + input_ids.shape[1], "layers": new_layers}


class GPT2LMHeadModel(nn.Module):
    """GPT-2 causal LM; same call convention as ``LlamaForCausalLM`` (float32 logits,
    ``(logits, cache)`` when a cache is passed).

    Example:
        >>> model = GPT2LMHeadModel(GPT2Config.from_hf({"n_embd": 32, "n_layer": 2,
        ...     "n_head": 4, "vocab_size": 50, "n_positions": 16}))
        >>> ids = jnp.zeros((1, 5), jnp.int32)
        >>> params = model.init(jax.random.key(0), ids)["params"]
        >>> model.apply({"params": params}, ids).shape
        (1, 5, 50)
    """

    config: GPT2Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, positions=None, cache=None):
        cfg = self.config
        transformer = GPT2Model(
            cfg, dtype=self.dtype, param_dtype=self.param_dtype, name="transformer"
        )
        hidden, new_cache = transformer(input_ids, attention_mask, positions, cache)
        logits = output_logits(hidden, transformer.wte, tied=cfg.tie_word_embeddings,
                               vocab_size=cfg.vocab_size, initializer_range=cfg.initializer_range,
                               dtype=self.dtype, param_dtype=self.param_dtype)
        return logits if cache is None else (logits, new_cache)

    def init_cache(self, batch_size: int, max_length: int, dtype: Dtype = None) -> dict:
        """A zeroed KV cache for ``batch_size`` rows of up to ``max_length`` tokens."""
        cfg = self.config
        return empty_kv_cache(
            cfg.n_layer,
            batch_size,
            max_length,
            cfg.n_head,
            cfg.head_dim,
            dtype or self.dtype,
            stacked=False,
        )


def build(
    config: dict[str, Any],
    *,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    scan_layers: bool = False,
    architecture: str | None = None,
) -> GPT2LMHeadModel:
    """The module for a Hugging Face GPT-2 config dict."""
    del architecture
    if scan_layers:
        raise NotImplementedError("scan_layers=True is implemented for the Llama family only")
    return GPT2LMHeadModel(GPT2Config.from_hf(config), dtype=dtype, param_dtype=param_dtype)


def dummy_inputs() -> tuple[np.ndarray]:
    """Inputs that ``module.init`` / ``jax.eval_shape`` can trace the model with."""
    return (np.zeros((1, 1), np.int32),)
