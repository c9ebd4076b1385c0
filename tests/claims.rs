//! README claims about rotation, QUIT, metrics and logging that no other file tested. Where
//! the claim is about what reaches Redis, Redis says so itself: MONITOR on a direct
//! connection shows every command each upstream connection carries (AUTH redacted), in the
//! order Redis ran them.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use redis_protocol::resp3::types::OwnedFrame;

/// The user's password after the `n`th rotation (0: the harness's).
fn password(n: u32) -> String {
    if n == 0 {
        PASSWORD.to_owned()
    } else {
        format!("rotated-pass-{n}")
    }
}

fn creds(password: &str) -> String {
    format!("username = \"{USER}\"\npassword = \"{password}\"\n")
}

/// Replaces `path`'s content the way an editor does: a new file renamed over it.
fn rename_over(path: &Path, content: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A server, an ambassador reading its credentials from a plain file in a folder of its own,
/// and a MONITOR on a direct connection.
struct Rig {
    server: RedisServer,
    amb: Ambassador,
    secret: PathBuf,
    _secret_dir: tempfile::TempDir,
    monitor: Raw,
    rotations: u32,
}

impl Rig {
    async fn new(extra: &str) -> Rig {
        let server = RedisServer::start(ServerAuth::app());
        let secret_dir = tempfile::tempdir().unwrap();
        let secret = secret_dir.path().join("redis-credentials");
        std::fs::write(&secret, creds(PASSWORD)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let profile = format!(
            "[listen]\naddress = \"127.0.0.1:0\"\n[upstream]\naddress = \"{}\"\n\
             [credentials]\nfile = \"{}\"\n{extra}{NO_PROBES}",
            server.addr(),
            secret.display()
        );
        let amb = Ambassador::with_config(load_config(dir.path(), &profile), dir).await;
        let mut monitor = server.direct().await;
        assert_eq!(monitor.cmd(&["MONITOR"]).await, simple("OK"));
        Rig {
            server,
            amb,
            secret,
            _secret_dir: secret_dir,
            monitor,
            rotations: 0,
        }
    }

    /// Redis learns a new password, then the file changes (renamed over it); returns once
    /// the ambassador applied it.
    async fn rotate(&mut self) {
        self.rotations += 1;
        let new = password(self.rotations);
        let mut admin = self.server.direct().await;
        let add = format!(">{new}");
        assert_eq!(
            admin.cmd(&["ACL", "SETUSER", USER, &add]).await,
            simple("OK")
        );
        rename_over(&self.secret, &creds(&new));
        let want = f64::from(self.rotations);
        wait_until("the new credentials are applied", DEADLINE, || async {
            self.amb
                .metric("ambassador_credential_reloads_total", ("result", "applied"))
                .await
                == Some(want)
        })
        .await;
    }

    /// MONITOR lines until one contains `marker`; each as `(client address, command)`.
    async fn monitor_until(&mut self, marker: &str) -> Vec<(String, String)> {
        let mut seen = Vec::new();
        let deadline = Instant::now() + DEADLINE;
        loop {
            assert!(
                Instant::now() < deadline,
                "no {marker:?} in MONITOR: {seen:?}"
            );
            let line = match self.monitor.reply().await {
                OwnedFrame::SimpleString { data, .. } => String::from_utf8(data).unwrap(),
                other => panic!("MONITOR sent {other:?}"),
            };
            // `<time> [<db> <addr>] "CMD" "arg" ...`
            let (head, command) = line.split_once("] ").expect("a MONITOR line");
            let addr = head.rsplit(' ').next().unwrap().to_owned();
            let done = line.contains(marker);
            seen.push((addr, command.to_owned()));
            if done {
                return seen;
            }
        }
    }
}

/// The upstream address of a session: Redis's `CLIENT INFO` `addr` field, through it.
async fn upstream_addr(c: &mut Raw) -> String {
    let OwnedFrame::BlobString { data, .. } = c.cmd(&["CLIENT", "INFO"]).await else {
        panic!("CLIENT INFO answers a bulk string");
    };
    let info = String::from_utf8(data).unwrap();
    info.split(' ')
        .find_map(|f| f.strip_prefix("addr="))
        .expect("addr in CLIENT INFO")
        .to_owned()
}

/// The commands one connection carried, in order.
fn commands_of(lines: &[(String, String)], addr: &str) -> Vec<String> {
    lines
        .iter()
        .filter(|(a, _)| a == addr)
        .map(|(_, c)| c.clone())
        .collect()
}

const AUTH: &str = "\"AUTH\" \"(redacted)\" \"(redacted)\"";

/// DESIGN 6: after a rotation a session inside MULTI is not re-authenticated there (the AUTH
/// would be queued, its reply inside EXEC's array): EXEC completes with its own replies, and
/// the AUTH reaches Redis after EXEC.
#[tokio::test]
async fn reauth_waits_until_exec() {
    let mut rig = Rig::new("").await;
    let mut c = rig.amb.connect().await;
    let addr = upstream_addr(&mut c).await;
    assert_eq!(c.cmd(&["MULTI"]).await, simple("OK"));
    assert_eq!(c.cmd(&["SET", "k", "1"]).await, simple("QUEUED"));
    rig.rotate().await;
    assert_eq!(c.cmd(&["INCR", "k"]).await, simple("QUEUED"));
    let exec = c.cmd(&["EXEC"]).await;
    let OwnedFrame::Array { data, .. } = exec else {
        panic!("EXEC answered {exec:?}");
    };
    assert_eq!(data, vec![simple("OK"), int(2)]);
    assert_eq!(c.cmd(&["PING", "after-exec"]).await, bulk(b"after-exec"));
    let lines = rig.monitor_until("after-exec").await;
    assert_eq!(
        commands_of(&lines, &addr),
        [
            AUTH,
            "\"CLIENT\" \"INFO\"",
            "\"MULTI\"",
            "\"SET\" \"k\" \"1\"",
            "\"INCR\" \"k\"",
            "\"EXEC\"",
            AUTH,
            "\"PING\" \"after-exec\""
        ],
        "{lines:?}"
    );
    let reauths = ("result", "ok");
    assert_eq!(
        rig.amb
            .metric("ambassador_session_reauth_total", reauths)
            .await,
        Some(1.0),
        "one session, re-authenticated once"
    );
    // The session now holds the new password: removing the old one upstream changes nothing.
    let mut admin = rig.server.direct().await;
    let old = format!("<{PASSWORD}");
    assert_eq!(
        admin.cmd(&["ACL", "SETUSER", USER, &old]).await,
        simple("OK")
    );
    assert_eq!(c.cmd(&["ACL", "WHOAMI"]).await, bulk(USER.as_bytes()));
}

/// Nor in the middle of a command the ambassador is streaming: the AUTH follows its end.
#[tokio::test]
async fn reauth_waits_for_the_end_of_a_streamed_command() {
    let mut rig = Rig::new("").await;
    let mut c = rig.amb.connect().await;
    let addr = upstream_addr(&mut c).await;
    // Larger than what the ambassador holds whole: it forwards this as it arrives.
    let value = "v".repeat(200 * 1024);
    let set = command(&["SET", "big", &value]);
    let (first, rest) = set.split_at(set.len() / 2);
    c.send(first).await;
    rig.rotate().await;
    c.send(rest).await;
    assert_eq!(c.reply().await, simple("OK"));
    assert_eq!(c.cmd(&["PING", "after-set"]).await, bulk(b"after-set"));
    let lines = rig.monitor_until("after-set").await;
    let on_c = commands_of(&lines, &addr);
    assert_eq!(on_c[..2], [AUTH, "\"CLIENT\" \"INFO\""]);
    assert!(
        on_c[2].starts_with("\"SET\" \"big\" \"vvv"),
        "{:.200}",
        on_c[2]
    );
    assert_eq!(on_c[3..], [AUTH, "\"PING\" \"after-set\""]);
}

/// In pub/sub and MONITOR replies cannot be counted, so no AUTH is sent there (its +OK could
/// not be told apart); RESET, which re-authenticates anyway, uses the new credentials.
#[tokio::test]
async fn no_reauth_while_subscribed_or_monitoring() {
    let mut rig = Rig::new("").await;
    let mut sub = rig.amb.connect().await;
    let sub_addr = upstream_addr(&mut sub).await;
    let mut mon = rig.amb.connect().await;
    let mon_addr = upstream_addr(&mut mon).await;
    let subscribed = sub.cmd(&["SUBSCRIBE", "ch"]).await;
    assert!(
        matches!(subscribed, OwnedFrame::Array { .. }),
        "{subscribed:?}"
    );
    assert_eq!(mon.cmd(&["MONITOR"]).await, simple("OK"));
    rig.rotate().await;

    let mut direct = rig.server.direct().await;
    assert_eq!(direct.cmd(&["PUBLISH", "ch", "hello"]).await, int(1));
    let message = sub.reply().await;
    let OwnedFrame::Array { data, .. } = &message else {
        panic!("{message:?}");
    };
    assert_eq!(data[2], bulk(b"hello"), "the message, not an AUTH's +OK");
    // The ambassador's own MONITOR session sees the marker, and no +OK before it.
    assert_eq!(direct.cmd(&["PING", "marker"]).await, bulk(b"marker"));
    loop {
        let OwnedFrame::SimpleString { data, .. } = mon.reply().await else {
            panic!("MONITOR lines only");
        };
        let line = String::from_utf8(data).unwrap();
        assert!(
            !line.starts_with("OK"),
            "a stray +OK on the MONITOR session"
        );
        if line.contains("\"marker\"") {
            break;
        }
    }
    let lines = rig.monitor_until("\"marker\"").await;
    let greeting = [AUTH, "\"CLIENT\" \"INFO\""];
    assert_eq!(
        commands_of(&lines, &sub_addr),
        [&greeting[..], &["\"SUBSCRIBE\" \"ch\""]].concat()
    );
    // MONITOR itself is an admin command, which Redis does not show.
    assert_eq!(commands_of(&lines, &mon_addr), greeting);

    // RESET: the handshake runs again, with the new password; the old one can go.
    assert_eq!(sub.cmd(&["RESET"]).await, simple("RESET"));
    let mut admin = rig.server.direct().await;
    let old = format!("<{PASSWORD}");
    assert_eq!(
        admin.cmd(&["ACL", "SETUSER", USER, &old]).await,
        simple("OK")
    );
    assert_eq!(sub.cmd(&["ACL", "WHOAMI"]).await, bulk(USER.as_bytes()));
}

/// `credentials.reauth_open_sessions = false`: open sessions keep the authentication they
/// have (no AUTH reaches Redis from them); new sessions use the new credentials.
#[tokio::test]
async fn open_sessions_are_left_alone_when_reauth_is_off() {
    let mut rig = Rig::new("reauth_open_sessions = false\n").await;
    let mut open = rig.amb.connect().await;
    let open_addr = upstream_addr(&mut open).await;
    rig.rotate().await;
    // Long enough for a re-authentication to have happened, had it been on: the busy path
    // re-authenticates before the next command, the idle one at once.
    assert_eq!(open.cmd(&["PING", "open"]).await, bulk(b"open"));
    let mut fresh = rig.amb.connect().await;
    let fresh_addr = upstream_addr(&mut fresh).await;
    assert_eq!(fresh.cmd(&["PING", "fresh"]).await, bulk(b"fresh"));
    let lines = rig.monitor_until("\"fresh\"").await;
    assert_eq!(
        commands_of(&lines, &open_addr),
        [AUTH, "\"CLIENT\" \"INFO\"", "\"PING\" \"open\""],
        "{lines:?}"
    );
    assert_eq!(
        commands_of(&lines, &fresh_addr),
        [AUTH, "\"CLIENT\" \"INFO\"", "\"PING\" \"fresh\""]
    );
    // The fresh session authenticated with the new password: Redis still accepts it alone.
    let mut admin = rig.server.direct().await;
    let old = format!("<{PASSWORD}");
    assert_eq!(
        admin.cmd(&["ACL", "SETUSER", USER, &old]).await,
        simple("OK")
    );
    let mut after = rig.amb.connect().await;
    assert_eq!(after.cmd(&["ACL", "WHOAMI"]).await, bulk(USER.as_bytes()));
}

/// An editor saves by writing a new file and renaming it over the old one: the watched
/// file's inode never changes, yet the new credentials are applied (`Rig::rotate` renames).
#[tokio::test]
async fn a_file_renamed_over_the_credential_file_is_seen() {
    let mut rig = Rig::new("").await;
    rig.rotate().await;
    let mut admin = rig.server.direct().await;
    let old = format!("<{PASSWORD}");
    assert_eq!(
        admin.cmd(&["ACL", "SETUSER", USER, &old]).await,
        simple("OK")
    );
    let mut c = rig.amb.connect().await;
    assert_eq!(c.cmd(&["ACL", "WHOAMI"]).await, bulk(USER.as_bytes()));
}

/// Credentials the upstream refuses are tried again after 1 s, then 2 s, then 4 s (doubling;
/// the 30 s ceiling is `rotation::next_retry`'s unit test), and applied once it accepts them.
#[tokio::test]
async fn refused_credentials_are_retried_with_a_doubling_backoff() {
    let rig = Rig::new("").await;
    rename_over(&rig.secret, &creds("not-yet-accepted"));
    let rejected = || async {
        rig.amb
            .metric(
                "ambassador_credential_reloads_total",
                ("result", "rejected"),
            )
            .await
            .unwrap_or(0.0)
    };
    // When each of the first three refusals is counted.
    let mut at = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while at.len() < 3 {
        assert!(Instant::now() < deadline, "refusals seen at {at:?}");
        if rejected().await >= (at.len() + 1) as f64 {
            at.push(Instant::now());
        } else {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let mut admin = rig.server.direct().await;
    let add = ">not-yet-accepted";
    assert_eq!(
        admin.cmd(&["ACL", "SETUSER", USER, add]).await,
        simple("OK")
    );
    wait_until(
        "the retry applies them",
        Duration::from_secs(30),
        || async {
            rig.amb
                .metric("ambassador_credential_reloads_total", ("result", "applied"))
                .await
                == Some(1.0)
        },
    )
    .await;
    at.push(Instant::now());
    assert_eq!(
        rejected().await,
        3.0,
        "no retry between the third and the fourth"
    );
    let gaps: Vec<Duration> = at.windows(2).map(|w| w[1] - w[0]).collect();
    // Lower bounds only (a loaded machine makes a retry late, never early), each twice the one
    // before with 100 ms of slack for the polling: a constant interval fails here.
    for (gap, want) in gaps.iter().zip([1000, 2000, 4000]) {
        assert!(
            *gap >= Duration::from_millis(want - 100),
            "retries after {gaps:?}, expected 1 s, 2 s, 4 s"
        );
    }
}

/// The value in `/metrics` of the sample written exactly `name` (labels included, as the
/// exposition writes them), e.g. `ambassador_upstream_handshake_seconds_count`.
async fn sample(amb: &Ambassador, name: &str) -> Option<f64> {
    let (_, body) = amb.admin_get("/metrics").await;
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .map(|v| v.split(' ').next().unwrap().parse().unwrap())
}

/// The metrics README lists, by value, after a known sequence of sessions.
#[tokio::test]
async fn metrics_count_what_happened() {
    let server = RedisServer::start(ServerAuth::app());
    let started = Instant::now();
    // max_clients 2, so a third client is refused.
    let dir = tempfile::tempdir().unwrap();
    let profile = profile_for(&server, dir.path(), NO_PROBES).replace(
        "address = \"127.0.0.1:0\"",
        "address = \"127.0.0.1:0\"\nmax_clients = 2",
    );
    let amb = Ambassador::with_config(load_config(dir.path(), &profile), dir).await;
    let value = |name: &'static str, label: (&'static str, &'static str)| amb.metric(name, label);
    assert_eq!(value("ambassador_clients_total", ("", "")).await, Some(0.0));
    let target = server.addr();
    assert_eq!(
        amb.metric("ambassador_upstream_target", ("address", &target))
            .await,
        Some(1.0)
    );

    // Two sessions, with known bytes each way.
    let mut a = amb.connect().await;
    let mut b = amb.connect().await;
    let (ping, set) = (command(&["PING"]), command(&["SET", "k", "12345"]));
    a.send(&ping).await;
    assert_eq!(a.reply().await, simple("PONG"));
    b.send(&set).await;
    assert_eq!(b.reply().await, simple("OK"));
    assert_eq!(
        value("ambassador_clients_active", ("", "")).await,
        Some(2.0)
    );
    assert_eq!(
        sample(&amb, "ambassador_upstream_handshake_seconds_count").await,
        Some(2.0)
    );

    // A third is refused with Redis's own words.
    let mut refused = amb.connect().await;
    assert_eq!(
        refused.read_to_close().await,
        b"-ERR max number of clients reached\r\n"
    );
    let reason = ("reason", "max_clients");
    assert_eq!(
        value("ambassador_clients_refused_total", reason).await,
        Some(1.0)
    );
    assert_eq!(value("ambassador_clients_total", ("", "")).await, Some(3.0));

    // Bytes are counted when a session ends.
    drop((a, b));
    wait_until("both sessions ended", DEADLINE, || async {
        amb.metric("ambassador_clients_active", ("", "")).await == Some(0.0)
    })
    .await;
    let sent = (ping.len() + set.len()) as f64;
    let received = (b"+PONG\r\n".len() + b"+OK\r\n".len()) as f64;
    let dir = |d: &'static str| amb.metric("ambassador_relayed_bytes_total", ("direction", d));
    assert_eq!(dir("client_to_upstream").await, Some(sent));
    assert_eq!(dir("upstream_to_client").await, Some(received));

    // The upstream stops accepting the password: one refused handshake.
    let mut admin = server.direct().await;
    let old = format!("<{PASSWORD}");
    assert_eq!(
        admin.cmd(&["ACL", "SETUSER", USER, ">other", &old]).await,
        simple("OK")
    );
    let mut c = amb.connect().await;
    assert!(c
        .read_to_close()
        .await
        .starts_with(b"-ERR ambassador: upstream authentication failed"));
    assert_eq!(
        value("ambassador_upstream_auth_failures_total", ("", "")).await,
        Some(1.0)
    );
    let age = value("ambassador_credential_age_seconds", ("", ""))
        .await
        .unwrap();
    assert!(
        (0.0..=started.elapsed().as_secs_f64() + 1.0).contains(&age),
        "credential age {age} s, test running for {:?}",
        started.elapsed()
    );
}

/// Whether Redis lists the client with this id.
async fn listed(admin: &mut Raw, id: &str) -> bool {
    match admin.cmd(&["CLIENT", "LIST", "ID", id]).await {
        OwnedFrame::BlobString { data, .. } => !data.is_empty(),
        other => panic!("CLIENT LIST answered {other:?}"),
    }
}

/// QUIT is forwarded: the client gets Redis's +OK and a close, and Redis no longer has the
/// upstream connection.
#[tokio::test]
async fn quit_closes_the_upstream_connection_too() {
    let server = RedisServer::start(ServerAuth::app());
    let amb = Ambassador::start(&server, NO_PROBES).await;
    let mut c = amb.connect().await;
    let OwnedFrame::Number { data: id, .. } = c.cmd(&["CLIENT", "ID"]).await else {
        panic!("CLIENT ID answers a number");
    };
    let id = id.to_string();
    let mut admin = server.direct().await;
    assert!(
        listed(&mut admin, &id).await,
        "the upstream connection is there"
    );
    c.send(&command(&["QUIT"])).await;
    assert_eq!(c.read_to_close().await, b"+OK\r\n");
    let deadline = Instant::now() + DEADLINE;
    while listed(&mut admin, &id).await {
        assert!(Instant::now() < deadline, "Redis still lists client {id}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // It was Redis that answered: the QUIT reached it.
    let OwnedFrame::BlobString { data, .. } = admin.cmd(&["INFO", "commandstats"]).await else {
        panic!("INFO answers a bulk string");
    };
    let stats = String::from_utf8(data).unwrap();
    assert!(stats.contains("cmdstat_quit:calls=1,"), "{stats}");
    // The client's side is closed, and the ambassador serves the next one.
    let mut next = amb.connect().await;
    assert_eq!(next.cmd(&["PING"]).await, simple("PONG"));
}

/// A credential file that cannot be read as text is logged (never its content) and the last
/// good credentials stay; one that is not the TOML form is the password itself, and when
/// the upstream refuses it, that is logged without the password too. RUST_LOG=trace.
#[tokio::test]
async fn unusable_credential_files_are_logged_without_their_content() {
    let server = RedisServer::start(ServerAuth::app());
    let dir = tempfile::tempdir().unwrap();
    let mut bin = binary_for(&server, dir.path(), &[("RUST_LOG", "trace"), NO_PROBES_ENV]);
    let secret = server.credential_file(dir.path());
    let mut output = bin.startup_lines.join("\n") + "\n";
    let wait_for = |what: &str, output: &mut String| {
        let deadline = Instant::now() + DEADLINE;
        while !output.contains(what) {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = bin.stderr_lines.recv_timeout(left);
            let line = line.unwrap_or_else(|_| panic!("no {what:?} in:\n{output}"));
            output.push_str(&line);
            output.push('\n');
        }
    };
    let not_utf8 = b"username = \"app\"\npassword = \"UTF8-SECRET-6m\xff\"\n";
    std::fs::write(&secret, not_utf8).unwrap();
    wait_for("credential file unusable", &mut output);
    std::fs::write(
        &secret,
        "username = \"app\"\npassword = \"MALFORMED-SECRET-5k\n",
    )
    .unwrap();
    wait_for("new credentials refused", &mut output);
    // The last good credentials are still the ones in use.
    let mut c = Raw::connect(&bin.addr).await;
    assert_eq!(c.cmd(&["ACL", "WHOAMI"]).await, bulk(USER.as_bytes()));
    drop(c);
    bin.signal("TERM");
    bin.wait_exit();
    output.push_str(&bin.stderr_to_end());
    for leaked in ["UTF8-SECRET-6m", "MALFORMED-SECRET-5k", PASSWORD] {
        assert!(!output.contains(leaked), "{leaked} in the log:\n{output}");
    }
}
