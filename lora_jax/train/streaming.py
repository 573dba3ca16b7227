"""Training data read as the run goes (``--streaming``): for data sets larger than memory.

Records are read from a :class:`~lora_jax.train.records.RecordStream` in
*windows* of ``window`` consecutive records (``--shuffle-buffer``); each
window is tokenized when it is reached, shuffled and batched on its own
(length buckets or packing, as :class:`~lora_jax.train.batches.BatchLoader`
does for the whole data set), and dropped when its batches are done. At most
one window is in memory::

    stream = RecordStream(["big.jsonl"])
    batches = StreamingBatches(stream, lambda records: encode(records, tokenizer, 128),
                               batch_size=8, seq_len=128, seed=0, pad_id=0, window=1000)
    train(apply_fn, params, lora_config, batches, config=config, ...)

How shuffling works when streaming: windows come in the order of the data
(files in order, rows in order); inside a window the order of the records and
of the batches is shuffled with ``(seed, epoch, window)``, so every epoch
sees a different order, but a record never moves to another window. Data
that is sorted on disk (by topic, by length, by source) stays sorted at the
scale of a window: shuffle such a file once before training, or use a window
large enough to mix it. Held-out records are chosen one by one, by a pure
function of ``(seed, index)`` (:func:`~lora_jax.train.records.held_out`),
never trained on.

Exact resume: a checkpoint records the epoch, the window, the batch inside it
and the window's fingerprint. Resuming skips to the window's first record
(without tokenizing what comes before), rebuilds the window exactly, checks
its fingerprint (so changed data is refused, not silently trained on) and
goes on from that batch: the run ends with the same adapter, bit for bit, as
one that was never stopped.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from lora_jax.train.batches import Batch, BatchLoader, DataPosition
from lora_jax.train.loop import data_fingerprint
from lora_jax.train.records import DataError, Record, RecordStream, held_out
from lora_jax.train.tokenize import Example

Tokenize = Callable[[list[Record]], list[Example]]


@dataclasses.dataclass
class _Window:
    """One window's batches, where it is in the data, and how far its batches are used."""

    epoch: int
    index: int
    loader: BatchLoader | None  # None: no training example in this window
    fingerprint: str
    next_batch: int = 0
    epoch_batches_before: int = 0  # batches of this epoch in the windows before this one

    @property
    def num_batches(self) -> int:
        return self.loader.steps_per_epoch if self.loader is not None else 0


class StreamingBatches:
    """Training batches tokenized and batched window by window as the run reads its data.

    Example:
        >>> import json, tempfile; from pathlib import Path
        >>> from lora_jax.train.records import RecordStream
        >>> from lora_jax.train.tokenize import encode
        >>> from lora_jax.train.tiny import tiny_tokenizer
        >>> file = Path(tempfile.mkdtemp()) / "d.jsonl"
        >>> _ = file.write_text("".join(json.dumps({"text": f"{i} apples"}) + "\\n" for i in range(40)))
        >>> tokenizer = tiny_tokenizer(["0123456789 apples"], vocab_size=270)
        >>> def make():
        ...     return StreamingBatches(RecordStream([file]), lambda r: encode(r, tokenizer, 16),
        ...                             batch_size=4, seq_len=16, seed=0, pad_id=0, window=10)
        >>> batches = make()
        >>> [batches.batch(step)["input_ids"].shape[:2] for step in range(4)]   # (grad_accum, batch, length)
        [(1, 4), (1, 4), (1, 4), (1, 4)]
        >>> position = batches.data_position(4)          # what the checkpoint after step 4 holds
        >>> position["epoch"], position["window"], position["batch"]
        (0, 1, 1)
        >>> resumed = make(); resumed.resume_at(4, position)   # a new process: same next batch, bitwise
        >>> bool((resumed.batch(4)["input_ids"] == batches.batch(4)["input_ids"]).all())
        True

    Args:
        stream: the records (read again from the start for each epoch).
        tokenize: records -> examples, e.g. ``lambda r: encode(r, tokenizer, seq_len)``.
        batch_size, seq_len, seed, pad_id, grad_accum, packing, buckets: as
            for :class:`~lora_jax.train.batches.BatchLoader`.
        window: records per shuffle window (``--shuffle-buffer``).
        eval_fraction: the share of records held out (by
            :func:`~lora_jax.train.records.held_out` with ``seed``), never trained on.
        max_records: read at most this many records per epoch.
    """

    def __init__(self, stream: RecordStream, tokenize: Tokenize, *, batch_size: int, seq_len: int, seed: int,
                 pad_id: int, grad_accum: int = 1, packing: bool = False, buckets: Sequence[int] | None = None,
                 window: int = 1000, eval_fraction: float = 0.0, max_records: int | None = None) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}.")
        self.stream, self.tokenize = stream, tokenize
        self.batch_size, self.grad_accum, self.seq_len = batch_size, grad_accum, seq_len
        self.seed, self.pad_id, self.packing, self.buckets = seed, pad_id, packing, buckets
        self.window, self.eval_fraction, self.max_records = window, eval_fraction, max_records
        self.rows_per_step = batch_size * grad_accum
        self._reader: Iterator[Record] | None = None
        self._reader_at = 0  # index of the next record _reader yields
        self._current: _Window | None = None
        self._next_step = 0
        self._epochs: dict[int, DataPosition] = {}  # positions of recent steps (for metrics)
        self._first: _Window | None = None

    # -- what the loop asks ---------------------------------------------------------------------

    @property
    def fingerprint(self) -> str:
        """The data as a checkpoint's settings name it: the sources, the window, the first window's examples.

        See the class example for a run; resume refuses a different fingerprint.
        """
        first = self._first_window()
        return f"streaming {self.stream.describe()}, window {self.window}: first window {first.fingerprint}"

    def batch(self, step: int) -> Batch:
        """The batch of step ``step``; steps come in order (a jump replays from the start, or use :meth:`resume_at`)."""
        if step != self._next_step:
            self._replay_to(step)
        window = self._current_window()
        batch = window.loader.batch(window.next_batch)
        self._epochs[step] = DataPosition(window.epoch, window.epoch_batches_before + window.next_batch)
        self._epochs.pop(step - 16, None)
        window.next_batch += 1
        self._next_step = step + 1
        return batch

    def position(self, step: int) -> DataPosition:
        """Epoch and batch index (in its epoch) of a step served lately.

        Example:
            >>> from lora_jax.train.records import RecordStream
            >>> from lora_jax.train.tokenize import Example
            >>> import numpy as np
            >>> tokenize = lambda records: [Example(np.arange(1, 5, dtype=np.int32), np.ones(4, bool))] * len(records)
            >>> batches = StreamingBatches(RecordStream([{"text": "x"}] * 6), tokenize, batch_size=2, seq_len=8,
            ...                            seed=0, pad_id=0, window=4)
            >>> _ = [batches.batch(step) for step in range(4)]
            >>> batches.position(3)                       # windows of 4 and 2 records: 3 batches an epoch
            DataPosition(epoch=1, index=0)
        """
        if step not in self._epochs:
            raise ValueError(f"step {step} has not been served lately (steps come in order).")
        return self._epochs[step]

    def data_position(self, step: int) -> dict[str, Any]:
        """Where the batch of step ``step`` (the next one) comes from, as the checkpoint records it.

        See the class example.
        """
        if step != self._next_step:
            raise ValueError(f"the next batch is step {self._next_step}'s, not step {step}'s.")
        window = self._current or self._first_window()
        return {"streaming": True, "epoch": window.epoch, "window": window.index, "batch": window.next_batch,
                "window_batches": window.num_batches, "window_fingerprint": window.fingerprint,
                "epoch_batches_before": window.epoch_batches_before, "window_records": self.window}

    def resume_at(self, step: int, position: dict[str, Any]) -> None:
        """Continue at step ``step`` from a checkpoint's ``data_position``; ValueError if the data changed.

        See the class example.
        """
        if not position.get("streaming"):
            raise ValueError("the checkpoint was not made by a streaming run (--streaming); the data order differs.")
        if position.get("window_records") != self.window:
            raise ValueError(f"the checkpoint's run read windows of {position.get('window_records')} records, "
                             f"this one {self.window} (--shuffle-buffer).")
        window = self._build(int(position["epoch"]), int(position["window"]))
        if window is None or window.fingerprint != position["window_fingerprint"] \
                or window.num_batches != position["window_batches"]:
            raise ValueError(f"the data of epoch {position['epoch']}, window {position['window']} is not what the "
                             "checkpoint's run read; the data changed.")
        window.next_batch = int(position["batch"])
        window.epoch_batches_before = int(position.get("epoch_batches_before", 0))
        self._current = window
        self._next_step = step

    # -- windows ---------------------------------------------------------------------------------

    def _current_window(self) -> _Window:
        """The window holding the next batch, moving on (and into the next epoch) as windows run out."""
        if self._current is None:
            self._current = dataclasses.replace(self._first_window())  # a copy: _first stays at batch 0
        while self._current.next_batch >= self._current.num_batches:
            done = self._current
            following = self._build(done.epoch, done.index + 1)
            if following is None:  # the end of the data: the next epoch starts
                if done.epoch_batches_before + done.num_batches == 0:
                    raise DataError(f"No training examples in {self.stream.describe()} (after holding out records, "
                                    "tokenizing and dropping ones with no target).")
                following = self._build(done.epoch + 1, 0)
            else:
                following.epoch_batches_before = done.epoch_batches_before + done.num_batches
            self._current = following
        return self._current

    def _first_window(self) -> _Window:
        """Window 0 of epoch 0, built once (the fingerprint needs it before the first step)."""
        if self._first is None:
            self._first = self._build(0, 0)
            if self._first is None:
                raise DataError(f"{self.stream.describe()}: no records.")
        return self._first

    def _build(self, epoch: int, index: int) -> _Window | None:
        """Window ``index`` of ``epoch`` read, tokenized and planned; None past the end of the data."""
        start = index * self.window
        stop = start + self.window if self.max_records is None else min(start + self.window, self.max_records)
        if stop <= start:
            return None
        records = list(itertools.islice(self._records_from(start), stop - start))
        self._reader_at = start + len(records)
        if not records:
            return None
        keep = ~held_out(np.arange(start, start + len(records)), self.eval_fraction, self.seed)
        examples = self.tokenize([r for r, k in zip(records, keep) if k])
        loader = None
        if examples:
            seed = int(np.random.SeedSequence([self.seed, epoch, index]).generate_state(1)[0])
            loader = BatchLoader(examples, batch_size=self.batch_size, seq_len=self.seq_len, seed=seed,
                                 pad_id=self.pad_id, grad_accum=self.grad_accum, packing=self.packing,
                                 buckets=self.buckets)
        return _Window(epoch, index, loader, data_fingerprint(examples))

    def _records_from(self, start: int) -> Iterator[Record]:
        """The records from index ``start``: the open reader when it is there, else the stream reopened."""
        if self._reader is None or self._reader_at != start:
            self._reader = self.stream.records(start)
        return self._reader

    def _replay_to(self, step: int) -> None:
        """Serve steps from the start until ``step`` (no checkpoint position to jump to)."""
        self._current, self._next_step = None, 0
        while self._next_step < step:
            window = self._current_window()
            skip = min(window.num_batches - window.next_batch, step - self._next_step)
            window.next_batch += skip
            self._next_step += skip


def scan_stream(stream: RecordStream, *, eval_fraction: float, seed: int, max_eval: int,
                max_records: int | None = None) -> tuple[int, int, list[Record]]:
    """``(records, held_out, first max_eval held-out records)``: one pass that reads (so checks) every record.

    Run before training, so a bad line anywhere in the data is an error
    before anything is written; nothing but the held-out records is kept.

    Example:
        >>> from lora_jax.train.records import RecordStream
        >>> stream = RecordStream([{"text": f"record {i}"} for i in range(1000)])
        >>> count, held, evals = scan_stream(stream, eval_fraction=0.05, seed=0, max_eval=8)
        >>> count, held, len(evals), evals[0]["source"]
        (1000, 54, 8, 'records row 34')
    """
    count = held = 0
    evals: list[Record] = []
    block: list[Record] = []

    def flush(start: int) -> int:
        mask = held_out(np.arange(start, start + len(block)), eval_fraction, seed)
        evals.extend(r for r, m in zip(block, mask) if m and len(evals) < max_eval)
        return int(mask.sum())

    records = stream.records() if max_records is None else itertools.islice(stream.records(), max_records)
    for record in records:
        block.append(record)
        count += 1
        if len(block) == 4096:
            held += flush(count - len(block))
            block = []
    held += flush(count - len(block))
    evals = evals[:max_eval]
    if count == 0:
        raise DataError(f"{stream.describe()}: no records.")
    if count - held < 1:
        raise DataError(f"Too little data to hold out {eval_fraction:.0%}: {count} records.")
    return count, held, evals
