"""Train one configured example (or a sweep with ``-m``): ``python examples/train.py [overrides]``.

Examples::

    python examples/train.py                                   # digits, 30-layer Xavier MLP, full suite
    python examples/train.py model.init=he gradstab=monitor
    python examples/train.py -m experiment=he2015              # a preset: its sweep, table and figure
    python examples/train.py -m trainer=ddp_cpu seed=0,1       # each job on 2 CPU processes (gloo)
"""

from __future__ import annotations

import sys
from pathlib import Path

# run from a checkout without installing: make `examples` and `lightning_gradstab` importable
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.types import RunMode  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from examples.config_check import INTERNAL_GROUPS, check_overrides  # noqa: E402
from examples.schema import register_schemas  # noqa: E402

register_schemas()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns the final validation loss (for hyper-parameter sweepers)."""
    # torch and Lightning load only after the config composed: a typo is reported in a second
    from examples.runner import job_metadata, run_experiment

    hydra_cfg = HydraConfig.get()
    summary = run_experiment(
        cfg,
        Path(hydra_cfg.runtime.output_dir),
        job_metadata(cfg, hydra_cfg),
        reraise=hydra_cfg.mode != RunMode.MULTIRUN,
    )
    return summary.get("final", {}).get("val/loss")


def _help_without_internal_groups() -> None:
    """Hydra's ``--help``, less the stored schemas (``schema/*``): plumbing of the configs, not a choice."""
    import contextlib
    import io

    text = io.StringIO()
    with contextlib.redirect_stdout(text), contextlib.suppress(SystemExit):
        main()
    print("".join(line for line in text.getvalue().splitlines(keepends=True)
                  if not line.startswith(tuple(f"{group}/" for group in INTERNAL_GROUPS))), end="")


if __name__ == "__main__":
    if "--help" in sys.argv[1:] or "-h" in sys.argv[1:]:
        _help_without_internal_groups()
        sys.exit(0)
    problem = check_overrides(sys.argv[1:], REPO_ROOT / "conf")
    if problem is not None:  # one line, before Hydra composes and before torch loads
        print(f"examples/train.py: {problem}", file=sys.stderr)
        sys.exit(2)
    main()
