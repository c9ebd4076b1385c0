//! The upstream -> client direction: relay replies as they arrive, and act at reply
//! boundaries (local replies in order, swallowed replies to the ambassador's own commands).

use std::collections::VecDeque;
use std::io::ErrorKind;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{
    io_err, Activity, Close, Context, Expect, Expectations, RelayError, AUTH_FAILED, CHUNK,
};
use crate::resp::{Boundary, ReplyFramer};

/// Swallowing the replies to the ambassador's own commands.
#[derive(Debug, Clone, Copy)]
struct Swallow {
    left: usize,
    /// The frame being read now is swallowed.
    in_frame: bool,
    /// The first of them is AUTH's.
    first: bool,
    /// A refused AUTH ends the session (after RESET the connection is no longer
    /// authenticated); after a rotation the old authentication still holds.
    fatal: bool,
}

/// The upstream -> client direction.
pub(super) struct ReplyPump<'t, R, W> {
    upstream: R,
    client: W,
    expectations: &'t Expectations,
    queue: VecDeque<Expect>,
    framer: ReplyFramer,
    tracked: bool,
    swallow: Option<Swallow>,
    ctx: &'t Context,
    written: &'t AtomicU64,
    activity: &'t Activity,
}

/// What the queue's head asks for once the replies before it have been relayed.
enum Head {
    Wait,
    Close(Close),
    Opaque,
}

impl<'t, R, W> ReplyPump<'t, R, W>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    pub(super) fn new(
        upstream: R,
        client: W,
        expectations: &'t Expectations,
        ctx: &'t Context,
        written: &'t AtomicU64,
        activity: &'t Activity,
    ) -> Self {
        ReplyPump {
            upstream,
            client,
            expectations,
            queue: VecDeque::new(),
            framer: ReplyFramer::default(),
            tracked: true,
            swallow: None,
            ctx,
            written,
            activity,
        }
    }

    pub(super) async fn run(mut self) -> Result<Close, RelayError> {
        let result = self.pump().await;
        let _ = self.client.shutdown().await;
        result
    }

    async fn pump(&mut self) -> Result<Close, RelayError> {
        let mut chunk = BytesMut::with_capacity(CHUNK);
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
                _ = self.expectations.wake.notified() => {
                    self.expectations.take_into(&mut self.queue);
                }
                n = self.upstream.read_buf(&mut chunk) => {
                    if self.upstream_ended(n)? {
                        return Ok(Close::UpstreamClosed);
                    }
                    self.activity.touch();
                    // Every expectation sent before these bytes were caused is in the queue.
                    self.expectations.take_into(&mut self.queue);
                    if let Some(close) = self.relay_chunk(&chunk).await? {
                        return Ok(close);
                    }
                }
            }
        }
    }

    /// Whether a read from the upstream found its end. Redis sends no TLS `close_notify`
    /// when it closes after the client did (nor can a killed or crashed server), so over TLS
    /// such a close reads as rustls' `UnexpectedEof`. Replies delimit themselves: between two
    /// of them nothing was cut off, and the close is the one plain TCP would report. Inside
    /// a reply, the reply is truncated and that stays an error.
    fn upstream_ended(&self, read: std::io::Result<usize>) -> Result<bool, RelayError> {
        match read {
            Ok(n) => Ok(n == 0),
            Err(e) if e.kind() == ErrorKind::UnexpectedEof && self.framer.at_boundary() => Ok(true),
            Err(e) => Err(io_err("upstream")(e)),
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
                Some(Expect::LocalThenClose(reply, why)) => {
                    let (reply, why) = (std::mem::take(reply), *why);
                    self.send(&reply).await?;
                    return Ok(Head::Close(why));
                }
                Some(Expect::Swallow(n)) => {
                    if self.swallow.is_some() {
                        return Ok(Head::Wait);
                    }
                    // Only ever sent while replies are counted.
                    let left = *n;
                    self.start_swallow(left, false);
                }
                Some(Expect::Opaque) if self.framer.at_boundary() => return Ok(Head::Opaque),
                Some(Expect::Reset {
                    replied: false,
                    swallow,
                }) => {
                    // RESET's own reply was silenced: its swallowing starts right away.
                    let left = *swallow;
                    self.start_swallow(left, true);
                }
                Some(Expect::Opaque | Expect::Reset { .. }) | None => return Ok(Head::Wait),
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
                    // Pushes are never the answer to our own commands.
                    if let Some(s) = self.swallow.as_mut().filter(|_| kind != b'>') {
                        s.in_frame = true;
                        self.send(&chunk[pass_from..at]).await?;
                        pass_from = at;
                    }
                }
                Some(Boundary::End { at, push, head }) => {
                    if self.swallowing_frame() {
                        pass_from = at;
                        if let Some(close) = self.swallowed(head.as_bytes()).await? {
                            return Ok(Some(close));
                        }
                    } else if push {
                        continue;
                    } else {
                        self.count_reply(head.as_bytes());
                    }
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
        if !self.swallowing_frame() {
            self.send(&chunk[pass_from..]).await?;
        }
        Ok(None)
    }

    fn swallowing_frame(&self) -> bool {
        self.swallow.is_some_and(|s| s.in_frame)
    }

    /// A swallowed reply ended; `head` tells whether it was an error.
    async fn swallowed(&mut self, head: &[u8]) -> Result<Option<Close>, RelayError> {
        let Some(mut s) = self.swallow else {
            return Ok(None);
        };
        let failed = matches!(head.first(), Some(b'-' | b'!'));
        if s.first && s.fatal && failed {
            tracing::warn!("upstream refused re-authentication after RESET");
            self.send(AUTH_FAILED).await?;
            return Ok(Some(Close::ReauthFailed));
        }
        if s.first && !s.fatal {
            self.rotated(failed);
        }
        s.left -= 1;
        s.first = false;
        s.in_frame = false;
        self.swallow = (s.left > 0).then_some(s);
        Ok(None)
    }

    /// The next `left` replies answer the ambassador's own commands. After a RESET the
    /// connection is fresh, so replies can be counted again.
    fn start_swallow(&mut self, left: usize, fatal: bool) {
        if fatal {
            self.tracked = true;
        }
        self.swallow = (left > 0).then_some(Swallow {
            left,
            in_frame: false,
            first: true,
            fatal,
        });
    }

    /// The reply to a re-authentication after a credential change arrived.
    fn rotated(&self, failed: bool) {
        if failed {
            tracing::warn!("upstream refused the new credentials on an open session; it stays authenticated as before");
            self.ctx.metrics.reauth("rejected");
        } else {
            tracing::debug!("open session re-authenticated with the new credentials");
            self.ctx.metrics.reauth("ok");
        }
    }

    /// Whether the queue's head can act now, between two replies.
    fn head_ready(&self) -> bool {
        match self.queue.front() {
            None | Some(Expect::Reset { replied: true, .. }) => false,
            // Our own commands' replies come in order: one swallow after the other.
            Some(Expect::Swallow(_)) => self.swallow.is_none(),
            Some(Expect::Replies(n)) => *n == 0 || !self.tracked,
            Some(_) => true,
        }
    }

    /// A reply (not a push) was relayed: account for it.
    fn count_reply(&mut self, head: &[u8]) {
        match self.queue.front_mut() {
            Some(Expect::Replies(n)) if self.tracked && *n > 0 => *n -= 1,
            Some(Expect::Reset { swallow, .. }) if self.tracked || head == b"+RESET\r" => {
                let left = *swallow;
                self.queue.pop_front();
                self.start_swallow(left, true);
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
