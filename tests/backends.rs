//! `upstream.addresses`: several real Redis servers behind one ambassador, with active
//! health checks; and `listen.protocol = "tcp"`, the same balancing for a plain HTTP service.

mod common;

use std::collections::HashMap;

use common::*;
use redis_protocol::resp3::types::OwnedFrame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn profile(servers: &[&RedisServer], dir: &std::path::Path, extra: &str) -> String {
    let creds = servers[0].credential_file(dir);
    let list: Vec<String> = servers
        .iter()
        .map(|s| format!("\"{}\"", s.addr()))
        .collect();
    format!(
        "[listen]\naddress = \"127.0.0.1:0\"\n[upstream]\naddresses = [{}]\nhealth_interval = \"100ms\"\n{extra}\n[credentials]\nfile = \"{}\"\n{NO_PROBES}",
        list.join(", "),
        creds.display()
    )
}

async fn named(name: &str, auth: ServerAuth) -> RedisServer {
    let server = RedisServer::start(auth);
    server.direct().await.cmd(&["SET", "who", name]).await;
    server
}

async fn who(amb: &Ambassador) -> String {
    match amb.connect().await.cmd(&["GET", "who"]).await {
        OwnedFrame::BlobString { data, .. } => String::from_utf8(data).unwrap(),
        other => panic!("expected a name, got {other:?}"),
    }
}

#[tokio::test]
async fn round_robin_spreads_clients_with_ready_connections_reused_too() {
    // The pool hands out its oldest first: the connections the filler made to a and b in
    // turn, and given back after each client, serve clients in turn (the newest first, a
    // connection given back went straight to the next client, always to the same server).
    let a = named("a", ServerAuth::app()).await;
    let b = named("b", ServerAuth::app()).await;
    let dir = tempfile::tempdir().unwrap();
    let extra = "strategy = \"round-robin\"\npool_size = 2";
    let profile = profile(&[&a, &b], dir.path(), extra);
    let amb = Ambassador::with_config(load_config(dir.path(), &profile), dir).await;
    wait_until("two ready connections", DEADLINE, || async {
        amb.metric("ambassador_upstream_pool_ready", ("", "")).await == Some(2.0)
    })
    .await;
    let mut seen: HashMap<String, u32> = HashMap::new();
    for _ in 0..40 {
        *seen.entry(who(&amb).await).or_default() += 1;
    }
    for name in ["a", "b"] {
        let n = seen.get(name).copied().unwrap_or(0);
        assert!(n >= 10, "{seen:?}");
    }
    amb.stop().await;
}

#[tokio::test]
async fn round_robin_spreads_connections_evenly() {
    let a = named("a", ServerAuth::app()).await;
    let b = named("b", ServerAuth::app()).await;
    let dir = tempfile::tempdir().unwrap();
    let profile = profile(&[&a, &b], dir.path(), "strategy = \"round-robin\"");
    let amb = Ambassador::with_config(load_config(dir.path(), &profile), dir).await;
    let mut seen: HashMap<String, u32> = HashMap::new();
    for _ in 0..1000 {
        *seen.entry(who(&amb).await).or_default() += 1;
    }
    for name in ["a", "b"] {
        let n = seen.get(name).copied().unwrap_or(0);
        assert!((450..=550).contains(&n), "{seen:?}");
    }
    amb.stop().await;
}

#[tokio::test]
async fn a_dead_backend_is_skipped_and_taken_back_when_it_recovers() {
    let a = named("a", ServerAuth::app()).await;
    let b = named("b", ServerAuth::app()).await;
    let port = a.port;
    let dir = tempfile::tempdir().unwrap();
    let profile = profile(&[&a, &b], dir.path(), "strategy = \"failover\"");
    let amb = Ambassador::with_config(load_config(dir.path(), &profile), dir).await;
    let healthy = |address: String| {
        let amb = &amb;
        async move {
            amb.metric("ambassador_backend_healthy", ("address", &address))
                .await
        }
    };
    wait_until("a healthy", DEADLINE, || async {
        healthy(a.addr()).await == Some(1.0)
    })
    .await;
    assert_eq!(who(&amb).await, "a");

    drop(a);
    let a_addr = format!("127.0.0.1:{port}");
    wait_until("a unhealthy", DEADLINE, || async {
        healthy(a_addr.clone()).await == Some(0.0)
    })
    .await;
    for _ in 0..5 {
        assert_eq!(who(&amb).await, "b");
    }
    let (status, _) = amb.admin_get("/readyz").await;
    assert_eq!(status, 200, "ready while one backend is healthy");

    let a = RedisServer::start_at(ServerAuth::app(), "127.0.0.1", port);
    a.direct().await.cmd(&["SET", "who", "a"]).await;
    wait_until("a healthy again", DEADLINE, || async {
        healthy(a_addr.clone()).await == Some(1.0)
    })
    .await;
    assert_eq!(who(&amb).await, "a");
    amb.stop().await;
}

/// A one-line HTTP service that answers every request with its name, until dropped.
struct Http {
    addr: String,
    task: tokio::task::JoinHandle<()>,
}

impl Http {
    async fn start(name: &'static str) -> Http {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let task = tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut chunk = [0u8; 1024];
                    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                        match socket.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let reply = format!(
                        "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{name}",
                        name.len()
                    );
                    let _ = socket.write_all(reply.as_bytes()).await;
                });
            }
        });
        Http { addr, task }
    }
}

impl Drop for Http {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test]
async fn tcp_mode_balances_an_http_service_over_two_backends() {
    let one = Http::start("one").await;
    let two = Http::start("two").await;
    let dir = tempfile::tempdir().unwrap();
    let profile = format!(
        "[listen]\naddress = \"127.0.0.1:0\"\nprotocol = \"tcp\"\n[upstream]\naddresses = [\"{}\", \"{}\"]\nstrategy = \"round-robin\"\nhealth_interval = \"100ms\"\n{NO_PROBES}",
        one.addr, two.addr
    );
    let config = load_config(dir.path(), &profile);
    assert!(
        config.summary().contains("protocol: tcp"),
        "{}",
        config.summary()
    );
    let amb = Ambassador::with_config(config, dir).await;
    let mut seen: HashMap<String, u32> = HashMap::new();
    for _ in 0..20 {
        let (status, body) = http_get(&amb.addr.to_string(), "/").await;
        assert_eq!(status, 200);
        *seen.entry(body).or_default() += 1;
    }
    // Alternating, but for the probe's own connection, which takes a turn of the rotation.
    for name in ["one", "two"] {
        let n = seen.get(name).copied().unwrap_or(0);
        assert!((9..=11).contains(&n), "{seen:?}");
    }

    drop(one);
    wait_until("backend one unhealthy", DEADLINE, || async {
        let scrape = amb.scrape().await;
        scrape.samples.iter().any(|s| {
            s.metric == "ambassador_backend_healthy"
                && matches!(s.value, prometheus_parse::Value::Gauge(v) if v == 0.0)
        })
    })
    .await;
    for _ in 0..5 {
        let (status, body) = http_get(&amb.addr.to_string(), "/").await;
        assert_eq!((status, body.as_str()), (200, "two"));
    }
    amb.stop().await;
}

#[tokio::test]
async fn tcp_mode_speaks_tls_to_the_backends_and_leaves_the_bytes_alone() {
    let pki = common::pki::Pki::new();
    let tls = common::pki::ServerTls::new(&pki);
    let server = RedisServer::start_tls(ServerAuth::app(), &tls);
    let dir = tempfile::tempdir().unwrap();
    let profile = format!(
        "[listen]\naddress = \"127.0.0.1:0\"\nprotocol = \"tcp\"\n[upstream]\naddresses = [\"{}\"]\n[upstream.tls]\nca_file = \"{}\"\n{NO_PROBES}",
        server.tls_addr("localhost"),
        pki.ca.display()
    );
    let amb = Ambassador::with_config(load_config(dir.path(), &profile), dir).await;
    let mut client = amb.connect().await;
    // No AUTH of the ambassador's own: the client's is the first command Redis sees.
    assert!(error_text(&client.cmd(&["PING"]).await).starts_with("NOAUTH"));
    assert_eq!(client.cmd(&["AUTH", USER, PASSWORD]).await, simple("OK"));
    assert_eq!(client.cmd(&["PING"]).await, simple("PONG"));
    drop(client);
    amb.stop().await;
}

#[test]
fn tcp_mode_refuses_the_redis_only_keys() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("pw"), "x\n").unwrap();
    let profile = format!(
        "[listen]\naddress = \"127.0.0.1:0\"\nprotocol = \"tcp\"\nrequire_password_file = \"{}\"\n[upstream]\naddresses = [\"127.0.0.1:1\"]\n[upstream.expect]\nuser = \"app\"\n[handshake]\ndatabase = 2\n",
        dir.path().join("pw").display()
    );
    let errors = try_load_config(dir.path(), &profile)
        .unwrap_err()
        .to_string();
    for key in [
        "listen.require_password_file",
        "upstream.expect",
        "handshake",
    ] {
        assert!(
            errors.contains(&format!("{key}: not with listen.protocol = \"tcp\"")),
            "{errors}"
        );
    }
}
