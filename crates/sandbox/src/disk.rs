//! The disk quota of a sandbox: bytes and inodes of everything it can write that persists on
//! the host (its workspace, home and `run` directory, which all live under [`Layout::data`]).
//!
//! As root, where the host lets root loop-mount an image ([`probe`], at start-up), `data` is
//! the mount point of a sparse ext4 image of its own
//! (`<root>/<id>/disk.img`, made with `mkfs.ext4 -N <inodes> -m 0`, mounted `loop,nosuid,nodev`):
//! a write past it fails with `ENOSPC` inside the sandbox, and the host's filesystem never loses
//! more than the image's size. The image is mounted before the clone, unmounted when the sandbox
//! stops or is removed, and kept across a stop (a resume finds its workspace). A mount left by a
//! crashed runner is reused when its sandbox starts again ([`ensure_mounted`] finds it by its
//! mount point and checks its loop device's backing file) and unmounted at start-up when no live
//! provider leases the uid that owns it ([`sweep`]). Nothing here opens a path inside the
//! image: the mount point and the image are root's, in the root-owned sandbox directory.
//!
//! Rootless nothing can be mounted: [`usage`] measures the tree (through directory fds opened
//! `O_NOFOLLOW`, never following a link the sandbox made) and the provider stops a sandbox found
//! over its quota; between two checks a sandbox can go past it, by at most what it writes in the
//! interval, and `RLIMIT_FSIZE` (at most the quota) caps any one file.
//!
//! [`Layout::data`]: crate::bwrap::Layout

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use rustix::fs::{AtFlags, Dir, FileType, Mode, OFlags};

use crate::Error;

/// How much a sandbox may keep on the host's disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskQuota {
    /// Bytes of the workspace, home and `run` together (the image's size as root).
    pub bytes: u64,
    /// Files, directories and links there (the image's inode count as root).
    pub inodes: u64,
    /// Rootless: how often the usage is measured.
    pub check_interval: Duration,
}

impl Default for DiskQuota {
    fn default() -> Self {
        Self {
            bytes: 4 << 30,
            inodes: 262_144,
            check_interval: Duration::from_secs(10),
        }
    }
}

/// The smallest image `mkfs.ext4` makes a usable filesystem of (journal and tables included).
pub const MIN_DISK_BYTES: u64 = 16 << 20;
/// The fewest inodes a quota may have (the clone, OpenCode's home and a little work).
pub const MIN_DISK_INODES: u64 = 256;

impl DiskQuota {
    pub(crate) fn validate(&self) -> Result<(), Error> {
        if self.bytes < MIN_DISK_BYTES || self.inodes < MIN_DISK_INODES {
            return Err(Error::InvalidDiskQuota {
                reason: format!(
                    "{} bytes and {} inodes; at least {MIN_DISK_BYTES} bytes and {MIN_DISK_INODES} inodes",
                    self.bytes, self.inodes
                ),
            });
        }
        Ok(())
    }
}

/// Whether images can be made and loop-mounted here: makes, mounts and removes a smallest one
/// under `root` (a container without loop devices cannot).
pub(crate) fn probe(root: &Path) -> Result<(), Error> {
    let dir = root.join(".disk-probe");
    let image = dir.join("probe.img");
    let data = dir.join("data");
    // A probe a crash interrupted.
    let _ = unmount(&data);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir(&dir).map_err(|source| Error::Prepare {
        path: dir.clone(),
        source,
    })?;
    let quota = DiskQuota {
        bytes: MIN_DISK_BYTES,
        inodes: MIN_DISK_INODES,
        ..DiskQuota::default()
    };
    let mounted = ensure_mounted(&image, &data, &quota).and_then(|()| unmount(&data));
    let _ = std::fs::remove_dir_all(&dir);
    mounted
}

/// Mounts the image of the sandbox at `data` (creating the image on first use), or reuses the
/// mount a crashed runner left there. `data`'s parent must exist and be root's.
pub(crate) fn ensure_mounted(image: &Path, data: &Path, quota: &DiskQuota) -> Result<(), Error> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| Error::Prepare { path, source }
    };
    match std::fs::create_dir(data) {
        Err(error) if error.kind() != std::io::ErrorKind::AlreadyExists => {
            return Err(io(data)(error));
        }
        _ => {}
    }
    let mounts = mounts_at(data);
    if let Some(source) = mounts.last() {
        let image_path = std::fs::canonicalize(image).unwrap_or_else(|_| image.to_owned());
        if backing_file(source).as_deref() == Some(image_path.as_path()) {
            tracing::info!(data = %data.display(), "reusing the disk image mount a previous run left");
            return Ok(());
        }
        return Err(Error::Command {
            what: format!("mounting the disk image at {}", data.display()),
            detail: format!("something else ({source}) is mounted there"),
        });
    }
    if !image.exists() {
        make_image(image, quota)?;
    }
    run(
        Command::new(tool("mount")?)
            .args([
                "-t",
                "ext4",
                "-o",
                "loop,nosuid,nodev,noatime,noinit_itable",
            ])
            .arg(image)
            .arg(data),
        "mount the sandbox's disk image",
    )
}

/// Unmounts whatever is mounted at `data` (also a mount stacked twice); lazily when busy, so
/// that a sandbox process still holding it cannot keep its removal from finishing.
pub(crate) fn unmount(data: &Path) -> Result<(), Error> {
    for _ in 0..8 {
        if mounts_at(data).is_empty() {
            return Ok(());
        }
        let umount = tool("umount")?;
        let normal = run(
            Command::new(&umount).arg(data),
            "unmount the sandbox's disk image",
        );
        if normal.is_err() {
            run(
                Command::new(&umount).arg("-l").arg(data),
                "detach the sandbox's disk image",
            )?;
        }
    }
    Err(Error::Command {
        what: format!("unmounting {}", data.display()),
        detail: "still mounted after 8 unmounts".to_owned(),
    })
}

/// Whether something is mounted at `data`.
pub(crate) fn is_mounted(data: &Path) -> bool {
    !mounts_at(data).is_empty()
}

/// Unmounts the images under `root` (mounted at `<root>/<id>/data`) that a crashed runner
/// left: those whose workspace's uid `lease` can take (no live provider holds it).
pub(crate) fn sweep<L>(root: &Path, lease: impl Fn(u32) -> Option<L>) {
    use std::os::unix::fs::MetadataExt;
    // mountinfo names the resolved path (the root or a parent may be a link the operator made).
    let root = std::fs::canonicalize(root).unwrap_or_else(|_| root.to_owned());
    for (mount_point, _) in mount_table() {
        let Some(id_dir) = mount_point
            .strip_suffix("/data")
            .and_then(|dir| dir.strip_prefix(&format!("{}/", root.display())))
        else {
            continue;
        };
        if id_dir.is_empty() || id_dir.contains('/') {
            continue;
        }
        let data = PathBuf::from(&mount_point);
        // The workspace entry's own owner, never followed (the fs root is root's).
        let owner = std::fs::symlink_metadata(data.join("workspace")).map(|meta| meta.uid());
        let _held = match owner {
            Ok(uid) => match lease(uid) {
                Some(held) => Some(held),
                None => continue,
            },
            Err(_) => None,
        };
        match unmount(&data) {
            Ok(()) => {
                tracing::info!(data = %data.display(), "unmounted a sandbox disk a previous run left")
            }
            Err(error) => {
                tracing::warn!(%error, data = %data.display(), "cannot unmount a stale sandbox disk")
            }
        }
    }
}

/// What a tree uses: bytes allocated and inodes (each hard link counted).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiskUsage {
    pub bytes: u64,
    pub inodes: u64,
}

impl DiskUsage {
    pub(crate) fn exceeds(&self, quota: &DiskQuota) -> bool {
        self.bytes > quota.bytes || self.inodes > quota.inodes
    }
}

/// Deeper trees count as over any quota: measuring them would hold one fd per level.
const MAX_DEPTH: usize = 256;

/// What the trees at `dirs` use together, read through fds (`O_NOFOLLOW` at every step: a link
/// the sandbox planted is counted, never followed). A tree deeper than 256 levels is reported
/// as `u64::MAX` inodes.
pub(crate) fn usage(dirs: &[&Path]) -> DiskUsage {
    let mut total = DiskUsage::default();
    for dir in dirs {
        let Ok(fd) = rustix::fs::open(
            *dir,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        ) else {
            continue;
        };
        if walk(&fd, 0, &mut total).is_err() {
            total.inodes = u64::MAX;
            return total;
        }
    }
    total
}

struct TooDeep;

fn walk(dir: &OwnedFd, depth: usize, total: &mut DiskUsage) -> Result<(), TooDeep> {
    if depth > MAX_DEPTH {
        return Err(TooDeep);
    }
    if let Ok(stat) = rustix::fs::fstat(dir) {
        total.bytes += stat.st_blocks as u64 * 512;
        total.inodes += 1;
    }
    let Ok(entries) = Dir::read_from(dir.as_fd()) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        if name.to_bytes() == b"." || name.to_bytes() == b".." {
            continue;
        }
        let Ok(stat) = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) else {
            continue;
        };
        if FileType::from_raw_mode(stat.st_mode) == FileType::Directory {
            let opened = rustix::fs::openat(
                dir,
                name,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            );
            if let Ok(child) = opened {
                walk(&child, depth + 1, total)?;
            }
            continue;
        }
        total.bytes += stat.st_blocks as u64 * 512;
        total.inodes += 1;
    }
    Ok(())
}

/// A sparse file of the quota's size with an ext4 of the quota's inodes: root owns its root
/// directory, nothing is reserved for root, and the image is root's alone. Inode tables and the
/// journal are left unwritten (they read as zeros in a sparse file; mounted `noinit_itable`),
/// so a new 4 GiB image takes about 2 MB of the host's disk.
fn make_image(image: &Path, quota: &DiskQuota) -> Result<(), Error> {
    use std::os::unix::fs::OpenOptionsExt;
    let partial = image.with_extension("img.partial");
    let io = |source| Error::Prepare {
        path: partial.clone(),
        source,
    };
    let _ = std::fs::remove_file(&partial);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&partial)
        .map_err(io)?;
    file.set_len(quota.bytes).map_err(io)?;
    drop(file);
    let made = run(
        Command::new(tool("mkfs.ext4")?)
            .args(["-q", "-F", "-m", "0", "-N"])
            .arg(quota.inodes.to_string())
            .args([
                "-E",
                "root_owner=0:0,lazy_itable_init=1,lazy_journal_init=1,nodiscard",
            ])
            .arg(&partial),
        "make the sandbox's disk image",
    );
    if let Err(error) = made {
        let _ = std::fs::remove_file(&partial);
        return Err(error);
    }
    std::fs::rename(&partial, image).map_err(|source| Error::Prepare {
        path: image.to_owned(),
        source,
    })
}

/// The sources (`/dev/loopN`) of the mounts at `mount_point`, bottom first. Its path is
/// resolved as mountinfo shows it; every component is root's (the sandbox dir and `data`).
fn mounts_at(mount_point: &Path) -> Vec<String> {
    let resolved = std::fs::canonicalize(mount_point).unwrap_or_else(|_| mount_point.to_owned());
    let wanted = resolved.to_string_lossy();
    mount_table()
        .into_iter()
        .filter(|(point, _)| *point == wanted)
        .map(|(_, source)| source)
        .collect()
}

/// Every mount of this process's namespace as (mount point, source), from `/proc/self/mountinfo`.
fn mount_table() -> Vec<(String, String)> {
    let table = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    table.lines().filter_map(parse_mountinfo_line).collect()
}

fn parse_mountinfo_line(line: &str) -> Option<(String, String)> {
    let (before, after) = line.split_once(" - ")?;
    let mount_point = before.split(' ').nth(4)?;
    let source = after.split(' ').nth(1)?;
    Some((unescape(mount_point), unescape(source)))
}

/// mountinfo writes space, tab, newline and backslash as `\ooo`.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && let Ok(value) = u8::from_str_radix(&field[i + 1..i + 4], 8)
        {
            out.push(value);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The file behind a loop device (`/dev/loopN`), from sysfs.
fn backing_file(source: &str) -> Option<PathBuf> {
    let name = source.strip_prefix("/dev/")?;
    if !name.starts_with("loop") || name.contains('/') {
        return None;
    }
    let backing = std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file")).ok()?;
    Some(PathBuf::from(backing.trim_end_matches('\n')))
}

/// `name` in the system binary directories (a root process's PATH may lack `/usr/sbin`).
fn tool(name: &str) -> Result<PathBuf, Error> {
    ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .map(|dir| Path::new(dir).join(name))
        .find(|path| path.is_file())
        .ok_or_else(|| Error::Command {
            what: format!("finding {name}"),
            detail: "not in /usr/sbin, /sbin, /usr/bin or /bin (root-mode sandboxes need e2fsprogs and util-linux for their disk quota)".to_owned(),
        })
}

fn run(command: &mut Command, what: &str) -> Result<(), Error> {
    let output = command
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|source| Error::Spawn {
            program: what.to_owned(),
            source,
        })?;
    if output.status.success() {
        return Ok(());
    }
    Err(Error::Command {
        what: what.to_owned(),
        detail: format!(
            "{}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_give_the_unescaped_mount_point_and_source() {
        let line = "46 27 7:0 / /tmp/a\\040b/data rw,nosuid,nodev,relatime - ext4 /dev/loop0 rw";
        assert_eq!(
            parse_mountinfo_line(line),
            Some(("/tmp/a b/data".to_owned(), "/dev/loop0".to_owned()))
        );
        assert_eq!(parse_mountinfo_line("garbage"), None);
    }

    #[test]
    fn usage_counts_links_without_following_them() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        for i in 0..50 {
            std::fs::write(outside.path().join(format!("f{i}")), vec![1u8; 8192]).unwrap();
        }
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/file"), vec![1u8; 64 << 10]).unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("link")).unwrap();

        let usage = usage(&[dir.path()]);

        // The root, sub, sub/file and the link: the 50 files behind the link are not counted.
        assert_eq!(usage.inodes, 4);
        assert!(usage.bytes >= 64 << 10, "{usage:?}");
        assert!(usage.bytes < (64 << 10) + 50 * 8192, "{usage:?}");
    }

    #[test]
    fn a_too_small_quota_is_refused() {
        let quota = DiskQuota {
            bytes: 1 << 20,
            ..DiskQuota::default()
        };
        assert!(matches!(
            quota.validate(),
            Err(Error::InvalidDiskQuota { .. })
        ));
        assert!(DiskQuota::default().validate().is_ok());
    }
}
