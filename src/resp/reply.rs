//! The upstream's side: top-level reply boundaries in a byte stream, RESP2 and RESP3.

use memchr::memchr;
use thiserror::Error;

/// A reply boundary found by [`ReplyFramer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Boundary {
    /// A top-level frame begins at this offset; `kind` is its type byte.
    Start { at: usize, kind: u8 },
    /// The top-level frame ends just before this offset. `push` tells an out-of-band RESP3
    /// push from a reply; `head` holds the first bytes of a simple reply's line.
    End {
        at: usize,
        push: bool,
        head: LineHead,
    },
}

/// The first bytes of a top-level simple reply (`+RESET`, `-WRONGPASS ...`), for matching.
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
    #[error("replies nested deeper than {0} levels")]
    TooDeep(usize),
}

/// Replies nested deeper than this are refused rather than tracked.
const MAX_DEPTH: usize = 1024;

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

/// Incremental framer of the upstream's replies.
#[derive(Debug)]
pub struct ReplyFramer {
    state: ReplyState,
    /// Open aggregates: elements still to come, and whether it is an attribute (a prefix that
    /// does not count as an element of its parent).
    stack: Vec<(u64, bool)>,
    number: u64,
    negative: bool,
    digits: u32,
    in_frame: bool,
    push: bool,
    /// The frame's kind has been decided (attributes are skipped to find it).
    typed: bool,
    head: LineHead,
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
            push: false,
            typed: false,
            head: LineHead::default(),
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
                        self.push = false;
                        self.typed = false;
                        self.head = LineHead::default();
                    }
                    if !self.typed && kind != b'|' {
                        self.typed = true;
                        self.push = kind == b'>' && self.stack.iter().all(|&(_, attr)| attr);
                    }
                    self.state = match kind {
                        b'+' | b'-' | b':' | b',' | b'#' | b'_' | b'(' => {
                            if self.stack.is_empty() {
                                self.head.push(&[kind]);
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
                ReplyState::Line => match memchr(b'\n', &chunk[p..]) {
                    Some(i) => {
                        if self.stack.is_empty() {
                            self.head.push(&chunk[p..p + i]);
                        }
                        p += i + 1;
                        self.state = ReplyState::Type;
                        if let Some(end) = self.element_done(p) {
                            return Ok((p, Some(end)));
                        }
                    }
                    None => {
                        if self.stack.is_empty() {
                            self.head.push(&chunk[p..]);
                        }
                        p = chunk.len();
                    }
                },
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
                let elements = if matches!(kind, b'%' | b'|') {
                    n.checked_mul(2).ok_or(ReplyError::InvalidLength)?
                } else {
                    n
                };
                if elements == 0 {
                    // An empty attribute is only a prefix; an empty aggregate is an element.
                    return Ok(if kind == b'|' {
                        None
                    } else {
                        self.element_done(p)
                    });
                }
                if self.stack.len() >= MAX_DEPTH {
                    return Err(ReplyError::TooDeep(MAX_DEPTH));
                }
                self.stack.push((elements, kind == b'|'));
                Ok(None)
            }
        }
    }

    /// One element is complete; returns the end boundary when that closes a top-level frame.
    fn element_done(&mut self, p: usize) -> Option<Boundary> {
        loop {
            let Some(top) = self.stack.last_mut() else {
                self.in_frame = false;
                return Some(Boundary::End {
                    at: p,
                    push: self.push,
                    head: self.head,
                });
            };
            top.0 -= 1;
            if top.0 > 0 {
                return None;
            }
            let (_, attribute) = self.stack.pop().expect("checked above");
            if attribute {
                // The value the attribute describes is still to come in the same slot.
                return None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn boundaries(chunks: &[&[u8]]) -> Vec<(bool, Vec<u8>)> {
        let mut f = ReplyFramer::default();
        let mut out = Vec::new();
        for chunk in chunks {
            let mut p = 0;
            loop {
                let (next, b) = f.next(chunk, p).unwrap();
                p = next;
                match b {
                    Some(Boundary::End { push, head, .. }) => {
                        out.push((push, head.as_bytes().to_vec()))
                    }
                    Some(Boundary::Start { .. }) => {}
                    None => break,
                }
            }
        }
        out
    }

    #[test]
    fn finds_reply_boundaries_across_chunks() {
        let stream: &[u8] = b"+RESET\r\n*2\r\n$3\r\nfoo\r\n%1\r\n+a\r\n:1\r\n>2\r\n+x\r\n+y\r\n|1\r\n+k\r\n+v\r\n:5\r\n$-1\r\n*0\r\n";
        let whole = boundaries(&[stream]);
        assert_eq!(whole.len(), 6);
        assert_eq!(whole[0], (false, b"+RESET\r".to_vec()));
        assert!(!whole[1].0 && whole[2].0, "the push is flagged");
        assert_eq!(
            whole[3].1,
            b":5\r".to_vec(),
            "the attribute is a prefix of the integer"
        );
        for split in 0..stream.len() {
            assert_eq!(
                boundaries(&[&stream[..split], &stream[split..]]),
                whole,
                "split at {split}"
            );
        }
    }
}
