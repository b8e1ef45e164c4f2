"""The diagnosis on the model zoo: stock architectures get no error and only the warnings a paper backs, good
practice gets nothing, library defaults that block training and known-bad controls get their codes, and each
control's fix removes its finding."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from lightning_gradstab import diagnose
from lightning_gradstab.cli import EXIT_OK, main

pytest.importorskip("transformers", reason="the zoo builds Hugging Face models from configs (the dev extra)")

from tests.zoo import BROKEN, CONTROLS, GOOD, STOCK
from tests.zoo.controls import GPT2_LAYERS

torch.set_num_threads(1)
warnings.filterwarnings("ignore", message=".*token_id.*")


def _ids(entries):
    return [entry.name for entry in entries]


def test_the_zoo_has_at_least_30_stock_architectures_and_8_controls():
    assert len(STOCK) >= 30 and len(CONTROLS) >= 8 and len(GOOD) >= 3


@pytest.mark.parametrize("entry", STOCK, ids=_ids(STOCK))
def test_stock_model_gets_no_error_and_only_warnings_a_paper_backs(entry):
    model, batch = entry()
    report = diagnose(model, batch)
    assert not report.has_errors, [(f.code, f.modules) for f in report.findings if f.severity == "error"]
    warned = {f.code for f in report.findings if f.severity == "warning"}
    assert warned <= set(entry.expected), f"{entry.name}: uncited warnings {warned - set(entry.expected)}"


@pytest.mark.parametrize("entry", GOOD, ids=_ids(GOOD))
def test_deliberate_init_gets_no_warning_or_error(entry):
    report = diagnose(*entry())
    assert all(f.severity == "info" for f in report.findings), [(f.severity, f.code) for f in report.findings]


@pytest.mark.parametrize("entry", BROKEN, ids=_ids(BROKEN))
def test_library_default_that_blocks_training_gets_its_finding(entry):
    model, batch = entry()
    assert set(entry.expected) <= diagnose(model, batch).codes
    # independent check without the diagnosis: in a plain backward the gradient reaching the first layer's output
    # is at most 1e-3 of the largest one reaching any layer's output
    gradients: dict[int, float] = {}  # call number -> RMS of the gradient reaching that call's output

    def keep(module, args, output):
        call = len(gradients)
        gradients[call] = 0.0
        output.register_hook(lambda grad: gradients.__setitem__(call, grad.detach().square().mean().sqrt().item()))

    handles = [m.register_forward_hook(keep) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    output = next(t for t in tree_leaves(model(**batch)) if isinstance(t, torch.Tensor) and t.requires_grad)
    (output * torch.randn_like(output)).sum().backward()
    for handle in handles:
        handle.remove()
    assert gradients[0] <= 1e-3 * max(gradients.values())


def test_efficientnet_s_small_batchnorm_gains_are_named_and_setting_them_to_1_restores_the_signal():
    model, batch = next(entry for entry in BROKEN if entry.name == "efficientnet")()
    (vanishing,) = diagnose(model, batch).by_code("signal.vanishing")
    assert "nn.init.ones_" in vanishing.recommendation and vanishing.severity == "error"
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            torch.nn.init.ones_(module.weight)
    assert "signal.vanishing" not in diagnose(model, batch).codes


@pytest.mark.parametrize("control", CONTROLS, ids=_ids(CONTROLS))
def test_known_bad_control_gets_its_codes_naming_its_modules(control):
    report = diagnose(*control())
    for code, modules in control.expected.items():
        assert code in report.codes, f"{control.name}: {code} missing from {sorted(report.codes)}"
        named = {m for f in report.by_code(code) for m in f.modules}
        assert set(modules) <= named, f"{control.name}: {code} does not name {set(modules) - named}"


@pytest.mark.parametrize("control", CONTROLS, ids=_ids(CONTROLS))
def test_applying_the_findings_fix_removes_the_finding(control):
    model, batch = control()
    report = diagnose(model, batch)
    fixed = control.fix(model, report)
    after = diagnose(fixed, batch)
    assert not set(control.fixed) & after.codes, [(f.code, f.modules) for f in after.findings]


def test_gpt2_at_50x_init_names_every_projection_and_the_head_in_one_pass():
    control = next(c for c in CONTROLS if c.name == "gpt2-init-x50")
    (scale,) = diagnose(*control()).by_code("init.scale")
    assert set(GPT2_LAYERS) <= set(scale.modules)
    assert scale.evidence["weight_std_over_recommended_min"] > 1.25  # every one of them too large


def test_fix_text_follows_the_measurement_when_the_init_cannot_explain_it():
    control = next(c for c in CONTROLS if c.name == "sigmoid-plain-10")
    (vanishing,) = diagnose(*control()).by_code("signal.vanishing")
    assert "Glorot & Bengio 2010" in vanishing.recommendation and "init.scale" not in vanishing.recommendation


@pytest.mark.parametrize("name", ["gpt2", "t5", "vgg", "mobilenet-v3", "gru-cell-loop"])
def test_gradstab_audit_exits_0_on_stock_models_built_with_their_batch(name, capsys):
    factory = {"gpt2": "stock:gpt2", "t5": "stock:t5", "vgg": "reference:vgg",
               "mobilenet-v3": "reference:mobilenet_v3", "gru-cell-loop": "stock:gru_cell_loop"}[name]
    assert main(["audit", f"tests.zoo.{factory}", "--json", "audit.json"]) == EXIT_OK
    assert "JSON report written" in capsys.readouterr().out
