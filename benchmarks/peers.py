"""The methods the divergence benchmark compares, each as a user would switch it on in Lightning.

``METHODS`` maps a name to a factory returning a fresh :class:`Method` (callbacks + ``Trainer`` keyword
arguments) per run. ``resolve_method`` also accepts

- ``guard+key=value+key=value``: ``ExplosionGuard(key=value, ...)`` (values parsed as Python literals), e.g.
  ``guard+max_rung='skip'``;
- ``package.module:factory``: any importable zero-argument factory returning a :class:`Method`.

Peers and the exact settings used:

- ``none``: plain training.
- ``clip1``: ``Trainer(gradient_clip_val=1.0)`` (Lightning's global-norm clipping).
- ``zclip``: the ZClip authors' package (``pip install zclip``), through its own Lightning callback
  ``ZClipLightningCallback`` with the settings of its README's Lightning example: ``mode="zscore", alpha=0.97,
  z_thresh=2.5, clip_option="adaptive_scaling", max_grad_norm=1.0, clip_factor=1.0`` (ZClip's own default
  ``warmup_steps=25``). Note ``max_grad_norm=1.0`` means ZClip also clips every step at 1.0, warm-up included.
- ``olmo_skip``: :class:`OlmoSkipStep`, OLMo-core's skip-step rule re-implemented as a callback.
- ``spike``: Lightning's ``lightning.pytorch.callbacks.SpikeDetection()`` with its defaults (``window=10,
  warmup=1, rtol=2.0, atol=None, finite_only=True``). It looks at the loss in ``on_train_batch_end`` (after the
  update) and raises ``TrainingSpikeException``, which ends ``fit``; it is meant for "stop and resume while
  skipping the saved batches", which a single fit cannot do.
- ``guard``: ``lightning_gradstab.ExplosionGuard()`` with its defaults.
"""

from __future__ import annotations

import ast
import importlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

ZCLIP_SETTINGS: dict[str, Any] = {
    "mode": "zscore",
    "alpha": 0.97,
    "z_thresh": 2.5,
    "clip_option": "adaptive_scaling",
    "max_grad_norm": 1.0,
    "clip_factor": 1.0,
}


@dataclass
class Method:
    """What one method adds to a run: callbacks and ``Trainer`` keyword arguments."""

    callbacks: list[Callback] = field(default_factory=list)
    trainer_kwargs: dict[str, Any] = field(default_factory=dict)


class OlmoSkipStep(Callback):
    """OLMo-core's skip-step rule as a Lightning callback: skip the optimizer step when the current loss *or* the
    current total gradient norm exceeds ``mean + sigma_factor * std`` of the previous ``window`` steps.

    Re-implemented from ``SkipStepOptimizer`` in allenai/OLMo-core (``src/olmo_core/optim/skip_step_optimizer.py``:
    ``rolling_interval_length=128``, ``sigma_factor=6``), keeping its behaviour:

    - both histories keep the last ``window + 1`` values (the judged one included), and every step's value is
      appended *before* judging, whether or not that step is then skipped (OLMo's ``latest_loss`` /
      ``latest_grad_norm`` setters);
    - no step is judged (none is skipped, not even a non-finite one) until ``max(2, window // 2)`` losses have
      been seen, i.e. the first 63 steps at the default window: that is OLMo's warm-up;
    - the statistics use only the finite entries of the history (sample std, ``n - 1``); a non-finite current
      value is always a skip once judging has started, and so is a history with fewer than two finite values;
    - the step proceeds only if both the loss and the grad-norm tests pass.

    OLMo skips inside its optimizer's ``step`` by multiplying the update with a 0/1 factor; here the skip sets
    every gradient to ``None`` in ``on_before_optimizer_step``, which makes every torch optimizer leave weights
    and state unchanged. The loss is the module's ``latest_loss`` (set in ``training_step``, as OLMo's train
    module sets its optimizer's ``latest_loss``); without it only the gradient norm is judged.

    Example::

        trainer = Trainer(callbacks=[OlmoSkipStep()])
    """

    def __init__(self, window: int = 128, sigma_factor: float = 6.0) -> None:
        if not isinstance(window, int) or window < 2:
            raise ValueError(f"window must be an int >= 2, got {window!r}")
        if not sigma_factor > 0:
            raise ValueError(f"sigma_factor must be > 0, got {sigma_factor!r}")
        self.window = window
        self.sigma_factor = float(sigma_factor)
        self.losses: deque[float] = deque(maxlen=window + 1)
        self.grad_norms: deque[float] = deque(maxlen=window + 1)
        self.skipped = 0

    def _passes(self, history: list[float], latest: float) -> bool:
        values = torch.tensor(history, dtype=torch.float64)
        finite = values[torch.isfinite(values)]
        if len(finite) < 2:
            return False
        if not torch.isfinite(torch.tensor(latest)):
            return False
        threshold = finite.mean() + self.sigma_factor * finite.std(unbiased=True)
        return bool(latest <= threshold)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params])))
        loss = getattr(pl_module, "latest_loss", None)
        if loss is not None:
            self.losses.append(float(loss))
        self.grad_norms.append(norm)
        seen = len(self.losses) if loss is not None else len(self.grad_norms)
        if seen < max(2, self.window // 2):
            return
        ok = self._passes(list(self.grad_norms)[:-1], self.grad_norms[-1])
        if loss is not None:
            ok = ok and self._passes(list(self.losses)[:-1], self.losses[-1])
        if not ok:
            self.skipped += 1
            for p in params:
                p.grad = None

    def summary(self) -> dict[str, Any]:
        return {"counts": {"skip": self.skipped}}


def _none() -> Method:
    return Method()


def _clip1() -> Method:
    return Method(trainer_kwargs={"gradient_clip_val": 1.0})


def _zclip() -> Method:
    from zclip import ZClipLightningCallback

    return Method(callbacks=[ZClipLightningCallback(**ZCLIP_SETTINGS)])


def _olmo_skip() -> Method:
    return Method(callbacks=[OlmoSkipStep()])


def _spike() -> Method:
    from lightning.pytorch.callbacks import SpikeDetection

    return Method(callbacks=[SpikeDetection()])


def guard(**kwargs: Any) -> Method:
    """``ExplosionGuard(**kwargs)``; the benchmark reads its actions from ``summary()``."""
    from lightning_gradstab import ExplosionGuard

    return Method(callbacks=[ExplosionGuard(**kwargs)])


METHODS: dict[str, Callable[[], Method]] = {
    "none": _none,
    "clip1": _clip1,
    "zclip": _zclip,
    "olmo_skip": _olmo_skip,
    "spike": _spike,
    "clean": _none,  # the harness swaps the injected batches back for it
    "guard": guard,
}
PEERS = ("none", "clip1", "zclip", "olmo_skip", "spike")


def resolve_method(name: str) -> Callable[[], Method]:
    """The factory for ``name`` (a key of ``METHODS``, ``guard+key=value...`` or ``module:factory``)."""
    if name in METHODS:
        return METHODS[name]
    if name.startswith("guard+"):
        kwargs = {}
        for item in name.split("+")[1:]:
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"method {name!r}: expected guard+key=value, got item {item!r}")
            kwargs[key] = ast.literal_eval(value)
        return lambda: guard(**kwargs)
    if ":" in name:
        module, _, attr = name.partition(":")
        return getattr(importlib.import_module(module), attr)
    raise ValueError(f"unknown method {name!r}; known: {sorted(METHODS)}, 'guard+key=value' or 'module:factory'")
