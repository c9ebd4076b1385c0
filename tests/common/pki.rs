//! Certificates made fresh for each test with rcgen: a CA, a server certificate for
//! `localhost` and 127.0.0.1, an expired one, a client certificate, and an unrelated CA with a
//! server and a client certificate of its own.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// PEM files in a temp dir, removed on drop.
pub struct Pki {
    pub dir: tempfile::TempDir,
    pub ca: PathBuf,
    /// A CA that signed nothing the servers present at start.
    pub other_ca: PathBuf,
    /// Same names as `server_cert`, from `other_ca`: what a server presents after its CA
    /// was rotated.
    pub other_server_cert: PathBuf,
    pub other_server_key: PathBuf,
    /// `other_ca` then `ca` in one file.
    pub bundle: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// Same names and CA as `server_cert`, valid only in 2020.
    pub expired_cert: PathBuf,
    pub expired_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// A client certificate from `other_ca`, which the servers do not trust.
    pub stranger_cert: PathBuf,
    pub stranger_key: PathBuf,
}

/// When the CAs and the client certificates expire (1 January of these years), so that tests
/// can tell which of them is loaded.
pub const CA_EXPIRES: i32 = 2040;
pub const OTHER_CA_EXPIRES: i32 = 2045;
pub const CLIENT_EXPIRES: i32 = 2041;
pub const STRANGER_EXPIRES: i32 = 2046;

/// 1 January of `year`, in seconds since the Unix epoch.
pub fn new_year(year: i32) -> i64 {
    rcgen::date_time_ymd(year, 1, 1).unix_timestamp()
}

struct Ca {
    cert: Certificate,
    key: KeyPair,
}

fn ca(name: &str, expires: i32) -> Ca {
    let mut params = CertificateParams::default();
    params.not_after = rcgen::date_time_ymd(expires, 1, 1);
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    Ca { cert, key }
}

fn leaf(
    names: &[&str],
    common_name: &str,
    usage: ExtendedKeyUsagePurpose,
) -> (CertificateParams, KeyPair) {
    let mut params =
        CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params
        .distinguished_name
        .push(DnType::OrganizationName, "redis-ambassador tests");
    params.extended_key_usages = vec![usage];
    params.use_authority_key_identifier_extension = true;
    (params, KeyPair::generate().unwrap())
}

fn write(dir: &Path, name: &str, pem: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, pem).unwrap();
    path
}

impl Pki {
    pub fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let ca = self::ca("redis-ambassador test CA", CA_EXPIRES);
        let other = self::ca("unrelated CA", OTHER_CA_EXPIRES);

        let names = ["localhost", "127.0.0.1"];
        let (params, server_key) = leaf(&names, "localhost", ExtendedKeyUsagePurpose::ServerAuth);
        let server = params.signed_by(&server_key, &ca.cert, &ca.key).unwrap();
        let (params, other_server_key) =
            leaf(&names, "localhost", ExtendedKeyUsagePurpose::ServerAuth);
        let other_server = params
            .signed_by(&other_server_key, &other.cert, &other.key)
            .unwrap();
        let (mut params, expired_key) =
            leaf(&names, "localhost", ExtendedKeyUsagePurpose::ServerAuth);
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        let expired = params.signed_by(&expired_key, &ca.cert, &ca.key).unwrap();
        let (mut params, client_key) = leaf(
            &[],
            "ambassador-client",
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        params.not_after = rcgen::date_time_ymd(CLIENT_EXPIRES, 1, 1);
        let client = params.signed_by(&client_key, &ca.cert, &ca.key).unwrap();
        let (mut params, stranger_key) = leaf(&[], "stranger", ExtendedKeyUsagePurpose::ClientAuth);
        params.not_after = rcgen::date_time_ymd(STRANGER_EXPIRES, 1, 1);
        let stranger = params
            .signed_by(&stranger_key, &other.cert, &other.key)
            .unwrap();

        Pki {
            ca: write(d, "ca.pem", &ca.cert.pem()),
            other_ca: write(d, "other-ca.pem", &other.cert.pem()),
            other_server_cert: write(d, "other-server.pem", &other_server.pem()),
            other_server_key: write(d, "other-server-key.pem", &other_server_key.serialize_pem()),
            bundle: write(d, "bundle.pem", &(other.cert.pem() + &ca.cert.pem())),
            server_cert: write(d, "server.pem", &server.pem()),
            server_key: write(d, "server-key.pem", &server_key.serialize_pem()),
            expired_cert: write(d, "expired.pem", &expired.pem()),
            expired_key: write(d, "expired-key.pem", &expired_key.serialize_pem()),
            client_cert: write(d, "client.pem", &client.pem()),
            client_key: write(d, "client-key.pem", &client_key.serialize_pem()),
            stranger_cert: write(d, "stranger.pem", &stranger.pem()),
            stranger_key: write(d, "stranger-key.pem", &stranger_key.serialize_pem()),
            dir,
        }
    }

    /// A file in the PKI's dir with `content`, for broken-file tests.
    pub fn file(&self, name: &str, content: &str) -> PathBuf {
        write(self.dir.path(), name, content)
    }
}

/// How [`RedisServer::start_tls`] sets up TLS.
pub struct ServerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The CA client certificates must chain to.
    pub ca: PathBuf,
    pub require_client_cert: bool,
    /// `--tls-protocols`, e.g. "TLSv1.2 TLSv1.3".
    pub protocols: &'static str,
}

impl ServerTls {
    /// The PKI's valid server certificate, TLS 1.2 and 1.3, no client certificate needed.
    pub fn new(pki: &Pki) -> ServerTls {
        ServerTls {
            cert: pki.server_cert.clone(),
            key: pki.server_key.clone(),
            ca: pki.ca.clone(),
            require_client_cert: false,
            protocols: "TLSv1.2 TLSv1.3",
        }
    }
}
