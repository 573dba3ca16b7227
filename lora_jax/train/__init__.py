"""Fine-tuning LoRA adapters: data, the jit-compiled step, the loop and checkpoints.

    from lora_jax.train import TrainConfig, encode, read_records, split, train

    examples = encode(read_records("chat.jsonl"), tokenizer, max_length=128)
    train_set, held_out = split(examples, 0.05, seed=0)
    result = train(apply_fn, params, lora_config, train_set, eval_examples=held_out,
                   config=TrainConfig(max_steps=200), pad_id=tokenizer.pad_token_id,
                   output_dir="runs/my-run")

This package builds on the lora_jax core; the core never imports it.
"""

from lora_jax.train.checkpoint import CheckpointError, Checkpoints
from lora_jax.train.data import (
    BatchLoader,
    DataError,
    Example,
    bucket_lengths,
    chat_pieces,
    chatterbot_files,
    check_record,
    encode,
    eval_batches,
    read_chatterbot,
    read_jsonl,
    read_records,
    split,
)
from lora_jax.train.generation import TextGenerator
from lora_jax.train.loop import TrainConfig, TrainResult, data_fingerprint, evaluate, train
from lora_jax.train.progress import MetricsLog, ProgressBar, plot_loss_curve
from lora_jax.train.step import (
    TrainState,
    cast_floating,
    causal_lm_loss,
    init_state,
    learning_rate_schedule,
    make_eval_step,
    make_loss_fn,
    make_optimizer,
    make_train_step,
    remat_policy,
    trainable_leaves,
    with_leaves,
)

__all__ = [
    "BatchLoader",
    "CheckpointError",
    "Checkpoints",
    "DataError",
    "Example",
    "MetricsLog",
    "ProgressBar",
    "TrainConfig",
    "TrainResult",
    "TextGenerator",
    "TrainState",
    "bucket_lengths",
    "cast_floating",
    "causal_lm_loss",
    "chat_pieces",
    "chatterbot_files",
    "check_record",
    "data_fingerprint",
    "encode",
    "eval_batches",
    "evaluate",
    "init_state",
    "learning_rate_schedule",
    "make_eval_step",
    "make_loss_fn",
    "make_optimizer",
    "make_train_step",
    "plot_loss_curve",
    "read_chatterbot",
    "read_jsonl",
    "read_records",
    "remat_policy",
    "split",
    "train",
    "trainable_leaves",
    "with_leaves",
]
