//! `upstream.reuse`: a connection a client left clean is RESET, authenticated again and
//! handed to the next client. A real Redis tells by `CLIENT ID` whether the next client got
//! the previous one's connection, and by `CLIENT INFO` that it sees what a fresh connection
//! sees; sessions that leave state RESET does not clear, or a reply stream the relay could
//! not follow, never hand their connection on.

mod common;

use common::pki::Pki;
use common::*;
use redis_protocol::resp3::types::OwnedFrame;

/// The profile's handshake, so that a reused connection must get it again after RESET.
const HANDSHAKE: &str = "[handshake]\nclient_name = \"amb-reuse\"\ndatabase = 2\n";

/// The `CLIENT INFO` fields that are connection state (not counters, ages or addresses).
const STATE: [&str; 13] = [
    "db", "name", "flags", "multi", "sub", "psub", "ssub", "watch", "user", "resp", "redir",
    "lib-name", "lib-ver",
];

/// A server and an ambassador with two ready connections and `extra` upstream lines.
async fn reusing(extra: &str) -> (RedisServer, Ambassador) {
    reusing_on(RedisServer::start(ServerAuth::app()), extra).await
}

async fn reusing_on(server: RedisServer, extra: &str) -> (RedisServer, Ambassador) {
    let dir = tempfile::tempdir().unwrap();
    let profile = profile_for(&server, dir.path(), &format!("{HANDSHAKE}{NO_PROBES}")).replace(
        "[upstream]\n",
        &format!("[upstream]\npool_size = 2\n{extra}"),
    );
    let amb = Ambassador::with_config(load_config(dir.path(), &profile), dir).await;
    two_ready(&amb, "two ready connections").await;
    (server, amb)
}

fn id_of(frame: OwnedFrame) -> i64 {
    match frame {
        OwnedFrame::Number { data, .. } => data,
        other => panic!("expected an ID, got {other:?}"),
    }
}

/// The ID and the connection state (`CLIENT LIST`'s fields, field by field) of `client`'s
/// upstream connection, as a direct connection to the server sees them: `client` runs
/// `marker`, a command no other connection of the test has just run, and its connection is
/// the one whose last command that was. (A client that asks its own ID, with `CLIENT ID`,
/// `INFO` or `LIST`, rules its connection out of reuse.)
async fn seen(server: &RedisServer, client: &mut Raw, marker: &str) -> (i64, Vec<String>) {
    assert!(!matches!(
        client.cmd(&[marker]).await,
        OwnedFrame::SimpleError { .. }
    ));
    let mut observer = server.direct().await;
    let list = text(&observer.cmd(&["CLIENT", "LIST"]).await).expect("CLIENT LIST");
    let cmd = format!(" cmd={} ", marker.to_lowercase());
    let mut lines = list.lines().filter(|l| l.contains(&cmd));
    let line = lines.next().unwrap_or_else(|| panic!("no {cmd} in {list}"));
    assert!(
        lines.next().is_none(),
        "two connections ran {marker}: {list}"
    );
    let field = |kv: &&str| STATE.contains(&kv.split('=').next().unwrap_or_default());
    let id = line.strip_prefix("id=").and_then(|l| l.split(' ').next());
    let id = id.and_then(|id| id.parse().ok()).expect("id=");
    (
        id,
        line.split_whitespace()
            .filter(field)
            .map(str::to_owned)
            .collect(),
    )
}

/// The profile's credentials become user `rotated`'s; returns once the ambassador uses them.
async fn rotate(server: &RedisServer, amb: &Ambassador) {
    server.add_user("rotated", "rotated-pass-1").await;
    let path = amb.dir.path().join("redis-credentials");
    amb.rotate_credentials(&path, "rotated", "rotated-pass-1", 1.0)
        .await;
}

/// Waits until the pool holds two ready connections (`what` says why).
async fn two_ready(amb: &Ambassador, what: &str) {
    wait_until(what, DEADLINE, || async {
        amb.metric("ambassador_upstream_pool_ready", ("", "")).await == Some(2.0)
    })
    .await;
}

/// Sessions ended with reuse on, by what became of their connection.
async fn returned(amb: &Ambassador, result: &str) -> f64 {
    amb.metric(
        "ambassador_upstream_pool_returned_total",
        ("result", result),
    )
    .await
    .unwrap_or(0.0)
}

/// Waits until `n` sessions have ended with their connection `result`.
async fn wait_returned(amb: &Ambassador, result: &str, n: f64) {
    let what = format!("{n} sessions ended {result}");
    wait_until(&what, DEADLINE, || async {
        returned(amb, result).await == n
    })
    .await;
}

#[tokio::test]
async fn the_next_client_gets_the_connection_reset_and_authenticated_as_new() {
    let (server, amb) = reusing("").await;
    let mut first = amb.connect().await;
    let (id, fresh) = seen(&server, &mut first, "LASTSAVE").await;
    assert!(fresh.contains(&"name=amb-reuse".to_owned()), "{fresh:?}");
    assert!(fresh.contains(&"db=2".to_owned()), "{fresh:?}");
    assert_eq!(first.cmd(&["SET", "k", "v"]).await, simple("OK"));
    assert_eq!(first.cmd(&["GET", "k"]).await, bulk(b"v"));
    // A SELECT, even of the same database, changes the connection: RESET it.
    assert_eq!(first.cmd(&["SELECT", "2"]).await, simple("OK"));
    drop(first);
    wait_returned(&amb, "reused", 1.0).await;

    let mut next = amb.connect().await;
    let (next_id, next_state) = seen(&server, &mut next, "DBSIZE").await;
    assert_eq!(next_id, id, "not reused");
    assert_eq!(next.cmd(&["ACL", "WHOAMI"]).await, bulk(USER.as_bytes()));
    assert_eq!(next.cmd(&["CLIENT", "GETNAME"]).await, bulk(b"amb-reuse"));
    assert_eq!(
        next.cmd(&["GET", "k"]).await,
        bulk(b"v"),
        "the profile's db"
    );
    assert_eq!(next_state, fresh);
    assert_eq!(
        amb.metric("ambassador_upstream_pool_taken_total", ("from", "ready"))
            .await,
        Some(2.0)
    );
    drop(next);
    amb.stop().await;
}

#[tokio::test]
async fn a_connection_left_untouched_is_handed_on_with_no_reset() {
    let (server, amb) = reusing("").await;
    let mut monitor = server.direct().await;
    assert_eq!(monitor.cmd(&["MONITOR"]).await, simple("OK"));
    let mut first = amb.connect().await;
    let (id, fresh) = seen(&server, &mut first, "LASTSAVE").await;
    assert_eq!(first.cmd(&["SET", "k", "v"]).await, simple("OK"));
    let script = "redis.call('select', 5) return redis.call('get', 'k')";
    let other_db = first.cmd(&["EVAL", script, "0"]).await;
    assert!(matches!(other_db, OwnedFrame::Null), "{other_db:?}");
    assert_eq!(
        first.cmd(&["ECHO", "first-leaves"]).await,
        bulk(b"first-leaves")
    );
    drop(first);
    wait_returned(&amb, "untouched", 1.0).await;

    let mut next = amb.connect().await;
    assert_eq!(next.cmd(&["ECHO", "next-came"]).await, bulk(b"next-came"));
    let (next_id, next_state) = seen(&server, &mut next, "DBSIZE").await;
    assert_eq!(next_id, id, "not reused");
    assert_eq!(
        next.cmd(&["GET", "k"]).await,
        bulk(b"v"),
        "the profile's db"
    );
    assert_eq!(next_state, fresh);
    assert_eq!(returned(&amb, "reused").await, 0.0);
    // Between the two, the server was sent nothing.
    let seen = monitor_until(&mut monitor, "\"next-came\"").await;
    let left = seen.iter().position(|l| l.contains("\"first-leaves\""));
    assert_eq!(
        left,
        Some(seen.len() - 2),
        "sent between the two clients: {seen:#?}"
    );
    drop(next);
    amb.stop().await;
}

#[tokio::test]
async fn a_connection_authenticated_before_a_rotation_is_reset_before_it_is_handed_on() {
    let (server, amb) = reusing("").await;
    let mut first = amb.connect().await;
    let (id, _) = seen(&server, &mut first, "LASTSAVE").await;
    rotate(&server, &amb).await;
    assert_eq!(first.cmd(&["PING"]).await, simple("PONG"));
    // The rotation replaced the pool's connections (two); one taken leaves room for first's.
    two_ready(&amb, "two new ready connections").await;
    let mut held = amb.connect().await;
    assert_eq!(held.cmd(&["PING"]).await, simple("PONG"));
    drop(first);
    wait_returned(&amb, "reused", 1.0).await;
    assert_eq!(returned(&amb, "untouched").await, 0.0);

    let mut next = amb.connect().await;
    assert_eq!(seen(&server, &mut next, "DBSIZE").await.0, id, "not reused");
    assert_eq!(next.cmd(&["ACL", "WHOAMI"]).await, bulk(b"rotated"));
    assert_eq!(next.cmd(&["CLIENT", "GETNAME"]).await, bulk(b"amb-reuse"));
    drop((next, held));
    amb.stop().await;
}

#[tokio::test]
async fn a_tls_connection_is_reused_without_a_new_handshake() {
    let pki = Pki::new();
    let server = RedisServer::start_tls(ServerAuth::app(), &ServerTls::new(&pki));
    let dir = tempfile::tempdir().unwrap();
    let profile = format!(
        "[listen]\naddress = \"127.0.0.1:0\"\n[upstream]\naddress = \"{}\"\npool_size = 2\n\
         [upstream.tls]\nenabled = true\nserver_name = \"localhost\"\nca_file = \"{}\"\n\
         [credentials]\nfile = \"{}\"\n{HANDSHAKE}{NO_PROBES}",
        server.tls_addr("127.0.0.1"),
        pki.ca.display(),
        server.credential_file(dir.path()).display()
    );
    let amb = Ambassador::with_config(load_config(dir.path(), &profile), dir).await;
    two_ready(&amb, "two ready connections").await;
    let mut first = amb.connect().await;
    let (id, fresh) = seen(&server, &mut first, "LASTSAVE").await;
    assert_eq!(first.cmd(&["SELECT", "5"]).await, simple("OK"));
    drop(first);
    wait_returned(&amb, "reused", 1.0).await;

    let mut next = amb.connect().await;
    let (next_id, next_state) = seen(&server, &mut next, "DBSIZE").await;
    assert_eq!(next_id, id);
    assert_eq!(next.cmd(&["ACL", "WHOAMI"]).await, bulk(USER.as_bytes()));
    assert_eq!(next_state, fresh);
    // One TLS handshake (full or resumed) counted for two sessions on one connection.
    let mut handshakes = 0.0;
    for kind in ["full", "resumed"] {
        let n = amb.metric("ambassador_upstream_tls_handshakes_total", ("kind", kind));
        handshakes += n.await.unwrap_or(0.0);
    }
    assert_eq!(handshakes, 1.0);
    drop(next);
    amb.stop().await;
}

/// How the first client leaves its last command.
#[derive(Clone, Copy, PartialEq)]
enum Last {
    /// Its reply read.
    Answered,
    /// No reply comes (CLIENT REPLY OFF).
    Silent,
    /// Blocked in the server, the client gone before its reply.
    Blocked,
}

/// A first client sends `commands` and leaves; the next client must see exactly what a
/// fresh connection sees, and gets the first one's connection only if `reused`.
async fn after(commands: &[&[&str]], last: Last, reused: bool) {
    let (server, amb) = reusing("").await;
    let mut first = amb.connect().await;
    let (id, fresh) = seen(&server, &mut first, "LASTSAVE").await;
    let (last_command, before) = commands.split_last().unwrap();
    for c in before {
        first.cmd(c).await;
    }
    first.send(&command(last_command)).await;
    match last {
        Last::Answered => drop(first.reply().await),
        Last::Silent => {}
        Last::Blocked => wait_blocked_clients(&server, 1).await,
    }
    drop(first);
    let (want, other) = match reused {
        true => ("reused", "dirty"),
        false => ("dirty", "reused"),
    };
    wait_returned(&amb, want, 1.0).await;
    assert_eq!(returned(&amb, other).await, 0.0);

    let mut next = amb.connect().await;
    let (next_id, next_state) = seen(&server, &mut next, "DBSIZE").await;
    assert_eq!(next_id == id, reused, "{commands:?}: {next_id} after {id}");
    assert_eq!(next_state, fresh, "after {commands:?}");
    assert_eq!(next.cmd(&["PING"]).await, simple("PONG"));
    drop(next);
    amb.stop().await;
}

#[tokio::test]
async fn select_and_setname_are_undone_by_the_reset() {
    after(
        &[&["SELECT", "3"], &["CLIENT", "SETNAME", "x"]],
        Last::Answered,
        true,
    )
    .await;
}

#[tokio::test]
async fn a_watch_and_resp3_are_undone_by_the_reset() {
    after(&[&["WATCH", "k"], &["HELLO", "3"]], Last::Answered, true).await;
}

#[tokio::test]
async fn a_client_that_left_inside_multi_is_not_reused() {
    after(&[&["MULTI"], &["SET", "k", "v"]], Last::Answered, false).await;
}

#[tokio::test]
async fn a_discard_redis_refused_leaves_the_multi_open_and_the_connection_not_reused() {
    after(&[&["MULTI"], &["DISCARD", "x"]], Last::Answered, false).await;
}

#[tokio::test]
async fn a_subscriber_is_not_reused() {
    after(&[&["SUBSCRIBE", "c"]], Last::Answered, false).await;
}

#[tokio::test]
async fn a_subscriber_is_not_reused_even_after_unsubscribing() {
    after(
        &[&["SUBSCRIBE", "c"], &["UNSUBSCRIBE", "c"]],
        Last::Answered,
        false,
    )
    .await;
}

#[tokio::test]
async fn client_reply_off_is_not_reused() {
    after(&[&["CLIENT", "REPLY", "OFF"]], Last::Silent, false).await;
}

#[tokio::test]
async fn a_monitor_is_not_reused() {
    after(&[&["MONITOR"]], Last::Answered, false).await;
}

#[tokio::test]
async fn a_pending_blocking_pop_is_not_reused() {
    after(&[&["BLPOP", "nothing-here", "0"]], Last::Blocked, false).await;
}

#[tokio::test]
async fn a_client_that_asked_its_connection_id_is_not_reused() {
    // Another connection may name that ID (CLIENT TRACKING ... REDIRECT, CLIENT UNBLOCK): a
    // direct client's close ends that, a reused connection would carry it to the next client.
    after(&[&["CLIENT", "ID"]], Last::Answered, false).await;
    after(&[&["CLIENT", "INFO"]], Last::Answered, false).await;
    after(&[&["client", "list"]], Last::Answered, false).await;
}

#[tokio::test]
async fn a_transaction_is_reset_before_its_connection_is_handed_on() {
    after(
        &[&["MULTI"], &["SET", "k", "v"], &["EXEC"]],
        Last::Answered,
        true,
    )
    .await;
}

/// `first` (whose connection `seen` found as `id`, `fresh`) leaves: its connection must come
/// back through RESET, not untouched, and serve the next client as a fresh one would.
async fn handed_on_after_reset(
    server: &RedisServer,
    amb: &Ambassador,
    first: Raw,
    (id, fresh): (i64, Vec<String>),
) -> Raw {
    drop(first);
    wait_returned(amb, "reused", 1.0).await;
    assert_eq!(returned(amb, "untouched").await, 0.0);
    let mut next = amb.connect().await;
    let (next_id, next_state) = seen(server, &mut next, "DBSIZE").await;
    assert_eq!(next_id, id, "not reused");
    assert_eq!(next_state, fresh);
    next
}

#[tokio::test]
async fn a_multi_left_open_by_a_refused_discard_is_reset() {
    // The user may not DISCARD: Redis refuses it and the MULTI stays open, which the
    // ambassador cannot tell from a DISCARD that worked. MULTI alone sends it through RESET.
    let (server, amb) = reusing("").await;
    let mut admin = server.direct().await;
    assert_eq!(
        admin.cmd(&["ACL", "SETUSER", USER, "-discard"]).await,
        simple("OK")
    );
    let mut first = amb.connect().await;
    let (id, fresh) = seen(&server, &mut first, "LASTSAVE").await;
    assert_eq!(first.cmd(&["MULTI"]).await, simple("OK"));
    assert_eq!(first.cmd(&["SET", "k", "v"]).await, simple("QUEUED"));
    let refused = first.cmd(&["DISCARD"]).await;
    assert!(
        matches!(refused, OwnedFrame::SimpleError { .. }),
        "{refused:?}"
    );
    let mut next = handed_on_after_reset(&server, &amb, first, (id, fresh)).await;
    assert_eq!(next.cmd(&["GET", "k"]).await, OwnedFrame::Null);
    drop(next);
    amb.stop().await;
}

#[tokio::test]
async fn a_command_the_ambassador_does_not_know_sends_the_connection_through_reset() {
    // Renamed with rename-command, WATCH and HELLO look like no command the filter knows
    // (as would a module's, or one newer than its list).
    let server = RedisServer::start_with(
        ServerAuth::app(),
        &[
            "--rename-command",
            "WATCH",
            "mywatch",
            "--rename-command",
            "HELLO",
            "myhello",
        ],
    );
    let (server, amb) = reusing_on(server, "").await;
    let mut first = amb.connect().await;
    let (id, fresh) = seen(&server, &mut first, "LASTSAVE").await;
    assert_eq!(first.cmd(&["mywatch", "k"]).await, simple("OK"));
    assert!(matches!(
        first.cmd(&["myhello", "3"]).await,
        OwnedFrame::Map { .. }
    ));
    let next = handed_on_after_reset(&server, &amb, first, (id, fresh)).await;
    drop(next);
    amb.stop().await;
}

#[tokio::test]
async fn client_no_evict_is_not_reused() {
    // Redis 7.0's RESET keeps CLIENT NO-EVICT: the next client would inherit it.
    after(&[&["CLIENT", "NO-EVICT", "ON"]], Last::Answered, false).await;
}

#[tokio::test]
async fn script_debug_is_not_reused() {
    // RESET keeps CLIENT_LUA_DEBUG: the next client's EVAL would start the debugger.
    after(&[&["SCRIPT", "DEBUG", "YES"]], Last::Answered, false).await;
}

#[tokio::test]
async fn reuse_can_be_turned_off() {
    let (server, amb) = reusing("reuse = false\n").await;
    let mut first = amb.connect().await;
    let id = id_of(first.cmd(&["CLIENT", "ID"]).await).to_string();
    drop(first);
    // The server sees the connection go, as it would without a pool.
    let auth = server.auth.auth_command();
    let gone = || async {
        let list = query(&server.addr(), Some(&auth), &["CLIENT", "LIST", "ID", &id]).await;
        list.as_ref()
            .and_then(text)
            .is_some_and(|l| l.trim().is_empty())
    };
    wait_until("the first client's connection is closed", DEADLINE, gone).await;
    let scrape = amb.scrape().await;
    assert!(
        !scrape
            .samples
            .iter()
            .any(|s| s.metric == "ambassador_upstream_pool_returned_total"),
        "nothing is returned with reuse off"
    );
    let mut next = amb.connect().await;
    assert_eq!(next.cmd(&["PING"]).await, simple("PONG"));
    // And a take refills at once, as without reuse.
    two_ready(&amb, "the pool refilled").await;
    drop(next);
    amb.stop().await;
}

#[tokio::test]
async fn after_a_rotation_a_returned_connection_is_not_handed_out() {
    let (server, amb) = reusing("").await;
    let mut first = amb.connect().await;
    let (id, _) = seen(&server, &mut first, "LASTSAVE").await;
    drop(first);
    wait_returned(&amb, "untouched", 1.0).await;

    rotate(&server, &amb).await;

    let mut next = amb.connect().await;
    assert_eq!(next.cmd(&["ACL", "WHOAMI"]).await, bulk(b"rotated"));
    assert_ne!(seen(&server, &mut next, "DBSIZE").await.0, id);
    assert_eq!(next.cmd(&["CLIENT", "GETNAME"]).await, bulk(b"amb-reuse"));
    drop(next);
    amb.stop().await;
}

#[tokio::test]
async fn a_connection_whose_reauthentication_fails_is_dropped() {
    let (server, amb) = reusing("").await;
    let mut first = amb.connect().await;
    let (id, _) = seen(&server, &mut first, "LASTSAVE").await;
    assert_eq!(first.cmd(&["SELECT", "3"]).await, simple("OK"));
    // The profile's user is disabled while the client is connected: its connection stays
    // authenticated, but the AUTH after RESET is refused.
    let mut admin = server.direct().await;
    admin.cmd(&["ACL", "SETUSER", USER, "off"]).await;
    drop(first);
    wait_returned(&amb, "failed", 1.0).await;
    admin.cmd(&["ACL", "SETUSER", USER, "on"]).await;

    let mut next = amb.connect().await;
    assert_ne!(seen(&server, &mut next, "DBSIZE").await.0, id);
    assert_eq!(next.cmd(&["ACL", "WHOAMI"]).await, bulk(USER.as_bytes()));
    drop(next);
    amb.stop().await;
}

#[test]
fn reuse_is_for_redis_only() {
    let dir = tempfile::tempdir().unwrap();
    let profile = "[listen]\naddress = \"127.0.0.1:0\"\nprotocol = \"tcp\"\n[upstream]\naddress = \"a:1\"\npool_size = 2\nreuse = true\n";
    let errors = try_load_config(dir.path(), profile)
        .unwrap_err()
        .to_string();
    assert!(
        errors.contains("upstream.reuse: not with listen.protocol = \"tcp\""),
        "{errors}"
    );
    // Without the key, a TCP ambassador's pool connections are used once.
    let profile = profile.replace("reuse = true\n", "");
    assert!(!load_config(dir.path(), &profile).upstream.reuse);
}

#[test]
fn reuse_needs_a_pool() {
    let dir = tempfile::tempdir().unwrap();
    let profile = "[listen]\naddress = \"127.0.0.1:0\"\n[upstream]\naddress = \"a:1\"\nreuse = true\n[credentials]\nfile = \"/nonexistent\"\n";
    let errors = try_load_config(dir.path(), profile)
        .unwrap_err()
        .to_string();
    assert!(
        errors.contains("upstream.reuse: needs upstream.pool_size above 0"),
        "{errors}"
    );
}

#[tokio::test]
async fn the_pool_keeps_no_more_than_its_size() {
    let (server, amb) = reusing("").await;
    let mut clients = Vec::new();
    for _ in 0..3 {
        let mut c = amb.connect().await;
        assert_eq!(c.cmd(&["PING"]).await, simple("PONG"));
        clients.push(c);
    }
    drop(clients);
    wait_until("all three sessions accounted for", DEADLINE, || async {
        returned(&amb, "untouched").await + returned(&amb, "full").await == 3.0
    })
    .await;
    assert!(returned(&amb, "full").await >= 1.0);
    // Whatever the pool made meanwhile, it holds two: the server sees two of the app's
    // connections besides the one asking.
    let auth = server.auth.auth_command();
    wait_until("two connections of the app's left", DEADLINE, || async {
        let list = query(&server.addr(), Some(&auth), &["CLIENT", "LIST"]).await;
        let list = list.as_ref().and_then(text).unwrap_or_default();
        let user = format!(" user={USER} ");
        let apps = list.lines().filter(|l| l.contains(&user));
        apps.filter(|l| !l.contains("cmd=client|list")).count() == 2
    })
    .await;
    amb.stop().await;
}
