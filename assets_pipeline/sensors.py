"""The concept sensor: registers new concept folders as partitions and builds their datasets in batch runs, many
concepts per run (``assets/batch.py``); reports each folder whose content changed as a new data version of the
``concept_folders`` source asset (one observation per change, not per tick), whose ``raw_images`` partition
declarative automation then rebuilds (``automation.py``). It reports a registered concept whose folder is gone, and
never removes one (``assets-pipeline concept remove`` does).

Per-concept state is not in the cursor (Dagster stores a sensor's cursor with every tick, kept for days): what
each folder looked like lives in the code server's memory (:class:`~assets_pipeline.partitions.discovery.FolderIndex`,
re-read within the ticks' time budget after a restart), and what Dagster holds of each concept is its observations'
data versions, asked for (one query) only for the folders whose digest differs from the last answer. The cursor
holds where the verification pass resumes and the concepts already warned about as gone.
"""


import json
from pathlib import Path

import dagster as dg

from assets_pipeline.assets.batch import BATCH_SIZE, BATCH_TAG, build_concepts_job
from assets_pipeline.partitions.definitions import concepts_partitions
from assets_pipeline.partitions.discovery import FolderIndex
from assets_pipeline.partitions.versions import CONCEPT_FOLDERS, observation, reported_versions  # noqa: F401
from assets_pipeline.resources import PipelineStorage

MAX_OBSERVATIONS_PER_TICK = 1000  # the rest of a mass upload is observed by the next ticks
READ_BUDGET_S = 20.0  # reading new and changed folders in full, per tick (the daemon allows a sensor 60 s)
VERIFY_BUDGET_S = 0.5  # re-reading folders in full in turn, per tick (finds files rewritten in place)
VANISHED = "_vanished"  # cursor: registered concepts whose folder is gone, already warned about
VERIFY_FROM = "_verify_from"  # cursor: the folder the last verification pass stopped at
TICK = "_tick"  # cursor: ticks so far (a batch run's key: the same if a tick is evaluated again, new otherwise)

_INDEXES: dict[str, FolderIndex] = {}  # data root -> what its folders looked like (the code server's memory)


def folder_index(data_root: Path) -> FolderIndex:
    """This process's view of a data root's folders (one per data root; a new process starts empty)."""
    key = str(Path(data_root).absolute())
    if key not in _INDEXES:
        _INDEXES[key] = FolderIndex(Path(key))
    return _INDEXES[key]


def batch_pending(instance: dg.DagsterInstance) -> set[str]:
    """The concepts of every batch build not finished yet (queued, starting or running)."""
    runs = instance.get_runs(dg.RunsFilter(job_name=build_concepts_job.name, statuses=[
        dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
        dg.DagsterRunStatus.STARTED]))
    return {c for run in runs for c in run.run_config.get("ops", {}).get("build_inputs", {}).get("config", {})
            .get("concepts", [])}


@dg.sensor(minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.RUNNING, jobs=[build_concepts_job])
def concept_folder_sensor(context: dg.SensorEvaluationContext, storage: PipelineStorage) -> dg.SensorResult:
    """Registers each new concept folder as a partition and builds it: one `build_concepts` run per batch of up to
    100 new concepts. Reports each changed folder's content digest as a new data version of `concept_folders`
    (declarative automation then rebuilds that concept's `raw_images`, and what its new data version
    invalidates). A tick stats each folder and sub-folder (not each file) and reads in
    full only the folders that changed, plus a few in turn (which finds a file rewritten in place). A folder whose
    name is not a valid partition key, or whose concept.toml is not usable, is reported and never used. A
    registered concept whose folder is gone is warned about once and named in every tick's skip reason; its
    partition and outputs are kept (the folder may be coming back)."""
    cursor: dict = json.loads(context.cursor) if context.cursor else {}
    # A cursor from before the index (concept -> digest entries) holds nothing needed now: dropped.
    warned = set(cursor.get(VANISHED, []))
    tick = cursor.get(TICK, 0) + 1
    data_root = storage.data_path()
    known = set(context.instance.get_dynamic_partitions(concepts_partitions.name))
    events, new, runs, skip = [], [], [], None
    out: dict = {TICK: tick}
    if not data_root.is_dir():  # unmounted or misconfigured: not a reason to call every concept removed
        gone = sorted(warned & known)
        if known:
            skip = f"the data root {data_root} does not exist: {len(known)} registered concept(s) not checked"
            context.log.warning(skip)
    else:
        index = folder_index(data_root)
        scan = index.scan(cursor.get(VERIFY_FROM, ""), READ_BUDGET_S, VERIFY_BUDGET_S)
        for name in scan.read:
            if name in scan.invalid:
                context.log.warning(f"ignoring folder {name!r}: {scan.invalid[name]}")
        for name in sorted(set(scan.invalid) - set(index.folders)):  # invalid names: never read, said each tick
            context.log.warning(f"ignoring folder {name!r}: {scan.invalid[name]}")
        new = sorted(set(scan.concepts) - known)
        # What Dagster holds, asked only for the folders whose digest is not the last answer. A new concept's
        # first version is its batch build's to report, with its ingest (assets/batch.py observe_folder); one
        # registered but never observed and in no pending batch (a batch that died first) is reported here, and
        # automation builds it.
        fresh = set(new)
        ask = [n for n, d in scan.concepts.items() if index.folders[n].reported != d and n not in fresh]
        held = reported_versions(context.instance, ask)
        pending = batch_pending(context.instance) if any(n not in held for n in ask) else set()
        changed = []
        for name in ask:
            index.folders[name].reported = held.get(name)
            if held.get(name) != scan.concepts[name] and not (name not in held and name in pending):
                changed.append(name)
        for name in changed[:MAX_OBSERVATIONS_PER_TICK]:
            events.append(observation(name, index.folders[name]))
        # New concepts (and ones registered again after `concept remove`) are built in batches, many per run.
        for i in range(0, len(new), BATCH_SIZE):
            batch = new[i:i + BATCH_SIZE]
            runs.append(dg.RunRequest(
                run_key=f"build:{tick}:{i // BATCH_SIZE}", job_name=build_concepts_job.name,
                run_config={"ops": {"build_inputs": {"config": {"concepts": batch}}}},
                tags={BATCH_TAG: str(len(batch))}))
        if new:
            context.log.info(f"{len(new)} new concept(s), built in {len(runs)} run(s) of up to {BATCH_SIZE}")
        if changed:
            shown = ", ".join(changed[:20]) + (f" and {len(changed) - 20} more" if len(changed) > 20 else "")
            context.log.info(f"{len(changed)} concept folder(s) new or changed: {shown}"
                             + (f" ({MAX_OBSERVATIONS_PER_TICK} reported now, the rest by the next ticks)"
                                if len(changed) > MAX_OBSERVATIONS_PER_TICK else ""))
        if scan.deferred:
            context.log.info(f"{scan.deferred} folder(s) left for the next tick (this tick's {READ_BUDGET_S:g} s "
                             "of reading spent)")
        out[VERIFY_FROM] = scan.verify_from
        gone = sorted(known - set(scan.present))
        for name in sorted(set(gone) - warned):
            context.log.warning(
                f"concept {name!r} is registered but its folder {data_root / name} is gone; its partition and "
                f"outputs are kept. If it was removed on purpose: assets-pipeline concept remove {name}")
        skip = (f"{len(gone)} registered concept(s) without a folder in {data_root}: {', '.join(gone[:50])}"
                f"{' ...' if len(gone) > 50 else ''} (kept; `assets-pipeline concept remove <name>` removes one)"
                ) if gone else f"{len(scan.concepts)} concept folder(s), none new or changed"
    if gone:
        out[VANISHED] = gone
    return dg.SensorResult(
        run_requests=runs,
        asset_events=events,
        dynamic_partitions_requests=[concepts_partitions.build_add_request(new)] if new else [],
        cursor=json.dumps(out, sort_keys=True),
        skip_reason=None if events or new else skip,
    )
