//! The guard every agent tool command goes through: `canopy-sandbox-shell`.
//!
//! OpenCode's bash tool runs each command with `$SHELL -c …`; inside a sandbox `$SHELL` is this
//! binary (bound read-only at `/opt/canopy/bin/bash`). Before it execs `/bin/bash` with the same
//! arguments it:
//!
//! - sets the command's own CPU budget (and an address-space limit when the sandbox has no
//!   memory cgroup) from [`ToolShellLimits`], read from a root-owned file bound read-only at
//!   [`ToolShellLimits::PATH`]; limits only ever go down;
//! - drops every `OPENCODE_*` variable (the server's password among them) and points `HOME`
//!   and `XDG_*` at a directory under `/tmp`;
//! - enters a Landlock domain: read and execute everywhere in the view, write only under
//!   `/workspace`, `/tmp` and `/dev` (OpenCode's database and config in the home become
//!   read-only), no TCP connection to OpenCode's port or the model bridge's, no abstract unix
//!   socket or signal outside the domain. Being in a domain also denies ptrace access to
//!   OpenCode, so `/proc/<its pid>/environ` and `mem` are closed.
//!
//! The Landlock ruleset names ABI 7 (Linux 6.15) and is applied best effort: a kernel without
//! Landlock gets a warning; a kernel with Landlock must enforce it or the command does not run.
//! Unix sockets are not covered by Landlock at ABI 7: OpenCode's socket stays reachable, which
//! is why its API has a password the tools never see.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, ExitCode};

use landlock::{
    ABI, Access, AccessFs, AccessNet, LandlockStatus, NetPort, PathBeneath, PathFd,
    RestrictionStatus, Ruleset, RulesetAttr, RulesetCreated, RulesetCreatedAttr, RulesetStatus,
    Scope,
};
use rustix::process::{Resource, Rlimit};

/// The per-command limits the guard sets; the host writes them to [`ToolShellLimits::PATH`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolShellLimits {
    /// SIGXCPU after this much CPU time.
    pub cpu_soft_seconds: u64,
    /// SIGKILL after this much CPU time.
    pub cpu_hard_seconds: u64,
    /// `RLIMIT_AS`; only when the sandbox has no memory cgroup.
    pub address_space_bytes: Option<u64>,
    /// TCP ports the command may not connect to (OpenCode's, the model bridge's).
    pub denied_tcp_ports: Vec<u16>,
}

/// Where tools may write: the workspace, the private `/tmp` and devices.
pub const TOOL_WRITABLE: [&str; 3] = ["/workspace", "/tmp", "/dev"];
/// `HOME` of every tool command (the sandbox's home is read-only for tools).
pub const TOOL_HOME: &str = "/tmp/tool-home";

impl ToolShellLimits {
    /// Where the guard reads its limits inside the sandbox.
    pub const PATH: &'static str = "/opt/canopy/shell.conf";

    /// The file's text: one `key=value` a line.
    pub fn render(&self) -> String {
        let ports: Vec<String> = self.denied_tcp_ports.iter().map(u16::to_string).collect();
        let mut text = format!(
            "cpu_soft_seconds={}\ncpu_hard_seconds={}\ndenied_tcp_ports={}\n",
            self.cpu_soft_seconds,
            self.cpu_hard_seconds,
            ports.join(",")
        );
        if let Some(bytes) = self.address_space_bytes {
            text.push_str(&format!("address_space_bytes={bytes}\n"));
        }
        text
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let mut soft = None;
        let mut hard = None;
        let mut address_space_bytes = None;
        let mut denied_tcp_ports = Vec::new();
        for line in text.lines().filter(|line| !line.trim().is_empty()) {
            let (key, value) = line
                .split_once('=')
                .ok_or_else(|| format!("not key=value: {line:?}"))?;
            let number = || {
                value
                    .parse::<u64>()
                    .map_err(|error| format!("{key}: {error}"))
            };
            match key {
                "cpu_soft_seconds" => soft = Some(number()?),
                "cpu_hard_seconds" => hard = Some(number()?),
                "address_space_bytes" => address_space_bytes = Some(number()?),
                "denied_tcp_ports" => {
                    for port in value.split(',').filter(|port| !port.is_empty()) {
                        denied_tcp_ports.push(
                            port.parse::<u16>()
                                .map_err(|error| format!("{key}: {error}"))?,
                        );
                    }
                }
                other => return Err(format!("unknown key {other:?}")),
            }
        }
        Ok(Self {
            cpu_soft_seconds: soft.ok_or("cpu_soft_seconds is missing")?,
            cpu_hard_seconds: hard.ok_or("cpu_hard_seconds is missing")?,
            address_space_bytes,
            denied_tcp_ports,
        })
    }
}

/// The binary's whole job: limit, clean the environment, restrict, exec `/bin/bash "$@"`.
/// Returns only when something failed (126, with the reason on stderr).
pub fn main() -> ExitCode {
    let error = match run() {
        Ok(never) => match never {},
        Err(error) => error,
    };
    let _ = writeln!(std::io::stderr(), "canopy-sandbox-shell: {error}");
    ExitCode::from(126)
}

enum Never {}

fn run() -> Result<Never, String> {
    let text = std::fs::read_to_string(ToolShellLimits::PATH)
        .map_err(|error| format!("cannot read {}: {error}", ToolShellLimits::PATH))?;
    let limits = ToolShellLimits::parse(&text)?;
    lower_limit(
        Resource::Cpu,
        limits.cpu_soft_seconds,
        limits.cpu_hard_seconds,
    )?;
    if let Some(bytes) = limits.address_space_bytes {
        lower_limit(Resource::As, bytes, bytes)?;
    }
    let tool_home = Path::new(TOOL_HOME);
    for dir in ["", ".config", ".local/share", ".cache", ".local/state"] {
        let dir = tool_home.join(dir);
        std::fs::create_dir_all(&dir)
            .map_err(|error| format!("cannot create {}: {error}", dir.display()))?;
    }
    let writable: Vec<&Path> = TOOL_WRITABLE.iter().map(Path::new).collect();
    let status = ruleset(&writable, &limits.denied_tcp_ports)?
        .restrict_self()
        .map_err(|error| format!("landlock: restrict_self: {error}"))?;
    check_enforced(&status)?;

    let mut command = Command::new("/bin/bash");
    command.args(std::env::args_os().skip(1));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("OPENCODE_") {
            command.env_remove(key);
        }
    }
    command
        .env("HOME", tool_home)
        .env("XDG_CONFIG_HOME", tool_home.join(".config"))
        .env("XDG_DATA_HOME", tool_home.join(".local/share"))
        .env("XDG_CACHE_HOME", tool_home.join(".cache"))
        .env("XDG_STATE_HOME", tool_home.join(".local/state"));
    let error = command.exec();
    Err(format!("cannot exec /bin/bash: {error}"))
}

/// Sets `resource` to at most `soft`/`hard`, never above what the command already had.
fn lower_limit(resource: Resource, soft: u64, hard: u64) -> Result<(), String> {
    let current = rustix::process::getrlimit(resource);
    let cap = |wanted: u64, now: Option<u64>| Some(now.map_or(wanted, |now| now.min(wanted)));
    let maximum = cap(hard, current.maximum);
    let wanted = Rlimit {
        current: cap(soft.min(hard), current.current).min(maximum),
        maximum,
    };
    rustix::process::setrlimit(resource, wanted)
        .map_err(|error| format!("cannot set {resource:?} to {wanted:?}: {error}"))
}

/// The Landlock ABI the ruleset is written for (the newest this crate was tested on).
const TESTED_ABI: ABI = ABI::V7;

/// The Landlock ruleset of a tool command: read and execute everywhere, write only under
/// `writable`, TCP connect to every port but `denied_ports` (one rule per allowed port:
/// Landlock has no ranges), scoped abstract sockets and signals. `restrict_self` on it enters
/// the domain (this thread only; exec keeps it).
pub(crate) fn ruleset(writable: &[&Path], denied_ports: &[u16]) -> Result<RulesetCreated, String> {
    let fail = |what: &str| {
        let what = what.to_owned();
        move |error: landlock::RulesetError| format!("landlock: {what}: {error}")
    };
    let mut ruleset = Ruleset::default()
        .handle_access(AccessFs::from_all(TESTED_ABI))
        .map_err(fail("filesystem access"))?
        .handle_access(AccessNet::ConnectTcp)
        .map_err(fail("network access"))?
        .scope(Scope::from_all(TESTED_ABI))
        .map_err(fail("scopes"))?
        .create()
        .map_err(fail("creating the ruleset"))?;
    let beneath = |path: &Path, access| {
        PathFd::new(path)
            .map(|fd| PathBeneath::new(fd, access))
            .map_err(|error| format!("landlock: cannot open {}: {error}", path.display()))
    };
    ruleset = ruleset
        .add_rule(beneath(Path::new("/"), AccessFs::from_read(TESTED_ABI))?)
        .map_err(fail("read rule"))?;
    for path in writable {
        ruleset = ruleset
            .add_rule(beneath(path, AccessFs::from_all(TESTED_ABI))?)
            .map_err(fail("write rule"))?;
    }
    // Network rules allow; the handled CONNECT_TCP denies every port no rule names.
    for port in (1..=u16::MAX).filter(|port| !denied_ports.contains(port)) {
        ruleset = ruleset
            .add_rule(NetPort::new(port, AccessNet::ConnectTcp))
            .map_err(fail("port rule"))?;
    }
    Ok(ruleset)
}

/// A kernel with Landlock must have enforced the ruleset; one without gets a warning.
fn check_enforced(status: &RestrictionStatus) -> Result<(), String> {
    match (&status.landlock, &status.ruleset) {
        (LandlockStatus::Available { .. }, RulesetStatus::NotEnforced) => Err(format!(
            "landlock is available but the ruleset was not enforced: {status:?}"
        )),
        (LandlockStatus::Available { .. }, _) => Ok(()),
        (other, _) => {
            let _ = writeln!(
                std::io::stderr(),
                "canopy-sandbox-shell: warning: no landlock on this kernel ({other:?}); \
                 the command runs without it"
            );
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    #[test]
    fn limits_file_round_trips() {
        let limits = ToolShellLimits {
            cpu_soft_seconds: 600,
            cpu_hard_seconds: 605,
            address_space_bytes: Some(4 << 30),
            denied_tcp_ports: vec![4096, 8080],
        };
        assert_eq!(ToolShellLimits::parse(&limits.render()), Ok(limits.clone()));
        let without = ToolShellLimits {
            address_space_bytes: None,
            ..limits
        };
        assert_eq!(ToolShellLimits::parse(&without.render()), Ok(without));
        assert!(ToolShellLimits::parse("cpu_soft_seconds=1\n").is_err());
        assert!(ToolShellLimits::parse("cpu_soft_seconds=1\ncpu_hard_seconds=2\nx=1").is_err());
    }

    /// In a thread of its own (Landlock restricts the calling thread): denied ports and paths
    /// outside the writable ones are refused, the rest works.
    #[test]
    fn landlock_denies_the_named_ports_and_writes_elsewhere() {
        let writable = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        let denied = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let allowed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let denied_port = denied.local_addr().unwrap().port();
        let allowed_port = allowed.local_addr().unwrap().port();
        let writable_path = writable.path().to_owned();
        let elsewhere_path = elsewhere.path().to_owned();
        let report = std::thread::spawn(move || {
            let began = Instant::now();
            let built = ruleset(&[&writable_path], &[denied_port]).unwrap();
            let rules = began.elapsed();
            let status = built.restrict_self().unwrap();
            let restrict_self = began.elapsed() - rules;
            let connect = |port: u16| std::net::TcpStream::connect(("127.0.0.1", port)).map(|_| ());
            (
                status,
                rules,
                restrict_self,
                connect(denied_port),
                connect(allowed_port),
                std::fs::write(writable_path.join("ok"), "ok"),
                std::fs::write(elsewhere_path.join("no"), "no"),
                std::fs::read_dir("/usr/bin").map(|_| ()),
            )
        })
        .join()
        .unwrap();
        let (
            status,
            rules,
            restrict_self,
            denied_connect,
            allowed_connect,
            write_ok,
            write_no,
            read,
        ) = report;
        let _ = writeln!(
            std::io::stderr(),
            "landlock: ruleset with 65533 port rules built in {rules:?}, restrict_self took {restrict_self:?}"
        );
        assert_eq!(status.ruleset, RulesetStatus::FullyEnforced, "{status:?}");
        assert_eq!(
            denied_connect.unwrap_err().kind(),
            std::io::ErrorKind::PermissionDenied
        );
        allowed_connect.unwrap();
        write_ok.unwrap();
        assert_eq!(
            write_no.unwrap_err().kind(),
            std::io::ErrorKind::PermissionDenied
        );
        read.unwrap();
    }
}
