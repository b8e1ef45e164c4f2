"""The suite state one trainer's callbacks share: created by the first to ask, held by every suite callback of
that trainer, never shared between trainers, and one first-batch probe for InitAudit and the advisor."""

from __future__ import annotations

import torch

import lightning_gradstab.callbacks._first_batch as first_batch
from lightning_gradstab import ArchitectureAdvisor, ExplosionGuard, GradNormMonitor, InitAudit
from lightning_gradstab.callbacks._shared import suite_of
from tests.helpers.models import DigitsClassifier, digits_loader, mlp
from tests.helpers.trainers import quiet_trainer


def test_the_suite_callbacks_of_one_trainer_hold_one_suite_and_another_trainer_gets_its_own() -> None:
    monitor, guard = GradNormMonitor(), ExplosionGuard()
    first = quiet_trainer(max_steps=1, callbacks=[monitor, guard])
    suite = suite_of(first)
    assert monitor.gradstab_suite is suite and guard.gradstab_suite is suite and suite_of(first) is suite
    second = quiet_trainer(max_steps=1, callbacks=[GradNormMonitor()])
    assert suite_of(second) is not suite
    moved = quiet_trainer(max_steps=1, callbacks=[guard])  # a callback reused by a new trainer joins its suite
    assert suite_of(moved) is not suite and guard.gradstab_suite is suite_of(moved)


def test_the_per_step_statistics_of_two_trainers_never_mix() -> None:
    monitors = [GradNormMonitor(), GradNormMonitor()]
    for monitor, seed in zip(monitors, (0, 1), strict=True):
        torch.manual_seed(seed)
        quiet_trainer(max_steps=3, callbacks=[monitor]).fit(DigitsClassifier(mlp(3, 16)), digits_loader())
    first, second = (monitor.gradstab_suite for monitor in monitors)
    assert first is not None and second is not None and first is not second


def _count_probes(monkeypatch) -> list[int]:
    calls: list[int] = []
    original = first_batch.run_probe

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(first_batch, "run_probe", counting)
    return calls


def test_init_audit_and_the_advisor_share_one_probe_of_the_first_batch_and_give_one_verdict(monkeypatch) -> None:
    calls = _count_probes(monkeypatch)
    audit, advisor = InitAudit(), ArchitectureAdvisor(observe_steps=10)
    torch.manual_seed(0)
    quiet_trainer(max_steps=2, callbacks=[audit, advisor]).fit(
        DigitsClassifier(mlp(8, 32, init=0.02)), digits_loader()
    )
    assert len(calls) == 1
    assert audit.report is not None and advisor.first_look is not None
    assert audit.report.source == "InitAudit" and advisor.first_look.source == "ArchitectureAdvisor"
    assert audit.report.codes == advisor.first_look.codes and "init.scale" in audit.report.codes


def test_a_re_initialisation_by_init_audit_makes_the_advisor_probe_the_new_weights(monkeypatch) -> None:
    calls = _count_probes(monkeypatch)
    audit, advisor = InitAudit(fix=True), ArchitectureAdvisor(observe_steps=10)
    torch.manual_seed(0)
    quiet_trainer(max_steps=2, callbacks=[audit, advisor]).fit(
        DigitsClassifier(mlp(8, 32, init=0.02)), digits_loader()
    )
    assert audit.fixed_modules and len(calls) == 2
    assert "init.scale" in audit.report.codes and "init.scale" not in advisor.first_look.codes
