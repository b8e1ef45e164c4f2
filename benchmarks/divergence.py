"""Divergence benchmark: the same diverging (and healthy) training runs under every protection method.

Every run is a real ``lightning.pytorch.Trainer.fit`` on CPU (one thread, no logger, no checkpointing, no
progress bar) of a task from :mod:`benchmarks.divergence_tasks`, with one method from :mod:`benchmarks.peers`
switched on the way a user would. After the fit the model is evaluated on held-out batches that were never
injected. A run is *ok* when it ended with a finite held-out loss below its initial held-out loss and did not
crash; a run that a method ended early (the guard's ``stop``, ``SpikeDetection``'s exception) is still judged
on the loss it had then, and the table says how many ended early.

Usage (from the repository root)::

    python benchmarks/divergence.py                                  # everything, 3 seeds, 2 processes
    python benchmarks/divergence.py --tasks sgd_tanh_lr,rnn_radius2 --methods none,clip1,guard --seeds 1
    python benchmarks/divergence.py --methods guard,guard+max_rung="'skip'" --check

``--check`` exits with status 1 when a ``guard*`` method misses the bar on some task: on a task where
unprotected training is not ok on every seed, the guard finishes every seed ok with a mean final loss
``<= 1.05 x best peer + 0.01``; on a healthy task its mean final loss is ``<= 1.05 x none + 0.02``; on an AdamW
transformer task (and on an unstable task whose unprotected run happened not to fail) ``<= 1.05 x best peer +
0.01``. The best peer is the peer method with the most ok seeds, then the lowest mean final loss.

``--suite healthy`` runs the healthy-but-unusual corpus of :mod:`benchmarks.healthy_tasks` instead (default
methods ``none,guard,clip1,zclip,agc,olmo_skip``, output ``benchmarks/results/healthy-cpu.{md,json}``): each
run's ``initial_loss`` / ``final_loss`` then hold the task's held-out *metric* (error rate, reconstruction error,
...; lower is better), the table gives its mean and min-max over seeds, the guard's lowest final LR multiplier
and its stops, and ``--check`` applies issue 18's bar for healthy training: a ``guard*`` method never stops,
ends every seed with LR multiplier >= 0.5 and a mean metric <= ``1.02 x none + 0.01``::

    python benchmarks/divergence.py --suite healthy --seeds 5 --perturb 1e-6 --check

``--suite holdout`` does the same on the held-out healthy shapes of :mod:`benchmarks.healthy_holdout` (shapes the
guard was not tuned on; same methods, table and bar; output ``benchmarks/results/healthy-holdout-cpu.{md,json}``);
``--suite holdout2`` on the second held-out set, :mod:`benchmarks.healthy_holdout2`, written after the guard's rules
were fixed (output ``benchmarks/results/healthy-holdout2-cpu.{md,json}``), ``--suite holdout3`` on the third,
:mod:`benchmarks.healthy_holdout3`, written after guard v3.6 (``benchmarks/results/healthy-holdout3-cpu.{md,json}``),
``--suite holdout4`` on the fourth, :mod:`benchmarks.healthy_holdout4`, whose recipes write the weights during the
run (``benchmarks/results/healthy-holdout4-cpu.{md,json}``); ``--suite optimizers`` on torch's adaptive
optimizers at their default settings, :mod:`benchmarks.healthy_optimizers` (output
``benchmarks/results/healthy-optimizers-cpu.{md,json}``); ``--suite finetune`` on fine-tunes of a trained model with
small batches, :mod:`benchmarks.healthy_finetune` (output ``benchmarks/results/healthy-finetune-cpu.{md,json}``).

``--perturb 1e-6`` reruns seed 0 (``--perturb-seeds N``: seeds 0..N-1) of every task and method with the initial
weights multiplied by ``1 + 1e-6 N(0, 1)`` (a fixed generator per seed) and reports how far the result moves.

``clean`` is a reference, not a peer: on a task that injects bad batches it is the unprotected run on the same
batches with the injected ones replaced by the originals, so it is what a perfect filter of bad batches would
reach (tasks that inject nothing leave its cell empty).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import logging
import math
import multiprocessing
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_METHODS = ("none", "clip1", "zclip", "agc", "olmo_skip", "spike", "clean", "guard")


def _quiet() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_gradstab"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _actions(callbacks: list[Any]) -> dict[str, Any]:
    """Action counts (and stop / LR outcome for the guard) from every callback that has ``summary()``."""
    out: dict[str, Any] = {}
    for callback in callbacks:
        summary = getattr(callback, "summary", None)
        if summary is None:
            continue
        data = summary()
        if "optimizers" in data:  # ExplosionGuard: counts summed over optimizers, the lowest LR multiplier
            per_opt = list(data["optimizers"].values()) or [{}]
            counts: dict[str, int] = {}
            for opt in per_opt:
                for key, value in opt.get("counts", {}).items():
                    counts[key] = counts.get(key, 0) + value
            out["counts"] = {k: v for k, v in counts.items() if v}
            out["stop_reason"] = data.get("stop_reason")
            scales = [opt["lr_scale"] for opt in per_opt if opt.get("lr_scale") is not None]
            out["lr_scale"] = min(scales) if scales else None
            out["final_rung"] = per_opt[0].get("final_rung")
            if len(per_opt) > 1:
                out["lr_scales"] = {name: opt.get("lr_scale") for name, opt in data["optimizers"].items()}
                out["final_rungs"] = {name: opt.get("final_rung") for name, opt in data["optimizers"].items()}
        else:
            out["counts"] = {k: v for k, v in data.get("counts", {}).items() if v}
    return out


def healthy_tasks() -> dict[str, Any]:
    """The healthy corpus (:mod:`benchmarks.healthy_tasks`), its four held-out sets (:mod:`benchmarks.healthy_holdout`
    to :mod:`benchmarks.healthy_holdout4`), torch's adaptive optimizers at their defaults
    (:mod:`benchmarks.healthy_optimizers`) and fine-tunes (:mod:`benchmarks.healthy_finetune`)."""
    from benchmarks.healthy_finetune import FINETUNE_TASKS
    from benchmarks.healthy_holdout import HOLDOUT_TASKS
    from benchmarks.healthy_holdout2 import HOLDOUT2_TASKS
    from benchmarks.healthy_holdout3 import HOLDOUT3_TASKS
    from benchmarks.healthy_holdout4 import HOLDOUT4_TASKS
    from benchmarks.healthy_optimizers import OPTIMIZER_TASKS
    from benchmarks.healthy_tasks import HEALTHY_TASKS

    return {
        **HEALTHY_TASKS, **HOLDOUT_TASKS, **HOLDOUT2_TASKS, **HOLDOUT3_TASKS, **HOLDOUT4_TASKS, **OPTIMIZER_TASKS,
        **FINETUNE_TASKS,
    }


def healthy_metrics() -> dict[str, str]:
    """What each healthy task's ``evaluate`` measures, for the corpus and the held-out sets."""
    from benchmarks.healthy_finetune import METRICS as FINETUNE_METRICS
    from benchmarks.healthy_holdout import METRICS as HOLDOUT_METRICS
    from benchmarks.healthy_holdout2 import METRICS as HOLDOUT2_METRICS
    from benchmarks.healthy_holdout3 import METRICS as HOLDOUT3_METRICS
    from benchmarks.healthy_holdout4 import METRICS as HOLDOUT4_METRICS
    from benchmarks.healthy_optimizers import METRICS as OPTIMIZER_METRICS
    from benchmarks.healthy_tasks import METRICS

    return {
        **METRICS,
        **HOLDOUT_METRICS,
        **HOLDOUT2_METRICS,
        **HOLDOUT3_METRICS,
        **HOLDOUT4_METRICS,
        **OPTIMIZER_METRICS,
        **FINETUNE_METRICS,
    }


def all_tasks() -> dict[str, Any]:
    """The divergence tasks, the healthy corpus and its held-out sets, by name."""
    from benchmarks.divergence_tasks import TASKS

    return {**TASKS, **healthy_tasks()}


def perturb_weights(module: Any, relative: float, seed: int) -> None:
    """Multiply every parameter by ``1 + relative * N(0, 1)`` (one fixed generator per seed): the same tiny
    perturbation for every method, to show how far a run moves under a change at the level of rounding."""
    import torch

    g = torch.Generator().manual_seed(777_000 + seed)
    with torch.no_grad():
        for p in module.parameters():
            p.mul_(1 + relative * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))


def run_one(
    task_name: str,
    method_name: str,
    seed: int,
    steps: int | None = None,
    perturb: float = 0.0,
    *,
    watch: Callable[[list[Any]], list[Any]] | None = None,
) -> dict[str, Any]:
    """One fit of ``task_name`` under ``method_name`` for ``seed``; returns the per-run record.

    ``perturb`` > 0 multiplies the initial weights by ``1 + perturb * N(0, 1)`` (:func:`perturb_weights`).
    ``watch``: given the method's callbacks, returns callbacks added after them (to read what they decide).
    Under manual optimization (the GAN of the healthy corpus) ``Trainer(gradient_clip_val=v)`` is refused by
    Lightning, so ``v`` is handed to the module's ``manual_clip_val``, which clips through
    ``self.clip_gradients`` as Lightning documents for manual optimization.
    """
    import lightning.pytorch as pl
    import torch
    from lightning.fabric.utilities.spike import TrainingSpikeException

    from benchmarks.peers import resolve_method

    _quiet()
    task = all_tasks()[task_name]
    built = task.build(seed, steps)
    if perturb:
        perturb_weights(built.module, perturb, seed)
    if method_name == "clean":  # a reference, not a method: the same run without its injected batches
        if built.clean_batches is None:
            return {"task": task_name, "method": method_name, "seed": seed, "status": "n/a"}
        built.train_batches, built.injections = built.clean_batches, {}
    initial = built.module.evaluate(built.eval_batches)
    method = resolve_method(method_name)()
    trainer_kwargs = {**built.trainer_kwargs, **method.trainer_kwargs}
    if not built.module.automatic_optimization and "gradient_clip_val" in trainer_kwargs:
        built.module.manual_clip_val = trainer_kwargs.pop("gradient_clip_val")
    max_steps = getattr(built, "max_steps", built.steps)  # optimizer steps (a GAN steps two per batch)
    status, error = "finished", None
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as root:
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            max_steps=max_steps,
            max_epochs=1,
            logger=False,
            enable_progress_bar=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            default_root_dir=root,
            callbacks=[*method.callbacks, *(watch(method.callbacks) if watch is not None else [])],
            **trainer_kwargs,
        )
        torch.manual_seed(seed)
        sink = io.StringIO()
        try:
            with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
                trainer.fit(built.module, train_dataloaders=built.train_loader())
        except TrainingSpikeException as exc:
            status, error = "killed", str(exc)
        except Exception as exc:  # a method or the run itself crashed: record it, keep benchmarking
            status, error = "crashed", f"{type(exc).__name__}: {exc}"
        if status == "finished" and trainer.global_step < max_steps:
            status = "stopped"
    wall = time.perf_counter() - start
    final = built.module.evaluate(built.eval_batches)
    ok = status != "crashed" and math.isfinite(final) and final < initial
    return {
        "task": task_name,
        "method": method_name,
        "seed": seed,
        "steps": built.steps,
        "steps_done": int(trainer.global_step) // max(1, max_steps // built.steps),
        "perturb": perturb,
        "status": status,
        "error": error,
        "initial_loss": initial,
        "final_loss": final,
        "ok": ok,
        "wall_s": round(wall, 2),
        "injections": len(built.injections),
        "actions": _actions(method.callbacks),
        "package": str(Path(sys.modules["lightning_gradstab"].__file__).parent)
        if "lightning_gradstab" in sys.modules
        else None,
    }


def _run_star(args: tuple) -> dict[str, Any]:
    return run_one(*args)


def _init_worker() -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"
    _quiet()


def run_all(
    tasks: list[str],
    methods: list[str],
    seeds: int,
    jobs: int = 1,
    steps: int | None = None,
    log=print,
    perturb: float = 0.0,
    perturb_seeds: int = 1,
) -> list[dict[str, Any]]:
    """Every (task, method, seed) run, in parallel over ``jobs`` spawned processes when ``jobs > 1``.

    With ``perturb > 0`` every (task, method) also runs seeds ``0 .. perturb_seeds - 1`` once more with the
    initial weights multiplied by ``1 + perturb * N(0, 1)``; those records carry ``"perturb": perturb``.
    """
    work = [(t, m, s, steps, 0.0) for t in tasks for s in range(seeds) for m in methods]
    if perturb:
        work += [(t, m, s, steps, perturb) for t in tasks for s in range(min(seeds, perturb_seeds)) for m in methods]
    results: list[dict[str, Any]] = []
    if jobs <= 1:
        _init_worker()
        for item in work:
            results.append(run_one(*item))
            log(_progress(results[-1], len(results), len(work)))
        return results
    context = multiprocessing.get_context("spawn")
    with context.Pool(jobs, initializer=_init_worker, maxtasksperchild=20) as pool:
        for record in pool.imap_unordered(_run_star, work):
            results.append(record)
            log(_progress(record, len(results), len(work)))
    order = {(*item[:3], item[4]): i for i, item in enumerate(work)}
    return sorted(results, key=lambda r: order[(r["task"], r["method"], r["seed"], r.get("perturb", 0.0))])


def _progress(r: dict[str, Any], done: int, total: int) -> str:
    seed = f"seed={r['seed']}" + (f" perturbed {r['perturb']:g}" if r.get("perturb") else "")
    if r["status"] == "n/a":
        return f"[{done}/{total}] {r['task']} {r['method']} {seed}: n/a"
    return (
        f"[{done}/{total}] {r['task']} {r['method']} {seed}: {r['status']} "
        f"loss {r['initial_loss']:.3g} -> {r['final_loss']:.3g} {'ok' if r['ok'] else 'NOT ok'} ({r['wall_s']}s)"
    )


# ----------------------------------------------------------------------------------------------------------
# aggregation, bar, report
# ----------------------------------------------------------------------------------------------------------


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values and all(math.isfinite(v) for v in values) else float("inf")


def _fmt(value: float) -> str:
    if not math.isfinite(value):
        return "inf"
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:.2e}"


def aggregate(results: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """Per (task, method): seeds, ok count, early-ended count, mean final loss, summed actions."""
    cells: dict[tuple[str, str], dict[str, Any]] = {}
    for r in results:
        if r["status"] == "n/a" or r.get("perturb"):  # clean reference of a task that injects nothing; perturbed
            continue
        cell = cells.setdefault(
            (r["task"], r["method"]), {"n": 0, "ok": 0, "early": 0, "crashed": 0, "losses": [], "actions": {}}
        )
        cell["n"] += 1
        cell["ok"] += bool(r["ok"])
        cell["early"] += r["status"] in ("stopped", "killed")
        cell["crashed"] += r["status"] == "crashed"
        cell["losses"].append(r["final_loss"])
        for key, value in r["actions"].get("counts", {}).items():
            cell["actions"][key] = cell["actions"].get(key, 0) + value
    for cell in cells.values():
        cell["mean"] = _mean(cell["losses"])
    return cells


def best_peer(cells: dict, task: str, methods: list[str]) -> str | None:
    from benchmarks.peers import PEERS

    peers = [m for m in methods if m in PEERS and (task, m) in cells]
    if not peers:
        return None
    return min(peers, key=lambda m: (-cells[(task, m)]["ok"], cells[(task, m)]["mean"]))


def bar(cells: dict, task: str, kind: str, method: str, methods: list[str]) -> tuple[bool | None, str]:
    """Whether ``method`` meets the bar on ``task`` and the rule applied (None when it cannot be judged)."""
    cell = cells.get((task, method))
    none = cells.get((task, "none"))
    best = best_peer(cells, task, methods)
    if cell is None or none is None:
        return None, "needs the 'none' run"
    all_ok = cell["ok"] == cell["n"] and cell["early"] == 0
    if kind == "healthy":
        limit = 1.05 * none["mean"] + 0.02
        return all_ok and cell["mean"] <= limit, f"healthy: <= 1.05 x none + 0.02 = {_fmt(limit)}"
    if best is None:
        return None, "needs peers"
    ref = cells[(task, best)]["mean"]
    limit = 1.05 * ref + 0.01
    if none["ok"] < none["n"]:
        rule = f"rescue: {cell['n']}/{cell['n']} finished ok, <= 1.05 x {best} + 0.01 = {_fmt(limit)}"
        return all_ok and cell["mean"] <= limit, rule
    rule = "peer" if kind == "transformer" else "peer (unprotected did not fail)"
    return all_ok and cell["mean"] <= limit, f"{rule}: <= 1.05 x {best} + 0.01 = {_fmt(limit)}"


def table(results: list[dict[str, Any]], tasks: list[str], methods: list[str]) -> list[str]:
    from benchmarks.divergence_tasks import TASKS

    cells = aggregate(results)
    guards = [m for m in methods if m.startswith("guard")]
    header = ["task", "kind", *methods, "best peer", *[f"{g} bar" for g in guards]]
    lines = ["| " + " | ".join(f"`{h}`" if h in methods else h for h in header) + " |"]
    lines.append("|" + "---|" * len(header))
    for task in tasks:
        kind = TASKS[task].kind
        row = [task, kind]
        for m in methods:
            c = cells.get((task, m))
            if c is None:
                row.append("")
                continue
            text = f"{c['ok']}/{c['n']}, {_fmt(c['mean'])}"
            notes = []
            if c["early"]:
                notes.append(f"{c['early']} ended early")
            if c["crashed"]:
                notes.append(f"{c['crashed']} crashed")
            row.append(text + (f" ({', '.join(notes)})" if notes else ""))
        best = best_peer(cells, task, methods)
        row.append(f"`{best}`" if best else "")
        for g in guards:
            passed, _ = bar(cells, task, kind, g, methods)
            row.append({True: "meets", False: "**misses**", None: "n/a"}[passed])
        lines.append("| " + " | ".join(row) + " |")
    return lines


def actions_table(results: list[dict[str, Any]], tasks: list[str], methods: list[str]) -> list[str]:
    cells = aggregate(results)
    acting = [m for m in methods if any(cells.get((t, m), {}).get("actions") for t in tasks)]
    if not acting:
        return []
    lines = ["| task | " + " | ".join(f"`{m}`" for m in acting) + " |", "|" + "---|" * (len(acting) + 1)]
    for task in tasks:
        row = [task]
        for m in acting:
            counts = cells.get((task, m), {}).get("actions", {})
            row.append(", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "-")
        lines.append("| " + " | ".join(row) + " |")
    return lines


def freeze_package() -> str:
    """Copy ``lightning_gradstab/`` as it is now to a temporary directory first on ``sys.path`` (spawned workers
    inherit it), so edits made to the working tree during a long benchmark do not mix versions; returns a
    short hash of the copied sources that identifies the code measured."""
    import hashlib
    import shutil

    source = ROOT / "lightning_gradstab"
    target = Path(tempfile.mkdtemp(prefix="gradstab-bench-code-"))
    shutil.copytree(source, target / "lightning_gradstab", ignore=shutil.ignore_patterns("__pycache__"))
    digest = hashlib.sha256()
    for path in sorted((target / "lightning_gradstab").rglob("*.py")):
        digest.update(path.relative_to(target).as_posix().encode() + b"\0" + path.read_bytes())
    sys.path.insert(0, str(target))
    return digest.hexdigest()[:12]


def machine() -> dict[str, Any]:
    import lightning
    import torch

    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as stream:
        for line in stream:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    commit = "unknown"
    with contextlib.suppress(Exception):
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--", "lightning_gradstab"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        if dirty:
            commit += " + uncommitted changes in lightning_gradstab/"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "commit": commit,
    }


def report(results, tasks, methods, command: str, jobs: int, wall: float, label: str | None) -> str:
    from benchmarks.divergence_tasks import TASKS
    from benchmarks.peers import AGC_SETTINGS, ZCLIP_SETTINGS

    info = machine()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    seeds = max((r["seed"] for r in results), default=-1) + 1
    out = [
        "# Divergence benchmark (CPU)",
        "",
        f"- command: `{command}`",
        f"- date: {date}; wall time {wall / 60:.1f} min with {jobs} process(es), 1 thread each",
        f"- machine: {info['cpu']}, {info['cores']} cores; Python {info['python']}, torch {info['torch']}, "
        f"lightning {info['lightning']}",
        f"- code: git commit {info['commit']}" + (f"; {label}" if label else ""),
        f"- {seeds} seed(s) per task; cell = `ok seeds/seeds, mean final held-out loss`",
        f"- zclip settings: `{ZCLIP_SETTINGS}`; agc = NFNet adaptive gradient clipping `{AGC_SETTINGS}` (timm's "
        "defaults; final linear layer excluded); spike = `SpikeDetection()` defaults; olmo_skip = window 128, "
        "6 sigma; clean = no protection, the injected batches replaced by the originals (a reference, not a peer)",
        "",
        *table(results, tasks, methods),
        "",
        "Actions summed over seeds (callbacks with a `summary()`):",
        "",
        *actions_table(results, tasks, methods),
        "",
        "Bar applied per task:",
        "",
    ]
    cells = aggregate(results)
    for task in tasks:
        for g in [m for m in methods if m.startswith("guard")]:
            passed, rule = bar(cells, task, TASKS[task].kind, g, methods)
            out.append(f"- {task} / `{g}`: { ({True: 'meets', False: 'misses', None: 'n/a'}[passed]) } ({rule})")
    out += ["", "Tasks:", ""]
    out += [f"- `{t}` ({TASKS[t].kind}, {TASKS[t].steps} steps): {TASKS[t].summary}" for t in tasks]
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------------------------------------
# the healthy corpus (--suite healthy): task metrics, the guard's LR multiplier and stops
# ----------------------------------------------------------------------------------------------------------

HEALTHY_METHODS = ("none", "guard", "clip1", "zclip", "agc", "olmo_skip")
HEALTHY_LR_FLOOR = 0.5
"""On a healthy task a guard must end every seed with its LR multiplier at least this (issue 18)."""


def healthy_cells(results: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """Per (task, method), over the unperturbed seeds: task metrics, stops, crashes, the guard's LR multipliers."""
    cells: dict[tuple[str, str], dict[str, Any]] = {}
    for r in results:
        if r.get("perturb") or r["status"] == "n/a":
            continue
        cell = cells.setdefault(
            (r["task"], r["method"]),
            {"metrics": [], "initial": [], "stopped": 0, "crashed": 0, "lr_scales": [], "actions": {}},
        )
        cell["metrics"].append(r["final_loss"])
        cell["initial"].append(r["initial_loss"])
        cell["stopped"] += r["status"] in ("stopped", "killed")
        cell["crashed"] += r["status"] == "crashed"
        if r["actions"].get("lr_scale") is not None:
            cell["lr_scales"].append(r["actions"]["lr_scale"])
        for key, value in r["actions"].get("counts", {}).items():
            cell["actions"][key] = cell["actions"].get(key, 0) + value
    for cell in cells.values():
        finite = [v for v in cell["metrics"] if math.isfinite(v)]
        cell["mean"] = _mean(cell["metrics"])
        cell["min"] = min(finite) if finite else float("inf")
        cell["max"] = max(cell["metrics"])
        cell["init_mean"] = _mean(cell["initial"])
        cell["lr_min"] = min(cell["lr_scales"]) if cell["lr_scales"] else None
    return cells


def healthy_bar(cells: dict, task: str, method: str) -> tuple[bool | None, str]:
    """Issue 18's bar on a healthy task: no seed stopped (or crashed), every final LR multiplier >= 0.5, and
    the mean task metric <= 1.02 x unguarded's + 0.01."""
    cell, none = cells.get((task, method)), cells.get((task, "none"))
    if cell is None or none is None:
        return None, "needs the 'none' run"
    limit = 1.02 * none["mean"] + 0.01
    reasons = []
    if cell["stopped"]:
        reasons.append(f"stopped {cell['stopped']}/{len(cell['metrics'])}")
    if cell["crashed"]:
        reasons.append(f"crashed {cell['crashed']}/{len(cell['metrics'])}")
    if cell["lr_min"] is not None and cell["lr_min"] < HEALTHY_LR_FLOOR:
        low = sum(v < HEALTHY_LR_FLOOR for v in cell["lr_scales"])
        reasons.append(f"LR x{cell['lr_min']:.3g} ({low} seed(s) < {HEALTHY_LR_FLOOR})")
    if not cell["mean"] <= limit:
        reasons.append(f"metric {_fmt(cell['mean'])} > {_fmt(limit)}")
    rule = f"never stops, LR x >= {HEALTHY_LR_FLOOR}, mean <= 1.02 x none + 0.01 = {_fmt(limit)}"
    return not reasons, rule + (f"; missed: {', '.join(reasons)}" if reasons else "")


def _perturbation_deltas(results: list[dict[str, Any]]) -> dict[tuple[str, str], list[float]]:
    """Per (task, method): |metric(perturbed) - metric(same seed, unperturbed)| for each perturbed seed."""
    base = {(r["task"], r["method"], r["seed"]): r["final_loss"] for r in results if not r.get("perturb")}
    deltas: dict[tuple[str, str], list[float]] = {}
    for r in results:
        if r.get("perturb") and (r["task"], r["method"], r["seed"]) in base:
            ref = base[(r["task"], r["method"], r["seed"])]
            delta = abs(r["final_loss"] - ref) if math.isfinite(ref) and math.isfinite(r["final_loss"]) else math.inf
            deltas.setdefault((r["task"], r["method"]), []).append(delta)
    return deltas


def healthy_table(results: list[dict[str, Any]], tasks: list[str], methods: list[str]) -> list[str]:
    metrics = healthy_metrics()
    cells = healthy_cells(results)
    guards = [m for m in methods if m.startswith("guard")]
    header = ["task", "metric", "init", *[f"`{m}`" for m in methods], *[f"`{g}` bar" for g in guards]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for task in tasks:
        none = cells.get((task, "none")) or next((c for (t, _), c in cells.items() if t == task), None)
        row = [task, metrics.get(task, "loss"), _fmt(none["init_mean"]) if none else ""]
        for m in methods:
            c = cells.get((task, m))
            if c is None:
                row.append("")
                continue
            text = f"{_fmt(c['mean'])} [{_fmt(c['min'])}-{_fmt(c['max'])}]"
            notes = []
            if c["stopped"]:
                notes.append(f"**{c['stopped']} stopped**")
            if c["crashed"]:
                notes.append(f"{c['crashed']} crashed")
            if c["lr_min"] is not None and c["lr_min"] != 1.0:
                low = c["lr_min"] < HEALTHY_LR_FLOOR
                notes.append(("**" if low else "") + f"LR x{c['lr_min']:.2g}" + ("**" if low else ""))
            row.append(text + (f" ({', '.join(notes)})" if notes else ""))
        for g in guards:
            passed, _ = healthy_bar(cells, task, g)
            row.append({True: "meets", False: "**misses**", None: "n/a"}[passed])
        lines.append("| " + " | ".join(row) + " |")
    return lines


def healthy_report(results, tasks, methods, command: str, jobs: int, wall: float, label: str | None) -> str:
    from benchmarks.healthy_finetune import FINETUNE_TASKS
    from benchmarks.healthy_holdout import HOLDOUT_TASKS
    from benchmarks.healthy_holdout2 import HOLDOUT2_TASKS
    from benchmarks.healthy_holdout3 import HOLDOUT3_TASKS
    from benchmarks.healthy_holdout4 import HOLDOUT4_TASKS
    from benchmarks.healthy_optimizers import OPTIMIZER_TASKS
    from benchmarks.peers import AGC_SETTINGS, ZCLIP_SETTINGS

    registry, metrics = healthy_tasks(), healthy_metrics()
    held_out = {**HOLDOUT_TASKS, **HOLDOUT2_TASKS, **HOLDOUT3_TASKS, **HOLDOUT4_TASKS}
    holdout = bool(tasks) and all(t in held_out for t in tasks)
    optimizers = bool(tasks) and all(t in OPTIMIZER_TASKS for t in tasks)
    finetunes = bool(tasks) and all(t in FINETUNE_TASKS for t in tasks)
    info = machine()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    seeds = max((r["seed"] for r in results), default=-1) + 1
    perturbs = sorted({r["perturb"] for r in results if r.get("perturb")})
    out = [
        "# Held-out healthy shapes (CPU)"
        if holdout
        else "# torch's adaptive optimizers at their defaults, healthy runs (CPU)"
        if optimizers
        else "# Fine-tunes of a trained model with small batches, healthy runs (CPU)"
        if finetunes
        else "# Healthy-but-unusual corpus (CPU)",
        "",
        f"- command: `{command}`",
        f"- date: {date}; wall time {wall / 60:.1f} min with {jobs} process(es), 1 thread each",
        f"- machine: {info['cpu']}, {info['cores']} cores; Python {info['python']}, torch {info['torch']}, "
        f"lightning {info['lightning']}",
        f"- code: git commit {info['commit']}" + (f"; {label}" if label else ""),
        f"- {seeds} seed(s) per task; cell = `mean [min-max]` over seeds of the held-out **task metric** (lower is "
        "better; not the training loss), then how many seeds a method stopped and the lowest final LR multiplier "
        "of a guard; `init` = the metric before training (mean over seeds)",
        f"- zclip settings: `{ZCLIP_SETTINGS}`; agc = NFNet adaptive gradient clipping `{AGC_SETTINGS}` (timm's "
        "defaults; final linear layer excluded); olmo_skip = window 128, 6 sigma; clip1 = "
        "`Trainer(gradient_clip_val=1.0)` (for the manual-optimization GAN: `self.clip_gradients(opt, 1.0)` on "
        "each optimizer)",
        f"- bar (issue 18) for a `guard*` method on every task: never stops, every seed ends with LR multiplier >= "
        f"{HEALTHY_LR_FLOOR}, mean metric <= 1.02 x `none` + 0.01",
        "",
        *healthy_table(results, tasks, methods),
        "",
    ]
    cells = healthy_cells(results)
    guards = [m for m in methods if m.startswith("guard")]
    out += ["Guard outcomes per task (LR multiplier per seed; stop reasons; actions summed over seeds):", ""]
    for task in tasks:
        for g in guards:
            c = cells.get((task, g))
            if c is None:
                continue
            passed, rule = healthy_bar(cells, task, g)
            reasons = sorted(
                {
                    r["actions"].get("stop_reason") or ""
                    for r in results
                    if r["task"] == task and r["method"] == g and not r.get("perturb")
                }
                - {""}
            )
            actions = ", ".join(f"{k} {v}" for k, v in sorted(c["actions"].items())) or "none"
            lrs = ", ".join(f"{v:.3g}" for v in c["lr_scales"])
            verdict = {True: "meets", False: "**misses**", None: "n/a"}[passed]
            out.append(f"- {task} / `{g}`: {verdict} ({rule}); LR x [{lrs}]; actions: {actions}")
            out += [f"  - stop: {reason}" for reason in reasons]
    acting = actions_table(results, tasks, methods)
    if acting:
        out += ["", "Actions summed over seeds (callbacks with a `summary()`):", "", *acting]
    if perturbs:
        deltas = _perturbation_deltas(results)
        out += [
            "",
            f"Sensitivity: initial weights x (1 + {', '.join(f'{p:g}' for p in perturbs)} N(0,1)), same seed, same "
            "batches; cell = |metric(perturbed) - metric(unperturbed)|, max over the perturbed seeds (compare with "
            "the seed spread above):",
            "",
            "| task | " + " | ".join(f"`{m}`" for m in methods) + " |",
            "|" + "---|" * (len(methods) + 1),
        ]
        for task in tasks:
            row = [task] + [_fmt(max(deltas[(task, m)])) if deltas.get((task, m)) else "" for m in methods]
            out.append("| " + " | ".join(row) + " |")
    out += ["", "Tasks:", ""]
    out += [
        f"- `{t}` ({registry[t].steps} steps; metric: {metrics.get(t, 'loss')}): {registry[t].summary}" for t in tasks
    ]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    from benchmarks.divergence_tasks import TASKS
    from benchmarks.healthy_finetune import FINETUNE_TASKS
    from benchmarks.healthy_holdout import HOLDOUT_TASKS
    from benchmarks.healthy_holdout2 import HOLDOUT2_TASKS
    from benchmarks.healthy_holdout3 import HOLDOUT3_TASKS
    from benchmarks.healthy_holdout4 import HOLDOUT4_TASKS
    from benchmarks.healthy_optimizers import OPTIMIZER_TASKS
    from benchmarks.healthy_tasks import HEALTHY_TASKS
    from benchmarks.peers import resolve_method

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--suite",
        choices=("divergence", "healthy", "holdout", "holdout2", "holdout3", "holdout4", "optimizers", "finetune"),
        default="divergence",
        help="divergence: the divergence tasks and their bar; healthy: the healthy-but-unusual corpus "
        "(benchmarks/healthy_tasks.py), task metrics and issue 18's healthy bar; holdout: the held-out healthy "
        "shapes (benchmarks/healthy_holdout.py), same metrics and bar; holdout2: the second held-out set "
        "(benchmarks/healthy_holdout2.py); holdout3: the third (benchmarks/healthy_holdout3.py); holdout4: the "
        "fourth, whose recipes write the weights mid-run (benchmarks/healthy_holdout4.py); "
        "optimizers: torch's adaptive optimizers at their defaults "
        "(benchmarks/healthy_optimizers.py); finetune: fine-tunes of a trained model with small batches "
        "(benchmarks/healthy_finetune.py)",
    )
    parser.add_argument("--tasks", default=None, help="comma-separated task names (default: all of the suite)")
    parser.add_argument("--methods", default=None, help="comma-separated method names (default: the suite's)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=None, help="override every task's step count (quick looks)")
    parser.add_argument("--perturb", type=float, default=0.0, help="also rerun seeds with weights x (1 + p N(0,1))")
    parser.add_argument("--perturb-seeds", type=int, default=1, help="how many seeds (0, 1, ...) --perturb reruns")
    parser.add_argument("--out", default=None, help="writes OUT.json and OUT.md (default: per suite)")
    parser.add_argument("--label", default=None, help="a note for the report header (e.g. which guard)")
    parser.add_argument("--check", action="store_true", help="exit 1 if a guard* method misses the bar")
    args = parser.parse_args(argv)

    healthy = args.suite in ("healthy", "holdout", "holdout2", "holdout3", "holdout4", "optimizers", "finetune")
    registry = {
        "healthy": HEALTHY_TASKS,
        "holdout": HOLDOUT_TASKS,
        "holdout2": HOLDOUT2_TASKS,
        "holdout3": HOLDOUT3_TASKS,
        "holdout4": HOLDOUT4_TASKS,
        "optimizers": OPTIMIZER_TASKS,
        "finetune": FINETUNE_TASKS,
    }.get(args.suite, TASKS)
    known = all_tasks()
    tasks = [t for t in (args.tasks or ",".join(registry)).split(",") if t]
    unknown = [t for t in tasks if t not in known]
    if unknown:
        parser.error(f"unknown task(s) {unknown}; known: {list(known)}")
    if not healthy and any(t in healthy_tasks() for t in tasks):
        parser.error(
            "the healthy tasks need --suite healthy, holdout, holdout2, holdout3, holdout4, optimizers or finetune "
            "(their evaluate() is a task metric)"
        )
    methods = [m for m in (args.methods or ",".join(HEALTHY_METHODS if healthy else DEFAULT_METHODS)).split(",") if m]
    for m in methods:
        try:
            resolve_method(m)
        except (ValueError, ImportError, AttributeError) as error:
            parser.error(str(error))
    if args.seeds < 1 or args.jobs < 1:
        parser.error("--seeds and --jobs must be >= 1")
    if args.perturb < 0 or args.perturb_seeds < 1:
        parser.error("--perturb must be >= 0 and --perturb-seeds >= 1")
    default_out = {
        "healthy": "healthy-cpu",
        "holdout": "healthy-holdout-cpu",
        "holdout2": "healthy-holdout2-cpu",
        "holdout3": "healthy-holdout3-cpu",
        "holdout4": "healthy-holdout4-cpu",
        "optimizers": "healthy-optimizers-cpu",
        "finetune": "healthy-finetune-cpu",
    }.get(args.suite, "divergence-cpu")
    out = Path(args.out or f"benchmarks/results/{default_out}")

    code_hash = freeze_package()
    start = time.perf_counter()
    results = run_all(
        tasks,
        methods,
        args.seeds,
        args.jobs,
        args.steps,
        log=lambda s: print(s, flush=True),
        perturb=args.perturb,
        perturb_seeds=args.perturb_seeds,
    )
    wall = time.perf_counter() - start
    command = shlex.join(["python", "benchmarks/divergence.py", *(sys.argv[1:] if argv is None else argv)])
    label = f"lightning_gradstab sources sha256 {code_hash}" + (f"; {args.label}" if args.label else "")
    write = healthy_report if healthy else report
    text = write(results, tasks, methods, command.strip(), args.jobs, wall, label)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text)
    payload = {"command": command.strip(), "machine": machine(), "label": label, "suite": args.suite, "runs": results}
    if healthy:
        metrics = healthy_metrics()
        payload["metrics"] = {t: metrics.get(t) for t in tasks}
        payload["note"] = "initial_loss / final_loss hold the task metric (lower is better), not the loss"
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1))
    print(text)

    guards = [g for g in methods if g.startswith("guard")]
    if healthy:
        cells = healthy_cells(results)
        failed = [(t, g) for t in tasks for g in guards if healthy_bar(cells, t, g)[0] is False]
    else:
        cells = aggregate(results)
        failed = [(t, g) for t in tasks for g in guards if bar(cells, t, TASKS[t].kind, g, methods)[0] is False]
    if args.check and failed:
        print(f"bar missed on: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
