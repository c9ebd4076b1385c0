//! The credential file, and the only module that looks inside a secret.
//!
//! Passwords live in `SecretString` everywhere else: no `Display`, a redacted `Debug`. They
//! leave this module only as RESP bytes in a [`SecretBytes`]: allocated once at its exact
//! size (a growing buffer would free copies of the password without zeroing them), zeroed
//! when dropped, redacted in `Debug`, written to the upstream socket and nowhere else.
//! `expose_secret()` is called here (and in [`exec`], which reads a command's output) and
//! nowhere else.
//!
//! The TLS client key is read here too, straight into rustls' key type (redacted `Debug`),
//! and handed to rustls without passing through any other code.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ring::hmac;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::PrivateKeyDer;
use secrecy::zeroize::Zeroizing;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use subtle::ConstantTimeEq;
use thiserror::Error;
use tokio::sync::watch;

pub mod aws_iam;
mod encode;
pub mod exec;

use encode::{array_header_len, bulk_len};
pub use encode::{Arg, SecretBytes, HELLO_AUTH};

/// A credential file could not be used. Never carries any of the file's content.
#[derive(Debug, Error)]
pub enum CredentialsError {
    #[error("cannot read credential file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("credential file {path} holds an empty password")]
    Empty { path: PathBuf },
}

/// A TLS client key file could not be used. Never carries any of the file's content.
#[derive(Debug, Error)]
pub enum TlsKeyError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no PEM private key in {path}")]
    NoKey { path: PathBuf },
}

/// The first private key (PKCS#8, PKCS#1 or SEC1) of a PEM file. A parse error is reported
/// without its detail, because that detail may quote the key.
pub fn load_tls_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsKeyError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| match e {
        pem::Error::Io(source) => TlsKeyError::Read {
            path: path.to_owned(),
            source,
        },
        _ => TlsKeyError::NoKey {
            path: path.to_owned(),
        },
    })
}

/// The upstream credentials of the selected profile.
#[derive(Debug)]
pub struct Credentials {
    username: Option<String>,
    password: SecretString,
    /// When the source said they stop working (`exec`'s `expires_at`); `None`: never.
    expires_at: Option<std::time::SystemTime>,
}

/// The TOML form of a credential file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileForm {
    username: Option<String>,
    password: SecretString,
}

impl Credentials {
    /// No credentials (TCP mode, which authenticates nothing).
    pub fn none() -> Self {
        Self::new(None, SecretString::from(String::new()))
    }

    pub fn new(username: Option<String>, password: SecretString) -> Self {
        Credentials {
            username,
            password,
            expires_at: None,
        }
    }

    /// Sets when these credentials stop working.
    pub fn set_expires_at(&mut self, at: Option<std::time::SystemTime>) {
        self.expires_at = at;
    }

    /// When these credentials stop working, if their source said.
    pub fn expires_at(&self) -> Option<std::time::SystemTime> {
        self.expires_at
    }

    /// Reads a credential file: a TOML table with `password` (and optionally `username`), or
    /// else the whole file as the password, one trailing newline dropped. The file's username
    /// wins over `default_username` (from the profile).
    pub fn load(path: &Path, default_username: Option<&str>) -> Result<Self, CredentialsError> {
        let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|source| {
            CredentialsError::Read {
                path: path.to_owned(),
                source,
            }
        })?);
        let (username, password) = match toml::from_str::<FileForm>(&text) {
            Ok(form) => (form.username, form.password),
            // Not the TOML form: the file is the password. The parse error is dropped
            // unread, because it quotes the file.
            Err(_) => {
                let bare = text
                    .strip_suffix("\r\n")
                    .or_else(|| text.strip_suffix('\n'))
                    .unwrap_or(&text);
                (None, SecretString::from(bare.to_owned()))
            }
        };
        if password.expose_secret().is_empty() {
            return Err(CredentialsError::Empty {
                path: path.to_owned(),
            });
        }
        let username = username.or_else(|| default_username.map(str::to_owned));
        Ok(Credentials {
            username,
            password,
            expires_at: None,
        })
    }

    /// The user the ambassador authenticates as, for logs and summaries.
    pub fn username(&self) -> &str {
        self.username.as_deref().unwrap_or("default")
    }

    /// `AUTH [username] password` as a RESP command.
    pub fn auth_command(&self) -> SecretBytes {
        self.encode(&[self.auth_args()])
    }

    /// The arguments of `AUTH`: the username only when the profile names one, so a
    /// requirepass server gets the one-argument form.
    pub fn auth_args(&self) -> &'static [Arg<'static>] {
        if self.username.is_some() {
            &HELLO_AUTH
        } else {
            &[Arg::Bytes(b"AUTH"), Arg::Password]
        }
    }

    /// `commands` (each a list of arguments) as RESP arrays, one after the other, in a buffer
    /// allocated once at exactly their size.
    pub fn encode(&self, commands: &[&[Arg<'_>]]) -> SecretBytes {
        let size = commands
            .iter()
            .map(|args| {
                let payload: usize = args.iter().map(|&a| bulk_len(self.bytes(a).len())).sum();
                array_header_len(args.len()) + payload
            })
            .sum();
        let mut out = Zeroizing::new(Vec::with_capacity(size));
        for args in commands {
            crate::resp::write_array(&mut out, args.len());
            for &arg in *args {
                crate::resp::write_bulk(&mut out, self.bytes(arg));
            }
        }
        debug_assert_eq!(out.len(), size, "the size computed is the size written");
        SecretBytes(out)
    }

    fn bytes<'a>(&'a self, arg: Arg<'a>) -> &'a [u8] {
        match arg {
            Arg::Bytes(b) => b,
            Arg::Username => self.username().as_bytes(),
            Arg::Password => self.password.expose_secret().as_bytes(),
        }
    }
}

/// The credentials new connections use. A reload swaps them; open sessions hold a receiver
/// and re-authenticate when they change (see the relay).
#[derive(Debug, Clone)]
pub struct CredentialStore {
    current: Arc<watch::Sender<Arc<Credentials>>>,
}

impl CredentialStore {
    pub fn new(credentials: Credentials) -> Self {
        CredentialStore {
            current: Arc::new(watch::Sender::new(Arc::new(credentials))),
        }
    }

    pub fn current(&self) -> Arc<Credentials> {
        Arc::clone(&self.current.borrow())
    }

    /// A receiver that sees every later replacement.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Credentials>> {
        self.current.subscribe()
    }

    pub fn replace(&self, credentials: Credentials) {
        self.current.send_replace(Arc::new(credentials));
    }
}

impl Credentials {
    /// Whether `other` holds the same username and password (compared in constant time).
    pub fn same_as(&self, other: &Credentials) -> bool {
        let same_password: bool = self
            .password
            .expose_secret()
            .as_bytes()
            .ct_eq(other.password.expose_secret().as_bytes())
            .into();
        same_password && self.username == other.username
    }
}

/// The password clients must offer when `listen.require_password_file` is set, kept only as
/// its HMAC-SHA256 under a key drawn at start. An offered password is hashed the same way and
/// the two 32-byte tags are compared in constant time: how long that takes depends on neither
/// the password nor its length, and the password itself is not kept.
pub struct DownstreamPassword {
    key: hmac::Key,
    tag: [u8; 32],
}

impl fmt::Debug for DownstreamPassword {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DownstreamPassword(<redacted>)")
    }
}

impl DownstreamPassword {
    pub fn load(path: &Path) -> Result<Self, CredentialsError> {
        Credentials::load(path, None).map(|c| DownstreamPassword::new(c.password))
    }

    pub fn new(password: SecretString) -> Self {
        let key = hmac::Key::generate(hmac::HMAC_SHA256, &ring::rand::SystemRandom::new())
            .expect("the system's random source");
        let tag = Self::tag_of(&key, password.expose_secret().as_bytes());
        DownstreamPassword { key, tag }
    }

    fn tag_of(key: &hmac::Key, password: &[u8]) -> [u8; 32] {
        let mut tag = [0u8; 32];
        tag.copy_from_slice(hmac::sign(key, password).as_ref());
        tag
    }

    /// Whether `offered` is the password; timing tells nothing about the password's bytes or
    /// its length (only the offered length, which the client knows).
    pub fn matches(&self, offered: &[u8]) -> bool {
        Self::tag_of(&self.key, offered)[..]
            .ct_eq(&self.tag[..])
            .into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(content: &str) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), content).unwrap();
        f
    }

    #[test]
    fn reads_both_file_forms() {
        let toml = write("username = \"app\"\npassword = \"s3cret\"\n");
        let c = Credentials::load(toml.path(), Some("ignored")).unwrap();
        assert_eq!(c.username(), "app");
        assert_eq!(
            &c.auth_command()[..],
            b"*3\r\n$4\r\nAUTH\r\n$3\r\napp\r\n$6\r\ns3cret\r\n"
        );

        let bare = write("pa ss\n");
        let c = Credentials::load(bare.path(), Some("svc")).unwrap();
        assert_eq!(c.username(), "svc");
        assert_eq!(
            &c.auth_command()[..],
            b"*3\r\n$4\r\nAUTH\r\n$3\r\nsvc\r\n$5\r\npa ss\r\n"
        );

        let c = Credentials::load(bare.path(), None).unwrap();
        assert_eq!(
            &c.auth_command()[..],
            b"*2\r\n$4\r\nAUTH\r\n$5\r\npa ss\r\n"
        );
    }

    #[test]
    fn errors_and_debug_never_show_the_secret() {
        let empty = write("\n");
        let err = Credentials::load(empty.path(), None).unwrap_err();
        assert!(err.to_string().contains("empty password"));
        let c = Credentials::load(write("hunter2").path(), None).unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
        let d = DownstreamPassword::load(write("hunter2").path()).unwrap();
        assert!(!format!("{d:?}").contains("hunter2"));
        assert!(d.matches(b"hunter2"));
        assert!(!d.matches(b"hunter"));
    }

    #[test]
    fn secret_bytes_are_allocated_once_at_their_size() {
        let c = Credentials::new(Some("app".into()), SecretString::from("hunter2"));
        // Lengths around every change in the number of digits of a bulk length.
        for len in [0, 1, 9, 10, 11, 99, 100, 101, 999, 1000, 1001, 70_000] {
            let long = vec![b'x'; len];
            // HELLO with a long SETNAME after the password: the case where a growing buffer
            // would have copied the password and freed the copy unzeroed.
            let mut args = vec![Arg::Bytes(b"HELLO"), Arg::Bytes(b"3")];
            args.extend(HELLO_AUTH);
            args.extend([Arg::Bytes(b"SETNAME"), Arg::Bytes(&long)]);
            let bytes = c.encode(&[&args, c.auth_args(), &[Arg::Bytes(&long)]]);
            let mut want = Vec::new();
            crate::resp::write_array(&mut want, 7);
            for arg in [
                &b"HELLO"[..],
                b"3",
                b"AUTH",
                b"app",
                b"hunter2",
                b"SETNAME",
                &long,
            ] {
                crate::resp::write_bulk(&mut want, arg);
            }
            want.extend_from_slice(b"*3\r\n$4\r\nAUTH\r\n$3\r\napp\r\n$7\r\nhunter2\r\n");
            crate::resp::write_array(&mut want, 1);
            crate::resp::write_bulk(&mut want, &long);
            assert_eq!(&bytes[..], &want[..], "length {len}");
            assert_eq!(
                bytes.0.capacity(),
                bytes.len(),
                "length {len}: one exact allocation"
            );
        }
        let requirepass = Credentials::new(None, SecretString::from("hunter2"));
        let auth = requirepass.auth_command();
        assert_eq!(&auth[..], b"*2\r\n$4\r\nAUTH\r\n$7\r\nhunter2\r\n");
        assert_eq!(auth.0.capacity(), auth.len());
    }

    #[test]
    fn debug_of_secret_bytes_shows_nothing_of_them() {
        let c = Credentials::new(Some("app".into()), SecretString::from("hunter2"));
        let shown = format!("{:?} {:#?}", c.auth_command(), c.auth_command());
        assert!(!shown.contains("hunter2"), "{shown}");
        // Not as numbers either (the derived Debug of a byte vector), nor the length.
        assert!(!shown.contains("104, 117"), "{shown}");
        assert!(
            !shown.contains(&c.auth_command().len().to_string()),
            "{shown}"
        );
    }

    #[test]
    fn the_downstream_password_matches_exactly() {
        let d = DownstreamPassword::new(SecretString::from("hunter2"));
        assert!(d.matches(b"hunter2"));
        for wrong in [
            &b""[..],
            b"h",
            b"hunter",
            b"hunter3",
            b"hunter22",
            b"HUNTER2",
        ] {
            assert!(!d.matches(wrong), "{:?}", String::from_utf8_lossy(wrong));
        }
        assert!(!d.matches(&[b'h'; 70_000]));
    }

    /// The old compare (`ct_eq` of the two passwords) returned at once when the lengths
    /// differed and walked the whole password when they did not, so timing told the length.
    /// Now an offered password costs the same whatever the real one's length: one HMAC of
    /// the offered bytes and a 32-byte compare. Medians of interleaved runs, and a bound far
    /// from the old ratio (three orders of magnitude with these sizes).
    #[test]
    fn the_downstream_compare_takes_no_longer_for_the_right_length() {
        const LEN: usize = 1 << 20;
        let d = DownstreamPassword::new(SecretString::from("p".repeat(LEN)));
        let same_length = vec![b'q'; LEN];
        let longer = vec![b'q'; LEN + 1];
        let time = |offered: &[u8]| {
            let start = std::time::Instant::now();
            assert!(!d.matches(std::hint::black_box(offered)));
            start.elapsed()
        };
        let (mut same, mut other) = (Vec::new(), Vec::new());
        for _ in 0..15 {
            same.push(time(&same_length));
            other.push(time(&longer));
        }
        same.sort();
        other.sort();
        let (same, other) = (same[7], other[7]);
        assert!(
            other * 4 > same,
            "an offered password of the right length took {same:?}, one byte longer {other:?}"
        );
    }
}
