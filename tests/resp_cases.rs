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

/// A piece of an expected byte string: literal bytes, or `{*}` (the bytes of one line up to
/// the next literal, or anything at all when it ends the pattern).
#[derive(Debug, Clone, PartialEq)]
enum Piece {
    Lit(Vec<u8>),
    Any,
}

#[derive(Debug, Clone, Default)]
struct Pattern(Vec<Piece>);

impl Pattern {
    /// Appends pieces, merging adjacent literals so matching sees maximal literals.
    fn extend(&mut self, pieces: Vec<Piece>) {
        for piece in pieces {
            match (self.0.last_mut(), piece) {
                (Some(Piece::Lit(last)), Piece::Lit(more)) => last.extend(more),
                (Some(Piece::Any), Piece::Any) => {}
                (_, piece) => self.0.push(piece),
            }
        }
    }

    fn has_wildcard(&self) -> bool {
        self.0.contains(&Piece::Any)
    }

    fn show(&self) -> String {
        let parts: Vec<String> = self
            .0
            .iter()
            .map(|p| match p {
                Piece::Lit(b) => escape(b),
                Piece::Any => "{*}".into(),
            })
            .collect();
        format!("\"{}\"", parts.concat())
    }
}

struct Case {
    name: String,
    /// One entry per write.
    sends: Vec<Vec<u8>>,
    expect: Pattern,
    /// What a direct connection gets instead, when the case declares a difference.
    direct: Option<Pattern>,
    close: bool,
    split: bool,
}

impl Case {
    fn all_sent(&self) -> Vec<u8> {
        self.sends.concat()
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

fn parse_case(name: &str, text: &str) -> Result<Case, String> {
    let mut case = Case {
        name: name.to_owned(),
        sends: Vec::new(),
        expect: Pattern::default(),
        direct: None,
        close: false,
        split: false,
    };
    let mut saw_expect = false;
    for (i, line) in text.lines().enumerate() {
        let at = |msg: String| format!("{name}:{}: {msg}", i + 1);
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let (word, rest) = line.split_once(' ').unwrap_or((line, ""));
        match word {
            "send" => case.sends.push(unescape(rest).map_err(at)?),
            "more" => {
                let bytes = unescape(rest).map_err(at)?;
                let last = case.sends.last_mut();
                last.ok_or_else(|| at("`more` before any `send`".into()))?
                    .extend(bytes);
            }
            "expect" => {
                saw_expect = true;
                case.expect.extend(parse_pattern(rest).map_err(at)?);
            }
            "direct" => {
                let pieces = parse_pattern(rest).map_err(at)?;
                case.direct
                    .get_or_insert_with(Pattern::default)
                    .extend(pieces);
            }
            "close" => case.close = true,
            "split" => case.split = true,
            other => return Err(at(format!("unknown keyword `{other}`"))),
        }
    }
    if case.sends.is_empty() || !saw_expect {
        return Err(format!("{name}: a case needs `send` and `expect` lines"));
    }
    Ok(case)
}

/// Splits on `{*}` first, so an escaped brace (`\x7b*}`) stays literal.
fn parse_pattern(text: &str) -> Result<Vec<Piece>, String> {
    let mut pieces = Vec::new();
    for (i, part) in text.split("{*}").enumerate() {
        if i > 0 {
            pieces.push(Piece::Any);
        }
        let bytes = unescape(part)?;
        if !bytes.is_empty() {
            pieces.push(Piece::Lit(bytes));
        }
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
    /// The pattern matched the first `len` bytes; `open_end` when it ends with `{*}`, so
    /// whatever follows is part of the match.
    Done { len: usize, open_end: bool },
    /// What arrived so far can still become a match.
    More,
    /// What arrived so far can never match.
    Mismatch,
}

/// Matches lazily: a `{*}` stops at the first place the literal after it matches, and never
/// crosses a CR or LF (it stands for ids, versions, lengths: never a whole reply), so a wrong
/// reply after a wildcard is reported at once instead of waiting for the deadline.
fn match_pattern(pattern: &Pattern, got: &[u8]) -> Match {
    let mut pos = 0;
    let mut pieces = pattern.0.iter().peekable();
    while let Some(piece) = pieces.next() {
        match piece {
            Piece::Lit(lit) => {
                let have = &got[pos..];
                if have.len() < lit.len() {
                    return if lit.starts_with(have) {
                        Match::More
                    } else {
                        Match::Mismatch
                    };
                }
                if !have.starts_with(lit) {
                    return Match::Mismatch;
                }
                pos += lit.len();
            }
            Piece::Any => match pieces.peek() {
                Some(Piece::Lit(next)) => match skip_wildcard(&got[pos..], next) {
                    Ok(skip) => pos += skip,
                    Err(m) => return m,
                },
                // `extend` never leaves two wildcards in a row: this one ends the pattern.
                _ => {
                    return Match::Done {
                        len: got.len(),
                        open_end: true,
                    }
                }
            },
        }
    }
    Match::Done {
        len: pos,
        open_end: false,
    }
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

/// What one run received, and what was wrong with it, if anything.
struct Received {
    bytes: Vec<u8>,
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

/// Sends `sends` as separate writes and reads until `pattern` is matched, then checks what
/// follows: the close for `close` cases, else (in `Mode::Full`) that nothing more arrives.
async fn run_once(
    server: &RedisServer,
    target: Target<'_>,
    sends: &[Vec<u8>],
    pattern: &Pattern,
    close: bool,
    mode: Mode,
) -> Received {
    let mut stream = connect(server, target).await;
    let pause = if mode == Mode::Full {
        PAUSE
    } else {
        SPLIT_PAUSE
    };
    for (i, bytes) in sends.iter().enumerate() {
        if i > 0 {
            tokio::time::sleep(pause).await;
        }
        // A write after the peer closed fails; the replies to what went before still count.
        if stream.write_all(bytes).await.is_err() {
            break;
        }
    }
    let mut got = Vec::new();
    let deadline = Instant::now() + MATCH_DEADLINE;
    let fail = |got: Vec<u8>, why: &str| Received {
        bytes: got,
        problem: Some(why.to_owned()),
    };
    let (len, open_end) = loop {
        match match_pattern(pattern, &got) {
            Match::Done { len, open_end } => break (len, open_end),
            Match::Mismatch => {
                // Collect what else arrives so the report shows the whole difference.
                watch(&mut stream, &mut got, QUIET).await;
                return fail(got, "received bytes do not match");
            }
            Match::More => match read_some(&mut stream, &mut got, deadline).await {
                Read::Data => {}
                Read::Closed => return fail(got, "closed before the expected bytes"),
                Read::Timeout => return fail(got, "timed out before the expected bytes"),
            },
        }
    };
    let quiet = mode == Mode::Full;
    let problem = after_match(&mut stream, &mut got, len, open_end, close, quiet).await;
    Received {
        bytes: got,
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
    open_end: bool,
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
    if got.len() > len && !open_end {
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
    let direct_pattern = case.direct.as_ref().unwrap_or(&case.expect);
    let mut problems = Vec::new();
    for k in network_offsets(all.len()) {
        let halves = [all[..k].to_vec(), all[k..].to_vec()];
        let runs = [
            (
                "through the ambassador",
                Target::Ambassador(amb),
                &case.expect,
            ),
            ("direct", Target::Direct, direct_pattern),
        ];
        for (side, target, pattern) in runs {
            let got = run_once(server, target, &halves, pattern, case.close, Mode::Split).await;
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

/// Runs one case both ways; returns a report of everything wrong with it, if anything.
async fn run_case(server: &RedisServer, amb: &Ambassador, case: &Case) -> Option<String> {
    let sends = &case.sends;
    let direct_pattern = case.direct.as_ref().unwrap_or(&case.expect);
    let full = |target, pattern| run_once(server, target, sends, pattern, case.close, Mode::Full);
    let via = full(Target::Ambassador(amb), &case.expect).await;
    let direct = full(Target::Direct, direct_pattern).await;
    let mut problems = Vec::new();
    if let Some(p) = &via.problem {
        problems.push(format!("through the ambassador: {p}"));
    }
    if let Some(p) = &direct.problem {
        problems.push(format!("direct: {p}"));
    }
    // Without wildcards or a declared difference, "both match" must mean "both equal".
    let exact = case.direct.is_none() && !case.expect.has_wildcard();
    if exact && via.bytes != direct.bytes {
        problems.push("the ambassador's bytes differ from Redis's".into());
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
    report.push_str(&format!("  sent:            {}\n", show_sends(sends)));
    report.push_str(&format!("  expected:        {}\n", case.expect.show()));
    if let Some(d) = &case.direct {
        report.push_str(&format!("  expected direct: {}\n", d.show()));
    }
    report.push_str(&format!("  ambassador gave: \"{}\"\n", escape(&via.bytes)));
    report.push_str(&format!(
        "  redis gave:      \"{}\"\n",
        escape(&direct.bytes)
    ));
    Some(report)
}

/// DEBUG PROTOCOL produces every RESP3 type; Redis 7 disables DEBUG by default.
const DEBUG_ON: &[&str] = &["--enable-debug-command", "yes"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resp_cases_match_redis() {
    let server = RedisServer::start_with(ServerAuth::app(), DEBUG_ON);
    let amb = Ambassador::start(&server, "").await;
    run_corpus(&server, &amb).await;
}

/// The same corpus with the ambassador reaching the server over TLS; the direct runs use the
/// server's plain port, so the comparison is with Redis itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resp_cases_match_redis_over_tls() {
    let pki = common::pki::Pki::new();
    let tls = common::pki::ServerTls::new(&pki);
    let server = RedisServer::start_tls_with(ServerAuth::app(), &tls, DEBUG_ON);
    let dir = tempfile::tempdir().unwrap();
    let profile = format!(
        "[listen]\naddress = \"127.0.0.1:0\"\n[upstream]\naddress = \"{}\"\n\
         [upstream.tls]\nca_file = \"{}\"\n[credentials]\nfile = \"{}\"\n",
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
    let done = |len| Match::Done {
        len,
        open_end: false,
    };
    assert_eq!(match_pattern(&p("+OK\\r\\n"), b"+OK\r\n+X"), done(5));
    assert_eq!(match_pattern(&p("+OK\\r\\n"), b"+O"), Match::More);
    assert_eq!(match_pattern(&p("+OK\\r\\n"), b"-E"), Match::Mismatch);
    assert_eq!(
        match_pattern(&p(":{*}\\r\\n:1\\r\\n"), b":42\r\n:1\r\n"),
        done(9)
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
    let open = match_pattern(&p("+A{*}"), b"+Abc");
    assert_eq!(
        open,
        Match::Done {
            len: 4,
            open_end: true
        }
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
