//! The SSRF check of a webhook target, run when a subscription is created and again before
//! every delivery (a name may point elsewhere by then).
//!
//! A target is `https` (plain `http` only when [`TargetPolicy::allow_insecure`] is on, for
//! development and tests), carries no credentials or fragment, and its host resolves only to
//! public addresses, judged by the sandbox egress's rule ([`canopy_sandbox::is_public`]). With
//! `allow_insecure`, loopback addresses pass too (a receiver on the developer's machine);
//! private and link-local ones never do. The caller connects to [`CheckedTarget::addr`], the
//! address that was checked, never resolving the name a second time.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;

use url::{Host, Url};

/// Longest target URL accepted.
pub const MAX_URL_BYTES: usize = 2048;

/// Resolves a host name to addresses. The system's resolver in production; tests answer what
/// they need (a public address at creation, loopback at delivery).
pub trait Resolver: Send + Sync + std::fmt::Debug {
    fn resolve<'a>(
        &'a self,
        host: &'a str,
        port: u16,
    ) -> Pin<Box<dyn Future<Output = io::Result<Vec<IpAddr>>> + Send + 'a>>;
}

/// The system's resolver (`getaddrinfo` through tokio).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemResolver;

impl Resolver for SystemResolver {
    fn resolve<'a>(
        &'a self,
        host: &'a str,
        port: u16,
    ) -> Pin<Box<dyn Future<Output = io::Result<Vec<IpAddr>>> + Send + 'a>> {
        Box::pin(async move {
            Ok(tokio::net::lookup_host((host, port))
                .await?
                .map(|addr| addr.ip())
                .collect())
        })
    }
}

/// What the check lets through.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TargetPolicy {
    /// Accept `http` and loopback addresses (development and tests only).
    pub allow_insecure: bool,
}

/// A target that passed the check: its URL and the address to connect to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedTarget {
    pub url: Url,
    /// The host as written in the URL (for TLS and the `Host` header).
    pub host: String,
    /// The checked address and port; connect here, nowhere else.
    pub addr: SocketAddr,
}

/// Why a target is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error("the target is not a valid URL: {0}")]
    Invalid(&'static str),
    #[error("the target must use https")]
    Insecure,
    #[error("the target resolves to {0}, which is not a public address")]
    NotPublic(IpAddr),
    #[error("the target's host does not resolve: {0}")]
    Unresolvable(String),
}

impl TargetError {
    /// The stable code an API answers with.
    pub const fn code(&self) -> &'static str {
        match self {
            Self::Invalid(_) => "webhook_url_invalid",
            Self::Insecure => "webhook_url_insecure",
            Self::NotPublic(_) => "webhook_target_not_public",
            Self::Unresolvable(_) => "webhook_target_unresolvable",
        }
    }

    /// Every code, for the APIs' tables.
    pub const CODES: [&'static str; 4] = [
        "webhook_url_invalid",
        "webhook_url_insecure",
        "webhook_target_not_public",
        "webhook_target_unresolvable",
    ];
}

/// Checks `url` under `policy`, resolving its host with `resolver`.
pub async fn check_target(
    url: &str,
    policy: TargetPolicy,
    resolver: &dyn Resolver,
) -> Result<CheckedTarget, TargetError> {
    let url = parse(url, policy)?;
    let port = url
        .port_or_known_default()
        .ok_or(TargetError::Invalid("no port"))?;
    let (host, addresses) = match url.host() {
        Some(Host::Domain(name)) => {
            let addresses = resolver
                .resolve(name, port)
                .await
                .map_err(|error| TargetError::Unresolvable(error.to_string()))?;
            (name.to_owned(), addresses)
        }
        Some(Host::Ipv4(ip)) => (ip.to_string(), vec![IpAddr::V4(ip)]),
        Some(Host::Ipv6(ip)) => (format!("[{ip}]"), vec![IpAddr::V6(ip)]),
        None => return Err(TargetError::Invalid("no host")),
    };
    let Some(first) = addresses.first().copied() else {
        return Err(TargetError::Unresolvable(format!("{host} has no address")));
    };
    // every address must pass: a name answering a public and a private address is refused
    if let Some(bad) = addresses.iter().copied().find(|ip| !allowed(*ip, policy)) {
        return Err(TargetError::NotPublic(bad));
    }
    Ok(CheckedTarget {
        url,
        host,
        addr: SocketAddr::new(first, port),
    })
}

/// Checks the URL's form only (no resolution).
pub fn parse(url: &str, policy: TargetPolicy) -> Result<Url, TargetError> {
    if url.len() > MAX_URL_BYTES {
        return Err(TargetError::Invalid("longer than 2048 bytes"));
    }
    let parsed = Url::parse(url).map_err(|_| TargetError::Invalid("unparsable"))?;
    match parsed.scheme() {
        "https" => {}
        "http" if policy.allow_insecure => {}
        "http" => return Err(TargetError::Insecure),
        _ => return Err(TargetError::Invalid("the scheme must be https")),
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(TargetError::Invalid("credentials in the URL"));
    }
    if parsed.fragment().is_some() {
        return Err(TargetError::Invalid("a fragment"));
    }
    if parsed.host().is_none() {
        return Err(TargetError::Invalid("no host"));
    }
    Ok(parsed)
}

fn allowed(ip: IpAddr, policy: TargetPolicy) -> bool {
    canopy_sandbox::is_public(ip) || (policy.allow_insecure && ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Fixed(Vec<IpAddr>);

    impl Resolver for Fixed {
        fn resolve<'a>(
            &'a self,
            _: &'a str,
            _: u16,
        ) -> Pin<Box<dyn Future<Output = io::Result<Vec<IpAddr>>> + Send + 'a>> {
            Box::pin(async move { Ok(self.0.clone()) })
        }
    }

    fn ips(list: &[&str]) -> Fixed {
        Fixed(list.iter().map(|ip| ip.parse().unwrap()).collect())
    }

    const STRICT: TargetPolicy = TargetPolicy {
        allow_insecure: false,
    };
    const DEV: TargetPolicy = TargetPolicy {
        allow_insecure: true,
    };

    #[tokio::test]
    async fn public_https_targets_pass_and_pin_the_checked_address() {
        let checked = check_target(
            "https://hooks.example/in?x=1",
            STRICT,
            &ips(&["93.184.216.34"]),
        )
        .await
        .unwrap();
        assert_eq!(checked.addr, "93.184.216.34:443".parse().unwrap());
        assert_eq!(checked.host, "hooks.example");
    }

    #[tokio::test]
    async fn private_loopback_and_link_local_are_refused() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "192.168.1.1",
            "169.254.169.254",
            "::1",
            "fe80::1",
        ] {
            let error = check_target("https://hooks.example/", STRICT, &ips(&[ip]))
                .await
                .unwrap_err();
            assert_eq!(error.code(), "webhook_target_not_public", "{ip}");
        }
        // one bad address among good ones is enough
        let error = check_target(
            "https://h.example/",
            STRICT,
            &ips(&["93.184.216.34", "10.0.0.1"]),
        )
        .await
        .unwrap_err();
        assert_eq!(error, TargetError::NotPublic("10.0.0.1".parse().unwrap()));
        // literal addresses are not resolved but checked all the same
        for url in [
            "https://127.0.0.1:8443/",
            "https://[::1]/",
            "https://169.254.169.254/",
        ] {
            let error = check_target(url, STRICT, &ips(&[])).await.unwrap_err();
            assert_eq!(error.code(), "webhook_target_not_public", "{url}");
        }
    }

    #[tokio::test]
    async fn the_insecure_setting_allows_http_and_loopback_only() {
        let error = check_target("http://hooks.example/", STRICT, &ips(&["93.184.216.34"]))
            .await
            .unwrap_err();
        assert_eq!(error, TargetError::Insecure);
        let checked = check_target("http://127.0.0.1:9/x", DEV, &ips(&[]))
            .await
            .unwrap();
        assert_eq!(checked.addr, "127.0.0.1:9".parse().unwrap());
        let error = check_target("http://10.0.0.1/", DEV, &ips(&[]))
            .await
            .unwrap_err();
        assert_eq!(error.code(), "webhook_target_not_public");
    }

    #[tokio::test]
    async fn malformed_targets_are_refused() {
        for url in [
            "ftp://hooks.example/",
            "https://user:pw@hooks.example/",
            "https://hooks.example/#frag",
            "not a url",
        ] {
            let error = check_target(url, STRICT, &ips(&["93.184.216.34"]))
                .await
                .unwrap_err();
            assert_eq!(error.code(), "webhook_url_invalid", "{url}");
        }
        let error = check_target("https://hooks.example/", STRICT, &ips(&[]))
            .await
            .unwrap_err();
        assert_eq!(error.code(), "webhook_target_unresolvable");
    }
}
