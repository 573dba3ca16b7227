"""The jit-compiled training and evaluation steps.

Only the adapter (and the leaves that train in full: ``modules_to_save`` and
biases, see :func:`lora_jax.trainable_mask`) are differentiated; the frozen
params are an argument of the step, never a constant baked into it::

    apply_fn = lambda p, ids, mask: model.apply({"params": p}, ids, attention_mask=mask)
    optimizer = make_optimizer(2e-4, max_steps=100, warmup_steps=10)
    state = init_state(adapter, trainable_leaves(params, config), optimizer, seed=0)
    train_step = make_train_step(apply_fn, config, optimizer)
    state, metrics = train_step(state, params, batch)   # batch: (grad_accum, B, L) arrays

``apply_fn(params, input_ids, attention_mask) -> logits`` is any function of
a params pytree; LoRA is applied to it with :func:`lora_jax.lora`, so the
step computes ``x @ W + s * (x @ A) @ B`` and never a dense weight gradient.
It may instead return a :class:`lora_jax.models.layers.LMHidden` (final hidden
states and the head's params leaf): the loss then computes the logits
``loss_chunk`` tokens at a time, never holding all (tokens x vocab) of them.

``apply_fn`` may also be a :mod:`lora_jax.models` causal-LM module
(``model.module``): the step then applies it with per-layer remat (``remat``:
"none", "dots", "full" or "offload", see
:func:`lora_jax.models.blocks.remat_policy`) and the chunked loss. On CPU,
``cpu_scheduler="memory"`` compiles the steps with XLA's memory-optimized
instruction scheduler instead of its concurrency-optimized default
(:func:`compiler_options`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lora_jax.config import LoraConfig
from lora_jax.quantize import is_quantized
from lora_jax.transform import lora
from lora_jax.tree import split_path, trainable_mask

ApplyFn = Callable[[Any, jax.Array, jax.Array], Any]
SCHEDULES = ("cosine", "linear", "constant")
REMAT_POLICIES = ("none", "dots", "full", "offload")  # as lora_jax.models.blocks.REMAT_POLICIES
CPU_SCHEDULERS = ("memory", "concurrency")
# Tokens per chunk of the LM head + cross-entropy, and the XLA:CPU scheduler: the defaults the
# compiled-memory measurements chose (README, "Memory"; benchmarks/memory_targets.py).
DEFAULT_LOSS_CHUNK = 128
DEFAULT_CPU_SCHEDULER = "concurrency"


class TrainState(NamedTuple):
    """Everything a step changes: a pytree, saved whole in checkpoints.

    Example:
        >>> import jax.numpy as jnp
        >>> state = init_state({"m": {"lora_A": jnp.zeros((3, 2)), "lora_B": jnp.zeros((2, 3))}}, {},
        ...                    make_optimizer(1e-3, 10), seed=0)
        >>> int(state.step), sorted(state.trainable), state.rng.dtype
        (0, ['adapter', 'params'], dtype('uint32'))

    ``trainable`` is ``{"adapter": {module: {"lora_A", "lora_B"}}, "params":
    {"module.leaf": array}}``; ``rng`` is raw ``uint32`` key data (dropout).
    """

    step: jax.Array
    trainable: dict[str, Any]
    opt_state: Any
    rng: jax.Array


# -- trainable leaves ---------------------------------------------------------------------

def leaf_name(path: Any) -> str:
    """``"lm_head.kernel"`` for the key path of ``params["lm_head"]["kernel"]``.

    Example:
        >>> import jax
        >>> (path, _), = jax.tree_util.tree_flatten_with_path({"lm_head": {"kernel": 0}})[0]
        >>> leaf_name(path)
        'lm_head.kernel'
    """
    module_name, leaf = split_path(path)
    return f"{module_name}.{leaf}" if module_name else leaf


def trainable_leaves(params: Any, config: LoraConfig) -> dict[str, jax.Array]:
    """The leaves that train in full, by dotted name, in float32.

    Example:
        >>> from lora_jax.config import LoraConfig
        >>> import jax.numpy as jnp
        >>> params = {"q": {"kernel": jnp.ones((4, 4))}, "head": {"kernel": jnp.ones((4, 2)), "bias": jnp.zeros(2)}}
        >>> sorted(trainable_leaves(params, LoraConfig(target_modules=["q"], modules_to_save=["head"])))
        ['head.bias', 'head.kernel']
    """
    mask = trainable_mask(params, config)
    flat_mask = jax.tree_util.tree_flatten_with_path(mask)[0]
    flat_params = jax.tree.leaves(params, is_leaf=is_quantized)
    return {leaf_name(path): cast_floating(leaf, jnp.float32)
            for (path, keep), leaf in zip(flat_mask, flat_params) if keep}


def with_leaves(params: Any, leaves: dict[str, jax.Array]) -> Any:
    """``params`` with the leaves named in ``leaves`` replaced (cast to the old dtype).

    The inverse of :func:`trainable_leaves`: ``with_leaves(params,
    trainable_leaves(params, config))`` equals ``params`` for float32 params.

    Example:
        >>> import jax.numpy as jnp
        >>> params = {"head": {"bias": jnp.zeros(2, jnp.bfloat16)}}
        >>> with_leaves(params, {"head.bias": jnp.ones(2)})["head"]["bias"]
        Array([1, 1], dtype=bfloat16)
    """
    if not leaves:
        return params

    def pick(path: Any, leaf: Any) -> Any:
        new = leaves.get(leaf_name(path))
        return leaf if new is None else new.astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(pick, params, is_leaf=is_quantized)


def cast_floating(tree: Any, dtype: Any) -> Any:
    """Every floating-point leaf of ``tree`` cast to ``dtype`` (e.g. frozen params to bfloat16).

    Example:
        >>> import jax.numpy as jnp
        >>> tree = cast_floating({"w": jnp.ones(2), "ids": jnp.arange(2)}, jnp.bfloat16)
        >>> tree["w"].dtype, tree["ids"].dtype
        (dtype(bfloat16), dtype('int32'))

    A quantized kernel (:mod:`lora_jax.quantize`) keeps its packed codes and scales
    and dequantizes to ``dtype`` from then on.
    """
    def cast(x: Any) -> Any:
        if is_quantized(x):  # packed codes and scales stay as they are; it dequantizes to dtype
            return dataclasses.replace(x, dtype=jnp.dtype(dtype))
        return x.astype(dtype) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x

    return jax.tree.map(cast, tree, is_leaf=is_quantized)


# -- loss -----------------------------------------------------------------------------------

def causal_lm_loss(logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Summed next-token negative log-likelihood over target tokens, and their count.

    Example:
        >>> import jax.numpy as jnp
        >>> logits = jnp.zeros((1, 3, 4))                  # uniform over 4 tokens
        >>> nll, count = causal_lm_loss(logits, jnp.array([[0, 1, 2]]), jnp.array([[False, True, True]]))
        >>> float(count), round(float(nll / count), 4)     # log(4)
        (2.0, 1.3863)

    Position ``t`` predicts token ``t + 1``; ``loss_mask[..., t + 1]`` says
    whether that token is a target (responses only for prompt/response and
    chat data). Computed in float32 whatever the logits' dtype.
    """
    targets = input_ids[..., 1:]
    weights = loss_mask[..., 1:].astype(jnp.float32)
    nll = optax.softmax_cross_entropy_with_integer_labels(
        logits[..., :-1, :].astype(jnp.float32), targets
    )
    return jnp.sum(nll * weights), jnp.sum(weights)


def lm_loss(output: Any, input_ids: jax.Array, loss_mask: jax.Array, *,
            loss_chunk: int | None = DEFAULT_LOSS_CHUNK) -> tuple[jax.Array, jax.Array]:
    """:func:`causal_lm_loss` of a model's output: its logits, or an ``LMHidden``.

    Example:
        >>> import jax.numpy as jnp
        >>> from lora_jax.models.layers import LMHidden
        >>> ids, mask = jnp.array([[0, 1, 2]]), jnp.array([[False, True, True]])
        >>> hidden = LMHidden(jnp.zeros((1, 3, 2)), jnp.zeros((2, 4)))    # uniform over 4 tokens
        >>> [round(float(x), 4) for x in lm_loss(hidden, ids, mask, loss_chunk=2)]
        [2.7726, 2.0]
        >>> [round(float(x), 4) for x in lm_loss(hidden.logits(), ids, mask)]   # the same from logits
        [2.7726, 2.0]

    With an ``LMHidden`` the logits are computed ``loss_chunk`` tokens at a time
    (:func:`lora_jax.models.chunked_lm_loss`; None: all at once). Position ``t``
    predicts token ``t + 1``, as in :func:`causal_lm_loss`.
    """
    if isinstance(output, jax.Array):
        return causal_lm_loss(output, input_ids, loss_mask)
    from lora_jax.models.layers import LMHidden, chunked_lm_loss

    if not isinstance(output, LMHidden):
        raise TypeError(f"apply_fn must return logits or a lora_jax.models.layers.LMHidden, got "
                        f"{type(output).__name__}")
    # Shift by padding the targets instead of slicing the hidden states: the last
    # position predicts nothing (weight 0).
    targets = jnp.pad(input_ids[..., 1:], [(0, 0)] * (input_ids.ndim - 1) + [(0, 1)])
    weights = jnp.pad(loss_mask[..., 1:].astype(jnp.float32), [(0, 0)] * (loss_mask.ndim - 1) + [(0, 1)])
    nll = chunked_lm_loss(output.hidden, output.head, targets, weights, tied=output.tied,
                          chunk_size=loss_chunk, softcap=output.softcap)
    return nll, jnp.sum(weights)


def model_apply(module: Any, *, remat: str | None = None, return_hidden: bool = False) -> ApplyFn:
    """``apply_fn(params, input_ids, attention_mask)`` of a :mod:`lora_jax.models` causal LM.

    Example:
        >>> from lora_jax import models
        >>> model = models.from_config({"model_type": "llama", "hidden_size": 16,
        ...     "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        ...     "vocab_size": 30})
        >>> apply_fn = model_apply(model.module, remat="full", return_hidden=True)
        >>> out = apply_fn(model.params, jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32))
        >>> type(out).__name__, out.hidden.shape
        ('LMHidden', (1, 4, 16))

    Args:
        module: the linen module (``model.module``), with a ``remat`` field.
        remat: per-layer remat ("none", "dots", "full", "offload"); None keeps the module's.
        return_hidden: return ``LMHidden`` (for the chunked loss) instead of logits.
    """
    if not hasattr(module, "remat"):
        raise TypeError(f"{type(module).__name__} is not a lora_jax.models module (it has no remat field); "
                        "pass a function apply_fn(params, input_ids, attention_mask) instead.")
    if remat is not None and remat != module.remat:
        module = module.clone(remat=remat)

    def apply_fn(params: Any, input_ids: jax.Array, attention_mask: jax.Array) -> Any:
        options = {"return_hidden": True} if return_hidden else {}
        return module.apply({"params": params}, input_ids, attention_mask=attention_mask, **options)

    return apply_fn


def _as_apply_fn(apply_fn: Any, remat: str | None, loss_chunk: int | None) -> ApplyFn:
    """A module becomes its apply function (per-layer remat, hidden states for a chunked
    loss); a function is used as it is, which per-layer remat cannot reach."""
    import flax.linen as nn

    if isinstance(apply_fn, nn.Module):
        return model_apply(apply_fn, remat=remat, return_hidden=loss_chunk is not None)
    if remat not in (None, "none"):
        remat_policy(remat)  # an unknown name is the clearer error
        raise ValueError(
            f"remat={remat!r} rematerialises each layer of a lora_jax.models model: pass the module "
            "(model.module) as apply_fn, or build your model with it (models.from_pretrained(..., "
            f"remat={remat!r})) and pass remat=None.")
    return apply_fn


def make_loss_fn(apply_fn: ApplyFn | Any, config: LoraConfig, *, remat: str | None = None,
                 loss_chunk: int | None = DEFAULT_LOSS_CHUNK) -> Callable[..., Any]:
    """``loss(trainable, params, batch, rng) -> (nll_sum, count)`` for one micro-batch.

    Example:
        >>> from lora_jax.config import LoraConfig
        >>> import jax, jax.numpy as jnp, lora_jax
        >>> params = {"embed": {"embedding": jnp.eye(4)}, "out": {"kernel": jnp.eye(4)}}
        >>> def apply_fn(p, ids, mask):
        ...     return jnp.take(p["embed"]["embedding"], ids, axis=0) @ p["out"]["kernel"]
        >>> config = LoraConfig(r=2, target_modules=["out"])
        >>> adapter = lora_jax.init(config, params, jax.random.key(0))
        >>> loss = make_loss_fn(apply_fn, config)
        >>> batch = {"input_ids": jnp.array([[0, 1]]), "attention_mask": jnp.ones((1, 2)),
        ...          "loss_mask": jnp.array([[False, True]])}
        >>> [round(float(x), 4) for x in loss({"adapter": adapter, "params": {}}, params, batch, None)]
        [1.7437, 1.0]

    ``batch`` holds ``input_ids``, ``attention_mask`` and ``loss_mask`` of shape
    ``(B, L)``; ``rng`` (a key or None) drives LoRA dropout. The loss is computed
    inside the LoRA-traced function (:func:`lm_loss`), so a head that
    ``apply_fn`` hands back in an ``LMHidden`` is a LoRA'd dot like any other.

    Args:
        apply_fn: ``apply_fn(params, input_ids, attention_mask)`` returning logits or an
            ``LMHidden``; or a :mod:`lora_jax.models` causal-LM module (see
            :func:`model_apply`).
        config: the LoRA config.
        remat: per-layer remat of a module ``apply_fn`` ("none", "dots", "full",
            "offload"); a function ``apply_fn`` is rematerialised however it was built.
        loss_chunk: tokens per chunk of the LM head + cross-entropy when the model
            returns an ``LMHidden`` (a module always does then); None: the full logits.
    """
    apply_fn = _as_apply_fn(apply_fn, remat, loss_chunk)

    def model_loss(params: Any, input_ids: jax.Array, attention_mask: jax.Array,
                   loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        return lm_loss(apply_fn(params, input_ids, attention_mask), input_ids, loss_mask,
                       loss_chunk=loss_chunk)

    lora_loss = lora(model_loss, config)

    def loss(trainable: dict[str, Any], params: Any, batch: dict[str, jax.Array],
             rng: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        full = with_leaves(params, trainable["params"])
        return lora_loss(full, trainable["adapter"], batch["input_ids"], batch["attention_mask"],
                         batch["loss_mask"], lora_rng=rng)

    return loss


def remat_policy(name: str) -> Callable[..., Any] | None:
    """The ``jax.checkpoint`` policy of a per-layer remat name (None for ``"none"``).

    Example:
        >>> import jax
        >>> remat_policy("full") is jax.checkpoint_policies.nothing_saveable
        True
        >>> remat_policy("dots_saveable")
        Traceback (most recent call last):
        ...
        ValueError: unknown remat policy 'dots_saveable'; expected one of 'none', 'dots', 'full', 'offload'

    See :func:`lora_jax.models.blocks.remat_policy` for what each keeps.
    """
    from lora_jax.models.blocks import remat_policy as policy

    return policy(name)


def compiler_options(cpu_scheduler: str = DEFAULT_CPU_SCHEDULER,
                     backend: str | None = None) -> dict[str, Any] | None:
    """XLA compile options of the steps: XLA:CPU's memory-optimized scheduler, or None.

    Example:
        >>> compiler_options("memory", backend="cpu")
        {'xla_cpu_scheduler_type': 'CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED'}
        >>> compiler_options("memory", backend="gpu") is None, compiler_options("concurrency", backend="cpu")
        (True, None)

    XLA:CPU's default scheduler optimizes for concurrency: it starts independent work
    early (e.g. every dequantized kernel of a model without remat), keeping its results
    alive; the memory-optimized one orders the same operations to keep fewer
    temporaries (the same values, in another order). With per-layer remat the layers'
    conditionals fix that order already, and the memory-optimized scheduler measured
    no lower for LoRA and higher for full fine-tuning, so it is not the default.
    """
    if cpu_scheduler not in CPU_SCHEDULERS:
        raise ValueError(f"cpu_scheduler must be one of {CPU_SCHEDULERS}, got {cpu_scheduler!r}.")
    if (backend or jax.default_backend()) != "cpu" or cpu_scheduler == "concurrency":
        return None
    return {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}


# -- optimizer ------------------------------------------------------------------------------

def learning_rate_schedule(learning_rate: float, max_steps: int, *, warmup_steps: int = 0,
                           schedule: str = "cosine", end_factor: float = 0.0) -> optax.Schedule:
    """Linear warmup from 0, then cosine or linear decay to ``end_factor * learning_rate``.

    Example:
        >>> lr = learning_rate_schedule(1e-3, 100, warmup_steps=10)
        >>> [round(float(lr(step)), 6) for step in (0, 5, 10, 55, 100)]
        [0.0, 0.0005, 0.001, 0.0005, 0.0]
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}.")
    warmup_steps = min(warmup_steps, max_steps)
    decay_steps = max(max_steps - warmup_steps, 1)
    end = learning_rate * end_factor
    if schedule == "cosine":
        decay = optax.cosine_decay_schedule(learning_rate, decay_steps, alpha=end_factor)
    elif schedule == "linear":
        decay = optax.linear_schedule(learning_rate, end, decay_steps)
    else:
        decay = optax.constant_schedule(learning_rate)
    if warmup_steps == 0:
        return decay
    warmup = optax.linear_schedule(0.0, learning_rate, warmup_steps)
    return optax.join_schedules([warmup, decay], [warmup_steps])


def make_optimizer(learning_rate: float, max_steps: int, *, warmup_steps: int = 0,
                   schedule: str = "cosine", weight_decay: float = 0.0,
                   max_grad_norm: float | None = 1.0) -> optax.GradientTransformation:
    """AdamW with warmup and a decay schedule, after global-norm gradient clipping.

    Example:
        >>> import jax.numpy as jnp
        >>> optimizer = make_optimizer(2e-4, max_steps=200, warmup_steps=20, schedule="cosine")
        >>> state = optimizer.init({"w": jnp.zeros(3)})

    Weight decay (decoupled, Loshchilov & Hutter 2019) applies to every
    trainable leaf; PEFT / transformers default to none for LoRA.
    """
    lr = learning_rate_schedule(learning_rate, max_steps, warmup_steps=warmup_steps, schedule=schedule)
    return clipped_adamw(lr, weight_decay=weight_decay, max_grad_norm=max_grad_norm)


def clipped_adamw(learning_rate: float | optax.Schedule, *, weight_decay: float = 0.0,
                  max_grad_norm: float | None = 1.0) -> optax.GradientTransformation:
    """AdamW at ``learning_rate`` (a number or a schedule), after global-norm clipping (None / 0: off).

    Example:
        >>> import jax.numpy as jnp
        >>> schedule = learning_rate_schedule(1e-3, 100, warmup_steps=10)
        >>> optimizer = clipped_adamw(schedule, max_grad_norm=1.0)   # one schedule: also log it
        >>> params = {"w": jnp.zeros(2)}
        >>> updates, _ = optimizer.update({"w": jnp.full(2, 10.0)}, optimizer.init(params), params)
        >>> updates["w"].tolist()                                    # step 0 of warmup: lr 0
        [-0.0, -0.0]
    """
    parts = []
    if max_grad_norm:
        parts.append(optax.clip_by_global_norm(max_grad_norm))
    parts.append(optax.adamw(learning_rate, weight_decay=weight_decay))
    return optax.chain(*parts)


def init_state(adapter: dict[str, Any], trainable_params: dict[str, jax.Array],
               optimizer: optax.GradientTransformation, seed: int) -> TrainState:
    """A step-0 :class:`TrainState`; the adapter is kept in float32.

    The arrays are copies: the train step donates (reuses) the state's
    buffers, which must not be the caller's adapter or params.

    Example:
        >>> import jax.numpy as jnp
        >>> adapter = {"q": {"lora_A": jnp.ones((4, 2), jnp.bfloat16), "lora_B": jnp.zeros((2, 4))}}
        >>> state = init_state(adapter, {}, make_optimizer(1e-3, 10), seed=0)
        >>> state.trainable["adapter"]["q"]["lora_A"].dtype, int(state.step)
        (dtype('float32'), 0)
    """
    def copy(x: Any) -> jax.Array:
        dtype = jnp.float32 if jnp.issubdtype(jnp.result_type(x), jnp.floating) else None
        return jnp.array(x, dtype=dtype, copy=True)

    trainable = {"adapter": jax.tree.map(copy, adapter), "params": jax.tree.map(copy, trainable_params)}
    rng = jax.random.key_data(jax.random.key(seed))
    return TrainState(jnp.zeros((), jnp.int32), trainable, optimizer.init(trainable), rng)


# -- steps ---------------------------------------------------------------------------------

def make_train_step(apply_fn: ApplyFn | Any, config: LoraConfig, optimizer: optax.GradientTransformation,
                    *, remat: str | None = None, loss_chunk: int | None = DEFAULT_LOSS_CHUNK,
                    cpu_scheduler: str = DEFAULT_CPU_SCHEDULER, donate: bool = True) -> Callable[..., Any]:
    """A jit-compiled ``step(state, params, batch) -> (state, metrics)``.

    ``batch`` arrays have shape ``(grad_accum, B, L)``: the gradient is
    accumulated over the leading axis with ``lax.scan`` and normalised by the
    number of target tokens in the whole batch, so ``grad_accum=2`` with
    ``B=4`` gives the same update as ``grad_accum=1`` with ``B=8``. Metrics:
    ``loss`` (mean NLL per target token), ``target_tokens``, ``tokens``
    (non-padding) and ``grad_norm``.

    Example:
        >>> from lora_jax.config import LoraConfig
        >>> import jax, jax.numpy as jnp, lora_jax
        >>> params = {"embed": {"embedding": jnp.eye(4)}, "out": {"kernel": jnp.eye(4)}}
        >>> def apply_fn(p, ids, mask):
        ...     return jnp.take(p["embed"]["embedding"], ids, axis=0) @ p["out"]["kernel"]
        >>> config = LoraConfig(r=2, target_modules=["out"])
        >>> optimizer = make_optimizer(1e-2, max_steps=10)
        >>> state = init_state(lora_jax.init(config, params, jax.random.key(0)), {}, optimizer, seed=0)
        >>> step = make_train_step(apply_fn, config, optimizer)
        >>> batch = {"input_ids": jnp.array([[[0, 1, 2, 3]]]), "attention_mask": jnp.ones((1, 1, 4), jnp.int32),
        ...          "loss_mask": jnp.ones((1, 1, 4), bool)}            # (grad_accum, B, L)
        >>> state, metrics = step(state, params, batch)
        >>> int(state.step), float(metrics["target_tokens"]), sorted(metrics)
        (1, 3.0, ['grad_norm', 'loss', 'target_tokens', 'tokens'])

    ``apply_fn``, ``remat`` and ``loss_chunk`` are as in :func:`make_loss_fn`;
    ``cpu_scheduler`` as in :func:`compiler_options`.
    """
    loss_fn = make_loss_fn(apply_fn, config, remat=remat, loss_chunk=loss_chunk)
    use_dropout = config.lora_dropout > 0

    def step(state: TrainState, params: Any, batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
        total = jnp.maximum(jnp.sum(batch["loss_mask"][..., 1:].astype(jnp.float32)), 1.0)
        step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

        def micro(grads: Any, inputs: tuple[jax.Array, dict[str, jax.Array]]) -> tuple[Any, jax.Array]:
            index, micro_batch = inputs
            rng = jax.random.fold_in(step_key, index) if use_dropout else None

            def scaled(trainable: dict[str, Any]) -> tuple[jax.Array, jax.Array]:
                nll, _ = loss_fn(trainable, params, micro_batch, rng)
                return nll / total, nll

            g, nll = jax.grad(scaled, has_aux=True)(state.trainable)
            return jax.tree.map(jnp.add, grads, g), nll

        zeros = jax.tree.map(jnp.zeros_like, state.trainable)
        accum = batch["input_ids"].shape[0]
        grads, nlls = jax.lax.scan(micro, zeros, (jnp.arange(accum), batch))
        updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        metrics = {
            "loss": jnp.sum(nlls) / total,
            "target_tokens": total,
            "tokens": jnp.sum(batch["attention_mask"]),
            "grad_norm": optax.global_norm(grads),
        }
        return TrainState(state.step + 1, trainable, opt_state, state.rng), metrics

    return jax.jit(step, donate_argnums=(0,) if donate else (),
                   compiler_options=compiler_options(cpu_scheduler))


def make_eval_step(apply_fn: ApplyFn | Any, config: LoraConfig, *,
                   loss_chunk: int | None = DEFAULT_LOSS_CHUNK,
                   cpu_scheduler: str = DEFAULT_CPU_SCHEDULER) -> Callable[..., Any]:
    """A jit-compiled ``eval_step(trainable, params, batch) -> (nll_sum, count)`` (no dropout).

    ``batch`` arrays have shape ``(1, B, L)`` as from :func:`~lora_jax.train.batches.eval_batches`.

    Example:
        >>> from lora_jax.config import LoraConfig
        >>> import jax, jax.numpy as jnp, lora_jax
        >>> params = {"head": {"kernel": jnp.zeros((3, 3))}}            # uniform over 3 tokens
        >>> apply_fn = lambda p, ids, mask: jax.nn.one_hot(ids, 3) @ p["head"]["kernel"]
        >>> config = LoraConfig(r=1, target_modules=["head"])
        >>> trainable = {"adapter": lora_jax.init(config, params, jax.random.key(0)), "params": {}}
        >>> batch = {"input_ids": jnp.array([[[0, 1, 2]]]), "attention_mask": jnp.ones((1, 1, 3), jnp.int32),
        ...          "loss_mask": jnp.ones((1, 1, 3), bool)}                # (1, B, L)
        >>> nll, count = make_eval_step(apply_fn, config)(trainable, params, batch)
        >>> round(float(nll / count), 4), float(count)                   # log(3) per predicted token
        (1.0986, 2.0)

    ``apply_fn`` and ``loss_chunk`` are as in :func:`make_loss_fn` (no remat: nothing
    is differentiated), ``cpu_scheduler`` as in :func:`compiler_options`.
    """
    loss_fn = make_loss_fn(apply_fn, config, loss_chunk=loss_chunk)

    def eval_step(trainable: dict[str, Any], params: Any, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        micro = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), batch)
        return loss_fn(trainable, params, micro, None)

    return jax.jit(eval_step, compiler_options=compiler_options(cpu_scheduler))
