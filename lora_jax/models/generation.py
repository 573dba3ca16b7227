"""Autoregressive generation for the causal LMs, compiled once per shape.

One prefill call fills a fixed-size KV cache with the prompt, then a ``lax.while_loop``
feeds one token at a time until ``max_new_tokens`` or until every row has produced a
stop token. The cache is an explicit pytree passed into and returned from the apply
function, so any function with ``module.apply``'s signature works in its place, such as
a LoRA-wrapped apply.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .layers import Dtype
from .loading import Model

ApplyFn = Callable[..., Any]


def sample_logits(
    logits: jax.Array,
    rng: jax.Array,
    *,
    temperature: float | jax.Array = 1.0,
    top_p: float | jax.Array = 1.0,
    top_k: int | None = None,
) -> jax.Array:
    """Sample token ids (batch,) from logits (batch, vocab) with temperature, top-k and
    nucleus (top-p) filtering (Holtzman et al., 2019, arXiv 1904.09751).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from lora_jax.models import sample_logits
        >>> logits = jnp.array([[0.0, 5.0, 0.0]])
        >>> sample_logits(logits, jax.random.key(0), top_p=0.5)
        Array([1], dtype=int32)
    """
    logits = logits.astype(jnp.float32) / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    # Nucleus: keep the most likely tokens until their mass reaches top_p; the most
    # likely token is always kept.
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    kept = jnp.sum(mass_before < top_p, axis=-1, keepdims=True)
    cutoff = jnp.take_along_axis(sorted_logits, jnp.maximum(kept - 1, 0), axis=-1)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _next_token(logits, rng, temperature, top_p, *, greedy: bool, top_k: int | None):
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return sample_logits(logits, rng, temperature=temperature, top_p=top_p, top_k=top_k)


@partial(
    jax.jit,
    static_argnames=(
        "module",
        "apply_fn",
        "max_new_tokens",
        "greedy",
        "top_k",
        "stop_token_ids",
        "pad_token_id",
        "cache_dtype",
    ),
)
def _generate(
    params,
    input_ids,
    attention_mask,
    rng,
    temperature,
    top_p,
    *,
    module: nn.Module,
    apply_fn: ApplyFn,
    max_new_tokens: int,
    greedy: bool,
    top_k: int | None,
    stop_token_ids: tuple[int, ...],
    pad_token_id: int,
    cache_dtype: Dtype,
):
    batch, prompt_len = input_ids.shape
    variables = {"params": params}
    stops = jnp.asarray(stop_token_ids or (-1,), jnp.int32)
    pick = partial(_next_token, greedy=greedy, top_k=top_k)

    cache = module.init_cache(batch, prompt_len + max_new_tokens, cache_dtype)
    # One mask over every cache slot: the prompt's padding, then the generated tokens.
    full_mask = jnp.concatenate(
        [attention_mask, jnp.ones((batch, max_new_tokens), attention_mask.dtype)], axis=1
    )
    positions = jnp.maximum(jnp.cumsum(attention_mask, axis=1) - 1, 0).astype(jnp.int32)
    logits, cache = apply_fn(
        variables, input_ids, attention_mask=full_mask, positions=positions, cache=cache
    )
    rng, step_rng = jax.random.split(rng)
    token = pick(logits[:, -1], step_rng, temperature, top_p)
    done = jnp.isin(token, stops)
    generated = jnp.full((batch, max_new_tokens), pad_token_id, jnp.int32).at[:, 0].set(token)

    def keep_going(state):
        step, _, _, _, done, _, _ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def decode_one(state):
        step, token, cache, position, done, generated, rng = state
        logits, cache = apply_fn(
            variables,
            token[:, None],
            attention_mask=full_mask,
            positions=position[:, None],
            cache=cache,
        )
        rng, step_rng = jax.random.split(rng)
        token = pick(logits[:, -1], step_rng, temperature, top_p)
        token = jnp.where(done, pad_token_id, token)
        generated = jax.lax.dynamic_update_slice(generated, token[:, None], (0, step))
        return step + 1, token, cache, position + 1, done | jnp.isin(token, stops), generated, rng

    state = (jnp.int32(1), token, cache, positions[:, -1] + 1, done, generated, rng)
    generated = jax.lax.while_loop(keep_going, decode_one, state)[5]
    return jnp.concatenate([input_ids, generated], axis=1)


def _as_id_tuple(ids: int | Sequence[int] | None) -> tuple[int, ...]:
    if ids is None:
        return ()
    if isinstance(ids, (int, np.integer)):
        return (int(ids),)
    return tuple(int(i) for i in ids)


def generate(
    model: Model | nn.Module,
    params: Any,
    input_ids: Any,
    *,
    max_new_tokens: int,
    attention_mask: Any = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int | None = None,
    stop_token_ids: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    rng: jax.Array | None = None,
    apply_fn: ApplyFn | None = None,
    cache_dtype: Dtype = None,
) -> jax.Array:
    """Generate ``max_new_tokens`` tokens after each prompt; jit-compiled, KV-cached.

    Rows may be padded anywhere (``attention_mask`` 0): they are left-aligned first, and
    the result comes back left-padded. After a row emits a stop token, the rest of its
    row is ``pad_token_id``.

    Args:
        model: a ``Model`` from ``from_pretrained`` or a causal-LM module with
            ``init_cache``.
        params: the params tree; None takes ``model.params`` of a ``Model``. With a
            custom ``apply_fn`` it may be any pytree that function understands, e.g.
            ``{"base": params, "adapter": adapter}``: passing the adapter this way
            instead of closing over it compiles once for every adapter.
        input_ids: (batch, prompt_len) token ids.
        max_new_tokens: how many tokens to add (the output width is fixed).
        attention_mask: (batch, prompt_len), 1 = token, 0 = padding; default all ones.
        temperature: 0 is greedy decoding; otherwise logits are divided by it and sampled.
        top_p, top_k: nucleus and top-k filtering when sampling.
        stop_token_ids: ids that end a row; default the config's ``eos_token_id`` for a
            ``Model``, none for a bare module. Pass ``()`` to never stop early.
        pad_token_id: fills rows after they stop; default the config's pad / eos id, or 0.
        rng: PRNG key for sampling; default ``jax.random.key(0)``.
        apply_fn: replaces ``module.apply``; called as
            ``apply_fn({"params": params}, ids, attention_mask=, positions=, cache=)`` and
            must return ``(logits, cache)``. It is a static argument of the compiled
            loop: each distinct function object compiles once, so build it once.
        cache_dtype: dtype of the KV cache; default the module's compute dtype.

    Returns:
        (batch, prompt_len + max_new_tokens) int32: prompts followed by new tokens.

    Example:
        >>> import jax, lora_jax
        >>> from lora_jax import models
        >>> model = models.from_config({"model_type": "llama", "hidden_size": 16,
        ...     "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
        ...     "vocab_size": 30})
        >>> ids = [[0, 5, 7], [3, 4, 9]]
        >>> models.generate(model, None, ids, max_new_tokens=4).shape
        (2, 7)

        With a LoRA adapter, passed as an argument so that a new adapter does not
        recompile the loop:

        >>> config = lora_jax.LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
        >>> adapter = lora_jax.init(config, model.params, jax.random.key(0))
        >>> lora_apply = lora_jax.lora(model.module.apply, config)
        >>> def with_adapter(variables, *args, **kwargs):
        ...     both = variables["params"]
        ...     return lora_apply({"params": both["base"]}, both["adapter"], *args, **kwargs)
        >>> out = models.generate(model.module, {"base": model.params, "adapter": adapter},
        ...                       ids, max_new_tokens=4, apply_fn=with_adapter)
        >>> bool((out == models.generate(model, None, ids, max_new_tokens=4)).all())
        True
    """
    config: dict[str, Any] = {}
    if isinstance(model, Model):
        module, config = model.module, model.config
        params = model.params if params is None else params
    else:
        module = model
    if params is None:
        raise ValueError("params is None and model is a bare module; pass the params tree")
    if not hasattr(module, "init_cache"):
        raise TypeError(f"{type(module).__name__} is not a causal LM: it has no init_cache")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")

    input_ids = jnp.asarray(input_ids, jnp.int32)
    if input_ids.ndim == 1:
        input_ids = input_ids[None]
    if attention_mask is None:
        attention_mask = jnp.ones_like(input_ids)
    attention_mask = jnp.asarray(attention_mask, jnp.int32)
    # Left-align: a stable sort of the mask puts each row's padding first, tokens in order.
    order = jnp.argsort(attention_mask, axis=1, stable=True)
    input_ids = jnp.take_along_axis(input_ids, order, axis=1)
    attention_mask = jnp.take_along_axis(attention_mask, order, axis=1)

    if stop_token_ids is None:
        stop_token_ids = config.get("eos_token_id")
    if pad_token_id is None:
        fallback = _as_id_tuple(config.get("eos_token_id")) or (0,)
        pad_token_id = config.get("pad_token_id")
        pad_token_id = fallback[0] if pad_token_id is None else pad_token_id
    return _generate(
        params,
        input_ids,
        attention_mask,
        jax.random.key(0) if rng is None else rng,
        jnp.float32(temperature if temperature > 0 else 1.0),
        jnp.float32(top_p),
        module=module,
        apply_fn=module.apply if apply_fn is None else apply_fn,
        max_new_tokens=int(max_new_tokens),
        greedy=temperature <= 0,
        top_k=top_k,
        stop_token_ids=_as_id_tuple(stop_token_ids),
        pad_token_id=int(pad_token_id),
        cache_dtype=cache_dtype or module.dtype,
    )
