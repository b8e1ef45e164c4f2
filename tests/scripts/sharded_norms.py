"""2 CPU processes (gloo): norms of FSDP2 (DTensor) gradient shards equal the unsharded ones.

FSDP1 runs on CPU when given ``device_id=torch.device("cpu")``; it, HSDP and tensor parallelism are checked
on 4 processes by ``tests/scripts/parallel_norms.py``. Lightning's ``FSDPStrategy`` needs CUDA (the GPU test).
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lightning_gradstab.stats import ParameterLayout, compute_gradient_stats


def make_model() -> nn.Module:
    torch.manual_seed(0)
    # odd sizes: the shards are uneven
    return nn.Sequential(nn.Linear(7, 13), nn.Tanh(), nn.Linear(13, 5), nn.Tanh(), nn.Linear(5, 3))


def batch() -> torch.Tensor:
    return torch.randn(6, 7, generator=torch.Generator().manual_seed(1))


def group_norms(model) -> dict[str, float]:
    stats = compute_gradient_stats(ParameterLayout.from_module(model), sharded=True)
    names, norms = stats.group_norms("module")
    result = dict(zip(names, norms.tolist(), strict=True))
    result["total"] = float(stats.total_norm)
    return result


def worker(rank: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("TEST_PORT", "29531"))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from torch.distributed.fsdp import fully_shard

    results = {}
    fsdp2 = make_model()
    for layer in fsdp2:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(fsdp2)
    fsdp2(batch()).square().sum().backward()
    results["fsdp2"] = group_norms(fsdp2)
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(results))
    # Every rank leaves together, and without tearing gloo down: a rank whose process group is destroyed (or
    # destructed at exit) while its peer closes the connection aborts ("terminate called without an active
    # exception"): one run in four on a 2-core machine without the barrier, about one in twelve with a barrier and
    # destroy_process_group. The results are on disk; the process ends here without running C++ destructors.
    dist.barrier()
    os._exit(0)


if __name__ == "__main__":
    reference_model = make_model()
    reference_model(batch()).square().sum().backward()
    stats = compute_gradient_stats(ParameterLayout.from_module(reference_model))
    names, norms = stats.group_norms("module")
    reference = dict(zip(names, norms.tolist(), strict=True))
    reference["total"] = float(stats.total_norm)
    (Path(sys.argv[1]) / "reference.json").write_text(json.dumps(reference))
    mp.spawn(worker, args=(sys.argv[1],), nprocs=2)
