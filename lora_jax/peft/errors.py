"""The one error an unreadable adapter file raises."""

from __future__ import annotations


class PeftFormatError(ValueError):
    """An adapter file or config that lora_jax cannot read, naming the file, the key and what was expected.

    A ``ValueError``, so code that catches ``ValueError`` keeps working. Raised for
    a truncated or foreign ``adapter_model.safetensors``, a blocked pickle in
    ``adapter_model.bin``, an ``adapter_config.json`` that is not a JSON object or
    holds a value of the wrong type, and tensors that are not finite
    floating-point arrays of the expected rank.

    Example:
        >>> import pathlib, tempfile
        >>> from lora_jax.peft import PeftFormatError, load_peft
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     _ = (pathlib.Path(tmp) / "adapter_config.json").write_text('{"r": 8,')
        ...     try:
        ...         load_peft(tmp, {})
        ...     except PeftFormatError as err:
        ...         print(str(err).replace(tmp, "DIR"))
        DIR/adapter_config.json is not valid JSON (line 1, column 9: Expecting property name enclosed in double quotes); expected a JSON object such as PEFT's save_pretrained writes.
    """
