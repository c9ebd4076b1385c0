//! A real client library (the `redis` crate, async on tokio) through the ambassador:
//! pipelines, transactions and pub/sub, each over RESP2 and over RESP3.

mod common;

use common::*;
use redis::aio::MultiplexedConnection;
use redis::{PushInfo, PushKind, Value};
use tokio::sync::mpsc::UnboundedReceiver;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proto {
    Resp2,
    Resp3,
}

fn url(amb: &Ambassador, proto: Proto) -> String {
    match proto {
        Proto::Resp2 => amb.url(),
        Proto::Resp3 => format!("{}/?protocol=resp3", amb.url()),
    }
}

async fn connect(amb: &Ambassador, proto: Proto) -> MultiplexedConnection {
    let client = redis::Client::open(url(amb, proto)).unwrap();
    let mut con = tokio::time::timeout(DEADLINE, client.get_multiplexed_async_connection())
        .await
        .expect("connect timed out")
        .unwrap();
    assert_protocol(&mut con, proto).await;
    con
}

/// The server agrees on the protocol the connection was opened with.
async fn assert_protocol(con: &mut MultiplexedConnection, proto: Proto) {
    let info: String = query(con, redis::cmd("CLIENT").arg("INFO")).await;
    let resp = info
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("resp="))
        .unwrap_or_else(|| panic!("no resp= in {info}"));
    let want = match proto {
        Proto::Resp2 => "2",
        Proto::Resp3 => "3",
    };
    assert_eq!(resp, want, "{info}");
    let user: String = query(con, redis::cmd("ACL").arg("WHOAMI")).await;
    assert_eq!(user, USER);
}

async fn query<T: redis::FromRedisValue>(con: &mut MultiplexedConnection, cmd: &redis::Cmd) -> T {
    tokio::time::timeout(DEADLINE, cmd.query_async(con))
        .await
        .expect("command timed out")
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
}

async fn run_pipe<T: redis::FromRedisValue>(
    con: &mut MultiplexedConnection,
    pipe: &redis::Pipeline,
) -> T {
    tokio::time::timeout(DEADLINE, pipe.query_async(con))
        .await
        .expect("pipeline timed out")
        .unwrap_or_else(|e| panic!("pipeline: {e}"))
}

async fn pipelines(proto: Proto) {
    let server = RedisServer::start(ServerAuth::app());
    let amb = Ambassador::start(&server, "").await;
    let mut con = connect(&amb, proto).await;

    let (got, n, len): (String, i64, i64) = run_pipe(
        &mut con,
        redis::pipe()
            .cmd("SET")
            .arg("k")
            .arg("v")
            .ignore()
            .cmd("GET")
            .arg("k")
            .cmd("INCR")
            .arg("n")
            .cmd("STRLEN")
            .arg("k"),
    )
    .await;
    assert_eq!((got.as_str(), n, len), ("v", 1, 1));

    // A long pipeline: every reply in its place.
    let mut pipe = redis::pipe();
    for i in 0..2000 {
        pipe.cmd("RPUSH").arg("list").arg(i);
    }
    let lens: Vec<i64> = run_pipe(&mut con, &pipe).await;
    assert_eq!(lens, (1..=2000).collect::<Vec<i64>>());
    let items: Vec<i64> = query(&mut con, redis::cmd("LRANGE").arg("list").arg(0).arg(-1)).await;
    assert_eq!(items, (0..2000).collect::<Vec<i64>>());

    // Errors inside a pipeline stay in their place.
    let results: Vec<Value> = run_pipe(
        &mut con,
        redis::pipe()
            .ignore_errors()
            .cmd("INCR")
            .arg("n")
            .cmd("INCR")
            .arg("k")
            .cmd("INCR")
            .arg("n"),
    )
    .await;
    assert_eq!(results.len(), 3, "{results:?}");
    assert_eq!(results[0], Value::Int(2));
    assert!(
        matches!(&results[1], Value::ServerError(e) if format!("{e:?}").contains("not an integer")),
        "{results:?}"
    );
    assert_eq!(results[2], Value::Int(3));

    // Many requests in flight at once on the multiplexed connection.
    let mut tasks = Vec::new();
    for i in 0..200 {
        let mut c = con.clone();
        tasks.push(tokio::spawn(async move {
            let echoed: String = query(&mut c, redis::cmd("ECHO").arg(format!("e{i}"))).await;
            assert_eq!(echoed, format!("e{i}"));
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test]
async fn pipelines_resp2() {
    pipelines(Proto::Resp2).await;
}

#[tokio::test]
async fn pipelines_resp3() {
    pipelines(Proto::Resp3).await;
}

async fn transactions(proto: Proto) {
    let server = RedisServer::start(ServerAuth::app());
    let amb = Ambassador::start(&server, "").await;
    let mut con = connect(&amb, proto).await;
    let mut other = connect(&amb, proto).await;

    let (a, b): (i64, i64) = run_pipe(
        &mut con,
        redis::pipe()
            .atomic()
            .cmd("SET")
            .arg("t")
            .arg(1)
            .ignore()
            .cmd("INCR")
            .arg("t")
            .cmd("INCRBY")
            .arg("t")
            .arg(10),
    )
    .await;
    assert_eq!((a, b), (2, 12));

    // WATCH, then another client modifies the key: the transaction aborts (nil).
    let () = query(&mut con, redis::cmd("WATCH").arg("t")).await;
    let () = query(&mut other, redis::cmd("SET").arg("t").arg("other")).await;
    let aborted: Option<(i64,)> =
        run_pipe(&mut con, redis::pipe().atomic().cmd("INCR").arg("t")).await;
    assert_eq!(aborted, None);
    let t: String = query(&mut con, redis::cmd("GET").arg("t")).await;
    assert_eq!(t, "other");

    // WATCH without interference: it runs.
    let () = query(&mut con, redis::cmd("WATCH").arg("t")).await;
    let done: Option<(String,)> = run_pipe(
        &mut con,
        redis::pipe()
            .atomic()
            .cmd("SET")
            .arg("t")
            .arg("mine")
            .cmd("GET")
            .arg("t")
            .ignore(),
    )
    .await;
    assert_eq!(done, Some(("OK".to_owned(),)));
    let t: String = query(&mut other, redis::cmd("GET").arg("t")).await;
    assert_eq!(t, "mine");

    // A transaction whose queued command fails at run time: the other commands still run.
    let results: Vec<Value> = run_pipe(
        &mut con,
        redis::pipe()
            .atomic()
            .ignore_errors()
            .cmd("INCR")
            .arg("t")
            .cmd("SET")
            .arg("u")
            .arg("1"),
    )
    .await;
    assert_eq!(results.len(), 2, "{results:?}");
    assert!(matches!(results[0], Value::ServerError(_)), "{results:?}");
    assert_eq!(results[1], Value::Okay);
    let pong: String = query(&mut con, &redis::cmd("PING")).await;
    assert_eq!(pong, "PONG");
}

#[tokio::test]
async fn transactions_resp2() {
    transactions(Proto::Resp2).await;
}

#[tokio::test]
async fn transactions_resp3() {
    transactions(Proto::Resp3).await;
}

/// The next push of kind `kind`, skipping subscription confirmations.
async fn next_push(rx: &mut UnboundedReceiver<PushInfo>, kind: PushKind) -> Vec<Value> {
    loop {
        let push = tokio::time::timeout(DEADLINE, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("no {kind:?} push within the deadline"))
            .expect("push channel closed");
        if push.kind == kind {
            return push.data;
        }
        assert!(
            matches!(
                push.kind,
                PushKind::Subscribe
                    | PushKind::PSubscribe
                    | PushKind::Unsubscribe
                    | PushKind::PUnsubscribe
            ),
            "unexpected push while waiting for {kind:?}: {push:?}"
        );
    }
}

fn bulk_value(s: &str) -> Value {
    Value::BulkString(s.as_bytes().to_vec())
}

#[tokio::test]
async fn pubsub_resp3() {
    let server = RedisServer::start(ServerAuth::app());
    let amb = Ambassador::start(&server, "").await;
    let client = redis::Client::open(url(&amb, Proto::Resp3)).unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let config = redis::AsyncConnectionConfig::new().set_push_sender(tx);
    let mut sub = tokio::time::timeout(
        DEADLINE,
        client.get_multiplexed_async_connection_with_config(&config),
    )
    .await
    .expect("connect timed out")
    .unwrap();
    assert_protocol(&mut sub, Proto::Resp3).await;
    let mut publisher = connect(&amb, Proto::Resp3).await;

    sub.subscribe("ch").await.unwrap();
    sub.psubscribe("news.*").await.unwrap();

    let n: i64 = query(&mut publisher, redis::cmd("PUBLISH").arg("ch").arg("hello")).await;
    assert_eq!(n, 1);
    assert_eq!(
        next_push(&mut rx, PushKind::Message).await,
        vec![bulk_value("ch"), bulk_value("hello")]
    );
    let n: i64 = query(&mut publisher, redis::cmd("PUBLISH").arg("news.a").arg("x")).await;
    assert_eq!(n, 1);
    assert_eq!(
        next_push(&mut rx, PushKind::PMessage).await,
        vec![bulk_value("news.*"), bulk_value("news.a"), bulk_value("x")]
    );

    // RESP3: ordinary commands on the subscribed connection, pushes interleaved.
    for i in 0..50 {
        let n: i64 = query(&mut publisher, redis::cmd("PUBLISH").arg("ch").arg(i)).await;
        assert_eq!(n, 1);
        let echoed: String = query(&mut sub, redis::cmd("ECHO").arg(format!("e{i}"))).await;
        assert_eq!(echoed, format!("e{i}"));
    }
    for i in 0..50 {
        assert_eq!(
            next_push(&mut rx, PushKind::Message).await,
            vec![bulk_value("ch"), bulk_value(&i.to_string())]
        );
    }

    sub.unsubscribe("ch").await.unwrap();
    sub.punsubscribe("news.*").await.unwrap();
    let n: i64 = query(&mut publisher, redis::cmd("PUBLISH").arg("ch").arg("lost")).await;
    assert_eq!(n, 0);
    let pong: String = query(&mut sub, &redis::cmd("PING")).await;
    assert_eq!(pong, "PONG");
    let () = query(&mut sub, redis::cmd("SET").arg("k").arg("v")).await;
    let v: String = query(&mut sub, redis::cmd("GET").arg("k")).await;
    assert_eq!(v, "v");
}

#[tokio::test]
async fn pubsub_resp2() {
    let server = RedisServer::start(ServerAuth::app());
    let amb = Ambassador::start(&server, "").await;
    let client = redis::Client::open(url(&amb, Proto::Resp2)).unwrap();
    let mut publisher = connect(&amb, Proto::Resp2).await;

    // The async RESP2 pub/sub connection: subscription confirmations and PING in
    // subscribed mode.
    let mut pubsub = tokio::time::timeout(DEADLINE, client.get_async_pubsub())
        .await
        .expect("connect timed out")
        .unwrap();
    pubsub.subscribe("ch").await.unwrap();
    pubsub.psubscribe("news.*").await.unwrap();
    let n: i64 = query(&mut publisher, redis::cmd("PUBLISH").arg("ch").arg("x")).await;
    assert_eq!(n, 1);
    let n: i64 = query(&mut publisher, redis::cmd("PUBLISH").arg("news.y").arg("x")).await;
    assert_eq!(n, 1);
    let pong: Vec<String> = pubsub.ping().await.unwrap();
    assert_eq!(pong, vec!["pong".to_owned(), String::new()]);
    pubsub.unsubscribe("ch").await.unwrap();
    pubsub.punsubscribe("news.*").await.unwrap();
    let n: i64 = query(&mut publisher, redis::cmd("PUBLISH").arg("ch").arg("x")).await;
    assert_eq!(n, 0);
    drop(pubsub);

    // Receiving messages over RESP2: the crate's async message stream needs the `futures`
    // Stream trait, which is not a dependency here, so the crate's blocking RESP2 pub/sub runs
    // on a blocking thread while this task publishes.
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let receiver = tokio::task::spawn_blocking(move || {
        let mut con = client.get_connection_with_timeout(DEADLINE).unwrap();
        let mut ps = con.as_pubsub();
        ps.set_read_timeout(Some(DEADLINE)).unwrap();
        ps.subscribe("ch").unwrap();
        ps.psubscribe("news.*").unwrap();
        ready_tx.send(()).unwrap();
        let mut got = Vec::new();
        for _ in 0..3 {
            let msg = ps.get_message().unwrap();
            let pattern: Option<String> = msg.get_pattern().unwrap();
            let payload: String = msg.get_payload().unwrap();
            got.push((pattern, msg.get_channel_name().to_owned(), payload));
        }
        ps.unsubscribe("ch").unwrap();
        ps.punsubscribe("news.*").unwrap();
        drop(ps);
        let pong: String = redis::cmd("PING").query(&mut con).unwrap();
        (got, pong)
    });
    tokio::time::timeout(DEADLINE, ready_rx)
        .await
        .expect("subscriber not ready in time")
        .unwrap();
    for (channel, payload) in [("ch", "one"), ("news.z", "two"), ("ch", "three")] {
        let n: i64 = query(
            &mut publisher,
            redis::cmd("PUBLISH").arg(channel).arg(payload),
        )
        .await;
        assert_eq!(n, 1);
    }
    let (got, pong) = tokio::time::timeout(DEADLINE * 2, receiver)
        .await
        .expect("subscriber did not finish")
        .unwrap();
    assert_eq!(
        got,
        vec![
            (None, "ch".to_owned(), "one".to_owned()),
            (
                Some("news.*".to_owned()),
                "news.z".to_owned(),
                "two".to_owned()
            ),
            (None, "ch".to_owned(), "three".to_owned()),
        ]
    );
    assert_eq!(pong, "PONG");
}
