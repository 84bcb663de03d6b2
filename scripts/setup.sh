#!/usr/bin/env bash
# Installs what Canopy needs on a Debian or Ubuntu machine, skipping whatever is already there:
# the PostgreSQL server binaries, nats-server, and the Rust test runner cargo-nextest.
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
