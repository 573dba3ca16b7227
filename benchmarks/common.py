"""Shared pieces of the side-by-side benchmarks (train_step, inference, scaling).

Model shapes, the JAX training steps being compared, XLA cost/memory readings,
timing, the child-process protocol that keeps each variant's peak RSS its own,
and Markdown/JSON output. Nothing here is part of the lora_jax package.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
THREADS = 2  # this machine's cores; XLA and torch both get exactly these

# Hugging Face config dicts: the same dict builds the Flax model (lora_jax.models) and
# the PyTorch one (transformers.LlamaConfig), so both sides have the same architecture.
SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(
        hf=dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                tie_word_embeddings=True, rope_theta=10000.0, max_position_embeddings=512),
        batch=4, seq=64,
    ),
    "smollm2-135m": dict(
        hf=dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                tie_word_embeddings=True, rope_theta=100000.0, rms_norm_eps=1e-5,
                max_position_embeddings=8192),
        batch=4, seq=128,
    ),
    "llama-1b": dict(  # Llama-3.2-1B's shape
        hf=dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                tie_word_embeddings=True, rms_norm_eps=1e-5, max_position_embeddings=131072,
                rope_theta=500000.0,
                rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                                  high_freq_factor=4.0, original_max_position_embeddings=8192)),
        batch=4, seq=128,
    ),
}

TARGETS: dict[str, Any] = {
    "q,v": ["q_proj", "v_proj"],
    "q,k,v,o": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "all-linear": "all-linear",
}
LEARNING_RATE = 1e-4
WEIGHT_DECAY = 0.01  # torch.optim.AdamW's default; optax gets the same


# -- threads -----------------------------------------------------------------------------------

def limit_threads(threads: int = THREADS) -> None:
    """Pin this process to ``threads`` cores and tell every runtime to use that many threads.

    Call before importing jax or torch. XLA's CPU thread pool sizes itself from the
    affinity mask (it has no thread-count flag); torch gets ``set_num_threads`` in
    :func:`torch_threads`.
    """
    cores = sorted(os.sched_getaffinity(0))[:threads]
    os.sched_setaffinity(0, cores)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    # OpenMP's default spin-waiting makes torch steps 10-100x slower and erratic when other
    # processes share the cores (measured here: a tiny PEFT step 60-2400 ms vs 13 ms passive).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def torch_threads(threads: int = THREADS) -> None:
    import torch

    torch.set_num_threads(threads)


# -- step settings: remat and chunked loss, as the CLI applies them ------------------------------
# The memory target compares LoRA and full fine-tuning "with the CLI's default settings
# applied to both sides". Per-layer remat and a chunked LM head + loss are being added to
# lora_jax.models / lora_jax.train; the benchmarks detect them (by field and parameter
# name) so that the same script runs before and after they land, and record what was used.

REMAT_FIELDS = ("remat", "remat_policy")  # module or config field: per-layer remat
CHUNK_FIELDS = ("chunked_loss", "chunk_loss", "loss_chunking")  # bool module/config field
REMAT_ALIASES = {"dots": "dots_saveable", "full": "nothing_saveable"}


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """How a benchmark step is built: remat policy name (``none`` = off) and chunked loss.

    Example:
        >>> StepSettings(remat="dots", chunked_loss=False).remat
        'dots'
    """

    remat: str = "none"
    chunked_loss: bool = False
    source: str = "benchmark defaults"


def cli_defaults() -> dict[str, Any]:
    """The ``lora-jax finetune`` defaults, wherever the installed lora_jax keeps them.

    Looks for ``lora_jax.train.settings.FinetuneSettings`` (a dataclass) and then
    ``lora_jax.cli.DEFAULTS`` (a dict); ``{"_source": ...}`` names the one found.

    Example:
        >>> "_source" in cli_defaults()
        True
    """
    import importlib

    try:
        settings = importlib.import_module("lora_jax.train.settings")
        table = settings.FinetuneSettings
        out: dict[str, Any] = {}
        for field in dataclasses.fields(table):
            if "default" in field.metadata:  # a recorded setting keeps None as its field default
                out[field.name] = field.metadata["default"]
            elif field.default is not dataclasses.MISSING:
                out[field.name] = field.default
            elif field.default_factory is not dataclasses.MISSING:
                out[field.name] = field.default_factory()
        out["_source"] = "lora_jax.train.settings.FinetuneSettings"
        return out
    except (ImportError, AttributeError, TypeError):
        pass
    try:
        cli = importlib.import_module("lora_jax.cli")
        return {**cli.DEFAULTS, "_source": "lora_jax.cli.DEFAULTS"}
    except (ImportError, AttributeError):
        return {"_source": "none found"}


def resolve_step_settings(remat: str | None, chunked_loss: bool | None) -> StepSettings:
    """``--remat`` / ``--chunked-loss`` as given, the CLI's defaults where not given.

    Example:
        >>> resolve_step_settings("full", False).remat
        'full'
    """
    defaults = cli_defaults()
    chunk_keys = [k for k in defaults if "chunk" in k and not k.startswith("_")]
    default_chunked = bool(defaults[chunk_keys[0]]) if chunk_keys else False
    default_remat = defaults.get("remat") or "none"
    given = remat is not None or chunked_loss is not None
    source = ("command line" if remat is not None and chunked_loss is not None
              else f"CLI defaults ({defaults['_source']})" + (" + command line" if given else ""))
    return StepSettings(remat=remat if remat is not None else str(default_remat),
                        chunked_loss=default_chunked if chunked_loss is None else chunked_loss,
                        source=source)


def _module_field(module: Any, names: Sequence[str]) -> tuple[str, str] | None:
    """``("module" | "config", field)`` for the first of ``names`` the module or its config has."""
    fields = {f.name for f in dataclasses.fields(module)} if dataclasses.is_dataclass(module) else set()
    for name in names:
        if name in fields and name != "config":
            return "module", name
    config = getattr(module, "config", None)
    if config is not None and dataclasses.is_dataclass(config):
        config_fields = {f.name for f in dataclasses.fields(config)}
        for name in names:
            if name in config_fields:
                return "config", name
    return None


def _set_field(module: Any, where: tuple[str, str], value: Any) -> Any:
    owner, name = where
    if owner == "module":
        return module.clone(**{name: value})
    return module.clone(config=dataclasses.replace(module.config, **{name: value}))


def model_supports(module: Any) -> dict[str, Any]:
    """What the installed model offers: per-layer remat field, chunked-loss field, ``labels=``.

    Example:
        >>> import flax.linen as nn
        >>> model_supports(nn.Dense(3))["labels_kwarg"]
        False
    """
    try:
        labels = "labels" in inspect.signature(type(module).__call__).parameters
    except (TypeError, ValueError):
        labels = False
    return {"remat_field": _module_field(module, REMAT_FIELDS), "chunk_field": _module_field(module, CHUNK_FIELDS),
            "labels_kwarg": labels}


def apply_model_settings(module: Any, settings: StepSettings) -> Any:
    """``module`` with per-layer remat / chunked loss switched on where the model has them.

    Example:
        >>> import flax.linen as nn
        >>> apply_model_settings(nn.Dense(3), StepSettings()).features
        3
    """
    found = model_supports(module)
    if settings.remat != "none" and found["remat_field"]:
        module = _set_field(module, found["remat_field"], settings.remat)
    if settings.chunked_loss and found["chunk_field"]:
        module = _set_field(module, found["chunk_field"], True)
    return module


def settings_applied(module: Any, settings: StepSettings) -> dict[str, Any]:
    """How :func:`forward_loss` realises ``settings`` on ``module`` (recorded in the JSON).

    Raises SystemExit with the reason if ``settings`` asks for a chunked loss the installed
    lora_jax.models does not have (a benchmark must not silently measure something else).

    Example:
        >>> import flax.linen as nn
        >>> settings_applied(nn.Dense(3), StepSettings())["remat_applied"]
        'off'
    """
    found = model_supports(module)
    if settings.remat == "none":
        remat = "off"
    elif found["remat_field"]:
        remat = f"per layer (model {found['remat_field'][0]} field {found['remat_field'][1]!r})"
    else:
        remat = "whole forward (jax.checkpoint, as lora_jax.train.make_loss_fn(remat=) does)"
    if not settings.chunked_loss:
        chunked = "off"
    elif found["labels_kwarg"]:
        chunked = "model loss via labels=" + (f" ({found['chunk_field'][1]}=True)" if found["chunk_field"] else "")
    else:
        raise SystemExit("--chunked-loss: the installed lora_jax.models has no chunked LM loss (looked for a "
                         f"`labels=` parameter of {type(module).__name__}.__call__ and a field named one of "
                         f"{CHUNK_FIELDS}); run with --no-chunked-loss")
    return {"remat": settings.remat, "remat_applied": remat, "chunked_loss": settings.chunked_loss,
            "chunked_loss_applied": chunked, "settings_source": settings.source}


def checkpoint_policy(name: str) -> Any:
    """A ``jax.checkpoint_policies`` member for a ``--remat`` name (``full``, ``dots`` or a policy name)."""
    import jax

    try:
        from lora_jax.train import remat_policy
    except ImportError:
        remat_policy = None
    name = REMAT_ALIASES.get(name, name)
    if remat_policy is not None:
        return remat_policy(name)
    return getattr(jax.checkpoint_policies, name)


def forward_loss(apply: Callable[..., Any], module: Any, settings: StepSettings | None) -> Callable[..., Any]:
    """``loss(params, ids)``: mean next-token loss of ``apply(params, ids, **kw)`` under ``settings``.

    ``apply(params, ids, **kw)`` returns logits, or with ``labels=`` (chunked loss in the
    model) the model's loss. Whole-forward remat wraps ``apply`` in ``jax.checkpoint`` when
    the model has no per-layer remat, as lora_jax.train's step does.
    """
    import jax

    settings = settings or StepSettings()
    found = model_supports(module)
    call = apply
    if settings.remat != "none" and not found["remat_field"]:
        call = jax.checkpoint(apply, policy=checkpoint_policy(settings.remat))
    if settings.chunked_loss:
        settings_applied(module, settings)  # refuses an unsupported chunked loss

        def chunked(params: Any, ids: Any) -> Any:
            out = call(params, ids, labels=ids)
            if isinstance(out, (tuple, list)):  # (summed nll, token count)
                return out[0] / out[1]
            return out
        return chunked
    return lambda params, ids: lm_loss(call(params, ids), ids)


# -- models --------------------------------------------------------------------------------------

def lora_config(targets: str, r: int = 8, *, scanned: bool = False, **kw: Any) -> Any:
    """PEFT-style config: ``lora_alpha = 2r``; scanned models stack the layer modules."""
    import lora_jax

    extra = dict(stacked_modules=r"model\.layers\..*") if scanned else {}
    return lora_jax.LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS[targets], **extra, **kw)


def jax_model(hf: dict[str, Any], *, abstract: bool = False, scan_layers: bool = False,
              settings: StepSettings | None = None, dtype: str = "float32",
              compute_dtype: str | None = None) -> tuple[Any, Any]:
    """``(module, params)``; abstract params are ``ShapeDtypeStruct``s (nothing allocated).

    ``settings`` sets the model-side step settings the installed lora_jax.models supports
    (per-layer remat, chunked loss; see :func:`apply_model_settings`); ``dtype`` is the
    params' dtype, ``compute_dtype`` the activations' (default: ``dtype``).
    """
    import jax
    import numpy as np

    from lora_jax import models

    kw = dict(scan_layers=scan_layers, dtype=dtype, compute_dtype=compute_dtype)
    if not abstract:
        model = models.from_config(hf, **kw)
        module, params = model.module, model.params
    else:
        module = models.build_module(hf, **kw)
        ids = np.zeros((1, 1), np.int32)
        params = jax.eval_shape(lambda: module.init(jax.random.key(0), ids))["params"]
    if settings is not None:
        module = apply_model_settings(module, settings)
    return module, params


def token_batch(size: dict[str, Any], batch: int | None = None, seq: int | None = None, seed: int = 0) -> Any:
    import numpy as np

    rng = np.random.default_rng(seed)
    shape = (batch or size["batch"], seq or size["seq"])
    return rng.integers(0, size["hf"]["vocab_size"], shape, dtype=np.int32)


def lm_loss(logits: Any, ids: Any) -> Any:
    """Mean next-token cross-entropy, as transformers' ``labels=input_ids`` loss."""
    import jax.numpy as jnp
    import optax

    nll = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1].astype(jnp.float32), ids[:, 1:])
    return jnp.mean(nll)


JAX_STEP_KINDS = ("lora", "full", "naive", "frozen")


def _is_abstract(tree: Any) -> bool:
    import jax

    return isinstance(jax.tree.leaves(tree)[0], jax.ShapeDtypeStruct)


def adamw_step(loss: Callable[..., Any], trainable: Any) -> tuple[Callable[..., Any], Any]:
    """The jit-compiled AdamW step over ``loss(trainable, frozen, ids)`` and its initial state.

    The step donates the trainable tree and optimizer state, as a training loop would.
    """
    import jax
    import optax

    optimizer = optax.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY)

    def step(trainable: Any, opt_state: Any, frozen: Any, ids: Any) -> tuple[Any, Any, Any]:
        value, grads = jax.value_and_grad(loss)(trainable, frozen, ids)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, value

    opt_state = jax.eval_shape(optimizer.init, trainable) if _is_abstract(trainable) else optimizer.init(trainable)
    return jax.jit(step, donate_argnums=(0, 1)), opt_state


def jax_train_step(kind: str, module: Any, params: Any, config: Any = None, key: Any = None,
                   settings: StepSettings | None = None) -> tuple[Callable[..., Any], tuple[Any, ...]]:
    """A jit-compiled AdamW training step and its arguments ``(trainable, opt_state, frozen, ids)``.

    - ``lora``: the adapter trains through ``lora_jax.lora`` (x@W + s(x@A)@B);
    - ``naive``: the adapter trains through ``apply(merge(params, adapter))`` inside the step;
    - ``full``: every parameter trains (full fine-tuning);
    - ``frozen``: only the RMSNorm scales train: every dot is frozen, so this is the
      forward pass plus activation gradients down to the first layer, the least any
      LoRA step can cost (the frozen-base floor).

    ``settings`` (remat, chunked loss) apply to every kind alike (:func:`forward_loss`).
    The step donates the trainable tree and optimizer state, as a training loop would.
    ``params`` may be abstract (``ShapeDtypeStruct``s): then only lower/compile it.
    """
    import jax

    import lora_jax

    def apply(p: Any, ids: Any, **kw: Any) -> Any:
        return module.apply({"params": p}, ids, **kw)

    if kind in ("lora", "naive"):
        if _is_abstract(params):
            trainable = jax.eval_shape(lambda: lora_jax.init(config, params, jax.random.key(1)))
        else:
            trainable = lora_jax.init(config, params, key if key is not None else jax.random.key(1))
        frozen = params
        if kind == "lora":
            lora_apply = lora_jax.lora(apply, config)
            # (frozen, adapter) travel as one argument so that whole-forward remat wraps
            # the LoRA'd apply, as lora_jax.train's step does.
            step_loss = forward_loss(lambda fa, ids, **kw: lora_apply(fa[0], fa[1], ids, **kw), module, settings)
        else:
            step_loss = forward_loss(lambda fa, ids, **kw: apply(lora_jax.merge(fa[0], fa[1], config), ids, **kw),
                                     module, settings)

        def loss(adapter: Any, frozen: Any, ids: Any) -> Any:
            return step_loss((frozen, adapter), ids)
    elif kind == "full":
        trainable, frozen = params, {}
        full_loss = forward_loss(apply, module, settings)

        def loss(p: Any, frozen: Any, ids: Any) -> Any:
            return full_loss(p, ids)
    elif kind == "frozen":
        mask = jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key == "scale", params)
        trainable, frozen = lora_jax.partition(params, mask)
        frozen_loss = forward_loss(lambda p, ids, **kw: apply(lora_jax.combine(p[0], p[1]), ids, **kw), module,
                                   settings)

        def loss(scales: Any, frozen: Any, ids: Any) -> Any:
            return frozen_loss((scales, frozen), ids)
    else:
        raise ValueError(f"kind must be one of {JAX_STEP_KINDS}, got {kind!r}")

    step, opt_state = adamw_step(loss, trainable)
    return step, (trainable, opt_state, frozen)


# -- qwix: the JAX peer -------------------------------------------------------------------------
# qwix (Google's quantization + LoRA library) intercepts the linen module's dot_general calls;
# apply_lora_to_model on a linen module needs no example inputs, and `init` then creates
# `kernel_lora_a` / `kernel_lora_b` params beside each targeted kernel.

QWIX_TARGETS = {
    "q,v": ".*(q_proj|v_proj)",
    "q,k,v,o": ".*(q_proj|k_proj|v_proj|o_proj)",
    "all-linear": ".*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
}
QWIX_LORA_SUFFIXES = ("_lora_a", "_lora_b")


def split_qwix_lora(params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(lora, rest)``: qwix's ``*_lora_a`` / ``*_lora_b`` leaves apart from everything else.

    Example:
        >>> split_qwix_lora({"q": {"kernel": 1, "kernel_lora_a": 2, "kernel_lora_b": 3}})
        ({'q': {'kernel_lora_a': 2, 'kernel_lora_b': 3}}, {'q': {'kernel': 1}})
    """
    lora: dict[str, Any] = {}
    rest: dict[str, Any] = {}
    for name, value in params.items():
        if isinstance(value, dict):
            sub_lora, sub_rest = split_qwix_lora(value)
            if sub_lora:
                lora[name] = sub_lora
            if sub_rest:
                rest[name] = sub_rest
        elif name.endswith(QWIX_LORA_SUFFIXES):
            lora[name] = value
        else:
            rest[name] = value
    return lora, rest


def join_trees(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Nested dicts ``a`` and ``b`` (disjoint leaves) as one.

    Example:
        >>> join_trees({"q": {"kernel": 1}}, {"q": {"kernel_lora_a": 2}})
        {'q': {'kernel': 1, 'kernel_lora_a': 2}}
    """
    out = dict(a)
    for name, value in b.items():
        out[name] = join_trees(out[name], value) if isinstance(value, dict) and name in out else value
    return out


def init_qwix_lora(abstract_lora: dict[str, Any], key: Any) -> dict[str, Any]:
    """Values for qwix's LoRA leaves: ``*_lora_a`` he-uniform, ``*_lora_b`` zero (qwix's defaults).

    Example:
        >>> import jax
        >>> leaves = {"q": {"kernel_lora_a": jax.ShapeDtypeStruct((4, 2), "float32"),
        ...                 "kernel_lora_b": jax.ShapeDtypeStruct((2, 4), "float32")}}
        >>> out = init_qwix_lora(leaves, jax.random.key(0))
        >>> out["q"]["kernel_lora_a"].shape, float(abs(out["q"]["kernel_lora_b"]).max())
        ((4, 2), 0.0)
    """
    import jax
    import jax.numpy as jnp

    paths, treedef = jax.tree_util.tree_flatten_with_path(abstract_lora)
    keys = jax.random.split(key, len(paths))
    values = []
    for (path, leaf), k in zip(paths, keys):
        if path[-1].key.endswith("_lora_a"):
            values.append(jax.nn.initializers.he_uniform()(k, leaf.shape, leaf.dtype))
        else:
            values.append(jnp.zeros(leaf.shape, leaf.dtype))
    return jax.tree_util.tree_unflatten(treedef, values)


def qwix_model(module: Any, targets: str, rank: int, *, weight_qtype: str | None = None,
               tile_size: int | None = None) -> Any:
    """``module`` with qwix LoRA (alpha = 2r, like every lora_jax variant here) on ``targets``.

    ``weight_qtype`` (e.g. ``"nf4"``, ``"int8"``) makes it qwix QLoRA: the targeted kernels
    are quantized when the model is initialised; ``tile_size`` sets sub-channel blocks.
    """
    import qwix

    extra: dict[str, Any] = {}
    if weight_qtype is not None:
        extra["weight_qtype"] = weight_qtype
    if tile_size is not None:
        extra["tile_size"] = tile_size
    rule = qwix.LoraRule(module_path=QWIX_TARGETS[targets], rank=rank, alpha=2.0 * rank, **extra)
    return qwix.apply_lora_to_model(module, qwix.LoraProvider([rule]))


def qwix_train_step(module: Any, params: Any, targets: str, rank: int = 8, *, key: Any = None,
                    settings: StepSettings | None = None, weight_qtype: str | None = None,
                    tile_size: int | None = None) -> tuple[Callable[..., Any], tuple[Any, ...]]:
    """qwix's LoRA (or QLoRA) step on the same linen module and base params: same AdamW, loss, batch.

    Returns ``(jitted step, (trainable, opt_state, frozen))`` like :func:`jax_train_step`.
    The base params are ``params`` (so every variant starts from the same model); qwix's
    ``init``, traced abstractly, gives the LoRA leaves' shapes (initialised as qwix does:
    :func:`init_qwix_lora`) and, for QLoRA, the layout of the quantized kernels, into which
    ``qwix.quantize_params`` quantizes ``params``.
    """
    import jax
    import numpy as np
    import qwix

    model = qwix_model(module, targets, rank, weight_qtype=weight_qtype, tile_size=tile_size)
    example = np.zeros((1, 8), np.int32)
    key = key if key is not None else jax.random.key(1)
    abstract_params = jax.eval_shape(model.init, key, example)["params"]
    abstract_lora, abstract_rest = split_qwix_lora(abstract_params)
    if _is_abstract(params):
        trainable, frozen = abstract_lora, abstract_rest
    else:
        # The LoRA leaves as qwix's LoraRule initialises them (A he-uniform, B zero), without
        # initialising (and compiling) a second copy of the whole base.
        trainable = init_qwix_lora(abstract_lora, key)
        frozen = qwix.quantize_params(params, abstract_rest) if weight_qtype else params
    step_loss = forward_loss(lambda p, ids, **kw: model.apply({"params": p}, ids, **kw), module, settings)

    def loss(lora: Any, frozen: Any, ids: Any) -> Any:
        return step_loss(join_trees(frozen, lora), ids)

    step, opt_state = adamw_step(loss, trainable)
    return step, (trainable, opt_state, frozen)


def compile_stats(jitted: Callable[..., Any], *args: Any) -> tuple[Any, dict[str, float]]:
    """Lower and compile; XLA's FLOPs and memory, and the trace (lower) and compile seconds."""
    start = time.perf_counter()
    lowered = jitted.lower(*args)
    traced = time.perf_counter()
    compiled = lowered.compile()
    done = time.perf_counter()
    memory = compiled.memory_analysis()
    mib = 2**20
    # On XLA:CPU peak_memory_in_bytes is arguments + outputs - aliases: it leaves out the
    # temporaries (activations, gradients). total_mib adds them: what the step really needs.
    total = (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
             + memory.temp_size_in_bytes)
    cost = compiled.cost_analysis()
    return compiled, {
        "gflops": cost["flops"] / 1e9,
        "gbytes_accessed": cost.get("bytes accessed", float("nan")) / 1e9,  # XLA's estimate of memory traffic
        "peak_mib": memory.peak_memory_in_bytes / mib,
        "total_mib": total / mib,
        "argument_mib": memory.argument_size_in_bytes / mib,
        "temp_mib": memory.temp_size_in_bytes / mib,
        "lower_s": traced - start,
        "compile_s": done - traced,
    }


# -- timing --------------------------------------------------------------------------------------

def time_steps(run: Callable[[], Any], steps: int) -> list[float]:
    """Seconds of each of ``steps`` calls; ``run`` must block until its result is ready."""
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return times


def peak_rss_mib() -> float:
    """This process's peak resident set size (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


# -- the machine's matmul peak (benchmarks/peak.py) ------------------------------------------------

def add_peak_argument(parser: Any) -> None:
    """``--peak``: ``measure`` (run peak.py first, in this run), a peak JSON path, or ``none``."""
    parser.add_argument("--peak", default="measure",
                        help="matmul peak to report steps against: 'measure' (run benchmarks/peak.py now, "
                             "the default), the path of a peak.py JSON (e.g. benchmarks/results/peak.json), "
                             "or 'none'")


def resolve_peak(spec: str, out_dir: Path, smoke: bool, extra: Sequence[str] = ()) -> dict[str, Any] | None:
    """The peak figures: ``{"peak_gflops_per_s": {dtype: GFLOP/s}, "source": ..., ...}`` or None.

    ``measure`` runs peak.py in a child process (the same pinned threads, nothing else
    running) and writes its JSON into ``out_dir``; a path reads an earlier run's JSON.
    """
    if spec == "none":
        return None
    if spec == "measure":
        argv = [sys.executable, str(Path(__file__).parent / "peak.py"), "--out-dir", str(out_dir), *extra]
        if smoke:
            argv.append("--smoke")
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
        path = out_dir / ("peak_smoke.json" if smoke else "peak.json")
        source = f"measured in this run ({path.name})"
    else:
        path = Path(spec)
        source = str(path)
    if not path.is_file():
        raise SystemExit(f"--peak: no peak.py result at {path} (run `python benchmarks/peak.py` first, "
                         "or pass --peak measure)")
    data = json.loads(path.read_text())
    if "peak_gflops_per_s" not in data:
        raise SystemExit(f"--peak: {path} is not a peak.py result (it has no 'peak_gflops_per_s')")
    return {"source": source, "peak_gflops_per_s": data["peak_gflops_per_s"],
            "peak_size": data.get("peak_size"), "device_kind": data.get("device_kind"),
            "loadavg_at_start": data.get("environment", {}).get("loadavg_at_start")}


def fraction_of_peak(achieved_gflops_per_s: float, peak: dict[str, Any] | None, dtype: str) -> float | None:
    """Achieved GFLOP/s over the measured matmul peak of ``dtype`` (None without a peak).

    Example:
        >>> fraction_of_peak(150.0, {"peak_gflops_per_s": {"float32": 300.0}}, "float32")
        0.5
    """
    if not peak or dtype not in peak["peak_gflops_per_s"]:
        return None
    return achieved_gflops_per_s / peak["peak_gflops_per_s"][dtype]


# -- targets ---------------------------------------------------------------------------------------

def target(name: str, value: float | None, op: str, threshold: float, **extra: Any) -> dict[str, Any]:
    """One target check: ``value op threshold`` with ``met`` None when there is no value.

    Example:
        >>> target("LoRA / full", 0.6, "<=", 0.7)["met"]
        True
    """
    if value is None or value != value:
        met = None
    elif op == "<=":
        met = value <= threshold
    elif op == ">=":
        met = value >= threshold
    else:
        raise ValueError(f"op must be '<=' or '>=', got {op!r}")
    return {"target": name, "value": value, "op": op, "threshold": threshold, "met": met, **extra}


def targets_table(targets: Sequence[dict[str, Any]]) -> str:
    """Markdown: target, measured value, threshold, met / missed / not measured."""
    rows = []
    for t in targets:
        verdict = {True: "met", False: "**missed**", None: "not measured"}[t["met"]]
        rows.append([t["target"], fmt(t["value"], 3), f"{t['op']} {t['threshold']}", verdict])
    return markdown_table(["target", "measured", "threshold", ""], rows)


# -- child processes -------------------------------------------------------------------------------
# A variant runs in its own process (so its peak RSS is its own) and stays alive while the
# parent asks each variant in turn for a few timed steps: the variants share the machine's
# background load round by round instead of one variant catching a busy minute.

PROTOCOL = "@@bench "


def send(message: dict[str, Any]) -> None:
    """Child side: one protocol line on stdout (anything else printed there is ignored)."""
    sys.stdout.write(PROTOCOL + json.dumps(message) + "\n")
    sys.stdout.flush()


def serve(runs: dict[str, Callable[[], Any]], ready: dict[str, Any]) -> None:
    """Child side: report ``ready``, then answer ``time NAME N`` with N step times of
    variant NAME until ``exit``. A child may host several variants (``runs``)."""
    send({"ready": ready})
    for line in sys.stdin:
        command = line.split()
        if not command:
            continue
        if command[0] == "time":
            send({"times": time_steps(runs[command[1]], int(command[2]))})
        elif command[0] == "exit":
            send({"exit": {"peak_rss_mib": peak_rss_mib()}})
            return


class Child:
    """Parent side: a variant's process, started with ``argv`` (after the interpreter)."""

    def __init__(self, name: str, argv: list[str]) -> None:
        self.name = name
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env)

    def receive(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(PROTOCOL):
                return json.loads(line[len(PROTOCOL):])
        code = self.proc.wait()
        raise RuntimeError(f"benchmark child {self.name!r} exited with code {code} before answering")

    def ask(self, command: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.receive()

    def close(self) -> dict[str, Any]:
        answer = self.ask("exit")
        self.proc.wait()
        return answer["exit"]

    def kill(self) -> None:
        """Stop this child if it is still running (after an error elsewhere)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def run_interleaved(children: dict[str, Child], rounds: int, steps_per_round: int) -> dict[str, list[list[float]]]:
    """Ask for ``steps_per_round`` timed steps of every variant (a variant -> its child),
    ``rounds`` times, variant after variant. Returns each variant's times per round."""
    times: dict[str, list[list[float]]] = {name: [] for name in children}
    for _ in range(rounds):
        for name, child in children.items():
            times[name].append(child.ask(f"time {name} {steps_per_round}")["times"])
    return times


def paired_ratio(times: list[list[float]], reference: list[list[float]]) -> float:
    """Median over rounds of (this variant's round median / the reference's round median).

    Variants timed in the same round ran within seconds of each other, so the ratio of
    their round medians cancels most of the machine's slowly varying background load.
    """
    return median([median(a) / median(b) for a, b in zip(times, reference)])


# -- output --------------------------------------------------------------------------------------

def _load_now() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


_LOAD_AT_IMPORT = _load_now()  # the scripts import this module first: the load before their own work


def environment() -> dict[str, Any]:
    """The backend, versions, threads and the 1-minute load average before the script's own work.

    Example:
        >>> sorted(environment())[:3]
        ['backend', 'cpu', 'jax']
    """
    import jax

    info = {"backend": jax.default_backend(), "jax": jax.__version__, "threads": THREADS,
            "cpu": platform.processor() or platform.machine(), "python": platform.python_version()}
    if _LOAD_AT_IMPORT is not None:
        info["loadavg_at_start"] = _LOAD_AT_IMPORT
        info["loadavg_at_end"] = _load_now()
    return info


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(value: Any, digits: int = 2) -> str:
    """A table cell: ``-`` for missing values, fixed decimals for floats."""
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)
