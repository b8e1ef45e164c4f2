"""Plot a real run that ExplosionGuard rescues: gradient norm, clip threshold, ladder level, loss.

The scenario is the classic one: a learning-rate warm-up that climbs past the stable learning rate. A tanh
MLP regresses a smooth function with SGD while the LR rises linearly for 150 steps to 40x its stable value.
Unguarded, the gradient norm takes off and the run ends in NaN. Guarded (defaults, plus the monitor for the
norm curve), spikes are clipped, the worst steps skipped, and the learning-rate back-off holds the effective
LR where the run stays stable, while the scheduler keeps its own values.

Usage::

    python scripts/plot_rescue.py                    # writes docs/img/guard_rescue.png
    python scripts/plot_rescue.py --out /tmp/rescue.png
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers.logger import Logger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradstab import ExplosionGuard, GradNormMonitor

STEPS, WARMUP_STEPS, STABLE_LR, PEAK_LR = 1000, 150, 0.05, 2.0


class RecordingLogger(Logger):
    """Keeps every scalar in memory: ``metrics[name] -> {step: value}``."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics: dict[str, dict[int, float]] = defaultdict(dict)

    name, version = "recording", 0

    def log_hyperparams(self, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        for key, value in metrics.items():
            self.metrics[key][int(step or 0)] = float(value)


class WarmupToTooHighLR(pl.LightningModule):
    """Tanh MLP, SGD with a linear LR warm-up from ``STABLE_LR`` to ``PEAK_LR`` (40x: unstable)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1)
        )

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("loss", loss, on_step=True)
        return loss

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=PEAK_LR)
        def warmup(step: int) -> float:  # a multiplier of PEAK_LR
            return (STABLE_LR + (PEAK_LR - STABLE_LR) * min(step, WARMUP_STEPS) / WARMUP_STEPS) / PEAK_LR

        ramp = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": ramp, "interval": "step"}}


def data() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 8, generator=generator)
    y = torch.sin(x @ torch.randn(8, 1, generator=generator)) + 0.1 * torch.randn(1024, 1, generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True, generator=generator)


def run(guarded: bool, root: Path) -> RecordingLogger:
    """Train once and return everything that was logged."""
    logger = RecordingLogger()
    callbacks: list[pl.Callback] = [GradNormMonitor(log_every_n_steps=1)]
    if guarded:
        callbacks.append(ExplosionGuard(log_every_n_steps=1, console_summary=False))
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=STEPS,
        logger=logger,
        callbacks=callbacks,
        log_every_n_steps=1,
        default_root_dir=str(root / ("guarded" if guarded else "unguarded")),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(WarmupToTooHighLR(), data())
    return logger


def plot(unguarded: RecordingLogger, guarded: RecordingLogger, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    def series(logger: RecordingLogger, name: str) -> tuple[list[int], list[float]]:
        points = sorted(logger.metrics.get(name, {}).items())
        return [s for s, _ in points], [v if math.isfinite(v) else math.nan for _, v in points]

    figure = Figure(figsize=(9, 7.5), layout="constrained")
    norm_axes, level_axes, loss_axes = figure.subplots(3, 1, sharex=True, height_ratios=[3, 1.3, 2])
    steps, norms = series(unguarded, "gradstab/grad_norm/total")
    norm_axes.plot(steps, norms, color="0.6", lw=1, label="total grad norm, unguarded")
    steps, norms = series(guarded, "gradstab/grad_norm/total")
    norm_axes.plot(steps, norms, color="tab:blue", lw=1, label="total grad norm, guarded (before the guard acts)")
    steps, thresholds = series(guarded, "gradstab/clip_threshold")
    norm_axes.plot(steps, thresholds, color="tab:orange", lw=1.2, label="clip threshold")
    skipped = [s for s, v in guarded.metrics["gradstab/skipped"].items() if v > 0]
    if skipped:
        top = max(v for v in norms if math.isfinite(v))
        norm_axes.scatter(skipped, [top] * len(skipped), marker="v", color="tab:red", s=12, label="skipped step")
    _limit_to(norm_axes, norms, unguarded, "gradstab/grad_norm/total")
    norm_axes.set_ylabel("gradient norm")
    norm_axes.legend(loc="upper right", fontsize=8)
    norm_axes.set_title("ExplosionGuard rescue: SGD with LR warm-up to 40x the stable LR")

    steps, levels = series(guarded, "gradstab/level")
    level_axes.step(steps, levels, where="post", color="tab:purple")
    level_axes.set_yticks(range(7), ["observe", "clip", "tight clip", "skip", "LR back-off", "rollback", "stop"],
                          fontsize=7)
    level_axes.set_ylabel("ladder level")
    scale_axes = level_axes.twinx()
    steps, scales = series(guarded, "gradstab/lr_scale")
    scale_axes.plot(steps, scales, color="tab:green", lw=1)
    scale_axes.set_yscale("log")
    scale_axes.set_ylabel("LR scale", color="tab:green")

    for logger, color, label in ((unguarded, "0.6", "unguarded"), (guarded, "tab:blue", "guarded")):
        steps, losses = series(logger, "loss")
        loss_axes.plot(steps, losses, color=color, lw=1, label=f"training loss, {label}")
    _limit_to(loss_axes, losses, unguarded, "loss")
    loss_axes.set_xlabel("optimizer step")
    loss_axes.set_ylabel("loss")
    loss_axes.legend(loc="upper right", fontsize=8)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=80)


def _limit_to(axes: Any, guarded_values: list[float], unguarded: RecordingLogger, name: str) -> None:
    """Log scale fitted to the guarded curve; the unguarded one leaves the chart, so say where it went."""
    finite = [v for v in guarded_values if math.isfinite(v) and v > 0]
    axes.set_yscale("log")
    axes.set_ylim(min(finite) / 2, max(finite) * 30)
    points = sorted(unguarded.metrics.get(name, {}).items())
    gone = next((s for s, v in points if not math.isfinite(v) or v > max(finite) * 30), None)
    if gone is not None:
        axes.annotate(f"unguarded: off the chart at step {gone}, then NaN", (gone, max(finite) * 20),
                      fontsize=8, color="0.4", ha="left", va="top", xytext=(5, 0), textcoords="offset points")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs/img/guard_rescue.png")
    parser.add_argument("--root", type=Path, default=Path("outputs/plot_rescue"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    unguarded, guarded = run(False, args.root), run(True, args.root)
    plot(unguarded, guarded, args.out)
    final = {name: sorted(logger.metrics["loss"].items())[-1][1] for name, logger in (("unguarded", unguarded),
                                                                                     ("guarded", guarded))}
    print(f"final training loss: unguarded {final['unguarded']:.4g}, guarded {final['guarded']:.4g}; wrote {args.out}")


if __name__ == "__main__":
    main()
