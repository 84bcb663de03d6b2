#!/usr/bin/env bash
# Webhook delivery: events/s delivered to a local receiver (its own process, real sockets) and
# commit -> delivery latency p50/p99, on the test servers of $DATABASE_URL / $NATS_URL (or
# throwaway ones). See webhooks/benches/delivery.rs.
#   scripts/bench/webhooks.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
exec cargo bench -p canopy-webhooks --bench delivery
