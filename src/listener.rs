//! The accept loop: TCP or unix socket, the client limit, a span per connection.

use std::io;
use std::sync::Arc;

use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::config::ListenAddress;
use crate::session::{self, Shared};

/// The listen backlog; the kernel caps it at net.core.somaxconn.
const BACKLOG: u32 = 4096;

pub const MAX_CLIENTS: &[u8] = b"-ERR max number of clients reached\r\n";

/// A bound listening socket. Binding is the caller's (main's, or a test's) business.
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    /// Binds `address`. A stale unix socket file left by an earlier run is replaced.
    pub async fn bind(address: &ListenAddress) -> io::Result<Listener> {
        match address {
            ListenAddress::Tcp(addr) => {
                // A deeper accept queue than the default 1024, so a burst of new clients (a
                // pool warming up) is not left half-open while the queue overflows.
                let socket = if addr.is_ipv4() {
                    tokio::net::TcpSocket::new_v4()?
                } else {
                    tokio::net::TcpSocket::new_v6()?
                };
                socket.set_reuseaddr(true)?;
                socket.bind(*addr)?;
                Ok(Listener::Tcp(socket.listen(BACKLOG)?))
            }
            ListenAddress::Unix(path) => {
                if std::os::unix::net::UnixStream::connect(path).is_err() {
                    let _ = std::fs::remove_file(path);
                }
                Ok(Listener::Unix(UnixListener::bind(path)?))
            }
        }
    }

    /// The address actually bound (the port, when 0 was asked for).
    pub fn local_address(&self) -> String {
        match self {
            Listener::Tcp(l) => l
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "?".into()),
            Listener::Unix(l) => l
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(|p| format!("unix:{}", p.display())))
                .unwrap_or_else(|| "unix:?".into()),
        }
    }
}

/// Accepts until `stop` fires. Each session runs in `tracker`; `kill` ends those still open
/// when the drain time is over.
pub async fn accept_loop(
    listener: Listener,
    shared: Arc<Shared>,
    max_clients: usize,
    stop: CancellationToken,
    tracker: &TaskTracker,
    kill: CancellationToken,
) {
    // One permit per open session; the session's task holds it and dropping it frees a slot.
    let slots = Arc::new(Semaphore::new(max_clients));
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            a = accept(&listener) => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and friends: the listener itself is fine; back off briefly.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let span = tracing::info_span!("session", client = %peer);
        let permit = Arc::clone(&slots).try_acquire_owned().ok();
        let shared = Arc::clone(&shared);
        let kill = kill.clone();
        shared.metrics.clients_total.inc();
        tracker.spawn(
            async move {
                let Some(_permit) = permit else {
                    tracing::warn!(max_clients, "refused: max number of clients reached");
                    shared.metrics.refused("max_clients");
                    let mut stream = stream;
                    match &mut stream {
                        Stream::Tcp(s) => session::refuse(s, MAX_CLIENTS).await,
                        Stream::Unix(s) => session::refuse(s, MAX_CLIENTS).await,
                    }
                    return;
                };
                let metrics = Arc::clone(&shared.metrics);
                metrics.clients_active.inc();
                tokio::select! {
                    _ = kill.cancelled() => tracing::info!(reason = "Shutdown", "session closed"),
                    _ = crate::task::catching("session", &metrics, serve(stream, shared)) => {}
                }
                metrics.clients_active.dec();
            }
            .instrument(span),
        );
    }
}

enum Stream {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

async fn accept(listener: &Listener) -> io::Result<(Stream, String)> {
    match listener {
        Listener::Tcp(l) => {
            let (s, peer) = l.accept().await?;
            let _ = s.set_nodelay(true);
            Ok((Stream::Tcp(s), peer.to_string()))
        }
        Listener::Unix(l) => {
            let (s, _) = l.accept().await?;
            Ok((Stream::Unix(s), "unix".to_owned()))
        }
    }
}

async fn serve(stream: Stream, shared: Arc<Shared>) {
    match stream {
        Stream::Tcp(s) => session::serve(s, shared).await,
        Stream::Unix(s) => session::serve(s, shared).await,
    }
}
