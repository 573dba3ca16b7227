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
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lora_jax.config import LoraConfig
from lora_jax.transform import lora
from lora_jax.tree import split_path, trainable_mask

ApplyFn = Callable[[Any, jax.Array, jax.Array], jax.Array]
SCHEDULES = ("cosine", "linear", "constant")


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
    flat_params = jax.tree.leaves(params)
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

    return jax.tree_util.tree_map_with_path(pick, params)


def cast_floating(tree: Any, dtype: Any) -> Any:
    """Every floating-point leaf of ``tree`` cast to ``dtype`` (e.g. frozen params to bfloat16).

    Example:
        >>> import jax.numpy as jnp
        >>> tree = cast_floating({"w": jnp.ones(2), "ids": jnp.arange(2)}, jnp.bfloat16)
        >>> tree["w"].dtype, tree["ids"].dtype
        (dtype(bfloat16), dtype('int32'))
    """
    return jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x, tree
    )


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


def make_loss_fn(apply_fn: ApplyFn, config: LoraConfig, *, remat: str | None = None) -> Callable[..., Any]:
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
    ``(B, L)``; ``rng`` (a key or None) drives LoRA dropout. ``remat`` names a
    ``jax.checkpoint_policies`` policy (e.g. ``"dots_with_no_batch_dims_saveable"``,
    ``"nothing_saveable"``) under which the forward pass is rematerialised in
    the backward pass, trading compute for activation memory.
    """
    lora_apply = lora(apply_fn, config)

    def logits_fn(trainable: dict[str, Any], params: Any, input_ids: jax.Array,
                  attention_mask: jax.Array, rng: jax.Array | None) -> jax.Array:
        full = with_leaves(params, trainable["params"])
        return lora_apply(full, trainable["adapter"], input_ids, attention_mask, lora_rng=rng)

    if remat is not None:
        logits_fn = jax.checkpoint(logits_fn, policy=remat_policy(remat))

    def loss(trainable: dict[str, Any], params: Any, batch: dict[str, jax.Array],
             rng: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        logits = logits_fn(trainable, params, batch["input_ids"], batch["attention_mask"], rng)
        return causal_lm_loss(logits, batch["input_ids"], batch["loss_mask"])

    return loss


def remat_policy(name: str) -> Callable[..., Any] | None:
    """A ``jax.checkpoint_policies`` member by name; ``"full"`` saves nothing.

    Example:
        >>> import jax
        >>> remat_policy("full") is jax.checkpoint_policies.nothing_saveable
        True
        >>> remat_policy("dots_saveable") is jax.checkpoint_policies.dots_saveable
        True
    """
    if name in ("full", "nothing_saveable"):
        return jax.checkpoint_policies.nothing_saveable
    policy = getattr(jax.checkpoint_policies, name, None)
    if policy is None or name.startswith("_") or name.startswith("save_"):
        choices = sorted(n for n in dir(jax.checkpoint_policies)
                         if n.endswith("saveable") and not n.startswith("_"))
        raise ValueError(f"Unknown remat policy {name!r}; choose 'full' or one of {choices}.")
    return policy


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

def make_train_step(apply_fn: ApplyFn, config: LoraConfig, optimizer: optax.GradientTransformation,
                    *, remat: str | None = None, donate: bool = True) -> Callable[..., Any]:
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
    """
    loss_fn = make_loss_fn(apply_fn, config, remat=remat)
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

    return jax.jit(step, donate_argnums=(0,) if donate else ())


def make_eval_step(apply_fn: ApplyFn, config: LoraConfig) -> Callable[..., Any]:
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
    """
    loss_fn = make_loss_fn(apply_fn, config)

    def eval_step(trainable: dict[str, Any], params: Any, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        micro = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), batch)
        return loss_fn(trainable, params, micro, None)

    return jax.jit(eval_step)
