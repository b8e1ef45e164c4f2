"""Trainer factories for tests: CPU, one device, nothing written unless the test asks for it."""

from __future__ import annotations

import lightning.pytorch as pl


def quiet_trainer(**kwargs) -> pl.Trainer:
    """A CPU trainer without progress bars or checkpoints (tests pass loggers and callbacks)."""
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return pl.Trainer(**{**defaults, **kwargs})
