"""The concept sensor: registers concept folders as partitions, requests a build when one changes, and reports a
registered concept whose folder is gone (it never removes one: ``assets-pipeline concept remove`` does)."""


import json

import dagster as dg

from assets_pipeline.jobs import ingest_concept_job
from assets_pipeline.partitions.definitions import concepts_partitions
from assets_pipeline.resources import PipelineStorage

MAX_RUNS_PER_TICK = 10
# Cursor keys beside the {concept: content digest} entries. A leading '_' is never a concept name (CONCEPT_KEY),
# and each is written only when non-empty, so a cursor written before they existed loads as it is.
VANISHED = "_vanished"  # registered concepts whose folder is gone, already warned about
REMOVALS = "_removals"  # {concept: times its partition was removed}, to give a re-registered concept new run keys


def run_key(concept: str, digest: str, removals: int) -> str:
    # The daemon skips a run key this sensor has used before, and a folder put back as it was has its old digest.
    return f"{concept}:{digest[:16]}" + (f":{removals}" if removals else "")


@dg.sensor(job=ingest_concept_job, minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.RUNNING)
def concept_folder_sensor(context: dg.SensorEvaluationContext, storage: PipelineStorage) -> dg.SensorResult:
    """Requests an ingest of each new or changed concept folder (declarative automation rebuilds what the
    ingest's new data version invalidates). Cursor: {concept: content digest} of what has been requested, plus
    ``_vanished`` and ``_removals``. A folder whose name is not a valid partition key is reported (once per
    tick) and never used as a path. A registered concept whose folder is gone is warned about once and named in
    every tick's skip reason; its partition and outputs are kept (the folder may be coming back)."""
    from assets_pipeline.partitions.discovery import scan_concepts

    seen: dict[str, str] = json.loads(context.cursor) if context.cursor else {}
    warned = set(seen.pop(VANISHED, []))
    removals: dict[str, int] = seen.pop(REMOVALS, {})
    data_root = storage.data_path()
    scan = scan_concepts(data_root)
    for name, why in scan.invalid.items():
        context.log.warning(f"ignoring folder {name!r}: {why}")
    known = set(context.instance.get_dynamic_partitions(concepts_partitions.name))
    # A partition removed since its ingest was requested (`concept remove`, or the UI): forget the request, so
    # the folder, if present or put back, is registered and ingested again.
    for name in sorted(set(seen) - known):
        del seen[name]
        removals[name] = removals.get(name, 0) + 1
    new = sorted(set(scan.concepts) - known)
    changed = [n for n in sorted(scan.concepts) if seen.get(n) != scan.concepts[n]][:MAX_RUNS_PER_TICK]
    runs = [dg.RunRequest(run_key=run_key(n, scan.concepts[n], removals.get(n, 0)), partition_key=n)
            for n in changed]
    cursor: dict = {**seen, **{n: scan.concepts[n] for n in changed}}

    if not data_root.is_dir():  # unmounted or misconfigured: not a reason to call every concept removed
        gone, skip = sorted(warned & known), None
        if known:
            skip = f"the data root {data_root} does not exist: {len(known)} registered concept(s) not checked"
            context.log.warning(skip)
    else:
        gone = sorted(known - set(scan.concepts) - set(scan.invalid))  # an invalid folder is reported above
        for name in sorted(set(gone) - warned):
            context.log.warning(
                f"concept {name!r} is registered but its folder {data_root / name} is gone; its partition and "
                f"outputs are kept. If it was removed on purpose: assets-pipeline concept remove {name}")
        skip = (f"{len(gone)} registered concept(s) without a folder in {data_root}: {', '.join(gone)} (kept; "
                "`assets-pipeline concept remove <name>` removes one)") if gone else None
    if gone:
        cursor[VANISHED] = gone
    if removals:
        cursor[REMOVALS] = removals
    return dg.SensorResult(
        run_requests=runs,
        dynamic_partitions_requests=[concepts_partitions.build_add_request(new)] if new else [],
        cursor=json.dumps(cursor, sort_keys=True),
        skip_reason=None if runs else skip,
    )
