//! One client's life: connect upstream -> handshake -> relay, then one closing log line.
//! In TCP mode ([`tcp`]): connect, then copy bytes both ways.

mod tcp;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::config::{Protocol, Upstream};
use crate::credentials::aws_iam::AwsIamSource;
use crate::credentials::{CredentialStore, Credentials};
use crate::dead_peer;
use crate::discovery::Discovery;
use crate::handshake::{self, HandshakeError};
use crate::metrics::Metrics;
use crate::pool::{Pool, MAX_UNCHECKED};
use crate::relay::{self, Context, Moves, RelayError, Reuse};
use crate::upstream::{self, Connected, EstablishError};

/// What every session shares: built once at start.
pub struct Shared {
    pub upstream: Upstream,
    pub credentials: CredentialStore,
    /// What each session's relay reads: the handshake, the downstream password, the metrics
    /// (which the rest of the session counts into as well), ...
    pub relay: Arc<relay::Settings>,
    /// Ready upstream connections (`upstream.pool_size`), filled by a task of its own.
    pub pool: Arc<Pool>,
    /// `credentials.source = "aws-iam"`: each new connection gets a token signed for it.
    pub aws_iam: Option<AwsIamSource>,
}

impl Shared {
    /// An upstream connection made with `credentials`: a ready one from the pool, else one
    /// made now.
    async fn connect(&self, credentials: &Arc<Credentials>) -> Result<Connected, EstablishError> {
        if let Some(ready) = self.pool.take(&self.upstream, credentials) {
            self.relay.metrics.pool_taken("ready");
            return Ok(ready);
        }
        if self.upstream.pool_size > 0 {
            self.relay.metrics.pool_taken("none");
        }
        // A token signed for this connection: one signed earlier may be near its end, or
        // outlive the temporary AWS credentials that signed it.
        let fresh = self.aws_iam.as_ref().and_then(AwsIamSource::sign_now);
        let credentials = fresh.as_ref().unwrap_or(credentials);
        upstream::open(&self.upstream, credentials, &self.relay.handshake).await
    }

    /// `upstream.reuse`: the connection a client left clean (`None`: it did not) is kept
    /// for the next client if the pool has room, else closed; counted either way. One the
    /// client changed ([`Reuse::AfterReset`]) is RESET and authenticated again first, and so
    /// is one authenticated with other credentials (`made_with`) than those in use now, or
    /// too long ago to go on as it is ([`as_it_is`]).
    async fn give_back(&self, kept: Option<(Connected, Reuse)>, made_with: Arc<Credentials>) {
        let current = self.credentials.current();
        let result = match kept {
            None => "dirty",
            Some((c, reuse))
                if as_it_is(reuse, &c, &made_with, &current, self.relay.max_session_age) =>
            {
                match self.pool.give_back(c, made_with) {
                    true => "untouched",
                    false => "full",
                }
            }
            // No RESET round trip for nothing; checked again after it, as another may have
            // come back meanwhile.
            Some(_) if !self.pool.has_room() => "full",
            Some((c, _)) => self.reset_and_keep(c).await,
        };
        self.relay.metrics.pool_returned(result);
    }

    /// RESET + handshake on `c`, then into the pool: how that went, as counted.
    async fn reset_and_keep(&self, mut c: Connected) -> &'static str {
        let credentials = self.credentials.current();
        let limit = self.upstream.handshake_timeout;
        let settings = &self.relay.handshake;
        let confirm_master = c.target.confirm_master;
        let reset = handshake::reset(&mut c.stream, &credentials, settings, confirm_master, limit);
        if let Err(e) = reset.await {
            tracing::debug!(upstream = %c.addr, error = %e, "upstream connection not reused: RESET or handshake failed");
            return "failed";
        }
        c.authenticated = Instant::now();
        let addr = c.addr;
        if !self.pool.give_back(c, credentials) {
            return "full";
        }
        tracing::debug!(upstream = %addr, "upstream connection kept for the next client");
        "reused"
    }
}

/// Whether connection `c` the client left can serve the next one with no RESET and no new
/// AUTH: the client changed nothing on it, it is authenticated with the credentials in use
/// (`made_with` is `current`: no rotation since), the server checked them within the
/// first half of [`MAX_UNCHECKED`] (so that it can still wait in the pool) and of
/// `max_session_age` if set (sessions re-authenticate that often: so does a connection that
/// goes from one to the next), and it is not to Sentinel's master (confirmed by `ROLE`
/// after a RESET: it may have been demoted since the handshake).
fn as_it_is(
    reuse: Reuse,
    c: &Connected,
    made_with: &Arc<Credentials>,
    current: &Arc<Credentials>,
    max_session_age: Option<Duration>,
) -> bool {
    let window = (MAX_UNCHECKED / 2).min(max_session_age.unwrap_or(Duration::MAX));
    reuse == Reuse::AsItIs
        && !c.target.confirm_master
        && Arc::ptr_eq(made_with, current)
        && c.authenticated.elapsed() < window
}

/// Serves one client until either side closes.
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn keeps its arguments twice"
)]
pub fn serve<C>(mut client: C, shared: Arc<Shared>) -> impl std::future::Future<Output = ()>
where
    C: relay::Halves + AsyncRead + AsyncWrite + Unpin + Send,
{
    // An async block rather than an async fn: an async fn moves its arguments into its
    // body, and its future keeps room for both (the client twice, on every idle session).
    async move {
        let started = Instant::now();
        let metrics = &shared.relay.metrics;
        if let Some(why) = metrics.mismatch() {
            let reply = format!("-ERR ambassador: upstream does not match the profile ({why})\r\n");
            Box::pin(refuse(&mut client, reply.as_bytes())).await;
            return;
        }
        if shared.upstream.protocol == Protocol::Tcp {
            return Box::pin(tcp::serve(client, &shared, started)).await;
        }
        // Subscribed before reading, so a rotation in between is not missed.
        let mut credentials = shared.credentials.subscribe();
        let current = Arc::clone(&credentials.borrow_and_update());
        // Watched from before the connection, so a move while connecting is not missed.
        let discovery = &shared.upstream.discovery;
        let choice = discovery.moves().then(|| discovery.subscribe());
        // Matched as it comes: a named result would keep its room to the end. What the pool
        // checks when the connection comes back (its target and age), and the moves, are
        // boxed (every idle session would hold them, and most have neither) and made inside
        // the arm, so that the target they are made of takes no room past it.
        let (mut upstream, upstream_addr, reused, authenticated, kept_target, moves) =
            match shared.connect(&current).await {
                Ok(c) => {
                    let kept_target = shared
                        .upstream
                        .reuse
                        .then(|| Box::new((c.target.clone(), c.born)));
                    let moves = choice.map(|choice| {
                        Box::new(Moves::new(Arc::clone(discovery), choice, c.target))
                    });
                    (
                        c.stream,
                        c.addr,
                        c.reused,
                        c.authenticated,
                        kept_target,
                        moves,
                    )
                }
                Err(e) => {
                    let refusal =
                        refuse_unavailable(&mut client, metrics, &shared.upstream.discovery, e);
                    Box::pin(refusal).await;
                    return;
                }
            };
        if let Some(resumed) = upstream.tls_resumed().filter(|_| !reused) {
            metrics.tls_handshake(resumed);
        }
        metrics
            .handshake_seconds
            .observe(started.elapsed().as_secs_f64());
        metrics.upstream_ok();
        let handshake_ms = started.elapsed().as_millis() as u64;

        let ctx = Context {
            credentials,
            settings: Arc::clone(&shared.relay),
            moves,
        };
        let ended = relay::run(&mut client, &mut upstream, &ctx, BytesMut::new()).await;
        // Closed now unless kept: the log line and the give-back come after.
        drop(client);
        let reusable = ended.reusable;
        let upstream = (reusable != Reuse::No).then_some(upstream);
        let (result, traffic) = (ended.result, ended.traffic);
        metrics.relayed(traffic.from_client, traffic.to_client);
        if let Err(RelayError::Io { side, source }) = &result {
            if dead_peer::vanished(source) {
                peer_vanished(&shared, side, upstream_addr, source);
            }
        }
        let (reason, error) = match &result {
            Ok(reason) => (format!("{reason:?}"), None),
            Err(e) => ("Error".to_owned(), Some(e.to_string())),
        };
        metrics.session_closed(&reason);
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
        if let Some(kept_target) = kept_target {
            let (target, born) = *kept_target;
            let kept = upstream.map(|stream| {
                let connected = Connected {
                    stream,
                    addr: upstream_addr,
                    target,
                    reused: true,
                    authenticated,
                    born,
                };
                (connected, reusable)
            });
            Box::pin(shared.give_back(kept, current)).await;
        }
    }
}

/// The kernel gave up on a silent peer (keepalive or `TCP_USER_TIMEOUT`). The relay has
/// ended, so the client's connection closes with no reply of ours: what happened to its
/// pending commands is unknown, as with any broken connection.
fn peer_vanished(
    shared: &Shared,
    side: &'static str,
    upstream: SocketAddr,
    error: &std::io::Error,
) {
    shared.relay.metrics.dead_peer(side);
    if side == "upstream" {
        tracing::warn!(upstream = %upstream, error = %error, "upstream vanished: no answer to retransmissions or keepalive probes");
        // A reason to look again at once rather than at the next TTL, poll or check, so
        // that the client's reconnect goes to the new target.
        shared.upstream.discovery.recheck();
    }
}

/// Tells the client why no upstream connection could be made, and closes.
async fn refuse_unavailable<C>(
    client: &mut C,
    metrics: &Metrics,
    target: &Discovery,
    e: EstablishError,
) where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let auth_rejected = matches!(
        e,
        EstablishError::Handshake(HandshakeError::AuthRejected { .. })
    );
    match &e {
        EstablishError::Discovery(_) => {
            tracing::warn!(upstream = %target, error = %e, "upstream unavailable");
            metrics.connect_failed("discovery");
        }
        EstablishError::Connect(c) => {
            tracing::warn!(upstream = %target, reason = c.reason(), error = %e, "upstream unavailable");
            metrics.connect_failed(c.reason());
        }
        EstablishError::Handshake(_) => {
            tracing::warn!(upstream = %target, error = %e, "upstream handshake failed");
            if auth_rejected {
                metrics.auth_failures.inc();
            } else {
                metrics.connect_failed("handshake");
            }
        }
    }
    let reply = if auth_rejected {
        relay::AUTH_FAILED.to_vec()
    } else {
        format!("-ERR ambassador: upstream unavailable ({e})\r\n").into_bytes()
    };
    refuse(client, &reply).await;
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

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::SecretString;

    #[tokio::test]
    async fn only_an_untouched_connection_checked_lately_with_the_credentials_in_use_goes_as_it_is()
    {
        let made = || Arc::new(Credentials::new(None, SecretString::from("p".to_owned())));
        let (with, other) = (made(), made());
        let checked = |ago| Connected::on_loopback(Duration::ZERO, ago, false);
        let (now, half) = (
            checked(Duration::ZERO).await,
            checked(MAX_UNCHECKED / 2).await,
        );
        assert!(as_it_is(Reuse::AsItIs, &now, &with, &with, None));
        assert!(!as_it_is(Reuse::AfterReset, &now, &with, &with, None));
        let rotated = as_it_is(Reuse::AsItIs, &now, &with, &other, None);
        assert!(!rotated, "rotated since");
        let unchecked = as_it_is(Reuse::AsItIs, &half, &with, &with, None);
        assert!(!unchecked, "unchecked too long");
        let (second, two) = (
            Duration::from_secs(1),
            checked(Duration::from_secs(2)).await,
        );
        assert!(as_it_is(Reuse::AsItIs, &now, &with, &with, Some(second)));
        let aged = as_it_is(Reuse::AsItIs, &two, &with, &with, Some(second));
        assert!(!aged, "max_session_age");
        let master = Connected::on_loopback(Duration::ZERO, Duration::ZERO, true).await;
        let unconfirmed = as_it_is(Reuse::AsItIs, &master, &with, &with, None);
        assert!(!unconfirmed, "Sentinel's master: ROLE after a RESET");
    }
}
