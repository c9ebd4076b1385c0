//! The client side: `RequestFramer` and `Filter`, driven exactly as `relay::requests` drives
//! them (append a read; frame until `Incomplete`; judge each `Command`/`StreamStart`; copy
//! the filter's authentication into the framer; drop each event's bytes; stop at the first
//! error), once with and once without a downstream password.
//!
//! Invariants checked:
//! - every event covers at least one byte and at most the buffer; stream pieces come as
//!   `StreamStart`, `StreamMore`*, `StreamEnd`, with nothing else in between;
//! - the framer holds at most `INSPECT_MAX + INLINE_MAX + 1` bytes while it reports
//!   `Incomplete` (one more read then arrives on top, which bounds a session's client buffer);
//! - the arguments the filter sees lie inside the event's own bytes; a command the filter
//!   needs whole shows all its arguments; a streamed command shows its name, unless that is
//!   too long to be a command name;
//! - the commands (their byte ranges, argument counts and the filter's decisions), the
//!   ignored byte runs and the first error are the same whether the input arrives in one
//!   read, in the reads the input describes, or one byte per read.
#![no_main]

mod plan;

use libfuzzer_sys::fuzz_target;
use redis_ambassador::filter::{needs_whole, Filter};
use redis_ambassador::resp::{ProtocolError, Request, RequestFramer, INLINE_MAX, INSPECT_MAX};

use plan::Plan;

/// The most the framer may hold without handing anything out: the bytes of a command held
/// whole for the filter (its declared sizes are refused past `INSPECT_MAX`), plus a header
/// line still arriving and the byte after its CR (`INLINE_MAX + 1`).
const HOLD_MAX: usize = INSPECT_MAX + INLINE_MAX + 1;
/// Command names longer than this are streamed before they are read (resp.rs `NAME_MAX`).
const NAME_MAX: usize = 64;

/// What a run saw, in absolute stream offsets.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    /// A whole command, however many events it took.
    Command {
        start: usize,
        end: usize,
        argc: u64,
        action: String,
    },
    Ignored {
        start: usize,
        end: usize,
    },
}

#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    seen: Vec<Seen>,
    error: Option<ProtocolError>,
}

fn run(reads: &[&[u8]], password_required: bool) -> Outcome {
    let mut filter = Filter::new(password_required);
    // As the relay: the framer starts where the filter starts and follows it after each
    // decision.
    let mut framer = RequestFramer::new(filter.authenticated);
    let mut buf: Vec<u8> = Vec::new();
    // Absolute offset of `buf[done]`.
    let mut front = 0;
    // The command being streamed: its start, argument count and the filter's decision.
    let mut streaming: Option<(usize, u64, String)> = None;
    let mut seen = Vec::new();
    // Bytes of `buf` already handed out; like the relay, the buffer is compacted per read.
    let mut done = 0;
    for read in reads {
        buf.drain(..done);
        done = 0;
        buf.extend_from_slice(read);
        loop {
            let buf = &buf[done..];
            let event = match framer.next(buf, needs_whole) {
                Ok(event) => event,
                Err(error) => {
                    return Outcome {
                        seen,
                        error: Some(error),
                    }
                }
            };
            let len = event.len();
            match event {
                Request::Incomplete => {
                    assert!(
                        buf.len() <= HOLD_MAX,
                        "holds {} bytes without an event",
                        buf.len()
                    );
                    break;
                }
                Request::Command { .. } | Request::StreamStart { .. } => {
                    assert!(streaming.is_none(), "a command inside a stream");
                    assert!(0 < len && len <= buf.len(), "{event:?} of {}", buf.len());
                    let cmd = framer.command(buf);
                    check_args(&cmd, buf, len);
                    let name = cmd.arg(0);
                    if let Request::Command { .. } = event {
                        if name.is_some_and(needs_whole) {
                            assert!(cmd.all().is_some(), "a held command shows all arguments");
                        }
                    } else if name.is_none() {
                        assert!(
                            first_bulk_len(buf).is_some_and(|n| n > NAME_MAX),
                            "a streamed command without its name"
                        );
                    }
                    let argc = cmd.argc;
                    let action = format!("{:?}", filter.decide(&cmd, |p| p == b"pw"));
                    framer.authenticated = filter.authenticated;
                    if let Request::Command { .. } = event {
                        seen.push(Seen::Command {
                            start: front,
                            end: front + len,
                            argc,
                            action,
                        });
                    } else {
                        streaming = Some((front, argc, action));
                    }
                }
                Request::StreamMore { .. } => {
                    assert!(streaming.is_some(), "StreamMore outside a stream");
                    assert!(0 < len && len <= buf.len(), "{event:?} of {}", buf.len());
                }
                Request::StreamEnd { .. } => {
                    let (start, argc, action) = streaming.take().expect("StreamEnd in a stream");
                    assert!(0 < len && len <= buf.len(), "{event:?} of {}", buf.len());
                    seen.push(Seen::Command {
                        start,
                        end: front + len,
                        argc,
                        action,
                    });
                }
                Request::Ignored { .. } => {
                    assert!(streaming.is_none(), "ignored bytes inside a stream");
                    assert!(0 < len && len <= buf.len(), "{event:?} of {}", buf.len());
                    seen.push(Seen::Ignored {
                        start: front,
                        end: front + len,
                    });
                }
            }
            done += len;
            front += len;
        }
    }
    Outcome { seen, error: None }
}

/// Every argument borrowed from the buffer lies within the event's `len` bytes.
fn check_args(cmd: &redis_ambassador::resp::Command<'_>, buf: &[u8], len: usize) {
    let base = buf.as_ptr() as usize;
    let mut i = 0;
    while let Some(arg) = cmd.arg(i) {
        let at = arg.as_ptr() as usize;
        if (base..base + buf.len()).contains(&at) {
            assert!(
                at + arg.len() <= base + len,
                "argument {i} ends past the event"
            );
        }
        i += 1;
    }
    assert!(i as u64 <= cmd.argc, "more arguments than declared");
}

/// The declared length of a multibulk command's first argument, when its header is there.
fn first_bulk_len(buf: &[u8]) -> Option<usize> {
    let rest = buf.strip_prefix(b"*")?;
    let count_end = rest.iter().position(|&b| b == b'\r')?;
    let line = rest.get(count_end + 2..)?.strip_prefix(b"$")?;
    let end = line.iter().position(|&b| b == b'\r')?;
    std::str::from_utf8(&line[..end]).ok()?.parse().ok()
}

fuzz_target!(|input: &[u8]| {
    let Some(plan) = Plan::decode(input, true) else {
        return;
    };
    let whole: &[&[u8]] = &[&plan.payload];
    for password_required in [false, true] {
        let reference = run(whole, password_required);
        let split = run(&plan.reads(), password_required);
        assert_eq!(reference, split, "split at {:?}", plan.cuts);
        if plan.bytewise {
            let bytes = run(&plan.bytes(), password_required);
            assert_eq!(reference, bytes, "one byte per read");
        }
    }
});
