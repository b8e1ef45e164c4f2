"""The drop-in config for lightning-hydra-template users: shipped inside the package, found through Hydra's
search path, composed in the template's ``configs/callbacks/`` layout, and every entry builds its callback."""

from __future__ import annotations

from fnmatch import fnmatch
from pathlib import Path

import tomllib
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

import lightning_gradstab
from lightning_gradstab.configs import CALLBACKS_CONFIG
from tests.helpers.subprocess_env import REPO

PACKAGE = Path(lightning_gradstab.__file__).parent


def _template(tmp_path: Path) -> Path:
    """The parts of lightning-hydra-template's configs/ that decide how callbacks are chosen."""
    configs = tmp_path / "configs"
    (configs / "callbacks").mkdir(parents=True)
    (configs / "train.yaml").write_text(
        "defaults:\n  - callbacks: default\n  - _self_\n\nhydra:\n  searchpath:\n    - pkg://lightning_gradstab.configs\n"
    )
    (configs / "callbacks" / "default.yaml").write_text(
        "defaults:\n  - model_summary\n  - gradstab\n  - _self_\n"
    )
    (configs / "callbacks" / "model_summary.yaml").write_text(
        "model_summary:\n  _target_: lightning.pytorch.callbacks.RichModelSummary\n  max_depth: -1\n"
    )
    return configs


def test_the_template_composes_the_suite_next_to_its_own_callbacks_and_each_entry_builds(tmp_path):
    with initialize_config_dir(config_dir=str(_template(tmp_path)), version_base="1.3"):
        cfg = compose("train", overrides=["callbacks.gradstab_guard.max_rung=skip"])
    assert list(cfg.callbacks) == [
        "model_summary", "gradstab_monitor", "gradstab_guard", "gradstab_init_audit", "gradstab_advisor"
    ]
    built = {name: instantiate(node) for name, node in cfg.callbacks.items()}  # the template's instantiate_callbacks
    guard = built["gradstab_guard"]
    assert type(guard).__name__ == "ExplosionGuard" and guard.config.max_rung == "skip"
    assert {type(c).__name__ for c in built.values()} >= {"GradNormMonitor", "InitAudit", "ArchitectureAdvisor"}


def test_the_config_is_package_data_so_pip_installs_it():
    assert (PACKAGE / "configs" / CALLBACKS_CONFIG).is_file()
    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert any(fnmatch(CALLBACKS_CONFIG, pattern) for pattern in package_data["lightning_gradstab.configs"])
