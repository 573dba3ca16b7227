"""KV-cached generation against independent references: argmax over full forward
passes, and transformers' own greedy `generate`."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax import models

VOCAB = 120
LLAMA = {
    "model_type": "llama",
    "hidden_size": 48,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": VOCAB,
    # A wide init gives peaked next-token distributions: no near-ties in the argmax.
    "initializer_range": 0.2,
    "eos_token_id": None,
}
GPT2 = {
    "model_type": "gpt2",
    "n_embd": 48,
    "n_layer": 2,
    "n_head": 4,
    "vocab_size": VOCAB,
    "n_positions": 64,
    "initializer_range": 0.2,
}


def prompts():
    ids = np.random.RandomState(0).randint(3, VOCAB, (3, 7))
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :6] = 0
    return ids, mask


def greedy_reference(model, ids, mask, steps):
    """Argmax of a fresh full forward pass per step, no cache. The buffer has its final
    width from the start (one compile): causal attention keeps the not-yet-generated
    slots from influencing earlier logits. Position ids count only real tokens, as
    transformers does for left-padded batches."""
    batch, prompt = ids.shape
    seq = np.concatenate([ids, np.zeros((batch, steps), ids.dtype)], axis=1)
    seq_mask = np.concatenate([mask, np.ones((batch, steps), mask.dtype)], axis=1)
    positions = np.maximum(np.cumsum(seq_mask, axis=1) - 1, 0)
    for step in range(steps):
        logits = model(seq, attention_mask=seq_mask, positions=positions)
        seq[:, prompt + step] = np.asarray(jnp.argmax(logits[:, prompt + step - 1], axis=-1))
    return seq


@pytest.fixture(scope="module")
def llama():
    return models.from_config(LLAMA, seed=0)


@pytest.fixture(scope="module")
def greedy(llama):
    """Greedy output of the shared model on `prompts()`: one compile reused by many tests."""
    ids, mask = prompts()
    return np.asarray(models.generate(llama, None, ids, attention_mask=mask, max_new_tokens=6))


def test_cached_greedy_equals_full_forward_argmax_with_left_padding(llama, greedy):
    ids, mask = prompts()
    assert greedy.shape == (3, 13)
    np.testing.assert_array_equal(greedy, greedy_reference(llama, ids, mask, 6))


def test_gpt2_cached_greedy_equals_full_forward_argmax():
    model = models.from_config(GPT2, seed=1)
    ids, mask = prompts()
    out = models.generate(
        model, None, ids, attention_mask=mask, max_new_tokens=6, stop_token_ids=()
    )
    np.testing.assert_array_equal(out, greedy_reference(model, ids, mask, 6))


def test_scanned_layers_generate_like_unrolled(llama, greedy):
    ids, mask = prompts()
    scanned = models.from_config(LLAMA, scan_layers=True)
    # Same weights, stacked.
    layers = llama.params["model"]["layers"]
    scanned.params = {
        **llama.params,
        "model": {
            **llama.params["model"],
            "layers": jax.tree.map(lambda *x: jnp.stack(x), layers["0"], layers["1"]),
        },
    }
    out = models.generate(scanned, None, ids, attention_mask=mask, max_new_tokens=6)
    np.testing.assert_array_equal(out, greedy)


def test_right_padded_rows_are_left_aligned_and_give_same_tokens(llama, greedy):
    ids, mask = prompts()
    # Move each row's padding to the right.
    order = np.argsort(1 - mask, axis=1, kind="stable")
    right_ids = np.take_along_axis(ids, order, axis=1)
    right_mask = np.take_along_axis(mask, order, axis=1)
    right = models.generate(llama, None, right_ids, attention_mask=right_mask, max_new_tokens=6)
    np.testing.assert_array_equal(right, greedy)


def test_stop_token_ends_only_its_row(llama, greedy):
    ids, mask = prompts()
    # A token row 0 emits mid-way but some other row never emits.
    stop = next(
        int(t) for t in greedy[0, 8:] if any(int(t) not in greedy[row, 7:] for row in (1, 2))
    )
    out = np.asarray(
        models.generate(
            llama,
            None,
            ids,
            attention_mask=mask,
            max_new_tokens=6,
            stop_token_ids=[stop],
            pad_token_id=0,
        )
    )
    ends = []
    for row in range(3):
        hits = np.flatnonzero(greedy[row, 7:] == stop)
        end = 7 + (hits[0] + 1 if hits.size else 6)
        # Each row keeps everything up to and including its first stop token, then pads.
        np.testing.assert_array_equal(out[row, :end], greedy[row, :end])
        assert (out[row, end:] == 0).all()
        ends.append(end)
    assert ends[0] < 13 and 13 in ends


def test_apply_fn_receives_the_variables_and_replaces_apply(llama, greedy):
    """A LoRA-style wrapper ``fn(variables, adapter, *args)`` whose adapter changes the
    weights inside apply, used both ways: closed over by a lambda, and carried in the
    params pytree (nothing closed over, one compile for every adapter)."""
    ids, mask = prompts()
    module = llama.module
    delta = jax.tree.map(lambda x: 0.05 * jnp.ones_like(x), llama.params)

    def lora_like(variables, adapter, *args, **kwargs):
        patched = {"params": jax.tree.map(jnp.add, variables["params"], adapter)}
        return module.apply(patched, *args, **kwargs)

    shifted = jax.tree.map(jnp.add, llama.params, delta)
    expected = models.generate(llama, shifted, ids, attention_mask=mask, max_new_tokens=6)
    assert not np.array_equal(expected, greedy)

    closed_over = models.generate(
        llama,
        None,
        ids,
        attention_mask=mask,
        max_new_tokens=6,
        apply_fn=lambda v, *a, **k: lora_like(v, delta, *a, **k),
    )
    np.testing.assert_array_equal(closed_over, expected)

    def carried(variables, *args, **kwargs):
        both = variables["params"]
        return lora_like({"params": both["base"]}, both["adapter"], *args, **kwargs)

    out = models.generate(
        module,
        {"base": llama.params, "adapter": delta},
        ids,
        attention_mask=mask,
        max_new_tokens=6,
        apply_fn=carried,
    )
    np.testing.assert_array_equal(out, expected)


def test_sampling_is_seeded(llama, greedy):
    ids, mask = prompts()
    kwargs = dict(attention_mask=mask, max_new_tokens=6, temperature=2.0)
    a = models.generate(llama, None, ids, rng=jax.random.key(1), **kwargs)
    b = models.generate(llama, None, ids, rng=jax.random.key(1), **kwargs)
    c = models.generate(llama, None, ids, rng=jax.random.key(2), **kwargs)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # A vanishing nucleus keeps only the most likely token: greedy again.
    nucleus = models.generate(llama, None, ids, rng=jax.random.key(4), top_p=1e-6, **kwargs)
    np.testing.assert_array_equal(nucleus, greedy)


def test_sample_logits_filters():
    logits = jnp.array([[0.0, 2.0, 1.0, -1.0], [3.0, 0.0, 2.9, 0.0]])
    keys = jax.random.split(jax.random.key(0), 200)

    def draw(keys, **filters):
        return jax.vmap(lambda key: models.sample_logits(logits, key, **filters))(keys)

    np.testing.assert_array_equal(draw(keys, top_k=1), np.tile([1, 0], (200, 1)))
    # top_p=0.6: row 1's two leading tokens (~0.47 + ~0.43 of the mass) are both needed.
    seen = np.unique(np.asarray(draw(keys, top_p=0.6))[:, 1])
    np.testing.assert_array_equal(seen, [0, 2])
    seen = np.unique(np.asarray(draw(keys, top_k=2))[:, 0])
    np.testing.assert_array_equal(seen, [1, 2])


def test_greedy_matches_transformers_generate(llama, greedy, tmp_path):
    """The shared model, exported and run by transformers' own greedy `generate`
    (left padding, position ids from the mask) gives the same tokens."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    models.save_pretrained(tmp_path, llama.config, llama.params)
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids, mask = prompts()
    with torch.no_grad():
        expected = torch_model.generate(
            torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            max_new_tokens=6,
            min_new_tokens=6,
            do_sample=False,
            pad_token_id=0,
        ).numpy()
    np.testing.assert_array_equal(greedy, expected)
