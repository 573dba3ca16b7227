"""One process of a multi-process (multi-host) LoRA training run on CPU.

``test_sharding.py`` starts two of these on this machine; each gets
``--local-devices`` CPU devices, they join through ``jax.distributed`` and
train the tiny model of ``sharding_model.py`` on a global ``(data, model)``
mesh whose data axis runs across the processes. Process 0 writes the losses
and the final adapter (gathered to the host) to ``--out``; both write one
sharded orbax checkpoint of the adapter. Run by hand::

    python tests/multihost_worker.py --process-id 0 --num-processes 2 --port 12355 --out /tmp/mh &
    python tests/multihost_worker.py --process-id 1 --num-processes 2 --port 12355 --out /tmp/mh
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--process-id", type=int, required=True)
    parser.add_argument("--num-processes", type=int, default=2)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--local-devices", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--strategy", default="fsdp_tp")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    # Before any computation: CPU devices per process, and gloo for the cross-process
    # collectives (jax's default on CPU; named here so the choice is visible).
    jax.config.update("jax_num_cpu_devices", args.local_devices)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{args.port}",
        num_processes=args.num_processes,
        process_id=args.process_id,
        initialization_timeout=60,
    )
    import sharding_model as tiny
    from jax.experimental import multihost_utils

    from lora_jax import sharding

    pid, nproc = jax.process_index(), jax.process_count()
    mesh = sharding.make_mesh(data=nproc, model=args.local_devices)
    # The data axis runs across processes: row i of the mesh is process i's devices.
    for row, devices in enumerate(mesh.devices):
        assert {d.process_index for d in devices} == {row}, mesh.devices

    cfg = tiny.TinyConfig(scan=True)
    config = tiny.lora_config(cfg)
    params, adapter = tiny.setup(cfg)  # the same host values in every process
    tx = tiny.optimizer()
    shardings = sharding.train_shardings(config, params, tx, mesh, args.strategy)
    params, adapter, opt_state = sharding.shard_train_state(config, params, tx, shardings,
                                                            adapter=adapter)
    step = sharding.make_sharded_step(tiny.make_loss(cfg), tx, shardings)

    losses = []
    for i in range(args.steps):
        global_batch = tiny.batch(cfg, seed=i)
        rows = len(global_batch["input_ids"]) // nproc
        local = {k: v[pid * rows : (pid + 1) * rows] for k, v in global_batch.items()}
        batch = sharding.shard_batch(local, shardings.batch)
        assert batch["input_ids"].shape == global_batch["input_ids"].shape
        adapter, opt_state, loss = step(params, adapter, opt_state, batch)
        losses.append(float(loss))  # the loss is replicated: every process can read it

    sharding.save_sharded(args.out / "adapter_ckpt", adapter)
    gathered = multihost_utils.process_allgather(adapter, tiled=True)
    if pid == 0:
        flat = {f"{name}/{key}": np.asarray(value)
                for name, pair in gathered.items() for key, value in pair.items()}
        np.savez(args.out / "adapter.npz", **flat)
        (args.out / "losses.json").write_text(json.dumps(losses))
    multihost_utils.sync_global_devices("done")
    jax.distributed.shutdown()
    print(f"process {pid}: losses {losses}", flush=True)


if __name__ == "__main__":
    main()
