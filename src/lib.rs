//! redis-ambassador: a sidecar that lets an application talk to a remote, password-protected
//! Redis as if it were a local one without a password.
//!
//! The life of one client connection, one stage per module, in order:
//!
//! 1. [`listener`]: accept (TCP or unix socket), enforce `max_clients`, spawn a session.
//! 2. [`session`]: connect upstream, handshake, relay, log one closing line.
//! 3. [`discovery`]: the targets new connections go to (a static address, DNS SRV, the
//!    master Sentinel names, several health-checked backends), kept current by a task of
//!    its own; a session whose target is no longer chosen ends at an idle point.
//! 4. [`upstream`]: [`upstream::establish`], the one path from a target and the current
//!    credentials to an authenticated connection: connect (TCP, then TLS with the config
//!    [`tls`] built at start and rebuilt when its files change) within `connect_timeout`,
//!    then [`handshake`], the ambassador's own AUTH / CLIENT SETNAME / SELECT, within a limit.
//! 5. [`relay`]: both directions; client commands framed by [`resp`] and judged by [`filter`].
//!    In TCP mode (`listen.protocol = "tcp"`) bytes are copied unparsed instead.
//!
//! Around them: [`config`] (layers -> validated `Config`), [`credentials`] (the credential
//! file or command, and the only place a secret is looked at), [`rotation`] (reloading the
//! file), [`refresh`] (running the command again before its credentials expire), [`probe`]
//! (the ambassador's own upstream connections: readiness, `--check`, testing new
//! credentials), [`metrics`] and [`admin`] (`/healthz`, `/readyz`, `/metrics`,
//! `/quitquitquit`); every long-lived task runs through [`task::catching`], so a panic is
//! counted, not lost.

pub mod admin;
pub mod config;
pub mod credentials;
pub mod dead_peer;
pub mod discovery;
pub mod filter;
pub mod handshake;
pub mod listener;
pub mod metrics;
pub mod pool;
pub mod probe;
pub mod refresh;
pub mod relay;
pub mod resp;
pub mod rotation;
pub mod session;
pub mod task;
pub mod tls;
pub mod upstream;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::Config;
pub use listener::Listener;

use credentials::CredentialStore;
use metrics::Metrics;
use session::Shared;

/// Serves clients from `listener` (and the admin endpoints from `admin`, when given) until
/// `shutdown` completes; then `/readyz` turns false, the listener keeps accepting for
/// `shutdown.min_delay`, then stops; open sessions get `shutdown.drain_timeout` to finish,
/// and the rest are closed. `POST /quitquitquit` (with `admin.allow_quit`) does the same
/// without the delay: whoever asks is done with Redis.
pub async fn run(
    config: Config,
    listener: Listener,
    admin: Option<TcpListener>,
    shutdown: impl Future<Output = ()>,
) {
    run_with(config, listener, admin, shutdown, Arc::new(Metrics::new())).await
}

/// [`run`], counting into `metrics`, which the caller keeps: the tests' harness reads
/// `task_panics` from it when it stops an ambassador.
pub async fn run_with(
    config: Config,
    listener: Listener,
    admin: Option<TcpListener>,
    shutdown: impl Future<Output = ()>,
    metrics: Arc<Metrics>,
) {
    if config
        .upstream
        .tls
        .as_ref()
        .is_some_and(|t| t.insecure_skip_verify)
    {
        tracing::warn!("{}", tls::INSECURE_WARNING);
    }
    if let config::CredentialSource::Refreshed {
        source: refresh::Fetcher::AwsIam(_),
        ..
    } = &config.credentials_source
    {
        if config.upstream.tls.is_none() {
            tracing::warn!("credentials.source = \"aws-iam\" without [upstream.tls]: ElastiCache and MemoryDB refuse IAM authentication over plain TCP (fine for tests and tunnels)");
        }
    }
    let credentials = CredentialStore::new(config.credentials);
    let shared = Arc::new(Shared {
        upstream: config.upstream.clone(),
        credentials: credentials.clone(),
        relay: Arc::new(relay::Settings {
            reauth_open_sessions: config.reauth_open_sessions,
            max_session_age: config.max_session_age,
            handshake: config.handshake.clone(),
            downstream_password: config.listen.password.map(Arc::new),
            idle_timeout: config.listen.idle_timeout,
            metrics: Arc::clone(&metrics),
            reuse: config.upstream.reuse,
        }),
        pool: Arc::new(pool::Pool::new(
            config.upstream.pool_size,
            config.upstream.reuse,
            metrics.pool_ready(),
        )),
        aws_iam: match &config.credentials_source {
            config::CredentialSource::Refreshed {
                source: refresh::Fetcher::AwsIam(source),
                ..
            } => Some(source.clone()),
            _ => None,
        },
    });
    let admin_address = admin
        .as_ref()
        .and_then(|a| a.local_addr().ok())
        .map_or_else(|| "off".to_owned(), |a| a.to_string());
    let probing = probe::needed(admin.is_some(), &config.upstream.expect);
    let probe_interval = if probing {
        format!("{:?}", config.admin.probe_interval)
    } else {
        "off".to_owned()
    };
    tracing::info!(
        address = %listener.local_address(),
        admin = %admin_address,
        probe = %probe_interval,
        upstream = %config.upstream.discovery,
        profile = %config.profile,
        "listening"
    );
    // Background work ends when `background` is cancelled, after the drain.
    let background = CancellationToken::new();
    // Cancelled by the admin endpoint's `POST /quitquitquit`, only when the profile allows it.
    let quit = CancellationToken::new();
    let helpers = TaskTracker::new();
    if let Some(admin) = admin {
        let stop = background.clone();
        let serving = admin::serve(
            admin,
            Arc::clone(&metrics),
            config.admin.ready_within,
            config.admin.allow_quit.then(|| quit.clone()),
            async move { stop.cancelled().await },
        );
        spawn_caught(&helpers, "admin", &metrics, serving);
    }
    if probing {
        let probing = probe::keep_probing(
            config.upstream.clone(),
            config.handshake.clone(),
            config.upstream.expect.clone(),
            credentials.clone(),
            Arc::clone(&metrics),
            config.admin.probe_interval,
            background.clone(),
        );
        spawn_caught(&helpers, "probe", &metrics, probing);
    }
    let discovering = Arc::clone(&config.upstream.discovery).run(
        config.upstream.clone(),
        credentials.clone(),
        config.handshake.clone(),
        Arc::clone(&metrics),
        background.clone(),
    );
    spawn_caught(&helpers, "discovery", &metrics, discovering);
    let pool = Arc::clone(&shared.pool);
    let filling = {
        let (upstream, credentials, handshake) = (
            config.upstream.clone(),
            credentials.clone(),
            config.handshake.clone(),
        );
        let stop = background.clone();
        async move { pool.fill(upstream, credentials, handshake, stop).await }
    };
    spawn_caught(&helpers, "pool", &metrics, filling);
    match config.credentials_source.clone() {
        config::CredentialSource::None => {}
        config::CredentialSource::File(path) => {
            let reloading = rotation::Reloader {
                path,
                default_username: config.credentials_username.clone(),
                store: credentials,
                upstream: config.upstream.clone(),
                handshake: config.handshake.clone(),
                expect: config.upstream.expect.clone(),
                metrics: Arc::clone(&metrics),
            }
            .run(background.clone());
            spawn_caught(&helpers, "reloader", &metrics, reloading);
        }
        config::CredentialSource::Refreshed { source, schedule } => {
            let refreshing = refresh::Refresher {
                source,
                schedule,
                store: credentials,
                upstream: config.upstream.clone(),
                handshake: config.handshake.clone(),
                expect: config.upstream.expect.clone(),
                metrics: Arc::clone(&metrics),
            }
            .run(background.clone());
            spawn_caught(&helpers, "refresher", &metrics, refreshing);
        }
    }

    if let Some(tls) = &config.upstream.tls {
        let watching = tls::watch(tls.clone(), Arc::clone(&metrics), background.clone());
        spawn_caught(&helpers, "tls-watch", &metrics, watching);
    }

    let stop = CancellationToken::new();
    let kill = CancellationToken::new();
    let tracker = TaskTracker::new();
    let accepting = listener::accept_loop(
        listener,
        shared,
        config.listen.max_clients,
        config.listen.dead_peer,
        stop.clone(),
        &tracker,
        kill.clone(),
    );
    let accepted = accept_until_stopped(
        accepting,
        shutdown,
        &quit,
        config.shutdown.min_delay,
        &stop,
        &metrics,
    );
    accepted.await;
    tracker.close();
    let drain_timeout = config.shutdown.drain_timeout;
    tracing::info!(sessions = tracker.len(), ?drain_timeout, "draining");
    if tokio::time::timeout(drain_timeout, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            sessions = tracker.len(),
            "drain time over: closing the remaining sessions"
        );
        kill.cancel();
        tracker.wait().await;
    }
    background.cancel();
    helpers.close();
    helpers.wait().await;
    tracing::info!("stopped");
}

/// Runs `accepting` until `shutdown` (a signal) or `quit` (`POST /quitquitquit`); then
/// `/readyz` turns false and, after a signal, new clients are still accepted for
/// `min_delay` (a quit meanwhile cuts it short); then `stop` closes the listener and this
/// returns once the accept loop has ended.
async fn accept_until_stopped(
    accepting: impl Future<Output = ()>,
    shutdown: impl Future<Output = ()>,
    quit: &CancellationToken,
    min_delay: Duration,
    stop: &CancellationToken,
    metrics: &Metrics,
) {
    tokio::pin!(accepting);
    tokio::select! {
        _ = &mut accepting => return,
        _ = shutdown => {
            metrics.set_draining();
            if !min_delay.is_zero() {
                tracing::info!(?min_delay, "not ready; still accepting for shutdown.min_delay");
                tokio::select! {
                    _ = &mut accepting => return,
                    _ = tokio::time::sleep(min_delay) => {}
                    _ = quit.cancelled() => {}
                }
            }
        }
        _ = quit.cancelled() => metrics.set_draining(),
    }
    stop.cancel();
    accepting.await;
}

/// Spawns a long-lived background task on `helpers` through [`task::catching`], so that a
/// panic in it is logged and counted under `what`.
fn spawn_caught(
    helpers: &TaskTracker,
    what: &'static str,
    metrics: &Arc<Metrics>,
    work: impl Future<Output = ()> + Send + 'static,
) {
    let metrics = Arc::clone(metrics);
    helpers.spawn(async move { task::catching(what, &metrics, Box::pin(work)).await });
}
