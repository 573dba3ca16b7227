"""BERT (encoder, pooler, sequence classification) against transformers' PyTorch BERT."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from lora_jax import models

VOCAB = 100
TINY = dict(
    hidden_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=80,
    vocab_size=VOCAB,
    max_position_embeddings=64,
)


def randomise_biases(model):
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.5)
    return model.eval()


def padded_batch(seed=0):
    rng = np.random.RandomState(seed)
    ids = rng.randint(0, VOCAB, (3, 14))
    mask = np.ones_like(ids)
    mask[1, 9:] = 0  # BERT batches are right-padded
    mask[2, 4:] = 0
    token_types = np.zeros_like(ids)
    token_types[:, 7:] = 1
    return ids, mask, token_types


def test_bert_hidden_states_and_pooler_match_torch_with_padding(tmp_path):
    torch.manual_seed(0)
    torch_model = randomise_biases(transformers.BertModel(transformers.BertConfig(**TINY)))
    torch_model.save_pretrained(tmp_path)
    model = models.from_pretrained(tmp_path)
    assert "query" in model.params["encoder"]["layer"]["1"]["attention"]["self"]
    ids, mask, types = padded_batch()
    with torch.no_grad():
        ref = torch_model(
            torch.tensor(ids), attention_mask=torch.tensor(mask), token_type_ids=torch.tensor(types)
        )
    ours = model(ids, attention_mask=mask, token_type_ids=types)
    valid = mask.astype(bool)
    np.testing.assert_allclose(
        np.asarray(ours.last_hidden_state)[valid], ref.last_hidden_state.numpy()[valid], atol=1e-4
    )
    np.testing.assert_allclose(ours.pooler_output, ref.pooler_output.numpy(), atol=1e-4)


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    torch.manual_seed(1)
    config = transformers.BertConfig(**TINY, num_labels=3)
    torch_model = randomise_biases(transformers.BertForSequenceClassification(config))
    path = tmp_path_factory.mktemp("bert_cls")
    torch_model.save_pretrained(path)
    return path, torch_model


def classifier_logits(torch_model, ids, mask, types):
    with torch.no_grad():
        return torch_model(
            torch.tensor(ids), attention_mask=torch.tensor(mask), token_type_ids=torch.tensor(types)
        ).logits.numpy()


def test_sequence_classification_logits_match_torch(classifier_dir):
    path, torch_model = classifier_dir
    model = models.from_pretrained(path)
    assert type(model.module).__name__ == "BertForSequenceClassification"
    assert set(model.params) == {"bert", "classifier"}
    assert model.params["classifier"]["kernel"].shape == (48, 3)
    ids, mask, types = padded_batch(1)
    np.testing.assert_allclose(
        model(ids, attention_mask=mask, token_type_ids=types),
        classifier_logits(torch_model, ids, mask, types),
        atol=1e-4,
    )


def test_classifier_checkpoint_loads_as_bare_encoder(classifier_dir):
    path, torch_model = classifier_dir
    with pytest.warns(UserWarning, match="classifier"):
        model = models.from_pretrained(path, architecture="BertModel")
    ids, mask, types = padded_batch(2)
    with torch.no_grad():
        ref = torch_model.bert(
            torch.tensor(ids), attention_mask=torch.tensor(mask), token_type_ids=torch.tensor(types)
        ).pooler_output.numpy()
    np.testing.assert_allclose(
        model(ids, attention_mask=mask, token_type_ids=types).pooler_output, ref, atol=1e-4
    )


def test_classifier_save_pretrained_round_trips(classifier_dir, tmp_path):
    path, torch_model = classifier_dir
    model = models.from_pretrained(path)
    out = models.save_pretrained(tmp_path, model.config, model.params)
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    ids, mask, types = padded_batch(3)
    np.testing.assert_array_equal(
        classifier_logits(reloaded, ids, mask, types),
        classifier_logits(torch_model, ids, mask, types),
    )


def test_encoder_checkpoint_with_bert_prefix_and_gamma_beta_names_loads_and_exports(tmp_path):
    torch.manual_seed(2)
    torch_model = randomise_biases(transformers.BertModel(transformers.BertConfig(**TINY)))
    torch_model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    renamed = {}
    for key, value in state.items():
        key = "bert." + key
        if ".LayerNorm." in key:
            key = key.replace(".weight", ".gamma").replace(".bias", ".beta")
        renamed[key] = value
    save_file(renamed, tmp_path / "model.safetensors", metadata={"format": "pt"})
    model = models.from_pretrained(tmp_path)
    ids, mask, types = padded_batch(4)
    with torch.no_grad():
        ref = torch_model(
            torch.tensor(ids), attention_mask=torch.tensor(mask), token_type_ids=torch.tensor(types)
        ).pooler_output.numpy()
    np.testing.assert_allclose(
        model(ids, attention_mask=mask, token_type_ids=types).pooler_output, ref, atol=1e-4
    )
    # Exported again, it is a plain BertModel checkpoint that transformers' AutoModel reads.
    out = models.save_pretrained(tmp_path / "export", model.config, model.params)
    reloaded = transformers.AutoModel.from_pretrained(out).eval()
    assert type(reloaded).__name__ == "BertModel"
    for name, tensor in torch_model.state_dict().items():
        np.testing.assert_array_equal(reloaded.state_dict()[name].numpy(), tensor.numpy())
