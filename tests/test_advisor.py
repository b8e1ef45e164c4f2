"""``ArchitectureAdvisor``: advice from the shared gradient statistics, the loss trajectory and guard events."""

from __future__ import annotations

import json

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

import lightning_gradstab.callbacks._shared as shared
from lightning_gradstab import ArchitectureAdvisor, ExplosionGuard, GradNormMonitor
from tests.helpers.models import (
    DigitsClassifier,
    digits_loader,
    mlp,
    sequences,
    vanilla_rnn,
)
from tests.helpers.trainers import quiet_trainer

torch.set_num_threads(1)


def _advise(model, steps: int = 60, callbacks=(), **trainer_kwargs) -> ArchitectureAdvisor:
    torch.manual_seed(0)
    advisor = ArchitectureAdvisor(observe_steps=steps)
    quiet_trainer(max_steps=steps, callbacks=[*callbacks, advisor], **trainer_kwargs).fit(model, digits_loader())
    return advisor


def test_deep_plain_stack_whose_loss_stalls_gets_arch_residual_with_the_loss_evidence(tmp_path):
    advisor = _advise(DigitsClassifier(mlp(30, 64, init="xavier")), default_root_dir=tmp_path)
    (residual,) = advisor.report.by_code("arch.residual")
    assert residual.severity == "error" and residual.evidence["plain_depth"] == 30
    assert residual.evidence["loss_first"] == pytest.approx(2.3026, abs=0.01)  # ln 10: chance
    assert residual.evidence["relative_improvement"] < 0.1 and residual.evidence["batches_observed"] == 60
    document = json.loads((tmp_path / "gradstab_advisor.json").read_text())
    assert document["source"] == "ArchitectureAdvisor" and "arch.residual" in {f["code"] for f in document["findings"]}


def test_the_same_depth_that_trains_gets_no_arch_residual():
    advisor = _advise(DigitsClassifier(mlp(30, 64, init="he")))
    assert "arch.residual" not in advisor.report.codes


def test_gradients_vanishing_toward_the_input_get_normalization_and_activation_advice():
    model = DigitsClassifier(mlp(10, 100, init=0.1, activation=nn.Sigmoid), lr=0.1)
    advisor = _advise(model)
    (vanishing,) = advisor.report.by_code("signal.vanishing")
    assert vanishing.evidence["weight_grad_first_over_last_median"] < 1e-2
    assert vanishing.modules == ("net.0", "net.16")  # the last hidden layer: the output layer is no reference
    assert {"arch.normalization", "arch.activation"} <= advisor.report.codes


def test_batchnorm_sigmoid_stack_gets_no_normalization_advice():
    model = DigitsClassifier(mlp(10, 100, init=0.1, activation=nn.Sigmoid, batchnorm=True), lr=0.1)
    assert "arch.normalization" not in _advise(model).report.codes


def test_advisor_reads_the_shared_statistics_once_per_step_with_the_monitor(monkeypatch, memory_logger):
    calls = []
    original = shared.compute_gradient_stats

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(shared, "compute_gradient_stats", counting)
    _advise(DigitsClassifier(mlp(4, 16)), steps=12, callbacks=[GradNormMonitor()], logger=memory_logger)
    assert len(calls) == 12  # one fused pass per optimizer step, shared by monitor and advisor


class _GuardStub(Callback):
    """A GuardEventSource (``guard_events()``) with anomalies and level transitions chosen by the test."""

    def __init__(self, events: list[dict] | None = None) -> None:
        spike = {"step": 3, "level": 2, "previous_level": 0, "anomaly": "spike", "total_norm": 1e5}
        healthy = {"step": 4, "level": 1, "previous_level": 2, "anomaly": None}  # a de-escalation: not counted
        self._events = [spike, healthy] if events is None else events

    def guard_events(self) -> list[dict]:
        return self._events


class _RNNClassifier(DigitsClassifier):
    def __init__(self) -> None:
        super().__init__(vanilla_rnn(1.5))

    def training_step(self, batch, batch_idx):
        return self(sequences(8, 20)).pow(2).mean()


def test_guard_escalations_feed_signal_exploding_and_recurrent_advice():
    torch.manual_seed(0)
    advisor = ArchitectureAdvisor(observe_steps=10)
    quiet_trainer(max_steps=10, callbacks=[_GuardStub(), advisor]).fit(_RNNClassifier(), digits_loader(size=320))
    (exploding,) = [f for f in advisor.report.by_code("signal.exploding") if "guard_events" in f.evidence]
    assert exploding.evidence["guard_events"] == 1 and exploding.evidence["anomalies"] == ["spike"]
    (recurrent,) = advisor.report.by_code("arch.recurrent")
    assert recurrent.evidence["spectral_radius"] > 1.0  # measured on the current (trained) weights


def test_routine_clipping_at_the_resting_rung_is_not_called_an_explosion():
    # the top of a healthy norm distribution, clipped by the guard's resting rung (ZClip's ~1 % band)
    routine = {"step": 3, "level": 1, "previous_level": 1, "anomaly": "spike", "total_norm": 1.3, "clip_threshold": 1.1}
    advisor = ArchitectureAdvisor(observe_steps=10)
    quiet_trainer(max_steps=10, callbacks=[_GuardStub([routine]), advisor]).fit(
        DigitsClassifier(mlp(4, 16)), digits_loader()
    )
    assert not [f for f in advisor.report.by_code("signal.exploding") if "guard_events" in f.evidence]


def test_a_real_explosion_guard_spike_feeds_the_advice():
    from tests.scripts.guard_models import TinyRegression, regression_loader

    guard, advisor = ExplosionGuard(console_summary=False), ArchitectureAdvisor(observe_steps=40)
    model = TinyRegression(faults={30: "scale_grad"})  # gradients x1e4 at step 30
    quiet_trainer(max_steps=40, callbacks=[guard, advisor]).fit(model, regression_loader())
    (exploding,) = advisor.report.by_code("signal.exploding")
    assert exploding.evidence["anomalies"] == ["spike"] and exploding.evidence["first_step"] >= 30


def test_short_runs_report_at_train_end():
    torch.manual_seed(0)
    advisor = ArchitectureAdvisor(observe_steps=100)
    quiet_trainer(max_steps=20, callbacks=[advisor]).fit(DigitsClassifier(mlp(30, 64)), digits_loader())
    assert advisor.report.by_code("arch.residual")[0].evidence["batches_observed"] == 20


def test_observations_survive_a_checkpoint_resume(tmp_path):
    model = DigitsClassifier(mlp(30, 64, init="xavier"))
    first = ArchitectureAdvisor(observe_steps=40)
    trainer = quiet_trainer(max_steps=20, callbacks=[first])
    trainer.fit(model, digits_loader())
    assert first.report.by_code("arch.residual")[0].evidence["batches_observed"] == 20  # partial advice at train end
    assert "Partial window" in first.report.notes[0]
    checkpoint = tmp_path / "advisor.ckpt"
    trainer.save_checkpoint(checkpoint)

    resumed = ArchitectureAdvisor(observe_steps=40)
    quiet_trainer(max_steps=40, callbacks=[resumed]).fit(model, digits_loader(), ckpt_path=checkpoint)
    # the resumed window continues from the saved losses instead of starting over
    assert resumed.report.by_code("arch.residual")[0].evidence["batches_observed"] == 40
    assert resumed.report.notes == []
    assert resumed.state_dict() == {
        "version": 1,
        "reported": True,
        "losses": [],
        "group_names": {0: list(first._group_names[0])},
        "group_norms": {},
    }


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"observe_steps": 5}, ValueError, "`observe_steps` must be an int >= 10"),
        ({"stall_improvement": 1.5}, ValueError, "`stall_improvement` must be a float in"),
        ({"forward_fn": "f"}, TypeError, "`forward_fn` must be callable or None, got str"),
    ],
)
def test_constructor_validation(kwargs, error, message):
    with pytest.raises(error, match=message):
        ArchitectureAdvisor(**kwargs)


def test_a_real_explosion_guard_escalation_reaches_the_advice_with_the_guards_own_levels(tmp_path):
    from lightning_gradstab.guard.config import RUNGS
    from tests.scripts.guard_models import TinyRegression, regression_loader

    guard, advisor = ExplosionGuard(console_summary=False), ArchitectureAdvisor(observe_steps=30)
    model = TinyRegression(faults={12: "nan_loss", 20: "scale_grad"})  # a non-finite step, then a x1e4 spike
    quiet_trainer(max_steps=30, callbacks=[guard, advisor], default_root_dir=tmp_path).fit(model, regression_loader())
    logged = [e for e in guard.policies[0].events if e["anomaly"] is not None]
    assert [e["anomaly"] for e in logged] == ["nonfinite", "spike"]
    (exploding,) = advisor.report.by_code("signal.exploding")
    assert exploding.evidence == {
        "guard_events": 2,
        "max_level": RUNGS.index("skip"),  # the NaN step escalated the ladder to its skip rung
        "anomalies": ["nonfinite", "spike"],
        "first_step": logged[0]["step"],
    }
