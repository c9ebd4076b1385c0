//! The real binary: profiles picked by AMBASSADOR_PROFILE, configuration errors, --check,
//! the replication stream.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use common::*;

fn write_profile(dir: &Path, name: &str, server: &RedisServer, creds: &str) {
    let profiles = dir.join("profiles");
    std::fs::create_dir_all(&profiles).unwrap();
    let cred_file = dir.join(format!("{name}.credentials"));
    std::fs::write(&cred_file, creds).unwrap();
    std::fs::write(
        profiles.join(format!("{name}.toml")),
        format!(
            "[listen]\naddress = \"127.0.0.1:0\"\n[upstream]\naddress = \"{}\"\n[credentials]\nfile = \"{}\"\n",
            server.addr(),
            cred_file.display()
        ),
    )
    .unwrap();
}

fn ambassador(cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_redis-ambassador"))
        .current_dir(cwd)
        .args(args)
        .env_remove("AMBASSADOR_PROFILE")
        .env_remove("AMBASSADOR_CONFIG_DIR")
        .envs(env.iter().copied())
        .env("RUST_LOG", "trace")
        .stdin(Stdio::null())
        .output()
        .expect("run redis-ambassador")
}

#[tokio::test]
async fn each_profile_lands_on_its_own_upstream() {
    let staging = RedisServer::start(ServerAuth::AclUser {
        user: "stage-user".into(),
        password: "stage-pass-1".into(),
    });
    let prod = RedisServer::start(ServerAuth::AclUser {
        user: "prod-user".into(),
        password: "prod-pass-2".into(),
    });
    let dir = tempfile::tempdir().unwrap();
    write_profile(
        dir.path(),
        "staging",
        &staging,
        "username = \"stage-user\"\npassword = \"stage-pass-1\"\n",
    );
    write_profile(
        dir.path(),
        "prod",
        &prod,
        "username = \"prod-user\"\npassword = \"prod-pass-2\"\n",
    );

    for (profile, user, server) in [
        ("staging", "stage-user", &staging),
        ("prod", "prod-user", &prod),
    ] {
        let bin = Binary::start(dir.path(), &[], &[("AMBASSADOR_PROFILE", profile)]);
        let mut c = Raw::connect(&bin.addr).await;
        assert_eq!(c.cmd(&["ACL", "WHOAMI"]).await, bulk(user.as_bytes()));
        assert_eq!(c.cmd(&["SET", "written-by", profile]).await, simple("OK"));
        let mut direct = server.direct().await;
        assert_eq!(
            direct.cmd(&["GET", "written-by"]).await,
            bulk(profile.as_bytes())
        );
    }
}

#[test]
fn every_config_error_is_reported_at_once_with_exit_64() {
    let dir = tempfile::tempdir().unwrap();
    let profiles = dir.path().join("profiles");
    std::fs::create_dir_all(&profiles).unwrap();
    std::fs::write(
        profiles.join("broken.toml"),
        "[listen]\naddress = \"nowhere\"\nmax_clients = \"many\"\ncolour = \"blue\"\n\
         [upstream]\naddress = \"redis:notaport\"\nconnect_timeout = \"soon\"\n\
         [credentials]\nfile = \"/nonexistent/secret\"\n[mystery]\nx = 1\n",
    )
    .unwrap();
    let out = ambassador(dir.path(), &["--profile", "broken"], &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    for key in [
        "listen.address",
        "listen.max_clients",
        "listen.colour: unknown key",
        "upstream.address",
        "upstream.connect_timeout",
        "credentials.file",
        "mystery: unknown key",
    ] {
        assert!(stderr.contains(key), "missing {key:?} in:\n{stderr}");
    }
    assert!(!stderr.contains("listening"), "no port may be opened");

    let out = ambassador(dir.path(), &["--profile", "absent"], &[]);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("absent.toml"));
    let out = ambassador(dir.path(), &["--no-such-flag"], &[]);
    assert_eq!(out.status.code(), Some(64));
}

#[test]
fn environment_overrides_the_profile_and_flags_override_both() {
    let server = RedisServer::start(ServerAuth::app());
    let dir = tempfile::tempdir().unwrap();
    write_profile(
        dir.path(),
        "staging",
        &server,
        &ServerAuth::app().credential_file(),
    );
    let profile = dir.path().join("profiles/staging.toml");
    let text = std::fs::read_to_string(&profile).unwrap();
    std::fs::write(&profile, text.replace(&server.addr(), "127.0.0.1:1")).unwrap();
    let addr = server.addr();
    let env = [
        ("AMBASSADOR_PROFILE", "staging"),
        ("AMBASSADOR__UPSTREAM__ADDRESS", addr.as_str()),
    ];
    let out = ambassador(dir.path(), &["--check"], &env);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(&format!("upstream: {addr}")), "{stdout}");
    let out = ambassador(dir.path(), &["--check", "--upstream", "127.0.0.1:1"], &env);
    assert_eq!(
        out.status.code(),
        Some(1),
        "the flag wins over the environment"
    );
}

#[test]
fn check_prints_a_redacted_summary_and_fails_on_bad_credentials() {
    let server = RedisServer::start(ServerAuth::app());
    let dir = tempfile::tempdir().unwrap();
    write_profile(
        dir.path(),
        "prod",
        &server,
        &ServerAuth::app().credential_file(),
    );
    let out = ambassador(dir.path(), &["--profile", "prod", "--check"], &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("authenticated as: app"), "{stdout}");
    assert!(stdout.contains("server version: 7."), "{stdout}");
    assert!(stdout.contains("check: ok"));
    let everything = format!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        !everything.contains(PASSWORD),
        "the password leaked:\n{everything}"
    );

    write_profile(
        dir.path(),
        "prod",
        &server,
        "username = \"app\"\npassword = \"wrong-pass-xyz\"\n",
    );
    let out = ambassador(dir.path(), &["--profile", "prod", "--check"], &[]);
    let everything = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(1), "{everything}");
    assert!(everything.contains("WRONGPASS"), "{everything}");
    assert!(
        !everything.contains("wrong-pass-xyz"),
        "the password leaked:\n{everything}"
    );
}

#[tokio::test]
async fn one_shot_mode_needs_no_profile_and_serves_a_unix_socket() {
    let server = RedisServer::start(ServerAuth::app());
    let dir = tempfile::tempdir().unwrap();
    let creds = server.credential_file(dir.path());
    let socket = dir.path().join("redis.sock");
    let listen = format!("unix:{}", socket.display());
    let addr = server.addr();
    let bin = Binary::start(
        dir.path(),
        &[
            "--listen",
            &listen,
            "--upstream",
            &addr,
            "--credentials-file",
            creds.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(bin.addr, listen);
    assert_eq!(whoami_over_unix(&socket), USER);
}

/// `ACL WHOAMI` asked by redis-cli over the unix socket at `path`.
fn whoami_over_unix(path: &Path) -> String {
    let out = Command::new(require("redis-cli"))
        .args(["-s", path.to_str().unwrap(), "ACL", "WHOAMI"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[tokio::test]
async fn redis_cli_rdb_works_through_the_replication_stream() {
    let server = RedisServer::start(ServerAuth::app());
    let mut direct = server.direct().await;
    assert_eq!(
        direct.cmd(&["SET", "in-the-rdb", "yes"]).await,
        simple("OK")
    );
    let dir = tempfile::tempdir().unwrap();
    let bin = binary_for(&server, dir.path(), &[]);
    let (host, port) = bin.addr.rsplit_once(':').unwrap();
    let rdb = dir.path().join("dump.rdb");
    let out = Command::new(require("redis-cli"))
        .args(["-h", host, "-p", port, "--rdb", rdb.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bytes = std::fs::read(&rdb).unwrap();
    assert!(bytes.starts_with(b"REDIS"), "an RDB file");
    assert!(
        bytes.windows(10).any(|w| w == b"in-the-rdb"),
        "holds the key"
    );
}

/// Runs the binary with `args`, expecting it to exit by itself within the deadline (killed
/// and failed otherwise, so a start that should have been refused cannot hang the test).
fn run_expecting_exit(cwd: &Path, args: &[&str]) -> std::process::Output {
    let mut child = ambassador_command(cwd, args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run redis-ambassador");
    let deadline = std::time::Instant::now() + DEADLINE;
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "still running after {DEADLINE:?}:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(20)); // polling interval
    }
    child.wait_with_output().unwrap()
}

#[tokio::test]
async fn a_unix_socket_path_is_taken_over_only_from_a_stale_socket() {
    let server = RedisServer::start(ServerAuth::app());
    let dir = tempfile::tempdir().unwrap();
    let creds = server.credential_file(dir.path());
    let upstream = server.addr();
    let args = |path: &Path| {
        [
            "--listen".to_owned(),
            format!("unix:{}", path.display()),
            "--upstream".to_owned(),
            upstream.clone(),
            "--credentials-file".to_owned(),
            creds.display().to_string(),
        ]
    };

    let file = dir.path().join("file.sock");
    std::fs::write(&file, "someone's data").unwrap();
    let folder = dir.path().join("folder.sock");
    std::fs::create_dir(&folder).unwrap();
    std::fs::write(folder.join("inside"), "more data").unwrap();
    let live = dir.path().join("live.sock");
    let other_process = std::os::unix::net::UnixListener::bind(&live).unwrap();
    for (path, what) in [
        (&file, "is a regular file"),
        (&folder, "is a folder"),
        (&live, "is a live socket"),
    ] {
        let args = args(path);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = run_expecting_exit(dir.path(), &args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{stderr}");
        let said = format!("listen.address: {} {what}", path.display());
        assert!(stderr.contains(&said), "{said:?} not in:\n{stderr}");
        assert!(!stderr.contains("listening"), "{stderr}");
    }
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "someone's data");
    assert_eq!(
        std::fs::read_to_string(folder.join("inside")).unwrap(),
        "more data"
    );
    // The other process still owns its socket: a client reaches it, not an ambassador.
    let _client = std::os::unix::net::UnixStream::connect(&live).unwrap();
    other_process.set_nonblocking(false).unwrap();
    let _accepted = other_process.accept().expect("the live socket still works");

    // A socket file nobody listens on (an earlier run killed with SIGKILL) is replaced.
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let args = args(&stale);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let bin = Binary::start(dir.path(), &args, &[]);
    assert_eq!(bin.addr, format!("unix:{}", stale.display()));
    assert_eq!(whoami_over_unix(&stale), USER);
}

/// `AMBASSADOR_CONFIG_DIR` picks the folder; its `default.toml` is layered under the profile:
/// the upstream and the database come from `default.toml`, the profile's client name wins
/// over the one there.
#[tokio::test]
async fn config_dir_from_the_environment_layers_default_toml_under_the_profile() {
    let server = RedisServer::start(ServerAuth::app());
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("elsewhere");
    std::fs::create_dir_all(&folder).unwrap();
    let creds = server.credential_file(dir.path());
    std::fs::write(
        folder.join("default.toml"),
        format!(
            "[listen]\naddress = \"127.0.0.1:0\"\n[upstream]\naddress = \"{}\"\n\
             [credentials]\nfile = \"{}\"\n[handshake]\nclient_name = \"from-default\"\ndatabase = 3\n",
            server.addr(),
            creds.display()
        ),
    )
    .unwrap();
    std::fs::write(
        folder.join("layered.toml"),
        "[handshake]\nclient_name = \"from-profile\"\n",
    )
    .unwrap();
    let env = [
        ("AMBASSADOR_CONFIG_DIR", "elsewhere"),
        ("AMBASSADOR_PROFILE", "layered"),
    ];
    let bin = Binary::start(dir.path(), &[], &env);
    let mut c = Raw::connect(&bin.addr).await;
    assert_eq!(
        c.cmd(&["CLIENT", "GETNAME"]).await,
        bulk(b"from-profile"),
        "the profile wins over default.toml"
    );
    assert_eq!(c.cmd(&["SET", "layered", "yes"]).await, simple("OK"));
    let mut direct = server.direct().await;
    assert_eq!(direct.cmd(&["SELECT", "3"]).await, simple("OK"));
    assert_eq!(
        direct.cmd(&["GET", "layered"]).await,
        bulk(b"yes"),
        "default.toml's database and upstream are used"
    );
}

/// `[upstream.expect] info`: a field of `INFO server` with another value fails `--check`
/// (exit 1, naming the field), makes `/readyz` fail and refuses clients; the right value passes.
#[tokio::test]
async fn an_info_mismatch_fails_check_readiness_and_clients() {
    let server = RedisServer::start(ServerAuth::app());
    let dir = tempfile::tempdir().unwrap();
    write_profile(
        dir.path(),
        "prod",
        &server,
        &ServerAuth::app().credential_file(),
    );
    let profile = dir.path().join("profiles/prod.toml");
    let base = std::fs::read_to_string(&profile).unwrap();
    let with_expect = |mode: &str| {
        format!(
            "{base}[upstream.expect]\ninfo = {{ redis_mode = \"{mode}\" }}\n\
             [admin]\naddress = \"127.0.0.1:0\"\nprobe_interval = \"100ms\"\n"
        )
    };
    std::fs::write(&profile, with_expect("standalone")).unwrap();
    let out = ambassador(dir.path(), &["--profile", "prod", "--check"], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    std::fs::write(&profile, with_expect("cluster")).unwrap();
    let out = ambassador(dir.path(), &["--profile", "prod", "--check"], &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    let why = "INFO server redis_mode: expected \"cluster\", got \"standalone\"";
    assert!(stdout.contains(why), "{stdout}");

    let bin = Binary::start(dir.path(), &["--profile", "prod"], &[]);
    wait_until("/readyz reports the mismatch", DEADLINE, || async {
        let (status, body) = http_get(&bin.admin, "/readyz").await;
        status == 503 && body.contains(why)
    })
    .await;
    let mut c = Raw::connect(&bin.addr).await;
    let got = String::from_utf8_lossy(&c.read_to_close().await).into_owned();
    assert_eq!(
        got,
        format!("-ERR ambassador: upstream does not match the profile ({why})\r\n")
    );
}

/// `--healthcheck` asks the running process's `/healthz`: 0 while it runs, 1 before and after.
#[tokio::test]
async fn healthcheck_exits_0_only_while_the_process_answers() {
    let server = RedisServer::start(ServerAuth::app());
    let dir = tempfile::tempdir().unwrap();
    write_profile(
        dir.path(),
        "prod",
        &server,
        &ServerAuth::app().credential_file(),
    );
    let profile = dir.path().join("profiles/prod.toml");
    let base = std::fs::read_to_string(&profile).unwrap();
    let port = free_port();
    std::fs::write(
        &profile,
        format!("{base}[admin]\naddress = \"127.0.0.1:{port}\"\n"),
    )
    .unwrap();
    let healthcheck = || {
        ambassador(dir.path(), &["--profile", "prod", "--healthcheck"], &[])
            .status
            .code()
    };
    assert_eq!(healthcheck(), Some(1), "nothing runs yet");
    let mut bin = Binary::start(dir.path(), &["--profile", "prod"], &[]);
    assert_eq!(bin.admin, format!("127.0.0.1:{port}"));
    assert_eq!(healthcheck(), Some(0), "the process answers /healthz");
    bin.signal("TERM");
    assert!(bin.wait_exit().success());
    assert_eq!(healthcheck(), Some(1), "the process is gone");
}

/// `redis-cli --replica` through the ambassador: REPLCONF, SYNC, the RDB, then the commands
/// written on the primary arrive in the replication stream, as redis-cli prints them.
#[tokio::test]
async fn redis_cli_replica_follows_writes_through_the_ambassador() {
    // redis-cli asks for a diskless transfer, which Redis delays 5 s by default.
    let server = RedisServer::start_with(ServerAuth::app(), &["--repl-diskless-sync-delay", "0"]);
    let dir = tempfile::tempdir().unwrap();
    let bin = binary_for(&server, dir.path(), &[]);
    let (host, port) = bin.addr.rsplit_once(':').unwrap();
    let mut replica = Command::new(require("redis-cli"))
        .args(["-h", host, "-p", port, "--replica"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Its progress goes to stderr, the replicated commands to stdout.
    let (tx, lines) = std::sync::mpsc::channel();
    let outputs: [Box<dyn std::io::Read + Send>; 2] = [
        Box::new(replica.stdout.take().unwrap()),
        Box::new(replica.stderr.take().unwrap()),
    ];
    for output in outputs {
        let tx = tx.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(output)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
    }
    let mut seen = Vec::new();
    let mut wait_for = |what: &str| {
        let deadline = std::time::Instant::now() + DEADLINE;
        while !seen.iter().any(|l: &String| l.contains(what)) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match lines.recv_timeout(left) {
                Ok(line) => seen.push(line),
                Err(_) => panic!("no {what:?} from redis-cli --replica:\n{}", seen.join("\n")),
            }
        }
    };
    wait_for("Logging commands from master");
    let mut direct = server.direct().await;
    assert_eq!(
        direct.cmd(&["SET", "from-primary", "yes"]).await,
        simple("OK")
    );
    wait_for("\"SET\",\"from-primary\",\"yes\"");
    replica.kill().unwrap();
    replica.wait().unwrap();
}

/// One `session closed` line per session at `info`, under the target
/// `redis_ambassador::session`, so a connection-per-request application can turn those
/// lines off with `RUST_LOG` and keep the rest.
#[tokio::test]
async fn per_session_lines_have_a_target_of_their_own() {
    let server = RedisServer::start(ServerAuth::app());
    let dir = tempfile::tempdir().unwrap();
    write_profile(dir.path(), "prod", &server, &server.auth.credential_file());
    for (filter, want_session_lines) in [
        ("info", true),
        ("info,redis_ambassador::session=warn", false),
    ] {
        let mut bin = Binary::start(dir.path(), &["--profile", "prod"], &[("RUST_LOG", filter)]);
        for _ in 0..3 {
            let mut c = Raw::connect(&bin.addr).await;
            assert_eq!(c.cmd(&["PING"]).await, simple("PONG"));
        }
        bin.signal("TERM");
        bin.wait_exit();
        let log = bin.stderr_to_end();
        assert_eq!(
            log.contains("session closed"),
            want_session_lines,
            "{filter}: {log}"
        );
        assert!(log.contains("stopped"), "{filter}: {log}");
    }
}
