"""Where a run's metrics go besides ``metrics.jsonl``: TensorBoard event files, an offline W&B run.

``--report-to tensorboard`` writes event files under ``RUN/tensorboard/``
(tensorboardX's ``SummaryWriter``; ``tensorboard --logdir RUN/tensorboard``
shows them); ``--report-to wandb`` records a Weights & Biases run in
offline mode under ``RUN/wandb/`` (``mode="offline"``: no login, nothing is
sent; ``wandb sync RUN/wandb/offline-run-*`` uploads it later if you wish).
Both are the ``logging`` extra (``pip install 'lora-jax[logging]'``)::

    reporter = Reporter.for_run("tensorboard", "runs/mine", logging_steps=10)
    train(..., reporter=reporter)       # the loop hands it every metrics record
    reporter.close()

Every ``logging_steps`` steps the writers get the means over those steps:
``train/loss``, ``train/grad_norm``, ``train/step_time`` (seconds),
``train/tokens_per_s``, the last ``train/learning_rate`` and ``train/epoch``,
and ``train/peak_memory_bytes`` where the device reports it
(``device.memory_stats()``: GPUs and TPUs, not CPUs); each held-out
evaluation gives ``eval/loss`` and ``eval/perplexity``.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

WRITERS = ("tensorboard", "wandb")
PACKAGES = {"tensorboard": "tensorboardX", "wandb": "wandb"}
TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"


class ReportError(ValueError):
    """A ``--report-to`` that cannot be served (a package missing); says what to install."""


class Writer(Protocol):
    """A metrics destination: scalars at a step, then close."""

    def scalars(self, values: Mapping[str, float], step: int) -> None: ...

    def close(self) -> None: ...


def parse_report_to(spec: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"tensorboard,wandb"`` / ``"all"`` / ``"none"`` -> the writer names, checked to be installed.

    Example:
        >>> parse_report_to("none"), parse_report_to("tensorboard"), parse_report_to("all")
        ((), ('tensorboard',), ('tensorboard', 'wandb'))
        >>> parse_report_to("mlflow")
        Traceback (most recent call last):
        ...
        lora_jax.train.reporting.ReportError: --report-to mlflow: expected 'none', 'all' or some of 'tensorboard', 'wandb'.
    """
    names = [spec] if isinstance(spec, str) or spec is None else list(spec)
    names = [n.strip() for name in names if name for n in name.split(",") if n.strip()]
    if names in ([], ["none"]):
        return ()
    if names == ["all"]:
        names = list(WRITERS)
    unknown = [n for n in names if n not in WRITERS]
    if unknown:
        raise ReportError(f"--report-to {','.join(unknown)}: expected 'none', 'all' or some of "
                          f"{', '.join(map(repr, WRITERS))}.")
    for name in names:
        if importlib.util.find_spec(PACKAGES[name]) is None:
            raise ReportError(f"--report-to {name} needs the {PACKAGES[name]} package, which is not installed: "
                              "pip install 'lora-jax[logging]'.")
    return tuple(dict.fromkeys(names))


class Reporter:
    """Hands a run's metrics records to writers: step means every ``logging_steps``, each evaluation.

    Example:
        >>> class Printed:
        ...     def scalars(self, values, step): print(step, {k: round(v, 3) for k, v in values.items()})
        ...     def close(self): print("closed")
        >>> reporter = Reporter([Printed()], logging_steps=2, memory=lambda: None)
        >>> for step, loss in [(1, 2.0), (2, 1.0), (3, 0.5)]:
        ...     reporter.write({"step": step, "loss": loss, "lr": 0.1, "grad_norm": 1.0, "tokens": 100,
        ...                     "seconds": 0.5, "epoch": 0})
        2 {'train/loss': 1.5, 'train/grad_norm': 1.0, 'train/step_time': 0.5, 'train/tokens_per_s': 200.0, 'train/learning_rate': 0.1, 'train/epoch': 0.0}
        >>> reporter.write({"step": 3, "eval_loss": 0.7, "eval_perplexity": 2.01})
        3 {'eval/loss': 0.7, 'eval/perplexity': 2.01}
        >>> reporter.close()                      # the steps since the last report, then the writers
        3 {'train/loss': 0.5, 'train/grad_norm': 1.0, 'train/step_time': 0.5, 'train/tokens_per_s': 200.0, 'train/learning_rate': 0.1, 'train/epoch': 0.0}
        closed
    """

    def __init__(self, writers: Sequence[Writer], *, logging_steps: int = 1, memory: Any = None) -> None:
        if logging_steps < 1:
            raise ValueError(f"logging_steps must be >= 1, got {logging_steps}.")
        self.writers = list(writers)
        self.logging_steps = logging_steps
        self._memory = memory or peak_memory_bytes
        self._pending: list[Mapping[str, Any]] = []

    @classmethod
    def for_run(cls, report_to: str | Sequence[str] | None, run_dir: str | os.PathLike, *,
                logging_steps: int = 1, config: Mapping[str, Any] | None = None,
                name: str | None = None) -> Reporter:
        """The writers ``--report-to`` names, writing under ``run_dir`` (opened at their first record).

        Example:
            >>> import tempfile
            >>> run = tempfile.mkdtemp()
            >>> reporter = Reporter.for_run("tensorboard", run, config={"lr": 0.01})
            >>> reporter.write({"step": 0, "eval_loss": 2.0, "eval_perplexity": 7.39}); reporter.close()
            >>> sorted(p.name.split(".")[0] for p in (Path(run) / "tensorboard").iterdir())
            ['events']
        """
        run_dir = Path(run_dir)
        writers: list[Writer] = []
        for writer in parse_report_to(report_to):
            if writer == "tensorboard":
                writers.append(TensorBoardWriter(run_dir / TENSORBOARD_DIR, config=config))
            else:
                writers.append(WandbWriter(run_dir, config=config, name=name or run_dir.name))
        return cls(writers, logging_steps=logging_steps)

    def write(self, record: Mapping[str, Any]) -> None:
        """Take one metrics record (a step's, or an evaluation's); see the class example."""
        if not self.writers:
            return
        if "eval_loss" in record:
            values = {"eval/loss": record["eval_loss"]}
            if "eval_perplexity" in record:
                values["eval/perplexity"] = record["eval_perplexity"]
            self._emit(values, int(record["step"]))
        elif "loss" in record:
            self._pending.append(record)
            if int(record["step"]) % self.logging_steps == 0:
                self._flush()

    def close(self) -> None:
        """Report the steps not reported yet, then close the writers (see the class example)."""
        try:
            self._flush()
        finally:
            for writer in self.writers:
                writer.close()

    def _flush(self) -> None:
        if not self._pending:
            return
        steps, self._pending = self._pending, []
        last = steps[-1]
        seconds = sum(float(r.get("seconds") or 0.0) for r in steps)
        values = {
            "train/loss": _mean(r["loss"] for r in steps),
            "train/grad_norm": _mean(r.get("grad_norm", math.nan) for r in steps),
            "train/step_time": seconds / len(steps),
        }
        if seconds > 0:
            values["train/tokens_per_s"] = sum(float(r.get("tokens") or 0) for r in steps) / seconds
        for key, name in (("lr", "train/learning_rate"), ("epoch", "train/epoch")):
            if last.get(key) is not None:
                values[name] = last[key]
        peak = self._memory()
        if peak is not None:
            values["train/peak_memory_bytes"] = peak
        self._emit(values, int(last["step"]))

    def _emit(self, values: Mapping[str, Any], step: int) -> None:
        finite = {k: float(v) for k, v in values.items() if v is not None and math.isfinite(float(v))}
        for writer in self.writers:
            writer.scalars(finite, step)


def _mean(values: Any) -> float:
    values = [float(v) for v in values]
    return sum(values) / len(values)


def peak_memory_bytes() -> int | None:
    """The device's peak memory in use, from ``memory_stats()``; None where it reports none (CPU).

    Example:
        >>> import jax
        >>> peak = peak_memory_bytes()
        >>> peak is None if jax.default_backend() == "cpu" else peak > 0
        True
    """
    import jax

    try:
        stats = jax.local_devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - a backend without memory statistics
        return None
    if not stats:
        return None
    peak = stats.get("peak_bytes_in_use", stats.get("bytes_in_use"))
    return int(peak) if peak is not None else None


class TensorBoardWriter:
    """Scalars as TensorBoard event files in ``logdir`` (tensorboardX); a resumed run replaces redone steps.

    Example:
        >>> import tempfile
        >>> logdir = Path(tempfile.mkdtemp()) / "tensorboard"
        >>> writer = TensorBoardWriter(logdir)
        >>> writer.scalars({"train/loss": 2.5}, step=1); writer.close()
        >>> len(list(logdir.iterdir()))
        1

    The event file is opened at the first scalars with ``purge_step`` set to
    their step, so after a resume TensorBoard drops what the killed run had
    logged past its checkpoint (those steps are trained again).
    """

    def __init__(self, logdir: str | os.PathLike, *, config: Mapping[str, Any] | None = None) -> None:
        self.logdir = Path(logdir)
        self._config = dict(config or {})
        self._writer: Any = None

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        """Add each value at ``step`` (see the class example)."""
        if self._writer is None:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(logdir=str(self.logdir), purge_step=step or None)
            if self._config:
                self._writer.add_text("settings", _markdown_table(self._config), global_step=step)
        for tag, value in values.items():
            self._writer.add_scalar(tag, value, global_step=step)

    def close(self) -> None:
        """Flush and close the event file (see the class example)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _markdown_table(config: Mapping[str, Any]) -> str:
    return "| setting | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in config.items())


class WandbWriter:
    """Scalars into a Weights & Biases run in offline mode under ``run_dir/wandb/``: nothing is sent.

    ``mode="offline"`` (and ``WANDB_MODE=offline`` for wandb's service
    process) needs no login and opens no network connection; the run is a
    directory ``wandb/offline-run-*`` that ``wandb sync`` can upload later.
    Each invocation (a resume too) is its own offline run.

    Example:
        >>> writer = WandbWriter("/tmp/unused", config={"lr": 0.01})   # wandb starts at the first scalars
        >>> writer.close()
    """

    def __init__(self, run_dir: str | os.PathLike, *, config: Mapping[str, Any] | None = None,
                 name: str | None = None) -> None:
        self.run_dir = Path(run_dir)
        self._config = dict(config or {})
        self._name = name
        self._run: Any = None

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        """Log the values at ``step`` (starts the offline run the first time)."""
        if self._run is None:
            self._run = self._start()
        self._run.log(dict(values), step=step)

    def _start(self) -> Any:
        os.environ["WANDB_MODE"] = "offline"  # read by wandb's service process too
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        (self.run_dir / WANDB_DIR).mkdir(parents=True, exist_ok=True)
        return wandb.init(mode="offline", dir=str(self.run_dir), project="lora-jax", name=self._name,
                          config=self._config, reinit="create_new",
                          settings=wandb.Settings(silent=True, save_code=False, disable_git=True))

    def close(self) -> None:
        """Finish the run (written to disk; see the class example)."""
        if self._run is not None:
            self._run.finish()
            self._run = None
