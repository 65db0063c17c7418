"""The team instance, dagster_home/dagster.postgres.yaml, on a real PostgreSQL server.

One throwaway server for the session, started by scripts/postgres.sh from the binaries Debian installs; each
test (and the daemon tests' shared daemon) gets its own database. Skipped, with the reason, only where those
binaries are absent (.ci/run installs them). Instances are read from the shipped profile, only timing values
shortened, as tests/test_run_monitoring.py does for the local profile.
"""

from __future__ import annotations

import os
import re
import signal
import shutil
import subprocess
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pytest
import yaml

from conftest import link_models
from daemon_helpers import free_port, kill_group, launch, launched, start_code_server, start_daemon, wait_for
from helpers import encode, photo, write_concept
from test_automation import DATASET_CHAIN, SPEC, photos, requested
from test_sensors import tick

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
PROFILE = REPO / "dagster_home" / "dagster.postgres.yaml"
LOCAL_PROFILE = REPO / "dagster_home" / "dagster.yaml"
SCRIPT = REPO / "scripts" / "postgres.sh"
DATASET_HALF = {"raw_images", *DATASET_CHAIN}


def _server_binaries() -> Path | None:
    """Where scripts/postgres.sh looks: $ASSETS_PIPELINE_PG_BIN, else the newest /usr/lib/postgresql/*/bin."""
    if os.environ.get("ASSETS_PIPELINE_PG_BIN"):
        candidates = [Path(os.environ["ASSETS_PIPELINE_PG_BIN"])]
    else:
        candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name)
                            if p.parent.name.isdigit() else 0, reverse=True)
    return next((p for p in candidates if (p / "pg_ctl").is_file()), None)


@pytest.fixture(scope="session")
def postgres_env() -> tuple[dict, str]:
    """A server on a free loopback port for the session: the environment scripts/postgres.sh ran with, and the
    URL of its `dagster` database."""
    if _server_binaries() is None:
        pytest.skip("PostgreSQL server binaries not found (/usr/lib/postgresql/*/bin/pg_ctl): install Debian's "
                    "postgresql package, as .ci/run does")
    folder = tempfile.mkdtemp(prefix="pg-")  # short: the server's Unix socket path must fit in 107 bytes
    env = {**os.environ, "ASSETS_PIPELINE_PG_PORT": str(free_port()), "ASSETS_PIPELINE_PG_DIR": folder,
           "ASSETS_PIPELINE_PGBOUNCER_PORT": str(free_port())}
    res = subprocess.run(["bash", str(SCRIPT), "start"], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, f"scripts/postgres.sh start failed:\n{res.stdout}\n{res.stderr}"
    try:
        yield env, res.stdout.strip()
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop"], env=env, capture_output=True, timeout=60)


@pytest.fixture(scope="session")
def postgres_server(postgres_env) -> str:
    return postgres_env[1]


def test_the_instance_runs_through_pgbouncer(postgres_env, tmp_path, monkeypatch):
    """`scripts/postgres.sh pooler`: PgBouncer in front of the server; Dagster's storages work through it (session
    pooling), every connection they open goes to PgBouncer, and `stop` stops it with the server."""
    from assets_pipeline.sensors import CONCEPT_FOLDERS, reported_versions

    if not (shutil.which("pgbouncer") or Path("/usr/sbin/pgbouncer").is_file()):
        pytest.skip("pgbouncer not found: install Debian's pgbouncer package, as .ci/run does")
    env, server = postgres_env
    res = subprocess.run(["bash", str(SCRIPT), "pooler"], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, f"scripts/postgres.sh pooler failed:\n{res.stderr}"
    pooled = res.stdout.strip()
    assert pooled.endswith("/dagster") and f":{env['ASSETS_PIPELINE_PGBOUNCER_PORT']}/" in pooled
    again = subprocess.run(["bash", str(SCRIPT), "pooler"], env=env, capture_output=True, text=True, timeout=60)
    assert again.stdout.strip() == pooled  # running already: its URL, not a second one
    with database(server, "pooled") as direct:
        name = direct.rsplit("/", 1)[1]
        monkeypatch.setenv("DAGSTER_PG_URL", pooled.rsplit("/", 1)[0] + "/" + name)
        with dg.DagsterInstance.from_config(str(write_home(tmp_path / "home"))) as instance:
            instance.add_dynamic_partitions("concepts", ["rusty"])
            instance.report_runless_asset_event(dg.AssetObservation(CONCEPT_FOLDERS, partition="rusty",
                                                                    tags={"dagster/data_version": "v1"}))
            assert reported_versions(instance, ["rusty"]) == {"rusty": "v1"}
            assert instance.get_dynamic_partitions("concepts") == ["rusty"]
    log = (Path(env["ASSETS_PIPELINE_PG_DIR"]) / "pgbouncer.log").read_text()
    assert f"login attempt: db={name}" in log  # Dagster's connections went through PgBouncer


@contextmanager
def database(server_url: str, label: str):
    """A fresh database on the server (dropped afterwards); yields its URL."""
    import psycopg2

    name = re.sub(r"[^a-z0-9]+", "_", label.lower())[:40] + "_" + uuid.uuid4().hex[:8]
    admin = psycopg2.connect(server_url.replace("postgresql+psycopg2://", "postgresql://"))
    admin.autocommit = True
    try:
        with admin.cursor() as cur:
            cur.execute(f"CREATE DATABASE {name}")
        try:
            yield server_url.rsplit("/", 1)[0] + "/" + name
        finally:
            with admin.cursor() as cur:
                cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        admin.close()


def write_home(folder: Path, fast: bool = False) -> Path:
    """A DAGSTER_HOME whose dagster.yaml is the shipped profile; ``fast``: daemon intervals of a second."""
    config = yaml.safe_load(PROFILE.read_text())
    if fast:
        config["run_monitoring"].update(poll_interval_seconds=1, free_slots_after_run_end_seconds=2)
        config["run_coordinator"]["config"]["dequeue_interval_seconds"] = 1
    folder.mkdir(parents=True)
    (folder / "dagster.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return folder


@pytest.fixture
def pg_home(postgres_server, request, tmp_path, monkeypatch) -> Path:
    with database(postgres_server, request.node.name) as url:
        monkeypatch.setenv("DAGSTER_PG_URL", url)
        yield write_home(tmp_path / "dagster_home")


def _resources(storage):
    from assets_pipeline.definitions import default_resources

    return {**default_resources(), "storage": storage}


def _storage(root: Path, built_models: Path):
    from assets_pipeline.resources import PipelineStorage

    return PipelineStorage(data_root=str(root / "data"),
                           artifact_root=str(link_models(built_models, root / "artifacts")))


def test_profile_is_the_local_one_on_postgres_with_one_training_run_per_gpu(pg_home):
    from assets_pipeline.definitions import defs
    from assets_pipeline.jobs import TRAINING_RUN_TAGS

    team, local = yaml.safe_load(PROFILE.read_text()), yaml.safe_load(LOCAL_PROFILE.read_text())
    storage = {"postgres_url": {"env": "DAGSTER_PG_URL"}}  # normalized by assets_pipeline/postgres.py
    assert "storage" not in team and [(team[k]["module"], team[k]["class"], team[k]["config"]) for k in (
        "run_storage", "event_log_storage", "schedule_storage")] == [
        ("assets_pipeline.postgres", "PostgresRunStorage", storage),
        ("assets_pipeline.postgres", "PostgresEventLogStorage", storage),
        ("assets_pipeline.postgres", "PostgresScheduleStorage", storage)]
    assert team["run_monitoring"] == local["run_monitoring"]
    assert team["concurrency"]["pools"] == local["concurrency"]["pools"]
    assert team["concurrency"]["runs"]["max_concurrent_runs"] == local["concurrency"]["runs"]["max_concurrent_runs"]
    assert team.get("telemetry") == local.get("telemetry")
    # As many training runs at once as GPU slots; every job that trains carries the tag, no other job does.
    [(tag, value)] = TRAINING_RUN_TAGS.items()
    assert team["concurrency"]["runs"]["tag_concurrency_limits"] == [
        {"key": tag, "limit": team["concurrency"]["pools"]["default_limit"]}]
    tagged = {job.name for job in defs.resolve_all_job_defs() if job.run_tags.get(tag) == value}
    assert tagged == {"train_models", "train_concept", "train_packs"}

    with dg.DagsterInstance.from_config(str(pg_home)) as instance:
        assert [type(s).__name__ for s in (instance.run_storage, instance.event_log_storage,
                                           instance.schedule_storage)] == [
            "PostgresRunStorage", "PostgresEventLogStorage", "PostgresScheduleStorage"]
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
        queue = instance.get_concurrency_config().run_queue_config
        assert queue.tag_concurrency_limits == [{"key": tag, "limit": 1}] and queue.max_concurrent_runs == 4
        assert instance.run_monitoring_enabled and instance.event_log_storage.supports_global_concurrency_limits


def test_the_usual_url_forms_open_the_team_instance(postgres_server, tmp_path, monkeypatch):
    """$DAGSTER_PG_URL as people write it (postgresql://, postgres://) or with the driver named: each opens the
    same database through the shipped profile, which writes and reads it (SQLAlchemy 2.1 alone takes a bare
    postgresql:// for psycopg 3, not installed, and does not know postgres://)."""
    home = write_home(tmp_path / "dagster_home")
    with database(postgres_server, "url_forms") as url:
        rest = url.split("://", 1)[1]
        assert url.startswith("postgresql://")  # scripts/postgres.sh prints the usual form
        for scheme in ("postgresql", "postgres", "postgresql+psycopg2"):
            monkeypatch.setenv("DAGSTER_PG_URL", f"{scheme}://{rest}")
            with dg.DagsterInstance.from_config(str(home)) as instance:
                assert instance.run_storage.postgres_url == f"postgresql+psycopg2://{rest}"
                instance.add_dynamic_partitions("concepts", [scheme.replace("+", "_")])
        with dg.DagsterInstance.from_config(str(home)) as instance:
            assert sorted(instance.get_dynamic_partitions("concepts")) == [
                "postgres", "postgresql", "postgresql_psycopg2"]


def test_dataset_half_materializes_on_postgres(pg_home, tmp_path, built_models):
    from assets_pipeline.definitions import ASSETS, CHECKS

    storage = _storage(tmp_path, built_models)
    write_concept(Path(storage.data_root), "alpha", photos(["astronaut", "chelsea", "coffee", "rocket"]), SPEC)
    with dg.DagsterInstance.from_config(str(pg_home)) as instance:
        instance.add_dynamic_partitions("concepts", ["alpha"])
        res = dg.materialize([*ASSETS, *CHECKS], selection=dg.AssetSelection.groups("dataset", "priors", "latents"),
                             partition_key="alpha", instance=instance, resources=_resources(storage))
        assert res.success
        written = {e.materialization.asset_key.to_user_string(): e.materialization.tags["dagster/data_version"]
                   for e in res.get_asset_materialization_events()}
        checks = {e.check_name for e in res.get_asset_check_evaluations()}
    assert set(written) == DATASET_HALF
    assert {"enough_training_images", "subset_captioned"} <= checks

    # What another process (the UI, the daemon) reads back from the server.
    with dg.DagsterInstance.from_config(str(pg_home)) as other:
        for asset, version in written.items():
            event = other.get_latest_materialization_event(dg.AssetKey(asset))
            assert event.asset_materialization.partition == "alpha"
            assert event.asset_materialization.tags["dagster/data_version"] == version
        check = dg.AssetCheckKey(dg.AssetKey("clip_scored_images"), "subset_captioned")
        assert other.event_log_storage.get_latest_asset_check_execution_by_key([check])[check].run_id == res.run_id


def test_sensor_batch_build_and_automation_cycle_on_postgres(pg_home, tmp_path, built_models):
    """The folder sensor registers new concepts and requests their batch build, which builds both in one run; a
    changed folder is observed and automation requests the ingest and what it invalidates, for that concept only."""
    from assets_pipeline.assets.batch import build_concepts_job
    from assets_pipeline.automation import dataset_automation_sensor
    from assets_pipeline.definitions import ASSETS, CHECKS
    from assets_pipeline.sensors import reported_versions

    storage = _storage(tmp_path, built_models)
    data = Path(storage.data_root)
    for concept, extra in (("alpha", "rocket"), ("beta", "hubble_deep_field")):
        write_concept(data, concept, photos(["astronaut", "chelsea", "coffee", extra]), SPEC)
    resources = _resources(storage)
    defs = dg.Definitions(assets=ASSETS, asset_checks=CHECKS, jobs=[build_concepts_job], resources=resources)
    chain = {"raw_images", *DATASET_CHAIN}

    with dg.DagsterInstance.from_config(str(pg_home)) as instance:
        cursor = None

        def evaluate():  # one tick of the dataset_automation sensor; its cursor carries over, as in the daemon
            nonlocal cursor
            result = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=cursor,
                                                       asset_selection=dataset_automation_sensor.asset_selection)
            cursor = result.cursor
            return requested(result)

        assert evaluate() == {}  # the first tick records the state it starts from
        first = tick(instance, data, storage.artifact_root)
        assert instance.get_dynamic_partitions("concepts") == ["alpha", "beta"]  # registered on the server
        [request] = first.run_requests
        assert evaluate() == {}  # new concepts are their batch's
        run = defs.resolve_job_def("build_concepts").execute_in_process(
            run_config=request.run_config, instance=instance, tags=request.tags)
        assert run.success
        assert {(e.materialization.asset_key.to_user_string(), e.materialization.partition)
                for e in run.get_asset_materialization_events()} == {(a, c) for a in chain for c in ("alpha", "beta")}
        assert sorted(reported_versions(instance, ["alpha", "beta"])) == ["alpha", "beta"]  # observed there
        assert evaluate() == {}  # built, not requested again

        unchanged = tick(instance, data, storage.artifact_root, first.cursor)
        assert unchanged.asset_events == [] and unchanged.run_requests == []
        assert evaluate() == {}

        (data / "alpha" / "coins.png").write_bytes(encode(photo("coins", (96, 80)).convert("RGB"), "PNG"))
        changed = tick(instance, data, storage.artifact_root, unchanged.cursor)
        assert [e.partition for e in changed.asset_events] == ["alpha"]
        assert evaluate() == {asset: {"alpha"} for asset in chain}  # beta untouched


# --- a daemon, a code server and run workers on one Postgres instance -------------------------------------------

CODE = '''
import os
import time
from pathlib import Path

import dagster as dg

from assets_pipeline.assets.dataset import raw_images
from assets_pipeline.jobs import TRAINING_RUN_TAGS
from assets_pipeline.partitions.definitions import concepts_partitions
from assets_pipeline.resources import PipelineStorage

SIGNALS = Path({signals!r})


@dg.asset(partitions_def=concepts_partitions)
def training_inputs() -> None:
    """A training run's CPU part (a model asset checks its inputs and writes its job file before the GPU)."""


@dg.asset(partitions_def=concepts_partitions, pool="gpu", deps=[training_inputs])
def gpu_training(context: dg.AssetExecutionContext) -> None:
    """Holds the gpu slot until the test writes <concept>.release; <run id>.pid names its run worker."""
    (SIGNALS / f"{{context.run_id}}.pid").write_text(str(os.getpid()))  # in-process executor: the run worker
    release, deadline = SIGNALS / f"{{context.partition_key}}.release", time.monotonic() + 300
    while not release.exists():
        assert time.monotonic() < deadline, "never released"
        time.sleep(0.1)


@dg.asset(partitions_def=concepts_partitions, deps=[raw_images])
def ingested_together(context: dg.AssetExecutionContext) -> None:
    """Waits until two runs got here, so that they are in progress at the same time whatever the launch delays."""
    (SIGNALS / "together").mkdir(exist_ok=True)
    (SIGNALS / "together" / context.run_id).touch()
    deadline = time.monotonic() + 120
    while len(list((SIGNALS / "together").iterdir())) < 2:
        assert time.monotonic() < deadline, "the other run never came"
        time.sleep(0.1)


defs = dg.Definitions(
    assets=[raw_images, ingested_together, training_inputs, gpu_training],
    jobs=[
        # The project's ingest and training jobs, on the in-process executor (one process per run, not per step).
        dg.define_asset_job("ingest_concept", [raw_images], partitions_def=concepts_partitions,
                            executor_def=dg.in_process_executor),
        dg.define_asset_job("ingest_together", [raw_images, ingested_together], partitions_def=concepts_partitions,
                            executor_def=dg.in_process_executor),
        dg.define_asset_job("train", [training_inputs, gpu_training], partitions_def=concepts_partitions,
                            tags=TRAINING_RUN_TAGS, executor_def=dg.in_process_executor),
    ],
    resources={{"storage": PipelineStorage()}},  # roots from $ASSETS_PIPELINE_DATA / $ASSETS_PIPELINE_ARTIFACTS
)
'''

DATASET_CONCEPTS = ("alpha", "beta", "gamma")
TRAINING_CONCEPTS = ("t1", "t2", "t3")


@dataclass
class Team:
    home: Path
    env: dict
    workspace: Path
    signals: Path
    logs: list[Path]

    @contextmanager
    def instance(self):
        with dg.DagsterInstance.from_config(str(self.home)) as instance:
            yield instance

    def launch(self, job: str, concept: str):
        run_id = str(uuid.uuid4())
        return run_id, launch(self.workspace, self.env, job, run_id, {"dagster/partition": concept})

    def wait(self, what: str, predicate, timeout: float = 90):
        return wait_for(what, predicate, timeout, self.logs)


@pytest.fixture(scope="module")
def team(postgres_server, tmp_path_factory):
    """The team setup, once for these tests: `dagster-daemon run` and a code server on one Postgres database."""
    root = tmp_path_factory.mktemp("team")
    signals = root / "signals"
    signals.mkdir()
    for concept in DATASET_CONCEPTS:
        write_concept(root / "data", concept, photos(["astronaut", "chelsea", "coffee"]), SPEC)
    (root / "code").mkdir()
    (root / "code" / "team_defs.py").write_text(CODE.format(signals=str(signals)))
    with database(postgres_server, "team") as url, pytest.MonkeyPatch.context() as mp:
        mp.setenv("DAGSTER_PG_URL", url)  # for the tests' own instances
        env = {**os.environ, "DAGSTER_HOME": str(write_home(root / "dagster_home", fast=True)),
               "ASSETS_PIPELINE_DATA": str(root / "data"), "ASSETS_PIPELINE_ARTIFACTS": str(root / "artifacts")}
        with dg.DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:  # tables exist before any process
            instance.add_dynamic_partitions("concepts", [*DATASET_CONCEPTS, *TRAINING_CONCEPTS])
        logs = [root / "daemon.log", root / "code_server.log"]
        server, workspace = start_code_server(root / "code" / "team_defs.py", env, logs[1], "team")
        daemon = start_daemon(workspace, env, logs[0])
        try:
            yield Team(Path(env["DAGSTER_HOME"]), env, workspace, signals, logs)
        finally:
            kill_group(daemon, server)  # and the run workers the server launched


def _status(instance, run_id):
    run = instance.get_run_by_id(run_id)
    return run.status if run else None


def _gpu_holders(instance) -> set[str]:
    return instance.event_log_storage.get_concurrency_info("gpu").active_run_ids


def _records(instance, *run_ids):
    records = {r.dagster_run.run_id: r for r in instance.get_run_records(dg.RunsFilter(run_ids=list(run_ids)))}
    return [records[i] for i in run_ids]


def test_two_concepts_runs_at_once(team):
    alpha, alpha_launch = team.launch("ingest_together", "alpha")
    beta, beta_launch = team.launch("ingest_together", "beta")
    launched(alpha_launch, beta_launch)
    with team.instance() as instance:
        team.wait("both ingest runs to succeed",
                  lambda: {_status(instance, r) for r in (alpha, beta)} == {dg.DagsterRunStatus.SUCCESS})
        a, b = _records(instance, alpha, beta)
        assert max(a.start_time, b.start_time) < min(a.end_time, b.end_time), "the two runs did not overlap"
        for asset in ("raw_images", "ingested_together"):
            assert instance.get_materialized_partitions(dg.AssetKey(asset)) >= {"alpha", "beta"}
        ingests = instance.fetch_materializations(dg.AssetRecordsFilter(
            asset_key=dg.AssetKey("raw_images"), asset_partitions=["alpha", "beta"]), limit=10).records
        assert {(r.partition_key, r.run_id) for r in ingests} == {("alpha", alpha), ("beta", beta)}


def test_second_training_run_waits_queued_while_dataset_runs_go_on(team):
    with team.instance() as instance:
        first, first_launch = team.launch("train", "t1")
        launched(first_launch)
        team.wait("the first training run to take the gpu slot", lambda: _gpu_holders(instance) == {first})

        second, second_launch = team.launch("train", "t2")
        dataset, dataset_launch = team.launch("ingest_concept", "gamma")
        launched(second_launch, dataset_launch)
        team.wait("the dataset run to succeed while the first training run holds the GPU",
                  lambda: _status(instance, dataset) == dg.DagsterRunStatus.SUCCESS)
        time.sleep(2)  # two more dequeue intervals
        # Queued by the training tag's limit: its first step needs no slot, so the pool alone would have started it.
        assert _status(instance, second) == dg.DagsterRunStatus.QUEUED
        assert _status(instance, first) == dg.DagsterRunStatus.STARTED

        (team.signals / "t2.release").touch()  # the second will finish as soon as it runs
        (team.signals / "t1.release").touch()
        team.wait("both training runs to succeed",
                  lambda: {_status(instance, r) for r in (first, second)} == {dg.DagsterRunStatus.SUCCESS})
        one, two = _records(instance, first, second)
        assert two.start_time >= one.end_time
        assert _gpu_holders(instance) == set()


def test_killed_training_run_fails_frees_the_gpu_and_reruns(team):
    with team.instance() as instance:
        killed, killed_launch = team.launch("train", "t3")
        launched(killed_launch)
        pid_file = team.signals / f"{killed}.pid"
        team.wait("the training run to hold the gpu slot",
                  lambda: pid_file.exists() and _gpu_holders(instance) == {killed})
        os.kill(int(pid_file.read_text()), signal.SIGKILL)
        team.wait("the killed run to be marked FAILURE", lambda: _status(instance, killed) == dg.DagsterRunStatus.FAILURE)
        team.wait("its gpu slot to be freed", lambda: killed not in _gpu_holders(instance), 30)
        assert "t3" not in instance.get_materialized_partitions(dg.AssetKey("gpu_training"))

        (team.signals / "t3.release").touch()
        rerun, rerun_launch = team.launch("train", "t3")
        launched(rerun_launch)
        team.wait("the re-run to succeed", lambda: _status(instance, rerun) == dg.DagsterRunStatus.SUCCESS)
        assert "t3" in instance.get_materialized_partitions(dg.AssetKey("gpu_training"))
        assert _gpu_holders(instance) == set()
