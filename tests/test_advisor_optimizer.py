"""``ArchitectureAdvisor``'s optimizer advice in real tiny Lightning runs: named where it is right, silent elsewhere.

- ``optimizer.adaptive``: a readout stored 100x small and applied 100x large (an output multiplier) under plain SGD:
  its gradient-to-weight ratio is ~10^3 times the hidden layers', the largest rate it tolerates leaves the hidden
  layers where they started and the loss stalls; Adam trains the same model (so the advice is right), and is
  never advised against itself. A well-scaled net that trains under SGD gets nothing.
- ``optimizer.weight_decay``: a tanh MLP on labels half of which are noise, under SGD with momentum at a high rate
  and no decay: the weights grow ~5x and their gradients with them while the training loss rises; the same run
  with weight decay ends lower on both the training and a clean held-out loss (so the advice is right) and gets
  nothing; a lower rate whose loss improves gets nothing.
"""

from __future__ import annotations

from collections.abc import Callable

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradstab import ArchitectureAdvisor
from lightning_gradstab.diagnosis.optimizer_rules import GRAD_TO_WEIGHT_SPREAD
from lightning_gradstab.diagnosis.weight_decay_rules import WEIGHT_NORM_GROWTH
from tests.helpers.trainers import quiet_trainer

torch.set_num_threads(1)

OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


class MultipliedLinear(nn.Linear):
    """A Linear whose weight is stored ``multiplier`` times smaller and applied ``multiplier`` times larger."""

    def __init__(self, in_features: int, out_features: int, multiplier: float) -> None:
        super().__init__(in_features, out_features)
        self.multiplier = multiplier
        with torch.no_grad():
            self.weight /= multiplier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight * self.multiplier, self.bias)


class Task(pl.LightningModule):
    """``net`` trained by ``make_optimizer`` on a regression (``mse``) or classification loss; records the losses."""

    def __init__(self, net: nn.Module, make_optimizer: OptimizerFactory, loss: str) -> None:
        super().__init__()
        self.net, self.make_optimizer, self.loss_kind = net, make_optimizer, loss
        self.losses: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        output = self(x)
        return nn.functional.mse_loss(output, y) if self.loss_kind == "mse" else nn.functional.cross_entropy(output, y)

    def training_step(self, batch, batch_idx):
        loss = self.loss(*batch)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.make_optimizer(list(self.parameters()))


def _regression() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(256, 16, generator=generator)
    y = torch.tanh(x @ torch.randn(16, 1, generator=generator))
    return DataLoader(TensorDataset(x, y), batch_size=256)  # one full batch per step


def _readout_net(multiplier: float, width: int = 2) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(16, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), MultipliedLinear(width, 1, multiplier)
    )


def _noisy_labels() -> tuple[DataLoader, tuple[torch.Tensor, torch.Tensor]]:
    """4 classes from a random teacher; half of the training labels replaced by random ones; a clean held-out set."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(512, 16, generator=generator)
    teacher = torch.randn(16, 4, generator=generator)
    y = torch.tanh(x @ teacher).argmax(1)
    noise = torch.rand(512, generator=generator) < 0.5
    y = torch.where(noise, torch.randint(0, 4, (512,), generator=generator), y)
    held_out = torch.randn(512, 16, generator=generator)
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    return loader, (held_out, torch.tanh(held_out @ teacher).argmax(1))


def _tanh_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 4))


def _fit(task: Task, loader: DataLoader, steps: int, tmp_path) -> ArchitectureAdvisor:
    advisor = ArchitectureAdvisor(observe_steps=steps, watch_logits=False)
    quiet_trainer(max_steps=steps, callbacks=[advisor], default_root_dir=tmp_path).fit(task, loader)
    assert advisor.report is not None
    return advisor


def test_sgd_held_back_by_a_multiplied_readout_is_advised_an_adaptive_optimizer_naming_the_layers(tmp_path):
    task = Task(_readout_net(100.0), lambda p: torch.optim.SGD(p, lr=1e-4), "mse")
    advisor = _fit(task, _regression(), 40, tmp_path)
    (finding,) = advisor.report.by_code("optimizer.adaptive")
    assert finding.severity == "warning"
    assert finding.modules[0] == "net.4" and finding.modules[1] in ("net.0", "net.2")
    assert finding.evidence["grad_to_weight_spread"] >= GRAD_TO_WEIGHT_SPREAD
    assert finding.evidence["relative_improvement"] < 0.1 and finding.evidence["optimizer"] == "SGD"
    for named in ("net.4.weight", "Adam", "RMSProp", "LARS", "You et al. 2017", "Kingma & Ba 2015"):
        assert named in finding.recommendation
    assert not advisor.report.by_code("optimizer.weight_decay")


def test_adam_on_the_same_model_trains_it_so_the_advice_is_right_and_is_never_advised_against_itself(tmp_path):
    sgd = Task(_readout_net(100.0), lambda p: torch.optim.SGD(p, lr=1e-4), "mse")
    _fit(sgd, _regression(), 40, tmp_path)
    adam = Task(_readout_net(100.0), lambda p: torch.optim.Adam(p, lr=1e-2), "mse")
    advisor = _fit(adam, _regression(), 40, tmp_path)
    assert adam.losses[-1] < 0.25 * sgd.losses[-1]
    assert not advisor.report.by_code("optimizer.adaptive") and not advisor.report.by_code("optimizer.weight_decay")


def test_a_well_scaled_net_that_trains_under_sgd_gets_no_optimizer_advice(tmp_path):
    task = Task(_readout_net(1.0, width=8), lambda p: torch.optim.SGD(p, lr=0.1), "mse")
    advisor = _fit(task, _regression(), 40, tmp_path)
    assert task.losses[-1] < 0.5 * task.losses[0]
    assert not advisor.report.by_code("optimizer.adaptive") and not advisor.report.by_code("optimizer.weight_decay")


def _held_out_loss(task: Task, held_out: tuple[torch.Tensor, torch.Tensor]) -> float:
    with torch.no_grad():
        return task.loss(*held_out).item()


def test_weights_growing_with_their_gradients_while_the_loss_rises_without_decay_get_weight_decay_advice(tmp_path):
    loader, held_out = _noisy_labels()
    undecayed = Task(_tanh_net(), lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.9), "ce")
    advisor = _fit(undecayed, loader, 100, tmp_path)
    (finding,) = advisor.report.by_code("optimizer.weight_decay")
    assert finding.severity == "warning" and "net.2" in finding.modules
    assert finding.evidence["weight_norm_growth"] >= WEIGHT_NORM_GROWTH and finding.evidence["grad_norm_growth"] >= 1
    assert finding.evidence["relative_improvement"] < 0.1
    for named in ("weight_decay", "AdamW", "Loshchilov & Hutter 2019", "van Laarhoven 2017", "Zhang et al. 2019"):
        assert named in finding.recommendation
    assert not advisor.report.by_code("optimizer.adaptive")
    # the advice is right: the same run with weight decay ends lower on the training and on a clean held-out loss,
    # and gets no weight-decay advice (its weights stay bounded)
    loader, _ = _noisy_labels()
    decayed = Task(_tanh_net(), lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.9, weight_decay=0.05), "ce")
    decayed_advisor = _fit(decayed, loader, 100, tmp_path)
    assert decayed_advisor.report.by_code("optimizer.weight_decay") == []
    last = slice(-10, None)
    assert sum(decayed.losses[last]) < sum(undecayed.losses[last])
    assert _held_out_loss(decayed, held_out) < 0.75 * _held_out_loss(undecayed, held_out)


def test_decay_on_the_biases_only_does_not_silence_the_advice_on_the_undecayed_matrices(tmp_path):
    def biases_decayed(parameters: list[nn.Parameter]) -> torch.optim.Optimizer:
        matrices = [p for p in parameters if p.dim() >= 2]
        others = [p for p in parameters if p.dim() < 2]
        groups = [{"params": matrices, "weight_decay": 0.0}, {"params": others, "weight_decay": 0.05}]
        return torch.optim.SGD(groups, lr=0.5, momentum=0.9)

    loader, _ = _noisy_labels()
    advisor = _fit(Task(_tanh_net(), biases_decayed, "ce"), loader, 100, tmp_path)
    assert advisor.report.by_code("optimizer.weight_decay")


def test_weights_that_grow_while_the_loss_improves_get_no_weight_decay_advice(tmp_path):
    loader, _ = _noisy_labels()
    task = Task(_tanh_net(), lambda p: torch.optim.Adam(p, lr=0.05), "ce")
    advisor = _fit(task, loader, 100, tmp_path)
    assert sum(task.losses[-10:]) < 0.8 * sum(task.losses[:10])  # it trains
    assert not advisor.report.by_code("optimizer.weight_decay") and not advisor.report.by_code("optimizer.adaptive")


def test_the_optimizer_samples_survive_a_checkpoint_resume(tmp_path):
    loader, _ = _noisy_labels()
    make = lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.9)  # noqa: E731
    task = Task(_tanh_net(), make, "ce")
    first = ArchitectureAdvisor(observe_steps=100, watch_logits=False)
    trainer = quiet_trainer(max_steps=50, callbacks=[first], default_root_dir=tmp_path)
    trainer.fit(task, loader)
    assert len(first.state_dict()["matrix_norms"][0]) == 10  # steps 0, 5, ..., 45
    checkpoint = tmp_path / "advisor.ckpt"
    trainer.save_checkpoint(checkpoint)
    resumed = ArchitectureAdvisor(observe_steps=100, watch_logits=False)
    quiet_trainer(max_steps=100, callbacks=[resumed], default_root_dir=tmp_path).fit(task, loader, ckpt_path=checkpoint)
    (finding,) = resumed.report.by_code("optimizer.weight_decay")
    assert finding.evidence["weight_samples"] == 20
    assert "matrix_norms" not in resumed.state_dict()  # a reported window keeps no samples


def test_the_optimizer_advice_can_be_turned_off_and_its_cadence_is_validated(tmp_path):
    loader, _ = _noisy_labels()
    task = Task(_tanh_net(), lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.9), "ce")
    advisor = ArchitectureAdvisor(observe_steps=100, watch_logits=False, advise_optimizer=False)
    quiet_trainer(max_steps=100, callbacks=[advisor], default_root_dir=tmp_path).fit(task, loader)
    assert not advisor.report.by_code("optimizer.weight_decay")
    with pytest.raises(ValueError, match="`optimizer_every_n_steps` must be an int >= 1, got 0"):
        ArchitectureAdvisor(optimizer_every_n_steps=0)
    with pytest.raises(TypeError, match="`advise_optimizer` must be a bool, got 'yes'"):
        ArchitectureAdvisor(advise_optimizer="yes")


def test_a_deep_plain_stack_whose_gradients_vanish_gets_the_model_fix_not_an_adaptive_optimizer(tmp_path):
    from tests.helpers.models import DigitsClassifier, digits_loader, mlp

    torch.manual_seed(0)
    advisor = ArchitectureAdvisor(observe_steps=60)
    model = DigitsClassifier(mlp(30, 64, init="xavier"))  # SGD with momentum; its ratios span ~200x
    quiet_trainer(max_steps=60, callbacks=[advisor], default_root_dir=tmp_path).fit(model, digits_loader())
    assert advisor.report.by_code("signal.vanishing") and advisor.report.by_code("arch.residual")
    assert not advisor.report.by_code("optimizer.adaptive")
