"""A corpus of *healthy but unusual* trainings: nothing is wrong with them, and a protection must leave them alone.

Each task trains something that works without any protection, in a way that breaks an assumption a
gradient-explosion detector might make (a loss that should fall, a gradient scale that stays put, one optimizer,
a positive loss). Every :class:`~benchmarks.divergence_tasks.Task` here has the same shape as the divergence
tasks: ``build(seed, steps=None) -> Built`` with one training batch per step and held-out evaluation batches.
The difference is what ``evaluate(eval_batches)`` returns: a **task metric** (lower is better) that says
whether the model learned what it was trained for, never its training loss:

========================  ======================================================================================
task                      metric
========================  ======================================================================================
``gan_mixture``           sliced Wasserstein-1 distance of 2000 generator samples to 2000 held-out data points
``vae_kl_warmup``         held-out reconstruction error (mean squared error per pixel, decoding the posterior mean)
``sgdr_mlp``              held-out error rate (1 - accuracy)
``curriculum_classes``    held-out error rate on all ten classes
``gradual_unfreeze``      held-out error rate on the fine-tuning classes
``infonce_temperature``   held-out retrieval error (top-1, view A -> view B among 100 candidates)
``reinforce_bandit``      expected regret of the policy on held-out contexts (1 - P(best arm))
``multitask_schedule``    held-out mean of both tasks' mean squared error divided by the target's variance
``label_noise30``         held-out error rate on clean labels
``gru_delayed_recall``    held-out error rate of the recalled symbol
``hard_batches``          held-out error rate
``adam_converge``         held-out error rate
========================  ======================================================================================

Settings come from the papers each task cites (or the values the other benchmark tasks already use); none was
chosen by looking at what a protection does. Data is synthetic or scikit-learn's bundled 8x8 digits.

Example::

    from benchmarks.healthy_tasks import HEALTHY_TASKS
    built = HEALTHY_TASKS["gan_mixture"].build(seed=0, steps=40)
    trainer = lightning.pytorch.Trainer(max_steps=built.max_steps, logger=False)
    trainer.fit(built.module, built.train_loader())
    print(built.module.evaluate(built.eval_batches))  # sliced Wasserstein distance to the data
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.nn import functional as F

from benchmarks.divergence_tasks import (
    Batch,
    BenchModule,
    Built,
    Task,
    _digit_batches,
    _digits,
    mlp,
    sgd,
)

# --------------------------------------------------------------------------------------------------------------
# shared pieces
# --------------------------------------------------------------------------------------------------------------


@dataclass
class HealthyBuilt(Built):
    """A :class:`Built` whose module may step several optimizers per batch (a GAN steps two).

    Lightning counts every ``optimizer.step()`` in ``global_step`` under manual optimization, so a run of
    ``steps`` batches needs ``max_steps = steps * optimizer_steps_per_batch``.
    """

    optimizer_steps_per_batch: int = 1

    @property
    def max_steps(self) -> int:
        return self.steps * self.optimizer_steps_per_batch


def _adam(lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999)) -> Callable[[Any], torch.optim.Optimizer]:
    return lambda params: torch.optim.Adam(params, lr=lr, betas=betas)


def _finite(value: float) -> float:
    return value if math.isfinite(value) else float("inf")


class MetricModule(BenchModule):
    """A :class:`BenchModule` whose ``evaluate`` returns a task metric (lower is better) instead of the loss.

    ``metric(module, batches)`` is computed in eval mode without gradients; non-finite weights give ``inf``.
    ``scheduler(optimizer)``, when given, is stepped every optimizer step (e.g. SGDR's warm restarts).
    """

    def __init__(
        self,
        net: nn.Module,
        loss: str,
        optimizer: Callable[[Any], torch.optim.Optimizer],
        metric: Callable[[MetricModule, list[Batch]], float],
        scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
    ) -> None:
        super().__init__(net, loss, optimizer)
        self._metric = metric
        self._scheduler = scheduler

    def configure_optimizers(self) -> Any:
        if self._scheduler is None:
            return super().configure_optimizers()
        optimizer = self._optimizer(self.parameters())
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self._scheduler(optimizer), "interval": "step"}}

    @torch.no_grad()
    def evaluate(self, batches: list[Batch]) -> float:
        was_training = self.training
        self.eval()
        try:
            if not all(torch.isfinite(p).all() for p in self.parameters()):
                return float("inf")
            return _finite(float(self._metric(self, batches)))
        finally:
            self.train(was_training)


def error_rate(module: BenchModule, batches: list[Batch]) -> float:
    """1 - accuracy of ``module.net``'s argmax over ``batches``."""
    wrong = total = 0
    for batch in batches:
        wrong += int((module.net(batch["x"]).argmax(-1) != batch["y"]).sum())
        total += len(batch["y"])
    return wrong / total


def _sample_batches(x: torch.Tensor, y: torch.Tensor, steps: int, g: torch.Generator, size: int = 64) -> list:
    batches = []
    for _ in range(steps):
        idx = torch.randint(len(x), (size,), generator=g)
        batches.append({"x": x[idx], "y": y[idx]})
    return batches


def _eval_digits(mask_classes: torch.Tensor | None = None, relabel: int = 0) -> list[Batch]:
    _, _, x_eval, y_eval = _digits()
    if mask_classes is not None:
        keep = torch.isin(y_eval, mask_classes)
        x_eval, y_eval = x_eval[keep], y_eval[keep] - relabel
    return [{"x": x_eval[i : i + 200], "y": y_eval[i : i + 200]} for i in range(0, len(x_eval), 200)]


# --------------------------------------------------------------------------------------------------------------
# (a) GAN on a 2-D Gaussian mixture, two Adam optimizers, manual optimization
# --------------------------------------------------------------------------------------------------------------


def _ring(n: int, g: torch.Generator, modes: int = 8, radius: float = 2.0, std: float = 0.02) -> torch.Tensor:
    """The 2-D ring of 8 Gaussians of Metz et al. 2017 ("Unrolled GANs"): radius 2, std 0.02."""
    k = torch.randint(modes, (n,), generator=g).float()
    centers = torch.stack([torch.cos(2 * math.pi * k / modes), torch.sin(2 * math.pi * k / modes)], -1) * radius
    return centers + std * torch.randn(n, 2, generator=g)


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, projections: int = 64) -> float:
    """Sliced Wasserstein-1 distance (Rabin et al. 2011) between two equal-size 2-D samples, fixed directions."""
    angles = torch.arange(projections, dtype=torch.float32) * math.pi / projections
    dirs = torch.stack([torch.cos(angles), torch.sin(angles)], 0)
    pa, _ = torch.sort(a @ dirs, 0)
    pb, _ = torch.sort(b @ dirs, 0)
    return float((pa - pb).abs().mean())


class TwoPlayerModule(pl.LightningModule):
    """What the adversarial tasks share: manual optimization with one optimizer per network, as Lightning's GAN
    examples do, and a ``generator`` judged by its samples' sliced Wasserstein distance to held-out data.
    ``manual_clip_val`` (set by the benchmark when a method asks for ``Trainer(gradient_clip_val=...)``, which
    manual optimization refuses) clips each network's gradient norm through ``self.clip_gradients``, the way
    Lightning documents clipping for manual optimization."""

    generator: nn.Module

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.manual_clip_val: float | None = None
        self.latest_loss: torch.Tensor | None = None

    def _step(self, optimizer: Any, loss: torch.Tensor) -> None:
        self.latest_loss = loss.detach()
        optimizer.zero_grad()
        self.manual_backward(loss)
        if self.manual_clip_val is not None:
            self.clip_gradients(optimizer, gradient_clip_val=self.manual_clip_val, gradient_clip_algorithm="norm")
        optimizer.step()

    @torch.no_grad()
    def evaluate(self, batches: list[Batch]) -> float:
        was_training = self.training
        self.eval()
        try:
            values = [sliced_wasserstein(self.generator(b["z"]), b["x"]) for b in batches]
        finally:
            self.train(was_training)
        return _finite(sum(values) / len(values))


class GanModule(TwoPlayerModule):
    """A GAN (Goodfellow et al. 2014, non-saturating generator loss) with one Adam optimizer per network."""

    def __init__(self, noise_dim: int = 8, width: int = 128, lr: float = 1e-3) -> None:
        super().__init__()
        self.generator = mlp(width, 2, nn.ReLU, n_in=noise_dim, n_out=2)
        self.discriminator = mlp(width, 2, lambda: nn.LeakyReLU(0.2), n_in=2, n_out=1)
        self.lr = lr

    def training_step(self, batch: Batch, batch_idx: int) -> None:
        opt_d, opt_g = self.optimizers()
        fake = self.generator(batch["z"])
        real_logit, fake_logit = self.discriminator(batch["x"]), self.discriminator(fake.detach())
        d_loss = F.binary_cross_entropy_with_logits(
            real_logit, torch.ones_like(real_logit)
        ) + F.binary_cross_entropy_with_logits(fake_logit, torch.zeros_like(fake_logit))
        self._step(opt_d, d_loss)
        gen_logit = self.discriminator(fake)
        self._step(opt_g, F.binary_cross_entropy_with_logits(gen_logit, torch.ones_like(gen_logit)))

    def configure_optimizers(self) -> Any:
        betas = (0.5, 0.999)  # DCGAN (Radford et al. 2016)
        return [
            torch.optim.Adam(self.discriminator.parameters(), lr=self.lr, betas=betas),
            torch.optim.Adam(self.generator.parameters(), lr=self.lr, betas=betas),
        ]


def _gan_mixture(seed: int, steps: int) -> HealthyBuilt:
    """A GAN on the 8-Gaussian ring: two Adam optimizers (betas 0.5/0.999 as DCGAN, lr 1e-3), manual optimization.

    The two losses compete: the discriminator's rises whenever the generator improves, so neither is an
    objective that should fall. DCGAN's lr 2e-4 leaves the unguarded generator at its initial distance after 400
    steps on 4 of 5 seeds, so the lr is 1e-3, the value toy 2-D GAN examples commonly use. Metric: sliced
    Wasserstein-1 distance of generated samples to held-out data.
    """
    g = torch.Generator().manual_seed(6000 + seed)
    train = [{"x": _ring(128, g), "z": torch.randn(128, 8, generator=g)} for _ in range(steps)]
    ge = torch.Generator().manual_seed(6999)
    evals = [{"x": _ring(2000, ge), "z": torch.randn(2000, 8, generator=ge)}]
    return HealthyBuilt(GanModule(), train, evals, optimizer_steps_per_batch=2)


# --------------------------------------------------------------------------------------------------------------
# (b) VAE with KL warm-up
# --------------------------------------------------------------------------------------------------------------


class VaeModule(MetricModule):
    """A Gaussian VAE (Kingma & Welling 2014) whose KL weight rises linearly from 0 to 1 over ``warmup`` steps
    (Bowman et al. 2016, "Generating Sentences from a Continuous Space": KL cost annealing)."""

    def __init__(self, warmup: int, latent: int = 8) -> None:
        net = nn.ModuleDict(
            {"enc": mlp(256, 1, nn.ReLU, n_in=64, n_out=2 * latent), "dec": mlp(256, 1, nn.ReLU, n_in=latent, n_out=64)}
        )
        super().__init__(net, "vae", _adam(1e-3), _reconstruction_error)
        self.warmup = max(1, warmup)

    def compute_loss(self, batch: Batch) -> torch.Tensor:
        mu, logvar = self.net["enc"](batch["x"]).chunk(2, -1)
        z = mu + torch.exp(0.5 * logvar) * batch["eps"]
        recon = 0.5 * ((self.net["dec"](z) - batch["x"]) ** 2).sum(-1).mean()
        kl = 0.5 * (mu**2 + logvar.exp() - 1 - logvar).sum(-1).mean()
        beta = min(1.0, self.global_step / self.warmup)
        return recon + beta * kl


def _reconstruction_error(module: MetricModule, batches: list[Batch]) -> float:
    errors = [
        float(((module.net["dec"](module.net["enc"](b["x"]).chunk(2, -1)[0]) - b["x"]) ** 2).mean()) for b in batches
    ]
    return sum(errors) / len(errors)


def _vae_kl_warmup(seed: int, steps: int) -> HealthyBuilt:
    """A VAE on the digits whose KL weight warms up linearly from 0 to 1 over the first half (Bowman et al. 2016).

    The loss has a scheduled term: it *rises* while the KL weight grows. Adam lr 1e-3. Metric: held-out
    reconstruction error (MSE per pixel of the decoded posterior mean, standardized pixels).
    """
    train, evals = _digit_batches(seed, steps)
    g = torch.Generator().manual_seed(7000 + seed)
    train = [{"x": b["x"], "eps": torch.randn(len(b["x"]), 8, generator=g)} for b in train]
    return HealthyBuilt(VaeModule(warmup=steps // 2), train, [{"x": b["x"]} for b in evals])


# --------------------------------------------------------------------------------------------------------------
# (c) SGDR, (d) curriculum, (i) label noise, (k) hard batches, (l) Adam to convergence: digit classifiers
# --------------------------------------------------------------------------------------------------------------


def _sgdr_mlp(seed: int, steps: int) -> HealthyBuilt:
    """ReLU MLP on digits, SGD (Nesterov momentum 0.9, lr 0.05, weight decay 5e-4) with SGDR warm restarts.

    ``CosineAnnealingWarmRestarts(T_0=steps/7, T_mult=2)`` (Loshchilov & Hutter 2017, their WRN settings): three
    cycles, the LR jumping back to its maximum at 1/7 and 3/7 of the run. Metric: held-out error rate.
    """
    train, evals = _digit_batches(seed, steps)
    t0 = max(1, steps // 7)
    module = MetricModule(
        mlp(128, 2, nn.ReLU),
        "ce",
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4),
        error_rate,
        lambda opt: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=t0, T_mult=2),
    )
    return HealthyBuilt(module, train, evals)


def _curriculum_classes(seed: int, steps: int) -> HealthyBuilt:
    """A class curriculum on digits (Bengio et al. 2009): 2 classes first, then 4, 6, 8 and all 10.

    A stage starts every 15 % of the run (all ten from 60 %); each new stage brings classes the network has
    never been asked about, so the loss jumps up. SGD+momentum 0.9, lr 0.05. Metric: held-out error on all
    ten classes.
    """
    x, y, _, _ = _digits()
    g = torch.Generator().manual_seed(1000 + seed)
    train = []
    for step in range(steps):
        classes = min(10, 2 + 2 * int(step / (0.15 * steps)))
        pool = (y < classes).nonzero().squeeze(1)
        idx = pool[torch.randint(len(pool), (64,), generator=g)]
        train.append({"x": x[idx], "y": y[idx]})
    module = MetricModule(mlp(128, 2, nn.ReLU), "ce", sgd(0.05, 0.9), error_rate)
    return HealthyBuilt(module, train, _eval_digits())


def _label_noise30(seed: int, steps: int) -> HealthyBuilt:
    """ReLU MLP on digits with 30 % of the training labels replaced by a uniformly drawn wrong class (symmetric
    label noise, as in Zhang et al. 2017 "Understanding deep learning requires rethinking generalization").

    SGD+momentum 0.9, lr 0.05. Metric: held-out error rate on the clean labels.
    """
    x, y, _, _ = _digits()
    g = torch.Generator().manual_seed(8000 + seed)
    noisy = y.clone()
    flip = torch.rand(len(y), generator=g) < 0.3
    noisy[flip] = (y[flip] + torch.randint(1, 10, (int(flip.sum()),), generator=g)) % 10
    module = MetricModule(mlp(128, 2, nn.ReLU), "ce", sgd(0.05, 0.9), error_rate)
    return HealthyBuilt(module, _sample_batches(x, noisy, steps, g), _eval_digits())


def _hard_slice() -> torch.Tensor:
    """Indices of the 15 % of training digits a logistic regression finds hardest (lowest probability of the
    true class), labels untouched."""
    from sklearn.linear_model import LogisticRegression

    x, y, _, _ = _digits()
    reference = LogisticRegression(max_iter=2000).fit(x.numpy(), y.numpy())
    p_true = torch.tensor(reference.predict_proba(x.numpy()))[torch.arange(len(y)), y]
    return torch.argsort(p_true)[: int(0.15 * len(y))]


def _hard_batches(seed: int, steps: int) -> HealthyBuilt:
    """ReLU MLP on digits where 3 % of the batches are drawn only from the hardest 15 % of the training set
    (correct labels: rare, naturally hard batches, as in a shuffled dataset with a difficult sub-population).

    SGD+momentum 0.9, lr 0.05. Metric: held-out error rate.
    """
    x, y, _, _ = _digits()
    hard = _hard_slice()
    g = torch.Generator().manual_seed(9000 + seed)
    train = _sample_batches(x, y, steps, g)
    n_hard = max(1, round(0.03 * steps))
    for i in torch.randperm(steps, generator=g)[:n_hard].tolist():
        idx = hard[torch.randint(len(hard), (64,), generator=g)]
        train[i] = {"x": x[idx], "y": y[idx]}
    module = MetricModule(mlp(128, 2, nn.ReLU), "ce", sgd(0.05, 0.9), error_rate)
    return HealthyBuilt(module, train, _eval_digits())


def _adam_converge(seed: int, steps: int) -> HealthyBuilt:
    """ReLU MLP on digits under Adam (lr 1e-3, the defaults) for ~23 epochs: the training loss approaches zero.

    Near convergence the loss is tiny and its batch-to-batch noise is large relative to its mean. Metric:
    held-out error rate.
    """
    train, evals = _digit_batches(seed, steps)
    return HealthyBuilt(MetricModule(mlp(128, 2, nn.ReLU), "ce", _adam(1e-3), error_rate), train, evals)


# --------------------------------------------------------------------------------------------------------------
# (e) gradual unfreezing
# --------------------------------------------------------------------------------------------------------------


class UnfreezeModule(MetricModule):
    """Gradual unfreezing (Howard & Ruder 2018, ULMFiT): only the head trains at first, then one more body layer
    (from the top) is unfrozen at each of ``unfreeze_at``."""

    def __init__(self, net: nn.Sequential, unfreeze_at: list[int]) -> None:
        super().__init__(net, "ce", _adam(1e-3), error_rate)
        self.unfreeze_at = unfreeze_at
        self._set_trainable(0)

    def _layers(self) -> list[nn.Module]:
        return [m for m in self.net if isinstance(m, nn.Linear)]

    def _set_trainable(self, unfrozen_body_layers: int) -> None:
        layers = self._layers()
        body, head = layers[:-1], layers[-1]
        for p in head.parameters():
            p.requires_grad_(True)
        for depth, layer in enumerate(reversed(body)):
            for p in layer.parameters():
                p.requires_grad_(depth < unfrozen_body_layers)

    def on_train_batch_start(self, batch: Batch, batch_idx: int) -> None:
        self._set_trainable(sum(self.global_step >= s for s in self.unfreeze_at))


def _pretrained_body(seed: int) -> nn.Sequential:
    """A 3-layer ReLU MLP pre-trained (plain PyTorch, Adam, 200 steps) on digits 0-4."""
    x, y, _, _ = _digits()
    keep = y < 5
    x, y = x[keep], y[keep]
    net = mlp(128, 3, nn.ReLU, n_out=5)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(10_000 + seed)
    for _ in range(200):
        idx = torch.randint(len(x), (64,), generator=g)
        opt.zero_grad()
        F.cross_entropy(net(x[idx]), y[idx]).backward()
        opt.step()
    return net


def _gradual_unfreeze(seed: int, steps: int) -> HealthyBuilt:
    """Fine-tune a body pre-trained on digits 0-4 to digits 5-9 with a new head, ULMFiT's gradual unfreezing.

    Head only for the first quarter, then the top, middle and bottom body layers are unfrozen at 1/4, 1/2 and
    3/4 of the run: each unfreezing adds gradients the optimizer has never seen. Adam lr 1e-3. Metric: held-out
    error rate on digits 5-9.
    """
    net = _pretrained_body(seed)
    net[-1] = nn.Linear(128, 5)
    x, y, _, _ = _digits()
    keep = y >= 5
    g = torch.Generator().manual_seed(11_000 + seed)
    train = _sample_batches(x[keep], y[keep] - 5, steps, g)
    module = UnfreezeModule(net, [steps // 4, steps // 2, 3 * steps // 4])
    return HealthyBuilt(module, train, _eval_digits(torch.arange(5, 10), relabel=5))


# --------------------------------------------------------------------------------------------------------------
# (f) contrastive InfoNCE with a learnable temperature
# --------------------------------------------------------------------------------------------------------------


class TwoTower(nn.Module):
    """Two encoders and CLIP's learnable logit scale (init ``log(1/0.07)``, clamped at 100; Radford et al. 2021)."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.a = mlp(128, 1, nn.ReLU, n_in=64, n_out=dim)
        self.b = mlp(128, 1, nn.ReLU, n_in=64, n_out=dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, xa: torch.Tensor, xb: torch.Tensor) -> torch.Tensor:
        za, zb = F.normalize(self.a(xa), dim=-1), F.normalize(self.b(xb), dim=-1)
        return self.logit_scale.clamp(max=math.log(100)).exp() * za @ zb.T


class InfoNceModule(MetricModule):
    def __init__(self) -> None:
        super().__init__(TwoTower(), "infonce", _adam(5e-4), _retrieval_error)

    def compute_loss(self, batch: Batch) -> torch.Tensor:
        logits = self.net(batch["xa"], batch["xb"])
        target = torch.arange(len(logits))
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def _retrieval_error(module: MetricModule, batches: list[Batch]) -> float:
    wrong = total = 0
    for b in batches:
        logits = module.net(b["xa"], b["xb"])
        wrong += int((logits.argmax(-1) != torch.arange(len(logits))).sum())
        total += len(logits)
    return wrong / total


def _two_views(x: torch.Tensor, perm: torch.Tensor, g: torch.Generator) -> Batch:
    return {
        "xa": x + 0.5 * torch.randn(x.shape, generator=g),
        "xb": x[:, perm] + 0.5 * torch.randn(x.shape, generator=g),
    }


def _infonce_temperature(seed: int, steps: int) -> HealthyBuilt:
    """CLIP-style contrastive training (InfoNCE, symmetric cross-entropy) of two encoders with a learnable
    temperature (logit scale init 1/0.07, clamped at 100, Adam lr 5e-4 as CLIP).

    The two "modalities" are noisy digits (noise std 0.5) and the same digits with their pixels permuted by a
    fixed permutation, with independent noise. Metric: held-out top-1 retrieval error among 100 pairs.
    """
    x, _, x_eval, _ = _digits()
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(12_345))
    g = torch.Generator().manual_seed(12_000 + seed)
    train = [_two_views(x[torch.randint(len(x), (128,), generator=g)], perm, g) for _ in range(steps)]
    ge = torch.Generator().manual_seed(12_999)
    evals = [_two_views(x_eval[i : i + 100], perm, ge) for i in range(0, 300, 100)]
    return HealthyBuilt(InfoNceModule(), train, evals)


# --------------------------------------------------------------------------------------------------------------
# (g) REINFORCE on a contextual bandit
# --------------------------------------------------------------------------------------------------------------


class ReinforceModule(MetricModule):
    """REINFORCE (Williams 1992) with the batch-mean reward as baseline: loss ``-mean(log pi(a|x) * (r - b))``,
    which is negative whenever the sampled actions were worse than average. Actions are drawn by inverse CDF from
    uniforms stored in the batch, so every method sees the same random numbers."""

    def __init__(self) -> None:
        super().__init__(mlp(64, 1, nn.ReLU), "reinforce", _adam(1e-3), _regret)

    def compute_loss(self, batch: Batch) -> torch.Tensor:
        logp = F.log_softmax(self.net(batch["x"]), -1)
        with torch.no_grad():
            cdf = logp.exp().cumsum(-1)
            action = torch.searchsorted(cdf, batch["u"].unsqueeze(-1) * cdf[:, -1:]).squeeze(-1).clamp_max(9)
            reward = (action == batch["y"]).float()
            advantage = reward - reward.mean()
        return -(logp.gather(-1, action.unsqueeze(-1)).squeeze(-1) * advantage).mean()


def _regret(module: MetricModule, batches: list[Batch]) -> float:
    values = [float(1 - F.softmax(module.net(b["x"]), -1).gather(-1, b["y"].unsqueeze(-1)).mean()) for b in batches]
    return sum(values) / len(values)


def _reinforce_bandit(seed: int, steps: int) -> HealthyBuilt:
    """A 10-armed contextual bandit from the digits (reward 1 when the arm is the digit's class, else 0), a
    softmax policy trained by REINFORCE with a baseline, Adam lr 1e-3. The loss is often negative.

    Metric: expected regret on held-out contexts, ``1 - E[pi(correct arm | x)]``.
    """
    train, evals = _digit_batches(seed, steps)
    g = torch.Generator().manual_seed(13_000 + seed)
    train = [{**b, "u": torch.rand(len(b["y"]), generator=g)} for b in train]
    return HealthyBuilt(ReinforceModule(), train, evals)


# --------------------------------------------------------------------------------------------------------------
# (h) multi-task regression with a loss-weight schedule
# --------------------------------------------------------------------------------------------------------------


class MultiTaskModule(MetricModule):
    """Shared trunk, two regression heads; ``loss = mse_1 + w(t) * mse_2`` with ``w`` rising linearly from 0 to 1
    over the first ``ramp`` steps (an auxiliary task switched in gradually)."""

    def __init__(self, ramp: int) -> None:
        super().__init__(mlp(64, 2, nn.Tanh, n_in=16, n_out=2), "multitask", _adam(1e-3), _multitask_error)
        self.ramp = max(1, ramp)

    def compute_loss(self, batch: Batch) -> torch.Tensor:
        err = ((self.net(batch["x"]) - batch["y"]) ** 2).mean(0)
        return err[0] + min(1.0, self.global_step / self.ramp) * err[1]


def _multitask_error(module: MetricModule, batches: list[Batch]) -> float:
    values = [float((((module.net(b["x"]) - b["y"]) ** 2).mean(0) / b["y"].var(0)).mean()) for b in batches]
    return sum(values) / len(values)


def _multitask_schedule(seed: int, steps: int) -> HealthyBuilt:
    """Two-task regression from one trunk (tanh MLP) with a loss-weight schedule: the second task's weight rises
    from 0 to 1 over the first 60 % of the run; its targets are 3x larger, so the gradient norm grows while
    training is healthy. Targets come from two random teacher networks. Adam lr 1e-3.

    Metric: held-out mean over both tasks of MSE / Var(target).
    """
    gt = torch.Generator().manual_seed(14_000 + seed)
    teachers = [
        (torch.randn(16, 32, generator=gt) / 4, torch.randn(32, generator=gt) / math.sqrt(32)) for _ in range(2)
    ]

    def sample(n: int, g: torch.Generator) -> Batch:
        x = torch.randn(n, 16, generator=g)
        y = torch.stack([torch.tanh(x @ w) @ v for w, v in teachers], -1) * torch.tensor([1.0, 3.0])
        return {"x": x, "y": y}

    g = torch.Generator().manual_seed(14_500 + seed)
    train = [sample(64, g) for _ in range(steps)]
    return HealthyBuilt(MultiTaskModule(int(0.6 * steps)), train, [sample(1000, torch.Generator().manual_seed(14_999))])


# --------------------------------------------------------------------------------------------------------------
# (j) GRU on a delayed-recall task: a plateau, then learning
# --------------------------------------------------------------------------------------------------------------


class RecallGru(nn.Module):
    def __init__(self, symbols: int, hidden: int = 64) -> None:
        super().__init__()
        self.gru = nn.GRU(symbols + 1, hidden, batch_first=True)
        self.head = nn.Linear(hidden, symbols)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(x)
        return self.head(out[:, -1])


def _recall_batch(n: int, length: int, symbols: int, g: torch.Generator) -> Batch:
    """The first input is a symbol to remember, then ``length - 2`` random distractor symbols, then a recall cue."""
    first = torch.randint(symbols, (n,), generator=g)
    tokens = torch.randint(symbols, (n, length), generator=g)
    tokens[:, 0] = first
    x = F.one_hot(tokens, symbols + 1).float()
    x[:, -1] = F.one_hot(torch.tensor(symbols), symbols + 1).float()
    return {"x": x, "y": first}


def _gru_delayed_recall(seed: int, steps: int) -> HealthyBuilt:
    """A GRU (Cho et al. 2014) recalls the first of 10 symbols (8 possible) after 8 distractors, Adam lr 3e-3.

    Memory tasks of this kind sit at chance for a while and then learn abruptly (the gradient signal through
    the long delay is tiny until the gates open; Hochreiter & Schmidhuber 1997): the gradient norm rises several
    times when learning starts. Metric: held-out recall error rate.
    """
    g = torch.Generator().manual_seed(15_000 + seed)
    train = [_recall_batch(64, 10, 8, g) for _ in range(steps)]
    ge = torch.Generator().manual_seed(15_999)
    module = MetricModule(RecallGru(8), "ce", _adam(3e-3), error_rate)
    return HealthyBuilt(module, train, [_recall_batch(500, 10, 8, ge)])


# --------------------------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------------------------


def _task(name: str, steps: int, builder: Callable[[int, int], HealthyBuilt]) -> Task:
    doc = (builder.__doc__ or "").strip().split("\n\n")[0]
    return Task(name, "healthy", " ".join(doc.split()), steps, builder)


HEALTHY_TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        _task("gan_mixture", 400, _gan_mixture),
        _task("vae_kl_warmup", 300, _vae_kl_warmup),
        _task("sgdr_mlp", 350, _sgdr_mlp),
        _task("curriculum_classes", 300, _curriculum_classes),
        _task("gradual_unfreeze", 300, _gradual_unfreeze),
        _task("infonce_temperature", 300, _infonce_temperature),
        _task("reinforce_bandit", 300, _reinforce_bandit),
        _task("multitask_schedule", 300, _multitask_schedule),
        _task("label_noise30", 300, _label_noise30),
        _task("gru_delayed_recall", 300, _gru_delayed_recall),
        _task("hard_batches", 300, _hard_batches),
        _task("adam_converge", 400, _adam_converge),
    ]
}
"""The corpus, in the order the report lists it. Every task's ``kind`` is ``"healthy"``."""

METRICS: dict[str, str] = {
    "gan_mixture": "sliced W1 to data",
    "vae_kl_warmup": "recon. MSE",
    "sgdr_mlp": "error rate",
    "curriculum_classes": "error rate",
    "gradual_unfreeze": "error rate",
    "infonce_temperature": "retrieval error",
    "reinforce_bandit": "expected regret",
    "multitask_schedule": "normalized MSE",
    "label_noise30": "clean error rate",
    "gru_delayed_recall": "recall error",
    "hard_batches": "error rate",
    "adam_converge": "error rate",
}
"""What each task's ``evaluate`` measures (lower is better)."""
