"""Task builders for the divergence benchmark: small, CPU-sized versions of the ways real training runs blow up.

Every task is a :class:`Task` with ``build(seed, steps=None) -> Built``: a fresh :class:`BenchModule` (a
LightningModule that owns its model, loss and optimizer), the training batches (one per optimizer step, in
order, so step ``i`` always sees batch ``i``), held-out evaluation batches that are never injected, the
injection schedule (step -> what was done to that batch), and extra ``Trainer`` keyword arguments (e.g. the
fp16 precision plugin). The same seed gives the same weights and the same batches for every method, so the
methods are compared on identical runs.

Data is synthetic or scikit-learn's bundled 8x8 digits (no downloads). Character-level language modelling
uses a deterministic synthetic corpus drawn from a small stochastic grammar (a Markov chain over a fixed
vocabulary of made-up words), so a tiny GPT has structure to learn: spelling inside words (nearly
deterministic) and word-to-word transitions (stochastic).

``kind`` says what the task is meant to show and which bar the guard is held to:

- ``"unstable"``: training without protection diverges (or collapses) on every seed; the guard must rescue it.
- ``"transformer"``: an AdamW transformer with a real instability; the guard must do as well as the best peer.
- ``"healthy"``: nothing is wrong; protection must not cost loss.

Example::

    from benchmarks.divergence_tasks import TASKS
    built = TASKS["sgd_tanh_lr"].build(seed=0, steps=40)
    trainer = lightning.pytorch.Trainer(max_steps=built.steps, logger=False, **built.trainer_kwargs)
    trainer.fit(built.module, built.train_loader())
    print(built.module.evaluate(built.eval_batches))
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

Batch = dict[str, torch.Tensor]


# --------------------------------------------------------------------------------------------------------------
# the LightningModule every task trains
# --------------------------------------------------------------------------------------------------------------


class BenchModule(pl.LightningModule):
    """A model, its loss and its optimizer recipe, trained on dict batches ``{"x", "y"[, "weight"]}``.

    ``training_step`` returns the loss (times ``batch["weight"]`` when present, used to build a phase of zero
    gradients) and keeps a detached copy in ``latest_loss``: peers that judge the current step's loss before
    the optimizer step (the OLMo-style skip rule) read it there, as OLMo-core's train module hands its loss to
    its optimizer.
    """

    def __init__(
        self,
        net: nn.Module,
        loss: str,
        optimizer: Callable[[Any], torch.optim.Optimizer],
        lr_lambda: Callable[[int], float] | None = None,
    ) -> None:
        super().__init__()
        self.net = net
        self.loss_kind = loss
        self._optimizer = optimizer
        self._lr_lambda = lr_lambda
        self.latest_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def compute_loss(self, batch: Batch) -> torch.Tensor:
        out = self.net(batch["x"])
        y = batch["y"]
        if self.loss_kind == "ce":
            return F.cross_entropy(out.float().reshape(-1, out.shape[-1]), y.reshape(-1))
        return F.mse_loss(out.float().squeeze(-1), y)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        loss = self.compute_loss(batch)
        if "weight" in batch:
            loss = loss * batch["weight"]
        self.latest_loss = loss.detach()
        return loss

    def configure_optimizers(self) -> Any:
        optimizer = self._optimizer(self.parameters())
        if self._lr_lambda is None:
            return optimizer
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._lr_lambda)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    @torch.no_grad()
    def evaluate(self, batches: list[Batch]) -> float:
        """Mean loss over ``batches`` in eval mode and float32 (inf when the weights are non-finite)."""
        was_training = self.training
        self.eval()
        try:
            losses = [float(self.compute_loss(b)) for b in batches]
        finally:
            self.train(was_training)
        value = sum(losses) / len(losses)
        return value if math.isfinite(value) else float("inf")


class _Batches(Dataset):
    def __init__(self, batches: list[Batch]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> Batch:
        return self.batches[index]


@dataclass
class Built:
    """One task instance for one seed: everything a run needs."""

    module: BenchModule
    train_batches: list[Batch]
    eval_batches: list[Batch]
    injections: dict[int, str] = field(default_factory=dict)
    trainer_kwargs: dict[str, Any] = field(default_factory=dict)
    clean_batches: list[Batch] | None = None
    """The training batches without the injected ones (``None``: nothing injected), for the ``clean`` reference:
    what the same run reaches when the bad batches never come, the most a protection can give back."""

    @property
    def steps(self) -> int:
        return len(self.train_batches)

    def train_loader(self) -> DataLoader:
        """One batch per step, in order (``batch_size=None``: the batches are already made)."""
        return DataLoader(_Batches(self.train_batches), batch_size=None, shuffle=False, num_workers=0)


@dataclass(frozen=True)
class Task:
    """A benchmark task family: ``build(seed, steps=None)`` makes one seeded instance."""

    name: str
    kind: str  # "unstable" | "transformer" | "healthy"
    summary: str
    steps: int
    builder: Callable[[int, int], Built]

    def build(self, seed: int, steps: int | None = None) -> Built:
        """A fresh module and its batches for ``seed``; ``steps`` shortens the run (tests use tiny ones)."""
        steps = self.steps if steps is None else int(steps)
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps!r}")
        torch.manual_seed(seed)
        return self.builder(seed, steps)


# --------------------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------------------


@cache
def _digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    mean, std = x[:1400].mean(0), x[:1400].std(0).clamp_min(1.0)
    x = (x - mean) / std
    return x[:1400], y[:1400], x[1400:], y[1400:]


def _digit_batches(seed: int, steps: int, batch_size: int = 64, image: bool = False) -> tuple[list, list]:
    x_train, y_train, x_eval, y_eval = _digits()
    g = torch.Generator().manual_seed(1000 + seed)
    shape = (-1, 1, 8, 8) if image else (-1, 64)
    train = []
    for _ in range(steps):
        idx = torch.randint(len(x_train), (batch_size,), generator=g)
        train.append({"x": x_train[idx].reshape(shape), "y": y_train[idx]})
    evals = [{"x": x_eval[i : i + 200].reshape(shape), "y": y_eval[i : i + 200]} for i in range(0, len(x_eval), 200)]
    return train, evals


def _adding_batches(seed: int, steps: int, length: int, batch_size: int = 32) -> tuple[list, list]:
    """The adding problem (Hochreiter & Schmidhuber 1997): sum the two marked values of a length-T sequence."""
    g = torch.Generator().manual_seed(2000 + seed)

    def make(n: int, gen: torch.Generator) -> Batch:
        values = torch.rand(n, length, generator=gen)
        marks = torch.zeros(n, length)
        first = torch.randint(0, length // 2, (n,), generator=gen)
        second = torch.randint(length // 2, length, (n,), generator=gen)
        rows = torch.arange(n)
        marks[rows, first] = 1.0
        marks[rows, second] = 1.0
        return {"x": torch.stack([values, marks], -1), "y": (values * marks).sum(1)}

    train = [make(batch_size, g) for _ in range(steps)]
    eval_gen = torch.Generator().manual_seed(99)
    return train, [make(256, eval_gen) for _ in range(2)]


ALPHABET = "abcdefghijklmnopqrstuvwxyz ."
VOCAB = len(ALPHABET)


@cache
def corpus(n_chars: int = 200_000) -> torch.Tensor:
    """A deterministic character corpus from a stochastic word grammar (same for every seed and machine).

    60 made-up words (2-7 letters) and a sparse random word-to-word Markov chain (each word has 4 likely
    successors); sentences end with ``". "`` with probability 0.15 after each word.
    """
    rng = np.random.default_rng(1234)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = ["".join(rng.choice(letters, size=rng.integers(2, 8))) for _ in range(60)]
    successors = [rng.choice(60, size=4, replace=False) for _ in range(60)]
    weights = [rng.dirichlet(np.ones(4)) for _ in range(60)]
    parts: list[str] = []
    total, word = 0, 0
    while total < n_chars:
        word = int(rng.choice(successors[word], p=weights[word]))
        piece = words[word] + (". " if rng.random() < 0.15 else " ")
        parts.append(piece)
        total += len(piece)
    text = "".join(parts)[:n_chars]
    lookup = {c: i for i, c in enumerate(ALPHABET)}
    return torch.tensor([lookup[c] for c in text], dtype=torch.long)


def _text_batches(seed: int, steps: int, context: int = 32, batch_size: int = 16) -> tuple[list, list]:
    data = corpus()
    split = int(0.9 * len(data))
    g = torch.Generator().manual_seed(3000 + seed)

    def window(starts: torch.Tensor) -> Batch:
        rows = torch.stack([data[s : s + context + 1] for s in starts.tolist()])
        return {"x": rows[:, :-1].contiguous(), "y": rows[:, 1:].contiguous()}

    train = [window(torch.randint(0, split - context - 1, (batch_size,), generator=g)) for _ in range(steps)]
    starts = torch.arange(split, len(data) - context - 1, (len(data) - split) // 256)[:256]
    return train, [window(starts[i : i + 64]) for i in range(0, len(starts), 64)]


# --------------------------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------------------------


def mlp(width: int, depth: int, act: type[nn.Module], n_in: int = 64, n_out: int = 10) -> nn.Sequential:
    layers: list[nn.Module] = []
    size = n_in
    for _ in range(depth):
        layers += [nn.Linear(size, width), act()]
        size = width
    layers.append(nn.Linear(size, n_out))
    return nn.Sequential(*layers)


def cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 16, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


class SequenceRegressor(nn.Module):
    """A recurrent net (vanilla tanh RNN or LSTM) reading the sequence and regressing from its last state."""

    def __init__(self, cell: str, hidden: int, radius: float | None = None) -> None:
        super().__init__()
        rnn_cls = nn.RNN if cell == "rnn" else nn.LSTM
        self.rnn = rnn_cls(2, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)
        if radius is not None:
            # orthogonal recurrent matrix scaled to spectral radius ``radius`` (every eigenvalue has |.| = radius)
            with torch.no_grad():
                nn.init.orthogonal_(self.rnn.weight_hh_l0)
                self.rnn.weight_hh_l0.mul_(radius)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, post_ln: bool) -> None:
        super().__init__()
        self.post_ln = post_ln
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.post_ln:  # Vaswani et al. 2017: normalize after each residual sum
            x = self.ln1(x + self.attn(x, x, x, attn_mask=mask, need_weights=False)[0])
            return self.ln2(x + self.mlp(x))
        h = self.ln1(x)  # pre-LN (GPT-2): normalize each branch's input
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class CharGPT(nn.Module):
    """A tiny causal transformer language model over characters (``vocab`` input tokens, ``outputs`` logits:
    the same vocabulary unless a task predicts fewer symbols than it reads)."""

    def __init__(
        self, dim: int = 48, layers: int = 2, heads: int = 4, context: int = 32, post_ln: bool = False,
        vocab: int = VOCAB, outputs: int | None = None,
    ):
        super().__init__()
        self.token = nn.Embedding(vocab, dim)
        self.position = nn.Parameter(torch.randn(1, context, dim) * 0.02)
        self.blocks = nn.ModuleList([_Block(dim, heads, post_ln) for _ in range(layers)])
        self.ln = nn.Identity() if post_ln else nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab if outputs is None else outputs)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        mask = torch.ones(t, t, dtype=torch.bool, device=tokens.device).triu(1)
        x = self.token(tokens) + self.position[:, :t]
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.ln(x))


# --------------------------------------------------------------------------------------------------------------
# schedules and injections
# --------------------------------------------------------------------------------------------------------------


def sgd(lr: float, momentum: float = 0.0) -> Callable[[Any], torch.optim.Optimizer]:
    return lambda params: torch.optim.SGD(params, lr=lr, momentum=momentum)


def adamw(lr: float, weight_decay: float = 0.01) -> Callable[[Any], torch.optim.Optimizer]:
    return lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def warmup_cosine(warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def spike_steps(steps: int, fractions: tuple[float, ...]) -> list[int]:
    """Injection steps at fixed fractions of the run (kept distinct and inside it for any ``steps``)."""
    return sorted({min(steps - 1, max(0, int(f * steps))) for f in fractions})


def _scale_inputs(batches: list[Batch], at: list[int], factor: float, misalign: bool = False) -> dict[int, str]:
    """Scale the inputs of the batches at ``at`` (and, with ``misalign``, pair them with the wrong labels).

    Scaling alone is harmless to a trained ReLU classifier (it is positively homogeneous: the logits scale and
    the already-right answers only get more confident, with zero gradient), so the bad batches of the spike
    tasks also carry misaligned labels (rolled by one row), as a broken join or shuffle in a data pipeline does.
    """
    for i in at:
        y = batches[i]["y"].roll(1, 0) if misalign else batches[i]["y"]
        batches[i] = {**batches[i], "x": batches[i]["x"] * factor, "y": y}
    return {i: f"inputs x{factor:g}" + (", labels misaligned" if misalign else "") for i in at}


# --------------------------------------------------------------------------------------------------------------
# the task families
# --------------------------------------------------------------------------------------------------------------


def _sgd_tanh_lr(seed: int, steps: int) -> Built:
    """tanh MLP on digits, plain SGD with a learning rate far above the stable range, from the first step.

    For gradient descent a step size above ``2 / sharpness`` makes the loss grow instead of shrink (the classic
    quadratic stability bound; Cohen et al. 2021 "edge of stability"). With tanh units the hidden layer
    saturates and the output layer's logits grow without bound: the cross-entropy climbs to tens or hundreds.
    """
    train, evals = _digit_batches(seed, steps)
    module = BenchModule(mlp(128, 2, nn.Tanh), "ce", sgd(lr=15.0))
    return Built(module, train, evals)


def _sgd_relu_lr(seed: int, steps: int) -> Built:
    """ReLU MLP on digits, plain SGD at a learning rate (3.0) that overflows to inf/NaN within the first steps.

    ReLU nets are positively homogeneous, so nothing bounds the growth: each too-large step scales the weights
    up, which raises the gradient, which makes the next step larger.
    """
    train, evals = _digit_batches(seed, steps)
    module = BenchModule(mlp(256, 2, nn.ReLU), "ce", sgd(lr=3.0))
    return Built(module, train, evals)


def _rnn_radius2(seed: int, steps: int) -> Built:
    """Vanilla tanh RNN on the adding problem (T=100), recurrent matrix orthogonal x 2 at init, SGD.

    Pascanu, Mikolov & Bengio (2013): a recurrent spectral radius above 1 is sufficient for exploding
    gradients over long sequences; their remedy is norm clipping. The gradient through T steps of a radius-2
    recurrence is bounded only by tanh saturation, so a few steps of SGD throw the weights into a regime with
    huge losses or NaN.
    """
    train, evals = _adding_batches(seed, steps, length=100)
    module = BenchModule(SequenceRegressor("rnn", 64, radius=2.0), "mse", sgd(lr=0.05, momentum=0.9))
    return Built(module, train, evals)


def _bad_init_scale(seed: int, steps: int) -> Built:
    """ReLU MLP initialised with ``normal_(std=1)`` instead of ``1/sqrt(fan_in)``, trained with a usual SGD LR.

    The standard-normal init is a common bug; each 128-wide ReLU layer multiplies the activation scale by about
    ``sqrt(128 / 2) = 8`` (He et al. 2015), so logits and gradients start orders of magnitude too large and a
    normally fine learning rate diverges.
    """
    train, evals = _digit_batches(seed, steps)
    net = mlp(128, 3, nn.ReLU)
    with torch.no_grad():
        for layer in net:
            if isinstance(layer, nn.Linear):
                layer.weight.normal_(0.0, 1.0)
    module = BenchModule(net, "ce", sgd(lr=0.05, momentum=0.9))
    return Built(module, train, evals)


def _sgd_spikes(seed: int, steps: int) -> Built:
    """Healthy SGD+momentum MLP hit by three bad batches: inputs x1e5 with misaligned labels (a pipeline bug).

    One such batch multiplies the gradient of every layer by up to 1e5; with momentum the step keeps acting for
    ~10 more steps. Without protection the weights overflow.
    """
    train, evals = _digit_batches(seed, steps)
    clean = list(train)
    injections = _scale_inputs(train, spike_steps(steps, (0.3, 0.55, 0.8)), 1e5, misalign=True)
    module = BenchModule(mlp(128, 2, nn.ReLU), "ce", sgd(lr=0.05, momentum=0.9))
    return Built(module, train, evals, injections, clean_batches=clean)


def _adamw_spikes(seed: int, steps: int) -> Built:
    """The same bad batches (inputs x1e5, misaligned labels) on an AdamW MLP.

    Adam normalises the step by the running second moment, so one spike moves each weight by about
    ``lr * (1 - beta1) / sqrt(1 - beta2) = 3 lr`` in the spike's direction and then inflates the second moment
    for ~1/(1 - beta2) = 1000 steps, freezing the layers it hit.
    """
    train, evals = _digit_batches(seed, steps)
    clean = list(train)
    injections = _scale_inputs(train, spike_steps(steps, (0.3, 0.55, 0.8)), 1e5, misalign=True)
    module = BenchModule(mlp(128, 2, nn.ReLU), "ce", adamw(lr=3e-3))
    return Built(module, train, evals, injections, clean_batches=clean)


def _gpt_lr_high(seed: int, steps: int) -> Built:
    """Pre-LN char GPT, AdamW at a learning rate too high (0.1) and no warm-up.

    Wortsman et al. 2023 ("Small-scale proxies for large-scale Transformer training instabilities") reproduce
    the large-model failures in small transformers by raising the LR: attention logits grow until the softmax
    saturates and the loss sticks near the unigram entropy. Adam's update is invariant to the gradient's scale,
    so clipping the gradient norm alone does not shrink the steps.
    """
    train, evals = _text_batches(seed, steps)
    module = BenchModule(CharGPT(), "ce", adamw(lr=0.1))
    return Built(module, train, evals)


def _gpt_postln(seed: int, steps: int) -> Built:
    """Post-LN char GPT at a high AdamW learning rate without warm-up (Xiong et al. 2020: post-LN needs warm-up)."""
    train, evals = _text_batches(seed, steps)
    module = BenchModule(CharGPT(post_ln=True), "ce", adamw(lr=3e-2))
    return Built(module, train, evals)


def _gpt_corrupt(seed: int, steps: int) -> Built:
    """Healthy pre-LN char GPT (AdamW, warm-up + cosine) fed a few corrupted batches.

    Corruptions seen in real pipelines: a batch of uniformly random tokens (a decoding/tokenizer bug) and a
    batch whose targets all collapse onto one token (a label bug); two of each, in short bursts.
    """
    train, evals = _text_batches(seed, steps)
    g = torch.Generator().manual_seed(4000 + seed)
    clean = list(train)
    injections: dict[int, str] = {}
    for n, start in enumerate(spike_steps(steps, (0.35, 0.6))):
        for i in range(start, min(steps, start + 3)):
            if n % 2 == 0:
                tokens = torch.randint(0, VOCAB, train[i]["x"].shape, generator=g)
                train[i] = {"x": tokens, "y": torch.randint(0, VOCAB, tokens.shape, generator=g)}
                injections[i] = "random tokens"
            else:
                train[i] = {**train[i], "y": torch.full_like(train[i]["y"], ALPHABET.index("q"))}
                injections[i] = "targets collapsed onto one token"
    module = BenchModule(CharGPT(), "ce", adamw(lr=3e-3), warmup_cosine(30, steps))
    return Built(module, train, evals, injections, clean_batches=clean)


def _early_spike(seed: int, steps: int) -> Built:
    """A user's ReLU MLP whose LR schedule starts far too high and only reaches a sane value after 25 steps.

    The damage (dead ReLUs, saturated logits) is done inside the first 25 steps, before any detector with a
    25-step warm-up has started judging.
    """
    train, evals = _digit_batches(seed, steps)

    def factor(step: int) -> float:
        return 40.0 - 39.0 * step / 25 if step < 25 else 1.0

    module = BenchModule(mlp(128, 3, nn.ReLU), "ce", sgd(lr=0.05, momentum=0.9), factor)
    return Built(module, train, evals)


def _fp16_scale_collapse(seed: int, steps: int) -> Built:
    """fp16 mixed precision with a GradScaler on CPU; a phase of batches whose forward overflows fp16.

    Every overflowing step is skipped and halves the loss scale (``torch.amp.GradScaler``); after 40 of them
    the scale is ``65536 / 2**40 ~ 6e-8``, the scaled gradients underflow to zero in fp16 and the scaler needs
    ``growth_interval = 2000`` clean steps per doubling: training silently stalls after the bad phase.
    """
    from lightning.pytorch.plugins.precision import MixedPrecision

    train, evals = _digit_batches(seed, steps)
    phase = list(range(min(steps, 40)))
    clean = list(train)
    injections = _scale_inputs(train, phase, 1e5)
    module = BenchModule(mlp(128, 2, nn.ReLU), "ce", sgd(lr=0.05, momentum=0.9))
    plugins = {"plugins": [MixedPrecision("16-mixed", "cpu")]}
    return Built(module, train, evals, injections, plugins, clean_batches=clean)


def _zero_grad_phase(seed: int, steps: int) -> Built:
    """A phase of exactly zero gradients (loss x 0 for the first 30 steps, as when a loss term is switched on
    late or a model part is frozen), then normal training. Nothing is wrong; a rule that learns "normal" from the
    run's own history sees every later gradient as an infinite outlier."""
    train, evals = _digit_batches(seed, steps)
    zero = min(steps, 30)
    for i in range(steps):
        train[i] = {**train[i], "weight": torch.tensor(0.0 if i < zero else 1.0)}
    module = BenchModule(mlp(128, 2, nn.ReLU), "ce", sgd(lr=0.05, momentum=0.9))
    return Built(module, train, evals, {i: "loss x 0" for i in range(zero)})


def _healthy_sgd_mlp(seed: int, steps: int) -> Built:
    """ReLU MLP on digits, SGD+momentum at a standard learning rate."""
    train, evals = _digit_batches(seed, steps)
    return Built(BenchModule(mlp(128, 2, nn.ReLU), "ce", sgd(lr=0.05, momentum=0.9)), train, evals)


def _healthy_sgd_cnn(seed: int, steps: int) -> Built:
    """Small CNN on 8x8 digits, SGD+momentum at a standard learning rate."""
    train, evals = _digit_batches(seed, steps, image=True)
    return Built(BenchModule(cnn(), "ce", sgd(lr=0.05, momentum=0.9)), train, evals)


def _healthy_gpt(seed: int, steps: int) -> Built:
    """Pre-LN char GPT, AdamW with linear warm-up and cosine decay (the standard recipe)."""
    train, evals = _text_batches(seed, steps)
    return Built(BenchModule(CharGPT(), "ce", adamw(lr=3e-3), warmup_cosine(30, steps)), train, evals)


def _healthy_lstm(seed: int, steps: int) -> Built:
    """LSTM on the adding problem (T=50), Adam (Hochreiter & Schmidhuber 1997: the LSTM's gated cell)."""
    train, evals = _adding_batches(seed, steps, length=50)
    module = BenchModule(SequenceRegressor("lstm", 32), "mse", adamw(lr=3e-3, weight_decay=0.0))
    return Built(module, train, evals)


def _relu_init_std_sgd(seed: int, steps: int) -> Built:
    """4-layer 256-wide ReLU MLP initialised with ``normal_(std=0.2)`` (He's std for fan-in 256 is 0.088), plain
    SGD at lr 0.1 without momentum.

    Each layer multiplies the activation scale by about ``0.2 * sqrt(256 / 2) = 2.3`` (He et al. 2015), so the
    logits start ~25x too large; the first steps are huge and the ReLU net's homogeneity lets them feed on
    themselves until the weights overflow (non-finite on every seed, unprotected; clip 1.0 ends at 1.1-1.6).
    """
    train, evals = _digit_batches(seed, steps)
    net = mlp(256, 4, nn.ReLU)
    with torch.no_grad():
        for layer in net:
            if isinstance(layer, nn.Linear):
                layer.weight.normal_(0.0, 0.2)
    return Built(BenchModule(net, "ce", sgd(lr=0.1)), train, evals)


def _cnn_sgd_lr_high(seed: int, steps: int) -> Built:
    """The plain CNN (no normalization) on 8x8 digits, SGD+momentum 0.9 at lr 0.3 from the first step (6x the
    healthy CNN task's 0.05).

    Without normalization nothing bounds the activations; the first large steps kill most ReLUs or overflow,
    and the unprotected net ends at its initial (chance) loss on every seed, above it on 4 of 5.
    """
    train, evals = _digit_batches(seed, steps, image=True)
    return Built(BenchModule(cnn(), "ce", sgd(lr=0.3, momentum=0.9)), train, evals)


def vgg_no_bn() -> nn.Sequential:
    """A VGG-style CNN (Simonyan & Zisserman 2015) for 8x8 inputs without BatchNorm: three blocks of two 3x3
    convolutions and a 2x2 max-pool (32, 64, 128 channels), two linear layers; torchvision's VGG init (Kaiming
    normal, fan-out, for convolutions; N(0, 0.01) for linear layers; zero biases)."""

    def block(c_in: int, c_out: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(), nn.Conv2d(c_out, c_out, 3, padding=1), nn.ReLU()]

    net = nn.Sequential(
        *block(1, 32),
        nn.MaxPool2d(2),
        *block(32, 64),
        nn.MaxPool2d(2),
        *block(64, 128),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(128, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, 0.01)
            nn.init.zeros_(module.bias)
    return net


def _vgg_nobn_nesterov(seed: int, steps: int) -> Built:
    """VGG-style CNN without BatchNorm, SGD lr 0.1 with Nesterov momentum 0.9 and weight decay 5e-4 (the usual
    recipe for VGG *with* BatchNorm on CIFAR), on 8x8 digits.

    Without normalization lr 0.1 is at the edge of stability: unprotected, some seeds never leave the initial
    loss (dead ReLUs after the first large steps) and the others train far worse than a clipped run.
    """
    train, evals = _digit_batches(seed, steps, image=True)
    optimizer = lambda params: torch.optim.SGD(  # noqa: E731
        params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4
    )
    return Built(BenchModule(vgg_no_bn(), "ce", optimizer), train, evals)


def _task(name: str, kind: str, steps: int, builder: Callable[[int, int], Built]) -> Task:
    doc = (builder.__doc__ or "").strip().split("\n\n")[0]
    return Task(name, kind, " ".join(doc.split()), steps, builder)


TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        _task("sgd_tanh_lr", "unstable", 300, _sgd_tanh_lr),
        _task("sgd_relu_lr", "unstable", 300, _sgd_relu_lr),
        _task("rnn_radius2", "unstable", 200, _rnn_radius2),
        _task("bad_init_scale", "unstable", 300, _bad_init_scale),
        _task("sgd_spikes", "unstable", 300, _sgd_spikes),
        _task("adamw_spikes", "unstable", 300, _adamw_spikes),
        _task("early_spike", "unstable", 300, _early_spike),
        _task("fp16_scale_collapse", "unstable", 300, _fp16_scale_collapse),
        _task("relu_init_std_sgd", "unstable", 300, _relu_init_std_sgd),
        _task("cnn_sgd_lr_high", "unstable", 300, _cnn_sgd_lr_high),
        _task("vgg_nobn_nesterov", "unstable", 300, _vgg_nobn_nesterov),
        _task("gpt_lr_high", "transformer", 250, _gpt_lr_high),
        _task("gpt_postln", "transformer", 250, _gpt_postln),
        _task("gpt_corrupt", "transformer", 250, _gpt_corrupt),
        _task("zero_grad_phase", "healthy", 300, _zero_grad_phase),
        _task("healthy_sgd_mlp", "healthy", 300, _healthy_sgd_mlp),
        _task("healthy_sgd_cnn", "healthy", 300, _healthy_sgd_cnn),
        _task("healthy_gpt", "healthy", 250, _healthy_gpt),
        _task("healthy_lstm", "healthy", 300, _healthy_lstm),
    ]
}
