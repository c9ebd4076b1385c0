//! The upstream's side: top-level reply boundaries in a byte stream, RESP2 and RESP3.

use memchr::memchr;
use thiserror::Error;

/// A reply boundary found by [`ReplyFramer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Boundary {
    /// A top-level frame begins at this offset; `kind` is its type byte.
    Start { at: usize, kind: u8 },
    /// The top-level frame ends just before this offset; `frame` says what it was.
    End { at: usize, frame: Frame },
}

/// What the reply side needs to know of a whole top-level frame to tell a reply from
/// out-of-band traffic (pub/sub messages, MONITOR lines) without keeping its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Frame {
    /// The type byte, attributes before it skipped (`*` for an array).
    pub kind: u8,
    /// An out-of-band RESP3 push (`>`), attributes before it skipped.
    pub push: bool,
    /// The first bytes of a simple reply's line, type byte included (`+RESET\r`).
    pub head: LineHead,
    /// For an array or push: how many elements it has.
    pub elements: u64,
    /// For an array or push whose first element is a bulk string: its first bytes and CRLF
    /// (`subscribe\r\n`), which name a pub/sub message or confirmation.
    pub first: LineHead,
    /// For an array or push whose third element is an integer: its value (the subscription
    /// count of a pub/sub confirmation).
    pub third: Option<i64>,
}

/// The first bytes of a line or payload, for matching.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LineHead {
    bytes: [u8; 16],
    len: u8,
}

impl LineHead {
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }

    fn push(&mut self, b: &[u8]) {
        let room = self.bytes.len() - self.len as usize;
        let take = room.min(b.len());
        self.bytes[self.len as usize..self.len as usize + take].copy_from_slice(&b[..take]);
        self.len += take as u8;
    }
}

/// The upstream sent something that is not RESP.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ReplyError {
    #[error("unknown reply type byte 0x{0:02x}")]
    UnknownType(u8),
    #[error("invalid length in reply header")]
    InvalidLength,
    #[error("replies nested in more than {0} distinct levels")]
    TooDeep(usize),
}

/// Open aggregates the framer tracks at most. A run of nested one-element aggregates (what a
/// self-referencing Lua table makes Redis send, thousands deep) is a single entry, so only
/// nesting in which every level has siblings counts here; each such level costs the upstream
/// at least eight bytes (`*2\r\n:1\r\n`) and the framer 16: a 1 MiB stack at most.
pub const MAX_LEVELS: usize = 1 << 16;

/// One entry of the framer's stack: `run` nested aggregates of which the outermost has
/// `left` elements still to come and every inner one exactly one (the one being read).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Level {
    left: u64,
    run: u32,
    /// An attribute: a prefix that does not count as an element of its parent. Never merged.
    attribute: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReplyState {
    /// Expecting a type byte.
    Type,
    /// Inside a line-typed value (`+ - : , # _ (`), until `\n`.
    Line,
    /// Inside a length header of type `kind`, accumulating digits until `\n`.
    Length { kind: u8 },
    /// Inside a bulk payload plus its CRLF.
    Body { left: u64 },
}

/// Which element of a top-level aggregate is being read into the frame's summary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Capture {
    None,
    First,
    Third,
}

/// Incremental framer of the upstream's replies.
#[derive(Debug)]
pub struct ReplyFramer {
    state: ReplyState,
    /// Open aggregates, outermost first.
    stack: Vec<Level>,
    number: u64,
    negative: bool,
    digits: u32,
    in_frame: bool,
    /// The frame's kind has been decided (attributes are skipped to find it).
    typed: bool,
    frame: Frame,
    capture: Capture,
    third: LineHead,
}

impl Default for ReplyFramer {
    fn default() -> Self {
        ReplyFramer {
            state: ReplyState::Type,
            stack: Vec::new(),
            number: 0,
            negative: false,
            digits: 0,
            in_frame: false,
            typed: false,
            frame: Frame::default(),
            capture: Capture::None,
            third: LineHead::default(),
        }
    }
}

impl ReplyFramer {
    /// Whether the stream is between two top-level frames.
    pub fn at_boundary(&self) -> bool {
        !self.in_frame
    }

    /// Scans `chunk` from `from` and stops at the first boundary, returning it with the offset
    /// to resume from; `(chunk.len(), None)` when the chunk ends inside or between frames.
    pub fn next(
        &mut self,
        chunk: &[u8],
        from: usize,
    ) -> Result<(usize, Option<Boundary>), ReplyError> {
        let mut p = from;
        while p < chunk.len() {
            match self.state {
                ReplyState::Type => {
                    let kind = chunk[p];
                    let start = !self.in_frame;
                    if start {
                        self.in_frame = true;
                        self.typed = false;
                        self.frame = Frame::default();
                    }
                    if !self.typed && kind != b'|' {
                        self.typed = true;
                        self.frame.kind = kind;
                        self.frame.push =
                            kind == b'>' && self.stack.iter().all(|level| level.attribute);
                    }
                    self.capture = self.capture_for(kind);
                    self.state = match kind {
                        b'+' | b'-' | b':' | b',' | b'#' | b'_' | b'(' => {
                            if self.stack.is_empty() {
                                self.frame.head.push(&[kind]);
                            }
                            ReplyState::Line
                        }
                        b'$' | b'=' | b'!' | b'*' | b'~' | b'>' | b'%' | b'|' => {
                            self.number = 0;
                            self.negative = false;
                            self.digits = 0;
                            ReplyState::Length { kind }
                        }
                        other => return Err(ReplyError::UnknownType(other)),
                    };
                    p += 1;
                    if start {
                        return Ok((p, Some(Boundary::Start { at: p - 1, kind })));
                    }
                }
                ReplyState::Line => {
                    let (line, end) = match memchr(b'\n', &chunk[p..]) {
                        Some(i) => (&chunk[p..p + i], Some(p + i + 1)),
                        None => (&chunk[p..], None),
                    };
                    if self.stack.is_empty() {
                        self.frame.head.push(line);
                    } else if self.capture == Capture::Third {
                        self.third.push(line);
                    }
                    let Some(end) = end else {
                        p = chunk.len();
                        continue;
                    };
                    p = end;
                    self.state = ReplyState::Type;
                    if self.capture == Capture::Third {
                        self.frame.third = parse_integer(self.third.as_bytes());
                    }
                    if let Some(end) = self.element_done(p) {
                        return Ok((p, Some(end)));
                    }
                }
                ReplyState::Length { kind } => {
                    let b = chunk[p];
                    p += 1;
                    match b {
                        b'0'..=b'9' => {
                            self.digits += 1;
                            self.number = self
                                .number
                                .checked_mul(10)
                                .and_then(|n| n.checked_add(u64::from(b - b'0')))
                                .ok_or(ReplyError::InvalidLength)?;
                        }
                        b'-' if self.digits == 0 && !self.negative => self.negative = true,
                        b'\r' => {}
                        b'\n' => {
                            if self.digits == 0 {
                                return Err(ReplyError::InvalidLength);
                            }
                            if let Some(end) = self.header_done(kind, p)? {
                                return Ok((p, Some(end)));
                            }
                        }
                        _ => return Err(ReplyError::InvalidLength),
                    }
                }
                ReplyState::Body { left } => {
                    let take = left.min((chunk.len() - p) as u64);
                    if self.capture == Capture::First {
                        self.frame.first.push(&chunk[p..p + take as usize]);
                    }
                    p += take as usize;
                    if take == left {
                        self.state = ReplyState::Type;
                        if let Some(end) = self.element_done(p) {
                            return Ok((p, Some(end)));
                        }
                    } else {
                        self.state = ReplyState::Body { left: left - take };
                    }
                }
            }
        }
        Ok((chunk.len(), None))
    }

    /// Whether the element starting now, of type `kind`, goes into the frame's summary: the
    /// first (a bulk name) or third (an integer) element of a top-level array or push.
    fn capture_for(&mut self, kind: u8) -> Capture {
        let [level] = self.stack[..] else {
            return Capture::None;
        };
        if level.attribute || level.run != 1 {
            return Capture::None;
        }
        match (self.frame.elements - level.left, kind) {
            (0, b'$') => Capture::First,
            (2, b':') => {
                self.third = LineHead::default();
                Capture::Third
            }
            _ => Capture::None,
        }
    }

    fn header_done(&mut self, kind: u8, p: usize) -> Result<Option<Boundary>, ReplyError> {
        self.state = ReplyState::Type;
        if self.negative {
            // Only -1 (null) is meaningful; Redis sends nothing else negative.
            return Ok(self.element_done(p));
        }
        let n = self.number;
        match kind {
            b'$' | b'=' | b'!' => {
                self.state = ReplyState::Body { left: n + 2 };
                Ok(None)
            }
            _ => {
                let attribute = kind == b'|';
                let elements = if matches!(kind, b'%' | b'|') {
                    n.checked_mul(2).ok_or(ReplyError::InvalidLength)?
                } else {
                    n
                };
                if self.stack.is_empty() && !attribute {
                    self.frame.elements = elements;
                }
                if elements == 0 {
                    // An empty attribute is only a prefix; an empty aggregate is an element.
                    return Ok(if attribute {
                        None
                    } else {
                        self.element_done(p)
                    });
                }
                self.open(elements, attribute)?;
                Ok(None)
            }
        }
    }

    /// An aggregate of `elements` opens inside the element being read.
    fn open(&mut self, elements: u64, attribute: bool) -> Result<(), ReplyError> {
        if let Some(top) = self.stack.last_mut() {
            if elements == 1 && !attribute && !top.attribute {
                top.run = top
                    .run
                    .checked_add(1)
                    .ok_or(ReplyError::TooDeep(MAX_LEVELS))?;
                return Ok(());
            }
        }
        if self.stack.len() >= MAX_LEVELS {
            return Err(ReplyError::TooDeep(MAX_LEVELS));
        }
        self.stack.push(Level {
            left: elements,
            run: 1,
            attribute,
        });
        Ok(())
    }

    /// One element is complete; returns the end boundary when that closes a top-level frame.
    fn element_done(&mut self, p: usize) -> Option<Boundary> {
        self.capture = Capture::None;
        loop {
            let Some(top) = self.stack.last_mut() else {
                self.in_frame = false;
                return Some(Boundary::End {
                    at: p,
                    frame: self.frame,
                });
            };
            // The inner levels of a run had only this element left: they all close with it.
            top.run = 1;
            top.left -= 1;
            if top.left > 0 {
                return None;
            }
            let level = self.stack.pop().expect("checked above");
            if level.attribute {
                // The value the attribute describes is still to come in the same slot.
                return None;
            }
        }
    }
}

/// The value of an integer line (`:3\r`), when it is one.
fn parse_integer(line: &[u8]) -> Option<i64> {
    let digits = line.strip_suffix(b"\r").unwrap_or(line);
    std::str::from_utf8(digits).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(chunks: &[&[u8]]) -> Vec<Frame> {
        let mut f = ReplyFramer::default();
        let mut out = Vec::new();
        for chunk in chunks {
            let mut p = 0;
            loop {
                let (next, b) = f.next(chunk, p).unwrap();
                p = next;
                match b {
                    Some(Boundary::End { frame, .. }) => out.push(frame),
                    Some(Boundary::Start { .. }) => {}
                    None => break,
                }
            }
        }
        out
    }

    /// Every way of splitting `stream` in two gives the same frames as the whole.
    fn same_at_every_split(stream: &[u8]) -> Vec<Frame> {
        let whole = frames(&[stream]);
        for split in 0..stream.len() {
            assert_eq!(
                frames(&[&stream[..split], &stream[split..]]),
                whole,
                "split at {split}"
            );
        }
        whole
    }

    #[test]
    fn finds_reply_boundaries_across_chunks() {
        let stream: &[u8] = b"+RESET\r\n*2\r\n$3\r\nfoo\r\n%1\r\n+a\r\n:1\r\n>2\r\n+x\r\n+y\r\n|1\r\n+k\r\n+v\r\n:5\r\n$-1\r\n*0\r\n";
        let whole = same_at_every_split(stream);
        assert_eq!(whole.len(), 6);
        assert_eq!(whole[0].head.as_bytes(), b"+RESET\r");
        assert!(!whole[1].push && whole[2].push, "the push is flagged");
        assert_eq!(
            whole[3].head.as_bytes(),
            b":5\r",
            "the attribute is a prefix of the integer"
        );
    }

    #[test]
    fn summarises_pubsub_frames() {
        let stream: &[u8] = b"*3\r\n$9\r\nsubscribe\r\n$1\r\na\r\n:12\r\n\
>3\r\n$7\r\nmessage\r\n$1\r\na\r\n$5\r\nhello\r\n\
*2\r\n$4\r\npong\r\n$0\r\n\r\n*3\r\n*1\r\n$9\r\nsubscribe\r\n$1\r\na\r\n:1\r\n";
        let f = same_at_every_split(stream);
        assert_eq!(f.len(), 4);
        assert_eq!(
            (f[0].elements, f[0].first.as_bytes()),
            (3, &b"subscribe\r\n"[..])
        );
        assert_eq!(f[0].third, Some(12));
        assert!(f[1].push);
        assert_eq!(f[1].first.as_bytes(), b"message\r\n");
        assert_eq!(f[1].third, None, "the third element is a bulk string");
        assert_eq!(
            (f[2].elements, f[2].first.as_bytes()),
            (2, &b"pong\r\n"[..])
        );
        assert_eq!(
            f[3].first.as_bytes(),
            b"",
            "a nested name is not the frame's first element"
        );
        assert_eq!(f[3].third, Some(1));
    }

    #[test]
    fn follows_lua_nesting_thousands_deep_in_one_entry() {
        // What `EVAL "local a = {}; local b = {a}; a[1] = b; return a" 0` makes Redis send.
        let depth = 100_000;
        let opening = b"*1\r\n".repeat(depth);
        let mut f = ReplyFramer::default();
        let (p, _) = f.next(&opening, 0).unwrap();
        assert_eq!(f.next(&opening, p).unwrap(), (opening.len(), None));
        assert_eq!(f.stack.len(), 1, "one stack entry for the whole run");
        assert_eq!(f.stack[0].run as usize, depth);
        let rest = b"-ERR reached lua stack limit\r\n+PONG\r\n";
        let (p, b) = f.next(rest, 0).unwrap();
        assert!(matches!(b, Some(Boundary::End { .. })));
        let (_, b) = f.next(rest, p).unwrap();
        assert!(matches!(b, Some(Boundary::Start { kind: b'+', .. })));
    }

    #[test]
    fn nesting_with_siblings_is_bounded() {
        let run = |stream: &[u8]| {
            let mut f = ReplyFramer::default();
            let mut p = 0;
            loop {
                match f.next(stream, p) {
                    Ok((_, None)) => return Ok(()),
                    Ok((next, _)) => p = next,
                    Err(e) => return Err(e),
                }
            }
        };
        let mut stream = b"*2\r\n".repeat(MAX_LEVELS);
        assert_eq!(run(&stream), Ok(()), "at the limit");
        stream.extend_from_slice(b"*2\r\n");
        assert_eq!(run(&stream), Err(ReplyError::TooDeep(MAX_LEVELS)));
    }

    #[test]
    fn runs_close_level_by_level_when_siblings_follow() {
        // [[[x]], y]: the run of one-element arrays ends inside a two-element one.
        let stream: &[u8] = b"*2\r\n*1\r\n*1\r\n:1\r\n:2\r\n+OK\r\n*1\r\n*2\r\n*1\r\n:1\r\n:2\r\n";
        let f = same_at_every_split(stream);
        assert_eq!(f.len(), 3);
        assert_eq!(f[1].head.as_bytes(), b"+OK\r");
    }
}
