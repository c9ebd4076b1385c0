//! `upstream.addresses`: several backends, each checked every `health_interval` (with
//! jitter) on a connection of the checker's own: an authenticated `PING` (a TCP connect, and
//! TLS when configured, in TCP mode). An unhealthy backend is skipped until a check passes.

use std::fmt;
use std::time::Duration;

use redis_protocol::resp2::types::OwnedFrame;
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

use super::{Candidate, Choice, Discovery, Order, Target};
use crate::config::{Handshake, HostPort, Protocol, Upstream};
use crate::credentials::CredentialStore;
use crate::handshake;
use crate::metrics::Metrics;
use crate::upstream;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// The first healthy backend in the listed order.
    Failover,
    /// Each new connection to the next healthy backend.
    RoundRobin,
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Strategy::Failover => "failover",
            Strategy::RoundRobin => "round-robin",
        })
    }
}

impl Strategy {
    pub(super) fn order(self) -> Order {
        match self {
            Strategy::Failover => Order::Listed,
            Strategy::RoundRobin => Order::Rotate,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Backends {
    pub addresses: Vec<HostPort>,
    pub strategy: Strategy,
    pub health_interval: Duration,
}

impl Backends {
    /// Every backend healthy until a check says otherwise; failover ranks them as listed.
    pub(super) fn initial(&self) -> Choice {
        let candidates = self
            .addresses
            .iter()
            .enumerate()
            .map(|(i, a)| {
                let priority = match self.strategy {
                    Strategy::Failover => u16::try_from(i).unwrap_or(u16::MAX),
                    Strategy::RoundRobin => 0,
                };
                Candidate::new(Target::named(a.clone()), priority, 0)
            })
            .collect();
        Choice::of(candidates)
    }

    /// Checks every backend, publishes their health, and again after `health_interval`.
    pub(super) async fn check(
        &self,
        discovery: &Discovery,
        upstream: &Upstream,
        credentials: &CredentialStore,
        settings: &Handshake,
        metrics: &Metrics,
        stop: &CancellationToken,
    ) {
        loop {
            let targets: Vec<Target> = self.addresses.iter().cloned().map(Target::named).collect();
            let checks = targets
                .iter()
                .map(|target| healthy(upstream, target, credentials, settings));
            let results = futures_util::future::join_all(checks).await;
            let mut choice = discovery.choice.borrow().clone();
            for (candidate, result) in choice.candidates.iter_mut().zip(results) {
                let address = &candidate.target.address;
                let ok = result.is_ok();
                match result {
                    Err(e) if candidate.healthy => {
                        tracing::warn!(backend = %address, error = %e, "backend unhealthy: skipped until it recovers")
                    }
                    Ok(()) if !candidate.healthy => {
                        tracing::info!(backend = %address, "backend healthy again")
                    }
                    _ => {}
                }
                candidate.healthy = ok;
                metrics.set_backend_health(&address.to_string(), ok);
            }
            if choice.candidates.iter().any(|c| c.healthy) {
                metrics.upstream_ok();
            }
            discovery.publish(choice, Some(metrics));
            if !discovery
                .wait(crate::probe::jittered(self.health_interval), stop)
                .await
            {
                return;
            }
        }
    }
}

/// One health check: an authenticated `PING` answered `+PONG`; in TCP mode, a connection
/// (and its TLS handshake).
async fn healthy(
    upstream: &Upstream,
    target: &Target,
    credentials: &CredentialStore,
    settings: &Handshake,
) -> Result<(), String> {
    let mut connected = upstream::establish(upstream, target, &credentials.current(), settings)
        .await
        .map_err(|e| e.to_string())?;
    if upstream.protocol == Protocol::Tcp {
        return Ok(());
    }
    let limit = upstream.handshake_timeout;
    let ping = async {
        connected.stream.write_all(b"*1\r\n$4\r\nPING\r\n").await?;
        handshake::read_frame(&mut connected.stream, &mut Vec::new()).await
    };
    match tokio::time::timeout(limit, ping).await {
        Ok(Ok(OwnedFrame::SimpleString(s))) if s == b"PONG" => Ok(()),
        Ok(Ok(_)) => Err("PING not answered PONG".to_owned()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("PING not answered within {limit:?}")),
    }
}
