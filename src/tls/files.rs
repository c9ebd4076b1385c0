//! Reading `[upstream.tls]`'s files into a usable set: the trusted roots, the client
//! certificate and its key, each checked, and when each file's certificates expire. At start
//! and at every reload alike.

use std::path::Path;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::RootCertStore;

use super::{TlsConfigError, TlsOptions, CA_FILE, CLIENT_CERT_FILE, CLIENT_KEY_FILE};
use crate::credentials;

/// What the files held, checked.
pub(super) struct Files {
    /// Empty when verification is off and no CA file is given.
    pub roots: RootCertStore,
    /// What is trusted, for the summary: a CA file, or the system's roots.
    pub trust: String,
    pub client_auth: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    pub ca_expiry: Option<Expiry>,
    pub client_expiry: Option<Expiry>,
    /// Every certificate read from a file (CA file, then client chain): equal lists mean an
    /// event changed nothing. A key that changed under an unchanged certificate is either
    /// the same key re-encoded or one that no longer matches, which fails the check.
    pub certificates: Vec<CertificateDer<'static>>,
}

/// The earliest `notAfter` among a file's certificates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Expiry {
    /// Seconds since the Unix epoch.
    pub not_after: i64,
    /// As the certificate says it, for people.
    pub text: String,
}

/// Reads every file `options` names, reporting every problem.
pub(super) fn read(options: &TlsOptions) -> Result<Files, Vec<TlsConfigError>> {
    let mut errors = Vec::new();
    // A CA file is read even when verification is off, so that a typo in it does not wait
    // for the day verification is turned back on.
    let roots = match &options.ca_file {
        Some(path) => ca_file(path).map_err(|e| errors.push(e)).ok(),
        None if options.insecure_skip_verify => Some(Roots {
            store: RootCertStore::empty(),
            trust: String::new(),
            certificates: Vec::new(),
            expiry: None,
        }),
        None => system_roots().map_err(|e| errors.push(e)).ok(),
    };
    let client = client_auth(options).map_err(|e| errors.extend(e)).ok();
    // Each part is None exactly when it recorded an error.
    let (Some(roots), Some(client)) = (roots, client) else {
        return Err(errors);
    };
    let mut certificates = roots.certificates;
    let (client_auth, client_expiry) = match client {
        Some((chain, key, expiry)) => {
            certificates.extend(chain.iter().cloned());
            (Some((chain, key)), Some(expiry))
        }
        None => (None, None),
    };
    Ok(Files {
        roots: roots.store,
        trust: roots.trust,
        client_auth,
        ca_expiry: roots.expiry,
        client_expiry,
        certificates,
    })
}

/// Every certificate of a PEM file, at least one.
fn certificates(
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

/// The earliest expiry of `certs`, each of which must be an X.509 certificate.
fn expiry(
    key: &'static str,
    path: &Path,
    certs: &[CertificateDer<'_>],
) -> Result<Expiry, TlsConfigError> {
    let mut earliest: Option<Expiry> = None;
    for der in certs {
        let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| {
            TlsConfigError::BadCertificate {
                key,
                path: path.to_owned(),
                reason: e.to_string(),
            }
        })?;
        let not_after = cert.validity().not_after;
        if earliest
            .as_ref()
            .is_none_or(|e| not_after.timestamp() < e.not_after)
        {
            earliest = Some(Expiry {
                not_after: not_after.timestamp(),
                text: not_after.to_string(),
            });
        }
    }
    Ok(earliest.expect("certificates() returns at least one"))
}

struct Roots {
    store: RootCertStore,
    trust: String,
    certificates: Vec<CertificateDer<'static>>,
    expiry: Option<Expiry>,
}

fn ca_file(path: &Path) -> Result<Roots, TlsConfigError> {
    let certs = certificates(CA_FILE, path)?;
    let mut store = RootCertStore::empty();
    for cert in &certs {
        store.add(cert.clone()).map_err(|e| TlsConfigError::BadCa {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    }
    let expiry = expiry(CA_FILE, path, &certs)?;
    let trust = format!("{} ({})", path.display(), count(store.len()));
    Ok(Roots {
        store,
        trust,
        certificates: certs,
        expiry: Some(expiry),
    })
}

fn count(n: usize) -> String {
    match n {
        1 => "1 CA certificate".to_owned(),
        n => format!("{n} CA certificates"),
    }
}

/// The system's roots are not watched: they change with the image, which restarts.
fn system_roots() -> Result<Roots, TlsConfigError> {
    // Unreadable entries of the system store are skipped; only an empty result is fatal.
    let found = rustls_native_certs::load_native_certs();
    let mut store = RootCertStore::empty();
    store.add_parsable_certificates(found.certs);
    if store.is_empty() {
        return Err(TlsConfigError::NoSystemRoots);
    }
    let trust = format!("the system's roots ({})", count(store.len()));
    Ok(Roots {
        store,
        trust,
        certificates: Vec::new(),
        expiry: None,
    })
}

type ClientFiles = Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>, Expiry)>;

fn client_auth(options: &TlsOptions) -> Result<ClientFiles, Vec<TlsConfigError>> {
    match (&options.client_cert_file, &options.client_key_file) {
        (None, None) => Ok(None),
        (Some(_), None) => Err(vec![TlsConfigError::HalfClientAuth {
            key: CLIENT_KEY_FILE,
        }]),
        (None, Some(_)) => Err(vec![TlsConfigError::HalfClientAuth {
            key: CLIENT_CERT_FILE,
        }]),
        (Some(cert), Some(key)) => {
            let chain = certificates(CLIENT_CERT_FILE, cert).and_then(|chain| {
                let expiry = expiry(CLIENT_CERT_FILE, cert, &chain)?;
                Ok((chain, expiry))
            });
            let key = credentials::load_tls_key(key).map_err(|e| match e {
                credentials::TlsKeyError::Read { path, source } => TlsConfigError::Read {
                    key: CLIENT_KEY_FILE,
                    path,
                    source,
                },
                credentials::TlsKeyError::NoKey { path } => TlsConfigError::NoKey { path },
            });
            match (chain, key) {
                (Ok((chain, expiry)), Ok(key)) => Ok(Some((chain, key, expiry))),
                (chain, key) => Err(chain.err().into_iter().chain(key.err()).collect()),
            }
        }
    }
}
