"""``lora-jax finetune`` as one Python call: settings in, a trained PEFT adapter out.

    from lora_jax.train import FinetuneSettings, finetune

    result = finetune(FinetuneSettings(model="path/to/model", data=["train.jsonl"],
                                       output="runs/mine", steps=200, lr=2e-4))
    result.adapter_dir, result.summary["eval_after"]["perplexity"]

The order is the contract: every setting is checked when the settings are
made; then, before anything is written, the output directory (refused if it
holds someone else's files, or a live run), the data (all of it read once,
with ``streaming`` too), the model and whether the LoRA settings fit it; only
then is the run directory claimed (a lock, ``run.json`` and ``run.yaml``) and
trained. A mistake found on the way leaves the output directory as it was, so
the corrected command needs no ``--overwrite``.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lora_jax.config import LoraConfig
from lora_jax.train.adapter_files import load_adapter
from lora_jax.train.batches import BatchLoader, bucket_lengths
from lora_jax.train.kbit import quant_config, quantized_modules_to_save
from lora_jax.train.loop import TrainResult, train
from lora_jax.train.outputs import OutputDir, OutputError, RunLock
from lora_jax.train.pretrained import ModelFilesError, load_model, load_tokenizer
from lora_jax.train.records import Record, RecordStream, describe_data, load_records, split
from lora_jax.train.reporting import Reporter, parse_report_to
from lora_jax.train.settings import (
    ADAPTER_DIR,
    BASE_MODEL_DIR,
    CONFIG_FILE,
    DEFAULT_OUTPUT,
    RUN_FILE,
    SAMPLES_FILE,
    SUMMARY_FILE,
    TINY_MODEL,
    TINY_OUTPUT,
    FinetuneSettings,
    SettingsError,
    base_model_path,
    parse_mesh,
    read_run_file,
)
from lora_jax.train.step import with_leaves
from lora_jax.train.streaming import StreamingBatches, scan_stream
from lora_jax.train.tokenize import Example, encode

Log = Callable[[str], None]


@dataclasses.dataclass
class FinetuneResult:
    """What :func:`finetune` returns.

    ``summary`` (also written to ``summary.json``) and ``adapter_dir`` are
    None when the run was interrupted (Ctrl-C); it continues with
    ``resume=True``. See :func:`finetune` for an example.
    """

    settings: FinetuneSettings
    output: Path
    step: int
    interrupted: bool
    adapter: dict[str, Any]
    lora_config: LoraConfig
    trainable_params: dict[str, Any]
    adapter_dir: Path | None = None
    summary: dict[str, Any] | None = None


@dataclasses.dataclass
class _Data:
    """The data of a run: held-out records, and the training records (or their stream)."""

    eval_records: list[Record]
    train_records: list[Record] | None = None   # None when streaming
    stream: RecordStream | None = None
    first_records: list[Record] = dataclasses.field(default_factory=list)  # what --tiny's tokenizer learns
    train_count: int = 0


@dataclasses.dataclass
class _Base:
    """The base model and tokenizer; ``unsaved`` for a fresh --tiny model not yet in base_model/."""

    model: Any
    tokenizer: Any
    unsaved: bool = False
    float_params: Any = None  # an unsaved tiny model's own weights when ``model`` is quantized


def finetune(settings: FinetuneSettings, *, log: Log | None = None) -> FinetuneResult:
    """Run ``lora-jax finetune`` with these settings: data, model, training, the PEFT adapter.

    Example:
        >>> from lora_jax.train.settings import FinetuneSettings
        >>> import json, tempfile; from pathlib import Path
        >>> root = Path(tempfile.mkdtemp())
        >>> data = root / "chat.jsonl"
        >>> _ = data.write_text("".join(json.dumps({"prompt": f"{i} + 1 =", "response": f" {i + 1}"}) + "\\n"
        ...                             for i in range(40)))
        >>> result = finetune(FinetuneSettings(tiny=True, data=[data], output=root / "run", steps=2,
        ...                                    samples=0, max_eval=4, progress=False), log=lambda m: None)
        >>> result.step, sorted(p.name for p in result.adapter_dir.iterdir())
        (2, ['README.md', 'adapter_config.json', 'adapter_model.safetensors'])
        >>> finetune(FinetuneSettings(tiny=True, data=[data], output=root / "run"))
        Traceback (most recent call last):
        ...
        lora_jax.train.outputs.OutputError: .../run already exists and holds a run; pass --overwrite to replace it, --resume to continue it, or choose another --output.

    Args:
        settings: what to train (see :class:`~lora_jax.train.settings.FinetuneSettings`);
            with ``resume=True`` the fields left None come from the run's ``run.json``.
        log: where progress lines go (default: stderr).

    Raises:
        SettingsError, OutputError, DataError, ModelFilesError, CheckpointError:
            (all ``ValueError``) naming the flag, file or directory at fault.
    """
    say = log or _stderr
    started = time.perf_counter()
    settings, output = prepare(settings)
    data = _read_data(settings)
    base = _load_base(settings, output, data.first_records, say)
    lora_config, adapter, init_params = _fit_lora(settings, base.model)
    eval_examples = encode(data.eval_records, base.tokenizer, settings.seq_len)
    pad_id = _generator(base, lora_config, settings).pad_id  # the same after a --tiny model is saved
    train_data = _training_data(settings, data, base.tokenizer, pad_id, len(eval_examples), say)
    settings = _with_epoch_steps(settings, train_data, say)
    _report_trainable(lora_config, adapter, with_leaves(base.model.params, init_params), say)
    mesh = _make_mesh(settings)

    with RunLock(output, log=say):
        OutputDir(output, "finetune").claim(overwrite=settings.overwrite, resume=settings.resume)
        (output / RUN_FILE).write_text(json.dumps(settings.record(), indent=2, sort_keys=True) + "\n")
        (output / CONFIG_FILE).write_text(settings.config_text(), encoding="utf-8")
        if base.unsaved:
            base = _save_tiny(settings, output, base)
        params = with_leaves(base.model.params, init_params)
        generator = _generator(base, lora_config, settings)
        prompts = _sample_prompts(data.eval_records, settings.samples, generator)
        samples_before = _samples_before(settings, output, generator, prompts, lora_config, adapter, params, say)
        reporter = Reporter.for_run(settings.report_to, output, logging_steps=settings.logging_steps,
                                    config=settings.record(), name=output.name)
        try:
            # The module itself: train() applies it with --remat per layer and the chunked loss.
            result = train(base.model.module, params, lora_config, train_data,
                           config=settings.train_config(), eval_examples=eval_examples, pad_id=generator.pad_id,
                           adapter=adapter, output_dir=output, resume=settings.resume, run_info=settings.run_info(),
                           progress=settings.progress, log=log, mesh=mesh, sharding=settings.sharding,
                           reporter=reporter)
        finally:
            reporter.close()
        finished = FinetuneResult(settings=settings, output=output, step=result.step,
                                  interrupted=result.interrupted, adapter=result.adapter, lora_config=lora_config,
                                  trainable_params=result.trainable_params)
        if not result.interrupted:
            _finish(finished, result, base, generator, params, prompts, samples_before, started)
    return finished


def prepare(settings: FinetuneSettings) -> tuple[FinetuneSettings, Path]:
    """The resolved settings and output directory, after every check that needs no data or model.

    Example:
        >>> from lora_jax.train.settings import FinetuneSettings
        >>> import tempfile
        >>> resolved, output = prepare(FinetuneSettings(tiny=True, output=tempfile.mkdtemp() + "/run"))
        >>> resolved.steps, resolved.model, output.exists()      # nothing written
        (30, 'tiny', False)
    """
    output = Path(settings.output or (TINY_OUTPUT if settings.tiny else DEFAULT_OUTPUT))
    holder = RunLock(output).holder() if output.is_dir() else None
    if holder:
        raise OutputError(f"{output} is in use by another lora-jax run (pid {holder}); wait for it to finish, "
                          "or choose another --output.")
    resolved = effective_settings(settings)
    OutputDir(output, "finetune").check(overwrite=resolved.overwrite, resume=resolved.resume)
    parse_report_to(resolved.report_to)  # the writers' packages are installed
    resolved.data_fields()  # one form of record: text, prompt/response or messages
    if resolved.streaming and resolved.steps is None:
        raise SettingsError("--epochs (--num-train-epochs) needs the number of batches in an epoch, which "
                            "--streaming only knows once it has read the data; give --steps instead.")
    if resolved.model != TINY_MODEL and not Path(resolved.model).exists():
        raise ModelFilesError(f"{resolved.model}: no such model directory or file (--model; expected a Hugging "
                              "Face model directory with config.json and model.safetensors, or a .gguf file).")
    if resolved.init_adapter and not Path(resolved.init_adapter).is_dir():
        raise ModelFilesError(f"{resolved.init_adapter}: no such adapter directory (--init-adapter).")
    _check_mesh(resolved)
    _check_quantize(resolved)
    return resolved, output


def effective_settings(settings: FinetuneSettings) -> FinetuneSettings:
    """The settings a run would use: defaults filled in, and with ``resume`` the run's own (``run.json``).

    What ``lora-jax finetune --print-config`` shows; raises when a resume
    would change a setting that decides the adapter. Reads nothing else.

    Example:
        >>> from lora_jax.train.settings import FinetuneSettings
        >>> settings = effective_settings(FinetuneSettings(tiny=True, lr=0.01))
        >>> settings.lr, settings.steps, settings.model
        (0.01, 30, 'tiny')
    """
    output = Path(settings.output or (TINY_OUTPUT if settings.tiny else DEFAULT_OUTPUT))
    if settings.resume and settings.overwrite:
        raise SettingsError("--resume continues the run in --output and --overwrite replaces it; pass one.")
    saved = _saved_settings(output) if settings.resume else None
    resolved = settings.resolved(saved)
    if saved is not None:
        differ = resolved.trajectory_changes(saved)
        if differ:
            raise SettingsError(f"Cannot resume {output}: settings differ from the run's: {'; '.join(differ)}.")
    return resolved


def _check_quantize(settings: FinetuneSettings) -> None:
    """``--quantize`` / ``--double-quant`` against each other, the model and ``--mesh`` (before any file)."""
    if settings.double_quant and not settings.quantize:
        raise SettingsError("--double-quant quantizes the absmax values of a 4-bit base; pass --quantize nf4 "
                            "or --quantize fp4 with it.")
    if not settings.quantize:
        return
    try:
        quant_config(settings.quantize, double_quant=bool(settings.double_quant))
    except ValueError as err:
        raise SettingsError(str(err)) from None
    if settings.quantize == "gguf":
        model = Path(settings.model)
        is_gguf = model.suffix == ".gguf" or (model.is_dir() and not (model / "config.json").exists()
                                              and len(list(model.glob("*.gguf"))) == 1)
        if settings.model == TINY_MODEL or not is_gguf:
            raise SettingsError(f"--quantize gguf keeps a .gguf model's own Q8_0/Q4_0/Q4_1 blocks; --model "
                                f"{settings.model} is not a .gguf file (use --quantize nf4, fp4, int8 or int4).")
    if settings.mesh:
        raise SettingsError(f"--quantize {settings.quantize} with --mesh: sharding a quantized base is not "
                            "supported yet; train it on one device (drop --mesh).")


def _saved_settings(output: Path) -> dict[str, Any]:
    if not output.is_dir():
        raise SettingsError(f"Nothing to resume: {output} does not exist.")
    if not (output / RUN_FILE).exists():
        raise SettingsError(f"Nothing to resume in {output}: no {RUN_FILE} (start the run without --resume).")
    return read_run_file(output / RUN_FILE)


def _check_mesh(settings: FinetuneSettings) -> None:
    if not settings.mesh:
        return
    import jax

    data, model = parse_mesh(settings.mesh)
    if data * model != jax.device_count():
        raise SettingsError(f"--mesh {settings.mesh}: needs {data * model} devices, and "
                            f"{jax.device_count()} are available.")
    if settings.batch_size % data:
        raise SettingsError(f"--batch-size {settings.batch_size}: must be a multiple of the --mesh data axis "
                            f"({data}), so each device gets whole rows.")


def _make_mesh(settings: FinetuneSettings) -> Any:
    if not settings.mesh:
        return None
    from lora_jax.sharding import make_mesh

    return make_mesh(*parse_mesh(settings.mesh))


# -- data, model, LoRA: everything that can fail before the output directory is touched ----------

def _read_data(settings: FinetuneSettings) -> _Data:
    """Training and held-out records: at most ``max_examples``, held-out share cut to ``max_eval``.

    Streaming, every record is read once here too (so a bad line is an error
    before anything is written), keeping only the held-out ones.
    """
    fields = settings.data_fields()
    if settings.streaming:
        stream = RecordStream(settings.data, fields=fields, split=settings.split)
        count, held, eval_records = scan_stream(stream, eval_fraction=settings.eval_fraction, seed=settings.seed,
                                                max_eval=settings.max_eval, max_records=settings.max_examples)
        first = list(itertools.islice(stream.records(), _TOKENIZER_RECORDS))
        return _Data(eval_records, stream=stream, first_records=first, train_count=count - held)
    records = load_records(settings.data, fields=fields, split=settings.split)
    if settings.max_examples:
        records = records[: settings.max_examples]
    train_records, eval_records = split(records, settings.eval_fraction, settings.seed)
    return _Data(eval_records[: settings.max_eval], train_records=train_records, first_records=records,
                 train_count=len(train_records))


_TOKENIZER_RECORDS = 2000  # records a --tiny tokenizer learns from when streaming


def _training_data(settings: FinetuneSettings, data: _Data, tokenizer: Any, pad_id: int, num_eval: int,
                   say: Log) -> list[Example] | StreamingBatches:
    """Training examples, or the streaming batches (its first window read, so its errors come now)."""
    described = _describe_data(settings.data)
    if data.stream is None:
        train_examples = encode(data.train_records, tokenizer, settings.seq_len)
        say(f"data: {len(train_examples)} training / {num_eval} held-out examples ({described})")
        return train_examples
    seq_len = settings.seq_len
    batches = StreamingBatches(
        data.stream, lambda records: encode(records, tokenizer, seq_len), batch_size=settings.batch_size,
        seq_len=seq_len, seed=settings.seed, pad_id=pad_id, grad_accum=settings.grad_accum,
        packing=bool(settings.packing), buckets=bucket_lengths(seq_len, settings.buckets),
        window=settings.shuffle_buffer, eval_fraction=settings.eval_fraction, max_records=settings.max_examples)
    batches.fingerprint  # noqa: B018 - reads and tokenizes the first window
    say(f"data: {data.train_count} training records, streamed in windows of {settings.shuffle_buffer} / "
        f"{num_eval} held-out examples ({described})")
    return batches


def _with_epoch_steps(settings: FinetuneSettings, train_data: Any, say: Log) -> FinetuneSettings:
    """``steps`` from ``epochs`` (``--num-train-epochs``) and the batches an epoch has; as is otherwise."""
    if settings.steps is not None:
        return settings
    loader = BatchLoader(train_data, batch_size=settings.batch_size, seq_len=settings.seq_len, seed=settings.seed,
                         pad_id=0, grad_accum=settings.grad_accum, packing=bool(settings.packing),
                         buckets=bucket_lengths(settings.seq_len, settings.buckets))
    steps = max(1, math.ceil(settings.epochs * loader.steps_per_epoch))
    say(f"--epochs {settings.epochs:g}: {steps} steps of {loader.steps_per_epoch} an epoch")
    return dataclasses.replace(settings, steps=steps)


def _load_base(settings: FinetuneSettings, output: Path, records: Sequence[Record], say: Log) -> _Base:
    """The base model and tokenizer; ``--tiny`` builds one from the data (saved once claimed)."""
    if settings.model == TINY_MODEL:
        base_dir = output / BASE_MODEL_DIR
        if settings.resume and (base_dir / "config.json").exists():
            model = _load_model(base_dir, settings)
            say(f"model: tiny random Llama ({base_dir})")
            return _Base(model, load_tokenizer(model))
        from lora_jax.train.tiny import texts_of, tiny_model, tiny_tokenizer

        tokenizer = tiny_tokenizer(texts_of(records))
        say(f"model: tiny random Llama ({base_dir})")
        model = tiny_model(len(tokenizer), seed=settings.seed)
        float_params = model.params
        if settings.quantize:  # as it will be read back from base_model/ (the same codes)
            from lora_jax.quantize import quantize

            model.params = quantize(float_params, quant_config(settings.quantize,
                                                               double_quant=bool(settings.double_quant)))
        return _Base(model, tokenizer, unsaved=True, float_params=float_params)
    t0 = time.perf_counter()
    model = _load_model(settings.model, settings)
    tokenizer = load_tokenizer(model)
    say(f"model: {settings.model} ({_num_params(model.params) / 1e6:.1f}M params, "
        f"loaded in {time.perf_counter() - t0:.0f}s)")
    if settings.quantize:
        say(f"quantized base ({settings.quantize}): {_describe_bytes(model.params)}")
    return _Base(model, tokenizer)


def _load_model(path: str | Path, settings: FinetuneSettings) -> Any:
    """The base model in ``--dtype``; with ``--quantize``, its kernels quantized as they are read.

    A quantized base is read in float32 (norms and biases keep the file's values, see
    :mod:`lora_jax.train.kbit`) and computes in ``--dtype``.
    """
    if not settings.quantize:
        return load_model(path, dtype=settings.dtype)
    from lora_jax.models import QuantizeError

    config = quant_config(settings.quantize, double_quant=bool(settings.double_quant))
    try:
        return load_model(path, dtype="float32", compute_dtype=settings.dtype, quantize=config)
    except QuantizeError as err:
        raise SettingsError(f"--quantize {settings.quantize}: {' '.join(str(err).split())}") from None


def _describe_bytes(params: Any) -> str:
    from lora_jax.quantize import quantized_bytes

    report = quantized_bytes(params)
    return (f"{report['before'] / 2**20:.1f} MiB -> {report['after'] / 2**20:.1f} MiB "
            f"({report['quantized_leaves']} kernels at {report['bytes_per_quantized_param']:.4f} bytes/param)")


def _fit_lora(settings: FinetuneSettings, model: Any) -> tuple[LoraConfig, Any, dict[str, Any]]:
    """``(lora_config, start adapter or None, its full-trained leaves)``, checked against the model."""
    from lora_jax import find_targets

    lora_config = settings.lora_config()
    adapter = None
    trainable: dict[str, Any] = {}
    params = model.params
    flags = f"-r {settings.r} / --target-modules {settings.target_modules!r}" + (
        f" / --modules-to-save {settings.modules_to_save!r}" if settings.modules_to_save else "")
    if settings.init_adapter:
        adapter, init_config, trainable = load_adapter(settings.init_adapter, params)
        lora_config = init_config.replace(lora_dropout=lora_config.lora_dropout)
        params = with_leaves(params, trainable)
        flags = f"--init-adapter {settings.init_adapter}"
    try:
        find_targets(lora_config, params)
    except ValueError as err:
        raise SettingsError(f"{flags} does not fit the model: {' '.join(str(err).split())}") from None
    frozen = quantized_modules_to_save(params, lora_config.modules_to_save)
    if frozen:
        raise SettingsError(f"--modules-to-save {settings.modules_to_save!r} would train quantized kernels in full "
                            f"({', '.join(frozen[:4])}); with --quantize {settings.quantize} train those modules "
                            "with LoRA (--target-modules) instead.")
    return lora_config, adapter, trainable


def _report_trainable(lora_config: LoraConfig, adapter: Any, params: Any, say: Log) -> None:
    import jax

    from lora_jax import count_parameters, init

    shapes = adapter if adapter is not None else jax.eval_shape(
        lambda: init(lora_config, params, jax.random.key(0)))
    counts = count_parameters(params, shapes, lora_config)
    say(f"LoRA r={lora_config.r} alpha={lora_config.lora_alpha:g} on {lora_config.target_modules}: "
        f"trainable params {counts['trainable']:,d} || all params {counts['all']:,d} || "
        f"trainable% {counts['trainable%']:.4f}")


# -- the claimed run ----------------------------------------------------------------------------

def _save_tiny(settings: FinetuneSettings, output: Path, base: _Base) -> _Base:
    """Write the fresh tiny model to base_model/ and train on it as read back (in ``--dtype``)."""
    from lora_jax.train.tiny import save_tiny

    float_model = dataclasses.replace(base.model, params=base.float_params)  # base_model/ holds the float weights
    base_dir = save_tiny(output / BASE_MODEL_DIR, float_model, base.tokenizer)
    model = _load_model(base_dir, settings)
    return _Base(model, load_tokenizer(model))


def _generator(base: _Base, lora_config: LoraConfig, settings: FinetuneSettings) -> Any:
    from lora_jax.train.generation import TextGenerator

    return TextGenerator(base.model, base.tokenizer, lora_config, chat=True, max_new_tokens=settings.max_new_tokens)


def _sample_prompts(records: Sequence[Record], count: int, generator: Any) -> list[str]:
    """Prompts from held-out records (the first user turn / prompt / first words); sets ``generator.chat``."""
    prompts, chat = [], False
    seen = set()
    for record in records:
        if len(prompts) >= count:
            break
        if "messages" in record:
            text = next((m["content"] for m in record["messages"] if m["role"] == "user"), None)
            chat = True
        elif "prompt" in record:
            text = record["prompt"]
        else:
            text = " ".join(record["text"].split()[:8])
        if text and text not in seen:
            seen.add(text)
            prompts.append(text)
    generator.chat = chat and generator.chat
    return prompts


def _samples_before(settings: FinetuneSettings, output: Path, generator: Any, prompts: list[str],
                    lora_config: LoraConfig, adapter: Any, params: Any, say: Log) -> list[str]:
    """The base model's replies (kept in samples_before.json, so a resumed run shows the same)."""
    if not prompts:
        return []
    before_file = output / SAMPLES_FILE
    if settings.resume and before_file.exists():
        try:
            saved = json.loads(before_file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            saved = None
        if isinstance(saved, list) and len(saved) == len(prompts) and all(isinstance(s, str) for s in saved):
            return saved
    import jax

    from lora_jax import init

    start = adapter if adapter is not None else init(lora_config, params, jax.random.key(settings.seed))
    say(f"generating {len(prompts)} sample(s) with the base model ...")
    samples = generator(prompts, adapter=start, params=params)
    before_file.write_text(json.dumps(samples, indent=2) + "\n")
    return samples


def _finish(finished: FinetuneResult, result: TrainResult, base: _Base, generator: Any, params: Any,
            prompts: list[str], samples_before: list[str], started: float) -> None:
    """The PEFT adapter, sample replies after training and summary.json."""
    from lora_jax.peft import save_peft

    settings, output = finished.settings, finished.output
    trained_params = with_leaves(params, result.trainable_params)
    finished.adapter_dir = Path(save_peft(
        output / ADAPTER_DIR, result.adapter, finished.lora_config, trained_params,
        base_model_name_or_path=base_model_path(settings.model, output), task_type="CAUSAL_LM", overwrite=True))
    samples_after = generator(prompts, adapter=result.adapter, params=trained_params) if prompts else []
    finished.summary = {
        "steps": result.step, "seconds": time.perf_counter() - started,
        "train_seconds": result.seconds, "eval_before": result.eval_before, "eval_after": result.eval_after,
        "samples": [{"prompt": p, "before": b, "after": a}
                    for p, b, a in zip(prompts, samples_before, samples_after)],
        "adapter": str(finished.adapter_dir), "metrics": str(output / "metrics.jsonl"),
        "loss_curve": str(output / "loss_curve.png"),
    }
    (output / SUMMARY_FILE).write_text(json.dumps(finished.summary, indent=2) + "\n")


def format_summary(summary: dict[str, Any]) -> str:
    """The end-of-run report ``lora-jax finetune`` prints, from a run's summary.

    Example:
        >>> print(format_summary({"steps": 60, "seconds": 75.2, "train_seconds": 61.0,
        ...                       "eval_before": {"loss": 3.3, "perplexity": 27.1, "tokens": 900},
        ...                       "eval_after": {"loss": 1.9, "perplexity": 6.7, "tokens": 900},
        ...                       "samples": [], "adapter": "run/adapter", "metrics": "run/metrics.jsonl",
        ...                       "loss_curve": "run/loss_curve.png"}))
        <BLANKLINE>
        Done: 60 steps in 1m15s (training 1m01s).
        Held-out perplexity: 27.10 -> 6.70 (loss 3.3000 -> 1.9000, 900 tokens)
        <BLANKLINE>
        Adapter (PEFT format): run/adapter
        Metrics: run/metrics.jsonl; loss curve: run/loss_curve.png
    """
    lines = [f"\nDone: {summary['steps']} steps in {_duration(summary['seconds'])} "
             f"(training {_duration(summary['train_seconds'])})."]
    before, after = summary["eval_before"], summary["eval_after"]
    if before and after:
        lines.append(f"Held-out perplexity: {before['perplexity']:.2f} -> {after['perplexity']:.2f} "
                     f"(loss {before['loss']:.4f} -> {after['loss']:.4f}, {after['tokens']} tokens)")
    for sample in summary["samples"]:
        lines.append(f"\nPrompt: {sample['prompt']}")
        lines.append(f"  before: {sample['before'] or '(empty)'}")
        lines.append(f"  after:  {sample['after'] or '(empty)'}")
    lines.append(f"\nAdapter (PEFT format): {summary['adapter']}")
    lines.append(f"Metrics: {summary['metrics']}; loss curve: {summary['loss_curve']}")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def _describe_data(data: Sequence[Any]) -> str:
    return ", ".join(Path(d).name if isinstance(d, str) and Path(d).is_absolute() else describe_data(d)
                     for d in data)


def _num_params(params: Any) -> int:
    import jax
    import numpy as np

    from lora_jax.quantize import is_quantized

    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params, is_leaf=is_quantized))


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
