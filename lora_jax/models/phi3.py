"""Phi-3 decoders (the 4k-context variants): the Llama layout with fused projections.

Param tree (mirrors transformers' ``Phi3ForCausalLM``)::

    model.embed_tokens.embedding                      (vocab, hidden)
    model.layers.<i>.input_layernorm.scale            (hidden,)
    model.layers.<i>.self_attn.qkv_proj.kernel        (hidden, (heads + 2 * kv_heads) * head_dim)
    model.layers.<i>.self_attn.o_proj.kernel          (heads * head_dim, hidden)
    model.layers.<i>.post_attention_layernorm.scale   (hidden,)
    model.layers.<i>.mlp.gate_up_proj.kernel          (hidden, 2 * intermediate)
    model.layers.<i>.mlp.down_proj.kernel             (intermediate, hidden)
    model.norm.scale                                  (hidden,)
    lm_head.kernel                                    (hidden, vocab)

``qkv_proj`` outputs q, then k, then v; ``gate_up_proj`` the gate, then up. A LoRA
on either adapts the fused module as a whole, as PEFT does (``target_modules=
["qkv_proj"]``). No biases. A ``sliding_window`` applies to every layer.

RoPE: the default type only, optionally on the first ``partial_rotary_factor`` of
each head. LongRoPE (``rope_type`` "longrope", or the older "su" / "yarn" names, used
by the 128k Phi-3, Phi-3.5 and Phi-4-mini checkpoints) is refused with an error.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .blocks import AttentionConfig, MLPConfig
from .errors import UnsupportedModelError
from .family import BuildSettings, ConfigReader, ModelFamily
from .llama import FAMILY as LLAMA_FAMILY
from .llama import LlamaConfig, LlamaForCausalLM

MODEL_TYPES = ("phi3",)
SUPPORTED_ROPE_TYPES = ("default",)
# Names transformers' Phi3Config reads as LongRoPE.
_LONGROPE_NAMES = ("longrope", "su", "yarn")


@dataclasses.dataclass(frozen=True)
class Phi3Config(LlamaConfig):
    """A Phi-3 ``config.json`` as the module needs it: :class:`LlamaConfig`'s fields, with
    fused ``qkv_proj`` and ``gate_up_proj`` kernels.

    Example:
        >>> from lora_jax.models.phi3 import Phi3Config
        >>> cfg = Phi3Config.from_hf({"model_type": "phi3", "hidden_size": 64,
        ...     "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        ...     "vocab_size": 100, "sliding_window": 16})
        >>> cfg.attention.fused_qkv, cfg.mlp.names, cfg.sliding_windows
        ('qkv_proj', ('gate_up_proj', 'down_proj'), (16, 16))
    """

    @classmethod
    def from_hf(cls, config: dict[str, Any]) -> Phi3Config:
        """Read a ``config.json`` dict of model_type phi3; LongRoPE is refused.

        Example:
            >>> from lora_jax.models.phi3 import Phi3Config
            >>> Phi3Config.from_hf({"model_type": "phi3", "hidden_size": 64,
            ...     "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4,
            ...     "vocab_size": 100, "rope_scaling": {"type": "su", "short_factor": [1.0] * 8,
            ...     "long_factor": [1.0] * 8}})
            Traceback (most recent call last):
            ...
            lora_jax.models.errors.UnsupportedModelError: unsupported rope_type 'su' (LongRoPE, used by the 128k-context Phi-3, Phi-3.5 and Phi-4-mini checkpoints) in the phi3 config; supported: ['default'] (the 4k-context Phi-3 checkpoints)
        """
        model_type = config.get("model_type", "phi3")
        rope = _rope_parameters(config, model_type)
        # Llama's reading for the rest; it knows no partial rotary embeddings, Phi-3 has no
        # biases, and its window (if any) is in every layer.
        plain = {k: v for k, v in config.items() if k not in (
            "rope_scaling", "rope_parameters", "partial_rotary_factor", "attention_bias", "mlp_bias")}
        plain["rope_theta"] = rope["rope_theta"]
        base = super().from_hf(plain)
        window = ConfigReader(config, model_type).int("sliding_window", None)
        return dataclasses.replace(
            base, qkv_bias=False, o_bias=False, mlp_bias=False, rope=tuple(sorted(rope.items())),
            sliding_windows=(window,) * base.num_hidden_layers)

    @property
    def attention(self) -> AttentionConfig:
        """Llama's attention with q, k and v from one ``qkv_proj``.

        Example:
            >>> from lora_jax.models.phi3 import Phi3Config
            >>> Phi3Config.from_hf({"hidden_size": 32, "intermediate_size": 64,
            ...     "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
            ...     "vocab_size": 10}).attention.num_kv_heads
            2
        """
        return dataclasses.replace(super().attention, fused_qkv="qkv_proj")

    @property
    def mlp(self) -> MLPConfig:
        """The gated MLP with gate and up from one ``gate_up_proj``.

        Example:
            >>> from lora_jax.models.phi3 import Phi3Config
            >>> Phi3Config.from_hf({"hidden_size": 32, "intermediate_size": 64,
            ...     "num_hidden_layers": 1, "num_attention_heads": 4,
            ...     "vocab_size": 10}).mlp.fused_gate_up
            True
        """
        return dataclasses.replace(super().mlp, names=("gate_up_proj", "down_proj"),
                                   fused_gate_up=True)


def _rope_parameters(config: dict[str, Any], model_type: str) -> dict[str, Any]:
    """RoPE settings as transformers' Phi3Config reads them (``rope_scaling`` first, then
    ``rope_parameters``; ``partial_rotary_factor`` at the top level or inside)."""
    rope = dict(config.get("rope_scaling") or config.get("rope_parameters") or {})
    rope_type = rope.pop("type", None) or rope.get("rope_type") or "default"
    if rope_type != "default":
        kind = " (LongRoPE, used by the 128k-context Phi-3, Phi-3.5 and Phi-4-mini checkpoints)" \
            if rope_type in _LONGROPE_NAMES else ""
        raise UnsupportedModelError(
            f"unsupported rope_type {rope_type!r}{kind} in the {model_type} config; supported: "
            f"{list(SUPPORTED_ROPE_TYPES)} (the 4k-context Phi-3 checkpoints)"
        )
    read = ConfigReader(config, model_type)
    rope_theta = ConfigReader(rope, f"{model_type} rope").float(
        "rope_theta", read.float("rope_theta", 10000.0))
    factor = ConfigReader(rope, f"{model_type} rope").float(
        "partial_rotary_factor", read.float("partial_rotary_factor", 1.0))
    if not 0.0 < factor <= 1.0:
        raise UnsupportedModelError(
            f"the {model_type} config has partial_rotary_factor={factor}; expected a number in (0, 1]"
        )
    out = {"rope_type": "default", "rope_theta": rope_theta}
    if factor != 1.0:
        out["partial_rotary_factor"] = factor
    return out


class Phi3ForCausalLM(LlamaForCausalLM):
    """A Phi-3 causal LM: :class:`~lora_jax.models.llama.LlamaForCausalLM` with a
    :class:`Phi3Config` (same call, cache and outputs).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from lora_jax.models.phi3 import Phi3Config, Phi3ForCausalLM
        >>> cfg = Phi3Config.from_hf({"hidden_size": 32, "intermediate_size": 64,
        ...     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        ...     "vocab_size": 50})
        >>> logits, params = jax.eval_shape(Phi3ForCausalLM(cfg).init_with_output,
        ...     jax.random.key(0), jnp.zeros((1, 5), jnp.int32))
        >>> logits.shape, params["params"]["model"]["layers"]["0"]["self_attn"]["qkv_proj"]["kernel"].shape
        ((1, 5, 50), (32, 64))
    """


def build(config: dict[str, Any], settings: BuildSettings) -> Phi3ForCausalLM:
    """The causal LM for a phi3 ``config.json`` dict.

    Example:
        >>> from lora_jax.models import phi3
        >>> from lora_jax.models.family import BuildSettings
        >>> phi3.build({"model_type": "phi3", "hidden_size": 16, "intermediate_size": 32,
        ...     "num_hidden_layers": 2, "num_attention_heads": 2, "vocab_size": 10,
        ...     "partial_rotary_factor": 0.5}, BuildSettings()).config.rope
        (('partial_rotary_factor', 0.5), ('rope_theta', 10000.0), ('rope_type', 'default'))
    """
    return Phi3ForCausalLM(Phi3Config.from_hf(config), settings.scan_layers, remat=settings.remat,
                           **settings.dtypes)


FAMILY = ModelFamily(
    model_types=MODEL_TYPES,
    build=build,
    base_prefix="model.",
    architecture=lambda model_type, params: "Phi3ForCausalLM",
    scan_node=LLAMA_FAMILY.scan_node,
    ignored=LLAMA_FAMILY.ignored,
)
