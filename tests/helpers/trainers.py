"""Trainer factories for tests: CPU, one device, nothing written unless the test asks for it."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

QUIET: dict[str, bool] = {"enable_progress_bar": False, "enable_model_summary": False, "enable_checkpointing": False}
"""No progress bar, no model summary, no checkpoints: the trainer options every quiet test trainer shares."""


def quiet_trainer(**kwargs: Any) -> pl.Trainer:
    """A CPU trainer on one device without a logger, progress bar, model summary or checkpoints; ``kwargs``
    override any of these (``logger=memory_logger``, ``enable_checkpointing=True``, ``devices=2``) and add the
    rest (``max_steps``, ``callbacks``, ``default_root_dir``).

    Example::

        trainer = quiet_trainer(max_steps=2, callbacks=[GradNormMonitor()], logger=memory_logger)
    """
    defaults: dict[str, Any] = {"accelerator": "cpu", "devices": 1, "logger": False, **QUIET}
    return pl.Trainer(**{**defaults, **kwargs})
