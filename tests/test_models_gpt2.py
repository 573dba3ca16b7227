"""GPT-2 against transformers' PyTorch GPT2LMHeadModel on tiny random checkpoints."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json

import numpy as np
import torch
import transformers
from safetensors.numpy import load_file, save_file

from lora_jax import models

VOCAB = 96


def tiny_gpt2(tmp_path, seed=0, **overrides):
    config = transformers.GPT2Config(
        n_embd=48, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64, **overrides
    )
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.5)
    model.save_pretrained(tmp_path)
    return model


def torch_logits(model, ids, mask=None):
    with torch.no_grad():
        mask_t = None if mask is None else torch.tensor(mask)
        return model(torch.tensor(ids), attention_mask=mask_t).logits.numpy()


def test_gpt2_logits_match_torch_with_padding_and_tied_head(tmp_path):
    torch_model = tiny_gpt2(tmp_path)
    model = models.from_pretrained(tmp_path)
    assert set(model.params) == {"transformer"}
    assert model.params["transformer"]["h"]["1"]["attn"]["c_attn"]["kernel"].shape == (48, 144)
    ids = np.random.RandomState(0).randint(0, VOCAB, (2, 20))
    mask = np.ones_like(ids)
    mask[0, :6] = 0
    ours = np.asarray(model(ids, attention_mask=mask))
    valid = mask.astype(bool)
    np.testing.assert_allclose(ours[valid], torch_logits(torch_model, ids, mask)[valid], atol=1e-4)


def test_gpt2_untied_head_is_transposed_linear(tmp_path):
    torch_model = tiny_gpt2(tmp_path, seed=1, tie_word_embeddings=False)
    model = models.from_pretrained(tmp_path)
    np.testing.assert_array_equal(
        model.params["lm_head"]["kernel"], torch_model.lm_head.weight.detach().numpy().T
    )
    ids = np.random.RandomState(1).randint(0, VOCAB, (1, 10))
    np.testing.assert_allclose(model(ids), torch_logits(torch_model, ids), atol=1e-4, rtol=0)


def test_gpt2_checkpoint_without_transformer_prefix_loads(tmp_path):
    # The original openai-community/gpt2 files name tensors "h.0.attn..." with buffers.
    torch_model = tiny_gpt2(tmp_path, seed=2)
    state = load_file(tmp_path / "model.safetensors")
    state = {k.removeprefix("transformer."): v for k, v in state.items()}
    state["h.0.attn.bias"] = np.ones((1, 1, 64, 64), np.float32)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    model = models.from_pretrained(tmp_path)
    ids = np.random.RandomState(2).randint(0, VOCAB, (1, 12))
    np.testing.assert_allclose(model(ids), torch_logits(torch_model, ids), atol=1e-4, rtol=0)


def test_gpt2_save_pretrained_round_trips(tmp_path):
    torch_model = tiny_gpt2(tmp_path / "src", seed=3)
    model = models.from_pretrained(tmp_path / "src")
    out = models.save_pretrained(tmp_path / "out", model.config, model.params)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["GPT2LMHeadModel"]
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = np.random.RandomState(3).randint(0, VOCAB, (2, 9))
    np.testing.assert_array_equal(torch_logits(reloaded, ids), torch_logits(torch_model, ids))
