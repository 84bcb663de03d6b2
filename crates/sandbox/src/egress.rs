//! Egress for package installs: off by default, an allow-list of host names when on.
//!
//! The sandbox keeps its private network namespace either way: it has no route out. With
//! [`EgressPolicy::AllowHosts`], the host runs an [`EgressProxy`], an HTTP `CONNECT` proxy on a
//! unix socket in the sandbox's read-only host directory (owned by the sandbox uid, mode 0600,
//! like the model socket), which a socat in the sandbox serves on `127.0.0.1:3128`; the sandbox
//! gets `HTTPS_PROXY` and friends pointing there. The proxy opens a tunnel only to a listed host
//! name on port 443. It refuses IP literals, and it resolves names itself and refuses a name if
//! any address is loopback, private, link-local or otherwise not public, then connects to
//! exactly the addresses it checked (no second lookup a DNS answer could change). TLS stays end
//! to end between the sandbox and the registry; the proxy sees only the host name. Plain HTTP
//! is not proxied.

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use crate::Error;
use crate::socket::remove_stale;

/// Whether a sandbox may reach the outside at all.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum EgressPolicy {
    /// No way out: no proxy, no proxy environment. The default.
    #[default]
    Deny,
    /// HTTPS (`CONNECT` to port 443) to exactly these host names, through the host-side proxy.
    /// Names, not addresses: an IP literal in the list is refused when the sandbox starts.
    AllowHosts(Vec<String>),
}

impl EgressPolicy {
    /// The usual package registries: npm, crates.io, PyPI and Debian.
    pub fn package_registries() -> Self {
        Self::AllowHosts(
            [
                "registry.npmjs.org",
                "crates.io",
                "static.crates.io",
                "index.crates.io",
                "pypi.org",
                "files.pythonhosted.org",
                "deb.debian.org",
            ]
            .map(str::to_owned)
            .to_vec(),
        )
    }

    pub fn is_allowed(&self) -> bool {
        matches!(self, Self::AllowHosts(_))
    }
}

/// What an [`EgressProxy`] let through and refused so far.
#[derive(Debug, Default)]
pub struct EgressStats {
    tunnels: AtomicU64,
    refused: AtomicU64,
    recent_refusals: Mutex<VecDeque<String>>,
}

/// Refusal reasons an [`EgressStats`] keeps.
const RECENT_REFUSALS: usize = 16;

impl EgressStats {
    /// Tunnels opened to an allowed host.
    pub fn tunnels(&self) -> u64 {
        self.tunnels.load(Ordering::Relaxed)
    }

    /// Requests refused by the policy (a malformed request counts too).
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    pub fn last_refusal(&self) -> Option<String> {
        self.recent_refusals().pop()
    }

    /// The reasons of the latest refusals, oldest first.
    pub fn recent_refusals(&self) -> Vec<String> {
        let recent = self
            .recent_refusals
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        recent.iter().cloned().collect()
    }

    fn refuse(&self, reason: &str) {
        tracing::warn!(reason, "sandbox egress refused");
        self.refused.fetch_add(1, Ordering::Relaxed);
        let mut recent = self
            .recent_refusals
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if recent.len() == RECENT_REFUSALS {
            recent.pop_front();
        }
        recent.push_back(reason.to_owned());
    }
}

/// A running egress proxy on one unix socket. Dropping it stops it and removes the socket.
#[derive(Debug)]
pub struct EgressProxy {
    path: PathBuf,
    stats: Arc<EgressStats>,
    task: JoinHandle<()>,
}

/// The one port tunnels may go to.
const HTTPS_PORT: u16 = 443;
/// Tunnels open at once per sandbox; more wait.
const MAX_TUNNELS: usize = 64;
const HEAD_LIMIT: usize = 8 * 1024;
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How host names become addresses.
#[derive(Debug, Clone)]
enum Resolver {
    /// The host's resolver.
    System,
    /// Fixed answers, ports included (tests point an allowed name at a local server).
    #[cfg(test)]
    Static(std::collections::HashMap<String, Vec<SocketAddr>>),
}

#[derive(Debug)]
struct Policy {
    hosts: Vec<String>,
    resolver: Resolver,
    /// Off only through [`EgressProxy::start_for_tests`].
    check_addresses: bool,
}

impl EgressProxy {
    /// Listens on `path`, connectable only by `uid` (owner, mode 0600), and tunnels to `hosts`.
    pub fn start(path: &Path, uid: u32, hosts: &[String]) -> Result<Self, Error> {
        Self::start_with(
            path,
            uid,
            Policy {
                hosts: normalize_hosts(hosts)?,
                resolver: Resolver::System,
                check_addresses: true,
            },
        )
    }

    /// A proxy whose names resolve from `answers`; `check_addresses: false` lets a test reach
    /// a server on loopback. Exists only in this crate's unit tests, never through config.
    #[cfg(test)]
    fn start_for_tests(
        path: &Path,
        uid: u32,
        hosts: &[String],
        answers: std::collections::HashMap<String, Vec<SocketAddr>>,
        check_addresses: bool,
    ) -> Result<Self, Error> {
        Self::start_with(
            path,
            uid,
            Policy {
                hosts: normalize_hosts(hosts)?,
                resolver: Resolver::Static(answers),
                check_addresses,
            },
        )
    }

    fn start_with(path: &Path, uid: u32, policy: Policy) -> Result<Self, Error> {
        remove_stale(path)?;
        let prepare = |source| Error::Prepare {
            path: path.to_owned(),
            source,
        };
        let listener = UnixListener::bind(path).map_err(prepare)?;
        std::os::unix::fs::chown(path, Some(uid), Some(uid)).map_err(prepare)?;
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .map_err(prepare)?;
        let stats = Arc::new(EgressStats::default());
        let policy = Arc::new(policy);
        let task_stats = stats.clone();
        let task = tokio::spawn(async move {
            let slots = Arc::new(Semaphore::new(MAX_TUNNELS));
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    continue;
                };
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    return;
                };
                let policy = policy.clone();
                let stats = task_stats.clone();
                tokio::spawn(async move {
                    serve(inbound, &policy, &stats).await;
                    drop(slot);
                });
            }
        });
        Ok(Self {
            path: path.to_owned(),
            stats,
            task,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn stats(&self) -> &Arc<EgressStats> {
        &self.stats
    }
}

impl Drop for EgressProxy {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

fn normalize_hosts(hosts: &[String]) -> Result<Vec<String>, Error> {
    hosts
        .iter()
        .map(|host| {
            let host = host.trim().trim_end_matches('.').to_ascii_lowercase();
            let valid = !host.is_empty()
                && host.len() <= 253
                && host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
                && host.parse::<IpAddr>().is_err()
                && !host.bytes().all(|b| b.is_ascii_digit() || b == b'.');
            if valid {
                Ok(host)
            } else {
                Err(Error::InvalidEgressHost { host })
            }
        })
        .collect()
}

/// One connection from the sandbox: a `CONNECT` request, then a tunnel or a refusal.
async fn serve(mut inbound: UnixStream, policy: &Policy, stats: &EgressStats) {
    let head = match tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut inbound)).await {
        Ok(Ok(Some(head))) => head,
        // A probe that closed without asking, or a slow one: nothing to answer.
        Ok(Ok(None)) | Err(_) => return,
        Ok(Err(reason)) => {
            stats.refuse(&reason);
            let _ = answer(&mut inbound, 400, &reason).await;
            return;
        }
    };
    let target = match decide(&head, policy).await {
        Ok(target) => target,
        Err(Refusal { status, reason }) => {
            stats.refuse(&reason);
            let _ = answer(&mut inbound, status, &reason).await;
            return;
        }
    };
    let mut outbound = match tokio::time::timeout(
        CONNECT_TIMEOUT,
        TcpStream::connect(target.addresses.as_slice()),
    )
    .await
    {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => {
            tracing::debug!(host = %target.host, %error, "egress target unreachable");
            let _ = answer(&mut inbound, 502, "the host is unreachable").await;
            return;
        }
        Err(_) => {
            let _ = answer(&mut inbound, 504, "connecting to the host timed out").await;
            return;
        }
    };
    stats.tunnels.fetch_add(1, Ordering::Relaxed);
    tracing::info!(host = %target.host, "sandbox egress tunnel opened");
    if inbound
        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .await
        .is_err()
    {
        return;
    }
    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
}

/// The request head up to the blank line; `None` when the peer closed before sending any.
async fn read_head(inbound: &mut UnixStream) -> Result<Option<String>, String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    // Byte by byte: whatever follows the head (a TLS hello) belongs to the tunnel.
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= HEAD_LIMIT {
            return Err("request head too large".to_owned());
        }
        match inbound.read(&mut byte).await {
            Ok(0) if head.is_empty() => return Ok(None),
            Ok(0) => return Err("connection closed inside the request head".to_owned()),
            Ok(_) => head.push(byte[0]),
            Err(error) => return Err(format!("reading the request: {error}")),
        }
    }
    String::from_utf8(head)
        .map(Some)
        .map_err(|_| "request head is not UTF-8".to_owned())
}

#[derive(Debug)]
struct Refusal {
    status: u16,
    reason: String,
}

#[derive(Debug)]
struct Target {
    host: String,
    addresses: Vec<SocketAddr>,
}

fn refusal(status: u16, reason: impl Into<String>) -> Refusal {
    Refusal {
        status,
        reason: reason.into(),
    }
}

/// Applies the policy to one request head.
async fn decide(head: &str, policy: &Policy) -> Result<Target, Refusal> {
    let line = head.lines().next().unwrap_or_default();
    let mut parts = line.split(' ');
    let (method, authority) = (parts.next().unwrap_or_default(), parts.next());
    if method != "CONNECT" {
        return Err(refusal(
            405,
            format!("only CONNECT is proxied, not {method:?}"),
        ));
    }
    let Some(authority) = authority else {
        return Err(refusal(400, "CONNECT without a target"));
    };
    if authority.starts_with('[') {
        return Err(refusal(403, format!("{authority}: an IP literal")));
    }
    let Some((host, port)) = authority.rsplit_once(':') else {
        return Err(refusal(400, format!("{authority}: no port")));
    };
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    if host.parse::<IpAddr>().is_ok() {
        return Err(refusal(403, format!("{authority}: an IP literal")));
    }
    if port != HTTPS_PORT.to_string() {
        return Err(refusal(
            403,
            format!("{authority}: only port 443 is allowed"),
        ));
    }
    if !policy.hosts.contains(&host) {
        return Err(refusal(
            403,
            format!("{authority}: not in the allowed hosts"),
        ));
    }
    let addresses = resolve(&policy.resolver, &host)
        .await
        .map_err(|error| refusal(502, format!("{authority}: cannot resolve: {error}")))?;
    if addresses.is_empty() {
        return Err(refusal(502, format!("{authority}: no addresses")));
    }
    if policy.check_addresses
        && let Some(bad) = addresses.iter().find(|address| !is_public(address.ip()))
    {
        return Err(refusal(
            403,
            format!(
                "{authority}: resolves to {}, a non-public address",
                bad.ip()
            ),
        ));
    }
    Ok(Target { host, addresses })
}

async fn resolve(resolver: &Resolver, host: &str) -> std::io::Result<Vec<SocketAddr>> {
    match resolver {
        Resolver::System => Ok(tokio::net::lookup_host((host, HTTPS_PORT)).await?.collect()),
        #[cfg(test)]
        Resolver::Static(answers) => Ok(answers.get(host).cloned().unwrap_or_default()),
    }
}

/// False for every address the sandbox must not reach through the proxy: loopback, private,
/// link-local, shared (CGNAT), unspecified, multicast, broadcast, reserved and the IPv6
/// equivalents, IPv4-mapped addresses judged as the IPv4 they carry. Documentation ranges pass:
/// nothing of the host's lives there, and some networks serve registry mirrors from them.
pub(crate) fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(ip) => is_public_v4(ip),
        IpAddr::V6(ip) => match ip.to_ipv4_mapped() {
            Some(v4) => is_public_v4(v4),
            None => is_public_v6(ip),
        },
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, _, _] = ip.octets();
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_multicast()
        || ip.is_broadcast()
        || a == 0
        || a >= 240
        || (a == 100 && (64..128).contains(&b)))
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    let first = ip.segments()[0];
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        // fc00::/7, unique local.
        || (first & 0xfe00) == 0xfc00
        // fe80::/10, link-local.
        || (first & 0xffc0) == 0xfe80
        // ::/96, the deprecated IPv4-compatible form.
        || ip.segments()[..6].iter().all(|segment| *segment == 0))
}

async fn answer(stream: &mut UnixStream, status: u16, reason: &str) -> std::io::Result<()> {
    let text = match status {
        400 => "Bad Request",
        403 => "Forbidden",
        405 => "Method Not Allowed",
        502 => "Bad Gateway",
        _ => "Gateway Timeout",
    };
    let body = format!("{reason}\n");
    let response = format!(
        "HTTP/1.1 {status} {text}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use tokio::io::{AsyncBufReadExt, BufReader};
    use tokio::net::TcpListener;

    /// The uid the test socket is handed to: this process's own, so the test can connect.
    fn own_uid() -> u32 {
        rustix::process::getuid().as_raw()
    }

    fn hosts(names: &[&str]) -> Vec<String> {
        names.iter().map(|name| (*name).to_owned()).collect()
    }

    /// Sends `CONNECT target` and returns the status line, and the stream for the tunnel.
    async fn connect(proxy: &EgressProxy, target: &str) -> (String, BufReader<UnixStream>) {
        let mut stream = UnixStream::connect(proxy.path()).await.unwrap();
        stream
            .write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut reader = BufReader::new(stream);
        let mut status = String::new();
        reader.read_line(&mut status).await.unwrap();
        (status.trim_end().to_owned(), reader)
    }

    #[test]
    fn non_public_ranges_are_refused_and_public_ones_pass() {
        for ip in [
            "127.0.0.1",
            "127.255.0.9",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "255.255.255.255",
            "224.0.0.1",
            "::1",
            "::",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "febf::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::127.0.0.1",
        ] {
            assert!(!is_public(ip.parse().unwrap()), "{ip} must be refused");
        }
        for ip in [
            "151.101.0.1",
            "172.32.0.1",
            "8.8.8.8",
            "2a04:4e42::1",
            "::ffff:151.101.0.1",
            "203.0.113.80",
        ] {
            assert!(is_public(ip.parse().unwrap()), "{ip} must pass");
        }
    }

    #[test]
    fn the_allow_list_takes_names_only() {
        assert_eq!(
            normalize_hosts(&hosts(&["Registry.NPMJS.org.", "crates.io"])).unwrap(),
            hosts(&["registry.npmjs.org", "crates.io"])
        );
        for bad in [
            "127.0.0.1",
            "::1",
            "2130706433",
            "",
            "a b",
            "evil.com:80",
            "*.x",
        ] {
            assert!(
                matches!(
                    normalize_hosts(&hosts(&[bad])),
                    Err(Error::InvalidEgressHost { .. })
                ),
                "{bad:?} accepted"
            );
        }
    }

    #[tokio::test]
    async fn refuses_literals_other_ports_unlisted_names_and_names_resolving_inside() {
        let dir = tempfile::tempdir().unwrap();
        let answers = HashMap::from([
            // An allowed-looking name whose answer points at the host itself.
            (
                "registry.npmjs.org".to_owned(),
                vec![
                    "151.101.0.1:443".parse().unwrap(),
                    "127.0.0.1:443".parse().unwrap(),
                ],
            ),
            (
                "pypi.org".to_owned(),
                vec!["[fd00::5]:443".parse().unwrap()],
            ),
        ]);
        let proxy = EgressProxy::start_for_tests(
            &dir.path().join("egress.sock"),
            own_uid(),
            &hosts(&["registry.npmjs.org", "pypi.org", "crates.io"]),
            answers,
            true,
        )
        .unwrap();
        let cases = [
            ("127.0.0.1:5432", "403", "an IP literal"),
            ("127.0.0.1:443", "403", "an IP literal"),
            ("[::1]:443", "403", "an IP literal"),
            ("crates.io:5432", "403", "only port 443"),
            ("example.com:443", "403", "not in the allowed hosts"),
            (
                "registry.npmjs.org:443",
                "403",
                "127.0.0.1, a non-public address",
            ),
            ("pypi.org:443", "403", "fd00::5, a non-public address"),
        ];
        for (i, (target, status, reason)) in cases.iter().enumerate() {
            let (line, mut rest) = connect(&proxy, target).await;
            assert!(
                line.starts_with(&format!("HTTP/1.1 {status}")),
                "{target}: {line}"
            );
            let mut body = String::new();
            rest.read_to_string(&mut body).await.unwrap();
            assert!(body.contains(reason), "{target}: {body}");
            assert_eq!(proxy.stats().refused(), i as u64 + 1);
            assert!(proxy.stats().last_refusal().unwrap().contains(reason));
        }
        // Not CONNECT: a plain request through the proxy is refused too.
        let mut stream = UnixStream::connect(proxy.path()).await.unwrap();
        stream
            .write_all(b"GET http://crates.io/ HTTP/1.1\r\nHost: crates.io\r\n\r\n")
            .await
            .unwrap();
        let mut reply = String::new();
        stream.read_to_string(&mut reply).await.unwrap();
        assert!(reply.starts_with("HTTP/1.1 405"), "{reply}");
        assert_eq!(proxy.stats().refused(), cases.len() as u64 + 1);
        assert_eq!(proxy.stats().tunnels(), 0);
    }

    #[tokio::test]
    async fn the_system_resolver_answer_for_localhost_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let proxy = EgressProxy::start(
            &dir.path().join("egress.sock"),
            own_uid(),
            &hosts(&["localhost"]),
        )
        .unwrap();
        let (line, mut rest) = connect(&proxy, "localhost:443").await;
        assert!(line.starts_with("HTTP/1.1 403"), "{line}");
        let mut body = String::new();
        rest.read_to_string(&mut body).await.unwrap();
        assert!(body.contains("non-public address"), "{body}");
        assert_eq!(proxy.stats().refused(), 1);
    }

    #[tokio::test]
    async fn an_allowed_name_gets_a_tunnel_to_the_address_it_resolved_to() {
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let echo_addr = echo.local_addr().unwrap();
        let echo_task = tokio::spawn(async move {
            let (mut stream, _) = echo.accept().await.unwrap();
            let (mut read, mut write) = stream.split();
            tokio::io::copy(&mut read, &mut write).await.unwrap();
        });
        let dir = tempfile::tempdir().unwrap();
        let proxy = EgressProxy::start_for_tests(
            &dir.path().join("egress.sock"),
            own_uid(),
            &hosts(&["static.crates.io"]),
            HashMap::from([("static.crates.io".to_owned(), vec![echo_addr])]),
            false,
        )
        .unwrap();
        let socket = std::fs::metadata(proxy.path()).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&socket.permissions()) & 0o777,
            0o600
        );

        let (line, mut tunnel) = connect(&proxy, "Static.Crates.IO:443").await;
        assert_eq!(line, "HTTP/1.1 200 Connection established");
        let mut blank = String::new();
        tunnel.read_line(&mut blank).await.unwrap();
        assert_eq!(blank, "\r\n");
        tunnel
            .write_all(b"bytes through the tunnel\n")
            .await
            .unwrap();
        let mut echoed = String::new();
        tunnel.read_line(&mut echoed).await.unwrap();
        assert_eq!(echoed, "bytes through the tunnel\n");
        assert_eq!(proxy.stats().tunnels(), 1);
        assert_eq!(proxy.stats().refused(), 0);
        drop(tunnel);
        echo_task.await.unwrap();
    }
}
