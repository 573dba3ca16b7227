"""Training data: read records, tokenize them with a loss mask, and batch them.

A *record* is a dict in one of three forms, as read from a JSONL line:

    {"text": "..."}                                   loss on every token
    {"prompt": "...", "response": "..."}              loss on the response only
    {"messages": [{"role": "user", "content": ...},   rendered with the tokenizer's
                  {"role": "assistant", ...}]}         chat template; loss on assistant turns

Each record also carries ``"source"`` (``file:line``) for error messages.
:func:`encode` turns records into :class:`Example`\\ s (token ids and a mask of
the tokens to predict), and :class:`BatchLoader` serves fixed-shape batches as
a pure function of the step number, so a resumed run sees exactly the batches
an uninterrupted one would have::

    records = read_records("train.jsonl")
    examples = encode(records, tokenizer, max_length=128)
    loader = BatchLoader(examples, batch_size=8, seq_len=128, seed=0, pad_id=0)
    batch = loader.batch(step)   # {"input_ids", "attention_mask", "loss_mask"}: (accum, 8, L)
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import importlib.util
import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

Record = dict[str, Any]
Batch = dict[str, np.ndarray]

DATA_SUFFIXES = (".jsonl", ".json", ".txt", ".yml", ".yaml")
ROLES = ("system", "user", "assistant", "tool")


class DataError(ValueError):
    """A data file that cannot be used; the message names the file (and line)."""


# -- reading ------------------------------------------------------------------------------

def read_records(path: str | os.PathLike) -> list[Record]:
    """Records from a ``.jsonl`` / ``.json`` (JSON lines), ``.txt`` or chatterbot ``.yml`` file.

    Example::

        read_records("chat.jsonl")[0]
        # {"messages": [...], "source": "chat.jsonl:1"}

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
    raw = path.read_bytes()
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
    """Records from a JSON-lines file, each validated by :func:`check_record`."""
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
    """``value`` as a record with ``"source": where``, or :class:`DataError` saying what is wrong."""
    if not isinstance(value, dict):
        raise DataError(f"{where}: expected a JSON object, found a {type(value).__name__}.")
    if "messages" in value:
        messages = value["messages"]
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
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages],
                "source": where}
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


def chatterbot_files(language: str = "english") -> list[Path]:
    """The YAML files of the offline ``chatterbot-corpus`` package for ``language``."""
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

    Example::

        read_chatterbot()[0]
        # {"messages": [{"role": "user", "content": "What is AI?"},
        #               {"role": "assistant", "content": "Artificial Intelligence is ..."}],
        #  "category": "ai", "source": ".../english/ai.yml:4"}

    Each conversation alternates user and assistant turns, starting with the
    user; a trailing user turn (nothing to learn from) is dropped.
    ``category`` is the file's stem. A conversation that is not a list of
    at least two turns raises :class:`DataError` naming its line, or with
    ``strict=False`` is skipped (the packaged English corpus has one such
    entry, in trivia.yml).
    """
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: ~100x faster
    if paths is None:
        files = chatterbot_files()
    elif isinstance(paths, (str, os.PathLike)):
        files = [Path(paths)]
    else:
        files = [Path(p) for p in paths]
    records = []
    for path in files:
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


def _item_lines(root: Any, key: str) -> list[int]:
    """1-based first lines of the items of the YAML sequence under ``key`` (for messages)."""
    for key_node, value_node in getattr(root, "value", []) or []:
        if getattr(key_node, "value", None) == key and isinstance(value_node.value, list):
            return [item.start_mark.line + 1 for item in value_node.value]
    return []


# -- tokenizing ------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Example:
    """One tokenized sequence; ``loss_mask[i]`` is True where token ``i`` is a training target."""

    input_ids: np.ndarray
    loss_mask: np.ndarray
    source: str = ""

    def __len__(self) -> int:
        return len(self.input_ids)


def encode(records: Iterable[Record], tokenizer: Any, max_length: int) -> list[Example]:
    """Tokenize ``records`` into examples of at most ``max_length`` tokens.

    Example::

        encode([{"prompt": "2+2=", "response": "4"}], tokenizer, 64)[0].loss_mask
        # False over the prompt, True over "4" and the end-of-sequence token

    ``text`` is tokenized with the tokenizer's special tokens and an EOS, and
    split into ``max_length`` chunks; ``prompt``/``response`` are concatenated
    and only the response (and EOS) is a target; ``messages`` are rendered by
    ``tokenizer.apply_chat_template`` and only the assistant turns (through
    their end-of-turn marker) are targets. Longer prompt/response and chat
    examples are cut to ``max_length``; examples left with no target are
    dropped.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}.")
    examples = []
    for record in records:
        source = record.get("source", "")
        if "messages" in record:
            pieces = chat_pieces(record["messages"], tokenizer, source)
        elif "prompt" in record:
            pieces = [(record["prompt"], False), (record["response"], True)]
            ids, mask = _tokenize_pieces(pieces, tokenizer, special_first=True)
            ids, mask = _append_eos(ids, mask, tokenizer)
            examples.extend(_truncated(ids, mask, max_length, source))
            continue
        else:
            ids, mask = _tokenize_pieces([(record["text"], True)], tokenizer, special_first=True)
            ids, mask = _append_eos(ids, mask, tokenizer)
            for start in range(0, len(ids), max_length):
                examples.extend(_truncated(ids[start:start + max_length], mask[start:start + max_length],
                                           max_length, source))
            continue
        ids, mask = _tokenize_pieces(pieces, tokenizer, special_first=False)
        examples.extend(_truncated(ids, mask, max_length, source))
    return examples


def chat_pieces(messages: Sequence[dict[str, str]], tokenizer: Any, source: str = "") -> list[tuple[str, bool]]:
    """The chat-template rendering of ``messages`` as ``(text, is_target)`` pieces.

    An assistant turn's piece is what rendering it adds after the generation
    prompt of the turns before it: its content and end-of-turn marker.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"{source or 'data'}: chat \"messages\" need a tokenizer with a chat template, "
            "and this tokenizer has none."
        )

    def render(turns: Sequence[dict[str, str]], generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(list(turns), tokenize=False,
                                             add_generation_prompt=generation_prompt)

    pieces: list[tuple[str, bool]] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = render(messages[:i], True) if i else render([], True)
        full = render(messages[: i + 1], False)
        if not prefix.startswith(done) or not full.startswith(prefix):
            raise DataError(
                f"{source or 'data'}: the chat template does not render conversations "
                "prefix by prefix, so assistant turns cannot be located for the loss mask."
            )
        pieces.append((prefix[len(done):], False))
        pieces.append((full[len(prefix):], True))
        done = full
    pieces.append((render(messages, False)[len(done):], False))
    return [(text, target) for text, target in pieces if text]


def _tokenize_pieces(pieces: Sequence[tuple[str, bool]], tokenizer: Any,
                     special_first: bool) -> tuple[list[int], list[bool]]:
    ids: list[int] = []
    mask: list[bool] = []
    for index, (text, target) in enumerate(pieces):
        add_special = special_first and index == 0
        piece = list(tokenizer.encode(text, add_special_tokens=add_special))
        # A trailing EOS that add_special_tokens appended to the first piece is dropped.
        if add_special and len(pieces) > 1 and piece and piece[-1] == _eos_id(tokenizer):
            piece = piece[:-1]
        ids.extend(piece)
        mask.extend([target] * len(piece))
    return ids, mask


def _eos_id(tokenizer: Any) -> int | None:
    return getattr(tokenizer, "eos_token_id", None)


def _append_eos(ids: list[int], mask: list[bool], tokenizer: Any) -> tuple[list[int], list[bool]]:
    eos = _eos_id(tokenizer)
    if eos is not None and (not ids or ids[-1] != eos):
        return ids + [eos], mask + [True]
    return ids, mask


def _truncated(ids: list[int], mask: list[bool], max_length: int, source: str) -> list[Example]:
    ids, mask = ids[:max_length], mask[:max_length]
    # Token 0 is never predicted, so a target needs a position >= 1.
    if len(ids) < 2 or not any(mask[1:]):
        return []
    return [Example(np.asarray(ids, np.int32), np.asarray(mask, bool), source)]


def split(examples: Sequence[Any], eval_fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """A deterministic shuffle-split into ``(train, held_out)``.

    Example::

        train, held_out = split(examples, 0.05, seed=0)

    At least one example is held out when ``eval_fraction > 0``; the order of
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


# -- batching -------------------------------------------------------------------------------

def bucket_lengths(seq_len: int, num_buckets: int = 2, multiple: int = 8) -> tuple[int, ...]:
    """Padded lengths for length bucketing: ``seq_len``, ``seq_len/2``, ... rounded up to ``multiple``.

    Example::

        bucket_lengths(128, 2)  # (64, 128)
    """
    lengths = {seq_len}
    for k in range(1, num_buckets):
        lengths.add(min(seq_len, max(multiple, math.ceil(seq_len / 2**k / multiple) * multiple)))
    return tuple(sorted(lengths))


@dataclasses.dataclass(frozen=True)
class DataPosition:
    """Where a step's batch comes from: epoch and batch index within it."""

    epoch: int
    index: int


class BatchLoader:
    """Fixed-shape training batches as a pure function of the step.

    Example::

        loader = BatchLoader(examples, batch_size=8, seq_len=128, seed=0, pad_id=0)
        batch = loader.batch(0)
        batch["input_ids"].shape   # (grad_accum, 8, L), L one of loader.lengths

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

    def position(self, step: int) -> DataPosition:
        return DataPosition(step // self.steps_per_epoch, step % self.steps_per_epoch)

    def batch(self, step: int) -> Batch:
        """The batch for global step ``step``, arrays of shape ``(grad_accum, batch_size, L)``."""
        position = self.position(step)
        rows, length = self._plan(position.epoch)[position.index]
        ids = np.full((self.rows_per_step, length), self.pad_id, np.int32)
        attention = np.zeros((self.rows_per_step, length), np.int32)
        targets = np.zeros((self.rows_per_step, length), bool)
        for r, row in enumerate(rows):
            offset = 0
            for index in row:
                example = self.examples[index]
                n = len(example)
                ids[r, offset:offset + n] = example.input_ids
                attention[r, offset:offset + n] = 1
                # A packed example's first token is not a target (it would be predicted from
                # the previous example's last token).
                targets[r, offset:offset + n] = example.loss_mask
                targets[r, offset] = False
                offset += n
        shape = (self.grad_accum, self.batch_size, length)
        return {"input_ids": ids.reshape(shape), "attention_mask": attention.reshape(shape),
                "loss_mask": targets.reshape(shape)}

    @functools.lru_cache(maxsize=2)  # noqa: B019 - a loader lives as long as its run
    def _plan(self, epoch: int) -> list[tuple[list[list[int]], int]]:
        """This epoch's batches: for each, its rows (lists of example indices) and length."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.examples)).tolist()
        if self.packing:
            rows = _pack(order, [len(e) for e in self.examples], self.seq_len)
            groups = [rows[i:i + self.rows_per_step] for i in range(0, len(rows), self.rows_per_step)]
            plan = [(group, self.seq_len) for group in groups]
        else:
            # Stable sort by bucket keeps the shuffled order inside each bucket.
            bucket = [self._bucket(len(self.examples[i])) for i in order]
            order = [i for _, i in sorted(zip(bucket, order), key=lambda t: t[0])]
            plan = []
            for start in range(0, len(order), self.rows_per_step):
                chunk = order[start:start + self.rows_per_step]
                length = self._bucket(max(len(self.examples[i]) for i in chunk))
                plan.append(([[i] for i in chunk], length))
            plan = [plan[i] for i in rng.permutation(len(plan))]
        return plan

    def _bucket(self, n: int) -> int:
        return next(length for length in self.lengths if length >= n)


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

    Example::

        for batch in eval_batches(held_out, batch_size=8, seq_len=128, pad_id=0): ...
    """
    if not examples:
        return []
    loader = BatchLoader(examples, batch_size=batch_size, seq_len=seq_len, seed=0, pad_id=pad_id,
                         buckets=buckets)
    order = sorted(range(len(loader.examples)), key=lambda i: len(loader.examples[i]))
    batches = []
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        length = loader._bucket(max(len(loader.examples[i]) for i in chunk))
        ids = np.full((batch_size, length), pad_id, np.int32)
        attention = np.zeros((batch_size, length), np.int32)
        targets = np.zeros((batch_size, length), bool)
        for r, index in enumerate(chunk):
            example = loader.examples[index]
            n = len(example)
            ids[r, :n], attention[r, :n], targets[r, :n] = example.input_ids, 1, example.loss_mask
        batches.append({"input_ids": ids[None], "attention_mask": attention[None],
                        "loss_mask": targets[None]})
    return batches
