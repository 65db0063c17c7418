"""The PostgreSQL URL of the team instance (dagster_home/dagster.postgres.yaml, assets_pipeline/postgres.py): the
forms people write are taken, anything else is refused with what was expected, never with the password. The
same forms against a real server: tests/test_postgres.py::test_the_usual_url_forms_open_the_team_instance."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

PROFILE = Path(__file__).resolve().parents[1] / "dagster_home" / "dagster.postgres.yaml"


@pytest.mark.parametrize("url, expected", [
    ("postgresql://u:p%40ss@db.example:5433/dagster?sslmode=require",
     "postgresql+psycopg2://u:p%40ss@db.example:5433/dagster?sslmode=require"),
    ("postgres://u@db.example/dagster", "postgresql+psycopg2://u@db.example/dagster"),
    ("postgresql+psycopg2://u@127.0.0.1:55432/dagster", "postgresql+psycopg2://u@127.0.0.1:55432/dagster"),
    ("postgres+psycopg2://u@h/d", "postgresql+psycopg2://u@h/d"),
    ("  postgresql://u@h/d\n", "postgresql+psycopg2://u@h/d"),  # pasted with a newline
])
def test_the_usual_forms_name_the_installed_driver(url, expected):
    from assets_pipeline.postgres import normalize_postgres_url

    assert normalize_postgres_url(url) == expected


@pytest.mark.parametrize("url, says", [
    ("localhost:5432", "not a URL"),
    ("", "not a URL"),
    ("mysql://u:hunter2@h/d", "'mysql' is not PostgreSQL's"),
    ("postgresql+nosuchdriver://u:hunter2@h/d", "driver 'nosuchdriver', which is not installed"),
])
def test_anything_else_is_refused_with_what_was_expected_and_no_password(url, says):
    from assets_pipeline.postgres import normalize_postgres_url

    with pytest.raises(ValueError, match="expected postgresql://user") as e:
        normalize_postgres_url(url)
    assert says in str(e.value) and "$DAGSTER_PG_URL" in str(e.value)
    assert "hunter2" not in str(e.value)


def test_the_team_profile_opens_its_storages_with_a_bare_postgresql_url(tmp_path, monkeypatch):
    """Through Dagster's own loading of the profile, in any process: the storages get the driver named (the
    storage's engine is not built here: no server), and a bad URL fails there with the message above."""
    import dagster_postgres
    from dagster._core.instance.ref import InstanceRef
    from dagster._core.storage.event_log import EventLogStorage
    from dagster._core.storage.runs import RunStorage
    from dagster._core.storage.schedules import ScheduleStorage

    (tmp_path / "dagster.yaml").write_text(PROFILE.read_text())
    seen = []

    def no_connection(self, postgres_url, *args, **kwargs):
        seen.append((type(self).__name__, postgres_url))

    for cls in (dagster_postgres.PostgresRunStorage, dagster_postgres.PostgresEventLogStorage,
                dagster_postgres.PostgresScheduleStorage):
        monkeypatch.setattr(cls, "__init__", no_connection)
    monkeypatch.setenv("DAGSTER_PG_URL", "postgresql://team@db.example:5432/dagster")
    ref = InstanceRef.from_dir(str(tmp_path))
    for data, kind in ((ref.run_storage_data, RunStorage), (ref.event_storage_data, EventLogStorage),
                       (ref.schedule_storage_data, ScheduleStorage)):
        data.rehydrate(kind)
    assert seen == [(name, "postgresql+psycopg2://team@db.example:5432/dagster") for name in (
        "PostgresRunStorage", "PostgresEventLogStorage", "PostgresScheduleStorage")]

    monkeypatch.setenv("DAGSTER_PG_URL", "db.example:5432")
    with pytest.raises(ValueError, match="'db.example:5432', not a URL: expected postgresql://"):
        InstanceRef.from_dir(str(tmp_path)).run_storage_data.rehydrate(RunStorage)
    assert yaml.safe_load(PROFILE.read_text())["run_storage"]["config"] == {"postgres_url": {"env": "DAGSTER_PG_URL"}}
