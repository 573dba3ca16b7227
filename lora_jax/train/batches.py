"""Training data, step three: fixed-shape batches of examples, a pure function of the step.

:class:`BatchLoader` serves ``(grad_accum, batch_size, L)`` arrays for any
global step, so a resumed run sees exactly the batches an uninterrupted one
would have; :func:`eval_batches` lays out held-out examples once::

    loader = BatchLoader(examples, batch_size=8, seq_len=128, seed=0, pad_id=0)
    batch = loader.batch(step)   # {"input_ids", "attention_mask", "loss_mask"}

The training loop takes any :class:`BatchSource`: this loader, or
:class:`~lora_jax.train.streaming.StreamingBatches` for data read as it trains.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from lora_jax.train.records import DataError
from lora_jax.train.tokenize import Example

Batch = dict[str, np.ndarray]


def bucket_lengths(seq_len: int, num_buckets: int = 2, multiple: int = 8) -> tuple[int, ...]:
    """Padded lengths for length bucketing: ``seq_len``, ``seq_len/2``, ... rounded up to ``multiple``.

    Example:
        >>> bucket_lengths(128, 2), bucket_lengths(128, 3), bucket_lengths(20, 4)
        ((64, 128), (32, 64, 128), (8, 16, 20))
    """
    lengths = {seq_len}
    for k in range(1, num_buckets):
        lengths.add(min(seq_len, max(multiple, math.ceil(seq_len / 2**k / multiple) * multiple)))
    return tuple(sorted(lengths))


@dataclasses.dataclass(frozen=True)
class DataPosition:
    """Where a step's batch comes from: epoch and batch index within it.

    Example:
        >>> DataPosition(epoch=1, index=3)
        DataPosition(epoch=1, index=3)
    """

    epoch: int
    index: int


@runtime_checkable
class BatchSource(Protocol):
    """What the training loop needs from its training data (:class:`BatchLoader` is one).

    ``data_position(step)`` is JSON stored in the checkpoint made after
    ``step`` steps; ``resume_at(step, position)`` gets it back on resume and
    raises ``ValueError`` (saying what changed) when the data no longer fits.

    Example:
        >>> from lora_jax.train.tokenize import Example
        >>> import numpy as np
        >>> loader = BatchLoader([Example(np.arange(1, 5, dtype=np.int32), np.ones(4, bool))] * 3,
        ...                      batch_size=2, seq_len=8, seed=0, pad_id=0)
        >>> isinstance(loader, BatchSource)
        True
    """

    rows_per_step: int

    @property
    def fingerprint(self) -> str | None: ...

    def batch(self, step: int) -> Batch: ...

    def position(self, step: int) -> DataPosition: ...

    def data_position(self, step: int) -> dict[str, Any]: ...

    def resume_at(self, step: int, position: dict[str, Any]) -> None: ...


class BatchLoader:
    """Fixed-shape training batches as a pure function of the step.

    Example:
        >>> from lora_jax.train.tokenize import Example
        >>> import numpy as np
        >>> examples = [Example(np.arange(2, 2 + n, dtype=np.int32), np.ones(n, bool)) for n in range(3, 13)]
        >>> loader = BatchLoader(examples, batch_size=2, seq_len=16, seed=0, pad_id=0, grad_accum=2)
        >>> loader.steps_per_epoch, loader.lengths
        (3, (8, 16))
        >>> batch = loader.batch(4)               # epoch 1, batch 1: the same for every run
        >>> batch["input_ids"].shape[:2], loader.position(4)
        ((2, 2), DataPosition(epoch=1, index=1))

    Each epoch shuffles with ``(seed, epoch)``. Without ``packing``, examples
    are grouped into global batches (``batch_size * grad_accum`` rows) of
    similar length and padded to the smallest of ``buckets`` that fits, so
    only a few shapes are compiled; the last, short batch of an epoch is
    filled with rows of padding that carry no loss. With ``packing``, whole
    examples are packed first-fit into rows of ``seq_len`` tokens (packed
    examples can attend to earlier ones in the same row, as in GPT-style
    packing) and every batch has length ``seq_len``.
    """

    def __init__(self, examples: Sequence[Example], *, batch_size: int, seq_len: int, seed: int,
                 pad_id: int, grad_accum: int = 1, packing: bool = False,
                 buckets: Sequence[int] | None = None) -> None:
        if not examples:
            raise DataError("No training examples (after tokenizing and dropping ones with no target).")
        if batch_size < 1 or grad_accum < 1:
            raise ValueError(f"batch_size and grad_accum must be >= 1, got {batch_size}, {grad_accum}.")
        self.examples = [Example(e.input_ids[:seq_len], e.loss_mask[:seq_len], e.source) for e in examples]
        self.batch_size, self.grad_accum, self.seq_len = batch_size, grad_accum, seq_len
        self.seed, self.pad_id, self.packing = seed, pad_id, packing
        self.lengths = (seq_len,) if packing else tuple(buckets or bucket_lengths(seq_len))
        if max(self.lengths) < seq_len:
            raise ValueError(f"buckets {self.lengths} must include seq_len {seq_len}.")
        self.rows_per_step = batch_size * grad_accum
        self.steps_per_epoch = len(self._plan(0))

    @property
    def fingerprint(self) -> None:
        """None: the training loop fingerprints the examples themselves."""
        return None

    def position(self, step: int) -> DataPosition:
        """The epoch and batch index of global step ``step``.

        Example:
            >>> from lora_jax.train.tokenize import Example
            >>> import numpy as np
            >>> loader = BatchLoader([Example(np.arange(4, dtype=np.int32), np.ones(4, bool))] * 4,
            ...                      batch_size=2, seq_len=8, seed=0, pad_id=0)
            >>> loader.position(5)
            DataPosition(epoch=2, index=1)
        """
        return DataPosition(step // self.steps_per_epoch, step % self.steps_per_epoch)

    def data_position(self, step: int) -> dict[str, Any]:
        """Where step ``step``'s batch comes from, as the checkpoint records it.

        Example:
            >>> from lora_jax.train.tokenize import Example
            >>> import numpy as np
            >>> loader = BatchLoader([Example(np.arange(4, dtype=np.int32), np.ones(4, bool))] * 4,
            ...                      batch_size=2, seq_len=8, seed=0, pad_id=0)
            >>> loader.data_position(3)
            {'epoch': 1, 'batch': 1, 'steps_per_epoch': 2}
        """
        position = self.position(step)
        return {"epoch": position.epoch, "batch": position.index, "steps_per_epoch": self.steps_per_epoch}

    def resume_at(self, step: int, position: dict[str, Any]) -> None:
        """Check a checkpoint's ``data_position`` against this data (batches are a function of the step).

        Example:
            >>> from lora_jax.train.tokenize import Example
            >>> import numpy as np
            >>> loader = BatchLoader([Example(np.arange(4, dtype=np.int32), np.ones(4, bool))] * 4,
            ...                      batch_size=2, seq_len=8, seed=0, pad_id=0)
            >>> loader.resume_at(3, {"epoch": 1, "batch": 1, "steps_per_epoch": 3})
            Traceback (most recent call last):
            ...
            ValueError: the checkpoint's data had 3 batches per epoch, this run's has 2; the data or batching changed.
        """
        saved = position.get("steps_per_epoch", self.steps_per_epoch)
        if saved != self.steps_per_epoch:
            raise ValueError(f"the checkpoint's data had {saved} batches per epoch, this run's has "
                             f"{self.steps_per_epoch}; the data or batching changed.")

    def batch(self, step: int) -> Batch:
        """The batch for global step ``step``, arrays of shape ``(grad_accum, batch_size, L)``.

        Example:
            >>> from lora_jax.train.tokenize import Example
            >>> import numpy as np
            >>> loader = BatchLoader([Example(np.arange(1, 6, dtype=np.int32), np.ones(5, bool))] * 3,
            ...                      batch_size=2, seq_len=8, seed=0, pad_id=0)
            >>> batch = loader.batch(0)
            >>> batch["input_ids"].shape, sorted(int(loader.batch(s)["attention_mask"].sum()) for s in (0, 1))
            ((1, 2, 8), [5, 10])
        """
        position = self.position(step)
        rows, length = self._plan(position.epoch)[position.index]
        batch = _rows_to_batch(self.examples, rows, self.rows_per_step, length, self.pad_id)
        shape = (self.grad_accum, self.batch_size, length)
        return {key: value.reshape(shape) for key, value in batch.items()}

    @functools.lru_cache(maxsize=2)  # noqa: B019 - a loader lives as long as its run
    def _plan(self, epoch: int) -> list[tuple[list[list[int]], int]]:
        """This epoch's batches: for each, its rows (lists of example indices) and length."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.examples)).tolist()
        if self.packing:
            rows = _pack(order, [len(e) for e in self.examples], self.seq_len)
            groups = [rows[i:i + self.rows_per_step] for i in range(0, len(rows), self.rows_per_step)]
            return [(group, self.seq_len) for group in groups]
        # Stable sort by bucket keeps the shuffled order inside each bucket.
        bucket = [_bucket(self.lengths, len(self.examples[i])) for i in order]
        order = [i for _, i in sorted(zip(bucket, order), key=lambda t: t[0])]
        plan = []
        for start in range(0, len(order), self.rows_per_step):
            chunk = order[start:start + self.rows_per_step]
            length = _bucket(self.lengths, max(len(self.examples[i]) for i in chunk))
            plan.append(([[i] for i in chunk], length))
        return [plan[i] for i in rng.permutation(len(plan))]


def _bucket(lengths: Sequence[int], n: int) -> int:
    """The smallest padded length that holds ``n`` tokens."""
    return next(length for length in lengths if length >= n)


def _rows_to_batch(examples: Sequence[Example], rows: Sequence[Sequence[int]], num_rows: int, length: int,
                   pad_id: int) -> Batch:
    """``(num_rows, length)`` arrays holding ``rows`` (lists of example indices), padding after."""
    ids = np.full((num_rows, length), pad_id, np.int32)
    attention = np.zeros((num_rows, length), np.int32)
    targets = np.zeros((num_rows, length), bool)
    for r, row in enumerate(rows):
        offset = 0
        for index in row:
            example = examples[index]
            n = len(example)
            ids[r, offset:offset + n] = example.input_ids
            attention[r, offset:offset + n] = 1
            # An example's first token is not a target (packed, it would be predicted from
            # the previous example's last token; alone, nothing predicts it).
            targets[r, offset:offset + n] = example.loss_mask
            targets[r, offset] = False
            offset += n
    return {"input_ids": ids, "attention_mask": attention, "loss_mask": targets}


def _pack(order: Sequence[int], sizes: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit packing of items (in ``order``) into rows of ``capacity``."""
    rows: list[list[int]] = []
    space: list[int] = []
    for index in order:
        size = sizes[index]
        for r, free in enumerate(space):
            if free >= size:
                rows[r].append(index)
                space[r] -= size
                break
        else:
            rows.append([index])
            space.append(capacity - size)
    return rows


def eval_batches(examples: Sequence[Example], *, batch_size: int, seq_len: int,
                 pad_id: int, buckets: Sequence[int] | None = None) -> list[Batch]:
    """Held-out batches ``(1, batch_size, L)`` in a fixed order, sorted by length.

    Example:
        >>> from lora_jax.train.tokenize import Example
        >>> import numpy as np
        >>> held_out = [Example(np.arange(1, n + 1, dtype=np.int32), np.ones(n, bool)) for n in (5, 30, 12)]
        >>> [b["input_ids"].shape for b in eval_batches(held_out, batch_size=2, seq_len=32, pad_id=0)]
        [(1, 2, 16), (1, 2, 32)]
    """
    if not examples:
        return []
    cut = [Example(e.input_ids[:seq_len], e.loss_mask[:seq_len], e.source) for e in examples]
    lengths = tuple(buckets or bucket_lengths(seq_len))
    if max(lengths) < seq_len:
        raise ValueError(f"buckets {lengths} must include seq_len {seq_len}.")
    order = sorted(range(len(cut)), key=lambda i: len(cut[i]))
    batches = []
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        length = _bucket(lengths, max(len(cut[i]) for i in chunk))
        batch = _rows_to_batch(cut, [[i] for i in chunk], batch_size, length, pad_id)
        batches.append({key: value[None] for key, value in batch.items()})
    return batches
