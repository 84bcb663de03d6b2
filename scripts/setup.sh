#!/usr/bin/env bash
# Installs what Canopy needs on a Debian or Ubuntu machine, skipping whatever is already there:
# the PostgreSQL server binaries, nats-server, npm and the pinned OpenCode, the Rust test runner
# cargo-nextest, and what scripts/contract.sh uses: Chromium (apt), schemathesis (PyPI, pinned, in
# a venv under ~/.cache/canopy) and the TypeScript client's packages (npm, from its lock file).
# Safe to run again; README's commands run it first.
set -euo pipefail

log() { printf 'setup: %s\n' "$*" >&2; }

need_apt=()
pg_bindir=""
if command -v pg_config >/dev/null 2>&1; then pg_bindir=$(pg_config --bindir 2>/dev/null || true); fi
if [ -z "$pg_bindir" ] || [ ! -x "$pg_bindir/initdb" ]; then
  if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then need_apt+=(postgresql); fi
fi
# Debian puts nats-server in /usr/sbin, outside a normal user's PATH; Canopy looks there too.
command -v nats-server >/dev/null 2>&1 || [ -x /usr/sbin/nats-server ] || need_apt+=(nats-server)
command -v setpriv >/dev/null 2>&1 || need_apt+=(util-linux)
command -v bwrap >/dev/null 2>&1 || need_apt+=(bubblewrap)
command -v socat >/dev/null 2>&1 || need_apt+=(socat)
[ -x /usr/sbin/mkfs.ext4 ] || [ -x /sbin/mkfs.ext4 ] || need_apt+=(e2fsprogs)
command -v npm >/dev/null 2>&1 || need_apt+=(npm)
# the docs pages' test drives Debian's Chromium (scripts/contract.sh)
command -v chromium >/dev/null 2>&1 || [ -n "${CANOPY_CHROMIUM:-}" ] || need_apt+=(chromium)
# schemathesis goes into a venv (scripts/contract.sh)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need_apt+=(python3-venv)

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

# schemathesis, pinned, in its own venv (never the system's pip), with the newest Python found on
# PATH or under pyenv (3.10 at least; on 3.11, scripts/fuzz/hooks.py works around a CPython bug).
schemathesis_version=4.32.5
schemathesis_venv="${XDG_CACHE_HOME:-$HOME/.cache}/canopy/schemathesis-$schemathesis_version"
if [ ! -x "$schemathesis_venv/bin/schemathesis" ]; then
  python=""
  for candidate in python3.14 python3.13 python3.12 \
      $(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.1[2-9]*/bin/python3 2>/dev/null | sort -rV) \
      python3.11 python3.10 python3; do
    if "$candidate" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 10))' >/dev/null 2>&1; then
      python=$candidate
      break
    fi
  done
  if [ -z "$python" ]; then
    log "schemathesis needs Python 3.10 or newer with venv (Debian: apt-get install python3-venv), and none was found"
    exit 1
  fi
  log "installing schemathesis $schemathesis_version into $schemathesis_venv (with $python)"
  rm -rf "$schemathesis_venv"
  "$python" -m venv "$schemathesis_venv"
  "$schemathesis_venv/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$schemathesis_version" >&2
fi

# The TypeScript client's tools (openapi-typescript, openapi-fetch, typescript, playwright-core),
# exactly as its lock file pins them; again only when the lock file changed.
client_dir="$(cd "$(dirname "$0")/.." && pwd)/clients/typescript"
if [ ! -f "$client_dir/node_modules/.package-lock.json" ] \
    || [ "$client_dir/package-lock.json" -nt "$client_dir/node_modules/.package-lock.json" ]; then
  log "installing the TypeScript client's packages (npm ci)"
  (cd "$client_dir" && npm ci --no-audit --no-fund --loglevel=error >&2)
fi
