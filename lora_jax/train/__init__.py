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

Modules: ``settings`` (the settings table, config files), ``pipeline``
(``finetune``), ``records`` / ``tokenize`` / ``batches`` (data: reading files
and ``datasets``, token ids with loss masks, fixed-shape batches),
``streaming`` (batches made as the run reads its data), ``step`` (the
jit-compiled step), ``loop`` (training, resume, evaluation), ``checkpoint``
(orbax), ``outputs`` (output directories and the run lock), ``pretrained``
(base model and tokenizer, never running model code), ``adapter_files``,
``generation``, ``progress`` (bar, metrics.jsonl, loss curve), ``reporting``
(TensorBoard, offline Weights & Biases), ``tiny``. This package builds on the
lora_jax core; the core never imports it.
"""

from lora_jax.train.adapter_files import (
    load_adapter,
    read_lora_adapter,
    read_run_checkpoint,
    write_lora_adapter,
)
from lora_jax.train.batches import BatchLoader, BatchSource, bucket_lengths, eval_batches
from lora_jax.train.checkpoint import CheckpointError, Checkpoints
from lora_jax.train.generation import TextGenerator
from lora_jax.train.loop import TrainConfig, TrainResult, data_fingerprint, evaluate, train
from lora_jax.train.outputs import OutputDir, OutputError, RunLock
from lora_jax.train.pipeline import FinetuneResult, effective_settings, finetune, format_summary
from lora_jax.train.pretrained import ModelFilesError, load_model, load_tokenizer
from lora_jax.train.progress import MetricsLog, MovingAverage, ProgressBar, plot_loss_curve
from lora_jax.train.records import (
    DataError,
    DataFields,
    RecordStream,
    chatterbot_files,
    check_record,
    held_out,
    load_records,
    read_chatterbot,
    read_jsonl,
    read_records,
    split,
)
from lora_jax.train.reporting import Reporter, ReportError
from lora_jax.train.settings import FinetuneSettings, SettingsError, read_config_file
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
from lora_jax.train.streaming import StreamingBatches, scan_stream
from lora_jax.train.tokenize import Example, chat_pieces, encode

__all__ = [
    "BatchLoader",
    "BatchSource",
    "CheckpointError",
    "Checkpoints",
    "DataError",
    "DataFields",
    "Example",
    "FinetuneResult",
    "FinetuneSettings",
    "MetricsLog",
    "ModelFilesError",
    "MovingAverage",
    "OutputDir",
    "OutputError",
    "ProgressBar",
    "RecordStream",
    "ReportError",
    "Reporter",
    "RunLock",
    "SettingsError",
    "StreamingBatches",
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
    "effective_settings",
    "encode",
    "eval_batches",
    "evaluate",
    "finetune",
    "format_summary",
    "held_out",
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
    "read_config_file",
    "read_jsonl",
    "read_lora_adapter",
    "read_records",
    "read_run_checkpoint",
    "remat_policy",
    "scan_stream",
    "split",
    "train",
    "trainable_leaves",
    "with_leaves",
    "write_lora_adapter",
]
