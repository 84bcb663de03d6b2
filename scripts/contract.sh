#!/usr/bin/env bash
# The API documents proven from outside, against the real `canopy up` (docs/api-contract.md):
#
# 1. schemathesis (all checks) fuzzes command-api (as an owner, then the runner's endpoints as the
#    runner) and query-api (as an owner) from their served documents; it must find nothing.
# 2. a TypeScript client is generated from openapi/*.json (openapi-typescript), a typed flow over
#    it compiles strict (tsc) and runs with node: a session, two members' prompts, the runner's
#    plans approved by an admin, its tool asks granted, and the session's live stream (SSE).
# 3. headless Chromium loads both APIs' /docs/ pages, finds every operation listed, and answers a
#    "Try it out" call with 200 (screenshots into the log dir on failure).
#
# scripts/test.sh runs it after the Rust tests; scripts/setup.sh installs what it uses. Logs go to
# a temporary directory, kept and named when a step fails. CANOPY_FUZZ_SEED fixes the fuzzer's seed
# (one is drawn and printed otherwise), CANOPY_FUZZ_EXAMPLES its examples per operation.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/canopy/target}"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/canopy"
schemathesis_version=4.32.5
schemathesis="$cache/schemathesis-$schemathesis_version/bin/schemathesis"
[ -x "$schemathesis" ] || { echo "contract: $schemathesis is missing: run scripts/setup.sh" >&2; exit 1; }
client="$root/clients/typescript"
[ -d "$client/node_modules" ] || { echo "contract: $client/node_modules is missing: run scripts/setup.sh" >&2; exit 1; }

cargo build --locked -q -p canopy --bin canopy
canopy="$CARGO_TARGET_DIR/debug/canopy"

logs=$(mktemp -d "${TMPDIR:-/tmp}/canopy-contract-XXXXXX")
# sandbox users (root mode) and the embedded PostgreSQL's user read under it
chmod 755 "$logs"
up_pid=""
finish() {
  status=$?
  if [ -n "$up_pid" ] && kill -0 "$up_pid" 2>/dev/null; then
    kill -INT "$up_pid" 2>/dev/null || true
    for _ in $(seq 1 300); do kill -0 "$up_pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$up_pid" 2>/dev/null || true
    wait "$up_pid" 2>/dev/null || true
  fi
  if [ "$status" -eq 0 ]; then
    rm -rf "$logs"
  else
    echo "contract: failed; logs, reports and screenshots kept in $logs" >&2
  fi
  exit "$status"
}
trap finish EXIT
trap 'exit 130' INT TERM

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
command_port=$(free_port)
query_port=$(free_port)
command_api="http://127.0.0.1:$command_port"
query_api="http://127.0.0.1:$query_port"

# The real stack, as `canopy up` runs it with nothing configured: embedded PostgreSQL and NATS in
# the log dir, the runner with the built-in scripted demo model. One fuzzer is one caller sending
# hundreds of requests a second, so the per-person rate limit is lifted for this stack.
env -u DATABASE_URL -u NATS_URL -u CANOPY_DATABASE_URL -u CANOPY_NATS_URL -u CANOPY_MODEL_BASE_URL \
  CANOPY_DATA_DIR="$logs/data" \
  CANOPY_EMBEDDED_PG_PORT="$(free_port)" CANOPY_EMBEDDED_NATS_PORT="$(free_port)" \
  CANOPY_COMMAND_API_ADDR="127.0.0.1:$command_port" CANOPY_QUERY_API_ADDR="127.0.0.1:$query_port" \
  CANOPY_RUNNER_ADDR=127.0.0.1:0 \
  CANOPY_RATE_LIMIT_PER_SECOND=100000 CANOPY_RATE_LIMIT_BURST=100000 \
  RUST_LOG="${RUST_LOG:-warn}" \
  "$canopy" up >"$logs/up.out" 2>"$logs/up.log" &
up_pid=$!
for _ in $(seq 1 2400); do
  grep -q "press Ctrl+C" "$logs/up.out" 2>/dev/null && break
  kill -0 "$up_pid" 2>/dev/null || { echo "contract: canopy up ended before it was ready" >&2; tail -20 "$logs/up.log" >&2; exit 1; }
  sleep 0.1
done
grep -q "press Ctrl+C" "$logs/up.out" || { echo "contract: canopy up not ready within 240 s" >&2; exit 1; }
echo "contract: canopy up: command-api $command_api, query-api $query_api (logs in $logs)"

token() { "$canopy" token --ttl 2h "$@"; }

# 1. schemathesis ---------------------------------------------------------------------------------
# A developer's run draws a new seed each time (more cases over time); CI uses a fixed one so that
# whether a commit lands does not depend on the draw. Either way the seed is printed.
if [ -n "${CANOPY_FUZZ_SEED:-}" ]; then
  seed="$CANOPY_FUZZ_SEED"
elif [ -n "${CI:-}" ]; then
  seed=20261207
else
  seed="$(python3 -c 'import random; print(random.randrange(2**31))')"
fi
examples="${CANOPY_FUZZ_EXAMPLES:-10}"
echo "contract: schemathesis $schemathesis_version, seed $seed (CANOPY_FUZZ_SEED=$seed reproduces), $examples examples per operation"
fuzz() {
  local name=$1 url=$2 token=$3
  shift 3
  echo "contract: fuzzing $name"
  # Two workers for two cores; a stream answers for as long as it is open, so a request's
  # timeout ends it (schemathesis judges what the stream sent by then).
  # from the log dir: schemathesis keeps a .schemathesis/ cache in its working directory
  if ! (cd "$logs" && CANOPY_FUZZ_TOKEN="$token" CANOPY_FUZZ_QUERY_API="$query_api" \
      CANOPY_FUZZ_DROPPED="$logs/schemathesis-$name-dropped.ndjson" \
      SCHEMATHESIS_HOOKS=hooks PYTHONPATH="$root/scripts/fuzz" \
      "$schemathesis" --config-file "$root/scripts/fuzz/schemathesis.toml" \
      run "$url/openapi.json" --checks all --seed "$seed" --max-examples "$examples" \
      --workers 2 --request-timeout 2 --generation-database none --no-color \
      --report junit,vcr --report-dir "$logs/schemathesis-$name" "$@") >"$logs/schemathesis-$name.txt" 2>&1; then
    tail -n 200 "$logs/schemathesis-$name.txt" >&2
    echo "contract: schemathesis found failures in $name (seed $seed)" >&2
    return 1
  fi
  tail -n 3 "$logs/schemathesis-$name.txt"
  # what the hooks dropped, by reason (scripts/fuzz/hooks.py says why each may be)
  if [ -s "$logs/schemathesis-$name-dropped.ndjson" ]; then
    python3 -c 'import collections, json, sys
for why, n in collections.Counter(json.loads(l)["why"] for l in open(sys.argv[1])).most_common():
    print(f"  dropped {n:4} x {why}")' "$logs/schemathesis-$name-dropped.ndjson"
  fi
}
owner=$(token --role owner --user fuzz-owner --name "Fuzz Owner" --workspace fuzz)
runner=$(token --role runner)
fuzz command-api "$command_api" "$owner" --exclude-path-regex '^/runner/'
fuzz command-api-runner "$command_api" "$runner" --include-path-regex '^/runner/'
fuzz query-api "$query_api" "$owner"

# 2. the generated TypeScript client and the typed flow -----------------------------------------
echo "contract: generating the TypeScript client and compiling the flow (strict)"
(
  cd "$client"
  rm -rf generated out
  npx --no-install openapi-typescript "$root/openapi/command-api.json" -o generated/command-api.d.ts >"$logs/generate.log" 2>&1
  npx --no-install openapi-typescript "$root/openapi/query-api.json" -o generated/query-api.d.ts >>"$logs/generate.log" 2>&1
  npx --no-install tsc -p tsconfig.json
)
repo="$logs/repo"
mkdir -p "$repo/source"
git -C "$repo/source" init -q -b main
echo "# A repository for the TypeScript flow" >"$repo/source/README.md"
git -C "$repo/source" add README.md
git -C "$repo/source" -c user.name=flow -c user.email=flow@example.com commit -q -m initial
git clone -q --bare "$repo/source" "$repo/remote.git"
chmod -R a+rX "$repo"
echo "contract: running the flow"
CANOPY_COMMAND_API_URL="$command_api" CANOPY_QUERY_API_URL="$query_api" \
  CANOPY_FLOW_REPOSITORY="file://$repo/remote.git" \
  CANOPY_FLOW_ANN="$(token --role member --user ann --name Ann --workspace flow)" \
  CANOPY_FLOW_BO="$(token --role member --user bo --name Bo --workspace flow)" \
  CANOPY_FLOW_ADA="$(token --role admin --user ada --name Ada --workspace flow)" \
  node "$client/out/flow.js" | tee "$logs/flow.log"

# 3. the docs pages in headless Chromium -----------------------------------------------------------
echo "contract: the docs pages in headless Chromium"
CANOPY_COMMAND_API_URL="$command_api" CANOPY_QUERY_API_URL="$query_api" \
  CANOPY_DOCS_TOKEN="$(token --role viewer --user docs --name Docs --workspace flow)" \
  CANOPY_DOCS_SCREENSHOTS="$logs" \
  node "$client/out/docs-pages.js" | tee "$logs/docs-pages.log"

echo "contract: the fuzzer found nothing, the typed flow and the docs pages passed"
