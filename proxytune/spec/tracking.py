"""Tracking: where MLflow runs, models and artifacts go."""

from __future__ import annotations

from pydantic import Field

from proxytune.spec.common import Strict


class TrackingSpec(Strict):
    uri: str | None = Field(
        default=None,
        description=(
            "MLflow tracking URI. Unset: $MLFLOW_TRACKING_URI if set, else the embedded store "
            "sqlite:///<project>/registry/mlflow.db with artifacts in registry/artifacts."
        ),
    )
    experiment: str | None = Field(default=None, description="MLflow experiment name (default: the spec's name).")
