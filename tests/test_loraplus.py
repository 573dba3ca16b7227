"""LoRA+ learning-rate groups: a hand computation, and PEFT's create_loraplus_optimizer as the reference.

The torch model has a LoRA'd embedding and linear layer (with a trainable bias,
``bias="lora_only"``), and ``modules_to_save`` holding a LayerNorm, an RMSNorm-like
module and a classifier head; the JAX tree is the train loop's
``{"adapter": ..., "params": ...}`` over the same tensors (kernel = weight.T).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax
from lora_jax import LoraConfig

VOCAB, DIM, CLASSES, R = 9, 6, 3, 2


def jax_params() -> dict:
    rng = np.random.default_rng(0)
    f32 = functools.partial(np.asarray, dtype=np.float32)
    return {"params": {
        "embed": {"embedding": f32(rng.normal(size=(VOCAB, DIM)))},
        "q": {"kernel": f32(rng.normal(size=(DIM, DIM))), "bias": f32(rng.normal(size=DIM))},
        "norm": {"scale": f32(rng.normal(size=DIM)), "bias": f32(rng.normal(size=DIM))},
        "rms": {"scale": f32(rng.normal(size=DIM))},
        "head": {"kernel": f32(rng.normal(size=(DIM, CLASSES))), "bias": f32(rng.normal(size=CLASSES))},
    }}


CONFIG = LoraConfig(r=R, lora_alpha=4, target_modules=["q", "embed"], modules_to_save=["norm", "rms", "head"],
                    bias="lora_only")


def trainable_tree(seed: int = 1) -> dict:
    """``{"adapter", "params"}`` with random values (B non-zero, so weight decay shows)."""
    rng = np.random.default_rng(seed)
    p = jax_params()["params"]

    def rand(*shape: int) -> np.ndarray:
        return rng.normal(size=shape).astype(np.float32)

    return {
        "adapter": {"q": {"lora_A": rand(DIM, R), "lora_B": rand(R, DIM)},
                    "embed": {"lora_A": rand(VOCAB, R), "lora_B": rand(R, DIM)}},
        "params": {"q.bias": p["q"]["bias"], "norm.scale": p["norm"]["scale"], "norm.bias": p["norm"]["bias"],
                   "rms.scale": p["rms"]["scale"], "head.kernel": p["head"]["kernel"], "head.bias": p["head"]["bias"]},
    }


def test_groups_follow_peft_rules():
    groups = lora_jax.loraplus_groups(trainable_tree(), CONFIG, jax_params())
    assert groups == {
        "adapter": {"q": {"lora_A": "groupA", "lora_B": "groupB"},
                    "embed": {"lora_A": "embedding", "lora_B": "embedding"}},
        "params": {"q.bias": "groupB_no_decay", "norm.scale": "groupB_no_decay", "norm.bias": "groupB_no_decay",
                   "rms.scale": "groupB", "head.kernel": "groupA", "head.bias": "groupB_no_decay"},
    }


def test_stacked_leading_axis_does_not_count_and_dora_magnitude_goes_with_b():
    params = {"params": {"layers": {"mlp": {"kernel": np.zeros((3, 4, 4)), "bias": np.zeros((3, 4))},
                                    "norm": {"scale": np.zeros((3, 4))}}}}
    config = LoraConfig(r=2, target_modules=["mlp"], stacked_modules=r"layers\..*", modules_to_save=["norm"])
    tree = {"adapter": {"layers.mlp": {"lora_A": np.zeros((3, 4, 2)), "lora_B": np.zeros((3, 2, 4)),
                                       "lora_magnitude": np.zeros((3, 4))}},
            "params": {"layers.norm.scale": np.zeros((3, 4)), "layers.mlp.bias": np.zeros((3, 4))}}
    groups = lora_jax.loraplus_groups(tree, config, params)
    assert groups["adapter"]["layers.mlp"] == {"lora_A": "groupA", "lora_B": "groupB", "lora_magnitude": "groupB"}
    assert groups["params"] == {"layers.norm.scale": "groupB", "layers.mlp.bias": "groupB_no_decay"}


def test_one_sgd_step_gives_b_ratio_times_a_s_rate_and_embeddings_their_own():
    lr, ratio, lr_embedding = 0.01, 16.0, 1e-3
    opt = lora_jax.loraplus(optax.sgd, lr, ratio, config=CONFIG, params=jax_params(),
                            loraplus_lr_embedding=lr_embedding)
    tree = trainable_tree()
    grads = trainable_tree(seed=2)
    updates, _ = opt.update(grads, opt.init(tree), tree)
    rate = {"groupA": lr, "groupB": lr * ratio, "groupB_no_decay": lr * ratio, "embedding": lr_embedding}
    groups = lora_jax.loraplus_groups(tree, CONFIG, jax_params())
    jax.tree.map(lambda u, g, group: np.testing.assert_allclose(u, -rate[group] * g, rtol=1e-6),
                 updates, grads, groups)


def test_one_adamw_step_by_hand_with_loraplus_weight_decay():
    lr, ratio, decay = 0.01, 4.0, 0.1
    opt = lora_jax.loraplus(optax.adamw, lr, ratio, config=CONFIG, params=jax_params(),
                            loraplus_weight_decay=decay)
    tree, grads = trainable_tree(), trainable_tree(seed=2)
    updates, _ = opt.update(grads, opt.init(tree), tree)
    eps = 1e-8
    adam_rtol = 1e-4  # optax's float32 bias corrections (1 - 0.999 rounds) vs exact maths
    # first Adam step: m_hat = g, v_hat = g^2, so the step is g / (|g| + eps); decoupled decay adds wd * p
    a, ga = tree["adapter"]["q"]["lora_A"], grads["adapter"]["q"]["lora_A"]
    np.testing.assert_allclose(updates["adapter"]["q"]["lora_A"], -lr * (ga / (np.abs(ga) + eps) + decay * a),
                               rtol=adam_rtol)
    b, gb = tree["adapter"]["q"]["lora_B"], grads["adapter"]["q"]["lora_B"]
    np.testing.assert_allclose(updates["adapter"]["q"]["lora_B"],
                               -ratio * lr * (gb / (np.abs(gb) + eps) + decay * b), rtol=adam_rtol)
    g_bias = grads["params"]["q.bias"]  # groupB_no_decay
    np.testing.assert_allclose(updates["params"]["q.bias"], -ratio * lr * g_bias / (np.abs(g_bias) + eps), rtol=adam_rtol)
    e, ge = tree["adapter"]["embed"]["lora_B"], grads["adapter"]["embed"]["lora_B"]
    np.testing.assert_allclose(updates["adapter"]["embed"]["lora_B"], -1e-6 * (ge / (np.abs(ge) + eps) + decay * e),
                               rtol=adam_rtol)


def test_a_schedule_drives_a_and_b_together():
    schedule = optax.linear_schedule(0.0, 0.1, transition_steps=10)
    opt = lora_jax.loraplus(optax.sgd, schedule, 8.0, config=CONFIG, params=jax_params())
    tree = trainable_tree()
    grads = jax.tree.map(np.ones_like, tree)
    state = opt.init(tree)
    for step in range(3):
        updates, state = opt.update(grads, state, tree)
        np.testing.assert_allclose(updates["adapter"]["q"]["lora_A"], -schedule(step), rtol=1e-6, atol=0)
        np.testing.assert_allclose(updates["adapter"]["q"]["lora_B"], -8.0 * schedule(step), rtol=1e-6, atol=0)
        np.testing.assert_allclose(updates["adapter"]["embed"]["lora_A"], -1e-6, rtol=1e-6)


def test_it_composes_with_jit_and_clipping_outside():
    opt = optax.chain(optax.clip_by_global_norm(1.0),
                      lora_jax.loraplus(optax.adamw, 1e-3, 16.0, config=CONFIG, params=jax_params()))
    tree = jax.tree.map(jnp.asarray, trainable_tree())
    state = opt.init(tree)
    updates, state = jax.jit(opt.update)(jax.tree.map(jnp.ones_like, tree), state, tree)
    assert jax.tree.structure(updates) == jax.tree.structure(tree)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(optimizer=optax.adamw(1e-3)), TypeError, "needs an optimizer factory such as optax.adamw"),
    (dict(loraplus_lr_ratio=0.0), ValueError, "loraplus_lr_ratio must be a positive number"),
    (dict(loraplus_lr_ratio="16"), ValueError, "loraplus_lr_ratio must be a positive number"),
    (dict(learning_rate=-1.0), ValueError, "learning_rate must be a non-negative number"),
    (dict(loraplus_lr_embedding=float("nan")), ValueError, "loraplus_lr_embedding must be"),
    (dict(weight_decay=0.1), ValueError, "pass weight_decay as loraplus_weight_decay"),
    (dict(optimizer=optax.sgd, loraplus_weight_decay=0.1), ValueError, "needs an optimizer that takes weight_decay"),
])
def test_bad_arguments_are_named(kwargs, error, match):
    args = dict(optimizer=optax.adamw, learning_rate=1e-3, loraplus_lr_ratio=16.0, config=CONFIG,
                params=jax_params())
    args.update(kwargs)
    with pytest.raises(error, match=match):
        lora_jax.loraplus(**args)


# -- PEFT's create_loraplus_optimizer as the reference ------------------------------------------

def _torch_case():
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from peft.optimizers import create_loraplus_optimizer

    class RMSNorm(torch.nn.Module):  # not an nn.LayerNorm: transformers decays its weight
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(DIM))

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(VOCAB, DIM)
            self.q = torch.nn.Linear(DIM, DIM)
            self.norm = torch.nn.LayerNorm(DIM)
            self.rms = RMSNorm()
            self.head = torch.nn.Linear(DIM, CLASSES)

    p = jax_params()["params"]
    model = Model()
    with torch.no_grad():
        model.embed.weight.copy_(torch.from_numpy(p["embed"]["embedding"]))
        model.q.weight.copy_(torch.from_numpy(p["q"]["kernel"].T))
        model.q.bias.copy_(torch.from_numpy(p["q"]["bias"]))
        model.norm.weight.copy_(torch.from_numpy(p["norm"]["scale"]))
        model.norm.bias.copy_(torch.from_numpy(p["norm"]["bias"]))
        model.rms.weight.copy_(torch.from_numpy(p["rms"]["scale"]))
        model.head.weight.copy_(torch.from_numpy(p["head"]["kernel"].T))
        model.head.bias.copy_(torch.from_numpy(p["head"]["bias"]))
    pm = peft.get_peft_model(model, peft.LoraConfig(r=R, lora_alpha=4, target_modules=["q", "embed"],
                                                    modules_to_save=["norm", "rms", "head"], bias="lora_only"))
    inner = pm.base_model.model
    tree = trainable_tree()
    with torch.no_grad():  # start from the same (non-zero) adapter values
        inner.q.lora_A["default"].weight.copy_(torch.from_numpy(tree["adapter"]["q"]["lora_A"].T))
        inner.q.lora_B["default"].weight.copy_(torch.from_numpy(tree["adapter"]["q"]["lora_B"].T))
        inner.embed.lora_embedding_A["default"].copy_(torch.from_numpy(tree["adapter"]["embed"]["lora_A"].T))
        inner.embed.lora_embedding_B["default"].copy_(torch.from_numpy(tree["adapter"]["embed"]["lora_B"].T))

    # torch parameter -> (path in the JAX tree, transposed?)
    where = {
        inner.q.lora_A["default"].weight: (("adapter", "q", "lora_A"), True),
        inner.q.lora_B["default"].weight: (("adapter", "q", "lora_B"), True),
        inner.embed.lora_embedding_A["default"]: (("adapter", "embed", "lora_A"), True),
        inner.embed.lora_embedding_B["default"]: (("adapter", "embed", "lora_B"), True),
        inner.q.base_layer.bias: (("params", "q.bias"), False),
        inner.norm.modules_to_save["default"].weight: (("params", "norm.scale"), False),
        inner.norm.modules_to_save["default"].bias: (("params", "norm.bias"), False),
        inner.rms.modules_to_save["default"].weight: (("params", "rms.scale"), False),
        inner.head.modules_to_save["default"].weight: (("params", "head.kernel"), True),
        inner.head.modules_to_save["default"].bias: (("params", "head.bias"), False),
    }
    trainable = [p for p in pm.parameters() if p.requires_grad]
    assert len(trainable) == len(where) and all(any(p is q for q in where) for p in trainable)
    return torch, pm, create_loraplus_optimizer, where, tree


def _get(tree: dict, path: tuple[str, ...]) -> np.ndarray:
    for key in path:
        tree = tree[key]
    return tree


@pytest.mark.parametrize("optimizer,torch_name,decay", [
    (optax.adamw, "AdamW", 0.1),
    (optax.adam, "Adam", 0.0),
    (optax.sgd, "SGD", 0.0),
])
def test_steps_match_peft_create_loraplus_optimizer(optimizer, torch_name, decay):
    torch, pm, create_loraplus_optimizer, where, tree = _torch_case()
    lr, ratio, lr_embedding = 0.01, 4.0, 2e-3
    torch_opt = create_loraplus_optimizer(pm, getattr(torch.optim, torch_name), lr=lr, loraplus_lr_ratio=ratio,
                                          loraplus_lr_embedding=lr_embedding, loraplus_weight_decay=decay)
    opt = lora_jax.loraplus(optimizer, lr, ratio, config=CONFIG, params=jax_params(),
                            loraplus_lr_embedding=lr_embedding, loraplus_weight_decay=decay)
    state = opt.init(tree)
    rng = np.random.default_rng(7)
    for _ in range(3):  # several steps, so Adam's moments and bias correction take part
        grads = jax.tree.map(lambda v: rng.normal(size=np.shape(v)).astype(np.float32), tree)
        for param, (path, transposed) in where.items():
            g = _get(grads, path)
            param.grad = torch.from_numpy(np.ascontiguousarray(g.T if transposed else g))
        torch_opt.step()
        updates, state = opt.update(grads, state, tree)
        tree = optax.apply_updates(tree, updates)
    for param, (path, transposed) in where.items():
        want = param.detach().numpy()
        got = np.asarray(_get(tree, path))
        np.testing.assert_allclose(got.T if transposed else got, want, atol=1e-6, rtol=0, err_msg=str(path))
