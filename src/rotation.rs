//! Credential rotation: watch the credential file, test what it now holds on a probe
//! connection, and only then hand it to new connections (and, through the store's watch
//! channel, to open sessions).
//!
//! The file's folder is watched rather than the file: Kubernetes updates a mounted Secret by
//! swapping a `..data` symlink, and editors replace a file by renaming a new one over it;
//! neither touches the inode a file watch would hold. Every event in the folder triggers a
//! re-read, and a content comparison decides whether anything changed. [`Changes`] is that
//! watch; the TLS files are watched with it too ([`crate::tls::watch`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::{Handshake, Upstream, UpstreamExpect};
use crate::credentials::{CredentialStore, Credentials};
use crate::handshake::HandshakeError;
use crate::metrics::Metrics;
use crate::probe::{self, ProbeError};
use crate::upstream::EstablishError;

/// Events arriving this close together are one change (a swap is several renames).
const SETTLE: Duration = Duration::from_millis(100);
/// A change that could not be tested (upstream unreachable) or was refused is tried again,
/// waiting twice as long each time, up to this.
const RETRY_MAX: Duration = Duration::from_secs(30);

/// Everything a reload needs.
pub struct Reloader {
    pub path: PathBuf,
    pub default_username: Option<String>,
    pub store: CredentialStore,
    pub upstream: Upstream,
    pub handshake: Handshake,
    pub expect: UpstreamExpect,
    pub metrics: Arc<Metrics>,
}

impl Reloader {
    /// Watches until `stop`. Errors setting up the watch are logged; the process keeps
    /// serving with the credentials it has.
    pub async fn run(self, stop: CancellationToken) {
        let mut changes = match Changes::watch(&[&self.path]) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(file = %self.path.display(), error = %e, "cannot watch the credential file; rotation disabled");
                return;
            }
        };
        // A change between the start-up read and the watch would otherwise go unseen.
        let mut pending: Option<Credentials> = self.read_changed();
        let mut retry = Duration::from_secs(1);
        if let Some(candidate) = pending.take() {
            pending = self.try_apply(candidate).await;
        }
        loop {
            let waiting = pending.is_some();
            let retry_due = async move {
                if waiting {
                    tokio::time::sleep(retry).await
                } else {
                    std::future::pending().await
                }
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                event = changes.recv() => {
                    if !event {
                        return;
                    }
                    changes.settle().await;
                    pending = self.read_changed();
                    retry = Duration::from_secs(1);
                }
                _ = retry_due => retry = next_retry(retry),
            }
            if let Some(candidate) = pending.take() {
                pending = self.try_apply(candidate).await;
            }
        }
    }

    /// The file's credentials if they differ from those in use; problems are logged (never
    /// the content) and leave the current credentials in place.
    fn read_changed(&self) -> Option<Credentials> {
        match Credentials::load(&self.path, self.default_username.as_deref()) {
            Ok(c) if c.same_as(&self.store.current()) => None,
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(error = %e, "credential file unusable; keeping the last good credentials");
                self.metrics.reloaded("invalid");
                None
            }
        }
    }

    /// Tests `candidate` on a probe connection; applies it, or hands it back to retry.
    async fn try_apply(&self, candidate: Credentials) -> Option<Credentials> {
        match probe::probe(&self.upstream, &candidate, &self.handshake, &self.expect).await {
            Ok(_) => {
                tracing::info!(user = candidate.username(), "credentials reloaded");
                self.store.replace(candidate);
                self.metrics.reloaded("applied");
                None
            }
            Err(ProbeError::Establish(EstablishError::Handshake(
                HandshakeError::AuthRejected { reason, .. },
            ))) => {
                tracing::warn!(user = candidate.username(), %reason, "new credentials refused by the upstream; keeping the current ones, will retry");
                self.metrics.reloaded("rejected");
                Some(candidate)
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot test the new credentials yet; keeping the current ones, will retry");
                self.metrics.reloaded("unverified");
                Some(candidate)
            }
        }
    }
}

/// Changes in the folders of some files. The watcher calls back on its own thread; the
/// channel brings its events to the task; dropping this ends the callbacks.
pub(crate) struct Changes {
    events: mpsc::UnboundedReceiver<()>,
    _watcher: notify::RecommendedWatcher,
}

impl Changes {
    /// Watches the folder of each of `files`.
    pub(crate) fn watch(files: &[&Path]) -> notify::Result<Changes> {
        use notify::Watcher;
        let (tx, events) = mpsc::unbounded_channel();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                // Reading a file is an event in its folder too (open, close): counting it as
                // a change made every read trigger the next, so a refused file was retried
                // every SETTLE instead of with backoff.
                let changed = event.is_ok_and(|e| !matches!(e.kind, notify::EventKind::Access(_)));
                if changed {
                    let _ = tx.send(());
                }
            })?;
        let mut folders: Vec<PathBuf> = files
            .iter()
            .map(|file| match file.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
                _ => PathBuf::from("."),
            })
            .collect();
        folders.sort();
        folders.dedup();
        for folder in &folders {
            watcher.watch(folder, notify::RecursiveMode::NonRecursive)?;
        }
        Ok(Changes {
            events,
            _watcher: watcher,
        })
    }

    /// Waits for an event; `false` when the watcher is gone. Cancel-safe: a `select!` may
    /// drop it without losing an event.
    pub(crate) async fn recv(&mut self) -> bool {
        self.events.recv().await.is_some()
    }

    /// Lets the rest of a swap land (it is several renames) and drops the events it made,
    /// so that the files are read once per change.
    pub(crate) async fn settle(&mut self) {
        tokio::time::sleep(SETTLE).await;
        while self.events.try_recv().is_ok() {}
    }
}

/// The wait before the next retry: twice the last, at most `RETRY_MAX`.
pub(crate) fn next_retry(last: Duration) -> Duration {
    (last * 2).min(RETRY_MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_double_from_one_second_up_to_thirty() {
        let mut waits = vec![Duration::from_secs(1)];
        for _ in 0..6 {
            waits.push(next_retry(*waits.last().unwrap()));
        }
        let secs: Vec<u64> = waits.iter().map(Duration::as_secs).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 30, 30]);
    }
}
