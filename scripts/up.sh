#!/usr/bin/env bash
# Starts the Canopy stack on this machine (see README.md). Extra arguments go to `canopy up`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/canopy/target}"
exec cargo run --locked -q -p canopy -- up "$@"
