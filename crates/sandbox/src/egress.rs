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
//!
//! Once the tunnel is accepted, the proxy reads the client's TLS ClientHello (at most 64 KiB,
//! within 10 s) before it forwards a byte, and closes the tunnel unless the hello's server name
//! (SNI) is the host of the `CONNECT`: no hello, no SNI, or another name (domain fronting
//! through a CDN that serves both) is refused, and the host got a connection but no data. IP
//! literals are refused at the `CONNECT` already, so the SNI always has a name to match. What
//! this cannot see: the HTTP `Host` inside the encrypted tunnel (a CDN that routes on it can
//! still be fronted with a matching SNI), and an Encrypted Client Hello, whose outer SNI is the
//! CDN's public name (refused unless that name is itself allowed).

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
        crate::mode::chown_to(path, uid).map_err(prepare)?;
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
    if inbound
        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .await
        .is_err()
    {
        return;
    }
    // The tunnel carries TLS to the host it was opened for, or nothing: the hello must name it.
    let hello = match tokio::time::timeout(HEAD_TIMEOUT, read_client_hello(&mut inbound)).await {
        Ok(Ok(Some(hello))) => hello,
        // Closed before sending anything: nothing went anywhere.
        Ok(Ok(None)) => return,
        Ok(Err(reason)) => {
            stats.refuse(&format!("{}: {reason}", target.host));
            return;
        }
        Err(_) => {
            stats.refuse(&format!(
                "{}: no TLS hello within {HEAD_TIMEOUT:?}",
                target.host
            ));
            return;
        }
    };
    let refusal = match server_name(&hello.client_hello) {
        Ok(Some(name))
            if name
                .trim_end_matches('.')
                .eq_ignore_ascii_case(&target.host) =>
        {
            None
        }
        Ok(Some(name)) => Some(format!(
            "{}: the TLS hello names {name:?}, not the host of the tunnel",
            target.host
        )),
        Ok(None) => Some(format!("{}: the TLS hello has no server name", target.host)),
        Err(reason) => Some(format!("{}: unreadable TLS hello: {reason}", target.host)),
    };
    if let Some(reason) = refusal {
        // Dropping both ends closes the tunnel; the host got a connection but no byte.
        stats.refuse(&reason);
        return;
    }
    if outbound.write_all(&hello.records).await.is_err() {
        return;
    }
    stats.tunnels.fetch_add(1, Ordering::Relaxed);
    tracing::info!(host = %target.host, "sandbox egress tunnel opened");
    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
}

/// The largest TLS record (RFC 8446: 2^14 bytes of plaintext).
const TLS_RECORD_LIMIT: usize = 1 << 14;
/// The largest ClientHello read; real ones are 0.5 to 2 KB (post-quantum key shares included).
const HELLO_LIMIT: usize = 64 * 1024;

/// The client's first flight: the records read (forwarded as they are) and the ClientHello
/// message they carry (without its 4-byte handshake header).
struct Hello {
    records: Vec<u8>,
    client_hello: Vec<u8>,
}

/// Reads TLS records until they hold a whole ClientHello; `None` when the client closed first.
/// Reads exactly those records: whatever the client sent after them stays for the tunnel.
async fn read_client_hello(inbound: &mut UnixStream) -> Result<Option<Hello>, String> {
    let mut records = Vec::new();
    let mut handshake = Vec::new();
    loop {
        let mut header = [0u8; 5];
        if let Err(error) = inbound.read_exact(&mut header).await {
            if records.is_empty() && error.kind() == std::io::ErrorKind::UnexpectedEof {
                return Ok(None);
            }
            return Err(format!("reading the TLS hello: {error}"));
        }
        // Content type 22 (handshake), protocol major version 3 (SSL 3.0 to TLS 1.3).
        if header[0] != 22 || header[1] != 3 {
            return Err("not a TLS handshake".to_owned());
        }
        let length = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if length == 0 || length > TLS_RECORD_LIMIT || records.len() + length > HELLO_LIMIT {
            return Err(format!("a TLS record of {length} bytes in the hello"));
        }
        let mut fragment = vec![0u8; length];
        inbound
            .read_exact(&mut fragment)
            .await
            .map_err(|error| format!("reading the TLS hello: {error}"))?;
        records.extend_from_slice(&header);
        records.extend_from_slice(&fragment);
        handshake.extend_from_slice(&fragment);
        let Some(head) = handshake.get(..4) else {
            continue;
        };
        if head[0] != 1 {
            return Err("the first TLS handshake message is not a ClientHello".to_owned());
        }
        let length = u32::from_be_bytes([0, head[1], head[2], head[3]]) as usize;
        if length > HELLO_LIMIT {
            return Err(format!("a ClientHello of {length} bytes"));
        }
        if handshake.len() >= 4 + length {
            handshake.truncate(4 + length);
            handshake.drain(..4);
            return Ok(Some(Hello {
                records,
                client_hello: handshake,
            }));
        }
    }
}

/// The host name of a ClientHello's `server_name` extension (RFC 6066), `None` without one.
fn server_name(client_hello: &[u8]) -> Result<Option<String>, String> {
    let mut hello = TlsReader(client_hello);
    // Legacy version and random.
    hello.take(2 + 32)?;
    let session_id = hello.u8()?;
    hello.take(session_id)?;
    let cipher_suites = hello.u16()?;
    hello.take(cipher_suites)?;
    let compression = hello.u8()?;
    hello.take(compression)?;
    if hello.0.is_empty() {
        return Ok(None);
    }
    let extensions_length = hello.u16()?;
    let mut extensions = TlsReader(hello.take(extensions_length)?);
    let mut found = None;
    while !extensions.0.is_empty() {
        let kind = extensions.u16()?;
        let length = extensions.u16()?;
        let data = extensions.take(length)?;
        if kind != 0 {
            continue;
        }
        if found.is_some() {
            return Err("two server_name extensions".to_owned());
        }
        let mut data = TlsReader(data);
        let list_length = data.u16()?;
        let mut list = TlsReader(data.take(list_length)?);
        let mut host = None;
        while !list.0.is_empty() {
            let name_type = list.u8()?;
            let length = list.u16()?;
            let name = list.take(length)?;
            // 0: host_name, the only type defined.
            if name_type == 0 {
                if host.is_some() {
                    return Err("two host names in server_name".to_owned());
                }
                host = Some(name);
            }
        }
        let host = host.ok_or("server_name without a host name")?;
        let host = std::str::from_utf8(host)
            .ok()
            .filter(|host| {
                !host.is_empty()
                    && host
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
            })
            .ok_or("the server name is not a host name")?;
        found = Some(host.to_owned());
    }
    Ok(found)
}

/// A cursor over the bytes of a TLS message.
struct TlsReader<'a>(&'a [u8]);

impl<'a> TlsReader<'a> {
    fn take(&mut self, count: usize) -> Result<&'a [u8], String> {
        if count > self.0.len() {
            return Err("the ClientHello is cut short".to_owned());
        }
        let (taken, rest) = self.0.split_at(count);
        self.0 = rest;
        Ok(taken)
    }

    fn u8(&mut self) -> Result<usize, String> {
        Ok(usize::from(self.take(1)?[0]))
    }

    fn u16(&mut self) -> Result<usize, String> {
        let bytes = self.take(2)?;
        Ok(usize::from(u16::from_be_bytes([bytes[0], bytes[1]])))
    }
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

/// False for every address the sandbox must not reach through the proxy (and no webhook may
/// target, `canopy-webhook`): loopback, private,
/// link-local, shared (CGNAT), unspecified, multicast, broadcast, reserved and special-purpose
/// IPv4 blocks; for IPv6 anything outside global unicast (`2000::/3`), the local and site-local
/// ranges, and every form that carries an IPv4 address (translated, compatible, 6to4, Teredo,
/// local-use NAT64), except IPv4-mapped and well-known NAT64 addresses, which are judged as the
/// IPv4 address they carry (an IPv6-only host with DNS64 reaches registries through NAT64). Documentation ranges pass: nothing of
/// the host's lives there, and some networks serve registry mirrors from them.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(ip) => is_public_v4(ip),
        IpAddr::V6(ip) => is_public_v6(ip),
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_multicast()
        || ip.is_broadcast()
        || a == 0
        || a >= 240
        // 100.64.0.0/10, shared address space (CGNAT).
        || (a == 100 && (64..128).contains(&b))
        // 192.0.0.0/24, IETF protocol assignments (NAT64 discovery, DS-Lite, ...).
        || (a == 192 && b == 0 && c == 0)
        // 198.18.0.0/15, benchmarking.
        || (a == 198 && (b & 0xfe) == 18))
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    // ::ffff:0:0/96, IPv4-mapped: a connection to it is one to the IPv4 address.
    if let Some(v4) = ip.to_ipv4_mapped() {
        return is_public_v4(v4);
    }
    let segments = ip.segments();
    let [first, second, ..] = segments;
    // 64:ff9b::/96, the well-known NAT64 prefix: the IPv4 address in the last 32 bits decides.
    if segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        let [.., high, low] = segments;
        return is_public_v4(Ipv4Addr::from((u32::from(high) << 16) | u32::from(low)));
    }
    // Global unicast is 2000::/3; everything else is reserved, local, multicast or a form of
    // IPv4 (::/96 compatible, ::ffff:0:0:0/96 translated, 100::/64
    // discard, 64:ff9b:1::/48 local NAT64, fc00::/7 unique local, fe80::/10 link-local,
    // fec0::/10 site-local, ff00::/8 multicast).
    let global_unicast = (first & 0xe000) == 0x2000;
    global_unicast
        // 2001::/23, IETF protocol assignments: Teredo (2001::/32), benchmarking, ORCHID.
        && !(first == 0x2001 && second < 0x0200)
        // 2002::/16, 6to4.
        && first != 0x2002
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
    fn ipv6_forms_that_embed_or_reach_inside_addresses_are_refused() {
        for ip in [
            // NAT64 (RFC 6052) of loopback, private and metadata addresses.
            "64:ff9b::7f00:1",
            "64:ff9b::a00:1",
            "64:ff9b::c0a8:101",
            "64:ff9b::a9fe:a9fe",
            // Local-use NAT64 (RFC 8215).
            "64:ff9b:1::a00:1",
            "64:ff9b:1::808:808",
            // 6to4 (RFC 3056), whatever it embeds.
            "2002:7f00:1::1",
            "2002:a00:1::1",
            "2002:808:808::1",
            // Site-local (deprecated, still routed inside some networks).
            "fec0::1",
            "feff:ffff::1",
            // IPv4-mapped and IPv4-translated (RFC 2765) forms.
            "::ffff:7f00:1",
            "::ffff:0:7f00:1",
            "::ffff:0:a00:1",
            "::ffff:0:808:808",
            // IPv4-compatible.
            "::a00:1",
            "::808:808",
            // Teredo and the rest of the IETF protocol block.
            "2001:0:4136:e378:8000:63bf:3fff:fdd2",
            "2001:2::1",
            "2001:10::1",
            // Discard-only, and outside global unicast.
            "100::1",
            "4000::1",
            "::2",
        ] {
            assert!(!is_public(ip.parse().unwrap()), "{ip} must be refused");
        }
        for ip in [
            // NAT64 of a public address: how an IPv6-only host with DNS64 reaches a registry.
            "64:ff9b::808:808",
            "64:ff9b::9765:1",
            "2a04:4e42:200::1",
            "2606:4700::6810:1",
        ] {
            assert!(is_public(ip.parse().unwrap()), "{ip} must pass");
        }
    }

    #[test]
    fn ipv4_special_purpose_blocks_are_refused() {
        for ip in ["192.0.0.170", "192.0.0.8", "198.18.0.1", "198.19.255.254"] {
            assert!(!is_public(ip.parse().unwrap()), "{ip} must be refused");
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

    /// A TLS ClientHello as one record, naming `sni` (none when `None`).
    fn client_hello(sni: Option<&str>) -> Vec<u8> {
        fn with_len16(bytes: &[u8]) -> Vec<u8> {
            let mut out = u16::try_from(bytes.len()).unwrap().to_be_bytes().to_vec();
            out.extend_from_slice(bytes);
            out
        }
        let mut extensions = Vec::new();
        if let Some(name) = sni {
            let mut entry = vec![0u8];
            entry.extend(with_len16(name.as_bytes()));
            extensions.extend([0, 0]);
            extensions.extend(with_len16(&with_len16(&entry)));
        }
        // supported_versions: TLS 1.3.
        extensions.extend([0x00, 0x2b, 0x00, 0x03, 0x02, 0x03, 0x04]);
        let mut body = vec![0x03, 0x03];
        body.extend([7u8; 32]);
        body.push(0);
        body.extend(with_len16(&[0x13, 0x01]));
        body.extend([0x01, 0x00]);
        body.extend(with_len16(&extensions));
        let mut handshake = vec![0x01];
        handshake.extend(&u32::try_from(body.len()).unwrap().to_be_bytes()[1..]);
        handshake.extend(body);
        let mut record = vec![0x16, 0x03, 0x01];
        record.extend(with_len16(&handshake));
        record
    }

    #[test]
    fn the_server_name_is_read_from_a_client_hello() {
        let hello = client_hello(Some("Registry.NPMJS.org"));
        assert_eq!(
            server_name(&hello[9..]).unwrap().as_deref(),
            Some("Registry.NPMJS.org")
        );
        assert_eq!(server_name(&client_hello(None)[9..]).unwrap(), None);
        for cut in [0, 1, 20, 40, hello.len() - 9 - 3] {
            assert!(server_name(&hello[9..9 + cut]).is_err(), "cut at {cut}");
        }
    }

    #[tokio::test]
    async fn a_tunnel_whose_client_hello_names_another_host_is_closed() {
        // The allowed host's address, standing for a CDN that also serves other names.
        let target = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target_addr = target.local_addr().unwrap();
        let (got_tx, mut got) = tokio::sync::mpsc::unbounded_channel();
        let target_task = tokio::spawn(async move {
            loop {
                let (mut stream, _) = target.accept().await.unwrap();
                let got_tx = got_tx.clone();
                tokio::spawn(async move {
                    let mut bytes = Vec::new();
                    let _ = stream.read_to_end(&mut bytes).await;
                    let _ = got_tx.send(bytes);
                });
            }
        });
        let dir = tempfile::tempdir().unwrap();
        let proxy = EgressProxy::start_for_tests(
            &dir.path().join("egress.sock"),
            own_uid(),
            &hosts(&["static.crates.io"]),
            HashMap::from([("static.crates.io".to_owned(), vec![target_addr])]),
            false,
        )
        .unwrap();

        let cases: [(&str, Vec<u8>, Option<&str>); 4] = [
            (
                "another host",
                client_hello(Some("evil.example")),
                Some("evil.example"),
            ),
            ("no server name", client_hello(None), Some("no server name")),
            (
                "not TLS",
                b"GET / HTTP/1.1\r\nHost: evil.example\r\n\r\n".to_vec(),
                Some("not a TLS handshake"),
            ),
            (
                "the allowed host",
                client_hello(Some("Static.Crates.IO.")),
                None,
            ),
        ];
        for (i, (case, hello, refusal)) in cases.iter().enumerate() {
            let (line, mut tunnel) = connect(&proxy, "static.crates.io:443").await;
            assert_eq!(line, "HTTP/1.1 200 Connection established", "{case}");
            let mut blank = String::new();
            tunnel.read_line(&mut blank).await.unwrap();
            tunnel.write_all(hello).await.unwrap();
            tunnel.get_mut().shutdown().await.unwrap();
            let mut back = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(15), tunnel.read_to_end(&mut back))
                .await
                .expect("the proxy closed the tunnel");
            let reached = tokio::time::timeout(Duration::from_secs(15), got.recv())
                .await
                .ok()
                .flatten()
                .unwrap_or_default();
            match refusal {
                Some(reason) => {
                    assert!(
                        reached.is_empty(),
                        "{case}: the host got {} bytes",
                        reached.len()
                    );
                    let last = proxy.stats().last_refusal().unwrap_or_default();
                    assert!(last.contains(reason), "{case}: {last}");
                    assert_eq!(proxy.stats().refused(), i as u64 + 1, "{case}");
                }
                None => {
                    assert_eq!(
                        &reached, hello,
                        "{case}: the hello reaches the host as sent"
                    );
                    assert_eq!(proxy.stats().tunnels(), 1, "{case}");
                }
            }
        }
        target_task.abort();
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
        let hello = client_hello(Some("static.crates.io"));
        tunnel.write_all(&hello).await.unwrap();
        tunnel
            .write_all(b"bytes through the tunnel\n")
            .await
            .unwrap();
        let mut echoed_hello = vec![0u8; hello.len()];
        tunnel.read_exact(&mut echoed_hello).await.unwrap();
        assert_eq!(echoed_hello, hello);
        let mut echoed = String::new();
        tunnel.read_line(&mut echoed).await.unwrap();
        assert_eq!(echoed, "bytes through the tunnel\n");
        assert_eq!(proxy.stats().tunnels(), 1);
        assert_eq!(proxy.stats().refused(), 0);
        drop(tunnel);
        echo_task.await.unwrap();
    }
}
