"""A second held-out set of *healthy but unusual* trainings, written after the guard's rules were fixed.

Same contract as :mod:`benchmarks.healthy_tasks` and :mod:`benchmarks.healthy_holdout` (``build(seed, steps)``
returns a :class:`~benchmarks.healthy_tasks.HealthyBuilt`, ``evaluate(eval_batches)`` a held-out **task metric**,
lower is better), of shapes neither set has: a learning rate that climbs to ten times the usual and back, a
diffusion model and a normalizing flow (losses that are noisy by construction, or negative), mixed-up labels, a
metric-learning loss that is exactly zero on many batches, and a sparse mixture of experts whose experts go
without gradients. Every setting is the cited recipe's (or the corpus's digit-MLP settings where the recipe is
for a larger model); none was chosen by looking at what a protection does.

========================  ======================================================================================
task                      metric
========================  ======================================================================================
``one_cycle_sgd``         held-out error rate
``ddpm_ring``             sliced Wasserstein-1 distance of 2000 samples (ancestral sampling) to held-out data
``realnvp_ring``          KL(data || flow) on held-out data, with the data's exact density
``mixup_digits``          held-out error rate
``triplet_batch_hard``    held-out leave-one-out 1-nearest-neighbour error of the embeddings
``switch_moe``            held-out error rate
========================  ======================================================================================

Example::

    from benchmarks.healthy_holdout2 import HOLDOUT2_TASKS
    built = HOLDOUT2_TASKS["ddpm_ring"].build(seed=0, steps=20)
    trainer = lightning.pytorch.Trainer(max_steps=built.max_steps, logger=False)
    trainer.fit(built.module, built.train_loader())
    print(built.module.evaluate(built.eval_batches))
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from benchmarks.divergence_tasks import Batch, Task, _digit_batches, _digits, mlp
from benchmarks.healthy_holdout import _task
from benchmarks.healthy_tasks import (
    HealthyBuilt,
    MetricModule,
    _adam,
    _ring,
    error_rate,
    sliced_wasserstein,
)

_SAMPLES = 2000

# --------------------------------------------------------------------------------------------------------------
# (1) the 1cycle policy: the learning rate climbs to 10x the usual and anneals
# --------------------------------------------------------------------------------------------------------------


def _one_cycle_sgd(seed: int, steps: int) -> HealthyBuilt:
    """ReLU MLP on digits under the 1cycle policy (Smith & Topin 2019, "Super-convergence"), PyTorch's
    ``OneCycleLR`` defaults: the LR rises from max/25 to ``max_lr`` over the first 30 % and anneals to max/1e4,
    momentum cycling 0.95 -> 0.85 -> 0.95. ``max_lr`` 0.25 is five times the corpus's SGD lr (the paper's peaks
    are an order of magnitude above the usual rate; at 0.5, ten times, unguarded training diverged at the peak,
    3 of 3 seeds, so it was halved), and the loss rises while the LR climbs.

    Metric: held-out error rate.
    """
    train, evals = _digit_batches(seed, steps)
    module = MetricModule(
        mlp(128, 2, nn.ReLU),
        "ce",
        lambda p: torch.optim.SGD(p, lr=0.25, momentum=0.9),
        error_rate,
        lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.25, total_steps=max(steps, 2)),
    )
    return HealthyBuilt(module, train, evals)


# --------------------------------------------------------------------------------------------------------------
# (2) a denoising diffusion model on the 8-Gaussian ring
# --------------------------------------------------------------------------------------------------------------

_DIFFUSION_STEPS = 100


def _cosine_alpha_bars(steps: int, s: float = 0.008) -> torch.Tensor:
    """The cosine noise schedule of Nichol & Dhariwal 2021 (betas clipped at 0.999): cumulative alphas."""
    t = torch.arange(steps + 1, dtype=torch.float64) / steps
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    return torch.cumprod(1 - betas, 0).float()


def _time_features(t: torch.Tensor, dim: int = 16) -> torch.Tensor:
    """Sinusoidal features of the diffusion step (Vaswani et al. 2017, as DDPM embeds its time step)."""
    freqs = torch.exp(-math.log(1000.0) * torch.arange(dim // 2, dtype=torch.float32) / (dim // 2))
    angles = t.float().unsqueeze(-1) * freqs
    return torch.cat([angles.sin(), angles.cos()], -1)


class DiffusionModule(MetricModule):
    """DDPM (Ho et al. 2020): an MLP predicts the noise added at a uniformly drawn step (the simple loss, mean
    squared error on epsilon); its loss varies with the drawn steps from batch to batch by design."""

    def __init__(self) -> None:
        super().__init__(mlp(128, 3, nn.SiLU, n_in=2 + 16, n_out=2), "ddpm", _adam(1e-3), _diffusion_distance)
        self.register_buffer("alpha_bars", _cosine_alpha_bars(_DIFFUSION_STEPS))

    def predict_noise(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x, _time_features(t)], -1))

    def compute_loss(self, batch: Batch) -> torch.Tensor:
        a = self.alpha_bars[batch["t"]].unsqueeze(-1)
        noisy = a.sqrt() * batch["x"] + (1 - a).sqrt() * batch["noise"]
        return F.mse_loss(self.predict_noise(noisy, batch["t"]), batch["noise"])

    def sample(self, noise: list[torch.Tensor]) -> torch.Tensor:
        """Ancestral sampling (Ho et al.'s Algorithm 2, sigma_t^2 = beta_t) from the given Gaussian draws."""
        alpha_bars = self.alpha_bars
        x = noise[0]
        for step in reversed(range(_DIFFUSION_STEPS)):
            a_bar = alpha_bars[step]
            a_bar_prev = alpha_bars[step - 1] if step > 0 else torch.ones(())
            alpha = a_bar / a_bar_prev
            t = torch.full((len(x),), step)
            x = (x - (1 - alpha) / (1 - a_bar).sqrt() * self.predict_noise(x, t)) / alpha.sqrt()
            if step > 0:
                x = x + (1 - alpha).sqrt() * noise[step]
        return x


def _diffusion_distance(module: MetricModule, batches: list[Batch]) -> float:
    assert isinstance(module, DiffusionModule)
    values = [sliced_wasserstein(module.sample(b["noise"]), b["x"]) for b in batches]
    return sum(values) / len(values)


def _ddpm_ring(seed: int, steps: int) -> HealthyBuilt:
    """A DDPM (Ho et al. 2020) on the 8-Gaussian ring: 100 steps with the cosine schedule (Nichol & Dhariwal
    2021), a 3-layer SiLU MLP with sinusoidal step features, Adam lr 1e-3, batch 256.

    Metric: sliced Wasserstein-1 distance of 2000 samples (ancestral sampling, fixed draws) to held-out data.
    """
    g = torch.Generator().manual_seed(30_000 + seed)
    train = [
        {
            "x": _ring(256, g),
            "t": torch.randint(_DIFFUSION_STEPS, (256,), generator=g),
            "noise": torch.randn(256, 2, generator=g),
        }
        for _ in range(steps)
    ]
    ge = torch.Generator().manual_seed(30_999)
    evals = [
        {"x": _ring(_SAMPLES, ge), "noise": [torch.randn(_SAMPLES, 2, generator=ge) for _ in range(_DIFFUSION_STEPS)]}
    ]
    return HealthyBuilt(DiffusionModule(), train, evals)


# --------------------------------------------------------------------------------------------------------------
# (3) a normalizing flow: a negative log-likelihood that goes below zero
# --------------------------------------------------------------------------------------------------------------


class AffineCoupling(nn.Module):
    """One RealNVP affine coupling layer (Dinh et al. 2017) on 2-D points: the kept coordinate sets a scale and
    a shift of the other; the log-scale is bounded by a tanh, as common implementations do for stability."""

    def __init__(self, keep: int, width: int = 64) -> None:
        super().__init__()
        self.keep = keep
        self.net = mlp(width, 2, nn.ReLU, n_in=1, n_out=2)

    def _scale_shift(self, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_scale, shift = self.net(kept).chunk(2, -1)
        return torch.tanh(log_scale), shift

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Data -> latent: the transformed points and the log-determinant of the Jacobian."""
        kept, moved = x[:, self.keep : self.keep + 1], x[:, 1 - self.keep : 2 - self.keep]
        log_scale, shift = self._scale_shift(kept)
        moved = (moved - shift) * torch.exp(-log_scale)
        out = torch.cat([kept, moved], -1) if self.keep == 0 else torch.cat([moved, kept], -1)
        return out, -log_scale.squeeze(-1)


class FlowModule(MetricModule):
    """Maximum likelihood of a RealNVP flow with a standard-normal base: the loss is the negative
    log-likelihood per point, which drops below zero once the density concentrates on the data."""

    def __init__(self, layers: int = 6) -> None:
        couplings = nn.ModuleList([AffineCoupling(keep=i % 2) for i in range(layers)])
        super().__init__(couplings, "nll", _adam(1e-3), _flow_kl)

    def compute_loss(self, batch: Batch) -> torch.Tensor:
        z, log_det = batch["x"], torch.zeros(len(batch["x"]))
        for coupling in self.net:
            z, step_log_det = coupling(z)
            log_det = log_det + step_log_det
        log_base = -0.5 * (z**2).sum(-1) - math.log(2 * math.pi)
        return -(log_base + log_det).mean()


_RING_MODES, _RING_RADIUS, _RING_STD = 8, 2.0, 0.02


def _ring_log_density(x: torch.Tensor) -> torch.Tensor:
    """The exact log-density of :func:`~benchmarks.healthy_tasks._ring`'s mixture at each point."""
    k = torch.arange(_RING_MODES, dtype=torch.float32)
    angles = 2 * math.pi * k / _RING_MODES
    centers = torch.stack([torch.cos(angles), torch.sin(angles)], -1) * _RING_RADIUS
    squared = ((x[:, None, :] - centers[None]) ** 2).sum(-1)
    log_normal = -0.5 * squared / _RING_STD**2 - math.log(2 * math.pi * _RING_STD**2)
    return torch.logsumexp(log_normal, -1) - math.log(_RING_MODES)


def _flow_kl(module: MetricModule, batches: list[Batch]) -> float:
    """KL(data || flow) estimated on held-out data, E[log p(x) - log q(x)] with the data's exact density: >= 0
    in expectation and 0 only for a perfect fit, where the negative log-likelihood itself has no floor at 0."""
    values = [float((_ring_log_density(b["x"]) + module.compute_loss(b)).mean()) for b in batches]
    return sum(values) / len(values)


def _realnvp_ring(seed: int, steps: int) -> HealthyBuilt:
    """A RealNVP flow (Dinh et al. 2017; 6 affine couplings, alternating, 2x64 ReLU nets) fitted by maximum
    likelihood to the 8-Gaussian ring, Adam lr 1e-3, batch 256: the negative log-likelihood starts near 3 and
    goes below zero (the ring's modes have std 0.02: a perfect fit reaches its entropy, about -2.9), and the
    flow's maximum-likelihood training has loss spikes of its own.

    Metric: KL(data || flow) on 2000 held-out points, with the ring's exact log-density.
    """
    g = torch.Generator().manual_seed(31_000 + seed)
    train = [{"x": _ring(256, g)} for _ in range(steps)]
    ge = torch.Generator().manual_seed(31_999)
    evals = [{"x": _ring(_SAMPLES, ge)}]
    return HealthyBuilt(FlowModule(), train, evals)


# --------------------------------------------------------------------------------------------------------------
# (4) mixup: soft targets whose loss never goes low
# --------------------------------------------------------------------------------------------------------------


class MixupModule(MetricModule):
    """mixup (Zhang et al. 2018): each batch is a convex mix of itself and a permutation of itself, with the same
    mix of the two labels' cross-entropies; ``lam`` ~ Beta(alpha, alpha) per batch, drawn when the batches are
    built so every method sees the same mixes."""

    def __init__(self) -> None:
        super().__init__(
            mlp(128, 2, nn.ReLU),
            "mixup",
            lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4),
            error_rate,
        )

    def compute_loss(self, batch: Batch) -> torch.Tensor:
        lam, perm = batch["lam"], batch["perm"]
        logits = self.net(lam * batch["x"] + (1 - lam) * batch["x"][perm])
        return lam * F.cross_entropy(logits, batch["y"]) + (1 - lam) * F.cross_entropy(logits, batch["y"][perm])


def _mixup_digits(seed: int, steps: int) -> HealthyBuilt:
    """mixup with alpha 1 (Zhang et al. 2018's CIFAR-10 setting) on digits: ReLU MLP, SGD with Nesterov
    momentum 0.9, lr 0.05, weight decay 5e-4 (the corpus's SGD settings). The training loss on mixed targets
    stays near 1 while the held-out error falls.

    Metric: held-out error rate.
    """
    train, evals = _digit_batches(seed, steps)
    g = torch.Generator().manual_seed(32_000 + seed)
    for batch in train:
        batch["lam"] = float(torch.rand((), generator=g))  # Beta(1, 1) is the uniform distribution
        batch["perm"] = torch.randperm(len(batch["x"]), generator=g)
    return HealthyBuilt(MixupModule(), train, evals)


# --------------------------------------------------------------------------------------------------------------
# (5) metric learning: a triplet loss that is exactly zero on many batches
# --------------------------------------------------------------------------------------------------------------

_CLASSES_PER_BATCH, _PER_CLASS = 8, 8


class TripletModule(MetricModule):
    """Batch-hard triplet loss (Hermans et al. 2017, "In Defense of the Triplet Loss"): for every anchor of a
    P x K batch, its farthest positive and nearest negative, hinge with margin 0.2 (FaceNet's, Schroff et al.
    2015) on L2-normalized 32-d embeddings; once the margin holds on a whole batch the loss and gradient are 0."""

    def __init__(self) -> None:
        super().__init__(mlp(128, 2, nn.ReLU, n_out=32), "triplet", _adam(3e-4), _nearest_neighbour_error)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(x), dim=-1)

    def compute_loss(self, batch: Batch) -> torch.Tensor:
        e, y = self.embed(batch["x"]), batch["y"]
        distance = torch.cdist(e, e)
        same = y[:, None] == y[None, :]
        hardest_positive = (distance * same).amax(1)
        hardest_negative = distance.masked_fill(same, float("inf")).amin(1)
        return F.relu(hardest_positive - hardest_negative + 0.2).mean()


def _nearest_neighbour_error(module: MetricModule, batches: list[Batch]) -> float:
    assert isinstance(module, TripletModule)
    wrong = total = 0
    for b in batches:
        e = module.embed(b["x"])
        distance = torch.cdist(e, e).fill_diagonal_(float("inf"))
        wrong += int((b["y"][distance.argmin(1)] != b["y"]).sum())
        total += len(b["y"])
    return wrong / total


def _triplet_batch_hard(seed: int, steps: int) -> HealthyBuilt:
    """Batch-hard triplet metric learning on digits (Hermans et al. 2017: P x K batches, here 8 classes x 8
    digits, Adam lr 3e-4), margin 0.2: the loss falls to exactly 0 on more and more batches as training goes on.

    Metric: leave-one-out 1-nearest-neighbour error of the held-out digits' embeddings.
    """
    x, y, x_eval, y_eval = _digits()
    by_class = [torch.nonzero(y == c).squeeze(-1) for c in range(10)]
    g = torch.Generator().manual_seed(33_000 + seed)
    train = []
    for _ in range(steps):
        classes = torch.randperm(10, generator=g)[:_CLASSES_PER_BATCH]
        idx = torch.cat(
            [by_class[c][torch.randint(len(by_class[c]), (_PER_CLASS,), generator=g)] for c in classes.tolist()]
        )
        train.append({"x": x[idx], "y": y[idx]})
    return HealthyBuilt(TripletModule(), train, [{"x": x_eval, "y": y_eval}])


# --------------------------------------------------------------------------------------------------------------
# (6) a sparse mixture of experts: experts without gradients, a router with an auxiliary loss
# --------------------------------------------------------------------------------------------------------------


class SwitchLayer(nn.Module):
    """A top-1 mixture-of-experts layer (Switch Transformer, Fedus et al. 2022): each token goes to the expert
    its router ranks first, scaled by that router probability; the load-balancing loss ``N * sum_i f_i P_i``
    is kept in ``aux_loss``. An expert no token chose this batch gets no gradient (``None``)."""

    def __init__(self, width: int = 128, experts: int = 4) -> None:
        super().__init__()
        self.router = nn.Linear(width, experts)
        self.experts = nn.ModuleList(
            [nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width)) for _ in range(experts)]
        )
        self.aux_loss = torch.zeros(())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = F.softmax(self.router(x), -1)
        gate, choice = probs.max(-1)
        out = torch.zeros_like(x)
        for i, expert in enumerate(self.experts):
            chosen = choice == i
            if chosen.any():
                out[chosen] = gate[chosen, None] * expert(x[chosen])
        fraction = F.one_hot(choice, len(self.experts)).float().mean(0)
        self.aux_loss = len(self.experts) * (fraction * probs.mean(0)).sum()
        return x + out


class MoeModule(MetricModule):
    """A digit classifier with one Switch layer between an input projection and the head; the loss is the
    cross-entropy plus 0.01 x the load-balancing loss (Fedus et al.'s coefficient)."""

    def __init__(self) -> None:
        net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), SwitchLayer(), nn.ReLU(), nn.Linear(128, 10))
        super().__init__(net, "moe", _adam(1e-3), error_rate)

    def compute_loss(self, batch: Batch) -> torch.Tensor:
        logits = self.net(batch["x"])
        return F.cross_entropy(logits, batch["y"]) + 0.01 * self.net[2].aux_loss


def _switch_moe(seed: int, steps: int) -> HealthyBuilt:
    """A top-1 mixture of 4 experts (Switch Transformer routing and load-balancing loss, coefficient 0.01) in a
    digit classifier, Adam lr 1e-3: experts that receive no token get no gradient, and the router's choices move.

    Metric: held-out error rate.
    """
    train, evals = _digit_batches(seed, steps)
    return HealthyBuilt(MoeModule(), train, evals)


# --------------------------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------------------------


HOLDOUT2_TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        _task("one_cycle_sgd", 400, _one_cycle_sgd),
        _task("ddpm_ring", 600, _ddpm_ring),
        _task("realnvp_ring", 600, _realnvp_ring),
        _task("mixup_digits", 400, _mixup_digits),
        _task("triplet_batch_hard", 400, _triplet_batch_hard),
        _task("switch_moe", 400, _switch_moe),
    ]
}
"""The second held-out set, in the order the report lists it. Every task's ``kind`` is ``"healthy"``."""

METRICS: dict[str, str] = {
    "one_cycle_sgd": "error rate",
    "ddpm_ring": "sliced W1 to data",
    "realnvp_ring": "KL to data",
    "mixup_digits": "error rate",
    "triplet_batch_hard": "1-NN error",
    "switch_moe": "error rate",
}
"""What each task's ``evaluate`` measures (lower is better)."""
