//! Reaching the upstream: resolve the host again for every connection, connect within
//! `connect_timeout`, TCP_NODELAY on.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use thiserror::Error;
use tokio::net::TcpStream;

use crate::config::HostPort;

/// The upstream could not be reached. The text is what the client sees after
/// `upstream unavailable`, so it names the address and the limit, nothing else.
#[derive(Debug, Error)]
pub enum ConnectError {
    #[error("DNS: cannot resolve {address}: {reason}")]
    Resolve { address: String, reason: String },
    #[error("connect to {address}: {reason}")]
    Connect { address: String, reason: String },
    #[error("connect to {address}: timed out after {limit:?}")]
    Timeout { address: String, limit: Duration },
}

impl ConnectError {
    /// A short label for logs and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            ConnectError::Resolve { .. } => "dns",
            ConnectError::Connect { .. } => "connect",
            ConnectError::Timeout { .. } => "timeout",
        }
    }
}

/// io::ErrorKind's text ("connection refused") without the OS error number.
fn reason(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::Other => e.to_string(),
        kind => kind.to_string(),
    }
}

/// Connects to the first address of `target` that accepts, all within `limit`.
pub async fn connect(
    target: &HostPort,
    limit: Duration,
) -> Result<(TcpStream, SocketAddr), ConnectError> {
    let address = target.to_string();
    let attempt = async {
        let resolved = tokio::net::lookup_host((target.host.as_str(), target.port))
            .await
            .map_err(|e| ConnectError::Resolve {
                address: address.clone(),
                reason: reason(&e),
            })?;
        let mut last = None;
        for addr in resolved {
            match TcpStream::connect(addr).await {
                Ok(stream) => {
                    // Small replies must not wait for Nagle: the client is latency-bound.
                    let _ = stream.set_nodelay(true);
                    return Ok((stream, addr));
                }
                Err(e) => {
                    last = Some(ConnectError::Connect {
                        address: if address == addr.to_string() {
                            address.clone()
                        } else {
                            format!("{address} ({addr})")
                        },
                        reason: reason(&e),
                    })
                }
            }
        }
        Err(last.unwrap_or_else(|| ConnectError::Resolve {
            address: address.clone(),
            reason: "no addresses".to_owned(),
        }))
    };
    match tokio::time::timeout(limit, attempt).await {
        Ok(result) => result,
        Err(_) => Err(ConnectError::Timeout {
            address: target.to_string(),
            limit,
        }),
    }
}
