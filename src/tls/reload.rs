//! Certificates that rotate under a running process: cert-manager, Vault and the clouds
//! renew CA bundles and client certificates on a schedule, and the mounted files change.
//! On a change the files are read and checked again, and new connections get a new client
//! config; open sessions keep the connection, and the config, they have. A set that fails
//! to load keeps the last good one. No probe connection tests the new set first (unlike new
//! credentials): during a CA rotation the client side's files legitimately change before the
//! server's certificate does, and a test would refuse exactly that.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::Tls;
use crate::metrics::Metrics;
use crate::rotation::Changes;

/// Watches `tls`'s files until `stop`, reloading them when they change. Nothing to watch
/// (system roots, no client certificate) returns at once; a watch that cannot be set up is
/// logged, and the process keeps the set it has.
pub async fn watch(tls: Tls, metrics: Arc<Metrics>, stop: CancellationToken) {
    metrics.set_tls_expiry(&tls.expiries());
    let files = tls.files();
    if files.is_empty() {
        return;
    }
    let mut changes = match Changes::watch(&files) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch the TLS files; certificate rotation disabled");
            return;
        }
    };
    // A change between the start-up read and the watch would otherwise go unseen.
    reload(&tls, &metrics);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            event = changes.recv() => {
                if !event {
                    return;
                }
                changes.settle().await;
                reload(&tls, &metrics);
            }
        }
    }
}

fn reload(tls: &Tls, metrics: &Metrics) {
    match tls.reload() {
        Ok(false) => {}
        Ok(true) => {
            let summary = tls.summary();
            let tls_line = summary.lines().next().unwrap_or_default();
            tracing::info!(
                tls = tls_line,
                "TLS files reloaded: new connections use them"
            );
            metrics.tls_reloaded("applied");
            metrics.set_tls_expiry(&tls.expiries());
        }
        Err(problems) => {
            for problem in &problems {
                tracing::warn!(key = problem.key(), error = %problem, "TLS file unusable; new connections keep the last good TLS configuration");
            }
            metrics.tls_reloaded("invalid");
        }
    }
}
