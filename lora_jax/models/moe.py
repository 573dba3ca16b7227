"""A sparse mixture-of-experts feed-forward block: a top-k router and a stack of gated
experts, as transformers 5 lays out Qwen3-MoE and Mixtral.

Params (mirroring transformers' bare ``nn.Parameter``s in ``param`` leaves, see
:data:`lora_jax.models.family.PARAMETER_LEAF`)::

    gate.weight.param               (hidden, experts)                  the router
    experts.gate_up_proj.param      (experts, hidden, 2 * intermediate)
    experts.down_proj.param         (experts, intermediate, hidden)

Each is its torch tensor with the last two axes swapped: a kernel laid out (in, out),
the expert stacks with a leading expert axis. ``gate_up_proj`` outputs the gate, then up.

Routing is transformers': softmax of the router logits in float32, the top
``num_experts_per_tok`` probabilities, renormalised to sum to one when
``norm_topk_prob``, cast to the logits' dtype. The experts are computed densely: every
expert on every token, combined with the routing weights (zero for the experts a token
does not use). That gives exactly the sparse result, keeps every expert kernel in two
``dot_general``s with the expert axis as a free and then a batch axis (the form
:func:`lora_jax.lora` rewrites into low-rank dots), and costs ``num_experts /
num_experts_per_tok`` times the FLOPs of a sparse dispatch.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from .blocks import ConfigModule
from .family import PARAMETER_LEAF
from .layers import Dtype, activation, dense_init


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """What a :class:`SparseMoE` computes: experts, routing, widths and activation.

    Example:
        >>> from lora_jax.models.moe import MoEConfig
        >>> MoEConfig(num_experts=8, top_k=2, intermediate_size=32, features=16,
        ...           activation="silu").norm_topk_prob
        True

    Attributes:
        num_experts: experts in the block.
        top_k: experts each token uses (``num_experts_per_tok``).
        intermediate_size: width of one expert's gated MLP (``moe_intermediate_size``).
        features: the model width (``hidden_size``).
        activation: the gate's activation (``hidden_act``).
        norm_topk_prob: renormalise the top-k probabilities to sum to one (Mixtral
            always does; Qwen3-MoE's ``norm_topk_prob``).
        initializer_range: std of random router and expert weights.
    """

    num_experts: int
    top_k: int
    intermediate_size: int
    features: int
    activation: str
    norm_topk_prob: bool = True
    initializer_range: float = 0.02


class Parameters(nn.Module):
    """Bare torch-style parameters: child ``<name>`` holds leaf ``param`` of its shape;
    ``__call__()`` returns ``{name: array}``.

    Example:
        >>> import jax
        >>> from lora_jax.models.moe import Parameters
        >>> group = Parameters((("weight", (4, 2)),), stddev=0.02)
        >>> jax.tree.map(lambda x: x.shape, group.init(jax.random.key(0)))
        {'params': {'weight': {'param': (4, 2)}}}
    """

    shapes: tuple[tuple[str, tuple[int, ...]], ...]
    stddev: float = 0.02
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self) -> dict[str, jax.Array]:
        return {name: _Parameter(shape, self.stddev, self.param_dtype, name=name)()
                for name, shape in self.shapes}


class _Parameter(nn.Module):
    shape: tuple[int, ...]
    stddev: float
    param_dtype: Dtype

    @nn.compact
    def __call__(self) -> jax.Array:
        return self.param(PARAMETER_LEAF, dense_init(self.stddev), self.shape, self.param_dtype)


def route(logits: jax.Array, top_k: int, norm_topk_prob: bool) -> tuple[jax.Array, jax.Array]:
    """transformers' top-k routing: ``(weights, experts)``, each (..., top_k).

    Softmax over the experts in float32, the ``top_k`` largest probabilities (``lax.top_k``:
    exact ties go to the lower expert index), renormalised when ``norm_topk_prob``, cast
    back to the dtype of ``logits``.

    Example:
        >>> import jax.numpy as jnp
        >>> from lora_jax.models.moe import route
        >>> weights, experts = route(jnp.log(jnp.array([[0.1, 0.6, 0.3]])), 2, True)
        >>> experts, jnp.round(weights, 4)
        (Array([[1, 2]], dtype=int32), Array([[0.6667, 0.3333]], dtype=float32))
    """
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = lax.top_k(probs, top_k)
    if norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights.astype(logits.dtype), experts


class SparseMoE(ConfigModule):
    """Router and experts; ``__call__(x)`` maps (..., hidden) to (..., hidden).

    The router logits are sown as ``intermediates["router_logits"]`` (apply with
    ``mutable=["intermediates"]`` to read them).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from lora_jax.models.moe import MoEConfig, SparseMoE
        >>> moe = SparseMoE(MoEConfig(4, 2, intermediate_size=8, features=6, activation="silu"))
        >>> out, params = jax.eval_shape(moe.init_with_output, jax.random.key(0), jnp.ones((1, 3, 6)))
        >>> out.shape, jax.tree.map(lambda x: x.shape, params["params"])  # doctest: +NORMALIZE_WHITESPACE
        ((1, 3, 6), {'experts': {'down_proj': {'param': (4, 8, 6)},
                                 'gate_up_proj': {'param': (4, 6, 16)}},
                     'gate': {'weight': {'param': (6, 4)}}})
    """

    config: MoEConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        stddev = cfg.initializer_range
        (router,) = Parameters(((("weight", (cfg.features, cfg.num_experts)),)), stddev,
                               self.param_dtype, name="gate")().values()
        experts = Parameters((
            ("gate_up_proj", (cfg.num_experts, cfg.features, 2 * cfg.intermediate_size)),
            ("down_proj", (cfg.num_experts, cfg.intermediate_size, cfg.features)),
        ), stddev, self.param_dtype, name="experts")()
        x = x.astype(self.dtype)
        logits = x @ router.astype(self.dtype)                              # (..., E)
        self.sow("intermediates", "router_logits", logits)
        weights, chosen = route(logits, cfg.top_k, cfg.norm_topk_prob)
        # Dense routing weights (..., E): zero for the experts a token does not use.
        dense = jnp.sum(jax.nn.one_hot(chosen, cfg.num_experts, dtype=weights.dtype)
                        * weights[..., None], axis=-2)
        return _experts(x, experts["gate_up_proj"].astype(self.dtype),
                        experts["down_proj"].astype(self.dtype), dense, activation(cfg.activation))


def _experts(x: jax.Array, gate_up: jax.Array, down: jax.Array, weights: jax.Array,
             act: Any) -> jax.Array:
    """Every expert on every token, combined by ``weights`` (..., E)."""
    lead = x.ndim - 1
    # x (..., H) . gate_up (E, H, 2I) -> (..., E, 2I): the expert axis is a free axis.
    hidden = lax.dot_general(x, gate_up, (((lead,), (1,)), ((), ())))
    gate, up = jnp.split(hidden, 2, axis=-1)
    hidden = jnp.moveaxis(act(gate) * up, lead, 0)                        # (E, ..., I)
    # (E, ..., I) . down (E, I, H) -> (E, ..., H): the expert axis is a batch axis.
    out = lax.dot_general(hidden, down, (((hidden.ndim - 1,), (1,)), ((0,), (0,))))
    return jnp.einsum("e...h,...e->...h", out, weights.astype(out.dtype))
