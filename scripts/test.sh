#!/usr/bin/env bash
# Runs Canopy's checks and tests on real PostgreSQL and NATS JetStream.
#
# With DATABASE_URL and NATS_URL set, the tests use those servers. Otherwise one throwaway
# PostgreSQL and one nats-server are started for the whole run (temp dirs, free ports) and
# stopped at the end. Extra arguments go to `cargo nextest run`. Then scripts/contract.sh proves the
# API documents from outside: schemathesis, the generated TypeScript client's flow, the docs pages
# in headless Chromium (CANOPY_SKIP_CONTRACT=1 skips it).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
# One target dir for every clone on this machine, so a fresh clone does not rebuild the world.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/canopy/target}"

cargo fmt --all -- --check
cargo clippy --locked --workspace --all-targets -- -D warnings

services_pid=""
cleanup() { [ -n "$services_pid" ] && kill "$services_pid" 2>/dev/null && wait "$services_pid" 2>/dev/null; true; }
trap cleanup EXIT INT TERM

if [ -z "${DATABASE_URL:-}" ] || [ -z "${NATS_URL:-}" ]; then
  cargo build --locked -q -p canopy-testkit --bin canopy-test-services
  env_file=$(mktemp)
  "$CARGO_TARGET_DIR/debug/canopy-test-services" "$env_file" &
  services_pid=$!
  for _ in $(seq 1 600); do
    [ -s "$env_file" ] && break
    kill -0 "$services_pid" 2>/dev/null || { echo "test services failed to start" >&2; exit 1; }
    sleep 0.1
  done
  [ -s "$env_file" ] || { echo "test services did not start within 60 s" >&2; exit 1; }
  # keep a URL the caller set; take the started server for the other
  while IFS='=' read -r key value; do
    [ -n "${!key:-}" ] || export "$key=$value"
  done < "$env_file"
  rm -f "$env_file"
fi

cargo nextest run --locked --workspace --profile ci "$@"

# The contract step (fuzzer, generated client, docs pages in a browser) runs with the whole suite,
# not when arguments pick some tests.
if [ $# -eq 0 ] && [ -z "${CANOPY_SKIP_CONTRACT:-}" ]; then
  scripts/contract.sh
fi
