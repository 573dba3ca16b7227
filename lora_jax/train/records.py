"""Training data, step one: read records from files (nothing here knows about tokens).

A *record* is a dict in one of three forms, as read from a JSONL line::

    {"text": "..."}                                   loss on every token
    {"prompt": "...", "response": "..."}              loss on the response only
    {"messages": [{"role": "user", "content": ...},   rendered with the tokenizer's
                  {"role": "assistant", ...}]}         chat template; loss on assistant turns

Each record also carries ``"source"`` (``file:line``) for error messages.
:func:`load_records` is the one entry point from a list of data sources (what
``lora-jax finetune --data`` takes) to records; :func:`read_records` reads one
file or directory. Tokenizing is :mod:`lora_jax.train.tokenize`, batching
:mod:`lora_jax.train.batches`.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

Record = dict[str, Any]

DATA_SUFFIXES = (".jsonl", ".json", ".txt", ".yml", ".yaml")
ROLES = ("system", "user", "assistant", "tool")
# The data source name of the chatterbot-corpus package's English conversations.
CHATTERBOT_ENGLISH = "chatterbot-corpus/english"


class DataError(ValueError):
    """A data file that cannot be used; the message names the file (and line)."""


def load_records(sources: Sequence[str | os.PathLike] | str | os.PathLike | None = None) -> list[Record]:
    """Records from every data source, in order: files, directories, or the packaged corpus.

    Example:
        >>> import json, tempfile; from pathlib import Path
        >>> file = Path(tempfile.mkdtemp()) / "d.jsonl"
        >>> _ = file.write_text(json.dumps({"prompt": "2+2=", "response": "4"}) + "\\n")
        >>> [r["response"] for r in load_records([file])]
        ['4']
        >>> len(load_records()) > 1000   # None: chatterbot-corpus English (offline package)
        True

    Args:
        sources: paths read by :func:`read_records`, or ``"chatterbot-corpus/english"``
            (:data:`CHATTERBOT_ENGLISH`) for the packaged conversations; None is
            the packaged corpus alone.

    Raises:
        DataError: naming the file (and line) that cannot be used.
    """
    if sources is None:
        sources = [CHATTERBOT_ENGLISH]
    elif isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    records: list[Record] = []
    for source in sources:
        if str(source) == CHATTERBOT_ENGLISH:
            records.extend(read_chatterbot(strict=False))
        else:
            records.extend(read_records(source))
    return records


def read_records(path: str | os.PathLike) -> list[Record]:
    """Records from a ``.jsonl`` / ``.json`` (JSON lines), ``.txt`` or chatterbot ``.yml`` file.

    Example:
        >>> import tempfile; from pathlib import Path
        >>> file = Path(tempfile.mkdtemp()) / "chat.jsonl"
        >>> _ = file.write_text('{"text": "hello"}\\n')
        >>> read_records(file)[0]["text"], read_records(file)[0]["source"].endswith("chat.jsonl:1")
        ('hello', True)

    A directory is read file by file (sorted) for those suffixes. Raises
    :class:`DataError` naming the file and line for a missing, empty,
    non-UTF-8 or malformed file.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such data file.")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in DATA_SUFFIXES and p.is_file())
        if not files:
            raise DataError(f"{path}: directory has no data files ({', '.join(DATA_SUFFIXES)}).")
        return [r for f in files for r in read_records(f)]
    suffix = path.suffix.lower()
    if suffix in (".yml", ".yaml"):
        return read_chatterbot(path)
    lines = _read_lines(path)
    if suffix == ".txt":
        text = "\n".join(lines)
        return [{"text": text, "source": str(path)}]
    return read_jsonl(path, lines)


def _read_lines(path: Path) -> list[str]:
    """The file's lines as text; errors name the line that is not UTF-8."""
    try:
        raw = path.read_bytes()
    except IsADirectoryError:
        raise DataError(f"{path}: a directory, expected a data file.") from None
    if not raw.strip():
        raise DataError(f"{path}: the file is empty.")
    lines = []
    for number, line in enumerate(raw.split(b"\n"), start=1):
        if number == 1 and line.startswith(b"\xef\xbb\xbf"):
            line = line[3:]
        try:
            lines.append(line.decode("utf-8").rstrip("\r"))
        except UnicodeDecodeError as err:
            raise DataError(
                f"{path}:{number}: not valid UTF-8 (byte 0x{line[err.start]:02x} at column "
                f"{err.start + 1}); save the file as UTF-8."
            ) from None
    return lines


def read_jsonl(path: str | os.PathLike, lines: Sequence[str] | None = None) -> list[Record]:
    """Records from a JSON-lines file, each validated by :func:`check_record`.

    Example:
        >>> import tempfile; from pathlib import Path
        >>> file = Path(tempfile.mkdtemp()) / "d.jsonl"
        >>> _ = file.write_text('{"text": "a"}\\n\\n{"text": "b"}\\n')
        >>> [r["source"].rsplit(":", 1)[1] for r in read_jsonl(file)]   # blank lines skipped
        ['1', '3']
    """
    path = Path(path)
    lines = _read_lines(path) if lines is None else lines
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            hint = " (expected one JSON object per line)" if line.lstrip()[:1] in "[]" else ""
            raise DataError(f"{where}: not valid JSON: {err.msg} at column {err.colno}{hint}.") from None
        records.append(check_record(value, where))
    if not records:
        raise DataError(f"{path}: the file has no records (only blank lines).")
    return records


def check_record(value: Any, where: str) -> Record:
    """``value`` as a record with ``"source": where``, or :class:`DataError` saying what is wrong.

    Example:
        >>> check_record({"prompt": "Q", "completion": "A"}, "d.jsonl:1")
        {'prompt': 'Q', 'response': 'A', 'source': 'd.jsonl:1'}
        >>> check_record({"txt": "typo"}, "d.jsonl:2")
        Traceback (most recent call last):
        ...
        lora_jax.train.records.DataError: d.jsonl:2: expected "text", "prompt"/"response" or "messages"; found keys ['txt'].
    """
    if not isinstance(value, dict):
        raise DataError(f"{where}: expected a JSON object, found a {type(value).__name__}.")
    if "messages" in value:
        return {"messages": _check_messages(value["messages"], where), "source": where}
    if "prompt" in value or "response" in value or "completion" in value:
        prompt = value.get("prompt")
        response = value.get("response", value.get("completion"))
        if not isinstance(prompt, str) or not isinstance(response, str):
            raise DataError(f"{where}: \"prompt\" and \"response\" must both be strings.")
        return {"prompt": prompt, "response": response, "source": where}
    if "text" in value:
        if not isinstance(value["text"], str):
            raise DataError(f"{where}: \"text\" must be a string.")
        return {"text": value["text"], "source": where}
    raise DataError(
        f"{where}: expected \"text\", \"prompt\"/\"response\" or \"messages\"; "
        f"found keys {sorted(value)}."
    )


def _check_messages(messages: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: \"messages\" must be a non-empty list of {{role, content}}.")
    for i, message in enumerate(messages):
        if not (isinstance(message, dict) and isinstance(message.get("content"), str)
                and message.get("role") in ROLES):
            raise DataError(
                f"{where}: messages[{i}] must be {{\"role\": one of {list(ROLES)}, "
                f"\"content\": a string}}, found {json.dumps(message)[:80]}."
            )
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: \"messages\" has no assistant turn to train on.")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def chatterbot_files(language: str = "english") -> list[Path]:
    """The YAML files of the offline ``chatterbot-corpus`` package for ``language``.

    Example:
        >>> sorted(p.stem for p in chatterbot_files())[:3]
        ['ai', 'botprofile', 'coding']
    """
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("The chatterbot-corpus package is not installed (pip install chatterbot-corpus).")
    root = Path(spec.submodule_search_locations[0]) / "data" / language
    files = sorted(Path(p) for p in glob.glob(str(root / "*.yml")))
    if not files:
        raise DataError(f"{root}: no chatterbot-corpus YAML files for language {language!r}.")
    return files


def read_chatterbot(paths: str | os.PathLike | Iterable[str | os.PathLike] | None = None, *,
                    strict: bool = True) -> list[Record]:
    """Chat records from chatterbot-corpus YAML files (default: all English ones).

    Example:
        >>> record = read_chatterbot([f for f in chatterbot_files() if f.stem == "ai"])[0]
        >>> [m["role"] for m in record["messages"]], record["category"]
        (['user', 'assistant'], 'ai')

    Each conversation alternates user and assistant turns, starting with the
    user; a trailing user turn (nothing to learn from) is dropped.
    ``category`` is the file's stem. A conversation that is not a list of
    at least two turns raises :class:`DataError` naming its line, or with
    ``strict=False`` is skipped (the packaged English corpus has one such
    entry, in trivia.yml).
    """
    if paths is None:
        files = chatterbot_files()
    elif isinstance(paths, (str, os.PathLike)):
        files = [Path(paths)]
    else:
        files = [Path(p) for p in paths]
    records = []
    for path in files:
        root, conversations = _chatterbot_conversations(path)
        lines = _item_lines(root, "conversations")
        for index, conversation in enumerate(conversations):
            where = f"{path}:{lines[index]}" if index < len(lines) else f"{path} #{index + 1}"
            if not isinstance(conversation, list) or len(conversation) < 2 \
                    or not all(isinstance(t, (str, int, float)) for t in conversation):
                if strict:
                    raise DataError(f"{where}: a conversation must be a list of at least two turns "
                                    f"(strings), found {str(conversation)[:60]!r}.")
                continue
            turns = [str(t) for t in conversation]
            if len(turns) % 2:
                turns = turns[:-1]
            messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": t}
                        for i, t in enumerate(turns)]
            records.append({"messages": messages, "category": path.stem, "source": where})
    return records


def _chatterbot_conversations(path: Path) -> tuple[Any, list[Any]]:
    """The YAML node tree (for line numbers) and the ``conversations`` list of one file."""
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: ~100x faster
    text = "\n".join(_read_lines(path))
    try:
        root = yaml.compose(text, Loader=loader)
        document = loader("").construct_document(root) if root is not None else None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise DataError(f"{path}{line}: not valid YAML: {problem}.") from None
    conversations = document.get("conversations") if isinstance(document, dict) else None
    if not isinstance(conversations, list):
        raise DataError(f"{path}: expected a YAML mapping with a \"conversations\" list.")
    return root, conversations


def _item_lines(root: Any, key: str) -> list[int]:
    """1-based first lines of the items of the YAML sequence under ``key`` (for messages)."""
    for key_node, value_node in getattr(root, "value", []) or []:
        if getattr(key_node, "value", None) == key and isinstance(value_node.value, list):
            return [item.start_mark.line + 1 for item in value_node.value]
    return []


def split(examples: Sequence[Any], eval_fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """A deterministic shuffle-split into ``(train, held_out)`` (of records or examples).

    Example:
        >>> train, held_out = split(list(range(20)), 0.1, seed=0)
        >>> len(train), len(held_out), sorted(train + held_out) == list(range(20))
        (18, 2, True)

    At least one item is held out when ``eval_fraction > 0``; the order of
    each part follows the input order.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}.")
    n = len(examples)
    n_eval = 0 if eval_fraction == 0 else max(1, round(n * eval_fraction))
    if n_eval >= n:
        raise DataError(f"Too little data to hold out {eval_fraction:.0%}: {n} examples.")
    held = set(np.random.default_rng(seed).permutation(n)[:n_eval].tolist())
    train = [e for i, e in enumerate(examples) if i not in held]
    evals = [e for i, e in enumerate(examples) if i in held]
    return train, evals
