"""``InitAudit``: diagnose the model on the first training batch, before any update, and optionally fix its init."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from typing_extensions import override

from lightning_gradstab.arguments import check_flag, check_int
from lightning_gradstab.callbacks._first_batch import first_batch_measurement, forget_first_batch
from lightning_gradstab.callbacks._reporting import (
    ForwardFn,
    ReportingCallback,
    publish_report,
)
from lightning_gradstab.callbacks._shared import (
    STATE_VERSION,
    SummaryContribution,
    check_state_version,
)
from lightning_gradstab.diagnosis import (
    InitScheme,
    reinitialize,
)
from lightning_gradstab.report import Report

INIT_AUDIT_FILENAME = "gradstab_init_audit.json"


class InitAudit(ReportingCallback):
    """Diagnose initialization, signal propagation and architecture on the first training batch.

    Runs :func:`~lightning_gradstab.diagnosis.diagnose`'s measurement at the first ``on_train_batch_start``: one
    forward + backward of ``training_step`` (no ``.grad`` written, buffers and RNG restored, ``self.log``
    muted) with the same random direction that ``diagnose`` uses, applied to the output of the model call the
    step makes (``self(batch)``, ``self.model(**batch)``), so ``InitAudit``, ``ArchitectureAdvisor``'s first look
    and ``diagnose(model, batch)`` give one verdict on one model and batch, whatever loss the step computes.
    Global rank 0 prints the findings, writes them as Markdown to TensorBoard
    (``gradstab/findings``) and as JSON to ``<log_dir>/gradstab_init_audit.json``.

    With ``fix=True`` the layers flagged ``init.scale`` or ``init.symmetric`` are re-drawn with their
    recommended scheme before the first update. Rank 0's plan is broadcast and applied with a generator
    seeded by ``seed``, so every rank ends up with the same weights.

    Args:
        fix: re-initialise flagged layers (opt-in: it changes the model).
        seed: seed of the re-initialization generator (identical on every rank).
        forward_fn: ``forward_fn(pl_module, batch) -> output`` probed with a random output direction
            instead of ``training_step``'s loss; required under manual optimization, where
            ``training_step`` steps optimizers itself.

    Example::

        trainer = pl.Trainer(callbacks=[InitAudit(fix=True)])
        trainer.fit(model)
        print(trainer.callbacks[0].report.codes)
    """

    def __init__(self, fix: bool = False, seed: int = 0, forward_fn: ForwardFn | None = None) -> None:
        check_int(seed, "seed", 0)
        super().__init__(forward_fn)
        self.fix = check_flag(fix, "fix")
        self.seed = seed
        self.fixed_modules: list[str] = []
        self._audited = False

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._audited:
            return
        self._audited = True  # once per fit, resumed runs included (see state_dict)
        report, _ = first_batch_measurement(trainer, pl_module, batch, batch_idx, self.forward_fn, source="InitAudit")
        if self.fix and trainer.global_step > 0:  # resumed (perhaps from a checkpoint written without us)
            report.notes.append(
                f"InitAudit(fix=True) did not re-initialise anything: training resumed at step "
                f"{trainer.global_step}, and trained weights are never re-drawn."
            )
        elif self.fix:
            plan = trainer.strategy.broadcast(_fix_plan(report), src=0)  # rank 0 decides; all ranks apply it
            schemes = {name: InitScheme(*scheme) for name, scheme in plan if scheme is not None}
            applied = reinitialize(pl_module, schemes, [name for name, _ in plan], self.seed)
            self.fixed_modules = list(applied)
            if applied:
                forget_first_batch(trainer)  # the measurement was of the weights just re-drawn
                by_scheme: dict[str, list[str]] = {}
                for name, scheme in applied.items():
                    by_scheme.setdefault(scheme.name, []).append(name)
                report.notes.append(
                    "InitAudit(fix=True) re-initialised before the first update: "
                    + "; ".join(f"{_short(names)} with {scheme}" for scheme, names in by_scheme.items())
                )
        self.report = report
        publish_report(trainer, report, self._log_dir, INIT_AUDIT_FILENAME)

    @override
    def summary_contribution(self) -> SummaryContribution:
        return SummaryContribution(
            reports=(self.report,) if self.report is not None else (), fixed_modules=tuple(self.fixed_modules)
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "audited": self._audited, "fixed_modules": list(self.fixed_modules)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        check_state_version("InitAudit", state_dict)
        # a resumed run must never re-initialise trained weights
        self._audited = bool(state_dict["audited"])
        self.fixed_modules = list(state_dict["fixed_modules"])


def _fix_plan(report: Report) -> list[tuple[str, tuple[str, float] | None]]:
    """Modules of ``init.scale``/``init.symmetric`` warnings and errors with their recommended (scheme, variance);
    an information (a zero attention-logit term, uniform attention on purpose) is left as it is.

    Plain values, so rank 0 can broadcast the plan; None leaves the choice to ``reinitialize`` (Xavier).
    """
    rows = {row["name"]: row for row in report.layers}
    plan: dict[str, tuple[str, float] | None] = {}
    for finding in report.findings:
        if finding.code not in ("init.scale", "init.symmetric") or finding.severity == "info":
            continue
        for name in finding.modules:
            row = rows.get(name, {})
            std = row.get("recommended_std")
            plan[name] = (row["recommended_init"], std**2) if std else None
    return list(plan.items())


def _short(names: list[str]) -> str:
    if len(names) <= 3:
        return ", ".join(names)
    return f"{len(names)} layers ({names[0]}, {names[1]}, …, {names[-1]})"
