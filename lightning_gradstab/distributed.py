"""What a rank's local gradient means under each parallel layout, and how local norms combine into global ones.

A norm over sharded gradients is a sum over ranks of local squared norms, but only if every value is counted
once. Which ranks hold the same values depends on the layout:

- a DTensor (FSDP2, HSDP, tensor parallelism, FSDP2 + TP) says it in its placements: a ``Shard`` mesh dimension
  splits the values, a ``Replicate`` one copies them to every rank along it, and a ``Partial`` one holds
  addends whose sum is the gradient (the squared norm of a sum is not the sum of squared norms, so those are
  reduced first). Ranks outside the DTensor's mesh hold copies too (one mesh per data-parallel replica);
- an FSDP1 flat parameter is split over its shard group and copied across replica groups (``HYBRID_SHARD``),
  or not split at all (``NO_SHARD``);
- a plain tensor under a sharded strategy is a replica on every rank (a LayerNorm left out of tensor
  parallelism).

Dividing each local value by the number of ranks that hold it (its *replica count*) and summing over the world
with one ``all_reduce`` gives the exact global value, whatever the mix of meshes and placements (the fix
torchtitan and VeOmni made for HSDP and tensor parallelism). A maximum needs no count: copies do not change it.

Example::

    locals_, placements, meshes = local_values([p.grad for p in parameters])
    local_sq = torch.stack([g.square().sum() for g in locals_])
    counts = ReplicaCounts(world_size()).of(parameters, placements, meshes, local_sq.device, local_sq.dtype)
    global_sq = sum_over_ranks(local_sq, counts)  # exact under any mix of meshes and placements
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn

DEEPSPEED_MESSAGE = (
    "{who}: strategy={strategy} is not supported. DeepSpeed keeps the gradients in its own buffers (every "
    "`p.grad` is None when the suite reads them), so every norm would read 0 and the guard could not clip or "
    "skip before DeepSpeed's own step. Use FSDP instead (`strategy='fsdp'`, or `ModelParallelStrategy` for "
    "FSDP2/HSDP/tensor parallelism), where the suite's norms are exact, or log DeepSpeed's own "
    "`engine.get_global_grad_norm()` in `on_train_batch_end`."
)


_DTensor: type | None
try:
    from torch.distributed.tensor import DTensor

    _DTensor = DTensor
except ImportError:  # torch built without distributed support
    _DTensor = None


def is_dtensor(tensor: object) -> bool:
    """Whether ``tensor`` is a ``torch.distributed.tensor.DTensor`` (checked by type, not by attribute)."""
    return _DTensor is not None and isinstance(tensor, _DTensor)


def local_shard(tensor: Tensor) -> Tensor:
    """This rank's values of ``tensor``: a DTensor's local shard (``to_local()``, no communication), else the
    tensor itself. The one place the suite unwraps a DTensor."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def strategy_kind(strategy: object) -> str:
    """How a Lightning strategy holds gradients: ``"deepspeed"``, ``"fsdp"`` (FSDP1), ``"model_parallel"``
    (FSDP2/HSDP/TP through DTensors) or ``"replicated"`` (single device, DDP: every rank holds the whole,
    already reduced gradient). Decided with ``isinstance``, so subclasses of Lightning's strategies count."""
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

    if isinstance(strategy, DeepSpeedStrategy):
        return "deepspeed"
    if isinstance(strategy, FSDPStrategy):
        return "fsdp"
    if isinstance(strategy, ModelParallelStrategy):
        return "model_parallel"
    return "replicated"


def refuse_unsupported_strategy(strategy: object, who: str) -> None:
    """Raise ``ValueError`` for a strategy whose gradients the suite cannot read (DeepSpeed), naming the
    alternatives: a monitor that silently logs 0 and a guard that silently does nothing are worse than no
    callback at all."""
    if strategy_kind(strategy) == "deepspeed":
        raise ValueError(DEEPSPEED_MESSAGE.format(who=who, strategy=type(strategy).__name__))


def world_size(group: object | None = None) -> int:
    """Ranks in ``group`` (the default group if ``None``); 1 when no process group is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(cast("dist.ProcessGroup | None", group))  # a process group, as documented
    return 1


def fsdp1_replica_counts(module: nn.Module, world: int) -> dict[int, int]:
    """Replica count of every parameter that FSDP1 manages inside ``module``, keyed by ``id``.

    FSDP1 splits each flat parameter over its shard group (``process_group``; the intra-node group under
    ``HYBRID_SHARD``) and copies it across ``world / shard group`` replica groups; ``NO_SHARD`` keeps the whole
    gradient on every rank. A parameter belongs to the innermost FSDP module holding it: the modules are
    visited outermost first, so inner ones overwrite. Works for ``use_orig_params=True`` (the original
    parameters) and ``False`` (the flat parameters) alike.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy

    counts: dict[int, int] = {}
    for fsdp_module in FullyShardedDataParallel.fsdp_modules(module):  # outermost first
        if fsdp_module.sharding_strategy == ShardingStrategy.NO_SHARD:
            replicas = world
        else:
            # an FSDP module's shard group is set when it is wrapped (the default group at the least)
            replicas = max(1, world // cast("dist.ProcessGroup", fsdp_module.process_group).size())
        for parameter in fsdp_module.parameters():
            counts[id(parameter)] = replicas
    return counts


Placement = tuple[int, tuple] | Literal[True] | None
"""What a local tensor holds: ``(mesh id, placements)`` for a DTensor's shard, ``True`` for a plain tensor,
``None`` for an absent gradient."""


@dataclass
class ReplicaCounts:
    """For each parameter of a layout, how many ranks hold the same local values: the divisor that makes a
    world-wide sum count every value once.

    DTensors carry their own placements (those of the tensor being reduced, so a ``Partial`` gradient of a
    ``Replicate`` parameter is handled); plain tensors take ``plain`` (FSDP1 flat-parameter counts, by ``id``)
    or, failing that, the world size (a plain tensor under a sharded strategy is a replica). The count vector
    is cached per combination of placements: the steady state builds one tuple and copies nothing to the
    device.

    Args:
        world: ranks the sums run over.
        plain: replica counts of plain (non-DTensor) parameters by ``id``; the others count ``world``.
    """

    world: int
    plain: dict[int, int] = field(default_factory=dict)
    _cache: dict = field(default_factory=dict, repr=False)

    def of(
        self,
        parameters: Sequence[Tensor | None],
        placements: Sequence[Placement],
        meshes: dict[int, object],
        device: torch.device,
        dtype: torch.dtype,
    ) -> Tensor:
        """The ``[P]`` count vector for local tensors described by ``placements`` (see :func:`local_values`)."""
        key = (device, dtype, tuple(placements))
        if key not in self._cache:
            counts = []
            for parameter, placement in zip(parameters, placements, strict=True):
                if placement is None:
                    counts.append(1)
                elif placement is True:
                    counts.append(self.plain.get(id(parameter), self.world))
                else:
                    counts.append(_replica_count(meshes[placement[0]], placement[1], self.world))
            self._cache[key] = torch.tensor(counts, dtype=dtype, device=device)
        return self._cache[key]

    def replicated_plain_positions(self, parameters: Sequence[Tensor]) -> list[int]:
        """Positions of plain parameters counted as replicas of the whole world (not FSDP1 flat shards): the
        same on every rank that holds the same parameters, whichever gradients are present."""
        return [i for i, p in enumerate(parameters) if not is_dtensor(p) and id(p) not in self.plain]


def _replica_count(mesh: object, placements: tuple, world: int) -> int:
    count = max(1, world // mesh.size())  # type: ignore[attr-defined]
    for dim, placement in enumerate(placements):
        # Replicate (and Partial, once reduced) copies; every kind of shard splits (FSDP2 + TP uses
        # _StridedShard, which is not a Shard subclass and answers is_shard() with False)
        if placement.is_replicate() or placement.is_partial():
            count *= mesh.size(dim)  # type: ignore[attr-defined]
    return count


def sum_over_ranks(local: Tensor, replica_counts: Tensor, group: object | None = None) -> Tensor:
    """Global sums of per-parameter local values (squared norms, ``p``-th powers): each divided by its replica
    count, then one ``all_reduce(SUM)`` over ``group``. Every rank must call it on the same steps."""
    reduced = local / replica_counts
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM, group=group)
    return reduced


def max_over_ranks(local: Tensor, group: object | None = None) -> Tensor:
    """Global maxima of per-parameter local values (copies do not change a maximum): one ``all_reduce(MAX)``."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(local, op=dist.ReduceOp.MAX, group=group)
    return local


_PARTIAL_OPS = {"sum": "SUM", "avg": "SUM", "max": "MAX", "min": "MIN"}


def local_values(
    tensors: Sequence[Tensor | None],
) -> tuple[list[Tensor | None], list[Placement], dict[int, object]]:
    """This rank's values of each tensor, ``Partial`` DTensor placements reduced first.

    Returns ``(locals, placements, meshes)``: plain local tensors for the norm kernels, what each holds (a
    reduced ``Partial`` dimension is described as ``Replicate``) and the meshes by ``id``. Partial tensors of
    one mesh, mesh dimensions, reduce op and dtype travel in one flat ``all_reduce`` per mesh dimension:
    ``SequenceParallel`` norms of a whole model cost one collective, not one per parameter.
    """
    from torch.distributed.tensor import Replicate

    locals_: list[Tensor | None] = []
    placements: list[Placement] = []
    meshes: dict[int, object] = {}
    partial_groups: dict[tuple, list[int]] = {}
    for index, tensor in enumerate(tensors):
        if tensor is None or not is_dtensor(tensor):
            locals_.append(tensor)
            placements.append(None if tensor is None else True)
            continue
        mesh, own = tensor.device_mesh, tensor.placements  # type: ignore[attr-defined]
        meshes[id(mesh)] = mesh
        locals_.append(tensor.to_local())  # type: ignore[attr-defined]
        partial_dims = tuple(d for d, p in enumerate(own) if p.is_partial())
        if partial_dims:
            ops = {own[d].reduce_op for d in partial_dims}
            if len(ops) != 1 or next(iter(ops)) not in _PARTIAL_OPS:
                raise ValueError(
                    f"lightning_gradstab: a gradient has Partial placements {own}; accepted reduce ops: "
                    f"{sorted(_PARTIAL_OPS)} (one per tensor)"
                )
            partial_groups.setdefault((id(mesh), partial_dims, next(iter(ops)), tensor.dtype), []).append(index)
            own = tuple(Replicate() if p.is_partial() else p for p in own)
        placements.append((id(mesh), tuple(own)))
    for (mesh_id, dims, reduce_op, _), indices in partial_groups.items():
        mesh = meshes[mesh_id]
        pieces = [cast(Tensor, locals_[i]) for i in indices]  # the local shards of Partial DTensors: not None
        flat = torch.cat([p.reshape(-1) for p in pieces])
        for dim in dims:
            group = mesh.get_group(dim)  # type: ignore[attr-defined]
            dist.all_reduce(flat, op=getattr(dist.ReduceOp, _PARTIAL_OPS[reduce_op]), group=group)
            if reduce_op == "avg":
                flat /= mesh.size(dim)  # type: ignore[attr-defined]
        offset = 0
        for i, piece in zip(indices, pieces, strict=True):
            numel = piece.numel()
            locals_[i] = flat[offset : offset + numel].view_as(piece)
            offset += numel
    return locals_, placements, meshes


def check_same_parameters_everywhere(names: Sequence[str], local_sq_norms: Tensor, replicated: Sequence[int]) -> None:
    """Refuse parameters that live on some ranks only (expert parallelism with plain tensors): once, at the
    first sharded reduction of a layout, with two small collectives and two host reads.

    Every rank must measure the same number of parameters, or the packed reduction would mix them up; and a
    plain tensor under a sharded strategy is taken to be a replica (positions ``replicated``), so its gradient
    must agree across ranks. A rank-local parameter breaks one or the other; as a DTensor sharded over its
    expert mesh dimension it would be counted exactly.
    """
    if world_size() == 1:
        return
    device = local_sq_norms.device
    count = float(len(names))
    smallest, largest = _min_max(torch.tensor([count], dtype=torch.float64, device=device))
    if smallest[0] != largest[0]:  # every rank sees the same reduced numbers: all raise, none hangs
        raise ValueError(
            f"lightning_gradstab: ranks measure different numbers of trainable parameters ({int(smallest[0])} "
            f"to {int(largest[0])}): parameters that live on some ranks only (expert parallelism with plain "
            "tensors) are not supported. Make them DTensors sharded over the expert mesh dimension "
            "(`distribute_tensor(..., [Shard(0)])`) and their norms are counted exactly."
        )
    # same parameter count, so the same positions everywhere (each rank's plain/DTensor split is the same)
    values = torch.nan_to_num(local_sq_norms[list(replicated)].to(torch.float64), nan=0.0, posinf=1e300)
    smallest, largest = _min_max(values)
    for offset, position in enumerate(replicated):
        low, high = smallest[offset], largest[offset]
        if not math.isclose(high, low, rel_tol=1e-3, abs_tol=1e-30):
            raise ValueError(
                f"lightning_gradstab: the plain (non-DTensor) parameter {names[position]!r} has a different "
                f"gradient on different ranks (squared norms {low:.6g} to {high:.6g}) under a sharded strategy, "
                "where a plain tensor is taken to be a replica. Rank-local parameters (expert parallelism) are "
                "not supported as plain tensors: make them DTensors sharded over the expert mesh dimension, or "
                "wrap their module with `fully_shard` so that its gradient is reduced."
            )


def _min_max(values: Tensor) -> tuple[list[float], list[float]]:
    """Element-wise minimum and maximum over ranks, in one ``all_reduce(MAX)`` of ``[values, -values]``."""
    packed = torch.cat([values, -values])
    dist.all_reduce(packed, op=dist.ReduceOp.MAX)
    host = packed.tolist()
    return [-v for v in host[len(values) :]], host[: len(values)]


def gathered_total_norm(parameters: Iterable[Tensor], fsdp1_root: nn.Module | None = None) -> float:
    """The total gradient L2 norm computed independently of the suite's reduction, in float64: every DTensor
    gradient gathered whole (``full_tensor``), plain gradients taken as they are, or, under FSDP1, every
    parameter of ``fsdp1_root`` unsharded with its gradient (``summon_full_params(with_grads=True)``, which
    needs ``use_orig_params=True``). One collective per gradient: a check for the first step, not for every
    step. Every rank must call it."""
    if fsdp1_root is not None:
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(fsdp1_root, writeback=False, with_grads=True):
            return gathered_total_norm(list(fsdp1_root.parameters()))
    total = torch.zeros((), dtype=torch.float64)
    for parameter in parameters:
        grad = parameter.grad
        if grad is None:
            continue
        if is_dtensor(grad):
            grad = grad.full_tensor()  # type: ignore[attr-defined]
        if grad.is_sparse:
            grad = grad.coalesce().values()
        total += grad.detach().abs().to(torch.float64).square().sum().cpu()
    return math.sqrt(float(total))


SELF_CHECK_RTOL = 1e-4
"""Relative difference between the suite's total norm and the gathered one above which the self-check warns."""
