"""benchmarks/memory_targets.py measures the compiled step with the CLI's own defaults."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import memory_targets  # noqa: E402

from lora_jax.train.settings import FinetuneSettings  # noqa: E402


def test_cli_settings_are_the_finetune_defaults():
    config = FinetuneSettings().resolved().train_config()
    assert memory_targets.cli_settings() == (config.remat or "none", config.loss_chunk, config.cpu_scheduler)


def test_tiny_step_memory_lora_below_full_fine_tuning_and_remat_helps():
    cli = memory_targets.cli_settings()
    lora = memory_targets.measure("lora_all", "tiny", cli)
    full = memory_targets.measure("full", "tiny", cli)
    before = memory_targets.measure("lora_all", "tiny", memory_targets.SETTINGS["before"])
    assert lora["total_mib"] < full["total_mib"]
    assert lora["temp_mib"] < before["temp_mib"]
    parts = lora["argument_mib"] + lora["output_mib"] - lora["alias_mib"] + lora["temp_mib"]
    assert lora["total_mib"] == pytest.approx(parts)
