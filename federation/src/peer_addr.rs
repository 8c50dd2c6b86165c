//! A peer to dial: a socket address, or a `host:port` name looked up again
//! before every dial attempt (container and Kubernetes peers change their
//! IP address when they restart; their name stays).

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

/// Where a configured peer is dialed.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PeerAddr {
    Addr(SocketAddr),
    /// `host:port`; `host` is not an IP address.
    Name {
        host: String,
        port: u16,
    },
}

impl From<SocketAddr> for PeerAddr {
    fn from(a: SocketAddr) -> PeerAddr {
        PeerAddr::Addr(a)
    }
}

impl fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerAddr::Addr(a) => a.fmt(f),
            PeerAddr::Name { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

/// Why a peer address did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a peer address like 10.0.0.2:7000 or site-b.example:7000")]
pub struct BadPeerAddr(pub String);

impl FromStr for PeerAddr {
    type Err = BadPeerAddr;

    fn from_str(s: &str) -> Result<PeerAddr, BadPeerAddr> {
        if let Ok(a) = s.parse::<SocketAddr>() {
            return Ok(PeerAddr::Addr(a));
        }
        let bad = || BadPeerAddr(s.to_owned());
        let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        let name_char = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_';
        if host.is_empty() || !host.chars().all(name_char) || host.parse::<std::net::IpAddr>().is_ok() {
            return Err(bad());
        }
        Ok(PeerAddr::Name {
            host: host.to_owned(),
            port,
        })
    }
}

impl PeerAddr {
    /// The address to dial now: a name is looked up (DNS or hosts file),
    /// keeping the first address of the family the local endpoint speaks.
    pub async fn resolve(&self, ipv4: bool) -> Result<SocketAddr, String> {
        match self {
            PeerAddr::Addr(a) => Ok(*a),
            PeerAddr::Name { host, port } => {
                let found = tokio::net::lookup_host((host.as_str(), *port))
                    .await
                    .map_err(|e| format!("cannot resolve {host}: {e}"))?;
                let mut any = false;
                for a in found {
                    any = true;
                    if a.is_ipv4() == ipv4 {
                        return Ok(a);
                    }
                }
                let family = if ipv4 { "IPv4" } else { "IPv6" };
                Err(if any {
                    format!("{host} has no {family} address (the mesh endpoint is {family})")
                } else {
                    format!("{host} resolves to no address")
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_addresses_and_names() {
        assert_eq!(
            "127.0.0.1:7000".parse::<PeerAddr>(),
            Ok(PeerAddr::Addr(SocketAddr::from(([127, 0, 0, 1], 7000))))
        );
        assert!(matches!("[::1]:7000".parse::<PeerAddr>(), Ok(PeerAddr::Addr(_))));
        assert_eq!(
            "site-b.ocmesh.svc:7000".parse::<PeerAddr>(),
            Ok(PeerAddr::Name {
                host: "site-b.ocmesh.svc".into(),
                port: 7000
            })
        );
        assert_eq!("b:7000".parse::<PeerAddr>().map(|p| p.to_string()), Ok("b:7000".into()));
        for bad in ["b", "b:", ":7000", "b:70000", "b c:1", "1.2.3:x", "http://b:1"] {
            assert!(bad.parse::<PeerAddr>().is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn names_resolve_to_the_endpoint_family() {
        let p: PeerAddr = "localhost:7000".parse().expect("name");
        let a = p.resolve(true).await.expect("localhost resolves");
        assert!(a.is_ipv4() && a.ip().is_loopback() && a.port() == 7000, "{a}");
    }
}
