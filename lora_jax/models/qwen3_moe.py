"""Qwen3-MoE decoders: Qwen3's attention, and a sparse mixture of experts in place of
the MLP (of every layer, or of those ``decoder_sparse_step`` / ``mlp_only_layers`` pick).

Param tree (mirrors transformers 5's ``Qwen3MoeForCausalLM``): Qwen3's (see
:mod:`lora_jax.models.qwen3`), with each sparse layer's MLP as
:class:`~lora_jax.models.moe.SparseMoE`::

    model.layers.<i>.mlp.gate.weight.param               (hidden, experts)     router
    model.layers.<i>.mlp.experts.gate_up_proj.param      (experts, hidden, 2 * moe_intermediate)
    model.layers.<i>.mlp.experts.down_proj.param         (experts, moe_intermediate, hidden)

and dense layers' MLP as Llama's (``gate_proj``, ``up_proj``, ``down_proj``, width
``intermediate_size``). Checkpoints may store the experts fused (transformers' in-memory
layout) or per expert (``mlp.experts.<e>.{gate,up,down}_proj.weight``, the released
checkpoints and what ``save_pretrained`` writes); both load.

LoRA on the experts, as PEFT's ``target_parameters=["mlp.experts.gate_up_proj",
"mlp.experts.down_proj"]``: the ``param`` leaves are not ``kernel``s, so name them and
their expert axis (unrolled layers only: in scanned layers an expert adapter would need
two leading axes)::

    LoraConfig(target_modules=["q_proj", "v_proj", "experts.gate_up_proj", "experts.down_proj"],
               kernel_names=("kernel", "embedding", "param"), stacked_modules=r".*\\.experts\\..*")

"all-linear" selects the ``kernel``s (attention, dense MLPs). peft 0.21 on transformers 5
reads "all-linear" and the names ``gate`` / ``gate_proj`` / ``up_proj`` / ``down_proj`` on
this model as the router and the experts (its conversion of transformers-4 adapters, with
rank 2r on ``gate_up_proj``); such adapters load here exactly, and ``save_peft`` refuses
LoRA on dense MLPs, which PEFT would load onto the experts.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn

from .blocks import MLP, ConfigModule, SelfAttention
from .errors import ModelLoadError
from .family import BuildSettings, ConfigReader, ModelFamily
from .llama import FAMILY as LLAMA_FAMILY
from .llama import LlamaForCausalLM, LlamaModel
from .moe import MoEConfig, SparseMoE
from .qwen3 import Qwen3Config

MODEL_TYPES = ("qwen3_moe",)
# How transformers' original checkpoint format splits each fused expert stack.
_EXPERT_PIECES = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}


@dataclasses.dataclass(frozen=True)
class Qwen3MoeConfig(Qwen3Config):
    """A Qwen3-MoE ``config.json`` as the module needs it: :class:`Qwen3Config`'s fields
    and the experts'.

    Example:
        >>> from lora_jax.models.qwen3_moe import Qwen3MoeConfig
        >>> cfg = Qwen3MoeConfig.from_hf({"model_type": "qwen3_moe", "hidden_size": 32,
        ...     "intermediate_size": 64, "moe_intermediate_size": 16, "num_hidden_layers": 4,
        ...     "num_attention_heads": 4, "vocab_size": 50, "num_experts": 8,
        ...     "num_experts_per_tok": 2, "decoder_sparse_step": 2, "mlp_only_layers": [3]})
        >>> cfg.sparse_layers, cfg.head_dim, cfg.moe.top_k
        ((False, True, False, False), 8, 2)

    Attributes (beyond :class:`~lora_jax.models.llama.LlamaConfig`'s):
        num_experts, num_experts_per_tok, moe_intermediate_size, norm_topk_prob: the
            config's, with transformers' defaults (128, 8, 768, false).
        sparse_layers: per layer, whether its MLP is the mixture of experts.
    """

    num_experts: int = 128
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 768
    norm_topk_prob: bool = False
    sparse_layers: tuple[bool, ...] = ()

    @classmethod
    def from_hf(cls, config: dict[str, Any]) -> Qwen3MoeConfig:
        """Read a ``config.json`` dict of model_type qwen3_moe.

        Example:
            >>> from lora_jax.models.qwen3_moe import Qwen3MoeConfig
            >>> Qwen3MoeConfig.from_hf({"model_type": "qwen3_moe", "hidden_size": 32,
            ...     "num_hidden_layers": 1, "num_attention_heads": 4, "vocab_size": 50,
            ...     "intermediate_size": 64, "num_experts": 4, "num_experts_per_tok": 6})
            Traceback (most recent call last):
            ...
            lora_jax.models.errors.ModelLoadError: the qwen3_moe config has num_experts_per_tok=6, more than its num_experts=4
        """
        config = dict(config)
        model_type = config.get("model_type", "qwen3_moe")
        read = ConfigReader(config, model_type)
        # Unlike Qwen3Config, Qwen3MoeConfig has no head_dim default: hidden / heads.
        heads, hidden = read.int("num_attention_heads"), read.int("hidden_size")
        if config.get("head_dim") is None and hidden % heads == 0:
            config["head_dim"] = hidden // heads
        layers = read.int("num_hidden_layers")
        window = read.int("sliding_window", None) if read.bool("use_sliding_window", False) else None
        config.update(use_sliding_window=False)  # every layer's window is set below
        base = super().from_hf(config)
        # transformers 5 writes num_local_experts (its attribute_map name); the released
        # checkpoints have num_experts.
        experts = read.int("num_local_experts", None, minimum=0)
        experts = read.int("num_experts", 128, minimum=0) if experts is None else experts
        top_k = read.int("num_experts_per_tok", 8)
        if experts and top_k > experts:
            raise ModelLoadError(
                f"the {model_type} config has num_experts_per_tok={top_k}, more than its "
                f"num_experts={experts}"
            )
        step = read.int("decoder_sparse_step", 1)
        dense_only = config.get("mlp_only_layers") or []
        if not isinstance(dense_only, list) or not all(isinstance(i, int) for i in dense_only):
            raise ModelLoadError(
                f"the {model_type} config has mlp_only_layers={dense_only!r}; expected a list of "
                "layer indices"
            )
        return dataclasses.replace(
            base,
            sliding_windows=(window,) * layers,
            num_experts=experts,
            num_experts_per_tok=top_k,
            moe_intermediate_size=read.int("moe_intermediate_size", 768),
            norm_topk_prob=read.bool("norm_topk_prob", False),
            sparse_layers=tuple(i not in dense_only and experts > 0 and (i + 1) % step == 0
                                for i in range(layers)),
        )

    @property
    def moe(self) -> MoEConfig:
        """The mixture-of-experts block of the sparse layers.

        Example:
            >>> from lora_jax.models.qwen3_moe import Qwen3MoeConfig
            >>> Qwen3MoeConfig.from_hf({"hidden_size": 32, "intermediate_size": 64,
            ...     "num_hidden_layers": 1, "num_attention_heads": 4, "vocab_size": 50,
            ...     "num_experts": 4, "num_experts_per_tok": 2}).moe.num_experts
            4
        """
        return MoEConfig(self.num_experts, self.num_experts_per_tok, self.moe_intermediate_size,
                         self.hidden_size, self.hidden_act, self.norm_topk_prob,
                         self.initializer_range)


class Qwen3MoeDecoderLayer(ConfigModule):
    """Pre-norm block: attention, then the mixture of experts (or, in a dense layer, the
    MLP), each with a residual connection; called like
    :class:`~lora_jax.models.llama.LlamaDecoderLayer`.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from lora_jax.models.qwen3_moe import Qwen3MoeConfig, Qwen3MoeDecoderLayer
        >>> cfg = Qwen3MoeConfig.from_hf({"hidden_size": 16, "intermediate_size": 32,
        ...     "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 10,
        ...     "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 8})
        >>> (x, _), params = jax.eval_shape(Qwen3MoeDecoderLayer(cfg).init_with_output,
        ...     jax.random.key(0), jnp.ones((1, 3, 16)), None, None, None, None)
        >>> x.shape, sorted(params["params"]["mlp"])
        ((1, 3, 16), ['experts', 'gate'])
    """

    config: Qwen3MoeConfig
    layer_idx: int = 0

    @nn.compact
    def __call__(self, x, layer_cache, rope, mask, index):
        cfg = self.config
        h = self.rms_norm(cfg.rms_norm_eps, "input_layernorm")(x)
        h, layer_cache = SelfAttention(cfg.attention, name="self_attn", **self.kw)(
            h, mask, rope, layer_cache, index
        )
        x = x + h
        h = self.rms_norm(cfg.rms_norm_eps, "post_attention_layernorm")(x)
        if cfg.sparse_layers[self.layer_idx]:
            h = SparseMoE(cfg.moe, name="mlp", **self.kw)(h)
        else:
            h = MLP(cfg.mlp, name="mlp", **self.kw)(h)
        return x + h, layer_cache


class Qwen3MoeModel(LlamaModel):
    """Embeddings, the decoder stack of :class:`Qwen3MoeDecoderLayer` and the final norm.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from lora_jax.models.qwen3_moe import Qwen3MoeConfig, Qwen3MoeModel
        >>> cfg = Qwen3MoeConfig.from_hf({"hidden_size": 16, "intermediate_size": 32,
        ...     "num_hidden_layers": 2, "num_attention_heads": 2, "vocab_size": 10,
        ...     "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 8})
        >>> (_, _), params = jax.eval_shape(Qwen3MoeModel(cfg, scan_layers=True).init_with_output,
        ...     jax.random.key(0), jnp.zeros((1, 3), jnp.int32))
        >>> params["params"]["layers"]["mlp"]["experts"]["down_proj"]["param"].shape
        (2, 4, 8, 16)
    """

    decoder_layer = Qwen3MoeDecoderLayer

    def setup(self) -> None:
        if self.scan_layers and len(set(self.config.sparse_layers)) > 1:
            raise NotImplementedError(
                "scan_layers=True needs the same MLP in every layer; this config mixes dense "
                f"and sparse layers (sparse: {self.config.sparse_layers}). Use scan_layers=False."
            )
        super().setup()


class Qwen3MoeForCausalLM(LlamaForCausalLM):
    """A Qwen3-MoE causal LM; called like :class:`~lora_jax.models.llama.LlamaForCausalLM`.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from lora_jax.models.qwen3_moe import Qwen3MoeConfig, Qwen3MoeForCausalLM
        >>> cfg = Qwen3MoeConfig.from_hf({"hidden_size": 16, "intermediate_size": 32,
        ...     "num_hidden_layers": 2, "num_attention_heads": 2, "vocab_size": 10,
        ...     "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 8})
        >>> model = Qwen3MoeForCausalLM(cfg)
        >>> jax.eval_shape(model.init_with_output, jax.random.key(0),
        ...                jnp.zeros((1, 3), jnp.int32))[0].shape
        (1, 3, 10)
    """

    base_model = Qwen3MoeModel


def expert_pieces(name: str, num_experts: int) -> list[list[str]] | None:
    """``ModelFamily.tensor_pieces``: transformers' original per-expert tensors of a fused
    expert stack.

    Example:
        >>> from lora_jax.models.qwen3_moe import expert_pieces
        >>> expert_pieces("model.layers.0.mlp.experts.gate_up_proj", 2)  # doctest: +NORMALIZE_WHITESPACE
        [['model.layers.0.mlp.experts.0.gate_proj.weight', 'model.layers.0.mlp.experts.1.gate_proj.weight'],
         ['model.layers.0.mlp.experts.0.up_proj.weight', 'model.layers.0.mlp.experts.1.up_proj.weight']]
    """
    module, _, param = name.rpartition(".")
    if not module.endswith(".experts") or param not in _EXPERT_PIECES:
        return None
    return [[f"{module}.{e}.{piece}.weight" for e in range(num_experts)] for piece in _EXPERT_PIECES[param]]


def build(config: dict[str, Any], settings: BuildSettings) -> Qwen3MoeForCausalLM:
    """The causal LM for a qwen3_moe ``config.json`` dict.

    Example:
        >>> from lora_jax.models import qwen3_moe
        >>> from lora_jax.models.family import BuildSettings
        >>> qwen3_moe.build({"model_type": "qwen3_moe", "hidden_size": 16, "intermediate_size": 32,
        ...     "num_hidden_layers": 2, "num_attention_heads": 2, "vocab_size": 10,
        ...     "num_experts": 4, "num_experts_per_tok": 2}, BuildSettings()).config.sparse_layers
        (True, True)
    """
    return Qwen3MoeForCausalLM(Qwen3MoeConfig.from_hf(config), settings.scan_layers,
                               remat=settings.remat, **settings.dtypes)


FAMILY = ModelFamily(
    model_types=MODEL_TYPES,
    build=build,
    base_prefix="model.",
    architecture=lambda model_type, params: "Qwen3MoeForCausalLM",
    scan_node=LLAMA_FAMILY.scan_node,
    ignored=LLAMA_FAMILY.ignored,
    tensor_pieces=expert_pieces,
)
