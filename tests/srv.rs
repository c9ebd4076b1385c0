//! `upstream.srv`: a real DNS server (dnsmasq) serves an SRV record whose target moves
//! between two real Redis servers (127.0.0.1 and 127.0.0.2). New connections follow the
//! record; open sessions are moved only at an idle point, and no reply is cut off.

mod common;

use common::*;
use redis_protocol::resp3::types::OwnedFrame;

const NAME: &str = "_redis._tcp.cache.test";

/// Two servers told apart by the key `who`, and a DNS server naming them a.test and b.test.
struct Pair {
    a: RedisServer,
    b: RedisServer,
}

impl Pair {
    async fn start() -> Pair {
        let a = RedisServer::start(ServerAuth::app());
        let b = RedisServer::start_at(ServerAuth::app(), "127.0.0.2", a.port);
        a.direct().await.cmd(&["SET", "who", "a"]).await;
        b.direct().await.cmd(&["SET", "who", "b"]).await;
        Pair { a, b }
    }

    fn hosts() -> [(&'static str, &'static str); 2] {
        [("127.0.0.1", "a.test"), ("127.0.0.2", "b.test")]
    }

    fn record(&self, target: &str, priority: u16) -> SrvRecord {
        SrvRecord::new(NAME, target, self.a.port, priority, 10)
    }
}

fn profile(
    server: &RedisServer,
    dns: &Dns,
    name: &str,
    dir: &std::path::Path,
    extra: &str,
) -> String {
    let creds = server.credential_file(dir);
    format!(
        "[listen]\naddress = \"127.0.0.1:0\"\n[upstream]\nsrv = \"{name}\"\ndns_server = \"{}\"\nsrv_ttl_min = \"50ms\"\nsrv_ttl_max = \"100ms\"\n{extra}\n[credentials]\nfile = \"{}\"\n{NO_PROBES}",
        dns.addr,
        creds.display()
    )
}

/// Both servers, the record naming a.test, and an ambassador following it with `extra`
/// lines in `[upstream]`.
async fn on_a(extra: &str) -> (Pair, Dns, Ambassador) {
    let pair = Pair::start().await;
    let dns = Dns::start_srv(&Pair::hosts(), &[pair.record("a.test", 0)]);
    dns.wait_srv(NAME, "a.test", pair.a.port).await;
    let dir = tempfile::tempdir().unwrap();
    let profile = profile(&pair.a, &dns, NAME, dir.path(), extra);
    let amb = Ambassador::with_config(load_config(dir.path(), &profile), dir).await;
    (pair, dns, amb)
}

async fn who(raw: &mut Raw) -> OwnedFrame {
    raw.cmd(&["GET", "who"]).await
}

/// Waits until the ambassador's new connections go to `address` only.
async fn wait_target(amb: &Ambassador, address: &str) {
    wait_until(&format!("target {address}"), DEADLINE, || async {
        amb.metric("ambassador_upstream_target", ("address", address))
            .await
            == Some(1.0)
    })
    .await;
}

#[tokio::test]
async fn a_moved_record_moves_new_connections_and_open_sessions_at_their_idle_points() {
    let (pair, mut dns, amb) = on_a("").await;

    let mut idle = amb.connect().await;
    assert_eq!(who(&mut idle).await, bulk(b"a"));
    // A blocked command with two more pipelined behind it: three replies pending.
    let mut blocked = amb.connect().await;
    assert_eq!(who(&mut blocked).await, bulk(b"a"));
    let mut pipeline = command(&["BLPOP", "queue", "0"]);
    pipeline.extend(command(&["GET", "who"]));
    pipeline.extend(command(&["PING"]));
    blocked.send(&pipeline).await;
    wait_blocked_clients(&pair.a, 1).await;
    // Inside MULTI: not an idle point until EXEC has answered.
    let mut transaction = amb.connect().await;
    assert_eq!(transaction.cmd(&["MULTI"]).await, simple("OK"));
    assert_eq!(
        transaction.cmd(&["SET", "moved", "yes"]).await,
        simple("QUEUED")
    );

    dns.set_srv(&[pair.record("b.test", 0)]);
    wait_target(&amb, &format!("b.test:{}", pair.a.port)).await;

    // New connections go to b.
    let mut fresh = amb.connect().await;
    assert_eq!(who(&mut fresh).await, bulk(b"b"));
    // The idle session was closed without a byte.
    assert_eq!(idle.read_to_close().await, b"");
    // The busy ones get every reply they are owed, then are closed.
    assert_eq!(
        transaction.cmd(&["EXEC"]).await,
        OwnedFrame::Array {
            data: vec![simple("OK")],
            attributes: None,
        }
    );
    assert_eq!(transaction.read_to_close().await, b"");
    pair.a.direct().await.cmd(&["LPUSH", "queue", "item"]).await;
    assert_eq!(
        blocked.reply().await,
        OwnedFrame::Array {
            data: vec![bulk(b"queue"), bulk(b"item")],
            attributes: None
        }
    );
    assert_eq!(blocked.reply().await, bulk(b"a"));
    assert_eq!(blocked.reply().await, simple("PONG"));
    assert_eq!(blocked.read_to_close().await, b"");
    // The transaction ran on a, where it was queued.
    assert_eq!(
        pair.a.direct().await.cmd(&["GET", "moved"]).await,
        bulk(b"yes")
    );
    assert_eq!(
        amb.metric("ambassador_sessions_moved_total", ("how", "idle"))
            .await,
        Some(3.0)
    );
    assert!(
        amb.metric("ambassador_upstream_target_changes_total", ("", ""))
            .await
            >= Some(1.0)
    );
    drop(fresh);
    amb.stop().await;
}

#[tokio::test]
async fn with_move_open_sessions_never_open_sessions_stay() {
    let pair = Pair::start().await;
    let mut dns = Dns::start_srv(&Pair::hosts(), &[pair.record("a.test", 0)]);
    dns.wait_srv(NAME, "a.test", pair.a.port).await;
    let dir = tempfile::tempdir().unwrap();
    let profile = profile(
        &pair.a,
        &dns,
        NAME,
        dir.path(),
        "move_open_sessions = \"never\"",
    );
    let amb = Ambassador::with_config(load_config(dir.path(), &profile), dir).await;
    let mut open = amb.connect().await;
    assert_eq!(who(&mut open).await, bulk(b"a"));
    dns.set_srv(&[pair.record("b.test", 0)]);
    wait_target(&amb, &format!("b.test:{}", pair.a.port)).await;
    let mut fresh = amb.connect().await;
    assert_eq!(who(&mut fresh).await, bulk(b"b"));
    assert_eq!(who(&mut open).await, bulk(b"a"));
    drop((open, fresh));
    amb.stop().await;
}

#[tokio::test]
async fn the_best_priority_is_used_and_the_next_when_it_is_down() {
    let pair = Pair::start().await;
    let dns = Dns::start_srv(
        &Pair::hosts(),
        &[pair.record("a.test", 10), pair.record("b.test", 20)],
    );
    dns.wait_srv(NAME, "b.test", pair.a.port).await;
    let dir = tempfile::tempdir().unwrap();
    let profile = profile(&pair.a, &dns, NAME, dir.path(), "");
    let amb = Ambassador::with_config(load_config(dir.path(), &profile), dir).await;
    for _ in 0..20 {
        assert_eq!(who(&mut amb.connect().await).await, bulk(b"a"));
    }
    let Pair { a, b } = pair;
    drop(a);
    assert_eq!(who(&mut amb.connect().await).await, bulk(b"b"));
    drop(b);
    amb.stop().await;
}

#[tokio::test]
async fn a_failed_lookup_keeps_the_last_good_answer() {
    let (_servers, mut dns, amb) = on_a("").await;
    assert_eq!(who(&mut amb.connect().await).await, bulk(b"a"));
    dns.set_srv(&[]);
    wait_until("a failed lookup", DEADLINE, || async {
        amb.metric("ambassador_discovery_failures_total", ("", ""))
            .await
            >= Some(1.0)
    })
    .await;
    assert_eq!(who(&mut amb.connect().await).await, bulk(b"a"));
    amb.stop().await;
}

#[tokio::test]
async fn with_no_answer_ever_clients_get_the_upstream_unavailable_error() {
    let server = RedisServer::start(ServerAuth::app());
    let dns = Dns::start_srv(&Pair::hosts(), &[]);
    let dir = tempfile::tempdir().unwrap();
    let profile = profile(&server, &dns, "_redis._tcp.missing.test", dir.path(), "");
    let amb = Ambassador::with_config(load_config(dir.path(), &profile), dir).await;
    let mut client = amb.connect().await;
    let reply = client.cmd(&["PING"]).await;
    let text = error_text(&reply);
    assert!(
        text.starts_with("ERR ambassador: upstream unavailable (SRV _redis._tcp.missing.test: "),
        "{text}"
    );
    drop(client);
    amb.stop().await;
}

#[test]
fn discovery_keys_are_checked_by_key() {
    let dir = tempfile::tempdir().unwrap();
    let errors = |upstream: &str| {
        let profile = format!(
            "[listen]\naddress = \"127.0.0.1:0\"\n[upstream]\n{upstream}\n[credentials]\nfile = \"/nonexistent\"\n"
        );
        try_load_config(dir.path(), &profile)
            .unwrap_err()
            .to_string()
    };
    let cases = [
        (
            "address = \"a:1\"\nsrv = \"_redis._tcp.x\"",
            "upstream: give only one of address, srv, sentinel, addresses",
        ),
        (
            "srv = \"_redis._tcp.x\"\nsrv_ttl_min = \"10s\"\nsrv_ttl_max = \"1s\"",
            "upstream.srv_ttl_max: must be at least upstream.srv_ttl_min (10s)",
        ),
        (
            "srv = \"_redis._tcp.x\"\nmove_open_sessions = \"sometimes\"",
            "upstream.move_open_sessions: expected \"at-idle\" or \"never\"",
        ),
        (
            "addresses = [\"a:1\", \"b:2\"]\nstrategy = \"random\"",
            "upstream.strategy: expected \"failover\" or \"round-robin\"",
        ),
        (
            "[upstream.sentinel]\naddresses = []",
            "upstream.sentinel.master: missing",
        ),
        (
            "[upstream.sentinel]\naddresses = []",
            "upstream.sentinel.addresses: must list at least one host:port",
        ),
    ];
    for (upstream, want) in cases {
        let found = errors(upstream);
        assert!(found.contains(want), "{upstream}: {found}");
    }
}

#[tokio::test]
async fn a_subscribed_session_stays_until_the_grace_runs_out() {
    let (pair, mut dns, amb) = on_a("move_grace = \"3s\"").await;
    let mut subscriber = amb.connect().await;
    subscriber.send(&command(&["SUBSCRIBE", "news"])).await;
    let confirmation = subscriber.reply().await;
    assert!(
        matches!(confirmation, OwnedFrame::Array { .. }),
        "{confirmation:?}"
    );

    dns.set_srv(&[pair.record("b.test", 0)]);
    wait_target(&amb, &format!("b.test:{}", pair.a.port)).await;
    let moved_at = std::time::Instant::now();
    // Not an idle point: messages still arrive...
    pair.a
        .direct()
        .await
        .cmd(&["PUBLISH", "news", "still-here"])
        .await;
    assert_eq!(
        subscriber.reply().await,
        OwnedFrame::Array {
            data: vec![bulk(b"message"), bulk(b"news"), bulk(b"still-here")],
            attributes: None
        }
    );
    // ... until the grace runs out.
    assert_eq!(subscriber.read_to_close().await, b"");
    let waited = moved_at.elapsed();
    assert!(waited > std::time::Duration::from_secs(2), "{waited:?}");
    drop(subscriber);
    wait_until(
        "counted as closed at the end of the grace",
        DEADLINE,
        || async {
            amb.metric("ambassador_sessions_moved_total", ("how", "grace"))
                .await
                == Some(1.0)
        },
    )
    .await;
    amb.stop().await;
}
