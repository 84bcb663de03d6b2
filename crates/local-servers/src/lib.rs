//! PostgreSQL and `nats-server` started from the binaries installed on this machine, as child
//! processes that stop when the starting process ends (a parent-death signal set by `setpriv`).
//!
//! The testkit starts throwaway ones in temp dirs; `canopy up` starts durable ones in the
//! project's data folder. Facts designed for: `initdb` refuses to run as root, so the server runs
//! as the `postgres` user (or `nobody`); Debian keeps the server binaries outside PATH.
//!
//! Both listen on loopback only and require credentials generated when their data is created
//! and kept beside it (mode 0600): Postgres a password for `postgres` (scram-sha-256, on TCP and
//! the socket alike), nats-server a user `canopy` and its password. [`LocalServer::url`] carries
//! them. A Postgres cluster created before this (with no password file) keeps trusting local
//! connections.

mod process;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

pub use process::{free_port, fresh_dir, is_root};
use process::{run, spawn_detached};

/// A server started by this process.
#[derive(Debug, Clone)]
pub struct LocalServer {
    pub url: String,
    pub pid: u32,
    /// Where the server keeps its data and its log.
    pub dir: PathBuf,
}

impl LocalServer {
    /// Sends `signal` (`TERM`, `KILL`, ...) to the server process, with the `kill` command.
    pub fn signal(&self, signal: &str) -> Result<()> {
        run(Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid.to_string()))
    }

    /// Whether the process has ended. Children are never reaped (see `process`), so an ended
    /// one lingers as a zombie until the starting process exits; that counts as ended.
    pub fn has_exited(&self) -> bool {
        match std::fs::read_to_string(format!("/proc/{}/stat", self.pid)) {
            Ok(stat) => stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .is_none_or(|state| state == "Z" || state == "X"),
            Err(_) => true,
        }
    }
}

/// Whether every directory above `path` lets other users pass (`o+x`), so that a process
/// running as another user (the embedded Postgres as `postgres`, a sandbox's uid) can reach it.
pub fn reachable_by_others(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let Ok(path) = std::path::absolute(path) else {
        return false;
    };
    path.ancestors()
        .skip(1)
        .all(|dir| match std::fs::metadata(dir) {
            Ok(meta) => meta.permissions().mode() & 0o001 != 0,
            // Not there yet: it will be created by us, open enough (umask permitting).
            Err(_) => true,
        })
}

/// A stable place under `/var/lib/canopy/<kind>/` standing in for `path` when other users cannot
/// reach `path` (see [`reachable_by_others`]): the same `path` always maps to the same place, a
/// short one (sockets live below it, and a socket's path has at most 107 bytes).
pub fn reachable_home(kind: &str, path: &Path) -> PathBuf {
    let path = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
    // FNV-1a: stable across builds and platforms, unlike the standard library's hasher.
    let digest = path
        .as_os_str()
        .as_encoded_bytes()
        .iter()
        .fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
            (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
        });
    Path::new("/var/lib/canopy")
        .join(kind)
        .join(format!("{digest:016x}"))
}

/// How durable a local Postgres should be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// fsync off: for throwaway test servers.
    Throwaway,
    /// Postgres defaults: for a dev stack whose data survives restarts.
    Durable,
}

/// Starts Postgres on `port` with its cluster in `dir/data`, running `initdb` first when the
/// cluster does not exist yet. Returns once the process is spawned; callers wait for readiness.
///
/// As root the server runs as an unprivileged user, who must be able to reach `dir`: when a
/// directory above it is closed to other users (a clone under `/root`, a `mktemp -d`), the
/// cluster lives at [`reachable_home`]`("postgres", dir)` instead (stable, so it survives
/// restarts), and the returned [`LocalServer::dir`] says where.
pub fn start_postgres(dir: &Path, port: u16, durability: Durability) -> Result<LocalServer> {
    let bin = postgres_bindir()?;
    let user = is_root().then(unprivileged_user);
    let dir = &if user.is_some() && !reachable_by_others(dir) {
        reachable_home("postgres", dir)
    } else {
        dir.to_owned()
    };
    let data = dir.join("data");
    std::fs::create_dir_all(dir)?;
    let fresh = !data.join("PG_VERSION").exists();
    if fresh {
        std::fs::create_dir_all(&data)?;
    }
    let log_path = dir.join("postgres.log");
    std::fs::File::create(&log_path)?;
    if let Some(user) = &user {
        run(Command::new("chown")
            .arg("-R")
            .arg(format!("{user}:"))
            .arg(dir))?;
    }
    let password_file = dir.join("password");
    if fresh {
        let password = secret()?;
        write_private(&password_file, &password)?;
        if let Some(user) = &user {
            run(Command::new("chown")
                .arg(format!("{user}:"))
                .arg(&password_file))?;
        }
        run(as_user(&user, &bin.join("initdb"), None)
            .args([
                "-A",
                "scram-sha-256",
                "-U",
                "postgres",
                "--no-sync",
                "-E",
                "UTF8",
            ])
            .arg(format!("--pwfile={}", password_file.display()))
            .arg("-D")
            .arg(&data))
        .context("initdb")?;
    }
    let credentials = match std::fs::read_to_string(&password_file) {
        Ok(password) => format!("postgres:{}", password.trim()),
        // a cluster from before passwords: it trusts local connections
        Err(_) => "postgres".to_owned(),
    };
    let log = std::fs::OpenOptions::new().append(true).open(&log_path)?;
    let mut server = as_user(&user, &bin.join("postgres"), Some("INT"));
    server
        .arg("-D")
        .arg(&data)
        .args(["-p", &port.to_string(), "-k"])
        .arg(dir)
        .args([
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "max_connections=300",
        ]);
    if durability == Durability::Throwaway {
        server.args(["-c", "fsync=off", "-c", "synchronous_commit=off"]);
        server.args(["-c", "full_page_writes=off"]);
    }
    server
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // SIGINT is Postgres's fast shutdown.
    let pid = spawn_detached(server).context("start postgres")?;
    Ok(LocalServer {
        url: format!("postgres://{credentials}@127.0.0.1:{port}/postgres"),
        pid,
        dir: dir.to_owned(),
    })
}

/// Starts `nats-server -js` on `port` with its JetStream store in `dir/jetstream`, requiring the
/// user `canopy` and a password kept in `dir/nats.conf` (made on first start, mode 0600).
pub fn start_nats(dir: &Path, port: u16) -> Result<LocalServer> {
    std::fs::create_dir_all(dir)?;
    let password_file = dir.join("nats-password");
    if !password_file.exists() {
        write_private(&password_file, &secret()?)?;
    }
    let password = std::fs::read_to_string(&password_file)?.trim().to_owned();
    let config = dir.join("nats.conf");
    write_private(
        &config,
        &format!("authorization {{\n  user: canopy\n  password: \"{password}\"\n}}\n"),
    )?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("nats.log"))?;
    let mut command = canopy_process::death_signal("TERM", nats_server_binary()?);
    command
        .args(["-js", "-a", "127.0.0.1"])
        .arg("-c")
        .arg(&config)
        .args(["-p", &port.to_string(), "-sd"])
        .arg(dir.join("jetstream"))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    let pid = spawn_detached(command)
        .context("start nats-server (is it installed? scripts/setup.sh installs it)")?;
    Ok(LocalServer {
        url: format!("nats://canopy:{password}@127.0.0.1:{port}"),
        pid,
        dir: dir.to_owned(),
    })
}

/// The nats-server binary: on PATH, else where Debian's package puts it (`/usr/sbin`, which a
/// normal user's PATH does not hold).
pub fn nats_server_binary() -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join("nats-server"))
        .find(|candidate| candidate.is_file())
        .context(
            "no nats-server found on PATH or in /usr/sbin: run scripts/setup.sh or set NATS_URL",
        )
}

/// 32 random bytes as hex: a password that needs no quoting in a URL or a config file.
fn secret() -> Result<String> {
    use std::io::Read;
    let mut bytes = [0_u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut random| random.read_exact(&mut bytes))
        .context("read /dev/urandom")?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Writes `text` to `path`, readable by its owner only.
fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut file| file.write_all(text.as_bytes()))
        .with_context(|| format!("write {}", path.display()))
}

/// `setpriv` with a parent-death signal, dropping to `user` when given.
fn as_user(user: &Option<String>, program: &Path, death_signal: Option<&str>) -> Command {
    let mut command = Command::new("setpriv");
    if let Some(signal) = death_signal {
        command.arg("--pdeathsig").arg(signal);
    }
    if let Some(user) = user {
        command
            .arg(format!("--reuid={user}"))
            .arg(format!("--regid={user}"))
            .arg("--init-groups");
    }
    command.arg(program);
    command
}

fn unprivileged_user() -> String {
    let has_postgres = std::fs::read_to_string("/etc/passwd")
        .map(|passwd| passwd.lines().any(|l| l.starts_with("postgres:")))
        .unwrap_or(false);
    if has_postgres {
        "postgres".to_owned()
    } else {
        "nobody".to_owned()
    }
}

/// Debian keeps the server binaries outside PATH: ask `pg_config`, else look under
/// /usr/lib/postgresql/*/bin (newest first).
fn postgres_bindir() -> Result<PathBuf> {
    if let Ok(output) = Command::new("pg_config").arg("--bindir").output()
        && output.status.success()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
        if dir.join("initdb").exists() {
            return Ok(dir);
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    match versions.pop() {
        Some((_, bin)) => Ok(bin),
        None => {
            bail!("no PostgreSQL server binaries found: run scripts/setup.sh or set DATABASE_URL")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_directory_closed_to_others_is_not_reachable_and_gets_a_stable_home() {
        let dir = tempfile::tempdir().unwrap();
        let inside = dir.path().join("clone/.canopy/postgres");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        assert!(!reachable_by_others(&inside));
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(reachable_by_others(&inside));
        let home = reachable_home("postgres", &inside);
        assert_eq!(home, reachable_home("postgres", &inside));
        assert!(home.starts_with("/var/lib/canopy/postgres"));
        assert_eq!(
            home.to_string_lossy().len(),
            "/var/lib/canopy/postgres/".len() + 16
        );
        assert_ne!(home, reachable_home("postgres", dir.path()));
    }
}
