"""PNG figures of the benchmark results (matplotlib, Agg backend: no display needed).

Each benchmark script draws its own figure; ``python benchmarks/plots.py`` redraws every
figure from the JSON files already in ``benchmarks/results/`` (or ``--out-dir``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"jax": "tab:blue", "torch": "tab:orange"}


def _bars(ax: Any, labels: list[str], values: list[float], colors: list[str], title: str, xlabel: str) -> None:
    y = range(len(labels))
    ax.barh(list(y), values, color=colors)
    ax.set_yticks(list(y), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel, fontsize=8)
    for i, v in enumerate(values):
        if v == v:  # not NaN
            ax.text(v, i, f" {v:.0f}" if v >= 100 else f" {v:.3g}", va="center", fontsize=7)
    ax.margins(x=0.2)


def train_step(results: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """Per size: step time (or GFLOP when compiled only) and memory of every variant."""
    sizes = list(results)
    fig, axes = plt.subplots(len(sizes), 2, figsize=(12, 3.2 * len(sizes)), squeeze=False)
    for (left, right), size in zip(axes, sizes):
        rows = results[size]
        labels = [r["label"] for r in rows]
        colors = [COLORS[r["framework"]] for r in rows]
        if rows[0]["compiled_only"]:
            _bars(left, labels, [r["gflops"] for r in rows], colors, f"{size}: XLA GFLOP per step (compiled, not run)",
                  "GFLOP")
            _bars(right, labels, [r["total_mib"] for r in rows], colors,
                  f"{size}: compiled memory (args + outputs + temps)", "MiB")
            continue
        _bars(left, labels, [r["step_ms"] for r in rows], colors, f"{size}: median step time", "ms")
        memory = [r.get("total_mib", float("nan")) for r in rows]
        rss = [r["peak_rss_mib"] for r in rows]
        y = range(len(rows))
        right.barh([i - 0.2 for i in y], memory, height=0.4, color="tab:green", label="XLA compiled (JAX)")
        right.barh([i + 0.2 for i in y], rss, height=0.4, color="tab:gray", label="process peak RSS")
        right.set_yticks(list(y), labels, fontsize=8)
        right.invert_yaxis()
        right.set_title(f"{size}: memory", fontsize=9)
        right.set_xlabel("MiB", fontsize=8)
        right.set_xlim(0, 1.45 * max(v for v in memory + rss if v == v))  # room for the legend
        right.legend(fontsize=7, loc="upper right")
    fig.suptitle("Training step (AdamW), blue = JAX, orange = PyTorch", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def targets(checks: list[dict[str, Any]], path: Path, title: str) -> None:
    """Each target's measured ratio as a bar, its threshold as a black tick on the bar's row.

    Green: met; red: missed; grey: not measured. Only the checks marked ``required`` (the
    shapes the issue names) are drawn when there are any.
    """
    shown = [c for c in checks if c.get("required", True)] or list(checks)
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(shown) + 1.2))
    labels = [f"{c['target']} ({c['size']})" if "size" in c else c["target"] for c in shown]
    values = [c["value"] if c["value"] is not None else 0.0 for c in shown]
    colors = [{True: "tab:green", False: "tab:red", None: "tab:gray"}[c["met"]] for c in shown]
    y = list(range(len(shown)))
    ax.barh(y, values, color=colors)
    for i, c in enumerate(shown):
        ax.plot([c["threshold"]] * 2, [i - 0.4, i + 0.4], color="black", lw=2)
        text = "not measured" if c["value"] is None else f" {c['value']:.3g} ({c['op']} {c['threshold']})"
        ax.text(max(values[i], 0.0), i, text, va="center", fontsize=7)
    ax.set_yticks(y, labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.35 * max([*values, *(c["threshold"] for c in shown), 1e-9]))
    ax.set_xlabel("measured ratio (black tick: target)", fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def train_step_targets(checks: list[dict[str, Any]], path: Path) -> None:
    """The issue-10 target ratios of a train_step run (see :func:`targets`)."""
    targets(checks, path, "Training step targets (issue 10): green met, red missed, grey not measured")


def inference(rows: list[dict[str, Any]], path: Path) -> None:
    """Decode latency per token and prefill time of base / merged / unmerged LoRA."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 2.8))
    labels = [r["label"] for r in rows]
    colors = ["tab:blue", "tab:green", "tab:red"][: len(rows)]
    _bars(axes[0], labels, [r["decode_ms"] for r in rows], colors, "decode, batch 1: ms per token", "ms")
    _bars(axes[1], labels, [r["prefill_ms"] for r in rows], colors, "prefill", "ms")
    _bars(axes[2], labels, [r["decode_gflops"] * 1e3 for r in rows], colors, "decode: XLA MFLOP per token", "MFLOP")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def scaling(result: dict[str, Any], path: Path) -> None:
    """Step time and memory against rank and targets; compile time against depth."""
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    ranks = result["rank"]
    full = result["full"]
    r = [row["rank"] for row in ranks]
    ax = axes[0][0]
    ax.plot(r, [row["step_ms"] for row in ranks], "o-", label="LoRA q,v")
    ax.axhline(full["step_ms"], color="tab:red", ls="--", label="full fine-tuning")
    ax.axhline(result["frozen"]["step_ms"], color="tab:gray", ls=":", label="frozen-base floor")
    ax.set_xscale("log", base=2)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("rank")
    ax.set_ylabel("median step ms")
    ax.set_title("step time vs rank (q,v)", fontsize=9)
    ax.legend(fontsize=7)

    ax = axes[0][1]
    ax.plot(r, [row["gflops_vs_full"] for row in ranks], "s-", label="XLA GFLOP")
    ax.plot(r, [row["total_mib_vs_full"] for row in ranks], "o-", label="compiled memory")
    ax.plot(r, [row["time_vs_full"] for row in ranks], "^-", label="step time (paired by round)")
    ax.axhline(1.0, color="tab:red", ls="--", label="full fine-tuning")
    ax.axhline(result["frozen"]["gflops_vs_full"], color="tab:gray", ls=":", label="frozen-base FLOP floor")
    ax.set_xscale("log", base=2)
    ax.set_ylim(0, 1.1)
    ax.set_xlabel("rank")
    ax.set_ylabel("LoRA / full fine-tuning")
    ax.set_title("LoRA q,v relative to full fine-tuning", fontsize=9)
    ax.legend(fontsize=7)

    ax = axes[1][0]
    targets = result["targets"]
    labels = [row["targets"] for row in targets] + ["full FT"]
    x = range(len(labels))
    ax.bar([i - 0.2 for i in x], [row["step_ms"] for row in targets] + [full["step_ms"]], width=0.4,
           label="step ms")
    twin = ax.twinx()
    twin.bar([i + 0.2 for i in x], [row["total_mib"] for row in targets] + [full["total_mib"]], width=0.4,
             color="tab:green", label="compiled MiB")
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("median step ms")
    twin.set_ylabel("compiled MiB")
    ax.set_title("targets (rank 8): step time (blue) and compiled memory (green)", fontsize=9)

    ax = axes[1][1]
    for scanned, style in ((False, "o-"), (True, "s-")):
        rows = [row for row in result["depth"] if row["scanned"] == scanned]
        name = "scanned" if scanned else "unrolled"
        ax.plot([row["layers"] for row in rows], [row["lower_s"] + row["compile_s"] for row in rows], style,
                label=f"{name}: trace + compile")
        ax.plot([row["layers"] for row in rows], [row["lower_s"] for row in rows], style, alpha=0.5,
                label=f"{name}: trace (LoRA interpreter + lowering)")
        ax.plot([row["layers"] for row in rows], [row["plain_lower_s"] for row in rows], style, alpha=0.25,
                label=f"{name}: trace without LoRA")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("layers")
    ax.set_ylabel("seconds")
    ax.set_title("LoRA train step compile time vs depth", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compile_time(rows: list[dict[str, Any]], path: Path) -> None:
    """Lower + compile seconds of every program, unrolled and scanned (stacked: lower, compile)."""
    layouts = sorted({r["layout"] for r in rows}, key=["unrolled", "scanned"].index)
    fig, axes = plt.subplots(1, len(layouts), figsize=(6 * len(layouts), 0.5 * len(rows) / len(layouts) + 1.5),
                             squeeze=False)
    for ax, layout in zip(axes[0], layouts):
        mine = [r for r in rows if r["layout"] == layout]
        y = list(range(len(mine)))
        lower = [r["lower_s"] for r in mine]
        ax.barh(y, lower, color="tab:blue", label="trace + lower (incl. LoRA interpreter)")
        ax.barh(y, [r["compile_s"] for r in mine], left=lower, color="tab:orange", label="XLA compile")
        for i, r in enumerate(mine):
            ratio = r.get("total_vs_base")
            text = f" {r['total_s']:.1f} s" + (f"  ({ratio:.2f}x base)" if ratio is not None else "")
            ax.text(r["total_s"], i, text, va="center", fontsize=7)
        ax.set_yticks(y, [r["label"] for r in mine], fontsize=8)
        ax.invert_yaxis()
        ax.margins(x=0.3)
        ax.set_xlabel("seconds (median over rounds)", fontsize=8)
        ax.set_title(f"compile time, layers {layout} (target: LoRA <= 1.5x base)", fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def gpu(results: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """Per shape: median step time and MFU (against the nominal or, failing that, measured peak)."""
    sizes = list(results)
    fig, axes = plt.subplots(len(sizes), 2, figsize=(12, 2.8 * len(sizes)), squeeze=False)
    for (left, right), size in zip(axes, sizes):
        rows = results[size]
        labels = [r["label"] for r in rows]
        colors = ["tab:green" if r["variant"].startswith("qwix") else "tab:blue" for r in rows]
        _bars(left, labels, [r["step_ms"] for r in rows], colors, f"{size}: median step time (bf16)", "ms")
        key = "mfu_nominal" if rows[0].get("mfu_nominal") is not None else "mfu_measured"
        mfu = [100 * r[key] if r.get(key) is not None else float("nan") for r in rows]
        _bars(right, labels, mfu, colors, f"{size}: MFU ({key[4:]} bf16 peak)", "% of peak")
    fig.suptitle("Training step on the accelerator: blue = lora_jax / JAX, green = qwix", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def mixed_batch(rows: list[dict[str, Any]], checks: list[dict[str, Any]], path: Path) -> None:
    """Prefill and decode throughput against the number of adapters: lora_jax vs PEFT,
    with lora_jax's base model and single adapter as horizontal lines."""
    by_key = {r["variant"]: r for r in rows}
    ns = sorted({r["adapters"] for r in rows if r["mixed"]})
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.6))
    for ax, phase in zip(axes, ("prefill", "decode")):
        x = list(range(len(ns)))
        for offset, (framework, color) in zip((-0.2, 0.2), (("lora_jax", "tab:blue"), ("peft", "tab:orange"))):
            values = [by_key.get(f"{framework}_mixed_{n}", {}).get(f"{phase}_tokens_per_s", float("nan")) for n in ns]
            ax.bar([i + offset for i in x], values, width=0.4, color=color, label=f"{framework} mixed batch")
        for key, style in (("lora_jax_single", "--"), ("lora_jax_base", ":")):
            if key in by_key:
                ax.axhline(by_key[key][f"{phase}_tokens_per_s"], color="tab:blue", ls=style,
                           label=key.replace("lora_jax_", "lora_jax ") + (" adapter" if key.endswith("single") else ""))
        ax.set_xticks(x, [str(n) for n in ns])
        ax.set_xlabel("distinct adapters in the batch")
        ax.set_ylabel("tokens / s")
        ax.set_title(f"{phase} throughput", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def qlora(results: dict[str, list[dict[str, Any]]], checks: list[dict[str, Any]], path: Path) -> None:
    """Per shape: compiled memory (arguments + temporaries, stacked) and, when run, step time."""
    sizes = list(results)
    fig, axes = plt.subplots(len(sizes), 2, figsize=(12, 3.4 * len(sizes)), squeeze=False)
    for (left, right), size in zip(axes, sizes):
        rows = [r for r in results[size] if "skipped" not in r]
        labels = [r["label"] for r in rows]
        y = list(range(len(rows)))
        args = [r["argument_mib"] for r in rows]
        left.barh(y, args, color="tab:blue", label="arguments (frozen base, adapter, AdamW, batch)")
        left.barh(y, [r["temp_mib"] for r in rows], left=args, color="tab:orange", label="temporaries")
        for i, r in enumerate(rows):
            left.text(r["args_plus_temps_mib"], i, f" {r['args_plus_temps_mib']:.0f}", va="center", fontsize=7)
        left.set_yticks(y, labels, fontsize=8)
        left.invert_yaxis()
        left.set_xlabel("MiB (XLA memory_analysis)", fontsize=8)
        skipped = [r["label"] for r in results[size] if "skipped" in r]
        title = f"{size}: compiled memory"
        if skipped:
            title += "\nskipped (waits on lora_jax): " + ", ".join(skipped)
        left.set_title(title, fontsize=8)
        left.set_xlim(0, 1.6 * max([r["args_plus_temps_mib"] for r in rows] + [1e-9]))
        left.legend(fontsize=7, loc="upper right")
        if any("step_ms" in r for r in rows):
            colors = ["tab:green" if r["side"] == "qwix" else "tab:blue" for r in rows]
            _bars(right, labels, [r.get("step_ms", float("nan")) for r in rows], colors, f"{size}: median step time",
                  "ms")
        else:
            right.axis("off")
            right.text(0.5, 0.5, "compiled only (not run)", ha="center", va="center", fontsize=9)
    fig.suptitle("LoRA step on float / quantized frozen bases (blue: lora_jax, green: qwix)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Redraw the benchmark PNGs from their JSON results.")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    for stem in ("train_step", "train_step_smoke", "inference", "inference_smoke", "scaling", "scaling_smoke",
                 "compile_time", "compile_time_smoke", "gpu", "gpu_smoke", "mixed_batch", "mixed_batch_smoke",
                 "qlora", "qlora_smoke"):
        path = args.out_dir / f"{stem}.json"
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        if stem.startswith("train_step"):
            train_step(data["results"], path.with_suffix(".png"))
            if data.get("targets"):
                train_step_targets(data["targets"], path.with_name(f"{stem}_targets.png"))
        elif stem.startswith("inference"):
            inference(data["rows"], path.with_suffix(".png"))
        elif stem.startswith("qlora"):
            qlora(data["results"], data["targets"], path.with_suffix(".png"))
        elif stem.startswith("mixed_batch"):
            mixed_batch(data["rows"], data["targets"], path.with_suffix(".png"))
        elif stem.startswith("gpu"):
            gpu(data["results"], path.with_suffix(".png"))
        elif stem.startswith("compile_time"):
            compile_time(data["rows"], path.with_suffix(".png"))
        else:
            scaling(data, path.with_suffix(".png"))
        print(f"wrote {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
