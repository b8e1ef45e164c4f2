"""The methods the divergence benchmark compares, each as a user would switch it on in Lightning.

``METHODS`` maps a name to a factory returning a fresh :class:`Method` (callbacks + ``Trainer`` keyword
arguments) per run. ``resolve_method`` also accepts

- ``guard+key=value+key=value``: ``ExplosionGuard(key=value, ...)`` (values parsed as Python literals), e.g.
  ``guard+max_rung='skip'``; a key that is a :class:`~lightning_gradstab.PolicyConfig` field and not a guard
  argument goes into its ``config`` (``guard+max_update_ratio=0.1``);
- ``package.module:factory``: any importable zero-argument factory returning a :class:`Method`.

Peers and the exact settings used:

- ``none``: plain training.
- ``clip1``: ``Trainer(gradient_clip_val=1.0)`` (Lightning's global-norm clipping).
- ``zclip``: the ZClip authors' package (``pip install zclip``), through its own Lightning callback
  ``ZClipLightningCallback`` with the settings of its README's Lightning example: ``mode="zscore", alpha=0.97,
  z_thresh=2.5, clip_option="adaptive_scaling", max_grad_norm=1.0, clip_factor=1.0`` (ZClip's own default
  ``warmup_steps=25``). Note ``max_grad_norm=1.0`` means ZClip also clips every step at 1.0, warm-up included.
- ``agc``: :class:`AdaptiveGradientClipping`, NFNet's adaptive gradient clipping (Brock et al. 2021) re-implemented
  as a callback, with the defaults of timm's ``timm.utils.agc.adaptive_clip_grad`` (``clip_factor=0.01,
  eps=1e-3``) and, as the paper does, not on the final linear layer (of each optimizer's parameters).
- ``adagc``: :class:`AdaGCClipping`, AdaGC's per-tensor adaptive clipping (Wang et al., arXiv 2502.11034, ICML
  2026) with the paper's defaults (``beta=0.98, lambda_rel=1.05``, global clipping at 1.0 for the first 100
  steps), through the pure core :class:`lightning_gradstab.per_tensor_clip.AdaptiveTensorClip`.
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


AGC_SETTINGS: dict[str, Any] = {"clip_factor": 0.01, "eps": 1e-3}


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


def unitwise_norm(x: torch.Tensor) -> torch.Tensor:
    """The L2 norm of each *unit* of a weight: one norm per output row of a linear weight, per output channel of a
    convolution kernel (every dimension but the first reduced, kept for broadcasting); a bias, gain or scalar
    (``ndim <= 1``) is one unit, its whole-vector norm (as the NFNet authors' ``unitwise_norm`` does)."""
    if x.ndim <= 1:
        return torch.linalg.vector_norm(x)
    return torch.linalg.vector_norm(x, dim=tuple(range(1, x.ndim)), keepdim=True)


@torch.no_grad()
def adaptive_clip_(params: list[torch.Tensor], clip_factor: float = 0.01, eps: float = 1e-3) -> int:
    """Adaptive gradient clipping (Brock et al. 2021, eq. 3), in place on ``p.grad`` of every ``p`` in ``params``.

    For each unit ``i`` with weights ``W_i`` and gradient ``G_i``: when ``||G_i|| / max(||W_i||, eps) >
    clip_factor``, ``G_i`` is rescaled to norm ``clip_factor * max(||W_i||, eps)`` (direction kept); otherwise it
    is left alone. ``eps`` keeps zero-initialised weights (biases) from having their gradients clipped to zero.
    Returns the number of units clipped.
    """
    clipped = 0
    for p in params:
        if p.grad is None:
            continue
        limit = clip_factor * unitwise_norm(p.detach()).clamp_min(eps)
        norm = unitwise_norm(p.grad)
        over = norm > limit
        factor = torch.where(over, limit / norm.clamp_min(torch.finfo(norm.dtype).tiny), torch.ones_like(norm))
        p.grad.mul_(factor.to(p.grad.dtype))
        clipped += int(over.sum())
    return clipped


class AdaptiveGradientClipping(Callback):
    """NFNet's adaptive gradient clipping (AGC; Brock, De, Smith & Simonyan 2021, "High-Performance Large-Scale
    Image Recognition Without Normalization", section 4) as a Lightning callback.

    Every unit's gradient is clipped relative to its own weight norm (:func:`adaptive_clip_`). The paper's
    ``clip_factor`` (lambda) depends on the batch size: 0.01 at batch 4096 and larger for smaller batches;
    here it is 0.01 with ``eps=1e-3``, the defaults of timm's ``adaptive_clip_grad`` (the PyTorch implementation
    most users reach for, ``huggingface/pytorch-image-models``, ``timm/utils/agc.py``). As in the paper (and
    timm's ``train.py``, which excludes the model's head when ``--clip-mode agc``), the final linear layer is not
    clipped: for each optimizer, the last registered ``nn.Linear`` of the LightningModule whose weight that
    optimizer steps (a GAN's generator and discriminator each keep their output layer unclipped).

    It acts in ``on_before_optimizer_step`` (gradients unscaled, before Lightning's own clipping), so it also
    works under manual optimization with several optimizers.

    Example::

        trainer = Trainer(callbacks=[AdaptiveGradientClipping()])
    """

    def __init__(self, clip_factor: float = 0.01, eps: float = 1e-3) -> None:
        if not clip_factor > 0 or not eps > 0:
            raise ValueError(f"clip_factor and eps must be > 0, got {clip_factor!r}, {eps!r}")
        self.clip_factor = float(clip_factor)
        self.eps = float(eps)
        self.clipped_steps = 0
        self.clipped_units = 0
        self._excluded: dict[int, set[int]] = {}

    @staticmethod
    def final_layer(pl_module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> torch.nn.Module | None:
        """The last registered ``nn.Linear`` whose weight ``optimizer`` steps (``None`` if there is none)."""
        stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
        last = None
        for module in pl_module.modules():
            if isinstance(module, torch.nn.Linear) and id(module.weight) in stepped:
                last = module
        return last

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        key = id(optimizer)
        if key not in self._excluded:
            head = self.final_layer(pl_module, optimizer)
            self._excluded[key] = {id(p) for p in head.parameters()} if head is not None else set()
        params = [
            p
            for group in optimizer.param_groups
            for p in group["params"]
            if p.grad is not None and id(p) not in self._excluded[key]
        ]
        units = adaptive_clip_(params, self.clip_factor, self.eps)
        self.clipped_units += units
        self.clipped_steps += units > 0

    def summary(self) -> dict[str, Any]:
        return {"counts": {"clip": self.clipped_steps}}


class AdaGCClipping(Callback):
    """AdaGC (Wang et al., "AdaGC: Improving Training Stability for Large Language Model Pretraining", arXiv
    2502.11034, ICML 2026) as a Lightning callback: every parameter tensor's gradient is clipped against
    ``lambda_rel`` times the EMA of its own past clipped norms, after a warm-up of global clipping.

    A thin adapter: one :class:`~lightning_gradstab.per_tensor_clip.AdaptiveTensorClip` per optimizer (the rule,
    its defaults and its distributed guarantees are documented there), called in ``on_before_optimizer_step``
    (gradients unscaled, before Lightning's own clipping and the optimizer's moments), over the optimizer's
    parameters in ``param_groups`` order. Its state travels in the checkpoint.

    Example::

        trainer = Trainer(callbacks=[AdaGCClipping()])
    """

    def __init__(
        self,
        beta: float = 0.98,
        relative_threshold: float = 1.05,
        absolute_threshold: float = 1.0,
        warmup_steps: int = 100,
    ) -> None:
        from lightning_gradstab.per_tensor_clip import AdaptiveTensorClip

        self.settings = {
            "beta": beta,
            "relative_threshold": relative_threshold,
            "absolute_threshold": absolute_threshold,
            "warmup_steps": warmup_steps,
        }
        AdaptiveTensorClip(**self.settings)  # validate now, not at the first step
        self.clippers: dict[int, Any] = {}
        self._pending: dict[int, dict[str, Any]] = {}
        self.clipped_steps = 0

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        from lightning_gradstab.per_tensor_clip import AdaptiveTensorClip

        index = next((i for i, o in enumerate(trainer.optimizers) if o is optimizer), 0)
        if index not in self.clippers:
            self.clippers[index] = AdaptiveTensorClip(**self.settings)
            if index in self._pending:
                self.clippers[index].load_state_dict(self._pending.pop(index))
        grads = [p.grad for group in optimizer.param_groups for p in group["params"]]
        if all(g is None for g in grads):
            return
        factors = self.clippers[index].clip_(grads)
        self.clipped_steps += int((factors < 1).any())  # one host sync per step; a benchmark peer, not the guard

    def state_dict(self) -> dict[str, Any]:
        return {index: clipper.state_dict() for index, clipper in self.clippers.items()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = {int(index): state for index, state in state_dict.items()}
        self.clippers = {}

    def summary(self) -> dict[str, Any]:
        return {"counts": {"clip": self.clipped_steps}}


def _none() -> Method:
    return Method()


def _clip1() -> Method:
    return Method(trainer_kwargs={"gradient_clip_val": 1.0})


def _zclip() -> Method:
    from zclip import ZClipLightningCallback

    return Method(callbacks=[ZClipLightningCallback(**ZCLIP_SETTINGS)])


def _agc() -> Method:
    return Method(callbacks=[AdaptiveGradientClipping(**AGC_SETTINGS)])


def _adagc() -> Method:
    return Method(callbacks=[AdaGCClipping()])


def _olmo_skip() -> Method:
    return Method(callbacks=[OlmoSkipStep()])


def _spike() -> Method:
    from lightning.pytorch.callbacks import SpikeDetection

    return Method(callbacks=[SpikeDetection()])


def guard(**kwargs: Any) -> Method:
    """``ExplosionGuard(**kwargs)``, the keys that are not its arguments in its ``config``; the benchmark reads its
    actions from ``summary()``."""
    import inspect

    from lightning_gradstab import ExplosionGuard

    arguments = inspect.signature(ExplosionGuard).parameters
    config = {key: kwargs.pop(key) for key in list(kwargs) if key not in arguments}
    return Method(callbacks=[ExplosionGuard(**kwargs, config=config or None)])


METHODS: dict[str, Callable[[], Method]] = {
    "none": _none,
    "clip1": _clip1,
    "zclip": _zclip,
    "agc": _agc,
    "adagc": _adagc,
    "olmo_skip": _olmo_skip,
    "spike": _spike,
    "clean": _none,  # the harness swaps the injected batches back for it
    "guard": guard,
}
PEERS = ("none", "clip1", "zclip", "agc", "olmo_skip", "spike")


def peer_callback(name: str) -> Callback:
    """The one callback of peer ``name`` with exactly the settings the benchmark uses, for configs that build
    callbacks one by one (``conf/variant/wortsman2023/*.yaml``: ``_target_: benchmarks.peers.peer_callback``).

    Example::

        trainer = Trainer(callbacks=[peer_callback("adagc")])
    """
    method = resolve_method(name)()
    if len(method.callbacks) != 1 or method.trainer_kwargs:
        raise ValueError(f"peer {name!r} is not one callback (it sets {method.trainer_kwargs or 'no callback'}); "
                         "choose one of 'zclip', 'agc', 'adagc', 'olmo_skip', 'spike', 'guard'")
    return method.callbacks[0]


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
