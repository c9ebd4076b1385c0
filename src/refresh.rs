//! The `exec` credential source over time: run the command again before what it gave
//! expires, test the new credentials on a probe connection, and hand them to new connections
//! and (through the store's watch channel) to open sessions, which re-authenticate.
//!
//! A run that fails (exit status, timeout, garbage, too much output) is retried with backoff;
//! the last good credentials stay in use meanwhile, even past their expiry (there is nothing
//! better), and `/readyz` says so once they have expired.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

use crate::config::{Handshake, Upstream, UpstreamExpect};
use crate::credentials::aws_iam::AwsIamSource;
use crate::credentials::exec::{format_time, ExecSource, Fetched};
use crate::credentials::{CredentialStore, Credentials};
use crate::handshake::HandshakeError;
use crate::metrics::Metrics;
use crate::probe::{self, ProbeError};
use crate::rotation;
use crate::upstream::EstablishError;

/// Never run the command again sooner than this after a success: credentials that live
/// shorter than their margin would otherwise be fetched in a loop.
const MIN_WAIT: Duration = Duration::from_secs(1);

/// When to run the command again, from `[credentials]`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Schedule {
    /// How long before `expires_at` to refresh; `None`: a fifth of the lifetime.
    pub margin: Option<Duration>,
    /// How often to refresh credentials that have no `expires_at`; `None`: never.
    pub interval: Option<Duration>,
}

impl Schedule {
    /// How long after `fetched_at` to refresh `credentials`, if ever.
    pub fn wait(&self, credentials: &Credentials, fetched_at: SystemTime) -> Option<Duration> {
        let Some(expires_at) = credentials.expires_at() else {
            return self.interval;
        };
        let lifetime = expires_at
            .duration_since(fetched_at)
            .unwrap_or(Duration::ZERO);
        let margin = self.margin.unwrap_or(lifetime / 5);
        Some(lifetime.saturating_sub(margin).max(MIN_WAIT))
    }
}

/// A source of credentials that expire: a command's output, or an AWS IAM token.
#[derive(Debug, Clone)]
pub enum Fetcher {
    Exec(ExecSource),
    AwsIam(AwsIamSource),
}

impl Fetcher {
    /// For metrics: `exec` or `aws-iam`.
    pub fn name(&self) -> &'static str {
        match self {
            Fetcher::Exec(_) => "exec",
            Fetcher::AwsIam(_) => "aws-iam",
        }
    }

    /// Where the credentials come from, for `--check` (never a secret).
    pub fn describe(&self) -> String {
        match self {
            Fetcher::Exec(source) => format!("command {:?}", source.command[0]),
            Fetcher::AwsIam(source) => format!(
                "aws-iam ({} {}{}, region {})",
                source.service,
                source.cache_name,
                if source.serverless {
                    ", serverless"
                } else {
                    ""
                },
                source.region.as_deref().unwrap_or("from the SDK's chain")
            ),
        }
    }

    /// Fetches once. On failure: the error, and what the command wrote on stderr (the
    /// secret removed).
    pub async fn fetch(&self) -> Result<Fetched, (String, String)> {
        match self {
            Fetcher::Exec(source) => source
                .fetch()
                .await
                .map_err(|(e, stderr)| (e.to_string(), stderr)),
            Fetcher::AwsIam(source) => source
                .fetch()
                .await
                .map(|credentials| Fetched {
                    credentials,
                    stderr: String::new(),
                })
                .map_err(|e| (e.to_string(), String::new())),
        }
    }
}

/// Everything a refresh needs.
pub struct Refresher {
    pub source: Fetcher,
    pub schedule: Schedule,
    pub store: CredentialStore,
    pub upstream: Upstream,
    pub handshake: Handshake,
    pub expect: UpstreamExpect,
    pub metrics: Arc<Metrics>,
}

impl Refresher {
    /// Refreshes until `stop`. The credentials in the store when it starts were fetched
    /// just before (at start-up).
    pub async fn run(self, stop: CancellationToken) {
        let current = self.store.current();
        self.metrics
            .set_credential_expiry(self.source.name(), current.expires_at());
        let mut wait = self.schedule.wait(&current, SystemTime::now());
        let mut retry = Duration::from_secs(1);
        loop {
            let due = async move {
                match wait {
                    Some(w) => tokio::time::sleep(w).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = due => {}
            }
            let started = SystemTime::now();
            // A command still running at shutdown is killed (dropped) rather than awaited.
            let refreshed = tokio::select! {
                _ = stop.cancelled() => return,
                refreshed = self.refresh() => refreshed,
            };
            match refreshed {
                Some(next) => {
                    wait = self.schedule.wait(&next, started);
                    retry = Duration::from_secs(1);
                }
                // A failed run is tried again after 1 s, doubling up to 30 s: the file's backoff.
                None => {
                    wait = Some(retry);
                    retry = rotation::next_retry(retry);
                }
            }
        }
    }

    /// Runs the command and applies what it gave; `None` (logged) when that failed.
    async fn refresh(&self) -> Option<Arc<Credentials>> {
        let source = self.source.name();
        let fetched = match self.source.fetch().await {
            Ok(f) => f,
            Err((error, stderr)) => {
                let expires = self.store.current().expires_at().map(format_time);
                tracing::warn!(
                    %error,
                    stderr = %stderr,
                    expires_at = expires.as_deref().unwrap_or("never"),
                    source,
                    "credential refresh failed; keeping the last good credentials until they expire, will retry"
                );
                self.metrics.credential_refreshed(source, false);
                return None;
            }
        };
        if !fetched.stderr.is_empty() {
            tracing::info!(source = %self.source.describe(), stderr = %fetched.stderr, "credential command wrote on stderr");
        }
        let candidate = fetched.credentials;
        match probe::probe(&self.upstream, &candidate, &self.handshake, &self.expect).await {
            Ok(_) => {}
            Err(ProbeError::Establish(EstablishError::Handshake(
                HandshakeError::AuthRejected { reason, .. },
            ))) => {
                tracing::warn!(user = candidate.username(), %reason, source, "new credentials refused by the upstream; keeping the current ones, will retry");
                self.metrics.credential_refreshed(source, false);
                return None;
            }
            // Fresh credentials from their source beat ones about to expire: applied even
            // though the upstream could not be asked.
            Err(error) => {
                tracing::warn!(%error, source, "cannot test the new credentials; applying them untested");
            }
        }
        let expires = candidate.expires_at();
        tracing::info!(
            user = candidate.username(),
            expires_at = expires.map(format_time).as_deref().unwrap_or("never"),
            "credentials refreshed"
        );
        self.store.replace(candidate);
        self.metrics.set_credential_expiry(source, expires);
        self.metrics.credential_refreshed(source, true);
        Some(self.store.current())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::SecretString;

    #[test]
    fn refreshes_a_margin_before_expiry() {
        let now = SystemTime::now();
        let expiring = |secs| {
            let mut c = Credentials::new(None, SecretString::from("p"));
            c.set_expires_at(Some(now + Duration::from_secs(secs)));
            c
        };
        let default = Schedule::default();
        assert_eq!(
            default.wait(&expiring(100), now),
            Some(Duration::from_secs(80))
        );
        let margin = Schedule {
            margin: Some(Duration::from_secs(30)),
            interval: None,
        };
        assert_eq!(
            margin.wait(&expiring(100), now),
            Some(Duration::from_secs(70))
        );
        // A margin longer than the lifetime: soon, not in a loop.
        assert_eq!(margin.wait(&expiring(10), now), Some(MIN_WAIT));
        let forever = Credentials::new(None, SecretString::from("p"));
        assert_eq!(default.wait(&forever, now), None);
        let every = Schedule {
            margin: None,
            interval: Some(Duration::from_secs(600)),
        };
        assert_eq!(every.wait(&forever, now), Some(Duration::from_secs(600)));
    }
}
