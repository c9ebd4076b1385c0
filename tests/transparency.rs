//! Differences from a direct connection found by running third-party client suites through
//! the ambassador, each against a real redis-server: deep replies, order across connections,
//! re-authentication under CLIENT REPLY, local replies in pub/sub and MONITOR, the handshake
//! after RESET, back-pressure on local replies, and QUIT.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use redis_protocol::resp3::types::OwnedFrame;
use tokio::io::AsyncWriteExt;

/// A Lua table that contains itself: Redis follows it until its Lua stack limit, sending
/// thousands of nested one-element arrays and then the error.
const SELF_NESTED: &str = "local a = {}; local b = {a}; a[1] = b; return a";

#[tokio::test]
async fn replies_nested_thousands_deep_pass_and_the_session_goes_on() {
    let server = RedisServer::start(ServerAuth::app());
    let amb = Ambassador::start(&server, NO_PROBES).await;
    let script = command(&["EVAL", SELF_NESTED, "0"]);
    let mut direct = server.direct().await;
    let mut relayed = amb.connect().await;
    let mut replies = Vec::new();
    for c in [&mut direct, &mut relayed] {
        c.send(&script).await;
        c.send(&command(&["PING"])).await;
        let mut bytes = Vec::new();
        while !bytes.ends_with(b"+PONG\r\n") {
            let more = c.read_bytes(1).await;
            bytes.extend(more);
            let take = c.buf.len();
            bytes.extend(c.read_bytes(take).await);
        }
        replies.push(bytes);
    }
    assert!(replies[0].len() > 4 * 4000, "Redis nests thousands deep");
    assert!(replies[0].ends_with(b"-ERR reached lua stack limit\r\n+PONG\r\n"));
    assert!(replies[0] == replies[1], "byte for byte as Redis sends it");
    assert_eq!(
        relayed.cmd(&["ECHO", "still here"]).await,
        bulk(b"still here")
    );
}

/// A connection's upstream client id, asked through the connection itself.
async fn client_id(c: &mut Raw) -> String {
    match c.cmd(&["CLIENT", "ID"]).await {
        OwnedFrame::Number { data, .. } => data.to_string(),
        other => panic!("CLIENT ID: {other:?}"),
    }
}

/// Keeps `pid`'s thread (0: the calling one) on the CPU the caller runs on now.
///
/// Loopback delivery is first in, first out per CPU: a segment is queued on the backlog of
/// the CPU its sender runs on, and a busy CPU may leave its backlog to later. A sender that
/// moved between two writes can see the second delivered first (seen: 11 of 2000 pairs, up to
/// 1 ms apart, with the other tests running beside). Each sender on one CPU measures the
/// ambassador, not the kernel.
fn pin(pid: u32) {
    // SAFETY: a zeroed cpu_set_t is empty; CPU_SET writes inside it; the call reads it.
    unsafe {
        let cpu = libc::sched_getcpu();
        assert!(
            cpu >= 0,
            "sched_getcpu: {}",
            std::io::Error::last_os_error()
        );
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu as usize, &mut set);
        let done = libc::sched_setaffinity(pid as libc::pid_t, std::mem::size_of_val(&set), &set);
        assert_eq!(
            done,
            0,
            "sched_setaffinity: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Ends a round with a command on A, so that A is the connection Redis read last.
///
/// Redis's event loop asks epoll (level-triggered) which sockets are ready and serves them in
/// the order given; the kernel puts a socket it just reported back at the head of its ready
/// list. So the socket Redis read last is served first in the next turn if two commands
/// arrive within one turn, whatever their order: seen with strace in Redis, `epoll_wait`
/// returning B's socket, read last, before A's whose XREAD had arrived first (directly too:
/// 259 of 2000 pairs in one run on this machine, mostly none). Had B spoken last, the test
/// would measure Redis's loop, not the ambassador.
async fn a_speaks_last(a: &mut Raw) {
    let pong = a.cmd(&["PING"]).await;
    assert!(
        pong == simple("PONG") || matches!(pong, OwnedFrame::Array { .. }),
        "PING: {pong:?}"
    );
}

/// Rounds of (A: a command, B: a command that must run after it), written one after the
/// other with no wait between, on keys and channels named with `prefix`; returns the rounds
/// in which B's command ran first.
async fn reorders(a: &mut Raw, b: &mut Raw, rounds: usize, prefix: &str) -> Vec<String> {
    let a_id = client_id(a).await;
    let mut reordered = Vec::new();
    // A blocks on a stream key, then B turns the key into a string. Had SET run first, the
    // read would fail at once with WRONGTYPE instead of blocking.
    for i in 0..rounds {
        let key = format!("{prefix}k{i}");
        a.send(&command(&["XREAD", "BLOCK", "0", "STREAMS", &key, "$"]))
            .await;
        b.send(&command(&["SET", &key, "v"])).await;
        assert_eq!(b.reply().await, simple("OK"));
        let unblocked = b.cmd(&["CLIENT", "UNBLOCK", &a_id]).await;
        let read = a.reply().await;
        if unblocked != int(1) {
            reordered.push(format!("xread {i}: {read:?}"));
        }
        a_speaks_last(a).await;
    }
    // A subscribes, then B publishes: the message is delivered to A.
    for i in 0..rounds {
        let channel = format!("{prefix}c{i}");
        a.send(&command(&["SUBSCRIBE", &channel])).await;
        b.send(&command(&["PUBLISH", &channel, "m"])).await;
        let receivers = b.reply().await;
        let _confirmation = a.reply().await;
        if receivers != int(1) {
            reordered.push(format!("publish {i}: {receivers:?}"));
        } else {
            let _message = a.reply().await;
        }
        a_speaks_last(a).await;
    }
    reordered
}

/// Commands written on two connections one after the other reach Redis in that order. Run on
/// the real binary, whose runtime is the one under test.
#[tokio::test]
async fn commands_on_two_connections_reach_redis_in_the_order_they_were_sent() {
    const ROUNDS: usize = 500;
    let server = RedisServer::start(ServerAuth::app());
    let dir = tempfile::tempdir().unwrap();
    let bin = binary_for(&server, dir.path(), &[NO_PROBES_ENV]);
    pin(0);
    pin(bin.pid());
    let started = Instant::now();
    let mut a = Raw::connect(&bin.addr).await;
    let mut b = Raw::connect(&bin.addr).await;
    let relayed = reorders(&mut a, &mut b, ROUNDS, "relayed:").await;
    let mut a = server.direct().await;
    let mut b = server.direct().await;
    let direct = reorders(&mut a, &mut b, ROUNDS, "direct:").await;
    println!(
        "{} pairs each in {:?}: {} reordered through the ambassador, {} directly",
        2 * ROUNDS,
        started.elapsed(),
        relayed.len(),
        direct.len()
    );
    // The multi-thread runtime reordered 87 to 308 of these 1000. What the current-thread
    // one still showed (2 of 1000 once in CI) was Redis's own loop, see `a_speaks_last`; the
    // ambassador's own order is checked exactly by the stamped test below.
    assert!(
        relayed.is_empty(),
        "reordered through the ambassador: {relayed:?}; directly: {direct:?}"
    );
}

/// A stand-in upstream that notes when the kernel received each segment (`SO_TIMESTAMPNS`,
/// stamped as the sender's write hands it to the loopback device): the order the ambassador
/// wrote in, whatever order a reader later serves its sockets in. Redis cannot say this: its
/// event loop serves ready sockets in epoll order, and the socket it read last is re-queued
/// first (level-triggered), so two commands that arrive within one turn of its loop can run
/// in either order, directly as well.
/// A segment the stand-in read, with its receive stamp in nanoseconds (0: none).
type Segment = (i128, Vec<u8>);

struct StampedUpstream {
    addr: String,
    segments: Arc<Mutex<Vec<Segment>>>,
}

impl StampedUpstream {
    /// Threads of its own, blocking: accept, then per connection read, stamp and answer
    /// (as [`FakeUpstream`] does: `+OK` to AUTH, the argument to ECHO). They end with the
    /// test process.
    fn start() -> StampedUpstream {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        enable_stamps(std::os::fd::AsRawFd::as_raw_fd(&listener));
        let addr = listener.local_addr().unwrap().to_string();
        let segments = Arc::new(Mutex::new(Vec::new()));
        let all = Arc::clone(&segments);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let all = Arc::clone(&all);
                std::thread::spawn(move || serve_stamped(stream, &all));
            }
        });
        StampedUpstream { addr, segments }
    }

    /// The receive stamp (0: none) of every marker that starts with `prefix`, keyed by the
    /// rest of it.
    fn stamps(&self, prefix: &str) -> std::collections::HashMap<String, i128> {
        let mut found = std::collections::HashMap::new();
        for (stamp, bytes) in self.segments.lock().unwrap().iter() {
            let text = String::from_utf8_lossy(bytes);
            for (at, _) in text.match_indices(prefix) {
                let rest = &text[at + prefix.len()..];
                let marker = &rest[..rest.find('\r').unwrap_or(rest.len())];
                found.entry(marker.to_owned()).or_insert(*stamp);
            }
        }
        found
    }

    /// Echoes on a connection of its own until the kernel stamps what arrives.
    async fn wait_for_stamps(&self) {
        let mut c = Raw::connect(&self.addr).await;
        let deadline = Instant::now() + DEADLINE;
        for i in 0.. {
            let marker = format!("warm-up {i}");
            assert_eq!(c.cmd(&["ECHO", &marker]).await, bulk(marker.as_bytes()));
            if self.stamps("warm-up ").get(&i.to_string()) > Some(&0) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the kernel never stamped a segment"
            );
            tokio::time::sleep(Duration::from_millis(10)).await; // polling interval
        }
    }
}

/// Asks the kernel to stamp what `fd` receives (accepted sockets inherit it from the
/// listener). The kernel turns stamping on a moment later, so the first bytes may carry none.
fn enable_stamps(fd: std::os::fd::RawFd) {
    let on: libc::c_int = 1;
    // SAFETY: a valid socket and an int option of the size given.
    let set = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_TIMESTAMPNS,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(
        set,
        0,
        "SO_TIMESTAMPNS: {}",
        std::io::Error::last_os_error()
    );
}

fn serve_stamped(mut stream: std::net::TcpStream, all: &Mutex<Vec<Segment>>) {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    let fd = stream.as_raw_fd();
    enable_stamps(fd);
    stream.set_nodelay(true).unwrap();
    let mut pending = Vec::new();
    let mut data = vec![0u8; 64 * 1024];
    let mut control = [0u64; 16];
    loop {
        let mut iov = libc::iovec {
            iov_base: data.as_mut_ptr().cast(),
            iov_len: data.len(),
        };
        // SAFETY: zeroed is a valid msghdr; its pointers are set to live buffers below.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control) as _;
        // SAFETY: msg points at buffers that outlive the call.
        let n = unsafe { libc::recvmsg(fd, &mut msg, 0) };
        if n <= 0 {
            return;
        }
        let mut stamp = None;
        // SAFETY: the CMSG macros walk the control buffer the kernel just filled.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_TIMESTAMPNS {
                    let ts = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::timespec>());
                    stamp = Some(ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128);
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        let bytes = data[..n as usize].to_vec();
        // Bytes queued before the option was set (the handshake) carry no stamp.
        all.lock()
            .unwrap()
            .push((stamp.unwrap_or(0), bytes.clone()));
        pending.extend_from_slice(&bytes);
        if stream.write_all(&answer_all(&mut pending)).is_err() {
            return;
        }
    }
}

/// Rounds of (A: ECHO, B: ECHO) written one after the other; returns the rounds whose B
/// command reached `upstream` first, by the kernel's receive stamps, with how many
/// nanoseconds before A's.
async fn stamped_reorders(
    a: &mut Raw,
    b: &mut Raw,
    upstream: &StampedUpstream,
    rounds: usize,
    prefix: &str,
) -> Vec<(usize, i128)> {
    // Both sessions are up (through the ambassador: connected upstream and authenticated)
    // before the rounds: a command sent while its session is still connecting waits for it.
    for c in [&mut *a, &mut *b] {
        assert_eq!(c.cmd(&["ECHO", "ready"]).await, bulk(b"ready"));
    }
    for i in 0..rounds {
        let (ma, mb) = (format!("{prefix}a{i}"), format!("{prefix}b{i}"));
        a.send(&command(&["ECHO", &ma])).await;
        b.send(&command(&["ECHO", &mb])).await;
        assert_eq!(a.reply().await, bulk(ma.as_bytes()));
        assert_eq!(b.reply().await, bulk(mb.as_bytes()));
    }
    let stamps = upstream.stamps(prefix);
    (0..rounds)
        .filter_map(|i| {
            let a = stamps.get(&format!("a{i}")).copied().unwrap_or(0);
            let b = stamps.get(&format!("b{i}")).copied().unwrap_or(0);
            assert!(a > 0 && b > 0, "round {i} arrived without a receive stamp");
            (b < a).then_some((i, a - b))
        })
        .collect()
}

/// The ambassador's own part of the ordering, measured where Redis cannot blur it: commands
/// written on two connections one after the other leave the ambassador in that order, every
/// time. Run on the real binary, whose runtime is the one under test.
#[tokio::test]
async fn the_ambassador_forwards_commands_from_two_connections_in_arrival_order() {
    const ROUNDS: usize = 2000;
    let upstream = StampedUpstream::start();
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("credentials.toml");
    std::fs::write(&creds, ServerAuth::app().credential_file()).unwrap();
    let bin = Binary::start(
        dir.path(),
        &[
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            &upstream.addr,
            "--credentials-file",
            creds.to_str().unwrap(),
        ],
        &[NO_PROBES_ENV],
    );
    pin(0);
    pin(bin.pid());
    upstream.wait_for_stamps().await;
    // The method itself: the test's own two writes, straight to the stand-in.
    let mut a = Raw::connect(&upstream.addr).await;
    let mut b = Raw::connect(&upstream.addr).await;
    let direct = stamped_reorders(&mut a, &mut b, &upstream, ROUNDS, "direct:").await;
    assert!(
        direct.is_empty(),
        "the stamps misorder direct writes: {direct:?}"
    );
    let mut a = Raw::connect(&bin.addr).await;
    let mut b = Raw::connect(&bin.addr).await;
    let relayed = stamped_reorders(&mut a, &mut b, &upstream, ROUNDS, "relayed:").await;
    println!(
        "{ROUNDS} pairs: {} left the ambassador out of order",
        relayed.len()
    );
    assert!(relayed.is_empty(), "out of order (round, ns): {relayed:?}");
}

/// A second ACL user, so that a rotation can be seen from Redis's side: the session's
/// `ACL WHOAMI` changes only when the ambassador's AUTH really ran on that connection.
const ROTATED_USER: &str = "app-rotated";
const ROTATED_PASSWORD: &str = "rotated-secret-91";

async fn rotating_ambassador(server: &RedisServer) -> (Ambassador, std::path::PathBuf) {
    server.add_user(ROTATED_USER, ROTATED_PASSWORD).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("credentials.toml");
    std::fs::write(&file, server.auth.credential_file()).unwrap();
    let profile = format!(
        "[listen]\naddress = \"127.0.0.1:0\"\n[upstream]\naddress = \"{}\"\n[credentials]\nfile = \"{}\"\n{NO_PROBES}",
        server.addr(),
        file.display()
    );
    let config = load_config(dir.path(), &profile);
    (Ambassador::with_config(config, dir).await, file)
}

/// Rotates to the second user and waits until the ambassador applied it and a new session
/// was served with it (by then every open session has been told).
async fn rotate(amb: &Ambassador, file: &std::path::Path) {
    amb.rotate_credentials(file, ROTATED_USER, ROTATED_PASSWORD, 1.0)
        .await;
    let mut fresh = amb.connect().await;
    assert_eq!(
        fresh.cmd(&["ACL", "WHOAMI"]).await,
        bulk(ROTATED_USER.as_bytes())
    );
}

/// Reads every reply until `last` arrives.
async fn replies_until(c: &mut Raw, last: OwnedFrame) -> Vec<OwnedFrame> {
    let mut out = Vec::new();
    loop {
        let f = c.reply().await;
        let done = f == last;
        out.push(f);
        if done {
            return out;
        }
    }
}

#[tokio::test]
async fn reauthentication_waits_while_client_reply_silences_its_answer() {
    let server = RedisServer::start(ServerAuth::app());
    let (amb, file) = rotating_ambassador(&server).await;
    let mut off = amb.connect().await;
    let mut skip = amb.connect().await;
    let mut switching = amb.connect().await;
    off.send(&command(&["CLIENT", "REPLY", "OFF"])).await;
    skip.send(&command(&["CLIENT", "REPLY", "SKIP"])).await;
    // Every session has sent its last command before the rotation, and it was run.
    for c in [&mut off, &mut skip] {
        c.send(&command(&["SET", "before", "1"])).await;
    }
    assert_eq!(switching.cmd(&["PING"]).await, simple("PONG"));
    let mut observer = server.direct().await;
    let deadline = Instant::now() + DEADLINE;
    while observer.cmd(&["DBSIZE"]).await != int(1) {
        assert!(Instant::now() < deadline, "the SETs never ran");
        tokio::time::sleep(Duration::from_millis(20)).await; // polling interval
    }
    rotate(&amb, &file).await;

    off.send(&command(&["CLIENT", "REPLY", "ON"])).await;
    off.send(&command(&["PING"])).await;
    assert_eq!(off.reply().await, simple("OK"), "CLIENT REPLY ON's own +OK");
    assert_eq!(off.reply().await, simple("PONG"));

    // SKIP was spent on SET before: both PINGs answer.
    assert_eq!(skip.cmd(&["PING", "a"]).await, bulk(b"a"));

    // A pipeline that switches modes around the pending re-authentication.
    let mut batch = command(&["CLIENT", "REPLY", "OFF"]);
    for c in [
        &["SET", "k", "1"][..],
        &["CLIENT", "REPLY", "ON"],
        &["CLIENT", "REPLY", "SKIP"],
        &["PING", "x"],
        &["PING", "y"],
    ] {
        batch.extend(command(c));
    }
    switching.send(&batch).await;
    let got = replies_until(&mut switching, bulk(b"y")).await;
    assert_eq!(got, [simple("OK"), bulk(b"y")]);

    for c in [&mut off, &mut skip, &mut switching] {
        assert_eq!(
            c.cmd(&["ACL", "WHOAMI"]).await,
            bulk(ROTATED_USER.as_bytes()),
            "the session re-authenticated, as Redis sees it"
        );
    }
}

#[tokio::test]
async fn local_replies_keep_their_place_in_pubsub_and_monitor() {
    let server = RedisServer::start(ServerAuth::app());
    let amb = Ambassador::with_client_password(&server).await;
    let mut sub = amb.connect().await;
    assert_eq!(sub.cmd(&["AUTH", CLIENT_PASSWORD]).await, simple("OK"));
    let mut batch = command(&["SUBSCRIBE", "a", "b"]);
    batch.extend(command(&["AUTH", "wrong"]));
    batch.extend(command(&["PING"]));
    sub.send(&batch).await;
    for channel in ["a", "b"] {
        let confirmation = OwnedFrame::Array {
            data: vec![
                bulk(b"subscribe"),
                bulk(channel.as_bytes()),
                int(1 + i64::from(channel == "b")),
            ],
            attributes: None,
        };
        assert_eq!(sub.reply().await, confirmation);
    }
    assert!(error_text(&sub.reply().await).starts_with("WRONGPASS"));

    let mut mon = amb.connect().await;
    assert_eq!(mon.cmd(&["AUTH", CLIENT_PASSWORD]).await, simple("OK"));
    let mut batch = command(&["MONITOR"]);
    batch.extend(command(&["AUTH", "wrong"]));
    mon.send(&batch).await;
    assert_eq!(mon.reply().await, simple("OK"));
    assert!(error_text(&mon.reply().await).starts_with("WRONGPASS"));
}

#[tokio::test]
async fn a_refused_handshake_after_reset_closes_the_session() {
    let server = RedisServer::start(ServerAuth::app());
    let amb = Ambassador::start(&server, &format!("[handshake]\ndatabase = 3\n{NO_PROBES}")).await;
    let mut c = amb.connect().await;
    assert_eq!(c.cmd(&["SET", "where", "db3"]).await, simple("OK"));
    let mut admin = server.direct().await;
    assert_eq!(
        admin.cmd(&["ACL", "SETUSER", USER, "-select"]).await,
        simple("OK")
    );
    c.send(&command(&["RESET"])).await;
    assert_eq!(c.reply().await, simple("RESET"));
    let refused = error_text(&c.reply().await);
    assert!(
        refused.contains("ambassador") && refused.contains("SELECT"),
        "{refused}"
    );
    assert_eq!(c.try_reply().await, None, "closed, not left on database 0");
}

#[tokio::test]
async fn a_client_that_never_reads_stops_being_read() {
    let server = RedisServer::start(ServerAuth::app());
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("client-password");
    std::fs::write(&pw, format!("{CLIENT_PASSWORD}\n")).unwrap();
    let bin = binary_for(
        &server,
        dir.path(),
        &[
            NO_PROBES_ENV,
            (
                "AMBASSADOR__LISTEN__REQUIRE_PASSWORD_FILE",
                pw.to_str().unwrap(),
            ),
        ],
    );
    let before = proc_kib(bin.pid(), "VmRSS");
    let mut c = Raw::connect(&bin.addr).await;
    // Every PING is answered -NOAUTH by the ambassador itself; nothing is read. Writing goes
    // on until the ambassador stops taking bytes for a second (or 4 s or 256 MiB pass).
    let pings = b"*1\r\n$4\r\nPING\r\n".repeat(50_000);
    let mut sent = 0usize;
    let deadline = Instant::now() + Duration::from_secs(4);
    while Instant::now() < deadline && sent < 256 << 20 {
        let write = c.stream.write(&pings);
        match tokio::time::timeout(Duration::from_secs(1), write).await {
            Ok(Ok(n)) => sent += n,
            Ok(Err(e)) => panic!("write: {e}"),
            Err(_) => break,
        }
    }
    let after = proc_kib(bin.pid(), "VmRSS");
    println!(
        "sent {} MiB without reading; RSS {before} -> {after} KiB",
        sent >> 20
    );
    // Before the bound: 8 MiB taken in 3 s (debug build) and RSS +15 MiB, still growing.
    assert!(after < before + 8 * 1024, "RSS {before} -> {after} KiB");
}

#[tokio::test]
async fn a_client_leaving_after_quit_releases_the_upstream_connection() {
    let server = RedisServer::start(ServerAuth::app());
    let amb = Ambassador::start(&server, NO_PROBES).await;
    let mut observer = server.direct().await;
    let mut c = amb.connect().await;
    assert_eq!(c.cmd(&["PING"]).await, simple("PONG"));
    wait_for_clients(&mut observer, 2, DEADLINE, "the session's connection").await;
    // QUIT waits behind a blocked pop that nothing will serve; the client gives up.
    let mut batch = command(&["BLPOP", "nothing", "0"]);
    batch.extend(command(&["QUIT"]));
    c.send(&batch).await;
    drop(c);
    wait_for_clients(
        &mut observer,
        1,
        DEADLINE,
        "the upstream connection released",
    )
    .await;
}

/// A client that closes its sending side: Redis answers everything it already read, then
/// closes; the ambassador ends a session at once only when nothing is owed (it skips the
/// half-close round trip then). Both, byte for byte as directly.
#[tokio::test]
async fn a_half_closed_client_gets_every_reply_owed_then_the_close() {
    let server = RedisServer::start(ServerAuth::app());
    let amb = Ambassador::start(&server, NO_PROBES).await;
    // (Not a blocked command: Redis drops a blocked client at its end of input, unanswered.)
    let mut pipeline = Vec::new();
    for i in 0..5000 {
        pipeline.extend(command(&["ECHO", &i.to_string()]));
    }
    let mut seen = Vec::new();
    for mut c in [server.direct().await, amb.connect().await] {
        c.send(&pipeline).await;
        c.stream.shutdown().await.unwrap();
        seen.push(c.read_to_close().await);
    }
    assert!(
        seen[0].ends_with(b"$4\r\n4999\r\n"),
        "every reply, directly"
    );
    assert!(seen[0] == seen[1], "the same bytes through the ambassador");

    // Nothing owed: the client reads the close right away, and Redis sees the client leave.
    let mut observer = server.direct().await;
    let mut c = amb.connect().await;
    assert_eq!(c.cmd(&["PING"]).await, simple("PONG"));
    wait_for_clients(&mut observer, 2, DEADLINE, "observer and the session").await;
    c.stream.shutdown().await.unwrap();
    assert!(c.read_to_close().await.is_empty());
    wait_for_clients(&mut observer, 1, DEADLINE, "the session's upstream closed").await;
}
