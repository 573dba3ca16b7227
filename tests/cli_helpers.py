"""What the CLI tests share: running ``lora-jax`` in process, its one-line errors, a tiny model + chat data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lora_jax.cli import main
from lora_jax.train import read_chatterbot
from lora_jax.train.tiny import save_tiny, texts_of, tiny_model, tiny_tokenizer


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """``(exit code, stdout, stderr)`` of ``lora-jax ARGV...`` run in this process."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str) -> str:
    """The one ``lora-jax: error:`` line of ``err``; there must be exactly one, and no traceback."""
    lines = [line for line in err.splitlines() if line.startswith("lora-jax: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def chat_assets(root: Path, *, conversations: int = 120, hidden_size: int = 32) -> dict[str, Any]:
    """A tiny Hugging Face model directory (tokenizer trained on the chats) and a JSONL chat file."""
    records = read_chatterbot(strict=False)[::13][:conversations]
    tokenizer = tiny_tokenizer(texts_of(records), vocab_size=320)
    model_dir = save_tiny(root / "model", tiny_model(len(tokenizer), hidden_size=hidden_size), tokenizer)
    data = root / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in records))
    return {"model": model_dir, "data": data, "root": root}
