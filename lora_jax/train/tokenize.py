"""Training data, step two: records to token ids with a loss mask.

``text`` records are targets throughout; ``prompt``/``response`` records are
targets on the response only; chat ``messages`` are rendered with the
tokenizer's chat template and are targets on the assistant turns only::

    examples = encode(records, tokenizer, max_length=128)
    examples[0].input_ids, examples[0].loss_mask    # int32 ids, bool targets
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from lora_jax.train.records import DataError, Record


@dataclasses.dataclass(frozen=True)
class Example:
    """One tokenized sequence; ``loss_mask[i]`` is True where token ``i`` is a training target.

    Example:
        >>> import numpy as np
        >>> example = Example(np.array([5, 6, 7], np.int32), np.array([False, True, True]), "d.jsonl:1")
        >>> len(example), int(example.loss_mask.sum())
        (3, 2)
    """

    input_ids: np.ndarray
    loss_mask: np.ndarray
    source: str = ""

    def __len__(self) -> int:
        return len(self.input_ids)


def encode(records: Iterable[Record], tokenizer: Any, max_length: int) -> list[Example]:
    """Tokenize ``records`` into examples of at most ``max_length`` tokens.

    Example:
        >>> from lora_jax.train.tiny import tiny_tokenizer
        >>> tokenizer = tiny_tokenizer(["2+2=4", "the answer is 4"], vocab_size=280)
        >>> (example,) = encode([{"prompt": "2+2=", "response": "4"}], tokenizer, 64)
        >>> tokenizer.decode(example.input_ids[example.loss_mask])   # the response and EOS
        '4<|im_end|>'

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
            ids, mask = _tokenize_pieces(pieces, tokenizer, special_first=False)
            examples.extend(_truncated(ids, mask, max_length, source))
        elif "prompt" in record:
            pieces = [(record["prompt"], False), (record["response"], True)]
            ids, mask = _append_eos(*_tokenize_pieces(pieces, tokenizer, special_first=True), tokenizer)
            examples.extend(_truncated(ids, mask, max_length, source))
        else:
            ids, mask = _tokenize_pieces([(record["text"], True)], tokenizer, special_first=True)
            ids, mask = _append_eos(ids, mask, tokenizer)
            for start in range(0, len(ids), max_length):  # long texts become several examples
                examples.extend(_truncated(ids[start:start + max_length], mask[start:start + max_length],
                                           max_length, source))
    return examples


def chat_pieces(messages: Sequence[dict[str, str]], tokenizer: Any, source: str = "") -> list[tuple[str, bool]]:
    """The chat-template rendering of ``messages`` as ``(text, is_target)`` pieces.

    Example:
        >>> from lora_jax.train.tiny import tiny_tokenizer
        >>> tokenizer = tiny_tokenizer(["hi", "hello"], vocab_size=270)
        >>> chat_pieces([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
        ...             tokenizer)
        [('<|im_start|>user\\nhi<|im_end|>\\n<|im_start|>assistant\\n', False), ('hello<|im_end|>\\n', True)]

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
