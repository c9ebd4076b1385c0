//! `upstream.pool_size`: upstream connections made and authenticated before a client asks.
//! A real Redis tells, by `CLIENT ID`, whether a client got a connection that existed before
//! it connected; rotation and a server-side close show that only good ones are handed out.

mod common;

use std::collections::HashSet;

use common::*;
use redis_protocol::resp3::types::OwnedFrame;

/// The IDs of the server's clients of user `app`, the pool's and sessions'.
async fn app_ids(observer: &mut Raw) -> HashSet<i64> {
    let OwnedFrame::BlobString { data, .. } = observer.cmd(&["CLIENT", "LIST"]).await else {
        panic!("CLIENT LIST");
    };
    let me = observer.cmd(&["CLIENT", "ID"]).await;
    String::from_utf8(data)
        .unwrap()
        .lines()
        .filter(|l| l.contains(&format!(" user={USER} ")))
        .filter_map(|l| l.strip_prefix("id=")?.split(' ').next()?.parse().ok())
        .filter(|id| int(*id) != me)
        .collect()
}

fn id_of(frame: OwnedFrame) -> i64 {
    match frame {
        OwnedFrame::Number { data, .. } => data,
        other => panic!("expected an ID, got {other:?}"),
    }
}

async fn pooled(extra: &str) -> (RedisServer, Ambassador) {
    let server = RedisServer::start(ServerAuth::app());
    let dir = tempfile::tempdir().unwrap();
    let profile = profile_for(&server, dir.path(), NO_PROBES).replace(
        "[upstream]\n",
        &format!("[upstream]\npool_size = 2\n{extra}"),
    );
    let amb = Ambassador::with_config(load_config(dir.path(), &profile), dir).await;
    wait_until("two ready connections", DEADLINE, || async {
        amb.metric("ambassador_upstream_pool_ready", ("", "")).await == Some(2.0)
    })
    .await;
    (server, amb)
}

#[tokio::test]
async fn a_new_client_gets_a_connection_made_before_it_came() {
    // Without reuse a take refills at once (with it, once the pool runs dry: tests/reuse.rs).
    let (server, amb) = pooled("reuse = false\n").await;
    let mut observer = server.direct().await;
    let ready = app_ids(&mut observer).await;
    assert!(ready.len() >= 2, "{ready:?}");
    let mut client = amb.connect().await;
    let id = id_of(client.cmd(&["CLIENT", "ID"]).await);
    assert!(ready.contains(&id), "{id} not among {ready:?}");
    assert_eq!(client.cmd(&["ACL", "WHOAMI"]).await, bulk(USER.as_bytes()));
    // The pool makes another to replace it.
    wait_until("the pool refilled", DEADLINE, || async {
        amb.metric("ambassador_upstream_pool_ready", ("", "")).await == Some(2.0)
    })
    .await;
    assert_eq!(
        amb.metric("ambassador_upstream_pool_taken_total", ("from", "ready"))
            .await,
        Some(1.0)
    );
    drop(client);
    amb.stop().await;
}

#[tokio::test]
async fn connections_the_server_closed_are_never_handed_out() {
    let (server, amb) = pooled("").await;
    let mut observer = server.direct().await;
    for id in app_ids(&mut observer).await {
        observer
            .cmd(&["CLIENT", "KILL", "ID", &id.to_string()])
            .await;
    }
    // At once, before the pool notices: the client still gets a working connection.
    let mut client = amb.connect().await;
    assert_eq!(client.cmd(&["PING"]).await, simple("PONG"));
    drop(client);
    amb.stop().await;
}

#[tokio::test]
async fn after_a_rotation_only_connections_with_the_new_credentials_are_used() {
    let (server, amb) = pooled("").await;
    server.add_user("rotated", "rotated-pass-1").await;
    let secret = amb.dir.path().join("credentials.toml");
    let path = std::fs::read_dir(amb.dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| std::fs::read_to_string(p).is_ok_and(|t| t.contains(PASSWORD)))
        .unwrap_or(secret);
    amb.rotate_credentials(&path, "rotated", "rotated-pass-1", 1.0)
        .await;
    let mut client = amb.connect().await;
    assert_eq!(client.cmd(&["ACL", "WHOAMI"]).await, bulk(b"rotated"));
    drop(client);
    amb.stop().await;
}

#[test]
fn the_pool_size_is_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let profile = "[listen]\naddress = \"127.0.0.1:0\"\n[upstream]\naddress = \"a:1\"\npool_size = 5000\n[credentials]\nfile = \"/nonexistent\"\n";
    let errors = try_load_config(dir.path(), profile)
        .unwrap_err()
        .to_string();
    assert!(
        errors.contains("upstream.pool_size: must be from 0 to 1000, got 5000"),
        "{errors}"
    );
}
