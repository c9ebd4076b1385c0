//! DESIGN section 4, row by row, against real redis-servers.

mod common;

use common::*;
use redis_protocol::resp3::types::OwnedFrame;

#[tokio::test]
async fn client_sees_the_profile_user_without_credentials() {
    let server = RedisServer::start(ServerAuth::app());
    let amb = Ambassador::start(&server, "").await;
    let mut c = amb.connect().await;
    assert_eq!(c.cmd(&["ACL", "WHOAMI"]).await, bulk(USER.as_bytes()));
    assert_eq!(c.cmd(&["SET", "k", "v"]).await, simple("OK"));
    assert_eq!(c.cmd(&["GET", "k"]).await, bulk(b"v"));
}

#[tokio::test]
async fn pipelined_auth_is_answered_ok_in_its_place() {
    let server = RedisServer::start(ServerAuth::app());
    let amb = Ambassador::start(&server, "").await;
    let mut c = amb.connect().await;
    let mut batch = command(&["SET", "a", "1"]);
    batch.extend(command(&["AUTH", "intruder", "wrong"]));
    batch.extend(command(&["GET", "a"]));
    batch.extend(b"AUTH also-wrong\r\n");
    batch.extend(command(&["ACL", "WHOAMI"]));
    c.send(&batch).await;
    assert_eq!(c.reply().await, simple("OK"));
    assert_eq!(
        c.reply().await,
        simple("OK"),
        "AUTH answered +OK in its place"
    );
    assert_eq!(c.reply().await, bulk(b"1"));
    assert_eq!(c.reply().await, simple("OK"), "inline AUTH too");
    assert_eq!(
        c.reply().await,
        bulk(USER.as_bytes()),
        "still the profile's user"
    );
}

#[tokio::test]
async fn legacy_requirepass_server_gets_auth_with_password_only() {
    let server = RedisServer::start(ServerAuth::RequirePass("legacy-pass-93".into()));
    let amb = Ambassador::start(&server, "").await;
    let mut c = amb.connect().await;
    assert_eq!(c.cmd(&["ACL", "WHOAMI"]).await, bulk(b"default"));
    assert_eq!(c.cmd(&["AUTH", "x"]).await, simple("OK"));
    assert_eq!(c.cmd(&["PING"]).await, simple("PONG"));
}

#[tokio::test]
async fn hello_auth_is_replaced_and_setname_honoured() {
    let server = RedisServer::start(ServerAuth::app());
    let amb = Ambassador::start(&server, "").await;
    let mut c = amb.connect().await;
    let hello = c
        .cmd(&[
            "HELLO", "3", "AUTH", "someone", "wrong", "SETNAME", "my-app",
        ])
        .await;
    let OwnedFrame::Map { data, .. } = hello else {
        panic!("HELLO 3 answers a map, got {hello:?}");
    };
    assert!(data.contains_key(&bulk(b"proto")) && data[&bulk(b"proto")] == int(3));
    assert_eq!(c.cmd(&["CLIENT", "GETNAME"]).await, bulk(b"my-app"));
    assert_eq!(c.cmd(&["ACL", "WHOAMI"]).await, bulk(USER.as_bytes()));
    // Back to RESP2, without AUTH: forwarded untouched.
    let hello2 = c.cmd(&["HELLO", "2"]).await;
    assert!(matches!(hello2, OwnedFrame::Array { .. }), "{hello2:?}");
}

#[tokio::test]
async fn reset_reauthenticates_and_reapplies_the_profile_handshake() {
    let server = RedisServer::start(ServerAuth::app());
    let amb = Ambassador::start(
        &server,
        "\n[handshake]\nclient_name = \"profile-name\"\ndatabase = 2\n",
    )
    .await;
    let mut c = amb.connect().await;
    assert_eq!(c.cmd(&["CLIENT", "GETNAME"]).await, bulk(b"profile-name"));
    assert_eq!(c.cmd(&["SET", "in2", "x"]).await, simple("OK"));
    assert_eq!(c.cmd(&["SELECT", "5"]).await, simple("OK"));
    assert_eq!(c.cmd(&["CLIENT", "SETNAME", "changed"]).await, simple("OK"));
    // Pipelined: RESET between commands; only +RESET reaches the client.
    let mut batch = command(&["PING"]);
    batch.extend(command(&["RESET"]));
    batch.extend(command(&["ACL", "WHOAMI"]));
    batch.extend(command(&["CLIENT", "GETNAME"]));
    batch.extend(command(&["GET", "in2"]));
    c.send(&batch).await;
    assert_eq!(c.reply().await, simple("PONG"));
    assert_eq!(c.reply().await, simple("RESET"));
    assert_eq!(c.reply().await, bulk(USER.as_bytes()));
    assert_eq!(c.reply().await, bulk(b"profile-name"));
    assert_eq!(
        c.reply().await,
        bulk(b"x"),
        "back on the profile's database"
    );
}

#[tokio::test]
async fn reset_in_subscribe_mode_is_found_among_messages() {
    let server = RedisServer::start(ServerAuth::app());
    let amb = Ambassador::start(&server, "").await;
    let mut sub = amb.connect().await;
    let mut publisher = amb.connect().await;
    let confirm = sub.cmd(&["SUBSCRIBE", "news"]).await;
    assert!(matches!(confirm, OwnedFrame::Array { .. }));
    assert_eq!(publisher.cmd(&["PUBLISH", "news", "+RESET"]).await, int(1));
    let mut batch = command(&["RESET"]);
    batch.extend(command(&["ACL", "WHOAMI"]));
    sub.send(&batch).await;
    let message = sub.reply().await;
    assert!(
        matches!(message, OwnedFrame::Array { .. }),
        "the message first: {message:?}"
    );
    assert_eq!(sub.reply().await, simple("RESET"));
    assert_eq!(sub.reply().await, bulk(USER.as_bytes()));
}

#[tokio::test]
async fn quit_replies_then_closes() {
    let server = RedisServer::start(ServerAuth::app());
    let amb = Ambassador::start(&server, "").await;
    let mut c = amb.connect().await;
    let mut batch = command(&["QUIT"]);
    batch.extend(command(&["PING"]));
    c.send(&batch).await;
    assert_eq!(c.read_to_close().await, b"+OK\r\n");
}

/// Commands before, between and after the downstream AUTH, pipelined in one write; ends with
/// ECHO marker-after-auth, a wrong AUTH, ACL WHOAMI.
async fn gated_session(amb: &Ambassador) {
    let mut c = amb.connect().await;
    let mut batch = command(&["SET", "leaked", "1"]);
    batch.extend(command(&["AUTH", "wrong"]));
    batch.extend(command(&["HELLO", "3"]));
    batch.extend(command(&["AUTH", CLIENT_PASSWORD]));
    batch.extend(command(&["ECHO", "marker-after-auth"]));
    batch.extend(command(&["AUTH", "bad-again"]));
    batch.extend(command(&["ACL", "WHOAMI"]));
    c.send(&batch).await;
    assert_eq!(
        error_text(&c.reply().await),
        "NOAUTH Authentication required."
    );
    assert_eq!(
        error_text(&c.reply().await),
        "WRONGPASS invalid username-password pair or user is disabled."
    );
    assert!(error_text(&c.reply().await).starts_with("NOAUTH HELLO must be called"));
    assert_eq!(c.reply().await, simple("OK"));
    assert_eq!(c.reply().await, bulk(b"marker-after-auth"));
    assert!(error_text(&c.reply().await).starts_with("WRONGPASS"));
    assert_eq!(c.reply().await, bulk(USER.as_bytes()));
}

#[tokio::test]
async fn downstream_password_gates_every_command() {
    let server = RedisServer::start(ServerAuth::app());
    let amb = Ambassador::with_client_password(&server).await;
    let mut monitor = server.direct().await;
    assert_eq!(monitor.cmd(&["MONITOR"]).await, simple("OK"));
    gated_session(&amb).await;
    // Nothing the client sent before authenticating reached the upstream.
    let seen = monitor_until(&mut monitor, "marker-after-auth").await;
    assert!(
        seen.iter().all(|line| !line.contains("leaked")),
        "pre-auth command reached upstream: {seen:#?}"
    );

    // Byte for byte, which MONITOR cannot say: a stand-in upstream records what it received.
    let fake = FakeUpstream::start().await;
    let amb = Ambassador::with_client_password_at(&fake.addr).await;
    gated_session(&amb).await;
    let mut expected = ServerAuth::app().auth_command();
    expected.extend(command(&["ECHO", "marker-after-auth"]));
    expected.extend(command(&["ACL", "WHOAMI"]));
    let received = fake.received();
    assert!(
        received == [expected],
        "the upstream received: {:#?}",
        received
            .iter()
            .map(|r| String::from_utf8_lossy(r))
            .collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn unreachable_upstream_fails_fast_and_recovers() {
    // A port bound but not listening refuses connections, and stays this test's: it starts
    // listening later without ever being free for another process to take.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let port = socket.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("creds"),
        ServerAuth::app().credential_file(),
    )
    .unwrap();
    let profile = format!(
        "[upstream]\naddress = \"127.0.0.1:{port}\"\nconnect_timeout = \"5s\"\n[credentials]\nfile = \"{}\"\n{NO_PROBES}",
        dir.path().join("creds").display()
    );
    let config = load_config(dir.path(), &profile);
    let amb = Ambassador::with_config(config, dir).await;
    for _ in 0..2 {
        let asked = std::time::Instant::now();
        let mut c = amb.connect().await;
        let got = c.read_to_close().await;
        let text = String::from_utf8_lossy(&got);
        assert_eq!(
            text,
            format!("-ERR ambassador: upstream unavailable (connect to 127.0.0.1:{port}: connection refused)\r\n"),
        );
        // Refused, not timed out: the answer does not wait for connect_timeout.
        assert!(
            asked.elapsed() < std::time::Duration::from_secs(5),
            "{:?}",
            asked.elapsed()
        );
    }

    // The upstream comes up: the next client is served, without restarting anything.
    let fake = FakeUpstream::serve(socket.listen(16).unwrap());
    let mut c = amb.connect().await;
    assert_eq!(c.cmd(&["PING"]).await, simple("PONG"));
    assert_eq!(c.cmd(&["ACL", "WHOAMI"]).await, bulk(USER.as_bytes()));
    assert_eq!(fake.received().len(), 1);
}

#[tokio::test]
async fn rejected_credentials_are_reported_without_the_password() {
    let server = RedisServer::start(ServerAuth::app());
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("creds"),
        "username = \"app\"\npassword = \"not-the-password\"\n",
    )
    .unwrap();
    let profile = format!(
        "[upstream]\naddress = \"{}\"\n[credentials]\nfile = \"{}\"\n",
        server.addr(),
        dir.path().join("creds").display()
    );
    let amb = Ambassador::with_config(load_config(dir.path(), &profile), dir).await;
    let mut c = amb.connect().await;
    c.send(&command(&["PING"])).await;
    assert_eq!(
        c.read_to_close().await,
        b"-ERR ambassador: upstream authentication failed\r\n"
    );
}

#[tokio::test]
async fn protocol_error_closes_only_that_client_after_earlier_replies() {
    let server = RedisServer::start(ServerAuth::app());
    let amb = Ambassador::start(&server, "").await;
    let mut other = amb.connect().await;
    assert_eq!(other.cmd(&["SET", "k", "v"]).await, simple("OK"));

    let mut bad = amb.connect().await;
    let mut batch = command(&["PING"]);
    batch.extend(b"*1\r\n$3\r\nGET\r\n*x\r\n");
    batch.extend(command(&["SET", "never", "1"]));
    bad.send(&batch).await;
    let got = bad.read_to_close().await;
    assert_eq!(
        String::from_utf8_lossy(&got),
        "+PONG\r\n-ERR wrong number of arguments for 'get' command\r\n-ERR Protocol error: invalid multibulk length\r\n"
    );
    assert_eq!(
        other.cmd(&["GET", "k"]).await,
        bulk(b"v"),
        "the other client is unaffected"
    );
    assert_eq!(
        other.cmd(&["EXISTS", "never"]).await,
        int(0),
        "nothing after the bad bytes ran"
    );
}

#[tokio::test]
async fn max_clients_refuses_the_extra_client_only() {
    let server = RedisServer::start(ServerAuth::app());
    let amb = Ambassador::start(&server, "").await;
    drop(amb);
    let dir = tempfile::tempdir().unwrap();
    let profile = profile_for(&server, dir.path(), "").replace(
        "address = \"127.0.0.1:0\"",
        "address = \"127.0.0.1:0\"\nmax_clients = 2",
    );
    let amb = Ambassador::with_config(load_config(dir.path(), &profile), dir).await;
    let mut a = amb.connect().await;
    let mut b = amb.connect().await;
    assert_eq!(a.cmd(&["PING"]).await, simple("PONG"));
    assert_eq!(b.cmd(&["PING"]).await, simple("PONG"));
    let mut c = amb.connect().await;
    assert_eq!(
        c.read_to_close().await,
        b"-ERR max number of clients reached\r\n"
    );
    assert_eq!(a.cmd(&["PING"]).await, simple("PONG"));
    drop(b);
    // The slot frees once the session notices the close; wait on that, with a deadline.
    let deadline = std::time::Instant::now() + DEADLINE;
    loop {
        let mut d = amb.connect().await;
        d.send(&command(&["PING"])).await;
        match d.try_reply().await {
            Some(f) if f == simple("PONG") => break,
            other => assert!(
                std::time::Instant::now() < deadline,
                "slot never freed: {other:?}"
            ),
        }
    }
}

/// Found by the fuzzer: before AUTH, Redis's tight limits hold from the first byte, and a
/// command that never completes gets no -NOAUTH, only Redis's protocol error.
#[tokio::test]
async fn unauthenticated_limits_hold_whatever_the_reads() {
    let server = RedisServer::start(ServerAuth::app());
    let amb = Ambassador::with_client_password(&server).await;
    let mut c = amb.connect().await;
    // Two writes, which may or may not be one read: the answer must not depend on it.
    c.send(b"*2\r\n$3\r\nGET\r\n").await;
    c.send(b"$16385\r\n").await;
    assert_eq!(
        c.read_to_close().await,
        b"-ERR Protocol error: unauthenticated bulk length\r\n"
    );
    let mut d = amb.connect().await;
    d.send(b"*11\r\n").await;
    assert_eq!(
        d.read_to_close().await,
        b"-ERR Protocol error: unauthenticated multibulk length\r\n"
    );
}

/// Found by the fuzzer: an AUTH longer than the ambassador holds is refused the same way
/// whether it arrives in one read or several.
#[tokio::test]
async fn an_oversized_auth_is_refused_however_it_arrives() {
    let server = RedisServer::start(ServerAuth::app());
    let amb = Ambassador::start(&server, "").await;
    let mut auth = b"*2\r\n$4\r\nAUTH\r\n$70144\r\n".to_vec();
    auth.extend(std::iter::repeat_n(b'a', 70144));
    auth.extend(b"\r\n");
    for split in [auth.len(), 66000, 30] {
        let mut c = amb.connect().await;
        c.send(&auth[..split]).await;
        c.send(&auth[split..]).await;
        let got = c.read_to_close().await;
        assert_eq!(
            String::from_utf8_lossy(&got),
            "-ERR ambassador: command longer than 65536 bytes\r\n",
            "split at {split}"
        );
    }
}
