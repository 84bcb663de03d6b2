//! Where the pinned OpenCode binary is.

use std::path::{Path, PathBuf};

use crate::Error;

/// The OpenCode release this crate is written and tested against. `scripts/setup.sh` installs it.
pub const OPENCODE_VERSION: &str = "1.18.33";

/// The environment variable that names an `opencode` binary to use instead of the installed one.
pub const OPENCODE_BIN_ENV: &str = "CANOPY_OPENCODE_BIN";

/// The `opencode` binary to run: `$CANOPY_OPENCODE_BIN` when set, otherwise the one
/// `scripts/setup.sh` installs with npm into
/// `${XDG_CACHE_HOME:-$HOME/.cache}/canopy/opencode-<OPENCODE_VERSION>`: its `bin/opencode`, or,
/// when npm skipped the wrapper's postinstall that links it there, the platform package's binary
/// under `lib/node_modules/opencode-ai/node_modules/opencode-linux-x64/bin/opencode`.
pub fn opencode_binary() -> Result<PathBuf, Error> {
    if let Some(path) = std::env::var_os(OPENCODE_BIN_ENV).filter(|path| !path.is_empty()) {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(Error::BinaryNotFound { path })
        };
    }
    let prefix = install_prefix();
    let linked = prefix.join("bin/opencode");
    if linked.is_file() {
        return Ok(linked);
    }
    let platform =
        prefix.join("lib/node_modules/opencode-ai/node_modules/opencode-linux-x64/bin/opencode");
    if platform.is_file() {
        return Ok(platform);
    }
    Err(Error::BinaryNotFound { path: linked })
}

/// `${XDG_CACHE_HOME:-$HOME/.cache}/canopy/opencode-<OPENCODE_VERSION>`, as in `scripts/setup.sh`.
pub fn install_prefix() -> PathBuf {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .filter(|dir| !dir.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(&std::env::var_os("HOME").unwrap_or_default()).join(".cache"));
    cache
        .join("canopy")
        .join(format!("opencode-{OPENCODE_VERSION}"))
}
