"""fp16-mixed and bf16-mixed trainings with GradNormMonitor + ExplosionGuard and an injected spike and NaN.

Part of ``scripts/gpu_check.sh``. For each precision it trains the guard tests' regression MLP for 80 steps,
multiplies the gradients by 1e4 at step 40 (a spike) and makes the loss NaN at step 60, and checks what a
user relies on:

- the run finishes every step with finite weights;
- the spike step is acted on (clipped or skipped) and the weights after it stay within 10x the typical update;
- the NaN step changes no weight: fp16's ``GradScaler`` skips it and the guard counts an overflow, bf16 has
  no scaler and the guard skips the step itself;
- the monitor logged a finite total norm on every finite step.

It writes ``precision.json`` (per precision: checks, guard summary, events) and exits 1 if a check failed.
``--device cpu`` runs the same checks on the CPU (bf16 autocast, and fp16 through Lightning's CPU
``GradScaler`` plugin) so the script itself is tested without a GPU.

Usage::

    python scripts/gpu_precision_check.py --device cuda --out gpu_results
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402
from lightning.pytorch.loggers.logger import Logger  # noqa: E402

from lightning_gradstab import ExplosionGuard, GradNormMonitor  # noqa: E402
from lightning_gradstab.callbacks.guard import EVENTS_FILENAME  # noqa: E402
from tests.scripts.guard_models import QUIET, TinyRegression, regression_loader  # noqa: E402

STEPS, SPIKE_STEP, NAN_STEP = 80, 40, 60


class _Scalars(Logger):
    name, version = "scalars", 0

    def __init__(self) -> None:
        super().__init__()
        self.metrics: dict[str, dict[int, float]] = {}

    def log_hyperparams(self, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        for key, value in metrics.items():
            self.metrics.setdefault(key, {})[int(step or 0)] = float(value)


class _WeightsAfterEachStep(Callback):
    def __init__(self) -> None:
        self.weights: dict[int, torch.Tensor] = {}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
        self.weights[trainer.global_step] = pl_module.flat_weights().float().cpu()


def run(precision: str, device: str, out: Path) -> dict[str, Any]:
    """Train once; return the checks and what the guard did."""
    plugins: list[Any] = []
    if device == "cpu" and precision == "16-mixed":
        from lightning.pytorch.plugins.precision import MixedPrecision

        plugins, precision_option = [MixedPrecision("16-mixed", "cpu")], None  # CPU "16-mixed" would be bf16
    else:
        precision_option = precision
    log_dir = out / f"run-{precision}"
    guard, logger, probe = ExplosionGuard(console_summary=False), _Scalars(), _WeightsAfterEachStep()
    trainer = pl.Trainer(
        accelerator="gpu" if device == "cuda" else "cpu",
        devices=1,
        max_steps=STEPS,
        precision=precision_option,
        plugins=plugins or None,
        callbacks=[GradNormMonitor(log_every_n_steps=1), guard, probe],
        logger=logger,
        log_every_n_steps=1,
        default_root_dir=str(log_dir),
        **QUIET,
    )
    model = TinyRegression(faults={SPIKE_STEP: "scale_grad", NAN_STEP: "nan_loss"})
    trainer.fit(model, regression_loader())

    events_path = log_dir / EVENTS_FILENAME
    events = [json.loads(line) for line in events_path.read_text().splitlines()] if events_path.exists() else []
    weights = probe.weights
    updates = [float((weights[s] - weights[s - 1]).norm()) for s in range(2, STEPS + 1) if s - 1 in weights]
    typical_update = sorted(updates)[len(updates) // 2]
    spike_update = float((weights[SPIKE_STEP + 1] - weights[SPIKE_STEP]).norm())
    totals = logger.metrics.get("gradstab/grad_norm/total", {})
    spike_actions = [e.get("actions") for e in events if e.get("step") == SPIKE_STEP + 1]
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    checks = {
        "finished every step": trainer.global_step == STEPS,
        "weights finite": bool(torch.isfinite(weights[STEPS]).all()),
        "spike step acted on": any(a and set(a) & {"clip", "skip"} for a in spike_actions),
        "spike update within 10x typical": spike_update <= 10 * typical_update,
        "NaN step changed no weight": bool(torch.equal(weights[NAN_STEP + 1], weights[NAN_STEP])),
        "total norm logged finite on finite steps": all(
            math.isfinite(v) for s, v in totals.items() if s not in (NAN_STEP,)
        )
        and len(totals) >= STEPS - 2,
    }
    return {
        "precision": precision,
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "checks": checks,
        "passed": all(checks.values()),
        "typical_update_norm": typical_update,
        "spike_update_norm": spike_update,
        "final_loss_scale": None if scaler is None else float(scaler.get_scale()),
        "guard_summary": guard.summary(),
        "events": events,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    parser.add_argument(
        "--precisions", nargs="+", choices=["16-mixed", "bf16-mixed"], default=["16-mixed", "bf16-mixed"]
    )
    parser.add_argument("--out", default="gpu_results", help="folder for precision.json and the runs' logs")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_precision_check.py: --device cuda needs a CUDA device; torch sees none.", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = [run(precision, args.device, out) for precision in args.precisions]
    (out / "precision.json").write_text(json.dumps(results, indent=2, default=str))
    for result in results:
        failed = [name for name, ok in result["checks"].items() if not ok]
        print(f"{result['precision']}: {'PASS' if not failed else 'FAIL: ' + ', '.join(failed)}")
    return 0 if all(result["passed"] for result in results) else 1


if __name__ == "__main__":
    sys.exit(main())
