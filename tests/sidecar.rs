//! The ambassador's life beside the application (DESIGN section 6, README "Beside the
//! application"): `POST /quitquitquit`, `shutdown.min_delay`, and `--check` as an init step.
//! All on the real binary, against a real redis-server.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use redis_protocol::resp3::types::OwnedFrame;

/// A profile `test` in `dir` in front of `server`; `admin` is the `[admin]` section's body
/// (`None`: no admin endpoint at all), `extra` any further sections.
fn profile(dir: &Path, server: &RedisServer, admin: Option<&str>, extra: &str) {
    let creds = server.credential_file(dir);
    let admin = admin.map_or_else(String::new, |lines| {
        format!("[admin]\naddress = \"127.0.0.1:0\"\nprobe_interval = \"100ms\"\n{lines}")
    });
    write_test_profile(dir, server, &creds, &format!("{admin}{extra}"));
}

/// Connects until the listener refuses (the socket is closed, not merely slow), within the
/// deadline; every connection that still gets through is closed at once.
async fn wait_refused(addr: &str) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        match tokio::net::TcpStream::connect(addr).await {
            Ok(accepted) => drop(accepted),
            Err(e) => {
                assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
                return;
            }
        }
        assert!(Instant::now() < deadline, "still accepting at {addr}");
        tokio::time::sleep(Duration::from_millis(25)).await; // polling interval
    }
}

fn still_running(bin: &mut Binary) -> bool {
    bin.child.try_wait().unwrap().is_none()
}

#[tokio::test]
async fn quitquitquit_drains_a_pending_reply_then_exits_zero() {
    let server = RedisServer::start(ServerAuth::app());
    let dir = tempfile::tempdir().unwrap();
    profile(
        dir.path(),
        &server,
        Some("allow_quit = true\n"),
        "[shutdown]\ndrain_timeout = \"20s\"\n",
    );
    let mut bin = Binary::start(dir.path(), &["--profile", "test"], &[]);
    wait_status(&bin.admin, "/readyz", 200).await;

    let (status, _) = http_get(&bin.admin, "/quitquitquit").await;
    assert_eq!(status, 405, "only POST quits");
    assert_eq!(
        http_get(&bin.admin, "/readyz").await.0,
        200,
        "a GET changed nothing"
    );

    // A session waiting for its reply when the quit arrives.
    let mut open = Raw::connect(&bin.addr).await;
    open.send(&command(&["BLPOP", "jobs", "0"])).await;
    wait_blocked_clients(&server, 1).await;

    let (status, body) = http_request(&bin.admin, "POST", "/quitquitquit").await;
    assert_eq!((status, body.as_str()), (200, "draining, then exiting\n"));
    wait_status(&bin.admin, "/readyz", 503).await;
    wait_refused(&bin.addr).await;
    assert!(still_running(&mut bin), "exited with a reply still pending");

    let mut direct = server.direct().await;
    assert_eq!(direct.cmd(&["LPUSH", "jobs", "done"]).await, int(1));
    assert_eq!(
        open.reply().await,
        OwnedFrame::Array {
            data: vec![bulk(b"jobs"), bulk(b"done")],
            attributes: None
        },
        "the pending reply reached its client"
    );
    drop(open);
    assert_eq!(
        bin.wait_exit().code(),
        Some(0),
        "a quit drains, then exits 0"
    );
}

#[tokio::test]
async fn quitquitquit_is_not_served_without_allow_quit() {
    let server = RedisServer::start(ServerAuth::app());
    let dir = tempfile::tempdir().unwrap();
    profile(dir.path(), &server, Some(""), "");
    let mut bin = Binary::start(dir.path(), &["--profile", "test"], &[]);
    wait_status(&bin.admin, "/readyz", 200).await;

    let (status, _) = http_request(&bin.admin, "POST", "/quitquitquit").await;
    assert_eq!(status, 404, "no such path unless admin.allow_quit = true");
    let mut c = Raw::connect(&bin.addr).await;
    assert_eq!(c.cmd(&["PING"]).await, simple("PONG"), "still serving");
    assert_eq!(http_get(&bin.admin, "/readyz").await.0, 200, "still ready");
    assert!(still_running(&mut bin));
    drop(c);
    bin.signal("TERM");
    assert_eq!(bin.wait_exit().code(), Some(0));

    // Allowed, but with nowhere to serve it: a configuration error, by its key.
    profile(dir.path(), &server, None, "[admin]\nallow_quit = true\n");
    let out = Command::new(env!("CARGO_BIN_EXE_redis-ambassador"))
        .current_dir(dir.path())
        .args(["--profile", "test"])
        .env_remove("AMBASSADOR_PROFILE")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("admin.allow_quit: needs admin.address"),
        "{stderr}"
    );
}

#[tokio::test]
async fn min_delay_serves_new_clients_then_refuses_them_and_exits_zero() {
    let server = RedisServer::start(ServerAuth::app());
    let dir = tempfile::tempdir().unwrap();
    let min_delay = Duration::from_secs(2);
    profile(
        dir.path(),
        &server,
        Some(""),
        "[shutdown]\nmin_delay = \"2s\"\ndrain_timeout = \"20s\"\n",
    );
    let mut bin = Binary::start(dir.path(), &["--profile", "test"], &[]);
    wait_status(&bin.admin, "/readyz", 200).await;

    let signalled = Instant::now();
    bin.signal("TERM");
    wait_status(&bin.admin, "/readyz", 503).await;
    assert!(
        signalled.elapsed() < min_delay,
        "/readyz turns false at once, not after the delay"
    );

    // The scenario, not synchronisation: the application, stopping too, opens a connection
    // for its own shutdown one second after the signal.
    tokio::time::sleep_until((signalled + Duration::from_secs(1)).into()).await;
    let mut late = Raw::connect(&bin.addr).await;
    assert_eq!(late.cmd(&["SET", "k", "v"]).await, simple("OK"));
    let served_at = signalled.elapsed();
    assert!(
        served_at < min_delay,
        "the machine was too slow to test this: served only at {served_at:?}"
    );

    wait_refused(&bin.addr).await;
    let refused_at = signalled.elapsed();
    assert!(
        refused_at >= min_delay,
        "refused after {refused_at:?}, before shutdown.min_delay"
    );
    assert_eq!(
        late.cmd(&["GET", "k"]).await,
        bulk(b"v"),
        "a session opened during the delay drains like any other"
    );
    assert!(still_running(&mut bin));
    drop(late);
    assert_eq!(bin.wait_exit().code(), Some(0));
}

#[tokio::test]
async fn a_second_signal_during_min_delay_exits_at_once() {
    let server = RedisServer::start(ServerAuth::app());
    let dir = tempfile::tempdir().unwrap();
    profile(
        dir.path(),
        &server,
        Some(""),
        "[shutdown]\nmin_delay = \"1h\"\n",
    );
    let mut bin = Binary::start(dir.path(), &["--profile", "test"], &[]);
    bin.signal("TERM");
    wait_status(&bin.admin, "/readyz", 503).await;
    let mut c = Raw::connect(&bin.addr).await;
    assert_eq!(c.cmd(&["PING"]).await, simple("PONG"), "still accepting");
    bin.signal("INT");
    assert_eq!(bin.wait_exit().code(), Some(1));
}

/// An init container runs `--check` before the sidecar starts: it needs no admin endpoint,
/// opens no port (here both of the profile's addresses are held by someone else), and on the
/// wrong upstream exits 1 with the reason on its last line, alone.
#[test]
fn check_as_an_init_step_opens_no_port_and_says_why_on_one_line() {
    let server = RedisServer::start(ServerAuth::app());
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = taken.local_addr().unwrap().to_string();
    let check = |expect_user: &str| {
        profile(
            dir.path(),
            &server,
            None,
            &format!("[upstream.expect]\nuser = \"{expect_user}\"\n"),
        );
        Command::new(env!("CARGO_BIN_EXE_redis-ambassador"))
            .current_dir(dir.path())
            .args(["--profile", "test", "--check", "--listen", &taken])
            .env("AMBASSADOR__ADMIN__ADDRESS", &taken)
            .env_remove("AMBASSADOR_PROFILE")
            .output()
            .unwrap()
    };

    let out = check(USER);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.lines().last(), Some("check: ok"), "{stdout}");

    let out = check("prod-app");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    let failed: Vec<&str> = stdout.lines().filter(|l| l.contains("FAILED")).collect();
    assert_eq!(
        failed,
        ["check: FAILED: upstream does not match the profile \
             (ACL WHOAMI: expected \"prod-app\", got \"app\")"],
        "{stdout}"
    );
    assert_eq!(
        stdout.lines().last(),
        Some(failed[0]),
        "the last line: {stdout}"
    );
}
