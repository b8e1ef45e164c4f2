"""A third held-out set of *healthy but unusual* trainings, written after guard v3.6's rules were fixed.

Same contract as :mod:`benchmarks.healthy_tasks` (``build(seed, steps)`` returns a
:class:`~benchmarks.healthy_tasks.HealthyBuilt`, ``evaluate(eval_batches)`` a held-out **task metric**, lower is
better), of shapes none of the earlier sets has: optimizers that evaluate the loss several times per step
(L-BFGS with its line search, sharpness-aware minimization), a loss that is a negative cosine similarity, a
multi-task loss with learned weights that goes below zero, a physics-informed loss that falls by orders of
magnitude, regression targets with infinite-variance noise, and self-training whose pseudo-labels change the
objective mid-run. Every setting is the cited recipe's (or the corpus's digit-MLP settings where the recipe is
for a larger model); none was chosen by looking at what a protection does.

==========================  ====================================================================================
task                        metric
==========================  ====================================================================================
``lbfgs_digits``            held-out error rate
``sam_digits``              held-out error rate
``simsiam_digits``          held-out error of a linear probe on the backbone's features
``uncertainty_multitask``   held-out error rate of the classification head
``pinn_poisson``            relative L2 error of the solution on a 201-point grid
``student_t_regression``    held-out mean squared error against the noiseless target
``pseudo_label``            held-out error rate
==========================  ====================================================================================

Example::

    from benchmarks.healthy_holdout3 import HOLDOUT3_TASKS
    built = HOLDOUT3_TASKS["pinn_poisson"].build(seed=0, steps=20)
    trainer = lightning.pytorch.Trainer(max_steps=built.max_steps, logger=False)
    trainer.fit(built.module, built.train_loader())
    print(built.module.evaluate(built.eval_batches))
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from benchmarks.divergence_tasks import Batch, Task, _digit_batches, _digits, mlp
from benchmarks.healthy_holdout import _task
from benchmarks.healthy_tasks import HealthyBuilt, MetricModule, _adam, error_rate

# --------------------------------------------------------------------------------------------------------------
# (1) full-batch L-BFGS: the closure runs up to 25 times per optimizer step
# --------------------------------------------------------------------------------------------------------------


def _lbfgs_digits(seed: int, steps: int) -> HealthyBuilt:
    """A ReLU MLP on all 1400 training digits at once under ``torch.optim.LBFGS`` with the strong-Wolfe line
    search (Nocedal & Wright 2006, Alg. 7.5 and 3.5; torch's defaults otherwise: 20 iterations, history 100).
    Lightning runs the training step inside the optimizer's closure, which the optimizer calls as often as its
    iterations and line search need (59 calls in 30 steps on seed 0); the training loss falls from 2.3 to about
    1e-7 (the training set fitted exactly).

    Metric: held-out error rate.
    """
    x, y, x_eval, y_eval = _digits()
    g = torch.Generator().manual_seed(40_000 + seed)
    order = torch.randperm(len(x), generator=g)  # the same full batch, a seed-dependent row order
    train = [{"x": x[order], "y": y[order]} for _ in range(steps)]
    module = MetricModule(
        mlp(64, 1, nn.ReLU),
        "ce",
        lambda p: torch.optim.LBFGS(p, lr=1.0, line_search_fn="strong_wolfe"),
        error_rate,
    )
    return HealthyBuilt(module, train, [{"x": x_eval, "y": y_eval}])


# --------------------------------------------------------------------------------------------------------------
# (2) sharpness-aware minimization: two gradients per step, the second at perturbed weights
# --------------------------------------------------------------------------------------------------------------


class SAM(torch.optim.Optimizer):
    """Sharpness-aware minimization (Foret et al. 2021, Algorithm 1) around a base optimizer.

    ``step(closure)`` computes the gradient at ``w``, moves to ``w + rho g / ||g||``, computes the gradient
    there with a second call of the closure, returns to ``w`` and lets the base optimizer step with that second
    gradient. The closure-driven form is how an automatic-optimization ``LightningModule`` can run it.
    """

    def __init__(self, params: Iterable[Any], base: Callable[..., torch.optim.Optimizer], rho: float = 0.05, **kw):
        super().__init__(params, dict(rho=rho, **kw))
        self.base = base(self.param_groups, **kw)
        self.param_groups = self.base.param_groups

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        if closure is None:
            raise ValueError("SAM needs a closure: it evaluates the loss twice per step")
        with torch.enable_grad():
            loss = closure()
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return loss
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        moved: list[tuple[torch.Tensor, torch.Tensor]] = []
        for group in self.param_groups:
            scale = group["rho"] / (norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                e = p.grad * scale
                p.add_(e)
                moved.append((p, e))
        with torch.enable_grad():
            closure()
        for p, e in moved:
            p.sub_(e)
        self.base.step()
        return loss


def _sam_digits(seed: int, steps: int) -> HealthyBuilt:
    """A ReLU MLP on digits under SAM (Foret et al. 2021; rho 0.05, the paper's default) around the corpus's
    SGD (lr 0.05, momentum 0.9): each optimizer step runs the training step twice, the second time at weights
    moved uphill, so the gradient the step uses is larger than the loss at the weights suggests.

    Metric: held-out error rate.
    """
    train, evals = _digit_batches(seed, steps)
    module = MetricModule(
        mlp(128, 2, nn.ReLU),
        "ce",
        lambda p: SAM(p, torch.optim.SGD, rho=0.05, lr=0.05, momentum=0.9),
        error_rate,
    )
    return HealthyBuilt(module, train, evals)


# --------------------------------------------------------------------------------------------------------------
# (3) SimSiam: a negative cosine similarity, between -1 and 1
# --------------------------------------------------------------------------------------------------------------


class SimSiamModule(MetricModule):
    """SimSiam (Chen & He 2021): a backbone, a BatchNorm projector and a bottleneck predictor; the loss is the
    symmetrised negative cosine similarity between one view's prediction and the other view's projection with
    the gradient stopped, so it falls from about 0 towards -1."""

    def __init__(self, lr: float) -> None:
        backbone = nn.Sequential(
            nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, 128), nn.BatchNorm1d(128), nn.ReLU()
        )
        super().__init__(
            backbone,
            "simsiam",
            lambda p: torch.optim.SGD(p, lr=lr, momentum=0.9, weight_decay=1e-4),
            _linear_probe_error,
        )
        self.projector = nn.Sequential(nn.Linear(128, 64), nn.BatchNorm1d(64))
        self.predictor = nn.Sequential(nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 64))

    def compute_loss(self, batch: Batch) -> torch.Tensor:
        z1, z2 = self.projector(self.net(batch["x1"])), self.projector(self.net(batch["x2"]))
        p1, p2 = self.predictor(z1), self.predictor(z2)
        return -(F.cosine_similarity(p1, z2.detach()).mean() + F.cosine_similarity(p2, z1.detach()).mean()) / 2


def _linear_probe_error(module: MetricModule, batches: list[Batch]) -> float:
    """The linear evaluation of self-supervised features (Chen & He 2021, as in SimCLR and MoCo): a logistic
    regression fitted on the frozen backbone's features of the training digits, its error on the held-out ones."""
    from sklearn.linear_model import LogisticRegression

    b = batches[0]
    fit, held_out = module.net(b["x_fit"]).numpy(), module.net(b["x"]).numpy()
    probe = LogisticRegression(max_iter=2000).fit(fit, b["y_fit"].numpy())
    return float(1.0 - probe.score(held_out, b["y"].numpy()))


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A random shift of up to one pixel, a quarter of the pixels dropped, Gaussian noise of std 0.3."""
    images = x.reshape(-1, 8, 8)
    dx, dy = (int(v) for v in torch.randint(-1, 2, (2,), generator=g))
    images = torch.roll(images, shifts=(dy, dx), dims=(1, 2))
    keep = (torch.rand(images.shape, generator=g) > 0.25).float()
    return (images * keep + 0.3 * torch.randn(images.shape, generator=g)).reshape(-1, 64)


def _simsiam_digits(seed: int, steps: int) -> HealthyBuilt:
    """SimSiam (Chen & He 2021) on digits: two augmented views per image, SGD with momentum 0.9 and weight
    decay 1e-4 at the paper's lr = 0.05 x batch / 256 (batch 256, so 0.05), at a constant LR (the paper's cosine
    decay is left out: the comparison needs no schedule). The loss is negative from the first steps.

    Metric: held-out error of a linear probe on the backbone's features (fitted on the training digits).
    """
    x, y, x_eval, y_eval = _digits()
    g = torch.Generator().manual_seed(41_000 + seed)
    train = []
    for _ in range(steps):
        idx = torch.randint(len(x), (256,), generator=g)
        train.append({"x1": _augment(x[idx], g), "x2": _augment(x[idx], g)})
    evals = [{"x": x_eval, "y": y_eval, "x_fit": x, "y_fit": y}]
    return HealthyBuilt(SimSiamModule(lr=0.05), train, evals)


# --------------------------------------------------------------------------------------------------------------
# (4) multi-task weighting by learned uncertainty: a loss that goes below zero
# --------------------------------------------------------------------------------------------------------------


class UncertaintyMultiTaskModule(MetricModule):
    """Kendall, Gal & Cipolla (2018): a shared trunk, a classification head and a regression head, weighted by
    learned log-variances ``s``: ``exp(-s_c) CE + s_c / 2 + exp(-s_r) MSE / 2 + s_r / 2``. As the regression
    fits, its ``s`` falls and the total loss goes negative."""

    def __init__(self) -> None:
        super().__init__(mlp(128, 2, nn.ReLU, n_out=11), "uncertainty", _adam(1e-3), _head_error_rate)
        self.log_variances = nn.Parameter(torch.zeros(2))

    def compute_loss(self, batch: Batch) -> torch.Tensor:
        out = self.net(batch["x"])
        s_c, s_r = self.log_variances
        ce = F.cross_entropy(out[:, :10], batch["y"])
        mse = F.mse_loss(out[:, 10], batch["r"])
        return torch.exp(-s_c) * ce + s_c / 2 + torch.exp(-s_r) * mse / 2 + s_r / 2


def _head_error_rate(module: MetricModule, batches: list[Batch]) -> float:
    wrong = total = 0
    for b in batches:
        wrong += int((module.net(b["x"])[:, :10].argmax(-1) != b["y"]).sum())
        total += len(b["y"])
    return wrong / total


def _ink(x: torch.Tensor) -> torch.Tensor:
    """The regression target: each digit's mean standardised intensity over its top half, standardised."""
    top = x.reshape(-1, 8, 8)[:, :4].mean((1, 2))
    return (top - top.mean()) / top.std()


def _uncertainty_multitask(seed: int, steps: int) -> HealthyBuilt:
    """Multi-task learning with uncertainty weighting (Kendall, Gal & Cipolla 2018) on digits: classify the
    digit and regress the intensity of its top half, Adam lr 1e-3, batch 64; the total loss crosses zero.

    Metric: held-out error rate of the classification head.
    """
    train, evals = _digit_batches(seed, steps)
    for batch in train + evals:
        batch["r"] = _ink(batch["x"])
    return HealthyBuilt(UncertaintyMultiTaskModule(), train, evals)


# --------------------------------------------------------------------------------------------------------------
# (5) a physics-informed network: a loss that falls by orders of magnitude, through second derivatives
# --------------------------------------------------------------------------------------------------------------


def _poisson_solution(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(math.pi * x) + 0.1 * torch.sin(4 * math.pi * x)


def _poisson_source(x: torch.Tensor) -> torch.Tensor:
    """``f = u''`` for the solution above."""
    return -(math.pi**2) * torch.sin(math.pi * x) - 0.1 * (4 * math.pi) ** 2 * torch.sin(4 * math.pi * x)


class PinnModule(MetricModule):
    """A physics-informed network (Raissi, Perdikaris & Karniadakis 2019) for ``u'' = f`` on [0, 1] with
    ``u(0) = u(1) = 0``: the loss is the mean squared PDE residual at random collocation points (second
    derivatives by double backpropagation) plus the squared boundary values."""

    def __init__(self) -> None:
        super().__init__(mlp(32, 3, nn.Tanh, n_in=1, n_out=1), "pinn", _adam(1e-3), _pinn_relative_error)

    def compute_loss(self, batch: Batch) -> torch.Tensor:
        x = batch["x"].clone().requires_grad_(True)
        u = self.net(x)
        (du,) = torch.autograd.grad(u.sum(), x, create_graph=True)
        (d2u,) = torch.autograd.grad(du.sum(), x, create_graph=True)
        residual = d2u - _poisson_source(x)
        boundary = self.net(torch.tensor([[0.0], [1.0]]))
        return residual.pow(2).mean() + boundary.pow(2).mean()


def _pinn_relative_error(module: MetricModule, batches: list[Batch]) -> float:
    x = batches[0]["x"]
    exact = _poisson_solution(x)
    return float(torch.linalg.vector_norm(module.net(x) - exact) / torch.linalg.vector_norm(exact))


def _pinn_poisson(seed: int, steps: int) -> HealthyBuilt:
    """A PINN (Raissi et al. 2019) for the 1-D Poisson problem ``u'' = f``, ``u = sin(pi x) + 0.1 sin(4 pi x)``:
    a 3 x 32 tanh MLP (the paper's activation), Adam lr 1e-3, 128 fresh uniform collocation points per step.
    The loss starts near 200 and falls by about four orders of magnitude (176 to 0.03 on seed 0).

    Metric: relative L2 error of the solution on a 201-point grid.
    """
    g = torch.Generator().manual_seed(42_000 + seed)
    train = [{"x": torch.rand(128, 1, generator=g)} for _ in range(steps)]
    evals = [{"x": torch.linspace(0, 1, 201).unsqueeze(-1)}]
    return HealthyBuilt(PinnModule(), train, evals)


# --------------------------------------------------------------------------------------------------------------
# (6) regression under infinite-variance noise: heavy-tailed batch losses that are the data, not a fault
# --------------------------------------------------------------------------------------------------------------


class TeacherRegressionModule(MetricModule):
    """Least squares on targets ``teacher(x) + noise``; the metric compares with the noiseless teacher."""

    def __init__(self) -> None:
        super().__init__(mlp(128, 2, nn.ReLU, n_in=16, n_out=1), "mse", _adam(1e-3), _teacher_error)

    def compute_loss(self, batch: Batch) -> torch.Tensor:
        return F.mse_loss(self.net(batch["x"]).squeeze(-1), batch["y"])


def _teacher_error(module: MetricModule, batches: list[Batch]) -> float:
    b = batches[0]
    return float(F.mse_loss(module.net(b["x"]).squeeze(-1), b["clean"]))


def _student_t_regression(seed: int, steps: int) -> HealthyBuilt:
    """Teacher-student regression (a random 2-layer tanh teacher on 16 Gaussian inputs, targets of unit
    variance) whose label noise is Student-t with 2 degrees of freedom, scaled by 0.3: its variance is infinite,
    so a batch's mean squared error can be hundreds of times the median batch's (207x on seed 0, unprotected).
    Adam lr 1e-3, batch 64.

    Metric: held-out mean squared error against the noiseless teacher.
    """
    gt = torch.Generator().manual_seed(43_999)  # one teacher for every seed
    w1, w2 = torch.randn(16, 32, generator=gt) / 4, torch.randn(32, generator=gt)
    norm = (torch.tanh(torch.randn(4096, 16, generator=gt) @ w1) @ w2).std()

    def teacher(x: torch.Tensor) -> torch.Tensor:
        return (torch.tanh(x @ w1) @ w2) / norm

    g = torch.Generator().manual_seed(43_000 + seed)
    train = []
    for _ in range(steps):
        x = torch.randn(64, 16, generator=g)
        noise = _student_t2(torch.rand(64, generator=g))  # a seeded draw, by inverting the CDF
        train.append({"x": x, "y": teacher(x) + 0.3 * noise})
    ge = torch.Generator().manual_seed(43_998)
    x_eval = torch.randn(2000, 16, generator=ge)
    return HealthyBuilt(TeacherRegressionModule(), train, [{"x": x_eval, "clean": teacher(x_eval)}])


def _student_t2(u: torch.Tensor) -> torch.Tensor:
    """The inverse CDF of Student's t with 2 degrees of freedom (closed form): ``(2u - 1) / sqrt(2 u (1 - u))``."""
    u = u.clamp(1e-7, 1 - 1e-7)
    return (2 * u - 1) / torch.sqrt(2 * u * (1 - u))


# --------------------------------------------------------------------------------------------------------------
# (7) self-training: pseudo-labels that change the objective while training
# --------------------------------------------------------------------------------------------------------------


class PseudoLabelModule(MetricModule):
    """Pseudo-label (Lee 2013): cross-entropy on a few labelled digits plus ``alpha(t)`` times cross-entropy on
    unlabelled digits against the model's own argmax, recomputed every ``refresh`` steps; ``alpha`` is 0 for the
    first ``t1`` steps, then rises linearly to 3 at ``t2`` (the paper's schedule, in steps instead of epochs)."""

    def __init__(self, pool: torch.Tensor, refresh: int, t1: int, t2: int) -> None:
        super().__init__(mlp(128, 2, nn.ReLU), "pseudo", _adam(1e-3), error_rate)
        self.register_buffer("pool", pool)
        self.register_buffer("pseudo", torch.zeros(len(pool), dtype=torch.long))
        self.refresh, self.t1, self.t2 = refresh, t1, t2
        self.calls = 0

    def alpha(self, step: int) -> float:
        if step < self.t1:
            return 0.0
        return 3.0 * min(1.0, (step - self.t1) / max(self.t2 - self.t1, 1))

    def compute_loss(self, batch: Batch) -> torch.Tensor:
        step = self.calls
        self.calls += 1
        if step % self.refresh == 0:
            with torch.no_grad():
                self.pseudo = self.net(self.pool).argmax(-1)
        loss = F.cross_entropy(self.net(batch["x"]), batch["y"])
        alpha = self.alpha(step)
        if alpha > 0:
            loss = loss + alpha * F.cross_entropy(self.net(self.pool[batch["u"]]), self.pseudo[batch["u"]])
        return loss


def _pseudo_label(seed: int, steps: int) -> HealthyBuilt:
    """Self-training with pseudo-labels (Lee 2013) on digits: 100 labelled training digits (10 per class), the
    other 1300 unlabelled; Adam lr 1e-3, 32 labelled + 64 unlabelled per batch, pseudo-labels recomputed every
    50 steps, their weight 0 for the first 20 % of the run and rising to 3 at 60 %: the loss jumps each time
    the weight or the labels move.

    Metric: held-out error rate.
    """
    x, y, x_eval, y_eval = _digits()
    labelled = torch.cat([torch.nonzero(y == c).squeeze(-1)[:10] for c in range(10)])
    mask = torch.ones(len(x), dtype=torch.bool)
    mask[labelled] = False
    pool = x[mask]
    g = torch.Generator().manual_seed(44_000 + seed)
    train = []
    for _ in range(steps):
        i = labelled[torch.randint(len(labelled), (32,), generator=g)]
        train.append({"x": x[i], "y": y[i], "u": torch.randint(len(pool), (64,), generator=g)})
    evals = [{"x": x_eval[i : i + 200], "y": y_eval[i : i + 200]} for i in range(0, len(x_eval), 200)]
    module = PseudoLabelModule(pool, refresh=50, t1=steps // 5, t2=(3 * steps) // 5)
    return HealthyBuilt(module, train, evals)


# --------------------------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------------------------


HOLDOUT3_TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        _task("lbfgs_digits", 30, _lbfgs_digits),
        _task("sam_digits", 400, _sam_digits),
        _task("simsiam_digits", 400, _simsiam_digits),
        _task("uncertainty_multitask", 400, _uncertainty_multitask),
        _task("pinn_poisson", 1000, _pinn_poisson),
        _task("student_t_regression", 500, _student_t_regression),
        _task("pseudo_label", 500, _pseudo_label),
    ]
}
"""The third held-out set, in the order the report lists it. Every task's ``kind`` is ``"healthy"``."""

METRICS: dict[str, str] = {
    "lbfgs_digits": "error rate",
    "sam_digits": "error rate",
    "simsiam_digits": "linear probe error",
    "uncertainty_multitask": "error rate",
    "pinn_poisson": "relative L2 error",
    "student_t_regression": "MSE to teacher",
    "pseudo_label": "error rate",
}
"""What each task's ``evaluate`` measures (lower is better)."""
