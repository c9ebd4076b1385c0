//! Streaming RESP framing: where commands and replies begin and end, without buffering payloads.
//!
//! [`RequestFramer`] reads what a client sends the way Redis's own `processInputBuffer` does
//! (multibulk and inline, the same limits, the same error words), so that whatever the
//! ambassador forwards, Redis parses identically, and whatever the ambassador rejects, Redis
//! would have rejected with the same message. It never copies the bytes it frames: it reports
//! offsets into the caller's buffer. A command whose name needs no inspection is reported as a
//! stream as soon as its name is known, so a 512 MB value passes through a buffer of a few KiB.
//!
//! [`ReplyFramer`] finds top-level reply boundaries (RESP2 and RESP3, pushes and attributes
//! included) in a byte stream fed to it in arbitrary chunks; it keeps a few counters, never
//! a payload.
//!
//! redis-protocol decodes whole frames into memory, which is right for the ambassador's own
//! handshake replies but not for relaying a value of any size, hence these two state machines.

use memchr::{memchr, memchr2};
use thiserror::Error;

/// Redis's `PROTO_INLINE_MAX_SIZE`: the longest inline command or count line.
pub const INLINE_MAX: usize = 64 * 1024;
/// Redis's `proto-max-bulk-len` default.
pub const MAX_BULK: i64 = 512 * 1024 * 1024;
/// Redis accepts up to `INT_MAX` arguments; the framer never allocates per argument.
pub const MAX_MULTIBULK: i64 = i32::MAX as i64;
/// Redis's limits for connections that have not authenticated (CVE-2021-32675).
pub const UNAUTH_MAX_MULTIBULK: i64 = 10;
pub const UNAUTH_MAX_BULK: i64 = 16 * 1024;
/// How many leading arguments of a command are kept for the filter to look at.
pub const HEAD_ARGS: usize = 16;
/// A command the filter must see whole (AUTH, HELLO, CLIENT) may be at most this long.
pub const INSPECT_MAX: usize = 64 * 1024;
/// Command names are short; a first argument longer than this is never one the filter inspects.
const NAME_MAX: i64 = 64;

/// A client sent something that is not RESP. The `Display` text is Redis's own wording.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ProtocolError {
    #[error("too big inline request")]
    TooBigInline,
    #[error("unbalanced quotes in request")]
    UnbalancedQuotes,
    #[error("too big mbulk count string")]
    TooBigMultibulkCount,
    #[error("invalid multibulk length")]
    InvalidMultibulkLength,
    #[error("unauthenticated multibulk length")]
    UnauthenticatedMultibulkLength,
    #[error("too big bulk count string")]
    TooBigBulkCount,
    #[error("expected '$', got '{}'", printable(*.0))]
    ExpectedDollar(u8),
    #[error("invalid bulk length")]
    InvalidBulkLength,
    #[error("unauthenticated bulk length")]
    UnauthenticatedBulkLength,
    /// Not Redis's: the ambassador's own bound on the commands it must hold whole.
    #[error("ambassador: command longer than {INSPECT_MAX} bytes")]
    TooLongToInspect,
}

impl ProtocolError {
    /// The error reply a client gets, as Redis sends it.
    pub fn reply(&self) -> Vec<u8> {
        match self {
            ProtocolError::TooLongToInspect => format!("-ERR {self}\r\n").into_bytes(),
            _ => format!("-ERR Protocol error: {self}\r\n").into_bytes(),
        }
    }
}

/// Redis replaces CR and LF in error replies with spaces; other bytes go out as they are.
fn printable(b: u8) -> char {
    match b {
        b'\r' | b'\n' => ' ',
        _ => b as char,
    }
}

/// What the framer found at the front of the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// A whole command of `len` bytes; [`RequestFramer::command`] shows its arguments.
    Command { len: usize },
    /// The first `len` bytes of a command that is forwarded while it arrives;
    /// [`RequestFramer::command`] shows the arguments known so far (at least its name,
    /// unless the name is too long to be one the filter knows).
    StreamStart { len: usize },
    /// `len` more bytes of the command being streamed.
    StreamMore { len: usize },
    /// The last `len` bytes of the command being streamed.
    StreamEnd { len: usize },
    /// `len` bytes that Redis reads and ignores (an empty line, `*0`, `*-1`).
    Ignored { len: usize },
    /// Nothing can be decided until more bytes arrive.
    Incomplete,
}

impl Request {
    /// How many bytes at the front of the buffer this event accounts for.
    pub fn len(&self) -> usize {
        match *self {
            Request::Command { len }
            | Request::StreamStart { len }
            | Request::StreamMore { len }
            | Request::StreamEnd { len }
            | Request::Ignored { len } => len,
            Request::Incomplete => 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A command's arguments, borrowed from the client's buffer: all of them for a command held
/// whole, the leading [`HEAD_ARGS`] of one that streams.
#[derive(Debug, Clone)]
pub struct Command<'a> {
    /// How many arguments the command declares in all.
    pub argc: u64,
    args: Args<'a>,
}

#[derive(Debug, Clone)]
enum Args<'a> {
    Ranges {
        buf: &'a [u8],
        ranges: &'a [(usize, usize)],
    },
    Inline(&'a [Vec<u8>]),
    Slices(Vec<&'a [u8]>),
}

impl<'a> Command<'a> {
    pub fn new(args: &[&'a [u8]]) -> Self {
        Command {
            argc: args.len() as u64,
            args: Args::Slices(args.to_vec()),
        }
    }

    fn known(&self) -> usize {
        match &self.args {
            Args::Ranges { ranges, .. } => ranges.len(),
            Args::Inline(a) => a.len(),
            Args::Slices(a) => a.len(),
        }
    }

    /// Argument `i`, if the framer kept it.
    pub fn arg(&self, i: usize) -> Option<&'a [u8]> {
        match &self.args {
            Args::Ranges { buf, ranges } => {
                ranges.get(i).map(|&(start, len)| &buf[start..start + len])
            }
            Args::Inline(a) => a.get(i).map(Vec::as_slice),
            Args::Slices(a) => a.get(i).copied(),
        }
    }

    /// Whether argument `i` is `word`, ignoring ASCII case.
    pub fn is(&self, i: usize, word: &str) -> bool {
        self.arg(i)
            .is_some_and(|a| a.eq_ignore_ascii_case(word.as_bytes()))
    }

    /// All arguments, when every one of them was kept.
    pub fn all(&self) -> Option<Vec<&'a [u8]>> {
        let known = self.known();
        (known as u64 == self.argc).then(|| (0..known).filter_map(|i| self.arg(i)).collect())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Start,
    Count,
    BulkLen,
    BulkBody,
    Inline,
}

/// Incremental parser of a client's byte stream. Offsets refer to the caller's buffer, whose
/// front is always the first byte not yet handed back through an event; the caller removes
/// exactly `event.len()` bytes from the front after each event.
#[derive(Debug)]
pub struct RequestFramer {
    /// Redis applies tighter limits before a connection has authenticated.
    pub authenticated: bool,
    state: State,
    /// Bytes of the current command already parsed (all still in the buffer).
    pos: usize,
    /// Where the search for the current line's end resumes, so trickled input is scanned once.
    scan: usize,
    argc: u64,
    seen: u64,
    /// Bytes of the current bulk (payload and its CRLF) not yet parsed.
    bulk_left: u64,
    /// Start and length of the arguments (all of them for a command held whole, the leading
    /// [`HEAD_ARGS`] for one that streams), relative to the buffer front.
    args: Vec<(usize, usize)>,
    /// The current command is forwarded while it arrives.
    streaming: bool,
    /// Some of the current command was already handed out as a stream piece.
    handed_out: bool,
    /// Bytes handed out by the last event, still to be discounted from the offsets.
    shift: usize,
    inline_args: Vec<Vec<u8>>,
}

impl Default for RequestFramer {
    fn default() -> Self {
        Self::new(true)
    }
}

impl RequestFramer {
    pub fn new(authenticated: bool) -> Self {
        RequestFramer {
            authenticated,
            state: State::Start,
            pos: 0,
            scan: 0,
            argc: 0,
            seen: 0,
            bulk_left: 0,
            args: Vec::new(),
            streaming: false,
            handed_out: false,
            shift: 0,
            inline_args: Vec::new(),
        }
    }

    /// The arguments of the command just reported by `Command` or `StreamStart`.
    /// `buf` must be the same buffer, before the caller removed the event's bytes.
    pub fn command<'a>(&'a self, buf: &'a [u8]) -> Command<'a> {
        let args = if self.inline_args.is_empty() {
            // Only arguments read to their end are in the buffer whole.
            let complete = self.args.len().min(self.seen as usize);
            Args::Ranges {
                buf,
                ranges: &self.args[..complete],
            }
        } else {
            Args::Inline(&self.inline_args)
        };
        Command {
            argc: self.argc,
            args,
        }
    }

    /// Frames the next event at the front of `buf`. `whole(name)` says whether a command with
    /// that name must be held until complete (so the filter can see all its arguments); any
    /// other command streams as soon as its name is known.
    pub fn next(
        &mut self,
        buf: &[u8],
        whole: impl Fn(&[u8]) -> bool,
    ) -> Result<Request, ProtocolError> {
        // The caller removed the bytes of the last streamed piece.
        if self.shift > 0 {
            self.pos -= self.shift;
            self.scan -= self.shift;
            self.shift = 0;
        }
        loop {
            match self.state {
                State::Start => {
                    self.inline_args.clear();
                    let Some(&first) = buf.first() else {
                        return Ok(Request::Incomplete);
                    };
                    self.scan = 0;
                    self.pos = 0;
                    self.state = if first == b'*' {
                        State::Count
                    } else {
                        State::Inline
                    };
                }
                State::Inline => return self.inline(buf),
                State::Count => {
                    let Some(line_end) =
                        self.line(buf, 0, b'\r', ProtocolError::TooBigMultibulkCount)?
                    else {
                        return Ok(Request::Incomplete);
                    };
                    let n = string2ll(&buf[1..line_end])
                        .filter(|&n| n <= MAX_MULTIBULK)
                        .ok_or(ProtocolError::InvalidMultibulkLength)?;
                    let len = line_end + 2;
                    if n <= 0 {
                        self.state = State::Start;
                        return Ok(Request::Ignored { len });
                    }
                    if !self.authenticated && n > UNAUTH_MAX_MULTIBULK {
                        return Err(ProtocolError::UnauthenticatedMultibulkLength);
                    }
                    self.argc = n as u64;
                    self.args.clear();
                    self.seen = 0;
                    self.streaming = false;
                    self.handed_out = false;
                    self.pos = len;
                    self.scan = len;
                    self.state = State::BulkLen;
                }
                State::BulkLen => {
                    if self.seen == self.argc {
                        return Ok(self.finish());
                    }
                    let Some(line_end) =
                        self.line(buf, self.pos, b'\r', ProtocolError::TooBigBulkCount)?
                    else {
                        return self.incomplete(buf, &whole);
                    };
                    // Redis looks at the type byte only once the whole line is there.
                    if buf[self.pos] != b'$' {
                        return Err(ProtocolError::ExpectedDollar(buf[self.pos]));
                    }
                    let n = string2ll(&buf[self.pos + 1..line_end])
                        .filter(|&n| (0..=MAX_BULK).contains(&n))
                        .ok_or(ProtocolError::InvalidBulkLength)?;
                    if !self.authenticated && n > UNAUTH_MAX_BULK {
                        return Err(ProtocolError::UnauthenticatedBulkLength);
                    }
                    self.pos = line_end + 2;
                    if self.args.len() < HEAD_ARGS || !self.streaming {
                        self.args.push((self.pos, n as usize));
                    }
                    // A long first argument is no command name the filter knows: stream it.
                    if self.seen == 0 && n > NAME_MAX {
                        self.streaming = true;
                    }
                    self.bulk_left = n as u64 + 2;
                    self.state = State::BulkBody;
                }
                State::BulkBody => {
                    let avail = (buf.len() - self.pos) as u64;
                    if avail < self.bulk_left {
                        return self.incomplete(buf, &whole);
                    }
                    // Like Redis, the two bytes after a payload are skipped, not checked.
                    self.pos += self.bulk_left as usize;
                    self.bulk_left = 0;
                    self.seen += 1;
                    self.scan = self.pos;
                    self.state = State::BulkLen;
                    if self.seen == 1 && !self.streaming {
                        self.streaming = !whole(self.name(buf));
                    }
                }
            }
        }
    }

    /// Finds the end of the current header line (the `stop` byte) starting at `line_start`.
    /// Like Redis (which searches with `strchr`), a NUL hides everything after it, Redis needs
    /// one more byte after a `\r` before it moves on, and a line longer than [`INLINE_MAX`] is
    /// an error.
    fn line(
        &mut self,
        buf: &[u8],
        line_start: usize,
        stop: u8,
        too_big: ProtocolError,
    ) -> Result<Option<usize>, ProtocolError> {
        let from = self.scan.max(line_start).min(buf.len());
        let found = memchr2(stop, 0, &buf[from..]).map(|i| from + i);
        match found {
            Some(at) if buf[at] == stop => {
                if at - line_start > INLINE_MAX {
                    return Err(too_big);
                }
                self.scan = at;
                if stop == b'\r' && at + 1 >= buf.len() {
                    return Ok(None);
                }
                Ok(Some(at))
            }
            _ => {
                if buf.len() - line_start > INLINE_MAX {
                    return Err(too_big);
                }
                self.scan = found.unwrap_or(buf.len());
                Ok(None)
            }
        }
    }

    fn inline(&mut self, buf: &[u8]) -> Result<Request, ProtocolError> {
        let Some(newline) = self.line(buf, 0, b'\n', ProtocolError::TooBigInline)? else {
            return Ok(Request::Incomplete);
        };
        let mut line = &buf[..newline];
        if let [rest @ .., b'\r'] = line {
            line = rest;
        }
        self.inline_args = split_args(line).ok_or(ProtocolError::UnbalancedQuotes)?;
        self.state = State::Start;
        let len = newline + 1;
        if self.inline_args.is_empty() {
            return Ok(Request::Ignored { len });
        }
        self.argc = self.inline_args.len() as u64;
        Ok(Request::Command { len })
    }

    /// Not enough bytes for the current command: hand out what can already be forwarded, or
    /// keep holding a command the filter must see whole, within [`INSPECT_MAX`].
    fn incomplete(
        &mut self,
        buf: &[u8],
        whole: &impl Fn(&[u8]) -> bool,
    ) -> Result<Request, ProtocolError> {
        if !self.streaming {
            if self.seen >= 1 && !whole(self.name(buf)) {
                self.streaming = true;
            } else if buf.len() > INSPECT_MAX {
                return Err(ProtocolError::TooLongToInspect);
            } else {
                return Ok(Request::Incomplete);
            }
        }
        // Every byte of a partial payload can go at once; a partial `$len` line waits.
        if self.state == State::BulkBody {
            let take = ((buf.len() - self.pos) as u64).min(self.bulk_left);
            self.pos += take as usize;
            self.bulk_left -= take;
            self.scan = self.pos;
        }
        let len = self.pos;
        if len == 0 {
            return Ok(Request::Incomplete);
        }
        self.shift = len;
        if std::mem::replace(&mut self.handed_out, true) {
            Ok(Request::StreamMore { len })
        } else {
            Ok(Request::StreamStart { len })
        }
    }

    fn name<'a>(&self, buf: &'a [u8]) -> &'a [u8] {
        let (start, len) = self.args[0];
        &buf[start..start + len]
    }

    fn finish(&mut self) -> Request {
        self.state = State::Start;
        let len = self.pos;
        if self.handed_out {
            Request::StreamEnd { len }
        } else {
            Request::Command { len }
        }
    }
}

/// Appends a RESP array header. Used for the few commands the ambassador writes itself;
/// redis-protocol's encoder would need the arguments copied into `Bytes`, which for a password
/// means a copy that is never zeroed.
pub fn write_array(out: &mut Vec<u8>, len: usize) {
    out.push(b'*');
    out.extend_from_slice(len.to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Appends one bulk string.
pub fn write_bulk(out: &mut Vec<u8>, arg: &[u8]) {
    out.push(b'$');
    out.extend_from_slice(arg.len().to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(arg);
    out.extend_from_slice(b"\r\n");
}

/// Redis's `string2ll`: an optional minus, then digits without a leading zero, no sign `+`.
pub fn string2ll(s: &[u8]) -> Option<i64> {
    match s {
        [] => None,
        [b'0'] => Some(0),
        [b'-', digits @ ..] => {
            let v = unsigned(digits)?;
            if v > i64::MAX as u64 + 1 {
                None
            } else {
                Some((v as i64).wrapping_neg())
            }
        }
        digits => unsigned(digits).and_then(|v| i64::try_from(v).ok()),
    }
}

fn unsigned(digits: &[u8]) -> Option<u64> {
    match digits.first() {
        Some(b'1'..=b'9') => {}
        _ => return None,
    }
    digits.iter().try_fold(0u64, |acc, &d| {
        if !d.is_ascii_digit() {
            return None;
        }
        acc.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

/// Redis's `sdssplitargs`, used for inline commands: blanks separate arguments, `"..."` takes
/// `\n`, `\r`, `\t`, `\b`, `\a` and `\xHH` escapes, `'...'` takes `\'`, and a closing quote
/// must be followed by a blank. A NUL ends the line, as in C. `None` means unbalanced quotes.
pub fn split_args(line: &[u8]) -> Option<Vec<Vec<u8>>> {
    let line = match memchr(0, line) {
        Some(nul) => &line[..nul],
        None => line,
    };
    let blank = |b: u8| matches!(b, b' ' | b'\n' | b'\r' | b'\t' | 0x0b | 0x0c);
    let mut args = Vec::new();
    let mut p = 0;
    loop {
        while p < line.len() && blank(line[p]) {
            p += 1;
        }
        if p == line.len() {
            return Some(args);
        }
        let mut current = Vec::new();
        let (mut in_dq, mut in_sq) = (false, false);
        loop {
            let c = line.get(p).copied();
            if in_dq {
                let c = c?;
                let next = line.get(p + 1).copied();
                if c == b'\\' && next == Some(b'x') {
                    let hex = line.get(p + 2..p + 4).and_then(|h| {
                        let h = std::str::from_utf8(h).ok()?;
                        u8::from_str_radix(h, 16).ok().filter(|_| h.len() == 2)
                    });
                    if let Some(byte) =
                        hex.filter(|_| line[p + 2..p + 4].iter().all(u8::is_ascii_hexdigit))
                    {
                        current.push(byte);
                        p += 4;
                        continue;
                    }
                }
                if c == b'\\' && next.is_some() {
                    current.push(match next? {
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        b'b' => 0x08,
                        b'a' => 0x07,
                        other => other,
                    });
                    p += 2;
                } else if c == b'"' {
                    if next.is_some_and(|n| !blank(n)) {
                        return None;
                    }
                    p += 1;
                    break;
                } else {
                    current.push(c);
                    p += 1;
                }
            } else if in_sq {
                let c = c?;
                let next = line.get(p + 1).copied();
                if c == b'\\' && next == Some(b'\'') {
                    current.push(b'\'');
                    p += 2;
                } else if c == b'\'' {
                    if next.is_some_and(|n| !blank(n)) {
                        return None;
                    }
                    p += 1;
                    break;
                } else {
                    current.push(c);
                    p += 1;
                }
            } else {
                match c {
                    None | Some(b' ' | b'\n' | b'\r' | b'\t') => break,
                    Some(b'"') => in_dq = true,
                    Some(b'\'') => in_sq = true,
                    Some(other) => current.push(other),
                }
                p += 1;
            }
        }
        args.push(current);
    }
}

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

    fn all_whole(_: &[u8]) -> bool {
        true
    }

    #[test]
    fn string2ll_matches_redis() {
        assert_eq!(string2ll(b"0"), Some(0));
        assert_eq!(string2ll(b"12"), Some(12));
        assert_eq!(string2ll(b"-1"), Some(-1));
        assert_eq!(string2ll(b"01"), None);
        assert_eq!(string2ll(b"+1"), None);
        assert_eq!(string2ll(b"-0"), None);
        assert_eq!(string2ll(b""), None);
        assert_eq!(string2ll(b"-"), None);
        assert_eq!(string2ll(b"9223372036854775807"), Some(i64::MAX));
        assert_eq!(string2ll(b"9223372036854775808"), None);
        assert_eq!(string2ll(b"-9223372036854775808"), Some(i64::MIN));
    }

    #[test]
    fn split_args_matches_sdssplitargs() {
        let s = |l: &[u8]| {
            split_args(l).map(|v| {
                v.into_iter()
                    .map(|a| String::from_utf8_lossy(&a).into_owned())
                    .collect::<Vec<_>>()
            })
        };
        assert_eq!(
            s(b"SET a b"),
            Some(vec!["SET".into(), "a".into(), "b".into()])
        );
        assert_eq!(s(b"  "), Some(vec![]));
        assert_eq!(
            s(b"SET \"a b\" 'c d'"),
            Some(vec!["SET".into(), "a b".into(), "c d".into()])
        );
        assert_eq!(
            s(b"ECHO \"\\x41\\n\""),
            Some(vec!["ECHO".into(), "A\n".into()])
        );
        assert_eq!(s(b"ECHO \"abc"), None);
        assert_eq!(s(b"ECHO \"abc\"d"), None);
        assert_eq!(
            s(b"ECHO 'it\\'s'"),
            Some(vec!["ECHO".into(), "it's".into()])
        );
        assert_eq!(s(b"PING\0junk"), Some(vec!["PING".into()]));
    }

    #[test]
    fn frames_a_pipeline_of_whole_commands() {
        let buf = b"*1\r\n$4\r\nPING\r\n*2\r\n$4\r\nAUTH\r\n$1\r\nx\r\n";
        let mut f = RequestFramer::default();
        assert_eq!(f.next(buf, all_whole), Ok(Request::Command { len: 14 }));
        assert!(f.command(buf).is(0, "ping"));
        let rest = &buf[14..];
        assert_eq!(f.next(rest, all_whole), Ok(Request::Command { len: 21 }));
        let cmd = f.command(rest);
        assert_eq!(cmd.argc, 2);
        assert_eq!(cmd.arg(1), Some(&b"x"[..]));
    }

    #[test]
    fn streams_a_large_value_once_the_name_is_known() {
        let mut f = RequestFramer::default();
        let stream = |_: &[u8]| false;
        let head = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$10\r\n01234";
        assert_eq!(
            f.next(head, stream),
            Ok(Request::StreamStart { len: head.len() })
        );
        assert_eq!(f.next(b"567", stream), Ok(Request::StreamMore { len: 3 }));
        assert_eq!(
            f.next(b"89\r\n*1", stream),
            Ok(Request::StreamEnd { len: 4 })
        );
    }

    #[test]
    fn reports_redis_protocol_errors() {
        let mut f = RequestFramer::default();
        assert_eq!(
            f.next(b"*x\r\n", all_whole),
            Err(ProtocolError::InvalidMultibulkLength)
        );
        let mut f = RequestFramer::default();
        assert_eq!(
            f.next(b"*1\r\nfoo\r\n", all_whole),
            Err(ProtocolError::ExpectedDollar(b'f'))
        );
        let mut f = RequestFramer::default();
        assert_eq!(
            f.next(b"*1\r\n$-3\r\n", all_whole),
            Err(ProtocolError::InvalidBulkLength)
        );
        let mut f = RequestFramer::default();
        assert_eq!(
            f.next(b"*2147483648\r\n", all_whole),
            Err(ProtocolError::InvalidMultibulkLength)
        );
        let mut f = RequestFramer::new(false);
        assert_eq!(
            f.next(b"*11\r\n", all_whole),
            Err(ProtocolError::UnauthenticatedMultibulkLength)
        );
        assert_eq!(
            ProtocolError::ExpectedDollar(b'\r').reply(),
            b"-ERR Protocol error: expected '$', got ' '\r\n"
        );
    }

    #[test]
    fn ignores_empty_commands_like_redis() {
        let mut f = RequestFramer::default();
        assert_eq!(
            f.next(b"\r\nPING\r\n", all_whole),
            Ok(Request::Ignored { len: 2 })
        );
        assert_eq!(
            f.next(b"*0\r\n", all_whole),
            Ok(Request::Ignored { len: 4 })
        );
        assert_eq!(
            f.next(b"*-5\r\n", all_whole),
            Ok(Request::Ignored { len: 5 })
        );
    }

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
