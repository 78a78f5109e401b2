#!/usr/bin/env bash
# Stop the PostgreSQL that .ci/start_postgres.sh started:  bash .ci/stop_postgres.sh "$MRG_TEST_PGDATA"
# Only a data dir made by start_postgres.sh (mktemp /tmp/mrg-pg.*) is deleted afterwards; a
# PGDATA_DIR of your own is stopped and kept. Safe to call twice or when nothing runs.
set -euo pipefail
DATA="${1:-${MRG_TEST_PGDATA:-}}"
log() { echo "stop_postgres: $*" >&2; }
[ -n "$DATA" ] || { log "usage: stop_postgres.sh DATA_DIR (or set MRG_TEST_PGDATA)"; exit 2; }
[ -d "$DATA" ] || { log "no data dir $DATA: nothing to stop"; exit 0; }

BIN="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)"
if [ "$(id -u)" = 0 ]; then as_pg() { runuser -u postgres -- "$@"; }; else as_pg() { "$@"; }; fi

if [ -f "$DATA/postmaster.pid" ]; then
  as_pg "$BIN/pg_ctl" -D "$DATA" -m fast -w -t 60 stop >&2 || log "pg_ctl stop failed"
fi
case "$(basename "$DATA")" in
  mrg-pg.*)
    if [ -f "$DATA/postmaster.pid" ]; then log "server still running: keeping $DATA"; exit 1; fi
    rm -rf -- "$DATA" "$(dirname "$DATA")/$(basename "$DATA").initdb.log"
    log "stopped; removed $DATA" ;;
  *) log "stopped; kept $DATA (not a temp dir of start_postgres.sh)" ;;
esac
