"""Output directories lora_jax writes: nothing of yours is replaced, two runs never share one.

Every command that writes a directory (``finetune``, ``merge``, ``export``,
``import``) goes through :class:`OutputDir`:

- an existing, non-empty directory is refused unless ``overwrite`` (or a
  finetune ``resume``) is asked for;
- ``overwrite`` removes only what lora_jax itself wrote there: the files the
  command writes (a fixed list per command), in a directory marked as its
  output by ``.lora-jax.json`` (written into each output directory, naming
  the command). A directory without the marker counts as lora_jax's only if
  everything in it is a file that command writes. Files it did not write stay where they are; any other directory with
  files in it is refused, naming the path and
  one file that lora_jax did not write, so ``--output . --overwrite`` cannot
  empty your working directory;
- :class:`RunLock` (``.lora-jax.lock``, holding the pid) keeps a second run
  out of a directory a live one is writing; a lock left by a process that died
  (SIGKILL, power loss) is taken over, with a message.

::

    output = OutputDir("runs/mine", "finetune")
    output.check(overwrite=False)     # before reading or loading anything
    ...
    with RunLock(output.path, log=print):
        output.claim(overwrite=False)  # creates it, removes its old files, writes the marker
        ...                            # write the run
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

MARKER_FILE = ".lora-jax.json"
LOCK_FILE = ".lora-jax.lock"

# What each command writes into its output directory (names or fnmatch patterns), and a
# file whose presence shows a directory without a marker is that command's output.
ARTIFACTS: dict[str, tuple[str, ...]] = {
    "finetune": ("checkpoints", "metrics.jsonl", "loss_curve.png", "adapter", "base_model", "run.json",
                 "run.yaml", "summary.json", "samples_before.json", "tensorboard", "wandb"),
    "export": ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "README.md"),
    "import": ("adapter", "lora_config.json"),
    "combine": ("adapter_config.json", "adapter_model.safetensors", "README.md"),
    "merge": ("config.json", "generation_config.json", "model.safetensors", "model-*.safetensors",
              "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model",
              "added_tokens.json", "chat_template.jinja"),
}
SIGNATURE = {"finetune": "run.json", "export": "adapter_config.json", "import": "lora_config.json",
             "merge": "config.json", "combine": "adapter_config.json"}
_OURS = (MARKER_FILE, LOCK_FILE)


class OutputError(ValueError):
    """An output directory lora_jax may not write (foreign files, another run in it); says which."""


class OutputDir:
    """A directory one lora_jax command writes, and what ``overwrite`` may remove from it.

    Example:
        >>> import tempfile; from pathlib import Path
        >>> mine = Path(tempfile.mkdtemp())
        >>> _ = (mine / "notes.txt").write_text("my notes")
        >>> OutputDir(mine, "import").check(overwrite=True)
        Traceback (most recent call last):
        ...
        lora_jax.train.outputs.OutputError: ... holds files lora_jax did not write (notes.txt); ...
        >>> run = OutputDir(mine / "run", "import")
        >>> run.claim(overwrite=False)
        >>> _ = (run.path / "lora_config.json").write_text("{}")
        >>> run.check(overwrite=True); run.claim(overwrite=True)   # removes only its own files
        >>> sorted(p.name for p in run.path.iterdir()), (mine / "notes.txt").exists()
        (['.lora-jax.json'], True)
    """

    def __init__(self, path: str | os.PathLike, command: str) -> None:
        if command not in ARTIFACTS:
            raise ValueError(f"unknown command {command!r}; one of {sorted(ARTIFACTS)}")
        self.path = Path(path)
        self.command = command

    def check(self, *, overwrite: bool, resume: bool = False) -> None:
        """Raise :class:`OutputError` unless the command may write here; writes nothing.

        Example:
            >>> import tempfile
            >>> OutputDir(tempfile.mkdtemp() + "/new", "merge").check(overwrite=False)   # absent: fine
        """
        path = self.path
        if not path.exists():
            return
        if not path.is_dir():
            raise OutputError(f"{path} exists and is not a directory; choose another --output.")
        entries = self._entries()
        if not entries:
            return
        marker = self._marker()
        if marker is not None and marker.get("command") != self.command:
            raise OutputError(
                f"{path} holds the output of `lora-jax {marker.get('command')}`, not of "
                f"`lora-jax {self.command}`; choose another --output."
            )
        if resume:
            return
        if not overwrite:
            what = "a run" if self.command == "finetune" else "files"
            hint = ", --resume to continue it," if self.command == "finetune" else ""
            raise OutputError(f"{path} already exists and holds {what}; pass --overwrite to replace it{hint} "
                              "or choose another --output.")
        foreign = [name for name in entries if not self._is_artifact(name)]
        if foreign and marker is None:
            raise OutputError(
                f"{path.absolute()} holds files lora_jax did not write ({foreign[0]}"
                f"{f' and {len(foreign) - 1} more' if len(foreign) > 1 else ''}); refusing to "
                "--overwrite it. Choose another --output (or empty it yourself)."
            )
        if marker is None and SIGNATURE[self.command] not in entries:
            raise OutputError(
                f"{path} does not look like the output of `lora-jax {self.command}` (no "
                f"{SIGNATURE[self.command]}); refusing to --overwrite it. Choose another --output."
            )

    def claim(self, *, overwrite: bool, resume: bool = False) -> None:
        """Check again, create the directory, remove the command's old files if ``overwrite``, mark it.

        Call it once, right before the first file is written (see the class example).
        """
        self.check(overwrite=overwrite, resume=resume)
        if overwrite and not resume:
            for name in self._entries():
                if self._is_artifact(name):
                    target = self.path / name
                    if target.is_dir() and not target.is_symlink():
                        shutil.rmtree(target)
                    else:
                        target.unlink()
        self.path.mkdir(parents=True, exist_ok=True)
        self._write_marker()

    def _entries(self) -> list[str]:
        return sorted(p.name for p in self.path.iterdir() if p.name not in _OURS)

    def _is_artifact(self, name: str) -> bool:
        # Only the command's own list: a marker file could be edited, the code cannot.
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in ARTIFACTS[self.command])

    def _marker(self) -> dict[str, Any] | None:
        file = self.path / MARKER_FILE
        if not file.is_file():
            return None
        try:
            marker = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            raise OutputError(f"{file}: not valid JSON; it marks {self.path} as lora_jax's output. "
                              "Remove it, or choose another --output.") from None
        if not isinstance(marker, dict) or not isinstance(marker.get("files", []), list):
            raise OutputError(f"{file}: expected a JSON object with \"command\" and \"files\"; "
                              "remove it, or choose another --output.")
        return marker

    def _write_marker(self) -> None:
        marker = {"command": self.command, "files": list(ARTIFACTS[self.command]),
                  "note": "written by lora_jax: `--overwrite` may replace these files, and only these"}
        (self.path / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")


class RunLock:
    """A lock file holding the pid of the process writing a directory.

    Example:
        >>> import tempfile
        >>> directory = tempfile.mkdtemp()
        >>> with RunLock(directory):
        ...     RunLock(directory).acquire()      # a second writer, even in the same process
        Traceback (most recent call last):
        ...
        lora_jax.train.outputs.OutputError: ... is in use by another lora-jax run (pid ...); ...
        >>> with RunLock(directory):              # released: free again
        ...     pass

    The lock is an ``fcntl.flock`` on the file, which the kernel drops when
    its process dies however it dies, so a live holder is always detected
    and a dead one never blocks; the pid inside is for the messages.
    """

    def __init__(self, directory: str | os.PathLike, *, log: Callable[[str], None] | None = None) -> None:
        self.path = Path(directory) / LOCK_FILE
        self._log = log or (lambda message: None)
        self._fd: int | None = None

    def holder(self) -> int | None:
        """The pid of a live process holding the lock, or None (free, stale or absent).

        Example:
            >>> import tempfile
            >>> RunLock(tempfile.mkdtemp()).holder() is None
            True
        """
        if not self.path.exists() or self._fd is not None:
            return None
        fd = os.open(self.path, os.O_RDWR)
        try:
            if _try_lock(fd):
                _unlock(fd)
                return None
            return _read_pid(fd) or -1
        finally:
            os.close(fd)

    def acquire(self) -> None:
        """Take the lock or raise :class:`OutputError` naming the pid that holds it (class example)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if not _try_lock(fd):
                pid = _read_pid(fd)
                os.close(fd)
                who = f"pid {pid}" if pid else "another process"
                raise OutputError(
                    f"{self.path.parent} is in use by another lora-jax run ({who}, lock file {self.path}); "
                    "wait for it to finish, or choose another --output."
                )
            if _same_file(fd, self.path):
                break
            os.close(fd)  # released and removed while we waited for it: lock the new file instead
        else:
            raise OutputError(f"{self.path}: could not take the lock (it keeps being replaced).")
        stale = _read_pid(fd)
        if stale and stale != os.getpid():
            self._log(f"Taking over the lock {self.path} left by pid {stale}, which is no longer running.")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Remove the lock file and unlock it.

        Example:
            >>> import tempfile
            >>> lock = RunLock(tempfile.mkdtemp()); lock.acquire(); lock.release(); lock.path.exists()
            False
        """
        if self._fd is None:
            return
        try:
            if _same_file(self._fd, self.path):
                self.path.unlink()  # while still locked: a waiting process then re-opens the path
        finally:
            _unlock(self._fd)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _try_lock(fd: int) -> bool:
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _unlock(fd: int) -> None:
    import fcntl

    fcntl.flock(fd, fcntl.LOCK_UN)


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def _read_pid(fd: int) -> int | None:
    text = os.pread(fd, 200, 0).decode("utf-8", "replace").split()
    return int(text[0]) if text and text[0].isdigit() else None

