//! A failed TLS handshake in a few words for the client, and what `--check` reports about a
//! successful one.

use std::fmt;
use std::io;

use rustls::{AlertDescription, CertificateError};

/// Why a TLS handshake failed, in the words a client sees after `upstream unavailable (TLS: `.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsFailure {
    UnknownIssuer,
    NameMismatch(String),
    Expired,
    NotYetValid,
    Certificate(String),
    ClientCertificateRequired,
    ClientCertificateRejected(String),
    HandshakeFailure,
    NotTls,
    Closed,
    Other(String),
}

impl fmt::Display for TlsFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TlsFailure::UnknownIssuer => write!(f, "certificate not trusted (unknown issuer)"),
            TlsFailure::NameMismatch(name) if name.is_empty() => {
                write!(f, "certificate not valid for the server name")
            }
            TlsFailure::NameMismatch(name) => {
                write!(f, "certificate not valid for server name {name}")
            }
            TlsFailure::Expired => write!(f, "certificate expired"),
            TlsFailure::NotYetValid => write!(f, "certificate not valid yet"),
            TlsFailure::Certificate(why) => write!(f, "certificate rejected ({why})"),
            TlsFailure::ClientCertificateRequired => {
                write!(f, "peer requires a client certificate")
            }
            TlsFailure::ClientCertificateRejected(alert) => {
                write!(f, "peer rejected the client certificate ({alert})")
            }
            TlsFailure::HandshakeFailure => write!(
                f,
                "handshake failure (no common parameters, or a client certificate is required)"
            ),
            TlsFailure::NotTls => write!(f, "peer does not speak TLS"),
            TlsFailure::Closed => write!(f, "connection closed during the handshake"),
            TlsFailure::Other(why) => write!(f, "{why}"),
        }
    }
}

/// The TLS reason inside an I/O error from tokio-rustls, if it holds one. After the
/// handshake this still matters: with TLS 1.3 the server judges the client's certificate
/// after the client considers the handshake done, so its alert arrives on the first read.
pub fn classify(e: &io::Error) -> Option<TlsFailure> {
    let inner = e.get_ref()?.downcast_ref::<rustls::Error>()?;
    Some(failure(inner))
}

/// Why the handshake itself failed: a TLS reason, or the transport under it.
pub fn classify_handshake(e: &io::Error) -> TlsFailure {
    classify(e).unwrap_or_else(|| match e.kind() {
        io::ErrorKind::UnexpectedEof => TlsFailure::Closed,
        io::ErrorKind::Other => TlsFailure::Other(format!("handshake I/O: {e}")),
        kind => TlsFailure::Other(format!("handshake I/O: {kind}")),
    })
}

fn failure(e: &rustls::Error) -> TlsFailure {
    use rustls::Error as E;
    use CertificateError as C;
    match e {
        E::InvalidCertificate(cert) => match cert {
            C::UnknownIssuer => TlsFailure::UnknownIssuer,
            C::NotValidForName => TlsFailure::NameMismatch(String::new()),
            C::NotValidForNameContext { expected, .. } => {
                TlsFailure::NameMismatch(expected.to_str().into_owned())
            }
            C::Expired | C::ExpiredContext { .. } => TlsFailure::Expired,
            C::NotValidYet | C::NotValidYetContext { .. } => TlsFailure::NotYetValid,
            other => TlsFailure::Certificate(format!("{other:?}")),
        },
        E::AlertReceived(AlertDescription::CertificateRequired) => {
            TlsFailure::ClientCertificateRequired
        }
        E::AlertReceived(AlertDescription::HandshakeFailure) => TlsFailure::HandshakeFailure,
        E::AlertReceived(
            alert @ (AlertDescription::BadCertificate
            | AlertDescription::UnknownCA
            | AlertDescription::CertificateUnknown
            | AlertDescription::CertificateExpired
            | AlertDescription::CertificateRevoked
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::AccessDenied),
        ) => TlsFailure::ClientCertificateRejected(format!("{alert:?}")),
        E::AlertReceived(alert) => TlsFailure::Other(format!("peer sent alert {alert:?}")),
        E::InvalidMessage(_) | E::InappropriateMessage { .. } => TlsFailure::NotTls,
        other => TlsFailure::Other(format!("handshake failed: {other}")),
    }
}

/// What `--check` reports about an established TLS connection.
pub fn describe(conn: &rustls::ClientConnection) -> String {
    let version = match conn.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLS 1.3".to_owned(),
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLS 1.2".to_owned(),
        other => format!("{other:?}"),
    };
    let peer = conn
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(|leaf| match x509_parser::parse_x509_certificate(leaf) {
            Ok((_, cert)) => format!(
                "{} (issuer {}, valid until {})",
                cert.subject(),
                cert.issuer(),
                cert.validity().not_after
            ),
            Err(e) => format!("unparsable certificate ({e})"),
        })
        .unwrap_or_else(|| "none presented".to_owned());
    format!("tls: {version}\npeer certificate: {peer}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rustls_errors_inside_io_errors_are_named() {
        let wrapped = |e: rustls::Error| io::Error::new(io::ErrorKind::InvalidData, e);
        let unknown = wrapped(rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer,
        ));
        assert_eq!(classify(&unknown), Some(TlsFailure::UnknownIssuer));
        let required = wrapped(rustls::Error::AlertReceived(
            AlertDescription::CertificateRequired,
        ));
        assert_eq!(
            classify_handshake(&required).to_string(),
            "peer requires a client certificate"
        );
        // Transport errors are not TLS reasons after the handshake, but are during it.
        let eof = io::Error::from(io::ErrorKind::UnexpectedEof);
        assert_eq!(classify(&eof), None);
        assert_eq!(classify_handshake(&eof), TlsFailure::Closed);
    }
}
