//! The types of the commands the ambassador writes with a secret in them, and their sizes.
//! The encoding itself is [`Credentials::encode`](super::Credentials::encode), beside the
//! secret it reads.

use std::fmt;
use std::ops::Deref;

use secrecy::zeroize::Zeroizing;

/// RESP commands holding a secret. Only [`Credentials::encode`](super::Credentials::encode)
/// makes them, in one allocation of exactly their size, so no reallocation ever leaves a copy
/// behind; zeroed when dropped; `Debug` shows nothing of them, not even their length. Write
/// them to the upstream.
pub struct SecretBytes(pub(super) Zeroizing<Vec<u8>>);

impl Deref for SecretBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretBytes(<redacted>)")
    }
}

/// One argument of a command the ambassador writes itself: bytes as they are, or the
/// profile's username or password, which only this module reads.
#[derive(Debug, Clone, Copy)]
pub enum Arg<'a> {
    Bytes(&'a [u8]),
    /// The profile's user, `default` when it names none (HELLO AUTH always names a user).
    Username,
    Password,
}

/// The three arguments `AUTH <username> <password>` of a HELLO.
pub const HELLO_AUTH: [Arg<'static>; 3] = [Arg::Bytes(b"AUTH"), Arg::Username, Arg::Password];

/// The length of a RESP array header `*<n>\r\n`, and of a bulk string `$<len>\r\n...\r\n`.
pub(super) fn array_header_len(n: usize) -> usize {
    1 + decimal_digits(n) + 2
}

pub(super) fn bulk_len(len: usize) -> usize {
    1 + decimal_digits(len) + 2 + len + 2
}

fn decimal_digits(n: usize) -> usize {
    n.checked_ilog10().map_or(1, |d| d as usize + 1)
}
