//! The ambassador's own connections to the upstream: `--check`, the periodic readiness probe,
//! and the test of new credentials before a reload switches to them. None of them ever runs
//! on a client's connection.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use redis_protocol::resp2::types::OwnedFrame;
use thiserror::Error;
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

use crate::config::{Handshake, Upstream, UpstreamExpect};
use crate::credentials::{CredentialStore, Credentials};
use crate::handshake::{self, HandshakeError};
use crate::metrics::Metrics;
use crate::upstream::{self, EstablishError};

#[derive(Debug, Error)]
pub enum ProbeError {
    /// No authenticated connection: the connection or the handshake failed.
    #[error(transparent)]
    Establish(#[from] EstablishError),
    /// The upstream is reachable and accepted the credentials, but it is not the one the
    /// profile describes (`upstream.expect`).
    #[error("upstream does not match the profile ({0})")]
    Mismatch(String),
    #[error("upstream probe: {0}")]
    Io(String),
}

/// What a successful probe found.
#[derive(Debug)]
pub struct Report {
    pub address: String,
    /// The TLS version and the peer certificate's subject, on a TLS connection.
    pub tls: Option<String>,
    pub whoami: String,
    pub info: BTreeMap<String, String>,
}

impl Report {
    pub fn version(&self) -> &str {
        self.info
            .get("redis_version")
            .map_or("unknown", String::as_str)
    }
}

/// Connects and authenticates with `credentials`, on a connection of the probe's own.
async fn authenticate(
    upstream: &Upstream,
    credentials: &Credentials,
    settings: &Handshake,
) -> Result<(upstream::Stream, std::net::SocketAddr), ProbeError> {
    let connected = upstream::open(upstream, credentials, settings).await?;
    Ok((connected.stream, connected.addr))
}

/// Connects, authenticates with `credentials`, asks `ACL WHOAMI` and `INFO server`, and
/// checks them against `expect`.
pub async fn probe(
    upstream: &Upstream,
    credentials: &Credentials,
    settings: &Handshake,
    expect: &UpstreamExpect,
) -> Result<Report, ProbeError> {
    let (mut stream, addr) = authenticate(upstream, credentials, settings).await?;
    let tls = stream.tls_summary();
    let limit = upstream.handshake_timeout;
    let exchange = async {
        stream
            .write_all(b"*2\r\n$3\r\nACL\r\n$6\r\nWHOAMI\r\n*2\r\n$4\r\nINFO\r\n$6\r\nserver\r\n")
            .await?;
        let mut buf = Vec::new();
        let whoami = handshake::read_frame(&mut stream, &mut buf).await?;
        let info = handshake::read_frame(&mut stream, &mut buf).await?;
        Ok::<_, HandshakeError>([whoami, info])
    };
    let replies = tokio::time::timeout(limit, exchange)
        .await
        .map_err(|_| ProbeError::Io(format!("no answer within {limit:?}")))?
        .map_err(|e| {
            ProbeError::Io(match e {
                HandshakeError::Closed => "upstream closed the connection".to_owned(),
                HandshakeError::Malformed => "malformed reply".to_owned(),
                HandshakeError::Io(e) => e.to_string(),
                other => other.to_string(),
            })
        })?;
    let whoami = match &replies[0] {
        OwnedFrame::BulkString(b) | OwnedFrame::SimpleString(b) => {
            String::from_utf8_lossy(b).into_owned()
        }
        _ => "unknown (ACL WHOAMI refused)".to_owned(),
    };
    let info = match &replies[1] {
        OwnedFrame::BulkString(b) => parse_info(&String::from_utf8_lossy(b)),
        _ => BTreeMap::new(),
    };
    let report = Report {
        address: addr.to_string(),
        tls,
        whoami,
        info,
    };
    check_expectations(&report, expect).map_err(ProbeError::Mismatch)?;
    Ok(report)
}

fn parse_info(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_owned(), v.trim().to_owned()))
        .collect()
}

/// Every expectation that fails, in one message.
fn check_expectations(report: &Report, expect: &UpstreamExpect) -> Result<(), String> {
    let mut wrong = Vec::new();
    if let Some(user) = &expect.user {
        if &report.whoami != user {
            wrong.push(format!(
                "ACL WHOAMI: expected {user:?}, got {:?}",
                report.whoami
            ));
        }
    }
    for (field, want) in &expect.info {
        let got = report.info.get(field).map_or("<missing>", String::as_str);
        if got != want {
            wrong.push(format!(
                "INFO server {field}: expected {want:?}, got {got:?}"
            ));
        }
    }
    if wrong.is_empty() {
        Ok(())
    } else {
        Err(wrong.join("; "))
    }
}

/// Whether anything reads what the periodic probe finds: `/readyz` and `/metrics` on the
/// admin endpoint, or `upstream.expect`, which stops new sessions on a mismatch. Otherwise
/// it would only cost the upstream a connection and an AUTH per interval, from every
/// ambassador. (`--check` and testing new credentials probe on demand, not through this.)
pub fn needed(admin_endpoint: bool, expect: &UpstreamExpect) -> bool {
    admin_endpoint || !expect.is_empty()
}

/// Probes about every `interval` (each wait drawn within ±20 % of it, so that many
/// ambassadors started together do not probe together) with the current credentials, so
/// `/readyz` reflects the upstream even when no client is connected, and a wrong upstream
/// stops new sessions. Without expectations, a probe only connects and authenticates.
pub async fn keep_probing(
    upstream: Upstream,
    settings: Handshake,
    expect: UpstreamExpect,
    credentials: CredentialStore,
    metrics: Arc<Metrics>,
    interval: Duration,
    stop: CancellationToken,
) {
    loop {
        let found = if expect.is_empty() {
            authenticate(&upstream, &credentials.current(), &settings)
                .await
                .map(|(_, addr)| addr.to_string())
        } else {
            probe(&upstream, &credentials.current(), &settings, &expect)
                .await
                .map(|report| report.address)
        };
        match found {
            Ok(address) => {
                tracing::trace!(upstream = %address, "probe ok");
                metrics.upstream_ok();
                metrics.set_mismatch(None);
            }
            Err(ProbeError::Mismatch(why)) => {
                tracing::error!(upstream = %upstream.discovery, mismatch = %why, "refusing to relay: upstream does not match the profile");
                metrics.set_mismatch(Some(why));
            }
            Err(e) => {
                tracing::warn!(upstream = %upstream.discovery, error = %e, "readiness probe failed")
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(jittered(interval)) => {}
        }
    }
}

/// `interval` times a random factor in [0.8, 1.2).
pub(crate) fn jittered(interval: Duration) -> Duration {
    interval.mul_f64(0.8 + 0.4 * random_unit())
}

/// A random number in [0, 1); 0.5 in the (never seen on Linux) absence of randomness.
pub(crate) fn random_unit() -> f64 {
    use ring::rand::{SecureRandom, SystemRandom};
    let mut bytes = [0u8; 4];
    if SystemRandom::new().fill(&mut bytes).is_err() {
        return 0.5;
    }
    f64::from(u32::from_le_bytes(bytes)) / (f64::from(u32::MAX) + 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_vary_within_a_fifth_of_the_interval() {
        let interval = Duration::from_secs(5);
        let waits: Vec<Duration> = (0..200).map(|_| jittered(interval)).collect();
        for w in &waits {
            assert!(
                *w >= interval.mul_f64(0.8) && *w < interval.mul_f64(1.2),
                "{w:?}"
            );
        }
        let (min, max) = (waits.iter().min().unwrap(), waits.iter().max().unwrap());
        // 200 draws from a 2 s range: spread over more than 1 s unless something is wrong.
        assert!(*max - *min > Duration::from_secs(1), "{min:?}..{max:?}");
    }
}
