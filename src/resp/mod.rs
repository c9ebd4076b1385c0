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

mod reply;
mod request;
mod syntax;

pub use reply::{Boundary, Frame, LineHead, ReplyError, ReplyFramer};
pub use request::{
    Command, ProtocolError, Request, RequestFramer, HEAD_ARGS, INLINE_MAX, INSPECT_MAX, MAX_BULK,
    MAX_MULTIBULK, UNAUTH_MAX_BULK, UNAUTH_MAX_MULTIBULK,
};
pub use syntax::{split_args, string2ll};

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
