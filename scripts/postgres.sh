#!/usr/bin/env bash
# A throwaway PostgreSQL server for development and CI, from the server binaries Debian's postgresql package
# installs (/usr/lib/postgresql/<version>/bin; this project is tested with 15). Loopback only, no password
# (trust), no durability (fsync off): for a laptop or a CI run, never for run history you keep.
#
#   export DAGSTER_PG_URL=$(bash scripts/postgres.sh start)   # start (or find running); prints the URL only
#   bash scripts/postgres.sh url                                # the URL of the running server
#   bash scripts/postgres.sh stop                               # stop it and delete its data
#   export DAGSTER_HOME=$(bash scripts/postgres.sh home)        # dagster_home/postgres/: the Postgres profile
#   export DAGSTER_PG_URL=$(bash scripts/postgres.sh pooler)   # PgBouncer in front of it; prints its URL
#
# dagster-postgres opens a new connection for every query outside the webserver (SQLAlchemy's NullPool); each
# costs the server a new backend process. `pooler` starts PgBouncer (Debian's pgbouncer package) on
# ASSETS_PIPELINE_PGBOUNCER_PORT (port + 1) in session mode, which hands those short connections the server's
# already open ones (session mode: every PostgreSQL feature works as on the server itself). `stop` stops both.
#
# `home` is for any server: its dagster.yaml is a link to dagster_home/dagster.postgres.yaml, which reads the
# server's URL from $DAGSTER_PG_URL. Environment: ASSETS_PIPELINE_PG_PORT (55432), ASSETS_PIPELINE_PG_DIR
# (/tmp/assets-pipeline-postgres-<port>: data, socket, server.log), ASSETS_PIPELINE_PG_BIN (the newest
# /usr/lib/postgresql/*/bin). PostgreSQL refuses to run as root, so as root the server runs as the `postgres`
# system user (runuser), which must be able to reach the data folder.
set -euo pipefail
cd "$(dirname "$0")/.."

PORT=${ASSETS_PIPELINE_PG_PORT:-55432}
BOUNCER_PORT=${ASSETS_PIPELINE_PGBOUNCER_PORT:-$((PORT + 1))}
DIR=${ASSETS_PIPELINE_PG_DIR:-${TMPDIR:-/tmp}/assets-pipeline-postgres-$PORT}
DB=dagster
# The usual form: the team profile's storages (assets_pipeline/postgres.py) name the installed driver, psycopg2.
URL="postgresql://postgres@127.0.0.1:$PORT/$DB"

die() { echo "postgres.sh: $*" >&2; exit 1; }

pg_bin() {
  if [ -n "${ASSETS_PIPELINE_PG_BIN:-}" ]; then
    echo "$ASSETS_PIPELINE_PG_BIN"
  else
    find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -name bin -type d 2>/dev/null | sort -V | tail -n 1
  fi
}

as_pg() {  # run a PostgreSQL program as the server's owner
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

running() { [ -f "$DIR/data/PG_VERSION" ] && as_pg "$BIN/pg_ctl" -D "$DIR/data" status >/dev/null 2>&1; }

BIN=$(pg_bin)

case "${1:-}" in
  start)
    [ -x "$BIN/pg_ctl" ] || die "no PostgreSQL server binaries in ${BIN:-/usr/lib/postgresql/*/bin}: install Debian's postgresql package (apt-get install postgresql) or set ASSETS_PIPELINE_PG_BIN"
    if running; then echo "$URL"; exit 0; fi
    mkdir -p "$DIR"
    if [ "$(id -u)" = 0 ]; then
      id postgres >/dev/null 2>&1 || die "running as root needs the 'postgres' system user (Debian's postgresql package creates it)"
      chown postgres:postgres "$DIR"
      runuser -u postgres -- test -w "$DIR" || die "the postgres user cannot write $DIR: choose a folder it can reach (ASSETS_PIPELINE_PG_DIR)"
    fi
    chmod 700 "$DIR"
    if [ ! -f "$DIR/data/PG_VERSION" ]; then
      as_pg "$BIN/initdb" -D "$DIR/data" -U postgres --auth=trust --encoding=UTF8 --locale=C --no-sync \
        >"$DIR/initdb.log" 2>&1 || { cat "$DIR/initdb.log" >&2; die "initdb failed"; }
    fi
    # Unix socket in $DIR (Debian's /var/run/postgresql may not exist); durability off: a throwaway server.
    as_pg "$BIN/pg_ctl" -D "$DIR/data" -l "$DIR/server.log" -w -t 60 -o "-c listen_addresses=127.0.0.1 -p $PORT \
-k $DIR -c fsync=off -c synchronous_commit=off -c full_page_writes=off" start >&2 \
      || { tail -n 20 "$DIR/server.log" >&2; die "the server did not start (port $PORT in use? ASSETS_PIPELINE_PG_PORT)"; }
    if ! as_pg "$BIN/psql" -h 127.0.0.1 -p "$PORT" -U postgres -d postgres -tAc \
        "SELECT 1 FROM pg_database WHERE datname = '$DB'" | grep -q 1; then
      as_pg "$BIN/createdb" -h 127.0.0.1 -p "$PORT" -U postgres "$DB"
    fi
    echo "$URL"
    ;;
  stop)
    if [ -f "$DIR/pgbouncer.pid" ]; then kill "$(cat "$DIR/pgbouncer.pid")" 2>/dev/null || true; fi
    if running; then as_pg "$BIN/pg_ctl" -D "$DIR/data" -m fast -w stop >&2; fi
    rm -rf "$DIR"
    ;;
  pooler)
    running || die "no server running in $DIR (bash scripts/postgres.sh start first)"
    BOUNCER=${ASSETS_PIPELINE_PGBOUNCER_BIN:-$(command -v pgbouncer || echo /usr/sbin/pgbouncer)}
    [ -x "$BOUNCER" ] || die "no pgbouncer: install Debian's pgbouncer package (apt-get install pgbouncer) or set ASSETS_PIPELINE_PGBOUNCER_BIN"
    POOLED="postgresql://postgres@127.0.0.1:$BOUNCER_PORT/$DB"
    if [ -f "$DIR/pgbouncer.pid" ] && kill -0 "$(cat "$DIR/pgbouncer.pid")" 2>/dev/null; then echo "$POOLED"; exit 0; fi
    # Any database name maps to the same name on the server; trust, loopback only, as the server itself.
    cat >"$DIR/pgbouncer.ini" <<INI
[databases]
* = host=127.0.0.1 port=$PORT
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $BOUNCER_PORT
unix_socket_dir = $DIR
auth_type = trust
auth_file = $DIR/pgbouncer.users
pool_mode = session
max_client_conn = 1000
default_pool_size = 40
server_idle_timeout = 600
logfile = $DIR/pgbouncer.log
pidfile = $DIR/pgbouncer.pid
INI
    echo '"postgres" ""' >"$DIR/pgbouncer.users"
    [ "$(id -u)" = 0 ] && chown postgres:postgres "$DIR/pgbouncer.ini" "$DIR/pgbouncer.users"
    as_pg "$BOUNCER" -d "$DIR/pgbouncer.ini" >&2 || { tail -n 20 "$DIR/pgbouncer.log" >&2; die "pgbouncer did not start (port $BOUNCER_PORT in use? ASSETS_PIPELINE_PGBOUNCER_PORT)"; }
    for _ in $(seq 50); do
      as_pg "$BIN/psql" -h 127.0.0.1 -p "$BOUNCER_PORT" -U postgres -d "$DB" -tAc "SELECT 1" >/dev/null 2>&1 && { echo "$POOLED"; exit 0; }
      sleep 0.1
    done
    tail -n 20 "$DIR/pgbouncer.log" >&2; die "pgbouncer started but does not answer on port $BOUNCER_PORT"
    ;;
  url)
    running || die "no server running in $DIR (bash scripts/postgres.sh start)"
    echo "$URL"
    ;;
  home)
    mkdir -p dagster_home/postgres
    ln -sfn ../dagster.postgres.yaml dagster_home/postgres/dagster.yaml
    echo "$PWD/dagster_home/postgres"
    ;;
  *)
    die "usage: bash scripts/postgres.sh start|pooler|stop|url|home"
    ;;
esac
