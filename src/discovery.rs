//! Where the upstream is: discovery yields a [`Target`] (an address plus the name TLS
//! verifies), and [`crate::upstream::establish`] turns a target and the current credentials
//! into an authenticated connection, for sessions, the probe and `--check` alike.
//!
//! Today the one kind is the static `upstream.address`, whose host is resolved again for
//! every new connection: by the system resolver, or by `upstream.dns_server` when the profile
//! names one (hickory-resolver, which honours each answer's TTL).

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};

use hickory_resolver::config::{NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::TokioResolver;

use crate::config::HostPort;

/// One upstream to connect to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// A host name (resolved for every connection) or an IP address, and a port.
    pub address: HostPort,
    /// The name TLS verifies when `upstream.tls.server_name` does not say: the target's own
    /// host name (an SRV or Sentinel target's). `None`: the name derived at start from
    /// `upstream.address`.
    pub tls_name: Option<String>,
}

impl Target {
    /// `upstream.address`: TLS verifies the name derived from it at start, so nothing is
    /// parsed again per connection.
    pub fn at(address: HostPort) -> Target {
        Target {
            address,
            tls_name: None,
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.address.fmt(f)
    }
}

/// Resolves host names: the system's resolver, or the DNS server the profile names.
#[derive(Clone, Default)]
pub enum Resolver {
    #[default]
    System,
    Server {
        address: SocketAddr,
        /// Boxed: the resolver is large and most profiles use the system's.
        resolver: Box<TokioResolver>,
    },
}

impl fmt::Debug for Resolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Resolver::System => f.write_str("system"),
            Resolver::Server { address, .. } => write!(f, "dns server {address}"),
        }
    }
}

impl Resolver {
    /// A resolver that asks only `server` (UDP, then TCP for truncated answers).
    pub fn server(server: SocketAddr) -> io::Result<Resolver> {
        let mut name_server = NameServerConfig::udp_and_tcp(server.ip());
        for connection in &mut name_server.connections {
            connection.port = server.port();
        }
        let config = ResolverConfig::from_name_servers(vec![name_server]);
        let resolver = TokioResolver::builder_with_config(config, TokioRuntimeProvider::default())
            .build()
            .map_err(io::Error::other)?;
        Ok(Resolver::Server {
            address: server,
            resolver: Box::new(resolver),
        })
    }

    /// The addresses of `target`, in the resolver's order. An IP address is its own answer.
    pub async fn resolve(&self, target: &HostPort) -> Result<Vec<SocketAddr>, String> {
        if let Ok(ip) = target.host.parse::<IpAddr>() {
            return Ok(vec![SocketAddr::new(ip, target.port)]);
        }
        match self {
            Resolver::System => tokio::net::lookup_host((target.host.as_str(), target.port))
                .await
                .map(Iterator::collect)
                .map_err(|e| system_reason(&e)),
            Resolver::Server { resolver, .. } => {
                // A trailing dot: the name as written, never completed by a search domain.
                let name = format!("{}.", target.host.trim_end_matches('.'));
                resolver
                    .lookup_ip(name.as_str())
                    .await
                    .map(|found| {
                        found
                            .iter()
                            .map(|ip| SocketAddr::new(ip, target.port))
                            .collect()
                    })
                    .map_err(|e| e.to_string())
            }
        }
    }
}

/// The system resolver's own words ("Name or service not known").
fn system_reason(e: &io::Error) -> String {
    let text = e.to_string();
    text.strip_prefix("failed to lookup address information: ")
        .unwrap_or(&text)
        .to_owned()
}
