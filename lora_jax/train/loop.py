"""The training loop: steps, held-out evaluation, checkpoints, resume, Ctrl-C.

    config = TrainConfig(max_steps=200, batch_size=8, seq_len=128, learning_rate=2e-4)
    result = train(apply_fn, params, lora_config, train_examples, config=config,
                   eval_examples=held_out, pad_id=tokenizer.pad_token_id, output_dir="run")
    result.eval_before["perplexity"], result.eval_after["perplexity"]
    adapter = result.adapter

With ``output_dir`` the run writes ``metrics.jsonl``, ``loss_curve.png`` and
orbax checkpoints under ``checkpoints/``; ``resume=True`` continues from the
latest one and ends with the same adapter as an uninterrupted run (the data
order is a pure function of seed and step, and everything else that changes
is in the checkpoint). SIGINT / SIGTERM save a checkpoint and return early
with ``result.interrupted`` set.
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

from lora_jax.config import LoraConfig
from lora_jax.init import init
from lora_jax.train.checkpoint import CheckpointError, Checkpoints
from lora_jax.train.data import BatchLoader, Example, bucket_lengths, eval_batches
from lora_jax.train.progress import MetricsLog, ProgressBar, plot_loss_curve
from lora_jax.train.step import (
    ApplyFn,
    TrainState,
    cast_floating,
    init_state,
    learning_rate_schedule,
    make_eval_step,
    make_optimizer,
    make_train_step,
    trainable_leaves,
)

DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Settings of a training run.

    Example::

        TrainConfig(max_steps=150, batch_size=8, seq_len=128, learning_rate=2e-4, warmup_steps=10)

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
        remat: a ``jax.checkpoint_policies`` name for gradient checkpointing, or None.
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

    # Settings that do not change the trained adapter, so a resume may change them.
    RESUMABLE = ("eval_every", "eval_batch_size", "save_every", "keep")

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "grad_accum", "seq_len", "keep", "num_buckets"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}.")
        if self.dtype not in DTYPES:
            raise ValueError(f"TrainConfig.dtype must be one of {DTYPES}, got {self.dtype!r}.")

    def settings(self) -> dict[str, Any]:
        """The fields a resumed run must share with the checkpoint."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in self.RESUMABLE}


@dataclasses.dataclass
class TrainResult:
    """What :func:`train` returns.

    ``adapter`` and ``trainable_params`` (``{"module.leaf": array}``, put them
    back with :func:`~lora_jax.train.step.with_leaves`) are float32.
    ``eval_before`` / ``eval_after`` hold ``loss``, ``perplexity`` and
    ``tokens`` on the held-out examples (None without them, or when
    interrupted).
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
    """A short hash of the token ids and loss masks, to recognise the same data on resume."""
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

    Example::

        evaluate(apply_fn, params, adapter, config, held_out)["perplexity"]

    The loss is the mean next-token NLL over target tokens (responses only
    for prompt/response and chat data); perplexity is its exponential.
    """
    eval_step = make_eval_step(apply_fn, lora_config)
    batches = eval_batches(examples, batch_size=batch_size, seq_len=seq_len, pad_id=pad_id)
    trainable = {"adapter": adapter, "params": trainable_params or {}}
    return _evaluate(eval_step, trainable, params, batches)


def _evaluate(eval_step: Callable[..., Any], trainable: dict[str, Any], params: Any,
              batches: Sequence[dict[str, np.ndarray]]) -> dict[str, float]:
    total, count = 0.0, 0.0
    for batch in batches:
        nll, n = jax.device_get(eval_step(trainable, params, batch))
        total, count = total + float(nll), count + float(n)
    loss = total / max(count, 1.0)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": int(count)}


class _StopRequest:
    """SIGINT / SIGTERM set ``requested`` (the loop saves and stops); a second SIGINT aborts."""

    def __init__(self, notify: Callable[[str], None]) -> None:
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


def train(apply_fn: ApplyFn, params: Any, lora_config: LoraConfig, train_examples: Sequence[Example], *,
          config: TrainConfig, eval_examples: Sequence[Example] = (), pad_id: int = 0,
          adapter: dict[str, Any] | None = None, output_dir: str | Path | None = None,
          resume: bool = False, run_info: dict[str, Any] | None = None, progress: bool = True,
          log: Callable[[str], None] | None = None, on_step: Callable[[dict[str, Any]], Any] | None = None,
          mesh: Any = None, sharding: str = "fsdp") -> TrainResult:
    """Fine-tune a LoRA adapter for ``apply_fn(params, input_ids, attention_mask) -> logits``.

    Example::

        apply_fn = lambda p, ids, mask: model.apply({"params": p}, ids, attention_mask=mask)
        result = train(apply_fn, params, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]),
                       examples, config=TrainConfig(max_steps=100), eval_examples=held_out)

    Args:
        apply_fn: the model's forward pass over a params pytree.
        params: the frozen pretrained params (never modified).
        lora_config: targets, rank and scaling; ``modules_to_save`` and
            biases (``bias=``) train in full.
        train_examples / eval_examples: from :func:`~lora_jax.train.data.encode`.
        config: :class:`TrainConfig`.
        pad_id: token id used for padding (its positions are masked out).
        adapter: start from this adapter instead of ``lora_jax.init``.
        output_dir: where checkpoints, ``metrics.jsonl`` and ``loss_curve.png`` go.
        resume: continue from the latest checkpoint in ``output_dir``; refuses
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
    """
    started = time.perf_counter()
    output_dir = Path(output_dir) if output_dir is not None else None
    settings = {**config.settings(), "lora": lora_config.to_dict(),
                "train_data": data_fingerprint(train_examples), **(run_info or {})}

    optimizer = make_optimizer(config.learning_rate, config.max_steps, warmup_steps=config.warmup_steps,
                               schedule=config.schedule, weight_decay=config.weight_decay,
                               max_grad_norm=config.max_grad_norm)
    schedule = learning_rate_schedule(config.learning_rate, config.max_steps,
                                      warmup_steps=config.warmup_steps, schedule=config.schedule)
    if adapter is None:
        adapter = init(lora_config, params, jax.random.key(config.seed))
    state = init_state(adapter, trainable_leaves(params, lora_config), optimizer, config.seed)
    frozen = params if config.dtype == "float32" else cast_floating(params, jnp.dtype(config.dtype))

    loader = BatchLoader(train_examples, batch_size=config.batch_size, seq_len=config.seq_len,
                         seed=config.seed, pad_id=pad_id, grad_accum=config.grad_accum,
                         packing=config.packing, buckets=_buckets(config))
    held_out = eval_batches(eval_examples, batch_size=config.eval_batch_size or config.batch_size,
                            seq_len=config.seq_len, pad_id=pad_id, buckets=_buckets(config))
    train_step = make_train_step(apply_fn, lora_config, optimizer, remat=config.remat)
    eval_step = make_eval_step(apply_fn, lora_config)

    checkpoints = Checkpoints(output_dir / "checkpoints", keep=config.keep) if output_dir else None
    metrics = MetricsLog(output_dir / "metrics.jsonl") if output_dir else None
    meta: dict[str, Any] = {}
    if resume:
        if checkpoints is None:
            raise CheckpointError("resume=True needs the output_dir of the run to resume.")
        checkpoints.check_settings(settings)
        state, meta = checkpoints.restore(state)
        saved_epoch = (meta.get("data_position") or {}).get("steps_per_epoch", loader.steps_per_epoch)
        if saved_epoch != loader.steps_per_epoch:
            raise CheckpointError(
                f"Cannot resume: the checkpoint's data had {saved_epoch} batches per epoch, this run's "
                f"has {loader.steps_per_epoch}; the data or batching changed."
            )
        if metrics:
            metrics.truncate_after(int(state.step))
    elif checkpoints is not None and checkpoints.latest_step() is not None:
        raise CheckpointError(
            f"{checkpoints.directory} already holds checkpoints of a run; resume it, or use a "
            "new output directory."
        )
    start = int(state.step)
    place_batch: Callable[[Any], Any] = lambda batch: batch  # noqa: E731
    if mesh is not None:
        state, frozen, place_batch = _on_mesh(mesh, sharding, lora_config, optimizer, state, frozen)
        held_out = [place_batch(b) for b in held_out]

    def record(entry: dict[str, Any]) -> None:
        history.append(entry)
        if metrics:
            metrics.write(entry)

    history: list[dict[str, Any]] = []
    eval_before = meta.get("eval_before")
    if held_out and eval_before is None:
        eval_before = _evaluate(eval_step, state.trainable, frozen, held_out)
        record({"step": 0, "eval_loss": eval_before["loss"], "eval_perplexity": eval_before["perplexity"]})
        (log or _stderr)(f"held-out loss {eval_before['loss']:.4f}, perplexity {eval_before['perplexity']:.3f} "
                         f"({eval_before['tokens']} tokens) before training")

    bar = ProgressBar(config.max_steps, start, enabled=progress)
    say = log or bar.write

    def save(step: int) -> None:
        if checkpoints is not None:
            position = loader.position(step)
            # A host copy: the next step donates (reuses) the device buffers while orbax
            # may still be writing in the background.
            host_state = jax.tree.map(np.array, jax.device_get(state))
            checkpoints.save(step, host_state, {
                "settings": settings, "step": step, "eval_before": eval_before,
                "data_position": {"epoch": position.epoch, "batch": position.index,
                                  "steps_per_epoch": loader.steps_per_epoch},
            })

    interrupted = False
    step = start
    last_tick = time.perf_counter()
    try:
        with _StopRequest(say) as stop:
            while step < config.max_steps and not stop.requested:
                batch = place_batch(loader.batch(step))
                state, step_metrics = train_step(state, frozen, batch)
                values = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
                step += 1
                now = time.perf_counter()
                if not math.isfinite(values["loss"]):
                    raise FloatingPointError(
                        f"The training loss became {values['loss']} at step {step}; lower the "
                        "learning rate (or use float32)."
                    )
                rate = bar.update(loss=values["loss"], tokens=int(values["tokens"]))
                position = loader.position(step - 1)
                entry = {"step": step, "loss": values["loss"], "lr": float(schedule(step - 1)),
                         "grad_norm": values["grad_norm"], "tokens": int(values["tokens"]),
                         "target_tokens": int(values["target_tokens"]), "epoch": position.epoch,
                         "seconds": now - last_tick, "tokens_per_s": rate}
                record(entry)
                last_tick = now
                if on_step is not None and on_step(dict(entry)) is True:
                    stop.requested = True
                if config.eval_every and step % config.eval_every == 0 and step < config.max_steps \
                        and held_out:
                    result = _evaluate(eval_step, state.trainable, frozen, held_out)
                    record({"step": step, "eval_loss": result["loss"],
                            "eval_perplexity": result["perplexity"]})
                    say(f"step {step}: held-out loss {result['loss']:.4f}, "
                        f"perplexity {result['perplexity']:.3f}")
                if step % config.save_every == 0 or step == config.max_steps or stop.requested:
                    save(step)
            interrupted = stop.requested and step < config.max_steps
    finally:
        bar.close()
        if checkpoints is not None:
            checkpoints.wait()
            checkpoints.close()

    eval_after = None
    if held_out and not interrupted:
        eval_after = _evaluate(eval_step, state.trainable, frozen, held_out)
        record({"step": step, "eval_loss": eval_after["loss"], "eval_perplexity": eval_after["perplexity"]})
    if output_dir is not None and metrics is not None:
        plot_loss_curve(metrics.read(), output_dir / "loss_curve.png")
    trainable = jax.device_get(state.trainable)
    return TrainResult(
        adapter=trainable["adapter"], trainable_params=trainable["params"], step=step,
        history=history, eval_before=eval_before, eval_after=eval_after, interrupted=interrupted,
        seconds=time.perf_counter() - started,
        checkpoint_dir=checkpoints.directory if checkpoints is not None else None,
    )


def _on_mesh(mesh: Any, strategy: str, lora_config: LoraConfig, optimizer: Any, state: TrainState,
             frozen: Any) -> tuple[TrainState, Any, Callable[[Any], Any]]:
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
    # Batches are (grad_accum, batch, length): split the batch axis over "data".
    batch_sharding = NamedSharding(mesh, PartitionSpec(None, "data"))
    return state, shd.shard(frozen, param_shardings), lambda batch: shd.shard(batch, batch_sharding)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _buckets(config: TrainConfig) -> tuple[int, ...]:
    return bucket_lengths(config.seq_len, config.num_buckets)
