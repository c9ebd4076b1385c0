//! DESIGN section 1: every Redis feature that depends on connection state works through the
//! ambassador exactly as against Redis directly. Raw RESP, real redis-server, one server and one
//! ambassador per test.

mod common;

use common::*;
use redis_protocol::resp3::types::OwnedFrame;

/// Encodes a command whose arguments may be binary.
fn command_bytes(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend(format!("${}\r\n", a.len()).into_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

fn arr(items: Vec<OwnedFrame>) -> OwnedFrame {
    OwnedFrame::Array {
        data: items,
        attributes: None,
    }
}

fn push(items: Vec<OwnedFrame>) -> OwnedFrame {
    OwnedFrame::Push {
        data: items,
        attributes: None,
    }
}

fn ok() -> OwnedFrame {
    simple("OK")
}

/// The text of a bulk, simple or verbatim string frame.
fn text(f: &OwnedFrame) -> String {
    match f {
        OwnedFrame::BlobString { data, .. }
        | OwnedFrame::SimpleString { data, .. }
        | OwnedFrame::VerbatimString { data, .. } => String::from_utf8_lossy(data).into_owned(),
        other => panic!("expected a string, got {other:?}"),
    }
}

/// A field of a RESP3 map (or of a RESP2 flat key/value array, as HELLO 2 answers).
fn field(f: &OwnedFrame, key: &str) -> OwnedFrame {
    match f {
        OwnedFrame::Map { data, .. } => data
            .get(&bulk(key.as_bytes()))
            .cloned()
            .unwrap_or_else(|| panic!("no {key} in {f:?}")),
        OwnedFrame::Array { data, .. } => data
            .chunks(2)
            .find(|kv| kv[0] == bulk(key.as_bytes()))
            .map(|kv| kv[1].clone())
            .unwrap_or_else(|| panic!("no {key} in {f:?}")),
        other => panic!("expected a map, got {other:?}"),
    }
}

/// Reads exactly `expected` next (for RESP2 nulls, which the harness decoder does not accept).
async fn expect_raw(c: &mut Raw, expected: &[u8]) {
    let got = c.read_bytes(expected.len()).await;
    assert_eq!(
        String::from_utf8_lossy(&got),
        String::from_utf8_lossy(expected)
    );
}

/// `CLIENT INFO` of this connection as text.
async fn client_info(c: &mut Raw) -> String {
    text(&c.cmd(&["CLIENT", "INFO"]).await)
}

/// The value of `name=` in a CLIENT INFO line.
fn info_field(info: &str, name: &str) -> String {
    info.split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
        .unwrap_or_else(|| panic!("no {name}= in {info}"))
        .to_owned()
}

#[tokio::test]
async fn ten_thousand_commands_pipelined_in_one_write() {
    let server = RedisServer::start(ServerAuth::app());
    let amb = Ambassador::start(&server, "").await;
    let mut c = amb.connect().await;

    const N: usize = 10_000;
    let mut batch = Vec::new();
    for i in 0..N {
        match i % 3 {
            0 => batch.extend(command(&["INCR", "counter"])),
            1 => batch.extend(command(&[
                "SET",
                &format!("key:{i}"),
                &format!("value:{i}"),
            ])),
            _ => batch.extend(command(&["GET", &format!("key:{}", i - 1)])),
        }
    }
    c.send(&batch).await;

    let mut incrs = 0;
    for i in 0..N {
        let got = c.reply().await;
        let want = match i % 3 {
            0 => {
                incrs += 1;
                int(incrs)
            }
            1 => ok(),
            _ => bulk(format!("value:{}", i - 1).as_bytes()),
        };
        assert_eq!(got, want, "reply {i} of {N}");
    }
    // Nothing extra after the last reply: the next command's reply comes next.
    assert_eq!(
        c.cmd(&["GET", "counter"]).await,
        bulk(incrs.to_string().as_bytes())
    );
    assert_eq!(c.cmd(&["DBSIZE"]).await, int(1 + (N as i64) / 3));
}

#[tokio::test]
async fn multi_exec_watch_and_discard() {
    let server = RedisServer::start(ServerAuth::app());
    let amb = Ambassador::start(&server, "").await;
    let mut c = amb.connect().await;
    let mut other = amb.connect().await;

    // A plain transaction, one command at a time.
    assert_eq!(c.cmd(&["MULTI"]).await, ok());
    assert_eq!(c.cmd(&["SET", "a", "1"]).await, simple("QUEUED"));
    assert_eq!(c.cmd(&["INCR", "a"]).await, simple("QUEUED"));
    // Another client does not see the queued writes before EXEC.
    assert_eq!(other.cmd(&["EXISTS", "a"]).await, int(0));
    assert_eq!(c.cmd(&["EXEC"]).await, arr(vec![ok(), int(2)]));
    assert_eq!(other.cmd(&["GET", "a"]).await, bulk(b"2"));

    // The same transaction pipelined in one write.
    let mut batch = command(&["MULTI"]);
    batch.extend(command(&["INCR", "a"]));
    batch.extend(command(&["INCRBY", "a", "10"]));
    batch.extend(command(&["EXEC"]));
    batch.extend(command(&["GET", "a"]));
    c.send(&batch).await;
    assert_eq!(c.reply().await, ok());
    assert_eq!(c.reply().await, simple("QUEUED"));
    assert_eq!(c.reply().await, simple("QUEUED"));
    assert_eq!(c.reply().await, arr(vec![int(3), int(13)]));
    assert_eq!(c.reply().await, bulk(b"13"));

    // WATCH, a concurrent modification by another client, and EXEC aborts with a null.
    assert_eq!(c.cmd(&["SET", "w", "0"]).await, ok());
    assert_eq!(c.cmd(&["WATCH", "w"]).await, ok());
    assert_eq!(other.cmd(&["SET", "w", "changed"]).await, ok());
    assert_eq!(c.cmd(&["MULTI"]).await, ok());
    assert_eq!(c.cmd(&["SET", "w", "mine"]).await, simple("QUEUED"));
    c.send(&command(&["EXEC"])).await;
    expect_raw(&mut c, b"*-1\r\n").await;
    assert_eq!(c.cmd(&["GET", "w"]).await, bulk(b"changed"));

    // WATCH without interference: EXEC runs.
    assert_eq!(c.cmd(&["WATCH", "w"]).await, ok());
    assert_eq!(c.cmd(&["MULTI"]).await, ok());
    assert_eq!(c.cmd(&["SET", "w", "mine"]).await, simple("QUEUED"));
    assert_eq!(c.cmd(&["EXEC"]).await, arr(vec![ok()]));
    assert_eq!(other.cmd(&["GET", "w"]).await, bulk(b"mine"));

    // DISCARD drops the queued commands.
    assert_eq!(c.cmd(&["MULTI"]).await, ok());
    assert_eq!(c.cmd(&["SET", "d", "x"]).await, simple("QUEUED"));
    assert_eq!(c.cmd(&["DISCARD"]).await, ok());
    assert_eq!(c.cmd(&["EXISTS", "d"]).await, int(0));
    // Out of the transaction again: EXEC without MULTI is an error.
    assert!(error_text(&c.cmd(&["EXEC"]).await).contains("EXEC without MULTI"));

    // A queued command with a wrong arity makes EXEC fail (EXECABORT), in order.
    assert_eq!(c.cmd(&["MULTI"]).await, ok());
    assert!(error_text(&c.cmd(&["SET", "only-key"]).await).contains("wrong number"));
    assert!(error_text(&c.cmd(&["EXEC"]).await).starts_with("EXECABORT"));
    assert_eq!(c.cmd(&["PING"]).await, simple("PONG"));
}

#[tokio::test]
async fn select_is_per_connection() {
    let server = RedisServer::start(ServerAuth::app());
    let amb = Ambassador::start(&server, "").await;
    let mut c = amb.connect().await;
    let mut other = amb.connect().await;

    assert_eq!(c.cmd(&["SELECT", "3"]).await, ok());
    assert_eq!(c.cmd(&["SET", "k", "in-db-3"]).await, ok());
    assert_eq!(c.cmd(&["GET", "k"]).await, bulk(b"in-db-3"));
    assert_eq!(info_field(&client_info(&mut c).await, "db"), "3");

    // The other client is on db 0 and does not see the key.
    assert_eq!(info_field(&client_info(&mut other).await, "db"), "0");
    assert_eq!(other.cmd(&["EXISTS", "k"]).await, int(0));
    assert_eq!(other.cmd(&["DBSIZE"]).await, int(0));
    // ...until it selects db 3 itself.
    assert_eq!(other.cmd(&["SELECT", "3"]).await, ok());
    assert_eq!(other.cmd(&["GET", "k"]).await, bulk(b"in-db-3"));

    // A new connection starts on db 0 again.
    let mut fresh = amb.connect().await;
    assert_eq!(fresh.cmd(&["EXISTS", "k"]).await, int(0));
    // The first connection stays on db 3.
    assert_eq!(c.cmd(&["DBSIZE"]).await, int(1));
}

#[tokio::test]
async fn subscribe_psubscribe_ssubscribe_then_back_to_commands() {
    let server = RedisServer::start(ServerAuth::app());
    let amb = Ambassador::start(&server, "").await;
    let mut sub = amb.connect().await;
    let mut publisher = amb.connect().await;

    assert_eq!(
        sub.cmd(&["SUBSCRIBE", "ch1"]).await,
        arr(vec![bulk(b"subscribe"), bulk(b"ch1"), int(1)])
    );
    assert_eq!(
        sub.cmd(&["PSUBSCRIBE", "news.*"]).await,
        arr(vec![bulk(b"psubscribe"), bulk(b"news.*"), int(2)])
    );
    assert_eq!(
        sub.cmd(&["SSUBSCRIBE", "shard1"]).await,
        arr(vec![bulk(b"ssubscribe"), bulk(b"shard1"), int(1)])
    );

    assert_eq!(publisher.cmd(&["PUBLISH", "ch1", "hello"]).await, int(1));
    assert_eq!(
        sub.reply().await,
        arr(vec![bulk(b"message"), bulk(b"ch1"), bulk(b"hello")])
    );
    assert_eq!(
        publisher.cmd(&["PUBLISH", "news.sport", "goal"]).await,
        int(1)
    );
    assert_eq!(
        sub.reply().await,
        arr(vec![
            bulk(b"pmessage"),
            bulk(b"news.*"),
            bulk(b"news.sport"),
            bulk(b"goal")
        ])
    );
    assert_eq!(
        publisher.cmd(&["SPUBLISH", "shard1", "sharded"]).await,
        int(1)
    );
    assert_eq!(
        sub.reply().await,
        arr(vec![bulk(b"smessage"), bulk(b"shard1"), bulk(b"sharded")])
    );

    // Several messages in a burst arrive in order.
    for i in 0..100 {
        assert_eq!(
            publisher.cmd(&["PUBLISH", "ch1", &format!("m{i}")]).await,
            int(1)
        );
    }
    for i in 0..100 {
        assert_eq!(
            sub.reply().await,
            arr(vec![
                bulk(b"message"),
                bulk(b"ch1"),
                bulk(format!("m{i}").as_bytes())
            ])
        );
    }

    // PING in subscribed mode (RESP2) answers in the pub/sub shape.
    assert_eq!(
        sub.cmd(&["PING"]).await,
        arr(vec![bulk(b"pong"), bulk(b"")])
    );

    assert_eq!(
        sub.cmd(&["UNSUBSCRIBE", "ch1"]).await,
        arr(vec![bulk(b"unsubscribe"), bulk(b"ch1"), int(1)])
    );
    assert_eq!(publisher.cmd(&["PUBLISH", "ch1", "lost"]).await, int(0));
    assert_eq!(
        sub.cmd(&["PUNSUBSCRIBE", "news.*"]).await,
        arr(vec![bulk(b"punsubscribe"), bulk(b"news.*"), int(0)])
    );
    assert_eq!(
        sub.cmd(&["SUNSUBSCRIBE", "shard1"]).await,
        arr(vec![bulk(b"sunsubscribe"), bulk(b"shard1"), int(0)])
    );
    assert_eq!(publisher.cmd(&["SPUBLISH", "shard1", "lost"]).await, int(0));

    // Back to normal: PING answers +PONG and commands run.
    assert_eq!(sub.cmd(&["PING"]).await, simple("PONG"));
    assert_eq!(sub.cmd(&["SET", "after", "sub"]).await, ok());
    assert_eq!(sub.cmd(&["GET", "after"]).await, bulk(b"sub"));
    assert_eq!(sub.cmd(&["ECHO", "x"]).await, bulk(b"x"));
}

#[tokio::test]
async fn client_tracking_invalidation_push_resp3() {
    let server = RedisServer::start(ServerAuth::app());
    let amb = Ambassador::start(&server, "").await;
    let mut c = amb.connect().await;
    let mut other = amb.connect().await;

    let hello = c.cmd(&["HELLO", "3"]).await;
    assert!(matches!(hello, OwnedFrame::Map { .. }), "{hello:?}");
    assert_eq!(field(&hello, "proto"), int(3));
    assert_eq!(c.cmd(&["CLIENT", "TRACKING", "ON"]).await, ok());
    assert_eq!(other.cmd(&["SET", "k", "v1"]).await, ok());
    assert_eq!(c.cmd(&["GET", "k"]).await, bulk(b"v1"));

    // Another client changes the key: the push arrives on the tracking connection.
    assert_eq!(other.cmd(&["SET", "k", "v2"]).await, ok());
    assert_eq!(
        c.reply().await,
        push(vec![bulk(b"invalidate"), arr(vec![bulk(b"k")])])
    );
    // A normal command still gets its reply.
    assert_eq!(c.cmd(&["PING"]).await, simple("PONG"));

    // A push that arrives while the client is idle is followed by the reply to the next command.
    assert_eq!(c.cmd(&["GET", "k"]).await, bulk(b"v2"));
    assert_eq!(other.cmd(&["DEL", "k"]).await, int(1));
    c.send(&command(&["ECHO", "after-push"])).await;
    assert_eq!(
        c.reply().await,
        push(vec![bulk(b"invalidate"), arr(vec![bulk(b"k")])])
    );
    assert_eq!(c.reply().await, bulk(b"after-push"));

    // The tracking connection's own write also invalidates (no NOLOOP), push before reply
    // or after, as Redis orders it; exactly one of each.
    assert_eq!(c.cmd(&["SET", "k2", "a"]).await, ok());
    assert_eq!(c.cmd(&["GET", "k2"]).await, bulk(b"a"));
    c.send(&command(&["SET", "k2", "b"])).await;
    let first = c.reply().await;
    let second = c.reply().await;
    let invalidation = push(vec![bulk(b"invalidate"), arr(vec![bulk(b"k2")])]);
    assert!(
        (first == invalidation && second == ok()) || (first == ok() && second == invalidation),
        "got {first:?} then {second:?}"
    );
    assert_eq!(c.cmd(&["CLIENT", "TRACKING", "OFF"]).await, ok());
    assert_eq!(c.cmd(&["ECHO", "done"]).await, bulk(b"done"));
}

#[tokio::test]
async fn blpop_is_woken_by_rpush_from_another_client() {
    let server = RedisServer::start(ServerAuth::app());
    let amb = Ambassador::start(&server, "").await;
    let mut blocked = amb.connect().await;
    let mut pusher = amb.connect().await;

    blocked.send(&command(&["BLPOP", "list", "0"])).await;
    wait_blocked_clients(&server, 1).await;
    assert_eq!(pusher.cmd(&["RPUSH", "list", "a", "b"]).await, int(2));
    assert_eq!(blocked.reply().await, arr(vec![bulk(b"list"), bulk(b"a")]));
    assert_eq!(
        blocked.cmd(&["LRANGE", "list", "0", "-1"]).await,
        arr(vec![bulk(b"b")])
    );

    // A BLPOP that times out answers a RESP2 null array, then the connection works on.
    blocked.send(&command(&["BLPOP", "empty", "0.05"])).await;
    expect_raw(&mut blocked, b"*-1\r\n").await;
    assert_eq!(blocked.cmd(&["PING"]).await, simple("PONG"));

    // Commands pipelined behind a blocking one wait for it and keep their order.
    let mut batch = command(&["BLPOP", "list2", "0"]);
    batch.extend(command(&["ECHO", "behind"]));
    blocked.send(&batch).await;
    wait_blocked_clients(&server, 1).await;
    assert_eq!(pusher.cmd(&["LPUSH", "list2", "x"]).await, int(1));
    assert_eq!(blocked.reply().await, arr(vec![bulk(b"list2"), bulk(b"x")]));
    assert_eq!(blocked.reply().await, bulk(b"behind"));
}

#[tokio::test]
async fn monitor_sees_other_clients_but_never_the_password() {
    let server = RedisServer::start(ServerAuth::app());
    let amb = Ambassador::start(&server, "").await;
    let mut monitor = amb.connect().await;
    assert_eq!(monitor.cmd(&["MONITOR"]).await, ok());

    // A new client: the ambassador authenticates its upstream connection, then the client
    // runs AUTH and HELLO AUTH with the real password and with made-up ones.
    let mut c = amb.connect().await;
    let addr = info_field(&client_info(&mut c).await, "addr");
    assert_eq!(c.cmd(&["AUTH", USER, PASSWORD]).await, ok());
    assert_eq!(c.cmd(&["AUTH", PASSWORD]).await, ok());
    assert_eq!(c.cmd(&["AUTH", "someone", "client-made-up"]).await, ok());
    let hello = c.cmd(&["HELLO", "3", "AUTH", USER, PASSWORD]).await;
    assert_eq!(field(&hello, "proto"), int(3));
    assert_eq!(
        c.cmd(&["SET", "monitored-key", "monitored-value"]).await,
        ok()
    );
    // A direct client is seen too.
    let mut direct = server.direct().await;
    assert_eq!(direct.cmd(&["SET", "direct-key", "x"]).await, ok());
    assert_eq!(c.cmd(&["PING", "end-marker"]).await, bulk(b"end-marker"));

    let seen = monitor_until(&mut monitor, "\"end-marker\"").await;
    let all = seen.join("\n");
    assert!(
        !all.contains(PASSWORD),
        "password in MONITOR output:\n{all}"
    );
    assert!(
        !all.contains("client-made-up"),
        "client password in MONITOR:\n{all}"
    );
    assert!(all.contains("\"SET\" \"direct-key\" \"x\""), "{all}");

    // Exactly what the client's upstream connection carried, in order: the ambassador's own
    // AUTH, then the client's commands, nothing else.
    let on_c: Vec<&str> = seen
        .iter()
        .filter(|l| l.contains(&format!(" {addr}]")))
        .map(|l| l.split_once("] ").map(|(_, cmd)| cmd).unwrap_or(l))
        .collect();
    assert_eq!(
        on_c,
        vec![
            "\"AUTH\" \"(redacted)\" \"(redacted)\"",
            "\"CLIENT\" \"INFO\"",
            "\"AUTH\" \"(redacted)\" \"(redacted)\"",
            "\"AUTH\" \"(redacted)\" \"(redacted)\"",
            "\"AUTH\" \"(redacted)\" \"(redacted)\"",
            "\"HELLO\" \"3\" \"AUTH\" \"(redacted)\" \"(redacted)\"",
            "\"SET\" \"monitored-key\" \"monitored-value\"",
            "\"PING\" \"end-marker\"",
        ],
        "MONITOR lines of {addr}:\n{all}"
    );
    assert_eq!(c.cmd(&["ACL", "WHOAMI"]).await, bulk(USER.as_bytes()));
}

#[tokio::test]
async fn client_reply_off_on_and_skip() {
    let server = RedisServer::start(ServerAuth::app());
    let amb = Ambassador::start(&server, "").await;
    let mut c = amb.connect().await;

    // One command per write. Suppressed replies would show up as :1 before +OK.
    c.send(&command(&["CLIENT", "REPLY", "OFF"])).await;
    c.send(&command(&["INCR", "n"])).await;
    c.send(&command(&["INCR", "n"])).await;
    assert_eq!(c.cmd(&["CLIENT", "REPLY", "ON"]).await, ok());
    assert_eq!(c.cmd(&["INCR", "n"]).await, int(3));

    // SKIP suppresses exactly the next reply.
    c.send(&command(&["CLIENT", "REPLY", "SKIP"])).await;
    c.send(&command(&["INCR", "n"])).await;
    assert_eq!(c.cmd(&["INCR", "n"]).await, int(5));
    assert_eq!(c.cmd(&["INCR", "n"]).await, int(6));

    // The same, pipelined in one write.
    let mut batch = Vec::new();
    for args in [
        &["CLIENT", "REPLY", "OFF"][..],
        &["INCR", "n"],
        &["ECHO", "hidden"],
        &["CLIENT", "REPLY", "ON"],
        &["INCR", "n"],
        &["CLIENT", "REPLY", "SKIP"],
        &["ECHO", "skipped"],
        &["ECHO", "shown"],
        &["INCR", "n"],
    ] {
        batch.extend(command(args));
    }
    c.send(&batch).await;
    assert_eq!(c.reply().await, ok());
    assert_eq!(c.reply().await, int(8));
    assert_eq!(c.reply().await, bulk(b"shown"));
    assert_eq!(c.reply().await, int(9));
    assert_eq!(c.cmd(&["GET", "n"]).await, bulk(b"9"));
    assert_eq!(c.cmd(&["PING"]).await, simple("PONG"));
}

#[tokio::test]
async fn a_line_redis_ignores_uses_up_client_reply_skip_as_redis_does() {
    let server = RedisServer::start(ServerAuth::app());
    let amb = Ambassador::with_client_password(&server).await;
    // An empty line, `*0` and `*-1` each reset the client in Redis as a command would: the
    // SKIP is spent on them and the PING after is answered. The wrong downstream password's
    // WRONGPASS, which the ambassador answers itself in its place, shows whether the
    // ambassador counted that reply.
    for ignored in [&b"\r\n"[..], b"*0\r\n", b"*-1\r\n"] {
        let mut c = amb.connect().await;
        assert_eq!(c.cmd(&["AUTH", CLIENT_PASSWORD]).await, ok());
        let mut batch = command(&["CLIENT", "REPLY", "SKIP"]);
        batch.extend_from_slice(ignored);
        batch.extend(command(&["PING", "a"]));
        batch.extend(command(&["AUTH", "wrong"]));
        batch.extend(command(&["PING", "b"]));
        c.send(&batch).await;
        let got = [c.reply().await, c.reply().await, c.reply().await];
        assert_eq!(got[0], bulk(b"a"), "after {ignored:?}: {got:?}");
        assert!(
            matches!(&got[1], OwnedFrame::SimpleError { data, .. } if data.starts_with("WRONGPASS")),
            "after {ignored:?}: {got:?}"
        );
        assert_eq!(got[2], bulk(b"b"), "after {ignored:?}: {got:?}");

        // Redis itself, for the record.
        let mut direct = server.direct().await;
        let mut batch = command(&["CLIENT", "REPLY", "SKIP"]);
        batch.extend_from_slice(ignored);
        batch.extend(command(&["PING", "a"]));
        direct.send(&batch).await;
        assert_eq!(
            direct.reply().await,
            bulk(b"a"),
            "direct, after {ignored:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn value_of_64_mib_round_trips_intact() {
    let server = RedisServer::start(ServerAuth::app());
    let amb = Ambassador::start(&server, "").await;
    let mut c = amb.connect().await;

    const LEN: usize = 64 * 1024 * 1024;
    // Every byte value occurs, CRLF included, and no two MiB are alike.
    let value: Vec<u8> = (0..LEN)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).rotate_right(13) as u8 ^ (i >> 20) as u8)
        .collect();
    c.send(&command_bytes(&[b"SET", b"big", &value])).await;
    assert_eq!(c.reply().await, ok());
    // The server holds exactly the value.
    let mut direct = server.direct().await;
    assert_eq!(direct.cmd(&["STRLEN", "big"]).await, int(LEN as i64));
    let tail_start = LEN - 1000;
    assert_eq!(
        direct
            .cmd(&["GETRANGE", "big", &tail_start.to_string(), "-1"])
            .await,
        bulk(&value[tail_start..])
    );

    c.send(&command(&["GET", "big"])).await;
    let header = format!("${LEN}\r\n");
    expect_raw(&mut c, header.as_bytes()).await;
    let got = c.read_bytes(LEN + 2).await;
    assert_eq!(&got[LEN..], b"\r\n");
    if got[..LEN] != value[..] {
        let at = got.iter().zip(&value).position(|(a, b)| a != b);
        panic!("value differs from byte {at:?} on");
    }
    // The connection is still in step.
    assert_eq!(c.cmd(&["STRLEN", "big"]).await, int(LEN as i64));
    assert_eq!(c.cmd(&["PING"]).await, simple("PONG"));
}

#[tokio::test]
async fn client_auth_pipelined_gets_ok_in_its_place() {
    let server = RedisServer::start(ServerAuth::app());
    let amb = Ambassador::start(&server, "").await;
    let mut c = amb.connect().await;

    let mut batch = Vec::new();
    for args in [
        &["SET", "a", "1"][..],
        &["AUTH", "whoever", "wrong-password"],
        &["INCR", "a"],
        &["AUTH", "only-a-password"],
        &["GET", "a"],
        &["AUTH", USER, PASSWORD],
        &["ACL", "WHOAMI"],
    ] {
        batch.extend(command(args));
    }
    c.send(&batch).await;
    assert_eq!(c.reply().await, ok());
    assert_eq!(c.reply().await, ok());
    assert_eq!(c.reply().await, int(2));
    assert_eq!(c.reply().await, ok());
    assert_eq!(c.reply().await, bulk(b"2"));
    assert_eq!(c.reply().await, ok());
    assert_eq!(c.reply().await, bulk(USER.as_bytes()));

    // HELLO with AUTH in a pipeline: the server's HELLO reply, still the profile user.
    let mut batch = command(&["HELLO", "3", "AUTH", "whoever", "nope", "SETNAME", "named"]);
    batch.extend(command(&["CLIENT", "GETNAME"]));
    batch.extend(command(&["ACL", "WHOAMI"]));
    batch.extend(command(&["AUTH", "x"]));
    batch.extend(command(&["HELLO", "2"]));
    batch.extend(command(&["ACL", "WHOAMI"]));
    c.send(&batch).await;
    let hello = c.reply().await;
    assert_eq!(field(&hello, "proto"), int(3));
    assert_eq!(c.reply().await, bulk(b"named"));
    assert_eq!(c.reply().await, bulk(USER.as_bytes()));
    assert_eq!(c.reply().await, ok());
    let hello = c.reply().await;
    assert!(matches!(hello, OwnedFrame::Array { .. }), "{hello:?}");
    assert_eq!(field(&hello, "proto"), int(2));
    assert_eq!(c.reply().await, bulk(USER.as_bytes()));
}

#[tokio::test]
async fn reset_after_select_and_subscribe() {
    let server = RedisServer::start(ServerAuth::app());
    let amb = Ambassador::start(&server, "").await;
    let mut c = amb.connect().await;
    let mut other = amb.connect().await;

    assert_eq!(c.cmd(&["SELECT", "5"]).await, ok());
    assert_eq!(c.cmd(&["SET", "k", "in-db-5"]).await, ok());
    assert_eq!(c.cmd(&["CLIENT", "SETNAME", "before-reset"]).await, ok());
    assert_eq!(
        c.cmd(&["SUBSCRIBE", "ch"]).await,
        arr(vec![bulk(b"subscribe"), bulk(b"ch"), int(1)])
    );
    assert_eq!(other.cmd(&["PUBLISH", "ch", "m"]).await, int(1));
    assert_eq!(
        c.reply().await,
        arr(vec![bulk(b"message"), bulk(b"ch"), bulk(b"m")])
    );
    assert_eq!(c.cmd(&["RESET"]).await, simple("RESET"));
    // The next reply is the next command's: the re-authentication stays invisible.
    assert_eq!(c.cmd(&["ACL", "WHOAMI"]).await, bulk(USER.as_bytes()));
    let info = client_info(&mut c).await;
    assert_eq!(info_field(&info, "db"), "0", "{info}");
    assert_eq!(info_field(&info, "sub"), "0", "{info}");
    assert_eq!(info_field(&info, "user"), USER, "{info}");
    assert_eq!(c.cmd(&["EXISTS", "k"]).await, int(0));
    assert_eq!(other.cmd(&["PUBLISH", "ch", "m"]).await, int(0));
    c.send(&command(&["CLIENT", "GETNAME"])).await;
    expect_raw(&mut c, b"$-1\r\n").await;
    assert_eq!(c.cmd(&["PING"]).await, simple("PONG"));

    // The same in one write, from RESP3 with a name, a db and a pattern subscription.
    let mut d = amb.connect().await;
    let mut batch = Vec::new();
    for args in [
        &["HELLO", "3", "SETNAME", "n"][..],
        &["SELECT", "5"],
        &["PSUBSCRIBE", "p*"],
        &["RESET"],
        &["ACL", "WHOAMI"],
        &["EXISTS", "k"],
        &["CLIENT", "INFO"],
    ] {
        batch.extend(command(args));
    }
    d.send(&batch).await;
    assert_eq!(field(&d.reply().await, "proto"), int(3));
    assert_eq!(d.reply().await, ok());
    assert_eq!(
        d.reply().await,
        push(vec![bulk(b"psubscribe"), bulk(b"p*"), int(1)])
    );
    assert_eq!(d.reply().await, simple("RESET"));
    assert_eq!(d.reply().await, bulk(USER.as_bytes()));
    assert_eq!(d.reply().await, int(0));
    let info = text(&d.reply().await);
    assert_eq!(info_field(&info, "db"), "0", "{info}");
    assert_eq!(info_field(&info, "psub"), "0", "{info}");
    assert_eq!(info_field(&info, "resp"), "2", "{info}");
    assert_eq!(info_field(&info, "name"), "", "{info}");
    assert_eq!(info_field(&info, "user"), USER, "{info}");
    assert_eq!(other.cmd(&["PUBLISH", "pq", "m"]).await, int(0));
    assert_eq!(d.cmd(&["PING"]).await, simple("PONG"));
}

#[tokio::test]
async fn resp3_pubsub_pushes_interleave_with_replies() {
    let server = RedisServer::start(ServerAuth::app());
    let amb = Ambassador::start(&server, "").await;
    let mut c = amb.connect().await;
    let mut publisher = amb.connect().await;

    assert_eq!(field(&c.cmd(&["HELLO", "3"]).await, "proto"), int(3));
    assert_eq!(
        c.cmd(&["SUBSCRIBE", "ch"]).await,
        push(vec![bulk(b"subscribe"), bulk(b"ch"), int(1)])
    );
    // RESP3 allows ordinary commands while subscribed.
    assert_eq!(c.cmd(&["SET", "k", "v"]).await, ok());
    assert_eq!(publisher.cmd(&["PUBLISH", "ch", "m1"]).await, int(1));
    c.send(&command(&["GET", "k"])).await;
    assert_eq!(
        c.reply().await,
        push(vec![bulk(b"message"), bulk(b"ch"), bulk(b"m1")])
    );
    assert_eq!(c.reply().await, bulk(b"v"));

    // A client AUTH pipelined among subscribed-mode commands still gets +OK in its place.
    let mut batch = command(&["PING"]);
    batch.extend(command(&["AUTH", "whoever", "wrong"]));
    batch.extend(command(&["ACL", "WHOAMI"]));
    batch.extend(command(&["UNSUBSCRIBE", "ch"]));
    batch.extend(command(&["ECHO", "after"]));
    c.send(&batch).await;
    assert_eq!(c.reply().await, simple("PONG"));
    assert_eq!(c.reply().await, ok());
    assert_eq!(c.reply().await, bulk(USER.as_bytes()));
    assert_eq!(
        c.reply().await,
        push(vec![bulk(b"unsubscribe"), bulk(b"ch"), int(0)])
    );
    assert_eq!(c.reply().await, bulk(b"after"));
    assert_eq!(publisher.cmd(&["PUBLISH", "ch", "lost"]).await, int(0));
    assert_eq!(c.cmd(&["PING"]).await, simple("PONG"));
}
