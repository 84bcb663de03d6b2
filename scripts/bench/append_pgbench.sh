#!/usr/bin/env bash
# pgbench: one event per transaction straight into `events` (its triggers on), at 1 and 32
# connections, with the old wake-up (the first migration's events_notify trigger and its
# IMMUTABLE STRICT digest functions) and the new (no trigger; inlinable digests). Runs in a
# throwaway database of the PostgreSQL at $1 (for figures with fsync on, a `canopy up`'s).
#   scripts/bench/append_pgbench.sh postgres://postgres@127.0.0.1:46301
set -euo pipefail
PG=$1; HERE=$(cd "$(dirname "$0")" && pwd); ROOT=$HERE/../..
psql -q "$PG/postgres" -c "DROP DATABASE IF EXISTS canopy_append_bench" -c "CREATE DATABASE canopy_append_bench"
DB=$PG/canopy_append_bench
for f in "$ROOT"/migrations/*.sql; do psql -q "$DB" -v ON_ERROR_STOP=1 -f "$f" > /dev/null; done
FIRST=$ROOT/migrations/20261123000001_event_store.sql
old() {
  # the first migration's digest functions and notify trigger, as they were
  sed -n '/^CREATE FUNCTION canopy_event_digest/,/^\$\$;/p;/^CREATE FUNCTION canopy_payload_digest/,/^\$\$;/p;/^CREATE FUNCTION canopy_events_notify/,/^\$\$;/p' "$FIRST" \
    | sed 's/^CREATE FUNCTION/CREATE OR REPLACE FUNCTION/' | psql -q "$DB"
  psql -q "$DB" -c "CREATE TRIGGER events_notify AFTER INSERT ON events FOR EACH STATEMENT EXECUTE FUNCTION canopy_events_notify()"
}
new() {
  psql -q "$DB" -c "DROP TRIGGER IF EXISTS events_notify ON events" -c "DROP FUNCTION IF EXISTS canopy_events_notify()"
  psql -q "$DB" -f "$ROOT/migrations/20261130003002_inlinable_event_digests.sql"
}
run() { pgbench -n -f "$HERE/insert_event.sql" -c "$1" -j 2 -T 15 "$DB" 2>&1 | grep -E "^tps|latency average" | tr '\n' ' '; echo; }
for round in 1 2; do
  old; echo "old wake-up, 1 connection:   $(run 1)"; echo "old wake-up, 32 connections: $(run 32)"
  new; echo "new wake-up, 1 connection:   $(run 1)"; echo "new wake-up, 32 connections: $(run 32)"
done
psql -q "$PG/postgres" -c "DROP DATABASE canopy_append_bench"
