//! The client -> upstream direction: frame, judge, forward or rewrite; and re-authenticate
//! the session when the credentials change, at a point where that cannot disturb the client.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::Instant;

use super::{
    drain, io_err, Activity, Close, Context, Expect, Expectations, Readable, RelayError, Reuse,
    Sizing,
};
use crate::credentials::{Arg, Credentials, SecretBytes, HELLO_AUTH};
use crate::filter::{self, Action, Filter, HelloPart, Replies};
use crate::handshake;
use crate::resp::{ProtocolError, Request, RequestFramer};

/// The client -> upstream direction.
pub(super) struct Requests<'c, R, W> {
    client: R,
    upstream: W,
    expectations: &'c Expectations,
    ctx: &'c Context,
    credentials: watch::Receiver<Arc<Credentials>>,
    buf: BytesMut,
    sizing: Sizing,
    framer: RequestFramer,
    filter: Filter,
    /// Whether the command being streamed is forwarded (or dropped, before authentication).
    stream_forwarded: bool,
    /// A command is being streamed: nothing of ours may go upstream until it ends.
    mid_stream: bool,
    /// The local answer to the command being streamed, given once it is whole.
    stream_answer: Option<&'static [u8]>,
    /// No pub/sub, MONITOR or CLIENT REPLY inside MULTI since the last RESET: the
    /// connection is in a plain request-reply mode, where the ambassador's own AUTH may go
    /// (a RESP2 subscriber may not send one). The reply side counts replies in every mode.
    tracked: bool,
    /// The credentials changed and this session has not re-authenticated yet.
    reauth_due: bool,
    /// When the session is due to re-authenticate anyway (`credentials.max_session_age`).
    reauth_at: Option<Instant>,
    read: &'c AtomicU64,
    activity: &'c Activity,
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

impl<'c, R, W> Requests<'c, R, W>
where
    R: AsyncRead + Readable + Unpin,
    W: AsyncWrite + Unpin,
{
    pub(super) fn new(
        client: R,
        upstream: W,
        expectations: &'c Expectations,
        ctx: &'c Context,
        buf: BytesMut,
        read: &'c AtomicU64,
        activity: &'c Activity,
    ) -> Self {
        Requests {
            client,
            upstream,
            expectations,
            ctx,
            credentials: ctx.credentials.clone(),
            buf,
            sizing: Sizing::default(),
            // Redis's tighter limits for a connection that has not authenticated apply from
            // the first byte when the client must authenticate.
            framer: RequestFramer::new(ctx.settings.downstream_password.is_none()),
            filter: Filter::new(ctx.settings.downstream_password.is_some())
                .judging_reuse(ctx.settings.reuse),
            stream_forwarded: true,
            mid_stream: false,
            stream_answer: None,
            tracked: true,
            reauth_due: false,
            reauth_at: ctx.settings.max_session_age.map(|age| Instant::now() + age),
            read,
            activity,
        }
    }

    /// Returns how the client side ended; `Local` means the reply side closes the client
    /// after a reply of the ambassador's own.
    pub(super) async fn run(&mut self) -> Result<Close, RelayError> {
        let end = self.pump().await;
        match end {
            // Every reply relayed, nothing half-sent, nothing arriving unasked: the session
            // ends now, and no half-close waits for Redis to close too (what a direct
            // client's close leaves Redis is the same). Unless the client sent something
            // RESET cannot undo, the connection can serve another client (`upstream.reuse`).
            Ok(Close::ClientClosed) if self.expectations.idle() => {
                let next = match (self.ctx.settings.reuse, &self.filter) {
                    (true, f) if f.untouched => Reuse::AsItIs,
                    (true, f) if f.reset_clears => Reuse::AfterReset,
                    _ => Reuse::No,
                };
                self.expectations.rest.leave_idle(next);
            }
            Ok(Close::ClientClosed) => {
                // Half-close: Redis answers what it already read, then closes.
                let _ = self.upstream.shutdown().await;
            }
            // Boxed, as are the other rare waits: see `super::Rare`.
            Ok(Close::Local | Close::ProtocolError) => Box::pin(drain(&mut self.client)).await,
            Ok(Close::UpstreamClosed) => {
                // After QUIT: the reply side ends the session at its +OK. Should the upstream
                // never get to it (a blocked command before QUIT), the client's leaving ends
                // the session, as it would end the client's Redis connection.
                // On the heap: an array here would enlarge every session's future.
                let mut sink = vec![0u8; 4096];
                while matches!(self.client.read(&mut sink).await, Ok(n) if n > 0) {}
                let _ = self.upstream.shutdown().await;
                return Ok(Close::ClientClosed);
            }
            _ => {}
        }
        end
    }

    async fn pump(&mut self) -> Result<Close, RelayError> {
        loop {
            if let Some(end) = self.judge_buffer().await? {
                return Ok(end);
            }
            self.reauthenticate_if_due().await?;
            self.expectations.room().await;
            let whole = self.buf.is_empty() && !self.mid_stream;
            self.expectations
                .rest
                .requests(whole, whole && self.tracked && !self.filter.in_multi);
            let watching = self.ctx.settings.reauth_open_sessions && !self.reauth_due;
            let aging = self.reauth_at.filter(|_| !self.reauth_due);
            tokio::select! {
                n = self.sizing.read_when_ready(&mut self.client, &mut self.buf) => {
                    let n = n.map_err(io_err("client"))?;
                    if n == 0 {
                        return Ok(Close::ClientClosed);
                    }
                    self.sizing.read(n);
                    self.read.fetch_add(n as u64, Ordering::Relaxed);
                    self.activity.touch();
                    // Busy until this read is judged and forwarded (see the loop's top).
                    self.expectations.rest.requests(false, false);
                }
                changed = self.credentials.changed(), if watching => {
                    // An error means the store is gone: the process is stopping.
                    self.reauth_due = changed.is_ok();
                    // Pub/sub or MONITOR: the AUTH waits for a RESET (see `reshape`), so
                    // the session keeps its old authentication; counted, as operators of
                    // expiring tokens need to know how many such sessions there are.
                    if self.reauth_due && !self.tracked {
                        self.ctx.settings.metrics.reauth("deferred");
                    }
                }
                _ = sleep_until_some(aging) => {
                    self.reauth_due = true;
                    self.reauth_at = aging.zip(self.ctx.settings.max_session_age).map(|(at, age)| at + age);
                    if !self.tracked {
                        self.ctx.settings.metrics.reauth("deferred");
                    }
                }
            }
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
                Err(e) => break Some(self.protocol_error(&mut b, e).await?),
            };
            match event {
                Request::Incomplete => break None,
                Request::Ignored { len } => {
                    if self.filter.authenticated {
                        self.filter.ignored();
                        b.done += len;
                    } else {
                        self.skip(&mut b, len).await?;
                    }
                }
                Request::Command { len } | Request::StreamStart { len } => {
                    let cmd = self.framer.command(view);
                    let password = self.ctx.settings.downstream_password.as_deref();
                    let action = self
                        .filter
                        .decide(&cmd, |p| password.is_some_and(|d| d.matches(p)));
                    // Rewrites are encoded now, while the arguments they keep are borrowed.
                    let mut step = Step::from_action(action, &self.credentials);
                    self.framer.authenticated = self.filter.authenticated;
                    if matches!(event, Request::StreamStart { .. }) {
                        self.stream_forwarded = matches!(step, Step::Forward(_));
                        self.mid_stream = true;
                        // Redis answers a command only once it is whole: a local answer to a
                        // streamed one waits for its end (a protocol error may come first).
                        if let Step::Answer(reply) = step {
                            self.stream_answer = Some(reply);
                            step = Step::Drop;
                        }
                    }
                    let end = match step {
                        Step::Forward(replies) => {
                            self.forward(&mut b, replies, len);
                            None
                        }
                        // Boxed: rare, and inline its room would be in every session's
                        // future (see `super::Rare`).
                        step => Box::pin(self.act(&mut b, step, len)).await?,
                    };
                    if let Some(end) = end {
                        break Some(end);
                    }
                }
                Request::StreamMore { len } | Request::StreamEnd { len } => {
                    self.mid_stream = matches!(event, Request::StreamMore { .. });
                    if self.stream_forwarded {
                        b.done += len;
                    } else {
                        self.skip(&mut b, len).await?;
                    }
                    if let Some(reply) = self.stream_answer.take_if(|_| !self.mid_stream) {
                        self.expect_run(&mut b);
                        self.expect(Expect::Local(reply));
                    }
                }
            }
        };
        self.flush(&mut b).await?;
        let _ = self.buf.split_to(b.done);
        Ok(result)
    }

    /// Forwards the command of `len` bytes at `b.done` as it is.
    fn forward(&mut self, b: &mut Batch, replies: Replies, len: usize) {
        match replies {
            Replies::None => b.done += len,
            Replies::One => {
                b.done += len;
                b.replies += 1;
            }
            Replies::Untracked => self.reshape(b, len, Expect::Untracked),
            Replies::Subscribe {
                confirms,
                channels,
                replied,
            } => self.reshape(
                b,
                len,
                Expect::Subscribe {
                    confirms,
                    channels,
                    replied,
                },
            ),
            Replies::Monitor { replied } => self.reshape(b, len, Expect::Monitor { replied }),
            Replies::ThenSubscribed { replied } => {
                b.done += len;
                b.replies += u64::from(replied);
                self.expect_run(b);
                self.expect(Expect::MaybeSubscribed);
                self.tracked = false;
            }
        }
    }

    /// Applies the filter's decision to a command of `len` bytes at `b.done`.
    async fn act(
        &mut self,
        b: &mut Batch,
        step: Step,
        len: usize,
    ) -> Result<Option<Close>, RelayError> {
        match step {
            Step::Forward(replies) => self.forward(b, replies, len),
            Step::Replace(with, replies) => self.replace(b, len, &with, replies).await?,
            Step::Drop => self.skip(b, len).await?,
            Step::Reset { replied } => {
                b.done += len;
                self.expect_run(b);
                let reauth = handshake::commands(
                    &self.credentials.borrow_and_update(),
                    &self.ctx.settings.handshake,
                );
                self.expect(Expect::Reset {
                    replied,
                    handshake: reauth.names,
                });
                self.flush(b).await?;
                self.write(&reauth.bytes).await?;
                // RESET leaves the connection as fresh as the handshake did.
                self.tracked = true;
                self.reauth_due = false;
            }
            Step::Quit => {
                b.done += len;
                b.replies += 1;
                // The session ends with QUIT's +OK (Redis closes after it anyway); what the
                // client sends after QUIT is never forwarded.
                self.expect_run(b);
                self.expect(Expect::Close(Close::UpstreamClosed));
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
                let copied = Box::pin(tokio::io::copy(&mut self.client, &mut self.upstream))
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
                self.expect(Expect::LocalThenClose(reply.to_vec(), Close::Local));
                self.skip(b, len).await?;
                return Ok(Some(Close::Local));
            }
        }
        Ok(None)
    }

    /// Forwards a command after which the upstream may send frames that are not replies
    /// (pub/sub, MONITOR): the reply side tells them apart from where `e` stands.
    fn reshape(&mut self, b: &mut Batch, len: usize, e: Expect) {
        b.done += len;
        self.expect_run(b);
        self.expect(e);
        // The ambassador's own AUTH waits for a RESET: a RESP2 subscriber may not send it.
        self.tracked = false;
    }

    /// After a credential change, sends the new `AUTH` between two commands, where the
    /// upstream reads it as its own command and its reply can be told apart: not inside MULTI
    /// (it would be queued), not in pub/sub or MONITOR mode, not inside a streamed command,
    /// and not while CLIENT REPLY OFF or SKIP would silence the AUTH's reply (or give it the
    /// client's skip). Replies still pending are fine: the reply side knows the AUTH's reply
    /// comes right after them, and swallows it.
    async fn reauthenticate_if_due(&mut self) -> Result<(), RelayError> {
        let clear = self.tracked && !self.mid_stream && !self.filter.in_multi;
        if !self.reauth_due || !clear || !self.filter.replies_on() {
            return Ok(());
        }
        self.reauth_due = false;
        let auth = self.credentials.borrow_and_update().auth_command();
        self.expect(Expect::Swallow(1));
        self.write(&auth).await
    }

    /// The client sent something that is not RESP at `b.done`. In plain request-reply mode
    /// the ambassador answers Redis's error itself, after every earlier reply. In pub/sub or
    /// MONITOR mode it hands the same bytes to Redis, which parses them exactly as the
    /// framer did and answers the same error in its proper place, then closes. Bytes of a client that has not authenticated never go upstream.
    async fn protocol_error(
        &mut self,
        b: &mut Batch,
        e: ProtocolError,
    ) -> Result<Close, RelayError> {
        tracing::debug!(error = %e, "client protocol error");
        let redis_would_refuse = e != ProtocolError::TooLongToInspect;
        if !self.tracked && self.filter.authenticated && redis_would_refuse {
            b.done = self.buf.len();
            self.flush(b).await?;
            return Ok(Close::ProtocolError);
        }
        self.expect_run(b);
        self.expect(Expect::LocalThenClose(e.reply(), Close::ProtocolError));
        Ok(Close::Local)
    }

    fn expect(&self, e: Expect) {
        self.expectations.push(e);
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

    /// Sends `with` instead of the `len` bytes at `b.done`.
    async fn replace(
        &mut self,
        b: &mut Batch,
        len: usize,
        with: &[u8],
        replies: Replies,
    ) -> Result<(), RelayError> {
        self.skip(b, len).await?;
        if replies == Replies::One {
            self.expect(Expect::Replies(1));
        }
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
    /// Send these bytes instead of the command.
    Replace(SecretBytes, Replies),
    Reset {
        replied: bool,
    },
    Drop,
    Quit,
    Replication,
    Answer(&'static [u8]),
    AnswerAndClose(&'static [u8]),
}

impl Step {
    fn from_action(action: Action<'_>, credentials: &watch::Receiver<Arc<Credentials>>) -> Step {
        match action {
            Action::Forward(r) => Step::Forward(r),
            Action::Auth(r) => Step::Replace(credentials.borrow().auth_command(), r),
            Action::Hello(parts, r) => {
                Step::Replace(hello_command(&parts, &credentials.borrow()), r)
            }
            Action::Reset { replied } => Step::Reset { replied },
            Action::Drop => Step::Drop,
            Action::Quit => Step::Quit,
            Action::Replication => Step::Replication,
            Action::Answer(r) => Step::Answer(r),
            Action::AnswerAndClose(r) => Step::AnswerAndClose(r),
        }
    }
}

/// `HELLO` re-encoded with the profile's credentials in place of the client's.
fn hello_command(parts: &[HelloPart<'_>], credentials: &Credentials) -> SecretBytes {
    let mut args = Vec::with_capacity(parts.len() + HELLO_AUTH.len());
    for part in parts {
        match part {
            HelloPart::Keep(arg) => args.push(Arg::Bytes(arg)),
            HelloPart::ProfileAuth => args.extend(HELLO_AUTH),
        }
    }
    credentials.encode(&[&args])
}

/// Waits until `at`; forever when it is `None`. The timer is boxed, so that sessions without
/// `credentials.max_session_age` do not carry its room (see `super::Rare`).
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => Box::pin(tokio::time::sleep_until(at)).await,
        None => std::future::pending().await,
    }
}
