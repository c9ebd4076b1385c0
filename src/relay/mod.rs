//! Both directions of one session, after the handshake.
//!
//! Client -> upstream ([`requests`]): commands are framed ([`RequestFramer`]) and judged
//! ([`Filter`]); runs of forwarded commands go out as the bytes the client sent, rewrites go
//! out re-encoded.
//!
//! Upstream -> client ([`replies`]): bytes are relayed as they arrive, while a
//! [`ReplyFramer`](crate::resp::ReplyFramer) counts top-level replies so that what the
//! ambassador adds or removes lands in the right place: a local reply (`+OK` for an AUTH
//! before the client authenticated, `-NOAUTH`, a protocol error) goes out after the replies of
//! every command sent before it, and the replies to the ambassador's own AUTH (after a RESET,
//! or after a credential rotation) never reach the client.
//!
//! The client side tells the reply side what to expect through a queue of [`Expect`] items
//! ([`Expectations`]), always before it writes the bytes that cause those replies. The queue
//! holds at most one item per judged batch or special command, so it grows only with what the
//! client has already sent and the upstream has not yet answered.

mod frames;
mod moves;
mod replies;
mod requests;

pub use moves::Moves;
use moves::Rest;

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures_util::task::AtomicWaker;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::sync::{watch, Notify};

use crate::config::Handshake;
use crate::credentials::{Credentials, DownstreamPassword};
use crate::metrics::Metrics;
use crate::resp;

/// Read buffer size for each direction while data streams.
const CHUNK: usize = 64 * 1024;

/// Read buffer size for each direction while it is quiet: what an idle session holds.
const SMALL: usize = 1024;

/// A connection as the relay uses it: two halves borrowed from it, so that it is whole again
/// after the relay (to be reused) and, for a plain socket, with no lock or shared allocation
/// (both sides run in one task); the read half can wait for data before it has a buffer.
pub trait Halves: Send {
    type Read<'a>: AsyncRead + Readable + Unpin + Send
    where
        Self: 'a;
    type Write<'a>: AsyncWrite + Unpin + Send
    where
        Self: 'a;
    fn halves(&mut self) -> (Self::Read<'_>, Self::Write<'_>);
}

/// A read half that may be able to wait until a read would find data (or the end, or an
/// error) without reading.
pub trait Readable {
    /// Whether [`poll_read_ready`](Self::poll_read_ready) can: a TLS stream's plain socket
    /// may be quiet while decrypted data waits in the TLS session.
    fn can_wait(&self) -> bool {
        true
    }

    /// Ready once a read would find data (or the end, or an error). The waker goes where
    /// a read's would (tokio's `readable()` queues a waiter under a lock instead: measured,
    /// 5-8 % more CPU per request at pipeline 1).
    fn poll_read_ready(&self, cx: &mut std::task::Context<'_>) -> Poll<std::io::Result<()>>;
}

impl Halves for tokio::net::TcpStream {
    type Read<'a> = tokio::net::tcp::ReadHalf<'a>;
    type Write<'a> = tokio::net::tcp::WriteHalf<'a>;
    fn halves(&mut self) -> (Self::Read<'_>, Self::Write<'_>) {
        self.split()
    }
}

impl Readable for tokio::net::tcp::ReadHalf<'_> {
    fn poll_read_ready(&self, cx: &mut std::task::Context<'_>) -> Poll<std::io::Result<()>> {
        self.as_ref().poll_read_ready(cx)
    }
}

impl Halves for tokio::net::UnixStream {
    type Read<'a> = tokio::net::unix::ReadHalf<'a>;
    type Write<'a> = tokio::net::unix::WriteHalf<'a>;
    fn halves(&mut self) -> (Self::Read<'_>, Self::Write<'_>) {
        self.split()
    }
}

impl Readable for tokio::net::unix::ReadHalf<'_> {
    fn poll_read_ready(&self, cx: &mut std::task::Context<'_>) -> Poll<std::io::Result<()>> {
        self.as_ref().poll_read_ready(cx)
    }
}

/// How much one side reads next. An idle session waits with a [`SMALL`] buffer on each side,
/// not two of [`CHUNK`] (of which the allocator touched two pages each: 17 KiB of RSS per idle
/// session). A read that fills the buffer asks for [`CHUNK`] next; once a read left room (the
/// socket was drained) and its bytes are used up, the side goes back to [`SMALL`].
#[derive(Default)]
struct Sizing {
    streaming: bool,
    /// Free space when the last read started.
    room: usize,
}

impl Sizing {
    /// Between two bursts: nothing left to use, the last read drained the socket. A side
    /// that can wait for data without a buffer ([`Readable`]) holds none now.
    fn quiet(&self, buf: &BytesMut) -> bool {
        buf.is_empty() && !self.streaming
    }

    /// Reads from `from` into `buf`. A side that can wait for data first holds no buffer
    /// while it is quiet (an idle session's sides cost no memory), and takes one once data
    /// is there.
    async fn read_when_ready<R>(
        &mut self,
        from: &mut R,
        buf: &mut BytesMut,
    ) -> std::io::Result<usize>
    where
        R: AsyncRead + Readable + Unpin,
    {
        if self.quiet(buf) && from.can_wait() {
            *buf = BytesMut::new();
            std::future::poll_fn(|cx| from.poll_read_ready(cx)).await?;
        }
        self.prepare(buf);
        from.read_buf(buf).await
    }

    /// Makes room in `buf` for the next read.
    fn prepare(&mut self, buf: &mut BytesMut) {
        if self.quiet(buf) && buf.capacity() > SMALL {
            *buf = BytesMut::with_capacity(SMALL);
        }
        buf.reserve(if self.streaming { CHUNK } else { SMALL });
        self.room = buf.capacity() - buf.len();
    }

    /// A read into the room [`prepare`](Self::prepare) made returned `n` bytes.
    fn read(&mut self, n: usize) {
        self.streaming = n >= self.room;
    }
}

/// How long a client gets to read an error reply before its connection is closed.
pub const LINGER: Duration = Duration::from_secs(1);

/// How long Redis gets to answer and close after it was handed a client's malformed bytes.
const PROTOCOL_ERROR_GRACE: Duration = Duration::from_secs(5);

pub const AUTH_FAILED: &[u8] = b"-ERR ambassador: upstream authentication failed\r\n";

/// What the session needs to rewrite commands and re-authenticate.
pub struct Context {
    /// The credentials in use; a change re-authenticates the session when allowed.
    pub credentials: watch::Receiver<Arc<Credentials>>,
    pub settings: Arc<Settings>,
    /// Discovery's view of this session's upstream: when it is no longer the target, the
    /// session ends at an idle point. `None`: the upstream never moves. Boxed: most
    /// sessions have none, and every idle session holds its context.
    pub moves: Option<Box<Moves>>,
}

/// What every session's relay reads and none changes: built once at start, shared.
pub struct Settings {
    pub reauth_open_sessions: bool,
    /// Re-authenticate every this long, whatever the credentials (`credentials.max_session_age`).
    pub max_session_age: Option<Duration>,
    pub handshake: Handshake,
    pub downstream_password: Option<Arc<DownstreamPassword>>,
    pub idle_timeout: Option<Duration>,
    pub metrics: Arc<Metrics>,
    /// `upstream.reuse`: a client that leaves at an idle point leaves its upstream
    /// connection open, and [`run`] hands it back.
    pub reuse: bool,
}

/// Why a session ended, for the closing log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Close {
    /// The client closed its connection.
    ClientClosed,
    /// The upstream closed (QUIT, CLIENT KILL, timeout, restart).
    UpstreamClosed,
    /// The client sent something that is not RESP.
    ProtocolError,
    /// A local reply ended the connection (QUIT before authenticating).
    Local,
    /// Re-authentication after a RESET was refused.
    ReauthFailed,
    /// Nothing moved either way for `listen.idle_timeout`.
    Idle,
    /// The upstream is no longer the target: closed at an idle point.
    Moved,
    /// The upstream is no longer the target, and the session was still busy at the end of
    /// `upstream.move_grace`.
    MovedBusy,
    /// A failover demoted the upstream: nothing more was forwarded to it, the replies due
    /// were relayed, then the session closed.
    FailedOver,
    /// The master answered `-READONLY`: it was demoted. The reply was not relayed; the
    /// client reconnects to the new master.
    ReadOnly,
}

#[derive(Debug, Error)]
pub enum RelayError {
    /// Peer I/O: a reset or broken connection, on either side.
    #[error("{side} I/O: {source}")]
    Io {
        side: &'static str,
        source: std::io::Error,
    },
    #[error("upstream sent a malformed reply: {0}")]
    Upstream(#[from] resp::ReplyError),
}

fn io_err(side: &'static str) -> impl FnOnce(std::io::Error) -> RelayError {
    move |source| RelayError::Io { side, source }
}

/// Byte counts of a finished session.
#[derive(Debug, Default, Clone, Copy)]
pub struct Traffic {
    pub from_client: u64,
    pub to_client: u64,
}

/// What the reply side is told, in command order.
#[derive(Debug)]
enum Expect {
    /// The next `n` replies are the upstream's answers to forwarded commands.
    Replies(u64),
    /// From here on replies cannot be counted until a RESET: only for `CLIENT REPLY` queued
    /// in MULTI, after which Redis itself sends an EXEC array shorter than its header says.
    Untracked,
    /// A pub/sub (un)subscription: its success is confirmed by `confirms` frames (pushes,
    /// or RESP2 arrays), `channels` of them (0: an unknown number, at least one), and adds
    /// no reply; its failure is one error reply. `replied` is false under CLIENT REPLY
    /// OFF/SKIP, when the error is silenced (confirmations are not).
    Subscribe {
        confirms: &'static [u8],
        channels: u64,
        replied: bool,
    },
    /// After the replies before it, the session may be subscribed (EXEC of a MULTI that
    /// queued a subscription): RESP2 pub/sub messages are told from replies from here on.
    MaybeSubscribed,
    /// MONITOR: one reply; a `+OK` turns on the MONITOR feed, whose lines are told from
    /// replies from then on. Unreplied (CLIENT REPLY OFF/SKIP): the feed starts here.
    Monitor { replied: bool },
    /// The next reply is RESET's (none when a CLIENT REPLY SKIP ate it); the replies to the
    /// re-authentication `handshake` sent after it are swallowed; a refusal among them ends
    /// the session.
    Reset {
        replied: bool,
        handshake: Vec<&'static str>,
    },
    /// The next `n` replies answer the ambassador's own commands (re-authentication after a
    /// credential change) and are swallowed; a refusal is logged, the session goes on.
    Swallow(usize),
    /// A reply the ambassador makes itself, written once everything before it was relayed.
    Local(&'static [u8]),
    /// A local reply followed by closing the client, for this reason.
    LocalThenClose(Vec<u8>, Close),
    /// Once every reply before it was relayed, the session ends (after QUIT's `+OK`, which
    /// Redis follows with a close anyway).
    Close(Close),
    /// Replication: from here on both directions are opaque bytes.
    Opaque,
}

impl Expect {
    /// Answered by the ambassador itself, so not held back by the upstream's pace: these
    /// are the items bounded by [`MAX_LOCAL_BACKLOG`].
    fn is_local(&self) -> bool {
        matches!(self, Expect::Local(_) | Expect::LocalThenClose(..))
    }
}

/// Local replies not yet written to the client, at most. A client that sends without reading
/// (an unauthenticated one answered `-NOAUTH` for every command, say) stops being read
/// beyond this, as relayed commands stop once the upstream's socket is full.
const MAX_LOCAL_BACKLOG: usize = 1024;

/// The [`Expect`] items on their way from the client side to the reply side.
///
/// Both sides run in the session's one task, so the lock is never contended. The reply side
/// takes every item before it relays upstream bytes, and a count of replies has nothing to do
/// until those replies arrive: only the other items wake it. (A channel woke the task once
/// more for every request, each wake a wasted poll of the whole session.)
#[derive(Default)]
struct Expectations {
    queue: Mutex<VecDeque<Expect>>,
    /// Set with each item that must wake the reply side; `waker` is the reply side's. (A
    /// `Notify` registered and removed a waiter under its lock on every reply read.)
    woken: AtomicBool,
    waker: AtomicWaker,
    /// Local replies pushed and not yet written; the client side waits on `room` when full.
    locals: AtomicUsize,
    room: Notify,
    /// Where each side stands between two reads, for a move ([`moves`]).
    rest: Rest,
}

impl Expectations {
    fn push(&self, e: Expect) {
        let wake = !matches!(e, Expect::Replies(_));
        if e.is_local() {
            self.locals.fetch_add(1, Ordering::Relaxed);
        }
        self.lock().push_back(e);
        if wake {
            self.woken.store(true, Ordering::Release);
            self.waker.wake();
        }
    }

    /// Completes once an item that wakes the reply side was pushed since the last time.
    async fn pushed(&self) {
        std::future::poll_fn(|cx| {
            if self.woken.swap(false, Ordering::Acquire) {
                return Poll::Ready(());
            }
            self.waker.register(cx.waker());
            // Pushed between the check and the registration: its wake found no waker.
            if self.woken.swap(false, Ordering::Acquire) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await
    }

    /// Moves every item pushed so far to the end of `into`.
    fn take_into(&self, into: &mut VecDeque<Expect>) {
        into.append(&mut self.lock());
    }

    /// The reply side is done with `e`.
    fn retire(&self, e: &Expect) {
        if e.is_local() && self.locals.fetch_sub(1, Ordering::Relaxed) <= MAX_LOCAL_BACKLOG {
            // A stored permit when nobody waits: the next wait returns at once and re-checks.
            self.room.notify_one();
        }
    }

    /// Completes once fewer than [`MAX_LOCAL_BACKLOG`] local replies wait to be written.
    async fn room(&self) {
        while self.locals.load(Ordering::Relaxed) >= MAX_LOCAL_BACKLOG {
            self.room.notified().await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Expect>> {
        // A VecDeque push or append cannot leave it half-changed.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// When a byte last moved, for the idle timeout: milliseconds since the session started.
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
    /// Without an idle timeout nothing reads the clock, so nothing is recorded: two clock
    /// reads per request are a measurable share of the relay's own CPU.
    watched: bool,
}

impl Activity {
    fn touch(&self) {
        if self.watched {
            self.last_ms
                .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
        }
    }

    /// Completes once nothing moved for `limit`.
    async fn idle_for(&self, limit: Duration) {
        loop {
            let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let quiet = self.start.elapsed().saturating_sub(last);
            if quiet >= limit {
                return;
            }
            tokio::time::sleep(limit - quiet).await;
        }
    }
}

/// What the upstream connection a client left can do next ([`Settings::reuse`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reuse {
    /// Nothing: the client did not leave at an idle point, or sent something RESET cannot
    /// undo. The connection closes.
    No = 0,
    /// Serve another client once RESET and authenticated again: the client changed its
    /// state (SELECT, CLIENT SETNAME, WATCH, ...), in ways RESET undoes.
    AfterReset = 1,
    /// Serve another client as it is: nothing the client sent changed the connection's
    /// state, which is still what the handshake left.
    AsItIs = 2,
}

/// How a session ended.
pub struct Ended {
    pub result: Result<Close, RelayError>,
    pub traffic: Traffic,
    /// What the upstream connection can do next: open, every reply relayed, when the client
    /// left it at an idle point with [`Settings::reuse`].
    pub reusable: Reuse,
}

/// Relays between `client` and `upstream` until one side ends. `pending` holds client bytes
/// read before the relay started. Both connections are borrowed (owned, they would be kept
/// twice in this future: as arguments and as bindings).
pub async fn run<C, U>(client: &mut C, upstream: &mut U, ctx: &Context, pending: BytesMut) -> Ended
where
    C: Halves,
    U: Halves,
{
    let (client_read, client_write) = client.halves();
    // Lent to the two sides, so that the connection is whole again after them.
    let (upstream_read, upstream_write) = upstream.halves();
    let expectations = Expectations::default();
    let from_client = AtomicU64::new(0);
    let to_client = AtomicU64::new(0);
    let activity = Activity {
        start: Instant::now(),
        last_ms: AtomicU64::new(0),
        watched: ctx.settings.idle_timeout.is_some(),
    };

    // The two sides hold the connections' halves until this block ends.
    let result = {
        // This future is what every session, idle or not, holds (RSS per idle client,
        // tests/load.rs), so nothing in it is kept twice: each side's state is a local its
        // future borrows (a future that owns it keeps it twice, as an argument and as a
        // binding), and each future is made in its pinned place (a future bound to a name
        // and then pinned keeps the name's slot to the end of the block).
        let mut request_side = requests::Requests::new(
            client_read,
            upstream_write,
            &expectations,
            ctx,
            pending,
            &from_client,
            &activity,
        );
        let mut reply_side = replies::ReplyPump::new(
            upstream_read,
            client_write,
            &expectations,
            ctx,
            &to_client,
            &activity,
        );
        let requests = std::pin::pin!(request_side.run());
        let replies = std::pin::pin!(reply_side.run());
        // The idle timeout and the mover hold a timer each: on the heap, and only when
        // configured (`pending()` has no size, so its box allocates nothing).
        let idle: Rare<'_, ()> = match ctx.settings.idle_timeout {
            Some(limit) => Box::pin(activity.idle_for(limit)),
            None => Box::pin(std::future::pending()),
        };
        let moving: Rare<'_, moves::Moved> = match &ctx.moves {
            Some(m) => Box::pin(moves::moved(m, &expectations)),
            None => Box::pin(std::future::pending()),
        };
        relay_until_end(requests, replies, idle, moving, &expectations).await
    };
    if let (Ok(close), Some(m)) = (&result, &ctx.moves) {
        m.closed(*close, &ctx.settings.metrics);
    }
    let traffic = Traffic {
        from_client: from_client.load(Ordering::Relaxed),
        to_client: to_client.load(Ordering::Relaxed),
    };
    // Both sides are dropped by now: the reply side was waiting to read, with nothing owed.
    let reusable = match result {
        Ok(Close::ClientClosed) => expectations.rest.left_for(),
        _ => Reuse::No,
    };
    Ended {
        result,
        traffic,
        reusable,
    }
}

/// A future a session rarely needs, boxed: inline it would enlarge every session's future,
/// which is most of what an idle session holds (RSS per idle client, tests/load.rs).
type Rare<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Runs both sides, the idle timeout and the mover until the session ends. What it waits on
/// after one of them ended is boxed (see [`Rare`]).
async fn relay_until_end(
    mut requests: Pin<&mut impl Future<Output = Result<Close, RelayError>>>,
    mut replies: Pin<&mut impl Future<Output = Result<Close, RelayError>>>,
    mut idle: Rare<'_, ()>,
    mut moving: Rare<'_, moves::Moved>,
    expectations: &Expectations,
) -> Result<Close, RelayError> {
    tokio::select! {
        // The mover last: when it looks, both sides have just found nothing to read.
        biased;
        r = &mut replies => {
            // The client side may be draining the client's input after an error: let the
            // client read what it was sent before its socket closes.
            let _ = Box::pin(tokio::time::timeout(LINGER, &mut requests)).await;
            r
        }
        r = &mut requests => match r {
            // The client left at an idle point: nothing more will come from the upstream.
            Ok(Close::ClientClosed) if expectations.rest.left_idle() => Ok(Close::ClientClosed),
            // The client is done sending. After a half-close the upstream answers what it
            // has read and closes, as it would for the client itself.
            Ok(Close::ClientClosed) => tokio::select! {
                r = &mut replies => r.map(|_| Close::ClientClosed),
                _ = &mut idle => Ok(Close::Idle),
            },
            // Redis was handed the bad bytes: it answers its error and closes.
            Ok(Close::ProtocolError) => Box::pin(tokio::time::timeout(PROTOCOL_ERROR_GRACE, &mut replies))
                .await
                .unwrap_or(Ok(Close::ProtocolError))
                .map(|_| Close::ProtocolError),
            Ok(_) => replies.await,
            Err(e) => Err(e),
        },
        _ = &mut idle => Ok(Close::Idle),
        how = &mut moving => match how {
            moves::Moved::Halt => {
                // Failover: the client is no longer read; the replies it is owed come.
                Box::pin(moves::finish(&mut replies, expectations)).await
            }
            moves::Moved::Now(close) => Ok(close),
        },
    }
}

/// Reads and discards what a client still sends, until it closes or [`LINGER`] runs out.
/// Closing a socket with unread input makes the kernel send RST, which can destroy a reply
/// the client has not read yet.
pub async fn drain<R: AsyncRead + Unpin>(client: &mut R) {
    // On the heap: an array here would enlarge every session's future, idle or not.
    let mut sink = vec![0u8; 4096];
    let _ = tokio::time::timeout(LINGER, async {
        while matches!(client.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;

    #[test]
    fn only_items_that_need_the_reply_side_wake_it_and_each_wakes_it_once() {
        let e = Expectations::default();
        assert!(e.pushed().now_or_never().is_none(), "nothing pushed");
        e.push(Expect::Replies(3));
        assert!(
            e.pushed().now_or_never().is_none(),
            "a count waits for its replies"
        );
        e.push(Expect::Local(b"+OK\r\n"));
        assert!(e.pushed().now_or_never().is_some());
        assert!(e.pushed().now_or_never().is_none(), "one push, one wake");
    }

    #[tokio::test]
    async fn a_quiet_client_side_waits_for_data_without_a_buffer() {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (mut accepted, _) = listener.accept().await.unwrap();
        let (mut from, _) = accepted.halves();
        let mut s = Sizing::default();
        let mut buf = BytesMut::new();
        let ping = b"*1\r\n$4\r\nPING\r\n";
        for _ in 0..2 {
            client.write_all(ping).await.unwrap();
            let n = s.read_when_ready(&mut from, &mut buf).await.unwrap();
            assert_eq!(&buf[..n], ping);
            buf.clear();
            // Used up, nothing more sent: the wait holds no buffer.
            assert!(s
                .read_when_ready(&mut from, &mut buf)
                .now_or_never()
                .is_none());
            assert_eq!(buf.capacity(), 0, "nothing to read: no buffer held");
        }
    }

    #[test]
    fn a_quiet_side_reads_small_a_busy_one_in_chunks_and_goes_back() {
        let mut s = Sizing::default();
        let mut buf = BytesMut::new();
        s.prepare(&mut buf);
        assert_eq!(
            buf.capacity(),
            SMALL,
            "an idle side waits with a small buffer"
        );
        // A read that fills the room: more is waiting, the next read is a chunk.
        buf.extend_from_slice(&[b'x'; SMALL]);
        s.read(SMALL);
        buf.clear();
        s.prepare(&mut buf);
        assert!(buf.capacity() >= CHUNK);
        // A short read: the socket was drained. While its bytes are in use the buffer stays.
        buf.extend_from_slice(b"*1\r\n");
        s.read(4);
        s.prepare(&mut buf);
        assert!(
            buf.capacity() >= CHUNK,
            "bytes still unused keep their buffer"
        );
        // Used up: back to small.
        buf.clear();
        s.prepare(&mut buf);
        assert_eq!(buf.capacity(), SMALL);
    }
}
