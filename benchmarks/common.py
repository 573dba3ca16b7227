"""Shared pieces of the side-by-side benchmarks (train_step, inference, scaling).

Model shapes, the JAX training steps being compared, XLA cost/memory readings,
timing, the child-process protocol that keeps each variant's peak RSS its own,
and Markdown/JSON output. Nothing here is part of the lora_jax package.
"""

from __future__ import annotations

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


# -- models --------------------------------------------------------------------------------------

def lora_config(targets: str, r: int = 8, *, scanned: bool = False, **kw: Any) -> Any:
    """PEFT-style config: ``lora_alpha = 2r``; scanned models stack the layer modules."""
    import lora_jax

    extra = dict(stacked_modules=r"model\.layers\..*") if scanned else {}
    return lora_jax.LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS[targets], **extra, **kw)


def jax_model(hf: dict[str, Any], *, abstract: bool = False, scan_layers: bool = False) -> tuple[Any, Any]:
    """``(module, params)``; abstract params are ``ShapeDtypeStruct``s (nothing allocated)."""
    import jax
    import numpy as np

    from lora_jax import models

    if not abstract:
        model = models.from_config(hf, scan_layers=scan_layers)
        return model.module, model.params
    module = models.build_module(hf, scan_layers=scan_layers)
    ids = np.zeros((1, 1), np.int32)
    params = jax.eval_shape(lambda: module.init(jax.random.key(0), ids))["params"]
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


def jax_train_step(kind: str, module: Any, params: Any, config: Any = None, key: Any = None) -> tuple[Callable[..., Any], tuple[Any, ...]]:
    """A jit-compiled AdamW training step and its arguments ``(trainable, opt_state, frozen, ids)``.

    - ``lora``: the adapter trains through ``lora_jax.lora`` (x@W + s(x@A)@B);
    - ``naive``: the adapter trains through ``apply(merge(params, adapter))`` inside the step;
    - ``full``: every parameter trains (full fine-tuning);
    - ``frozen``: only the RMSNorm scales train: every dot is frozen, so this is the
      forward pass plus activation gradients down to the first layer, the least any
      LoRA step can cost (the frozen-base floor).

    The step donates the trainable tree and optimizer state, as a training loop would.
    ``params`` may be abstract (``ShapeDtypeStruct``s): then only lower/compile it.
    """
    import jax
    import optax

    import lora_jax

    optimizer = optax.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY)

    def apply(p: Any, ids: Any) -> Any:
        return module.apply({"params": p}, ids)

    if kind in ("lora", "naive"):
        if isinstance(jax.tree.leaves(params)[0], jax.ShapeDtypeStruct):
            trainable = jax.eval_shape(lambda: lora_jax.init(config, params, jax.random.key(1)))
        else:
            trainable = lora_jax.init(config, params, key if key is not None else jax.random.key(1))
        frozen = params
        if kind == "lora":
            lora_apply = lora_jax.lora(apply, config)

            def loss(adapter: Any, frozen: Any, ids: Any) -> Any:
                return lm_loss(lora_apply(frozen, adapter, ids), ids)
        else:
            def loss(adapter: Any, frozen: Any, ids: Any) -> Any:
                return lm_loss(apply(lora_jax.merge(frozen, adapter, config), ids), ids)
    elif kind == "full":
        trainable, frozen = params, {}

        def loss(p: Any, frozen: Any, ids: Any) -> Any:
            return lm_loss(apply(p, ids), ids)
    elif kind == "frozen":
        mask = jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key == "scale", params)
        trainable, frozen = lora_jax.partition(params, mask)

        def loss(scales: Any, frozen: Any, ids: Any) -> Any:
            return lm_loss(apply(lora_jax.combine(scales, frozen), ids), ids)
    else:
        raise ValueError(f"kind must be one of {JAX_STEP_KINDS}, got {kind!r}")

    def step(trainable: Any, opt_state: Any, frozen: Any, ids: Any) -> tuple[Any, Any, Any]:
        value, grads = jax.value_and_grad(loss)(trainable, frozen, ids)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, value

    if isinstance(jax.tree.leaves(trainable)[0], jax.ShapeDtypeStruct):
        opt_state = jax.eval_shape(optimizer.init, trainable)
    else:
        opt_state = optimizer.init(trainable)
    return jax.jit(step, donate_argnums=(0, 1)), (trainable, opt_state, frozen)


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
    return compiled, {
        "gflops": compiled.cost_analysis()["flops"] / 1e9,
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

def environment() -> dict[str, Any]:
    import jax

    info = {"backend": jax.default_backend(), "jax": jax.__version__, "threads": THREADS,
            "cpu": platform.processor() or platform.machine(), "python": platform.python_version()}
    try:
        info["loadavg_at_start"] = os.getloadavg()[0]
    except OSError:
        pass
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
