"""Per-tensor adaptive gradient clipping: AdaGC's rule as a pure, checkpointable, rank-consistent core.

AdaGC (Wang et al., "AdaGC: Improving Training Stability for Large Language Model Pretraining", arXiv 2502.11034,
ICML 2026) clips each parameter tensor's gradient against an exponential moving average of that tensor's own past
*clipped* gradient norms, so one tensor's outlier is cut before it enters Adam's moments while the others pass
untouched. For tensor ``i`` at step ``t`` (the paper's Algorithm 1):

- warm-up, ``t < warmup_steps`` (the paper's ``T_start``): global clipping, ``h_t = min(lambda_abs / ||g_t||, 1)``
  with ``||g_t||`` the norm over all tensors, ``g^_{t,i} = h_t g_{t,i}``, and the EMA is seeded with the running
  minimum of the clipped norms: ``gamma_{t,i} = min(gamma_{t-1,i}, ||g^_{t,i}||)`` (``||g^_{0,i}||`` at the first
  step);
- afterwards: ``h_{t,i} = min(lambda_rel * gamma_{t-1,i} / ||g_{t,i}||, 1)``, ``g^_{t,i} = h_{t,i} g_{t,i}`` and
  ``gamma_{t,i} = beta * gamma_{t-1,i} + (1 - beta) * ||g^_{t,i}||``.

Defaults are the paper's (also those of ``kozistr/pytorch_optimizer``'s ``AdaGC``): ``beta=0.98``,
``relative_threshold`` (lambda_rel) ``1.05``, ``absolute_threshold`` (lambda_abs) ``1.0``, ``warmup_steps=100``;
``eps=1e-8`` keeps a zero gradient from dividing by zero.

Two choices the paper leaves open, made here so that a guard can rely on them: a tensor whose gradient is
``None`` this step keeps its EMA unchanged, and a tensor whose norm is non-finite is neither scaled nor folded into
its EMA (a non-finite step is the caller's to skip; scaling ``inf`` by 0 would write NaN).

**Interface for the guard** (one object per optimizer, called once per optimizer step, between the unscale and
``optimizer.step``)::

    clip = AdaptiveTensorClip()                  # paper defaults; validated
    factors = clip.clip_(grads)                  # grads: list[Tensor | None], same tensors in the same order
                                                 # every step; scaled in place; returns the [P] float32 factors
                                                 # h_{t,i} on the device (1.0 = untouched), no host sync
    clip.last_norms                              # [P] float32 unclipped per-tensor norms of that step
    clip.state_dict() / clip.load_state_dict(s)  # {"step": int, "ema_norms": [P] float32 CPU tensor or None}

Everything stays on the device: norms come from ``torch._foreach_norm``, the thresholds and EMA are tensor ops,
the scaling is one ``torch._foreach_mul_``; the only host value is the step counter, which every rank advances
together. Under sharding (FSDP2/HSDP/tensor parallelism, DTensor gradients) each tensor's norm is the norm of the
*whole* tensor: local squared norms are divided by their replica counts and summed in one ``all_reduce`` (the
placement-aware helpers of :mod:`lightning_gradstab.distributed`), so every rank computes the same factors and
the same EMA; pass ``replica_counts`` for FSDP1 flat parameters. Every rank must call ``clip_`` on the same steps.

Example::

    clip = AdaptiveTensorClip(warmup_steps=2)
    grads = [torch.ones(3), torch.ones(2)]
    for _ in range(3):
        factors = clip.clip_(grads)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import Tensor

from lightning_gradstab.arguments import check_open_interval, check_positive
from lightning_gradstab.distributed import ReplicaCounts, local_shard, local_values, sum_over_ranks, world_size


class AdaptiveTensorClip:
    """AdaGC's per-tensor adaptive clipping (see the module docstring for the rule, defaults and guarantees).

    Args:
        beta: EMA coefficient of the clipped norms (paper: 0.98).
        relative_threshold: lambda_rel, the factor above its EMA at which a tensor is clipped (paper: 1.05).
        absolute_threshold: lambda_abs, the global-norm ceiling during warm-up (paper: 1.0).
        warmup_steps: steps of global clipping that seed the EMA (paper: 100); at least 1.
        eps: added to each norm before dividing.

    Example::

        clip = AdaptiveTensorClip()  # one per optimizer; call after backward, before optimizer.step()
        factors = clip.clip_([p.grad for p in model.parameters()])  # global clip at 1.0 while warming up
    """

    def __init__(
        self,
        beta: float = 0.98,
        relative_threshold: float = 1.05,
        absolute_threshold: float = 1.0,
        warmup_steps: int = 100,
        eps: float = 1e-8,
    ) -> None:
        self.beta = check_open_interval(beta, "beta", 0.0, 1.0)
        self.relative_threshold = check_positive(relative_threshold, "relative_threshold")
        self.absolute_threshold = check_positive(absolute_threshold, "absolute_threshold")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 1:
            raise ValueError(f"`warmup_steps` must be an int >= 1 (the warm-up seeds the EMA), got {warmup_steps!r}")
        self.warmup_steps = warmup_steps
        self.eps = check_positive(eps, "eps")
        self.step = 0
        self.ema_norms: Tensor | None = None
        self.last_norms: Tensor | None = None

    @torch.no_grad()
    def clip_(
        self,
        grads: Sequence[Tensor | None],
        replica_counts: ReplicaCounts | None = None,
        parameters: Sequence[Tensor] | None = None,
    ) -> Tensor:
        """Clip ``grads`` in place by AdaGC's rule for this step; return the ``[P]`` float32 factors ``h_{t,i}``.

        ``grads`` must list the same tensors in the same order every step (``None`` where a tensor has no gradient
        this step). ``replica_counts``/``parameters``: for FSDP1 flat parameters (their replica counts by ``id``
        of the parameter); by default plain tensors count as replicas on every rank, DTensors by their placements.
        """
        grads = list(grads)
        if not all(g is None or isinstance(g, Tensor) for g in grads):
            raise TypeError("`grads` must be a sequence of tensors or None")
        present = [i for i, g in enumerate(grads) if g is not None]
        if not present:
            raise ValueError("`grads` holds no gradient (every entry is None)")
        if self.ema_norms is not None and len(self.ema_norms) != len(grads):
            raise ValueError(
                f"`grads` has {len(grads)} entries but the EMA holds {len(self.ema_norms)}: pass the same tensors "
                "in the same order every step"
            )
        locals_, placements, meshes = local_values(grads)
        device = next(locals_[i] for i in present).device  # type: ignore[union-attr]
        local_sq = torch.zeros(len(grads), dtype=torch.float32, device=device)
        norms = torch._foreach_norm([locals_[i] for i in present])  # type: ignore[misc]
        local_sq[present] = torch.stack([n.float() for n in norms]).square()
        counts = (replica_counts or ReplicaCounts(world_size())).of(
            list(parameters) if parameters is not None else grads, placements, meshes, device, torch.float32
        )
        norms_all = sum_over_ranks(local_sq, counts).sqrt()  # [P] whole-tensor norms, identical on every rank
        has_grad = torch.zeros(len(grads), dtype=torch.bool, device=device)
        has_grad[present] = True
        usable = has_grad & norms_all.isfinite()
        if self.ema_norms is None:
            self.ema_norms = torch.full((len(grads),), math.inf, dtype=torch.float32, device=device)
        ema = self.ema_norms.to(device)
        one = torch.ones((), dtype=torch.float32, device=device)
        if self.step < self.warmup_steps:
            total = norms_all.where(usable, torch.zeros_like(norms_all)).square().sum().sqrt()
            factors = torch.minimum(self.absolute_threshold / (total + self.eps), one).expand(len(grads)).clone()
            ema = torch.where(usable, torch.minimum(ema, factors * norms_all), ema)
        else:
            factors = torch.minimum(self.relative_threshold * ema / (norms_all + self.eps), one)
            factors = torch.where(usable, factors, one)
            ema = torch.where(usable, self.beta * ema + (1.0 - self.beta) * factors * norms_all, ema)
        self.ema_norms = ema
        self.last_norms = norms_all
        targets = [  # present: the indices of the non-None gradients
            local_shard(cast(Tensor, grads[i]))
            for i in present
        ]
        torch._foreach_mul_(targets, [factors[i].to(t.dtype) for i, t in zip(present, targets, strict=True)])
        self.step += 1
        return factors

    def state_dict(self) -> dict[str, Any]:
        """What resuming needs: the step counter and the per-tensor EMA (on the CPU; ``None`` before step 1)."""
        return {"step": self.step, "ema_norms": None if self.ema_norms is None else self.ema_norms.detach().cpu()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output, refusing a malformed one (the EMA moves to the gradients' device
        at the next :meth:`clip_`)."""
        if not isinstance(state_dict, dict) or set(state_dict) != {"step", "ema_norms"}:
            keys = sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict).__name__
            raise ValueError(f"`state_dict` must have exactly the keys ['ema_norms', 'step'], got {keys}")
        step, ema = state_dict["step"], state_dict["ema_norms"]
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"`state_dict['step']` must be an int >= 0, got {step!r}")
        if ema is not None:
            if not isinstance(ema, Tensor) or ema.ndim != 1 or not ema.is_floating_point():
                raise ValueError(f"`state_dict['ema_norms']` must be a 1-d float tensor or None, got {ema!r}")
            if bool((ema < 0).any()) or bool(ema.isnan().any()):
                raise ValueError("`state_dict['ema_norms']` must hold norms >= 0 (no NaN)")
            ema = ema.detach().float().clone()
        elif step > 0:
            raise ValueError(f"`state_dict['ema_norms']` is None but `step` is {step}: the EMA is missing")
        self.step, self.ema_norms = step, ema
