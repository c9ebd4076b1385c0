//! `[upstream.tls]` against real redis-servers listening with TLS, with certificates made
//! fresh for each test: what connects, what is refused and how the client is told, which
//! configurations are refused at start, and what `--check` reports.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use common::pki::Pki;
use common::*;

const REFUSED: &str = "-ERR ambassador: upstream unavailable (TLS: ";

/// A profile whose upstream is `address` over TLS with `tls` lines under `[upstream.tls]`.
fn profile(server: &RedisServer, dir: &Path, address: &str, tls: &str) -> String {
    format!(
        "[listen]\naddress = \"127.0.0.1:0\"\n[upstream]\naddress = \"{address}\"\n\
         connect_timeout = \"5s\"\n[upstream.tls]\nenabled = true\n{tls}\n\
         [credentials]\nfile = \"{}\"\n",
        server.credential_file(dir).display()
    )
}

fn toml_path(key: &str, path: &Path) -> String {
    format!("{key} = \"{}\"\n", path.display())
}

async fn ambassador(server: &RedisServer, address: &str, tls: &str) -> Ambassador {
    let dir = tempfile::tempdir().unwrap();
    let config = load_config(dir.path(), &profile(server, dir.path(), address, tls));
    Ambassador::with_config(config, dir).await
}

/// Through the ambassador, the client is the profile's user on the TLS upstream.
async fn assert_relays(amb: &Ambassador) {
    let mut c = amb.connect().await;
    assert_eq!(c.cmd(&["ACL", "WHOAMI"]).await, bulk(USER.as_bytes()));
    assert_eq!(c.cmd(&["SET", "k", "over-tls"]).await, simple("OK"));
    assert_eq!(c.cmd(&["GET", "k"]).await, bulk(b"over-tls"));
}

/// The one line a refused client gets, then the connection closes.
async fn refusal(amb: &Ambassador) -> String {
    let mut c = amb.connect().await;
    let got = c.read_to_close().await;
    String::from_utf8_lossy(&got).into_owned()
}

fn assert_refused(text: &str, reason: &str) {
    assert!(
        text.starts_with(&format!("{REFUSED}{reason}")),
        "expected {REFUSED}{reason}..., got {text:?}"
    );
    assert!(text.ends_with(")\r\n"), "{text:?}");
}

/// A TLS redis-server and an ambassador that verifies it with the CA file and the name
/// `localhost`, connecting to its IP address.
async fn verified_upstream() -> (RedisServer, Ambassador) {
    let pki = Pki::new();
    let server = RedisServer::start_tls(ServerAuth::app(), &ServerTls::new(&pki));
    let tls = format!(
        "server_name = \"localhost\"\n{}",
        toml_path("ca_file", &pki.ca)
    );
    let amb = ambassador(&server, &server.tls_addr("127.0.0.1"), &tls).await;
    (server, amb)
}

#[tokio::test]
async fn ca_file_and_server_name_verify_the_upstream() {
    let (_server, amb) = verified_upstream().await;
    assert_relays(&amb).await;
}

/// Upstream TLS handshakes of client sessions of one kind, "full" or "resumed".
async fn handshakes(amb: &Ambassador, kind: &str) -> f64 {
    amb.metric("ambassador_upstream_tls_handshakes_total", ("kind", kind))
        .await
        .unwrap_or(0.0)
}

/// Opens `n` clients while the upstream is stopped, so that their `n` TLS handshakes are all
/// in flight at once, then lets the upstream go on: every client gets its PONG.
async fn burst(server: &RedisServer, amb: &Ambassador, n: usize) {
    let port = server.tls_port.expect("a TLS server");
    send_signal(server.pid(), "STOP");
    let mut clients = Vec::new();
    for _ in 0..n {
        let mut c = amb.connect().await;
        c.send(&command(&["PING"])).await;
        clients.push(c);
    }
    wait_until(
        "every ClientHello waits at the stopped server",
        DEADLINE,
        || async { waiting_connections(port) >= n },
    )
    .await;
    send_signal(server.pid(), "CONT");
    for c in &mut clients {
        assert_eq!(c.reply().await, simple("PONG"));
    }
}

/// Clients that open a connection per request (a PHP-FPM pool) come in bursts. After the
/// first burst, every upstream connection resumes a TLS session: a full handshake makes
/// single-threaded Redis compute a signature between two commands. (rustls' default store
/// holds 8 tickets: 32 of each burst of 40 were full handshakes.)
#[tokio::test]
async fn bursts_of_new_connections_resume_tls_sessions() {
    const BURST: usize = 40;
    let (server, amb) = verified_upstream().await;
    burst(&server, &amb, BURST).await;
    let full = handshakes(&amb, "full").await;
    assert!(full >= 1.0, "the first burst found no session to resume");
    for _ in 0..3 {
        burst(&server, &amb, BURST).await;
    }
    assert_eq!(
        handshakes(&amb, "full").await,
        full,
        "full handshakes after the first burst"
    );
    assert!(handshakes(&amb, "resumed").await >= (3 * BURST) as f64);
}

#[tokio::test]
async fn an_ip_address_is_verified_against_the_ip_san() {
    let pki = Pki::new();
    let server = RedisServer::start_tls(ServerAuth::app(), &ServerTls::new(&pki));
    let tls = toml_path("ca_file", &pki.ca);
    let amb = ambassador(&server, &server.tls_addr("127.0.0.1"), &tls).await;
    assert_relays(&amb).await;
    // The same server verified as another IP address: the certificate does not name it.
    let tls = format!(
        "server_name = \"127.0.0.2\"\n{}",
        toml_path("ca_file", &pki.ca)
    );
    let amb = ambassador(&server, &server.tls_addr("127.0.0.1"), &tls).await;
    assert_refused(
        &refusal(&amb).await,
        "certificate not valid for server name 127.0.0.2",
    );
}

#[tokio::test]
async fn mutual_tls_presents_the_client_certificate() {
    let pki = Pki::new();
    let server_tls = ServerTls {
        require_client_cert: true,
        ..ServerTls::new(&pki)
    };
    let server = RedisServer::start_tls(ServerAuth::app(), &server_tls);
    let tls = [
        toml_path("ca_file", &pki.ca),
        toml_path("client_cert_file", &pki.client_cert),
        toml_path("client_key_file", &pki.client_key),
    ]
    .concat();
    let amb = ambassador(&server, &server.tls_addr("127.0.0.1"), &tls).await;
    assert_relays(&amb).await;
}

#[tokio::test]
async fn a_bundle_of_several_cas_trusts_each_of_them() {
    let pki = Pki::new();
    let server = RedisServer::start_tls(ServerAuth::app(), &ServerTls::new(&pki));
    // The unrelated CA comes first: every certificate of the file must be loaded.
    let tls = toml_path("ca_file", &pki.bundle);
    let amb = ambassador(&server, &server.tls_addr("localhost"), &tls).await;
    assert_relays(&amb).await;
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_not_trusted() {
    let pki = Pki::new();
    let server = RedisServer::start_tls(ServerAuth::app(), &ServerTls::new(&pki));
    let tls = toml_path("ca_file", &pki.other_ca);
    let amb = ambassador(&server, &server.tls_addr("127.0.0.1"), &tls).await;
    assert_refused(
        &refusal(&amb).await,
        "certificate not trusted (unknown issuer)",
    );
    // Still serving: the next client is told the same.
    assert_refused(&refusal(&amb).await, "certificate not trusted");
}

#[tokio::test]
async fn a_certificate_for_another_name_is_refused() {
    let pki = Pki::new();
    let server = RedisServer::start_tls(ServerAuth::app(), &ServerTls::new(&pki));
    let tls = format!(
        "server_name = \"redis.example.com\"\n{}",
        toml_path("ca_file", &pki.ca)
    );
    let amb = ambassador(&server, &server.tls_addr("127.0.0.1"), &tls).await;
    assert_refused(
        &refusal(&amb).await,
        "certificate not valid for server name redis.example.com",
    );
}

#[tokio::test]
async fn an_expired_certificate_is_refused() {
    let pki = Pki::new();
    let server_tls = ServerTls {
        cert: pki.expired_cert.clone(),
        key: pki.expired_key.clone(),
        ..ServerTls::new(&pki)
    };
    let server = RedisServer::start_tls(ServerAuth::app(), &server_tls);
    let tls = toml_path("ca_file", &pki.ca);
    let amb = ambassador(&server, &server.tls_addr("127.0.0.1"), &tls).await;
    assert_refused(&refusal(&amb).await, "certificate expired");
}

#[tokio::test]
async fn a_server_that_requires_a_client_certificate_says_so() {
    let pki = Pki::new();
    for protocols in ["TLSv1.3", "TLSv1.2"] {
        let server_tls = ServerTls {
            require_client_cert: true,
            protocols,
            ..ServerTls::new(&pki)
        };
        let server = RedisServer::start_tls(ServerAuth::app(), &server_tls);
        let tls = toml_path("ca_file", &pki.ca);
        let amb = ambassador(&server, &server.tls_addr("127.0.0.1"), &tls).await;
        let text = refusal(&amb).await;
        // TLS 1.3 names the problem (certificate_required); TLS 1.2 has only handshake_failure.
        let reason = match protocols {
            "TLSv1.3" => "peer requires a client certificate",
            _ => "handshake failure",
        };
        assert_refused(&text, reason);
    }
}

#[tokio::test]
async fn a_client_certificate_the_server_does_not_trust_is_reported() {
    let pki = Pki::new();
    let server_tls = ServerTls {
        require_client_cert: true,
        ..ServerTls::new(&pki)
    };
    let server = RedisServer::start_tls(ServerAuth::app(), &server_tls);
    let tls = [
        toml_path("ca_file", &pki.ca),
        toml_path("client_cert_file", &pki.stranger_cert),
        toml_path("client_key_file", &pki.stranger_key),
    ]
    .concat();
    let amb = ambassador(&server, &server.tls_addr("127.0.0.1"), &tls).await;
    assert_refused(
        &refusal(&amb).await,
        "peer rejected the client certificate (",
    );
}

#[tokio::test]
async fn a_port_that_does_not_speak_tls_is_named() {
    // Answers the ClientHello the way a plain Redis port may: with a RESP error.
    let plain = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = plain.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        while let Ok((mut s, _)) = plain.accept().await {
            let _ = s.write_all(b"-ERR unknown command\r\n").await;
        }
    });
    let pki = Pki::new();
    let server = RedisServer::start(ServerAuth::app());
    let amb = ambassador(&server, &address, &toml_path("ca_file", &pki.ca)).await;
    assert_refused(&refusal(&amb).await, "peer does not speak TLS");
}

#[tokio::test]
async fn the_tls_handshake_counts_within_connect_timeout() {
    // Accepts TCP (the kernel completes it from the backlog) but never answers the hello.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = silent.local_addr().unwrap().to_string();
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("creds"), "x\n").unwrap();
    let text = format!(
        "[upstream]\naddress = \"{address}\"\nconnect_timeout = \"300ms\"\n[upstream.tls]\n{}\
         [credentials]\nfile = \"{}\"\n",
        toml_path("ca_file", &pki.ca),
        dir.path().join("creds").display()
    );
    let amb = Ambassador::with_config(load_config(dir.path(), &text), dir).await;
    let got = refusal(&amb).await;
    assert!(
        got.starts_with(&format!(
            "-ERR ambassador: upstream unavailable (connect to {address}: timed out after 300ms)"
        )),
        "{got:?}"
    );
}

#[tokio::test]
async fn insecure_skip_verify_connects_to_an_untrusted_server_and_says_so() {
    let pki = Pki::new();
    let server = RedisServer::start_tls(ServerAuth::app(), &ServerTls::new(&pki));
    // No ca_file and a name the certificate does not hold: nothing would verify.
    let tls = "server_name = \"not-the-name.example\"\ninsecure_skip_verify = true\n";
    let dir = tempfile::tempdir().unwrap();
    let config = load_config(
        dir.path(),
        &profile(&server, dir.path(), &server.tls_addr("127.0.0.1"), tls),
    );
    assert!(
        config
            .summary()
            .contains("WARNING: upstream.tls.insecure_skip_verify is set"),
        "{}",
        config.summary()
    );
    let amb = Ambassador::with_config(config, dir).await;
    assert_relays(&amb).await;
}

#[tokio::test]
async fn check_reports_the_negotiated_version() {
    let pki = Pki::new();
    let server_tls = ServerTls {
        protocols: "TLSv1.2",
        ..ServerTls::new(&pki)
    };
    let server = RedisServer::start_tls(ServerAuth::app(), &server_tls);
    let dir = tempfile::tempdir().unwrap();
    let tls = toml_path("ca_file", &pki.ca);
    let text = profile(&server, dir.path(), &server.tls_addr("127.0.0.1"), &tls);
    let config = load_config(dir.path(), &text);
    let report = redis_ambassador::probe::probe(
        &config.upstream,
        &config.credentials,
        &config.handshake,
        &config.upstream.expect,
    )
    .await
    .unwrap();
    let tls = report.tls.expect("a TLS connection");
    assert!(tls.starts_with("tls: TLS 1.2\n"), "{tls}");
}

/// `--check` on the real binary, and the warning at start.
fn binary(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_redis-ambassador"))
        .current_dir(dir)
        .args(args)
        .env_remove("AMBASSADOR_PROFILE")
        .env_remove("AMBASSADOR_CONFIG_DIR")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .output()
        .expect("run redis-ambassador")
}

#[tokio::test]
async fn check_prints_the_tls_version_and_the_peer_certificate() {
    let pki = Pki::new();
    let server = RedisServer::start_tls(ServerAuth::app(), &ServerTls::new(&pki));
    let dir = tempfile::tempdir().unwrap();
    let tls = toml_path("ca_file", &pki.ca);
    let text = profile(&server, dir.path(), &server.tls_addr("127.0.0.1"), &tls);
    std::fs::write(dir.path().join("tls.toml"), text).unwrap();
    let dir_arg = dir.path().display().to_string();
    let out = binary(
        dir.path(),
        &["--config-dir", &dir_arg, "--profile", "tls", "--check"],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("upstream tls: server name \"127.0.0.1\""),
        "{stdout}"
    );
    // When the CA file's certificate expires: the test CA's notAfter is 1 January 2040.
    assert!(
        stdout.contains("(1 CA certificate), CA expires Jan  1 00:00:00 2040 +00:00 (in "),
        "{stdout}"
    );
    assert!(stdout.contains("tls: TLS 1.3\n"), "{stdout}");
    assert!(
        stdout.contains("peer certificate: CN=localhost, O=redis-ambassador tests"),
        "{stdout}"
    );
    assert!(stdout.contains("authenticated as: app"), "{stdout}");
    assert!(!stdout.contains("WARNING"), "{stdout}");

    // Insecure: --check prints the warning, and so does every start.
    let text = profile(
        &server,
        dir.path(),
        &server.tls_addr("127.0.0.1"),
        "insecure_skip_verify = true",
    );
    std::fs::write(dir.path().join("tls.toml"), text).unwrap();
    let out = binary(
        dir.path(),
        &["--config-dir", &dir_arg, "--profile", "tls", "--check"],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("WARNING: upstream.tls.insecure_skip_verify is set"),
        "{stdout}"
    );
    let started = Binary::start(
        dir.path(),
        &["--config-dir", &dir_arg, "--profile", "tls"],
        &[],
    );
    assert!(
        started
            .startup_lines
            .iter()
            .any(|l| l.contains("WARN") && l.contains("insecure_skip_verify is set")),
        "{:#?}",
        started.startup_lines
    );
}
