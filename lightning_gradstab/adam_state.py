"""Adam-state evidence: what Adam is about to do, read from its moments, in one fused pass (plain PyTorch).

Called in ``on_before_optimizer_step`` (after AMP unscaling, before the step), with the gradient the optimizer
is about to use, it computes per parameter, on the device and without a host read:

- **update RMS**: the root mean square of the update Adam will apply, ``lr * m_hat / (sqrt(v_hat) + eps)``
  with the current gradient folded into both moments exactly as ``torch.optim.Adam`` does (``m = b1 m + (1-b1)
  g``, ``v = b2 v + (1-b2) g^2``, bias corrections of the step about to run, ``max(v_max, v)`` under amsgrad;
  Adam's L2 ``weight_decay`` is added to ``g`` first, ``maximize`` negates it). AdamW's decoupled decay
  (``w *= 1 - lr * wd``) is *not* included: it is a deterministic shrink of the weights, not the moments'
  step. In the 32B-run logbook of marin (issues 1368 and 1390) this update spiked about 2x before the loss and
  the gradient norm; Molybog et al. 2023 ("A Theory on Adam Instability in Large-Scale Machine Learning",
  arXiv 2304.09871) show Adam's update growing and losing its descent direction before divergence.
- **outlier fraction**: the share of coordinates whose squared gradient exceeds ``OUTLIER_THRESHOLD`` times
  their second moment before this step, ``g^2 > k * v_hat_{t-1}`` (coordinates that have never seen a
  gradient count once they get one). If a coordinate's gradient were Gaussian with ``v_hat`` its second
  moment, ``g^2 / v_hat`` would be at most chi-square with one degree of freedom (exactly so for a zero mean):
  ``P(chi2_1 > 25) = 5.7e-7``, a "5 sigma" coordinate. A share far above that says the gradient left the scale
  Adam has normalised by, which is the moment Adam's update ``g / sqrt(v)`` stops being bounded (SPAM, Huang
  et al. 2025, resets momentum on the same ratio; Adafactor and StableAdamW clip on its RMS).
- **second-moment change** and **recent gradient ratio**, between this evidence step and the previous one
  (``d`` optimizer steps apart, counted by the state's own ``step``): with ``V`` the sum of a tensor's raw
  ``exp_avg_sq``, ``V_t = b2^d V_{t-d} + (1-b2) sum_j b2^j G_{t-j}`` where ``G`` is the squared gradient norm of
  each step, so ``(V_t - b2^d V_{t-d}) / (1 - b2^d)`` is exactly a weighted mean of ``G`` over the last ``d``
  steps (weights sum to 1), read from the state with no history kept but one number per tensor. Its ratio to
  the bias-corrected ``V_{t-d}`` is the *recent gradient ratio*: about 1 in steady training, near 0 when the
  gradients have fallen far below what the second moment remembers, so that ``v`` decays at its largest rate
  ``b2`` per step, decoupled from ``g^2``. That is the state Bai et al. (ICML 2026) and Molybog et al. 2023
  describe before a spike: a normal-sized gradient arriving on a decayed ``v`` gives an update near
  ``lr * sign(g)`` in every such coordinate at once. *Second-moment change* is ``v_hat_t / v_hat_{t-d}``
  (tensor means; its floor is about ``b2^d``, reached when ``g`` is 0). Both are NaN on the first evidence step.

Sharded states (FSDP1 flat shards, FSDP2/HSDP/TP DTensors) are measured on their local values and combined
with the placement-aware sum of :meth:`~lightning_gradstab.stats.GradientStats.sum_like_weights` (one packed
collective, entered by every rank on the same steps). Optimizers other than ``torch.optim.Adam`` and its
subclasses (``AdamW``; any ``foreach``/``fused``/``capturable`` setting) are not measured:
:meth:`AdamStateTracker.supports` says which.

Example::

    tracker = AdamStateTracker(optimizer)
    evidence = tracker.compute(compute_gradient_stats(layout))  # None before Adam's first step
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor

from lightning_gradstab.distributed import local_shard
from lightning_gradstab.stats import GradientStats, GroupBy

OUTLIER_THRESHOLD = 25.0
"""``k`` of the outlier fraction: ``g^2 > k * v_hat`` (``|g| > 5 sqrt(v_hat)``; a chi-square(1) tail of 5.7e-7)."""

CHUNK_ELEMENTS = 1 << 20
"""Elements measured per fused batch: the pass allocates about three temporaries of this many values at most
(plus any single larger tensor), so its transient memory stays bounded whatever the model size, and on CPU a
batch's temporaries stay in cache across the ~14 elementwise passes."""

# rows of the packed per-parameter sums that are combined across ranks
_UPDATE_SQ, _OUTLIERS, _NUMEL, _V_SUM, _HAS_STATE = range(5)


@dataclass
class AdamEvidence:
    """Adam-state evidence of one optimizer step, per parameter of the layout (``[P]`` device tensors of the
    layout's ``stats_dtype``, NaN where no rank holds Adam state for the parameter).

    Attributes:
        update_rms: RMS of the update Adam is about to apply (learning rate included, decoupled weight decay
            excluded), in the parameter's units.
        outlier_fraction: share of the parameter's coordinates with ``g^2 > OUTLIER_THRESHOLD * v_hat``.
        second_moment_change: mean ``v_hat`` now over its value at the previous evidence step.
        recent_grad_sq_ratio: the ``b2``-weighted mean squared gradient since the previous evidence step over
            what the second moment held then (1: steady; near 0: ``v`` decays decoupled from ``g^2``).
        sums: ``[5, P]`` global per-parameter sums (squared update norm, outlier count, element count, raw
            ``exp_avg_sq`` sum, state present) from which :meth:`group` derives per-group values.
    """

    update_rms: Tensor
    outlier_fraction: Tensor
    second_moment_change: Tensor
    recent_grad_sq_ratio: Tensor
    sums: Tensor
    stats: GradientStats
    _decay_sums: Tensor  # [3, P]: v_hat at the previous evidence step, v_hat now, recent mean g^2 (0: unknown)

    def group(self, group_by: GroupBy = "module") -> tuple[tuple[str, ...], dict[str, Tensor]]:
        """``(group names, {statistic: per-group values})`` for the four statistics, each group's coordinates
        taken together (sums of squares, counts and second-moment sums over the group, then the ratio)."""
        names, index = self.stats.layout.group_index(group_by)
        grouped = torch.zeros((self.sums.shape[0], len(names)), dtype=self.sums.dtype, device=self.sums.device)
        grouped.index_add_(1, index, torch.nan_to_num(self.sums, nan=0.0))
        present = grouped[_HAS_STATE] > 0
        numel = grouped[_NUMEL].clamp_min(1)
        nan = torch.full_like(numel, math.nan)
        decay = torch.zeros_like(grouped[:3]).index_add_(1, index, torch.nan_to_num(self._decay_sums, nan=0.0))
        known = decay[0] > 0
        return names, {
            "update_rms": torch.where(present, (grouped[_UPDATE_SQ] / numel).sqrt(), nan),
            "outlier_fraction": torch.where(present, grouped[_OUTLIERS] / numel, nan),
            "second_moment_change": torch.where(known, decay[1] / decay[0].clamp_min(1e-300), nan),
            "recent_grad_sq_ratio": torch.where(known, decay[2] / decay[0].clamp_min(1e-300), nan),
        }

    def total_outlier_fraction(self) -> Tensor:
        """Share of all measured coordinates that are outliers (a 0-d tensor)."""
        sums = torch.nan_to_num(self.sums)
        return sums[_OUTLIERS].sum() / sums[_NUMEL].sum().clamp_min(1)


class AdamStateTracker:
    """Computes :class:`AdamEvidence` for one Adam-family optimizer; keeps one number per tensor between calls
    (the second moment's sum and step at the previous call), so call it every ``k`` steps, on every rank.

    Args:
        optimizer: a ``torch.optim.Adam`` or subclass (``AdamW``), any ``foreach``/``fused`` setting.
        outlier_threshold: ``k`` of the outlier fraction (default :data:`OUTLIER_THRESHOLD`).

    Example::

        tracker = AdamStateTracker(torch.optim.AdamW(model.parameters()))
    """

    def __init__(self, optimizer: torch.optim.Optimizer, outlier_threshold: float = OUTLIER_THRESHOLD) -> None:
        if not self.supports(optimizer):
            raise TypeError(
                f"`optimizer` must be torch.optim.Adam or a subclass (AdamW), got {type(optimizer).__name__}"
            )
        if isinstance(outlier_threshold, bool) or not isinstance(outlier_threshold, (int, float)) or not (
            outlier_threshold > 0 and math.isfinite(outlier_threshold)
        ):
            raise ValueError(f"`outlier_threshold` must be a positive finite number, got {outlier_threshold!r}")
        self.optimizer = optimizer
        self.outlier_threshold = float(outlier_threshold)
        self._previous: tuple[Tensor, Tensor] | None = None  # (raw exp_avg_sq sums, state steps) at the last call
        self.calls = 0
        """Evidence computed so far (from the second on, the decay statistics have a previous step)."""

    @staticmethod
    def supports(optimizer: object) -> bool:
        """Whether ``optimizer`` is an Adam this tracker reads (``torch.optim.Adam`` and subclasses, ``AdamW``)."""
        optimizer = getattr(optimizer, "_optimizer", optimizer)  # Lightning's wrapper
        return isinstance(optimizer, torch.optim.Adam) and all(
            _number(g["betas"][0]) is not None and _number(g["betas"][1]) is not None
            for g in optimizer.param_groups
        )

    def compute(self, stats: GradientStats, grad_scale: Tensor | None = None) -> AdamEvidence | None:
        """Evidence of the step about to run, for the parameters of ``stats.layout``; ``None`` when this rank
        holds no Adam state yet and the gradients are not sharded (before the optimizer's first step).

        Args:
            stats: the step's shared gradient statistics (their layout and, when sharded, their local gradients
                with ``Partial`` placements already reduced).
            grad_scale: the loss scale still in the gradients (a fused Adam under fp16 unscales inside its
                ``step``, so in the hook its gradients are scaled); ``None`` when they are unscaled.
        """
        layout = stats.layout
        grads = stats.local_gradients()
        position = {id(p): i for i, p in enumerate(layout.parameters)}
        dtype, device = layout.stats_dtype, layout.device
        local = torch.zeros((5, len(layout)), dtype=dtype, device=device)
        steps = torch.ones(len(layout), dtype=dtype, device=device)
        beta2 = torch.full((len(layout),), 0.5, dtype=dtype, device=device)
        measured = False
        state = self.optimizer.state  # a defaultdict: read with .get, so looking creates no entry
        for group in self.optimizer.param_groups:
            members = [
                (position[id(p)], p) for p in group["params"]
                if id(p) in position and grads[position[id(p)]] is not None and "exp_avg_sq" in state.get(p, {})
            ]
            if members:
                measured = True
                self._measure_group(group, members, grads, grad_scale, local, steps, beta2)
        if not measured and not stats.sharded:
            return None
        sums = stats.sum_like_weights(local)  # one collective when sharded; each value counted once
        return self._evidence(stats, sums, steps, beta2)

    def _measure_group(self, group: dict, members: list, grads: list, grad_scale: Tensor | None,
                       local: Tensor, steps: Tensor, beta2_out: Tensor) -> None:
        # supports() admitted the optimizer only when every group's betas read as numbers (not None)
        beta1 = float(cast(float, _number(group["betas"][0])))
        beta2 = float(cast(float, _number(group["betas"][1])))
        eps, lr, weight_decay = group["eps"], group["lr"], group.get("weight_decay", 0.0)
        decoupled = group.get("decoupled_weight_decay", isinstance(self.optimizer, torch.optim.AdamW))
        state = self.optimizer.state
        positions = torch.tensor([i for i, _ in members], dtype=torch.long, device=local.device)
        step_values = torch.stack([torch.as_tensor(state[p]["step"]).reshape(()) for _, p in members])
        t = step_values.to(device=local.device, dtype=local.dtype, non_blocking=True) + 1  # the step about to run
        steps.index_copy_(0, positions, t)
        beta2_out.index_fill_(0, positions, beta2)
        before = 1 - beta2 ** (t - 1)  # bias correction of v_hat_{t-1}
        inv_sqrt_bc2 = (1 - beta2**t).rsqrt()
        lr_over_bc1 = torch.as_tensor(lr, dtype=t.dtype).to(t.device) / (1 - beta1**t)
        update_sq, outliers, numel, v_sum = [], [], [], []
        for chunk in _chunks(members):
            g: _TensorList = [_real(local_shard(grads[i])) for i, _ in chunk]
            m = [_real(local_shard(state[p]["exp_avg"])) for _, p in chunk]
            v = [_real(local_shard(state[p]["exp_avg_sq"])) for _, p in chunk]
            if grad_scale is not None:
                g = torch._foreach_div(g, grad_scale)
            if group.get("maximize", False):
                g = torch._foreach_neg(g)
            if weight_decay and not decoupled:  # Adam's L2 decay: part of the gradient the moments see
                g = torch._foreach_add(g, [_real(local_shard(p.detach())) for _, p in chunk], alpha=weight_decay)
            squares = torch._foreach_mul(g, g)
            # outlier: g^2 > k v_{t-1} / (1 - b2^{t-1})  <=>  (1 - b2^{t-1}) g^2 - k v_{t-1} > 0
            excess = torch._foreach_mul(squares, _scalars(before, chunk, members))
            torch._foreach_sub_(excess, v, alpha=self.outlier_threshold)
            torch._foreach_clamp_min_(excess, 0.0)
            outliers += _norms(excess, 0.0)  # counts the positive entries
            del excess
            v_new = torch._foreach_lerp(v, squares, 1 - beta2)
            del squares
            v_sum += _norms(v_new, 1.0)  # v >= 0: its sum
            if group.get("amsgrad", False):
                torch._foreach_maximum_(v_new, [_real(local_shard(state[p]["max_exp_avg_sq"])) for _, p in chunk])
            torch._foreach_sqrt_(v_new)
            torch._foreach_mul_(v_new, _scalars(inv_sqrt_bc2, chunk, members))
            torch._foreach_add_(v_new, eps)
            m_new = torch._foreach_lerp(m, g, 1 - beta1)
            torch._foreach_div_(m_new, v_new)
            update_sq += [n.square() for n in _norms(m_new, 2.0)]
            numel += [float(x.numel()) for x in g]
        dtype, device = local.dtype, local.device
        local[_UPDATE_SQ].index_copy_(
            0, positions, torch.stack(update_sq).to(dtype=dtype, device=device) * (lr_over_bc1**2)
        )
        local[_OUTLIERS].index_copy_(0, positions, torch.stack(outliers).to(dtype=dtype, device=device))
        local[_NUMEL].index_copy_(0, positions, torch.tensor(numel, dtype=dtype, device=device))
        local[_V_SUM].index_copy_(0, positions, torch.stack(v_sum).to(dtype=dtype, device=device))
        local[_HAS_STATE].index_fill_(0, positions, 1.0)

    def _evidence(self, stats: GradientStats, sums: Tensor, steps: Tensor, beta2: Tensor) -> AdamEvidence:
        present = sums[_HAS_STATE] > 0
        numel = sums[_NUMEL].clamp_min(1)
        nan = torch.full_like(numel, math.nan)
        update_rms = torch.where(present, (sums[_UPDATE_SQ] / numel).sqrt(), nan)
        outliers = torch.where(present, sums[_OUTLIERS] / numel, nan)
        v_now = sums[_V_SUM]
        v_hat_now = v_now / (1 - beta2**steps)
        decay_sums = torch.zeros((3, len(numel)), dtype=sums.dtype, device=sums.device)
        if self._previous is None:
            change, recent = nan, nan
        else:
            v_before, steps_before = self._previous
            apart = steps - steps_before
            decay = beta2**apart
            v_hat_before = v_before / (1 - beta2**steps_before)
            valid = present & (apart > 0) & (v_hat_before > 0)
            recent_sum = (v_now - decay * v_before) / (1 - decay)
            change = torch.where(valid, v_hat_now / v_hat_before, nan)
            recent = torch.where(valid, recent_sum / v_hat_before, nan)
            zero = torch.zeros_like(numel)
            decay_sums = torch.stack([torch.where(valid, v, zero) for v in (v_hat_before, v_hat_now, recent_sum)])
        self._previous = (torch.where(present, v_now, nan), steps.clone())
        self.calls += 1
        return AdamEvidence(update_rms, outliers, change, recent, sums, stats, decay_sums)


_TensorList = list[Tensor] | tuple[Tensor, ...]
"""A list of tensors as built here, or as a ``torch._foreach_*`` op returns it (a tuple in torch's stubs)."""


def _scalars(values: Tensor, chunk: list, members: list) -> list[Tensor]:
    """The 0-d entries of ``values`` (one per member of the group) for the members of ``chunk``."""
    start = next(i for i, member in enumerate(members) if member is chunk[0])
    return list(values[start : start + len(chunk)].unbind())


def _chunks(members: list) -> list[list]:
    chunks: list[list] = []
    current: list = []
    size = 0
    for member in members:
        if current and size + member[1].numel() > CHUNK_ELEMENTS:
            chunks.append(current)
            current, size = [], 0
        current.append(member)
        size += member[1].numel()
    if current:
        chunks.append(current)
    return chunks


def _norms(tensors: _TensorList, ord: float) -> list[Tensor]:
    """Per-tensor norms, accumulated in float32 at least (a count in bfloat16 is exact only up to 256)."""
    if tensors and tensors[0].dtype in (torch.float16, torch.bfloat16):
        return list(torch._foreach_norm(tensors, ord, dtype=torch.float32))
    return list(torch._foreach_norm(tensors, ord))


def _number(value: object) -> float | None:
    """A beta as a Python float (a CPU tensor is read on the host; a device tensor would need a sync: None)."""
    if isinstance(value, Tensor):
        return float(value) if value.device.type == "cpu" and value.numel() == 1 else None
    return float(value) if isinstance(value, (int, float)) else None


def _real(tensor: Tensor) -> Tensor:
    return torch.view_as_real(tensor) if tensor.is_complex() else tensor
