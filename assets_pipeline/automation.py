"""When assets rebuild: declarative automation on data and code versions (the dataset half), a schedule for
training (GPU time is the expensive part).

A dataset asset partition is requested when a dependency's *data version* changed (not merely re-materialized:
re-ingesting identical photos gives the same version, so nothing downstream runs), when its own code version
changed, or when it is newly missing. Requests cascade in one tick through ``will_be_requested``, so a new
photo rebuilds its concept's chain in one run, and each asset then computes only the items not in its cache.
"""

import dagster as dg

AC = dg.AutomationCondition


def rebuild_on_change() -> dg.AutomationCondition:
    dep_changed = AC.any_deps_match(AC.data_version_changed() | AC.will_be_requested()).with_label(
        "a dependency's data version changed"
    )
    return (
        (AC.newly_missing() | dep_changed | AC.code_version_changed()).since_last_handled()
        & ~AC.any_deps_missing()
        & ~AC.any_deps_in_progress()
        & ~AC.in_progress()
    ).with_label("rebuild when inputs or code change")


def rebuild_on_folder_change() -> dg.AutomationCondition:
    """For ``raw_images``, whose input is the concept folder (``concept_folders``, a data version the folder sensor
    reports when the folder changed): rebuild when that version changed or its own code changed. A new concept is
    not requested here: the folder sensor builds new concepts in batch runs (assets/batch.py), which announce their
    partitions as in progress when they start. A version that appears where there was none is not a change."""
    return (
        (AC.any_deps_match(AC.data_version_changed()).with_label("the concept folder changed")
         | AC.code_version_changed()).since_last_handled()
        & ~AC.in_progress()
    ).with_label("rebuild when the folder or code changes")


# Evaluates the conditions above; a dedicated sensor so it can be turned on/off and shows in the UI by name.
dataset_automation_sensor = dg.AutomationConditionSensorDefinition(
    "dataset_automation",
    target=dg.AssetSelection.groups("dataset", "priors", "latents"),
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
)
