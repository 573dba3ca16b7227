"""The training loop: steps, held-out evaluation, checkpoints, resume, Ctrl-C.

    config = TrainConfig(max_steps=200, batch_size=8, seq_len=128, learning_rate=2e-4)
    result = train(apply_fn, params, lora_config, train_examples, config=config,
                   eval_examples=held_out, pad_id=tokenizer.pad_token_id, output_dir="run")
    result.eval_before["perplexity"], result.eval_after["perplexity"]
    adapter = result.adapter

With ``output_dir`` the run writes ``metrics.jsonl``, ``loss_curve.png`` and
orbax checkpoints under ``checkpoints/``; ``resume=True`` continues from the
newest intact one and ends with the same adapter as an uninterrupted run (the
data order is a pure function of seed and step, and everything else that
changes is in the checkpoint). SIGINT / SIGTERM save a checkpoint and return
early with ``result.interrupted`` set.

:func:`train` is four steps, each a function here: set up (optimizer,
schedule, batches, compiled steps: built once), resume or start, the loop,
and the final evaluation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lora_jax.config import LoraConfig
from lora_jax.init import init
from lora_jax.optim import loraplus
from lora_jax.train.batches import Batch, BatchLoader, BatchSource, bucket_lengths, eval_batches
from lora_jax.train.checkpoint import CheckpointError, Checkpoints
from lora_jax.train.kbit import has_quantized, prepare_for_kbit_training
from lora_jax.train.progress import MetricsLog, ProgressBar, plot_loss_curve
from lora_jax.train.step import (
    CPU_SCHEDULERS,
    DEFAULT_CPU_SCHEDULER,
    DEFAULT_LOSS_CHUNK,
    REMAT_POLICIES,
    SCHEDULES,
    ApplyFn,
    TrainState,
    cast_floating,
    clipped_adamw,
    init_state,
    learning_rate_schedule,
    make_eval_step,
    make_train_step,
    remat_policy,
    trainable_leaves,
)
from lora_jax.train.tokenize import Example

DTYPES = ("float32", "bfloat16", "float16")
Log = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Settings of a training run.

    Example:
        >>> config = TrainConfig(max_steps=150, batch_size=8, seq_len=128, learning_rate=2e-4, warmup_steps=10)
        >>> config.settings()["learning_rate"], "save_every" in config.settings()   # resumable: not checked
        (0.0002, False)
        >>> TrainConfig(learning_rate=-0.01)
        Traceback (most recent call last):
        ...
        ValueError: TrainConfig.learning_rate must be a finite number > 0, got -0.01.

    Attributes:
        max_steps: optimizer steps.
        batch_size: rows per micro-batch; a step sees ``batch_size * grad_accum`` rows.
        grad_accum: micro-batches accumulated per step.
        seq_len: longest sequence (tokens); longer examples are cut.
        learning_rate, warmup_steps, schedule ("cosine", "linear", "constant"),
            weight_decay, max_grad_norm: AdamW and its schedule.
        seed: adapter init, data order and dropout.
        packing: pack several examples per row instead of padding each.
        num_buckets: padded lengths used without packing (fewer = fewer compilations).
        dtype: dtype of the frozen params (e.g. "bfloat16"); adapters stay float32.
            Build the model with the same compute dtype for bf16 compute.
        remat: per-layer rematerialisation ("none", "dots", "full", "offload"; see
            :func:`lora_jax.models.blocks.remat_policy`) when ``apply_fn`` is a
            :mod:`lora_jax.models` module; None or "none": none.
        loss_chunk: tokens per chunk of the LM head + cross-entropy when the model
            returns its hidden states (a :mod:`lora_jax.models` module does): the
            (tokens x vocab) logits are never all held at once. None: full logits.
        cpu_scheduler: on CPU, XLA's "concurrency"-optimized instruction scheduler (its
            default, and ours) or its "memory"-optimized one (see
            :func:`~lora_jax.train.step.compiler_options`).
        loraplus_ratio: LoRA+ (:func:`lora_jax.loraplus`): B, DoRA magnitudes and other
            1-D leaves learn at ``loraplus_ratio * learning_rate``, embedding adapters at
            ``loraplus_lr_embedding``; None: one AdamW for everything.
        loraplus_lr_embedding: with ``loraplus_ratio``: the embedding adapters' rate.
        eval_every: held-out evaluation every N steps (0: only before and after).
        eval_batch_size: rows per evaluation batch (default ``batch_size``).
        save_every: checkpoint every N steps (and always at the end and on Ctrl-C).
        keep: checkpoints kept.
    """

    max_steps: int = 100
    batch_size: int = 8
    grad_accum: int = 1
    seq_len: int = 128
    learning_rate: float = 2e-4
    warmup_steps: int = 10
    schedule: str = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    seed: int = 0
    packing: bool = False
    num_buckets: int = 2
    dtype: str = "float32"
    remat: str | None = None
    eval_every: int = 0
    eval_batch_size: int | None = None
    save_every: int = 50
    keep: int = 3
    loss_chunk: int | None = DEFAULT_LOSS_CHUNK
    cpu_scheduler: str = DEFAULT_CPU_SCHEDULER
    loraplus_ratio: float | None = None
    loraplus_lr_embedding: float = 1e-6

    # Settings that do not change the trained adapter, so a resume may change them (the
    # loss chunk and the scheduler change the order of float sums at most).
    RESUMABLE = ("eval_every", "eval_batch_size", "save_every", "keep", "loss_chunk", "cpu_scheduler")

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "grad_accum", "seq_len", "keep", "num_buckets", "save_every"):
            _require(name, getattr(self, name), _is_int(getattr(self, name)) and getattr(self, name) >= 1,
                     "an integer >= 1")
        for name in ("warmup_steps", "eval_every", "seed"):
            _require(name, getattr(self, name), _is_int(getattr(self, name)) and getattr(self, name) >= 0,
                     "an integer >= 0")
        if self.eval_batch_size is not None:
            _require("eval_batch_size", self.eval_batch_size,
                     _is_int(self.eval_batch_size) and self.eval_batch_size >= 1, "an integer >= 1 or None")
        _require("learning_rate", self.learning_rate, _is_finite(self.learning_rate) and self.learning_rate > 0,
                 "a finite number > 0")
        _require("weight_decay", self.weight_decay, _is_finite(self.weight_decay) and self.weight_decay >= 0,
                 "a finite number >= 0")
        if self.max_grad_norm is not None:
            _require("max_grad_norm", self.max_grad_norm,
                     _is_finite(self.max_grad_norm) and self.max_grad_norm >= 0, "a finite number >= 0 or None")
        _require("schedule", self.schedule, self.schedule in SCHEDULES, f"one of {SCHEDULES}")
        _require("dtype", self.dtype, self.dtype in DTYPES, f"one of {DTYPES}")
        if self.remat is not None:
            _require("remat", self.remat, self.remat in REMAT_POLICIES, f"None or one of {REMAT_POLICIES}")
            remat_policy(self.remat)  # "offload" where the backend cannot
        if self.loss_chunk is not None:
            _require("loss_chunk", self.loss_chunk, _is_int(self.loss_chunk) and self.loss_chunk >= 1,
                     "an integer >= 1 or None")
        _require("cpu_scheduler", self.cpu_scheduler, self.cpu_scheduler in CPU_SCHEDULERS,
                 f"one of {CPU_SCHEDULERS}")
        if self.loraplus_ratio is not None:
            _require("loraplus_ratio", self.loraplus_ratio,
                     _is_finite(self.loraplus_ratio) and self.loraplus_ratio > 0, "a finite number > 0 or None")
        _require("loraplus_lr_embedding", self.loraplus_lr_embedding,
                 _is_finite(self.loraplus_lr_embedding) and self.loraplus_lr_embedding >= 0, "a finite number >= 0")

    def settings(self) -> dict[str, Any]:
        """The fields a resumed run must share with the checkpoint.

        Example:
            >>> sorted(TrainConfig().settings())[:4]
            ['batch_size', 'dtype', 'grad_accum', 'learning_rate']
        """
        settings = {k: v for k, v in dataclasses.asdict(self).items() if k not in self.RESUMABLE}
        if self.loraplus_ratio is None:  # newer than the first checkpoints: only when used
            del settings["loraplus_ratio"], settings["loraplus_lr_embedding"]
        return settings


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_finite(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) \
        and math.isfinite(value)


def _require(name: str, value: Any, ok: bool, expected: str) -> None:
    if not ok:
        raise ValueError(f"TrainConfig.{name} must be {expected}, got {value!r}.")


@dataclasses.dataclass
class TrainResult:
    """What :func:`train` returns.

    ``adapter`` and ``trainable_params`` (``{"module.leaf": array}``, put them
    back with :func:`~lora_jax.train.step.with_leaves`) are float32.
    ``eval_before`` / ``eval_after`` hold ``loss``, ``perplexity`` and
    ``tokens`` on the held-out examples (None without them, or when
    interrupted). See :func:`train` for an example.
    """

    adapter: dict[str, Any]
    trainable_params: dict[str, Any]
    step: int
    history: list[dict[str, Any]]
    eval_before: dict[str, float] | None
    eval_after: dict[str, float] | None
    interrupted: bool
    seconds: float
    checkpoint_dir: Path | None = None


def data_fingerprint(examples: Sequence[Example]) -> str:
    """A short hash of the token ids and loss masks, to recognise the same data on resume.

    Example:
        >>> import numpy as np
        >>> from lora_jax.train.tokenize import Example
        >>> data_fingerprint([Example(np.arange(3, dtype=np.int32), np.ones(3, bool))])
        '1 examples, sha256 ...'
    """
    digest = hashlib.sha256()
    for example in examples:
        digest.update(np.asarray(example.input_ids, np.int32).tobytes())
        digest.update(np.packbits(np.asarray(example.loss_mask, bool)).tobytes())
        digest.update(b"|")
    return f"{len(examples)} examples, sha256 {digest.hexdigest()[:16]}"


def evaluate(apply_fn: ApplyFn, params: Any, adapter: dict[str, Any], lora_config: LoraConfig,
             examples: Sequence[Example], *, batch_size: int = 8, seq_len: int = 128, pad_id: int = 0,
             trainable_params: dict[str, Any] | None = None) -> dict[str, float]:
    """Held-out ``{"loss", "perplexity", "tokens"}`` of the model with ``adapter``.

    Example:
        >>> import jax, jax.numpy as jnp, numpy as np, lora_jax
        >>> from lora_jax.train.tokenize import Example
        >>> params = {"embed": {"embedding": jnp.zeros((4, 4))}, "out": {"kernel": jnp.eye(4)}}
        >>> def apply_fn(p, ids, mask):
        ...     return jnp.take(p["embed"]["embedding"], ids, axis=0) @ p["out"]["kernel"]
        >>> config = lora_jax.LoraConfig(r=2, target_modules=["out"])
        >>> adapter = lora_jax.init(config, params, jax.random.key(0))
        >>> held_out = [Example(np.array([0, 1, 2], np.int32), np.ones(3, bool))]
        >>> result = evaluate(apply_fn, params, adapter, config, held_out)   # uniform logits
        >>> round(result["perplexity"], 4), result["tokens"]
        (4.0, 2)

    The loss is the mean next-token NLL over target tokens (responses only
    for prompt/response and chat data); perplexity is its exponential.
    """
    eval_step = make_eval_step(apply_fn, lora_config)
    batches = eval_batches(examples, batch_size=batch_size, seq_len=seq_len, pad_id=pad_id)
    trainable = {"adapter": adapter, "params": trainable_params or {}}
    return _evaluate(eval_step, trainable, params, batches)


def _evaluate(eval_step: Callable[..., Any], trainable: dict[str, Any], params: Any,
              batches: Sequence[Batch]) -> dict[str, float]:
    total, count = 0.0, 0.0
    for batch in batches:
        nll, n = jax.device_get(eval_step(trainable, params, batch))
        total, count = total + float(nll), count + float(n)
    loss = total / max(count, 1.0)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": int(count)}


class _StopRequest:
    """SIGINT / SIGTERM set ``requested`` (the loop saves and stops); a second SIGINT aborts."""

    def __init__(self, notify: Log) -> None:
        self.requested = False
        self._notify = notify
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self._notify("Interrupted: saving a checkpoint after this step (Ctrl-C again to abort).")

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train(apply_fn: ApplyFn, params: Any, lora_config: LoraConfig,
          train_examples: Sequence[Example] | BatchSource, *,
          config: TrainConfig, eval_examples: Sequence[Example] = (), pad_id: int = 0,
          adapter: dict[str, Any] | None = None, output_dir: str | Path | None = None,
          resume: bool = False, run_info: dict[str, Any] | None = None, progress: bool = True,
          log: Log | None = None, on_step: Callable[[dict[str, Any]], Any] | None = None,
          mesh: Any = None, sharding: str = "fsdp", reporter: Any = None) -> TrainResult:
    """Fine-tune a LoRA adapter for ``apply_fn(params, input_ids, attention_mask) -> logits``.

    Example:
        >>> import jax, jax.numpy as jnp, numpy as np, lora_jax
        >>> from lora_jax.train.tokenize import Example
        >>> params = {"embed": {"embedding": jnp.eye(8)}, "out": {"kernel": jnp.eye(8)}}
        >>> def apply_fn(p, ids, mask):
        ...     return jnp.take(p["embed"]["embedding"], ids, axis=0) @ p["out"]["kernel"]
        >>> counting = [Example((np.arange(6) + i) % 8, np.ones(6, bool)) for i in range(8)]
        >>> result = train(apply_fn, params, lora_jax.LoraConfig(r=2, target_modules=["out"]), counting,
        ...                config=TrainConfig(max_steps=20, batch_size=4, seq_len=8, learning_rate=0.1,
        ...                                   warmup_steps=0), eval_examples=counting[:2], progress=False,
        ...                log=lambda message: None)
        >>> result.step, result.eval_after["loss"] < result.eval_before["loss"]
        (20, True)

    Args:
        apply_fn: the model's forward pass over a params pytree (returning logits, or
            a ``lora_jax.models.layers.LMHidden``); or a :mod:`lora_jax.models`
            causal-LM module (``model.module``), which trains with ``config.remat``
            per layer and the chunked loss (``config.loss_chunk``).
        params: the frozen pretrained params (never modified). Quantized kernels
            (:mod:`lora_jax.quantize`, QLoRA) stay packed; the rest is prepared as
            :func:`~lora_jax.train.kbit.prepare_for_kbit_training` says.
        lora_config: targets, rank and scaling; ``modules_to_save`` and
            biases (``bias=``) train in full.
        train_examples / eval_examples: from :func:`~lora_jax.train.tokenize.encode`;
            ``train_examples`` may instead be a
            :class:`~lora_jax.train.batches.BatchSource` serving the batches
            itself (e.g. :class:`~lora_jax.train.streaming.StreamingBatches`).
        config: :class:`TrainConfig`.
        pad_id: token id used for padding (its positions are masked out).
        adapter: start from this adapter instead of ``lora_jax.init``.
        output_dir: where checkpoints, ``metrics.jsonl`` and ``loss_curve.png`` go.
        resume: continue from the newest intact checkpoint in ``output_dir``
            (damaged newer ones are skipped, with a message); refuses
            (:class:`~lora_jax.train.checkpoint.CheckpointError`) when the
            settings, LoRA config, ``run_info`` or data differ.
        run_info: extra settings to record and check on resume (model, data paths).
        progress: show a tqdm bar.
        log: where one-line messages go (default: above the bar).
        on_step: called with each step's metrics record; returning True stops
            the run after that step as Ctrl-C does (checkpoint, ``interrupted``).
        mesh: a ``jax.sharding.Mesh`` with a ``"data"`` axis (and ``"model"``
            for tensor parallelism), e.g. ``lora_jax.sharding.make_mesh()``:
            the frozen params are laid out by ``sharding`` ("dp", "fsdp",
            "tp", "fsdp_tp"), the adapter and optimizer state follow them and
            batches are split over ``"data"``.
        reporter: gets every metrics record (``write(record)``), e.g. a
            :class:`~lora_jax.train.reporting.Reporter` for TensorBoard or
            Weights & Biases; the caller closes it.
    """
    started = time.perf_counter()
    run = _setup(apply_fn, params, lora_config, train_examples, eval_examples, config=config, pad_id=pad_id,
                 output_dir=output_dir, run_info=run_info, log=log)
    run.reporter = reporter
    if adapter is None:
        adapter = init(lora_config, params, jax.random.key(config.seed))
    state = init_state(adapter, trainable_leaves(params, lora_config), run.optimizer, config.seed)
    if has_quantized(params):  # a QLoRA base: norms and biases stay float32 (see train.kbit)
        frozen = prepare_for_kbit_training(params, config.dtype)
    else:
        frozen = params if config.dtype == "float32" else cast_floating(params, jnp.dtype(config.dtype))
    try:
        state, meta = _resume(run, state) if resume else (_fresh_start(run, state), {})
        if mesh is not None:
            state, frozen, run.place_batch = _on_mesh(mesh, sharding, lora_config, run.optimizer, state, frozen)
            run.held_out = [run.place_batch(b) for b in run.held_out]
        eval_before = meta.get("eval_before")
        if run.held_out and eval_before is None:
            eval_before = _evaluate_before(run, state, frozen)
        state, step, interrupted = _loop(run, state, frozen, eval_before, progress=progress, on_step=on_step)
    finally:
        if run.checkpoints is not None:
            run.checkpoints.close()
    eval_after = None if interrupted else _final_evaluation(run, state, frozen, step)
    trainable = jax.device_get(state.trainable)
    return TrainResult(
        adapter=trainable["adapter"], trainable_params=trainable["params"], step=step,
        history=run.history, eval_before=eval_before, eval_after=eval_after, interrupted=interrupted,
        seconds=time.perf_counter() - started,
        checkpoint_dir=run.checkpoints.directory if run.checkpoints is not None else None,
    )


@dataclasses.dataclass
class _Run:
    """Everything a run builds once before its first step."""

    config: TrainConfig
    settings: dict[str, Any]  # recorded in each checkpoint, checked on resume
    schedule: Callable[[int], Any]
    optimizer: Any
    loader: BatchSource
    held_out: list[Batch]
    train_step: Callable[..., Any]
    eval_step: Callable[..., Any]
    output_dir: Path | None
    checkpoints: Checkpoints | None
    metrics: MetricsLog | None
    log: Log
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    place_batch: Callable[[Batch], Any] = lambda batch: batch  # noqa: E731
    reporter: Any = None  # TensorBoard / W&B (lora_jax.train.reporting); None: metrics.jsonl only

    def record(self, entry: dict[str, Any]) -> None:
        self.history.append(entry)
        if self.metrics is not None:
            self.metrics.write(entry)
        if self.reporter is not None:
            self.reporter.write(entry)


def _setup(apply_fn: ApplyFn, params: Any, lora_config: LoraConfig,
           train_examples: Sequence[Example] | BatchSource,
           eval_examples: Sequence[Example], *, config: TrainConfig, pad_id: int,
           output_dir: str | Path | None, run_info: dict[str, Any] | None, log: Log | None) -> _Run:
    """The schedule and optimizer (built once), batches, compiled steps and the run's files."""
    output_dir = Path(output_dir) if output_dir is not None else None
    buckets = bucket_lengths(config.seq_len, config.num_buckets)
    if isinstance(train_examples, BatchSource):
        loader, fingerprint = train_examples, train_examples.fingerprint
    else:
        loader = BatchLoader(train_examples, batch_size=config.batch_size, seq_len=config.seq_len,
                             seed=config.seed, pad_id=pad_id, grad_accum=config.grad_accum,
                             packing=config.packing, buckets=buckets)
        fingerprint = data_fingerprint(train_examples)
    settings = {**config.settings(), "lora": lora_config.to_dict(), "train_data": fingerprint, **(run_info or {})}
    schedule = learning_rate_schedule(config.learning_rate, config.max_steps,
                                      warmup_steps=config.warmup_steps, schedule=config.schedule)
    optimizer = _optimizer(config, schedule, lora_config, params)
    held_out = eval_batches(eval_examples, batch_size=config.eval_batch_size or config.batch_size,
                            seq_len=config.seq_len, pad_id=pad_id, buckets=buckets)
    return _Run(
        config=config, settings=settings, schedule=schedule, optimizer=optimizer, loader=loader,
        held_out=held_out,
        train_step=make_train_step(apply_fn, lora_config, optimizer, remat=config.remat,
                                   loss_chunk=config.loss_chunk, cpu_scheduler=config.cpu_scheduler),
        eval_step=make_eval_step(apply_fn, lora_config, loss_chunk=config.loss_chunk,
                                 cpu_scheduler=config.cpu_scheduler),
        output_dir=output_dir,
        checkpoints=Checkpoints(output_dir / "checkpoints", keep=config.keep) if output_dir else None,
        metrics=MetricsLog(output_dir / "metrics.jsonl") if output_dir else None, log=log or _stderr,
    )


def _optimizer(config: TrainConfig, schedule: Any, lora_config: LoraConfig, params: Any) -> Any:
    """AdamW after global-norm clipping; with ``loraplus_ratio``, one AdamW per LoRA+ group."""
    if config.loraplus_ratio is None:
        return clipped_adamw(schedule, weight_decay=config.weight_decay, max_grad_norm=config.max_grad_norm)
    groups = loraplus(optax.adamw, schedule, config.loraplus_ratio, config=lora_config, params=params,
                      loraplus_lr_embedding=config.loraplus_lr_embedding,
                      loraplus_weight_decay=config.weight_decay)
    return optax.chain(optax.clip_by_global_norm(config.max_grad_norm), groups) if config.max_grad_norm else groups


def _fresh_start(run: _Run, state: TrainState) -> TrainState:
    if run.checkpoints is not None and run.checkpoints.latest_step() is not None:
        raise CheckpointError(
            f"{run.checkpoints.directory} already holds checkpoints of a run; resume it, or use a "
            "new output directory."
        )
    return state


def _resume(run: _Run, state: TrainState) -> tuple[TrainState, dict[str, Any]]:
    """The state and meta of the newest intact checkpoint, checked against this run."""
    if run.checkpoints is None:
        raise CheckpointError("resume=True needs the output_dir of the run to resume.")
    state, meta = run.checkpoints.resume(state, run.settings, log=run.log)
    try:
        run.loader.resume_at(int(state.step), meta.get("data_position") or {})
    except ValueError as err:
        raise CheckpointError(f"Cannot resume: {err}") from None
    if run.metrics is not None:
        run.metrics.truncate_after(int(state.step))
    return state, meta


def _evaluate_before(run: _Run, state: TrainState, frozen: Any) -> dict[str, float]:
    result = _evaluate(run.eval_step, state.trainable, frozen, run.held_out)
    run.record({"step": 0, "eval_loss": result["loss"], "eval_perplexity": result["perplexity"]})
    run.log(f"held-out loss {result['loss']:.4f}, perplexity {result['perplexity']:.3f} "
            f"({result['tokens']} tokens) before training")
    return result


def _loop(run: _Run, state: TrainState, frozen: Any, eval_before: dict[str, float] | None, *,
          progress: bool, on_step: Callable[[dict[str, Any]], Any] | None) -> tuple[TrainState, int, bool]:
    """Train until ``max_steps`` or a stop request; returns ``(state, step, interrupted)``."""
    config = run.config
    step = int(state.step)
    bar = ProgressBar(config.max_steps, step, enabled=progress)
    say = run.log if run.log is not _stderr else bar.write
    last_tick = time.perf_counter()
    try:
        with _StopRequest(say) as stop:
            while step < config.max_steps and not stop.requested:
                state, values = run.train_step(state, frozen, run.place_batch(run.loader.batch(step)))
                values = {k: float(v) for k, v in jax.device_get(values).items()}
                step += 1
                if not math.isfinite(values["loss"]):
                    raise FloatingPointError(
                        f"The training loss became {values['loss']} at step {step}; lower the "
                        "learning rate (or use float32)."
                    )
                now = time.perf_counter()
                entry = _step_record(run, step, values, bar.update(loss=values["loss"], tokens=int(values["tokens"])),
                                     now - last_tick)
                run.record(entry)
                last_tick = now
                if on_step is not None and on_step(dict(entry)) is True:
                    stop.requested = True
                if config.eval_every and step % config.eval_every == 0 and step < config.max_steps \
                        and run.held_out:
                    _evaluate_during(run, state, frozen, step, say)
                if step % config.save_every == 0 or step == config.max_steps or stop.requested:
                    _save(run, state, step, eval_before)
            if run.checkpoints is not None:
                run.checkpoints.wait()  # the last save's errors surface here, not at exit
            return state, step, stop.requested and step < config.max_steps
    finally:
        bar.close()


def _step_record(run: _Run, step: int, values: dict[str, float], rate: float | None,
                 seconds: float) -> dict[str, Any]:
    position = run.loader.position(step - 1)
    return {"step": step, "loss": values["loss"], "lr": float(run.schedule(step - 1)),
            "grad_norm": values["grad_norm"], "tokens": int(values["tokens"]),
            "target_tokens": int(values["target_tokens"]), "epoch": position.epoch,
            "seconds": seconds, "tokens_per_s": rate}


def _evaluate_during(run: _Run, state: TrainState, frozen: Any, step: int, say: Log) -> None:
    result = _evaluate(run.eval_step, state.trainable, frozen, run.held_out)
    run.record({"step": step, "eval_loss": result["loss"], "eval_perplexity": result["perplexity"]})
    say(f"step {step}: held-out loss {result['loss']:.4f}, perplexity {result['perplexity']:.3f}")


def _save(run: _Run, state: TrainState, step: int, eval_before: dict[str, float] | None) -> None:
    if run.checkpoints is None:
        return
    # A host copy: the next step donates (reuses) the device buffers while orbax
    # may still be writing in the background.
    host_state = jax.tree.map(np.array, jax.device_get(state))
    run.checkpoints.save(step, host_state, {
        "settings": run.settings, "step": step, "eval_before": eval_before,
        "data_position": run.loader.data_position(step),
    })


def _final_evaluation(run: _Run, state: TrainState, frozen: Any, step: int) -> dict[str, float] | None:
    """Held-out numbers after training (recorded), and the loss curve."""
    eval_after = None
    if run.held_out:
        eval_after = _evaluate(run.eval_step, state.trainable, frozen, run.held_out)
        run.record({"step": step, "eval_loss": eval_after["loss"], "eval_perplexity": eval_after["perplexity"]})
    if run.output_dir is not None and run.metrics is not None:
        plot_loss_curve(run.metrics.read(), run.output_dir / "loss_curve.png")
    return eval_after


def _on_mesh(mesh: Any, strategy: str, lora_config: LoraConfig, optimizer: Any, state: TrainState,
             frozen: Any) -> tuple[TrainState, Any, Callable[[Batch], Any]]:
    """Lay the frozen params, the state and (via the returned function) batches out on ``mesh``."""
    from jax.sharding import NamedSharding, PartitionSpec

    from lora_jax import sharding as shd

    replicated = NamedSharding(mesh, PartitionSpec())
    param_shardings = shd.param_shardings(frozen, mesh, strategy, config=lora_config)
    trainable_shardings = {
        "adapter": shd.adapter_shardings(lora_config, frozen, param_shardings),
        "params": jax.tree.map(lambda _: replicated, state.trainable["params"]),
    }
    opt_shardings = shd.optimizer_shardings(optimizer, state.trainable, trainable_shardings)
    state = TrainState(
        step=jax.device_put(state.step, replicated),
        trainable=shd.shard(state.trainable, trainable_shardings),
        opt_state=shd.shard(state.opt_state, opt_shardings),
        rng=jax.device_put(state.rng, replicated),
    )
    # Batches are (grad_accum, batch, length): the batch axis is split over "data".
    batch_sharding = NamedSharding(mesh, PartitionSpec(None, "data"))
    return state, shd.shard(frozen, param_shardings), lambda batch: shd.shard_batch(batch, batch_sharding)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
