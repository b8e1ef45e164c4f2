"""ExplosionGuard's arguments: two named knobs, every other policy option in one ``PolicyConfig``, and the old
keyword arguments still accepted (routed into the config, with a deprecation warning naming the new spelling)."""

from __future__ import annotations

import dataclasses
import inspect
import warnings
from typing import Any

import pytest
from omegaconf import OmegaConf

from lightning_gradstab import ExplosionGuard, PolicyConfig
from lightning_gradstab.callbacks._guard_config import MOVED_TO_CONFIG, NAMED

# a valid value away from the default for every old keyword argument that is a PolicyConfig option now
OLD_ARGUMENTS: dict[str, Any] = {
    "zscore_threshold": 3.0,
    "ema_decay": 0.9,
    "warmup_steps": 10,
    "log_std_floor": 0.1,
    "growth_window": 12,
    "growth_factor": 3.0,
    "drift_horizon_steps": None,
    "healthy_steps_to_deescalate": 20,
    "loss_scale_floor": 0.5,
    "loss_zscore_threshold": None,
    "loss_rise_tolerance": None,
    "max_update_ratio": 2.0,
    "budgets": {"skip": 2},
    "tight_clip_ratio": 2.0,
    "backoff_factor": 0.25,
    "lr_recovery_steps": 10,
    "snapshot_every": 20,
}


def test_the_moved_arguments_are_exactly_the_old_policy_arguments_and_each_is_a_config_field():
    fields = {field.name for field in dataclasses.fields(PolicyConfig)}
    assert set(MOVED_TO_CONFIG) == set(OLD_ARGUMENTS)
    assert set(MOVED_TO_CONFIG) | set(NAMED) == fields - {"loss_rules"}  # loss_rules was never a guard argument
    parameters = inspect.signature(ExplosionGuard).parameters
    assert not set(MOVED_TO_CONFIG) & set(parameters) and set(NAMED) <= set(parameters)
    assert all(parameters[name].default == getattr(PolicyConfig(), name) for name in NAMED)


@pytest.mark.parametrize("name", sorted(OLD_ARGUMENTS))
def test_each_old_argument_still_works_builds_the_same_config_and_warns_naming_the_new_spelling(name: str):
    value = OLD_ARGUMENTS[name]
    with pytest.warns(DeprecationWarning) as caught:
        guard = ExplosionGuard(**{name: value})
    assert guard.config == PolicyConfig(**{name: value})
    (warning,) = caught.list
    assert f"ExplosionGuard({name}=...) is deprecated" in str(warning.message)
    assert f"config=PolicyConfig({name}=...)" in str(warning.message)
    assert warning.filename == __file__  # it points at the line that built the guard


def test_every_old_argument_at_once_builds_the_config_the_old_signature_built():
    old = {"max_rung": "rollback", "max_norm": 2.0, **OLD_ARGUMENTS}
    with pytest.warns(DeprecationWarning) as caught:
        guard = ExplosionGuard(**old)
    assert guard.config == PolicyConfig(**old)
    assert len(caught.list) == len(OLD_ARGUMENTS)  # one per deprecated argument, none for the named ones
    with pytest.warns(DeprecationWarning):  # a Hydra DictConfig of budgets, as `instantiate` passes it by default
        assert ExplosionGuard(budgets=OmegaConf.create({"skip": 2})).config.budgets == {"skip": 2}


def test_old_arguments_are_still_validated_by_the_config():
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="`growth_factor` must be a number > 1"):
        ExplosionGuard(growth_factor=1.0)
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="`backoff_factor` configures rung"):
        ExplosionGuard(max_rung="clip", backoff_factor=0.5)


def test_the_new_spelling_raises_no_warning_and_equals_the_old_one():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        guard = ExplosionGuard(max_rung="skip", max_norm=None, config=PolicyConfig(growth_factor=3.0))
        from_mapping = ExplosionGuard(config=OmegaConf.create({"max_rung": "skip", "budgets": {"skip": 2}}))
    assert guard.config == PolicyConfig(max_rung="skip", max_norm=None, growth_factor=3.0)
    assert from_mapping.config == PolicyConfig(max_rung="skip", budgets={"skip": 2})
    assert ExplosionGuard().config == PolicyConfig()


def test_a_named_knob_left_at_its_default_takes_the_configs_value():
    assert ExplosionGuard(config=PolicyConfig(max_rung="clip", max_norm=None)).config.max_rung == "clip"
    assert ExplosionGuard(config=PolicyConfig(max_norm=None)).config.max_norm is None
    assert ExplosionGuard(max_rung="clip", config=PolicyConfig(max_rung="clip")).config.max_rung == "clip"


@pytest.mark.parametrize(
    ("direct", "config"),
    [
        ({"max_rung": "clip"}, PolicyConfig(max_rung="skip")),
        ({"max_norm": None}, PolicyConfig(max_norm=2.0)),
        ({"growth_factor": 3.0}, PolicyConfig(growth_factor=5.0)),  # an old argument too
    ],
)
def test_an_option_set_both_directly_and_in_config_to_different_values_is_refused_naming_both(direct, config):
    (name,) = direct
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with pytest.raises(ValueError) as error:
            ExplosionGuard(**direct, config=config)
    assert f"`{name}`={direct[name]!r}" in str(error.value)
    assert f"`config.{name}`={getattr(config, name)!r}" in str(error.value)


def test_unknown_arguments_and_old_positional_calls_are_type_errors():
    with pytest.raises(TypeError, match="unexpected keyword argument 'zscore_treshold'"):
        ExplosionGuard(zscore_treshold=3.0)
    with pytest.raises(TypeError, match="unexpected keyword argument 'loss_rules'"):
        ExplosionGuard(loss_rules=False)  # a config option that never was an argument: config= only
    with pytest.raises(TypeError):  # the old second positional argument was zscore_threshold: no silent max_norm
        ExplosionGuard("stop", 3.0)  # type: ignore[misc]
    with pytest.raises(TypeError, match="`config` must be a PolicyConfig"):
        ExplosionGuard(config=3)  # type: ignore[arg-type]


def test_the_snapshot_options_follow_max_rung_from_the_config():
    with pytest.raises(ValueError, match=r"`snapshot_location`='disk' configures rung 'rollback'.*'skip'"):
        ExplosionGuard(config=PolicyConfig(max_rung="skip"), snapshot_location="disk")
    assert ExplosionGuard(config=PolicyConfig(max_rung="rollback"), snapshot_location="disk").config.max_rung == (
        "rollback"
    )
