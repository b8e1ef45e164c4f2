"""2 CPU processes (gloo): the relative-update ceiling bounds DTensor shards (FSDP2's ``Shard(0)``, a
tensor-parallel ``Shard(1)``, a ``Replicate``, and HSDP's ``(Replicate, Shard(0))`` on 2x1 and 1x2 meshes) exactly
as it bounds the whole tensors in one process.

Usage: ``python update_ceiling_sharded.py OUT_DIR``; writes ``reference.json`` (one process, whole tensors) and
``rank{N}.json`` (each rank's full tensors after the bounded step, gathered, and the ceiling's outcome).
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_gradstab.update_ceiling import RelativeUpdateCeiling

SHAPES = [(7, 5), (6, 9), (4, 4), (5, 3), (6, 4)]  # odd sizes: uneven shards


def tensors_and_steps() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(shape, generator=g) for shape in SHAPES]
    weights[3] *= 0.01  # below 1/sqrt(fan_in): measured against that floor, so a miscounted replica shows
    scales = (0.5, 0.01, 0.3, 0.1, 0.25)
    steps = [scale * torch.randn(shape, generator=g) for scale, shape in zip(scales, SHAPES, strict=True)]
    return weights, steps


def bounded(weights: list[torch.Tensor], steps: list[torch.Tensor]) -> tuple[list[list[float]], list[float]]:
    ceiling = RelativeUpdateCeiling(0.1)
    ceiling.begin(weights)
    with torch.no_grad():  # the optimizer's step, on the values this rank holds
        for weight, step in zip(weights, steps, strict=True):
            (weight.to_local() if hasattr(weight, "to_local") else weight).add_(step)
    outcome = ceiling.end()
    full = [(w.full_tensor() if hasattr(w, "full_tensor") else w).reshape(-1).tolist() for w in weights]
    return full, outcome.tolist()


def worker(rank: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("TEST_PORT", "29537"))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (2,))
    # HSDP's placements on 2-D meshes: replicated across the first dimension, sharded along the second
    replicas = init_device_mesh("cpu", (2, 1), mesh_dim_names=("replicate", "shard"))
    shards = init_device_mesh("cpu", (1, 2), mesh_dim_names=("replicate", "shard"))
    weights, steps = tensors_and_steps()
    layouts = [
        (mesh, [Shard(0)]), (mesh, [Shard(1)]), (mesh, [Replicate()]),
        (replicas, [Replicate(), Shard(0)]), (shards, [Replicate(), Shard(0)]),
    ]
    sharded = [distribute_tensor(w, m, p) for w, (m, p) in zip(weights, layouts, strict=True)]
    sharded_steps = [distribute_tensor(s, m, p) for s, (m, p) in zip(steps, layouts, strict=True)]
    full, outcome = bounded(sharded, [s.to_local() for s in sharded_steps])
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps({"weights": full, "outcome": outcome}))
    dist.barrier()  # leave together, without tearing gloo down (see sharded_norms.py)
    os._exit(0)


if __name__ == "__main__":
    weights, steps = tensors_and_steps()
    full, outcome = bounded(weights, steps)
    (Path(sys.argv[1]) / "reference.json").write_text(json.dumps({"weights": full, "outcome": outcome}))
    mp.spawn(worker, args=(sys.argv[1],), nprocs=2)
