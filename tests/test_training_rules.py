"""The advisor's training-time rules as pure functions: losses, per-layer norms and guard events in, findings out."""

from __future__ import annotations

import pytest
import torch

from lightning_gradstab.diagnosis import trace
from lightning_gradstab.diagnosis.training_rules import (
    EXPLOSIVE_SPIKE_RATIO,
    gradient_findings,
    guard_findings,
    loss_findings,
    loss_stall,
    means_explosion,
)
from lightning_gradstab.guard.config import RUNGS
from lightning_gradstab.guard.detect import Observation
from lightning_gradstab.guard.ladder import ExplosionPolicy
from lightning_gradstab.guard_events import GuardEvent, GuardEventSource, collect_guard_events
from tests.helpers.models import mlp, vanilla_rnn


def _graph(model: torch.nn.Module, inputs: torch.Tensor):
    with torch.no_grad():
        return trace(model, model, inputs=inputs)[0]


def _event(step=3, level=1, previous_level=1, anomaly=None, **extra) -> GuardEvent:
    return GuardEvent(step=step, level=level, previous_level=previous_level, anomaly=anomaly, **extra)


def _losses(first: float, last: float, n: int = 20) -> list[float]:
    return [first] * (n // 2) + [last] * (n - n // 2)


def test_loss_stall_compares_the_means_of_the_first_and_last_tenth():
    # 30 losses: the first tenth is 3 losses (mean 2), the last tenth 3 losses (mean 1.5)
    losses = [1.0, 2.0, 3.0] + [9.0] * 24 + [1.0, 1.5, 2.0]
    evidence = loss_stall(losses, stall_improvement=0.3)
    assert evidence == {
        "loss_first": 2.0,
        "loss_last": 1.5,
        "relative_improvement": 0.25,
        "stall_threshold": 0.3,
        "batches_observed": 30,
    }


def test_an_improvement_at_the_threshold_is_not_a_stall_and_just_below_it_is():
    assert loss_stall(_losses(4.0, 3.5), stall_improvement=0.125) is None  # exactly 12.5 % better
    assert loss_stall(_losses(4.0, 3.51), stall_improvement=0.125)["relative_improvement"] == pytest.approx(0.1225)
    assert loss_stall(_losses(2.0, 2.5), stall_improvement=0.1)["relative_improvement"] == pytest.approx(-0.25)


def test_a_rising_negative_loss_is_a_stall_measured_relative_to_its_magnitude():
    assert loss_stall(_losses(-2.0, -1.0), 0.1)["relative_improvement"] == pytest.approx(-0.5)
    assert loss_stall(_losses(-1.0, -2.0), 0.1) is None


def test_a_diverged_loss_is_no_improvement_and_fewer_than_ten_losses_are_no_trend():
    assert loss_stall(_losses(2.0, float("nan")), 0.1)["relative_improvement"] == 0.0
    assert loss_stall([2.0] * 9, 0.1) is None


def test_arch_residual_starts_at_a_plain_depth_of_twenty_when_the_loss_stalls():
    stalled = _losses(2.3, 2.3)
    deep, shallow = _graph(mlp(20, 8), torch.randn(4, 64)), _graph(mlp(19, 8), torch.randn(4, 64))
    (residual,) = loss_findings(deep, stalled, 0.1)
    assert residual.severity == "error" and residual.evidence["plain_depth"] == 20
    assert residual.evidence["depth_threshold"] == 20 and residual.evidence["batches_observed"] == 20
    assert loss_findings(shallow, stalled, 0.1) == []
    assert loss_findings(deep, _losses(2.3, 1.0), 0.1) == []  # it trains: no advice
    assert loss_findings(None, stalled, 0.1) == []  # no graph, no architecture to name


def test_gradient_ratio_of_first_over_last_layer_decides_vanishing_and_exploding_by_a_factor_100():
    def codes(first: float, last: float) -> list[tuple[str, str]]:
        norms = {"a": first, "b": 1.0, "c": last}
        return [(f.code, f.severity) for f in gradient_findings(None, norms, optimizer_steps=5)]

    assert codes(1e-2, 1.0) == [] and codes(1e2, 1.0) == []  # the band's edges are healthy
    assert codes(0.99e-2, 1.0) == [("signal.vanishing", "warning")]
    assert codes(1.01e2, 1.0) == [("signal.exploding", "warning")]
    assert codes(1e-5, 1.0) == [("signal.vanishing", "error")]  # past 10^4
    assert codes(1.0, 1e-5) == [("signal.exploding", "error")]


def test_gradient_finding_reports_the_ratio_layers_and_steps_and_skips_unmeasured_layers():
    norms = {"in": 1e-4, "dead": 0.0, "mid": 1e-2, "out": 1.0}
    (finding,) = gradient_findings(None, norms, optimizer_steps=7)
    assert finding.modules == ("in", "out")
    assert finding.evidence == {
        "weight_grad_first_over_last_median": pytest.approx(1e-4),
        "layers": 3,
        "optimizer_steps_observed": 7,
    }
    assert gradient_findings(None, {"in": 1e-4, "out": 1.0}, optimizer_steps=7) == []  # two layers: no trend
    assert gradient_findings(None, {"in": float("nan"), "mid": 1.0, "out": 1.0}, optimizer_steps=7) == []


def test_gradient_findings_follow_the_graph_order_not_the_measured_order():
    graph = _graph(mlp(5, 8), torch.randn(4, 64))
    norms = {"8": 1.0, "4": 1e-2, "0": 1e-5, "6": 1e-1, "2": 1e-3}  # measured order: last layer first
    (signal, *causes) = gradient_findings(graph, norms, optimizer_steps=3)
    assert signal.code == "signal.vanishing" and signal.modules == ("0", "6")  # "8" is the output: no reference
    assert "arch.normalization" in {f.code for f in causes}


def test_gradient_findings_compare_per_element_and_never_against_the_output_layer():
    graph = _graph(mlp(5, 8), torch.randn(4, 64))  # 64 -> 8 -> 8 -> 8 -> 8 -> 10
    sizes = {"0": 64 * 8 + 8, "2": 8 * 8 + 8, "4": 8 * 8 + 8, "6": 8 * 8 + 8, "8": 8 * 10 + 10}
    # per element the hidden layers agree (the first one's norm is larger because it has 7x the weights), and
    # the head's 1e4x larger gradient is no reference: no finding
    norms = {"0": 8.0, "2": 3.0, "4": 3.0, "6": 3.0, "8": 3e4}
    assert gradient_findings(graph, norms, optimizer_steps=3, sizes=sizes) == []
    # a real 1e-3 per-element drop from the last hidden layer to the first is found, naming those two
    (signal, *_) = gradient_findings(graph, {**norms, "0": 8e-3}, optimizer_steps=3, sizes=sizes)
    assert signal.code == "signal.vanishing" and signal.modules == ("0", "6")


@pytest.mark.parametrize(
    ("event", "explosion"),
    [
        (_event(level=1, previous_level=1, anomaly="spike", total_norm=1.3, clip_threshold=1.1), False),
        (_event(level=1, previous_level=0, anomaly=None), False),  # observe -> clip: the resting rung
        (_event(level=2, previous_level=1, anomaly=None), True),  # past the resting rung
        (_event(level=2, previous_level=2, anomaly=None), False),  # staying escalated is no new evidence
        (_event(level=1, previous_level=2, anomaly=None), False),  # a de-escalation
        (_event(anomaly="spike", total_norm=EXPLOSIVE_SPIKE_RATIO, clip_threshold=1.0), True),
        (_event(anomaly="spike", total_norm=0.99 * EXPLOSIVE_SPIKE_RATIO, clip_threshold=1.0), False),
        (_event(anomaly="spike", total_norm=None, clip_threshold=1.0), True),  # a non-finite norm
        (_event(anomaly="nonfinite"), True),
        (_event(anomaly="growth"), True),
    ],
)
def test_means_explosion_separates_routine_clipping_from_explosions(event, explosion):
    assert RUNGS.index("clip") == 1
    assert means_explosion(event) is explosion


def test_guard_findings_count_explosions_within_the_window_only():
    events = [
        _event(step=5, level=2, previous_level=1, anomaly="spike", total_norm=1e3, clip_threshold=1.0),
        _event(step=8, level=3, previous_level=2, anomaly="nonfinite"),
        _event(step=9, level=1, previous_level=1, anomaly="spike", total_norm=1.2, clip_threshold=1.0),  # routine
        _event(step=11, level=4, previous_level=3, anomaly="growth"),  # after the window
    ]
    (finding,) = guard_findings(None, events, observe_steps=10)
    assert finding.evidence == {"guard_events": 2, "max_level": 3, "anomalies": ["nonfinite", "spike"], "first_step": 5}
    assert guard_findings(None, events[2:], observe_steps=10) == []


def test_guard_findings_add_the_recurrent_check_of_the_graph():
    model = vanilla_rnn(1.5)
    graph = _graph(model, torch.randn(2, 20, model.rnn.input_size))
    explosion = [_event(level=2, previous_level=1, anomaly="spike")]
    codes = [f.code for f in guard_findings(graph, explosion, observe_steps=10)]
    assert codes == ["signal.exploding", "arch.recurrent"]
    assert guard_findings(graph, [], observe_steps=10) == []


def test_a_guard_event_without_a_contract_key_is_a_broken_contract():
    with pytest.raises(KeyError, match=r"lacks the keys \['anomaly'\]"):
        GuardEvent.from_mapping({"step": 1, "level": 1, "previous_level": 1, "kind": "spike"})


def test_the_real_policys_events_satisfy_the_guard_event_contract():
    policy = ExplosionPolicy()
    for step in range(30):
        policy.step(Observation(total_norm=1.0 + 0.01 * (step % 3), loss=1.0))
    policy.step(Observation(total_norm=float("nan"), nonfinite=True, loss=1.0))
    events = [GuardEvent.from_mapping(event) for event in policy.events]
    assert events and events[-1].anomaly == "nonfinite" and means_explosion(events[-1])


def test_the_policy_records_one_typed_event_whose_mapping_is_what_checkpoints_files_and_the_advisor_carry():
    policy = ExplosionPolicy()
    for step in range(30):
        policy.step(Observation(total_norm=1.0 + 0.01 * (step % 3), loss=1.0))
    policy.step(Observation(total_norm=1e6, loss=1.0))
    policy.step(Observation(total_norm=float("nan"), nonfinite=True, loss=1.0))
    records = policy.log.records
    assert [record.to_mapping() for record in records] == policy.events
    assert [GuardEvent.from_mapping(event) for event in policy.events] == records
    spike, nonfinite = records[-2:]
    assert spike.anomaly == "spike" and spike.actions == ("clip",) and spike.total_norm == 1e6
    assert nonfinite.total_norm is None and "skip" in nonfinite.actions and nonfinite.rung == "skip"
    assert list(policy.events[-1]) == [  # the key order of the JSONL file and of 0.1's checkpoints
        "step", "total_norm", "zscore", "loss", "loss_zscore", "clip_threshold", "level", "previous_level", "rung",
        "anomaly", "evidence", "actions", "lr_scale", "rollback_check",
    ]


def test_collect_guard_events_reads_every_source_and_ignores_other_callbacks():
    class Source:
        def guard_events(self):
            return [{"step": 2, "level": 2, "previous_level": 1, "anomaly": "spike", "optimizer": 1}]

    assert isinstance(Source(), GuardEventSource) and not isinstance(object(), GuardEventSource)
    assert collect_guard_events([object(), Source()]) == [
        GuardEvent(step=2, level=2, previous_level=1, anomaly="spike", optimizer=1)
    ]
