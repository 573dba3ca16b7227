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
``base_layer.bias``         (out,)                bias of a targeted module
``bias`` / ``weight``       as in torch           ``modules_to_save``, ``bias="all"``
``base_layer.weight``       as in torch           a targeted embedding's table
==========================  ====================  ==========================================

PEFT keeps an adapter name in memory (``lora_A.default.weight``) and removes it
on save; a file that still carries one is read with the name stripped.

To teach export and import a new entry (a DoRA magnitude, say): add an
:class:`EntryKey` to :data:`ENTRY_KEYS` and drop its refusal from ``_REFUSED``
here; give its torch layout in ``export._TORCH_LAYOUT``; and read it back in
``load._adapter_pair``, which today expects exactly ``lora_A`` and ``lora_B``.
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

    def part(self, is_embedding: bool) -> str:
        """The key suffix after the module path, for a linear module or an embedding table."""
        stem, tail = self.embedding if is_embedding else self.linear
        return stem + tail


ENTRY_KEYS: dict[str, EntryKey] = {
    "lora_A": EntryKey("lora_A", linear=("lora_A", ".weight"), embedding=("lora_embedding_A", "")),
    "lora_B": EntryKey("lora_B", linear=("lora_B", ".weight"), embedding=("lora_embedding_B", "")),
}

# Keys of PEFT features whose maths lora_jax does not implement: refused, never dropped.
_REFUSED = (
    (re.compile(r"lora_magnitude_vector"), "is a DoRA magnitude vector; DoRA is not supported yet"),
    (re.compile(r"\.lora_B(?:\.[^.]+)?\.bias$"), "is a lora_B bias (lora_bias=True), which is not supported"),
    (re.compile(r"trainable_tokens|\.token_adapter\."), "holds trainable tokens, which are not supported"),
)
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
        kind: "entry" (a LoRA factor), "full" (a whole tensor) or "copy" (the
            trained copy inside PEFT's ``modules_to_save`` wrapper).
        module: the torch module path.
        part: the entry ("lora_A") for "entry"; the torch leaf ("weight",
            "bias") for "full"; the rest after ``modules_to_save.`` for "copy".
        adapter_name: an adapter name left inside an entry key, or None.
    """

    key: str
    kind: Literal["entry", "full", "copy"]
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
        >>> parse_key("base_model.model.model.layers.0.q_proj.lora_magnitude_vector", "f")
        Traceback (most recent call last):
        ...
        lora_jax.peft.errors.PeftFormatError: f: key 'base_model.model.model.layers.0.q_proj.lora_magnitude_vector' is a DoRA magnitude vector; DoRA is not supported yet.

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
