//! Certificates that rotate under a running ambassador, against real TLS redis-servers: the
//! server changes its certificate or the CA it trusts at runtime (`CONFIG SET tls-*`, no
//! re-bind), the mounted files are replaced the way cert-manager, an editor (rename) or the
//! kubelet (`..data` symlink swap) do, and new connections follow without a restart while
//! open sessions keep theirs.

mod common;

use std::path::{Path, PathBuf};

use common::pki::{self, Pki};
use common::*;

/// A folder of mounted files, updated the kubelet's way: the files are symlinks through
/// `..data`, which is swapped atomically to a new timestamped folder.
struct SecretVolume {
    dir: tempfile::TempDir,
    generation: u32,
}

impl SecretVolume {
    fn new(files: &[(&str, &Path)]) -> SecretVolume {
        let mut volume = SecretVolume {
            dir: tempfile::tempdir().unwrap(),
            generation: 0,
        };
        volume.update(files);
        for (name, _) in files {
            let link = volume.path(name);
            std::os::unix::fs::symlink(Path::new("..data").join(name), link).unwrap();
        }
        volume
    }

    /// Writes a new generation and swaps `..data` to it in one rename.
    fn update(&mut self, files: &[(&str, &Path)]) {
        self.generation += 1;
        let generation = format!("..2026_12_02_{:02}", self.generation);
        let folder = self.dir.path().join(&generation);
        std::fs::create_dir(&folder).unwrap();
        for (name, source) in files {
            std::fs::copy(source, folder.join(name)).unwrap();
        }
        let tmp = self.dir.path().join("..data_tmp");
        std::os::unix::fs::symlink(&generation, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.path().join("..data")).unwrap();
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// Replaces `path` with `content` by renaming a new file over it.
fn replace_by_rename(path: &Path, content: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn toml_path(key: &str, path: &Path) -> String {
    format!("{key} = \"{}\"\n", path.display())
}

/// An ambassador in front of `server`'s TLS port with `tls` lines under `[upstream.tls]`.
async fn ambassador(server: &RedisServer, tls: &str) -> Ambassador {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[listen]\naddress = \"127.0.0.1:0\"\n[upstream]\naddress = \"{}\"\n\
         [upstream.tls]\n{tls}\n[credentials]\nfile = \"{}\"\n{NO_PROBES}",
        server.tls_addr("127.0.0.1"),
        server.credential_file(dir.path()).display()
    );
    Ambassador::with_config(load_config(dir.path(), &text), dir).await
}

/// Whether a new client gets PONG through the ambassador (not a refusal).
async fn new_client_relays(amb: &Ambassador) -> bool {
    let mut c = amb.connect().await;
    c.send(&command(&["PING"])).await;
    c.try_reply().await == Some(simple("PONG"))
}

/// The refusal a new client gets, as text.
async fn refusal(amb: &Ambassador) -> String {
    let mut c = amb.connect().await;
    String::from_utf8_lossy(&c.read_to_close().await).into_owned()
}

/// `CONFIG SET` on the server's plain port: the TLS listener keeps its port.
async fn config_set(server: &RedisServer, pairs: &[(&str, &Path)]) {
    let mut direct = server.direct().await;
    let mut args = vec!["CONFIG".to_owned(), "SET".to_owned()];
    for (key, path) in pairs {
        args.push((*key).to_owned());
        args.push(path.display().to_string());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    assert_eq!(direct.cmd(&args).await, simple("OK"));
}

async fn reloads(amb: &Ambassador, result: &str) -> f64 {
    amb.metric("ambassador_upstream_tls_reloads_total", ("result", result))
        .await
        .unwrap_or(0.0)
}

/// `ambassador_upstream_tls_certificate_expiry_seconds` for `file` is about the time until
/// 1 January of `year`.
async fn assert_expires(amb: &Ambassador, file: &str, year: i32) {
    let name = "ambassador_upstream_tls_certificate_expiry_seconds";
    let got = amb.metric(name, ("file", file)).await.expect(name);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as f64;
    let want = pki::new_year(year) as f64 - now;
    assert!(
        (got - want).abs() < 600.0,
        "{file}: {got}, want about {want}"
    );
}

#[tokio::test]
async fn a_ca_file_replaced_by_rename_applies_to_new_connections() {
    let pki = Pki::new();
    let server = RedisServer::start_tls(ServerAuth::app(), &ServerTls::new(&pki));
    let mount = tempfile::tempdir().unwrap();
    let ca = mount.path().join("ca.crt");
    std::fs::copy(&pki.ca, &ca).unwrap();
    let amb = ambassador(&server, &toml_path("ca_file", &ca)).await;
    let mut open = amb.connect().await;
    assert_eq!(open.cmd(&["SET", "k", "before"]).await, simple("OK"));
    assert_expires(&amb, "ca_file", pki::CA_EXPIRES).await;

    // The upstream now presents a certificate from another CA: the set in use refuses it.
    config_set(
        &server,
        &[
            ("tls-cert-file", &pki.other_server_cert),
            ("tls-key-file", &pki.other_server_key),
        ],
    )
    .await;
    let text = refusal(&amb).await;
    assert!(text.contains("certificate not trusted"), "{text:?}");

    replace_by_rename(&ca, &std::fs::read(&pki.other_ca).unwrap());
    wait_until("a new client relays with the new CA", DEADLINE, || {
        new_client_relays(&amb)
    })
    .await;
    // The open session kept its connection, made under the old CA.
    assert_eq!(open.cmd(&["GET", "k"]).await, bulk(b"before"));
    assert_eq!(reloads(&amb, "applied").await, 1.0);
    assert_eq!(reloads(&amb, "invalid").await, 0.0);
    assert_expires(&amb, "ca_file", pki::OTHER_CA_EXPIRES).await;
}

#[tokio::test]
async fn a_client_certificate_swapped_by_the_kubelet_applies_to_new_connections() {
    let pki = Pki::new();
    let server_tls = ServerTls {
        require_client_cert: true,
        ..ServerTls::new(&pki)
    };
    let server = RedisServer::start_tls(ServerAuth::app(), &server_tls);
    let mut volume =
        SecretVolume::new(&[("tls.crt", &pki.client_cert), ("tls.key", &pki.client_key)]);
    let tls = [
        toml_path("ca_file", &pki.ca),
        toml_path("client_cert_file", &volume.path("tls.crt")),
        toml_path("client_key_file", &volume.path("tls.key")),
    ]
    .concat();
    let amb = ambassador(&server, &tls).await;
    let mut open = amb.connect().await;
    assert_eq!(open.cmd(&["SET", "k", "before"]).await, simple("OK"));
    assert_expires(&amb, "client_cert_file", pki::CLIENT_EXPIRES).await;

    // The upstream now trusts client certificates from the other CA only.
    config_set(&server, &[("tls-ca-cert-file", &pki.other_ca)]).await;
    let text = refusal(&amb).await;
    assert!(
        text.contains("peer rejected the client certificate"),
        "{text:?}"
    );

    volume.update(&[
        ("tls.crt", &pki.stranger_cert),
        ("tls.key", &pki.stranger_key),
    ]);
    wait_until(
        "a new client relays with the new client certificate",
        DEADLINE,
        || new_client_relays(&amb),
    )
    .await;
    assert_eq!(open.cmd(&["GET", "k"]).await, bulk(b"before"));
    assert_eq!(reloads(&amb, "applied").await, 1.0);
    assert_expires(&amb, "client_cert_file", pki::STRANGER_EXPIRES).await;
}

#[tokio::test]
async fn a_garbled_replacement_keeps_the_last_good_configuration() {
    let pki = Pki::new();
    let server = RedisServer::start_tls(ServerAuth::app(), &ServerTls::new(&pki));
    let mount = tempfile::tempdir().unwrap();
    let ca = mount.path().join("ca.crt");
    std::fs::copy(&pki.ca, &ca).unwrap();
    let amb = ambassador(&server, &toml_path("ca_file", &ca)).await;
    assert!(new_client_relays(&amb).await);

    replace_by_rename(
        &ca,
        b"-----BEGIN CERTIFICATE-----\ngarbled\n-----END CERTIFICATE-----\n",
    );
    wait_until("the garbled file is refused", DEADLINE, || async {
        reloads(&amb, "invalid").await == 1.0
    })
    .await;
    assert!(new_client_relays(&amb).await);
    assert_eq!(reloads(&amb, "applied").await, 0.0);
    assert_expires(&amb, "ca_file", pki::CA_EXPIRES).await;

    // A good file again is picked up: a failure does not stop the watch.
    replace_by_rename(&ca, &std::fs::read(&pki.bundle).unwrap());
    wait_until("the bundle is applied", DEADLINE, || async {
        reloads(&amb, "applied").await == 1.0
    })
    .await;
    assert!(new_client_relays(&amb).await);
}

/// The next line of the binary's log that contains `words`, within the deadline.
fn log_line(bin: &Binary, words: &str) -> String {
    let deadline = std::time::Instant::now() + DEADLINE;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line = bin
            .stderr_lines
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("no log line with {words:?}"));
        if line.contains(words) {
            return line;
        }
    }
}

#[tokio::test]
async fn the_binary_logs_an_unusable_file_with_its_reason_and_a_reload_with_its_trust() {
    let pki = Pki::new();
    let server = RedisServer::start_tls(ServerAuth::app(), &ServerTls::new(&pki));
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.crt");
    std::fs::copy(&pki.ca, &ca).unwrap();
    std::fs::create_dir(dir.path().join("profiles")).unwrap();
    std::fs::write(
        dir.path().join("profiles/test.toml"),
        format!(
            "[listen]\naddress = \"127.0.0.1:0\"\n[upstream]\naddress = \"{}\"\n\
             [upstream.tls]\n{}[credentials]\nfile = \"{}\"\n{NO_PROBES}",
            server.tls_addr("127.0.0.1"),
            toml_path("ca_file", &ca),
            server.credential_file(dir.path()).display()
        ),
    )
    .unwrap();
    let bin = Binary::start(dir.path(), &["--profile", "test"], &[]);

    replace_by_rename(&ca, b"-----BEGIN CERTIFICATE-----\n");
    let line = log_line(&bin, "TLS file unusable");
    assert!(line.contains("WARN"), "{line}");
    assert!(line.contains(r#"key="upstream.tls.ca_file""#), "{line}");
    assert!(line.contains("ca.crt is not valid PEM"), "{line}");

    replace_by_rename(&ca, &std::fs::read(&pki.bundle).unwrap());
    let line = log_line(&bin, "TLS files reloaded");
    assert!(line.contains("2 CA certificates"), "{line}");
    let mut c = Raw::connect(&bin.addr).await;
    assert_eq!(c.cmd(&["PING"]).await, simple("PONG"));
}
