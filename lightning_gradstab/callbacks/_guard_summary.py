"""The end-of-fit words of the guard: concrete configuration changes, and the console table of its actions."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl

from lightning_gradstab.policy import ExplosionPolicy, PolicyConfig
from lightning_gradstab.report import console_print


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
    if counts.get("spike", 0) + counts.get("growth", 0) + counts.get("drift", 0) > 0:
        reference = min(policy.statistics.typical_norm, policy.reference_norm)
        if math.isfinite(reference):
            advice.append(f"gradient spikes: clip at about {config.growth_factor * reference:.3g} (gradient_clip_val)")
    if counts.get("loss_spike"):
        advice.append(f"loss spikes (first at step {first['loss_spike']}): check those batches for corrupt data")
    if counts.get("nonfinite"):
        advice.append(f"non-finite gradients (first at step {first['nonfinite']}): check the inputs and the loss")
    if counts.get("loss_scale_collapse"):
        advice.append("the fp16 loss scale collapsed: use bf16, or find the layer whose activations overflow fp16")
    return advice


def print_guard_summary(summary: dict[str, Any], trainer: pl.Trainer | None = None) -> None:
    from rich.table import Table

    table = Table(title="ExplosionGuard summary")
    for column in ("optimizer", "final level", "lr scale", "actions", "worst spikes (step: z / norm)"):
        table.add_column(column)
    for index, entry in summary["optimizers"].items():
        actions = ", ".join(f"{name}={count}" for name, count in sorted(entry["counts"].items())) or "none"
        spikes = "; ".join(
            f"{s['step']}: {s['zscore']:.1f} / {s['total_norm']:.3g}"
            if s["total_norm"] is not None
            else f"{s['step']}: {s['zscore']:.1f} / nan"
            for s in entry["worst_spikes"]
        )
        level = f"{entry['final_level']} ({entry['final_rung']})"
        table.add_row(index, level, f"{entry['lr_scale']:.3g}", actions, spikes or "none")
    stop = [f"[bold red]stopped:[/] {summary['stop_reason']}"] if summary["stopped"] else []
    console_print(table, *stop, trainer=trainer)  # through the progress bar, which would draw over it
