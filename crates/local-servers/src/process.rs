//! Starting server processes that cannot outlive the process that started them.
//!
//! Children are started through `setpriv --pdeathsig`, so the kernel signals them when their
//! parent dies, from `canopy_process`'s one long-lived spawner thread (the signal follows the
//! spawning thread, not the process).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

/// Spawns `command` tied to this process's life (see [`canopy_process::spawn_tied`]) and
/// returns the child's pid. The child is never waited for here: its server is stopped by pid.
pub(crate) fn spawn_detached(command: Command) -> Result<u32> {
    Ok(canopy_process::spawn_tied(command)?.id())
}

/// A TCP port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("bind a free port")?;
    Ok(listener.local_addr()?.port())
}

pub fn is_root() -> bool {
    effective_uid() == Some(0)
}

/// This process's effective uid, from `/proc/self/status`.
fn effective_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// Runs a command to completion, failing with its output when it fails.
pub(crate) fn run(command: &mut Command) -> Result<()> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run {command:?}"))?;
    if !output.status.success() {
        bail!(
            "{command:?} failed ({}): {}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// Makes a fresh directory `<tmp>/canopy-testkit-<kind>-<pid>-<random>`, after removing the
/// directories earlier runs left behind (those whose pid is no longer alive).
pub fn fresh_dir(kind: &str) -> Result<PathBuf> {
    let tmp = std::env::temp_dir();
    sweep_stale(&tmp);
    let dir = tempfile::Builder::new()
        .prefix(&format!("canopy-testkit-{kind}-{}-", std::process::id()))
        .tempdir_in(&tmp)
        .context("create a temp dir")?;
    Ok(dir.keep())
}

fn sweep_stale(tmp: &Path) {
    let Ok(entries) = std::fs::read_dir(tmp) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name
            .to_str()
            .and_then(|n| n.strip_prefix("canopy-testkit-"))
        else {
            continue;
        };
        // Only this user's leftovers: another user's servers may run where this process cannot
        // tell (another PID namespace), and their files are not ours to remove.
        let ours = entry
            .metadata()
            .is_ok_and(|meta| Some(std::os::unix::fs::MetadataExt::uid(&meta)) == effective_uid());
        let pid = rest.split('-').nth(1).and_then(|p| p.parse::<u32>().ok());
        if ours
            && let Some(pid) = pid
            && !Path::new(&format!("/proc/{pid}")).exists()
        {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}
