"""Shared harness for overhead benchmarks: the models, a timed Lightning loop, the foreach-norm floor.

Every benchmark compares configurations of the *same* training loop in *one* process, interleaving the
repetitions (A B C A B C ...) so that drift of the machine hits all of them alike, and reports ratios
against a baseline measured in the same run. Timings are never asserted anywhere.
"""

from __future__ import annotations

import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers.logger import Logger
from lightning.pytorch.utilities import grad_norm
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class NullLogger(Logger):
    """Accepts every metric and writes nothing, so logger I/O does not blur the comparison."""

    name = "null"
    version = 0

    def log_hyperparams(self, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        pass


def deep_mlp(depth: int = 150, width: int = 128) -> nn.Module:
    """A plain deep MLP: ``2 * depth`` parameter tensors, small each (stresses per-tensor overheads)."""
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        causal = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool, device=x.device).triu(1)
        x = x + self.attn(h, h, h, attn_mask=causal, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """A small pre-LN GPT (about 11M parameters with the defaults)."""

    def __init__(self, vocab: int = 256, dim: int = 384, layers: int = 6, heads: int = 6, context: int = 64):
        super().__init__()
        self.token = nn.Embedding(vocab, dim)
        self.position = nn.Parameter(torch.zeros(1, context, dim))
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(layers)])
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.token(tokens) + self.position[:, : tokens.shape[1]]
        return self.head(self.ln(self.blocks(x)))


@dataclass(frozen=True)
class Workload:
    """A model factory plus the synthetic batches it trains on."""

    name: str
    make_model: Callable[[], nn.Module]
    make_batch: Callable[[], tuple[torch.Tensor, torch.Tensor]]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

    def parameter_tensors(self) -> int:
        return sum(1 for _ in self.make_model().parameters())

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.make_model().parameters())


def mlp_workload(depth: int = 150, width: int = 128, batch: int = 64) -> Workload:
    return Workload(
        f"deep MLP ({depth} Linear, width {width})",
        lambda: deep_mlp(depth, width),
        lambda: (torch.randn(batch, width), torch.randn(batch, width)),
        nn.functional.mse_loss,
    )


def _next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())


def gpt_workload(batch: int = 4, context: int = 32, **gpt_kwargs) -> Workload:
    return Workload(
        "GPT (pre-LN, 6x384)",
        lambda: TinyGPT(context=context, **gpt_kwargs),
        lambda: (torch.randint(0, 256, (batch, context)), torch.randint(0, 256, (batch, context))),
        _next_token_loss,
    )


def gpt_small_workload(batch: int = 8, context: int = 256, vocab: int = 16384) -> Workload:
    """GPT-2-small shape (12 layers x 768, 12 heads) with a 16k vocabulary: about 110M parameters, enough
    that a pass over the gradients is bound by memory bandwidth on an accelerator, not by kernel launches."""
    return Workload(
        f"GPT-small (pre-LN, 12x768, vocab {vocab})",
        lambda: TinyGPT(vocab=vocab, dim=768, layers=12, heads=12, context=context),
        lambda: (torch.randint(0, vocab, (batch, context)), torch.randint(0, vocab, (batch, context))),
        _next_token_loss,
    )


WORKLOADS: dict[str, Callable[[], Workload]] = {
    "mlp": mlp_workload,
    "gpt": gpt_workload,
    "gpt-small": gpt_small_workload,
}
"""The benchmarks' ``--workloads`` choices."""


def require_device(device: str) -> None:
    """Exit with a message naming the fix when ``--device cuda`` is asked for on a machine without CUDA."""
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            f"--device cuda needs a CUDA device, but torch {torch.__version__} sees none "
            "(torch.cuda.is_available() is False): run on a GPU machine with a CUDA build of torch, or pass "
            "--device cpu."
        )


class BenchModule(pl.LightningModule):
    """Trains a workload with Adam; ``lightning_recipe`` adds Lightning's documented grad-norm logging."""

    def __init__(self, workload: Workload, lightning_recipe: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = workload.make_model()
        self.workload = workload
        self.lightning_recipe = lightning_recipe

    def training_step(self, batch, batch_idx):
        inputs, targets = batch
        return self.workload.loss(self.model(inputs), targets)

    def on_before_optimizer_step(self, optimizer):
        if self.lightning_recipe:  # https://lightning.ai/docs/pytorch/stable/debug/debugging_intermediate.html
            self.log_dict(grad_norm(self, norm_type=2))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-4)


class StepTimer(Callback):
    """Wall time of every training step after ``warmup`` steps (synchronising CUDA at each boundary)."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.stamps: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step >= self.warmup:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.stamps.append(time.perf_counter())

    def median_step_seconds(self) -> float:
        gaps = [b - a for a, b in zip(self.stamps, self.stamps[1:], strict=False)]
        return statistics.median(gaps)


class HookClock:
    """Wraps one hook of an object and accumulates the wall time spent inside it (CUDA-synchronised).

    Timing the hook itself isolates a callback's cost from the rest of the step, which on a busy machine
    varies far more than the callback costs.
    """

    def __init__(self, owner: object, hook: str) -> None:
        self.durations: list[float] = []
        inner = getattr(owner, hook)

        def timed(*args, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
            result = inner(*args, **kwargs)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.durations.append(time.perf_counter() - start)
            return result

        setattr(owner, hook, timed)

    def mean_seconds(self, skip: int) -> float:
        """Mean over the calls after the first ``skip`` (warm-up: first-use caches, compilation)."""
        kept = self.durations[skip:]
        return statistics.fmean(kept) if kept else 0.0


@dataclass(frozen=True)
class StepTiming:
    """Median wall time of a training step, and the mean time spent inside the timed hook per step."""

    step_seconds: float
    hook_seconds: float
    peak_memory_bytes: int = 0
    """Peak accelerator memory allocated during the fit (0 on CPU)."""


def time_fit(
    workload: Workload,
    callbacks: Sequence[Callback],
    *,
    timed_callback: Callback | None = None,
    lightning_recipe: bool = False,
    steps: int = 60,
    warmup: int = 10,
    accelerator: str = "auto",
) -> StepTiming:
    """Time one Lightning fit: median step time after warm-up, and the mean time per step spent in
    ``on_before_optimizer_step`` of ``timed_callback`` (or of the module, for the Lightning recipe)."""
    batches = [workload.make_batch() for _ in range(8)]
    inputs = torch.cat([b[0] for b in batches])
    targets = torch.cat([b[1] for b in batches])
    loader = DataLoader(TensorDataset(inputs, targets), batch_size=len(batches[0][0]))
    timer = StepTimer(warmup)
    trainer = pl.Trainer(
        accelerator=accelerator,
        devices=1,
        max_steps=steps + warmup + 1,
        logger=NullLogger(),
        default_root_dir=tempfile.mkdtemp(prefix="gradstab-bench-"),  # reports of the guard/audit land there
        callbacks=[*callbacks, timer],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=50,
    )
    module = BenchModule(workload, lightning_recipe)
    clock = HookClock(timed_callback or module, "on_before_optimizer_step")
    on_cuda = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if on_cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(module, train_dataloaders=loader)
    peak = torch.cuda.max_memory_allocated() if on_cuda else 0
    return StepTiming(timer.median_step_seconds(), clock.mean_seconds(skip=warmup), peak)


class ForeachNormFloor(Callback):
    """The least a gradient-norm monitor can do: one bare ``torch._foreach_norm`` over all gradients, in the
    same hook and the same loop as the callbacks it is compared with (the gradients are as warm or cold in
    the caches as they are for them)."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        torch._foreach_norm([p.grad for p in pl_module.parameters() if p.grad is not None], 2.0)


def foreach_norm_floor(
    workload: Workload, *, steps: int = 60, accelerator: str = "auto", repetitions: int = 3
) -> float:
    """Median seconds per step spent in :class:`ForeachNormFloor`'s hook: the cost floor of measuring."""
    samples = []
    for _ in range(repetitions):
        floor = ForeachNormFloor()
        samples.append(
            time_fit(workload, [floor], timed_callback=floor, steps=steps, accelerator=accelerator).hook_seconds
        )
    return statistics.median(samples)


def interleaved_medians(configs: dict[str, Callable[[], StepTiming]], repetitions: int) -> dict[str, StepTiming]:
    """Run every configuration ``repetitions`` times, round-robin, and return each one's medians."""
    samples: dict[str, list[StepTiming]] = {name: [] for name in configs}
    for _ in range(repetitions):
        for name, run in configs.items():
            samples[name].append(run())
    return {
        name: StepTiming(
            statistics.median(t.step_seconds for t in timings),
            statistics.median(t.hook_seconds for t in timings),
            max(t.peak_memory_bytes for t in timings),
        )
        for name, timings in samples.items()
    }


def machine_description() -> str:
    """One line naming the machine the numbers came from."""
    if torch.cuda.is_available():
        device = f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU)"
    else:
        device = f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
    return f"{device}; torch {torch.__version__}, lightning {pl.__version__}, {torch.get_num_threads()} threads"


def write_results(path: Path, title: str, details: Sequence[str], table: Sequence[str]) -> None:
    """Write a small results file (a title; the command, date, machine and code; ``details`` lines; a markdown
    ``table``) and print it: the header every one-off benchmark script of the repository writes."""
    import datetime
    import shlex
    import sys

    from benchmarks.divergence import machine

    host = machine()
    lines = [
        f"# {title}",
        "",
        f"- command: `python {Path(sys.argv[0]).as_posix()} {shlex.join(sys.argv[1:])}`",
        f"- date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; code: git commit {host['commit']}; "
        f"machine: {host['cpu']}, {torch.get_num_threads()} thread(s); torch {host['torch']}",
        *[f"- {line}" for line in details],
        "",
        *table,
    ]
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
