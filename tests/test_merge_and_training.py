"""merge/unmerge against the unmerged apply, and a short training loop that moves only the adapter."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.gelu(nn.Dense(32, name="up")(x))
        x = nn.Dense(32, name="mid")(x)
        return nn.Dense(4, name="classifier")(nn.LayerNorm(name="norm")(x))


def setup(dtype=jnp.float32):
    model = Net()
    x = jax.random.normal(jax.random.key(0), (16, 8))
    params = model.init(jax.random.key(1), x)
    params = jax.tree.map(lambda p: p.astype(dtype), params)
    return model, params, x


def test_merged_params_match_unmerged_apply_and_unmerge_restores():
    model, params, x = setup()
    config = lora_jax.LoraConfig(r=4, lora_alpha=16, target_modules=["up", "mid"], init_lora_weights=False)
    adapter = lora_jax.init(config, params, jax.random.key(2))
    unmerged = lora_jax.lora(model.apply, config)(params, adapter, x)
    merged = lora_jax.merge(params, adapter, config)
    np.testing.assert_allclose(model.apply(merged, x), unmerged, rtol=1e-5, atol=1e-5)
    assert merged["params"]["classifier"]["kernel"] is params["params"]["classifier"]["kernel"]
    restored = lora_jax.unmerge(merged, adapter, config)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6), restored, params)


def test_bf16_kernels_merge_through_float32():
    model, params, x = setup(jnp.bfloat16)
    config = lora_jax.LoraConfig(r=4, lora_alpha=4, target_modules=["up"], init_lora_weights=False)
    adapter = lora_jax.init(config, params, jax.random.key(2))
    merged = lora_jax.merge(params, adapter, config)
    w = merged["params"]["up"]["kernel"]
    assert w.dtype == jnp.bfloat16
    a = np.asarray(adapter["up"]["lora_A"], np.float64)
    b = np.asarray(adapter["up"]["lora_B"], np.float64)
    exact = np.asarray(params["params"]["up"]["kernel"], np.float64) + a @ b  # scaling 4/4
    # one rounding to bf16 of the float32 sum: the nearest bf16 (relative error <= 2^-8)
    np.testing.assert_allclose(np.asarray(w, np.float64), exact, rtol=2**-8, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(w), np.asarray(jnp.asarray(exact, jnp.float32).astype(jnp.bfloat16)))


def test_training_lowers_loss_and_leaves_frozen_params_bitwise_unchanged():
    model, params, x = setup()
    y = jax.random.normal(jax.random.key(7), (16, 4))
    config = lora_jax.LoraConfig(r=4, lora_alpha=8, target_modules=["up", "mid"],
                                 modules_to_save=["classifier"], bias="lora_only")
    adapter = lora_jax.init(config, params, jax.random.key(3))
    mask = lora_jax.trainable_mask(params, config)
    trainable, frozen = lora_jax.partition(params, mask)
    apply = lora_jax.lora(model.apply, config)

    def loss_fn(train, frozen):
        adapter, trainable = train
        out = apply(lora_jax.combine(trainable, frozen), adapter, x)
        return jnp.mean((out - y) ** 2)

    opt = optax.adam(1e-2)
    state = opt.init((adapter, trainable))

    @jax.jit
    def step(train, state):
        loss, grads = jax.value_and_grad(loss_fn)(train, frozen)
        updates, state = opt.update(grads, state, train)
        return optax.apply_updates(train, updates), state, loss

    train = (adapter, trainable)
    losses = []
    for _ in range(30):
        train, state, loss = step(train, state)
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]
    final = lora_jax.combine(train[1], frozen)
    for path, before in jax.tree_util.tree_flatten_with_path(params)[0]:
        after = final
        for key in path:
            after = after[key.key]
        trains = ("classifier" in str(path)) or (path[-1].key == "bias" and path[1].key in ("up", "mid"))
        if trains:
            assert not np.array_equal(after, before), path
        else:
            np.testing.assert_array_equal(after, before)


def test_masked_optimizer_leaves_frozen_leaves_bitwise_and_keeps_no_state_for_them():
    model, params, x = setup()
    config = lora_jax.LoraConfig(r=2, target_modules=["up"], modules_to_save=["classifier"])
    mask = lora_jax.trainable_mask(params, config)
    opt = lora_jax.masked_optimizer(optax.adam(1e-1), mask)
    state = opt.init(params)
    state_leaves = sum(np.size(s) for s in jax.tree.leaves(state))
    trainable_size = sum(np.size(p) for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask)) if m)
    assert state_leaves <= 2 * trainable_size + 2  # Adam's mu and nu for the trainable leaves only

    grads = jax.grad(lambda p: jnp.sum(model.apply(p, x) ** 2))(params)
    updates, _ = opt.update(grads, state, params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_array_equal(new["params"]["up"]["kernel"], params["params"]["up"]["kernel"])
    assert not np.array_equal(new["params"]["classifier"]["kernel"], params["params"]["classifier"]["kernel"])
