from __future__ import annotations

from pathlib import Path

import dagster as dg
from pydantic import Field

from assets_pipeline.concept import validate_concept_key
from assets_pipeline.paths import ARTIFACTS_ENV, DATA_ENV, resolve_root
from assets_pipeline.retention import DEFAULT_KEEP
from assets_pipeline.store import ArtifactLayout


class PipelineStorage(dg.ConfigurableResource):
    """Where concept folders are read from and where every output and cache is written."""

    data_root: str = Field(default="", description=f"Concept folders; empty = ${DATA_ENV}, else <repo>/data.")
    artifact_root: str = Field(
        default="", description=f"Outputs and caches; empty = ${ARTIFACTS_ENV}, else <repo>/artifacts."
    )
    keep_weight_versions: int = Field(
        default=DEFAULT_KEEP, ge=1,
        description="Trained outputs: the weights of the newest N versions of each are kept (the current one "
                    "always); older versions keep their lineage, metrics and validation images, not their weights.",
    )

    def data_path(self) -> Path:
        return resolve_root(self.data_root, DATA_ENV, "data")

    def artifact_path(self) -> Path:
        return resolve_root(self.artifact_root, ARTIFACTS_ENV, "artifacts")

    def layout(self) -> ArtifactLayout:
        return ArtifactLayout(self.artifact_path())

    def concept_dir(self, concept: str) -> Path:
        """The concept's folder; the key is validated first, so it can never name a path outside the root."""
        folder = self.data_path() / validate_concept_key(concept)
        if not folder.is_dir():
            raise FileNotFoundError(f"concept folder {folder} does not exist (was it renamed or removed?)")
        return folder
