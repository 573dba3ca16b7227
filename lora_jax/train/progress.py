"""What a run shows and leaves behind: a progress bar, metrics.jsonl, a loss curve.

    log = MetricsLog("run/metrics.jsonl")
    log.write({"step": 1, "loss": 2.3})
    plot_loss_curve(log.read(), "run/loss_curve.png")

The bar and the plot show the loss's moving average debiased as Adam
debiases its moments (:class:`MovingAverage`), so the trend starts at the
first losses instead of climbing up from zero (or from the first loss).
TensorBoard and Weights & Biases are :mod:`lora_jax.train.reporting`.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm


class MovingAverage:
    """An exponential moving average with Adam's bias correction: the mean of what it saw, recent first.

    ``value = m_t / (1 - beta**t)`` with ``m_t = beta * m_(t-1) + (1 - beta) * x_t``
    and ``m_0 = 0``: after one value it is that value; a constant stays
    constant (an uncorrected EMA from 0 would climb towards it, one started
    at the first value would overweight it).

    Example:
        >>> average = MovingAverage(beta=0.9)
        >>> [round(average.update(x), 4) for x in (3.0, 3.0, 1.0)]
        [3.0, 3.0, 2.262]
        >>> round((0.081 * 3 + 0.09 * 3 + 0.1 * 1) / (1 - 0.9**3), 4)   # weights 0.1 * 0.9**age, normalised
        2.262
        >>> round(smoothed([3.0, 3.0, 1.0])[-1], 4)      # the same, for a whole list
        2.262
    """

    def __init__(self, beta: float = 0.9) -> None:
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}.")
        self.beta = beta
        self._moment = 0.0
        self._count = 0

    def update(self, value: float) -> float:
        """Add ``value``; returns the debiased average so far (see the class example)."""
        self._count += 1
        self._moment = self.beta * self._moment + (1.0 - self.beta) * float(value)
        return self.value

    @property
    def value(self) -> float:
        """The debiased average (NaN before the first value).

        Example:
            >>> import math
            >>> math.isnan(MovingAverage().value)
            True
        """
        if self._count == 0:
            return math.nan
        return self._moment / (1.0 - self.beta ** self._count)


def smoothed(values: list[float], beta: float = 0.9) -> list[float]:
    """The :class:`MovingAverage` after each of ``values``.

    Example:
        >>> smoothed([2.0, 2.0, 2.0])
        [2.0, 2.0, 2.0]
    """
    average = MovingAverage(beta)
    return [average.update(v) for v in values]


class ProgressBar:
    """A tqdm bar over training steps with loss, its debiased moving average, tokens/s and ETA.

    Example:
        >>> bar = ProgressBar(total=100, initial=0, enabled=False)
        >>> bar.update(loss=2.31, tokens=1024) is None   # the first step: no rate yet (compilation)
        True
        >>> bar.update(loss=2.20, tokens=1024) > 0       # tokens/s since the first step
        True
        >>> bar.close()

    Tokens/s is measured from the second step shown, so the first step's
    compilation does not count. With ``enabled=False`` nothing is printed.
    """

    def __init__(self, total: int, initial: int = 0, *, enabled: bool = True, desc: str = "train") -> None:
        self._bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True,
                         disable=not enabled, file=sys.stderr, smoothing=0.1)
        self._start: float | None = None
        self._tokens = 0
        self._average = MovingAverage(0.9)

    def update(self, *, loss: float, tokens: int, **extra: float) -> float | None:
        """Advance one step; returns the tokens/s so far (None on the first step).

        Example:
            >>> ProgressBar(total=2, enabled=False).update(loss=1.0, tokens=8) is None
            True
        """
        now = time.perf_counter()
        rate = None
        if self._start is None:
            self._start = now
        else:
            self._tokens += tokens
            rate = self._tokens / max(now - self._start, 1e-9)
        postfix = {"loss": f"{loss:.4f}", "avg": f"{self._average.update(loss):.4f}"}
        if rate is not None:
            postfix["tok/s"] = f"{rate:,.0f}"
        postfix.update({k: f"{v:.4g}" for k, v in extra.items()})
        self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(1)
        return rate

    def write(self, message: str) -> None:
        """Print a line above the bar.

        Example:
            >>> import contextlib, io
            >>> with contextlib.redirect_stderr(io.StringIO()):
            ...     ProgressBar(total=2, enabled=False).write("held-out loss 1.23")
        """
        self._bar.write(message, file=sys.stderr)

    def close(self) -> None:
        """Stop drawing the bar.

        Example:
            >>> ProgressBar(total=2, enabled=False).close()
        """
        self._bar.close()


class MetricsLog:
    """Append-only JSON lines of metrics, one dict a line.

    Example:
        >>> import tempfile
        >>> log = MetricsLog(tempfile.mkdtemp() + "/metrics.jsonl")
        >>> for step in (1, 2, 3):
        ...     log.write({"step": step, "loss": 2.0 / step})
        >>> log.truncate_after(2)   # on resume from step 2: drop what will be redone
        >>> [r["step"] for r in log.read()]
        [1, 2]
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` as one JSON line (see the class example)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")

    def read(self) -> list[dict[str, Any]]:
        """Every record; a last line cut off by a kill is skipped (see the class example)."""
        if not self.path.exists():
            return []
        records = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut off by a kill
                continue
        return records

    def truncate_after(self, step: int) -> None:
        """Keep only the records of steps ``<= step`` (see the class example)."""
        kept = [r for r in self.read() if r.get("step", 0) <= step]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in kept), encoding="utf-8")


def plot_loss_curve(records: list[dict[str, Any]], path: str | os.PathLike, *, title: str = "") -> Path:
    """Write a PNG of training loss, its debiased moving average and the held-out loss of each evaluation.

    Example:
        >>> import tempfile
        >>> records = [{"step": s, "loss": 3.0 / s} for s in range(1, 6)] + [{"step": 5, "eval_loss": 0.9}]
        >>> plot_loss_curve(records, tempfile.mkdtemp() + "/loss_curve.png").stat().st_size > 1000
        True
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if "loss" in r and math.isfinite(r["loss"])]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, label="train loss", linewidth=0.8, alpha=0.35, color="tab:blue")
        ax.plot(steps, smoothed(list(losses)), label="train loss (moving average, debiased)", linewidth=1.5,
                color="tab:blue")
    if evals:
        ax.plot(*zip(*evals), "o-", label="held-out loss (each evaluation)", linewidth=1.5, color="tab:orange")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(title or "lora-jax fine-tuning")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
