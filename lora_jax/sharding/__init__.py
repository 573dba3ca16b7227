"""Sharding for LoRA: put the frozen params, the adapter and its optimizer state on a mesh.

The frozen params get their layout from a preset strategy (data parallel, FSDP,
tensor parallel, or FSDP x TP) plus optional user rules; the adapter follows
the params: A takes W's layout on its stacked-layer and input axes, B on its
stacked-layer and output axes, and the rank axis is always replicated. The
optimizer state follows the adapter. Everything works on shapes, so it runs on
``jax.ShapeDtypeStruct`` trees for models too big to hold on one host::

    mesh = make_mesh(data=2, model=4)                      # 8 devices, 2 x 4
    shardings = train_shardings(config, params, optimizer, mesh, strategy="fsdp_tp")
    params, adapter, opt_state = shard_train_state(config, params, optimizer, shardings,
                                                   key=jax.random.key(0))
    step = make_sharded_step(loss_fn, optimizer, shardings)
    adapter, opt_state, loss = step(params, adapter, opt_state,
                                    shard_batch(batch, shardings.batch))

Strategies (``param_specs``):

- ``"dp"``: every parameter replicated; only the batch is split.
- ``"fsdp"``: each parameter split over the data axis on its largest axis that
  the axis size divides (a stacked layer axis is never split).
- ``"tp"``: Megatron-style tensor parallelism over the model axis: the output
  axis of column-parallel projections (``q/k/v/gate/up_proj``, ``lm_head``
  and their biases), the input axis of row-parallel ones (``o_proj``,
  ``down_proj``), the vocabulary axis of embedding tables, the expert axis of
  MoE expert stacks (``experts.gate_up_proj``: expert parallelism); the rest is
  replicated. On a ``(data, model)`` mesh this is DP x TP.
- ``"fsdp_tp"``: ``"tp"`` on the model axis, then FSDP on the data axis.

An axis that the mesh axis size does not divide is replicated instead, so no
layout ever fails inside XLA.

Modules: :mod:`~lora_jax.sharding.layout` (meshes; param, adapter and optimizer
layouts), :mod:`~lora_jax.sharding.placement` (putting trees and batches on the mesh),
:mod:`~lora_jax.sharding.step` (the sharded train step and merge) and
:mod:`~lora_jax.sharding.checkpoint` (orbax checkpoints across mesh shapes).
"""

from lora_jax.sharding.checkpoint import checkpoint_shapes, restore_sharded, save_sharded
from lora_jax.sharding.layout import (
    COLUMN_PARALLEL,
    EXPERT_PARALLEL,
    ROW_PARALLEL,
    STRATEGIES,
    AxisName,
    Rule,
    Strategy,
    TrainShardings,
    adapter_shardings,
    batch_sharding,
    make_mesh,
    optimizer_shardings,
    param_shardings,
    param_specs,
    train_shardings,
)
from lora_jax.sharding.placement import shard, shard_batch, shard_train_state
from lora_jax.sharding.step import make_sharded_step, sharded_merge

__all__ = [
    "COLUMN_PARALLEL",
    "EXPERT_PARALLEL",
    "ROW_PARALLEL",
    "STRATEGIES",
    "AxisName",
    "Rule",
    "Strategy",
    "TrainShardings",
    "adapter_shardings",
    "batch_sharding",
    "checkpoint_shapes",
    "make_mesh",
    "make_sharded_step",
    "optimizer_shardings",
    "param_shardings",
    "param_specs",
    "restore_sharded",
    "save_sharded",
    "shard",
    "shard_batch",
    "shard_train_state",
    "sharded_merge",
    "train_shardings",
]
