#!/usr/bin/env bash
# Installs what Canopy needs on a Debian or Ubuntu machine, skipping whatever is already there:
# the PostgreSQL server binaries, nats-server, npm and the pinned OpenCode, and the Rust test
# runner cargo-nextest.
# Safe to run again; README's commands run it first.
set -euo pipefail

log() { printf 'setup: %s\n' "$*" >&2; }

need_apt=()
pg_bindir=""
if command -v pg_config >/dev/null 2>&1; then pg_bindir=$(pg_config --bindir 2>/dev/null || true); fi
if [ -z "$pg_bindir" ] || [ ! -x "$pg_bindir/initdb" ]; then
  if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then need_apt+=(postgresql); fi
fi
command -v nats-server >/dev/null 2>&1 || need_apt+=(nats-server)
command -v setpriv >/dev/null 2>&1 || need_apt+=(util-linux)
command -v bwrap >/dev/null 2>&1 || need_apt+=(bubblewrap)
command -v socat >/dev/null 2>&1 || need_apt+=(socat)
if [ -z "${CANOPY_OPENCODE_BIN:-}" ]; then command -v npm >/dev/null 2>&1 || need_apt+=(npm); fi

if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ]; then
    sudo=()
  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    sudo=(sudo -n)
  else
    log "missing: ${need_apt[*]}"
    log "installing them needs apt-get as root (or password-less sudo), and this shell has neither."
    log "install them yourself (apt-get install ${need_apt[*]}) or set DATABASE_URL and NATS_URL."
    exit 1
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    log "missing: ${need_apt[*]}, and this is not a Debian or Ubuntu machine (no apt-get)"
    exit 1
  fi
  log "installing ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  "${sudo[@]}" apt-get update -qq
  "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  log "cargo is missing: install a Rust toolchain (https://rustup.rs) and run again"
  exit 1
fi
if ! cargo nextest --version >/dev/null 2>&1; then
  log "installing cargo-nextest"
  cargo install --locked cargo-nextest
fi

# OpenCode, pinned: the agent runner drives `opencode serve`, and the canopy-opencode tests run the
# real binary. npm installs it into a versioned prefix, so a new pin installs beside the old one
# and nothing here has to be cleaned to rebuild. canopy-opencode finds the binary in that prefix
# (or at CANOPY_OPENCODE_BIN). Keep the version in step with OPENCODE_VERSION in
# crates/opencode/src/binary.rs.
opencode_version=1.18.33
opencode_prefix="${XDG_CACHE_HOME:-$HOME/.cache}/canopy/opencode-$opencode_version"
opencode_bin="$opencode_prefix/bin/opencode"
# The wrapper's postinstall hard-links the platform binary to bin/opencode; when npm skips install
# scripts (npm 11 warns they are "not yet covered by allowScripts") the platform package still
# holds it.
opencode_fallback="$opencode_prefix/lib/node_modules/opencode-ai/node_modules/opencode-linux-x64/bin/opencode"
if [ -z "${CANOPY_OPENCODE_BIN:-}" ] && [ ! -x "$opencode_bin" ] && [ ! -x "$opencode_fallback" ]; then
  if ! command -v npm >/dev/null 2>&1; then
    log "npm is missing: install Node.js with npm (apt-get install npm), or set CANOPY_OPENCODE_BIN to an opencode $opencode_version binary, and run again"
    exit 1
  fi
  log "installing opencode-ai@$opencode_version into $opencode_prefix (about 350 MB)"
  mkdir -p "$opencode_prefix"
  npm install --global --prefix "$opencode_prefix" --no-fund --no-audit --loglevel=error \
    "opencode-ai@$opencode_version" >&2
  if [ ! -x "$opencode_bin" ] && [ ! -x "$opencode_fallback" ]; then
    log "npm finished but no opencode binary is in $opencode_prefix"
    exit 1
  fi
fi
