"""A concept folder's data version in Dagster: the ``concept_folders`` observations the folder sensor and the batch
builds report, and the versions Dagster holds (one query for many concepts)."""

import dagster as dg

CONCEPT_FOLDERS = dg.AssetKey("concept_folders")
DATA_VERSION_TAG = "dagster/data_version"


def reported_versions(instance: dg.DagsterInstance, names: list[str]) -> dict[str, str]:
    """The data version of each concept's latest ``concept_folders`` observation Dagster holds (concepts with none
    are left out): one query (every partition's, when asked for most of them)."""
    from dagster._core.events import DagsterEventType

    storage = instance.event_log_storage
    if not names:
        return {}
    if len(names) > 2000:
        found = storage.get_latest_tags_by_partition(CONCEPT_FOLDERS, DagsterEventType.ASSET_OBSERVATION,
                                                     [DATA_VERSION_TAG])
    else:
        found = storage.get_latest_tags_by_partition(CONCEPT_FOLDERS, DagsterEventType.ASSET_OBSERVATION,
                                                     [DATA_VERSION_TAG], asset_partitions=names)
    return {k: v[DATA_VERSION_TAG] for k, v in found.items() if DATA_VERSION_TAG in v}


def observation(name: str, state) -> dg.AssetObservation:
    return dg.AssetObservation(CONCEPT_FOLDERS, partition=name, tags={DATA_VERSION_TAG: state.digest},
                               metadata={"files": state.files})
