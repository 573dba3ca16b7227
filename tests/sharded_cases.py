"""Sharding cases on 8 simulated CPU devices.

Not collected by a plain ``pytest`` run (the name does not start with
``test_``): the device count must be fixed before jax is imported, so
``test_sharding.py`` runs this file in a subprocess::

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m pytest tests/sharded_cases.py
"""

from __future__ import annotations

import os

# 8 CPU devices; LLVM optimisation off cuts compile time ~4x (the HLO, and so the
# sharding and the numerics, are unchanged).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0").strip()

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import NamedSharding, SingleDeviceSharding  # noqa: E402
from jax.sharding import PartitionSpec as P

sys.path.insert(0, str(Path(__file__).parent))
import sharding_model as tiny  # noqa: E402

import lora_jax  # noqa: E402
from lora_jax import sharding  # noqa: E402

if jax.device_count() != 8:
    pytest.skip("needs 8 devices: jax was imported before XLA_FLAGS was set", allow_module_level=True)

STEPS = 3
MODELS = {"dense": tiny.TinyConfig(scan=False), "scanned": tiny.TinyConfig(scan=True)}
# (model, strategy, (data, model)): DP, FSDP, pure TP (4 heads do not split 8 ways, so the
# attention kernels fall back to replicated there) and DP x TP for both models; FSDP x TP
# for the scanned one.
LAYOUTS = [(model, strategy, shape) for model in MODELS
           for strategy, shape in [("dp", (8, 1)), ("fsdp", (8, 1)), ("tp", (1, 8)), ("tp", (2, 4))]]
LAYOUTS.append(("scanned", "fsdp_tp", (2, 4)))

_reference: dict[str, tuple[list[float], dict]] = {}
_trained: dict[tuple, tuple] = {}


def reference(model: str) -> tuple[list[float], dict]:
    if model not in _reference:
        _reference[model] = tiny.train_one_device(MODELS[model], STEPS)
    return _reference[model]


def train_sharded(model: str, strategy: str, mesh_shape: tuple[int, int]):
    """``(losses, adapter, params, opt_state, shardings)`` after STEPS sharded steps (cached)."""
    key = (model, strategy, mesh_shape)
    if key not in _trained:
        _trained[key] = _train_sharded(MODELS[model], strategy, mesh_shape)
    return _trained[key]


def _train_sharded(cfg: tiny.TinyConfig, strategy: str, mesh_shape: tuple[int, int]):
    mesh = sharding.make_mesh(*mesh_shape)
    config = tiny.lora_config(cfg)
    params, adapter = tiny.setup(cfg)
    tx = tiny.optimizer()
    shardings = sharding.train_shardings(config, params, tx, mesh, strategy)
    params, adapter, opt_state = sharding.shard_train_state(config, params, tx, shardings,
                                                            adapter=adapter)
    step = sharding.make_sharded_step(tiny.make_loss(cfg), tx, shardings)
    losses = []
    for i in range(STEPS):
        batch = sharding.shard_batch(tiny.batch(cfg, seed=i), shardings.batch)
        adapter, opt_state, loss = step(params, adapter, opt_state, batch)
        losses.append(float(loss))
    return losses, adapter, params, opt_state, shardings


def assert_adapters_close(got: dict, want: dict, atol: float = 1e-5) -> None:
    assert set(got) == set(want)
    for name in want:
        for key in ("lora_A", "lora_B"):
            np.testing.assert_allclose(np.asarray(got[name][key]), want[name][key], atol=atol,
                                       rtol=1e-5, err_msg=f"{name}.{key}")


@pytest.mark.parametrize("model,strategy,mesh_shape", LAYOUTS,
                         ids=[f"{m}-{s}-{d}x{t}" for m, s, (d, t) in LAYOUTS])
def test_sharded_steps_match_one_device(model, strategy, mesh_shape):
    want_losses, want_adapter = reference(model)
    losses, adapter, params, opt_state, _ = train_sharded(model, strategy, mesh_shape)
    np.testing.assert_allclose(losses, want_losses, atol=1e-5, rtol=1e-5)
    assert_adapters_close(adapter, want_adapter)

    # The layouts really are the ones asked for.
    prefix = "model.layers." if model == "scanned" else "model.layers.0."
    q = prefix + "self_attn.q_proj"
    path = ("params", "model", "layers") + (() if model == "scanned" else ("0",))
    q_kernel = params
    for key in path + ("self_attn", "q_proj", "kernel"):
        q_kernel = q_kernel[key]
    b_spec = adapter[q]["lora_B"].sharding.spec
    if strategy == "dp":
        assert q_kernel.sharding.is_fully_replicated
    if strategy == "fsdp":  # (dim, heads, head_dim): dim=32 is the largest axis that 8 divides
        lead = (None,) if model == "scanned" else ()
        assert tuple(q_kernel.sharding.spec) == lead + ("data", None, None)
    if strategy in ("tp", "fsdp_tp") and mesh_shape[1] == 4:  # heads split over 'model'
        assert "model" in tuple(b_spec)
        assert tuple(b_spec)[-3] is None  # the rank axis of B stays whole
    # Adam's moments follow the adapter.
    mu = opt_state[1][0].mu[q]["lora_B"]
    assert mu.sharding == adapter[q]["lora_B"].sharding


def _param_bytes_per_device(tree) -> int:
    per_device: dict = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    return max(per_device.values())


@pytest.mark.parametrize("model", list(MODELS))
def test_fsdp_param_bytes_per_device_fall_as_one_over_n(model):
    cfg = MODELS[model]
    params, _ = tiny.setup(cfg)
    total = sum(x.nbytes for x in jax.tree.leaves(params))
    config = tiny.lora_config(cfg)
    for n in (1, 2, 4, 8):
        mesh = sharding.make_mesh(n, 1, devices=jax.devices()[:n])
        placed = sharding.shard(params, sharding.param_shardings(params, mesh, "fsdp", config=config))
        assert _param_bytes_per_device(placed) == total // n, n


def test_fresh_adapter_is_created_in_its_shards_with_the_same_values():
    cfg = MODELS["scanned"]
    config = tiny.lora_config(cfg)
    params, _ = tiny.setup(cfg)
    tx = tiny.optimizer()
    shardings = sharding.train_shardings(config, params, tx, sharding.make_mesh(2, 4), "fsdp_tp")
    _, adapter, opt_state = sharding.shard_train_state(config, params, tx, shardings,
                                                       key=jax.random.key(3))
    want = jax.jit(lambda k: lora_jax.init(config, params, k))(jax.random.key(3))
    for name in want:
        for key in ("lora_A", "lora_B"):
            assert adapter[name][key].sharding == shardings.adapter[name][key]
            np.testing.assert_array_equal(np.asarray(adapter[name][key]), np.asarray(want[name][key]))
    assert opt_state[1][0].count.sharding.is_fully_replicated


@pytest.mark.parametrize("model", list(MODELS))
def test_sharded_merge_keeps_kernel_sharding_and_equals_host_merge(model):
    cfg = MODELS[model]
    config = tiny.lora_config(cfg)
    params, adapter = tiny.setup(cfg)
    want = lora_jax.merge(params, adapter, config)
    mesh = sharding.make_mesh(2, 4)
    p_shardings = sharding.param_shardings(params, mesh, "fsdp_tp", config=config)
    placed = sharding.shard(params, p_shardings)
    placed_adapter = sharding.shard(adapter, sharding.adapter_shardings(config, params, p_shardings))
    merged = sharding.sharded_merge(placed, placed_adapter, config)
    for got, want_leaf, s in zip(jax.tree.leaves(merged), jax.tree.leaves(want),
                                 jax.tree.leaves(p_shardings)):
        assert got.sharding == s
        np.testing.assert_allclose(np.asarray(got), np.asarray(want_leaf), atol=1e-6)


def test_sharded_eval_and_greedy_generation_match_one_device():
    cfg = MODELS["scanned"]
    config = tiny.lora_config(cfg)
    params, adapter = tiny.setup(cfg)
    prompt = tiny.batch(cfg)["input_ids"][:, :4]
    apply = lora_jax.lora(tiny.apply, config)

    def generate(forward, params, adapter, ids, new_tokens=3):
        for _ in range(new_tokens):  # no KV cache: re-run the prefix, it is a test
            logits = forward(params, adapter, ids)
            ids = np.concatenate([ids, np.asarray(logits[:, -1].argmax(-1))[:, None]], axis=1)
        return ids, logits

    want_ids, want_logits = generate(jax.jit(apply), params, adapter, prompt)

    mesh = sharding.make_mesh(2, 4)
    s = sharding.train_shardings(config, params, tiny.optimizer(), mesh, "fsdp_tp")
    placed, placed_adapter, _ = sharding.shard_train_state(config, params, tiny.optimizer(), s,
                                                           adapter=adapter)
    # Sharded eval is the jitted apply with the training layouts.
    sharded_apply = jax.jit(apply, in_shardings=(s.params, s.adapter, s.batch),
                            out_shardings=s.batch)
    got_ids, got_logits = generate(sharded_apply, placed, placed_adapter, prompt)
    np.testing.assert_array_equal(got_ids, want_ids)
    np.testing.assert_allclose(np.asarray(got_logits), np.asarray(want_logits), atol=1e-5)

    # And the merged model gives the same logits with the plain apply.
    merged = sharding.sharded_merge(placed, placed_adapter, config)
    plain = jax.jit(tiny.apply, in_shardings=(s.params, s.batch), out_shardings=s.batch)
    np.testing.assert_allclose(np.asarray(plain(merged, want_ids[:, :-1])), np.asarray(want_logits),
                               atol=1e-4)


def test_checkpoint_saved_on_2x4_restores_on_8x1_and_on_one_device(tmp_path):
    cfg = MODELS["scanned"]
    config = tiny.lora_config(cfg)
    _, adapter, params, opt_state, _ = train_sharded("scanned", "fsdp_tp", (2, 4))
    state = {"params": params, "adapter": adapter, "opt_state": opt_state}
    want = jax.tree.map(np.asarray, state)
    sharding.save_sharded(tmp_path / "ckpt", state)

    # Onto a (8, 1) FSDP mesh: params by a fresh layout of the checkpoint's shapes,
    # adapter and optimizer state through train_shardings.
    mesh = sharding.make_mesh(8, 1)
    shapes = sharding.checkpoint_shapes(tmp_path / "ckpt")
    s = sharding.train_shardings(config, shapes["params"], tiny.optimizer(), mesh, "fsdp")
    target = {"params": s.params, "adapter": s.adapter, "opt_state": s.opt_state}
    restored = sharding.restore_sharded(tmp_path / "ckpt", target)
    for got, exp, want_sharding in zip(jax.tree.leaves(restored), jax.tree.leaves(want),
                                       jax.tree.leaves(target)):
        assert got.sharding == want_sharding
        np.testing.assert_array_equal(np.asarray(got), exp)
    kernel = restored["params"]["params"]["model"]["layers"]["mlp"]["up_proj"]["kernel"]
    assert tuple(kernel.sharding.spec) == (None, None, "data")  # (layers, 32, 64)

    # Onto one device.
    one = SingleDeviceSharding(jax.devices()[0])
    restored = sharding.restore_sharded(tmp_path / "ckpt", one)
    for got, exp in zip(jax.tree.leaves(restored["params"]), jax.tree.leaves(want["params"])):
        assert got.sharding == one
        np.testing.assert_array_equal(np.asarray(got), exp)
    for name in want["adapter"]:
        for key in ("lora_A", "lora_B"):
            np.testing.assert_array_equal(np.asarray(restored["adapter"][name][key]),
                                          want["adapter"][name][key])


def test_user_rules_override_the_preset_on_a_real_mesh():
    cfg = MODELS["dense"]
    config = tiny.lora_config(cfg)
    params, adapter = tiny.setup(cfg)
    mesh = sharding.make_mesh(2, 4)
    rules = [(r"mlp\.(gate|up)_proj\.kernel$", P("model", "data"))]
    s = sharding.train_shardings(config, params, tiny.optimizer(), mesh, "fsdp", rules)
    up = s.params["params"]["model"]["layers"]["0"]["mlp"]["up_proj"]["kernel"]
    assert up == NamedSharding(mesh, P("model", "data"))
    assert s.adapter["model.layers.0.mlp.up_proj"]["lora_A"].spec == P("model", None)
    assert s.adapter["model.layers.0.mlp.up_proj"]["lora_B"].spec == P(None, "data")
    placed, placed_adapter, opt_state = sharding.shard_train_state(
        config, params, tiny.optimizer(), s, adapter=adapter)
    step = sharding.make_sharded_step(tiny.make_loss(cfg), tiny.optimizer(), s)
    _, _, loss = step(placed, placed_adapter, opt_state, sharding.shard_batch(tiny.batch(cfg), s.batch))
    np.testing.assert_allclose(float(loss), reference("dense")[0][0], atol=1e-5, rtol=1e-5)
