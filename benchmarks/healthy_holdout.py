"""A held-out set of *healthy but unusual* trainings, of shapes the guard was never tuned on.

Same contract as :mod:`benchmarks.healthy_tasks` (``build(seed, steps=None) -> HealthyBuilt``, one training batch
per step, ``evaluate(eval_batches)`` returns a held-out **task metric**, lower is better, never the training
loss), but none of these shapes is in that corpus, and none of their settings was chosen by looking at what a
protection does: they come from the paper or the standard recipe each task cites, and were changed only where
unprotected training did not learn (each docstring says so where it happened).

========================  ======================================================================================
task                      metric
========================  ======================================================================================
``distribution_shift``    held-out error rate on the post-shift (pixel-permuted) digits
``interpolation``         held-out MSE / Var(target) of an over-parameterised regressor fitted to ~0 training loss
``distill_t4``            the student's held-out error rate
``wgan_gp``               sliced Wasserstein-1 distance of 2000 generator samples to 2000 held-out data points
``a2c_gridworld``         normalized value gap of the policy, mean over start cells of ``1 - V_pi(s) / V*(s)``
``batch_size_ramp``       held-out error rate
``transformer_sort``      held-out token error rate of the sorted half (teacher forcing)
``adam_restart``          held-out error rate
========================  ======================================================================================

Data is synthetic or scikit-learn's bundled 8x8 digits.

Example::

    from benchmarks.healthy_holdout import HOLDOUT_TASKS
    built = HOLDOUT_TASKS["wgan_gp"].build(seed=0, steps=20)
    trainer = lightning.pytorch.Trainer(max_steps=built.max_steps, logger=False)
    trainer.fit(built.module, built.train_loader())
    print(built.module.evaluate(built.eval_batches))
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from benchmarks.divergence_tasks import Batch, CharGPT, Task, _digit_batches, _digits, mlp, sgd, warmup_cosine
from benchmarks.healthy_tasks import (
    HealthyBuilt,
    MetricModule,
    TwoPlayerModule,
    _adam,
    _eval_digits,
    _ring,
    _sample_batches,
    error_rate,
)

# --------------------------------------------------------------------------------------------------------------
# (1) abrupt distribution shift at 50 %: permuted digits
# --------------------------------------------------------------------------------------------------------------


def _distribution_shift(seed: int, steps: int) -> HealthyBuilt:
    """Online learning on digits whose pixels are permuted by a fixed random permutation from the middle of the run
    on (the permuted-MNIST shift of Goodfellow et al. 2013 and Kirkpatrick et al. 2017): the input distribution
    changes abruptly at 50 %, the loss jumps back to near chance and falls again.

    ReLU MLP, SGD+momentum 0.9, lr 0.05 (the corpus's digit recipe). Metric: held-out error rate on the
    permuted digits (the task after the shift).
    """
    x, y, x_eval, y_eval = _digits()
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(20_000 + seed))
    g = torch.Generator().manual_seed(20_100 + seed)
    train = _sample_batches(x, y, steps, g)
    for batch in train[steps // 2 :]:
        batch["x"] = batch["x"][:, perm]
    evals = [{"x": x_eval[i : i + 200][:, perm], "y": y_eval[i : i + 200]} for i in range(0, len(x_eval), 200)]
    return HealthyBuilt(MetricModule(mlp(128, 2, nn.ReLU), "ce", sgd(0.05, 0.9), error_rate), train, evals)


# --------------------------------------------------------------------------------------------------------------
# (2) over-parameterised regression trained to interpolation
# --------------------------------------------------------------------------------------------------------------


def _normalized_mse(module: MetricModule, batches: list[Batch]) -> float:
    values = [float(((module.net(b["x"]).squeeze(-1) - b["y"]) ** 2).mean() / b["y"].var()) for b in batches]
    return sum(values) / len(values)


def _interpolation(seed: int, steps: int) -> HealthyBuilt:
    """An over-parameterised ReLU MLP (2 x 512 units, ~270k weights) fitted full-batch to 64 noise-free points of a
    random tanh teacher in 8 dimensions with Adam (lr 1e-3, the defaults), trained to interpolation as in Zhang
    et al. 2017 and Belkin et al. 2019: the training loss falls to ~1e-6 and below, a loss near zero whose
    relative changes are large.

    Metric: held-out MSE / Var(target) on 1000 fresh points.
    """
    gt = torch.Generator().manual_seed(21_000 + seed)
    w, v = torch.randn(8, 16, generator=gt) / math.sqrt(8), torch.randn(16, generator=gt) / math.sqrt(16)

    def sample(n: int, g: torch.Generator) -> Batch:
        x = torch.randn(n, 8, generator=g)
        return {"x": x, "y": torch.tanh(x @ w) @ v}

    full = sample(64, torch.Generator().manual_seed(21_100 + seed))
    module = MetricModule(mlp(512, 2, nn.ReLU, n_in=8, n_out=1), "mse", _adam(1e-3), _normalized_mse)
    return HealthyBuilt(module, [full] * steps, [sample(1000, torch.Generator().manual_seed(21_999))])


# --------------------------------------------------------------------------------------------------------------
# (3) knowledge distillation at temperature 4
# --------------------------------------------------------------------------------------------------------------


class DistillModule(MetricModule):
    """Distillation (Hinton et al. 2015): ``T^2 KL(softmax(teacher / T) || softmax(student / T))``; the teacher's
    logits travel in the batch (``"t"``), computed once."""

    def __init__(self, temperature: float = 4.0) -> None:
        super().__init__(mlp(32, 1, nn.ReLU), "distill", _adam(1e-3), error_rate)
        self.temperature = temperature

    def compute_loss(self, batch: Batch) -> torch.Tensor:
        t = self.temperature
        log_student = F.log_softmax(self.net(batch["x"]) / t, -1)
        log_teacher = F.log_softmax(batch["t"] / t, -1)
        return t * t * F.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean")


def _teacher(seed: int) -> nn.Sequential:
    """A 2 x 256 ReLU MLP trained on the digits (plain PyTorch, Adam lr 1e-3, 400 steps of 64)."""
    x, y, _, _ = _digits()
    net = mlp(256, 2, nn.ReLU)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(22_000 + seed)
    for _ in range(400):
        idx = torch.randint(len(x), (64,), generator=g)
        opt.zero_grad()
        F.cross_entropy(net(x[idx]), y[idx]).backward()
        opt.step()
    return net.eval()


def _distill_t4(seed: int, steps: int) -> HealthyBuilt:
    """Knowledge distillation of a 2 x 256 teacher into a 1 x 32 student on digits with soft targets only, at
    temperature 4, the loss scaled by T^2 (Hinton et al. 2015); Adam lr 1e-3. The loss is a KL divergence that
    falls towards a floor above zero set by the student's capacity.

    Metric: the student's held-out error rate (true labels).
    """
    teacher = _teacher(seed)
    train, evals = _digit_batches(seed, steps)
    with torch.no_grad():
        train = [{**b, "t": teacher(b["x"])} for b in train]
    return HealthyBuilt(DistillModule(), train, evals)


# --------------------------------------------------------------------------------------------------------------
# (4) WGAN-GP: n_critic = 5, two Adam optimizers, manual optimization
# --------------------------------------------------------------------------------------------------------------


class WganGpModule(TwoPlayerModule):
    """WGAN-GP (Gulrajani et al. 2017, Algorithm 1): ``n_critic`` critic steps per generator step, gradient penalty
    ``lambda (|grad D(x_hat)| - 1)^2`` on random interpolates, Adam with betas (0.5, 0.9) for both networks (the
    authors' toy code). The critic's loss ``D(fake) - D(real) + GP`` is negative while training is healthy."""

    def __init__(self, n_critic: int = 5, width: int = 128, lr: float = 1e-4, gp: float = 10.0) -> None:
        super().__init__()
        self.generator = mlp(width, 3, nn.ReLU, n_in=2, n_out=2)
        self.critic = mlp(width, 3, nn.ReLU, n_in=2, n_out=1)
        self.n_critic, self.lr, self.gp = n_critic, lr, gp

    def training_step(self, batch: Batch, batch_idx: int) -> None:
        opt_c, opt_g = self.optimizers()
        for i in range(self.n_critic):
            real = batch["x"][i]
            with torch.no_grad():
                fake = self.generator(batch["z"][i])
            eps = batch["eps"][i]
            mixed = (eps * real + (1 - eps) * fake).requires_grad_(True)
            (grad,) = torch.autograd.grad(self.critic(mixed).sum(), mixed, create_graph=True)
            penalty = ((grad.norm(dim=-1) - 1) ** 2).mean()
            loss = self.critic(fake).mean() - self.critic(real).mean() + self.gp * penalty
            self._step(opt_c, loss)
        self._step(opt_g, -self.critic(self.generator(batch["z"][self.n_critic])).mean())

    def configure_optimizers(self) -> Any:
        betas = (0.5, 0.9)
        return [
            torch.optim.Adam(self.critic.parameters(), lr=self.lr, betas=betas),
            torch.optim.Adam(self.generator.parameters(), lr=self.lr, betas=betas),
        ]


def _wgan_gp(seed: int, steps: int) -> HealthyBuilt:
    """WGAN-GP on the 8-Gaussian ring (the toy data of Gulrajani et al. 2017): Algorithm 1's n_critic = 5 and
    lambda = 10, Adam lr 1e-4 with betas (0.5, 0.9), 3-hidden-layer ReLU networks with 2-D noise and batch 256 as
    in the authors' toy code. Six optimizer steps per batch under manual optimization; the critic's loss is
    negative. The networks are 128 wide instead of the toy code's 512, only for CPU time (512 takes ~2 min a run).

    Metric: sliced Wasserstein-1 distance of generated samples to held-out data.
    """
    g = torch.Generator().manual_seed(23_000 + seed)
    n = 5
    train = [
        {
            "x": torch.stack([_ring(256, g) for _ in range(n)]),
            "z": torch.randn(n + 1, 256, 2, generator=g),
            "eps": torch.rand(n, 256, 1, generator=g),
        }
        for _ in range(steps)
    ]
    ge = torch.Generator().manual_seed(23_999)
    evals = [{"x": _ring(2000, ge), "z": torch.randn(2000, 2, generator=ge)}]
    return HealthyBuilt(WganGpModule(n_critic=n), train, evals, optimizer_steps_per_batch=n + 1)


# --------------------------------------------------------------------------------------------------------------
# (5) advantage actor-critic with an entropy bonus on a gridworld
# --------------------------------------------------------------------------------------------------------------

_GRID = 5
_GOAL = _GRID * _GRID - 1
_MOVES = torch.tensor([[-1, 0], [1, 0], [0, -1], [0, 1]])


def _move(pos: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
    row, col = pos // _GRID, pos % _GRID
    step = _MOVES[action]
    row, col = (row + step[:, 0]).clamp(0, _GRID - 1), (col + step[:, 1]).clamp(0, _GRID - 1)
    return row * _GRID + col


class A2cModule(MetricModule):
    """Synchronous advantage actor-critic (A2C, Mnih et al. 2016) with OpenAI baselines' defaults: 16 environments,
    5-step returns, gamma 0.99, value coefficient 0.5, entropy coefficient 0.01, RMSprop(lr 7e-4, alpha 0.99,
    eps 1e-5). The environments' state lives in the module; the action uniforms and reset cells come in the batch,
    so every method sees the same random numbers. The loss ``policy + 0.5 value - 0.01 entropy`` changes sign."""

    GAMMA = 0.99

    def __init__(self) -> None:
        super().__init__(
            mlp(64, 2, nn.Tanh, n_in=_GRID * _GRID, n_out=5),
            "a2c",
            lambda p: torch.optim.RMSprop(p, lr=7e-4, alpha=0.99, eps=1e-5),
            _value_gap,
        )
        self._pos: torch.Tensor | None = None

    def _heads(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.net(F.one_hot(pos, _GRID * _GRID).float())
        return F.log_softmax(out[:, :4], -1), out[:, 4]

    def compute_loss(self, batch: Batch) -> torch.Tensor:
        pos = batch["reset"][0] if self._pos is None else self._pos
        logps, values, entropies, rewards, dones = [], [], [], [], []
        for u, reset in zip(batch["u"], batch["reset"], strict=True):
            logp, value = self._heads(pos)
            with torch.no_grad():
                cdf = logp.exp().cumsum(-1)
                action = torch.searchsorted(cdf, u.unsqueeze(-1) * cdf[:, -1:]).squeeze(-1).clamp_max(3)
            new = _move(pos, action)
            done = new == _GOAL
            logps.append(logp.gather(-1, action.unsqueeze(-1)).squeeze(-1))
            values.append(value)
            entropies.append(-(logp.exp() * logp).sum(-1))
            rewards.append(done.float())
            dones.append(done.float())
            pos = torch.where(done, reset, new)
        self._pos = pos
        with torch.no_grad():
            ret = self._heads(pos)[1]
        returns = []
        for r, d in zip(reversed(rewards), reversed(dones), strict=True):
            ret = r + self.GAMMA * ret * (1 - d)
            returns.append(ret)
        advantage = torch.stack(returns[::-1]) - torch.stack(values)
        policy = -(torch.stack(logps) * advantage.detach()).mean()
        return policy + 0.5 * advantage.pow(2).mean() - 0.01 * torch.stack(entropies).mean()


def _value_gap(module: MetricModule, batches: list[Batch]) -> float:
    """Mean over the non-goal cells of ``1 - V_pi(s) / V*(s)``: the policy evaluated exactly (a linear solve on the
    25-state chain, reward 1 on reaching the goal, gamma 0.99), ``V*(s) = gamma^(d(s) - 1)`` for the Manhattan
    distance ``d(s)``."""
    cells = torch.arange(_GRID * _GRID)
    probs = module._heads(cells)[0].exp().double()  # type: ignore[attr-defined]
    n, gamma = _GRID * _GRID, A2cModule.GAMMA
    transition = torch.zeros(n, n, dtype=torch.float64)
    reward = torch.zeros(n, dtype=torch.float64)
    for a in range(4):
        nxt = _move(cells, torch.full((n,), a))
        transition[cells, nxt] += probs[:, a]
        reward += probs[:, a] * (nxt == _GOAL).double()
    transition[:, _GOAL] = 0.0  # the goal is terminal
    transition[_GOAL] = 0.0
    reward[_GOAL] = 0.0
    v_pi = torch.linalg.solve(torch.eye(n, dtype=torch.float64) - gamma * transition, reward)
    dist = (_GRID - 1 - cells // _GRID) + (_GRID - 1 - cells % _GRID)
    start = cells != _GOAL
    v_star = gamma ** (dist[start].double() - 1)
    return float((1 - v_pi[start] / v_star).mean())


def _a2c_gridworld(seed: int, steps: int) -> HealthyBuilt:
    """A2C with an entropy bonus (Mnih et al. 2016; OpenAI baselines' defaults: 16 envs x 5 steps, gamma 0.99,
    value coefficient 0.5, entropy 0.01, RMSprop lr 7e-4) on a 5 x 5 gridworld, reward 1 on reaching the far
    corner, after which the environment restarts in a uniformly drawn cell. Bootstrapped value targets move with
    the policy, and the loss changes sign.

    Metric: the normalized value gap of the learned policy, mean over start cells of ``1 - V_pi(s) / V*(s)``,
    computed exactly.
    """
    g = torch.Generator().manual_seed(24_000 + seed)
    train = [
        {"u": torch.rand(5, 16, generator=g), "reset": torch.randint(_GOAL, (5, 16), generator=g)} for _ in range(steps)
    ]
    return HealthyBuilt(A2cModule(), train, [{}])


# --------------------------------------------------------------------------------------------------------------
# (6) batch-size ramp instead of learning-rate decay
# --------------------------------------------------------------------------------------------------------------


def _batch_size_ramp(seed: int, steps: int) -> HealthyBuilt:
    """A batch-size ramp in place of learning-rate decay (Smith et al. 2018, "Don't decay the learning rate, increase
    the batch size"): ReLU MLP on digits, SGD+momentum 0.9 at a constant lr 0.05, the batch size doubling every
    quarter of the run (32, 64, 128, 256), so the gradient noise, and with it the gradient norm, drops in steps.

    Metric: held-out error rate.
    """
    x, y, _, _ = _digits()
    g = torch.Generator().manual_seed(25_000 + seed)
    train = []
    for step in range(steps):
        size = 32 * 2 ** min(3, int(4 * step / steps))
        idx = torch.randint(len(x), (size,), generator=g)
        train.append({"x": x[idx], "y": y[idx]})
    module = MetricModule(mlp(128, 2, nn.ReLU), "ce", sgd(0.05, 0.9), error_rate)
    return HealthyBuilt(module, train, _eval_digits())


# --------------------------------------------------------------------------------------------------------------
# (7) a tiny transformer learning to sort, AdamW with warm-up and cosine decay
# --------------------------------------------------------------------------------------------------------------

_SORT_LEN, _SORT_VOCAB = 8, 16


def sort_transformer() -> CharGPT:
    """A causal pre-LN transformer (2 layers, width 64, 4 heads) reading ``_SORT_VOCAB`` values and a separator
    and predicting the values (the benchmark's character GPT with its own vocabulary)."""
    return CharGPT(dim=64, layers=2, heads=4, context=2 * _SORT_LEN, vocab=_SORT_VOCAB + 1, outputs=_SORT_VOCAB)


def _sort_batch(n: int, g: torch.Generator) -> Batch:
    """Tokens ``v_1..v_8 SEP s_1..s_8`` (``s`` sorted ``v``); the targets are the next tokens, only the sorted half
    counts (-100 elsewhere)."""
    values = torch.randint(_SORT_VOCAB, (n, _SORT_LEN), generator=g)
    tokens = torch.cat([values, torch.full((n, 1), _SORT_VOCAB), values.sort(-1).values], -1)
    y = tokens[:, 1:].clone()
    y[:, :_SORT_LEN] = -100
    return {"x": tokens[:, :-1], "y": y}


def _token_error(module: MetricModule, batches: list[Batch]) -> float:
    wrong = total = 0
    for b in batches:
        keep = b["y"] != -100
        wrong += int((module.net(b["x"]).argmax(-1)[keep] != b["y"][keep]).sum())
        total += int(keep.sum())
    return wrong / total


def _transformer_sort(seed: int, steps: int) -> HealthyBuilt:
    """A 2-layer, width-64 causal transformer learns to sort 8 values out of 16, trained as a language model with
    nanoGPT's small-model recipe (its ``shakespeare_char`` config): AdamW lr 1e-3, betas (0.9, 0.99), weight decay
    0.1, linear warm-up over the first 1/8 of the run, then cosine decay to lr / 10; no gradient clipping.

    Metric: held-out token error rate on the sorted half, teacher-forced.
    """
    g = torch.Generator().manual_seed(26_000 + seed)
    train = [_sort_batch(64, g) for _ in range(steps)]
    ge = torch.Generator().manual_seed(26_999)
    schedule = warmup_cosine(max(1, steps // 8), steps)
    module = MetricModule(
        sort_transformer(),
        "ce",
        lambda p: torch.optim.AdamW(p, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1),
        _token_error,
        lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
    )
    return HealthyBuilt(module, train, [_sort_batch(500, ge)])


# --------------------------------------------------------------------------------------------------------------
# (8) the optimizer's state reset mid-run
# --------------------------------------------------------------------------------------------------------------


class RestartModule(MetricModule):
    """Adam whose state (both moments and the step count) is dropped once at ``reset_at``, as when a run resumes
    from a weights-only checkpoint or re-creates its optimizer for a new phase."""

    def __init__(self, reset_at: int) -> None:
        super().__init__(mlp(128, 2, nn.ReLU), "ce", _adam(1e-3), error_rate)
        self.reset_at = reset_at
        self._reset_done = False

    def on_train_batch_start(self, batch: Batch, batch_idx: int) -> None:
        if not self._reset_done and self.global_step >= self.reset_at:
            for optimizer in self.trainer.optimizers:
                optimizer.state.clear()
            self._reset_done = True


def _adam_restart(seed: int, steps: int) -> HealthyBuilt:
    """ReLU MLP on digits with Adam (lr 1e-3, the defaults) whose state is reset at 50 % of the run, as a restart
    from a weights-only checkpoint does: the first steps after it move every weight by ~lr whatever its gradient,
    and the loss of the nearly converged model jumps up before it falls again.

    Metric: held-out error rate.
    """
    train, evals = _digit_batches(seed, steps)
    return HealthyBuilt(RestartModule(steps // 2), train, evals)


# --------------------------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------------------------


def _task(name: str, steps: int, builder: Callable[[int, int], HealthyBuilt]) -> Task:
    doc = (builder.__doc__ or "").strip().split("\n\n")[0]
    return Task(name, "healthy", " ".join(doc.split()), steps, builder)


HOLDOUT_TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        _task("distribution_shift", 400, _distribution_shift),
        _task("interpolation", 1500, _interpolation),
        _task("distill_t4", 400, _distill_t4),
        _task("wgan_gp", 800, _wgan_gp),
        _task("a2c_gridworld", 1000, _a2c_gridworld),
        _task("batch_size_ramp", 400, _batch_size_ramp),
        _task("transformer_sort", 800, _transformer_sort),
        _task("adam_restart", 400, _adam_restart),
    ]
}
"""The held-out set, in the order the report lists it. Every task's ``kind`` is ``"healthy"``."""

METRICS: dict[str, str] = {
    "distribution_shift": "post-shift error rate",
    "interpolation": "normalized MSE",
    "distill_t4": "student error rate",
    "wgan_gp": "sliced W1 to data",
    "a2c_gridworld": "value gap",
    "batch_size_ramp": "error rate",
    "transformer_sort": "token error",
    "adam_restart": "error rate",
}
"""What each task's ``evaluate`` measures (lower is better)."""
