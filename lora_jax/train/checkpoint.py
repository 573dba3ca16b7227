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
    checkpoints.check_settings(settings)          # refuses a different run
    state, meta = checkpoints.restore(template)   # the latest checkpoint
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed; the message says why."""


class Checkpoints:
    """The last ``keep`` checkpoints of a run in ``directory``.

    Example::

        checkpoints = Checkpoints(tmp / "checkpoints", keep=2)
        checkpoints.save(10, state, {"settings": {"lr": 1e-3}})
        checkpoints.latest_step()     # 10
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, read_only: bool = False) -> None:
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=not read_only, cleanup_tmp_directories=not read_only,
            read_only=read_only,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Start saving ``state`` and ``meta`` (JSON) as checkpoint ``step`` (asynchronously)."""
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

    def meta(self, step: int | None = None) -> dict[str, Any]:
        """The JSON ``meta`` of checkpoint ``step`` (default: the latest)."""
        step = self._need_step(step)
        restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored.meta)

    def restore(self, template: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """``(state, meta)`` of checkpoint ``step`` (default: the latest).

        ``template`` is a state of the same structure (e.g. a fresh one); its
        shapes and dtypes are checked against what was saved.
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

    def restore_raw(self, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """``(state, meta)`` without a template: the state as nested dicts / lists of arrays.

        Enough to read the adapter (``state["trainable"]["adapter"]``) without
        building the model or optimizer.
        """
        step = self._need_step(step)
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
        return restored.state, dict(restored.meta)

    def check_settings(self, settings: dict[str, Any], step: int | None = None) -> None:
        """Raise :class:`CheckpointError` naming every setting that differs from the checkpoint's."""
        saved = self.meta(step).get("settings", {})
        differ = settings_diff(saved, settings)
        if differ:
            where = self.directory / str(self._need_step(step))
            raise CheckpointError(
                f"Cannot resume from {where}: it was made with different settings: {'; '.join(differ)}. "
                "Use the same settings, or a new output directory."
            )

    def wait(self) -> None:
        """Block until pending asynchronous saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

    def _need_step(self, step: int | None) -> int:
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"No checkpoint to resume in {self.directory}.")
        return step


def settings_diff(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``["lr: checkpoint 0.001, now 0.002", ...]`` for keys whose JSON values differ."""
    def canon(value: Any) -> str:
        return json.dumps(value, sort_keys=True, default=str)

    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, "<unset>"), current.get(key, "<unset>")
        if canon(a) != canon(b):
            out.append(f"{key}: checkpoint {canon(a)}, now {canon(b)}")
    return out
