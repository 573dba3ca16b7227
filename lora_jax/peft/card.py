"""The model card (``README.md``) written beside a PEFT adapter."""

from __future__ import annotations

import json

from lora_jax.config import LoraConfig
from lora_jax.peft.adapter_config import PEFT_FORMAT_VERSION


def model_card(config: LoraConfig, num_modules: int, base_model: str | None, task_type: str | None,
               quantization: str | None = None) -> str:
    """A Hugging Face model card: YAML front matter PEFT's hub tooling reads, then a short description.

    Example:
        >>> from lora_jax import LoraConfig
        >>> from lora_jax.peft.card import model_card
        >>> card = model_card(LoraConfig(r=4, target_modules=["q_proj"]), 2, "org/base", "CAUSAL_LM")
        >>> print(card.splitlines()[1])
        base_model: "org/base"
        >>> "library_name: peft" in card and "Adapted modules: 2" in card
        True
        >>> "Trained on a quantized base (QLoRA): NF4" in model_card(
        ...     LoraConfig(r=4, target_modules=["q_proj"]), 2, None, None, quantization="NF4 (bitsandbytes)")
        True

    Args:
        config: the adapter's config (rank and alpha are listed).
        num_modules: how many torch modules the adapter adapts.
        base_model, task_type: as recorded in ``adapter_config.json``.
        quantization: how the base was quantized in training (QLoRA), e.g.
            :func:`lora_jax.quantize.describe_quantization`'s account; noted in the card.

    Returns:
        The text of ``README.md``.
    """
    import lora_jax  # the package is fully imported by the time this runs

    front = []
    if base_model:
        front.append(f"base_model: {json.dumps(base_model)}")
    front.append("library_name: peft")
    if task_type == "CAUSAL_LM":
        front.append("pipeline_tag: text-generation")
    tags = sorted(["lora", "lora_jax"] + ([f"base_model:adapter:{base_model}"] if base_model else []))
    front.append("tags:")
    front.extend(f"- {json.dumps(tag)}" for tag in tags)
    lines = [
        "---", *front, "---", "",
        "# LoRA adapter", "",
        "A LoRA adapter in Hugging Face PEFT's format, written by lora_jax (JAX). Load it with",
        "`peft.PeftModel.from_pretrained(base_model, path)` in PyTorch or",
        "`lora_jax.load_peft(path, params)` in JAX.", "",
        f"- Base model: {base_model or 'not recorded'}",
        f"- Rank r = {config.r}, lora_alpha = {config.lora_alpha}"
        + (" (rsLoRA scaling)" if config.use_rslora else ""),
        f"- Adapted modules: {num_modules}",
        *(_quantization_note(quantization) if quantization else []), "",
        "### Framework versions", "",
        f"- PEFT {PEFT_FORMAT_VERSION} (adapter format)",
        f"- lora_jax {getattr(lora_jax, '__version__', 'unknown')}", "",
    ]
    return "\n".join(lines)


def _quantization_note(quantization: str) -> list[str]:
    """The card's lines for an adapter trained on a quantized base (QLoRA)."""
    return [
        f"- Trained on a quantized base (QLoRA): {quantization}. The adapter itself is a plain",
        "  LoRA adapter: it loads on the unquantized base model, or on the base quantized the same",
        "  way (e.g. transformers' `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=\"nf4\")`",
        "  for NF4) to compute with the weights it was trained on.",
    ]
