//! The upstream side: `ReplyFramer::next` looped over each read, as `relay::replies` does.
//!
//! Invariants checked:
//! - each call resumes at or after where it was asked to, stays within the read, and only
//!   stops early at a boundary, which sits where it says (`Start` on the byte before the
//!   resume offset, `End` on it);
//! - boundaries alternate `Start`, `End`, `Start`, ... and `at_boundary` agrees with them;
//! - a frame covers at least one byte; a push starts with `>` (or an attribute before it);
//!   a top-level simple reply's `head` is the first bytes of its own line;
//! - the boundaries (absolute offsets, kinds, push flags, heads) and the first error are the
//!   same whether the stream arrives in one read, in the reads the input describes, or one
//!   byte per read.
#![no_main]

mod plan;

use libfuzzer_sys::fuzz_target;
use redis_ambassador::resp::{Boundary, ReplyError, ReplyFramer};

use plan::Plan;

/// Type bytes of replies made of one line.
const LINE_KINDS: &[u8] = b"+-:,#_(";
/// Every type byte the framer knows.
const KINDS: &[u8] = b"+-:,#_($=!*~>%|";
/// `LineHead` keeps this many bytes.
const HEAD_MAX: usize = 16;

#[derive(Debug, PartialEq, Eq)]
struct Frame {
    start: usize,
    kind: u8,
    /// `None` while the frame is still open at the end of the stream.
    end: Option<(usize, bool, Vec<u8>)>,
}

#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    frames: Vec<Frame>,
    error: Option<ReplyError>,
}

fn run(reads: &[&[u8]]) -> Outcome {
    let mut framer = ReplyFramer::default();
    let mut frames: Vec<Frame> = Vec::new();
    // Absolute offset of the current read's first byte.
    let mut front = 0;
    for read in reads {
        let mut p = 0;
        while p < read.len() {
            let (next, boundary) = match framer.next(read, p) {
                Ok(found) => found,
                Err(error) => {
                    return Outcome {
                        frames,
                        error: Some(error),
                    }
                }
            };
            assert!(p < next && next <= read.len(), "resumed at {next} from {p}");
            let open = frames.last().is_some_and(|f| f.end.is_none());
            match boundary {
                None => assert_eq!(next, read.len(), "stopped early without a boundary"),
                Some(Boundary::Start { at, kind }) => {
                    assert!(!open, "Start inside a frame");
                    assert_eq!(at + 1, next, "Start is the byte before the resume offset");
                    assert!(at >= p, "Start before the scan");
                    assert_eq!(read[at], kind);
                    assert!(KINDS.contains(&kind), "unknown kind {kind:#04x}");
                    assert!(!framer.at_boundary());
                    frames.push(Frame {
                        start: front + at,
                        kind,
                        end: None,
                    });
                }
                Some(Boundary::End { at, frame: summary }) => {
                    let (push, head) = (summary.push, summary.head);
                    assert!(open, "End outside a frame");
                    assert_eq!(at, next, "End is the resume offset");
                    assert!(framer.at_boundary());
                    let frame = frames.last_mut().expect("checked open");
                    assert!(front + at > frame.start, "an empty frame");
                    if push {
                        assert!(
                            b">|".contains(&frame.kind),
                            "a push starting with {}",
                            frame.kind
                        );
                    } else {
                        assert_ne!(frame.kind, b'>', "a top-level > that is no push");
                    }
                    frame.end = Some((front + at, push, head.as_bytes().to_vec()));
                }
            }
            p = next;
        }
        front += read.len();
    }
    Outcome {
        frames,
        error: None,
    }
}

/// A top-level simple reply's head is the start of its line (up to, not including, the LF).
fn check_heads(stream: &[u8], outcome: &Outcome) {
    for frame in &outcome.frames {
        let Some((end, _, head)) = &frame.end else {
            continue;
        };
        if LINE_KINDS.contains(&frame.kind) {
            let line = &stream[frame.start..end - 1];
            assert_eq!(
                &head[..],
                &line[..line.len().min(HEAD_MAX)],
                "the head of the reply at {}",
                frame.start
            );
        }
    }
}

fuzz_target!(|input: &[u8]| {
    let Some(plan) = Plan::decode(input, false) else {
        return;
    };
    let reference = run(&[&plan.payload]);
    check_heads(&plan.payload, &reference);
    let split = run(&plan.reads());
    assert_eq!(reference, split, "split at {:?}", plan.cuts);
    if plan.bytewise {
        assert_eq!(reference, run(&plan.bytes()), "one byte per read");
    }
});
