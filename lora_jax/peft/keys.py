"""Which tensor keys a module's adapter entry writes and reads.

Every key is ``base_model.model.<torch module path>.<part>``. This module is the
one place that knows the parts:

==========================  ====================  ==========================================
part                        torch shape           what it is
==========================  ====================  ==========================================
``lora_A.weight``           (r, in_features)      entry ``"lora_A"`` of a linear module
``lora_B.weight``           (out_features, r)     entry ``"lora_B"`` of a linear module
``lora_embedding_A``        (r, num_embeddings)   entry ``"lora_A"`` of an embedding table
``lora_embedding_B``        (embedding_dim, r)    entry ``"lora_B"`` of an embedding table
``lora_A.weight`` (conv)    (r, in, *window)      entry ``"lora_A"`` of a conv kernel
``lora_B.weight`` (conv)    (out, r, 1, ...)      entry ``"lora_B"`` of a conv kernel
``lora_magnitude_vector``   (out,)                entry ``"lora_magnitude"`` (DoRA);
                                                  (1, out, 1, ...) for a conv
``token_adapter.            (n, dim)              entry ``"trainable_tokens"``: the rows
trainable_tokens_delta``                          of the listed tokens (values, not deltas)
``base_layer.bias``         (out,)                bias of a targeted module
``bias`` / ``weight``       as in torch           ``modules_to_save``, ``bias="all"``; a
                                                  table's copy (entry ``"embedding"``)
``base_layer.weight``       as in torch           a targeted embedding's table
==========================  ====================  ==========================================

PEFT keeps an adapter name in memory (``lora_A.default.weight``) and removes it
on save; a file that still carries one is read with the name stripped.

To teach export and import a new entry: add an :class:`EntryKey` to
:data:`ENTRY_KEYS` (and drop any refusal of it from ``_REFUSED``); give its torch
layout in ``export._torch_layout``; and read it back in ``load._adapter_pair``.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Literal

from lora_jax.peft.errors import PeftFormatError

KEY_PREFIX = "base_model.model."


@dataclasses.dataclass(frozen=True)
class EntryKey:
    """How one leaf of an adapter entry (``{"lora_A": A, ...}``) is keyed in a PEFT file.

    A part is ``stem + tail``; PEFT's in-memory adapter name goes between them.

    Example:
        >>> from lora_jax.peft.keys import ENTRY_KEYS
        >>> ENTRY_KEYS["lora_A"].part(is_embedding=False)
        'lora_A.weight'
        >>> ENTRY_KEYS["lora_B"].part(is_embedding=True)
        'lora_embedding_B'
    """

    entry: str
    linear: tuple[str, str]
    embedding: tuple[str, str]
    required: bool = True

    def part(self, is_embedding: bool) -> str:
        """The key suffix after the module path, for a linear module or an embedding table."""
        stem, tail = self.embedding if is_embedding else self.linear
        return stem + tail


ENTRY_KEYS: dict[str, EntryKey] = {
    "lora_A": EntryKey("lora_A", linear=("lora_A", ".weight"), embedding=("lora_embedding_A", "")),
    "lora_B": EntryKey("lora_B", linear=("lora_B", ".weight"), embedding=("lora_embedding_B", "")),
    "lora_magnitude": EntryKey("lora_magnitude", linear=("lora_magnitude_vector", ""),
                               embedding=("lora_magnitude_vector", ""), required=False),
}
# The trainable rows of a table (PEFT's TrainableTokensLayer inside a TrainableTokensWrapper).
TOKENS_PART = "token_adapter.trainable_tokens_delta"

# Keys of PEFT features whose maths lora_jax does not implement: refused, never dropped.
_REFUSED = (
    (re.compile(r"\.lora_B(?:\.[^.]+)?\.bias$"), "is a lora_B bias (lora_bias=True), which is not supported"),
)
_TOKENS = re.compile(rf"^(?P<module>.+)\.{re.escape(TOKENS_PART)}(?:\.(?P<name>[^.]+))?$")
_ENTRY_PATTERNS = [
    (entry.entry, re.compile(rf"^(?P<module>.+)\.{re.escape(stem)}(?:\.(?P<name>[^.]+))?{re.escape(tail)}$"))
    for entry in ENTRY_KEYS.values() for stem, tail in (entry.linear, entry.embedding)
]
_SAVED_COPY = re.compile(r"^(?P<module>.+)\.modules_to_save\.(?P<rest>.+)$")
_FULL = re.compile(r"^(?P<module>.+?)(?:\.base_layer)?\.(?P<leaf>[^.]+)$")


@dataclasses.dataclass(frozen=True)
class ParsedKey:
    """A tensor key of a PEFT file, taken apart.

    Attributes:
        key: the key as in the file.
        kind: "entry" (a LoRA factor or DoRA magnitude), "tokens" (trainable
            token rows), "full" (a whole tensor) or "copy" (the trained copy
            inside PEFT's ``modules_to_save`` wrapper).
        module: the torch module path.
        part: the entry ("lora_A") for "entry" and "tokens"; the torch leaf
            ("weight", "bias") for "full"; the rest after ``modules_to_save.``
            for "copy".
        adapter_name: an adapter name left inside an entry key, or None.
    """

    key: str
    kind: Literal["entry", "tokens", "full", "copy"]
    module: str
    part: str
    adapter_name: str | None = None


def parse_key(key: str, source: str) -> ParsedKey | None:
    """Take a PEFT tensor key apart; None for keys PEFT writes but nothing reads.

    Example:
        >>> from lora_jax.peft.keys import parse_key
        >>> parse_key("base_model.model.model.layers.0.q_proj.lora_A.weight", "f")
        ParsedKey(key='base_model.model.model.layers.0.q_proj.lora_A.weight', kind='entry', module='model.layers.0.q_proj', part='lora_A', adapter_name=None)
        >>> parse_key("base_model.model.lm_head.weight", "f").kind
        'full'
        >>> parse_key("base_model.model.model.layers.0.q_proj.lora_magnitude_vector", "f").part
        'lora_magnitude'
        >>> parse_key("base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta", "f").kind
        'tokens'
        >>> parse_key("base_model.model.model.layers.0.q_proj.lora_B.bias", "f")
        Traceback (most recent call last):
        ...
        lora_jax.peft.errors.PeftFormatError: f: key 'base_model.model.model.layers.0.q_proj.lora_B.bias' is a lora_B bias (lora_bias=True), which is not supported.

    Args:
        key: the key as in the file (with or without ``base_model.model.``).
        source: names the file in error messages.

    Returns:
        A :class:`ParsedKey`; raises :class:`PeftFormatError` for keys of
        unsupported PEFT features and keys that name no module.
    """
    bare = key.removeprefix(KEY_PREFIX)
    for pattern, why in _REFUSED:
        if pattern.search(bare):
            raise PeftFormatError(f"{source}: key {key!r} {why}.")
    if ".original_module." in bare:
        return None  # PEFT's frozen copy inside a modules_to_save wrapper (bias="all")
    found = _TOKENS.match(bare)
    if found:
        return ParsedKey(key, "tokens", found["module"], "trainable_tokens", found["name"])
    for entry, pattern in _ENTRY_PATTERNS:
        found = pattern.match(bare)
        if found:
            return ParsedKey(key, "entry", found["module"], entry, found["name"])
    found = _SAVED_COPY.match(bare)
    if found:
        return ParsedKey(key, "copy", found["module"], found["rest"])
    found = _FULL.match(bare)
    if not found:
        raise PeftFormatError(f"{source}: key {key!r} names no module; expected '<module path>.<tensor>'.")
    return ParsedKey(key, "full", found["module"], found["leaf"])


def full_key_parts(module: str, rest: str) -> tuple[str, str]:
    """``(module, torch leaf)`` of ``<module>.<rest>``, where ``rest`` may start with ``base_layer.``.

    Example:
        >>> from lora_jax.peft.keys import full_key_parts
        >>> full_key_parts("classifier", "bias")
        ('classifier', 'bias')
        >>> full_key_parts("model.q_proj", "base_layer.bias")
        ('model.q_proj', 'bias')
    """
    found = _FULL.match(f"{module}.{rest}")
    return found["module"], found["leaf"]
