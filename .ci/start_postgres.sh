#!/usr/bin/env bash
# Start a throw-away PostgreSQL for tests/test_storage_postgres.py and print the export lines
# (MRG_TEST_POSTGRES_URL, and MRG_TEST_PGDATA for .ci/stop_postgres.sh).
#   eval "$(.ci/start_postgres.sh)"      # then: .venv/bin/pytest -q tests/test_storage_postgres.py
#   bash .ci/stop_postgres.sh "$MRG_TEST_PGDATA"   # stop it (and delete a temp data dir)
# Works as root on a fresh Debian/Ubuntu (installs postgresql if missing; the server runs as the
# `postgres` user) or as a normal user who already has the server binaries.
# Env: PGPORT (5432), PGDATA_DIR (a new temp dir), MRG_PG_DB/MRG_PG_USER/MRG_PG_PASSWORD.
set -euo pipefail
PORT="${PGPORT:-5432}"
DB="${MRG_PG_DB:-mrg_test}"
USER_="${MRG_PG_USER:-mrg}"
PASS="${MRG_PG_PASSWORD:-mrg_test_pw}"
log() { echo "start_postgres: $*" >&2; }

bindir() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }
if [ -z "$(bindir)" ] || [ ! -x "$(bindir)/initdb" ]; then
  [ "$(id -u)" = 0 ] || { log "postgresql is not installed and we are not root"; exit 1; }
  log "installing postgresql"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2 && apt-get install -y -qq postgresql >&2
fi
BIN="$(bindir)"

if [ "$(id -u)" = 0 ]; then as_pg() { runuser -u postgres -- "$@"; }; else as_pg() { "$@"; }; fi

if "$BIN/pg_isready" -q -h 127.0.0.1 -p "$PORT"; then
  log "something already listens on 127.0.0.1:$PORT; set PGPORT to another port"; exit 1
fi

DATA="${PGDATA_DIR:-$(mktemp -d /tmp/mrg-pg.XXXXXX)}"
mkdir -p "$DATA"
[ "$(id -u)" = 0 ] && chown postgres:postgres "$DATA"
chmod 700 "$DATA"
# Unix socket inside the data dir: /var/run/postgresql may not exist on a bare machine.
as_pg "$BIN/initdb" -D "$DATA" -U postgres --auth-local=trust --auth-host=scram-sha-256 \
  -E UTF8 >"$DATA/../$(basename "$DATA").initdb.log" 2>&1 || { log "initdb failed"; exit 1; }
as_pg "$BIN/pg_ctl" -D "$DATA" -l "$DATA/server.log" -w -t 60 \
  -o "-c listen_addresses=127.0.0.1 -p $PORT -k $DATA -c fsync=on" start >&2
# A failure from here on must not leave a server holding the port.
ready=0
trap '[ "$ready" = 1 ] || { log "setup failed: stopping the server"; as_pg "$BIN/pg_ctl" -D "$DATA" -m fast -w stop >&2 || true; }' EXIT

psql_() { as_pg "$BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$DATA" -p "$PORT" -U postgres "$@"; }
psql_ -d postgres -c "CREATE ROLE \"$USER_\" LOGIN PASSWORD '$PASS'" >&2
psql_ -d postgres -c "CREATE DATABASE \"$DB\" OWNER \"$USER_\"" >&2

ready=1
log "running: data $DATA, log $DATA/server.log; stop with: bash .ci/stop_postgres.sh $DATA"
echo "export MRG_TEST_POSTGRES_URL=postgresql+psycopg://$USER_:$PASS@127.0.0.1:$PORT/$DB"
echo "export MRG_TEST_PGDATA=$DATA"
