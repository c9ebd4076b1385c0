//! DESIGN section 6: credential rotation, readiness, metrics, profile expectations, idle
//! timeout. Every wait is on a condition with a deadline.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

/// A Kubernetes-style Secret mount: `redis-credentials -> ..data/redis-credentials`,
/// `..data -> ..<version>`. `swap` replaces the content the way the kubelet does.
struct SecretMount {
    dir: std::path::PathBuf,
    version: u32,
}

impl SecretMount {
    fn new(dir: &Path, content: &str) -> SecretMount {
        let mut m = SecretMount {
            dir: dir.to_owned(),
            version: 0,
        };
        m.swap(content);
        std::os::unix::fs::symlink("..data/redis-credentials", dir.join("redis-credentials"))
            .unwrap();
        m
    }

    fn path(&self) -> std::path::PathBuf {
        self.dir.join("redis-credentials")
    }

    fn swap(&mut self, content: &str) {
        self.version += 1;
        let versioned = format!("..v{}", self.version);
        std::fs::create_dir(self.dir.join(&versioned)).unwrap();
        std::fs::write(self.dir.join(&versioned).join("redis-credentials"), content).unwrap();
        let tmp = self.dir.join("..data_tmp");
        std::os::unix::fs::symlink(&versioned, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.join("..data")).unwrap();
    }
}

/// The ACL user the rotation test rotates to.
const ROTATED_USER: &str = "app-rotated";

fn creds(password: &str) -> String {
    creds_of(USER, password)
}

fn creds_of(user: &str, password: &str) -> String {
    format!("username = \"{user}\"\npassword = \"{password}\"\n")
}

async fn ambassador_on(server: &RedisServer, secret: &Path, extra: &str) -> Ambassador {
    let dir = tempfile::tempdir().unwrap();
    let profile = format!(
        "[listen]\naddress = \"127.0.0.1:0\"\n[upstream]\naddress = \"{}\"\n[credentials]\nfile = \"{}\"\n\
         [admin]\nprobe_interval = \"100ms\"\nready_within = \"2s\"\n{extra}",
        server.addr(),
        secret.display()
    );
    Ambassador::with_config(load_config(dir.path(), &profile), dir).await
}

#[tokio::test]
async fn rotation_is_tested_then_applied_to_new_and_open_sessions() {
    let server = RedisServer::start(ServerAuth::app());
    let mount_dir = tempfile::tempdir().unwrap();
    let mut mount = SecretMount::new(mount_dir.path(), &creds(PASSWORD));
    let amb = ambassador_on(&server, &mount.path(), "").await;
    let mut busy = amb.connect().await;
    let mut idle = amb.connect().await;
    assert_eq!(busy.cmd(&["SET", "k", "1"]).await, simple("OK"));
    assert_eq!(idle.cmd(&["PING"]).await, simple("PONG"));

    // A file the upstream refuses is not applied; an empty one is not either.
    mount.swap(&creds("not-accepted-yet"));
    wait_until("the refused reload is counted", DEADLINE, || async {
        amb.metric(
            "ambassador_credential_reloads_total",
            ("result", "rejected"),
        )
        .await
            >= Some(1.0)
    })
    .await;
    mount.swap("");
    wait_until("the invalid reload is counted", DEADLINE, || async {
        amb.metric("ambassador_credential_reloads_total", ("result", "invalid"))
            .await
            >= Some(1.0)
    })
    .await;
    let mut still_old = amb.connect().await;
    assert_eq!(still_old.cmd(&["PING"]).await, simple("PONG"));

    // The secret changes to another ACL user, which Redis knows first: applied. A different
    // user, so that Redis itself says which credentials each open connection last sent.
    let mut admin = server.direct().await;
    assert_eq!(
        admin
            .cmd(&[
                "ACL",
                "SETUSER",
                ROTATED_USER,
                "on",
                ">rotated-pass-2",
                "~*",
                "&*",
                "+@all"
            ])
            .await,
        simple("OK")
    );
    mount.swap(&creds_of(ROTATED_USER, "rotated-pass-2"));
    wait_until("the reload is applied", DEADLINE, || async {
        amb.metric("ambassador_credential_reloads_total", ("result", "applied"))
            .await
            == Some(1.0)
    })
    .await;
    // Both open sessions re-authenticate: the idle one at once, the busy one between commands.
    wait_until("both open sessions re-authenticated", DEADLINE, || async {
        amb.metric("ambassador_session_reauth_total", ("result", "ok"))
            .await
            >= Some(2.0)
    })
    .await;
    let mut batch = command(&["INCR", "k"]);
    batch.extend(command(&["ACL", "WHOAMI"]));
    busy.send(&batch).await;
    assert_eq!(busy.reply().await, int(2));
    assert_eq!(
        busy.reply().await,
        bulk(ROTATED_USER.as_bytes()),
        "Redis has the busy session as the new user (and no stray +OK from its AUTH)"
    );
    assert_eq!(
        idle.cmd(&["ACL", "WHOAMI"]).await,
        bulk(ROTATED_USER.as_bytes()),
        "Redis has the idle session as the new user (and no stray +OK from its AUTH)"
    );

    // The old user is switched off and its connections killed: new connections work, the
    // open ones too, for none of them is the old user's any more.
    let mut rotated_admin = Raw::connect(&server.addr()).await;
    assert_eq!(
        rotated_admin
            .cmd(&["AUTH", ROTATED_USER, "rotated-pass-2"])
            .await,
        simple("OK")
    );
    assert_eq!(
        rotated_admin.cmd(&["ACL", "SETUSER", USER, "off"]).await,
        simple("OK")
    );
    let killed = rotated_admin.cmd(&["CLIENT", "KILL", "USER", USER]).await;
    let mut fresh = amb.connect().await;
    assert_eq!(
        fresh.cmd(&["ACL", "WHOAMI"]).await,
        bulk(ROTATED_USER.as_bytes())
    );
    assert_eq!(
        busy.cmd(&["GET", "k"]).await,
        bulk(b"2"),
        "killed {killed:?}"
    );
    assert_eq!(
        idle.cmd(&["PING"]).await,
        simple("PONG"),
        "killed {killed:?}"
    );
    assert_eq!(
        still_old.cmd(&["ACL", "WHOAMI"]).await,
        bulk(ROTATED_USER.as_bytes()),
        "the session opened before the rotation too"
    );
}

#[tokio::test]
async fn readiness_follows_the_upstream_and_metrics_parse() {
    let server = RedisServer::start(ServerAuth::app());
    let secret_dir = tempfile::tempdir().unwrap();
    let secret = server.credential_file(secret_dir.path());
    let amb = ambassador_on(&server, &secret, "").await;
    assert_eq!(amb.admin_get("/healthz").await.0, 200);
    wait_until("ready", DEADLINE, || async {
        amb.admin_get("/readyz").await.0 == 200
    })
    .await;

    let mut c = amb.connect().await;
    assert_eq!(c.cmd(&["SET", "k", "hello"]).await, simple("OK"));
    drop(c);
    wait_until("the session's bytes are counted", DEADLINE, || async {
        amb.metric(
            "ambassador_relayed_bytes_total",
            ("direction", "upstream_to_client"),
        )
        .await
            > Some(0.0)
    })
    .await;
    let scrape = amb.scrape().await;
    let names: Vec<&str> = scrape.samples.iter().map(|s| s.metric.as_str()).collect();
    for expected in [
        "ambassador_clients_active",
        "ambassador_clients_total",
        "ambassador_upstream_handshake_seconds",
        "ambassador_credential_age_seconds",
        "ambassador_upstream_target",
        "ambassador_task_panics_total",
    ] {
        assert!(
            names.contains(&expected),
            "{expected} missing from {names:?}"
        );
    }
    let target = scrape
        .samples
        .iter()
        .find(|s| s.metric == "ambassador_upstream_target")
        .unwrap();
    assert_eq!(target.labels.get("address"), Some(server.addr().as_str()));

    drop(server);
    wait_until("not ready once the upstream is gone", DEADLINE, || async {
        let (status, body) = amb.admin_get("/readyz").await;
        status == 503 && body.contains("upstream last reached")
    })
    .await;
    let mut refused = amb.connect().await;
    assert!(refused
        .read_to_close()
        .await
        .starts_with(b"-ERR ambassador: upstream unavailable"));
    assert!(
        amb.metric(
            "ambassador_upstream_connect_failures_total",
            ("reason", "connect")
        )
        .await
            >= Some(1.0)
    );
}

#[tokio::test]
async fn a_profile_expecting_another_upstream_refuses_to_relay() {
    let server = RedisServer::start(ServerAuth::app());
    let secret_dir = tempfile::tempdir().unwrap();
    let secret = server.credential_file(secret_dir.path());
    let extra = "[upstream.expect]\nuser = \"prod-app\"\ninfo = { redis_mode = \"standalone\" }\n";
    let amb = ambassador_on(&server, &secret, extra).await;
    wait_until("the probe finds the mismatch", DEADLINE, || async {
        amb.admin_get("/readyz").await.1.contains("prod-app")
    })
    .await;
    assert_eq!(
        amb.admin_get("/readyz").await,
        (
            503,
            "not ready: ACL WHOAMI: expected \"prod-app\", got \"app\"\n".to_owned()
        ),
        "not ready, and says why"
    );
    let mut c = amb.connect().await;
    let got = String::from_utf8_lossy(&c.read_to_close().await).into_owned();
    assert!(
        got.starts_with("-ERR ambassador: upstream does not match the profile (ACL WHOAMI: expected \"prod-app\", got \"app\")"),
        "{got}"
    );
}

#[tokio::test]
async fn idle_sessions_close_only_when_configured() {
    let server = RedisServer::start(ServerAuth::app());
    let amb = Ambassador::start(&server, "").await;
    let dir = tempfile::tempdir().unwrap();
    let profile = profile_for(&server, dir.path(), "").replace(
        "address = \"127.0.0.1:0\"",
        "address = \"127.0.0.1:0\"\nidle_timeout = \"1s\"",
    );
    let short = Ambassador::with_config(load_config(dir.path(), &profile), dir).await;
    let mut idle = short.connect().await;
    // Traffic keeps it open past the limit: the limit counts from the last byte, not the start.
    let opened = Instant::now();
    while opened.elapsed() < Duration::from_millis(1500) {
        assert_eq!(
            idle.cmd(&["PING"]).await,
            simple("PONG"),
            "open while in use"
        );
        tokio::time::sleep(Duration::from_millis(200)).await; // pacing: well inside the limit
    }
    assert_eq!(idle.cmd(&["PING"]).await, simple("PONG"));
    let quiet_from = Instant::now();
    assert_eq!(
        idle.read_to_close().await,
        b"",
        "closed after 1 s of silence"
    );
    let quiet = quiet_from.elapsed();
    println!("idle session closed after {quiet:?} of silence");
    // Not before the limit (less the time the last reply took to arrive here); the upper
    // bound only says the timer fired, not how promptly a loaded machine ran it.
    assert!(
        quiet >= Duration::from_millis(900) && quiet < Duration::from_secs(6),
        "closed after {quiet:?} of silence with a 1 s limit"
    );

    // Without the setting, a blocking pop may wait as long as it likes.
    let mut blocked = amb.connect().await;
    blocked
        .send(&command(&["BLPOP", "never-pushed", "1"]))
        .await;
    assert_eq!(
        blocked.reply().await,
        redis_protocol::resp3::types::OwnedFrame::Null
    );
}

/// The periodic probe costs the upstream a connection and an AUTH per interval from every
/// ambassador, so it runs only where something reads it: an admin endpoint, or
/// `upstream.expect`. Two binaries probe every 100 ms, each on its own Redis: one with
/// neither (must not probe), and, as the clock that makes "no probe" mean something, one with
/// only `upstream.expect` (must). When the second's Redis has seen four probes, the first's
/// has had as long to see them, and must have seen only the client's own session.
#[tokio::test]
async fn without_admin_or_expect_the_upstream_sees_no_probe() {
    let quiet = RedisServer::start(ServerAuth::app());
    let control = RedisServer::start(ServerAuth::app());
    let (mut quiet_observer, mut control_observer) = (quiet.direct().await, control.direct().await);
    let quiet_before = connections_received(&mut quiet_observer).await;
    let control_before = connections_received(&mut control_observer).await;
    let every = ("AMBASSADOR__ADMIN__PROBE_INTERVAL", "100ms");
    let (dir1, dir2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let bin = binary_for(&quiet, dir1.path(), &[every]);
    let _clock = binary_for(
        &control,
        dir2.path(),
        &[every, ("AMBASSADOR__UPSTREAM__EXPECT__USER", USER)],
    );
    let mut c = Raw::connect(&bin.addr).await;
    assert_eq!(c.cmd(&["SET", "k", "v"]).await, simple("OK"));
    assert_eq!(c.cmd(&["GET", "k"]).await, bulk(b"v"));
    drop(c);
    let deadline = std::time::Instant::now() + DEADLINE;
    while connections_received(&mut control_observer).await < control_before + 4 {
        assert!(
            std::time::Instant::now() < deadline,
            "the control never probed four times"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await; // polling interval
    }
    assert_eq!(
        connections_received(&mut quiet_observer).await,
        quiet_before + 1,
        "connections beyond the client's one session reached the upstream"
    );
}
