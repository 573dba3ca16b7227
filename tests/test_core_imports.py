"""The core imports no model code, no training code and no torch (design.md section 8)."""

import subprocess
import sys


def test_core_imports_no_models_training_or_torch():
    code = (
        "import sys, lora_jax, lora_jax.sharding, lora_jax.peft\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'peft', 'transformers')\n"
        "       or m.startswith(('lora_jax.models', 'lora_jax.train', 'lora_jax.cli'))]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
