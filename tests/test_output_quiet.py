"""One switch for "log, don't print": ``set_verbosity("quiet")`` (or ``GRADSTAB_VERBOSITY=quiet``, or
``gradstab audit --quiet``) silences all four callbacks and the CLI, while every file and logged value stays."""

from __future__ import annotations

import json

import pytest
from lightning.pytorch.loggers import CSVLogger

from lightning_gradstab import (
    ArchitectureAdvisor,
    ExplosionGuard,
    GradNormMonitor,
    InitAudit,
    console,
    get_verbosity,
    set_verbosity,
)
from lightning_gradstab.cli import main
from tests.helpers.models import DigitsClassifier, digits_loader, mlp
from tests.helpers.trainers import quiet_trainer

SUITE_WORDS = ("Gradient stability", "ExplosionGuard summary", "init.scale", "JSON report written")


@pytest.fixture(autouse=True)
def default_verbosity(monkeypatch):
    monkeypatch.delenv("GRADSTAB_VERBOSITY", raising=False)
    monkeypatch.setattr(console, "_verbosity", None)


def _fit_whole_suite(tmp_path, guard: ExplosionGuard | None = None) -> CSVLogger:
    logger = CSVLogger(tmp_path)
    callbacks = [GradNormMonitor(), guard or ExplosionGuard(), InitAudit(), ArchitectureAdvisor(observe_steps=10)]
    trainer = quiet_trainer(max_steps=12, callbacks=callbacks, logger=logger, default_root_dir=tmp_path)
    trainer.fit(DigitsClassifier(mlp(30, 32)), digits_loader(size=384))
    return logger


def test_quiet_prints_nothing_from_any_callback_but_writes_every_file_and_log(tmp_path, capsys):
    set_verbosity("quiet")
    logger = _fit_whole_suite(tmp_path)
    printed = capsys.readouterr()
    for word in SUITE_WORDS:
        assert word not in printed.out and word not in printed.err
    log_dir = tmp_path / "lightning_logs" / "version_0"
    audit = json.loads((log_dir / "gradstab_init_audit.json").read_text())
    assert "init.scale" in {finding["code"] for finding in audit["findings"]}  # it diagnosed, and said nothing
    assert (log_dir / "gradstab_advisor.json").exists() and (log_dir / "gradstab_guard_summary.json").exists()
    assert "gradstab/grad_norm/total" in (log_dir / "metrics.csv").read_text().splitlines()[0]
    assert logger.log_dir == str(log_dir)


def test_console_summary_false_silences_the_guard_at_the_end_of_fit(tmp_path, capsys):
    trainer = quiet_trainer(max_steps=6, callbacks=[ExplosionGuard(console_summary=False)], default_root_dir=tmp_path)
    trainer.fit(DigitsClassifier(mlp(3, 16)), digits_loader(size=96))
    out = capsys.readouterr().out
    assert "ExplosionGuard summary" not in out and "what this fit found" not in out
    assert (tmp_path / "gradstab_guard_summary.json").exists()  # the record is still written


def test_cli_quiet_prints_nothing_writes_the_json_and_keeps_the_exit_status(tmp_path, capsys, monkeypatch):
    (tmp_path / "user_models.py").write_text(
        "import torch\nfrom torch import nn\n\n"
        "def xavier_mlp():\n"
        "    torch.manual_seed(0)  # the same model for both runs\n"
        "    layers = []\n"
        "    for _ in range(30):\n"
        "        linear = nn.Linear(64, 64)\n"
        "        nn.init.xavier_normal_(linear.weight)\n"
        "        layers += [linear, nn.ReLU()]\n"
        "    return nn.Sequential(*layers, nn.Linear(64, 10))\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    loud = main(["audit", "user_models:xavier_mlp", "--input-shape", "32,64", "--json", "loud.json"])
    assert "JSON report written to loud.json" in capsys.readouterr().out
    status = main(["audit", "user_models:xavier_mlp", "--input-shape", "32,64", "--quiet"])
    printed = capsys.readouterr()
    assert status == loud and printed.out == "" and printed.err == ""
    codes = [f["code"] for f in json.loads((tmp_path / "gradstab_audit.json").read_text())["findings"]]
    assert codes and codes == [f["code"] for f in json.loads((tmp_path / "loud.json").read_text())["findings"]]
    assert get_verbosity() == "normal"  # --quiet does not leak into the rest of the process


def test_the_environment_variable_is_the_same_switch(monkeypatch):
    monkeypatch.setenv("GRADSTAB_VERBOSITY", "quiet")
    assert get_verbosity() == "quiet"
    monkeypatch.setenv("GRADSTAB_VERBOSITY", "loud")
    with pytest.raises(ValueError, match="GRADSTAB_VERBOSITY must be 'normal' or 'quiet', got 'loud'"):
        get_verbosity()


def test_an_unknown_level_is_refused_naming_the_argument():
    with pytest.raises(ValueError, match="`level` must be 'normal' or 'quiet', got 'silent'"):
        set_verbosity("silent")  # type: ignore[arg-type]
