//! The real binary's life: SIGTERM drains, a second signal exits at once, and no secret ever
//! reaches its output, at any log level, on any path.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

fn profile(dir: &Path, server: &RedisServer, creds: &Path, extra: &str) {
    let admin = "[admin]\naddress = \"127.0.0.1:0\"\nprobe_interval = \"100ms\"\n";
    write_test_profile(dir, server, creds, &format!("{admin}{extra}"));
}

#[tokio::test]
async fn sigterm_drains_open_sessions_then_exits_zero() {
    let server = RedisServer::start(ServerAuth::app());
    let dir = tempfile::tempdir().unwrap();
    let creds = server.credential_file(dir.path());
    profile(
        dir.path(),
        &server,
        &creds,
        "[shutdown]\ndrain_timeout = \"20s\"\n",
    );
    let mut bin = Binary::start(dir.path(), &["--profile", "test"], &[]);
    wait_status(&bin.admin, "/readyz", 200).await;
    let mut open = Raw::connect(&bin.addr).await;
    assert_eq!(open.cmd(&["SET", "k", "v"]).await, simple("OK"));

    bin.signal("TERM");
    wait_status(&bin.admin, "/readyz", 503).await;
    // New clients are no longer accepted...
    let deadline = Instant::now() + DEADLINE;
    while tokio::net::TcpStream::connect(&bin.addr).await.is_ok() {
        assert!(Instant::now() < deadline, "still accepting while draining");
        tokio::time::sleep(Duration::from_millis(25)).await; // polling interval
    }
    // ...while the open session keeps working until its client is done.
    assert_eq!(open.cmd(&["GET", "k"]).await, bulk(b"v"));
    drop(open);
    let status = bin.wait_exit();
    assert_eq!(status.code(), Some(0), "a clean drain exits 0");
}

#[tokio::test]
async fn drain_timeout_closes_what_is_left_and_a_second_signal_exits_at_once() {
    let server = RedisServer::start(ServerAuth::app());
    let dir = tempfile::tempdir().unwrap();
    let creds = server.credential_file(dir.path());

    profile(
        dir.path(),
        &server,
        &creds,
        "[shutdown]\ndrain_timeout = \"300ms\"\n",
    );
    let mut bin = Binary::start(dir.path(), &["--profile", "test"], &[]);
    let mut idle = Raw::connect(&bin.addr).await;
    assert_eq!(idle.cmd(&["PING"]).await, simple("PONG"));
    bin.signal("TERM");
    assert_eq!(
        idle.read_to_close().await,
        b"",
        "closed when the drain time is over"
    );
    assert_eq!(bin.wait_exit().code(), Some(0));

    profile(
        dir.path(),
        &server,
        &creds,
        "[shutdown]\ndrain_timeout = \"1h\"\n",
    );
    let mut bin = Binary::start(dir.path(), &["--profile", "test"], &[]);
    let mut idle = Raw::connect(&bin.addr).await;
    assert_eq!(idle.cmd(&["PING"]).await, simple("PONG"));
    bin.signal("TERM");
    wait_status(&bin.admin, "/readyz", 503).await;
    bin.signal("INT");
    let status = bin.wait_exit();
    assert_eq!(
        status.code(),
        Some(1),
        "the second signal exits at once, with status 1, not by the signal: {status}"
    );
}

/// Every path that handles a secret, at RUST_LOG=trace, in text and JSON: neither the upstream
/// nor the downstream password (old or new), nor one written into a profile by mistake,
/// appears anywhere in what a process printed, on stdout or stderr, from its first line on.
#[tokio::test]
async fn no_secret_reaches_the_output_on_any_path() {
    let upstream_pw = "UPSTREAM-SECRET-1x";
    let rotated_pw = "UPSTREAM-SECRET-2y";
    let downstream_pw = "DOWNSTREAM-SECRET-3z";
    let wrong_pw = "WRONG-SECRET-4w";
    let inline_pw = "INLINE-SECRET-5v";
    let server = RedisServer::start(ServerAuth::AclUser {
        user: USER.into(),
        password: upstream_pw.into(),
    });
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("creds");
    std::fs::write(
        &creds,
        format!("username = \"{USER}\"\npassword = \"{upstream_pw}\"\n"),
    )
    .unwrap();
    let client_pw = dir.path().join("client-pw");
    std::fs::write(&client_pw, format!("{downstream_pw}\n")).unwrap();
    profile(dir.path(), &server, &creds, "");
    let text = std::fs::read_to_string(dir.path().join("profiles/test.toml")).unwrap();
    std::fs::write(
        dir.path().join("profiles/test.toml"),
        text.replace(
            "address = \"127.0.0.1:0\"\n[upstream]",
            &format!(
                "address = \"127.0.0.1:0\"\nrequire_password_file = \"{}\"\n[upstream]",
                client_pw.display()
            ),
        ),
    )
    .unwrap();
    let mut output = String::new();

    for format in ["text", "json"] {
        let mut bin = Binary::start(
            dir.path(),
            &["--profile", "test", "--log-format", format],
            &[("RUST_LOG", "trace")],
        );
        let mut c = Raw::connect(&bin.addr).await;
        assert!(error_text(&c.cmd(&["AUTH", wrong_pw]).await).starts_with("WRONGPASS"));
        assert_eq!(c.cmd(&["AUTH", downstream_pw]).await, simple("OK"));
        assert_eq!(c.cmd(&["AUTH", USER, downstream_pw]).await, simple("OK"));
        let hello = c.cmd(&["HELLO", "3", "AUTH", USER, downstream_pw]).await;
        assert!(matches!(
            hello,
            redis_protocol::resp3::types::OwnedFrame::Map { .. }
        ));
        assert_eq!(c.cmd(&["RESET"]).await, simple("RESET"));
        assert_eq!(c.cmd(&["AUTH", downstream_pw]).await, simple("OK"));
        assert_eq!(
            c.cmd(&["SET", "k", upstream_pw]).await,
            simple("OK"),
            "even a value that looks like one"
        );
        bin.signal("TERM");
        drop(c);
        bin.wait_exit();
        let stderr = format!("{}\n{}", bin.startup_lines.join("\n"), bin.stderr_to_end());
        if format == "json" {
            assert!(
                stderr
                    .lines()
                    .all(|l| l.starts_with('{') && l.ends_with('}')),
                "JSON lines:\n{stderr}"
            );
        }
        output.push_str(&stderr);
        output.push_str(&bin.stdout_to_end());
    }

    // A reload to a new password (accepted upstream first), seen by a running process.
    let mut admin = server.direct().await;
    assert_eq!(
        admin
            .cmd(&["ACL", "SETUSER", USER, &format!(">{rotated_pw}")])
            .await,
        simple("OK")
    );
    let mut bin = Binary::start(dir.path(), &["--profile", "test"], &[("RUST_LOG", "trace")]);
    std::fs::write(
        &creds,
        format!("username = \"{USER}\"\npassword = \"{rotated_pw}\"\n"),
    )
    .unwrap();
    let deadline = Instant::now() + DEADLINE;
    let mut seen = String::new();
    while !seen.contains("credentials reloaded") {
        assert!(Instant::now() < deadline, "no reload:\n{seen}");
        if let Ok(line) = bin.stderr_lines.recv_timeout(Duration::from_millis(100)) {
            seen.push_str(&line);
            seen.push('\n');
        }
    }
    output.push_str(&seen);
    bin.signal("TERM");
    bin.wait_exit();
    output.push_str(&bin.output_to_end());

    // --check, good and bad; an upstream that refuses the credentials; a config error.
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_redis-ambassador"))
            .current_dir(dir.path())
            .args(args)
            .env("RUST_LOG", "trace")
            .env_remove("AMBASSADOR_PROFILE")
            .output()
            .unwrap();
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    output.push_str(&run(&["--profile", "test", "--check"]));
    std::fs::write(
        &creds,
        format!("username = \"{USER}\"\npassword = \"{wrong_pw}\"\n"),
    )
    .unwrap();
    let failed = run(&["--profile", "test", "--check"]);
    assert!(failed.contains("check: FAILED"), "{failed}");
    output.push_str(&failed);
    let mut bin = Binary::start(dir.path(), &["--profile", "test"], &[("RUST_LOG", "trace")]);
    let mut c = Raw::connect(&bin.addr).await;
    assert!(c
        .read_to_close()
        .await
        .starts_with(b"-ERR ambassador: upstream authentication failed"));
    bin.signal("TERM");
    bin.wait_exit();
    output.push_str(&bin.output_to_end());
    // A password written where no key takes one: the error names the key, not the value.
    std::fs::write(
        dir.path().join("profiles/broken.toml"),
        format!("[credentials]\nfile = \"creds\"\npassword = \"{inline_pw}\"\n"),
    )
    .unwrap();
    let broken = run(&["--profile", "broken"]);
    assert!(broken.contains("credentials.password"), "{broken}");
    output.push_str(&broken);

    assert!(
        output.len() > 1000,
        "the test saw the logs it meant to search:\n{output}"
    );
    for secret in [upstream_pw, rotated_pw, downstream_pw, wrong_pw, inline_pw] {
        assert!(!output.contains(secret), "{secret} leaked:\n{output}");
    }
}
