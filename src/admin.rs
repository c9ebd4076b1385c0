//! `GET /healthz` (the process is alive), `/readyz` (the upstream was reached and
//! authenticated recently, matches the profile, and the ambassador is not draining),
//! `/metrics` (Prometheus text) and, with `admin.allow_quit`, `POST /quitquitquit` (drain and
//! exit, for a Job's pod or one without native sidecars), on `admin.address`.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, State};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

#[derive(Clone)]
struct AdminState {
    metrics: Arc<Metrics>,
    ready_within: Duration,
    /// Cancelled by `POST /quitquitquit`; [`crate::run`] owns it and drains when it fires.
    quit: CancellationToken,
}

/// Serves the admin endpoints until `shutdown` completes. With `quit` (`admin.allow_quit`),
/// `POST /quitquitquit` cancels it; without, that path does not exist (404).
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    ready_within: Duration,
    quit: Option<CancellationToken>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let app = router(metrics, ready_within, quit);
    if let Err(e) = axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
    {
        tracing::error!(error = %e, "admin endpoint stopped");
    }
}

fn router(
    metrics: Arc<Metrics>,
    ready_within: Duration,
    quit: Option<CancellationToken>,
) -> Router {
    let mut app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text));
    // Any other method on the path is answered 405 by the router.
    if quit.is_some() {
        app = app.route("/quitquitquit", post(quitquitquit));
    }
    app.with_state(AdminState {
        metrics,
        ready_within,
        quit: quit.unwrap_or_default(),
    })
}

async fn readyz(State(state): State<AdminState>) -> impl IntoResponse {
    match state.metrics.ready(state.ready_within) {
        Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}

/// The admin address usually listens on the pod's IP (the kubelet's probes come from the
/// node), so anyone who can reach the pod could otherwise stop it: only a peer inside the
/// pod's own network namespace (loopback) may ask it to quit.
async fn quitquitquit(
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    State(state): State<AdminState>,
) -> impl IntoResponse {
    if !may_quit(peer.ip()) {
        tracing::warn!(peer = %peer, "POST /quitquitquit refused: not a loopback peer");
        return (StatusCode::FORBIDDEN, "only from loopback\n");
    }
    tracing::info!(peer = %peer, "POST /quitquitquit: draining, then exiting");
    state.quit.cancel();
    (StatusCode::OK, "draining, then exiting\n")
}

fn may_quit(peer: IpAddr) -> bool {
    peer.to_canonical().is_loopback()
}

async fn metrics_text(State(state): State<AdminState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(),
    )
}

#[cfg(test)]
mod tests {
    use super::may_quit;

    #[test]
    fn only_loopback_peers_may_quit() {
        for peer in ["127.0.0.1", "127.9.9.9", "::1", "::ffff:127.0.0.1"] {
            assert!(may_quit(peer.parse().unwrap()), "{peer}");
        }
        for peer in [
            "10.0.0.7",
            "192.168.1.2",
            "::ffff:10.0.0.7",
            "fd00::1",
            "0.0.0.0",
        ] {
            assert!(!may_quit(peer.parse().unwrap()), "{peer}");
        }
    }
}
