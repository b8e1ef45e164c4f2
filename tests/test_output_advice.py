"""The end-of-fit advice follows what happened in the run: nothing the run already did is suggested, clip advice
agrees with the clipping applied, each sentence appears once, "not run" is not "no findings", and the files
listed are the ones this fit wrote."""

from __future__ import annotations

import math
import os
import random
import re

from lightning_gradstab import ExplosionGuard, InitAudit
from lightning_gradstab.callbacks._guard_summary import guard_advice
from lightning_gradstab.console import render_text
from lightning_gradstab.fit_summary import fit_summary
from lightning_gradstab.guard.config import PolicyConfig
from lightning_gradstab.guard.detect import Observation
from lightning_gradstab.guard.ladder import ExplosionPolicy
from lightning_gradstab.report import Finding, Report
from tests.helpers.models import DigitsClassifier, digits_loader, mlp
from tests.helpers.trainers import quiet_trainer


def _summary_text(*args, **kwargs) -> str:
    return render_text(*fit_summary(*args, **kwargs), terminal=False)


def _guarded_policy(config: PolicyConfig, scale_invariant: bool) -> ExplosionPolicy:
    """120 steps at a gradient norm of about 14, two 20x spikes (at steps 60 and 90)."""
    policy, noise = ExplosionPolicy(config), random.Random(0)
    for step in range(120):
        norm = 14 * math.exp(noise.gauss(0, 0.1)) * (20 if step in (60, 90) else 1)
        policy.step(Observation(norm, scale_invariant=scale_invariant))
    return policy


def test_a_run_clipped_at_the_ceiling_is_not_told_to_clip_at_a_looser_value():
    config = PolicyConfig(max_rung="clip")  # max_norm="auto": AdamW's steps are clipped at 1.0
    policy = _guarded_policy(config, scale_invariant=True)
    assert policy.counts["max_norm"] == 120 and policy.counts["spike"] == 2
    advice = guard_advice(policy, None, config)
    assert advice == [
        "the guard clipped 120 of 120 steps at its ceiling max_norm=1; without the guard, gradient_clip_val=1 keeps "
        "that clipping"
    ]


def test_without_a_ceiling_spikes_get_a_clip_value_above_the_typical_norm():
    config = PolicyConfig(max_rung="clip")
    policy = _guarded_policy(config, scale_invariant=False)  # SGD: no ceiling under "auto"
    (advice,) = guard_advice(policy, None, config)
    value = float(advice.split("clip at about ")[1].split(" ")[0])
    assert advice.startswith("gradient spikes: clip at about") and 14 < value < 14 * 20


def test_layers_the_audit_already_reinitialised_are_reported_done_not_advised(tmp_path, capsys):
    audit = InitAudit(fix=True)
    trainer = quiet_trainer(max_steps=4, callbacks=[audit], default_root_dir=tmp_path)
    trainer.fit(DigitsClassifier(mlp(30, 32)), digits_loader(size=128))
    assert "init.scale" in audit.report.codes and len(audit.fixed_modules) == 29
    summary = capsys.readouterr().out.split("Gradient stability: what this fit found")[1]
    assert "init.scale (error fixed)" in summary
    assert re.search(r"^done +InitAudit\(fix=True\) re-initialised 29 layers before the first update", summary, re.M)
    assert "- init.scale" not in summary and "pass `InitAudit(fix=True)`" not in summary
    assert "- signal.vanishing" not in summary  # measured on the weights the fix replaced
    assert "- arch.residual" in summary  # what the fix cannot change is still advised


def test_the_same_sentence_is_given_once():
    finding = Finding("arch.residual", "error", ("net.0",), {}, "Add skip connections.")
    reports = [Report([finding], source="InitAudit"), Report([finding], source="ArchitectureAdvisor")]
    guard = {"stopped": False, "optimizers": {str(i): {"counts": {"spike": 1}, "advice": ["add a warm-up"]}
                                               for i in range(2)}}
    text = _summary_text(reports, [guard])
    assert text.count("Add skip connections.") == 1 and text.count("add a warm-up") == 1


def test_a_fit_without_audit_or_advisor_says_no_diagnosis_ran_rather_than_no_findings():
    acted = {"stopped": False, "optimizers": {"0": {"counts": {"clip": 3}}}}
    text = _summary_text([], [acted])
    assert re.search(r"^found +not run \(no InitAudit or ArchitectureAdvisor\)$", text, re.M)
    assert "no findings" not in text
    quiet_guard = {"stopped": False, "optimizers": {"0": {"counts": {}}}}
    assert _summary_text([], [quiet_guard]).strip() == (
        "Gradient stability: the guard took no action (no init audit or advisor ran)."
    )
    assert _summary_text([Report([], source="InitAudit")], [quiet_guard]).strip() == (
        "Gradient stability: no findings, and the guard took no action."
    )


def test_only_the_report_files_this_fit_wrote_are_listed(tmp_path, capsys):
    stale = tmp_path / "gradstab_init_audit.json"  # left by an earlier run in the same directory
    stale.write_text("{}")
    os.utime(stale, (1_000_000_000, 1_000_000_000))
    guard = ExplosionGuard(max_norm=1e-3)  # clips every step, so the summary has something to say
    trainer = quiet_trainer(max_steps=6, callbacks=[guard], default_root_dir=tmp_path)
    trainer.fit(DigitsClassifier(mlp(3, 16)), digits_loader(size=96))
    details = [line for line in capsys.readouterr().out.splitlines() if line.startswith("details")]
    assert [line.split()[1:] for line in details] == [[str(tmp_path / "gradstab_guard_summary.json")]]
