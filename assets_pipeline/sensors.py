"""The concept sensor: registers concept folders as partitions and requests a build when one changes."""


import json

import dagster as dg

from assets_pipeline.jobs import ingest_concept_job
from assets_pipeline.partitions.definitions import concepts_partitions
from assets_pipeline.resources import PipelineStorage

MAX_RUNS_PER_TICK = 10


@dg.sensor(job=ingest_concept_job, minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.RUNNING)
def concept_folder_sensor(context: dg.SensorEvaluationContext, storage: PipelineStorage) -> dg.SensorResult:
    """Requests an ingest of each new or changed concept folder (declarative automation rebuilds what the
    ingest's new data version invalidates). Cursor: {concept: content digest} of what has been requested. A folder whose name is not a valid
    partition key is reported (once per tick) and never used as a path."""
    from assets_pipeline.partitions.discovery import scan_concepts

    seen: dict[str, str] = json.loads(context.cursor) if context.cursor else {}
    scan = scan_concepts(storage.data_path())
    for name, why in scan.invalid.items():
        context.log.warning(f"ignoring folder {name!r}: {why}")
    known = set(context.instance.get_dynamic_partitions(concepts_partitions.name))
    new = sorted(set(scan.concepts) - known)
    changed = [n for n in sorted(scan.concepts) if seen.get(n) != scan.concepts[n]][:MAX_RUNS_PER_TICK]
    runs = [dg.RunRequest(run_key=f"{n}:{scan.concepts[n][:16]}", partition_key=n) for n in changed]
    cursor = {**seen, **{n: scan.concepts[n] for n in changed}}
    return dg.SensorResult(
        run_requests=runs,
        dynamic_partitions_requests=[concepts_partitions.build_add_request(new)] if new else [],
        cursor=json.dumps(cursor, sort_keys=True),
    )
