//! `listen.protocol = "tcp"`: the pattern's `api` ambassador. The same discovery, balancing
//! and health checks choose the backend; then bytes are copied both ways, unparsed, until
//! either side closes. A client that cannot be served is closed without a word: whatever it
//! speaks, it is not RESP.

use std::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite};

use super::Shared;

pub(super) async fn serve<C>(mut client: C, shared: &Shared, started: Instant)
where
    C: AsyncRead + AsyncWrite + Unpin + Send,
{
    let metrics = &shared.relay.metrics;
    let mut backend = match shared.connect(&shared.credentials.current()).await {
        Ok(connected) => connected,
        Err(e) => {
            tracing::warn!(upstream = %shared.upstream.discovery, error = %e, "upstream unavailable");
            metrics.connect_failed("connect");
            return;
        }
    };
    metrics.upstream_ok();
    let copied = tokio::io::copy_bidirectional(&mut client, &mut backend.stream).await;
    let (from_client, to_client, error) = match copied {
        Ok((up, down)) => (up, down, None),
        Err(e) => (0, 0, Some(e.to_string())),
    };
    metrics.relayed(from_client, to_client);
    metrics.session_closed(if error.is_some() { "Error" } else { "Closed" });
    tracing::info!(
        upstream = %backend.addr,
        duration_ms = started.elapsed().as_millis() as u64,
        bytes_from_client = from_client,
        bytes_to_client = to_client,
        error,
        "session closed"
    );
}
