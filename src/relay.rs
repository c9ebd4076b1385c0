//! Both directions of one session, after the handshake.
//!
//! Client -> upstream: commands are framed ([`RequestFramer`]) and judged ([`Filter`]); runs of
//! forwarded commands go out as the bytes the client sent, rewrites go out re-encoded.
//!
//! Upstream -> client: bytes are relayed as they arrive, while a [`ReplyFramer`] counts
//! top-level replies so that what the ambassador adds or removes lands in the right place:
//! a local reply (`+OK` for an AUTH before the client authenticated, `-NOAUTH`, a protocol
//! error) goes out after the replies of every command sent before it, and the replies to the
//! re-authentication after a RESET never reach the client.
//!
//! The client side tells the reply side what to expect through an unbounded channel of
//! [`Expect`] items, always before it writes the bytes that cause those replies. The channel
//! holds at most one item per framed command or batch, so it grows only with what the client
//! has already sent and the upstream has not yet answered.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::config::Handshake;
use crate::credentials::{Credentials, DownstreamPassword, SecretBytes};
use crate::filter::{self, Action, Filter, HelloPart, Replies};
use crate::handshake;
use crate::resp::{self, Boundary, ProtocolError, ReplyFramer, Request, RequestFramer};

/// Read buffer size for each direction.
const CHUNK: usize = 64 * 1024;

pub const AUTH_FAILED: &[u8] = b"-ERR ambassador: upstream authentication failed\r\n";

/// What the session needs to rewrite commands and re-authenticate.
pub struct Context {
    pub credentials: Arc<Credentials>,
    pub handshake: Handshake,
    pub downstream_password: Option<Arc<DownstreamPassword>>,
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
    /// The ambassador is shutting down.
    Shutdown,
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
    /// From here on replies cannot be counted (pub/sub, MONITOR, CLIENT REPLY) until a RESET.
    Untracked,
    /// The next reply is RESET's (or, untracked, the next `+RESET`); the `n` after it answer the
    /// re-authentication and are swallowed.
    Reset(usize),
    /// A reply the ambassador makes itself, written once everything before it was relayed.
    Local(&'static [u8]),
    /// A local reply followed by closing the client.
    LocalThenClose(Vec<u8>),
    /// Replication: from here on both directions are opaque bytes.
    Opaque,
}

fn io_err(side: &'static str) -> impl FnOnce(std::io::Error) -> RelayError {
    move |source| RelayError::Io { side, source }
}

/// How long a client gets to read an error reply before its connection is closed.
pub const LINGER: Duration = Duration::from_secs(1);

/// Relays between `client` and `upstream` until one side ends. `pending` holds client bytes
/// read before the relay started.
pub async fn run<C, U>(
    client: C,
    upstream: U,
    ctx: &Context,
    pending: BytesMut,
) -> (Result<Close, RelayError>, Traffic)
where
    C: AsyncRead + AsyncWrite + Send,
    U: AsyncRead + AsyncWrite + Send,
{
    let (client_read, client_write) = tokio::io::split(client);
    let (upstream_read, upstream_write) = tokio::io::split(upstream);
    let (tx, rx) = mpsc::unbounded_channel();
    let from_client = AtomicU64::new(0);
    let to_client = AtomicU64::new(0);

    let requests = Requests {
        client: client_read,
        upstream: upstream_write,
        tx,
        ctx,
        buf: pending,
        framer: RequestFramer::default(),
        filter: Filter::new(ctx.downstream_password.is_some()),
        stream_forwarded: true,
        read: &from_client,
    }
    .run();
    let replies = ReplyPump {
        upstream: upstream_read,
        client: client_write,
        rx,
        queue: VecDeque::new(),
        framer: ReplyFramer::default(),
        tracked: true,
        swallow: None,
        written: &to_client,
    }
    .run();
    tokio::pin!(requests, replies);
    let result = tokio::select! {
        r = &mut replies => {
            if matches!(r, Ok(Close::ProtocolError | Close::Local)) {
                // The client side is draining the client's input: let it read the error.
                let _ = tokio::time::timeout(LINGER, &mut requests).await;
            }
            r
        }
        r = &mut requests => match r {
            // The client is done sending. After a half-close the upstream answers what it
            // has read and closes, as it would for the client itself.
            Ok(Close::ClientClosed) => replies.await.map(|_| Close::ClientClosed),
            Ok(_) => replies.await,
            Err(e) => Err(e),
        },
    };
    let traffic = Traffic {
        from_client: from_client.load(Ordering::Relaxed),
        to_client: to_client.load(Ordering::Relaxed),
    };
    (result, traffic)
}

/// Reads and discards what a client still sends, until it closes or [`LINGER`] runs out.
/// Closing a socket with unread input makes the kernel send RST, which can destroy a reply
/// the client has not read yet.
pub async fn drain<R: AsyncRead + Unpin>(client: &mut R) {
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(LINGER, async {
        while matches!(client.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
}

/// The client -> upstream direction.
struct Requests<'c, R, W> {
    client: R,
    upstream: W,
    tx: mpsc::UnboundedSender<Expect>,
    ctx: &'c Context,
    buf: BytesMut,
    framer: RequestFramer,
    filter: Filter,
    /// Whether the command being streamed is forwarded (or dropped, before authentication).
    stream_forwarded: bool,
    read: &'c AtomicU64,
}

/// A batch being assembled from the front of the client buffer.
#[derive(Default)]
struct Batch {
    /// Bytes of the buffer already judged.
    done: usize,
    /// Start of the run of judged bytes that go upstream as they are.
    run_start: usize,
    /// Replies the run will produce.
    replies: u64,
}

impl<R, W> Requests<'_, R, W>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    /// Returns how the client side ended; `Local` means the reply side closes the client
    /// after a reply of the ambassador's own.
    async fn run(mut self) -> Result<Close, RelayError> {
        let end = self.pump().await;
        match end {
            Ok(Close::ClientClosed) => {
                // Half-close: Redis answers what it already read, then closes.
                let _ = self.upstream.shutdown().await;
            }
            Ok(Close::Local) => drain(&mut self.client).await,
            _ => {}
        }
        end
    }

    async fn pump(&mut self) -> Result<Close, RelayError> {
        loop {
            if let Some(end) = self.judge_buffer().await? {
                return Ok(end);
            }
            self.buf.reserve(CHUNK);
            let n = self
                .client
                .read_buf(&mut self.buf)
                .await
                .map_err(io_err("client"))?;
            if n == 0 {
                return Ok(Close::ClientClosed);
            }
            self.read.fetch_add(n as u64, Ordering::Relaxed);
        }
    }

    /// Frames and judges everything in the buffer, writing upstream as it goes. Returns
    /// `Some` when the client side is finished.
    async fn judge_buffer(&mut self) -> Result<Option<Close>, RelayError> {
        let mut b = Batch::default();
        let result = loop {
            let view = &self.buf[b.done..];
            let event = match self.framer.next(view, filter::needs_whole) {
                Ok(event) => event,
                Err(e) => break Some(self.protocol_error(&mut b, e)),
            };
            match event {
                Request::Incomplete => break None,
                Request::Ignored { len } => {
                    if self.filter.authenticated {
                        b.done += len;
                    } else {
                        self.skip(&mut b, len).await?;
                    }
                }
                Request::Command { len } | Request::StreamStart { len } => {
                    let cmd = self.framer.command(view);
                    let password = self.ctx.downstream_password.as_deref();
                    let action = self
                        .filter
                        .decide(&cmd, |p| password.is_some_and(|d| d.matches(p)));
                    // Rewrites are encoded now, while the arguments they keep are borrowed.
                    let step = Step::from_action(action, &self.ctx.credentials);
                    self.framer.authenticated = self.filter.authenticated;
                    if matches!(event, Request::StreamStart { .. }) {
                        self.stream_forwarded = matches!(step, Step::Forward(_));
                    }
                    if let Some(end) = self.act(&mut b, step, len).await? {
                        break Some(end);
                    }
                }
                Request::StreamMore { len } | Request::StreamEnd { len } => {
                    if self.stream_forwarded {
                        b.done += len;
                    } else {
                        self.skip(&mut b, len).await?;
                    }
                }
            }
        };
        self.flush(&mut b).await?;
        let _ = self.buf.split_to(b.done);
        Ok(result)
    }

    /// Applies the filter's decision to a command of `len` bytes at `b.done`.
    async fn act(
        &mut self,
        b: &mut Batch,
        step: Step,
        len: usize,
    ) -> Result<Option<Close>, RelayError> {
        match step {
            Step::Forward(Replies::One) => {
                b.done += len;
                b.replies += 1;
            }
            Step::Forward(Replies::Untracked) => {
                self.expect_run(b);
                self.expect(Expect::Untracked);
                b.done += len;
            }
            Step::Replace(with) => self.replace(b, len, &with).await?,
            Step::Reset => {
                b.done += len;
                self.expect_run(b);
                let reauth = handshake::commands(&self.ctx.credentials, &self.ctx.handshake);
                self.expect(Expect::Reset(reauth.names.len()));
                self.flush(b).await?;
                self.write(&reauth.bytes).await?;
            }
            Step::Quit => {
                b.done += len;
                b.replies += 1;
                // Nothing after QUIT is read; the upstream closes after its +OK.
                return Ok(Some(Close::UpstreamClosed));
            }
            Step::Replication => {
                b.done += len;
                self.expect_run(b);
                self.expect(Expect::Opaque);
                self.flush(b).await?;
                let rest = self.buf.split_off(b.done);
                self.buf.truncate(b.done);
                self.write(&rest).await?;
                let copied = tokio::io::copy(&mut self.client, &mut self.upstream)
                    .await
                    .map_err(io_err("client"))?;
                self.read.fetch_add(copied, Ordering::Relaxed);
                return Ok(Some(Close::ClientClosed));
            }
            Step::Answer(reply) => {
                self.expect_run(b);
                self.expect(Expect::Local(reply));
                self.skip(b, len).await?;
            }
            Step::AnswerAndClose(reply) => {
                self.expect_run(b);
                self.expect(Expect::LocalThenClose(reply.to_vec()));
                self.skip(b, len).await?;
                return Ok(Some(Close::Local));
            }
        }
        Ok(None)
    }

    fn protocol_error(&mut self, b: &mut Batch, e: ProtocolError) -> Close {
        tracing::debug!(error = %e, "client protocol error");
        self.expect_run(b);
        self.expect(Expect::LocalThenClose(e.reply()));
        Close::Local
    }

    fn expect(&self, e: Expect) {
        // The reply side only goes away when the session is ending anyway.
        let _ = self.tx.send(e);
    }

    /// Announces the replies of the run so far, before its bytes are written.
    fn expect_run(&self, b: &mut Batch) {
        if b.replies > 0 {
            self.expect(Expect::Replies(std::mem::take(&mut b.replies)));
        }
    }

    /// Writes the pending run upstream.
    async fn flush(&mut self, b: &mut Batch) -> Result<(), RelayError> {
        self.expect_run(b);
        if b.done > b.run_start {
            let (start, end) = (b.run_start, b.done);
            self.upstream
                .write_all(&self.buf[start..end])
                .await
                .map_err(io_err("upstream"))?;
            b.run_start = end;
        }
        Ok(())
    }

    /// Drops `len` bytes at `b.done` instead of forwarding them.
    async fn skip(&mut self, b: &mut Batch, len: usize) -> Result<(), RelayError> {
        self.flush(b).await?;
        b.done += len;
        b.run_start = b.done;
        Ok(())
    }

    /// Sends `with` instead of the `len` bytes at `b.done`; it produces one reply.
    async fn replace(&mut self, b: &mut Batch, len: usize, with: &[u8]) -> Result<(), RelayError> {
        self.skip(b, len).await?;
        self.expect(Expect::Replies(1));
        self.write(with).await
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<(), RelayError> {
        self.upstream
            .write_all(bytes)
            .await
            .map_err(io_err("upstream"))
    }
}

/// A filter decision with its rewrite encoded, so it no longer borrows the client's buffer.
enum Step {
    Forward(Replies),
    /// Send these bytes instead of the command; they produce one reply.
    Replace(SecretBytes),
    Reset,
    Quit,
    Replication,
    Answer(&'static [u8]),
    AnswerAndClose(&'static [u8]),
}

impl Step {
    fn from_action(action: Action<'_>, credentials: &Credentials) -> Step {
        match action {
            Action::Forward(r) => Step::Forward(r),
            Action::Auth => Step::Replace(credentials.auth_command()),
            Action::Hello(parts) => Step::Replace(hello_command(&parts, credentials)),
            Action::Reset => Step::Reset,
            Action::Quit => Step::Quit,
            Action::Replication => Step::Replication,
            Action::Answer(r) => Step::Answer(r),
            Action::AnswerAndClose(r) => Step::AnswerAndClose(r),
        }
    }
}

/// `HELLO` re-encoded with the profile's credentials in place of the client's.
fn hello_command(parts: &[HelloPart<'_>], credentials: &Credentials) -> SecretBytes {
    let argc = parts
        .iter()
        .map(|p| match p {
            HelloPart::Keep(_) => 1,
            HelloPart::ProfileAuth => 3,
        })
        .sum();
    let mut out = SecretBytes::new(Vec::with_capacity(128));
    resp::write_array(&mut out, argc);
    for part in parts {
        match part {
            HelloPart::Keep(arg) => resp::write_bulk(&mut out, arg),
            HelloPart::ProfileAuth => credentials.write_hello_auth(&mut out),
        }
    }
    out
}

/// Swallowing the replies to the re-authentication after a RESET.
#[derive(Debug, Clone, Copy)]
struct Swallow {
    left: usize,
    /// The frame being read now is swallowed.
    in_frame: bool,
    /// The first of them is AUTH's, whose failure ends the session.
    first: bool,
}

/// The upstream -> client direction.
struct ReplyPump<'t, R, W> {
    upstream: R,
    client: W,
    rx: mpsc::UnboundedReceiver<Expect>,
    queue: VecDeque<Expect>,
    framer: ReplyFramer,
    tracked: bool,
    swallow: Option<Swallow>,
    written: &'t AtomicU64,
}

/// What the queue's head asks for once the replies before it have been relayed.
enum Head {
    Wait,
    Close(Close),
    Opaque,
}

impl<R, W> ReplyPump<'_, R, W>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    async fn run(mut self) -> Result<Close, RelayError> {
        let result = self.pump().await;
        let _ = self.client.shutdown().await;
        result
    }

    async fn pump(&mut self) -> Result<Close, RelayError> {
        let mut chunk = BytesMut::with_capacity(CHUNK);
        let mut rx_open = true;
        loop {
            match self.settle().await? {
                Head::Wait => {}
                Head::Close(c) => return Ok(c),
                Head::Opaque => return self.opaque(&[]).await,
            }
            chunk.clear();
            chunk.reserve(CHUNK);
            tokio::select! {
                // Expectations first: a reply can only be matched once its command is known.
                biased;
                msg = self.rx.recv(), if rx_open => match msg {
                    Some(e) => self.queue.push_back(e),
                    None => rx_open = false,
                },
                n = self.upstream.read_buf(&mut chunk) => {
                    if n.map_err(io_err("upstream"))? == 0 {
                        return Ok(Close::UpstreamClosed);
                    }
                    // Every expectation sent before these bytes were caused is in the channel.
                    while let Ok(e) = self.rx.try_recv() {
                        self.queue.push_back(e);
                    }
                    if let Some(close) = self.relay_chunk(&chunk).await? {
                        return Ok(close);
                    }
                }
            }
        }
    }

    /// Runs the queue's head while it needs no further reply.
    async fn settle(&mut self) -> Result<Head, RelayError> {
        loop {
            match self.queue.front_mut() {
                Some(Expect::Replies(0)) => {}
                Some(Expect::Replies(_)) if self.tracked => return Ok(Head::Wait),
                Some(Expect::Replies(_)) => {}
                Some(Expect::Untracked) => self.tracked = false,
                Some(Expect::Local(reply)) => {
                    let reply: &[u8] = reply;
                    self.send(reply).await?;
                }
                Some(Expect::LocalThenClose(reply)) => {
                    let reply = std::mem::take(reply);
                    self.send(&reply).await?;
                    return Ok(Head::Close(Close::ProtocolError));
                }
                Some(Expect::Opaque) if self.framer.at_boundary() => return Ok(Head::Opaque),
                Some(Expect::Opaque | Expect::Reset(_)) | None => return Ok(Head::Wait),
            }
            self.queue.pop_front();
        }
    }

    /// Relays one chunk from the upstream, acting at reply boundaries.
    async fn relay_chunk(&mut self, chunk: &[u8]) -> Result<Option<Close>, RelayError> {
        let mut p = 0;
        // Start of the bytes not yet written (or skipped) to the client.
        let mut pass_from = 0;
        while p < chunk.len() {
            let (next, boundary) = self.framer.next(chunk, p)?;
            p = next;
            match boundary {
                None => {}
                Some(Boundary::Start { at, kind }) => {
                    if let Some(s) = self.swallow.as_mut().filter(|_| kind != b'>') {
                        s.in_frame = true;
                        self.send(&chunk[pass_from..at]).await?;
                        pass_from = at;
                    }
                }
                Some(Boundary::End { at, push, head }) => {
                    if let Some(mut s) = self.swallow.filter(|s| s.in_frame) {
                        pass_from = at;
                        let failed = matches!(head.as_bytes().first(), Some(b'-' | b'!'));
                        if failed && s.first {
                            tracing::warn!("upstream refused re-authentication after RESET");
                            self.send(AUTH_FAILED).await?;
                            return Ok(Some(Close::ReauthFailed));
                        }
                        s.left -= 1;
                        s.first = false;
                        s.in_frame = false;
                        self.swallow = (s.left > 0).then_some(s);
                        continue;
                    }
                    if push {
                        continue;
                    }
                    self.count_reply(head.as_bytes());
                    if self.head_ready() {
                        self.send(&chunk[pass_from..at]).await?;
                        pass_from = at;
                        match self.settle().await? {
                            Head::Wait => {}
                            Head::Close(c) => return Ok(Some(c)),
                            Head::Opaque => return self.opaque(&chunk[at..]).await.map(Some),
                        }
                    }
                }
            }
        }
        if !self.swallow.is_some_and(|s| s.in_frame) {
            self.send(&chunk[pass_from..]).await?;
        }
        Ok(None)
    }

    /// Whether the queue's head can act now, between two replies.
    fn head_ready(&self) -> bool {
        match self.queue.front() {
            None | Some(Expect::Reset(_)) => false,
            Some(Expect::Replies(n)) => *n == 0 || !self.tracked,
            Some(_) => true,
        }
    }

    /// A reply (not a push) was relayed: account for it.
    fn count_reply(&mut self, head: &[u8]) {
        match self.queue.front_mut() {
            Some(Expect::Replies(n)) if self.tracked && *n > 0 => *n -= 1,
            Some(Expect::Reset(swallow)) if self.tracked || head == b"+RESET\r" => {
                let left = *swallow;
                self.queue.pop_front();
                self.tracked = true;
                self.swallow = (left > 0).then_some(Swallow {
                    left,
                    in_frame: false,
                    first: true,
                });
            }
            _ => {}
        }
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<(), RelayError> {
        if bytes.is_empty() {
            return Ok(());
        }
        self.written
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        self.client.write_all(bytes).await.map_err(io_err("client"))
    }

    /// Replication: relay the rest as opaque bytes.
    async fn opaque(&mut self, rest: &[u8]) -> Result<Close, RelayError> {
        self.send(rest).await?;
        let copied = tokio::io::copy(&mut self.upstream, &mut self.client)
            .await
            .map_err(io_err("upstream"))?;
        self.written.fetch_add(copied, Ordering::Relaxed);
        Ok(Close::UpstreamClosed)
    }
}
