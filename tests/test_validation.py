"""Constructor and configuration validation of every callback: wrong types, out-of-range values, contradictions.

Each invalid argument must fail at construction (not at step 10 000) with ``ValueError`` or ``TypeError``
whose message names the argument and shows the value received.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_gradstab import ArchitectureAdvisor, ExplosionGuard, GradNormMonitor, InitAudit, PolicyConfig
from tests.matrix_support import Cell, build_model, trainer_for

torch.set_num_threads(1)

CALLBACKS: dict[str, Any] = {
    "GradNormMonitor": GradNormMonitor,
    "ExplosionGuard": ExplosionGuard,
    "InitAudit": InitAudit,
    "ArchitectureAdvisor": ArchitectureAdvisor,
    "PolicyConfig": PolicyConfig,  # the guard's options besides its named ones (ExplosionGuard(config=...))
}

# (callback, keyword arguments, the argument the message must name)
INVALID: list[tuple[str, dict[str, Any], str]] = [
    ("GradNormMonitor", {"group_by": "layer"}, "group_by"),
    ("GradNormMonitor", {"group_by": 0}, "group_by"),
    ("GradNormMonitor", {"group_by": True}, "group_by"),
    ("GradNormMonitor", {"log_every_n_steps": 0}, "log_every_n_steps"),
    ("GradNormMonitor", {"log_every_n_steps": 2.5}, "log_every_n_steps"),
    ("GradNormMonitor", {"log_every_n_steps": True}, "log_every_n_steps"),
    ("GradNormMonitor", {"norm_type": 0}, "norm_type"),
    ("GradNormMonitor", {"norm_type": -2.0}, "norm_type"),
    ("GradNormMonitor", {"norm_type": math.nan}, "norm_type"),
    ("GradNormMonitor", {"norm_type": "2"}, "norm_type"),
    ("GradNormMonitor", {"histogram_every_n_steps": 0}, "histogram_every_n_steps"),
    ("GradNormMonitor", {"figure_every_n_steps": -5}, "figure_every_n_steps"),
    ("GradNormMonitor", {"log_inf_norm": "yes"}, "log_inf_norm"),
    ("GradNormMonitor", {"log_grad_to_weight": "no"}, "log_grad_to_weight"),
    ("GradNormMonitor", {"update_to_weight": 1}, "update_to_weight"),
    ("ExplosionGuard", {"max_rung": "explode"}, "max_rung"),
    ("ExplosionGuard", {"max_rung": 3}, "max_rung"),
    ("PolicyConfig", {"zscore_threshold": 0.0}, "zscore_threshold"),
    ("PolicyConfig", {"zscore_threshold": math.nan}, "zscore_threshold"),
    ("PolicyConfig", {"zscore_threshold": "2.5"}, "zscore_threshold"),
    ("PolicyConfig", {"ema_decay": 1.0}, "ema_decay"),
    ("PolicyConfig", {"ema_decay": 0.0}, "ema_decay"),
    ("PolicyConfig", {"warmup_steps": 0}, "warmup_steps"),
    ("PolicyConfig", {"warmup_steps": 2.5}, "warmup_steps"),
    ("PolicyConfig", {"warmup_steps": True}, "warmup_steps"),
    ("PolicyConfig", {"log_std_floor": -0.1}, "log_std_floor"),
    ("PolicyConfig", {"growth_window": 2}, "growth_window"),
    ("PolicyConfig", {"growth_factor": 1.0}, "growth_factor"),
    ("PolicyConfig", {"healthy_steps_to_deescalate": 0}, "healthy_steps_to_deescalate"),
    ("PolicyConfig", {"loss_scale_floor": 0.0}, "loss_scale_floor"),
    ("PolicyConfig", {"budgets": {"clip": 0}}, "budgets['clip']"),
    ("PolicyConfig", {"budgets": {"clip": 1.5}}, "budgets['clip']"),
    ("PolicyConfig", {"budgets": {"explode": 1}}, "budgets"),
    ("PolicyConfig", {"budgets": 3}, "budgets"),
    ("PolicyConfig", {"tight_clip_ratio": 0.0}, "tight_clip_ratio"),
    ("PolicyConfig", {"backoff_factor": 1.0}, "backoff_factor"),
    ("PolicyConfig", {"lr_recovery_steps": 0}, "lr_recovery_steps"),
    ("PolicyConfig", {"snapshot_every": 0}, "snapshot_every"),
    ("ExplosionGuard", {"log_every_n_steps": 0}, "log_every_n_steps"),
    ("ExplosionGuard", {"raise_on_stop": "yes"}, "raise_on_stop"),
    ("ExplosionGuard", {"console_summary": None}, "console_summary"),
    ("InitAudit", {"fix": "yes"}, "fix"),
    ("InitAudit", {"seed": -1}, "seed"),
    ("InitAudit", {"seed": 1.5}, "seed"),
    ("InitAudit", {"forward_fn": 3}, "forward_fn"),
    ("ArchitectureAdvisor", {"observe_steps": 5}, "observe_steps"),
    ("ArchitectureAdvisor", {"observe_steps": 100.0}, "observe_steps"),
    ("ArchitectureAdvisor", {"stall_improvement": 0.0}, "stall_improvement"),
    ("ArchitectureAdvisor", {"stall_improvement": 1.0}, "stall_improvement"),
    ("ArchitectureAdvisor", {"stall_improvement": "0.1"}, "stall_improvement"),
    ("ArchitectureAdvisor", {"forward_fn": "training_step"}, "forward_fn"),
]


def _case_id(case: tuple[str, dict[str, Any], str]) -> str:
    name, kwargs, _ = case
    return f"{name}-" + ",".join(f"{key}={value!r}" for key, value in kwargs.items())


@pytest.mark.parametrize(("name", "kwargs", "argument"), INVALID, ids=[_case_id(case) for case in INVALID])
def test_invalid_argument_is_rejected_at_construction_with_a_message_naming_it(
    name: str, kwargs: dict[str, Any], argument: str
) -> None:
    with pytest.raises((ValueError, TypeError)) as error:
        CALLBACKS[name](**kwargs)
    message = str(error.value)
    assert f"`{argument}`" in message
    value = next(iter(kwargs.values()))
    shown = [repr(part) for pair in value.items() for part in pair] if isinstance(value, dict) else [repr(value)]
    assert any(text in message for text in [*shown, type(value).__name__])


# (keyword arguments, the rung option that contradicts max_rung)
CONTRADICTIONS: list[tuple[dict[str, Any], str]] = [
    ({"max_rung": "clip", "backoff_factor": 0.5}, "backoff_factor"),
    ({"max_rung": "skip", "lr_recovery_steps": 10}, "lr_recovery_steps"),
    ({"max_rung": "clip", "tight_clip_ratio": 2.0}, "tight_clip_ratio"),
    ({"max_rung": "lr_backoff", "snapshot_every": 10}, "snapshot_every"),
    ({"max_rung": "skip", "budgets": {"rollback": 2}}, "budgets"),
    ({"max_rung": "observe", "budgets": {"clip": 3}}, "budgets"),
]


@pytest.mark.parametrize(("kwargs", "option"), CONTRADICTIONS, ids=[option for _, option in CONTRADICTIONS])
def test_guard_option_for_a_rung_above_max_rung_is_a_contradiction_naming_both(
    kwargs: dict[str, Any], option: str
) -> None:
    rest = {key: value for key, value in kwargs.items() if key != "max_rung"}
    for build in (lambda: PolicyConfig(**kwargs), lambda: ExplosionGuard(max_rung=kwargs["max_rung"], config=rest)):
        with pytest.raises(ValueError) as error:
            build()
        message = str(error.value)
        assert f"`{option}`" in message and "`max_rung`" in message and repr(kwargs["max_rung"]) in message


VALID: list[tuple[str, dict[str, Any]]] = [
    ("GradNormMonitor", {"group_by": 2, "norm_type": math.inf, "log_every_n_steps": 10, "update_to_weight": True}),
    ("GradNormMonitor", {"group_by": "parameter", "histogram_every_n_steps": 100, "figure_every_n_steps": 200}),
    ("ExplosionGuard", {"max_rung": "clip", "config": PolicyConfig(max_rung="clip", budgets={"clip": 2})}),
    ("ExplosionGuard", {"max_rung": "rollback", "config": {"backoff_factor": 0.25, "snapshot_every": 5}}),
    ("PolicyConfig", {"max_rung": "rollback", "backoff_factor": 0.25, "snapshot_every": 5, "tight_clip_ratio": 3}),
    ("InitAudit", {"fix": True, "seed": 7, "forward_fn": lambda module, batch: module(batch[0], batch[1])}),
    ("ArchitectureAdvisor", {"observe_steps": 10, "stall_improvement": 0.5}),
]


@pytest.mark.parametrize(("name", "kwargs"), VALID, ids=[name for name, _ in VALID])
def test_valid_configuration_is_accepted_and_kept(name: str, kwargs: dict[str, Any]) -> None:
    callback = CALLBACKS[name](**kwargs)
    for key, value in kwargs.items():
        if name == "ExplosionGuard" and key == "config":  # each of its options lands in the guard's config
            options = vars(value) if isinstance(value, PolicyConfig) else value
            assert all(getattr(callback.config, option) == setting for option, setting in options.items())
            continue
        kept = getattr(callback.config, key) if name == "ExplosionGuard" else getattr(callback, key)
        assert kept == value


def test_monitor_without_a_logger_warns_once_at_setup(tmp_path: Path) -> None:
    cell = Cell("no_logger", trainer={"max_steps": 2})
    trainer = trainer_for(cell, tmp_path, [GradNormMonitor()], logger=False)
    with pytest.warns(UserWarning, match=r"GradNormMonitor: the trainer has no logger") as warnings:
        trainer.fit(build_model(cell))
    assert sum("GradNormMonitor" in str(w.message) for w in warnings) == 1
