//! Children tied to this process's life.

use std::ffi::OsStr;
use std::process::{Child, Command};
use std::sync::{Mutex, OnceLock, mpsc};

use rustix::process::{Pid, Signal};

type Request = (Command, mpsc::Sender<std::io::Result<Child>>);

/// Spawns `command` from the process's one spawner thread, which lives as long as the process.
///
/// A parent-death signal is delivered when the *thread* that forked the child ends: a child
/// forked from a retired `spawn_blocking` thread (or a test's thread) would be killed long
/// before its parent process dies. Every tied child is therefore forked here.
pub fn spawn_tied(command: Command) -> std::io::Result<Child> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<Request>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Request>();
        let started = std::thread::Builder::new()
            .name("canopy-spawner".into())
            .spawn(move || {
                for (mut command, reply) in rx {
                    let _ = reply.send(command.spawn());
                }
            });
        if let Err(error) = started {
            tracing::error!(%error, "cannot start the spawner thread");
        }
        Mutex::new(tx)
    });
    let (reply_tx, reply_rx) = mpsc::channel();
    let gone = || std::io::Error::other("the spawner thread is gone");
    spawner
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .send((command, reply_tx))
        .map_err(|_| gone())?;
    reply_rx.recv().map_err(|_| gone())?
}

/// `setpriv --pdeathsig <signal> <program>`: the kernel sends `signal` to the child when the
/// thread that forked it ends, so spawn it with [`spawn_tied`]. Add the program's arguments to
/// the returned command.
pub fn death_signal(signal: &str, program: impl AsRef<OsStr>) -> Command {
    let mut command = Command::new("setpriv");
    command.arg("--pdeathsig").arg(signal).arg(program);
    command
}

/// Sends `signal` to the process group led by `pid` (a child started with `process_group(0)`).
/// Never to group 0 or 1: `kill(0)` and `kill(-1)` would reach this process's own group or every
/// process.
pub fn signal_group(pid: u32, signal: Signal) {
    let Some(pid) = i32::try_from(pid)
        .ok()
        .filter(|pid| *pid > 1)
        .and_then(Pid::from_raw)
    else {
        return;
    };
    if let Err(error) = rustix::process::kill_process_group(pid, signal) {
        tracing::debug!(%error, ?signal, pid = pid.as_raw_nonzero().get(), "signalling a process group");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tied_child_outlives_the_thread_that_asked_for_it() {
        // The child would get SIGKILL when the asking thread ends if it had forked it.
        let child = std::thread::spawn(|| {
            let mut command = death_signal("KILL", "sleep");
            command.arg("5");
            spawn_tied(command).unwrap()
        })
        .join()
        .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(300));
        let mut child = child;
        assert!(
            child.try_wait().unwrap().is_none(),
            "the child died with the asking thread"
        );
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn group_signals_never_reach_group_zero_or_one() {
        // Would signal this test's own group (0) or every process (1) if not refused.
        signal_group(0, Signal::TERM);
        signal_group(1, Signal::TERM);
    }
}
