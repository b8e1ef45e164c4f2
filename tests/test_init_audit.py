"""``InitAudit``: the audit on the first batch, its publications, ``fix=True`` and resuming."""

from __future__ import annotations

import json

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from lightning_gradstab import InitAudit, diagnose
from tests.helpers.models import (
    DigitsClassifier,
    digits_batch,
    digits_loader,
    mlp,
    training_error,
)
from tests.helpers.trainers import quiet_trainer

torch.set_num_threads(1)


def _markdown_events(log_dir: str) -> list[str]:
    events = EventAccumulator(log_dir, size_guidance={"tensors": 0})
    events.Reload()
    tag = "gradstab/findings/text_summary"
    assert tag in events.Tags()["tensors"]
    return [event.tensor_proto.string_val[0].decode() for event in events.Tensors(tag)]


def test_audit_reports_on_the_first_batch_to_console_tensorboard_and_json(tmp_path, capsys):
    model = DigitsClassifier(mlp(30, 64, init="xavier"))
    logger = TensorBoardLogger(tmp_path, name="run")
    audit = InitAudit()
    quiet_trainer(max_steps=2, logger=logger, callbacks=[audit]).fit(model, digits_loader(size=256))

    assert audit.report.source == "InitAudit" and audit.report.model == "DigitsClassifier"
    (scale,) = audit.report.by_code("init.scale")
    assert scale.modules[0] == "net.0"  # names relative to the LightningModule
    document = json.loads((tmp_path / "run" / "version_0" / "gradstab_init_audit.json").read_text())
    assert {f["code"] for f in document["findings"]} == audit.report.codes
    (markdown,) = _markdown_events(logger.log_dir)
    assert "`init.scale`" in markdown and "`signal.vanishing`" in markdown
    assert "init.scale" in capsys.readouterr().out  # the rich table


def test_audit_uses_the_training_loss_and_does_not_log_or_change_anything(memory_logger):
    torch.manual_seed(0)
    model = DigitsClassifier(mlp(4, 32, init="he"), lr=0.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    audit = InitAudit()
    quiet_trainer(max_steps=1, logger=memory_logger, log_every_n_steps=1, callbacks=[audit]).fit(
        model, digits_loader(size=64)
    )
    assert all(row["grad_rms"] is not None for row in audit.report.layers)
    assert audit.fixed_modules == []
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # lr 0 and no fix
    assert len(memory_logger.metrics["train_loss"]) == 1  # the probe's training_step did not log


def test_fix_reinitialises_flagged_layers_with_he_identically_for_a_given_seed():
    weights = []
    for seed in (0, 0, 1):
        model = DigitsClassifier(mlp(30, 64, init="xavier"), lr=0.0)
        audit = InitAudit(fix=True, seed=seed)
        quiet_trainer(max_steps=1, callbacks=[audit]).fit(model, digits_loader(size=64))
        weights.append(model.net[0].weight.detach().clone())
        assert len(audit.fixed_modules) == 29 and "net.58" not in audit.fixed_modules
        assert "He/Kaiming" in audit.report.notes[0]
        stds = [model.net[i].weight.std().item() for i in range(2, 58, 2)]
        assert sum(stds) / len(stds) == pytest.approx((2 / 64) ** 0.5, rel=0.05)
        assert "init.scale" not in diagnose(model.net, digits_batch()).codes
    assert torch.equal(weights[0], weights[1])  # the same seed gives the same weights (every rank)
    assert not torch.equal(weights[0], weights[2])


def test_resumed_run_is_not_audited_or_reinitialised_again(tmp_path):
    model = DigitsClassifier(mlp(30, 64, init="xavier"), lr=0.0)
    trainer = quiet_trainer(max_steps=1, callbacks=[InitAudit(fix=True)])
    trainer.fit(model, digits_loader(size=64))
    checkpoint = tmp_path / "audit.ckpt"
    trainer.save_checkpoint(checkpoint)

    resumed_model = DigitsClassifier(mlp(30, 64, init="xavier", seed=1), lr=0.0)
    resumed_audit = InitAudit(fix=True, seed=7)
    quiet_trainer(max_steps=2, callbacks=[resumed_audit]).fit(
        resumed_model, digits_loader(size=64), ckpt_path=checkpoint
    )
    assert resumed_audit.report is None  # not audited again
    assert len(resumed_audit.fixed_modules) == 29  # but it remembers what the first run fixed
    assert torch.equal(resumed_model.net[0].weight, model.net[0].weight)  # weights from the checkpoint


def test_state_dict_round_trip():
    audit = InitAudit()
    audit.load_state_dict({"version": 1, "audited": True, "fixed_modules": ["net.0"]})
    assert audit.state_dict() == {"version": 1, "audited": True, "fixed_modules": ["net.0"]}


class _ManualModule(DigitsClassifier):
    def __init__(self) -> None:
        super().__init__(mlp(4, 16))
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        loss = nn.functional.cross_entropy(self(batch[0]), batch[1])
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()


def test_manual_optimization_needs_forward_fn_and_says_so():
    audit = InitAudit()
    quiet_trainer(max_steps=1, callbacks=[audit]).fit(_ManualModule(), digits_loader(size=64))
    (incomplete,) = audit.report.findings
    assert incomplete.code == "trace.incomplete" and "forward_fn" in incomplete.evidence["problem"]

    audit = InitAudit(forward_fn=lambda module, batch: module(batch[0]))
    quiet_trainer(max_steps=1, callbacks=[audit]).fit(_ManualModule(), digits_loader(size=64))
    assert len(audit.report.layers) == 4


def test_a_failing_probe_warns_and_training_continues():
    def broken(module, batch):
        raise RuntimeError("boom")

    audit = InitAudit(forward_fn=broken)
    model = DigitsClassifier(mlp(4, 16))
    trainer = quiet_trainer(max_steps=2, callbacks=[audit])
    with pytest.warns(UserWarning, match="could not probe"):
        trainer.fit(model, digits_loader(size=64))
    assert trainer.global_step == 2 and audit.report.codes == {"trace.incomplete"}


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"fix": "yes"}, TypeError, "`fix` must be a bool, got 'yes'"),
        ({"seed": -1}, ValueError, "`seed` must be an int >= 0, got -1"),
        ({"forward_fn": 3}, TypeError, "`forward_fn` must be callable or None, got int"),
    ],
)
def test_constructor_validation(kwargs, error, message):
    with pytest.raises(error, match=message):
        InitAudit(**kwargs)


@pytest.mark.slow
def test_he2015_xavier_30_layer_relu_stays_at_chance_and_fix_trains_below_10_percent_error():
    """He et al. 2015 Fig. 3 on digits: SGD momentum 0.9, lr 0.003, 20 epochs."""
    errors = {}
    for fix in (False, True):
        torch.manual_seed(0)
        model = DigitsClassifier(mlp(30, 64, init="xavier"))
        quiet_trainer(max_epochs=20, callbacks=[InitAudit(fix=fix)]).fit(model, digits_loader())
        errors[fix] = training_error(model)
    assert errors[False] > 0.8  # chance is 0.9: the unfixed net does not learn
    assert errors[True] < 0.10


@pytest.mark.ddp
def test_fix_gives_identical_weights_on_every_rank_under_ddp(tmp_path, ddp_runner):
    rank0, rank1 = ddp_runner("init_audit_ddp.py", tmp_path, timeout=240)
    assert len(rank0["fixed"]) == 29 and rank0["fixed"] == rank1["fixed"]
    assert rank0["checksums_after_audit"] == rank1["checksums_after_audit"]  # bit-identical re-initialisation
    assert rank0["final"] == rank1["final"]  # and DDP training continued in lockstep after the probe
    assert "arch.residual" not in rank0["advisor_codes"]  # He-fixed net trains: no stall
    assert (tmp_path / "gradstab_init_audit.json").exists()  # written once, by rank 0


class _UnloggedClassifier(DigitsClassifier):
    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])


def test_compiled_module_is_probed_eagerly_and_fixed():
    class ForwardAfterAudit(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.compiled = pl_module.forward is not pl_module._compiler_ctx["original_forward"]

    model = _UnloggedClassifier(mlp(30, 64, init="xavier"), lr=0.0)
    audit, recorder = InitAudit(fix=True), ForwardAfterAudit()
    trainer = quiet_trainer(max_steps=2, callbacks=[audit, recorder])
    trainer.fit(torch.compile(model, backend="eager"), digits_loader(size=64))
    assert len(audit.report.layers) == 30  # hooks fired: the eager forward was probed
    assert len(audit.fixed_modules) == 29
    assert model.net[0].weight.std().item() == pytest.approx((2 / 64) ** 0.5, rel=0.1)
    assert recorder.compiled  # the compiled forward is back in place for the training step


def test_fix_redraws_a_zero_initialised_hidden_layer():
    net = mlp(4, 32, init="he")
    nn.init.zeros_(net[2].weight)
    audit = InitAudit(fix=True)
    quiet_trainer(max_steps=1, callbacks=[audit]).fit(DigitsClassifier(net, lr=0.0), digits_loader(size=64))
    assert audit.fixed_modules == ["net.2"]  # names relative to the LightningModule
    assert net[2].weight.std().item() == pytest.approx((2 / 32) ** 0.5, rel=0.15)  # He before its ReLU
    assert "init.symmetric" not in diagnose(net, digits_batch()).codes


class _DictBatchClassifier(DigitsClassifier):
    """Batches are dicts; ``keywords`` picks ``net(**batch)`` (Hugging Face style) over ``net(batch)``."""

    def __init__(self, keywords: bool) -> None:
        super().__init__(mlp(30, 64, init="xavier"), lr=0.0)
        self.keywords = keywords

    def training_step(self, batch, batch_idx):
        logits = self.net(batch["features"]) if not self.keywords else self._keywords(**batch)
        return nn.functional.cross_entropy(logits, batch["labels"])

    def _keywords(self, features, labels):
        return self.net(features)


def _dict_loader():
    x, y = digits_batch(64), torch.arange(64) % 10
    return torch.utils.data.DataLoader([{"features": f, "labels": t} for f, t in zip(x, y, strict=True)], batch_size=32)


@pytest.mark.parametrize("keywords", [False, True], ids=["forward(batch)", "forward(**batch)"])
def test_dict_batches_are_audited_and_fixed(keywords):
    audit = InitAudit(fix=True)
    quiet_trainer(max_steps=1, callbacks=[audit]).fit(_DictBatchClassifier(keywords), _dict_loader())
    assert "init.scale" in audit.report.codes and len(audit.fixed_modules) == 29


def test_forward_fn_gets_the_dict_batch():
    audit = InitAudit(forward_fn=lambda module, batch: module.net(batch["features"]))
    quiet_trainer(max_steps=1, callbacks=[audit]).fit(_DictBatchClassifier(False), _dict_loader())
    assert len(audit.report.layers) == 30
