//! One client's life: connect upstream -> handshake -> relay, then one closing log line.

use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::config::{Handshake, Upstream};
use crate::credentials::{CredentialStore, DownstreamPassword};
use crate::handshake::{self, HandshakeError};
use crate::relay::{self, Context};
use crate::upstream;

/// What every session shares: built once at start.
pub struct Shared {
    pub upstream: Upstream,
    pub handshake: Handshake,
    pub credentials: CredentialStore,
    pub downstream_password: Option<Arc<DownstreamPassword>>,
}

/// Serves one client until either side closes.
pub async fn serve<C>(mut client: C, shared: Arc<Shared>)
where
    C: AsyncRead + AsyncWrite + Unpin + Send,
{
    let started = Instant::now();
    let credentials = shared.credentials.current();
    let target = &shared.upstream.address;
    let (mut upstream, upstream_addr) = match upstream::connect(&shared.upstream).await {
        Ok(connected) => connected,
        Err(e) => {
            tracing::warn!(upstream = %target, reason = e.reason(), error = %e, "upstream unavailable");
            let reply = format!("-ERR ambassador: upstream unavailable ({e})\r\n");
            refuse(&mut client, reply.as_bytes()).await;
            return;
        }
    };
    let handshake = handshake::run(
        &mut upstream,
        &credentials,
        &shared.handshake,
        shared.upstream.handshake_timeout,
    )
    .await;
    if let Err(e) = handshake {
        let reply = match &e {
            HandshakeError::AuthRejected { .. } => relay::AUTH_FAILED.to_vec(),
            other => format!("-ERR ambassador: upstream unavailable ({other})\r\n").into_bytes(),
        };
        tracing::warn!(upstream = %upstream_addr, error = %e, "upstream handshake failed");
        refuse(&mut client, &reply).await;
        return;
    }
    let handshake_ms = started.elapsed().as_millis() as u64;

    let ctx = Context {
        credentials,
        handshake: shared.handshake.clone(),
        downstream_password: shared.downstream_password.clone(),
    };
    let (result, traffic) = relay::run(client, upstream, &ctx, BytesMut::new()).await;
    let (reason, error) = match &result {
        Ok(reason) => (format!("{reason:?}"), None),
        Err(e) => ("Error".to_owned(), Some(e.to_string())),
    };
    tracing::info!(
        upstream = %upstream_addr,
        duration_ms = started.elapsed().as_millis() as u64,
        handshake_ms,
        bytes_from_client = traffic.from_client,
        bytes_to_client = traffic.to_client,
        reason,
        error,
        "session closed"
    );
}

/// Sends a final error reply and closes, letting the client read it first.
pub async fn refuse<C>(client: &mut C, reply: &[u8])
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    if client.write_all(reply).await.is_ok() {
        let _ = client.shutdown().await;
        relay::drain(client).await;
    }
}
