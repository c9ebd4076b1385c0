//! The accept loop: TCP or unix socket, the client limit, a span per connection.

use std::future::Future;
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;

use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::config::ListenAddress;
use crate::dead_peer::DeadPeer;
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
    /// Binds `address`. At a unix socket's path, only a stale socket (a socket file that
    /// nobody accepts connections on, left by an earlier run) is replaced.
    pub async fn bind(address: &ListenAddress) -> Result<Listener, BindError> {
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
                remove_stale_socket(path)?;
                Ok(Listener::Unix(UnixListener::bind(path)?))
            }
        }
    }

    /// Sets `TCP_NODELAY` and `dead_peer`'s keepalive on the listening socket. On Linux an
    /// accepted socket starts with its listener's TCP options, so they cost no system call
    /// per client (five before: a tenth of what a connection-per-request client costs the
    /// ambassador). Returns false where they must be set on each client instead.
    fn set_client_options(&self, dead_peer: &DeadPeer) -> bool {
        let Listener::Tcp(l) = self else {
            return true;
        };
        if !cfg!(target_os = "linux") {
            return false;
        }
        let set = socket2::SockRef::from(l)
            .set_tcp_nodelay(true)
            .and_then(|()| dead_peer.apply(l));
        if let Err(e) = &set {
            tracing::debug!(error = %e, "cannot set TCP options on the listener: set per client");
        }
        set.is_ok()
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

/// Why the listener could not be bound.
#[derive(Debug, Error)]
pub enum BindError {
    /// Something other than a stale socket is at the unix socket's path.
    #[error("{} is {what}; refusing to replace it", path.display())]
    PathTaken { path: PathBuf, what: &'static str },
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Removes a socket file at `path` that nobody listens on; refuses anything else there (a
/// file, a folder, a link, a socket that accepts connections), which is someone's data or a
/// running process, not debris of an earlier run.
fn remove_stale_socket(path: &Path) -> Result<(), BindError> {
    let taken = |what| BindError::PathTaken {
        path: path.to_owned(),
        what,
    };
    let kind = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta.file_type(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    if kind.is_file() {
        return Err(taken("a regular file"));
    }
    if kind.is_dir() {
        return Err(taken("a folder"));
    }
    if !kind.is_socket() {
        return Err(taken("not a socket (a link, a pipe or a device)"));
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(taken("a live socket (something accepts connections on it)")),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            std::fs::remove_file(path)?;
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// Refused clients (over `max_clients`) that may linger at once, each holding a task and a
/// descriptor for up to [`LINGER`](crate::relay::LINGER) so that it reads its error before
/// the close. Beyond them a refused client gets the error in one non-blocking write and an
/// immediate close: uncapped, a burst of 3000 refused clients took the process from 15 to
/// 3025 open descriptors, and a larger one ran it out of descriptors for everyone.
pub const LINGERING_REFUSALS: usize = 64;

/// Waits after an `accept()` that failed for lack of resources (EMFILE, ENFILE, ENOBUFS):
/// the first, doubling up to the last while the failures go on. The pending connections stay
/// in the kernel's queue meanwhile.
const ACCEPT_BACKOFF: (Duration, Duration) = (Duration::from_millis(10), Duration::from_secs(1));

/// Accepts until `stop` fires. Each session runs in `tracker`; `kill` ends those still open
/// when the drain time is over. TCP clients get `dead_peer`'s keepalive.
pub async fn accept_loop(
    listener: Listener,
    shared: Arc<Shared>,
    max_clients: usize,
    dead_peer: DeadPeer,
    stop: CancellationToken,
    tracker: &TaskTracker,
    kill: CancellationToken,
) {
    // One permit per open session; the session's task holds it and dropping it frees a slot.
    let slots = Arc::new(Semaphore::new(max_clients));
    // One permit per lingering refusal, held by its task likewise.
    let lingering = Arc::new(Semaphore::new(LINGERING_REFUSALS));
    let mut failures = AcceptFailures::default();
    let per_client = !listener.set_client_options(&dead_peer);
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            a = accept(&listener, per_client.then_some(&dead_peer)) => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => {
                failures.recovered();
                a
            }
            // The client gave up while it waited in the queue: nothing is wrong here.
            Err(e) if is_per_connection(&e) => {
                tracing::debug!(error = %e, "accept: client left first");
                continue;
            }
            Err(e) => {
                let wait = failures.failed(&e);
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(wait) => continue,
                }
            }
        };
        let span = tracing::info_span!("session", client = %peer);
        shared.relay.metrics.clients_total.inc();
        let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
            shared.relay.metrics.refused("max_clients");
            refuse_over_limit(stream, &lingering, tracker, max_clients, span);
            continue;
        };
        let metrics = Arc::clone(&shared.relay.metrics);
        // Made here, so that the task keeps the boxed session rather than room for the stream
        // and what makes it (every idle session holds this task).
        let session = serve(stream, Arc::clone(&shared));
        let kill = kill.clone();
        tracker.spawn(
            async move {
                metrics.clients_active.inc();
                tokio::select! {
                    _ = kill.cancelled() => tracing::info!(reason = "Shutdown", "session closed"),
                    _ = crate::task::catching("session", &metrics, session) => {}
                }
                metrics.clients_active.dec();
                // Held to the end: the session's slot under max_clients.
                drop(permit);
            }
            .instrument(span),
        );
    }
}

/// Tells a client over `max_clients` so: lingering while fewer than [`LINGERING_REFUSALS`]
/// do, at once otherwise.
fn refuse_over_limit(
    stream: Stream,
    lingering: &Arc<Semaphore>,
    tracker: &TaskTracker,
    max_clients: usize,
    span: tracing::Span,
) {
    let Ok(permit) = Arc::clone(lingering).try_acquire_owned() else {
        span.in_scope(|| {
            tracing::debug!(
                max_clients,
                "refused at once: max number of clients reached"
            )
        });
        stream.refuse_now(MAX_CLIENTS);
        return;
    };
    tracker.spawn(
        async move {
            let _permit = permit;
            tracing::warn!(max_clients, "refused: max number of clients reached");
            match stream {
                Stream::Tcp(mut s) => session::refuse(&mut s, MAX_CLIENTS).await,
                Stream::Unix(mut s) => session::refuse(&mut s, MAX_CLIENTS).await,
            }
        }
        .instrument(span),
    );
}

/// Errors of one queued connection (reset before it was accepted), not of the listener.
fn is_per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
    )
}

/// A run of failed accepts: how long to wait, and one log line at its start and end rather
/// than one per attempt.
#[derive(Default)]
struct AcceptFailures {
    count: u64,
    wait: Duration,
}

impl AcceptFailures {
    fn failed(&mut self, e: &io::Error) -> Duration {
        if self.count == 0 {
            tracing::warn!(error = %e, "accept failed; backing off until it works again (new clients wait in the queue)");
            self.wait = ACCEPT_BACKOFF.0;
        } else {
            self.wait = (self.wait * 2).min(ACCEPT_BACKOFF.1);
        }
        self.count += 1;
        self.wait
    }

    fn recovered(&mut self) {
        if self.count > 0 {
            tracing::info!(failed_accepts = self.count, "accepting again");
            self.count = 0;
        }
    }
}

enum Stream {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

impl Stream {
    /// Writes `reply` without waiting and closes. A new connection's send buffer is empty,
    /// so the write takes it whole; the socket leaves the runtime first, because the
    /// runtime's own non-blocking write waits for a readiness event it has not seen yet.
    fn refuse_now(self, reply: &[u8]) {
        use std::io::Write;
        let _ = match self {
            Stream::Tcp(s) => s.into_std().and_then(|mut s| s.write(reply)),
            Stream::Unix(s) => s.into_std().and_then(|mut s| s.write(reply)),
        };
    }
}

/// Accepts one client; `dead_peer`: the TCP options to set on it, unless it inherited them.
async fn accept(listener: &Listener, dead_peer: Option<&DeadPeer>) -> io::Result<(Stream, String)> {
    match listener {
        Listener::Tcp(l) => {
            let (s, peer) = l.accept().await?;
            if let Some(dead_peer) = dead_peer {
                let _ = s.set_nodelay(true);
                if let Err(e) = dead_peer.apply(&s) {
                    tracing::warn!(client = %peer, error = %e, "cannot set keepalive");
                }
            }
            Ok((Stream::Tcp(s), peer.to_string()))
        }
        Listener::Unix(l) => {
            let (s, _) = l.accept().await?;
            Ok((Stream::Unix(s), "unix".to_owned()))
        }
    }
}

/// The session's future, boxed: passed by value it would be held twice, and one future
/// with an arm per kind of socket would be as large as both (4 KiB each, not overlaid), on
/// every idle session.
fn serve(stream: Stream, shared: Arc<Shared>) -> Pin<Box<dyn Future<Output = ()> + Send>> {
    match stream {
        Stream::Tcp(s) => Box::pin(session::serve(s, shared)),
        Stream::Unix(s) => Box::pin(session::serve(s, shared)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the accept loop relies on to skip five system calls per client.
    #[tokio::test]
    async fn an_accepted_client_has_nodelay_and_keepalive_set_once_on_the_listener() {
        let listener = Listener::Tcp(TcpListener::bind("127.0.0.1:0").await.unwrap());
        let Listener::Tcp(l) = &listener else {
            unreachable!()
        };
        let addr = l.local_addr().unwrap();
        let dead_peer = DeadPeer::client(Duration::from_secs(7));
        let per_client = !listener.set_client_options(&dead_peer);
        assert!(!per_client, "Linux: set on the listener");
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (Stream::Tcp(accepted), _) = accept(&listener, None).await.unwrap() else {
            unreachable!()
        };
        let s = socket2::SockRef::from(&accepted);
        assert!(s.tcp_nodelay().unwrap());
        assert!(s.keepalive().unwrap());
        assert_eq!(s.tcp_keepalive_time().unwrap(), Duration::from_secs(7));
        assert_eq!(s.tcp_keepalive_interval().unwrap(), Duration::from_secs(7));
    }
}
