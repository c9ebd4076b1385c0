//! TLS toward the upstream: `[upstream.tls]` -> one rustls `ClientConfig`, built once at start
//! and shared by every connection (so sessions can also be resumed across connections).
//! [`failure`] turns a failed handshake into the short reason a client sees.
//!
//! rustls runs on the `ring` provider, TLS 1.3 and 1.2. Without `ca_file` the system's roots
//! are trusted (rustls-native-certs: the OS bundle an operator already maintains).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::Resumption;
use rustls::crypto::{self, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct};
use rustls::{RootCertStore, SignatureScheme};
use thiserror::Error;

use crate::credentials;

mod failure;
mod sessions;

pub use failure::{classify, classify_handshake, describe, TlsFailure};

/// `[upstream.tls]` as written, before any file is read.
#[derive(Debug, Default, Clone)]
pub struct TlsOptions {
    pub server_name: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub client_cert_file: Option<PathBuf>,
    pub client_key_file: Option<PathBuf>,
    pub insecure_skip_verify: bool,
}

/// A usable TLS setting: the shared client config and the name every connection verifies.
#[derive(Debug, Clone)]
pub struct Tls {
    pub config: Arc<ClientConfig>,
    pub server_name: ServerName<'static>,
    /// What is trusted, for the summary: a CA file, the system roots, or nothing.
    pub trust: String,
    pub client_cert_file: Option<PathBuf>,
    pub insecure_skip_verify: bool,
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
        let mut errors = Vec::new();
        let server_name = server_name(options.server_name.as_deref(), host)
            .map_err(|e| errors.push(e))
            .ok();
        let insecure = options.insecure_skip_verify;
        // A CA file is read even when verification is off, so that a typo in it does not wait
        // for the day verification is turned back on.
        let roots = match &options.ca_file {
            Some(path) => ca_file(path).map_err(|e| errors.push(e)).ok(),
            None if insecure => Some((RootCertStore::empty(), String::new())),
            None => system_roots().map_err(|e| errors.push(e)).ok(),
        };
        let client_auth = client_auth(options).map_err(|e| errors.extend(e)).ok();
        // Each part is None exactly when it recorded an error.
        let (Some(server_name), Some((roots, trust)), Some(client_auth)) =
            (server_name, roots, client_auth)
        else {
            return Err(errors);
        };
        let trust = if insecure {
            "nothing (insecure_skip_verify)".to_owned()
        } else {
            trust
        };
        let config = client_config(roots, client_auth, insecure).map_err(|e| vec![e])?;
        Ok(Tls {
            config: Arc::new(config),
            server_name,
            trust,
            client_cert_file: options.client_cert_file.clone(),
            insecure_skip_verify: insecure,
        })
    }
}

impl Tls {
    /// One line for `--check`, plus the insecure warning on its own line when it applies.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "upstream tls: server name {:?}, trusting {}",
            self.server_name.to_str(),
            self.trust
        );
        if let Some(cert) = &self.client_cert_file {
            s.push_str(&format!(", client certificate {}", cert.display()));
        }
        if self.insecure_skip_verify {
            s.push_str(&format!("\n{INSECURE_WARNING}"));
        }
        s
    }
}

type ClientAuth = Option<(
    Vec<CertificateDer<'static>>,
    rustls::pki_types::PrivateKeyDer<'static>,
)>;

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

/// Every certificate of a PEM file, at least one.
pub fn certificates(
    key: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsConfigError> {
    let pem_error = |e: rustls::pki_types::pem::Error| match e {
        rustls::pki_types::pem::Error::Io(source) => TlsConfigError::Read {
            key,
            path: path.to_owned(),
            source,
        },
        other => TlsConfigError::BadPem {
            key,
            path: path.to_owned(),
            reason: other.to_string(),
        },
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(pem_error)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_error)?;
    if certs.is_empty() {
        return Err(TlsConfigError::NoCertificate {
            key,
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

fn ca_file(path: &Path) -> Result<(RootCertStore, String), TlsConfigError> {
    let mut roots = RootCertStore::empty();
    for cert in certificates(CA_FILE, path)? {
        roots.add(cert).map_err(|e| TlsConfigError::BadCa {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    }
    let trust = format!("{} ({})", path.display(), count(roots.len()));
    Ok((roots, trust))
}

fn count(n: usize) -> String {
    match n {
        1 => "1 CA certificate".to_owned(),
        n => format!("{n} CA certificates"),
    }
}

fn system_roots() -> Result<(RootCertStore, String), TlsConfigError> {
    // Unreadable entries of the system store are skipped; only an empty result is fatal.
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(found.certs);
    if roots.is_empty() {
        return Err(TlsConfigError::NoSystemRoots);
    }
    let trust = format!("the system's roots ({})", count(roots.len()));
    Ok((roots, trust))
}

fn client_auth(options: &TlsOptions) -> Result<ClientAuth, Vec<TlsConfigError>> {
    match (&options.client_cert_file, &options.client_key_file) {
        (None, None) => Ok(None),
        (Some(_), None) => Err(vec![TlsConfigError::HalfClientAuth {
            key: CLIENT_KEY_FILE,
        }]),
        (None, Some(_)) => Err(vec![TlsConfigError::HalfClientAuth {
            key: CLIENT_CERT_FILE,
        }]),
        (Some(cert), Some(key)) => {
            let chain = certificates(CLIENT_CERT_FILE, cert);
            let key = credentials::load_tls_key(key).map_err(|e| match e {
                credentials::TlsKeyError::Read { path, source } => TlsConfigError::Read {
                    key: CLIENT_KEY_FILE,
                    path,
                    source,
                },
                credentials::TlsKeyError::NoKey { path } => TlsConfigError::NoKey { path },
            });
            match (chain, key) {
                (Ok(chain), Ok(key)) => Ok(Some((chain, key))),
                (chain, key) => Err(chain.err().into_iter().chain(key.err()).collect()),
            }
        }
    }
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
