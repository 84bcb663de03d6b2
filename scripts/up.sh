#!/usr/bin/env bash
# Starts the Canopy stack on this machine (see README.md). Extra arguments go to `canopy up`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/canopy/target}"
# canopy, and the guard every agent tool command runs through (found next to it)
cargo build --locked -q -p canopy -p canopy-sandbox --bins
exec "$CARGO_TARGET_DIR/debug/canopy" up "$@"
