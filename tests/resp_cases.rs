//! The protocol cases in `resp-tests/cases`, each run through the ambassador and directly
//! against the same real redis-server. Redis is the reference: wherever a case declares no
//! `direct` difference, the ambassador must answer byte for byte as Redis does. The case
//! format is described in `resp-tests/README.md`.
//!
//! All failures are collected and reported together, so one run shows every broken case.

mod common;

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use redis_ambassador::filter::needs_whole;
use redis_ambassador::resp::{ProtocolError, Request, RequestFramer};
use redis_protocol::resp3::types::OwnedFrame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Between two `send` lines, so each write reaches the peer as its own read.
const PAUSE: Duration = Duration::from_millis(20);
/// The same between the two halves of a split run; shorter, as there are hundreds of them.
const SPLIT_PAUSE: Duration = Duration::from_millis(5);
/// How long a run may take to produce the expected bytes (or the close).
const MATCH_DEADLINE: Duration = Duration::from_secs(5);
/// After the expected bytes, how long to watch for bytes (or a close) nobody expected.
const QUIET: Duration = Duration::from_millis(100);
/// Inputs shorter than this are split over the network at every offset.
const SPLIT_EVERY_BELOW: usize = 64;

// ---------------------------------------------------------------------------------------
// The case files
// ---------------------------------------------------------------------------------------

/// A piece of an expected byte string: literal bytes, or a wildcard.
#[derive(Debug, Clone, PartialEq)]
enum Piece {
    Lit(Vec<u8>),
    /// `{*}`: the bytes of one line up to the next literal, which differ between Redis
    /// installations (the server's version) but not between two connections to one server:
    /// the ambassador's must be the same bytes as Redis's.
    Same,
    /// `{n}`: one or more digits that differ between two connections (a client id, a count
    /// of clients, a replication offset): not compared.
    Number,
    /// `{rdb}`: a `$<len>` line and `len` bytes of an RDB file (which holds its creation
    /// time and the server's memory use): its length and `REDIS` magic are checked.
    Rdb,
}

const WILDCARDS: [(&str, Piece); 3] = [
    ("{*}", Piece::Same),
    ("{n}", Piece::Number),
    ("{rdb}", Piece::Rdb),
];

#[derive(Debug, Clone, Default)]
struct Pattern(Vec<Piece>);

impl Pattern {
    /// Appends pieces, merging adjacent literals so matching sees maximal literals.
    fn extend(&mut self, pieces: Vec<Piece>) {
        for piece in pieces {
            match (self.0.last_mut(), piece) {
                (Some(Piece::Lit(last)), Piece::Lit(more)) => last.extend(more),
                (_, piece) => self.0.push(piece),
            }
        }
    }

    fn has_wildcard(&self) -> bool {
        self.0.iter().any(|p| !matches!(p, Piece::Lit(_)))
    }

    /// Whether some of the bytes may differ from Redis's (`{n}`, `{rdb}`).
    fn has_free_wildcard(&self) -> bool {
        self.0
            .iter()
            .any(|p| matches!(p, Piece::Number | Piece::Rdb))
    }

    /// `{*}` and `{n}` stop at the literal after them, so one must follow; after `{n}` it
    /// must not start with a digit.
    fn check(&self) -> Result<(), String> {
        for (i, piece) in self.0.iter().enumerate() {
            let next = self.0.get(i + 1);
            match (piece, next) {
                (Piece::Same | Piece::Number, None) => {
                    return Err("a pattern may not end in `{*}` or `{n}`: say what follows".into())
                }
                (Piece::Same | Piece::Number, Some(p)) if !matches!(p, Piece::Lit(_)) => {
                    return Err("`{*}` and `{n}` must be followed by literal bytes".into())
                }
                (Piece::Number, Some(Piece::Lit(l))) if l[0].is_ascii_digit() => {
                    return Err("`{n}` may not be followed by a digit".into())
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn show(&self) -> String {
        let parts: Vec<String> = self
            .0
            .iter()
            .map(|p| match p {
                Piece::Lit(b) => escape(b),
                Piece::Same => "{*}".into(),
                Piece::Number => "{n}".into(),
                Piece::Rdb => "{rdb}".into(),
            })
            .collect();
        format!("\"{}\"", parts.concat())
    }
}

/// One step of a case: optionally a command on another connection first, then writes on the
/// case's connection, then the bytes that must arrive before the next step.
#[derive(Default)]
struct Phase {
    /// Written on a separate, authenticated direct connection once everything the phase
    /// before expected has arrived; its reply is awaited (and must not be an error).
    other: Option<Vec<u8>>,
    /// One entry per write.
    sends: Vec<Vec<u8>>,
    expect: Pattern,
}

struct Case {
    name: String,
    /// At least one; more only with `other` lines.
    phases: Vec<Phase>,
    /// What a direct connection gets instead, when the case declares a difference.
    direct: Option<Pattern>,
    /// With `direct`: the writes that make Redis, on a direct connection, answer what the
    /// ambassador answers to `send` (the profile's credentials where the client sent
    /// made-up ones). One entry per write.
    reference: Vec<Vec<u8>>,
    close: bool,
    split: bool,
}

impl Case {
    fn all_sent(&self) -> Vec<u8> {
        self.phases[0].sends.concat()
    }

    fn sends(&self) -> &[Vec<u8>] {
        &self.phases[0].sends
    }

    fn expect(&self) -> &Pattern {
        &self.phases[0].expect
    }

    /// The case's own steps, for the runs that send what the case sends.
    fn steps(&self) -> Vec<Step<'_>> {
        self.phases
            .iter()
            .map(|p| Step {
                other: p.other.as_deref(),
                sends: &p.sends,
                expect: &p.expect,
            })
            .collect()
    }
}

fn case_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("resp-tests/cases")
}

/// Every `*.case` file, sorted by name so the run order is the numbering order.
fn load_cases() -> Vec<Case> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(case_dir())
        .expect("resp-tests/cases exists")
        .map(|e| e.expect("readable directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "case"))
        .collect();
    paths.sort();
    paths
        .iter()
        .map(|path| {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let text = std::fs::read_to_string(path).expect("readable case file");
            parse_case(&name, &text).unwrap_or_else(|e| panic!("{e}"))
        })
        .collect()
}

/// Which list a `more` line extends.
enum LastWrite {
    Send,
    Reference,
}

fn parse_case(name: &str, text: &str) -> Result<Case, String> {
    let mut case = Case {
        name: name.to_owned(),
        phases: vec![Phase::default()],
        direct: None,
        reference: Vec::new(),
        close: false,
        split: false,
    };
    let mut saw_expect = false;
    let mut last_write = None;
    for (i, line) in text.lines().enumerate() {
        let at = |msg: String| format!("{name}:{}: {msg}", i + 1);
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let (word, rest) = line.split_once(' ').unwrap_or((line, ""));
        let phase = case.phases.last_mut().expect("at least one phase");
        match word {
            "send" => {
                phase.sends.push(unescape(rest).map_err(at)?);
                last_write = Some(LastWrite::Send);
            }
            "reference" => {
                case.reference.push(unescape(rest).map_err(at)?);
                last_write = Some(LastWrite::Reference);
            }
            "more" => {
                let bytes = unescape(rest).map_err(at)?;
                let last = match last_write {
                    Some(LastWrite::Send) => phase.sends.last_mut(),
                    Some(LastWrite::Reference) => case.reference.last_mut(),
                    None => None,
                };
                last.ok_or_else(|| at("`more` before any `send` or `reference`".into()))?
                    .extend(bytes);
            }
            "expect" => {
                saw_expect = true;
                phase.expect.extend(parse_pattern(rest).map_err(at)?);
            }
            "direct" => {
                let pieces = parse_pattern(rest).map_err(at)?;
                case.direct
                    .get_or_insert_with(Pattern::default)
                    .extend(pieces);
            }
            "other" => {
                case.phases.push(Phase {
                    other: Some(unescape(rest).map_err(at)?),
                    ..Phase::default()
                });
                last_write = None;
            }
            "close" => case.close = true,
            "split" => case.split = true,
            other => return Err(at(format!("unknown keyword `{other}`"))),
        }
    }
    check_case(&case, saw_expect).map_err(|e| format!("{name}: {e}"))?;
    Ok(case)
}

/// The rules a case must follow, so every case is compared with a run against Redis.
fn check_case(case: &Case, saw_expect: bool) -> Result<(), String> {
    if case.sends().is_empty() || !saw_expect {
        return Err("a case needs `send` and `expect` lines".into());
    }
    for (i, phase) in case.phases.iter().enumerate() {
        phase.expect.check().map_err(|e| format!("expect: {e}"))?;
        if i > 0 && phase.expect.0.is_empty() {
            return Err("an `other` line needs `expect` lines after it".into());
        }
    }
    if let Some(direct) = &case.direct {
        direct.check().map_err(|e| format!("direct: {e}"))?;
    }
    if case.phases.len() > 1 && (case.split || case.direct.is_some()) {
        return Err("`other` cannot be combined with `split` or `direct`".into());
    }
    if !case.reference.is_empty() && case.direct.is_none() {
        return Err(
            "`reference` belongs to a case with `direct` (without it, the direct \
                    run is the reference)"
                .into(),
        );
    }
    // A declared difference leaves no Redis run to compare the ambassador's bytes with,
    // unless a `reference` gives one: the expected bytes must then be wholly literal.
    if case.direct.is_some() && case.reference.is_empty() && case.expect().has_wildcard() {
        return Err("with `direct` and no `reference`, `expect` must be literal".into());
    }
    Ok(())
}

/// Splits on the wildcards first, so an escaped brace (`\x7b*}`) stays literal.
fn parse_pattern(mut text: &str) -> Result<Vec<Piece>, String> {
    let mut pieces = Vec::new();
    loop {
        let next = WILDCARDS
            .iter()
            .filter_map(|(token, piece)| text.find(token).map(|at| (at, *token, piece)))
            .min_by_key(|(at, _, _)| *at);
        let Some((at, token, piece)) = next else {
            break;
        };
        let bytes = unescape(&text[..at])?;
        if !bytes.is_empty() {
            pieces.push(Piece::Lit(bytes));
        }
        pieces.push(piece.clone());
        text = &text[at + token.len()..];
    }
    let bytes = unescape(text)?;
    if !bytes.is_empty() {
        pieces.push(Piece::Lit(bytes));
    }
    Ok(pieces)
}

/// `\r \n \t \\ \xHH`; everything else is taken as it is.
fn unescape(text: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let mut bytes = text.bytes();
    while let Some(b) = bytes.next() {
        if b != b'\\' {
            out.push(b);
            continue;
        }
        match bytes.next() {
            Some(b'r') => out.push(b'\r'),
            Some(b'n') => out.push(b'\n'),
            Some(b't') => out.push(b'\t'),
            Some(b'\\') => out.push(b'\\'),
            Some(b'x') => {
                let hex: Vec<u8> = bytes.by_ref().take(2).collect();
                let hex = std::str::from_utf8(&hex).unwrap_or("");
                let byte = u8::from_str_radix(hex, 16)
                    .ok()
                    .filter(|_| hex.len() == 2 && hex.bytes().all(|c| c.is_ascii_hexdigit()))
                    .ok_or_else(|| format!("bad escape \\x{hex} in `{text}`"))?;
                out.push(byte);
            }
            other => {
                let shown = other.map(|c| (c as char).to_string()).unwrap_or_default();
                return Err(format!("unknown escape \\{shown} in `{text}`"));
            }
        }
    }
    Ok(out)
}

/// Bytes as a case file would write them, for messages.
fn escape(bytes: &[u8]) -> String {
    let mut s = String::new();
    for &b in bytes {
        match b {
            b'\r' => s.push_str("\\r"),
            b'\n' => s.push_str("\\n"),
            b'\t' => s.push_str("\\t"),
            b'\\' => s.push_str("\\\\"),
            0x20..=0x7e => s.push(b as char),
            _ => s.push_str(&format!("\\x{b:02x}")),
        }
    }
    s
}

fn show_sends(sends: &[Vec<u8>]) -> String {
    let writes: Vec<String> = sends.iter().map(|s| format!("\"{}\"", escape(s))).collect();
    writes.join(" then ")
}

// ---------------------------------------------------------------------------------------
// Matching received bytes against a pattern
// ---------------------------------------------------------------------------------------

#[derive(Debug, PartialEq)]
enum Match {
    /// The pattern matched the first `len` bytes; `same` are the ranges the `{*}` took.
    Done { len: usize, same: Vec<Range<usize>> },
    /// What arrived so far can still become a match.
    More,
    /// What arrived so far can never match.
    Mismatch,
}

/// Matches lazily: a `{*}` stops at the first place the literal after it matches, and never
/// crosses a CR or LF (it stands for versions and ids: never a whole reply), so a wrong
/// reply after a wildcard is reported at once instead of waiting for the deadline.
fn match_pattern(pattern: &Pattern, got: &[u8]) -> Match {
    let mut pos = 0;
    let mut same = Vec::new();
    let mut pieces = pattern.0.iter().peekable();
    while let Some(piece) = pieces.next() {
        let rest = &got[pos..];
        let took = match piece {
            Piece::Lit(lit) => {
                if rest.len() < lit.len() {
                    return if lit.starts_with(rest) {
                        Match::More
                    } else {
                        Match::Mismatch
                    };
                }
                if !rest.starts_with(lit) {
                    return Match::Mismatch;
                }
                Ok(lit.len())
            }
            Piece::Same => match pieces.peek() {
                Some(Piece::Lit(next)) => skip_wildcard(rest, next).inspect(|&skip| {
                    same.push(pos..pos + skip);
                }),
                _ => unreachable!("Pattern::check: a literal follows `{{*}}`"),
            },
            Piece::Number => {
                let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
                if digits == rest.len() {
                    Err(Match::More)
                } else if digits == 0 {
                    Err(Match::Mismatch)
                } else {
                    Ok(digits)
                }
            }
            Piece::Rdb => rdb_len(rest),
        };
        match took {
            Ok(n) => pos += n,
            Err(m) => return m,
        }
    }
    Match::Done { len: pos, same }
}

/// How many bytes of `rest` a wildcard followed by `next` takes.
fn skip_wildcard(rest: &[u8], next: &[u8]) -> Result<usize, Match> {
    let line_end = rest
        .iter()
        .position(|&b| b == b'\r' || b == b'\n')
        .unwrap_or(rest.len());
    for i in 0..=line_end {
        let tail = &rest[i..];
        if tail.starts_with(next) {
            return Ok(i);
        }
        if next.starts_with(tail) {
            // The bytes ran out part way into `next`.
            return Err(Match::More);
        }
    }
    Err(Match::Mismatch)
}

/// The length of a `$<len>\r\n` line and the RDB payload after it (no CRLF follows it),
/// with the newlines before it: while the RDB is being made, Redis sends the replica a `\n`
/// every second to keep the link alive (on a loaded machine the fork takes that long).
fn rdb_len(rest: &[u8]) -> Result<usize, Match> {
    let keepalives = rest.iter().take_while(|&&b| b == b'\n').count();
    rdb_payload_len(&rest[keepalives..]).map(|n| keepalives + n)
}

fn rdb_payload_len(rest: &[u8]) -> Result<usize, Match> {
    const MAGIC: &[u8] = b"REDIS";
    let Some(line_end) = rest.windows(2).position(|w| w == b"\r\n") else {
        let plausible = rest.first().is_none_or(|&b| b == b'$')
            && rest.len() < 24
            && rest
                .iter()
                .skip(1)
                .all(|b| b.is_ascii_digit() || *b == b'\r');
        return Err(if plausible {
            Match::More
        } else {
            Match::Mismatch
        });
    };
    let len: usize = std::str::from_utf8(&rest[..line_end])
        .ok()
        .and_then(|l| l.strip_prefix('$'))
        .and_then(|n| n.parse().ok())
        .filter(|&n| n >= MAGIC.len())
        .ok_or(Match::Mismatch)?;
    let body = &rest[line_end + 2..];
    let head = &body[..body.len().min(MAGIC.len())];
    if !MAGIC.starts_with(head) {
        return Err(Match::Mismatch);
    }
    if body.len() < len {
        return Err(Match::More);
    }
    Ok(line_end + 2 + len)
}

// ---------------------------------------------------------------------------------------
// One run: a fresh connection, the writes, the replies
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy)]
enum Target<'a> {
    Ambassador(&'a Ambassador),
    Direct,
}

/// The main runs watch for stray bytes after the match; the many split runs check the match
/// (and the close) only, with a shorter pause between their two writes.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Full,
    Split,
}

/// What one run does: steps, each sending and expecting.
struct Step<'a> {
    other: Option<&'a [u8]>,
    sends: &'a [Vec<u8>],
    expect: &'a Pattern,
}

/// What one run received, and what was wrong with it, if anything.
struct Received {
    bytes: Vec<u8>,
    /// The bytes each `{*}` took, in order: they must be the same in the run compared.
    same: Vec<Vec<u8>>,
    problem: Option<String>,
}

enum Read {
    Data,
    Closed,
    Timeout,
}

/// Appends what one read returns. A reset counts as a close: Redis and the ambassador
/// both close on a client that may still be writing.
async fn read_some(stream: &mut TcpStream, got: &mut Vec<u8>, until: Instant) -> Read {
    let mut chunk = [0u8; 16 * 1024];
    let left = until.saturating_duration_since(Instant::now());
    match tokio::time::timeout(left, stream.read(&mut chunk)).await {
        Err(_) => Read::Timeout,
        Ok(Ok(0)) | Ok(Err(_)) => Read::Closed,
        Ok(Ok(n)) => {
            got.extend_from_slice(&chunk[..n]);
            Read::Data
        }
    }
}

/// FLUSHALL on a separate connection, then a fresh connection to `target`, so no case
/// sees another's keys or connection state.
async fn connect(server: &RedisServer, target: Target<'_>) -> TcpStream {
    let mut admin = server.direct().await;
    assert_eq!(admin.cmd(&["FLUSHALL"]).await, simple("OK"));
    let raw = match target {
        Target::Ambassador(amb) => amb.connect().await,
        Target::Direct => server.direct().await,
    };
    assert!(raw.buf.is_empty(), "nothing but AUTH's +OK before the case");
    raw.stream
}

/// An `other` line: the bytes on a separate direct connection, and its reply.
async fn run_other(server: &RedisServer, bytes: &[u8]) -> Option<String> {
    let mut other = server.direct().await;
    other.send(bytes).await;
    match other.reply().await {
        OwnedFrame::SimpleError { data, .. } => {
            Some(format!("`other` \"{}\" got -{data}", escape(bytes)))
        }
        _ => None,
    }
}

/// Runs the steps on a fresh connection: for each, the `other` command, the writes, then
/// reads until the step's pattern matches. Then checks what follows: the close for `close`
/// cases, else (in `Mode::Full`) that nothing more arrives.
async fn run_once(
    server: &RedisServer,
    target: Target<'_>,
    steps: &[Step<'_>],
    close: bool,
    mode: Mode,
) -> Received {
    let mut stream = connect(server, target).await;
    let pause = if mode == Mode::Full {
        PAUSE
    } else {
        SPLIT_PAUSE
    };
    let mut got = Vec::new();
    let mut same = Vec::new();
    let mut matched = 0;
    let fail = |got: Vec<u8>, same: Vec<Vec<u8>>, why: String| Received {
        bytes: got,
        same,
        problem: Some(why),
    };
    for step in steps {
        if let Some(bytes) = step.other {
            if let Some(why) = run_other(server, bytes).await {
                return fail(got, same, why);
            }
        }
        for (i, bytes) in step.sends.iter().enumerate() {
            if i > 0 {
                tokio::time::sleep(pause).await;
            }
            // A write after the peer closed fails; the replies to what went before count.
            if stream.write_all(bytes).await.is_err() {
                break;
            }
        }
        let deadline = Instant::now() + MATCH_DEADLINE;
        loop {
            match match_pattern(step.expect, &got[matched..]) {
                Match::Done { len, same: ranges } => {
                    same.extend(ranges.into_iter().map(|r| got[matched..][r].to_vec()));
                    matched += len;
                    break;
                }
                Match::Mismatch => {
                    // Collect what else arrives so the report shows the whole difference.
                    watch(&mut stream, &mut got, QUIET).await;
                    return fail(got, same, "received bytes do not match".into());
                }
                Match::More => match read_some(&mut stream, &mut got, deadline).await {
                    Read::Data => {}
                    Read::Closed => {
                        return fail(got, same, "closed before the expected bytes".into())
                    }
                    Read::Timeout => {
                        return fail(got, same, "timed out before the expected bytes".into())
                    }
                },
            }
        }
    }
    let quiet = mode == Mode::Full;
    let problem = after_match(&mut stream, &mut got, matched, close, quiet).await;
    Received {
        bytes: got,
        same,
        problem,
    }
}

/// Reads for `period`; returns whether the peer closed.
async fn watch(stream: &mut TcpStream, got: &mut Vec<u8>, period: Duration) -> bool {
    let until = Instant::now() + period;
    loop {
        match read_some(stream, got, until).await {
            Read::Data => {}
            Read::Closed => return true,
            Read::Timeout => return false,
        }
    }
}

async fn after_match(
    stream: &mut TcpStream,
    got: &mut Vec<u8>,
    len: usize,
    close: bool,
    quiet: bool,
) -> Option<String> {
    let closed = if close {
        watch(stream, got, MATCH_DEADLINE).await
    } else if quiet {
        watch(stream, got, QUIET).await
    } else {
        false
    };
    if got.len() > len {
        return Some(format!(
            "{} unexpected bytes after the match",
            got.len() - len
        ));
    }
    match (close, closed) {
        (true, false) => Some("the connection was not closed".into()),
        (false, true) => Some("the connection was closed unexpectedly".into()),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------
// Split input: the framer offline, and the network
// ---------------------------------------------------------------------------------------

/// What the framer made of a stream, with offsets from the stream's start.
#[derive(Debug, PartialEq)]
enum Framed {
    /// A whole command, or the StreamStart..StreamEnd pieces of one, as one range.
    Command(Range<usize>),
    Ignored(Range<usize>),
    /// The error, at the start of the command it ended.
    Error(usize, ProtocolError),
    /// An unfinished command starting here was left in the buffer.
    Pending(usize),
}

/// Feeds `chunks` to a RequestFramer the way the relay does: append a chunk, take events
/// until Incomplete, removing each event's bytes from the front of the buffer.
fn frame(chunks: &[&[u8]]) -> Vec<Framed> {
    let mut framer = RequestFramer::default();
    let mut buf: Vec<u8> = Vec::new();
    let mut front = 0;
    let mut stream_start: Option<usize> = None;
    let mut out = Vec::new();
    for chunk in chunks {
        buf.extend_from_slice(chunk);
        loop {
            let event = match framer.next(&buf, needs_whole) {
                Ok(Request::Incomplete) => break,
                Ok(event) => event,
                Err(e) => {
                    out.push(Framed::Error(stream_start.unwrap_or(front), e));
                    return out;
                }
            };
            let end = front + event.len();
            match event {
                Request::Command { .. } => out.push(Framed::Command(front..end)),
                Request::Ignored { .. } => out.push(Framed::Ignored(front..end)),
                Request::StreamStart { .. } => stream_start = Some(front),
                Request::StreamMore { .. } => {}
                Request::StreamEnd { .. } => {
                    let start = stream_start.take().expect("StreamEnd after a StreamStart");
                    out.push(Framed::Command(start..end));
                }
                Request::Incomplete => unreachable!("handled above"),
            }
            buf.drain(..event.len());
            front = end;
        }
    }
    if !buf.is_empty() || stream_start.is_some() {
        out.push(Framed::Pending(stream_start.unwrap_or(front)));
    }
    out
}

/// Every two-chunk split must frame exactly as the whole input does.
fn framer_split_problems(case: &Case) -> Vec<String> {
    let all = case.all_sent();
    let whole = frame(&[&all]);
    (1..all.len())
        .filter_map(|k| {
            let split = frame(&[&all[..k], &all[k..]]);
            (split != whole)
                .then(|| format!("framer split at {k}: {split:?}\n      unsplit: {whole:?}"))
        })
        .collect()
}

fn network_offsets(len: usize) -> Vec<usize> {
    if len < SPLIT_EVERY_BELOW {
        (1..len).collect()
    } else {
        vec![1, len / 2, len - 1]
    }
}

/// The concatenated input as two writes, at a few offsets, both ways.
async fn network_split_problems(
    server: &RedisServer,
    amb: &Ambassador,
    case: &Case,
) -> Vec<String> {
    let all = case.all_sent();
    let direct_pattern = case.direct.as_ref().unwrap_or(case.expect());
    let mut problems = Vec::new();
    for k in network_offsets(all.len()) {
        let halves = [all[..k].to_vec(), all[k..].to_vec()];
        let runs = [
            (
                "through the ambassador",
                Target::Ambassador(amb),
                case.expect(),
            ),
            ("direct", Target::Direct, direct_pattern),
        ];
        for (side, target, expect) in runs {
            let step = Step {
                other: None,
                sends: &halves,
                expect,
            };
            let got = run_once(server, target, &[step], case.close, Mode::Split).await;
            if let Some(p) = got.problem {
                let shown = escape(&got.bytes);
                problems.push(format!("split at {k}, {side}: {p}; got \"{shown}\""));
            }
        }
    }
    problems
}

// ---------------------------------------------------------------------------------------
// The test
// ---------------------------------------------------------------------------------------

/// A broken case fails at most offsets alike; a few examples and a count say enough.
fn first_few(mut problems: Vec<String>) -> Vec<String> {
    const SHOWN: usize = 4;
    if problems.len() > SHOWN {
        let more = problems.len() - SHOWN;
        problems.truncate(SHOWN);
        problems.push(format!("... and {more} more split runs like these"));
    }
    problems
}

/// Runs one case through the ambassador and directly (and, with `reference`, directly
/// with the reference input); returns a report of everything wrong with it, if anything.
async fn run_case(server: &RedisServer, amb: &Ambassador, case: &Case) -> Option<String> {
    let steps = case.steps();
    let via = run_once(
        server,
        Target::Ambassador(amb),
        &steps,
        case.close,
        Mode::Full,
    )
    .await;
    let direct = match &case.direct {
        None => run_once(server, Target::Direct, &steps, case.close, Mode::Full).await,
        Some(pattern) => {
            let step = Step {
                other: None,
                sends: case.sends(),
                expect: pattern,
            };
            run_once(server, Target::Direct, &[step], case.close, Mode::Full).await
        }
    };
    // With a declared difference, the reference input's run (if the case has one).
    let reference_run = match (&case.direct, case.reference.is_empty()) {
        (Some(_), false) => {
            let step = Step {
                other: None,
                sends: &case.reference,
                expect: case.expect(),
            };
            Some(run_once(server, Target::Direct, &[step], case.close, Mode::Full).await)
        }
        _ => None,
    };
    // The Redis run whose bytes the ambassador's must equal: the direct one, or the
    // reference's (none: `expect` is literal, see check_case).
    let reference = match &case.direct {
        None => Some(&direct),
        Some(_) => reference_run.as_ref(),
    };
    let mut problems = Vec::new();
    if let Some(p) = &via.problem {
        problems.push(format!("through the ambassador: {p}"));
    }
    if let Some(p) = &direct.problem {
        problems.push(format!("direct: {p}"));
    }
    if let Some(reference) = &reference_run {
        if let Some(p) = &reference.problem {
            problems.push(format!("direct, reference input: {p}"));
        }
    }
    if let Some(reference) = reference {
        problems.extend(compare(case, &via, reference));
    }
    if case.split {
        problems.extend(first_few(framer_split_problems(case)));
        problems.extend(first_few(network_split_problems(server, amb, case).await));
    }
    if problems.is_empty() {
        return None;
    }
    let mut report = format!("== {}\n", case.name);
    for p in &problems {
        report.push_str(&format!("  - {p}\n"));
    }
    for (i, phase) in case.phases.iter().enumerate() {
        if let Some(other) = &phase.other {
            report.push_str(&format!("  other:           \"{}\"\n", escape(other)));
        }
        report.push_str(&format!(
            "  sent:            {}\n",
            show_sends(&phase.sends)
        ));
        let label = if i == 0 {
            "expected:"
        } else {
            "then expected:"
        };
        report.push_str(&format!("  {label:<16} {}\n", phase.expect.show()));
    }
    if let Some(d) = &case.direct {
        report.push_str(&format!("  expected direct: {}\n", d.show()));
    }
    if !case.reference.is_empty() {
        report.push_str(&format!(
            "  reference sent:  {}\n",
            show_sends(&case.reference)
        ));
    }
    report.push_str(&format!("  ambassador gave: \"{}\"\n", escape(&via.bytes)));
    report.push_str(&format!(
        "  redis gave:      \"{}\"\n",
        escape(&direct.bytes)
    ));
    if let Some(reference) = &reference_run {
        report.push_str(&format!(
            "  reference gave:  \"{}\"\n",
            escape(&reference.bytes)
        ));
    }
    Some(report)
}

/// The ambassador's bytes against Redis's: every `{*}` took the same bytes and, when no
/// `{n}` or `{rdb}` is involved, the byte strings are identical.
fn compare(case: &Case, via: &Received, redis: &Received) -> Vec<String> {
    if via.problem.is_some() || redis.problem.is_some() {
        return Vec::new(); // already reported; the bytes are incomplete
    }
    let mut problems = Vec::new();
    for (i, (a, r)) in via.same.iter().zip(&redis.same).enumerate() {
        if a != r {
            problems.push(format!(
                "`{{*}}` number {} differs: the ambassador gave \"{}\", Redis \"{}\"",
                i + 1,
                escape(a),
                escape(r)
            ));
        }
    }
    let free = case.phases.iter().any(|p| p.expect.has_free_wildcard());
    if !free && via.bytes != redis.bytes {
        problems.push("the ambassador's bytes differ from Redis's".into());
    }
    problems
}

/// DEBUG PROTOCOL produces every RESP3 type; Redis 7 disables DEBUG by default. A master
/// PINGs its replicas every 10 s by default, which would land at a random place in the
/// replication cases' streams (804, 806).
const SERVER_ARGS: &[&str] = &[
    "--enable-debug-command",
    "yes",
    "--repl-ping-replica-period",
    "3600",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resp_cases_match_redis() {
    let server = RedisServer::start_with(ServerAuth::app(), SERVER_ARGS);
    // No periodic probe: its AUTH would show in the MONITOR cases' feeds.
    let amb = Ambassador::start(&server, NO_PROBES).await;
    run_corpus(&server, &amb).await;
}

/// The same corpus with the ambassador reaching the server over TLS; the direct runs use the
/// server's plain port, so the comparison is with Redis itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resp_cases_match_redis_over_tls() {
    let pki = common::pki::Pki::new();
    let tls = common::pki::ServerTls::new(&pki);
    let server = RedisServer::start_tls_with(ServerAuth::app(), &tls, SERVER_ARGS);
    let dir = tempfile::tempdir().unwrap();
    let profile = format!(
        "[listen]\naddress = \"127.0.0.1:0\"\n[upstream]\naddress = \"{}\"\n\
         [upstream.tls]\nca_file = \"{}\"\n[credentials]\nfile = \"{}\"\n{NO_PROBES}",
        server.tls_addr("localhost"),
        pki.ca.display(),
        server.credential_file(dir.path()).display()
    );
    let amb = Ambassador::with_config(load_config(dir.path(), &profile), dir).await;
    run_corpus(&server, &amb).await;
}

async fn run_corpus(server: &RedisServer, amb: &Ambassador) {
    let cases = load_cases();
    assert!(!cases.is_empty(), "no cases in {}", case_dir().display());
    let mut failures = Vec::new();
    for case in &cases {
        if let Some(report) = run_case(server, amb, case).await {
            failures.push(report);
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn patterns_match_lazily_and_report_mismatch_early() {
    let p = |s: &str| {
        let mut pat = Pattern::default();
        pat.extend(parse_pattern(s).unwrap());
        pat
    };
    let done = |len| Match::Done { len, same: vec![] };
    assert_eq!(match_pattern(&p("+OK\\r\\n"), b"+OK\r\n+X"), done(5));
    assert_eq!(match_pattern(&p("+OK\\r\\n"), b"+O"), Match::More);
    assert_eq!(match_pattern(&p("+OK\\r\\n"), b"-E"), Match::Mismatch);
    assert_eq!(
        match_pattern(&p(":{*}\\r\\n:1\\r\\n"), b":42\r\n:1\r\n"),
        Match::Done {
            len: 9,
            same: std::iter::once(1..3).collect()
        }
    );
    assert_eq!(match_pattern(&p(":{*}\\r\\n"), b":42"), Match::More);
    assert_eq!(
        match_pattern(&p(":{*}\\r\\n+A"), b":42\r\n+B"),
        Match::Mismatch
    );
    assert_eq!(
        match_pattern(&p(":{*}\\r\\n"), b":4\n2\r\n"),
        Match::Mismatch
    );
    // `{n}`: digits only, not recorded for comparison.
    assert_eq!(match_pattern(&p(":{n}\\r\\n"), b":42\r\n"), done(5));
    assert_eq!(match_pattern(&p(":{n}\\r\\n"), b":42"), Match::More);
    assert_eq!(match_pattern(&p(":{n}\\r\\n"), b":4x\r\n"), Match::Mismatch);
    assert_eq!(match_pattern(&p(":{n}\\r\\n"), b":\r\n"), Match::Mismatch);
    // `{rdb}`: a length line, then exactly that many bytes starting with the magic.
    let rdb = p("{rdb}+OK\\r\\n");
    assert_eq!(match_pattern(&rdb, b"$6\r\nREDIS!+OK\r\n"), done(15));
    assert_eq!(match_pattern(&rdb, b"$6\r\nREDI"), Match::More);
    assert_eq!(match_pattern(&rdb, b"$6\r\nREDIX!"), Match::Mismatch);
    assert_eq!(match_pattern(&rdb, b"$6\r\nREDIS!+NO"), Match::Mismatch);
    assert_eq!(match_pattern(&rdb, b"+FULL"), Match::Mismatch);
    assert_eq!(match_pattern(&rdb, b"\n\n$6\r\nREDIS!+OK\r\n"), done(17));
    assert_eq!(match_pattern(&rdb, b"\n"), Match::More);
    // Wildcards must be followed by what ends them.
    assert!(p("+A{*}").check().is_err());
    assert!(p(":{n}1").check().is_err());
    assert!(p("{*}{n}\\r\\n").check().is_err());
    assert!(p("{rdb}").check().is_ok());
    let ok = |text: &str| {
        parse_case("x", text)
            .map(|_| ())
            .map_err(|e| e.split(": ").nth(1).unwrap_or("").to_owned())
    };
    assert_eq!(
        ok("send A\\r\\n\nexpect +{*}\\r\\n\ndirect -E\\r\\n\n"),
        Err("with `direct` and no `reference`, `expect` must be literal".into())
    );
    assert_eq!(
        ok("send A\\r\\n\nexpect +{*}\\r\\n\ndirect -E\\r\\n\nreference B\\r\\n\n"),
        Ok(())
    );
    assert_eq!(ok("send A\\r\\n\nexpect :{n}\\r\\n\nreference B\\r\\n\n"), Err("`reference` belongs to a case with `direct` (without it, the direct run is the reference)".into()));
    let phased = "send A\\r\\n\nexpect +OK\\r\\n\nother B\\r\\n\nexpect :1\\r\\n\n";
    assert_eq!(parse_case("x", phased).unwrap().phases.len(), 2);
    assert!(parse_case("x", &format!("{phased}split\n")).is_err());
    // The comparison with Redis's run: `{*}` must take the same bytes, `{n}` may differ.
    let case = parse_case(
        "x",
        "send HELLO\\r\\n\nexpect $5\\r\\n{*}\\r\\n:{n}\\r\\n\n",
    )
    .unwrap();
    let run = |bytes: &[u8]| {
        let Match::Done { same, .. } = match_pattern(case.expect(), bytes) else {
            panic!("no match");
        };
        Received {
            bytes: bytes.to_vec(),
            same: same.into_iter().map(|r| bytes[r].to_vec()).collect(),
            problem: None,
        }
    };
    let redis = run(b"$5\r\n7.0.1\r\n:7\r\n");
    assert!(compare(&case, &run(b"$5\r\n7.0.1\r\n:9\r\n"), &redis).is_empty());
    assert_eq!(
        compare(&case, &run(b"$5\r\n7.0.2\r\n:7\r\n"), &redis).len(),
        1
    );
    assert_eq!(unescape("\\x41\\r\\n\\\\").unwrap(), b"A\r\n\\");
    // The framer summary the split check compares: ranges, ignored bytes, the unfinished rest.
    assert_eq!(
        frame(&[b"PING\r\n*0\r\n*1\r\n$4\r\nPI"]),
        [
            Framed::Command(0..6),
            Framed::Ignored(6..10),
            Framed::Pending(10)
        ]
    );
    assert_eq!(
        frame(&[b"*3\r\n$3\r\nSET\r\n$1\r\nk", b"\r\n$1\r\nv\r\n*x\r\n"]),
        [
            Framed::Command(0..27),
            Framed::Error(27, ProtocolError::InvalidMultibulkLength)
        ]
    );
    assert!(unescape("\\q").is_err());
    assert!(unescape("\\x4").is_err());
}
