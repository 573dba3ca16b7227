"""QLoRA quality: the default ``lora-jax finetune`` job (SmolLM2-135M-Instruct on chatterbot-corpus)
unquantized and with ``--quantize nf4`` (and ``gguf``: the file's own Q4_1 blocks), held-out
perplexity after training side by side.

Target (issue 11): the NF4 run's held-out perplexity within 5% of the unquantized run's. Both runs
share the data, split, seed and every other setting (``--quantize`` also turns remat on, which
changes no value). The unquantized base is the GGUF file dequantized to float32, so the ``gguf`` run
trains on the same weights and should land on the same perplexity up to float rounding.

Usage::

    python benchmarks/qlora_quality.py                 # 3 runs of the default job: ~10 min each, quiet machine
    python benchmarks/qlora_quality.py --schemes nf4   # unquantized + NF4 only
    python benchmarks/qlora_quality.py --smoke         # tiny random model, 2 steps: seconds

Each run is also one CLI command (the runs this script makes)::

    lora-jax finetune --output runs/quality-float32
    lora-jax finetune --output runs/quality-nf4 --quantize nf4
    lora-jax finetune --output runs/quality-gguf --quantize gguf
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402

THRESHOLD = 1.05


def run_one(scheme: str | None, out_dir: Path, smoke: bool) -> dict[str, Any]:
    from lora_jax.train import FinetuneSettings, finetune

    name = scheme or "float32"
    options: dict[str, Any] = {"output": out_dir / f"quality-{name}", "overwrite": True, "progress": False}
    if smoke:
        options.update(tiny=True, steps=2, samples=0, max_eval=8, max_examples=64)
    started = time.perf_counter()
    result = finetune(FinetuneSettings(quantize=scheme, **options), log=lambda message: None)
    summary = result.summary
    print(f"[qlora_quality] {name}: held-out perplexity {summary['eval_before']['perplexity']:.3f} -> "
          f"{summary['eval_after']['perplexity']:.3f}", file=sys.stderr)
    settings = result.settings.record()
    settings["model"] = _portable(settings["model"])
    return {"scheme": name, "settings": settings, "eval_before": summary["eval_before"],
            "eval_after": summary["eval_after"], "seconds": time.perf_counter() - started,
            "adapter": Path(result.adapter_dir).name}


def _portable(path: str) -> str:
    """A model path as the results JSON keeps it: inside its package, not this machine's layout."""
    return path.split("site-packages/", 1)[1] if "site-packages/" in path else Path(path).name


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny random model, 2 steps")
    parser.add_argument("--out-dir", type=Path, default=common.RESULTS, help="where the JSON goes")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"), help="where the runs' directories go")
    parser.add_argument("--schemes", nargs="+", default=["nf4", "gguf"], choices=["nf4", "fp4", "int8", "int4", "gguf"])
    args = parser.parse_args(argv)
    schemes = [s for s in args.schemes if not (args.smoke and s == "gguf")]  # --tiny has no GGUF file
    runs = [run_one(None, args.runs_dir, args.smoke)] + [run_one(s, args.runs_dir, args.smoke) for s in schemes]
    reference = runs[0]["eval_after"]["perplexity"]
    for run in runs[1:]:
        run["perplexity_vs_float32"] = run["eval_after"]["perplexity"] / reference
    targets = [common.target(f"{run['scheme']} held-out perplexity / unquantized", run["perplexity_vs_float32"], "<=",
                             THRESHOLD, required=not args.smoke and run["scheme"] == "nf4") for run in runs[1:]]
    payload = {"environment": common.environment(), "smoke": args.smoke, "runs": runs, "targets": targets}
    stem = "qlora_quality_smoke" if args.smoke else "qlora_quality"
    common.write_json(args.out_dir / f"{stem}.json", payload)
    rows = [[r["scheme"], common.fmt(r["eval_before"]["perplexity"], 3), common.fmt(r["eval_after"]["perplexity"], 3),
             common.fmt(r.get("perplexity_vs_float32"), 4)] for r in runs]
    print(common.markdown_table(["base", "perplexity before", "perplexity after", "after / unquantized"], rows))
    print("\nTargets (issue 11):\n\n" + common.targets_table(targets))
    return payload


if __name__ == "__main__":
    main()
