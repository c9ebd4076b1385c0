//! What a frame from the upstream is: a reply to one of the client's commands, or traffic
//! that arrives between replies (pub/sub messages and confirmations, MONITOR lines). Only
//! replies are counted, so that the ambassador's own replies and the ones it swallows land
//! by position, never by what a reply says.

use crate::filter::SUBSCRIPTIONS;
use crate::resp::Frame;

/// The pub/sub messages Redis sends a RESP2 subscriber, by name and element count.
const MESSAGES: [(&[u8], u64); 3] = [
    (b"message\r\n", 3),
    (b"pmessage\r\n", 4),
    (b"smessage\r\n", 3),
];

/// How one top-level frame from the upstream counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Class {
    /// The next reply to a command, in order.
    Reply,
    /// A pub/sub (un)subscription confirmed: no reply, but it settles a pending subscription.
    Confirmation,
    /// A message, a MONITOR line, a push: not a reply to anything.
    OutOfBand,
}

/// What the reply side knows of the connection's state, learnt from the replies themselves.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(super) struct Mode {
    /// Replies cannot be counted until a RESET (CLIENT REPLY queued in MULTI).
    pub untracked: bool,
    /// MONITOR answered `+OK`: the feed's lines arrive between replies.
    pub monitoring: bool,
    /// Channel and pattern subscriptions, as the last RESP2 confirmation counted them.
    channels: i64,
    /// Shard channel subscriptions, likewise.
    shards: i64,
    /// A subscription took effect whose confirmation count was not seen (silenced by CLIENT
    /// REPLY, or inside an EXEC reply).
    pub maybe_subscribed: bool,
    /// Confirmations came as pushes: RESP3, where no array is out of band.
    resp3: bool,
    /// Subscriptions as the last RESP3 confirmation push counted them (only for
    /// [`Mode::quiet`]: RESP3 classification needs no count).
    pushed_subscriptions: i64,
}

impl Mode {
    /// A RESP2 connection in subscriber context: only then are arrays messages.
    fn subscribed(&self) -> bool {
        self.channels > 0 || self.shards > 0 || self.maybe_subscribed
    }

    /// Nothing arrives unasked: not subscribed, not monitoring, replies counted. Closing
    /// the session here loses the client nothing (a move, [`super::Rest`]).
    pub(super) fn quiet(&self) -> bool {
        !self.untracked && !self.monitoring && !self.subscribed() && self.pushed_subscriptions <= 0
    }

    /// Classifies `f`. `awaiting` names the confirmation a pending subscription waits for,
    /// when one is at the head of the queue (so its outcome is the next frame that is not
    /// out of band).
    ///
    /// Sound because of what Redis allows in each mode: RESP3 sends everything out of band
    /// as a push; a RESP2 subscriber may only (un)subscribe, PING, QUIT and RESET, none of
    /// which replies with an array named like a message or a confirmation; a MONITOR client
    /// may not touch the keyspace (no script can return a status), and no command's status
    /// reply starts with a digit as the feed's timestamps do.
    pub(super) fn classify(&mut self, f: &Frame, awaiting: Option<&[u8]>) -> Class {
        if self.untracked {
            return Class::Reply;
        }
        let confirmation = f.elements == 3
            && f.third.is_some()
            && SUBSCRIPTIONS.iter().any(|(_, n)| f.first.as_bytes() == *n);
        if f.push {
            self.resp3 = true;
            return if confirmation {
                self.pushed_subscriptions = f.third.unwrap_or_default();
                Class::Confirmation
            } else {
                Class::OutOfBand
            };
        }
        let head = f.head.as_bytes();
        if self.monitoring && head.len() > 1 && head[0] == b'+' && head[1].is_ascii_digit() {
            return Class::OutOfBand;
        }
        if f.kind != b'*' || (self.resp3 && awaiting.is_none()) {
            return Class::Reply;
        }
        if confirmation && (awaiting.is_some() || self.subscribed()) {
            let count = f.third.unwrap_or_default();
            if matches!(f.first.as_bytes(), b"ssubscribe\r\n" | b"sunsubscribe\r\n") {
                self.shards = count;
            } else {
                self.channels = count;
            }
            self.maybe_subscribed = false;
            self.resp3 = false;
            return Class::Confirmation;
        }
        let message = MESSAGES
            .iter()
            .any(|&(name, n)| f.first.as_bytes() == name && f.elements == n);
        if message && self.subscribed() {
            return Class::OutOfBand;
        }
        Class::Reply
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resp::{Boundary, ReplyFramer};

    fn frames(stream: &[u8]) -> Vec<Frame> {
        let mut framer = ReplyFramer::default();
        let mut out = Vec::new();
        let mut p = 0;
        while p < stream.len() {
            let (next, b) = framer.next(stream, p).unwrap();
            p = next;
            if let Some(Boundary::End { frame, .. }) = b {
                out.push(frame);
            }
        }
        out
    }

    fn classes(mode: &mut Mode, stream: &[u8], awaiting: Option<&[u8]>) -> Vec<Class> {
        frames(stream)
            .iter()
            .map(|f| mode.classify(f, awaiting))
            .collect()
    }

    use Class::*;

    #[test]
    fn resp2_subscriber_context_tells_messages_from_replies() {
        let mut mode = Mode::default();
        let sub = b"*3\r\n$9\r\nsubscribe\r\n$1\r\na\r\n:1\r\n";
        assert_eq!(
            classes(&mut mode, sub, Some(b"subscribe\r\n")),
            [Confirmation]
        );
        let traffic = b"*3\r\n$7\r\nmessage\r\n$1\r\na\r\n$1\r\nm\r\n\
*4\r\n$8\r\npmessage\r\n$1\r\n*\r\n$1\r\na\r\n$1\r\nm\r\n\
*2\r\n$4\r\npong\r\n$0\r\n\r\n-ERR Can't execute 'get'\r\n+RESET\r\n";
        assert_eq!(
            classes(&mut mode, traffic, None),
            [OutOfBand, OutOfBand, Reply, Reply, Reply]
        );
        let unsub = b"*3\r\n$11\r\nunsubscribe\r\n$1\r\na\r\n:0\r\n";
        assert_eq!(classes(&mut mode, unsub, None), [Confirmation]);
        // No longer subscribed: an array that reads like a message is a reply (LRANGE).
        let lrange = b"*3\r\n$7\r\nmessage\r\n$1\r\na\r\n$1\r\nm\r\n";
        assert_eq!(classes(&mut mode, lrange, None), [Reply]);
    }

    #[test]
    fn shard_subscriptions_keep_the_context_on_their_own() {
        let mut mode = Mode::default();
        let stream = b"*3\r\n$10\r\nssubscribe\r\n$1\r\ns\r\n:1\r\n\
*3\r\n$11\r\nunsubscribe\r\n$1\r\na\r\n:0\r\n\
*3\r\n$8\r\nsmessage\r\n$1\r\ns\r\n$1\r\nm\r\n";
        assert_eq!(
            classes(&mut mode, stream, Some(b"ssubscribe\r\n")),
            [Confirmation, Confirmation, OutOfBand]
        );
    }

    #[test]
    fn resp3_pushes_are_never_replies_and_arrays_always_are() {
        let mut mode = Mode::default();
        let stream = b">3\r\n$9\r\nsubscribe\r\n$1\r\na\r\n:1\r\n\
>3\r\n$7\r\nmessage\r\n$1\r\na\r\n$1\r\nm\r\n\
*3\r\n$7\r\nmessage\r\n$1\r\na\r\n$1\r\nm\r\n+RESET\r\n";
        assert_eq!(
            classes(&mut mode, stream, None),
            [Confirmation, OutOfBand, Reply, Reply]
        );
    }

    #[test]
    fn monitor_lines_are_told_by_their_timestamp() {
        let mut mode = Mode {
            monitoring: true,
            ..Mode::default()
        };
        let stream =
            b"+1796230197.616196 [0 127.0.0.1:57882] \"SET\" \"a\" \"1\"\r\n+PONG\r\n+RESET\r\n";
        assert_eq!(classes(&mut mode, stream, None), [OutOfBand, Reply, Reply]);
        mode.monitoring = false;
        assert_eq!(classes(&mut mode, stream, None), [Reply, Reply, Reply]);
    }

    #[test]
    fn silenced_subscriptions_make_arrays_messages_until_a_count_says_otherwise() {
        let mut mode = Mode {
            maybe_subscribed: true,
            ..Mode::default()
        };
        let stream = b"*3\r\n$7\r\nmessage\r\n$1\r\na\r\n$1\r\nm\r\n\
*3\r\n$12\r\npunsubscribe\r\n$-1\r\n:0\r\n*3\r\n$7\r\nmessage\r\n$1\r\na\r\n$1\r\nm\r\n";
        assert_eq!(
            classes(&mut mode, stream, None),
            [OutOfBand, Confirmation, Reply]
        );
    }
}
