//! `credentials.source = "exec"`: a command that prints short-lived credentials, in front of
//! a real redis-server. Its scripts are small shell files in the test's temp dir.

mod common;

use std::path::Path;

use common::*;
use redis_protocol::resp3::types::OwnedFrame;

/// A profile for `server` whose credentials come from `/bin/sh <dir>/creds.sh`.
fn exec_profile(server: &RedisServer, dir: &Path, script: &str, extra: &str) -> String {
    let path = dir.join("creds.sh");
    std::fs::write(&path, script).unwrap();
    format!(
        "[listen]\naddress = \"127.0.0.1:0\"\n\n[upstream]\naddress = \"{}\"\n\n\
         [credentials]\nsource = \"exec\"\ncommand = [\"/bin/sh\", \"{}\"]\n{extra}",
        server.addr(),
        path.display()
    )
}

/// Shell lines that count the script's runs in `<dir>/count` and leave the count in `$n`.
fn counting(dir: &Path) -> String {
    let count = dir.join("count");
    format!(
        "n=$(cat '{c}' 2>/dev/null || echo 0)\nn=$((n + 1))\necho $n > '{c}'\n",
        c = count.display()
    )
}

fn text(frame: &OwnedFrame) -> String {
    match frame {
        OwnedFrame::SimpleString { data, .. } | OwnedFrame::BlobString { data, .. } => {
            String::from_utf8_lossy(data).into_owned()
        }
        other => panic!("not a string: {other:?}"),
    }
}

/// The number in `gen<N>`, the user a session is authenticated as.
async fn generation(session: &mut Raw) -> u32 {
    let who = text(&session.cmd(&["ACL", "WHOAMI"]).await);
    who.strip_prefix("gen")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unexpected user {who:?}"))
}

/// Each run creates a new ACL user `gen<N>` with a new password and prints it with an expiry
/// three seconds ahead. After every refresh the test deletes the previous user, which makes
/// Redis close every connection still authenticated as it: sessions opened before and after
/// each refresh answer as the newest user and keep working across several expiries.
#[tokio::test]
async fn sessions_outlive_several_expiries_of_their_credentials() {
    let server = RedisServer::start(ServerAuth::app());
    let dir = tempfile::tempdir().unwrap();
    let cli = require("redis-cli");
    let script = format!(
        "{counting}\
         '{cli}' -h 127.0.0.1 -p {port} --user {USER} --pass {PASSWORD} --no-auth-warning \
           ACL SETUSER gen$n on \">pass-$n-zq\" '~*' '&*' '+@all' > /dev/null || exit 1\n\
         printf '{{\"username\": \"gen%s\", \"password\": \"pass-%s-zq\", \"expires_at\": \"%s\"}}\\n' \
           $n $n \"$(date -u -d '+3 seconds' +%Y-%m-%dT%H:%M:%SZ)\"\n",
        counting = counting(dir.path()),
        cli = cli.display(),
        port = server.port,
    );
    let profile = exec_profile(&server, dir.path(), &script, "");
    let config = load_config(dir.path(), &profile);
    let amb = Ambassador::with_config(config, dir).await;
    let mut admin = server.direct().await;
    let mut sessions = vec![amb.connect().await];
    assert_eq!(generation(&mut sessions[0]).await, 1);
    // A RESP2 subscriber cannot send AUTH: it keeps gen1 until Redis drops that user.
    let mut subscriber = amb.connect().await;
    subscriber.cmd(&["SUBSCRIBE", "news"]).await;

    for round in 1..=3u32 {
        wait_until(&format!("refresh {round}"), DEADLINE, || async {
            let ok = amb
                .metric("ambassador_credential_refreshes_total", ("result", "ok"))
                .await;
            ok.unwrap_or(0.0) >= f64::from(round)
        })
        .await;
        sessions.push(amb.connect().await);
        for (i, s) in sessions.iter_mut().enumerate() {
            let g = generation(s).await;
            assert!(g > round, "round {round}: session {i} is still gen{g}");
        }
        if round == 1 {
            wait_until(
                "the subscriber's re-AUTH counted as deferred",
                DEADLINE,
                || async {
                    let deferred = amb
                        .metric("ambassador_session_reauth_total", ("result", "deferred"))
                        .await;
                    deferred == Some(1.0)
                },
            )
            .await;
        }
        let deleted = admin.cmd(&["ACL", "DELUSER", &format!("gen{round}")]).await;
        assert_eq!(deleted, int(1));
        if round == 1 {
            subscriber.read_to_close().await;
        }
        for (i, s) in sessions.iter_mut().enumerate() {
            assert_eq!(s.cmd(&["PING"]).await, simple("PONG"), "session {i}");
        }
    }
    let left = amb
        .metric("ambassador_credential_expiry_seconds", ("source", "exec"))
        .await
        .expect("the expiry gauge");
    assert!(left > 0.0 && left <= 3.0, "{left}");
    // Closed first, so the drain has nothing to wait for.
    drop(sessions);
    amb.stop().await;
}

/// After a good first run, the command fails (printing a password on stdout and stderr),
/// hangs, prints garbage, then megabytes, and at last works again. Meanwhile the old
/// credentials stay in use: sessions old and new keep working, `/readyz` turns false once
/// they expire and true after the good run; every failure is one clear log line, and no log
/// line holds the password the failing run printed.
#[tokio::test]
async fn a_failing_hanging_or_garbage_command_is_survived_with_the_old_credentials() {
    let server = RedisServer::start(ServerAuth::app());
    let dir = tempfile::tempdir().unwrap();
    let good = |secs: u32| {
        format!(
            "printf '{{\"username\": \"{USER}\", \"password\": \"{PASSWORD}\", \"expires_at\": \"%s\"}}\\n' \
               \"$(date -u -d '+{secs} seconds' +%Y-%m-%dT%H:%M:%SZ)\""
        )
    };
    let script = format!(
        "{counting}\
         case $n in\n\
         1) {first} ;;\n\
         2) echo fresh-pass-9911; echo \"token fresh-pass-9911 refused\" >&2; exit 1 ;;\n\
         3) exec sleep 30 ;;\n\
         4) printf 'not\\na password\\n' ;;\n\
         5) head -c 2000000 /dev/zero ;;\n\
         *) {last} ;;\n\
         esac\n",
        counting = counting(dir.path()),
        first = good(3),
        last = good(600),
    );
    let profile = exec_profile(
        &server,
        dir.path(),
        &script,
        "command_timeout = \"1s\"\n\n[admin]\naddress = \"127.0.0.1:0\"\nprobe_interval = \"200ms\"\n",
    );
    std::fs::write(dir.path().join("test.toml"), profile).unwrap();
    let config_dir = dir.path().to_str().unwrap();
    let mut bin = Binary::start(
        dir.path(),
        &["--profile", "test", "--config-dir", config_dir],
        &[],
    );
    let mut before = Raw::connect(&bin.addr).await;
    assert_eq!(before.cmd(&["PING"]).await, simple("PONG"));

    wait_until("/readyz says the credentials expired", DEADLINE, || async {
        let (status, body) = http_get(&bin.admin, "/readyz").await;
        status == 503 && body.contains("credentials expired")
    })
    .await;
    // Expired for the ambassador, still accepted by this Redis: the last good ones serve.
    let mut after = Raw::connect(&bin.addr).await;
    assert_eq!(after.cmd(&["PING"]).await, simple("PONG"));
    assert_eq!(before.cmd(&["PING"]).await, simple("PONG"));

    // Retries come after 1, 2, 4 and 8 seconds.
    wait_until(
        "a good run after the four bad ones",
        DEADLINE * 3,
        || async { http_get(&bin.admin, "/readyz").await.0 == 200 },
    )
    .await;
    assert_eq!(before.cmd(&["PING"]).await, simple("PONG"));
    assert_eq!(after.cmd(&["PING"]).await, simple("PONG"));
    let (_, metrics) = http_get(&bin.admin, "/metrics").await;
    for sample in [
        "ambassador_credential_refreshes_total{source=\"exec\",result=\"failed\"} 4",
        "ambassador_credential_refreshes_total{source=\"exec\",result=\"ok\"} 1",
    ] {
        assert!(metrics.contains(sample), "{sample} in\n{metrics}");
    }

    // Closed first, so the drain has nothing to wait for.
    drop((before, after));
    bin.signal("TERM");
    assert!(bin.wait_exit().success());
    let output = bin.output_to_end();
    let failures: Vec<&str> = output
        .lines()
        .filter(|l| l.contains("credential refresh failed"))
        .collect();
    assert_eq!(failures.len(), 4, "{output}");
    for (line, why) in failures.iter().zip([
        "exited with exit status: 1",
        "did not finish within 1s",
        "neither a password nor the JSON form",
        "printed more than 65536 bytes",
    ]) {
        assert!(line.contains(why), "{why:?} in {line}");
    }
    assert!(failures[0].contains("token <redacted> refused"), "{output}");
    assert!(!output.contains("fresh-pass-9911"), "{output}");
    assert!(!output.contains(PASSWORD), "{output}");
}

/// `--check` names the source and the expiry of what the command gave, never the secret;
/// the keys are validated like every other.
#[tokio::test]
async fn check_shows_the_source_and_expiry_and_keys_are_validated() {
    let server = RedisServer::start(ServerAuth::app());
    let dir = tempfile::tempdir().unwrap();
    let script = format!(
        "printf '{{\"username\": \"{USER}\", \"password\": \"{PASSWORD}\", \"expires_at\": \"2999-01-01T00:00:00+02:00\"}}'"
    );
    let profile = exec_profile(&server, dir.path(), &script, "");
    std::fs::write(dir.path().join("test.toml"), &profile).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_redis-ambassador"))
        .args([
            "--profile",
            "test",
            "--config-dir",
            dir.path().to_str().unwrap(),
        ])
        .arg("--check")
        .output()
        .unwrap();
    let shown =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{shown}");
    assert!(shown.contains("from command \"/bin/sh\""), "{shown}");
    assert!(
        shown.contains("credentials expire: 2998-12-31T22:00:00Z"),
        "{shown}"
    );
    assert!(!shown.contains(PASSWORD), "{shown}");

    let refused = [
        (
            "source = \"exec\"",
            "source = \"aws-iam\"",
            "credentials.command",
            "not with credentials.source = \"aws-iam\"",
        ),
        (
            "source = \"exec\"",
            "source = \"vault\"",
            "credentials.source",
            "expected \"file\", \"exec\" or \"aws-iam\"",
        ),
        (
            "command = [",
            "file = \"x\"\ncommand = [",
            "credentials.file",
            "not with credentials.source",
        ),
        (
            "command = [",
            "command_timeout = \"0s\"\ncommand = [",
            "credentials.command_timeout",
            "longer than 0s",
        ),
        (
            "command = [",
            "max_session_age = \"0s\"\ncommand = [",
            "credentials.max_session_age",
            "must be at least 1s",
        ),
        (
            "source = \"exec\"",
            "source = \"file\"\nfile = \"x\"",
            "credentials.command",
            "only with credentials.source = \"exec\"",
        ),
    ];
    for (from, to, key, why) in refused {
        let errors = try_load_config(dir.path(), &profile.replace(from, to)).unwrap_err();
        let shown = errors.to_string();
        assert!(
            shown.contains(&format!("{key}: ")) && shown.contains(why),
            "{to}: {shown}"
        );
    }
    let command_line = profile
        .lines()
        .find(|l| l.starts_with("command = "))
        .unwrap();
    let empty = profile.replace(command_line, "command = []");
    let shown = try_load_config(dir.path(), &empty).unwrap_err().to_string();
    assert!(
        shown.contains("credentials.command: must name a program"),
        "{shown}"
    );
    // `--healthcheck` loads the profile without running the command.
    let ran = dir.path().join("ran");
    let marking = format!("touch '{}'; exit 2", ran.display());
    std::fs::write(dir.path().join("creds.sh"), marking).unwrap();
    std::fs::write(dir.path().join("test.toml"), &profile).unwrap();
    let skipping = redis_ambassador::config::LoadOptions {
        profile: Some("test".into()),
        config_dir: dir.path().to_owned(),
        skip_credentials_command: true,
        ..Default::default()
    };
    redis_ambassador::Config::load(&skipping).expect("valid without running the command");
    assert!(!ran.exists(), "the command ran");

    std::fs::write(dir.path().join("creds.sh"), "echo hunter2; exit 2").unwrap();
    let shown = try_load_config(dir.path(), &profile)
        .unwrap_err()
        .to_string();
    assert!(
        shown.contains("credentials.command: /bin/sh exited with"),
        "{shown}"
    );
    assert!(!shown.contains("hunter2"), "{shown}");
}

/// `AUTH` calls Redis has counted (`INFO commandstats`).
async fn auth_calls(observer: &mut Raw) -> u64 {
    let info = text(&observer.cmd(&["INFO", "commandstats"]).await);
    info.lines()
        .find_map(|l| l.strip_prefix("cmdstat_auth:calls="))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// `credentials.max_session_age`: an open session sends `AUTH` again once it is that old,
/// though the credentials did not change (the probe is out of the way: only sessions AUTH).
#[tokio::test]
async fn sessions_re_authenticate_at_their_maximum_age() {
    let server = RedisServer::start(ServerAuth::app());
    let amb = Ambassador::start(&server, &format!("max_session_age = \"1s\"\n{NO_PROBES}")).await;
    let mut session = amb.connect().await;
    assert_eq!(session.cmd(&["PING"]).await, simple("PONG"));
    let mut observer = server.direct().await;
    let before = auth_calls(&mut observer).await;
    let deadline = std::time::Instant::now() + DEADLINE;
    loop {
        assert_eq!(session.cmd(&["PING"]).await, simple("PONG"));
        if auth_calls(&mut observer).await > before {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no re-AUTH of the open session"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await; // polling interval
    }
    let reauths = amb
        .metric("ambassador_session_reauth_total", ("result", "ok"))
        .await;
    assert!(reauths >= Some(1.0), "{reauths:?}");
    drop(session);
    amb.stop().await;
}

/// The 12-hour rule of IAM-authenticated connections, shortened to a second: an idle session,
/// one busy with pipelines and one inside MULTI all re-authenticate, and not one reply is lost
/// or given to the wrong command.
#[tokio::test]
async fn idle_pipelined_and_transaction_sessions_all_reach_their_maximum_age_intact() {
    let server = RedisServer::start(ServerAuth::app());
    let amb = Ambassador::start(&server, &format!("max_session_age = \"1s\"\n{NO_PROBES}")).await;
    let mut idle = amb.connect().await;
    let mut busy = amb.connect().await;
    let mut transaction = amb.connect().await;
    for s in [&mut idle, &mut busy, &mut transaction] {
        assert_eq!(s.cmd(&["PING"]).await, simple("PONG"));
    }
    assert_eq!(transaction.cmd(&["MULTI"]).await, simple("OK"));
    assert_eq!(
        transaction.cmd(&["INCR", "in-multi"]).await,
        simple("QUEUED")
    );
    // Pipelines of 20 INCRs for 2.5 s, across the age: every reply is the next number.
    let started = std::time::Instant::now();
    let mut expected = 0i64;
    while started.elapsed() < std::time::Duration::from_millis(2500) {
        let mut batch = Vec::new();
        for _ in 0..20 {
            batch.extend(command(&["INCR", "busy"]));
        }
        busy.send(&batch).await;
        for _ in 0..20 {
            expected += 1;
            assert_eq!(busy.reply().await, int(expected));
        }
    }
    // The transaction waited across the age: EXEC answers its own queued command.
    assert_eq!(
        transaction.cmd(&["EXEC"]).await,
        OwnedFrame::Array {
            data: vec![int(1)],
            attributes: None
        }
    );
    assert_eq!(
        idle.cmd(&["GET", "busy"]).await,
        bulk(expected.to_string().as_bytes())
    );
    // Re-authentications happened (the busy and idle sessions passed the age twice; the
    // transaction only once its MULTI was over), none inside the pipelines or the MULTI.
    wait_until("three sessions re-authenticated", DEADLINE, || async {
        amb.metric("ambassador_session_reauth_total", ("result", "ok"))
            .await
            >= Some(3.0)
    })
    .await;
    for s in [&mut idle, &mut busy, &mut transaction] {
        assert_eq!(s.cmd(&["PING"]).await, simple("PONG"));
    }
    drop((idle, busy, transaction));
    amb.stop().await;
}
