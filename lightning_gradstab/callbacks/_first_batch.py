"""The first-batch measurement ``InitAudit`` and ``ArchitectureAdvisor`` share: one probe, one verdict.

The probe runs once per trainer, model state and batch: the second callback to ask on the same first batch gets
the first one's measurement from the trainer's suite (a probe is a traced forward and backward, the suite's most
expensive step). A re-initialisation (``InitAudit(fix=True)``) makes it stale: :func:`forget_first_batch`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_gradstab.callbacks._reporting import ForwardFn, probing
from lightning_gradstab.callbacks._shared import suite_of
from lightning_gradstab.compiled import uncompiled_method
from lightning_gradstab.diagnosis import ModelGraph, build_report, probe_failed_report, run_probe
from lightning_gradstab.report import Finding, Report


def forget_first_batch(trainer: pl.Trainer) -> None:
    """The model changed since its first batch was probed (re-initialised): the next callback probes afresh."""
    suite_of(trainer).first_batch = None


def first_batch_measurement(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    batch: Any,
    batch_idx: int,
    forward_fn: ForwardFn | None,
    *,
    source: str,
) -> tuple[Report, ModelGraph | None]:
    """The first-batch measurement shared by ``InitAudit`` and ``ArchitectureAdvisor``: the report and the traced
    graph (None when the model could not be probed).

    ``training_step`` runs once under the probe and the random direction of ``diagnose`` is applied to the output
    of the (last, outermost) parameterised module call it makes, so the verdict is ``diagnose(model, batch)``'s.
    Without such a call (an all-functional step) the step's loss is backpropagated instead.
    """
    model = type(pl_module).__name__
    if forward_fn is None and not pl_module.automatic_optimization:
        return Report([_untraced("manual optimization: training_step steps the optimizers itself; "
                                 "pass forward_fn to probe the model")], model=model, source=source), None
    # the eager step under torch.compile: module hooks do not fire inside compiled graphs
    step = uncompiled_method(pl_module, "training_step") or pl_module.training_step

    def forward(inputs: Any) -> Any:
        with probing(pl_module):
            if forward_fn is not None:
                return forward_fn(pl_module, inputs)
            output = step(inputs, batch_idx)
        return output["loss"] if isinstance(output, Mapping) else output

    def training_loss(loss: Any) -> Tensor:
        return loss

    loss_fn = training_loss if forward_fn is None else None  # forward_fn: random output direction

    suite = suite_of(trainer)
    probed = (id(pl_module), id(batch), batch_idx, trainer.global_step, forward_fn)
    if suite.first_batch is not None and suite.first_batch[0] == probed:
        outcome = suite.first_batch[1]  # another suite callback probed this model on this batch already
    else:
        try:
            outcome = run_probe(pl_module, forward, inputs=batch, loss_fn=loss_fn,
                                direction_at_model_output=forward_fn is None)
        except Exception as error:  # the audit is advice: it must never stop training
            outcome = error.__cause__ or error
            rank_zero_warn(f"lightning_gradstab: {source} could not probe {model}: {outcome!r} (training continues)")
        suite.first_batch = (probed, outcome)
    if isinstance(outcome, BaseException):
        return probe_failed_report(model, source, f"{type(outcome).__name__}: {outcome}"), None
    return build_report(outcome, model=model, source=source), outcome.graph


def _untraced(reason: str) -> Finding:
    return Finding(
        "trace.incomplete",
        "info",
        (),
        {"problem": reason},
        f"Could not diagnose the model ({reason}); call `diagnose(model, batch)` on the eager module instead.",
    )
