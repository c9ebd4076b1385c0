//! A client can never run a command as any user but the profile's, whatever AUTH it tries;
//! and with a downstream password, nothing a client sends reaches Redis before it
//! authenticated. The server has three users who could answer an AUTH: `app` (the
//! profile's, without @admin), `admin` (everything) and `default` (everything), the last two
//! with passwords the attacking client knows.

mod common;

use common::*;
use redis_protocol::resp3::types::OwnedFrame;

const ADMIN: &str = "admin";
const ADMIN_PW: &str = "admin-secret-91c2";
const DEFAULT_PW: &str = "default-secret-44";

/// A server where `admin` and `default` hold real passwords, and `app` may not run @admin
/// commands (CONFIG, CLIENT LIST, MONITOR, ACL SETUSER).
async fn server_with_two_users() -> RedisServer {
    let server = RedisServer::start(ServerAuth::app());
    let mut d = server.direct().await;
    for setuser in [
        vec![
            "ACL",
            "SETUSER",
            ADMIN,
            "on",
            &format!(">{ADMIN_PW}"),
            "~*",
            "&*",
            "+@all",
        ],
        vec![
            "ACL",
            "SETUSER",
            "default",
            "on",
            &format!(">{DEFAULT_PW}"),
            "~*",
            "&*",
            "+@all",
        ],
        vec!["ACL", "SETUSER", USER, "-@admin"],
    ] {
        let args: Vec<&str> = setuser.iter().map(|s| s.as_ref()).collect();
        assert_eq!(d.cmd(&args).await, simple("OK"));
    }
    server
}

/// A direct connection authenticated as `admin`.
async fn as_admin(server: &RedisServer) -> Raw {
    let mut a = Raw::connect(&server.addr()).await;
    assert_eq!(a.cmd(&["AUTH", ADMIN, ADMIN_PW]).await, simple("OK"));
    a
}

/// Proves the connection still runs as `app`: ACL WHOAMI, and a command only admin may run.
async fn still_app(c: &mut Raw, after: &str) {
    assert_eq!(
        c.cmd(&["ACL", "WHOAMI"]).await,
        bulk(USER.as_bytes()),
        "after {after}"
    );
    let refused = error_text(&c.cmd(&["CONFIG", "GET", "maxmemory"]).await);
    assert!(refused.starts_with("NOPERM"), "after {after}: {refused}");
}

fn is_ok(f: &OwnedFrame) -> bool {
    *f == simple("OK")
}

#[tokio::test]
async fn no_auth_ever_changes_the_user() {
    let server = server_with_two_users().await;
    let mut admin = as_admin(&server).await;
    assert_eq!(
        admin.cmd(&["CONFIG", "GET", "maxmemory"]).await,
        OwnedFrame::Array {
            data: vec![bulk(b"maxmemory"), bulk(b"0")],
            attributes: None
        },
        "admin may do what app may not"
    );
    let amb = Ambassador::start(&server, "").await;
    let mut c = amb.connect().await;
    still_app(&mut c, "connecting").await;

    for args in [
        vec!["AUTH", ADMIN, ADMIN_PW],
        vec!["AUTH", ADMIN_PW],
        vec!["AUTH", DEFAULT_PW],
        vec!["AUTH", "default", DEFAULT_PW],
        vec!["auth", ADMIN, ADMIN_PW],
        vec!["AuTh", ADMIN, ADMIN_PW],
    ] {
        assert!(is_ok(&c.cmd(&args).await), "{args:?}");
        still_app(&mut c, &args.join(" ")).await;
    }

    // Inline, plain and quoted.
    for line in [
        format!("AUTH {ADMIN} {ADMIN_PW}\r\n"),
        format!("auth \"{ADMIN}\" '{ADMIN_PW}'\r\n"),
        format!("AUTH {DEFAULT_PW}\n"),
    ] {
        c.send(line.as_bytes()).await;
        assert!(is_ok(&c.reply().await), "{line:?}");
        still_app(&mut c, &format!("inline {line:?}")).await;
    }

    // HELLO with AUTH, both protocol versions, any case, with SETNAME, twice over.
    for args in [
        vec!["HELLO", "3", "AUTH", ADMIN, ADMIN_PW],
        vec!["hello", "3", "auth", "default", DEFAULT_PW],
        vec!["HELLO", "2", "AUTH", ADMIN, ADMIN_PW, "SETNAME", "x"],
        vec!["HELLO", "3", "AUTH", "x", "y", "AUTH", ADMIN, ADMIN_PW],
    ] {
        let reply = c.cmd(&args).await;
        assert!(
            matches!(
                reply,
                OwnedFrame::Map { .. } | OwnedFrame::Array { .. } | OwnedFrame::SimpleError { .. }
            ),
            "{args:?}: {reply:?}"
        );
        still_app(&mut c, &args.join(" ")).await;
    }
    assert!(matches!(
        c.cmd(&["HELLO", "2"]).await,
        OwnedFrame::Array { .. }
    ));

    // RESET, alone and with AUTH pipelined around it.
    assert!(is_ok(&c.cmd(&["AUTH", ADMIN, ADMIN_PW]).await));
    assert_eq!(c.cmd(&["RESET"]).await, simple("RESET"));
    still_app(&mut c, "RESET").await;
    let mut batch = command(&["AUTH", ADMIN, ADMIN_PW]);
    batch.extend(command(&["RESET"]));
    batch.extend(command(&["AUTH", ADMIN, ADMIN_PW]));
    batch.extend(command(&["ACL", "WHOAMI"]));
    c.send(&batch).await;
    assert!(is_ok(&c.reply().await));
    assert_eq!(c.reply().await, simple("RESET"));
    assert!(is_ok(&c.reply().await));
    assert_eq!(
        c.reply().await,
        bulk(USER.as_bytes()),
        "pipelined after RESET"
    );
    still_app(&mut c, "pipelined RESET").await;

    // Inside MULTI: queued in Redis's place, and EXEC runs as app.
    assert!(is_ok(&c.cmd(&["MULTI"]).await));
    let queued = c.cmd(&["AUTH", ADMIN, ADMIN_PW]).await;
    assert!(
        queued == simple("OK") || queued == simple("QUEUED"),
        "{queued:?}"
    );
    assert_eq!(c.cmd(&["ACL", "WHOAMI"]).await, simple("QUEUED"));
    let exec = c.cmd(&["EXEC"]).await;
    let OwnedFrame::Array { data, .. } = &exec else {
        panic!("EXEC: {exec:?}");
    };
    assert!(
        data.contains(&bulk(USER.as_bytes())),
        "EXEC ran as app: {exec:?}"
    );
    assert!(!data.contains(&bulk(ADMIN.as_bytes())), "{exec:?}");
    still_app(&mut c, "MULTI/EXEC").await;

    // Pipelined among other commands, inline and multibulk, in one write.
    let mut batch = command(&["SET", "x", "1"]);
    batch.extend(command(&["AUTH", ADMIN, ADMIN_PW]));
    batch.extend(command(&["ACL", "WHOAMI"]));
    batch.extend(format!("AUTH {ADMIN} {ADMIN_PW}\r\n").as_bytes());
    batch.extend(command(&["CONFIG", "GET", "maxmemory"]));
    batch.extend(command(&["ACL", "WHOAMI"]));
    c.send(&batch).await;
    assert!(is_ok(&c.reply().await));
    assert!(is_ok(&c.reply().await));
    assert_eq!(c.reply().await, bulk(USER.as_bytes()));
    assert!(is_ok(&c.reply().await));
    assert!(error_text(&c.reply().await).starts_with("NOPERM"));
    assert_eq!(c.reply().await, bulk(USER.as_bytes()));

    // Split across writes, mid-argument.
    let auth = command(&["AUTH", ADMIN, ADMIN_PW]);
    let (a, b) = auth.split_at(17);
    c.send(a).await;
    c.send(b).await;
    assert!(is_ok(&c.reply().await));
    still_app(&mut c, "AUTH split across writes").await;

    // Behind a streamed value, and behind the two unchecked bytes Redis skips after a payload.
    let mut batch = command(&["SET", "big", &"v".repeat(200_000)]);
    batch.extend(command(&["AUTH", ADMIN, ADMIN_PW]));
    batch.extend(b"*1\r\n$4\r\nPINGxx");
    batch.extend(command(&["AUTH", ADMIN, ADMIN_PW]));
    batch.extend(command(&["ACL", "WHOAMI"]));
    c.send(&batch).await;
    assert!(is_ok(&c.reply().await));
    assert!(is_ok(&c.reply().await));
    assert_eq!(c.reply().await, simple("PONG"));
    assert!(is_ok(&c.reply().await));
    assert_eq!(c.reply().await, bulk(USER.as_bytes()));

    // Scripts cannot AUTH either.
    let script = c
        .cmd(&[
            "EVAL",
            &format!("return redis.call('AUTH', '{ADMIN}', '{ADMIN_PW}')"),
            "0",
        ])
        .await;
    assert!(
        matches!(script, OwnedFrame::SimpleError { .. }),
        "{script:?}"
    );
    still_app(&mut c, "EVAL AUTH").await;

    // In subscribe mode, where replies are not counted.
    let mut sub = amb.connect().await;
    assert!(matches!(
        sub.cmd(&["SUBSCRIBE", "ch"]).await,
        OwnedFrame::Array { .. }
    ));
    let mut batch = command(&["AUTH", ADMIN, ADMIN_PW]);
    batch.extend(command(&["RESET"]));
    batch.extend(command(&["ACL", "WHOAMI"]));
    sub.send(&batch).await;
    let mut before_reset = Vec::new();
    loop {
        let f = sub.reply().await;
        if f == simple("RESET") {
            break;
        }
        before_reset.push(f);
        assert!(
            before_reset.len() <= 1,
            "one answer to AUTH: {before_reset:?}"
        );
    }
    assert_eq!(sub.reply().await, bulk(USER.as_bytes()), "{before_reset:?}");
    still_app(&mut sub, "AUTH while subscribed").await;

    // Redis's own view: no connection of the ambassador's runs as admin or default, and
    // both sessions' own connections (found by their ids, whatever else the probe has open)
    // run as app.
    let mut ids = Vec::new();
    for session in [&mut c, &mut sub] {
        let OwnedFrame::Number { data: id, .. } = session.cmd(&["CLIENT", "ID"]).await else {
            panic!("CLIENT ID answers a number");
        };
        ids.push(id);
    }
    let OwnedFrame::BlobString { data, .. } = admin.cmd(&["CLIENT", "LIST"]).await else {
        panic!("CLIENT LIST");
    };
    let list = String::from_utf8_lossy(&data).into_owned();
    let users: Vec<&str> = list
        .lines()
        .filter_map(|l| l.split(' ').find_map(|f| f.strip_prefix("user=")))
        .collect();
    assert_eq!(
        users.iter().filter(|u| **u == ADMIN).count(),
        1,
        "only the observer is admin: {list}"
    );
    assert!(!users.contains(&"default"), "{list}");
    for id in ids {
        let line = list
            .lines()
            .find(|l| l.starts_with(&format!("id={id} ")))
            .unwrap_or_else(|| panic!("no client {id}: {list}"));
        assert!(line.contains(&format!(" user={USER} ")), "{line}");
    }
}

/// Redis's limits before authentication (CVE-2021-32675) hold from a client's first byte:
/// the error comes at the length line, without the client having to send the value.
#[tokio::test]
async fn unauthenticated_limits_apply_from_the_first_command() {
    let server = RedisServer::start(ServerAuth::app());
    let amb = Ambassador::with_client_password(&server).await;
    for (first, error) in [
        (
            &b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$20000\r\n"[..],
            "-ERR Protocol error: unauthenticated bulk length\r\n",
        ),
        (
            b"*20\r\n",
            "-ERR Protocol error: unauthenticated multibulk length\r\n",
        ),
    ] {
        let mut c = amb.connect().await;
        c.send(first).await;
        let got =
            tokio::time::timeout(std::time::Duration::from_secs(3), c.read_bytes(error.len()))
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "sent {:?} as the first command before AUTH: no {error:?} within 3s \
                     (Redis answers at once)",
                        String::from_utf8_lossy(first)
                    )
                });
        assert_eq!(String::from_utf8_lossy(&got), error);
    }
}

/// What [`nothing_reaches_the_upstream_before_the_client_authenticated`] checks with MONITOR,
/// byte for byte: MONITOR shows only commands Redis parsed and ran, so bytes forwarded in part
/// (a header without its value, half a frame) would not show there. A stand-in upstream that
/// records every byte says that each connection carried the ambassador's AUTH and, after the
/// client's own AUTH, the client's command, and nothing else.
#[tokio::test]
async fn not_a_byte_reaches_the_upstream_before_the_client_authenticated() {
    let fake = FakeUpstream::start().await;
    let amb = Ambassador::with_client_password_at(&fake.addr).await;

    // Commands, inline and multibulk, wrong passwords, HELLO, MULTI.
    let mut a = amb.connect().await;
    let mut batch = command(&["SET", "leak:a", "v"]);
    batch.extend(b"PING leak:b\r\n");
    batch.extend(command(&["AUTH", "leak:wrong"]));
    batch.extend(command(&["AUTH", ADMIN, ADMIN_PW]));
    batch.extend(command(&["HELLO", "3", "AUTH", "default", DEFAULT_PW]));
    batch.extend(command(&["MULTI"]));
    batch.extend(command(&["ECHO", "leak:c"]));
    a.send(&batch).await;
    for _ in 0..7 {
        let reply = error_text(&a.reply().await);
        assert!(
            reply.starts_with("NOAUTH") || reply.starts_with("WRONGPASS"),
            "{reply}"
        );
    }
    // A value's header and part of it, then a close.
    let mut b = amb.connect().await;
    b.send(b"*3\r\n$3\r\nSET\r\n$6\r\nleak:d\r\n$1000\r\nxxxx")
        .await;
    // A value too long before AUTH: refused at its length line.
    let mut c = amb.connect().await;
    c.send(&command(&["PING"])).await;
    c.send(b"*3\r\n$3\r\nSET\r\n$6\r\nleak:e\r\n$20000\r\n")
        .await;
    c.send(&[b'x'; 20_000]).await;
    assert_eq!(
        String::from_utf8_lossy(&c.read_to_close().await),
        "-NOAUTH Authentication required.\r\n-ERR Protocol error: unauthenticated bulk length\r\n",
    );
    // Half an inline command.
    let mut d = amb.connect().await;
    d.send(b"SET leak:f").await;
    // Pipelined: the command before AUTH stays behind, the one after goes through.
    let mut e = amb.connect().await;
    let mut batch = command(&["ECHO", "leak:g"]);
    batch.extend(command(&["AUTH", CLIENT_PASSWORD]));
    batch.extend(command(&["ECHO", "after-auth"]));
    e.send(&batch).await;
    assert!(error_text(&e.reply().await).starts_with("NOAUTH"));
    assert!(is_ok(&e.reply().await));
    assert_eq!(e.reply().await, bulk(b"after-auth"));

    // Every connection but the authenticated one closed: what they carried is final.
    drop((a, b, d));
    wait_until(
        "five sessions upstream, every unauthenticated one closed",
        DEADLINE,
        || async { fake.received().len() == 5 && fake.closed() + 1 == fake.connections() },
    )
    .await;
    let handshake = ServerAuth::app().auth_command();
    let mut authenticated = handshake.clone();
    authenticated.extend(command(&["ECHO", "after-auth"]));
    let received = fake.received();
    let shown: Vec<String> = received
        .iter()
        .map(|r| String::from_utf8_lossy(r).into_owned())
        .collect();
    assert!(
        received
            .iter()
            .all(|r| *r == handshake || *r == authenticated),
        "the upstream received more than the ambassador's AUTH: {shown:#?}"
    );
    assert_eq!(
        received.iter().filter(|r| **r == authenticated).count(),
        1,
        "{shown:#?}"
    );
}

#[tokio::test]
async fn nothing_reaches_the_upstream_before_the_client_authenticated() {
    let server = server_with_two_users().await;
    let mut monitor = as_admin(&server).await;
    assert!(is_ok(&monitor.cmd(&["MONITOR"]).await));
    let amb = Ambassador::with_client_password(&server).await;

    // Commands, inline and multibulk, wrong passwords, HELLO: all answered locally.
    let mut a = amb.connect().await;
    let mut batch = command(&["SET", "leak:a", "v"]);
    batch.extend(b"PING leak:b\r\n");
    batch.extend(command(&["AUTH", "leak:wrong"]));
    batch.extend(command(&["AUTH", ADMIN, ADMIN_PW]));
    batch.extend(command(&["HELLO", "3", "AUTH", "default", DEFAULT_PW]));
    batch.extend(command(&["MULTI"]));
    batch.extend(command(&["ECHO", "leak:c"]));
    a.send(&batch).await;
    assert!(error_text(&a.reply().await).starts_with("NOAUTH"));
    assert!(error_text(&a.reply().await).starts_with("NOAUTH"));
    for _ in 0..3 {
        assert!(error_text(&a.reply().await).starts_with("WRONGPASS"));
    }
    assert!(error_text(&a.reply().await).starts_with("NOAUTH"));
    assert!(error_text(&a.reply().await).starts_with("NOAUTH"));
    drop(a);

    // A long value and many arguments, after a first command (see
    // `unauthenticated_limits_apply_from_the_first_command` for them as the first).
    let mut b = amb.connect().await;
    b.send(&command(&["PING"])).await;
    b.send(b"*3\r\n$3\r\nSET\r\n$6\r\nleak:d\r\n$20000\r\n")
        .await;
    b.send(&[b'x'; 20_000]).await;
    let got = b.read_to_close().await;
    assert_eq!(
        String::from_utf8_lossy(&got),
        "-NOAUTH Authentication required.\r\n-ERR Protocol error: unauthenticated bulk length\r\n",
    );
    let mut c = amb.connect().await;
    let mut many = command(&["PING"]);
    many.extend(b"*20\r\n");
    for _ in 0..20 {
        many.extend(b"$6\r\nleak:e\r\n");
    }
    c.send(&many).await;
    let got = c.read_to_close().await;
    assert_eq!(
        String::from_utf8_lossy(&got),
        "-NOAUTH Authentication required.\r\n-ERR Protocol error: unauthenticated multibulk length\r\n",
    );
    // As a first command, whole: whatever the answer, not a byte of it upstream.
    let mut g = amb.connect().await;
    g.send(&command(&["SET", "leak:g", &"x".repeat(20_000)]))
        .await;
    let reply = error_text(&g.reply().await);
    assert!(
        reply.starts_with("NOAUTH") || reply.starts_with("ERR Protocol error"),
        "{reply}"
    );

    // Pipelined: the command before AUTH stays behind, the one after goes through.
    let mut d = amb.connect().await;
    let mut batch = command(&["ECHO", "leak:f"]);
    batch.extend(command(&["AUTH", CLIENT_PASSWORD]));
    batch.extend(command(&["ECHO", "marker-after-auth"]));
    d.send(&batch).await;
    assert!(error_text(&d.reply().await).starts_with("NOAUTH"));
    assert!(is_ok(&d.reply().await));
    assert_eq!(d.reply().await, bulk(b"marker-after-auth"));
    still_app(&mut d, "the downstream AUTH").await;

    // MONITOR shows commands in the order Redis ran them: everything before the marker.
    let seen = monitor_until(&mut monitor, "marker-after-auth").await;
    let leaked: Vec<&String> = seen.iter().filter(|l| l.contains("leak")).collect();
    assert!(leaked.is_empty(), "reached Redis before AUTH: {leaked:#?}");
    assert!(
        seen.iter()
            .all(|l| !l.contains("HELLO") && !l.contains("MULTI")),
        "{seen:#?}"
    );
}
