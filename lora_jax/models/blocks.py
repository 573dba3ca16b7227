"""Linen blocks shared by the model families: self-attention, MLPs and the layer stack.

A family is its config, its decoder (or encoder) layer and its top-level model; the
pieces in between come from here, each configured by a small frozen dataclass that
the family config builds (``LlamaConfig.attention`` is an :class:`AttentionConfig`).
Param names are fields of those configs, so the trees still mirror each family's
PyTorch module names.

A layer in a stack is called as ``layer(x, layer_cache, *args) -> (x, layer_cache)``;
``layer_cache`` is None without a KV cache (and always for encoders).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from .layers import Dtype, RMSNorm, activation, attend, dense_init

# ------------------------------------------------------------------------ base module

# The name under which every projection's output is tagged for the remat policies.
PROJECTION = "projection"


class Dense(nn.Dense):
    """``nn.Dense`` whose output is tagged :data:`PROJECTION` (``jax.ad_checkpoint.checkpoint_name``).

    The same params and the same value as ``nn.Dense``; the tag lets the ``"dots"`` and
    ``"offload"`` remat policies keep the projections' outputs, whatever computed them (a
    plain dot, or LoRA's ``x@W + s(x@A)@B``, whose thin intermediate is then recomputed).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from lora_jax.models.blocks import Dense
        >>> params = Dense(3).init(jax.random.key(0), jnp.ones((2, 4)))
        >>> jax.make_jaxpr(lambda x: Dense(3).apply(params, x))(jnp.ones((2, 4))).eqns[-1].params
        {'name': 'projection'}
    """

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        return checkpoint_name(super().__call__(inputs), PROJECTION)



class ConfigModule(nn.Module):
    """A linen module built from one frozen config, with compute and param dtypes.

    ``config`` must have ``initializer_range`` (the std of random kernels). The helpers
    create children with this module's dtypes; call them from a compact ``__call__``
    or from ``setup``.

    Example:
        >>> import jax, jax.numpy as jnp, flax.linen as nn
        >>> from lora_jax.models.blocks import ConfigModule, MLPConfig
        >>> class TinyLM(ConfigModule):
        ...     @nn.compact
        ...     def __call__(self, ids):
        ...         x = self.embed(10, 4, "wte")(ids)                      # (vocab, dim) table
        ...         x = self.layer_norm(1e-5, "ln")(x) + self.rms_norm(1e-6, "norm")(x)
        ...         return self.dense(10, "lm_head", use_bias=False)(x)    # (dim, vocab) kernel
        >>> model = TinyLM(MLPConfig(8, 4, "relu"), param_dtype=jnp.bfloat16)
        >>> logits, params = jax.eval_shape(model.init_with_output, jax.random.key(0),
        ...                                 jnp.zeros((1, 3), jnp.int32))
        >>> logits.shape, jax.tree.map(jnp.shape, params["params"])  # doctest: +NORMALIZE_WHITESPACE
        ((1, 3, 10), {'lm_head': {'kernel': (4, 10)}, 'ln': {'bias': (4,), 'scale': (4,)},
                      'norm': {'scale': (4,)}, 'wte': {'embedding': (10, 4)}})
        >>> params["params"]["wte"]["embedding"].dtype, model.kw["param_dtype"]
        (dtype(bfloat16), <class 'jax.numpy.bfloat16'>)
    """

    config: Any
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def kw(self) -> dict[str, Dtype]:
        """``dtype`` and ``param_dtype``, to pass on to a child ``ConfigModule`` (see the
        class example)."""
        return {"dtype": self.dtype, "param_dtype": self.param_dtype}

    def dense(self, features: int, name: str | None, use_bias: bool = True) -> nn.Dense:
        """A :class:`Dense` with kernel init normal(0, ``config.initializer_range``) (see the
        class example)."""
        return Dense(features, use_bias=use_bias, kernel_init=dense_init(
            self.config.initializer_range), name=name, **self.kw)

    def layer_norm(self, eps: float, name: str | None, affine: bool = True) -> nn.LayerNorm:
        """torch's LayerNorm: exact two-pass variance, ``scale`` and ``bias`` (none when
        not ``affine``, torch's ``elementwise_affine=False``) (see the class example)."""
        return nn.LayerNorm(epsilon=eps, use_fast_variance=False, use_bias=affine,
                            use_scale=affine, name=name, **self.kw)

    def rms_norm(self, eps: float, name: str | None, unit_offset: bool = False) -> RMSNorm:
        """Llama's RMSNorm, statistics in float32; Gemma's ``(1 + scale)`` one with
        ``unit_offset`` (see the class example)."""
        return RMSNorm(eps, name=name, unit_offset=unit_offset, **self.kw)

    def embed(self, num_embeddings: int, features: int, name: str | None) -> nn.Embed:
        """An embedding table, init normal(0, ``config.initializer_range``) (see the class
        example)."""
        return nn.Embed(num_embeddings, features, embedding_init=dense_init(
            self.config.initializer_range), name=name, **self.kw)


# ------------------------------------------------------------------------- attention


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """What a :class:`SelfAttention` computes: heads, widths, biases and param names.

    Example:
        >>> from lora_jax.models.blocks import AttentionConfig
        >>> AttentionConfig(num_heads=8, num_kv_heads=2, head_dim=16, features=128).names
        ('q_proj', 'k_proj', 'v_proj', 'o_proj')

    Attributes:
        num_heads: query heads.
        num_kv_heads: key/value heads (grouped-query attention when fewer than queries).
        head_dim: width of one head.
        features: width of the output projection; None for none (BERT's output
            projection belongs to another module).
        qkv_bias, out_bias: whether the q/k/v and the output projections have a bias.
        names: param names of the q, k, v and output projections.
        scale: multiplier of the scores; None for ``head_dim ** -0.5``.
        initializer_range: std of random kernels.
        softcap: soft cap of the scaled scores (Gemma 2), or None.
        qk_norm_eps: if set, each query and key head is RMS-normed over ``head_dim``
            before RoPE (params ``q_norm`` / ``k_norm``, as Gemma 3 and Qwen3), with this
            epsilon.
        qk_norm_unit_offset: those norms scale by ``1 + scale`` (Gemma's RMSNorm).
        fused_qkv: if set, the name of one projection that computes q, k and v together
            (Phi-3's ``qkv_proj``: outputs q, then k, then v); the q/k/v ``names`` are
            then unused.
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    features: int | None
    qkv_bias: bool = False
    out_bias: bool = False
    names: tuple[str, str, str, str] = ("q_proj", "k_proj", "v_proj", "o_proj")
    scale: float | None = None
    initializer_range: float = 0.02
    softcap: float | None = None
    qk_norm_eps: float | None = None
    qk_norm_unit_offset: bool = False
    fused_qkv: str | None = None


class SelfAttention(ConfigModule):
    """Self-attention with separate q/k/v projections, grouped-query heads, optional
    RoPE and KV cache; ``__call__`` returns ``(output, layer_cache)``.

    Args of ``__call__``:
        x: (batch, seq, dim).
        mask: boolean, broadcastable to (batch, 1, seq, keys); True = attend.
        rope: ``(cos, sin)`` from ``rope_angles``, or None for no rotary embedding.
        layer_cache: ``{"k", "v"}`` of this layer, or None; with one, this call's keys
            and values are written at slot ``index`` and the keys are every cache slot.
        index: the cache slot of this call's first token.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from lora_jax.models.blocks import AttentionConfig, SelfAttention
        >>> attention = SelfAttention(AttentionConfig(4, 2, 8, features=32))
        >>> x = jnp.ones((1, 5, 32))
        >>> (out, _), params = jax.eval_shape(attention.init_with_output, jax.random.key(0), x, None)
        >>> out.shape, params["params"]["k_proj"]["kernel"].shape
        ((1, 5, 32), (32, 16))
    """

    config: AttentionConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None, rope: Any = None,
                 layer_cache: dict[str, jax.Array] | None = None,
                 index: jax.Array | None = None) -> tuple[jax.Array, Any]:
        cfg = self.config
        batch, seq, _ = x.shape
        q_name, k_name, v_name, out_name = cfg.names
        heads = {q_name: cfg.num_heads, k_name: cfg.num_kv_heads, v_name: cfg.num_kv_heads}
        if cfg.fused_qkv is None:
            projected = [self.dense(n * cfg.head_dim, name, cfg.qkv_bias)(x)
                         for name, n in heads.items()]
        else:  # one kernel; LoRA on it adapts q, k and v together, as PEFT does
            qkv = self.dense(sum(heads.values()) * cfg.head_dim, cfg.fused_qkv, cfg.qkv_bias)(x)
            ends = np.cumsum([n * cfg.head_dim for n in heads.values()])[:-1]
            projected = jnp.split(qkv, ends, axis=-1)
        q, k, v = [h.reshape(batch, seq, n, cfg.head_dim)
                   for h, n in zip(projected, heads.values())]
        if cfg.qk_norm_eps is not None:
            q = self.rms_norm(cfg.qk_norm_eps, "q_norm", cfg.qk_norm_unit_offset)(q)
            k = self.rms_norm(cfg.qk_norm_eps, "k_norm", cfg.qk_norm_unit_offset)(k)
        scale = cfg.head_dim**-0.5 if cfg.scale is None else cfg.scale
        out, layer_cache = attend(q, k, v, mask, scale=scale, rope=rope,
                                  layer_cache=layer_cache, index=index, softcap=cfg.softcap)
        if cfg.features is not None:
            out = self.dense(cfg.features, out_name, cfg.out_bias)(out)
        return out, layer_cache


# ------------------------------------------------------------------------------- MLP


@dataclasses.dataclass(frozen=True)
class MLPConfig:
    """What an :class:`MLP` computes: widths, activation, bias and param names.

    Three ``names`` make a gated MLP, ``down(act(gate(x)) * up(x))`` (Llama); two a
    plain one, ``out(act(in(x)))`` (GPT-2), or with ``fused_gate_up`` a gated one whose
    first projection computes gate and up together (Phi-3's ``gate_up_proj``: the gate
    is the first half of its output).

    Example:
        >>> from lora_jax.models.blocks import MLPConfig
        >>> MLPConfig(intermediate_size=64, features=16, activation="silu").gated
        True
    """

    intermediate_size: int
    features: int
    activation: str
    use_bias: bool = False
    names: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
    initializer_range: float = 0.02
    fused_gate_up: bool = False

    @property
    def gated(self) -> bool:
        """Whether the MLP has a gate projection (three names, or ``fused_gate_up``).

        Example:
            >>> from lora_jax.models.blocks import MLPConfig
            >>> MLPConfig(64, 16, "gelu_new", names=("c_fc", "c_proj")).gated
            False
        """
        return len(self.names) == 3 or self.fused_gate_up


class MLP(ConfigModule):
    """The feed-forward block: gated (``gate``, ``up``, ``down``) or plain (``in``, ``out``).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from lora_jax.models.blocks import MLP, MLPConfig
        >>> mlp = MLP(MLPConfig(64, 16, "gelu_new", use_bias=True, names=("c_fc", "c_proj")))
        >>> out, params = jax.eval_shape(mlp.init_with_output, jax.random.key(0),
        ...                              jnp.ones((1, 3, 16)))
        >>> out.shape, sorted(params["params"])
        ((1, 3, 16), ['c_fc', 'c_proj'])
    """

    config: MLPConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        act = activation(cfg.activation)
        if cfg.fused_gate_up:
            gate_up, down = cfg.names
            gate, up = jnp.split(self.dense(2 * cfg.intermediate_size, gate_up, cfg.use_bias)(x), 2, -1)
            hidden = act(gate) * up
        elif cfg.gated:
            gate, up, down = cfg.names
            hidden = act(self.dense(cfg.intermediate_size, gate, cfg.use_bias)(x))
            hidden = hidden * self.dense(cfg.intermediate_size, up, cfg.use_bias)(x)
        else:
            up, down = cfg.names
            hidden = act(self.dense(cfg.intermediate_size, up, cfg.use_bias)(x))
        return self.dense(cfg.features, down, cfg.use_bias)(hidden)


# ---------------------------------------------------------------------------- remat

REMAT_POLICIES = ("none", "dots", "full", "offload")


def remat_policy(name: str) -> Callable[..., Any] | None:
    """The ``jax.checkpoint`` policy of a per-layer remat setting (None: no remat).

    - ``"none"``: no rematerialisation; the backward pass keeps every activation.
    - ``"dots"``: each layer keeps its projections' outputs (every :class:`Dense`,
      tagged :data:`PROJECTION`) and recomputes the rest (norms, RoPE, attention,
      activations) in the backward pass. As ``dots_with_no_batch_dims_saveable`` for a
      plain model, but LoRA-aware: a LoRA'd projection keeps its one output, not the base
      dot and the low-rank product separately.
    - ``"full"``: each layer keeps only its input and recomputes its whole forward pass.
    - ``"offload"``: as ``"dots"``, with the kept outputs moved to host memory
      (``pinned_host``) until the backward pass; needs a backend with a host memory
      space distinct from the device's (a GPU or TPU). On CPU, whose "device" memory is
      host memory already, it is refused with a message naming ``"dots"``.

    Example:
        >>> import jax
        >>> from lora_jax.models.blocks import remat_policy
        >>> remat_policy("none") is None, remat_policy("full") is jax.checkpoint_policies.nothing_saveable
        (True, True)
        >>> remat_policy("some")
        Traceback (most recent call last):
        ...
        ValueError: unknown remat policy 'some'; expected one of 'none', 'dots', 'full', 'offload'
    """
    if name == "none":
        return None
    if name == "dots":
        return jax.checkpoint_policies.save_only_these_names(PROJECTION)
    if name == "full":
        return jax.checkpoint_policies.nothing_saveable
    if name == "offload":
        check_offload_supported()
        return jax.checkpoint_policies.save_and_offload_only_these_names(
            names_which_can_be_saved=(), names_which_can_be_offloaded=(PROJECTION,),
            offload_src="device", offload_dst="pinned_host")
    raise ValueError(f"unknown remat policy {name!r}; expected one of "
                     + ", ".join(repr(p) for p in REMAT_POLICIES))


def check_offload_supported(backend: str | None = None) -> None:
    """Raise ``ValueError`` unless ``backend`` (default: JAX's default) can offload to host.

    Example:
        >>> from lora_jax.models.blocks import check_offload_supported
        >>> check_offload_supported("cpu")
        Traceback (most recent call last):
        ...
        ValueError: remat policy 'offload' moves saved activations from device to host memory, and on the cpu backend device memory is host memory: there is nothing to gain. Use 'dots' (the same activations, kept in place) or 'full'.
    """
    backend = backend or jax.default_backend()
    if backend == "cpu":
        raise ValueError(
            f"remat policy 'offload' moves saved activations from device to host memory, and on the "
            f"{backend} backend device memory is host memory: there is nothing to gain. Use 'dots' "
            "(the same activations, kept in place) or 'full'.")
    kinds = {m.kind for m in jax.devices(backend)[0].addressable_memories()}
    if "pinned_host" not in kinds:
        raise ValueError(f"remat policy 'offload' needs a 'pinned_host' memory space; the {backend} "
                         f"backend has {sorted(kinds)}. Use 'dots' or 'full'.")


def rematted(layer: type[nn.Module], remat: str, *, scan: bool = False) -> type[nn.Module]:
    """``layer`` under the per-layer remat ``remat`` (see :func:`remat_policy`); itself for "none".

    Example:
        >>> from lora_jax.models.blocks import MLP, rematted
        >>> rematted(MLP, "none") is MLP, rematted(MLP, "full").__name__
        (True, 'CheckpointMLP')
    """
    policy = remat_policy(remat)
    if remat == "none":
        return layer
    # Inside a scan the body is one XLA computation anyway: CSE across the recomputation
    # cannot undo the remat there, and preventing it costs (jax.checkpoint's docs).
    return nn.remat(layer, policy=policy, prevent_cse=not scan)


# ----------------------------------------------------------------------- layer stack


class PerLayer(tuple):
    """A stack argument that differs by layer: layer ``i`` of an unrolled stack gets item ``i``.

    Example:
        >>> from lora_jax.models.blocks import PerLayer
        >>> PerLayer(["full", "window"])[1]
        'window'
    """


class UnrolledLayers(nn.Module):
    """``num_layers`` copies of ``layer`` as children ``"0"``, ``"1"``, ...;
    ``__call__(x, caches, *args)`` returns ``(x, caches)``.

    ``caches`` is None or a sequence with one layer cache per layer. A layer class
    with a ``layer_idx`` field gets its index. An argument wrapped in
    :class:`PerLayer` gives each layer its own item; the others go to every layer.

    ``ordered`` (for rematerialised layers, see :func:`rematted`): on the CPU backend each
    layer runs as ``lax.cond(p, layer, layer, ...)``, both branches the same layer. The
    backward pass of a conditional is a conditional taking the incoming gradient, so
    XLA:CPU can neither merge a layer's recomputation with the forward pass (it drops
    ``jax.checkpoint``'s optimization barriers early) nor start it before that gradient
    exists, which it otherwise does for most layers at once, keeping their recomputed
    activations alive together.

    Example:
        >>> import jax, jax.numpy as jnp, flax.linen as nn
        >>> from lora_jax.models.blocks import (MLP, MLPConfig, ConfigModule, PerLayer,
        ...     UnrolledLayers)
        >>> class Residual(ConfigModule):
        ...     @nn.compact
        ...     def __call__(self, x, layer_cache, gain):
        ...         return x + gain * MLP(self.config, name="mlp")(x), layer_cache
        >>> stack = UnrolledLayers(Residual, MLPConfig(8, 4, "relu"), num_layers=2)
        >>> (out, _), params = stack.init_with_output(
        ...     jax.random.key(0), jnp.ones((1, 4)), None, PerLayer([1.0, 0.5]))
        >>> out.shape, sorted(params["params"])
        ((1, 4), ['0', '1'])
    """

    layer: type[nn.Module]
    config: Any
    num_layers: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    ordered: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, caches: Sequence[Any] | None,
                 *args: Any) -> tuple[jax.Array, tuple[Any, ...] | None]:
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        with_index = "layer_idx" in {f.name for f in dataclasses.fields(self.layer)}
        in_conditional = self.ordered and jax.default_backend() == "cpu" and not self.is_initializing()
        new_caches = []
        for i in range(self.num_layers):
            layer_args = [a[i] if isinstance(a, PerLayer) else a for a in args]
            extra = {"layer_idx": i} if with_index else {}
            layer = self.layer(self.config, name=str(i), **extra, **kw)
            layer_cache = None if caches is None else caches[i]
            if in_conditional:
                x, layer_cache = nn.cond(_unfoldable_true(x), _call, _call, layer, x, layer_cache,
                                         *layer_args)
            else:
                x, layer_cache = layer(x, layer_cache, *layer_args)
            new_caches.append(layer_cache)
        return x, None if caches is None else tuple(new_caches)


def _call(layer: nn.Module, *args: Any) -> Any:
    return layer(*args)


def _unfoldable_true(x: jax.Array) -> jax.Array:
    """A predicate XLA cannot fold (True unless ``x``'s first element is NaN). Both branches
    of :class:`UnrolledLayers`' conditional are the same layer, so its value never matters."""
    first = x.reshape(-1)[0]
    return first == first


def layer_stack(layer: type[nn.Module], config: Any, num_layers: int, *, scan: bool,
                num_args: int, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
                name: str | None = None, scanned_args: Sequence[int] = (),
                remat: str = "none") -> nn.Module:
    """The stack of ``num_layers`` layers, unrolled or as one ``nn.scan``-ed layer.

    Both are called ``stack(x, caches, *args)`` with ``num_args`` further arguments
    and return ``(x, caches)``. Unrolled, params sit under ``"0"``, ``"1"``, ...
    (:class:`UnrolledLayers`); scanned, the stack *is* the layer, its params gain a
    leading layer axis, ``caches`` is one tree with a leading layer axis, and every
    argument is the same for all layers (no :class:`PerLayer`) except those at the
    positions ``scanned_args`` (0 = the first of ``args``): these carry a leading layer
    axis and layer ``i`` gets slice ``i``, the scanned form of a :class:`PerLayer`.
    ``remat`` names the per-layer rematerialisation (:func:`remat_policy`): each layer
    is one ``jax.checkpoint``, so the backward pass holds one layer's recomputed
    activations at a time. It changes no param and no value.

    Example:
        >>> import jax, jax.numpy as jnp, flax.linen as nn
        >>> from lora_jax.models.blocks import MLP, MLPConfig, ConfigModule, layer_stack
        >>> class Residual(ConfigModule):
        ...     @nn.compact
        ...     def __call__(self, x, layer_cache):
        ...         return x + MLP(self.config, name="mlp")(x), layer_cache
        >>> stack = layer_stack(Residual, MLPConfig(8, 4, "relu"), 3, scan=True, num_args=0)
        >>> params = jax.eval_shape(stack.init, jax.random.key(0), jnp.ones((1, 4)), None)
        >>> params["params"]["mlp"]["up_proj"]["kernel"].shape
        (3, 4, 8)

        A per-layer argument under scan (here a gain per layer, as ``PerLayer`` would
        give the unrolled stack):

        >>> class Scaled(ConfigModule):
        ...     @nn.compact
        ...     def __call__(self, x, layer_cache, gain):
        ...         return x * gain, layer_cache
        >>> stack = layer_stack(Scaled, None, 3, scan=True, num_args=1, scanned_args=[0])
        >>> stack.apply({}, jnp.ones((1, 2)), None, jnp.array([2.0, 3.0, 0.5]))[0]
        Array([[3., 3.]], dtype=float32)
    """
    kw = {"dtype": dtype, "param_dtype": param_dtype, "name": name}
    layer = rematted(layer, remat, scan=scan)
    if not scan:
        return UnrolledLayers(layer, config, num_layers, ordered=remat != "none", **kw)
    bad = sorted(set(scanned_args) - set(range(num_args)))
    if bad:
        raise ValueError(f"scanned_args {bad} are not argument positions 0..{num_args - 1}")
    in_axes = [0 if i in scanned_args else nn.broadcast for i in range(num_args)]
    return nn.scan(
        layer,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=(0, *in_axes),
        length=num_layers,
    )(config, **kw)
