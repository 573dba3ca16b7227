"""Training data, step one: read records from files and datasets (nothing here knows about tokens).

A *record* is a dict in one of three forms, as read from a JSONL line::

    {"text": "..."}                                   loss on every token
    {"prompt": "...", "response": "..."}              loss on the response only
    {"messages": [{"role": "user", "content": ...},   rendered with the tokenizer's
                  {"role": "assistant", ...}]}         chat template; loss on assistant turns

Each record also carries ``"source"`` (``file:line``, or ``file row N``) for
error messages. Sources are JSON lines (``.jsonl`` / ``.json``), ``.txt``,
chatterbot YAML, and through Hugging Face ``datasets``: Parquet and CSV
files, a directory written by ``save_to_disk`` (a ``Dataset``, or a
``DatasetDict`` and its ``split``), and in Python any ``datasets.Dataset`` /
``IterableDataset`` or list of dicts. Columns with other names are mapped by
:class:`DataFields` (``--text-field``, ``--prompt-field``, ...)::

    records = load_records(["train.parquet"], fields=DataFields(prompt="question", response="answer"))
    stream = RecordStream(["big.jsonl"])    # the same records, read lazily, again from any index

Everything is read offline: a name that is neither a local path nor a
Hugging Face Hub dataset already in the local cache is an error, never a
download. :func:`load_records` is the one entry point from data sources to a
list of records; :class:`RecordStream` reads the same records one at a time
(``--streaming``). Tokenizing is :mod:`lora_jax.train.tokenize`, batching
:mod:`lora_jax.train.batches` and :mod:`lora_jax.train.streaming`.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import importlib.util
import json
import os
import re
from collections.abc import Generator, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

Record = dict[str, Any]
Records = Generator[Record, None, int]  # a source's records after a skip; returns how many it has

DATA_SUFFIXES = (".jsonl", ".json", ".txt", ".yml", ".yaml", ".parquet", ".csv")
ROLES = ("system", "user", "assistant", "tool")
# The data source name of the chatterbot-corpus package's English conversations.
CHATTERBOT_ENGLISH = "chatterbot-corpus/english"
# Files a `save_to_disk` directory holds: a Dataset, or a DatasetDict.
_SAVED_DATASET = ("state.json", "dataset_info.json")
_SAVED_DATASET_DICT = "dataset_dict.json"
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


class DataError(ValueError):
    """A data file that cannot be used; the message names the file (and line)."""


@dataclasses.dataclass(frozen=True)
class DataFields:
    """Which columns hold a record: ``text``, or ``prompt`` + ``response``, or chat ``messages``.

    Unset (the default), each row is read as it is named: a ``"text"``,
    ``"prompt"``/``"response"`` (or ``"completion"``) or ``"messages"`` column.
    Set, every row must have the named columns; other columns are ignored.

    Example:
        >>> fields = DataFields(prompt="question", response="answer")
        >>> fields.select({"question": "2+2?", "answer": "4", "id": 7}, "d.csv row 1")
        {'prompt': '2+2?', 'response': '4'}
        >>> DataFields(prompt="question")
        Traceback (most recent call last):
        ...
        lora_jax.train.records.DataError: --prompt-field and --response-field go together; got only --prompt-field.
    """

    text: str | None = None
    prompt: str | None = None
    response: str | None = None
    messages: str | None = None

    def __post_init__(self) -> None:
        forms = [name for name, given in (("--text-field", self.text is not None),
                                          ("--prompt-field/--response-field",
                                           self.prompt is not None or self.response is not None),
                                          ("--messages-field", self.messages is not None)) if given]
        if len(forms) > 1:
            raise DataError(f"Choose one form of record: {' or '.join(forms)}, not both.")
        if (self.prompt is None) != (self.response is None):
            given = "--prompt-field" if self.response is None else "--response-field"
            raise DataError(f"--prompt-field and --response-field go together; got only {given}.")

    def __bool__(self) -> bool:
        return any(v is not None for v in dataclasses.astuple(self))

    def select(self, row: Mapping[str, Any], where: str) -> dict[str, Any]:
        """The record's columns of ``row`` under their record names (``row`` itself when unset).

        See the class example; a missing column is a :class:`DataError` naming it and the flag.
        """
        if not self:
            return dict(row)
        wanted = {"text": self.text, "prompt": self.prompt, "response": self.response, "messages": self.messages}
        out = {}
        for name, column in wanted.items():
            if column is None:
                continue
            if column not in row:
                raise DataError(f"{where}: no {column!r} column (--{name}-field); found {sorted(row)}.")
            out[name] = row[column]
        return out


# -- the one entry point ---------------------------------------------------------------------------

def load_records(sources: Any = None, *, fields: DataFields | None = None,
                 split: str | None = None) -> list[Record]:
    """Records from every data source, in order: files, directories, datasets, or the packaged corpus.

    Example:
        >>> import json, tempfile; from pathlib import Path
        >>> file = Path(tempfile.mkdtemp()) / "d.jsonl"
        >>> _ = file.write_text(json.dumps({"prompt": "2+2=", "response": "4"}) + "\\n")
        >>> [r["response"] for r in load_records([file])]
        ['4']
        >>> len(load_records()) > 1000   # None: chatterbot-corpus English (offline package)
        True
        >>> import datasets
        >>> rows = datasets.Dataset.from_dict({"q": ["2+2="], "a": ["4"]})
        >>> load_records(rows, fields=DataFields(prompt="q", response="a"))
        [{'prompt': '2+2=', 'response': '4', 'source': 'dataset row 1'}]

    Args:
        sources: paths read by :func:`read_records` (files, directories,
            ``save_to_disk`` directories, or the name of a Hub dataset in the
            local cache), ``"chatterbot-corpus/english"``
            (:data:`CHATTERBOT_ENGLISH`) for the packaged conversations, a
            ``datasets.Dataset`` / ``DatasetDict`` / ``IterableDataset``, a
            list of dicts, or a list of any of these; None is the packaged
            corpus alone.
        fields: the columns holding the records (default: named as above).
        split: the split of a ``DatasetDict`` or Hub dataset (default ``"train"``,
            or its only split).

    Raises:
        DataError: naming the file (and line) that cannot be used.
    """
    return list(RecordStream(sources, fields=fields, split=split))


class RecordStream:
    """The records of data sources, read one at a time, as often as needed, from any index.

    What ``--streaming`` trains on: nothing is read until iterated, and
    :meth:`records` ``(start)`` skips the first ``start`` records cheaply
    (JSON lines are not parsed, dataset rows are not converted), so a
    resumed run reads on from where it was.

    Example:
        >>> import json, tempfile; from pathlib import Path
        >>> file = Path(tempfile.mkdtemp()) / "d.jsonl"
        >>> _ = file.write_text("".join(json.dumps({"text": f"line {i}"}) + "\\n" for i in range(5)))
        >>> stream = RecordStream([file, file])
        >>> [r["text"] for r in stream.records(start=4)][:3]
        ['line 4', 'line 0', 'line 1']
        >>> stream.count()
        10
    """

    def __init__(self, sources: Any = None, *, fields: DataFields | None = None,
                 split: str | None = None) -> None:
        self.fields = fields or DataFields()
        self._sources = [_open(source, self.fields, split) for source in _as_sources(sources)]

    def __iter__(self) -> Iterator[Record]:
        return self.records()

    def records(self, start: int = 0) -> Iterator[Record]:
        """Every record from index ``start`` on (see the class example)."""
        for source in self._sources:
            if source.length is not None and start >= source.length:
                start -= source.length
                continue
            total = yield from source.records(start)
            source.length = total
            start = max(0, start - total)

    def count(self) -> int:
        """How many records there are (reads, and so checks, every one once; nothing is kept).

        See the class example.
        """
        return sum(1 for _ in self.records())

    def describe(self) -> str:
        """The sources, as one line names them.

        Example:
            >>> RecordStream().describe()
            'chatterbot-corpus/english'
        """
        return ", ".join(source.name for source in self._sources)


def read_records(path: str | os.PathLike) -> list[Record]:
    """Records from one data file or directory (the kinds :func:`load_records` reads).

    Example:
        >>> import tempfile; from pathlib import Path
        >>> file = Path(tempfile.mkdtemp()) / "chat.jsonl"
        >>> _ = file.write_text('{"text": "hello"}\\n')
        >>> read_records(file)[0]["text"], read_records(file)[0]["source"].endswith("chat.jsonl:1")
        ('hello', True)

    ``.jsonl`` / ``.json`` (JSON lines, or a ``.json`` file holding one
    array of records), ``.txt`` (one text record),
    chatterbot ``.yml``, ``.parquet`` and ``.csv`` files; a ``save_to_disk``
    directory; any other directory is read file by file (sorted) for those
    suffixes. Raises :class:`DataError` naming the file and line for a
    missing, empty, non-UTF-8 or malformed file.
    """
    return load_records([path])


# -- sources ---------------------------------------------------------------------------------------

class _Source:
    """One data source: its name, its records after a skip, and (once read) how many it has."""

    def __init__(self, name: str, read: Any, length: int | None = None) -> None:
        self.name = name
        self._read = read  # (start) -> Records
        self.length = length

    def records(self, start: int) -> Records:
        return (yield from self._read(start))


def _as_sources(sources: Any) -> list[Any]:
    if sources is None:
        return [CHATTERBOT_ENGLISH]
    if isinstance(sources, (str, os.PathLike, Mapping)) or _is_dataset(sources):
        return [sources]
    if isinstance(sources, Sequence) and sources and all(isinstance(s, Mapping) for s in sources):
        return [list(sources)]  # a list of records is one source
    if isinstance(sources, Sequence):
        return list(sources)
    if isinstance(sources, Iterable):
        return [sources]
    raise DataError(f"Expected data files, a datasets.Dataset or records, got a {type(sources).__name__}.")


def _is_dataset(value: Any) -> bool:
    return type(value).__module__.startswith("datasets.")


def _open(source: Any, fields: DataFields, split: str | None) -> _Source:
    """The :class:`_Source` of one entry of ``--data`` (a path or name) or of a Python object."""
    if isinstance(source, (str, os.PathLike)):
        if str(source) == CHATTERBOT_ENGLISH:
            return _list_source(CHATTERBOT_ENGLISH, lambda: read_chatterbot(strict=False))
        return _open_path(Path(source), fields, split)
    if _is_dataset(source):
        return _dataset_source(_choose_split(source, split, "the dataset"), "dataset", fields)
    if isinstance(source, Mapping):
        source = [source]
    if isinstance(source, Sequence):
        rows = list(source)
        return _Source("records", lambda start: _rows(rows[start:], fields, "records", start, len(rows)),
                       length=len(rows))
    if isinstance(source, Iterable):
        rows = list(source)  # a one-shot iterable: read once, so it can be read again
        return _Source("records", lambda start: _rows(rows[start:], fields, "records", start, len(rows)),
                       length=len(rows))
    raise DataError(f"Expected a data file, a datasets.Dataset or records, got a {type(source).__name__}.")


def looks_like_hub_name(name: str) -> bool:
    """Whether ``name`` could be a Hub dataset (``owner/name``) rather than a data path: it is none here.

    Example:
        >>> looks_like_hub_name("HuggingFaceH4/no_robots"), looks_like_hub_name("train.jsonl")
        (True, False)
    """
    path = Path(name)
    return (not path.exists() and not path.is_absolute() and _HUB_NAME.fullmatch(name) is not None
            and path.suffix.lower() not in DATA_SUFFIXES)


def _open_path(path: Path, fields: DataFields, split: str | None) -> _Source:
    if not path.exists():
        if looks_like_hub_name(str(path)):
            return _hub_source(str(path), fields, split)
        if str(path).startswith(("datasets.", "records (")):  # how run.json names a Python object
            raise DataError(f"{path}: the run read this from a Python object (FinetuneSettings(data=...)), which "
                            "no file holds; pass the same data again, from Python.")
        raise DataError(f"{path}: no such data file.")
    if path.is_dir():
        if _is_saved_dataset(path):
            return _saved_dataset_source(path, fields, split)
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in DATA_SUFFIXES and p.is_file())
        if not files:
            raise DataError(f"{path}: directory has no data files ({', '.join(DATA_SUFFIXES)}), and is not "
                            "a dataset written by `save_to_disk`.")
        parts = [_open_path(file, fields, split) for file in files]
        return _Source(str(path), lambda start: _chain(parts, start))
    suffix = path.suffix.lower()
    if suffix in (".yml", ".yaml"):
        return _list_source(str(path), lambda: read_chatterbot(path))
    if suffix == ".txt":
        return _list_source(str(path), lambda: [{"text": "\n".join(_read_lines(path)), "source": str(path)}])
    if suffix == ".parquet":
        return _Source(str(path), lambda start: _parquet_records(path, fields, start))
    if suffix == ".csv":
        return _Source(str(path), lambda start: _csv_records(path, fields, start))
    if suffix == ".json" and _starts_with(path, b"["):  # one JSON array of records (`to_json(lines=False)`)
        return _list_source(str(path), lambda: list(_json_array_records(path, fields)))
    return _Source(str(path), lambda start: _jsonl_records(path, fields, start))


def _chain(parts: Sequence[_Source], start: int) -> Records:
    total = 0
    for part in parts:
        if part.length is not None and start >= part.length:
            count = part.length
        else:
            count = yield from part.records(start)
            part.length = count
        start = max(0, start - count)
        total += count
    return total


def _list_source(name: str, read: Any) -> _Source:
    """A source small enough to read whole (chatterbot YAML, a .txt file), read when first needed."""
    cache: list[list[Record]] = []

    def records(start: int) -> Records:
        if not cache:
            cache.append(read())
        yield from cache[0][start:]
        return len(cache[0])
    return _Source(name, records)


def _rows(rows: Iterable[Mapping[str, Any]], fields: DataFields, name: str, start: int,
          total: int | None = None, columnar: bool = False) -> Records:
    """Records of ``rows`` (the ones after ``start``), checked; ``source`` is ``"name row N"``."""
    index = start
    for index, row in enumerate(rows, start=start + 1):
        where = f"{name} row {index}"
        if not isinstance(row, Mapping):
            raise DataError(f"{where}: expected a record (a dict), found a {type(row).__name__}.")
        if columnar:  # a table's schema gives every row every column; None is "not in this row"
            row = {k: v for k, v in row.items() if v is not None}
        # Records read before (by load_records) keep the file and line they came from.
        source = row.get("source") if not columnar and not fields and isinstance(row.get("source"), str) else None
        yield check_record(fields.select(row, where), source or where)
    return total if total is not None else index


# -- JSON lines, text, chatterbot: our own readers, for messages naming the line ------------------

def _jsonl_records(path: Path, fields: DataFields, start: int) -> Records:
    """The records of a JSON-lines file from record ``start`` on, reading one line at a time."""
    count = 0
    for number, line in _text_lines(path):
        if not line.strip():
            continue
        count += 1
        if count <= start:
            continue  # skipped records were checked when they were first read
        yield _json_record(line, f"{path}:{number}", fields)
    if count == 0:
        raise DataError(f"{path}: the file is empty.")
    return count


def _starts_with(path: Path, prefix: bytes) -> bool:
    """Whether the file's first non-blank bytes (after a BOM) are ``prefix``."""
    with path.open("rb") as handle:
        head = handle.read(4096).removeprefix(b"\xef\xbb\xbf").lstrip()
    return head.startswith(prefix)


def _json_array_records(path: Path, fields: DataFields) -> Iterator[Record]:
    text = "\n".join(_read_lines(path))  # errors name the line that is not UTF-8
    try:
        items = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: not valid JSON: {err.msg} at column {err.colno}.") from None
    if not isinstance(items, list) or not items:
        raise DataError(f"{path}: expected a JSON array of records (or one JSON object per line).")
    for index, item in enumerate(items, start=1):
        where = f"{path} item {index}"
        yield check_record(fields.select(item, where) if isinstance(item, dict) else item, where)


def _text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of each line, read lazily; errors name the line that is not UTF-8."""
    try:
        handle = path.open("rb")
    except IsADirectoryError:
        raise DataError(f"{path}: a directory, expected a data file.") from None
    with handle:
        for number, raw in enumerate(handle, start=1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            raw = raw.rstrip(b"\n")
            yield number, _decoded(raw, path, number).rstrip("\r")


def _decoded(raw: bytes, path: Path, number: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(
            f"{path}:{number}: not valid UTF-8 (byte 0x{raw[err.start]:02x} at column "
            f"{err.start + 1}); save the file as UTF-8."
        ) from None


def _read_lines(path: Path) -> list[str]:
    """The (small) file's lines as text; errors name the line that is not UTF-8."""
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
        lines.append(_decoded(line, path, number).rstrip("\r"))
    return lines


def _json_record(line: str, where: str, fields: DataFields) -> Record:
    try:
        value = json.loads(line)
    except json.JSONDecodeError as err:
        hint = " (expected one JSON object per line)" if line.lstrip()[:1] in "[]" else ""
        raise DataError(f"{where}: not valid JSON: {err.msg} at column {err.colno}{hint}.") from None
    if isinstance(value, dict):
        value = fields.select(value, where)
    return check_record(value, where)


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
    if lines is None:
        return list(_jsonl_records(path, DataFields(), 0))
    records = [_json_record(line, f"{path}:{number}", DataFields())
               for number, line in enumerate(lines, start=1) if line.strip()]
    if not records:
        raise DataError(f"{path}: the file has no records (only blank lines).")
    return records


# -- Hugging Face datasets: Parquet, CSV, save_to_disk, Hub cache, Dataset objects -----------------

def _datasets() -> Any:
    """The ``datasets`` module, offline (set before its first import, as it reads them then)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets

    return datasets


def _is_saved_dataset(path: Path) -> bool:
    return (path / _SAVED_DATASET_DICT).is_file() or all((path / name).is_file() for name in _SAVED_DATASET)


def _saved_dataset_source(path: Path, fields: DataFields, split: str | None) -> _Source:
    datasets = _datasets()
    try:
        dataset = datasets.load_from_disk(str(path))
    except Exception as err:  # noqa: BLE001 - any failure of the directory is the user's to fix
        raise DataError(f"{path}: cannot read the dataset written by `save_to_disk` "
                        f"({type(err).__name__}: {_one_line(err)}).") from None
    dataset = _choose_split(dataset, split, str(path))
    return _dataset_source(dataset, f"{path}" + (f"[{split}]" if split else ""), fields)


def _hub_source(name: str, fields: DataFields, split: str | None) -> _Source:
    """A Hub dataset, only from the local cache: offline is forced for the call, so nothing is downloaded."""
    datasets = _datasets()
    import huggingface_hub.constants as hub_constants

    saved = (hub_constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE)
    hub_constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        dataset = datasets.load_dataset(name, split=split or "train")
    except Exception:  # noqa: BLE001 - not cached (or not a dataset): one message covers each case
        raise DataError(
            f"{name}: no such data file or directory, and no local copy of a Hugging Face Hub dataset "
            f"named {name!r}{f' (split {split!r})' if split else ''}. lora-jax reads data offline and never "
            "downloads: pass a local file or directory (e.g. one written by `save_to_disk`)."
        ) from None
    finally:
        hub_constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved
    return _dataset_source(dataset, name, fields)


def _choose_split(dataset: Any, split: str | None, name: str) -> Any:
    """The split of a ``DatasetDict`` (``split``, else "train", else its only one); a dataset as is."""
    if not isinstance(dataset, Mapping):
        return dataset
    splits = list(dataset)
    chosen = split or ("train" if "train" in splits else splits[0] if len(splits) == 1 else None)
    if chosen not in splits:
        wanted = f"no split {split!r}" if split else "no 'train' split"
        raise DataError(f"{name}: {wanted}; it has {splits} (choose one with --split).")
    return dataset[chosen]


def _dataset_source(dataset: Any, name: str, fields: DataFields) -> _Source:
    """A ``datasets.Dataset`` (rows read in batches, from any index) or ``IterableDataset``."""
    if hasattr(dataset, "__len__") and hasattr(dataset, "select"):
        def records(start: int) -> Records:
            total = len(dataset)
            rows = _table_rows(dataset.select(range(start, total)) if start else dataset)
            return (yield from _rows(rows, fields, name, start, total, columnar=True))
        return _Source(name, records, length=len(dataset))

    def stream(start: int) -> Records:
        return (yield from _rows(dataset.skip(start) if start else dataset, fields, name, start, columnar=True))
    return _Source(name, stream)


def _table_rows(dataset: Any, batch_size: int = 512) -> Iterator[dict[str, Any]]:
    for batch in dataset.iter(batch_size=batch_size):
        columns = list(batch)
        for values in zip(*(batch[c] for c in columns)):
            yield dict(zip(columns, values))


def _csv_records(path: Path, fields: DataFields, start: int) -> Records:
    """Rows of a CSV file through ``datasets``, streamed (pandas reads ``_ROWS_AT_ONCE`` rows at a time)."""
    datasets = _datasets()
    # Every column as text, as written: no numbers, dates or NaN guessed from the cells.
    features = datasets.Features({c: datasets.Value("string") for c in _csv_columns(path)})
    try:
        rows = datasets.load_dataset("csv", data_files=[str(path)], split="train", streaming=True,
                                     features=features, na_filter=False, chunksize=_ROWS_AT_ONCE)
        if start:
            rows = rows.skip(start)
        total = start
        for record in _rows(rows, fields, str(path), start, columnar=True):
            total += 1
            yield record
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - pandas / pyarrow errors: the file is broken
        raise DataError(f"{path}: not a readable CSV file ({type(err).__name__}: {_one_line(err)}).") from None
    if total == 0:
        raise DataError(f"{path}: the file has no rows.")
    return total


def _parquet_records(path: Path, fields: DataFields, start: int) -> Records:
    """Rows of a Parquet file, a row group at a time, starting at the row group holding row ``start``.

    pyarrow's ``ParquetFile.iter_batches`` (the library ``datasets`` reads
    Parquet with) rather than ``datasets``' streaming builder, which in
    datasets 5.2 reads a whole file before its first row: this keeps one row
    group in memory, and a resume skips to its row group without reading
    the ones before.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(path)
        sizes = [file.metadata.row_group(i).num_rows for i in range(file.num_row_groups)]
        total = sum(sizes)
        if total == 0:
            raise DataError(f"{path}: the file has no rows.")
        group, first = 0, 0
        while group < len(sizes) and first + sizes[group] <= start:
            first += sizes[group]
            group += 1
        if group == len(sizes):
            return total
        batches = file.iter_batches(batch_size=_ROWS_AT_ONCE, row_groups=range(group, len(sizes)))
        rows = (row for batch in batches for row in batch.to_pylist())
        for _ in range(start - first):
            next(rows)
        yield from _rows(rows, fields, str(path), start, total, columnar=True)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path}: not a readable Parquet file ({type(err).__name__}: {_one_line(err)}).") from None
    return total


_ROWS_AT_ONCE = 256


def _csv_columns(path: Path) -> list[str]:
    import csv

    for _, line in _text_lines(path):
        if line.strip():
            return next(csv.reader([line]))
    raise DataError(f"{path}: the file is empty.")


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:300]


# -- checking records ---------------------------------------------------------------------------------

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
                f"\"content\": a string}}, found {json.dumps(message, default=str)[:80]}."
            )
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: \"messages\" has no assistant turn to train on.")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


# -- chatterbot-corpus ------------------------------------------------------------------------------

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


# -- held-out records -------------------------------------------------------------------------------

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


def held_out(indices: np.ndarray, eval_fraction: float, seed: int) -> np.ndarray:
    """Which records (by index in the stream) are held out: each by itself, a pure function of the index.

    What ``--streaming`` uses instead of :func:`split`, which needs every
    record at once: record ``i`` is held out when a uniform number drawn for
    ``(seed, i // 4096)`` at ``i % 4096`` is below ``eval_fraction``.

    Example:
        >>> mask = held_out(np.arange(10_000), 0.05, seed=0)
        >>> round(float(mask.mean()), 2), bool((held_out(np.arange(5000, 5010), 0.05, 0) == mask[5000:5010]).all())
        (0.05, True)
    """
    indices = np.asarray(indices, np.int64)
    out = np.zeros(indices.shape, bool)
    if eval_fraction == 0 or not indices.size:
        return out
    for block in np.unique(indices // _HELD_OUT_BLOCK):
        draws = np.random.default_rng([seed, _HELD_OUT_TAG, int(block)]).random(_HELD_OUT_BLOCK)
        here = indices // _HELD_OUT_BLOCK == block
        out[here] = draws[indices[here] % _HELD_OUT_BLOCK] < eval_fraction
    return out


_HELD_OUT_BLOCK = 4096
_HELD_OUT_TAG = 0x4E1D  # keeps these draws apart from the data order's, which also start from the seed


def describe_data(value: Any) -> str:
    """How ``run.json`` and messages name a data source that is not a path (a Dataset, records).

    Example:
        >>> describe_data([{"text": "a"}, {"text": "b"}])
        'records (2, sha256 ...)'
        >>> import datasets
        >>> describe_data(datasets.Dataset.from_dict({"text": ["a"]}))
        'datasets.Dataset (1 rows: text)'
    """
    if isinstance(value, (str, os.PathLike)):
        return os.fspath(value)
    if _is_dataset(value):
        kind = type(value).__name__
        if isinstance(value, Mapping):
            return f"datasets.{kind} ({', '.join(f'{k}: {len(v)} rows' for k, v in value.items())})"
        rows = f"{len(value)} rows: " if hasattr(value, "__len__") else ""
        columns = ", ".join(getattr(value, "column_names", None) or [])
        return f"datasets.{kind} ({rows}{columns})"
    if isinstance(value, Sequence):
        digest = hashlib.sha256(json.dumps(list(value), sort_keys=True, default=str).encode()).hexdigest()[:16]
        return f"records ({len(value)}, sha256 {digest})"
    return f"{type(value).__name__} records"
