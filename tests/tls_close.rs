//! How sessions over TLS end, read from the real binary's closing log line and `/metrics`:
//! Redis closes without TLS `close_notify`, which is an ordinary close between two replies
//! and an error inside one.

mod common;

use std::time::Instant;

use common::pki::Pki;
use common::*;

/// The real binary in front of `server`'s TLS port, verifying it with the PKI's CA.
fn tls_binary(server: &RedisServer, pki: &Pki, dir: &std::path::Path) -> Binary {
    let creds = server.credential_file(dir);
    std::fs::create_dir_all(dir.join("profiles")).unwrap();
    std::fs::write(
        dir.join("profiles/test.toml"),
        format!(
            "[listen]\naddress = \"127.0.0.1:0\"\n[upstream]\naddress = \"{}\"\n\
             [upstream.tls]\nca_file = \"{}\"\n[credentials]\nfile = \"{}\"\n\
             [admin]\naddress = \"127.0.0.1:0\"\nprobe_interval = \"1h\"\n",
            server.tls_addr("127.0.0.1"),
            pki.ca.display(),
            creds.display()
        ),
    )
    .unwrap();
    Binary::start(dir, &["--profile", "test"], &[])
}

/// The next `session closed` line of the binary's log, within the deadline.
fn closing_line(bin: &Binary) -> String {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = bin
            .stderr_lines
            .recv_timeout(left)
            .expect("a 'session closed' line");
        if line.contains("session closed") {
            return line;
        }
    }
}

/// `ambassador_sessions_closed_total` for `reason`, 0 when absent.
async fn closed(bin: &Binary, reason: &str) -> u64 {
    let (_, body) = http_get(&bin.admin, "/metrics").await;
    let series = format!("ambassador_sessions_closed_total{{reason=\"{reason}\"}} ");
    body.lines()
        .find_map(|l| l.strip_prefix(&series))
        .map_or(0, |v| v.trim().parse().unwrap())
}

#[tokio::test]
async fn a_client_that_leaves_ends_its_session_ordinarily() {
    let pki = Pki::new();
    let server = RedisServer::start_tls(ServerAuth::app(), &ServerTls::new(&pki));
    let dir = tempfile::tempdir().unwrap();
    let bin = tls_binary(&server, &pki, dir.path());

    let mut c = Raw::connect(&bin.addr).await;
    assert_eq!(c.cmd(&["PING"]).await, simple("PONG"));
    drop(c);
    let line = closing_line(&bin);
    assert!(line.contains(r#"reason="ClientClosed""#), "{line}");
    assert!(!line.contains("error="), "{line}");

    // QUIT: Redis answers and closes first, again without close_notify.
    let mut c = Raw::connect(&bin.addr).await;
    assert_eq!(c.cmd(&["QUIT"]).await, simple("OK"));
    assert_eq!(c.read_to_close().await, b"");
    let line = closing_line(&bin);
    assert!(line.contains(r#"reason="UpstreamClosed""#), "{line}");

    assert_eq!(closed(&bin, "ClientClosed").await, 1);
    assert_eq!(closed(&bin, "UpstreamClosed").await, 1);
    assert_eq!(closed(&bin, "Error").await, 0);
}

#[tokio::test]
async fn a_reply_cut_off_inside_a_frame_is_an_error() {
    // Larger than every socket buffer between Redis and the client together, so that most of
    // it is still in Redis when Redis dies.
    const SIZE: usize = 48 << 20;
    let pki = Pki::new();
    let server = RedisServer::start_tls(ServerAuth::app(), &ServerTls::new(&pki));
    let mut direct = server.direct().await;
    let value = "v".repeat(SIZE);
    assert_eq!(direct.cmd(&["SET", "big", &value]).await, simple("OK"));
    let dir = tempfile::tempdir().unwrap();
    let bin = tls_binary(&server, &pki, dir.path());

    let mut c = Raw::connect(&bin.addr).await;
    c.send(&command(&["GET", "big"])).await;
    // The reply has begun; the client stops reading and every buffer on the way fills.
    let header = format!("${SIZE}\r\n");
    assert_eq!(c.read_bytes(header.len()).await, header.as_bytes());
    // A killed server sends no close_notify, and the kernel ends the stream after what
    // it had already taken.
    send_signal(server.pid(), "KILL");
    let got = c.read_to_close().await;
    assert!(got.len() < SIZE, "the whole reply arrived: nothing was cut");
    let line = closing_line(&bin);
    assert!(line.contains(r#"reason="Error""#), "{line}");
    assert!(line.contains("close_notify"), "{line}");
    assert_eq!(closed(&bin, "Error").await, 1);
}
