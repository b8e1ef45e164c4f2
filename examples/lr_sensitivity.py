"""LR sensitivity of every arm of a learning-rate sweep (Wortsman et al. 2023), its table and its figure.

Wortsman et al. 2023 ("Small-scale proxies for large-scale Transformer training instabilities", section 2) define
the LR sensitivity of a training recipe ``A`` over a range of learning rates as

    E_eta[ min(l(A(eta)), l0) - l* ],   l* = min_eta l(A(eta)),

the expected gap between the final loss at a learning rate and the recipe's best final loss, where a run worse
than the initial loss ``l0`` (diverged) counts as ``l0``. Here ``l(A(eta))`` is the final validation loss, ``l0``
the first training batch's loss (before any update; ``summary.json``'s ``initial_train_loss``) and the mean runs
over the swept learning rates. An arm is the set of a job's swept overrides other than the learning rate.

Example::

    table = lr_sensitivity(rows)   # rows from examples.sweep_summary.collect_rows
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

LR_KEY = "optim.optimizer.lr"
ARM_KEY = "variant"
REFERENCE_ARM = "clip1"
"""The arm the others are compared with at every LR (Wortsman et al.'s default recipe clips at 1.0)."""


def _items(row: dict[str, Any]) -> dict[str, str]:
    return dict(item.split("=", 1) for item in row.get("run", "").split() if "=" in item)


def lr_sensitivity(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per arm: its final losses by LR, ``l0``, ``l*`` and the LR sensitivity (empty if no LR is swept).

    Each entry has ``arm`` (label), ``group`` (the swept overrides other than the arm's method, e.g.
    ``model.qk_layernorm=true``), ``method`` (the ``variant`` choice), ``losses`` ({lr: final val loss or None}),
    ``sensitivity`` and, where the group has a clip-1.0 arm, ``vs_reference`` (sensitivity ratio) and
    ``worst_excess`` (max over LRs of ``l - (1.01 l_clip1 + 0.01)``; <= 0 means never worse than clip 1.0 by more
    than 1 % + 0.01).
    """
    arms: dict[str, dict[str, Any]] = {}
    for row in rows:
        items = _items(row)
        if LR_KEY not in items:
            continue
        lr = float(items.pop(LR_KEY))
        every = dict(item.split("=", 1) for item in row.get("overrides", "").split() if "=" in item)
        method = items.pop(ARM_KEY, every.get(ARM_KEY, "")).rpartition("/")[2]  # also when every job shares it
        group = " ".join(f"{k}={v}" for k, v in sorted(items.items()))
        label = " ".join(part for part in (method, group) if part) or "all"
        arm = arms.setdefault(label, {"arm": label, "group": group, "method": method, "losses": {}, "l0": []})
        loss = row.get("val/loss")
        arm["losses"][lr] = loss if isinstance(loss, (int, float)) and math.isfinite(loss) else None
        if isinstance(row.get("initial_train_loss"), (int, float)):
            arm["l0"].append(row["initial_train_loss"])
    for arm in arms.values():
        l0 = max(arm["l0"]) if arm["l0"] else math.inf
        capped = [min(loss, l0) if loss is not None else l0 for loss in arm["losses"].values()]
        best = min(capped)
        arm["l0"], arm["best"] = l0, best
        arm["sensitivity"] = sum(value - best for value in capped) / len(capped) if math.isfinite(best) else None
    for arm in arms.values():
        reference = next((a for a in arms.values() if a["group"] == arm["group"] and a["method"] == REFERENCE_ARM),
                         None)
        if reference is None or arm is reference:
            continue
        if reference["sensitivity"]:
            arm["vs_reference"] = arm["sensitivity"] / reference["sensitivity"]
        excess = []
        for lr, loss in arm["losses"].items():
            ref = reference["losses"].get(lr)
            ref = min(ref, reference["l0"]) if ref is not None else reference["l0"]
            mine = min(loss, arm["l0"]) if loss is not None else arm["l0"]
            excess.append(mine - (1.01 * ref + 0.01))
        arm["worst_excess"] = max(excess)
    return sorted(arms.values(), key=lambda a: (a["group"], a["sensitivity"] if a["sensitivity"] is not None
                                                else math.inf))


def sensitivity_table(arms: list[dict[str, Any]]) -> str:
    """The arms as a Markdown table: LR sensitivity, ratio to clip 1.0, worst excess over clip 1.0, loss per LR."""
    lrs = sorted({lr for arm in arms for lr in arm["losses"]})
    header = ["arm", "LR sensitivity", f"÷ {REFERENCE_ARM}", f"worst vs {REFERENCE_ARM}",
              *(f"lr={lr:g}" for lr in lrs)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def cell(value: Any, digits: str = ".3f") -> str:
        return "—" if value is None else format(value, digits)

    for arm in arms:
        losses = [cell(arm["losses"].get(lr)) if arm["losses"].get(lr) is not None else "diverged" for lr in lrs]
        lines.append("| " + " | ".join([arm["arm"], cell(arm["sensitivity"], ".4f"), cell(arm.get("vs_reference"),
                                        ".2f"), cell(arm.get("worst_excess"), "+.3f"), *losses]) + " |")
    return "\n".join(lines) + "\n"


def sensitivity_figure(arms: list[dict[str, Any]], path: Path) -> bool:
    """Final validation loss against LR (log axis), one line per method, one panel per group; False without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        from matplotlib.figure import Figure
    except ImportError:
        return False
    groups = sorted({arm["group"] for arm in arms})
    figure = Figure(figsize=(5.5 * len(groups), 4.2), layout="constrained")
    axes = figure.subplots(1, len(groups), squeeze=False)[0]
    for ax, group in zip(axes, groups, strict=True):
        for arm in (a for a in arms if a["group"] == group):
            points = sorted((lr, min(loss, arm["l0"]) if loss is not None else arm["l0"])
                            for lr, loss in arm["losses"].items())
            ax.plot(*zip(*points, strict=True), marker="o", label=f"{arm['method'] or arm['arm']} "
                    f"({arm['sensitivity']:.3f})" if arm["sensitivity"] is not None else arm["arm"])
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("final validation loss (capped at l0)")
        ax.set_title(group or "all runs", fontsize=9)
        ax.legend(fontsize=7, title="arm (LR sensitivity)", title_fontsize=7)
    figure.savefig(path, dpi=110)
    return True


def sensitivity_tensorboard(arms: list[dict[str, Any]], table: str, figure_path: Path | None, log_dir: Path) -> bool:
    """The same in TensorBoard: per arm, final loss against the LR's index (``lr_sweep/<arm>``), the sensitivity
    (``lr_sensitivity/<arm>``), the table as text and the figure as an image; False without tensorboard."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return False
    writer = SummaryWriter(str(log_dir))
    try:
        for arm in arms:
            tag = arm["arm"].replace(" ", "/").replace("=", "_")
            for index, lr in enumerate(sorted(arm["losses"])):
                loss = arm["losses"][lr]
                writer.add_scalar(f"lr_sweep/{tag}", min(loss, arm["l0"]) if loss is not None else arm["l0"], index)
            if arm["sensitivity"] is not None:
                writer.add_scalar(f"lr_sensitivity/{tag}", arm["sensitivity"], 0)
        writer.add_text("lr_sensitivity/table", table)
        if figure_path is not None and figure_path.exists():
            import matplotlib.image

            image = matplotlib.image.imread(str(figure_path))[..., :3]
            writer.add_image("lr_sensitivity/figure", image, 0, dataformats="HWC")
    finally:
        writer.close()
    return True
