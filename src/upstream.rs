//! Reaching the upstream: resolve the target's host again for every connection, connect and,
//! with `[upstream.tls]`, run the TLS handshake, all within one `connect_timeout`; then
//! [`establish`] authenticates. TCP_NODELAY on,
//! and `dead_peer_timeout` with keepalive, so a silently vanished upstream is noticed.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf, ReadHalf, WriteHalf};
use tokio::net::{tcp, TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tokio_util::either::Either;

use crate::config::{Handshake, HostPort, Protocol, Upstream};
use crate::credentials::Credentials;
use crate::dead_peer::DeadPeer;
use crate::discovery::{Resolver, Target};
use crate::handshake::{self, HandshakeError};
use crate::tls::{self, Tls, TlsFailure};

/// The upstream could not be reached. The text is what the client sees after
/// `upstream unavailable`, so it names the address and the limit, nothing else.
#[derive(Debug, Error)]
pub enum ConnectError {
    #[error("DNS: cannot resolve {address}: {reason}")]
    Resolve { address: String, reason: String },
    #[error("connect to {address}: {reason}")]
    Connect { address: String, reason: String },
    #[error("connect to {address}: timed out after {limit:?}")]
    Timeout { address: String, limit: Duration },
    /// The TCP connection was made; the TLS handshake on it failed.
    #[error("TLS: {failure}")]
    Tls {
        address: SocketAddr,
        failure: TlsFailure,
    },
}

impl ConnectError {
    /// A short label for logs and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            ConnectError::Resolve { .. } => "dns",
            ConnectError::Connect { .. } => "connect",
            ConnectError::Timeout { .. } => "timeout",
            ConnectError::Tls { .. } => "tls",
        }
    }
}

/// An upstream connection, plain or TLS. Boxed TLS state keeps the plain case small.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Stream {
    /// The negotiated TLS version and the peer's certificate, for `--check`.
    pub fn tls_summary(&self) -> Option<String> {
        match self {
            Stream::Plain(_) => None,
            Stream::Tls(s) => Some(tls::describe(s.get_ref().1)),
        }
    }

    /// For TLS: whether the handshake resumed an earlier session.
    pub fn tls_resumed(&self) -> Option<bool> {
        match self {
            Stream::Plain(_) => None,
            Stream::Tls(s) => {
                Some(s.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed))
            }
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// A plain socket's halves are borrowed as they are; a TLS stream's share it through
/// `tokio::io::split`'s lock.
impl crate::relay::Halves for Stream {
    type Read<'a> = Either<tcp::ReadHalf<'a>, ReadHalf<&'a mut TlsStream<TcpStream>>>;
    type Write<'a> = Either<tcp::WriteHalf<'a>, WriteHalf<&'a mut TlsStream<TcpStream>>>;
    fn halves(&mut self) -> (Self::Read<'_>, Self::Write<'_>) {
        match self {
            Stream::Plain(s) => {
                let (r, w) = s.split();
                (Either::Left(r), Either::Left(w))
            }
            Stream::Tls(s) => {
                let (r, w) = tokio::io::split(s.as_mut());
                (Either::Right(r), Either::Right(w))
            }
        }
    }
}

impl crate::relay::Readable for Either<tcp::ReadHalf<'_>, ReadHalf<&mut TlsStream<TcpStream>>> {
    fn can_wait(&self) -> bool {
        matches!(self, Either::Left(_))
    }

    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Either::Left(r) => r.poll_read_ready(cx),
            // Never asked (`can_wait`): decrypted data may wait in the TLS session.
            Either::Right(_) => Poll::Ready(Ok(())),
        }
    }
}

/// io::ErrorKind's text ("connection refused") without the OS error number, unless the kind
/// says nothing: then the error's own words.
fn reason(e: &io::Error) -> String {
    let kind = e.kind().to_string();
    if e.kind() == io::ErrorKind::Other || kind.contains("uncategorized") {
        e.to_string()
    } else {
        kind
    }
}

/// How to reach an address: the upstream's, or the sentinels' (their own TLS settings).
pub struct Reach<'a> {
    pub resolver: &'a Resolver,
    pub tls: Option<&'a Tls>,
    /// For the connection and the TLS handshake together.
    pub timeout: Duration,
    pub dead_peer: &'a DeadPeer,
}

/// Connects to the first address of `target` that accepts, then runs the TLS handshake if
/// configured, all within the reach's timeout.
pub async fn connect(
    reach: &Reach<'_>,
    target: &Target,
) -> Result<(Stream, SocketAddr), ConnectError> {
    let limit = reach.timeout;
    let attempt = async {
        let (tcp, addr) = connect_tcp(reach, &target.address).await?;
        let stream = match reach.tls {
            None => Stream::Plain(tcp),
            Some(tls) => Stream::Tls(Box::new(handshake(tls, target, tcp, addr).await?)),
        };
        Ok((stream, addr))
    };
    match tokio::time::timeout(limit, attempt).await {
        Ok(result) => result,
        Err(_) => Err(ConnectError::Timeout {
            address: target.to_string(),
            limit,
        }),
    }
}

/// An authenticated upstream connection, ready for a client or the probe.
pub struct Connected {
    pub stream: Stream,
    pub addr: SocketAddr,
    /// The target it was made to, which a session watches for moves.
    pub target: Target,
    /// A client used it before (`upstream.reuse`): its TLS handshake was counted then.
    pub reused: bool,
    /// When the server last checked its credentials: its handshake, or the one after a
    /// RESET (`upstream.reuse`).
    pub authenticated: Instant,
    /// When it was made: what it was made to (the address a host name resolved to, the
    /// master Sentinel named) may have changed since, so its age is bounded in the pool.
    pub born: Instant,
}

#[cfg(test)]
impl Connected {
    /// A connection to a loopback listener that goes away at once (nothing is sent on it),
    /// made `born` ago and authenticated `checked` ago, to a target that needs `ROLE` with
    /// `confirm_master`: for the checks on a connection's age and target.
    pub async fn on_loopback(born: Duration, checked: Duration, confirm_master: bool) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stream = TcpStream::connect(addr).await.unwrap();
        let now = Instant::now();
        let ago = |d| now.checked_sub(d).expect("a clock older than two minutes");
        Connected {
            stream: Stream::Plain(stream),
            addr,
            target: Target {
                confirm_master,
                ..Target::at(addr.to_string().parse().unwrap())
            },
            reused: true,
            authenticated: ago(checked),
            born: ago(born),
        }
    }
}

/// Why [`establish`] failed: no target known, the connection, or the handshake on it.
#[derive(Debug, Error)]
pub enum EstablishError {
    /// Discovery has no target (SRV or Sentinel never answered).
    #[error("{0}")]
    Discovery(String),
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
}

/// The one path from a target and the current credentials to an authenticated upstream
/// connection: connect (and TLS) within `connect_timeout`, then the profile's handshake
/// within `handshake_timeout` (none in TCP mode). Sessions, the probe and `--check` all come through here.
pub async fn establish(
    upstream: &Upstream,
    target: &Target,
    credentials: &Credentials,
    settings: &Handshake,
) -> Result<Connected, EstablishError> {
    let (mut stream, addr) = connect(&upstream.reach(), target).await?;
    if upstream.protocol == Protocol::Tcp {
        return Ok(Connected {
            stream,
            addr,
            target: target.clone(),
            reused: false,
            authenticated: Instant::now(),
            born: Instant::now(),
        });
    }
    let checked = handshake::run(
        &mut stream,
        credentials,
        settings,
        target.confirm_master,
        upstream.handshake_timeout,
    )
    .await;
    if let Err(HandshakeError::NotMaster { .. }) = &checked {
        upstream.discovery.recheck();
    }
    checked?;
    Ok(Connected {
        stream,
        addr,
        target: target.clone(),
        reused: false,
        authenticated: Instant::now(),
        born: Instant::now(),
    })
}

/// [`establish`] to discovery's current candidates, best first, until one succeeds. Refused
/// credentials end the search: every candidate would refuse them too.
pub async fn open(
    upstream: &Upstream,
    credentials: &Credentials,
    settings: &Handshake,
) -> Result<Connected, EstablishError> {
    let candidates = upstream
        .discovery
        .candidates(&upstream.resolver)
        .await
        .map_err(EstablishError::Discovery)?;
    let mut last = EstablishError::Discovery("discovery found no target".to_owned());
    for target in &candidates {
        match establish(upstream, target, credentials, settings).await {
            Ok(connected) => return Ok(connected),
            Err(e @ EstablishError::Handshake(HandshakeError::AuthRejected { .. })) => {
                return Err(e)
            }
            Err(e) => {
                if target.confirm_master {
                    // Sentinel's master is unreachable: ask the sentinels now, not at the
                    // next poll (they coalesce: at most one question waits).
                    upstream.discovery.recheck();
                }
                if candidates.len() > 1 {
                    tracing::debug!(upstream = %target, error = %e, "candidate unavailable; trying the next");
                }
                last = e;
            }
        }
    }
    Err(last)
}

async fn handshake(
    tls: &Tls,
    target: &Target,
    tcp: TcpStream,
    addr: SocketAddr,
) -> Result<TlsStream<TcpStream>, ConnectError> {
    let stream = TlsConnector::from(tls.client_config())
        .connect(tls.name_for(target), tcp)
        .await
        .map_err(|e| ConnectError::Tls {
            address: addr,
            failure: tls::classify_handshake(&e),
        })?;
    let conn = stream.get_ref().1;
    tracing::debug!(
        upstream = %addr,
        version = ?conn.protocol_version(),
        kind = ?conn.handshake_kind(),
        "TLS established"
    );
    Ok(stream)
}

async fn connect_tcp(
    reach: &Reach<'_>,
    target: &HostPort,
) -> Result<(TcpStream, SocketAddr), ConnectError> {
    let address = target.to_string();
    let dead_peer = reach.dead_peer;
    let resolved =
        reach
            .resolver
            .resolve(target)
            .await
            .map_err(|reason| ConnectError::Resolve {
                address: address.clone(),
                reason,
            })?;
    let mut last = None;
    for addr in resolved {
        match TcpStream::connect(addr).await {
            Ok(stream) => {
                // Small replies must not wait for Nagle: the client is latency-bound.
                let _ = stream.set_nodelay(true);
                if let Err(e) = dead_peer.apply(&stream) {
                    tracing::warn!(upstream = %addr, error = %e, "cannot set keepalive or TCP_USER_TIMEOUT");
                }
                return Ok((stream, addr));
            }
            Err(e) => {
                last = Some(ConnectError::Connect {
                    address: if address == addr.to_string() {
                        address.clone()
                    } else {
                        format!("{address} ({addr})")
                    },
                    reason: reason(&e),
                })
            }
        }
    }
    Err(last.unwrap_or_else(|| ConnectError::Resolve {
        address: address.clone(),
        reason: "no addresses".to_owned(),
    }))
}
