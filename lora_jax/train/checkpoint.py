"""Training checkpoints with orbax: state, data position and the run's settings.

Each checkpoint is a numbered directory holding two items: ``state`` (the
:class:`~lora_jax.train.step.TrainState`: adapter, full-trained leaves,
optimizer state, step and rng) and ``meta`` (JSON: the settings of the run,
where in the data the next step starts, and anything else the loop records).
Orbax writes each checkpoint to a temporary directory and renames it when
complete, so a run killed mid-save leaves the previous checkpoint intact::

    checkpoints = Checkpoints("run/checkpoints", keep=3)
    checkpoints.save(step, state, {"settings": settings, "data_position": {...}})
    ...
    state, meta = checkpoints.resume(template, settings)   # the newest intact one

What can go wrong on disk is reported, not raised from a background thread:
a save that fails (a full disk) raises :class:`CheckpointError` naming the
checkpoint and leaves no partial one behind; :meth:`Checkpoints.resume`
skips checkpoints that are incomplete or damaged (a missing item, a
truncated array file), says which and why, and resumes from the newest
intact one.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

_TMP_SUFFIX = ".orbax-checkpoint-tmp"


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or resumed; the message says which and why."""


class _QuietOrbax(logging.Filter):
    """Drops orbax's own error logs (tracebacks from its save threads): Checkpoints reports them."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and f"{os.sep}orbax{os.sep}" in record.pathname)


class Checkpoints:
    """The last ``keep`` checkpoints of a run in ``directory``.

    Example:
        >>> import tempfile, numpy as np
        >>> checkpoints = Checkpoints(tempfile.mkdtemp() + "/checkpoints", keep=2)
        >>> state = {"adapter": {"q": np.ones((3, 2), np.float32)}, "step": np.asarray(10)}
        >>> checkpoints.save(10, state, {"settings": {"lr": 1e-3}})
        >>> checkpoints.wait()
        >>> restored, meta = checkpoints.resume(state, {"lr": 1e-3})
        >>> checkpoints.latest_step(), meta["settings"], restored["adapter"]["q"].shape
        (10, {'lr': 0.001}, (3, 2))
        >>> checkpoints.close()
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, read_only: bool = False) -> None:
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=not read_only, cleanup_tmp_directories=not read_only,
            read_only=read_only,
        )
        self._quiet = _QuietOrbax()
        logging.getLogger("absl").addFilter(self._quiet)
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_names=("state", "meta"))
        self._pending: int | None = None  # the step being written in the background
        self._failed: CheckpointError | None = None

    def latest_step(self) -> int | None:
        """The newest finished checkpoint's step (None when there is none).

        Example:
            >>> import tempfile
            >>> Checkpoints(tempfile.mkdtemp()).latest_step() is None
            True
        """
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Steps of the finished checkpoints, oldest first.

        Example:
            >>> import tempfile, numpy as np
            >>> checkpoints = Checkpoints(tempfile.mkdtemp(), keep=2)
            >>> for step in (1, 2, 3):
            ...     checkpoints.save(step, {"x": np.zeros(2)}, {})
            >>> checkpoints.wait(); checkpoints.all_steps()
            [2, 3]
        """
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Start saving ``state`` and ``meta`` (JSON) as checkpoint ``step`` (asynchronously).

        A failure of the previous save surfaces here (or in :meth:`wait`) as
        :class:`CheckpointError`; see the class example.
        """
        self.wait()
        self._pending = step
        with self._reporting_write_errors():
            self._manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

    def wait(self) -> None:
        """Block until pending saves are on disk; raise :class:`CheckpointError` if one failed.

        Example:
            >>> import tempfile, numpy as np
            >>> checkpoints = Checkpoints(tempfile.mkdtemp())
            >>> checkpoints.save(1, {"x": np.zeros(2)}, {}); checkpoints.wait(); checkpoints.all_steps()
            [1]
        """
        if self._failed is not None:
            raise self._failed
        with self._reporting_write_errors():
            self._manager.wait_until_finished()
        self._pending = None

    def close(self) -> None:
        """Finish pending saves and release orbax's threads; never raises (:meth:`wait` does).

        Example:
            >>> import tempfile
            >>> Checkpoints(tempfile.mkdtemp()).close()
        """
        try:
            if self._failed is None:
                self._manager.wait_until_finished()
        except Exception:  # noqa: BLE001 - reported by wait(); close runs in finally blocks
            pass
        finally:
            try:
                self._manager.close()
            except Exception:  # noqa: BLE001
                pass
            if self._failed is not None:
                # orbax's threads are done now: remove what they may have written since the failure.
                _remove_partial(self.directory, self._pending)
            else:
                logging.getLogger("absl").removeFilter(self._quiet)

    def meta(self, step: int | None = None) -> dict[str, Any]:
        """The JSON ``meta`` of checkpoint ``step`` (default: the latest).

        Example:
            >>> import tempfile, numpy as np
            >>> checkpoints = Checkpoints(tempfile.mkdtemp())
            >>> checkpoints.save(4, {"x": np.zeros(2)}, {"note": "hi"}); checkpoints.wait()
            >>> checkpoints.meta()
            {'note': 'hi'}
        """
        step = self._need_step(step)
        restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored.meta)

    def restore(self, template: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """``(state, meta)`` of checkpoint ``step`` (default: the latest).

        ``template`` is a state of the same structure (e.g. a fresh one); its
        shapes and dtypes are checked against what was saved.

        Example:
            >>> import tempfile, numpy as np
            >>> checkpoints = Checkpoints(tempfile.mkdtemp())
            >>> checkpoints.save(2, {"x": np.arange(3.0)}, {}); checkpoints.wait()
            >>> state, _ = checkpoints.restore({"x": np.zeros(3)})
            >>> state["x"].tolist()
            [0.0, 1.0, 2.0]
        """
        step = self._need_step(step)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        except (ValueError, KeyError, TypeError) as err:
            raise CheckpointError(
                f"Checkpoint {self.directory / str(step)} does not fit this run's state: {err}"
            ) from None
        return restored.state, dict(restored.meta)

    def resume(self, template: Any, settings: dict[str, Any], *,
               log: Callable[[str], None] | None = None) -> tuple[Any, dict[str, Any]]:
        """``(state, meta)`` of the newest intact checkpoint made with ``settings``.

        Checkpoints that cannot be read (an item missing, a truncated or
        damaged file) are skipped with a message naming each and why, and
        removed, so the run continues from the newest intact one; the steps
        after it are trained again exactly as before. Settings that differ
        from the checkpoint's raise :class:`CheckpointError` naming each.

        Example:
            >>> import tempfile, shutil, numpy as np
            >>> checkpoints = Checkpoints(tempfile.mkdtemp())
            >>> for step in (1, 2):
            ...     checkpoints.save(step, {"x": np.full(2, step)}, {"settings": {"lr": 0.1}})
            >>> checkpoints.wait()
            >>> shutil.rmtree(checkpoints.directory / "2" / "state")   # damage the newest
            >>> state, meta = checkpoints.resume({"x": np.zeros(2, int)}, {"lr": 0.1}, log=print)
            Skipped checkpoint 2 (its state item is missing); resuming from checkpoint 1.
            >>> state["x"].tolist(), checkpoints.all_steps()
            ([1, 1], [1])
        """
        steps = sorted(self.all_steps(), reverse=True)
        if not steps:
            raise CheckpointError(f"No checkpoint to resume in {self.directory}.")
        skipped: list[tuple[int, str]] = []
        for step in steps:
            try:
                meta = self.meta(step)
            except Exception as err:  # noqa: BLE001 - any unreadable checkpoint is skipped, with why
                skipped.append((step, _why_unreadable(err)))
                continue
            differ = settings_diff(meta.get("settings", {}), settings)
            if differ:
                raise CheckpointError(
                    f"Cannot resume from {self.directory / str(step)}: it was made with different "
                    f"settings: {'; '.join(differ)}. Use the same settings, or a new output directory."
                )
            try:
                abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
                restored = self._manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
            except Exception as err:  # noqa: BLE001 - same settings, so a failure means damage
                skipped.append((step, _why_unreadable(err)))
                continue
            for bad_step, why in skipped:
                (log or print)(f"Skipped checkpoint {bad_step} ({why}); resuming from checkpoint {step}.")
                self._remove(bad_step)
            return restored.state, dict(restored.meta)
        reasons = "; ".join(f"checkpoint {s}: {why}" for s, why in skipped)
        raise CheckpointError(f"No intact checkpoint to resume in {self.directory} ({reasons}).")

    def restore_raw(self, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """``(state, meta)`` without a template: the state as nested dicts / lists of arrays.

        Enough to read the adapter (``state["trainable"]["adapter"]``) without
        building the model or optimizer.

        Example:
            >>> import tempfile, numpy as np
            >>> checkpoints = Checkpoints(tempfile.mkdtemp())
            >>> checkpoints.save(3, {"trainable": {"adapter": {"q": np.ones(2)}}}, {"step": 3})
            >>> checkpoints.wait(); state, meta = checkpoints.restore_raw()
            >>> state["trainable"]["adapter"]["q"].tolist(), meta
            ([1.0, 1.0], {'step': 3})
        """
        step = self._need_step(step)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
        except Exception as err:  # noqa: BLE001 - named, with the reason, instead of orbax's traceback
            raise CheckpointError(f"{self.directory / str(step)}: cannot read the checkpoint "
                                  f"({_why_unreadable(err)}).") from None
        return restored.state, dict(restored.meta)

    def check_settings(self, settings: dict[str, Any], step: int | None = None) -> None:
        """Raise :class:`CheckpointError` naming every setting that differs from the checkpoint's.

        Example:
            >>> import tempfile, numpy as np
            >>> checkpoints = Checkpoints(tempfile.mkdtemp())
            >>> checkpoints.save(5, {"x": np.zeros(1)}, {"settings": {"lr": 0.001}}); checkpoints.wait()
            >>> checkpoints.check_settings({"lr": 0.002})
            Traceback (most recent call last):
            ...
            lora_jax.train.checkpoint.CheckpointError: Cannot resume from ...: it was made with different settings: lr: checkpoint 0.001, now 0.002. Use the same settings, or a new output directory.
        """
        saved = self.meta(step).get("settings", {})
        differ = settings_diff(saved, settings)
        if differ:
            where = self.directory / str(self._need_step(step))
            raise CheckpointError(
                f"Cannot resume from {where}: it was made with different settings: {'; '.join(differ)}. "
                "Use the same settings, or a new output directory."
            )

    def _need_step(self, step: int | None) -> int:
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"No checkpoint to resume in {self.directory}.")
        return step

    def _remove(self, step: int) -> None:
        try:
            self._manager.delete(step)
        except Exception:  # noqa: BLE001 - a damaged checkpoint may defeat orbax's own delete
            shutil.rmtree(self.directory / str(step), ignore_errors=True)
            self._manager.reload()

    def _reporting_write_errors(self) -> _WriteErrors:
        return _WriteErrors(self)


class _WriteErrors:
    """Turns an exception from orbax's save (or its background thread) into one CheckpointError."""

    def __init__(self, checkpoints: Checkpoints) -> None:
        self.checkpoints = checkpoints

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, err: BaseException | None, traceback: Any) -> bool:
        if err is None or not isinstance(err, Exception):
            return False
        checkpoints = self.checkpoints
        step = checkpoints._pending
        where = checkpoints.directory / str(step) if step is not None else checkpoints.directory
        try:  # let orbax's other writer threads finish, or they may recreate what we remove
            checkpoints._manager.wait_until_finished()
        except Exception:  # noqa: BLE001 - the same failure, already being reported
            pass
        _remove_partial(checkpoints.directory, step)  # never leave a half-written checkpoint
        intact = checkpoints.all_steps()
        kept = f"checkpoint {intact[-1]} is the newest intact one" if intact else "no checkpoint is intact"
        checkpoints._failed = CheckpointError(
            f"{where}: could not write the checkpoint: {_why_unwritable(err)}; {kept}. "
            "Free space (or fix the directory), then resume the run (lora-jax finetune --resume)."
        )
        raise checkpoints._failed from None


def _remove_partial(directory: Path, step: int | None) -> None:
    for partial in directory.glob(f"{step if step is not None else ''}*{_TMP_SUFFIX}*"):
        shutil.rmtree(partial, ignore_errors=True)


def _why_unwritable(err: BaseException) -> str:
    for cause in _causes(err):
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            return "no space left on device"
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror.lower()
    return _first_line(err)


def _why_unreadable(err: BaseException) -> str:
    if isinstance(err, KeyError) and "was not found in the checkpoint" in str(err):
        item = str(err.args[0]).split('"')[1] if '"' in str(err.args[0]) else "an"
        return f"its {item} item is missing"
    if isinstance(err, FileNotFoundError):
        return f"a file is missing: {_first_line(err)}"
    if isinstance(err, json.JSONDecodeError):
        return f"its meta file is not valid JSON ({err.msg})"
    files = re.findall(r'local file "([^"]+)"', str(err))
    if files:  # tensorstore: name the file, not its whole error chain
        return f"cannot read {files[-1]}: cut short or damaged"
    return f"cannot be read: {_first_line(err)[:240]}"


def _causes(err: BaseException) -> list[BaseException]:
    chain = []
    while err is not None and err not in chain:
        chain.append(err)
        err = err.__cause__ or err.__context__
    return chain


def _first_line(err: BaseException) -> str:
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    return " ".join(text.split()) or type(err).__name__


def settings_diff(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``["lr: checkpoint 0.001, now 0.002", ...]`` for keys whose JSON values differ.

    Example:
        >>> settings_diff({"lr": 0.001, "r": 8}, {"lr": 0.002, "r": 8})
        ['lr: checkpoint 0.001, now 0.002']
    """
    def canon(value: Any) -> str:
        return json.dumps(value, sort_keys=True, default=str)

    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, "<unset>"), current.get(key, "<unset>")
        if canon(a) != canon(b):
            out.append(f"{key}: checkpoint {canon(a)}, now {canon(b)}")
    return out
