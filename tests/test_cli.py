"""``gradstab audit``: a CI gate that prints the findings, writes JSON and exits non-zero on errors."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from lightning_gradstab.cli import EXIT_FINDINGS, EXIT_MODEL, EXIT_OK, EXIT_USAGE, build_parser, main
from tests.helpers.subprocess_env import child_env

FACTORIES = textwrap.dedent(
    """
    import torch
    from torch import nn

    def _mlp(init):
        layers = []
        for _ in range(29):
            layers += [nn.Linear(64, 64), nn.ReLU()]
        model = nn.Sequential(*layers, nn.Linear(64, 10))
        generator = torch.Generator().manual_seed(0)
        for layer in model:
            if isinstance(layer, nn.Linear):
                init(layer.weight, generator=generator)
        return model

    def xavier_mlp():
        return _mlp(nn.init.xavier_normal_)

    def healthy_mlp():
        layers = [nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)]
        return nn.Sequential(*layers)

    def lm():
        return nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 50))

    def not_a_model():
        return 42

    class DictNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))

        def forward(self, batch):
            return self.net(batch["features"])

    class KeywordNet(DictNet):
        def forward(self, features, labels=None):
            return self.net(features)

    def _batch():
        return {"features": torch.randn(16, 64), "labels": torch.zeros(16, dtype=torch.long)}

    def dict_model_and_batch():
        return DictNet(), _batch()

    def keyword_model_and_batch():
        return KeywordNet(), _batch()

    def xavier_mlp_and_batch():
        return xavier_mlp(), torch.randn(8, 64)

    def missing_weights():
        return torch.load("weights-that-are-not-there.pt")

    class KeyErrorNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(64, 10)

        def forward(self, x):
            return {"hidden": self.net(x)}["logits"]

    def key_error_model():
        return KeyErrorNet()
    """
)


@pytest.fixture
def factories(tmp_path, monkeypatch):
    (tmp_path / "user_models.py").write_text(FACTORIES)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("user_models", None)


def test_error_level_findings_exit_1_print_the_table_and_write_json(factories, capsys):
    status = main(["audit", "user_models:xavier_mlp", "--input-shape", "32,64", "--json", "out/audit.json"])
    assert status == EXIT_FINDINGS
    assert "init.scale" in capsys.readouterr().out
    document = json.loads((factories / "out" / "audit.json").read_text())
    assert document["model"] == "Sequential" and "signal.vanishing" in {f["code"] for f in document["findings"]}


def test_a_healthy_model_exits_0(factories):
    assert main(["audit", "user_models:healthy_mlp", "--input-shape", "16,64"]) == EXIT_OK
    assert json.loads((factories / "gradstab_audit.json").read_text())["source"] == "diagnose"


def test_vocab_size_feeds_token_ids(factories):
    assert main(["audit", "user_models:lm", "--input-shape", "4,12", "--vocab-size", "50"]) == EXIT_OK


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["audit", "user_models:not_a_model", "--input-shape", "2,64"], "returned int, expected a torch.nn.Module"),
        (["audit", "user_models", "--input-shape", "2,64"], "must look like 'package.module:factory'"),
        (["audit", "user_models:missing", "--input-shape", "2,64"], "missing"),
        (["audit", "user_models:healthy_mlp", "--input-shape", "100000,100000,1000"], "above"),  # 40 TB
        (["audit", "user_models:healthy_mlp", "--input-shape", "2,64", "--json", "."], "is not a file path"),
    ],
)
def test_usage_errors_exit_2_with_a_one_line_message(factories, capsys, argv, message):
    assert main(argv) == EXIT_USAGE
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["audit", "user_models:missing_weights"], "factory 'user_models:missing_weights' raised FileNotFoundError"),
        (["audit", "user_models:key_error_model", "--input-shape", "2,64"], "KeyError: 'logits'"),
        (["audit", "user_models:healthy_mlp", "--input-shape", "2,63"], "do not fit Sequential"),
    ],
)
def test_a_factory_or_forward_that_raises_exits_3_with_one_line_and_no_traceback(factories, capsys, argv, message):
    assert main(argv) == EXIT_MODEL  # not 1: a CI gate must tell "the model has errors" from "it did not run"
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (factories / "gradstab_audit.json").exists()


def test_debug_lets_the_error_raise_with_its_traceback(factories):
    with pytest.raises(FileNotFoundError):
        main(["audit", "user_models:missing_weights", "--debug"])


def test_the_exit_codes_are_documented_in_help() -> None:
    text = build_parser().format_help()
    assert all(f"{code} " in text for code in "0123") and "could not be probed" in text


def test_malformed_input_shape_is_rejected_by_the_parser(factories, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["audit", "user_models:healthy_mlp", "--input-shape", "a,b"])
    assert exit_info.value.code == EXIT_USAGE
    err = capsys.readouterr().err
    assert "--input-shape must be comma-separated positive ints" in err and len(err.strip().splitlines()) == 1


def test_console_script_entry_point_runs_as_a_process(factories):
    env = child_env(factories)
    completed = subprocess.run(
        [sys.executable, "-m", "lightning_gradstab.cli", "audit", "user_models:xavier_mlp", "--input-shape", "8,64"],
        cwd=factories,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == EXIT_FINDINGS, completed.stderr
    assert (factories / "gradstab_audit.json").exists()


@pytest.mark.parametrize("factory", ["dict_model_and_batch", "keyword_model_and_batch"])
def test_a_factory_returning_model_and_dict_batch_is_audited_on_that_batch(factories, factory):
    assert main(["audit", f"user_models:{factory}", "--json", "audit.json"]) == EXIT_OK
    document = json.loads((factories / "audit.json").read_text())
    assert [row["name"] for row in document["layers"]] == ["net.0", "net.2"]
    assert all(row["grad_rms"] is not None for row in document["layers"])


def test_the_returned_batch_decides_the_exit_status(factories):
    assert main(["audit", "user_models:xavier_mlp_and_batch"]) == EXIT_FINDINGS


def test_a_model_only_factory_without_input_shape_is_a_usage_error(factories, capsys):
    assert main(["audit", "user_models:healthy_mlp"]) == EXIT_USAGE
    assert "--input-shape is required when the factory returns only a model" in capsys.readouterr().err
