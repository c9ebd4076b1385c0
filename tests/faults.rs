//! Faults around the ambassador: the upstream dies mid-reply, restarts, stalls, cannot be
//! resolved; a client vanishes mid-pipeline; the credential file disappears. Real
//! redis-servers, signalled by PID; every wait is a poll with a deadline.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use redis_protocol::resp3::types::OwnedFrame;
use tokio::io::AsyncWriteExt;

const UNAVAILABLE: &str = "-ERR ambassador: upstream unavailable (";

/// What a client gets before the ambassador closes it, as text.
async fn final_words(amb_addr: &str) -> String {
    let mut c = Raw::connect(amb_addr).await;
    String::from_utf8_lossy(&c.read_to_close().await).into_owned()
}

/// The full reply to `GET` of a value made by [`pattern`].
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_killed_mid_reply_never_passes_off_a_partial_reply_as_whole() {
    const LEN: usize = 32 * 1024 * 1024;
    let server = RedisServer::start(ServerAuth::app());
    let amb = Ambassador::start(&server, "").await;
    let value = pattern(LEN);
    let mut direct = server.direct().await;
    let mut set = format!("*3\r\n$3\r\nSET\r\n$3\r\nbig\r\n${LEN}\r\n").into_bytes();
    set.extend_from_slice(&value);
    set.extend_from_slice(b"\r\n");
    direct.send(&set).await;
    assert_eq!(direct.reply().await, simple("OK"));
    drop(direct);
    let mut full = format!("${LEN}\r\n").into_bytes();
    full.extend_from_slice(&value);
    full.extend_from_slice(b"\r\n");

    // A small receive buffer, so most of the reply is still on its way when Redis dies.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(64 * 1024).unwrap();
    let stream = tokio::time::timeout(DEADLINE, socket.connect(amb.addr))
        .await
        .expect("connect in time")
        .unwrap();
    let mut c = Raw {
        stream,
        buf: Vec::new(),
    };
    c.send(&command(&["GET", "big"])).await;
    let mut got = c.read_bytes(256 * 1024).await;
    assert_eq!(got[..], full[..got.len()], "the reply is streaming");
    send_signal(server.pid(), "KILL");
    got.extend(c.read_to_close().await);

    println!(
        "upstream killed: the client got {} of {} bytes, then a close",
        got.len(),
        full.len()
    );
    assert!(
        got.len() < full.len(),
        "a whole reply arrived: the kill came too late to test anything"
    );
    assert!(
        got[..] == full[..got.len()],
        "what arrived is not a prefix of the reply: the client would take other bytes for the value"
    );
    let words = final_words(&amb.addr.to_string()).await;
    assert!(words.starts_with(UNAVAILABLE), "{words}");
}

/// Waits until nothing listens on `port` any more. A killed process's leader turns zombie
/// before its other threads have released the shared descriptor table, so the process
/// state is not enough.
async fn wait_port_closed(port: u16) {
    let deadline = Instant::now() + DEADLINE;
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_ok()
    {
        assert!(Instant::now() < deadline, "port {port} still accepts");
        tokio::time::sleep(Duration::from_millis(10)).await; // polling interval
    }
}

/// A redis-server this test spawns on a port of its choosing, killed on drop.
struct Respawned(Child);

impl Drop for Respawned {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts redis-server again on `server`'s port, with its ACL file and folder, once it
/// answers an authenticated PING. Between the kill and now the port was free: any process's
/// outgoing connection may hold it for a while, and then redis-server exits at once; it is
/// started again, until the deadline.
async fn respawn(server: &RedisServer) -> Respawned {
    let dir = server.dir.path();
    let deadline = Instant::now() + DEADLINE;
    let mut attempts = 0;
    loop {
        attempts += 1;
        let child = Command::new(require("redis-server"))
            .args(["--port", &server.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--logfile", "redis.log"])
            .arg("--dir")
            .arg(dir)
            .arg("--aclfile")
            .arg(dir.join("users.acl"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        let mut again = Respawned(child);
        loop {
            if again.0.try_wait().unwrap().is_some() {
                break; // could not bind: try again
            }
            if answers_ping(server).await {
                return again;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not come back on port {} ({attempts} attempts)",
                server.port
            );
            tokio::time::sleep(Duration::from_millis(20)).await; // polling interval
        }
        assert!(
            Instant::now() < deadline,
            "port {} stayed taken ({attempts} attempts)",
            server.port
        );
        tokio::time::sleep(Duration::from_millis(50)).await; // polling interval
    }
}

/// Whether a redis-server on `server`'s port accepts its credentials and answers PING.
async fn answers_ping(server: &RedisServer) -> bool {
    let Ok(Ok(mut s)) = tokio::time::timeout(
        Duration::from_secs(1),
        tokio::net::TcpStream::connect(server.addr()),
    )
    .await
    else {
        return false;
    };
    let mut ask = server.auth.auth_command();
    ask.extend(command(&["PING"]));
    let mut got = Vec::new();
    let exchange = async {
        use tokio::io::AsyncReadExt;
        s.write_all(&ask).await?;
        let mut buf = [0u8; 64];
        while !got.ends_with(b"+PONG\r\n") {
            let n = s.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        Ok::<_, std::io::Error>(())
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), exchange).await;
    got == b"+OK\r\n+PONG\r\n"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_restarted_on_the_same_port_is_found_again() {
    let server = RedisServer::start(ServerAuth::app());
    let amb = Ambassador::start(&server, "").await;
    let mut open = amb.connect().await;
    assert_eq!(open.cmd(&["SET", "k", "before"]).await, simple("OK"));

    send_signal(server.pid(), "KILL");
    wait_port_closed(server.port).await;
    assert_eq!(
        open.read_to_close().await,
        b"",
        "the open session closes with its upstream"
    );
    let words = final_words(&amb.addr.to_string()).await;
    assert!(
        words.starts_with(UNAVAILABLE) && words.contains("refused"),
        "{words}"
    );

    let again = respawn(&server).await;
    let mut c = amb.connect().await;
    let OwnedFrame::BlobString { data, .. } = c.cmd(&["INFO", "server"]).await else {
        panic!("INFO answers a bulk string");
    };
    let pid = format!("process_id:{}\r\n", again.0.id());
    assert!(
        String::from_utf8_lossy(&data).contains(&pid),
        "recovered without a restart, on the restarted server"
    );
    assert_eq!(c.cmd(&["ACL", "WHOAMI"]).await, bulk(USER.as_bytes()));
    assert_eq!(
        c.cmd(&["GET", "k"]).await,
        OwnedFrame::Null,
        "a new server, nothing saved"
    );
}

/// Resumes a stopped process even when the test fails half-way.
struct Stopped(u32);

impl Drop for Stopped {
    fn drop(&mut self) {
        send_signal(self.0, "CONT");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_upstream_times_out_without_blocking_anything_else() {
    let server = RedisServer::start(ServerAuth::app());
    // The timeouts are upstream settings; no periodic probe to stall alongside.
    let dir = tempfile::tempdir().unwrap();
    let profile = profile_for(&server, dir.path(), NO_PROBES).replace(
        "[upstream]\n",
        "[upstream]\nconnect_timeout = \"3s\"\nhandshake_timeout = \"3s\"\n",
    );
    const LIMIT: Duration = Duration::from_secs(3);
    let amb = Ambassador::with_config(load_config(dir.path(), &profile), dir).await;
    let mut c = amb.connect().await;
    assert_eq!(c.cmd(&["PING"]).await, simple("PONG"));

    send_signal(server.pid(), "STOP");
    let stopped = Stopped(server.pid());
    let started = Instant::now();
    let addr = amb.addr.to_string();
    let waiting: Vec<_> = (0..5)
        .map(|_| {
            let addr = addr.clone();
            tokio::spawn(async move { (final_words(&addr).await, started.elapsed()) })
        })
        .collect();
    // While those wait for the upstream, the admin endpoint answers: before any of them is
    // refused, so it did not wait for their limit.
    for path in ["/healthz", "/metrics"] {
        assert_eq!(amb.admin_get(path).await.0, 200, "{path}");
        assert!(
            waiting.iter().all(|w| !w.is_finished()),
            "{path} answered only after a waiting session was refused ({:?})",
            started.elapsed()
        );
    }
    let mut finished = Vec::new();
    for w in waiting {
        let (words, elapsed) = w.await.unwrap();
        println!("stalled upstream, after {elapsed:?}: {}", words.trim_end());
        assert!(
            words.starts_with(UNAVAILABLE) && words.contains("timed out"),
            "{words}"
        );
        assert!(
            elapsed >= LIMIT.mul_f32(0.9),
            "refused after {elapsed:?} with a {LIMIT:?} limit: {words}"
        );
        finished.push(elapsed);
    }
    // Side by side, not in turn: in turn, each would come a whole limit after the previous.
    let spread = *finished.iter().max().unwrap() - *finished.iter().min().unwrap();
    assert!(
        spread < LIMIT,
        "five sessions timed out over {spread:?}: {finished:?}"
    );

    drop(stopped);
    let deadline = Instant::now() + DEADLINE;
    loop {
        let mut c = amb.connect().await;
        c.send(&command(&["PING"])).await;
        if c.try_reply().await == Some(simple("PONG")) {
            break;
        }
        assert!(Instant::now() < deadline, "no recovery after SIGCONT");
        tokio::time::sleep(Duration::from_millis(25)).await; // polling interval
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_mid_pipeline_releases_its_upstream_and_descriptors() {
    let server = RedisServer::start(ServerAuth::app());
    let dir = tempfile::tempdir().unwrap();
    let bin = binary_for(&server, dir.path(), &[NO_PROBES_ENV]);
    let pid = bin.pid();
    let mut observer = server.direct().await;
    let mut warm = Raw::connect(&bin.addr).await;
    assert_eq!(warm.cmd(&["PING"]).await, simple("PONG"));
    drop(warm);
    wait_for_clients(&mut observer, 1, DEADLINE, "the warm-up session closed").await;
    let fds = fd_count(pid);

    let mut pipeline = Vec::new();
    for _ in 0..50_000 {
        pipeline.extend(command(&["INCR", "pipelined"]));
    }
    pipeline.extend(b"*2\r\n$4\r\nINCR\r\n$9\r\npipel"); // and a command cut short
    let mut c = Raw::connect(&bin.addr).await;
    tokio::time::timeout(DEADLINE, c.stream.write_all(&pipeline))
        .await
        .expect("pipeline written in time")
        .unwrap();
    // Mid-pipeline: Redis has begun on it, the client reads none of the replies.
    let deadline = Instant::now() + DEADLINE;
    while observer.cmd(&["GET", "pipelined"]).await == OwnedFrame::Null {
        assert!(Instant::now() < deadline, "Redis never saw the pipeline");
        tokio::time::sleep(Duration::from_millis(20)).await; // polling interval
    }
    assert_eq!(
        client_count(&mut observer).await,
        2,
        "the session's upstream"
    );
    assert!(
        fd_count(pid) >= fds + 2,
        "the session holds two descriptors"
    );
    drop(c); // replies unread, a command half-sent

    wait_for_clients(&mut observer, 1, DEADLINE, "the session's upstream closed").await;
    wait_until("the descriptors back to the baseline", DEADLINE, || async {
        fd_count(pid) == fds
    })
    .await;
    let mut after = Raw::connect(&bin.addr).await;
    assert_eq!(after.cmd(&["PING"]).await, simple("PONG"));
}

/// A name no resolver can look up, which glibc refuses before it asks any DNS server (a label
/// of 64 bytes, one more than DNS allows): the host's DNS is no part of what these tests time.
fn unresolvable_host() -> String {
    format!("{}.invalid", "n".repeat(64))
}

/// An ambassador whose upstream is [`unresolvable_host`], with `upstream` lines added.
async fn unresolvable_upstream(upstream: &str) -> Ambassador {
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("redis-credentials");
    std::fs::write(&creds, ServerAuth::app().credential_file()).unwrap();
    let profile = format!(
        "[listen]\naddress = \"127.0.0.1:0\"\n[upstream]\naddress = \"{}:6379\"\n\
         {upstream}[credentials]\nfile = \"{}\"\n",
        unresolvable_host(),
        creds.display()
    );
    Ambassador::with_config(load_config(dir.path(), &profile), dir).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unresolvable_upstream_is_reported_and_the_ambassador_keeps_listening() {
    let amb = unresolvable_upstream("connect_timeout = \"5s\"\n").await;
    for _ in 0..3 {
        let started = Instant::now();
        let words = final_words(&amb.addr.to_string()).await;
        println!("unresolvable upstream: {}", words.trim_end());
        assert!(
            words.starts_with("-ERR ambassador: upstream unavailable (DNS: ")
                && words.contains(&unresolvable_host())
                && words.ends_with(")\r\n"),
            "{words}"
        );
        // Reported as the resolver's answer, not after connect_timeout ran out.
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }
    assert_eq!(amb.admin_get("/healthz").await.0, 200);
    assert_eq!(amb.admin_get("/readyz").await.0, 503);
    let dns = amb
        .metric(
            "ambassador_upstream_connect_failures_total",
            ("reason", "dns"),
        )
        .await;
    assert!(dns >= Some(3.0), "dns failures counted: {dns:?}");
}

/// The resolver's own words reach the client: `Name or service not known`, not the I/O
/// error kind (`uncategorized error`) that says nothing about what went wrong.
#[tokio::test]
async fn the_dns_error_says_what_the_resolver_said() {
    let amb = unresolvable_upstream("").await;
    let words = final_words(&amb.addr.to_string()).await;
    let reason = words
        .trim_end()
        .strip_prefix(&format!(
            "-ERR ambassador: upstream unavailable (DNS: cannot resolve {}:6379: ",
            unresolvable_host()
        ))
        .and_then(|r| r.strip_suffix(')'))
        .unwrap_or_else(|| panic!("{words}"));
    assert!(
        !reason.is_empty() && !reason.contains("uncategorized"),
        "the reason says nothing about the failure: {words}"
    );
}

async fn ambassador_with_credentials_at(server: &RedisServer, creds: &Path) -> Ambassador {
    let dir = tempfile::tempdir().unwrap();
    let profile = format!(
        "[listen]\naddress = \"127.0.0.1:0\"\n[upstream]\naddress = \"{}\"\n[credentials]\nfile = \"{}\"\n\
         [admin]\nprobe_interval = \"100ms\"\n",
        server.addr(),
        creds.display()
    );
    Ambassador::with_config(load_config(dir.path(), &profile), dir).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_credential_file_keeps_the_last_good_credentials() {
    let server = RedisServer::start(ServerAuth::app());
    let secret_dir = tempfile::tempdir().unwrap();
    let creds = server.credential_file(secret_dir.path());
    let amb = ambassador_with_credentials_at(&server, &creds).await;
    let mut open = amb.connect().await;
    assert_eq!(open.cmd(&["SET", "k", "v"]).await, simple("OK"));
    let before = amb
        .metric("ambassador_credential_reloads_total", ("result", "invalid"))
        .await
        .unwrap_or(0.0);

    std::fs::remove_file(&creds).unwrap();
    wait_until(
        "the missing file is counted as invalid",
        DEADLINE,
        || async {
            amb.metric("ambassador_credential_reloads_total", ("result", "invalid"))
                .await
                > Some(before)
        },
    )
    .await;
    let mut fresh = amb.connect().await;
    assert_eq!(fresh.cmd(&["ACL", "WHOAMI"]).await, bulk(USER.as_bytes()));
    assert_eq!(fresh.cmd(&["GET", "k"]).await, bulk(b"v"));
    assert_eq!(
        open.cmd(&["PING"]).await,
        simple("PONG"),
        "open sessions stay"
    );
    assert_eq!(amb.admin_get("/healthz").await.0, 200);
}
