//! TLS toward the upstream: `[upstream.tls]` -> one rustls `ClientConfig` shared by every new
//! connection (so sessions can also be resumed across connections), rebuilt when the files
//! it was made from change. [`files`] reads and checks them; [`reload`] watches them;
//! [`failure`] turns a failed handshake into the short reason a client sees.
//!
//! rustls runs on the `ring` provider, TLS 1.3 and 1.2. Without `ca_file` the system's roots
//! are trusted (rustls-native-certs: the OS bundle an operator already maintains).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::Resumption;
use rustls::crypto::{self, CryptoProvider};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct};
use rustls::{RootCertStore, SignatureScheme};
use thiserror::Error;

use crate::discovery::Target;

mod failure;
mod files;
mod reload;
mod sessions;

pub use failure::{classify, classify_handshake, describe, TlsFailure};
use files::Expiry;
pub use reload::watch;

/// `[upstream.tls]` as written, before any file is read.
#[derive(Debug, Default, Clone)]
pub struct TlsOptions {
    pub server_name: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub client_cert_file: Option<PathBuf>,
    pub client_key_file: Option<PathBuf>,
    pub insecure_skip_verify: bool,
}

/// A usable TLS setting: the name every connection verifies, and the client config new
/// connections use. Clones share that config, and see a reload at once.
#[derive(Debug, Clone)]
pub struct Tls {
    pub server_name: ServerName<'static>,
    pub insecure_skip_verify: bool,
    options: TlsOptions,
    /// The last good set. Only [`Tls::reload`] replaces it; a connection takes the config
    /// once, before its handshake, and keeps it for its life.
    loaded: Arc<RwLock<Arc<Loaded>>>,
}

/// One set of files, read, checked and turned into a client config.
struct Loaded {
    config: Arc<ClientConfig>,
    trust: String,
    ca_expiry: Option<Expiry>,
    client_expiry: Option<Expiry>,
    certificates: Vec<CertificateDer<'static>>,
}

impl std::fmt::Debug for Loaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loaded")
            .field("trust", &self.trust)
            .field("ca_expiry", &self.ca_expiry)
            .field("client_expiry", &self.client_expiry)
            .finish_non_exhaustive()
    }
}

/// A `[upstream.tls]` key that cannot be used. Never quotes a private key's content.
#[derive(Debug, Error)]
pub enum TlsConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        key: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{path} is not valid PEM: {reason}")]
    BadPem {
        key: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("no certificate in {path}")]
    NoCertificate { key: &'static str, path: PathBuf },
    #[error("{path}: not an X.509 certificate: {reason}")]
    BadCertificate {
        key: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("{path}: not a usable CA certificate: {reason}")]
    BadCa { path: PathBuf, reason: String },
    #[error("no PEM private key in {path} (PKCS#8, PKCS#1 or SEC1 expected)")]
    NoKey { path: PathBuf },
    #[error("does not match the certificate in client_cert_file ({reason})")]
    KeyMismatch { reason: String },
    #[error("set client_cert_file and client_key_file together")]
    HalfClientAuth { key: &'static str },
    #[error("{name:?} is not a valid DNS name or IP address{hint}")]
    ServerName { name: String, hint: &'static str },
    #[error("not set, and no CA certificate was found in the system's store: set ca_file or install ca-certificates")]
    NoSystemRoots,
}

impl TlsConfigError {
    /// The configuration key the problem is reported under.
    pub fn key(&self) -> &'static str {
        match self {
            TlsConfigError::Read { key, .. }
            | TlsConfigError::BadPem { key, .. }
            | TlsConfigError::NoCertificate { key, .. }
            | TlsConfigError::BadCertificate { key, .. }
            | TlsConfigError::HalfClientAuth { key } => key,
            TlsConfigError::BadCa { .. } | TlsConfigError::NoSystemRoots => "upstream.tls.ca_file",
            TlsConfigError::NoKey { .. } | TlsConfigError::KeyMismatch { .. } => {
                "upstream.tls.client_key_file"
            }
            TlsConfigError::ServerName { .. } => "upstream.tls.server_name",
        }
    }
}

/// Printed by `--check` and logged at every start while verification is off.
pub const INSECURE_WARNING: &str = "WARNING: upstream.tls.insecure_skip_verify is set: the upstream's certificate is not verified, so anyone on the path can impersonate it and read the credentials";

const CA_FILE: &str = "upstream.tls.ca_file";
const CLIENT_CERT_FILE: &str = "upstream.tls.client_cert_file";
const CLIENT_KEY_FILE: &str = "upstream.tls.client_key_file";

impl Tls {
    /// Reads every file `options` names and builds the client config, reporting every
    /// problem. `host` is the upstream's host, the default server name (`None` when the
    /// address itself is invalid, which is reported elsewhere).
    pub fn build(options: &TlsOptions, host: Option<&str>) -> Result<Tls, Vec<TlsConfigError>> {
        let name = server_name(options.server_name.as_deref(), host);
        let loaded = Loaded::read(options);
        let (server_name, loaded) = match (name, loaded) {
            (Ok(name), Ok(loaded)) => (name, loaded),
            (name, loaded) => {
                let mut errors: Vec<_> = name.err().into_iter().collect();
                errors.extend(loaded.err().into_iter().flatten());
                return Err(errors);
            }
        };
        Ok(Tls {
            server_name,
            insecure_skip_verify: options.insecure_skip_verify,
            options: options.clone(),
            loaded: Arc::new(RwLock::new(Arc::new(loaded))),
        })
    }

    /// The name a connection to `target` verifies: `server_name` when the profile sets it,
    /// else the target's own host name (an SRV or Sentinel target names itself), else the
    /// default derived at start.
    pub fn name_for(&self, target: &Target) -> ServerName<'static> {
        if self.options.server_name.is_none() {
            if let Some(name) = target.tls_name.as_deref() {
                if let Ok(name) = ServerName::try_from(name.to_owned()) {
                    return name;
                }
            }
        }
        self.server_name.clone()
    }

    /// The client config for a new connection.
    pub fn client_config(&self) -> Arc<ClientConfig> {
        Arc::clone(&self.current().config)
    }

    fn current(&self) -> Arc<Loaded> {
        // Replacing an Arc cannot leave the lock's content half-changed.
        Arc::clone(&self.loaded.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Reads the files again. `Ok(true)`: new connections use the new set; `Ok(false)`: the
    /// files hold the certificates already in use; `Err`: the last good set stays.
    fn reload(&self) -> Result<bool, Vec<TlsConfigError>> {
        let candidate = Loaded::read(&self.options)?;
        let mut loaded = self.loaded.write().unwrap_or_else(|e| e.into_inner());
        if candidate.certificates == loaded.certificates {
            return Ok(false);
        }
        *loaded = Arc::new(candidate);
        Ok(true)
    }

    /// The files a reload reads: the system's roots are not among them.
    fn files(&self) -> Vec<&Path> {
        [
            &self.options.ca_file,
            &self.options.client_cert_file,
            &self.options.client_key_file,
        ]
        .into_iter()
        .flatten()
        .map(PathBuf::as_path)
        .collect()
    }

    /// When the certificates in use expire (the earliest `notAfter` of each file, in seconds
    /// since the Unix epoch), by the key of their file.
    fn expiries(&self) -> Vec<(&'static str, i64)> {
        let loaded = self.current();
        let ca = loaded.ca_expiry.as_ref().map(|e| ("ca_file", e.not_after));
        let client = (loaded.client_expiry.as_ref()).map(|e| ("client_cert_file", e.not_after));
        ca.into_iter().chain(client).collect()
    }

    /// One line for `--check` and the reload log, plus the insecure warning on its own line
    /// when it applies.
    pub fn summary(&self) -> String {
        let loaded = self.current();
        let trust = if self.insecure_skip_verify {
            "nothing (insecure_skip_verify)".to_owned()
        } else {
            loaded.trust.clone()
        };
        let mut s = format!(
            "upstream tls: server name {:?}, trusting {trust}",
            self.server_name.to_str(),
        );
        if let Some(expiry) = loaded
            .ca_expiry
            .as_ref()
            .filter(|_| !self.insecure_skip_verify)
        {
            s.push_str(&format!(", CA {}", expires(expiry)));
        }
        if let (Some(cert), Some(expiry)) = (&self.options.client_cert_file, &loaded.client_expiry)
        {
            s.push_str(&format!(
                ", client certificate {} {}",
                cert.display(),
                expires(expiry)
            ));
        }
        if self.insecure_skip_verify {
            s.push_str(&format!("\n{INSECURE_WARNING}"));
        }
        s
    }
}

/// "expires <date> (in N days)", or "expired <date> (N days ago)".
fn expires(expiry: &Expiry) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let days = (expiry.not_after - now) / 86_400;
    if expiry.not_after >= now {
        format!("expires {} (in {days} days)", expiry.text)
    } else {
        format!("expired {} ({} days ago)", expiry.text, -days)
    }
}

impl Loaded {
    fn read(options: &TlsOptions) -> Result<Loaded, Vec<TlsConfigError>> {
        let files = files::read(options)?;
        let config = client_config(files.roots, files.client_auth, options.insecure_skip_verify)
            .map_err(|e| vec![e])?;
        Ok(Loaded {
            config: Arc::new(config),
            trust: files.trust,
            ca_expiry: files.ca_expiry,
            client_expiry: files.client_expiry,
            certificates: files.certificates,
        })
    }
}

type ClientAuth = Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>;

fn client_config(
    roots: RootCertStore,
    client_auth: ClientAuth,
    insecure: bool,
) -> Result<ClientConfig, TlsConfigError> {
    let provider = Arc::new(crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .expect("the ring provider supports TLS 1.2 and 1.3");
    let builder = if insecure {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider)))
    } else {
        builder.with_root_certificates(roots)
    };
    let mut config =
        match client_auth {
            None => builder.with_no_client_auth(),
            Some((chain, key)) => builder.with_client_auth_cert(chain, key).map_err(|e| {
                TlsConfigError::KeyMismatch {
                    reason: e.to_string(),
                }
            })?,
        };
    // Every config has its own store: a resumed session skips certificate verification, so
    // a session from before a reload must not carry the old trust into new connections.
    config.resumption = Resumption::store(Arc::new(sessions::SessionStore::default()));
    Ok(config)
}

fn server_name(
    configured: Option<&str>,
    host: Option<&str>,
) -> Result<ServerName<'static>, TlsConfigError> {
    let (name, hint) = match (configured, host) {
        (Some(name), _) => (name, ""),
        (None, Some(host)) => (host, " (it is upstream.address's host: set server_name)"),
        // The address is invalid and reported under its own key; the default name is moot.
        (None, None) => ("localhost", ""),
    };
    ServerName::try_from(name.to_owned()).map_err(|_| TlsConfigError::ServerName {
        name: name.to_owned(),
        hint,
    })
}

/// `insecure_skip_verify`: any certificate for any name is accepted. The handshake signature
/// is still checked, which proves only that the peer holds the key of the certificate it sent.
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.0.signature_verification_algorithms;
        crypto::verify_tls12_signature(message, cert, dss, algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.0.signature_verification_algorithms;
        crypto::verify_tls13_signature(message, cert, dss, algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_expiry_reads_as_days_to_go_or_days_past() {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let at = |not_after| Expiry {
            not_after,
            text: "then".to_owned(),
        };
        assert_eq!(
            expires(&at(now + 10 * 86_400 + 60)),
            "expires then (in 10 days)"
        );
        assert_eq!(
            expires(&at(now - 3 * 86_400 - 60)),
            "expired then (3 days ago)"
        );
    }
}
