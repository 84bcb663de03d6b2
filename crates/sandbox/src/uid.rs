//! One uid per sandbox, leased across processes.
//!
//! Two sandboxes sharing a uid could read each other's workspace and would share one
//! `RLIMIT_NPROC` count. A lease is an exclusive `flock` on `<lock_dir>/<uid>.lock`, held while
//! the provider knows the sandbox; the kernel drops it when the holder dies, so a crashed runner
//! leaks nothing. The uids need no `/etc/passwd` entry.

use std::fs::File;
use std::ops::Range;
use std::path::Path;

use rustix::fs::FlockOperation;

use crate::Error;

#[derive(Debug)]
pub(crate) struct UidLease {
    uid: u32,
    _lock: File,
}

impl UidLease {
    pub(crate) fn uid(&self) -> u32 {
        self.uid
    }

    /// Leases `preferred` when it is free (a resumed sandbox keeps its uid), else the first
    /// free uid of `range`.
    pub(crate) fn acquire(
        lock_dir: &Path,
        range: &Range<u32>,
        preferred: Option<u32>,
    ) -> Result<Self, Error> {
        std::fs::create_dir_all(lock_dir).map_err(|source| Error::Prepare {
            path: lock_dir.to_owned(),
            source,
        })?;
        let candidates = preferred
            .filter(|uid| range.contains(uid))
            .into_iter()
            .chain(range.clone());
        for uid in candidates {
            let path = lock_dir.join(format!("{uid}.lock"));
            let file = File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map_err(|source| Error::Prepare { path, source })?;
            if rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive).is_ok() {
                return Ok(Self { uid, _lock: file });
            }
        }
        Err(Error::NoFreeUid {
            first: range.start,
            end: range.end,
        })
    }
}
