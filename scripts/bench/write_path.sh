#!/usr/bin/env bash
# The write path's figures (docs/write-path.md): a fresh `canopy up --without-runner` from the
# given binary (its embedded PostgreSQL, fsync on), driven by load clients in separate processes
# over real sockets: submit-prompt latency by session length (load_client.py), throughput with 8
# and 32 clients (wrk), and the snapshot sizes that result.
#   scripts/bench/write_path.sh <path to a release canopy binary> [label]
# Needs wrk, psql and python3. Ports 46301-46312; data under /tmp/canopy-bench-<label>.
set -euo pipefail
BIN=$1; LABEL=${2:-run}; HERE=$(cd "$(dirname "$0")" && pwd)
DIR=/tmp/canopy-bench-$LABEL; rm -rf "$DIR"; mkdir -p "$DIR"
export CANOPY_DATA_DIR=$DIR CANOPY_EMBEDDED_PG_PORT=46301 CANOPY_EMBEDDED_NATS_PORT=46302 \
  CANOPY_COMMAND_API_ADDR=127.0.0.1:46310 CANOPY_QUERY_API_ADDR=127.0.0.1:46311 \
  CANOPY_RUNNER_ADDR=127.0.0.1:46312 RUST_LOG=warn \
  CANOPY_RATE_LIMIT_PER_SECOND=1000000 CANOPY_RATE_LIMIT_BURST=1000000 \
  CANOPY_MAX_QUEUED_PROMPTS=1000000
unset DATABASE_URL NATS_URL CANOPY_DATABASE_URL CANOPY_NATS_URL
"$BIN" up --without-runner > "$DIR/up.log" 2>&1 &
UP=$!
trap 'kill -INT $UP; wait $UP' EXIT
BASE=http://127.0.0.1:46310
for _ in $(seq 1 600); do curl -sf $BASE/readyz > /dev/null 2>&1 && break; sleep 0.2; done
TOKEN=$("$BIN" token --role owner --user bench --workspace bench-ws)
C="$HERE/load_client.py"
PG=postgres://postgres@127.0.0.1:46301/postgres
echo "fsync, synchronous_commit: $(psql -qAt "$PG" -c 'show fsync' -c 'show synchronous_commit' | tr '\n' ' ')"

# one client, submit + cancel pairs (the session grows by finished prompts), 300 measured
SHORT=$($C session $BASE "$TOKEN"); $C fill $BASE "$TOKEN" "$SHORT" 4
echo "== one client, session of 10 events"; $C measure $BASE "$TOKEN" "$SHORT" 300
LONG=$($C session $BASE "$TOKEN"); $C fill $BASE "$TOKEN" "$LONG" 4999
echo "== one client, session of 10,000 events"; $C measure $BASE "$TOKEN" "$LONG" 300

S32=""; for _ in $(seq 1 32); do S32="$S32,$($C session $BASE "$TOKEN")"; done; S32=${S32#,}
for clients in 8 32; do
  echo "== wrk: $clients clients over 32 sessions"
  SESSIONS=$S32 TOKEN=$TOKEN wrk -t2 -c$clients -d15s --latency -s "$HERE/submit_prompt.lua" $BASE \
    | grep -E "Requests/sec|  50%|  99%|Non-2xx|errors"
done
ONE=$($C session $BASE "$TOKEN")
echo "== wrk: 32 clients on one session"
SESSIONS=$ONE TOKEN=$TOKEN wrk -t2 -c32 -d15s --latency -s "$HERE/submit_prompt.lua" $BASE \
  | grep -E "Requests/sec|  50%|  99%|Non-2xx|errors"

echo "== snapshot bytes: the 10,000-event session, the one-session run (its prompts stay queued)"
psql -qAt "$PG" -c "SELECT last_sequence, octet_length(payload::text) FROM snapshots WHERE aggregate_id IN ('$LONG', '$ONE') ORDER BY aggregate_id = '$ONE'"
