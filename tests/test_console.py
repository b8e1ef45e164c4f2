"""The console a user sees, rendered without a fit: findings fit the width, piped output stays readable, the
end-of-fit summary speaks the caller's terms. Whole fits under a pseudo-terminal: tests/test_output_width.py."""

from __future__ import annotations

import re

import pytest

from lightning_gradstab.console import MAX_PLAIN_WIDTH, render_text
from lightning_gradstab.fit_summary import GUARD_STOPPED, fit_summary
from lightning_gradstab.report import NARROW_WIDTH, Finding, Report


def _report() -> Report:
    recommendation = "Re-initialise network.1 ... network.29 with He/Kaiming normal (std = sqrt(2/fan_in)). " * 2
    evidence = {"predicted_signal_factor": 3.8e-5, "weight_std_over_recommended_median": 0.71}
    finding = Finding("init.scale", "error", ("network.1", "network.29"), evidence, recommendation.strip())
    return Report([finding], model="MLP")


def test_piped_output_has_one_line_per_finding_without_colour_codes_or_boxes():
    text = render_text(_report(), terminal=False)
    lines = text.splitlines()
    assert lines[0] == "Gradient stability: MLP (diagnose): 1 finding"
    assert lines[1].startswith("  error init.scale [network.1, network.29] predicted_signal_factor=3.8e-05;")
    assert "sqrt(2/fan_in)). Re-initialise" in " ".join(lines)  # the whole sentence, continued on the next line
    assert all(len(line) <= MAX_PLAIN_WIDTH for line in lines)
    assert "\x1b[" not in text and "│" not in text


@pytest.mark.parametrize("width", [60, 80, 100, 140])
def test_terminal_output_fits_the_terminal_width_and_never_splits_a_word(width):
    text = render_text(_report(), terminal=True, width=width)
    visible = [re.sub(r"\x1b\[[0-9;]*m", "", line) for line in text.splitlines() if line.strip()]
    assert max(len(line) for line in visible) <= width and len(visible) >= 4
    words = " ".join(visible).replace("│", " ").split()
    assert "predicted_signal_factor=3.8e-05;" in words and "weight_std_over_recommended_median=0.71" in words
    assert ("┏" in text) == (width >= NARROW_WIDTH)  # a table where it fits, the stacked form below


def test_fit_summary_says_what_was_found_and_what_to_do_in_the_callers_terms():
    finding = Finding("init.scale", "error", ("network.1",), {}, "Use He init.")
    guard = {"stopped": True, "stop_reason": "NaN at step 7", "optimizers": {"0": {"counts": {"skip": 3}}}}
    hydra_terms = {"init.scale": "rerun with `model.init=he`", GUARD_STOPPED: "lower `optim.optimizer.lr`"}
    text = render_text(*fit_summary([Report([finding], source="InitAudit")], [guard], hydra_terms), terminal=False)
    assert "InitAudit: init.scale (error)" in text
    assert "skip=3" in text and "stopped: NaN at step 7" in text
    assert "- lower `optim.optimizer.lr`" in text and "- rerun with `model.init=he`" in text
    assert "Use He init." not in text  # the caller's terms replace the Python advice


def test_a_clean_fit_gets_one_line():
    (line,) = render_text(*fit_summary([Report([], source="InitAudit")], [{"optimizers": {}}]), terminal=False)\
        .splitlines()
    assert line == "Gradient stability: no findings, and the guard took no action."
