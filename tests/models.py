"""Re-exports of the shared test models (now in ``tests.helpers.models``) for the files that import them here."""

from tests.helpers.models import TinyRegressor, TwoOptimizerModule, regression_data

__all__ = ["TinyRegressor", "TwoOptimizerModule", "regression_data"]
