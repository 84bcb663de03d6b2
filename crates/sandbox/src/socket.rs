//! Host-side unix sockets next to sandbox-writable directories.
//!
//! The sandbox creates `opencode.sock` in a directory it owns, so it can replace the socket by a
//! symlink to any host socket (a database, the model proxy) and make the host connect there.
//! [`connect_sandbox_socket`] never follows a link: it opens the directory and the entry with
//! `O_PATH|O_NOFOLLOW`, checks with `fstat` that the entry is a socket owned by the sandbox uid,
//! and connects through `/proc/self/fd/N`, which names exactly the inode that was checked.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rustix::fs::{FileType, Mode, OFlags};
use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinHandle;

use crate::Error;

/// Connects to the socket `name` in `dir` only if it is a socket (not a link) owned by `uid`.
pub async fn connect_sandbox_socket(dir: &Path, name: &str, uid: u32) -> Result<UnixStream, Error> {
    let path = dir.join(name);
    let refuse = |reason: String| Error::UnsafeSocket {
        path: path.clone(),
        reason,
    };
    let flags = OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let dir_fd =
        rustix::fs::open(dir, flags | OFlags::DIRECTORY, Mode::empty()).map_err(|error| {
            refuse(format!(
                "cannot open its directory without following links: {error}"
            ))
        })?;
    let fd = rustix::fs::openat(&dir_fd, name, flags, Mode::empty()).map_err(|error| {
        // Not there (yet: OpenCode is still starting) is no attack, only no answer.
        if error == rustix::io::Errno::NOENT {
            Error::Connect {
                path: path.clone(),
                source: error.into(),
            }
        } else {
            refuse(format!("cannot open it: {error}"))
        }
    })?;
    let stat =
        rustix::fs::fstat(&fd).map_err(|error| refuse(format!("cannot stat it: {error}")))?;
    let kind = FileType::from_raw_mode(stat.st_mode);
    if kind != FileType::Socket {
        return Err(refuse(format!("it is a {kind:?}, not a socket")));
    }
    if stat.st_uid != uid {
        return Err(refuse(format!(
            "it is owned by uid {}, not the sandbox uid {uid}",
            stat.st_uid
        )));
    }
    let via = format!("/proc/self/fd/{}", fd.as_raw_fd());
    let stream = UnixStream::connect(&via)
        .await
        .map_err(|source| Error::Connect {
            path: path.clone(),
            source,
        })?;
    drop(fd);
    Ok(stream)
}

/// What a [`SocketBridge`] refused so far.
#[derive(Debug, Default)]
pub struct BridgeStats {
    refused: AtomicU64,
    last_refusal: Mutex<Option<String>>,
}

impl BridgeStats {
    /// Connections refused because the sandbox-side socket failed the checks.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// The reason of the last refusal, as the error says it.
    pub fn last_refusal(&self) -> Option<String> {
        self.last_refusal
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// A host-side listener whose every connection is forwarded, after the checks of
/// [`connect_sandbox_socket`], to a socket the sandbox listens on. Dropping it stops listening.
#[derive(Debug)]
pub struct SocketBridge {
    path: PathBuf,
    stats: Arc<BridgeStats>,
    task: JoinHandle<()>,
}

impl SocketBridge {
    /// Listens on `listen` (its directory must be reachable by root only) and forwards to
    /// `target_dir/target_name`, owned by `uid`.
    pub fn start(
        listen: &Path,
        target_dir: &Path,
        target_name: &str,
        uid: u32,
    ) -> Result<Self, Error> {
        remove_stale(listen)?;
        let listener = UnixListener::bind(listen).map_err(|source| Error::Prepare {
            path: listen.to_owned(),
            source,
        })?;
        let stats = Arc::new(BridgeStats::default());
        let task_stats = stats.clone();
        let target_dir = target_dir.to_owned();
        let target_name = target_name.to_owned();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                let stats = task_stats.clone();
                let target_dir = target_dir.clone();
                let target_name = target_name.clone();
                tokio::spawn(async move {
                    match connect_sandbox_socket(&target_dir, &target_name, uid).await {
                        Ok(mut outbound) => {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                        Err(error @ Error::UnsafeSocket { .. }) => {
                            tracing::warn!(%error, "refused a connection into the sandbox");
                            stats.refused.fetch_add(1, Ordering::Relaxed);
                            *stats.last_refusal.lock().unwrap_or_else(|p| p.into_inner()) =
                                Some(error.to_string());
                        }
                        Err(error) => tracing::debug!(%error, "sandbox socket not answering"),
                    }
                });
            }
        });
        Ok(Self {
            path: listen.to_owned(),
            stats,
            task,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn stats(&self) -> &Arc<BridgeStats> {
        &self.stats
    }
}

impl Drop for SocketBridge {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Removes a socket left by an earlier run (and nothing that is not a socket or link).
pub(crate) fn remove_stale(path: &Path) -> Result<(), Error> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) => {
            use std::os::unix::fs::FileTypeExt;
            if meta.file_type().is_socket() || meta.file_type().is_symlink() {
                std::fs::remove_file(path).map_err(|source| Error::Prepare {
                    path: path.to_owned(),
                    source,
                })
            } else {
                Err(Error::Prepare {
                    path: path.to_owned(),
                    source: std::io::Error::other("exists and is not a socket"),
                })
            }
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(Error::Prepare {
            path: path.to_owned(),
            source,
        }),
    }
}
