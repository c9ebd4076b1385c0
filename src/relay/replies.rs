//! The upstream -> client direction: relay replies as they arrive, and act at reply
//! boundaries (local replies in order, swallowed replies to the ambassador's own commands).

use std::collections::VecDeque;
use std::io::ErrorKind;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::frames::{Class, Mode};
use super::Moves;
use super::{
    io_err, Activity, Close, Context, Expect, Expectations, Readable, RelayError, Sizing,
    AUTH_FAILED,
};
use crate::resp::{Boundary, Frame, ReplyFramer};

/// Swallowing the replies to the ambassador's own commands.
#[derive(Debug, Clone)]
struct Swallow {
    /// The commands whose replies are swallowed, AUTH first.
    names: Vec<&'static str>,
    /// How many of them were answered.
    answered: usize,
    /// The frame being read now is swallowed.
    in_frame: bool,
    /// A refusal ends the session (after RESET the connection is no longer authenticated,
    /// nor on the profile's database); after a rotation the old authentication still holds.
    fatal: bool,
}

/// The upstream -> client direction.
pub(super) struct ReplyPump<'t, R, W> {
    upstream: R,
    client: W,
    expectations: &'t Expectations,
    queue: VecDeque<Expect>,
    framer: ReplyFramer,
    mode: Mode,
    swallow: Option<Swallow>,
    ctx: &'t Context,
    written: &'t AtomicU64,
    activity: &'t Activity,
    /// Where the top-level error reply being read began in this chunk, when `-READONLY`
    /// must be caught ([`Moves::guards_master`](super::Moves)).
    error_at: Option<usize>,
}

/// What the queue's head asks for once the replies before it have been relayed.
enum Head {
    Wait,
    Close(Close),
    Opaque,
}

impl<'t, R, W> ReplyPump<'t, R, W>
where
    R: AsyncRead + Readable + Unpin,
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
            mode: Mode::default(),
            swallow: None,
            ctx,
            written,
            activity,
            error_at: None,
        }
    }

    pub(super) async fn run(&mut self) -> Result<Close, RelayError> {
        let result = self.pump().await;
        let _ = self.client.shutdown().await;
        result
    }

    async fn pump(&mut self) -> Result<Close, RelayError> {
        let mut chunk = BytesMut::new();
        let mut sizing = Sizing::default();
        loop {
            match self.settle().await? {
                Head::Wait => {}
                Head::Close(c) => return Ok(c),
                Head::Opaque => return self.opaque(&[]).await,
            }
            self.expectations.rest.replies(
                self.queue.is_empty() && self.swallow.is_none() && self.framer.at_boundary(),
                self.mode.quiet(),
            );
            chunk.clear();
            tokio::select! {
                // Expectations first: a reply can only be matched once its command is known.
                biased;
                _ = self.expectations.pushed() => {
                    // Owed until settled at the loop's top, which may wait on a client that
                    // does not read: the shared queue is empty meanwhile, and the session must
                    // not look idle (a connection with a reply owed would be handed on).
                    self.expectations.rest.replies(false, false);
                    self.expectations.take_into(&mut self.queue);
                }
                n = sizing.read_when_ready(&mut self.upstream, &mut chunk) => {
                    let n = match self.upstream_ended(n)? {
                        None => return Ok(Close::UpstreamClosed),
                        Some(n) => n,
                    };
                    sizing.read(n);
                    self.activity.touch();
                    // Busy until these bytes are relayed (see the loop's top).
                    self.expectations.rest.replies(false, false);
                    // Every expectation sent before these bytes were caused is in the queue.
                    self.expectations.take_into(&mut self.queue);
                    if let Some(close) = self.relay_chunk(&chunk).await? {
                        return Ok(close);
                    }
                }
            }
        }
    }

    /// How many bytes a read from the upstream brought, `None` at its end. Redis sends no TLS `close_notify`
    /// when it closes after the client did (nor can a killed or crashed server), so over TLS
    /// such a close reads as rustls' `UnexpectedEof`. Replies delimit themselves: between two
    /// of them nothing was cut off, and the close is the one plain TCP would report. Inside
    /// a reply, the reply is truncated and that stays an error.
    fn upstream_ended(&self, read: std::io::Result<usize>) -> Result<Option<usize>, RelayError> {
        match read {
            Ok(n) => Ok((n > 0).then_some(n)),
            Err(e) if e.kind() == ErrorKind::UnexpectedEof && self.framer.at_boundary() => Ok(None),
            Err(e) => Err(io_err("upstream")(e)),
        }
    }

    /// Runs the queue's head while it needs no further reply.
    async fn settle(&mut self) -> Result<Head, RelayError> {
        loop {
            let untracked = self.mode.untracked;
            match self.queue.front_mut() {
                Some(Expect::Replies(0)) => {}
                Some(Expect::Replies(_)) if !untracked => return Ok(Head::Wait),
                Some(Expect::Replies(_)) => {}
                Some(Expect::Untracked) => self.mode.untracked = true,
                Some(
                    Expect::Subscribe { replied: true, .. } | Expect::Monitor { replied: true },
                ) if !untracked => return Ok(Head::Wait),
                Some(Expect::Subscribe { .. } | Expect::MaybeSubscribed) => {
                    self.mode.maybe_subscribed = true
                }
                Some(Expect::Monitor { .. }) => self.mode.monitoring = true,
                Some(Expect::Local(reply)) => {
                    let reply: &[u8] = reply;
                    self.send(reply).await?;
                }
                Some(Expect::LocalThenClose(reply, why)) => {
                    let (reply, why) = (std::mem::take(reply), *why);
                    self.send(&reply).await?;
                    self.pop_front();
                    return Ok(Head::Close(why));
                }
                Some(Expect::Close(why)) => return Ok(Head::Close(*why)),
                Some(Expect::Swallow(n)) => {
                    if self.swallow.is_some() {
                        return Ok(Head::Wait);
                    }
                    // Only ever sent while replies are counted: one AUTH.
                    let names = vec!["AUTH"; *n];
                    self.start_swallow(names, false);
                }
                Some(Expect::Opaque) if self.framer.at_boundary() => return Ok(Head::Opaque),
                Some(Expect::Reset {
                    replied: false,
                    handshake,
                }) => {
                    // RESET's own reply was silenced: its swallowing starts right away.
                    let names = std::mem::take(handshake);
                    self.reset(names);
                }
                Some(Expect::Opaque | Expect::Reset { .. }) | None => return Ok(Head::Wait),
            }
            self.pop_front();
        }
    }

    fn pop_front(&mut self) {
        if let Some(e) = self.queue.pop_front() {
            self.expectations.retire(&e);
        }
    }

    /// Relays one chunk from the upstream, acting at reply boundaries.
    async fn relay_chunk(&mut self, chunk: &[u8]) -> Result<Option<Close>, RelayError> {
        let mut p = 0;
        // An error reply split over two reads has been partly relayed: only one whole in a
        // read is caught (Redis writes an error line in one piece).
        self.error_at = None;
        // Start of the bytes not yet written (or skipped) to the client.
        let mut pass_from = 0;
        while p < chunk.len() {
            let (next, boundary) = self.framer.next(chunk, p)?;
            p = next;
            match boundary {
                None => {}
                Some(Boundary::Start { at, kind }) => {
                    self.error_at = (kind == b'-' && self.guards_master()).then_some(at);
                    // Pushes are never the answer to our own commands.
                    if let Some(s) = self.swallow.as_mut().filter(|_| kind != b'>') {
                        s.in_frame = true;
                        self.send(&chunk[pass_from..at]).await?;
                        pass_from = at;
                    }
                }
                Some(Boundary::End { at, frame }) => {
                    if let Some(start) = self.error_at.take() {
                        if frame.head.as_bytes().starts_with(b"-READONLY") {
                            // A demoted master: the client must not see it; its reconnect
                            // goes to the new master, which discovery looks up now.
                            self.send(&chunk[pass_from..start]).await?;
                            if let Some(m) = &self.ctx.moves {
                                m.demoted();
                            }
                            return Ok(Some(Close::ReadOnly));
                        }
                    }
                    if self.swallowing_frame() {
                        pass_from = at;
                        if let Some(close) = self.swallowed(&frame).await? {
                            return Ok(Some(close));
                        }
                    } else if !self.account(&frame) {
                        continue;
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

    /// A session on Sentinel's master, outside the ambassador's own commands.
    fn guards_master(&self) -> bool {
        self.swallow.is_none() && self.ctx.moves.as_deref().is_some_and(Moves::guards_master)
    }

    fn swallowing_frame(&self) -> bool {
        self.swallow.as_ref().is_some_and(|s| s.in_frame)
    }

    /// A relayed frame ended: accounts for it. Returns whether it moved the queue's head.
    fn account(&mut self, frame: &Frame) -> bool {
        let awaiting = match self.queue.front() {
            Some(Expect::Subscribe {
                confirms,
                replied: true,
                ..
            }) => Some(*confirms),
            _ => None,
        };
        match self.mode.classify(frame, awaiting) {
            Class::OutOfBand => false,
            Class::Confirmation => {
                let Some(Expect::Subscribe { channels, .. }) = self.queue.front_mut() else {
                    return false;
                };
                if awaiting != Some(frame.first.as_bytes()) {
                    return false;
                }
                // One confirmation per channel named; an unsubscription from all is taken
                // as settled by its first.
                *channels = channels.saturating_sub(1);
                let settled = *channels == 0;
                if settled {
                    self.pop_front();
                }
                settled
            }
            Class::Reply => {
                self.count_reply(frame.head.as_bytes());
                true
            }
        }
    }

    /// A swallowed reply ended.
    async fn swallowed(&mut self, frame: &Frame) -> Result<Option<Close>, RelayError> {
        let Some(mut s) = self.swallow.take() else {
            return Ok(None);
        };
        let head = frame.head.as_bytes();
        let failed = matches!(head.first(), Some(b'-' | b'!'));
        let first = s.answered == 0;
        if s.fatal && failed {
            let command = s.names[s.answered];
            tracing::warn!(command, "upstream refused the handshake after RESET");
            let reply = if first {
                AUTH_FAILED.to_vec()
            } else {
                let code = head[1..].split(|b| b.is_ascii_whitespace()).next();
                let code = String::from_utf8_lossy(code.unwrap_or_default());
                format!("-ERR ambassador: upstream unavailable (upstream rejected {command} after RESET: {code})\r\n").into_bytes()
            };
            self.send(&reply).await?;
            return Ok(Some(Close::ReauthFailed));
        }
        if first && !s.fatal {
            self.rotated(failed);
        }
        s.answered += 1;
        s.in_frame = false;
        self.swallow = (s.answered < s.names.len()).then_some(s);
        Ok(None)
    }

    /// RESET's reply was relayed (or silenced): the connection is as fresh as after the
    /// handshake, and the replies to `handshake`, re-sent after it, are swallowed.
    fn reset(&mut self, handshake: Vec<&'static str>) {
        self.mode = Mode::default();
        self.start_swallow(handshake, true);
    }

    /// The next replies answer the ambassador's own commands `names`.
    fn start_swallow(&mut self, names: Vec<&'static str>, fatal: bool) {
        self.swallow = (!names.is_empty()).then_some(Swallow {
            names,
            answered: 0,
            in_frame: false,
            fatal,
        });
    }

    /// The reply to a re-authentication after a credential change arrived.
    fn rotated(&self, failed: bool) {
        if failed {
            tracing::warn!("upstream refused the new credentials on an open session; it stays authenticated as before");
            self.ctx.settings.metrics.reauth("rejected");
        } else {
            tracing::debug!("open session re-authenticated with the new credentials");
            self.ctx.settings.metrics.reauth("ok");
        }
    }

    /// Whether the queue's head can act now, between two replies.
    fn head_ready(&self) -> bool {
        let untracked = self.mode.untracked;
        match self.queue.front() {
            None | Some(Expect::Reset { replied: true, .. }) => false,
            // Our own commands' replies come in order: one swallow after the other.
            Some(Expect::Swallow(_)) => self.swallow.is_none(),
            Some(Expect::Replies(n)) => *n == 0 || untracked,
            Some(Expect::Subscribe { replied: true, .. } | Expect::Monitor { replied: true }) => {
                untracked
            }
            Some(_) => true,
        }
    }

    /// A reply (not a push, message or MONITOR line) was relayed: account for it.
    fn count_reply(&mut self, head: &[u8]) {
        let untracked = self.mode.untracked;
        match self.queue.front_mut() {
            Some(Expect::Replies(n)) if !untracked && *n > 0 => *n -= 1,
            // A subscription's reply is its refusal.
            Some(Expect::Subscribe { replied: true, .. }) if !untracked => self.pop_front(),
            Some(Expect::Monitor { replied: true }) if !untracked => {
                self.mode.monitoring = head == b"+OK\r";
                self.pop_front();
            }
            // By position; only where Redis itself made the stream uncountable, by the text
            // RESET answers.
            Some(Expect::Reset { handshake, .. }) if !untracked || head == b"+RESET\r" => {
                let names = std::mem::take(handshake);
                self.pop_front();
                self.reset(names);
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
        let copied = Box::pin(tokio::io::copy(&mut self.upstream, &mut self.client))
            .await
            .map_err(io_err("upstream"))?;
        self.written.fetch_add(copied, Ordering::Relaxed);
        Ok(Close::UpstreamClosed)
    }
}
