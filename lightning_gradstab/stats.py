"""Fused gradient statistics for one optimizer step: the only pass over the gradients.

Every callback of the suite reads the numbers computed here. One call of :func:`compute_gradient_stats`
runs ``torch._foreach_norm`` once per (device, dtype) bucket of gradients and keeps every result on the
device: no ``.item()``, no Python branch on a device value. Per-parameter squared norms are the primitive;
group norms, the total norm and non-finite counts are derived from them with tensor ops.

Any floating or complex dtype is measured in a precision that does not narrow it: 16-bit and float32
gradients in float32, float64 and complex128 ones in float64 (the statistics of a layout holding any of
those are float64 throughout, see :attr:`ParameterLayout.stats_dtype`). A complex gradient's L2 norm is
``sqrt(sum |z|^2)``, the norm of its ``view_as_real`` pairs, which keeps the fused real kernel.

Sharded gradients (FSDP1 flat shards, FSDP2/HSDP/tensor-parallel DTensors) hold only part of each gradient,
some of it copied on several ranks. Each local squared norm is divided by the number of ranks holding the same
values (:mod:`lightning_gradstab.distributed`) and the vector is summed across ranks with one ``all_reduce``:
the exact global norm under any mix of ``Shard``, ``Replicate`` and ``Partial`` placements (``Partial``
gradients are reduced first, one collective per mesh dimension, only in layouts that have them). Replicated
gradients (DDP) are already identical on every rank and need no collective.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import torch
from torch import Tensor, nn

from lightning_gradstab.distributed import (
    ReplicaCounts,
    check_same_parameters_everywhere,
    local_shard,
    local_values,
    max_over_ranks,
    sum_over_ranks,
    world_size,
)

GroupBy = Literal["module", "parameter"] | int
"""How parameters are grouped: by owning module, one group per parameter, or by module path cut at a depth."""

_WRAPPER_PREFIXES = re.compile(r"(^|\.)(_fsdp_wrapped_module|_orig_mod|_checkpoint_wrapped_module)\.")


def validate_group_by(group_by: object, argument: str = "group_by") -> GroupBy:
    """Return ``group_by`` if it is a supported grouping, else raise ``ValueError`` naming ``argument``."""
    if group_by in ("module", "parameter"):
        return group_by
    if isinstance(group_by, int) and not isinstance(group_by, bool) and group_by >= 1:
        return group_by
    raise ValueError(
        f"`{argument}` must be 'module', 'parameter' or a positive int (module path depth), got {group_by!r}"
    )


def clean_parameter_name(name: str) -> str:
    """Strip the names that wrappers (DDP, FSDP, torch.compile, activation checkpointing) insert."""
    previous = None
    while previous != name:
        previous, name = name, _WRAPPER_PREFIXES.sub(r"\1", name)
    return name


def group_name(parameter_name: str, group_by: GroupBy) -> str:
    """The group a parameter belongs to, e.g. ``'encoder.0'`` for ``'encoder.0.weight'`` by module."""
    if group_by == "parameter":
        return parameter_name
    parts = parameter_name.split(".")
    module_parts = parts[:-1] or parts
    if group_by == "module":
        return ".".join(module_parts)
    return ".".join(module_parts[: int(group_by)])


@dataclass(frozen=True)
class ParameterLayout:
    """The trainable parameters one optimizer updates, in a fixed order, with display names.

    Built once (at setup); tied parameters appear once, frozen parameters not at all. ``stats_dtype`` is the
    real dtype of every statistic of the layout: float64 if a parameter is float64 or complex128 (their norms
    keep float64 range and precision), else float32 (the common case pays nothing for it).

    Example::

        layout = ParameterLayout.from_module(model, optimizer)
        stats = compute_gradient_stats(layout)
    """

    names: tuple[str, ...]
    parameters: tuple[Tensor, ...]
    _group_index_cache: dict = field(default_factory=dict, compare=False, repr=False)
    _bucket_cache: dict = field(default_factory=dict, compare=False, repr=False)
    _has_dtensors: bool = field(default=False, compare=False, repr=False)
    _replica_counts: dict = field(default_factory=dict, compare=False, repr=False)
    stats_dtype: torch.dtype = field(default=torch.float32, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_has_dtensors", any(hasattr(p, "to_local") for p in self.parameters))
        wide = any(accumulation_dtype(p.dtype) == torch.float64 for p in self.parameters)
        object.__setattr__(self, "stats_dtype", torch.float64 if wide else torch.float32)

    @classmethod
    def from_module(cls, module: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> ParameterLayout:
        """Parameters of ``module`` that require grad (and that ``optimizer`` updates, if given)."""
        in_optimizer: set[int] | None = None
        if optimizer is not None:
            in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        names: list[str] = []
        parameters: list[Tensor] = []
        seen: set[int] = set()
        for name, parameter in module.named_parameters():  # de-duplicates tied parameters
            if not parameter.requires_grad or id(parameter) in seen:
                continue
            if in_optimizer is not None and id(parameter) not in in_optimizer:
                continue
            seen.add(id(parameter))
            names.append(clean_parameter_name(name))
            parameters.append(parameter)
        if in_optimizer is not None:  # parameters the optimizer updates that the module does not own
            assert optimizer is not None  # in_optimizer is set above only when an optimizer is given
            extra = [p for g in optimizer.param_groups for p in g["params"] if id(p) not in seen]
            for index, parameter in enumerate(extra):
                if parameter.requires_grad and id(parameter) not in seen:
                    seen.add(id(parameter))
                    names.append(f"unnamed.{index}")
                    parameters.append(parameter)
        return cls(tuple(names), tuple(parameters))

    def __len__(self) -> int:
        return len(self.parameters)

    def replica_counts(self, process_group: object | None, plain: dict[int, int] | None) -> tuple[ReplicaCounts, bool]:
        """The layout's :class:`~lightning_gradstab.distributed.ReplicaCounts` for ``process_group`` (built on
        first use from ``plain``), and whether this is that first use."""
        key = id(process_group)
        first = key not in self._replica_counts
        if first:
            self._replica_counts[key] = ReplicaCounts(world_size(process_group), dict(plain or {}))
        return self._replica_counts[key], first

    @property
    def holds_dtensors(self) -> bool:
        """Whether some parameter is a DTensor (FSDP2, HSDP, tensor parallelism): its gradient is spread over ranks."""
        return self._has_dtensors

    @property
    def device(self) -> torch.device:
        """Where the statistics live: the device of the first parameter (CPU if there is none)."""
        return self.parameters[0].device if self.parameters else torch.device("cpu")

    def group_index(self, group_by: GroupBy) -> tuple[tuple[str, ...], Tensor]:
        """Group names and, for each parameter, the index of its group (a cached device tensor)."""
        if group_by not in self._group_index_cache:
            group_names: dict[str, int] = {}
            index = [group_names.setdefault(group_name(n, group_by), len(group_names)) for n in self.names]
            self._group_index_cache[group_by] = (
                tuple(group_names),
                torch.tensor(index, dtype=torch.long, device=self.device),
            )
        return self._group_index_cache[group_by]

    def gradients(self) -> list[Tensor | None]:
        """This rank's gradient of each parameter (the local shard of a DTensor), ``None`` where absent."""
        if self._has_dtensors:
            return [local_shard(p.grad) if p.grad is not None else None for p in self.parameters]
        return [p.grad for p in self.parameters]

    def weights(self) -> list[Tensor]:
        """This rank's values of each parameter (the local shard of a DTensor), detached."""
        return [local_shard(p.detach()) for p in self.parameters]

    def buckets(self, tensors: Sequence[Tensor | None], kind: str) -> list[tuple[Tensor | None, list[Tensor], bool]]:
        """``tensors`` (one per parameter, ``None`` = absent) bucketed by (device, dtype, sparse layout).

        Returns ``(positions, members, is_sparse)`` per bucket; ``positions`` is a cached device tensor of
        the members' parameter indices, or ``None`` when one dense bucket holds every tensor in order (the
        common case: nothing to scatter). The cache is keyed by ``kind`` and by which tensors are present:
        autograd keeps each gradient's dtype and layout equal to its parameter's, so nothing else changes,
        and the steady state costs two list comprehensions and no host-to-device copy.
        """
        present = [i for i, t in enumerate(tensors) if t is not None]
        key = (kind, None if len(present) == len(tensors) else tuple(present))
        if key not in self._bucket_cache:
            keyed: dict[tuple, list[int]] = {}
            for i in present:
                t = tensors[i]
                assert t is not None  # present lists the indices of the non-None tensors
                keyed.setdefault((t.device, t.dtype, t.is_sparse), []).append(i)
            entries: list[tuple[list[int], Tensor | None, bool]] = [
                (indices, torch.tensor(indices, dtype=torch.long, device=self.device), is_sparse)
                for (_, _, is_sparse), indices in keyed.items()
            ]
            if len(entries) == 1 and key[1] is None and not entries[0][2]:
                entries = [(entries[0][0], None, False)]
            self._bucket_cache[key] = entries
        entries = self._bucket_cache[key]
        if len(entries) == 1 and entries[0][1] is None:
            return [(None, tensors, False)]  # type: ignore[list-item]
        # cast: the indices of a bucket are those of present (non-None) tensors
        return [
            (positions, cast("list[Tensor]", [tensors[i] for i in indices]), is_sparse)
            for indices, positions, is_sparse in entries
        ]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The real dtype a norm of ``dtype`` values is computed in: float64 for float64 and complex128, else
    float32 (16-bit floats accumulate in float32; float32 and complex64 keep their own precision)."""
    return torch.float64 if dtype in (torch.float64, torch.complex128) else torch.float32


def per_parameter_norms(layout: ParameterLayout, ord: float = 2.0, *, weights: bool = False) -> Tensor:
    """Local per-parameter ``ord``-norms (``layout.stats_dtype``, 0 where grad is None) of the gradients or
    the weights.

    One ``torch._foreach_norm`` per (device, dtype) bucket, scattered into one vector on the layout's device.
    """
    tensors = layout.weights() if weights else layout.gradients()
    return layout_norms(layout, tensors, "weight" if weights else "grad", ord)


def layout_norms(layout: ParameterLayout, tensors: Sequence[Tensor | None], kind: str, ord: float = 2.0) -> Tensor:
    """Per-parameter ``ord``-norms of ``tensors`` (one per parameter of ``layout``, ``None`` counts 0).

    Any floating or complex dtype, one ``torch._foreach_norm`` per (device, dtype) bucket; the result is a
    ``layout.stats_dtype`` vector on the layout's device. ``kind`` names the family of tensors (``"grad"``,
    ``"weight"``, ``"update"``, ...) for the bucket cache: tensors of one kind keep their dtypes step to step.

    Example::

        deltas = torch._foreach_sub(layout.weights(), weights_before)
        update_norms = layout_norms(layout, deltas, "update")
    """
    dtype = layout.stats_dtype
    buckets = layout.buckets(tensors, kind)
    if len(buckets) == 1 and buckets[0][0] is None:
        norms = _dense_norms(buckets[0][1], ord)
        device = layout.device
        if norms.dtype == dtype and norms.device == device:  # the common case: no call into .to on the hot path
            return norms
        return norms.to(device=device, dtype=dtype)
    norms = torch.zeros(len(layout), dtype=dtype, device=layout.device)
    for positions, members, is_sparse in buckets:
        if is_sparse:  # the norm of the coalesced values (duplicate indices summed first)
            values = _dense_norms([g.coalesce().values() for g in members], ord)
        else:
            values = _dense_norms(members, ord)
        assert positions is not None  # only the single dense bucket, returned above, has no positions
        norms.index_copy_(0, positions, values.to(device=layout.device, dtype=dtype))
    return norms


def _dense_norms(tensors: list[Tensor], ord: float) -> Tensor:
    """Norms of same-device, same-dtype tensors in :func:`accumulation_dtype` of their dtype, never narrowed.

    Complex L2 norms go through ``view_as_real`` (``|z|^2 = re^2 + im^2``): the fused kernel covers real
    dtypes only, complex inputs fall back to one kernel per tensor. Other orders of complex tensors need the
    modulus (``|re| + |im|`` is not ``|z|``), so they take the per-tensor path of ``_foreach_norm``.
    """
    dtype = tensors[0].dtype
    if math.isinf(ord) and any(t.numel() == 0 for t in tensors):  # an empty shard (uneven FSDP split) has no max:
        tensors = [t if t.numel() else t.new_zeros(1) for t in tensors]  # 0 adds nothing to a max over ranks
    if dtype.is_complex and ord == 2.0 and dtype != torch.complex32:
        tensors = [torch.view_as_real(t.resolve_conj()) for t in tensors]
        dtype = tensors[0].dtype
    if dtype == torch.complex32:  # no norm kernel for complex half: widen (a copy; rare)
        tensors, dtype = [t.to(torch.complex64) for t in tensors], torch.complex64
    if dtype in (torch.float32, torch.float64, torch.complex64, torch.complex128):
        return torch.stack(torch._foreach_norm(tensors, ord))  # complex in: real norms of matching precision
    return torch.stack(torch._foreach_norm(tensors, ord, dtype=torch.float32))


@dataclass
class GradientStats:
    """Gradient statistics of one optimizer step, kept as device tensors until someone logs or decides.

    Attributes:
        layout: the parameters the statistics describe.
        param_sq_norms: squared L2 norm of each parameter's gradient (global across shards), a ``[P]`` vector
            of ``layout.stats_dtype`` (float32, or float64 when a parameter is float64 or complex128).
        total_norm: L2 norm of all gradients together, a 0-d tensor of the same dtype.
        nonfinite_count: number of parameters whose gradient holds a NaN or Inf, a 0-d ``float32`` tensor.
        sharded: whether local results are combined across ranks (FSDP/DTensor), each value counted once.
        process_group: the group those reductions use (``None``: the default group).
        replica_counts: under ``sharded``, how many ranks hold each parameter's local values.
        self_check: ``(suite total norm, independently gathered total norm)`` when the self-check ran on this
            step (see :func:`lightning_gradstab.distributed.gathered_total_norm`), else ``None``.
        adam: the step's Adam-state evidence (:class:`lightning_gradstab.adam_state.AdamEvidence`: per-parameter
            ``update_rms``, ``outlier_fraction``, ``second_moment_change``, ``recent_grad_sq_ratio``, ``[P]``
            device tensors) when a callback computed it this step (``GradNormMonitor`` every
            ``adam_every_n_steps``), else ``None``; a reader takes it from here instead of recomputing it.
    """

    layout: ParameterLayout
    param_sq_norms: Tensor
    total_norm: Tensor
    nonfinite_count: Tensor
    sharded: bool = False
    process_group: object | None = None
    replica_counts: ReplicaCounts | None = None
    self_check: tuple[float, float] | None = None
    adam: Any = None  # AdamEvidence (adam_state imports this module, so it is not named in the annotation)
    _local_grads: tuple | None = field(default=None, repr=False)  # sharded: (locals, placements, meshes)
    _cache: dict = field(default_factory=dict, repr=False)

    def param_norms(self, ord: float = 2.0) -> Tensor:
        """Per-parameter gradient norms of order ``ord`` (2, 1 or inf); other orders cost one more pass."""
        if ord == 2.0:
            return self.param_sq_norms.sqrt()
        key = ("grad", float(ord))
        if key not in self._cache:
            if not self.sharded:
                self._cache[key] = per_parameter_norms(self.layout, ord)
            else:
                assert self._local_grads is not None
                grads, placements, meshes = self._local_grads
                local = layout_norms(self.layout, grads, "grad", ord)
                if math.isinf(ord):  # copies do not change a maximum
                    self._cache[key] = max_over_ranks(local, self.process_group)
                else:
                    counts = self._counts(placements, meshes)
                    self._cache[key] = sum_over_ranks(local.pow(ord), counts, self.process_group).pow(1 / ord)
        return self._cache[key]

    def local_gradients(self) -> list[Tensor | None]:
        """This rank's gradient values, one per parameter of the layout (``None`` where absent): the local
        shard of a DTensor with ``Partial`` placements already reduced (as measured), else ``p.grad``."""
        if self.sharded and self._local_grads is not None:
            return list(self._local_grads[0])
        return self.layout.gradients()

    def weight_norms(self) -> Tensor:
        """Per-parameter L2 norms of the weights (computed on first request, then cached)."""
        if "weight" not in self._cache:
            if not self.sharded:
                self._cache["weight"] = per_parameter_norms(self.layout, 2.0, weights=True)
            else:
                weights, placements, meshes = local_values([p.detach() for p in self.layout.parameters])
                local = layout_norms(self.layout, weights, "weight").square()
                self._cache["weight_placements"] = (placements, meshes)
                self._cache["weight"] = self.sum_like_weights(local).sqrt()
        return self._cache["weight"]

    def sum_like_weights(self, local: Tensor) -> Tensor:
        """Global per-parameter sums of ``local`` values of tensors laid out like the weights (update norms:
        squared norms of ``weights_after - weights_before``); ``local`` itself when not ``sharded``.

        Each value is counted once across ranks; enters one collective when ``sharded``.
        """
        if not self.sharded:
            return local
        if "weight_placements" not in self._cache:
            _, placements, meshes = local_values([p.detach() for p in self.layout.parameters])
            self._cache["weight_placements"] = (placements, meshes)
        placements, meshes = self._cache["weight_placements"]
        return sum_over_ranks(local, self._counts(placements, meshes, local), self.process_group)

    def _counts(self, placements: list, meshes: dict, like: Tensor | None = None) -> Tensor:
        like = self.param_sq_norms if like is None else like
        assert self.replica_counts is not None
        return self.replica_counts.of(self.layout.parameters, placements, meshes, like.device, like.dtype)

    def group_sums(self, values: Tensor, group_by: GroupBy) -> tuple[tuple[str, ...], Tensor]:
        """Sum per-parameter ``values`` into groups: ``(group_names, sums)``."""
        names, index = self.layout.group_index(group_by)
        sums = torch.zeros(len(names), dtype=values.dtype, device=values.device)
        return names, sums.index_add_(0, index, values)

    def group_norms(self, group_by: GroupBy = "module", ord: float = 2.0) -> tuple[tuple[str, ...], Tensor]:
        """Gradient ``ord``-norm of each group: ``(group_names, norms)`` (the group's gradients as one vector)."""
        if ord == 2.0:
            names, sums = self.group_sums(self.param_sq_norms, group_by)
            return names, sums.sqrt()
        if math.isinf(ord):
            names, index = self.layout.group_index(group_by)
            maxima = torch.zeros(len(names), dtype=self.param_sq_norms.dtype, device=self.param_sq_norms.device)
            return names, maxima.scatter_reduce_(0, index, self.param_norms(ord), "amax", include_self=True)
        names, sums = self.group_sums(self.param_norms(ord).pow(ord), group_by)
        return names, sums.pow(1.0 / ord)

    def total(self, ord: float = 2.0) -> Tensor:
        """Norm of order ``ord`` over all gradients together (2: the cached ``total_norm``)."""
        if ord == 2.0:
            return self.total_norm
        norms = self.param_norms(ord)
        if math.isinf(ord):
            return norms.max() if norms.numel() else norms.new_zeros(())
        return norms.pow(ord).sum().pow(1.0 / ord)

    def group_weight_norms(self, group_by: GroupBy = "module") -> tuple[tuple[str, ...], Tensor]:
        """L2 weight norm of each group: ``(group_names, norms)``."""
        names, sums = self.group_sums(self.weight_norms().square(), group_by)
        return names, sums.sqrt()

    def group_nonfinite_counts(self, group_by: GroupBy = "module") -> tuple[tuple[str, ...], Tensor]:
        """Number of parameters with a non-finite gradient in each group."""
        return self.group_sums((~torch.isfinite(self.param_sq_norms)).float(), group_by)


def compute_gradient_stats(
    layout: ParameterLayout,
    *,
    sharded: bool = False,
    process_group: object | None = None,
    plain_replicas: dict[int, int] | None = None,
) -> GradientStats:
    """One fused pass over the gradients of ``layout``: per-parameter, total and non-finite statistics.

    Args:
        layout: the parameters to measure.
        sharded: the gradients are shards or copies spread over ranks (FSDP, FSDP2, HSDP, tensor parallelism):
            combine them across ranks, each value counted once (DTensor placements say how; plain tensors are
            replicas unless ``plain_replicas`` says otherwise). Set it on every rank or on none: it issues one
            collective (two when some gradients are ``Partial``; one more, once, on a layout's first step, to
            check that every rank measures the same parameters).
        process_group: the group to reduce over (default: the world).
        plain_replicas: ranks holding the same values of each plain (non-DTensor) parameter, by ``id``
            (FSDP1 flat shards: :func:`~lightning_gradstab.distributed.fsdp1_replica_counts`); read once per
            layout.

    Example::

        stats = compute_gradient_stats(ParameterLayout.from_module(model))
        print(stats.total_norm)  # a device tensor; no host sync happened
    """
    if not sharded:
        sq_norms = per_parameter_norms(layout, 2.0).square()
        return GradientStats(layout, sq_norms, sq_norms.sum().sqrt(), _nonfinite_count(sq_norms))
    counts, first_step = layout.replica_counts(process_group, plain_replicas)
    grads, placements, meshes = local_values([p.grad for p in layout.parameters])
    local_sq = layout_norms(layout, grads, "grad").square()
    if first_step:
        check_same_parameters_everywhere(
            layout.names, local_sq, counts.replicated_plain_positions(layout.parameters)
        )
    grad_counts = counts.of(layout.parameters, placements, meshes, local_sq.device, local_sq.dtype)
    sq_norms = sum_over_ranks(local_sq, grad_counts, process_group)
    total_norm = sq_norms.sum().sqrt()
    nonfinite_count = _nonfinite_count(sq_norms)
    local_grads = (grads, placements, meshes)
    return GradientStats(
        layout, sq_norms, total_norm, nonfinite_count, True, process_group, counts, _local_grads=local_grads
    )


def _nonfinite_count(sq_norms: Tensor) -> Tensor:
    """How many entries are NaN or Inf, a 0-d float32 tensor: ``x * 0`` is NaN exactly where ``x`` is not
    finite. Three small kernels of the plainest kind on the step's hot path (``isfinite`` is a composite of
    several, each paid with cold caches right after the pass over every gradient)."""
    return (sq_norms * 0).isnan().sum(dtype=torch.float32)
