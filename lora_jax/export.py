"""Compatibility name: :func:`save_merged` lives in :mod:`lora_jax.models.export`.

``from lora_jax.export import save_merged`` keeps working; new code can write
``lora_jax.models.save_merged``. This module imports the models, so it is not core.
"""

from lora_jax.models.export import TOKENIZER_FILES, save_merged

__all__ = ["TOKENIZER_FILES", "save_merged"]
