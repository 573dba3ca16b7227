"""Mixed-adapter batches: lora_jax vs PyTorch PEFT, prefill and decode, 1 / 4 / 16 adapters.

One frozen base, N distinct LoRA adapters (r=8 on q_proj and v_proj, random A and B), a
batch of 32 rows whose adapters go round-robin over the N (row i uses adapter i mod N):

- prefill: one forward of the 32 x 128 batch, every position's logits;
- decode: greedy generation of 64 new tokens after a 16-token prompt, batch 32, KV cache.

Both sides run the same base weights and the same adapters (made by PEFT, saved in its
format and read by ``lora_jax.load_peft``), in this one process on the same two threads:

- PEFT 0.21: ``model(input_ids, adapter_names=[...])`` and
  ``model.generate(..., adapter_names=[...])`` (a Python loop over sub-batches per layer);
- lora_jax: ``lora_jax.stack_adapters`` + ``lora(apply, stacked.config)(..., adapter_ids=)``
  jit-compiled (base matmul once, thin LoRA matmuls gathered per row), and
  ``lora_jax.models.generate`` with the stacked adapters and ids as arguments;
- references on the lora_jax side: the base model alone and ``lora()`` with one plain
  adapter (no ids): the speed mixed batches must keep.

Every timed call is interleaved round by round (all variants in turn), medians over rounds;
throughput = tokens / median seconds (prefill: 32 x 128 tokens; decode: 32 x 64 new tokens).
Checks: lora_jax's mixed prefill logits match PEFT's (max |diff| recorded), the share of
generated tokens equal to PEFT's, and XLA's FLOPs of the mixed prefill for each N. Issue 15's
targets: prefill at 16 adapters >= 1.4x PEFT's throughput and <= 1.10x lora_jax's
single-adapter time; decode at 16 adapters >= 2x PEFT's tokens/s.

Usage::

    python benchmarks/mixed_batch.py                 # SmolLM2-135M shape: ~15 min on 2 quiet cores
    python benchmarks/mixed_batch.py --layers 10     # the issue's PEFT figure was taken at 10 layers
    python benchmarks/mixed_batch.py --smoke         # tiny shape, seconds
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402

RANK = 8
TARGETS = ["q_proj", "v_proj"]
FULL = dict(size="smollm2-135m", adapters=[1, 4, 16], batch=32, prefill_seq=128, prompt=16, new_tokens=64,
            rounds=3)
SMOKE = dict(size="tiny", adapters=[1, 4], batch=8, prefill_seq=16, prompt=4, new_tokens=4, rounds=1)
PHASES = ("prefill", "decode")


def lora_jax_has_mixed_batches() -> bool:
    """Whether the installed lora_jax runs mixed-adapter batches (``stack_adapters`` + ``adapter_ids=``).

    Example:
        >>> isinstance(lora_jax_has_mixed_batches(), bool)
        True
    """
    import inspect

    import lora_jax

    if not hasattr(lora_jax, "stack_adapters"):
        return False
    fn = lora_jax.lora(lambda p, x: x, lora_jax.LoraConfig(target_modules=["q"]))
    return "adapter_ids" in inspect.signature(fn, follow_wrapped=False).parameters


def row_names(names: list[str], batch: int) -> list[str]:
    """Round-robin adapter names for ``batch`` rows.

    Example:
        >>> row_names(["a", "b"], 5)
        ['a', 'b', 'a', 'b', 'a']
    """
    return [names[i % len(names)] for i in range(batch)]


# -- the shared base and adapters ----------------------------------------------------------------

def build_models(spec: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """PyTorch base + PEFT with every adapter, and the same weights loaded into lora_jax."""
    common.torch_threads()
    import peft
    import torch
    import transformers

    import lora_jax
    from lora_jax import models

    size = common.SIZES[spec["size"]]
    hf = {k: v for k, v in dict(size["hf"], **spec.get("hf_overrides", {})).items() if k != "model_type"}
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf)).eval()
    base_dir = workdir / "base"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base.save_pretrained(base_dir)
    names = [f"adapter{i}" for i in range(max(spec["adapters"]))]
    lora = dict(r=RANK, lora_alpha=2 * RANK, target_modules=TARGETS, lora_dropout=0.0, init_lora_weights=False)
    model = peft.get_peft_model(base, peft.LoraConfig(**lora), adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, peft.LoraConfig(**lora))
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "lora_" in pname:
                p.normal_(0.0, 0.05)  # trained-adapter-like values, so every adapter changes the rows
    adapter_dir = workdir / "adapters"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(adapter_dir, selected_adapters=names)
    model.eval()
    flax_model = models.from_pretrained(base_dir)
    adapters = {name: tuple(lora_jax.load_peft(adapter_dir, flax_model.params, adapter_name=name)) for name in names}
    return {"peft": model, "flax": flax_model, "adapters": adapters, "names": names}


# -- PEFT side -----------------------------------------------------------------------------------

def peft_calls(built: dict[str, Any], spec: dict[str, Any], prefill_ids: Any, prompt: Any,
               n: int) -> dict[str, Callable[[], Any]]:
    """PEFT's mixed-batch prefill and greedy decode with the first ``n`` adapters."""
    import torch

    model = built["peft"]
    rows = row_names(built["names"][:n], spec["batch"])
    ids = torch.as_tensor(prefill_ids, dtype=torch.long)
    prompt_t = torch.as_tensor(prompt, dtype=torch.long)

    def prefill() -> Any:
        with torch.no_grad():
            return model(ids, adapter_names=rows).logits

    def decode() -> Any:
        with torch.no_grad():
            return model.generate(input_ids=prompt_t, attention_mask=torch.ones_like(prompt_t), adapter_names=rows,
                                  max_new_tokens=spec["new_tokens"], min_new_tokens=spec["new_tokens"],
                                  do_sample=False, eos_token_id=None, pad_token_id=0)

    return {"prefill": prefill, "decode": decode}


# -- lora_jax side -------------------------------------------------------------------------------

def lora_jax_mixed_calls(built: dict[str, Any], spec: dict[str, Any], prefill_ids: Any, prompt: Any,
                         n: int) -> tuple[dict[str, Callable[[], Any]], dict[str, Any]]:
    """lora_jax's mixed-batch prefill and decode with the first ``n`` adapters, compiled.

    Raises NotImplementedError if the installed lora_jax has no mixed-adapter batches.
    """
    if not lora_jax_has_mixed_batches():
        raise NotImplementedError("the installed lora_jax has no mixed-adapter batches "
                                  "(lora_jax.stack_adapters and lora(...)(..., adapter_ids=))")
    import jax
    import jax.numpy as jnp

    import lora_jax
    from lora_jax import models

    flax_model = built["flax"]
    module, params = flax_model.module, flax_model.params
    chosen = {name: built["adapters"][name] for name in built["names"][:n]}
    stacked = lora_jax.stack_adapters(chosen, params)
    ids = jnp.asarray(stacked.ids(row_names(list(chosen), spec["batch"])))
    apply = lora_jax.lora(lambda p, x, **kw: module.apply({"params": p}, x, **kw), stacked.config)
    prefill_fn = jax.jit(lambda p, a, x, i: apply(p, a, x, adapter_ids=i))
    x = jnp.asarray(prefill_ids)
    compiled, stats = common.compile_stats(prefill_fn, params, stacked.adapter, x, ids)

    def with_adapters(variables: Any, *args: Any, **kwargs: Any) -> Any:  # adapters and ids are arguments
        v = variables["params"]
        return apply(v["base"], v["adapter"], *args, adapter_ids=v["ids"], **kwargs)

    decode_params = {"base": params, "adapter": stacked.adapter, "ids": ids}
    prompt_j = jnp.asarray(prompt)

    def prefill() -> Any:
        return compiled(params, stacked.adapter, x, ids).block_until_ready()

    def decode() -> Any:
        return models.generate(module, decode_params, prompt_j, max_new_tokens=spec["new_tokens"],
                               apply_fn=with_adapters, stop_token_ids=()).block_until_ready()

    return {"prefill": prefill, "decode": decode}, {"prefill_gflops": stats["gflops"],
                                                    "prefill_compiled_mib": stats["total_mib"]}


def lora_jax_reference_calls(built: dict[str, Any], spec: dict[str, Any], prefill_ids: Any, prompt: Any,
                             ) -> dict[str, tuple[dict[str, Callable[[], Any]], dict[str, Any]]]:
    """The base model alone and ``lora()`` with one plain adapter (no ids), compiled."""
    import jax
    import jax.numpy as jnp

    import lora_jax
    from lora_jax import models

    flax_model = built["flax"]
    module, params = flax_model.module, flax_model.params
    adapter, config = built["adapters"][built["names"][0]]
    apply = lora_jax.lora(lambda p, x, **kw: module.apply({"params": p}, x, **kw), config)
    x, prompt_j = jnp.asarray(prefill_ids), jnp.asarray(prompt)
    out = {}
    base_prefill, base_stats = common.compile_stats(jax.jit(lambda p, x: module.apply({"params": p}, x)), params, x)
    single_prefill, single_stats = common.compile_stats(jax.jit(apply), params, adapter, x)

    def with_adapter(variables: Any, *args: Any, **kwargs: Any) -> Any:
        v = variables["params"]
        return apply(v["base"], v["adapter"], *args, **kwargs)

    out["base"] = ({"prefill": lambda: base_prefill(params, x).block_until_ready(),
                    "decode": lambda: models.generate(module, params, prompt_j, max_new_tokens=spec["new_tokens"],
                                                      stop_token_ids=()).block_until_ready()},
                   {"prefill_gflops": base_stats["gflops"], "prefill_compiled_mib": base_stats["total_mib"]})
    out["single"] = ({"prefill": lambda: single_prefill(params, adapter, x).block_until_ready(),
                      "decode": lambda: models.generate(module, {"base": params, "adapter": adapter}, prompt_j,
                                                        max_new_tokens=spec["new_tokens"], apply_fn=with_adapter,
                                                        stop_token_ids=()).block_until_ready()},
                     {"prefill_gflops": single_stats["gflops"], "prefill_compiled_mib": single_stats["total_mib"]})
    return out


# -- the run ---------------------------------------------------------------------------------------

def check_against_peft(calls: dict[str, dict[str, Callable[[], Any]]], ns: list[int]) -> dict[str, Any]:
    """lora_jax's mixed prefill logits and greedy tokens against PEFT's, for each N."""
    import numpy as np

    checks: dict[str, Any] = {}
    for n in ns:
        ours, theirs = f"lora_jax_mixed_{n}", f"peft_mixed_{n}"
        if ours not in calls:
            continue
        got = np.asarray(calls[ours]["prefill"]())
        expected = calls[theirs]["prefill"]().numpy()
        tokens = np.asarray(calls[ours]["decode"]())
        expected_tokens = calls[theirs]["decode"]().numpy()
        checks[str(n)] = {"prefill_max_abs_diff": float(np.max(np.abs(got - expected))),
                          "logit_scale": float(np.max(np.abs(expected))),
                          "decode_tokens_equal_fraction": float(np.mean(tokens == expected_tokens))}
    return checks


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    size = common.SIZES[spec["size"]]
    vocab = size["hf"]["vocab_size"]
    rng = np.random.default_rng(0)
    prefill_ids = rng.integers(0, vocab, (spec["batch"], spec["prefill_seq"]), dtype=np.int32)
    prompt = rng.integers(0, vocab, (spec["batch"], spec["prompt"]), dtype=np.int32)
    with tempfile.TemporaryDirectory() as tmp:
        built = build_models(spec, Path(tmp))
    calls: dict[str, dict[str, Callable[[], Any]]] = {}
    stats: dict[str, dict[str, Any]] = {}
    variants: dict[str, dict[str, Any]] = {}
    has_mixed = lora_jax_has_mixed_batches()
    if has_mixed:
        for name, (c, s) in lora_jax_reference_calls(built, spec, prefill_ids, prompt).items():
            key = f"lora_jax_{name}"
            calls[key], stats[key] = c, s
            variants[key] = {"framework": "lora_jax", "adapters": 0 if name == "base" else 1, "mixed": False}
    for n in spec["adapters"]:
        if has_mixed:
            key = f"lora_jax_mixed_{n}"
            calls[key], stats[key] = lora_jax_mixed_calls(built, spec, prefill_ids, prompt, n)
            variants[key] = {"framework": "lora_jax", "adapters": n, "mixed": True}
        key = f"peft_mixed_{n}"
        calls[key], stats[key] = peft_calls(built, spec, prefill_ids, prompt, n), {}
        variants[key] = {"framework": "peft", "adapters": n, "mixed": True}
    checks = check_against_peft(calls, spec["adapters"])  # also the mixed variants' warm-up
    for key, c in calls.items():
        if not key.endswith(tuple(f"_mixed_{n}" for n in checks)):
            for phase in PHASES:
                c[phase]()  # warm-up (the first call compiles)
    times: dict[str, dict[str, list[float]]] = {k: {p: [] for p in PHASES} for k in calls}
    for r in range(spec["rounds"]):
        for phase in PHASES:
            for key, c in calls.items():
                times[key][phase] += common.time_steps(c[phase], 1)
        print(f"[mixed_batch] round {r + 1}/{spec['rounds']} done", file=sys.stderr)

    tokens = {"prefill": spec["batch"] * spec["prefill_seq"], "decode": spec["batch"] * spec["new_tokens"]}
    rows = []
    for key in calls:
        row: dict[str, Any] = {"variant": key, **variants[key], **stats[key]}
        for phase in PHASES:
            seconds = common.median(times[key][phase])
            row[f"{phase}_times_s"] = times[key][phase]
            row[f"{phase}_s"] = seconds
            row[f"{phase}_tokens_per_s"] = tokens[phase] / seconds
        rows.append(row)
    by_key = {r["variant"]: r for r in rows}

    def paired(a: str, b: str, phase: str) -> float:
        return common.median([x / y for x, y in zip(by_key[a][f"{phase}_times_s"], by_key[b][f"{phase}_times_s"])])

    for n in spec["adapters"]:
        ours, theirs = by_key.get(f"lora_jax_mixed_{n}"), by_key[f"peft_mixed_{n}"]
        if ours is None:
            continue
        for phase in PHASES:
            # throughput ratio = PEFT's time / ours, paired by round
            ours[f"{phase}_throughput_vs_peft"] = 1.0 / paired(ours["variant"], theirs["variant"], phase)
            ours[f"{phase}_time_vs_single"] = paired(ours["variant"], "lora_jax_single", phase)
            ours[f"{phase}_time_vs_base"] = paired(ours["variant"], "lora_jax_base", phase)
    top = max(spec["adapters"])
    mixed_top = by_key.get(f"lora_jax_mixed_{top}", {})
    required = top == 16 and spec["size"] == "smollm2-135m"
    targets = [
        common.target(f"prefill throughput at {top} adapters / PEFT's", mixed_top.get("prefill_throughput_vs_peft"),
                      ">=", 1.4, required=required),
        common.target(f"prefill time at {top} adapters / lora_jax single adapter", mixed_top.get("prefill_time_vs_single"),
                      "<=", 1.10, required=required),
        common.target(f"decode tokens/s at {top} adapters / PEFT's", mixed_top.get("decode_throughput_vs_peft"),
                      ">=", 2.0, required=required),
    ]
    return {"rows": rows, "checks": checks, "targets": targets, "lora_jax_mixed_batches": has_mixed,
            "attn_implementation": built["peft"].config._attn_implementation}


def table(rows: list[dict[str, Any]], spec: dict[str, Any]) -> str:
    f = common.fmt
    headers = ["variant", "adapters", f"prefill s ({spec['batch']} x {spec['prefill_seq']})", "prefill tokens/s",
               "prefill vs PEFT (throughput)", "prefill / single adapter",
               f"decode s ({spec['new_tokens']} tokens)", "decode tokens/s", "decode vs PEFT (throughput)",
               "prefill GFLOP"]
    body = [[r["variant"], r["adapters"], f(r["prefill_s"], 3), f(r["prefill_tokens_per_s"], 0),
             f(r.get("prefill_throughput_vs_peft")), f(r.get("prefill_time_vs_single")), f(r["decode_s"], 3),
             f(r["decode_tokens_per_s"], 0), f(r.get("decode_throughput_vs_peft")), f(r.get("prefill_gflops"), 3)]
            for r in rows]
    return common.markdown_table(headers, body)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shape, two adapter counts (seconds)")
    parser.add_argument("--out-dir", type=Path, default=common.RESULTS, help="where JSON and PNG go")
    parser.add_argument("--layers", type=int, default=None, help="number of layers (default: the shape's)")
    parser.add_argument("--adapters", type=int, nargs="+", default=None, help="adapter counts (default 1 4 16)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    common.limit_threads()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    spec = dict(SMOKE if args.smoke else FULL)
    if args.layers:
        spec["hf_overrides"] = {"num_hidden_layers": args.layers}
    if args.adapters:
        spec["adapters"] = sorted(set(args.adapters))
    if args.rounds:
        spec["rounds"] = args.rounds
    result = measure(spec)
    stem = "mixed_batch_smoke" if args.smoke else "mixed_batch"
    shape = dict(common.SIZES[spec["size"]]["hf"], **spec.get("hf_overrides", {}))
    payload = {"environment": common.environment(), "smoke": args.smoke, "size": spec["size"], "shape": shape,
               "rank": RANK, "targets_modules": TARGETS, "spec": spec, **result,
               "runtime_s": time.perf_counter() - started}
    common.write_json(args.out_dir / f"{stem}.json", payload)
    if not args.no_plot:
        import plots

        plots.mixed_batch(result["rows"], result["targets"], args.out_dir / f"{stem}.png")
    print(f"**{spec['size']}** ({shape['num_hidden_layers']} layers), r={RANK} on q,v, {common.THREADS} threads, "
          f"median of {spec['rounds']} round(s):\n")
    print(table(result["rows"], spec))
    if not result["lora_jax_mixed_batches"]:
        print("\nlora_jax side not measured: the installed lora_jax has no mixed-adapter batches.")
    print("\nChecks against PEFT: " + ", ".join(
        f"{n} adapters: prefill max |diff| {c['prefill_max_abs_diff']:.1e} (logit scale {c['logit_scale']:.1f}), "
        f"decode tokens equal {100 * c['decode_tokens_equal_fraction']:.0f}%" for n, c in result["checks"].items()))
    print("\nTargets (issue 15):\n\n" + common.targets_table(result["targets"]))
    print(f"\nwrote {args.out_dir / (stem + '.json')} in {payload['runtime_s']:.0f} s")
    return payload


if __name__ == "__main__":
    main()
