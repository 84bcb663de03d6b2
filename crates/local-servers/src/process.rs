//! Starting server processes that cannot outlive the process that started them.
//!
//! Children are started through `setpriv --pdeathsig`, so the kernel signals them when their
//! parent dies. The parent-death signal follows the spawning *thread*, not the process, so every
//! child is spawned from one long-lived thread that never exits before the process does.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc;

use anyhow::{Context, Result, bail};

type SpawnRequest = (Command, mpsc::Sender<std::io::Result<u32>>);

/// Spawns `command` from the kit's long-lived spawner thread and returns the child's pid.
pub(crate) fn spawn_detached(command: Command) -> Result<u32> {
    static SPAWNER: OnceLock<std::sync::Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    let sender = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("testkit-spawner".into())
            .spawn(move || {
                // Children are kept (never waited for) so that they stay attached to this thread.
                let mut children: Vec<Child> = Vec::new();
                for (mut command, reply) in rx {
                    let result = command.spawn().map(|child| {
                        let pid = child.id();
                        children.push(child);
                        pid
                    });
                    let _ = reply.send(result);
                }
                // The channel only closes when the process is exiting: keep the children alive.
                loop {
                    std::thread::park();
                }
            })
            .expect("spawn testkit-spawner thread");
        std::sync::Mutex::new(tx)
    });
    let (reply_tx, reply_rx) = mpsc::channel();
    sender
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .send((command, reply_tx))
        .context("testkit spawner thread is gone")?;
    Ok(reply_rx
        .recv()
        .context("testkit spawner did not answer")??)
}

/// A TCP port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("bind a free port")?;
    Ok(listener.local_addr()?.port())
}

pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
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
        let pid = rest.split('-').nth(1).and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = pid
            && !Path::new(&format!("/proc/{pid}")).exists()
        {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}
