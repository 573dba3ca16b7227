"""Every example runs in its --tiny mode, so none of them rots."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

CASES = {
    "finetune_causal_lm.py": ["held-out perplexity:", "adapter:"],
    "classify_minilm.py": ["test accuracy:"],
    "linen_model.py": ["merged model == LoRA model: ok"],
    "nnx_model.py": ["nnx module with merged weights == LoRA model: ok"],
    "load_in_pytorch.py": ["PeftModel.from_pretrained reproduces the lora_jax model: ok"],
}


def test_every_example_is_covered():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_example_runs_in_tiny_mode(name, tmp_path):
    if name == "load_in_pytorch.py":
        pytest.importorskip("torch")
        pytest.importorskip("peft")
    extra = ["--output", str(tmp_path / "run")] if name == "finetune_causal_lm.py" else []
    env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_backend_optimization_level=0", MPLBACKEND="Agg")
    done = subprocess.run([sys.executable, str(EXAMPLES / name), "--tiny", *extra], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for expected in CASES[name]:
        assert expected in done.stdout, done.stdout[-2000:]
