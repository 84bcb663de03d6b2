//! The on-disk layout of a sandbox and the bubblewrap command line that builds its view.
//!
//! The view: `/usr` (and the merged-usr links), a synthetic `/etc`, the OpenCode binary, the
//! workspace, a home, `/run/canopy` (where the sandbox creates `opencode.sock`), a read-only
//! `/run/canopy-host` (the model proxy's socket), a size-capped `/tmp`, its own `/proc` and
//! `/dev`, and the tool shell guard with its limits (`/opt/canopy`). Never `/`, never the host's `/proc`, home or other sandboxes. `--remount-ro /` comes
//! last, or the root tmpfs stays writable. Every namespace is unshared, the network included,
//! and nested user namespaces are disabled. Nothing secret is ever an argument: the whole argv
//! is readable at `/proc/1/cmdline` inside. With egress allowed, a third bridge serves the
//! host's egress proxy on `127.0.0.1:3128`, the proxy environment points there, and the CA
//! bundle (`/etc/ssl`) is bound; with it denied (the default) none of that exists.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use crate::egress::EgressPolicy;
use crate::limits::{Cgroup, Limits};
use crate::mode::{ROOTLESS_SANDBOX_UID, SandboxMode};
use crate::tool_shell::ToolShellLimits;

/// Where a sandbox's directories are on the host, under the provider's root.
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    pub(crate) dir: PathBuf,
    /// Root's, mode 0711: what the sandbox writes that stays on disk (workspace, home, run)
    /// lives under it. As root it is the mount point of [`Layout::image`] (`crate::disk`).
    pub(crate) data: PathBuf,
    /// Root's, mode 0600: the sandbox's ext4 image (root mode only).
    pub(crate) image: PathBuf,
    /// Owned by the sandbox uid, mode 0700: `/workspace`.
    pub(crate) workspace: PathBuf,
    /// Owned by the sandbox uid, mode 0700: `/home/sandbox` (OpenCode's database lives here).
    pub(crate) home: PathBuf,
    /// Owned by the sandbox uid, mode 0750: `/run/canopy`.
    pub(crate) run: PathBuf,
    /// Root's, mode 0755, read-only inside: `/run/canopy-host`.
    pub(crate) host: PathBuf,
    /// Root's, mode 0700, not in the sandbox: the runner's end of the OpenCode bridge.
    pub(crate) control: PathBuf,
    /// Root's, read-only inside: the synthetic `/etc` files and the tool shell's limits.
    pub(crate) etc: PathBuf,
}

/// The binaries bound into every sandbox, staged where sandbox uids can read them.
#[derive(Debug, Clone)]
pub(crate) struct Binaries {
    pub(crate) opencode: PathBuf,
    /// `canopy-sandbox-shell`, the guard of every tool command.
    pub(crate) shell: PathBuf,
}

pub(crate) const SANDBOX_WORKSPACE: &str = "/workspace";
const SANDBOX_HOME: &str = "/home/sandbox";
pub(crate) const OPENCODE_SOCKET: &str = "opencode.sock";
pub(crate) const MODEL_SOCKET: &str = "model.sock";
/// OpenCode's API password, in the host directory from the start until OpenCode is healthy.
pub(crate) const PASSWORD_FILE: &str = "opencode-password";
/// OpenCode's port inside the sandbox's own network namespace.
const OPENCODE_PORT: u16 = 4096;
/// The in-sandbox end of the model bridge.
pub(crate) const MODEL_PORT: u16 = 8080;
/// The egress proxy's socket in the host directory, and its port inside the sandbox.
pub(crate) const EGRESS_SOCKET: &str = "egress.sock";
pub(crate) const EGRESS_PORT: u16 = 3128;
const TOOL_SHELL: &str = "/opt/canopy/bin/bash";
/// The guard's limits under [`Layout::etc`], bound at [`ToolShellLimits::PATH`].
const SHELL_LIMITS: &str = "shell.conf";
/// A command gets SIGXCPU at its CPU budget and SIGKILL this much later (a soft limit equal to
/// the hard one would mean SIGKILL at once, indistinguishable from the OOM killer).
const CPU_GRACE_SECONDS: u64 = 5;

impl Layout {
    pub(crate) fn new(root: &Path, id: &str) -> Self {
        let dir = root.join(id);
        let data = dir.join("data");
        Self {
            workspace: data.join("workspace"),
            home: data.join("home"),
            run: data.join("run"),
            image: dir.join("disk.img"),
            data,
            host: dir.join("host"),
            control: dir.join("control"),
            etc: dir.join("etc"),
            dir,
        }
    }

    /// The sandbox's id (the name of its directory).
    pub(crate) fn id(&self) -> String {
        self.dir
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// The synthetic files bound into the sandbox, by name under [`Layout::etc`]; `uid` is the
    /// one its processes see as their own.
    pub(crate) fn etc_files(
        uid: u32,
        limits: &Limits,
        memory_cgroup: bool,
    ) -> Vec<(&'static str, String)> {
        let shell = ToolShellLimits {
            cpu_soft_seconds: limits.command_cpu_seconds,
            cpu_hard_seconds: limits.command_cpu_seconds + CPU_GRACE_SECONDS,
            address_space_bytes: (!memory_cgroup).then_some(limits.command_address_space_bytes),
            denied_tcp_ports: vec![OPENCODE_PORT, MODEL_PORT],
        };
        vec![
            (
                "passwd",
                format!(
                    "sandbox:x:{uid}:{uid}:sandbox:{SANDBOX_HOME}:/bin/bash\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
                ),
            ),
            ("group", format!("sandbox:x:{uid}:\nnogroup:x:65534:\n")),
            (
                "nsswitch.conf",
                "passwd: files\ngroup: files\nhosts: files\n".to_owned(),
            ),
            ("hosts", "127.0.0.1 localhost\n::1 localhost\n".to_owned()),
            // The limits of the guard OpenCode's bash tool runs commands with: each command gets
            // its own CPU budget, which the long-lived server must not share.
            (SHELL_LIMITS, shell.render()),
        ]
    }
}

/// What runs inside the bwrap.
#[derive(Debug)]
pub(crate) enum Inner<'a> {
    /// The two socat bridges and `opencode serve`.
    OpenCode { config_json: &'a str },
    /// `/bin/bash -c script bash args…` (the arguments are `$1`…, never shell text).
    Script { script: &'a str, args: &'a [String] },
}

/// `setpriv` and its arguments that run what follows (ending in `--`) as `uid` and its group:
/// no supplementary groups, no capabilities, no new privileges.
pub(crate) fn as_uid(uid: u32) -> Vec<String> {
    vec![
        "/usr/bin/setpriv".to_owned(),
        format!("--reuid={uid}"),
        format!("--regid={uid}"),
        "--clear-groups".to_owned(),
        "--inh-caps=-all".to_owned(),
        "--bounding-set=-all".to_owned(),
        "--no-new-privs".to_owned(),
        "--".to_owned(),
    ]
}

/// The full command: join the cgroup, set rlimits, drop to the uid, bwrap. Run with an empty
/// environment (bwrap's init keeps the env it was started with, visible at `/proc/1/environ`).
///
/// Rootless, there is no uid to drop to: bwrap runs as the invoking user, maps it to
/// [`ROOTLESS_SANDBOX_UID`] in its user namespace and drops every capability, and the rlimits
/// are set inside, after the namespace exists. `RLIMIT_NPROC` is counted per user per user
/// namespace (and checked up the chain against the limit of the namespace's creator): set on
/// bwrap, it would count every process of the invoking user host-wide; set inside, it counts the
/// sandbox's own.
#[allow(clippy::too_many_arguments)]
pub(crate) fn command_line(
    layout: &Layout,
    mode: SandboxMode,
    uid: u32,
    binaries: &Binaries,
    limits: &Limits,
    cgroup: Option<&Cgroup>,
    egress: &EgressPolicy,
    inner: &Inner<'_>,
) -> Vec<OsString> {
    let mut argv: Vec<OsString> = Vec::new();
    let mut push = |items: &[&str]| argv.extend(items.iter().map(OsString::from));
    // Joining the cgroup first makes every later process, bwrap's included, a member.
    // The seccomp filter is opened here, as root, on fd 9, which bwrap reads (`--seccomp 9`).
    push(&[
        "/bin/sh",
        "-c",
        "exec 9<\"$1\" || exit 96; shift; while [ \"$1\" != -- ]; do echo $$ > \"$1\" || exit 97; shift; done; shift; exec /usr/bin/env -i \"$@\"",
        "sh",
    ]);
    argv.push(layout.etc.join(crate::seccomp::FILE).into_os_string());
    for file in cgroup.map(Cgroup::procs_files).unwrap_or_default() {
        argv.push(file.into_os_string());
    }
    argv.push("--".into());
    let prlimit: Vec<OsString> = [
        "/usr/bin/prlimit".to_owned(),
        format!("--nproc={}", limits.nproc),
        // No one file larger than the disk quota (rootless, the quota is only checked).
        format!("--fsize={}", limits.file_size_bytes.min(limits.disk.bytes)),
        format!("--cpu={}", limits.process_cpu_seconds),
        "--core=0".to_owned(),
        "--".to_owned(),
    ]
    .into_iter()
    .map(OsString::from)
    .collect();
    if mode == SandboxMode::Root {
        argv.extend(prlimit.iter().cloned());
        argv.extend(as_uid(uid).into_iter().map(OsString::from));
    }
    let mut push = |items: &[&str]| argv.extend(items.iter().map(OsString::from));
    push(&[
        "/usr/bin/bwrap",
        "--unshare-all",
        "--unshare-user",
        "--disable-userns",
    ]);
    if mode == SandboxMode::Rootless {
        let inside = ROOTLESS_SANDBOX_UID.to_string();
        // bwrap run by root keeps its capabilities (and the bounding set) unless told.
        push(&["--uid", &inside, "--gid", &inside, "--cap-drop", "ALL"]);
    }
    push(&[
        "--hostname",
        "sandbox",
        "--die-with-parent",
        "--new-session",
        "--seccomp",
        "9",
        "--ro-bind",
        "/usr",
        "/usr",
        "--symlink",
        "usr/bin",
        "/bin",
        "--symlink",
        "usr/sbin",
        "/sbin",
        "--symlink",
        "usr/lib",
        "/lib",
        "--symlink",
        "usr/lib64",
        "/lib64",
        "--dir",
        "/etc",
        "--ro-bind-try",
        "/etc/ld.so.cache",
        "/etc/ld.so.cache",
        "--ro-bind-try",
        "/etc/alternatives",
        "/etc/alternatives",
        "--ro-bind-try",
        "/etc/localtime",
        "/etc/localtime",
    ]);
    let mut bind = |flag: &str, from: &Path, to: &str| {
        argv.push(flag.into());
        argv.push(from.as_os_str().to_owned());
        argv.push(to.into());
    };
    for name in ["passwd", "group", "nsswitch.conf", "hosts"] {
        bind("--ro-bind", &layout.etc.join(name), &format!("/etc/{name}"));
    }
    bind(
        "--ro-bind",
        &layout.etc.join(SHELL_LIMITS),
        ToolShellLimits::PATH,
    );
    bind("--ro-bind", &binaries.shell, TOOL_SHELL);
    bind(
        "--ro-bind",
        &binaries.opencode,
        "/opt/opencode/bin/opencode",
    );
    bind("--bind", &layout.workspace, SANDBOX_WORKSPACE);
    bind("--bind", &layout.home, SANDBOX_HOME);
    bind("--bind", &layout.run, "/run/canopy");
    bind("--ro-bind", &layout.host, "/run/canopy-host");
    if egress.is_allowed() {
        // TLS clients need the CA bundle (its links point into /usr/share).
        bind("--ro-bind-try", Path::new("/etc/ssl"), "/etc/ssl");
        bind(
            "--ro-bind-try",
            Path::new("/etc/ca-certificates"),
            "/etc/ca-certificates",
        );
    }
    let tmp = limits.tmp_bytes.to_string();
    let mut push = |items: &[&str]| argv.extend(items.iter().map(OsString::from));
    push(&[
        "--size", &tmp, "--tmpfs", "/tmp", "--proc", "/proc", "--dev", "/dev",
    ]);
    push(&[
        "--remount-ro",
        "/",
        "--chdir",
        SANDBOX_WORKSPACE,
        "--clearenv",
    ]);
    let env = [
        ("PATH", "/opt/opencode/bin:/usr/local/bin:/usr/bin:/bin"),
        ("HOME", SANDBOX_HOME),
        ("USER", "sandbox"),
        ("LANG", "C.UTF-8"),
        ("TMPDIR", "/tmp"),
        ("SHELL", TOOL_SHELL),
        ("XDG_CONFIG_HOME", "/home/sandbox/.config"),
        ("XDG_DATA_HOME", "/home/sandbox/.local/share"),
        ("XDG_CACHE_HOME", "/home/sandbox/.cache"),
        ("XDG_STATE_HOME", "/home/sandbox/.local/state"),
        ("OPENCODE_DISABLE_MODELS_FETCH", "1"),
        ("OPENCODE_DISABLE_AUTOUPDATE", "1"),
        ("GIT_AUTHOR_NAME", "sandbox"),
        ("GIT_AUTHOR_EMAIL", "sandbox@localhost"),
        ("GIT_COMMITTER_NAME", "sandbox"),
        ("GIT_COMMITTER_EMAIL", "sandbox@localhost"),
        // OpenCode runs git on the workspace outside the tool guard, with its password in its
        // environment: the agent-written .git/config must not run commands there.
        ("GIT_CONFIG_COUNT", "2"),
        ("GIT_CONFIG_KEY_0", "core.fsmonitor"),
        ("GIT_CONFIG_VALUE_0", "false"),
        ("GIT_CONFIG_KEY_1", "core.hooksPath"),
        ("GIT_CONFIG_VALUE_1", "/dev/null"),
    ];
    for (key, value) in env {
        push(&["--setenv", key, value]);
    }
    for (key, value) in egress_env(egress) {
        push(&["--setenv", key, &value]);
    }
    if let Inner::OpenCode { config_json } = inner {
        push(&["--setenv", "OPENCODE_CONFIG_CONTENT", config_json]);
    }
    let egress_bridge = egress_bridge(egress);
    argv.push("--".into());
    if mode == SandboxMode::Rootless {
        argv.extend(prlimit);
    }
    let mut push = |items: &[&str]| argv.extend(items.iter().map(OsString::from));
    match inner {
        Inner::OpenCode { .. } => {
            // The password goes from a file into OpenCode's environment only: not the
            // bridges', not an argument. The host deletes the file once OpenCode is healthy.
            let script = format!(
                "socat UNIX-LISTEN:/run/canopy/{OPENCODE_SOCKET},fork,unlink-early,mode=0600 TCP:127.0.0.1:{OPENCODE_PORT} &\n\
                 socat TCP-LISTEN:{MODEL_PORT},bind=127.0.0.1,fork,reuseaddr UNIX-CONNECT:/run/canopy-host/{MODEL_SOCKET} &\n\
                 {egress_bridge}\
                 OPENCODE_SERVER_PASSWORD=$(cat /run/canopy-host/{PASSWORD_FILE}) || exit 98\n\
                 export OPENCODE_SERVER_PASSWORD\n\
                 exec opencode serve --hostname 127.0.0.1 --port {OPENCODE_PORT}\n"
            );
            push(&["/bin/sh", "-c", &script]);
        }
        Inner::Script { script, args } => {
            if egress_bridge.is_empty() {
                push(&["/bin/bash", "-c", script, "bash"]);
            } else {
                // The script is an argument, not spliced into the bridge's shell text.
                let wrapper = format!(
                    "{egress_bridge}script=$1; shift; exec /bin/bash -c \"$script\" bash \"$@\"\n"
                );
                push(&["/bin/sh", "-c", &wrapper, "sh", script]);
            }
            argv.extend(args.iter().map(OsString::from));
        }
    }
    argv
}

/// The environment that points package managers at the egress proxy (nothing when denied):
/// loopback stays direct, or OpenCode's model calls would go to the proxy.
fn egress_env(egress: &EgressPolicy) -> Vec<(&'static str, String)> {
    if !egress.is_allowed() {
        return vec![("npm_config_offline", "true".to_owned())];
    }
    let proxy = format!("http://127.0.0.1:{EGRESS_PORT}");
    let mut env: Vec<_> = [
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "http_proxy",
        "npm_config_proxy",
        "npm_config_https_proxy",
        "CARGO_HTTP_PROXY",
        "PIP_PROXY",
    ]
    .into_iter()
    .map(|key| (key, proxy.clone()))
    .collect();
    for key in ["NO_PROXY", "no_proxy"] {
        env.push((key, "localhost,127.0.0.1,::1".to_owned()));
    }
    env
}

/// The shell lines that serve the egress proxy on `127.0.0.1:EGRESS_PORT` and wait until that
/// port listens (read from `/proc/net/tcp`, so the wait opens no connection of its own).
fn egress_bridge(egress: &EgressPolicy) -> String {
    if !egress.is_allowed() {
        return String::new();
    }
    format!(
        "socat TCP-LISTEN:{EGRESS_PORT},bind=127.0.0.1,fork,reuseaddr UNIX-CONNECT:/run/canopy-host/{EGRESS_SOCKET} &\n\
         i=0; until grep -q ':{EGRESS_PORT:04X} 00000000:0000 0A' /proc/net/tcp; do \
         i=$((i+1)); [ $i -gt 500 ] && break; sleep 0.01; done\n"
    )
}
