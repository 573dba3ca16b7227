"""lora_jax: LoRA for JAX as a pure transform over a parameter pytree.

    config = lora_jax.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    adapter = lora_jax.init(config, params, jax.random.key(0))
    apply = lora_jax.lora(model.apply, config)        # fn(params, adapter, *args)
    merged = lora_jax.merge(params, adapter, config)  # for the plain model.apply
"""

from lora_jax.adapters import check_adapters
from lora_jax.config import LoraConfig
from lora_jax.convert import convert_to_original_base, original_base_config
from lora_jax.init import init, init_with_base
from lora_jax.merge import dora_norms, lora_delta, merge, unmerge
from lora_jax.mixed import StackedAdapters, replace_adapter, stack_adapters
from lora_jax.optim import loraplus, loraplus_groups, masked_optimizer
from lora_jax.peft import LoadedPeft, from_peft, load_peft, save_peft, to_peft
from lora_jax.peft.sets import load_peft_set, save_peft_set
from lora_jax.transform import LoraFallbackWarning, TiedEmbeddingWarning, infer_in_axes, lora
from lora_jax.tree import (
    InAxesWarning,
    Target,
    check_adapter,
    combine,
    count_parameters,
    find_targets,
    module_names,
    partition,
    print_trainable_parameters,
    trainable_mask,
)
from lora_jax.weighted import weighted_adapter

__version__ = "0.1.0"

__all__ = [
    "InAxesWarning",
    "LoraConfig",
    "LoadedPeft",
    "LoraFallbackWarning",
    "StackedAdapters",
    "Target",
    "TiedEmbeddingWarning",
    "check_adapter",
    "check_adapters",
    "combine",
    "convert_to_original_base",
    "count_parameters",
    "dora_norms",
    "find_targets",
    "from_peft",
    "infer_in_axes",
    "init",
    "init_with_base",
    "lora",
    "load_peft",
    "load_peft_set",
    "lora_delta",
    "loraplus",
    "loraplus_groups",
    "masked_optimizer",
    "merge",
    "module_names",
    "original_base_config",
    "partition",
    "print_trainable_parameters",
    "replace_adapter",
    "save_peft",
    "stack_adapters",
    "save_peft_set",
    "to_peft",
    "trainable_mask",
    "unmerge",
    "weighted_adapter",
]
