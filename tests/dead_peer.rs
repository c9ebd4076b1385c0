//! Peers that vanish without a word (issue 15). The upstream, or the client, runs in a network
//! namespace of the test's own, reached over a veth pair whose inner end is then taken down:
//! packets to it are dropped, with no FIN, RST or ICMP from the peer, as when a managed Redis
//! fails over or the network partitions. Without keepalive and `TCP_USER_TIMEOUT` a session
//! would hang for about 15 minutes; here it must close within `dead_peer_timeout` plus a few
//! seconds. And a blocked command on a healthy upstream must never be cut.
//!
//! Where namespaces are forbidden the tests skip with a message, except in CI (`CI=true`).

mod common;

use std::net::{Ipv4Addr, SocketAddrV4};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::*;
use redis_ambassador::config::ConfigErrors;
use redis_ambassador::dead_peer::DeadPeer;
use redis_protocol::resp3::types::OwnedFrame;
use tokio::io::AsyncReadExt;

const DEAD_PEER_TIMEOUT: Duration = Duration::from_secs(2);
/// "Within dead_peer_timeout plus a few seconds", generous for a loaded machine. Without the
/// fix the wait is about 15 minutes (idle: forever), so the margin cannot hide it.
const NOTICED_WITHIN: Duration = Duration::from_secs(2 + 8);

/// An in-process ambassador in front of `server` with `dead_peer_timeout = "2s"` (keepalive
/// then defaults to 1s), accepting clients on `listen_ip`, with `listen` lines added to
/// `[listen]`.
async fn ambassador(server: &RedisServer, listen_ip: &str, listen: &str) -> Ambassador {
    let dir = tempfile::tempdir().unwrap();
    let profile = profile_for(server, dir.path(), NO_PROBES).replace(
        "\n[upstream]\n",
        &format!("{listen}\n[upstream]\ndead_peer_timeout = \"2s\"\n"),
    );
    Ambassador::listening_on(load_config(dir.path(), &profile), dir, listen_ip).await
}

/// Waits for the ambassador to close `client`: what it sent before closing, and when.
async fn closed(client: &mut Raw) -> (Vec<u8>, Instant) {
    let deadline = Instant::now() + NOTICED_WITHIN;
    let mut sent = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, client.stream.read(&mut chunk)).await {
            Err(_) => panic!("the client's connection is still open after {NOTICED_WITHIN:?}"),
            Ok(Ok(0) | Err(_)) => return (sent, Instant::now()),
            Ok(Ok(n)) => sent.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Waits for the ambassador to count one dead peer on `side` (it counts just after the
/// session's connections close).
async fn counted_dead_peer(amb: &Ambassador, side: &str) {
    wait_until("ambassador_dead_peers_total", DEADLINE, || async {
        amb.metric("ambassador_dead_peers_total", ("side", side))
            .await
            == Some(1.0)
    })
    .await;
}

#[tokio::test]
async fn an_idle_session_whose_upstream_vanishes_is_closed_within_the_dead_peer_timeout() {
    let Some(ns) = Netns::create_or_skip("idle session, upstream vanishes") else {
        return;
    };
    let server = RedisServer::start_in(&ns, ServerAuth::app());
    let amb = ambassador(&server, "127.0.0.1", "").await;
    let mut client = amb.connect().await;
    assert_eq!(client.cmd(&["PING"]).await, simple("PONG"));

    ns.cut();
    let cut = Instant::now();
    // Nothing is in flight: only keepalive can notice.
    let (sent, at) = closed(&mut client).await;
    assert_eq!(sent, b"", "no reply of the ambassador's own");
    eprintln!("idle session closed {:?} after the cut", at - cut);
    counted_dead_peer(&amb, "upstream").await;
}

/// The issue's own scenario, on the real binary: a session open, the link gone, then `PING`.
#[tokio::test]
async fn a_command_in_flight_to_a_vanished_upstream_ends_with_the_connection_closed() {
    let Some(ns) = Netns::create_or_skip("command in flight, upstream vanishes") else {
        return;
    };
    let server = RedisServer::start_in(&ns, ServerAuth::app());
    let dir = tempfile::tempdir().unwrap();
    let mut bin = binary_for(
        &server,
        dir.path(),
        &[
            ("AMBASSADOR__UPSTREAM__DEAD_PEER_TIMEOUT", "2s"),
            NO_PROBES_ENV,
        ],
    );
    let mut client = Raw::connect(&bin.addr).await;
    assert_eq!(client.cmd(&["PING"]).await, simple("PONG"));

    ns.cut();
    let sent_at = Instant::now();
    // The PING is retransmitted unacknowledged (keepalive is silent while data is in
    // flight): TCP_USER_TIMEOUT ends it. Its outcome is unknown, so no reply is made up.
    client.send(&command(&["PING"])).await;
    let (sent, at) = closed(&mut client).await;
    assert_eq!(sent, b"", "no fabricated reply");
    eprintln!("in-flight session closed {:?} after the PING", at - sent_at);

    bin.signal("TERM");
    bin.wait_exit();
    let log = bin.stderr_to_end();
    let line = log
        .lines()
        .find(|l| l.contains("upstream vanished"))
        .unwrap_or_else(|| panic!("no 'upstream vanished' line in:\n{log}"));
    assert!(line.contains("WARN"), "{line}");
    assert!(line.contains(&server.addr()), "{line}");
}

#[tokio::test]
async fn blocked_commands_on_a_healthy_upstream_outlive_the_dead_peer_timeout() {
    let Some(ns) = Netns::create_or_skip("blocked commands, healthy upstream") else {
        return;
    };
    let server = RedisServer::start_in(&ns, ServerAuth::app());
    let amb = ambassador(&server, "127.0.0.1", "").await;
    let mut pop = amb.connect().await;
    pop.send(&command(&["BLPOP", "deadpeer:list", "0"])).await;
    let mut read = amb.connect().await;
    read.send(&command(&[
        "XREAD",
        "BLOCK",
        "0",
        "STREAMS",
        "deadpeer:stream",
        "$",
    ]))
    .await;
    // No replica will ever acknowledge: WAIT 1 0 blocks until unblocked.
    let mut wait = amb.connect().await;
    wait.send(&command(&["WAIT", "1", "0"])).await;
    wait_blocked_clients(&server, 3).await;
    let upstream = SocketAddrV4::new(ns.inner_addr, server.port);
    // Once Redis acknowledged the commands, nothing is outstanding and keepalive timers run.
    wait_until(
        "the ambassador's three upstream connections idle with keepalive timers running",
        DEADLINE,
        || async { keepalive_connections_to(upstream) == 3 },
    )
    .await;

    // The condition under test is time passing: three dead-peer timeouts, with a keepalive
    // probe every second, answered by the upstream's kernel. Nothing may arrive meanwhile.
    let quiet = tokio::time::timeout(3 * DEAD_PEER_TIMEOUT, async {
        let (mut a, mut b, mut c) = ([0u8; 1], [0u8; 1], [0u8; 1]);
        tokio::select! {
            r = pop.stream.read(&mut a) => ("BLPOP", r),
            r = read.stream.read(&mut b) => ("XREAD", r),
            r = wait.stream.read(&mut c) => ("WAIT", r),
        }
    })
    .await;
    assert!(
        quiet.is_err(),
        "a blocked client was answered or cut: {quiet:?}"
    );

    let mut direct = server.direct().await;
    assert_eq!(direct.cmd(&["LPUSH", "deadpeer:list", "v"]).await, int(1));
    assert_eq!(
        pop.reply().await,
        array(vec![bulk(b"deadpeer:list"), bulk(b"v")])
    );
    let OwnedFrame::BlobString { data: id, .. } = direct
        .cmd(&["XADD", "deadpeer:stream", "*", "f", "v"])
        .await
    else {
        panic!("XADD answers the entry's id");
    };
    let entry = array(vec![bulk(&id), array(vec![bulk(b"f"), bulk(b"v")])]);
    assert_eq!(
        read.reply().await,
        array(vec![array(vec![
            bulk(b"deadpeer:stream"),
            array(vec![entry])
        ])])
    );
    let waiting = client_id_running(&mut direct, "wait").await;
    assert_eq!(direct.cmd(&["CLIENT", "UNBLOCK", &waiting]).await, int(1));
    assert_eq!(wait.reply().await, int(0));
    assert_eq!(
        amb.metric("ambassador_dead_peers_total", ("side", "upstream"))
            .await,
        None
    );
}

fn array(data: Vec<OwnedFrame>) -> OwnedFrame {
    OwnedFrame::Array {
        data,
        attributes: None,
    }
}

/// The id of the one client whose current command is `cmd`, from `CLIENT LIST`.
async fn client_id_running(observer: &mut Raw, cmd: &str) -> String {
    let OwnedFrame::BlobString { data, .. } = observer.cmd(&["CLIENT", "LIST"]).await else {
        panic!("CLIENT LIST answers a bulk string");
    };
    let list = String::from_utf8_lossy(&data).into_owned();
    let want = format!(" cmd={cmd} ");
    list.lines()
        .find(|l| l.contains(&want))
        .and_then(|l| l.strip_prefix("id="))
        .and_then(|rest| rest.split(' ').next())
        .unwrap_or_else(|| panic!("no client running {cmd} in:\n{list}"))
        .to_owned()
}

#[tokio::test]
async fn a_client_that_vanishes_releases_its_upstream_connection() {
    let Some(ns) = Netns::create_or_skip("client vanishes") else {
        return;
    };
    let server = RedisServer::start(ServerAuth::app());
    // Probed after 1s quiet, then every 1s; three unanswered probes: gone after about 4s.
    let listen_ip = ns.outer_addr.to_string();
    let amb = ambassador(&server, &listen_ip, "keepalive = \"1s\"\n").await;
    let mut observer = server.direct().await;

    // A real client inside the namespace, blocked: its upstream connection stays busy.
    let _client = Killed(
        ns.command("redis-cli")
            .args(["-h", &listen_ip, "-p", &amb.addr.port().to_string()])
            .args(["BLPOP", "deadpeer:client", "0"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-cli in the namespace"),
    );
    wait_blocked_clients(&server, 1).await;
    // The start-up probe's own connection may not be gone yet on a loaded machine.
    wait_for_clients(&mut observer, 2, DEADLINE, "observer and the session").await;

    ns.cut();
    wait_for_clients(
        &mut observer,
        1,
        NOTICED_WITHIN,
        "the vanished client's upstream connection is closed",
    )
    .await;
    counted_dead_peer(&amb, "client").await;
}

/// A profile with `listen` and `upstream` lines added to those sections.
fn load(listen: &str, upstream: &str) -> Result<redis_ambassador::Config, ConfigErrors> {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("creds"), "x\n").unwrap();
    let text = format!(
        "[listen]\n{listen}\n[upstream]\naddress = \"redis.internal:6379\"\n{upstream}\n\
         [credentials]\nfile = \"{}\"\n",
        dir.path().join("creds").display()
    );
    try_load_config(dir.path(), &text)
}

#[test]
fn defaults_find_a_dead_upstream_in_about_15s_and_a_dead_client_in_about_a_minute() {
    let config = load("", "").unwrap();
    let s = Duration::from_secs;
    assert_eq!(
        config.upstream.dead_peer,
        DeadPeer {
            user_timeout: Some(s(15)),
            keepalive: Some(s(5)),
        }
    );
    assert_eq!(
        config.listen.dead_peer,
        DeadPeer {
            user_timeout: None,
            keepalive: Some(s(15)),
        }
    );
    let derived = load("", "dead_peer_timeout = \"30s\"").unwrap();
    assert_eq!(derived.upstream.dead_peer.keepalive, Some(s(10)));
}

#[test]
fn zero_turns_each_off() {
    let config = load(
        "keepalive = \"0s\"",
        "dead_peer_timeout = \"0s\"\nkeepalive = \"0s\"",
    )
    .unwrap();
    assert_eq!(config.upstream.dead_peer, DeadPeer::default());
    assert_eq!(config.listen.dead_peer, DeadPeer::default());
}

#[test]
fn keepalive_must_be_whole_seconds_reported_by_key() {
    let errors = load("keepalive = \"250ms\"", "keepalive = \"1500ms\"")
        .expect_err("fractions of a second are refused");
    let keys: Vec<&str> = errors.problems.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, ["listen.keepalive", "upstream.keepalive"]);
    assert!(errors.problems[0].1.contains("whole seconds"));
}

/// A process the test started, killed (by its pid) on drop.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Established connections from this namespace to `remote` whose keepalive timer runs, from
/// `/proc/net/tcp` (its `tr` field is 2 for the keepalive timer, 0 for none).
fn keepalive_connections_to(remote: SocketAddrV4) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    let want = proc_net_address(remote);
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.get(2) == Some(&want.as_str())
                && fields.get(3) == Some(&"01")
                && fields.get(5).is_some_and(|t| t.starts_with("02:"))
        })
        .count()
}

/// `/proc/net/tcp`'s spelling of an address: the network-order IPv4 word printed as a native
/// integer, then the port, both in hex.
fn proc_net_address(a: SocketAddrV4) -> String {
    let ip: Ipv4Addr = *a.ip();
    format!("{:08X}:{:04X}", u32::from_ne_bytes(ip.octets()), a.port())
}
