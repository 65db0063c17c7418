"""The team instance's PostgreSQL storages (dagster_home/dagster.postgres.yaml): dagster-postgres' run, event-log
and schedule storages, taking the PostgreSQL URL in the forms people write.

dagster-postgres hands ``postgres_url`` to SQLAlchemy as it is. SQLAlchemy 2.1 reads a bare ``postgresql://`` as
psycopg 3 (not installed: ``ModuleNotFoundError: No module named 'psycopg'`` from deep inside it) and does not
know ``postgres://`` at all (Heroku's and libpq's form). These subclasses normalize the URL first, in every
process that opens the instance (UI, daemon, code server, run workers: the instance config names these classes):
``postgresql://``, ``postgres://`` and ``postgresql+psycopg2://`` all become ``postgresql+psycopg2://``, the
driver dagster-postgres installs. Anything else is refused with what was expected, the password masked.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Mapping
from typing import Any

import dagster_postgres

DRIVER = "psycopg2"  # installed with dagster-postgres (psycopg2-binary)
SCHEMES = ("postgresql", "postgres")
EXPECTED = ("postgresql://user[:password]@host[:port]/database (postgres:// and postgresql+psycopg2:// are "
            "accepted too)")


def masked(url: str) -> str:
    """``url`` with its password, if any, replaced by ``***`` (for messages)."""
    return re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1***@", url)


def normalize_postgres_url(url: str) -> str:
    """``url`` with the psycopg2 driver named: ``postgresql://``, ``postgres://`` (and their ``+psycopg2``
    forms) become ``postgresql+psycopg2://``; user, password, host, port, database and query are kept as they
    are. Another driver is kept if its module is installed. ValueError names what is wrong with anything else."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    where = "the PostgreSQL URL (postgres_url in the instance's dagster.yaml; $DAGSTER_PG_URL in " \
            "dagster_home/dagster.postgres.yaml)"
    try:
        parsed = make_url(url.strip())
    except ArgumentError:
        raise ValueError(f"{where} is {masked(url)!r}, not a URL: expected {EXPECTED}") from None
    scheme, _, driver = parsed.drivername.partition("+")
    if scheme not in SCHEMES:
        raise ValueError(f"{where} is {masked(url)!r}: the scheme {parsed.drivername!r} is not PostgreSQL's; "
                         f"expected {EXPECTED}")
    if driver and driver != DRIVER and importlib.util.find_spec(driver) is None:
        raise ValueError(f"{where} is {masked(url)!r}: it names the driver {driver!r}, which is not installed; "
                         f"leave the driver out to use {DRIVER}, which dagster-postgres installs: expected {EXPECTED}")
    return parsed.set(drivername=f"postgresql+{driver or DRIVER}").render_as_string(hide_password=False)


def normalized_config(config_value: Mapping[str, Any]) -> dict[str, Any]:
    """The storage config with ``postgres_url`` normalized (a ``postgres_db`` block is dagster-postgres' own)."""
    config = dict(config_value)
    if config.get("postgres_url"):
        config["postgres_url"] = normalize_postgres_url(config["postgres_url"])
    return config


class PostgresRunStorage(dagster_postgres.PostgresRunStorage):
    __doc__ = dagster_postgres.PostgresRunStorage.__doc__

    @classmethod
    def from_config_value(cls, inst_data, config_value):  # noqa: D102 (dagster-postgres', URL normalized)
        return super().from_config_value(inst_data, normalized_config(config_value))


class PostgresEventLogStorage(dagster_postgres.PostgresEventLogStorage):
    __doc__ = dagster_postgres.PostgresEventLogStorage.__doc__

    @classmethod
    def from_config_value(cls, inst_data, config_value):  # noqa: D102
        return super().from_config_value(inst_data, normalized_config(config_value))


class PostgresScheduleStorage(dagster_postgres.PostgresScheduleStorage):
    __doc__ = dagster_postgres.PostgresScheduleStorage.__doc__

    @classmethod
    def from_config_value(cls, inst_data, config_value):  # noqa: D102
        return super().from_config_value(inst_data, normalized_config(config_value))
