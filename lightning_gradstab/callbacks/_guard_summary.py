"""The end-of-fit words of the guard: what it did as plain data, concrete configuration changes, and the console
table of its actions."""

from __future__ import annotations

import math

import lightning.pytorch as pl

from lightning_gradstab.console import console_print
from lightning_gradstab.guard.config import EVIDENCE, RUNGS, SCALE_INVARIANT_MAX_NORM, PolicyConfig
from lightning_gradstab.guard.ladder import ExplosionPolicy
from lightning_gradstab.guard.summary import GuardSummary, OptimizerSummary


def guard_summary(
    by_optimizer: dict[int, ExplosionPolicy], base_lrs: dict[int, float], config: PolicyConfig, stop_reason: str | None
) -> GuardSummary:
    """What the guard did, per optimizer: see :meth:`~lightning_gradstab.ExplosionGuard.summary`."""
    optimizers = {}
    for index, policy in sorted(by_optimizer.items()):
        counts = policy.counts
        evidence: dict[str, int] = {}
        for anomaly, kind in EVIDENCE.items():
            if counts.get(anomaly):
                evidence[kind] = evidence.get(kind, 0) + counts[anomaly]
        base_lr = base_lrs.get(index)
        final_lr = None if base_lr is None else base_lr * policy.lr_scale
        optimizers[index] = OptimizerSummary(
            final_level=policy.level,
            final_rung=RUNGS[policy.level],
            lr_scale=policy.lr_scale,
            final_lr=final_lr,
            counts=counts,
            evidence=evidence,
            first_anomaly_steps=policy.first_anomaly_steps,
            worst_spikes=tuple(policy.log.worst_records),
            advice=tuple(guard_advice(policy, base_lr, config)),
        )
    return GuardSummary(stopped=stop_reason is not None, stop_reason=stop_reason, optimizers=optimizers)


def guard_advice(policy: ExplosionPolicy, base_lr: float | None, config: PolicyConfig) -> list[str]:
    """Concrete configuration changes that would have avoided what the guard had to do."""
    counts, first = policy.counts, policy.first_anomaly_steps
    advice = []
    scale = policy.lr_scale
    if scale < 1.0 and (counts.get("divergence") or counts.get("lr_backoff") or counts.get("rollback")):
        lr = f"lr={base_lr * scale:.3g}" if base_lr is not None else f"{scale:.3g} x your learning rate"
        advice.append(f"start at {lr}: the run ended at {scale:.3g} x its learning rate after back-offs")
    damaged = any(counts.get(name) for name in ("divergence", "nonfinite", "loss_scale_collapse"))
    if counts.get("update_ratio") and damaged:  # an oversized step that was clipped and did no harm needs no advice
        advice.append(
            f"SGD steps moved the weights by more than {config.max_update_ratio:g} of their norm (first at step "
            f"{first['update_ratio']}): lower the learning rate or add a learning-rate warm-up"
        )
    # a warm-up is advised from early damage only: early gradient spikes are what a warm-up's clipping handles
    early = [name for name in ("divergence", "nonfinite") if first.get(name, math.inf) <= 25]
    if early:
        advice.append(f"{', '.join(early)} within the first 25 steps: add a learning-rate warm-up")
    ceiling = _ceiling(config)
    if counts.get("max_norm") and ceiling is not None:
        advice.append(
            f"the guard clipped {counts['max_norm']} of {policy.steps} steps at its ceiling max_norm={ceiling:g}; "
            f"without the guard, gradient_clip_val={ceiling:g} keeps that clipping"
        )
    if counts.get("spike", 0) + counts.get("growth", 0) + counts.get("drift", 0) > 0:
        reference = min(policy.statistics.typical_norm, policy.reference_norm)
        suggested = config.growth_factor * reference
        # a clip above the ceiling the run already clipped at would loosen it: the ceiling sentence says enough
        if math.isfinite(reference) and (ceiling is None or not counts.get("max_norm") or suggested < ceiling):
            advice.append(f"gradient spikes: clip at about {suggested:.3g} (gradient_clip_val)")
    if counts.get("loss_spike"):
        advice.append(f"loss spikes (first at step {first['loss_spike']}): check those batches for corrupt data")
    if counts.get("nonfinite"):
        advice.append(f"non-finite gradients (first at step {first['nonfinite']}): check the inputs and the loss")
    if counts.get("loss_scale_collapse"):
        advice.append("the fp16 loss scale collapsed: use bf16, or find the layer whose activations overflow fp16")
    if counts.get("attention_logit_cap"):
        advice.append(
            f"attention logits grew past the cap ({counts['attention_logit_cap']} layer-steps rescaled by QK-clip): "
            "add qk-layernorm (Wortsman et al. 2023), or keep the cap on"
        )
    if counts.get("relative_update"):
        advice.append(
            f"{counts['relative_update']} optimizer steps would have moved a weight matrix by more than "
            "max_relative_update of its scale and were shrunk to it: lower the learning rate or add a warm-up "
            "(a post-LN transformer needs one, Xiong et al. 2020)"
        )
    return advice


def effective_lr_metric(trainer: pl.Trainer, index: int, lr_scale: float) -> dict[str, float]:
    """The learning rate optimizer ``index`` really steps with (its first param group's scheduled rate times the
    guard's back-off scale), under ``LearningRateMonitor``'s name for that optimizer plus ``/gradstab_effective``
    (``lr-SGD/gradstab_effective``), so it is charted in the section where that monitor's ``lr-SGD`` is.
    Empty when the optimizer has no numeric ``lr``."""
    optimizers = trainer.optimizers
    if index >= len(optimizers) or not optimizers[index].param_groups:
        return {}
    lr = optimizers[index].param_groups[0].get("lr")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)):
        return {}
    name = type(optimizers[index]).__name__
    same_before = sum(type(o).__name__ == name for o in optimizers[:index])  # LearningRateMonitor: lr-Adam-1
    return {f"lr-{name}{f'-{same_before}' if same_before else ''}/gradstab_effective": float(lr) * lr_scale}


def _ceiling(config: PolicyConfig) -> float | None:
    """The gradient-norm ceiling the guard clips at when it acts (``"auto"``: the Adam-family one)."""
    if config.max_norm == "auto":
        return SCALE_INVARIANT_MAX_NORM
    return None if config.max_norm is None else float(config.max_norm)


def print_guard_summary(summary: GuardSummary, trainer: pl.Trainer | None = None) -> None:
    """The table of what the guard did, per optimizer (cells wrap between words to the console's width)."""
    from rich.table import Table

    table = Table(title="ExplosionGuard summary")
    table.add_column("optimizer", no_wrap=True)
    table.add_column("final level", no_wrap=True)
    table.add_column("lr scale", no_wrap=True)
    table.add_column("actions", ratio=1, min_width=12)
    table.add_column("worst spikes (step: z / norm)", ratio=1, min_width=12)
    for index, entry in sorted(summary.optimizers.items()):
        actions = ", ".join(f"{name}={count}" for name, count in sorted(entry.counts.items())) or "none"
        spikes = "; ".join(
            f"{s.step}: {s.zscore:.1f} / " + (f"{s.total_norm:.3g}" if s.total_norm is not None else "nan")
            for s in entry.worst_spikes
        )
        level = f"{entry.final_level} ({entry.final_rung})"
        table.add_row(str(index), level, f"{entry.lr_scale:.3g}", actions, spikes or "none")
    stop = [f"[bold red]stopped:[/] {summary.stop_reason}"] if summary.stopped else []
    console_print(table, *stop, trainer=trainer)  # through the progress bar, which would draw over it
