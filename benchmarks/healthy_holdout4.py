"""A fourth held-out set of *healthy but unusual* trainings: the user changes the weights during the run.

Same contract as :mod:`benchmarks.healthy_tasks` (``build(seed, steps)`` returns a
:class:`~benchmarks.healthy_tasks.HealthyBuilt`, ``evaluate(eval_batches)`` a held-out **task metric**, lower is
better). In every task the weights are written between optimizer steps by the training recipe itself, not by the
optimizer: a layer reset against the primacy bias, shrink-and-perturb when new data arrive, iterative magnitude
pruning with rewinding (the lottery-ticket procedure), gradual magnitude pruning, and a max-norm constraint
projected after every step. Each makes the loss jump or the weights move in a way no gradient step explains; a
guard that reads the jump as damage skips the steps that recover from it or rolls the change back. Every setting
is the cited recipe's (or the corpus's digit-MLP settings where the recipe is for a larger model); none was chosen
by looking at what a protection does. The writes use PyTorch's own APIs (``reset_parameters``,
``torch.nn.utils.prune``, in-place operations under ``torch.no_grad()``), as a user would.

=====================  =========================================================================================
task                   metric
=====================  =========================================================================================
``head_reset``         held-out error rate
``shrink_perturb``     held-out error rate
``imp_rewind``         held-out error rate of the pruned network
``gradual_prune``      held-out error rate of the pruned network
``maxnorm_dropout``    held-out error rate
=====================  =========================================================================================

Example::

    from benchmarks.healthy_holdout4 import HOLDOUT4_TASKS
    built = HOLDOUT4_TASKS["head_reset"].build(seed=0, steps=20)
    trainer = lightning.pytorch.Trainer(max_steps=built.max_steps, logger=False)
    trainer.fit(built.module, built.train_loader())
    print(built.module.evaluate(built.eval_batches))
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import prune

from benchmarks.divergence_tasks import Batch, Task, _digit_batches, _digits, mlp
from benchmarks.healthy_holdout import _task
from benchmarks.healthy_tasks import HealthyBuilt, MetricModule, _adam, error_rate


def _sgd(params: object) -> torch.optim.Optimizer:
    """The corpus's SGD (Nesterov-free momentum 0.9, lr 0.05, weight decay 5e-4)."""
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)


def _linears(net: nn.Module) -> list[nn.Linear]:
    return [module for module in net.modules() if isinstance(module, nn.Linear)]


def _forget_optimizer_state(module: MetricModule, parameters: list[nn.Parameter] | None = None) -> None:
    """Drop the optimizer's state of ``parameters`` (all of them when ``None``): a new round trains afresh."""
    for optimizer in module.trainer.optimizers:
        if parameters is None:
            optimizer.state.clear()
        else:
            for parameter in parameters:
                optimizer.state.pop(parameter, None)


class _OnceAtSteps(MetricModule):
    """A :class:`MetricModule` that calls :meth:`intervene` once before each optimizer step in ``at``."""

    def __init__(self, net: nn.Module, optimizer: object, at: list[int]) -> None:
        super().__init__(net, "ce", optimizer, error_rate)
        self.at = sorted(at)
        self._done: set[int] = set()

    def on_train_batch_start(self, batch: Batch, batch_idx: int) -> None:
        step = self.global_step
        if step in self.at and step not in self._done:
            self._done.add(step)
            with torch.no_grad():
                self.intervene(self.at.index(step))

    def intervene(self, index: int) -> None:
        raise NotImplementedError


# --------------------------------------------------------------------------------------------------------------
# (1) the last layer reset every quarter of the run
# --------------------------------------------------------------------------------------------------------------


class _HeadReset(_OnceAtSteps):
    def intervene(self, index: int) -> None:
        head = _linears(self.net)[-1]
        head.reset_parameters()
        _forget_optimizer_state(self, list(head.parameters()))


def _head_reset(seed: int, steps: int) -> HealthyBuilt:
    """ReLU MLP on digits under Adam (lr 1e-3) whose last layer is re-initialised, with its optimizer state, every
    quarter of the run: the periodic reset of Nikishin et al. 2022 ("The Primacy Bias in Deep Reinforcement
    Learning", which resets the last layers every fixed number of updates). Each reset puts the loss back near the
    chance level, and the body, kept, retrains the head.

    Metric: held-out error rate.
    """
    train, evals = _digit_batches(seed, steps)
    quarter = max(1, steps // 4)
    module = _HeadReset(mlp(128, 2, nn.ReLU), _adam(1e-3), [quarter, 2 * quarter, 3 * quarter])
    return HealthyBuilt(module, train, evals)


# --------------------------------------------------------------------------------------------------------------
# (2) shrink and perturb as the training set grows
# --------------------------------------------------------------------------------------------------------------

SHRINK, PERTURB = 0.4, 0.1
"""Ash & Adams 2020's setting in their code's README (``--shrink 0.4 --perturb 0.1``): the new round starts from
``0.4 * weights + 0.1 * a fresh initialisation`` (``--shrink 0 --perturb 1`` is a random start)."""


class _ShrinkPerturb(_OnceAtSteps):
    def __init__(self, seed: int, at: list[int]) -> None:
        super().__init__(mlp(128, 2, nn.ReLU), _adam(1e-3), at)
        self.fresh = torch.Generator().manual_seed(3000 + seed)

    def intervene(self, index: int) -> None:
        fresh = mlp(128, 2, nn.ReLU)
        for layer in _linears(fresh):  # a fresh initialisation drawn from the task's own generator
            bound = 1.0 / layer.in_features**0.5  # nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
            layer.weight.uniform_(-bound, bound, generator=self.fresh)
            layer.bias.uniform_(-bound, bound, generator=self.fresh)
        for weight, new in zip(self.net.parameters(), fresh.parameters(), strict=True):
            weight.mul_(SHRINK).add_(new, alpha=PERTURB)
        _forget_optimizer_state(self)  # each round is a new training run from the shrunk weights


def _shrink_perturb(seed: int, steps: int) -> HealthyBuilt:
    """Batch online learning with shrink-and-perturb (Ash & Adams 2020, "On Warm-Starting Neural Network
    Training"): the training set grows in four rounds (350, 700, 1050, then all 1400 training digits) and each new
    round starts from ``0.4 * weights + 0.1 * a fresh initialisation`` with a fresh Adam (lr 1e-3). The loss jumps
    at every round's start (the weights shrink by 60 %) and the run recovers it on more data.

    Metric: held-out error rate.
    """
    x_train, y_train, _, _ = _digits()
    _, evals = _digit_batches(seed, 1)
    g = torch.Generator().manual_seed(1000 + seed)
    quarter = max(1, steps // 4)
    train = []
    for step in range(steps):
        seen = len(x_train) * min(4, step // quarter + 1) // 4
        idx = torch.randint(seen, (64,), generator=g)
        train.append({"x": x_train[idx], "y": y_train[idx]})
    module = _ShrinkPerturb(seed, [quarter, 2 * quarter, 3 * quarter])
    return HealthyBuilt(module, train, evals)


# --------------------------------------------------------------------------------------------------------------
# (3) iterative magnitude pruning with rewinding (the lottery-ticket procedure)
# --------------------------------------------------------------------------------------------------------------

PRUNE_PER_ROUND = 0.2
"""Frankle & Carbin 2019 and Frankle et al. 2020 prune 20 % of the remaining weights per round."""


def _prune_to(net: nn.Module, keep: float) -> None:
    """Keep the ``keep`` share of the largest-magnitude weights of the hidden layers, over all of them at once
    (global magnitude pruning); a weight pruned before stays pruned (``torch.nn.utils.prune`` multiplies masks)."""
    layers = _linears(net)[:-1]
    # the effective weights now: ``layer.weight`` of a pruned layer is recomputed only at its next forward
    weights = [getattr(layer, "weight_orig", layer.weight) * getattr(layer, "weight_mask", 1.0) for layer in layers]
    magnitudes = torch.cat([weight.detach().abs().flatten() for weight in weights])
    kept = max(1, round(keep * magnitudes.numel()))
    threshold = magnitudes.kthvalue(magnitudes.numel() - kept + 1).values if kept < magnitudes.numel() else -1.0
    for layer, weight in zip(layers, weights, strict=True):
        prune.custom_from_mask(layer, "weight", (weight.detach().abs() >= threshold).float())


class _RewoundPruning(_OnceAtSteps):
    def __init__(self, at: list[int], rewind_step: int) -> None:
        super().__init__(mlp(128, 2, nn.ReLU), _sgd, at)
        self.rewind_step = rewind_step
        # the weights to rewind to, by parameter: pruning re-registers a layer's weight as ``weight_orig`` (the same
        # tensor, in another place of the parameter order)
        self.rewound: list[tuple[nn.Parameter, torch.Tensor]] | None = None

    def on_train_batch_start(self, batch: Batch, batch_idx: int) -> None:
        if self.global_step == self.rewind_step and self.rewound is None:
            self.rewound = [(p, p.detach().clone()) for p in self.parameters()]
        super().on_train_batch_start(batch, batch_idx)

    def intervene(self, index: int) -> None:
        _prune_to(self.net, (1.0 - PRUNE_PER_ROUND) ** (index + 1))
        assert self.rewound is not None
        for weight, early in self.rewound:
            weight.copy_(early)
        _forget_optimizer_state(self)  # the next round retrains from the rewound weights


def _imp_rewind(seed: int, steps: int) -> HealthyBuilt:
    """Iterative magnitude pruning with rewinding (Frankle et al. 2020, "Linear Mode Connectivity and the Lottery
    Ticket Hypothesis"): four rounds of training under the corpus's SGD; after each of the first three, 20 % of the
    remaining hidden-layer weights (global magnitude) are pruned with ``torch.nn.utils.prune`` and the surviving
    weights are rewound to their values at 2.5 % of the run, the momentum buffers dropped. The loss jumps back to
    near its early value at every rewind.

    Metric: held-out error rate of the pruned network (51.2 % of the hidden weights left).
    """
    train, evals = _digit_batches(seed, steps)
    quarter = max(1, steps // 4)
    module = _RewoundPruning([quarter, 2 * quarter, 3 * quarter], rewind_step=max(1, steps // 40))
    return HealthyBuilt(module, train, evals)


# --------------------------------------------------------------------------------------------------------------
# (4) gradual magnitude pruning
# --------------------------------------------------------------------------------------------------------------

FINAL_SPARSITY = 0.9


class _GradualPruning(_OnceAtSteps):
    def __init__(self, at: list[int]) -> None:
        super().__init__(mlp(128, 2, nn.ReLU), _sgd, at)

    def intervene(self, index: int) -> None:
        done = (index + 1) / len(self.at)  # Zhu & Gupta's cubic schedule, from 0 to the final sparsity
        sparsity = FINAL_SPARSITY * (1.0 - (1.0 - done) ** 3)
        _prune_to(self.net, 1.0 - sparsity)


def _gradual_prune(seed: int, steps: int) -> HealthyBuilt:
    """Gradual magnitude pruning (Zhu & Gupta 2017, "To prune, or not to prune"): from a quarter to three quarters
    of the run the hidden-layer weights are pruned ten times, to a sparsity of ``0.9 * (1 - (1 - t)^3)`` at the
    schedule's fraction ``t`` (their cubic schedule, final sparsity 90 %), under the corpus's SGD. The masks are
    buffers of ``torch.nn.utils.prune``, and most of the pruning comes early in the schedule.

    Metric: held-out error rate of the pruned network (10 % of the hidden weights left).
    """
    train, evals = _digit_batches(seed, steps)
    start, span = steps // 4, max(10, steps // 2)
    module = _GradualPruning([start + span * i // 10 for i in range(10)])
    return HealthyBuilt(module, train, evals)


# --------------------------------------------------------------------------------------------------------------
# (5) dropout with a max-norm constraint projected after every step
# --------------------------------------------------------------------------------------------------------------

MAX_NORM = 3.0
"""Srivastava et al. 2014 ("Dropout"): the norm of each hidden unit's incoming weights is held at most ``c``, with
``c`` typically 3 to 4."""


class _MaxNormDropout(MetricModule):
    def __init__(self) -> None:
        net = nn.Sequential(
            nn.Dropout(0.2), nn.Linear(64, 128), nn.ReLU(), nn.Dropout(0.5),
            nn.Linear(128, 128), nn.ReLU(), nn.Dropout(0.5), nn.Linear(128, 10),
        )
        super().__init__(net, "ce", _sgd, error_rate)

    def on_train_batch_end(self, outputs: object, batch: Batch, batch_idx: int) -> None:
        with torch.no_grad():  # the projection onto the constraint set after every update
            for layer in _linears(self.net)[:-1]:
                layer.weight.copy_(torch.renorm(layer.weight, 2, 0, MAX_NORM))


def _maxnorm_dropout(seed: int, steps: int) -> HealthyBuilt:
    """Dropout (0.2 on the inputs, 0.5 on the hidden units) with a max-norm constraint of 3 on every hidden unit's
    incoming weights, projected in place after every optimizer step (Srivastava et al. 2014), under the corpus's
    SGD: a write to the weights after every step that no gradient explains, part of how this recipe steps.

    Metric: held-out error rate.
    """
    train, evals = _digit_batches(seed, steps)
    return HealthyBuilt(_MaxNormDropout(), train, evals)


# --------------------------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------------------------

HOLDOUT4_TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        _task("head_reset", 800, _head_reset),
        _task("shrink_perturb", 800, _shrink_perturb),
        _task("imp_rewind", 800, _imp_rewind),
        _task("gradual_prune", 800, _gradual_prune),
        _task("maxnorm_dropout", 400, _maxnorm_dropout),
    ]
}
"""The fourth held-out set, in the order the report lists it. Every task's ``kind`` is ``"healthy"``."""

METRICS: dict[str, str] = {
    "head_reset": "error rate",
    "shrink_perturb": "error rate",
    "imp_rewind": "pruned error rate",
    "gradual_prune": "pruned error rate",
    "maxnorm_dropout": "error rate",
}
"""What each task's ``evaluate`` measures (lower is better)."""
