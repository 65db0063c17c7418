"""How the sensor, the automation and the instance's storage grow with the number of concepts, on SQLite and on
PostgreSQL (directly, and through PgBouncer: `scripts/postgres.sh pooler`).

For each count, N concept folders with a few small photos each (hard links of the same files: cheap to create);
then, in a fresh process per (storage, N) so that its peak memory is its own:

- the concept-folder sensor's ticks, each as the daemon runs it (``dagster.build_sensor_context`` on the instance,
  its result stored as the daemon stores it: partitions registered, observations recorded):
  the first (an empty folder index: every folder read, N partitions registered, the batch builds requested),
  a steady tick (nothing changed: a stat per folder and its spec, the verification pass's share), a tick after
  one concept got a new photo, and a tick after a code-server restart (empty index, nothing changed: the reading
  is spread over ticks by its time budget; reported: what one tick read and left);
- what the batch builds report first for every concept (its folder's observation and its raw_images
  materialization: recorded directly, not run; this measures the sensor and the automation, not ingest);
- one declarative-automation evaluation of the `dataset_automation` sensor's target, as the daemon evaluates it
  (Dagster's `AutomationTickEvaluationContext`, which caches what it reads from the instance within a tick;
  `dagster.evaluate_automation_conditions`, the test helper, reads the partition list again for every condition
  node it serializes): the first (records the state), two with nothing changed, and one after one concept's
  folder changed (requests that concept's chain);
- what the daemon writes to the instance per idle tick, from Dagster's own records: the folder sensor's tick
  (its cursor and skip reason), the automation sensor's tick, its cursor, and the condition evaluations it stores
  (only those whose result changed) - and so per day of idle ticks at one tick per 30 s each;
- peak RSS of the process (`resource.getrusage`).

    python benchmarks/bench_concepts.py                                  # 10, 1,000, 10,000; all storages
    python benchmarks/bench_concepts.py --concepts 100000 --storage postgres

PostgreSQL: a throwaway server from scripts/postgres.sh (the binaries Debian installs), one database per count,
the team profile dagster_home/dagster.postgres.yaml; `postgres+pgbouncer` is the same database through PgBouncer
(Debian's pgbouncer; session pooling). SQLite: the local profile dagster_home/dagster.yaml.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROFILES = {"sqlite": REPO / "dagster_home" / "dagster.yaml",
            "postgres": REPO / "dagster_home" / "dagster.postgres.yaml",
            "postgres+pgbouncer": REPO / "dagster_home" / "dagster.postgres.yaml"}
SPEC = 'token = "sks"\nclass_noun = "dog"\nmethods = ["lora"]\n'
PHOTOS = ["astronaut", "chelsea", "coffee", "rocket"]
TICKS_PER_DAY = 24 * 3600 // 30  # both sensors tick every 30 s
LINKS_PER_FILE = 50_000
BUILT = ["raw_images", "captioned_images", "filtered_images", "clip_scored_images", "control_images", "class_images",
         "vae_latents"]
BUILT_ASSETS = int(os.environ.get("BENCH_BUILT_ASSETS", len(BUILT)))  # how many of them the batches recorded
SENSOR_ONLY = os.environ.get("BENCH_SENSOR_ONLY") == "1"  # set by --sensor-only for the measuring process


def write_concepts(data_root: Path, n: int, photos: int) -> None:
    """N concept folders, each with ``photos`` PNGs hard-linked from one small set, and a concept.toml."""
    import numpy as np
    from PIL import Image
    from skimage import data

    pool = data_root.parent / "photo_pool"
    pool.mkdir(parents=True)
    for i in range(photos):
        name = PHOTOS[i % len(PHOTOS)]
        img = Image.fromarray(np.asarray(getattr(data, name)())).convert("RGB").resize((96, 80))
        img.save(pool / f"{i:02d}_{name}.png")
    spec = pool / "concept.toml"
    spec.write_text(SPEC)
    files = sorted(pool.iterdir())
    for c in range(n):
        if c and c % LINKS_PER_FILE == 0:  # a file system limits the links to one file (ext4: 65,000)
            copy = data_root.parent / f"photo_pool_{c // LINKS_PER_FILE}"
            shutil.copytree(pool, copy)
            files = sorted(copy.iterdir())
        folder = data_root / f"concept-{c:06d}"
        folder.mkdir(parents=True)
        for p in files:
            os.link(p, folder / p.name)


def record(instance, events: list) -> None:
    """Store runless asset events as the daemon's report_runless_asset_event does, in batches where the storage
    writes batches (dagster-postgres: one insert per batch of one event type)."""
    from dagster._core.events import AssetObservationData, DagsterEvent, DagsterEventType, StepMaterializationData
    from dagster._core.events.log import EventLogEntry
    from dagster._core.instance.utils import RUNLESS_JOB_NAME, RUNLESS_RUN_ID

    import dagster as dg

    def entry(e):
        if isinstance(e, dg.AssetMaterialization):
            event = DagsterEvent(DagsterEventType.ASSET_MATERIALIZATION.value, job_name=RUNLESS_JOB_NAME,
                                 event_specific_data=StepMaterializationData(e))
        else:
            event = DagsterEvent(DagsterEventType.ASSET_OBSERVATION.value, job_name=RUNLESS_JOB_NAME,
                                 event_specific_data=AssetObservationData(e))
        return EventLogEntry(error_info=None, level="debug", user_message="", run_id=RUNLESS_RUN_ID,
                             timestamp=time.time(), dagster_event=event)

    for i in range(0, len(events), 1000):
        instance.event_log_storage.store_event_batch([entry(e) for e in events[i:i + 1000]])


def measure(workdir: Path) -> dict:
    """One (storage, N) measurement in this process; the instance's DAGSTER_HOME is workdir/dagster_home."""
    import resource

    import dagster as dg
    from dagster._core.definitions.run_request import InstigatorType
    from dagster._core.scheduler.instigation import TickData, TickStatus
    from dagster._serdes import serialize_value

    from assets_pipeline import sensors
    from assets_pipeline.automation import dataset_automation_sensor
    from assets_pipeline.definitions import ASSETS, default_resources
    from assets_pipeline.partitions.discovery import RACY_S, folder_digest
    from assets_pipeline.resources import PipelineStorage

    storage = PipelineStorage(data_root=str(workdir / "data"), artifact_root=str(workdir / "artifacts"))
    defs = dg.Definitions(assets=ASSETS, resources={**default_resources(), "storage": storage})
    out: dict = {"rss_after_imports_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    time.sleep(RACY_S)  # the folders were just written: past the index's racy window, as any settled folder is

    def timed(key, fn):  # wall and this process's CPU seconds (the CPU figure is steadier on a shared machine)
        t, cpu = time.perf_counter(), time.process_time()
        value = fn()
        out[key] = round(time.perf_counter() - t, 3)
        out[key.removesuffix("_s") + "_cpu_s"] = round(time.process_time() - cpu, 3)
        return value

    graph = defs.resolve_asset_graph()

    def evaluate(instance, cursor):
        """One tick of the dataset_automation sensor as the daemon evaluates it (its target, its cursor,
        backfills): (the partitions it requests, its new cursor, the evaluations the daemon stores)."""
        from dagster._core.definitions.asset_daemon_cursor import AssetDaemonCursor
        from dagster._core.definitions.automation_tick_evaluation_context import AutomationTickEvaluationContext

        cursor = cursor or AssetDaemonCursor.empty()
        requests, new_cursor, stored = AutomationTickEvaluationContext(
            evaluation_id=cursor.evaluation_id + 1, instance=instance, asset_graph=graph, cursor=cursor,
            materialize_run_tags={}, observe_run_tags={}, auto_observe_asset_keys=set(),
            asset_selection=dataset_automation_sensor.asset_selection, emit_backfills=True,
            logger=logging.getLogger("bench")).evaluate()
        requested = sum(len(list(r.asset_graph_subset.iterate_asset_partitions())) if r.asset_graph_subset
                        else len(r.asset_selection or ()) for r in requests)
        return requested, new_cursor, stored

    def evaluate_sensor(instance, cursor):  # what the code server does on a tick
        with dg.build_sensor_context(instance=instance, cursor=cursor, resources={"storage": storage}) as ctx:
            return sensors.concept_folder_sensor(ctx)

    def store(instance, result):  # what the daemon then does with the result
        record(instance, list(result.asset_events))
        for request in result.dynamic_partitions_requests or []:
            instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))

    def tick(instance, cursor):
        result = evaluate_sensor(instance, cursor)
        store(instance, result)
        return result

    def automation(instance):
        """The automation's evaluations with nothing changed, and what the daemon writes per idle tick."""
        _, cursor, _ = timed("eval_first_s", lambda: evaluate(instance, None))
        out["eval_steady_requested"], cursor, _ = timed("eval_steady_s", lambda: evaluate(instance, cursor))
        _, cursor, stored = timed("eval_steady2_s", lambda: evaluate(instance, cursor))
        # what the daemon writes per idle automation tick: its cursor, its tick, the evaluations it stores
        from dagster._daemon.asset_daemon import asset_daemon_cursor_to_instigator_serialized_cursor

        out["automation_cursor_bytes"] = len(asset_daemon_cursor_to_instigator_serialized_cursor(cursor))
        out["automation_evaluations_stored"] = len(stored)
        auto_tick = TickData(instigator_origin_id="x" * 40, instigator_name="dataset_automation",
                             instigator_type=InstigatorType.SENSOR, status=TickStatus.SKIPPED,
                             timestamp=time.time(), selector_id="x" * 40, auto_materialize_evaluation_id=1,
                             log_key=["sensor", "dataset_automation", "x" * 36])
        out["automation_tick_bytes"] = len(serialize_value(auto_tick)) + sum(len(serialize_value(e)) for e in stored)
        out["idle_mb_per_day"] = round(TICKS_PER_DAY * (out["sensor_tick_bytes"] + out["automation_tick_bytes"]
                                                        + out["automation_cursor_bytes"]) / 1e6, 2)
        return cursor

    with dg.DagsterInstance.from_config(str(workdir / "dagster_home")) as instance:
        # registers N, requests the batch builds; the daemon then stores N partitions (timed apart)
        first = timed("first_tick_s", lambda: evaluate_sensor(instance, None))
        timed("register_partitions_s", lambda: store(instance, first))
        names = instance.get_dynamic_partitions("concepts")
        out["registered_first_tick"] = len(names)
        out["batch_runs_requested"] = len(first.run_requests)
        out["concepts_per_batch_run"] = max(len(r.run_config["ops"]["build_inputs"]["config"]["concepts"])
                                            for r in first.run_requests)
        # What each batch build reports first: its concepts' folder versions and ingests.
        t = time.perf_counter()
        data = storage.data_path()
        record(instance, [sensors.observation(n, sensors.folder_index(data).folders[n]) for n in names])
        for asset in BUILT[:0 if SENSOR_ONLY else BUILT_ASSETS]:  # each asset's, as the batch reports them
            record(instance, [dg.AssetMaterialization(asset, partition=n, tags={"dagster/data_version": f"v1-{n}"})
                              for n in names])
        out["record_builds_s"] = round(time.perf_counter() - t, 1)
        second = timed("second_tick_s", lambda: tick(instance, first.cursor))  # asks Dagster once, for all
        assert second.asset_events == [] and second.run_requests == [], "a tick after the builds reported work"
        steady = timed("steady_tick_s", lambda: tick(instance, second.cursor))
        assert steady.asset_events == [] and steady.run_requests == [], "a steady tick reported work"
        out["cursor_bytes"] = len(steady.cursor.encode())
        sensor_tick = TickData(instigator_origin_id="x" * 40, instigator_name="concept_folder_sensor",
                               instigator_type=InstigatorType.SENSOR, status=TickStatus.SKIPPED,
                               timestamp=time.time(), selector_id="x" * 40, cursor=steady.cursor,
                               skip_reason=steady.skip_reason.skip_message if steady.skip_reason else None,
                               log_key=["sensor", "concept_folder_sensor", "x" * 36])
        out["sensor_tick_bytes"] = len(serialize_value(sensor_tick))

        if not SENSOR_ONLY:  # (see --sensor-only)
            cursor = automation(instance)
        folder = data / names[len(names) // 2]
        os.link(next(folder.glob("*.png")), folder / "new_photo.png")
        changed = timed("changed_tick_s", lambda: tick(instance, steady.cursor))
        assert [e.partition for e in changed.asset_events] == [folder.name], changed.asset_events
        if not SENSOR_ONLY:
            out["eval_one_changed_requested"], _, _ = timed("eval_one_changed_s", lambda: evaluate(instance, cursor))
        assert folder_digest(folder) == changed.asset_events[0].tags["dagster/data_version"]
        sensors._INDEXES.clear()  # a code-server restart: the index is empty again
        restart = timed("restart_tick_s", lambda: tick(instance, changed.cursor))
        assert restart.asset_events == [] and restart.run_requests == [], "a restart reported work"
        out["restart_tick_read"] = len(sensors.folder_index(data).folders)
    out["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return out


def create_database(server_url: str, name: str) -> str:
    import psycopg2

    admin = psycopg2.connect(server_url.replace("postgresql+psycopg2://", "postgresql://"))
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        cur.execute(f"CREATE DATABASE {name}")
    admin.close()
    return server_url.rsplit("/", 1)[0] + "/" + name


def run_one(storage: str, n: int, photos: int, root: Path, urls: dict, sensor_only: bool = False) -> dict:
    workdir = root / f"{storage.replace('+', '-')}-{n}"
    t = time.perf_counter()
    write_concepts(workdir / "data", n, photos)
    made = round(time.perf_counter() - t, 1)
    (workdir / "dagster_home").mkdir()
    shutil.copy(PROFILES[storage], workdir / "dagster_home" / "dagster.yaml")
    env = {**os.environ, "BENCH_SENSOR_ONLY": "1" if sensor_only else "0"}
    if storage.startswith("postgres"):
        name = f"bench_{storage.replace('+', '_')}_{n}"
        create_database(urls["postgres"], name)
        env["DAGSTER_PG_URL"] = urls[storage].rsplit("/", 1)[0] + "/" + name
    out = subprocess.run([sys.executable, __file__, "--measure", str(workdir)], env=env, capture_output=True,
                         text=True)
    shutil.rmtree(workdir, ignore_errors=True)
    if out.returncode:
        sys.exit(f"{storage} {n}: the measurement failed:\n{out.stderr[-4000:]}")
    return {"storage": storage, "concepts": n, "folders_written_s": made,
            **json.loads(out.stdout.strip().splitlines()[-1])}


COLUMNS = ["first_tick_s", "register_partitions_s", "second_tick_s", "steady_tick_s", "changed_tick_s", "restart_tick_s",
           "restart_tick_read", "cursor_bytes", "batch_runs_requested", "concepts_per_batch_run", "peak_rss_mib"]
AUTOMATION = ["eval_first_s", "eval_steady_s", "eval_steady2_s", "eval_one_changed_s", "eval_one_changed_requested",
              "automation_evaluations_stored",
              "sensor_tick_bytes", "automation_tick_bytes", "automation_cursor_bytes", "idle_mb_per_day"]
CPU_COLUMNS = ["first_tick_cpu_s", "steady_tick_cpu_s", "changed_tick_cpu_s", "restart_tick_cpu_s",
               "eval_first_cpu_s", "eval_steady_cpu_s", "eval_steady2_cpu_s", "eval_one_changed_cpu_s"]
GROWTH = ["first_tick_s", "steady_tick_s", "changed_tick_s", "eval_steady_s", "eval_steady_cpu_s", "idle_mb_per_day",
          "peak_rss_mib"]


def table(rows: list[dict], columns: list[str]) -> None:
    print(f"{'storage':<19}{'concepts':>9}" + "".join(f"{c:>{max(len(c) + 2, 10)}}" for c in columns))
    for r in rows:
        print(f"{r['storage']:<19}{r['concepts']:>9}"
              + "".join(f"{r.get(c, '-'):>{max(len(c) + 2, 10)}}" for c in columns))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concepts", type=int, nargs="+", default=[10, 1000, 10000])
    ap.add_argument("--photos", type=int, default=4, help="photos per concept")
    ap.add_argument("--storage", nargs="+", choices=sorted(PROFILES), default=sorted(PROFILES))
    ap.add_argument("--sensor-only", type=int, nargs="*", default=[], metavar="N",
                    help="at these counts on SQLite, measure the folder sensor only: Dagster's SQLite storage writes "
                    "each event in its own transaction (~4 ms here), so recording a built instance of 100,000 "
                    "concepts (800,000 events) takes an hour")
    ap.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # internal: one measurement in this process
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return 0

    root = Path(tempfile.mkdtemp(prefix="bench_concepts_"))
    # Its own folder: the server runs as the postgres user, which cannot enter the private temporary folder.
    pg_dir = tempfile.mkdtemp(prefix="pg-")
    os.chmod(pg_dir, 0o755)
    pg_env = {**os.environ, "ASSETS_PIPELINE_PG_DIR": pg_dir, "ASSETS_PIPELINE_PG_PORT": "55433",
              "ASSETS_PIPELINE_PGBOUNCER_PORT": "55434"}
    urls: dict = {}
    if any(s.startswith("postgres") for s in args.storage):
        for command, key in (("start", "postgres"), ("pooler", "postgres+pgbouncer")):
            started = subprocess.run(["bash", str(REPO / "scripts" / "postgres.sh"), command], env=pg_env,
                                     capture_output=True, text=True)
            if started.returncode:
                sys.exit(f"scripts/postgres.sh {command} failed:\n{started.stderr}")
            urls[key] = started.stdout.strip()
    rows = []
    try:
        for n in args.concepts:
            for storage in args.storage:
                rows.append(run_one(storage, n, args.photos, root, urls,
                                    sensor_only=storage == "sqlite" and n in args.sensor_only))
                print(json.dumps(rows[-1]), flush=True)
    finally:
        if urls:
            subprocess.run(["bash", str(REPO / "scripts" / "postgres.sh"), "stop"], env=pg_env, capture_output=True)
        shutil.rmtree(root, ignore_errors=True)

    rows.sort(key=lambda r: (r["storage"], r["concepts"]))
    print("\nthe folder sensor (wall seconds; cursor bytes; peak RSS MiB of the measuring process):")
    table(rows, COLUMNS)
    print("\nthe automation (wall seconds), and what the daemon writes per idle tick (bytes) and per idle day (MB):")
    table(rows, AUTOMATION)
    print("\nCPU seconds of the measuring process (the database server's own work not included):")
    table(rows, CPU_COLUMNS)
    print("\ngrowth from one count to the next (value at the larger count / at the smaller):")
    for storage in args.storage:
        mine = [r for r in rows if r["storage"] == storage]
        for a, b in zip(mine, mine[1:]):
            ratios = {c: round(b[c] / a[c], 1) if a.get(c) and b.get(c) else None for c in GROWTH}
            print(f"  {storage} {a['concepts']} -> {b['concepts']} (x{b['concepts'] / a['concepts']:g}): "
                  f"{json.dumps(ratios)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
