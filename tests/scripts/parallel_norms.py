"""4 CPU processes (gloo), float64: the suite's norms under every parallel layout equal a one-process reference.

One launch runs every layout in sequence, so the processes start (and import Lightning) once:

- raw torch, one backward of the same batch, measured with ``compute_gradient_stats``: FSDP2 on a 1-D mesh of 4,
  HSDP (``fully_shard`` on a 2 x 2 replicate x shard mesh), tensor parallelism x4 with the LayerNorm left as
  plain tensors, tensor parallelism x4 with a ``SequenceParallel`` LayerNorm (``Partial`` gradients), FSDP1
  ``FULL_SHARD`` over 4 and FSDP1 ``HYBRID_SHARD`` 2 x 2;
- Lightning ``ModelParallelStrategy(2, 2)`` and ``(4, 1)`` fits with ``GradNormMonitor(self_check=True)`` and
  ``ExplosionGuard()`` (defaults) on Adam, whose logged metrics rank 0 writes out, and a ``(4, 1)`` fit whose
  ``configure_model`` shards HSDP-style on its own 2 x 2 replicate x shard mesh;
- the same (2, 2) and HSDP fits with every replica count forced to 1 (the bug these layouts had), to show the
  self-check and the comparison catch it;
- parameters that live on some ranks only (expert parallelism with plain tensors), which must be refused.

The parent process writes ``reference.json`` (one process, plain model, same batches) and each rank writes
``rank{N}.json``. Usage: ``parallel_norms.py OUT_DIR``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader

from lightning_gradstab import ExplosionGuard, GradNormMonitor
from lightning_gradstab.distributed import fsdp1_replica_counts, gathered_total_norm
from lightning_gradstab.stats import ParameterLayout, compute_gradient_stats, layout_norms

WORLD = 4
FEATURES, HIDDEN, OUTPUTS, SEQUENCE, ROWS = 6, 12, 5, 8, 4
FIT_STEPS = 6
TARGET_NORM = 0.95  # below the guard's Adam ceiling (1.0); norms ~1.1x too large are clipped


class Net(nn.Module):
    """LayerNorm -> Linear -> tanh -> Linear, float64, the same weights in every process."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.ln = nn.LayerNorm(FEATURES, dtype=torch.float64)
        self.fc1 = nn.Linear(FEATURES, HIDDEN, dtype=torch.float64)
        self.fc2 = nn.Linear(HIDDEN, OUTPUTS, dtype=torch.float64)
        with torch.no_grad():  # LayerNorm starts at (1, 0): move it so its gradient is not special
            self.ln.weight.add_(0.1 * torch.randn(FEATURES, dtype=torch.float64))
            self.ln.bias.add_(0.1 * torch.randn(FEATURES, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(self.ln(x))))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    x = torch.randn(ROWS, SEQUENCE, FEATURES, generator=generator, dtype=torch.float64)
    return x, torch.randn(ROWS, SEQUENCE, OUTPUTS, generator=generator, dtype=torch.float64)


def measure(model: nn.Module, **sharding) -> dict[str, float]:
    """Every reduction the suite makes, by module: L2, L1 and max norms of the gradients, weight norms, the
    non-finite count, and the norms of one SGD step's update (the step is taken: measure last)."""
    stats = compute_gradient_stats(ParameterLayout.from_module(model), **sharding)
    result = {"total": float(stats.total_norm), "nonfinite": float(stats.nonfinite_count)}
    for kind, (names, values) in {
        "l2": stats.group_norms("module"),
        "l1": stats.group_norms("module", 1.0),
        "max": stats.group_norms("module", math.inf),
        "weight": stats.group_weight_norms("module"),
    }.items():
        result.update({f"{kind}/{name}": value for name, value in zip(names, values.tolist(), strict=True)})
    result["total_l1"], result["total_max"] = float(stats.total(1.0)), float(stats.total(math.inf))
    # update norms: one SGD step, the change of each parameter measured as GradNormMonitor measures it
    layout = stats.layout
    before = torch._foreach_mul(layout.weights(), 1.0)
    torch.optim.SGD(layout.parameters, lr=0.1).step()
    delta_sq = layout_norms(layout, torch._foreach_sub(layout.weights(), before), "update").square()
    names, updates = stats.group_sums(stats.sum_like_weights(delta_sq), "module")
    result.update({f"update/{name}": value for name, value in zip(names, updates.sqrt().tolist(), strict=True)})
    return result


def raw_layouts(rank: int) -> dict[str, dict[str, float]]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy, fully_shard
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    flat = init_device_mesh("cpu", (WORLD,))
    square = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    x, target = batch(0)
    results = {}

    def backward(model: nn.Module, inputs: torch.Tensor = x) -> None:
        (model(inputs) - target).square().mean().backward()

    model = Net()
    for module in (model.fc1, model.fc2, model):
        fully_shard(module, mesh=flat)
    backward(model)
    results["fsdp2"] = {**measure(model, sharded=True), "gathered": gathered_total_norm(model.parameters())}

    model = Net()
    for module in (model.fc1, model.fc2, model):
        fully_shard(module, mesh=square)  # HSDP: replicate over dim 0, shard over dim 1
    backward(model)
    results["hsdp"] = {**measure(model, sharded=True), "gathered": gathered_total_norm(model.parameters())}
    if rank == 1:  # a NaN in one shard of one replica: every rank counts one non-finite parameter
        model.fc1.weight.grad.to_local()[0, 0] = math.nan
    nonfinite = compute_gradient_stats(ParameterLayout.from_module(model), sharded=True).group_nonfinite_counts()
    results["hsdp_nan_on_rank_1"] = dict(zip(*[nonfinite[0], nonfinite[1].tolist()], strict=True))

    model = Net()
    parallelize_module(model, flat, {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()})  # LayerNorm plain
    backward(model)
    results["tp"] = {**measure(model, sharded=True), "gathered": gathered_total_norm(model.parameters())}

    model = Net()
    parallelize_module(
        model,
        flat,
        {"ln": SequenceParallel(), "fc1": ColwiseParallel(input_layouts=Shard(1)), "fc2": RowwiseParallel()},
    )
    chunk = SEQUENCE // WORLD
    backward(model, x[:, rank * chunk : (rank + 1) * chunk])  # each rank holds its slice of the sequence
    partial = [type(p.grad.placements[0]).__name__ for p in model.ln.parameters()]
    results["tp_sequence_parallel"] = {
        **measure(model, sharded=True),
        "gathered": gathered_total_norm(model.parameters()),
        "ln_grads_partial": float(partial == ["Partial", "Partial"]),
    }

    for name, strategy, mesh in (
        ("fsdp1", ShardingStrategy.FULL_SHARD, flat),
        ("fsdp1_hybrid", ShardingStrategy.HYBRID_SHARD, square),
    ):
        model = Net()
        wrapped = FullyShardedDataParallel(
            model, device_id=torch.device("cpu"), use_orig_params=True, sharding_strategy=strategy, device_mesh=mesh
        )
        backward(wrapped)
        counts = fsdp1_replica_counts(wrapped, WORLD)
        results[name] = {
            **measure(wrapped, sharded=True, plain_replicas=counts),
            "gathered": gathered_total_norm(wrapped.parameters(), fsdp1_root=wrapped),
        }
    results["rank_local_plain"] = {"error": _refusal(_rank_local_experts(rank))}
    extra = nn.ModuleDict({"shared": nn.Linear(2, 2, dtype=torch.float64)})
    if rank == 0:
        extra["only_here"] = nn.Linear(2, 2, dtype=torch.float64)
    results["rank_local_count"] = {"error": _refusal(extra)}
    return results


def _rank_local_experts(rank: int) -> nn.Module:
    """An "expert" held as a plain tensor with different weights on each rank (expert parallelism)."""
    torch.manual_seed(rank)
    return nn.ModuleDict({"expert": nn.Linear(3, 3, dtype=torch.float64)})


def _refusal(model: nn.Module) -> str:
    """The message of the ValueError that measuring ``model``'s gradients as sharded raises ("" if none)."""
    for parameter in model.parameters():
        parameter.grad = torch.randn_like(parameter) if parameter.ndim > 1 else torch.zeros_like(parameter)
    try:
        compute_gradient_stats(ParameterLayout.from_module(model), sharded=True)
    except ValueError as error:
        return str(error)
    return ""


class ParallelRegression(pl.LightningModule):
    """The same net under any ``ModelParallelStrategy`` split (or none): TP over ``tensor_parallel`` (the
    LayerNorm left as plain tensors, the second bias ``Replicate``), FSDP2 over ``data_parallel``; each
    data-parallel rank trains on its rows of the batch, so the averaged gradient is the full batch's.
    ``hsdp=True`` shards over a 2 x 2 replicate x shard mesh of the module's own instead (HSDP: gradients
    reduce-scattered in the shard group, then all-reduced across the replicas)."""

    def __init__(self, loss_scale: float, hsdp: bool = False) -> None:
        super().__init__()
        self.net = Net()
        self.loss_scale = loss_scale
        self.hsdp = hsdp

    def configure_model(self) -> None:
        if self.device_mesh is None:
            return
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        if self.device_mesh["tensor_parallel"].size() > 1:
            tp = {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()}
            parallelize_module(self.net, self.device_mesh["tensor_parallel"], tp)
        mesh = self.device_mesh["data_parallel"]
        if self.hsdp:
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
        for module in (self.net.fc1, self.net.fc2, self.net):
            fully_shard(module, mesh=mesh)

    def training_step(self, _, batch_idx: int) -> torch.Tensor:
        x, target = batch(batch_idx)
        if self.device_mesh is not None:
            data = self.device_mesh["data_parallel"]
            rows = ROWS // data.size()
            start = data.get_local_rank() * rows
            x, target = x[start : start + rows], target[start : start + rows]
        return (self.net(x) - target).square().mean() * self.loss_scale

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(range(FIT_STEPS), batch_size=1)


class MemoryLogger(Logger):
    """Keeps every logged metric (rank 0 is the only rank the suite logs on)."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics: dict[str, list[list[float]]] = {}

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        for key, value in metrics.items():
            self.metrics.setdefault(key, []).append([step, float(value)])

    def log_hyperparams(self, *args, **kwargs) -> None:
        pass


def fit(loss_scale: float, root: Path, strategy: object | None = None, hsdp: bool = False) -> dict:
    """Train ``FIT_STEPS`` Adam steps with the monitor (self-check on) and the default guard; what was logged,
    the self-check's numbers, the warnings raised and the final weights (gathered whole)."""
    logger = MemoryLogger()
    monitor = GradNormMonitor(log_every_n_steps=1, heatmap_every_n_steps=None, self_check=True)
    guard = ExplosionGuard()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1 if strategy is None else WORLD,
        strategy="auto" if strategy is None else strategy,
        max_steps=FIT_STEPS,
        logger=logger,
        log_every_n_steps=1,
        callbacks=[monitor, guard],
        use_distributed_sampler=False,
        default_root_dir=root,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    module = ParallelRegression(loss_scale, hsdp=hsdp)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module)
    weights = {
        name: (p.full_tensor() if hasattr(p, "full_tensor") else p.detach()).tolist()
        for name, p in module.net.named_parameters()
    }
    return {
        "metrics": {k: v for k, v in logger.metrics.items() if k.startswith("gradstab/")},
        "self_check": monitor.self_check_results.get(0),
        "weights_changed": guard.policy().counts.get("weights_changed", 0),  # FSDP2 / TP must not write from outside
        "warnings": [str(w.message) for w in caught if "self-check" in str(w.message)],
        "weights": weights,
    }


def lightning_layouts(rank: int, out_dir: Path, loss_scale: float) -> dict[str, dict]:
    from lightning.pytorch.strategies import ModelParallelStrategy

    from lightning_gradstab import distributed

    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0")  # the processes exist: Lightning joins them
    results = {}
    for data_parallel, tensor_parallel in ((2, 2), (4, 1)):
        strategy = ModelParallelStrategy(data_parallel_size=data_parallel, tensor_parallel_size=tensor_parallel)
        results[f"model_parallel_{data_parallel}x{tensor_parallel}"] = fit(
            loss_scale, out_dir / f"mp{data_parallel}x{tensor_parallel}", strategy
        )
    strategy = ModelParallelStrategy(data_parallel_size=4, tensor_parallel_size=1)
    results["model_parallel_hsdp_2x2"] = fit(loss_scale, out_dir / "hsdp", strategy, hsdp=True)
    original = distributed.ReplicaCounts.of
    distributed.ReplicaCounts.of = lambda self, parameters, *args: torch.ones(len(parameters), dtype=args[-1])
    try:
        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=2)
        results["model_parallel_2x2_replicas_ignored"] = fit(loss_scale, out_dir / "broken", strategy)
        strategy = ModelParallelStrategy(data_parallel_size=4, tensor_parallel_size=1)
        results["model_parallel_hsdp_2x2_replicas_ignored"] = fit(
            loss_scale, out_dir / "broken_hsdp", strategy, hsdp=True
        )
    finally:
        distributed.ReplicaCounts.of = original
    return results


def worker(rank: int, out_dir: str, loss_scale: float) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("TEST_PORT", "29541"))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    results = raw_layouts(rank)
    results.update(lightning_layouts(rank, Path(out_dir), loss_scale))
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(results))
    dist.barrier()


def reference(out_dir: Path) -> float:
    """One process, plain model: the raw layouts' numbers, and the fit at the loss scale that puts the largest
    total norm of the fit's batches (at the initial weights) at ``TARGET_NORM``. Returns that loss scale."""
    model = Net()
    x, target = batch(0)
    (model(x) - target).square().mean().backward()
    raw = measure(model)
    initial_norms, model = [], Net()
    for step in range(FIT_STEPS):
        model.zero_grad()
        x, target = batch(step)
        (model(x) - target).square().mean().backward()
        initial_norms.append(float(compute_gradient_stats(ParameterLayout.from_module(model)).total_norm))
    loss_scale = TARGET_NORM / max(initial_norms)
    fitted = fit(loss_scale, out_dir / "single")
    (out_dir / "reference.json").write_text(json.dumps({"raw": raw, "fit": fitted, "loss_scale": loss_scale}))
    return loss_scale


if __name__ == "__main__":
    out = Path(sys.argv[1])
    scale = reference(out)
    mp.spawn(worker, args=(str(out), scale), nprocs=WORLD)
