//! Finding the upstream: the host of `upstream.address` is resolved again for every new
//! connection, by `upstream.dns_server` when the profile names one. A real DNS server
//! (dnsmasq) answers; two real Redis servers on one port and two loopback addresses stand
//! for a service whose address moves.

mod common;

use common::*;
use redis_protocol::resp3::types::OwnedFrame;

/// A profile whose upstream is `host:port`, resolved by `dns`, with `server`'s credentials.
fn profile(
    server: &RedisServer,
    dns: &Dns,
    host: &str,
    port: u16,
    dir: &std::path::Path,
) -> String {
    let creds = server.credential_file(dir);
    format!(
        "[listen]\naddress = \"127.0.0.1:0\"\n[upstream]\naddress = \"{host}:{port}\"\ndns_server = \"{}\"\n[credentials]\nfile = \"{}\"\n{NO_PROBES}",
        dns.addr,
        creds.display()
    )
}

/// Which of the two servers a connection reached.
async fn who(raw: &mut Raw) -> OwnedFrame {
    raw.cmd(&["GET", "who"]).await
}

#[tokio::test]
async fn each_new_connection_resolves_the_host_again_with_the_given_dns_server() {
    let first = RedisServer::start(ServerAuth::app());
    let port = first.port;
    let second = RedisServer::start_at(ServerAuth::app(), "127.0.0.2", port);
    first.direct().await.cmd(&["SET", "who", "first"]).await;
    second.direct().await.cmd(&["SET", "who", "second"]).await;
    let dns = Dns::start(&[("127.0.0.1", "cache.test")]);
    dns.wait_answer("cache.test", "127.0.0.1").await;

    let dir = tempfile::tempdir().unwrap();
    let profile = profile(&first, &dns, "cache.test", port, dir.path());
    let config = load_config(dir.path(), &profile);
    assert!(config
        .summary()
        .contains(&format!("via dns server {}", dns.addr)));
    let amb = Ambassador::with_config(config, dir).await;

    let mut before = amb.connect().await;
    assert_eq!(who(&mut before).await, bulk(b"first"));

    dns.set(&[("127.0.0.2", "cache.test")]);
    dns.wait_answer("cache.test", "127.0.0.2").await;
    let mut after = amb.connect().await;
    assert_eq!(who(&mut after).await, bulk(b"second"));
    // The session opened before the change stays where it is.
    assert_eq!(who(&mut before).await, bulk(b"first"));
    drop((before, after));
    amb.stop().await;
}

#[tokio::test]
async fn a_name_the_dns_server_does_not_know_is_the_upstream_unavailable_error() {
    let server = RedisServer::start(ServerAuth::app());
    let dns = Dns::start(&[("127.0.0.1", "cache.test")]);
    dns.wait_answer("cache.test", "127.0.0.1").await;
    let dir = tempfile::tempdir().unwrap();
    let profile = profile(&server, &dns, "missing.test", server.port, dir.path());
    let amb = Ambassador::with_config(load_config(dir.path(), &profile), dir).await;
    let mut client = amb.connect().await;
    let reply = client.cmd(&["PING"]).await;
    let OwnedFrame::SimpleError { data, .. } = &reply else {
        panic!("expected an error, got {reply:?}");
    };
    let want = format!(
        "ERR ambassador: upstream unavailable (DNS: cannot resolve missing.test:{}:",
        server.port
    );
    assert!(data.starts_with(&want), "{data}");
    drop(client);
    amb.stop().await;
}

#[test]
fn a_dns_server_that_is_not_ip_and_port_is_refused_by_key() {
    let dir = tempfile::tempdir().unwrap();
    let profile = "[listen]\naddress = \"127.0.0.1:0\"\n[upstream]\naddress = \"cache.test:6379\"\ndns_server = \"dns.internal\"\n[credentials]\nfile = \"/nonexistent\"\n";
    let errors = try_load_config(dir.path(), profile)
        .unwrap_err()
        .to_string();
    assert!(
        errors.contains("upstream.dns_server: expected ip:port, such as 10.0.0.2:53"),
        "{errors}"
    );
}
