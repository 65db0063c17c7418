"""How the automation's cost grows with the number of concepts, on SQLite and on PostgreSQL.

For each count, N concept folders with a few small photos each (hard links of the same files: cheap to create);
then, in a fresh process per (storage, N) so that its peak memory is its own:

- the concept-folder sensor's first tick (registers N partitions, requests the first MAX_RUNS_PER_TICK ingests)
  and a steady tick (every folder already requested, nothing changed: what every later tick costs);
- the sensor's cursor size at steady state (stored with every tick);
- one declarative-automation evaluation of the definitions (`dagster.evaluate_automation_conditions`): the first
  (records the state), one after every concept's `raw_images` got a new data version (requests each concept's
  dataset chain: the burst after a mass upload), and one with nothing changed (every later tick);
- peak RSS of the process (`resource.getrusage`).

    python benchmarks/bench_concepts.py                            # 10, 100, 1000 concepts; sqlite and postgres
    python benchmarks/bench_concepts.py --concepts 10 100 --storage sqlite

The ingests are recorded as runless materializations with a data version (what the ingest runs would report),
not run: this measures the sensor and the automation, not ingest. PostgreSQL: a throwaway server from
scripts/postgres.sh (the binaries Debian installs), one database per count, the team profile
dagster_home/dagster.postgres.yaml; SQLite: the local profile dagster_home/dagster.yaml.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROFILES = {"sqlite": REPO / "dagster_home" / "dagster.yaml", "postgres": REPO / "dagster_home" / "dagster.postgres.yaml"}
SPEC = 'token = "sks"\nclass_noun = "dog"\nmethods = ["lora"]\n'
PHOTOS = ["astronaut", "chelsea", "coffee", "rocket"]


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
    for c in range(n):
        folder = data_root / f"concept-{c:06d}"
        folder.mkdir(parents=True)
        (folder / "concept.toml").write_text(SPEC)
        for p in sorted(pool.iterdir()):
            os.link(p, folder / p.name)


def measure(workdir: Path) -> dict:
    """One (storage, N) measurement in this process; the instance's DAGSTER_HOME is workdir/dagster_home."""
    import resource

    import dagster as dg

    from assets_pipeline.automation import dataset_automation_sensor
    from assets_pipeline.definitions import ASSETS, default_resources
    from assets_pipeline.partitions.discovery import scan_concepts
    from assets_pipeline.resources import PipelineStorage
    from assets_pipeline.sensors import concept_folder_sensor

    storage = PipelineStorage(data_root=str(workdir / "data"), artifact_root=str(workdir / "artifacts"))
    defs = dg.Definitions(assets=ASSETS, resources={**default_resources(), "storage": storage})
    out: dict = {"rss_after_imports_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}

    def timed(key, fn):  # wall and this process's CPU seconds (the CPU figure is steadier on a shared machine)
        t, cpu = time.perf_counter(), time.process_time()
        value = fn()
        out[key] = round(time.perf_counter() - t, 3)
        out[key.removesuffix("_s") + "_cpu_s"] = round(time.process_time() - cpu, 3)
        return value

    def evaluate(instance, cursor):  # one tick of the dataset_automation sensor (its target, its cursor)
        return dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=cursor,
                                                 asset_selection=dataset_automation_sensor.asset_selection)

    def tick(instance, cursor):
        with dg.build_sensor_context(instance=instance, cursor=cursor, resources={"storage": storage}) as ctx:
            return concept_folder_sensor(ctx)

    with dg.DagsterInstance.from_config(str(workdir / "dagster_home")) as instance:
        first = timed("first_tick_s", lambda: tick(instance, None))
        [request] = first.dynamic_partitions_requests
        timed("register_partitions_s",  # what the daemon does with the first tick's result
              lambda: instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys)))
        out["runs_requested_first_tick"] = len(first.run_requests)
        # Steady state: every folder's ingest already requested (the cursor after N / MAX_RUNS_PER_TICK ticks).
        steady_cursor = json.dumps(scan_concepts(storage.data_path()).concepts, sort_keys=True)
        steady = timed("steady_tick_s", lambda: tick(instance, steady_cursor))
        assert steady.run_requests == [], "a steady tick requested runs"
        out["cursor_kib"] = round(len(steady.cursor.encode()) / 1024, 1)

        first_eval = timed("eval_first_s", lambda: evaluate(instance, None))
        t = time.perf_counter()
        for key in request.partition_keys:  # every concept ingested: a new data version for each raw_images
            instance.report_runless_asset_event(dg.AssetMaterialization(
                "raw_images", partition=key, tags={"dagster/data_version": f"v1-{key}"}))
        out["record_ingests_s"] = round(time.perf_counter() - t, 3)
        burst = timed("eval_burst_s", lambda: evaluate(instance, first_eval.cursor))
        out["eval_burst_requested"] = burst.total_requested
        quiet = timed("eval_steady_s", lambda: evaluate(instance, burst.cursor))
        out["eval_steady_requested"] = quiet.total_requested
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


def run_one(storage: str, n: int, photos: int, root: Path, pg_url: str | None) -> dict:
    workdir = root / f"{storage}-{n}"
    write_concepts(workdir / "data", n, photos)
    (workdir / "dagster_home").mkdir()
    shutil.copy(PROFILES[storage], workdir / "dagster_home" / "dagster.yaml")
    env = dict(os.environ)
    if storage == "postgres":
        env["DAGSTER_PG_URL"] = create_database(pg_url, f"bench_{n}")
    out = subprocess.run([sys.executable, __file__, "--measure", str(workdir)], env=env, check=True,
                         capture_output=True, text=True)
    shutil.rmtree(workdir / "data")
    return {"storage": storage, "concepts": n, **json.loads(out.stdout.strip().splitlines()[-1])}


COLUMNS = ["first_tick_s", "steady_tick_s", "cursor_kib", "eval_first_s", "eval_burst_s", "eval_burst_requested",
           "eval_steady_s", "peak_rss_mib"]
CPU_COLUMNS = ["first_tick_cpu_s", "steady_tick_cpu_s", "register_partitions_cpu_s", "eval_first_cpu_s",
               "eval_burst_cpu_s", "eval_steady_cpu_s"]
GROWTH = ["first_tick_s", "steady_tick_s", "cursor_kib", "eval_burst_s", "eval_steady_s", "steady_tick_cpu_s",
          "eval_burst_cpu_s", "eval_steady_cpu_s", "peak_rss_mib"]


def table(rows: list[dict], columns: list[str]) -> None:
    print(f"{'storage':<9}{'concepts':>9}" + "".join(f"{c:>{max(len(c) + 2, 10)}}" for c in columns))
    for r in rows:
        print(f"{r['storage']:<9}{r['concepts']:>9}" + "".join(f"{r[c]:>{max(len(c) + 2, 10)}}" for c in columns))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concepts", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--photos", type=int, default=4, help="photos per concept")
    ap.add_argument("--storage", nargs="+", choices=sorted(PROFILES), default=["sqlite", "postgres"])
    ap.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # internal: one measurement in this process
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return 0

    root = Path(tempfile.mkdtemp(prefix="bench_concepts_"))
    # Its own folder: the server runs as the postgres user, which cannot enter the private temporary folder.
    pg_env = {**os.environ, "ASSETS_PIPELINE_PG_DIR": tempfile.mkdtemp(prefix="pg-"), "ASSETS_PIPELINE_PG_PORT": "55433"}
    pg_url = None
    if "postgres" in args.storage:
        started = subprocess.run(["bash", str(REPO / "scripts" / "postgres.sh"), "start"], env=pg_env,
                                 capture_output=True, text=True)
        if started.returncode:
            sys.exit(f"scripts/postgres.sh start failed:\n{started.stderr}")
        pg_url = started.stdout.strip()
    rows = []
    try:
        for storage in args.storage:
            for n in args.concepts:
                rows.append(run_one(storage, n, args.photos, root, pg_url))
                print(json.dumps(rows[-1]), flush=True)
    finally:
        if pg_url:
            subprocess.run(["bash", str(REPO / "scripts" / "postgres.sh"), "stop"], env=pg_env, capture_output=True)
        shutil.rmtree(root, ignore_errors=True)

    print("\nwall seconds, cursor KiB, peak RSS MiB:")
    table(rows, COLUMNS)
    print("\nCPU seconds of the measuring process (PostgreSQL's own work not included):")
    table(rows, CPU_COLUMNS)
    print("\ngrowth from one count to the next (value at the larger count / at the smaller):")
    for storage in args.storage:
        mine = [r for r in rows if r["storage"] == storage]
        for a, b in zip(mine, mine[1:]):
            ratios = {c: round(b[c] / a[c], 1) if a[c] else None for c in GROWTH}
            print(f"  {storage} {a['concepts']} -> {b['concepts']} (x{b['concepts'] / a['concepts']:g}): "
                  f"{json.dumps(ratios)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
