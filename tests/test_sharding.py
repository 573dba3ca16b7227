"""lora_jax.sharding: layout rules here (shapes only), multi-device runs in subprocesses.

The rules are checked on ``AbstractMesh``es, which need no devices. Runs that
need 8 devices or 2 processes start a fresh Python, because the device count
is fixed when jax is first imported (and this process imported it already):

- ``sharded_cases.py``: DP / FSDP / TP / DP x TP / FSDP x TP steps against one
  device, FSDP bytes per device, sharded merge, eval and generation,
  checkpoints across mesh shapes;
- ``multihost_worker.py``: two processes joined by ``jax.distributed``;
- ``benchmarks/sharding_memory.py --smoke``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from jax.sharding import AbstractMesh, AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

sys.path.insert(0, str(Path(__file__).parent))
import sharding_model as tiny  # noqa: E402

import lora_jax  # noqa: E402
from lora_jax import sharding  # noqa: E402

TESTS = Path(__file__).parent
ROOT = TESTS.parent


def abstract_mesh(data: int, model: int) -> AbstractMesh:
    return AbstractMesh((data, model), ("data", "model"), axis_types=(AxisType.Auto,) * 2)


def shapes(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), tree)


def llama_like(vocab=128, dim=64, ffn=256, layers=None):
    """A 2-D-kernel Llama tree (``layers`` set: stacked with that many layers)."""
    lead = () if layers is None else (layers,)

    def leaf(*dims):
        return jax.ShapeDtypeStruct(lead + dims, np.float32)

    layer = {
        "input_layernorm": {"scale": leaf(dim)},
        "self_attn": {"q_proj": {"kernel": leaf(dim, dim), "bias": leaf(dim)},
                      "k_proj": {"kernel": leaf(dim, dim // 2)},
                      "v_proj": {"kernel": leaf(dim, dim // 2)},
                      "o_proj": {"kernel": leaf(dim, dim), "bias": leaf(dim)}},
        "mlp": {"gate_proj": {"kernel": leaf(dim, ffn)}, "up_proj": {"kernel": leaf(dim, ffn)},
                "down_proj": {"kernel": leaf(ffn, dim)}},
    }
    return {"params": {
        "model": {"embed_tokens": {"embedding": jax.ShapeDtypeStruct((vocab, dim), np.float32)},
                  "layers": layer if layers is not None else {"0": layer},
                  "norm": {"scale": jax.ShapeDtypeStruct((dim,), np.float32)}},
        "lm_head": {"kernel": jax.ShapeDtypeStruct((dim, vocab), np.float32)},
    }}


def layer_specs(specs, stacked=False):
    layers = specs["params"]["model"]["layers"]
    return layers if stacked else layers["0"]


# -- presets ---------------------------------------------------------------------------------

def test_dp_replicates_every_leaf():
    specs = sharding.param_specs(llama_like(), abstract_mesh(8, 1), "dp")
    assert all(spec == P() or all(e is None for e in spec)
               for spec in jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P)))


def test_fsdp_splits_the_largest_divisible_axis_and_keeps_the_layer_axis_whole():
    params = llama_like(layers=16)
    config = lora_jax.LoraConfig(target_modules=["q_proj"], stacked_modules=r"model\.layers\..*")
    specs = sharding.param_specs(params, abstract_mesh(8, 1), "fsdp", config=config)
    layer = layer_specs(specs, stacked=True)
    # (16 layers, 64, 256): the layer axis (16, divisible by 8) is not a candidate.
    assert layer["mlp"]["up_proj"]["kernel"] == P(None, None, "data")
    assert layer["mlp"]["down_proj"]["kernel"] == P(None, "data", None)
    assert layer["self_attn"]["q_proj"]["kernel"] == P(None, "data", None)  # first of equals
    assert layer["input_layernorm"]["scale"] == P(None, "data")
    assert specs["params"]["model"]["embed_tokens"]["embedding"] == P("data", None)


def test_fsdp_replicates_a_leaf_with_no_divisible_axis():
    params = {"params": {"head": {"kernel": jax.ShapeDtypeStruct((7, 50257), np.float32)},
                         "scale": jax.ShapeDtypeStruct((), np.float32)}}
    specs = sharding.param_specs(params, abstract_mesh(8, 1), "fsdp")
    assert specs["params"]["head"]["kernel"] == P(None, None)
    assert specs["params"]["scale"] == P()


def test_tp_splits_column_outputs_row_inputs_vocab_and_column_biases():
    specs = sharding.param_specs(llama_like(), abstract_mesh(1, 4), "tp")
    layer = layer_specs(specs)
    for name in ("q_proj", "k_proj", "v_proj"):
        assert layer["self_attn"][name]["kernel"] == P(None, "model"), name
    assert layer["self_attn"]["q_proj"]["bias"] == P("model")
    assert layer["self_attn"]["o_proj"]["kernel"] == P("model", None)
    assert layer["self_attn"]["o_proj"]["bias"] == P(None)  # added after the all-reduce
    assert layer["mlp"]["gate_proj"]["kernel"] == P(None, "model")
    assert layer["mlp"]["down_proj"]["kernel"] == P("model", None)
    assert layer["input_layernorm"]["scale"] == P(None)
    assert specs["params"]["model"]["embed_tokens"]["embedding"] == P("model", None)
    assert specs["params"]["lm_head"]["kernel"] == P(None, "model")


def test_tp_uses_in_axes_for_nd_kernels_and_skips_axes_it_cannot_divide():
    cfg = tiny.TinyConfig()  # q (32, 4 heads, 8), o (4 heads, 8, 32) with in_axes o_proj=2
    params = shapes(tiny.init_params(cfg))
    config = tiny.lora_config(cfg)
    layer = layer_specs(sharding.param_specs(params, abstract_mesh(1, 4), "tp", config=config))
    assert layer["self_attn"]["q_proj"]["kernel"] == P(None, "model", None)
    assert layer["self_attn"]["q_proj"]["bias"] == P("model", None)
    assert layer["self_attn"]["o_proj"]["kernel"] == P("model", None, None)
    # 8-way: 4 heads do not split, so head_dim (8) takes the model axis instead.
    layer = layer_specs(sharding.param_specs(params, abstract_mesh(1, 8), "tp", config=config))
    assert layer["self_attn"]["q_proj"]["kernel"] == P(None, None, "model")
    assert layer["self_attn"]["o_proj"]["kernel"] == P(None, "model", None)
    # A vocabulary no mesh axis divides (GPT-2's 50257) stays whole.
    head = {"params": {"lm_head": {"kernel": jax.ShapeDtypeStruct((768, 50257), np.float32)}}}
    assert sharding.param_specs(head, abstract_mesh(1, 8), "tp")["params"]["lm_head"]["kernel"] == P(None, None)


def test_fsdp_tp_puts_data_on_the_axis_tensor_parallelism_left():
    config = lora_jax.LoraConfig(target_modules=["q_proj"], stacked_modules=r"model\.layers\..*")
    specs = sharding.param_specs(llama_like(layers=4), abstract_mesh(2, 4), "fsdp_tp", config=config)
    layer = layer_specs(specs, stacked=True)
    assert layer["self_attn"]["q_proj"]["kernel"] == P(None, "data", "model")
    assert layer["self_attn"]["o_proj"]["kernel"] == P(None, "model", "data")
    assert layer["mlp"]["up_proj"]["kernel"] == P(None, "data", "model")
    assert layer["input_layernorm"]["scale"] == P(None, "data")


def test_fsdp_over_a_tuple_of_data_axes():
    mesh = AbstractMesh((2, 4), ("replica", "data"), axis_types=(AxisType.Auto,) * 2)
    specs = sharding.param_specs(llama_like(), mesh, "fsdp", data_axis=("replica", "data"))
    assert layer_specs(specs)["mlp"]["up_proj"]["kernel"] == P(None, ("replica", "data"))


# -- rules and errors --------------------------------------------------------------------------

def test_user_rules_come_first_and_match_module_dot_leaf():
    rules = [(r"mlp\.up_proj\.kernel$", P("model", None)), (r"embed_tokens", P(None, "model"))]
    specs = sharding.param_specs(llama_like(), abstract_mesh(2, 4), "fsdp", rules)
    layer = layer_specs(specs)
    assert layer["mlp"]["up_proj"]["kernel"] == P("model", None)
    assert layer["mlp"]["gate_proj"]["kernel"] == P(None, "data")  # the preset
    assert specs["params"]["model"]["embed_tokens"]["embedding"] == P(None, "model")


def test_a_rule_longer_than_the_leaf_names_the_leaf_and_both_shapes():
    rules = [(r"q_proj", P(None, "model"))]  # also matches the 1-D q_proj.bias
    with pytest.raises(ValueError) as err:
        sharding.param_specs(llama_like(), abstract_mesh(1, 4), "tp", rules)
    message = str(err.value)
    assert "model.layers.0.self_attn.q_proj.bias" in message
    assert "(64,)" in message and "2 entries" in message and "'q_proj'" in message


def test_a_rule_naming_an_unknown_or_repeated_mesh_axis_raises():
    with pytest.raises(ValueError, match="names mesh axes \\['tensor'\\]"):
        sharding.param_specs(llama_like(), abstract_mesh(2, 4), "dp", [(r"kernel$", P("tensor"))])
    with pytest.raises(ValueError, match="twice"):
        sharding.param_specs(llama_like(), abstract_mesh(2, 4), "dp",
                             [(r"kernel$", P("data", "data"))])


def test_a_rule_axis_the_mesh_does_not_divide_is_replicated_with_a_warning():
    rules = [(r"lm_head\.kernel$", P("model", "data"))]  # (64, 128) on model=3: 64 % 3 != 0
    mesh = AbstractMesh((2, 3), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    with pytest.warns(UserWarning, match="lm_head.kernel"):
        specs = sharding.param_specs(llama_like(), mesh, "dp", rules)
    assert specs["params"]["lm_head"]["kernel"] == P(None, "data")


def test_unknown_strategy_and_missing_mesh_axes_raise_clearly():
    with pytest.raises(ValueError, match="Unknown sharding strategy 'zero3'"):
        sharding.param_specs(llama_like(), abstract_mesh(8, 1), "zero3")
    mesh = AbstractMesh((8,), ("batch",), axis_types=(AxisType.Auto,))
    with pytest.raises(ValueError, match=r"needs mesh axes \('model',\).*data_axis="):
        sharding.param_specs(llama_like(), mesh, "tp")
    assert sharding.param_specs(llama_like(), mesh, "fsdp", data_axis="batch")


# -- the adapter and optimizer state follow the kernels -----------------------------------------------

def test_adapter_specs_take_lead_and_input_axes_for_a_and_lead_and_output_axes_for_b():
    cfg = tiny.TinyConfig(scan=True)  # stacked (layers, ...) kernels, N-D attention
    params = shapes(tiny.init_params(cfg))
    config = tiny.lora_config(cfg)
    specs = {"params": jax.tree.map(lambda _: P(), params["params"])}
    layers = specs["params"]["model"]["layers"]
    layers["self_attn"]["q_proj"]["kernel"] = P("x", "data", "model", None)  # (L, d, h, hd)
    layers["self_attn"]["o_proj"]["kernel"] = P("x", "model", None, "data")  # (L, h, hd, d)
    layers["mlp"]["down_proj"]["kernel"] = P(None, "model")                  # short spec
    specs["params"]["model"]["embed_tokens"]["embedding"] = P("model", "data")
    out = sharding.adapter_shardings(config, params, specs)
    assert out["model.layers.self_attn.q_proj"] == {"lora_A": P("x", "data", None),
                                                    "lora_B": P("x", None, "model", None)}
    assert out["model.layers.self_attn.o_proj"] == {"lora_A": P("x", "model", None, None),
                                                    "lora_B": P("x", None, "data")}
    assert out["model.layers.mlp.down_proj"] == {"lora_A": P(None, "model", None),
                                                 "lora_B": P(None, None, None)}
    assert out["model.embed_tokens"] == {"lora_A": P("model", None), "lora_B": P(None, "data")}
    # Every adapter leaf got a spec of its own rank.
    adapter = jax.eval_shape(lambda: lora_jax.init(config, params, jax.random.key(0)))
    for name, pair in adapter.items():
        for key, leaf in pair.items():
            assert len(out[name][key]) == leaf.ndim, (name, key)


def test_adapter_shardings_default_to_the_placed_params_own():
    params = {"params": {"dense": {"kernel": np.ones((8, 4), np.float32)}}}
    config = lora_jax.LoraConfig(r=2, target_modules=["dense"])
    mesh = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
    placed = sharding.shard(params, NamedSharding(mesh, P("data", "model")))
    out = sharding.adapter_shardings(config, placed)
    assert out["dense"]["lora_A"] == NamedSharding(mesh, P("data", None))
    assert out["dense"]["lora_B"] == NamedSharding(mesh, P(None, "model"))


def test_optimizer_state_follows_the_adapter_and_counts_are_replicated():
    adapter = {"m.q": {"lora_A": jax.ShapeDtypeStruct((64, 4), np.float32),
                       "lora_B": jax.ShapeDtypeStruct((4, 64), np.float32)}}
    specs = {"m.q": {"lora_A": P("data", None), "lora_B": P(None, "model")}}
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    out = sharding.optimizer_shardings(tx, adapter, specs)
    adam = out[1][0]
    assert adam.mu == specs and adam.nu == specs
    assert adam.count == P()


def test_a_mesh_with_explicit_axes_is_refused_with_the_fix():
    mesh = AbstractMesh((1, 1), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    with pytest.raises(ValueError, match="AxisType.Auto"):
        sharding.param_shardings(llama_like(), mesh, "fsdp")


def test_make_mesh_has_auto_axes_and_checks_the_device_count():
    mesh = sharding.make_mesh()
    assert mesh.shape == {"data": jax.device_count(), "model": 1}
    assert all(t == AxisType.Auto for t in mesh.axis_types)
    with pytest.raises(ValueError, match="needs"):
        sharding.make_mesh(data=jax.device_count() + 1, model=1)


# -- multi-device and multi-process runs ----------------------------------------------------------

def _run(args, timeout, env_extra=None, cwd=ROOT):
    env = {**os.environ, **(env_extra or {})}
    try:
        done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"{args} ran past {timeout} s:\n{(err.stdout or '')[-4000:]}")
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    return output


def test_sharded_cases_on_8_simulated_devices():
    """DP, FSDP, TP, DP x TP, FSDP x TP vs one device; FSDP bytes; merge; eval; checkpoints."""
    output = _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                   str(TESTS / "sharded_cases.py")], timeout=900,
                  env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    assert " passed" in output and "skipped" not in output, output[-3000:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_like_one_device(tmp_path):
    port = _free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_backend_optimization_level=0"}
    logs = [open(tmp_path / f"process{i}.log", "w") for i in range(2)]
    procs = [subprocess.Popen(
        [sys.executable, str(TESTS / "multihost_worker.py"), "--process-id", str(i),
         "--num-processes", "2", "--port", str(port), "--out", str(tmp_path)],
        stdout=logs[i], stderr=subprocess.STDOUT, env=env) for i in range(2)]
    try:
        for proc in procs:
            proc.wait(timeout=240)
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for log in logs:
            log.close()
    text = "\n".join((tmp_path / f"process{i}.log").read_text()[-3000:] for i in range(2))
    assert [proc.returncode for proc in procs] == [0, 0], text

    want_losses, want_adapter = tiny.train_one_device(tiny.TinyConfig(scan=True), steps=3)
    losses = json.loads((tmp_path / "losses.json").read_text())
    np.testing.assert_allclose(losses, want_losses, atol=1e-5, rtol=1e-5)
    got = np.load(tmp_path / "adapter.npz")
    for name, pair in want_adapter.items():
        for key, value in pair.items():
            np.testing.assert_allclose(got[f"{name}/{key}"], value, atol=1e-5, rtol=1e-5)

    # The checkpoint both processes wrote restores on this single device.
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    restored = sharding.restore_sharded(tmp_path / "adapter_ckpt", one)
    for name, pair in want_adapter.items():
        for key, value in pair.items():
            np.testing.assert_allclose(np.asarray(restored[name][key]), value, atol=1e-5, rtol=1e-5)


def test_sharding_memory_benchmark_smoke(tmp_path):
    out = tmp_path / "smoke.json"
    table = _run([sys.executable, str(ROOT / "benchmarks" / "sharding_memory.py"), "--smoke",
                  "--strategies", "dp", "fsdp", "--out", str(out)], timeout=600,
                 env_extra={"XLA_FLAGS": "--xla_backend_optimization_level=0"})
    assert "| smoke | bfloat16 | fsdp | (8, 1) | lora |" in table
    records = {(r["strategy"], r["mode"]): r for r in json.loads(out.read_text())["records"]}
    assert set(records) == {("dp", "lora"), ("dp", "full"), ("fsdp", "lora"), ("fsdp", "full")}
    args = {key: r["argument_bytes"] for key, r in records.items()}
    assert args[("fsdp", "lora")] < args[("dp", "lora")] / 4  # params split 8 ways
    assert args[("fsdp", "full")] < args[("dp", "full")] / 4
    assert args[("dp", "lora")] < args[("dp", "full")]      # no optimizer state for W


def test_adapter_shardings_cover_dora_magnitudes_token_rows_and_table_copies():
    mesh = AbstractMesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    params = {"embed_tokens": {"embedding": np.zeros((64, 16), np.float32)},
              "q_proj": {"kernel": np.ones((16, 64), np.float32)}, "wpe": {"embedding": np.zeros((8, 16), np.float32)}}
    config = lora_jax.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True, trainable_token_indices=[1, 2],
                                 modules_to_save=["wpe"])
    specs = sharding.param_specs(params, mesh, "tp", config=config)
    out = sharding.adapter_shardings(config, params, specs)
    adapter = lora_jax.init(config, params, jax.random.key(0))
    # one spec per adapter leaf, of the leaf's rank
    assert jax.tree.structure(out, is_leaf=lambda x: isinstance(x, P)) == jax.tree.structure(adapter)
    assert out["q_proj"]["lora_magnitude"] == P("model")            # as the kernel's output axis
    assert out["wpe"]["embedding"] == specs["wpe"]["embedding"]      # the copy is laid out as the table
    assert out["embed_tokens"]["trainable_tokens"] == P()            # a few rows: replicated
