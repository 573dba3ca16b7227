"""transformers + PEFT as the reference for the model-family tests (not collected itself).

Tiny random PyTorch models saved as Hugging Face checkpoints, their logits and greedy
`generate`, PEFT adapters made and loaded in PyTorch, and the lora_jax side of the same
computations, so each family's test file states only what is particular to it.
"""

from __future__ import annotations

import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
import jax.numpy as jnp
import numpy as np
import peft
import torch
import transformers

import lora_jax
from lora_jax import models


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def torch_model(config, seed: int = 0):
    """A random causal LM whose norm scales and biases are not at their init values, so
    that a mistake in them shows."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.2)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.3)
    return model


def save(model, path) -> str:
    quiet(model.save_pretrained, str(path))
    return str(path)


def load_torch(path):
    return quiet(transformers.AutoModelForCausalLM.from_pretrained, str(path)).eval()


def left_padded(vocab: int, seq: int = 14, batch: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and a mask whose rows 1 and 2 start with padding."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(2, vocab, (batch, seq))
    mask = np.ones((batch, seq), np.int64)
    mask[1, :3] = 0
    mask[2, : seq // 2] = 0
    return ids, mask


def padded_batch(vocab: int, seed: int = 0, seq: int = 20, pads=(0, 4, 9), low: int = 1):
    """Token ids ``(len(pads), seq)`` in ``[low, vocab)`` and a mask left-padding row ``i`` by ``pads[i]``."""
    ids = np.random.RandomState(seed).randint(low, vocab, (len(pads), seq))
    mask = (np.arange(seq)[None, :] >= np.array(pads)[:, None]).astype(np.int64)
    return ids, mask


def on_tokens(array, mask) -> np.ndarray:
    """The rows of ``array`` at real tokens: padded query positions attend to nothing and are
    meaningless in both frameworks."""
    return np.asarray(array)[np.asarray(mask).astype(bool)]


def torch_logits(model, ids, mask=None) -> np.ndarray:
    with torch.no_grad():
        mask = None if mask is None else torch.as_tensor(mask)
        return model(torch.as_tensor(ids), attention_mask=mask).logits.float().numpy()


def assert_close_on_tokens(ours, reference, mask=None, atol: float = 1e-4) -> None:
    """Logits equal at real tokens (a padded query attends to nothing in either framework)."""
    ours = np.asarray(ours)
    if mask is not None:
        valid = np.asarray(mask).astype(bool)
        ours, reference = ours[valid], reference[valid]
    np.testing.assert_allclose(ours, reference, atol=atol, rtol=0)


def torch_greedy(model, ids, mask, steps: int) -> np.ndarray:
    with torch.no_grad():
        return model.generate(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), max_new_tokens=steps,
                              min_new_tokens=steps, do_sample=False, pad_token_id=0).numpy()


def our_greedy(model: models.Model, ids, mask, steps: int) -> np.ndarray:
    return np.asarray(models.generate(model, None, ids, attention_mask=mask, max_new_tokens=steps,
                                      stop_token_ids=(), pad_token_id=0))


def lora_logits(model: models.Model, params, adapter, config, ids, mask=None) -> np.ndarray:
    apply = lora_jax.lora(lambda p, x, m: model.module.apply({"params": p}, x, attention_mask=m), config)
    mask = np.ones_like(ids) if mask is None else mask
    return np.asarray(jax.jit(apply)(params, adapter, ids, mask))


def random_adapter(config: lora_jax.LoraConfig, params, seed: int = 0) -> dict:
    """An adapter with random A and B (a trained one, not the B = 0 start)."""
    rng = np.random.default_rng(seed)
    return {name: {"lora_A": jnp.asarray(rng.normal(0, 0.2, t.a_shape), jnp.float32),
                   "lora_B": jnp.asarray(rng.normal(0, 0.2, t.b_shape), jnp.float32)}
            for name, t in lora_jax.find_targets(config, params).items()}


def peft_trained(base_path, peft_config: peft.LoraConfig, seed: int = 1):
    """A PEFT model on the checkpoint with every trainable tensor random."""
    model = quiet(peft.get_peft_model, load_torch(base_path), peft_config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.2)
    return model.eval()


def peft_loaded(base_path, adapter_dir):
    return quiet(peft.PeftModel.from_pretrained, load_torch(base_path), str(adapter_dir)).eval()


def adapter_round_trip(model: models.Model, base_path, tmp_path, ids, mask, *, ours: lora_jax.LoraConfig,
                       theirs: peft.LoraConfig, atol: float = 1e-4) -> None:
    """A lora_jax adapter saved as PEFT's gives PEFT's logits, and a PEFT-trained one loaded
    in lora_jax gives lora_jax's, both within ``atol`` of each other."""
    adapter = random_adapter(ours, model.params)
    lora_jax.save_peft(tmp_path / "ours", adapter, ours, model.params)
    assert_close_on_tokens(lora_logits(model, model.params, adapter, ours, ids, mask),
                           torch_logits(peft_loaded(base_path, tmp_path / "ours"), ids, mask), mask, atol)
    trained = peft_trained(base_path, theirs)
    quiet(trained.save_pretrained, str(tmp_path / "theirs"))
    loaded = lora_jax.load_peft(tmp_path / "theirs", model.params)
    assert_close_on_tokens(lora_logits(model, loaded.params, loaded.adapter, loaded.config, ids, mask),
                           torch_logits(trained, ids, mask), mask, atol)


def assert_bfloat16_tracks_float32(path, ids, mask) -> None:
    """Params and activations in bfloat16 stay as close to the float32 logits as transformers'
    own bfloat16 run does (within twice its error)."""
    reference = torch_logits(load_torch(path), ids, mask)
    theirs = torch_logits(load_torch(path).to(torch.bfloat16), ids, mask)
    half = models.from_pretrained(path, dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(half.params)} == {jnp.dtype(jnp.bfloat16)}
    valid = np.asarray(mask).astype(bool)
    ours_error = np.abs(np.asarray(half(ids, attention_mask=mask)) - reference)[valid].max()
    assert ours_error <= 2 * np.abs(theirs - reference)[valid].max() + 1e-3, ours_error
