//! The credential file, and the only module that looks inside a secret.
//!
//! Passwords live in `SecretString` everywhere else: no `Display`, a redacted `Debug`. They
//! leave this module only as RESP bytes in a buffer that is zeroed when dropped, written to
//! the upstream socket and nowhere else. `expose_secret()` is called here and nowhere else.
//!
//! The TLS client key is read here too, straight into rustls' key type (redacted `Debug`),
//! and handed to rustls without passing through any other code.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::PrivateKeyDer;
use secrecy::zeroize::Zeroizing;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use subtle::ConstantTimeEq;
use thiserror::Error;
use tokio::sync::watch;

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
}

/// The TOML form of a credential file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileForm {
    username: Option<String>,
    password: SecretString,
}

/// Bytes holding a secret, zeroed when dropped. Write them to the upstream; never log them.
pub type SecretBytes = Zeroizing<Vec<u8>>;

impl Credentials {
    pub fn new(username: Option<String>, password: SecretString) -> Self {
        Credentials { username, password }
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
        Ok(Credentials { username, password })
    }

    /// The user the ambassador authenticates as, for logs and summaries.
    pub fn username(&self) -> &str {
        self.username.as_deref().unwrap_or("default")
    }

    /// `AUTH [username] password` as a RESP command.
    pub fn auth_command(&self) -> SecretBytes {
        // Sized once: a growing Vec would free copies of the password without zeroing them.
        let mut out = Zeroizing::new(Vec::with_capacity(
            self.password.expose_secret().len() + self.username().len() + 512,
        ));
        let argc = if self.username.is_some() { 3 } else { 2 };
        crate::resp::write_array(&mut out, argc);
        crate::resp::write_bulk(&mut out, b"AUTH");
        if let Some(user) = &self.username {
            crate::resp::write_bulk(&mut out, user.as_bytes());
        }
        crate::resp::write_bulk(&mut out, self.password.expose_secret().as_bytes());
        out
    }

    /// The three arguments `AUTH <username> <password>` of a HELLO, appended to `out`. HELLO
    /// always names a user; without one in the profile, that is `default`, as with requirepass.
    pub fn write_hello_auth(&self, out: &mut SecretBytes) {
        // Grow before the secret is written, so no reallocation leaves a copy behind.
        out.reserve(self.password.expose_secret().len() + self.username().len() + 64);
        crate::resp::write_bulk(out, b"AUTH");
        crate::resp::write_bulk(out, self.username().as_bytes());
        crate::resp::write_bulk(out, self.password.expose_secret().as_bytes());
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

/// The password clients must offer when `listen.require_password_file` is set.
#[derive(Debug)]
pub struct DownstreamPassword(SecretString);

impl DownstreamPassword {
    pub fn load(path: &Path) -> Result<Self, CredentialsError> {
        Credentials::load(path, None).map(|c| DownstreamPassword(c.password))
    }

    pub fn new(password: SecretString) -> Self {
        DownstreamPassword(password)
    }

    /// Compares in constant time, so response timing tells nothing about the password.
    pub fn matches(&self, offered: &[u8]) -> bool {
        self.0.expose_secret().as_bytes().ct_eq(offered).into()
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
}
