"""The fourth held-out healthy set: recipes that write the weights mid-run, each with a named metric; every task
builds and trains unguarded and guarded; each recipe's write does what its paper says (``--suite holdout4``)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from benchmarks import divergence
from benchmarks import healthy_holdout4 as holdout4
from benchmarks.healthy_holdout import HOLDOUT_TASKS
from benchmarks.healthy_holdout2 import HOLDOUT2_TASKS
from benchmarks.healthy_holdout3 import HOLDOUT3_TASKS
from benchmarks.healthy_holdout4 import (
    FINAL_SPARSITY,
    HOLDOUT4_TASKS,
    MAX_NORM,
    METRICS,
    PERTURB,
    PRUNE_PER_ROUND,
    SHRINK,
    _linears,
    _prune_to,
)
from benchmarks.healthy_tasks import HEALTHY_TASKS
from tests.helpers.trainers import quiet_trainer

STEPS = 8


def test_the_fourth_holdout_set_has_five_new_shapes_each_with_a_named_task_metric():
    assert len(HOLDOUT4_TASKS) == 5
    assert set(METRICS) == set(HOLDOUT4_TASKS)
    earlier = set(HEALTHY_TASKS) | set(HOLDOUT_TASKS) | set(HOLDOUT2_TASKS) | set(HOLDOUT3_TASKS)
    assert not set(HOLDOUT4_TASKS) & earlier
    assert all(task.kind == "healthy" for task in HOLDOUT4_TASKS.values())
    assert set(HOLDOUT4_TASKS) <= set(divergence.all_tasks())
    assert set(METRICS.items()) <= set(divergence.healthy_metrics().items())


@pytest.mark.parametrize("method", ["none", "guard"])
@pytest.mark.parametrize("name", list(HOLDOUT4_TASKS))
def test_task_builds_and_one_fit_runs_to_a_finite_metric(name, method):
    record = divergence.run_one(name, method, seed=0, steps=STEPS)
    assert record["status"] == "finished", record["error"]
    assert record["steps_done"] == STEPS
    assert math.isfinite(record["initial_loss"]) and math.isfinite(record["final_loss"])


def _fit(name: str, steps: int = STEPS):
    built = HOLDOUT4_TASKS[name].build(seed=0, steps=steps)
    torch.manual_seed(0)
    quiet_trainer(max_steps=built.max_steps, max_epochs=1).fit(built.module, built.train_loader())
    return built.module


def test_the_head_reset_reinitialises_the_last_layer_only():
    module = _fit("head_reset", steps=2)  # a quarter of 2 steps: the reset comes before step 1
    assert module._done == {1}
    built = HOLDOUT4_TASKS["head_reset"].build(seed=0, steps=2)
    layers = [(a, b) for a, b in zip(_linears(built.module.net), _linears(module.net), strict=True)]
    assert all(not torch.equal(a.weight, b.weight) for a, b in layers)  # trained (and the head reset)


def test_shrink_and_perturb_starts_a_round_from_shrunk_weights_plus_a_scaled_fresh_initialisation(monkeypatch):
    monkeypatch.setattr(holdout4, "_forget_optimizer_state", lambda *args: None)  # no trainer, no optimizer here
    built = HOLDOUT4_TASKS["shrink_perturb"].build(seed=0, steps=STEPS)
    module = built.module
    before = [p.detach().clone() for p in module.net.parameters()]
    fresh = torch.Generator().manual_seed(3000)
    with torch.no_grad():
        module.intervene(0)
    for weight, old, layer_param in zip(module.net.parameters(), before, _fresh_like(module.net, fresh), strict=True):
        torch.testing.assert_close(weight, SHRINK * old + PERTURB * layer_param)


def _fresh_like(net: nn.Module, generator: torch.Generator) -> list[torch.Tensor]:
    """The fresh draws the task makes: nn.Linear's default bounds, weight then bias, layer by layer."""
    draws = []
    for layer in _linears(net):
        bound = 1.0 / layer.in_features**0.5
        draws.append(torch.empty_like(layer.weight).uniform_(-bound, bound, generator=generator))
        draws.append(torch.empty_like(layer.bias).uniform_(-bound, bound, generator=generator))
    return draws


def test_the_data_grows_by_a_quarter_of_the_training_set_each_round():
    from benchmarks.divergence_tasks import _digits

    x_train = _digits()[0]
    built = HOLDOUT4_TASKS["shrink_perturb"].build(seed=0, steps=400)
    index = {tuple(row.tolist()): i for i, row in enumerate(x_train)}
    for round_, first in enumerate(range(0, 400, 100)):
        rows = [row for batch in built.train_batches[first : first + 100] for row in batch["x"]]
        seen = max(index[tuple(row.tolist())] for row in rows)
        assert len(x_train) * round_ // 4 <= seen < len(x_train) * (round_ + 1) // 4


def test_pruning_keeps_the_largest_weights_over_all_hidden_layers_and_never_revives_one():
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    hidden = _linears(net)[:-1]
    total = sum(layer.weight.numel() for layer in hidden)
    kept_before = None
    for round_ in range(1, 4):
        keep = (1 - PRUNE_PER_ROUND) ** round_
        _prune_to(net, keep)
        masks = [layer.weight_mask.bool() for layer in hidden]
        assert sum(int(m.sum()) for m in masks) == round(keep * total)
        if kept_before is not None:  # a pruned weight stays pruned
            assert all(not (m & ~b).any() for m, b in zip(masks, kept_before, strict=True))
        kept_values = torch.cat([layer.weight_orig.detach()[m] for layer, m in zip(hidden, masks, strict=True)])
        pruned_values = torch.cat(  # as the pruning saw them: what an earlier round pruned counts as zero
            [(layer.weight_orig * kept).detach()[~m] for layer, kept, m in zip(hidden, _previous(kept_before, hidden),
                                                                             masks, strict=True)]
        )
        assert float(pruned_values.abs().max()) <= float(kept_values.abs().min())
        kept_before = masks
    assert not hasattr(_linears(net)[-1], "weight_mask")  # the output layer is not pruned


def _previous(masks: list[torch.Tensor] | None, layers: list[nn.Linear]) -> list[torch.Tensor]:
    return [torch.ones_like(layer.weight_orig) for layer in layers] if masks is None else [m.float() for m in masks]


def test_iterative_pruning_rewinds_the_surviving_weights_to_their_early_values():
    module = _fit("imp_rewind", steps=40)  # rounds at 10, 20, 30; rewind point: step 1
    rewound = dict((id(p), early) for p, early in module.rewound)
    assert module._done == {10, 20, 30}
    hidden = _linears(module.net)[:-1]
    kept = sum(int(layer.weight_mask.sum()) for layer in hidden) / sum(layer.weight_mask.numel() for layer in hidden)
    assert kept == pytest.approx((1 - PRUNE_PER_ROUND) ** 3, abs=1e-3)
    assert all(id(layer.weight_orig) in rewound for layer in hidden)  # the optimizer's tensors were rewound in place


def test_gradual_pruning_follows_the_cubic_schedule_to_the_final_sparsity():
    module = _fit("gradual_prune", steps=40)
    hidden = _linears(module.net)[:-1]
    kept = sum(int(layer.weight_mask.sum()) for layer in hidden) / sum(layer.weight_mask.numel() for layer in hidden)
    assert kept == pytest.approx(1 - FINAL_SPARSITY, abs=1e-3)
    assert len(module.at) == 10 and module._done == set(module.at)


def test_the_max_norm_constraint_holds_after_every_step():
    module = _fit("maxnorm_dropout", steps=20)
    for layer in _linears(module.net)[:-1]:
        assert float(layer.weight.norm(dim=1).max()) <= MAX_NORM * (1 + 1e-5)
