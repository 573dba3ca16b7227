"""Fine-tuning LoRA adapters: the ``lora-jax finetune`` pipeline as a Python API, and its parts.

The whole run, as the CLI does it (``lora-jax finetune`` is a thin layer over this)::

    from lora_jax.train import FinetuneSettings, finetune

    result = finetune(FinetuneSettings(model="path/to/model", data=["chat.jsonl"], steps=200))

Or the parts, for your own loop:

    from lora_jax.train import TrainConfig, encode, load_records, split, train

    examples = encode(load_records(["chat.jsonl"]), tokenizer, max_length=128)
    train_set, held_out = split(examples, 0.05, seed=0)
    result = train(apply_fn, params, lora_config, train_set, eval_examples=held_out,
                   config=TrainConfig(max_steps=200), pad_id=tokenizer.pad_token_id,
                   output_dir="runs/my-run")

Modules: ``settings`` (the settings table), ``pipeline`` (``finetune``),
``records`` / ``tokenize`` / ``batches`` (data: reading, token ids with loss
masks, fixed-shape batches), ``step`` (the jit-compiled step), ``loop``
(training, resume, evaluation), ``checkpoint`` (orbax), ``outputs`` (output
directories and the run lock), ``pretrained`` (base model and tokenizer,
never running model code), ``adapter_files``, ``generation``, ``progress``,
``tiny``. This package builds on the lora_jax core; the core never imports it.
"""

from lora_jax.train.adapter_files import (
    load_adapter,
    read_lora_adapter,
    read_run_checkpoint,
    write_lora_adapter,
)
from lora_jax.train.batches import BatchLoader, bucket_lengths, eval_batches
from lora_jax.train.checkpoint import CheckpointError, Checkpoints
from lora_jax.train.generation import TextGenerator
from lora_jax.train.loop import TrainConfig, TrainResult, data_fingerprint, evaluate, train
from lora_jax.train.outputs import OutputDir, OutputError, RunLock
from lora_jax.train.pipeline import FinetuneResult, finetune, format_summary
from lora_jax.train.pretrained import ModelFilesError, load_model, load_tokenizer
from lora_jax.train.progress import MetricsLog, ProgressBar, plot_loss_curve
from lora_jax.train.records import (
    DataError,
    chatterbot_files,
    check_record,
    load_records,
    read_chatterbot,
    read_jsonl,
    read_records,
    split,
)
from lora_jax.train.settings import FinetuneSettings, SettingsError
from lora_jax.train.step import (
    TrainState,
    cast_floating,
    causal_lm_loss,
    clipped_adamw,
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
from lora_jax.train.tokenize import Example, chat_pieces, encode

__all__ = [
    "BatchLoader",
    "CheckpointError",
    "Checkpoints",
    "DataError",
    "Example",
    "FinetuneResult",
    "FinetuneSettings",
    "MetricsLog",
    "ModelFilesError",
    "OutputDir",
    "OutputError",
    "ProgressBar",
    "RunLock",
    "SettingsError",
    "TextGenerator",
    "TrainConfig",
    "TrainResult",
    "TrainState",
    "bucket_lengths",
    "cast_floating",
    "causal_lm_loss",
    "chat_pieces",
    "chatterbot_files",
    "check_record",
    "clipped_adamw",
    "data_fingerprint",
    "encode",
    "eval_batches",
    "evaluate",
    "finetune",
    "format_summary",
    "init_state",
    "learning_rate_schedule",
    "load_adapter",
    "load_model",
    "load_records",
    "load_tokenizer",
    "make_eval_step",
    "make_loss_fn",
    "make_optimizer",
    "make_train_step",
    "plot_loss_curve",
    "read_chatterbot",
    "read_jsonl",
    "read_lora_adapter",
    "read_records",
    "read_run_checkpoint",
    "remat_policy",
    "split",
    "train",
    "trainable_leaves",
    "with_leaves",
    "write_lora_adapter",
]
