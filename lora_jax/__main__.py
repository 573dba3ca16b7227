"""``python -m lora_jax`` runs the ``lora-jax`` command."""

import sys

from lora_jax.cli import main

if __name__ == "__main__":
    sys.exit(main())
