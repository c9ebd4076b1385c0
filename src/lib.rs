//! redis-ambassador: a sidecar that lets an application talk to a remote, password-protected
//! Redis as if it were a local one without a password.
//!
//! The life of one client connection, one stage per module, in order:
//!
//! 1. [`listener`]: accept (TCP or unix socket), enforce `max_clients`, spawn a session.
//! 2. [`session`]: connect upstream, handshake, relay, log one closing line.
//! 3. [`upstream`]: resolve the host anew and connect (TCP, then TLS with the config [`tls`]
//!    built at start) within `connect_timeout`.
//! 4. [`handshake`]: the ambassador's own AUTH / CLIENT SETNAME / SELECT, within a limit.
//! 5. [`relay`]: both directions; client commands framed by [`resp`] and judged by [`filter`].
//!
//! Around them: [`config`] (layers -> validated `Config`) and [`credentials`] (the credential
//! file, and the only place a secret is looked at).

pub mod check;
pub mod config;
pub mod credentials;
pub mod filter;
pub mod handshake;
pub mod listener;
pub mod relay;
pub mod resp;
pub mod session;
pub mod tls;
pub mod upstream;

use std::future::Future;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::Config;
pub use listener::Listener;

use credentials::CredentialStore;
use session::Shared;

/// Serves clients from `listener` until `shutdown` completes, then stops accepting, gives
/// open sessions `drain_timeout` to finish, and closes the rest.
pub async fn run(config: Config, listener: Listener, shutdown: impl Future<Output = ()>) {
    if config
        .upstream
        .tls
        .as_ref()
        .is_some_and(|t| t.insecure_skip_verify)
    {
        tracing::warn!("{}", tls::INSECURE_WARNING);
    }
    let shared = Arc::new(Shared {
        upstream: config.upstream.clone(),
        handshake: config.handshake.clone(),
        credentials: CredentialStore::new(config.credentials),
        downstream_password: config.listen.password.map(Arc::new),
    });
    tracing::info!(
        address = %listener.local_address(),
        upstream = %config.upstream.address,
        profile = %config.profile,
        "listening"
    );
    let stop = CancellationToken::new();
    let kill = CancellationToken::new();
    let tracker = TaskTracker::new();
    let accepting = listener::accept_loop(
        listener,
        shared,
        config.listen.max_clients,
        stop.clone(),
        &tracker,
        kill.clone(),
    );
    tokio::pin!(accepting);
    tokio::select! {
        _ = &mut accepting => {}
        _ = shutdown => {
            stop.cancel();
            accepting.await;
        }
    }
    tracker.close();
    tracing::info!(sessions = tracker.len(), drain_timeout = ?config.drain_timeout, "draining");
    if tokio::time::timeout(config.drain_timeout, tracker.wait())
        .await
        .is_err()
    {
        kill.cancel();
        tracker.wait().await;
    }
    tracing::info!("stopped");
}
