"""The ``lora-jax`` command: fine-tune, generate, merge, export / import, combine, info.

    lora-jax finetune                      # SmolLM2-135M-Instruct on chatterbot-corpus, offline
    lora-jax finetune --tiny               # a seconds-long smoke run on a tiny random model
    lora-jax finetune --model DIR --data train.jsonl --output runs/mine --steps 500
    lora-jax finetune --config run.yaml --learning-rate 2e-4   # a config file; flags override it
    lora-jax generate --adapter runs/smollm2-chatterbot/adapter "What is AI?"
    lora-jax generate --adapter a=dirA --adapter b=dirB --use a --use b "Q1" "Q2"   # one mixed batch
    lora-jax combine --adapter a=dirA --adapter b=dirB --weights 0.5 0.5 --type ties --density 0.5 --output mix/
    lora-jax merge --adapter runs/smollm2-chatterbot/adapter --output merged/
    lora-jax export runs/smollm2-chatterbot --output adapter-step50 --step 50
    lora-jax import peft-adapter/ --model DIR --output imported/
    lora-jax info --model DIR --target-modules all-linear

A thin layer over Python: ``finetune`` is :func:`lora_jax.train.finetune` with
a :class:`~lora_jax.train.FinetuneSettings` built from ``--config`` and the
flags (the flags, their Hugging Face aliases, defaults and help come from that
one table). Errors print as one line, ``lora-jax: error: ...`` (``--debug``
shows the traceback).
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with its errors as the one line every other error is."""

    def error(self, message: str) -> NoReturn:
        print(f"lora-jax: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(2)


# -- entry point -----------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``lora-jax`` command; returns the exit status.

    Example:
        >>> main(["finetune", "--lr", "-0.01"])   # refused before anything is read or written
        2
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit:
        return int(exit.code or 0)
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
        message, status = describe_error(err)
        print(f"lora-jax: error: {message}", file=sys.stderr)
        return status


def describe_error(err: BaseException) -> tuple[str, int]:
    """The one-line message and exit status for an error: 2 for the user's, 1 for anything else.

    Example:
        >>> import errno
        >>> describe_error(ValueError("--lr: expected a finite number > 0, got -0.01."))
        ('--lr: expected a finite number > 0, got -0.01.', 2)
        >>> describe_error(OSError(errno.ENOSPC, "No space left on device", "run/metrics.jsonl"))
        ('run/metrics.jsonl: no space left on device; free space, then continue with --resume.', 1)
    """
    text = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        where = f"{err.filename}: " if err.filename else ""
        return f"{where}no space left on device; free space, then continue with --resume.", 1
    if isinstance(err, KeyError):
        text = f"missing key {text}"
    if isinstance(err, (CliError, ValueError, KeyError, FileNotFoundError, FileExistsError, NotADirectoryError)):
        return text, 2
    return f"{type(err).__name__}: {text} (run with --debug for the traceback)", 1


def build_parser() -> argparse.ArgumentParser:
    """The ``lora-jax`` argument parser (``finetune``'s flags come from ``FinetuneSettings``).

    Example:
        >>> args = build_parser().parse_args(["finetune", "--tiny", "--lr", "0.01"])
        >>> args.command, args.tiny, args.lr, args.steps    # None: the default (or the resumed run's)
        ('finetune', True, 0.01, None)
    """
    parser = _Parser(prog="lora-jax", description="LoRA fine-tuning for JAX models.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in (_add_finetune, _add_generate, _add_merge, _add_export, _add_import, _add_combine, _add_info):
        add(commands)
    return parser


# -- finetune -------------------------------------------------------------------------------

def _add_finetune(commands: Any) -> None:
    from lora_jax.train.settings import CONFIG_FILE, FinetuneSettings

    parser = commands.add_parser(
        "finetune", help="fine-tune a LoRA adapter (default: SmolLM2 on chatterbot-corpus)",
        description="Fine-tune a LoRA adapter. With no arguments: SmolLM2-135M-Instruct (offline GGUF) on the "
                    "chatterbot-corpus conversations: 60 steps, under 10 minutes on 2 CPU cores.")
    parser.add_argument("--config", metavar="FILE",
                        help=f"settings from a YAML file (the names of the flags, e.g. a run's {CONFIG_FILE}); "
                             "flags given as well override it")
    parser.add_argument("--print-config", action="store_true",
                        help="print the effective settings as YAML (what --config reads) and exit")
    add_settings_arguments(parser, FinetuneSettings)
    parser.set_defaults(func=cmd_finetune)


def add_settings_arguments(parser: argparse.ArgumentParser, settings_class: type) -> None:
    """One flag per field of a settings dataclass, from its metadata (see ``lora_jax.train.settings``).

    Example:
        >>> import argparse
        >>> from lora_jax.train import FinetuneSettings
        >>> parser = argparse.ArgumentParser()
        >>> add_settings_arguments(parser, FinetuneSettings)
        >>> vars(parser.parse_args(["-r", "16", "--no-progress"]))["r"], parser.parse_args([]).progress
        (16, True)
    """
    from lora_jax.train.settings import SWITCHES

    groups: dict[str, Any] = {}
    for field in dataclasses.fields(settings_class):
        meta = field.metadata
        group_name = meta["group"]
        if group_name not in groups:
            groups[group_name] = parser if group_name == "run" else parser.add_argument_group(group_name)
        flag = meta["flag"] or "--" + field.name.replace("_", "-")
        names = [n for n in (meta["short"], flag, *meta.get("aliases", ())) if n]
        options: dict[str, Any] = {"dest": field.name, "help": _help_text(field), "action": _Setting}
        if meta["kind"] is bool:
            options.update(nargs=0, const=not flag.startswith("--no-"), default=field.default)
        else:
            options.update(type=meta["kind"], default=field.default, nargs=meta["nargs"], metavar=meta["metavar"],
                           choices=meta["choices"])
        groups[group_name].add_argument(*names, **options)
    for switch, (target, values) in SWITCHES.items():  # --bf16, --gradient-checkpointing
        if target in {f.name for f in dataclasses.fields(settings_class)}:
            groups.get("training", parser).add_argument(
                "--" + switch.replace("_", "-"), dest=switch, action=_Setting, nargs=0, const=True,
                default=argparse.SUPPRESS, help=f"as transformers' {switch}: --{target.replace('_', '-')} "
                                                f"{values[True]}")


_GIVEN = "_given_settings"  # the Namespace attribute naming the settings given as flags


class _Setting(argparse.Action):
    """Stores a setting's value and notes that it was given as a flag (flags override ``--config``)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)
        setattr(namespace, _GIVEN, {*getattr(namespace, _GIVEN, ()), self.dest})


def _help_text(field: dataclasses.Field) -> str:
    meta = field.metadata
    if meta["kind"] is bool or meta["default"] == meta["tiny"] is None:
        return meta["help"]
    if meta["default"] is None:
        return f"{meta['help']} ({meta['tiny']} with --tiny)"
    text = f"{meta['help']} (default {meta['default']}"
    if meta["tiny"] != meta["default"]:
        text += f"; {meta['tiny']} with --tiny"
    return text + ")"


def settings_from_args(args: argparse.Namespace) -> Any:
    """The :class:`~lora_jax.train.FinetuneSettings` of ``--config`` and the flags given (which win), checked.

    Example:
        >>> settings_from_args(build_parser().parse_args(["finetune", "--tiny", "--max-steps", "5"])).steps
        5
        >>> settings_from_args(build_parser().parse_args(["finetune", "--bf16"])).dtype
        'bfloat16'
    """
    from lora_jax.train.settings import SWITCHES, FinetuneSettings, read_config_file

    values = read_config_file(args.config) if getattr(args, "config", None) else {}
    given = getattr(args, _GIVEN, set())
    flags = {name: getattr(args, name) for name in given if name not in SWITCHES}
    for switch, (target, choices) in SWITCHES.items():
        if switch in given:
            if target in flags:
                raise CliError(f"--{switch.replace('_', '-')} and --{target.replace('_', '-')} both set "
                               f"{target}; pass one.")
            flags[target] = choices[True]
    return FinetuneSettings(**{**values, **flags})


def cmd_finetune(args: argparse.Namespace) -> int:
    """``lora-jax finetune``: :func:`lora_jax.train.finetune` and its report.

    Example:
        >>> cmd_finetune(build_parser().parse_args(["finetune", "--steps", "0"]))
        Traceback (most recent call last):
        ...
        lora_jax.train.settings.SettingsError: --steps: expected an integer >= 1, got 0.
    """
    from lora_jax.train import finetune, format_summary
    from lora_jax.train.pipeline import effective_settings

    settings = settings_from_args(args)
    if args.print_config:
        print(effective_settings(settings).config_text(), end="")
        return 0
    result = finetune(settings)
    if result.interrupted:
        print(f"Interrupted at step {result.step}/{result.settings.steps}; checkpoint saved in "
              f"{result.output / 'checkpoints'}. Continue with: lora-jax finetune --output {result.output} "
              "--resume", file=sys.stderr)
        return 130
    print(format_summary(result.summary), flush=True)
    return 0


# -- option types shared by the other commands -----------------------------------------------------

def _checked(kind: type, check: Callable[[Any], str | None]) -> Callable[[str], Any]:
    """An argparse ``type=``: convert, then check (one line naming the flag when it fails)."""
    def convert(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
        problem = check(value)
        if problem:
            raise argparse.ArgumentTypeError(f"expected {problem}, got {text!r}")
        return value
    convert.__name__ = kind.__name__
    return convert


def _option_types() -> dict[str, Callable[[str], Any]]:
    from lora_jax.train.settings import integer, number

    return {
        "positive": _checked(int, integer(1)), "count": _checked(int, integer(0)),
        "seed": _checked(int, integer(0, 2**32)), "temperature": _checked(float, number(0)),
        "top_p": _checked(float, lambda p: None if 0 < p <= 1 else "a number in (0, 1]"),
        "alpha": _checked(float, number(0, above=True)),
    }


# -- generate -------------------------------------------------------------------------------

def _add_generate(commands: Any) -> None:
    types = _option_types()
    p = commands.add_parser("generate", help="generate text with a base model and an optional adapter")
    p.add_argument("prompt", nargs="*", help="prompts (default: read lines from stdin)")
    p.add_argument("--model", help="base model (default: the adapter's base_model_name_or_path)")
    p.add_argument("--adapter", action="append", metavar="[NAME=]DIR",
                   help="PEFT or `lora-jax import` adapter directory; repeat as NAME=DIR for several adapters "
                        "over one base, served in one mixed batch")
    p.add_argument("--use", action="append", metavar="NAME",
                   help="the adapter of each prompt, in order (once: every prompt; 'base': no adapter); "
                        "default with several adapters: every prompt with each of them")
    p.add_argument("--compare", action="store_true", help="also show the base model's reply")
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    p.add_argument("--max-new-tokens", type=types["positive"], default=64)
    p.add_argument("--temperature", type=types["temperature"], default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=types["top_p"], default=1.0, help="nucleus sampling, in (0, 1]")
    p.add_argument("--seed", type=types["seed"], default=0)
    _add_quantize_arguments(p, "generate with the weights a QLoRA adapter was trained on")
    p.set_defaults(func=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    """``lora-jax generate``: replies of the base model, with an adapter, or both."""
    from lora_jax.train import load_adapter, load_tokenizer
    from lora_jax.train.adapter_files import resolve_base_model
    from lora_jax.train.generation import TextGenerator

    named = _named_adapters(args.adapter or [])
    if len(named) > 1 or args.use:
        return _generate_mixed(args, named)
    adapter_dir = next(iter(named.values()), None)
    model = _quantized_model(resolve_base_model(args.model, adapter_dir), args)
    tokenizer = load_tokenizer(model)
    prompts = _prompts(args)
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


def _prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt) or [line.strip() for line in sys.stdin if line.strip()]
    if not prompts:
        raise CliError("No prompt: pass prompts as arguments or on stdin.")
    return prompts


def _named_adapters(values: Sequence[str]) -> dict[str, Path]:
    """``--adapter`` values (``DIR`` or ``NAME=DIR``) as ``{name: dir}``, checked before any model loads."""
    named: dict[str, Path] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep:
            name, path = Path(value).name or "adapter", value
        if not name or name in ("base", "__base__"):
            raise CliError(f"--adapter {value!r}: give the adapter a name other than 'base' (NAME=DIR).")
        if name in named:
            raise CliError(f"--adapter: the name {name!r} is used twice; name each adapter (NAME=DIR).")
        named[name] = Path(path)
        _check_adapter_dir(named[name])
    return named


def _generate_mixed(args: argparse.Namespace, named: dict[str, Path]) -> int:
    """``generate`` with several adapters: one mixed batch, each prompt through its own adapter."""
    from lora_jax import stack_adapters
    from lora_jax.train import load_adapter, load_tokenizer
    from lora_jax.train.adapter_files import resolve_base_model
    from lora_jax.train.generation import TextGenerator

    if not named:
        raise CliError("--use needs adapters: pass them with --adapter NAME=DIR.")
    known = [*named, "base"]
    uses = list(args.use or [])
    for use in uses:
        if use not in known:
            raise CliError(f"--use {use!r}: no such adapter; the adapters are {', '.join(known)}.")
    model = _quantized_model(resolve_base_model(args.model, next(iter(named.values()))), args)
    tokenizer = load_tokenizer(model)
    prompts = _prompts(args)
    if uses and len(uses) not in (1, len(prompts)):
        raise CliError(f"--use was given {len(uses)} times for {len(prompts)} prompts: give it once (every "
                       "prompt) or once per prompt.")
    adapters = {}
    for name, directory in named.items():
        adapter, config, trainable = load_adapter(directory, model.params)
        if trainable:
            raise CliError(f"--adapter {name}={directory}: it also trains full tensors ({', '.join(sorted(trainable))}"
                           "), which a mixed batch cannot give each row; generate with it alone.")
        adapters[name] = (adapter, config)
    if uses:
        rows = [(p, u) for p, u in zip(prompts, uses * len(prompts) if len(uses) == 1 else uses)]
    else:
        rows = [(p, name) for p in prompts for name in (["base"] if args.compare else []) + list(named)]
    stacked = stack_adapters(adapters, model.params)
    generator = TextGenerator(model, tokenizer, stacked.config, chat=not args.raw,
                              max_new_tokens=args.max_new_tokens)
    ids = stacked.ids([None if name == "base" else name for _, name in rows])
    replies = generator([p for p, _ in rows], adapter=stacked.adapter, adapter_ids=ids,
                        temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    width = max(len(name) for _, name in rows) + 2
    last = None
    for (prompt, name), reply in zip(rows, replies):
        if prompt != last:
            print(f"> {prompt}")
            last = prompt
        print(f"{('[' + name + ']').ljust(width)} {reply}")
    print()
    return 0


def _check_adapter_dir(adapter_dir: Path) -> None:
    """The errors of ``load_adapter`` that need no model, raised before a model is loaded."""
    from lora_jax.train.adapter_files import LORA_CONFIG_FILE, PEFT_CONFIG_FILE

    if not adapter_dir.is_dir():
        raise CliError(f"{adapter_dir}: no such adapter directory (expected adapter_config.json + "
                       "adapter_model.safetensors, or a `lora-jax import` directory).")
    if not ((adapter_dir / PEFT_CONFIG_FILE).exists() or (adapter_dir / LORA_CONFIG_FILE).exists()):
        raise CliError(f"{adapter_dir}: not an adapter directory (expected adapter_config.json + "
                       f"adapter_model.safetensors, or {LORA_CONFIG_FILE} from `lora-jax import`).")


# -- merge ----------------------------------------------------------------------------------

def _add_merge(commands: Any) -> None:
    p = commands.add_parser("merge", help="fold an adapter into the base weights: a Hugging Face checkpoint")
    p.add_argument("--adapter", required=True, help="PEFT or `lora-jax import` adapter directory")
    p.add_argument("--model", help="base model (default: the adapter's base_model_name_or_path)")
    p.add_argument("--output", required=True, help="directory for config.json, model.safetensors, tokenizer")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--overwrite", action="store_true", help="replace a previous `lora-jax merge` output")
    _add_quantize_arguments(p, "the base as it was trained (QLoRA): merged into its dequantized weights")
    p.add_argument("--requantize", choices=_quantize_schemes()[:-1],
                   help="quantize the merged kernels again and write their values (warns with the error added)")
    p.set_defaults(func=cmd_merge)


def _quantize_schemes() -> tuple[str, ...]:
    from lora_jax.train.kbit import SCHEMES

    return SCHEMES


def _add_quantize_arguments(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--quantize", choices=_quantize_schemes(), help=f"quantize the base: {what}")
    p.add_argument("--double-quant", action="store_true", help="with --quantize nf4/fp4: double quantization")


def _quantized_model(path: Any, args: argparse.Namespace) -> Any:
    """The model at ``path``, quantized as ``--quantize`` / ``--double-quant`` say (checked first)."""
    from lora_jax.train import load_model
    from lora_jax.train.kbit import quant_config

    if args.double_quant and not args.quantize:
        raise CliError("--double-quant needs --quantize nf4 or --quantize fp4.")
    if not args.quantize:
        return load_model(path)
    try:
        config = quant_config(args.quantize, double_quant=args.double_quant)
    except ValueError as err:
        raise CliError(str(err)) from None
    from lora_jax.models import QuantizeError

    try:
        return load_model(path, quantize=config)
    except QuantizeError as err:
        raise CliError(f"--quantize {args.quantize}: {' '.join(str(err).split())}") from None


def cmd_merge(args: argparse.Namespace) -> int:
    """``lora-jax merge``: the adapter folded into the base weights, as a Hugging Face checkpoint."""
    import jax.numpy as jnp

    from lora_jax import merge
    from lora_jax.train import OutputDir, load_adapter, load_tokenizer, with_leaves
    from lora_jax.train.adapter_files import resolve_base_model

    adapter_dir = Path(args.adapter)
    output = OutputDir(args.output, "merge")
    output.check(overwrite=args.overwrite)
    _check_adapter_dir(adapter_dir)
    model = _quantized_model(resolve_base_model(args.model, adapter_dir), args)
    adapter, config, trainable = load_adapter(adapter_dir, model.params)
    params = with_leaves(model.params, trainable)
    output.claim(overwrite=args.overwrite)
    export = _optional_module("lora_jax.export")
    if export is not None and hasattr(export, "save_merged"):
        path = export.save_merged(output.path, model, adapter, config, params=params, dtype=jnp.dtype(args.dtype),
                                  overwrite=True, requantize=args.requantize)
    else:
        from lora_jax import models
        from lora_jax.train import cast_floating

        merged = cast_floating(merge(params, adapter, config), jnp.dtype(args.dtype))
        path = models.save_pretrained(output.path, model.config, merged)
        load_tokenizer(model).save_pretrained(str(output.path))
    print(f"Merged {len(adapter)} LoRA modules into {path} (transformers' from_pretrained loads it).")
    return 0


def _optional_module(name: str) -> Any:
    import importlib
    import importlib.util

    try:
        found = importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        found = False
    return importlib.import_module(name) if found else None


# -- export / import -----------------------------------------------------------------------------

def _add_export(commands: Any) -> None:
    p = commands.add_parser("export", help="write a run's checkpoint (or imported adapter) as a PEFT adapter")
    p.add_argument("source", help="a finetune run directory, its checkpoints/ or a `lora-jax import` directory")
    p.add_argument("--output", required=True, help="PEFT adapter directory to write")
    p.add_argument("--step", type=_option_types()["count"], help="checkpoint step (default: the latest)")
    p.add_argument("--overwrite", action="store_true", help="replace a previous `lora-jax export` output")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    """``lora-jax export``: a run's checkpoint (or a ``lora-jax import`` directory) as a PEFT adapter."""
    from lora_jax.peft import save_peft
    from lora_jax.train import (
        OutputDir,
        load_model,
        read_lora_adapter,
        read_run_checkpoint,
        with_leaves,
    )
    from lora_jax.train.adapter_files import (
        LORA_CONFIG_FILE,
        adapter_base_model,
        resolve_base_model,
    )

    source = Path(args.source)
    output = OutputDir(args.output, "export")
    output.check(overwrite=args.overwrite)
    if (source / LORA_CONFIG_FILE).exists():
        adapter, config, trainable = read_lora_adapter(source)
        base, step = adapter_base_model(source), None
    else:
        adapter, config, trainable, base, step = read_run_checkpoint(source, args.step)
    params = None
    if trainable:  # full-trained leaves need the base params to be written
        model = load_model(resolve_base_model(base, None))
        params = with_leaves(model.params, trainable)
    output.claim(overwrite=args.overwrite)
    path = save_peft(output.path, adapter, config, params, base_model_name_or_path=base, task_type="CAUSAL_LM",
                     overwrite=True)
    where = f" (step {step})" if step is not None else ""
    print(f"Wrote the PEFT adapter{where} with {len(adapter)} LoRA modules to {path}.")
    return 0


def _add_import(commands: Any) -> None:
    p = commands.add_parser("import", help="read a PEFT adapter, check it against a model, store it for lora_jax")
    p.add_argument("source", help="PEFT adapter directory (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--model", help="base model (default: the adapter's base_model_name_or_path)")
    p.add_argument("--output", help="write a lora_jax adapter directory (orbax) here")
    p.add_argument("--overwrite", action="store_true", help="replace a previous `lora-jax import` output")
    p.set_defaults(func=cmd_import)


def cmd_import(args: argparse.Namespace) -> int:
    """``lora-jax import``: check a PEFT adapter against its model; optionally store it for lora_jax."""
    from lora_jax.train import OutputDir, load_adapter, load_model, write_lora_adapter
    from lora_jax.train.adapter_files import PEFT_CONFIG_FILE, resolve_base_model

    source = Path(args.source)
    if not (source / PEFT_CONFIG_FILE).exists():
        raise CliError(f"{source}: not a PEFT adapter directory (no adapter_config.json).")
    output = OutputDir(args.output, "import") if args.output else None
    if output is not None:
        output.check(overwrite=args.overwrite)
    base = resolve_base_model(args.model, source)
    model = load_model(base)
    adapter, config, trainable = load_adapter(source, model.params)
    print(f"{source}: {len(adapter)} LoRA modules fit {base}; r={config.r}, lora_alpha={config.lora_alpha:g}"
          + (f", full tensors: {', '.join(sorted(trainable))}" if trainable else ""))
    _print_targets(model.params, config)
    if output is not None:
        output.claim(overwrite=args.overwrite)
        write_lora_adapter(output.path, adapter, config, trainable, str(Path(base).absolute()))
        print(f"Wrote a lora_jax adapter to {output.path} (use it with --adapter / --init-adapter, "
              "or `lora-jax export`).")
    return 0


# -- combine --------------------------------------------------------------------------------

def _add_combine(commands: Any) -> None:
    from lora_jax.weighted import COMBINATION_TYPES

    types = _option_types()
    p = commands.add_parser("combine", help="a weighted combination of adapters (PEFT's add_weighted_adapter)")
    p.add_argument("--adapter", action="append", required=True, metavar="[NAME=]DIR",
                   help="an adapter to combine (repeat; at least one)")
    p.add_argument("--weights", type=float, nargs="+", required=True, help="one weight per --adapter")
    p.add_argument("--type", dest="combination_type", default="svd", choices=COMBINATION_TYPES,
                   help="combination type (default svd, as PEFT)")
    p.add_argument("--svd-rank", type=types["positive"], help="rank of the svd types (default: the largest)")
    p.add_argument("--density", type=float, help="kept fraction for ties / dare / magnitude_prune")
    p.add_argument("--seed", type=types["seed"], default=0, help="random masks of the dare types")
    p.add_argument("--model", help="base model (default: the first adapter's base_model_name_or_path)")
    p.add_argument("--output", required=True, help="PEFT adapter directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace a previous `lora-jax combine` output")
    p.set_defaults(func=cmd_combine)


def cmd_combine(args: argparse.Namespace) -> int:
    """``lora-jax combine``: PEFT's ``add_weighted_adapter`` as a command, written as a PEFT adapter."""
    import jax

    from lora_jax import weighted_adapter
    from lora_jax.peft import save_peft
    from lora_jax.train import OutputDir, load_adapter, load_model
    from lora_jax.train.adapter_files import adapter_base_model, resolve_base_model

    named = _named_adapters(args.adapter)
    if len(args.weights) != len(named):
        raise CliError(f"--weights has {len(args.weights)} values for {len(named)} adapters: give one per --adapter.")
    output = OutputDir(args.output, "combine")
    output.check(overwrite=args.overwrite)
    first = next(iter(named.values()))
    model = load_model(resolve_base_model(args.model, first))
    adapters = {}
    for name, directory in named.items():
        adapter, config, trainable = load_adapter(directory, model.params)
        adapters[name] = (adapter, config)
    options = {k: v for k, v in (("svd_rank", args.svd_rank), ("density", args.density)) if v is not None}
    if args.combination_type.startswith("dare"):
        options["key"] = jax.random.key(args.seed)
    adapter, config = weighted_adapter(adapters, list(args.weights), args.combination_type, params=model.params,
                                       **options)
    output.claim(overwrite=args.overwrite)
    base = args.model or adapter_base_model(first)
    path = save_peft(output.path, adapter, config, model.params, base_model_name_or_path=base,
                     task_type="CAUSAL_LM", overwrite=True)
    print(f"Combined {len(named)} adapters ({args.combination_type}, weights {args.weights}) into {path}: "
          f"{len(adapter)} modules, r={config.r}.")
    return 0


# -- info -----------------------------------------------------------------------------------

def _add_info(commands: Any) -> None:
    types = _option_types()
    p = commands.add_parser("info", help="trainable-parameter report and the modules a LoRA config targets")
    p.add_argument("--model", help="model directory or .gguf (default: SmolLM2-135M-Instruct)")
    p.add_argument("--tiny", action="store_true", help="a tiny random Llama instead of a model")
    p.add_argument("--adapter", help="report on this adapter's config instead of the flags below")
    p.add_argument("-r", "--r", dest="r", type=types["positive"], default=8)
    p.add_argument("--alpha", type=types["alpha"], default=16.0)
    p.add_argument("--target-modules", default="q_proj,v_proj")
    p.add_argument("--modules-to-save")
    p.add_argument("--rslora", action="store_true")
    p.add_argument("--all-modules", action="store_true", help="also list every module with a kernel")
    _add_quantize_arguments(p, "report the base's bytes before and after")
    p.set_defaults(func=cmd_info)


def cmd_info(args: argparse.Namespace) -> int:
    """``lora-jax info``: what a LoRA config targets in a model, and the trainable share."""
    import jax

    from lora_jax import LoraConfig, count_parameters, find_targets, init
    from lora_jax.train import load_adapter
    from lora_jax.train.adapter_files import resolve_base_model
    from lora_jax.train.settings import parse_targets

    if args.tiny:
        from lora_jax.train.tiny import tiny_model

        model = tiny_model(384)
        name = "tiny random Llama"
        if args.quantize:
            model.params = _quantize_tiny(model.params, args)
    else:
        path = resolve_base_model(args.model, Path(args.adapter) if args.adapter else None)
        model = _quantized_model(path, args)
        name = str(path)
    if args.adapter:
        _, config, _ = load_adapter(Path(args.adapter), model.params)
    else:
        config = LoraConfig(r=args.r, lora_alpha=args.alpha, target_modules=parse_targets(args.target_modules),
                            use_rslora=args.rslora, modules_to_save=parse_targets(args.modules_to_save))
    print(f"model: {name} ({model.config.get('model_type')}, {_num_params(model.params):,d} params)")
    print(_bytes_line(model.params, args.quantize))
    if args.all_modules:
        from lora_jax import module_names

        print("modules with a kernel:")
        for line in _grouped(module_names(model.params)):
            print(f"  {line}")
    targets = find_targets(config, model.params)
    print(f"target_modules {config.target_modules!r} -> {len(targets)} modules:")
    _print_targets(model.params, config)
    adapter = jax.eval_shape(lambda: init(config, model.params, jax.random.key(0)))
    counts = count_parameters(model.params, adapter, config)
    print(f"trainable params: {counts['trainable']:,d} || all params: {counts['all']:,d} || "
          f"trainable%: {counts['trainable%']:.4f}")
    return 0


def _num_params(params: Any) -> int:
    import jax
    import numpy as np

    from lora_jax.quantize import is_quantized

    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params, is_leaf=is_quantized))


def _quantize_tiny(params: Any, args: argparse.Namespace) -> Any:
    from lora_jax.quantize import quantize
    from lora_jax.train.kbit import quant_config

    if args.quantize == "gguf":
        raise CliError("--quantize gguf keeps a .gguf model's own blocks; --tiny is not a .gguf model.")
    try:
        return quantize(params, quant_config(args.quantize, double_quant=args.double_quant))
    except ValueError as err:
        raise CliError(str(err)) from None


def _bytes_line(params: Any, scheme: str | None) -> str:
    """``base weights: 513.2 MiB`` (+ `` -> 171.4 MiB quantized ...`` for a quantized base).

    Example:
        >>> import jax.numpy as jnp
        >>> from lora_jax.quantize import quantize
        >>> params = {"up": {"kernel": jnp.ones((256, 1024))}, "norm": {"scale": jnp.ones(1024)}}
        >>> _bytes_line(params, None)
        'base weights: 1.00 MiB'
        >>> _bytes_line(quantize(params, "nf4"), "nf4")
        'base weights: 1.00 MiB -> 0.14 MiB with --quantize nf4 (1 kernels at 0.5625 bytes/param, 0.14x)'
    """
    from lora_jax.quantize import quantized_bytes

    report = quantized_bytes(params)
    line = f"base weights: {report['before'] / 2**20:.2f} MiB"
    if scheme:
        line += (f" -> {report['after'] / 2**20:.2f} MiB with --quantize {scheme} ({report['quantized_leaves']} "
                 f"kernels at {report['bytes_per_quantized_param']:.4f} bytes/param, "
                 f"{report['after'] / report['before']:.2f}x)")
    return line


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
