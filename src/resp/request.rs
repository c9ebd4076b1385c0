//! The client's side: Redis's own parser, as a state machine that hands out offsets.
use memchr::memchr2;

use super::syntax::{split_args, string2ll};
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
                    // A command held whole is refused as soon as its declared size passes the
                    // bound: the decision depends on its bytes, never on how reads split them.
                    let held = self.seen >= 1 && !self.streaming;
                    if held && self.pos as u64 + n as u64 + 2 > INSPECT_MAX as u64 {
                        return Err(ProtocolError::TooLongToInspect);
                    }
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
    /// keep holding a command the filter must see whole.
    fn incomplete(
        &mut self,
        buf: &[u8],
        whole: &impl Fn(&[u8]) -> bool,
    ) -> Result<Request, ProtocolError> {
        if !self.streaming {
            if self.seen >= 1 && !whole(self.name(buf)) {
                self.streaming = true;
            } else {
                // Held: bounded by the declared sizes (checked at each header, below) and by
                // INLINE_MAX for a header line still arriving.
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

#[cfg(test)]
mod tests {
    use super::*;

    fn all_whole(_: &[u8]) -> bool {
        true
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

    /// Feeds `input` in two reads split at `at`; the first error, if any.
    fn first_error(input: &[u8], at: usize) -> Option<ProtocolError> {
        let mut f = RequestFramer::default();
        let mut buf = Vec::new();
        for chunk in [&input[..at], &input[at..]] {
            buf.extend_from_slice(chunk);
            loop {
                match f.next(&buf, |n| n.eq_ignore_ascii_case(b"auth")) {
                    Err(e) => return Some(e),
                    Ok(Request::Incomplete) => break,
                    Ok(event) => drop(buf.drain(..event.len())),
                }
            }
        }
        None
    }

    #[test]
    fn limits_do_not_depend_on_how_reads_split_the_bytes() {
        // A held AUTH longer than INSPECT_MAX: refused at its header, whatever the split.
        let mut auth = b"*2\r\n$4\r\nAUTH\r\n$70144\r\n".to_vec();
        auth.extend(std::iter::repeat_n(b'a', 70144));
        auth.extend(b"\r\n");
        for at in [1, 20, 66000, auth.len()] {
            assert_eq!(
                first_error(&auth, at),
                Some(ProtocolError::TooLongToInspect),
                "split at {at}"
            );
        }
        // A `$len` line with no CR growing past INLINE_MAX before any name is known: Redis's
        // error, not the ambassador's bound, whatever the split.
        let mut long = b"*1\r\n$".to_vec();
        long.extend(std::iter::repeat_n(b'1', INLINE_MAX));
        for at in [5, 65538, long.len()] {
            assert_eq!(
                first_error(&long, at),
                Some(ProtocolError::TooBigBulkCount),
                "split at {at}"
            );
        }
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
}
