//! `[upstream.sentinel]`: three real sentinels watch a real master and replica; the
//! ambassador follows them. Writes through it succeed again soon after a failover (on
//! command, and when the master dies), no client ever sees `-READONLY` from the demoted
//! master, and `ROLE` refuses a master that is not one.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use redis_protocol::resp3::types::OwnedFrame;

const SENTINEL_PASSWORD: &str = "sentinel-pass-9d2";

fn profile(set: &SentinelSet, dir: &std::path::Path) -> String {
    let app = dir.join("app-credentials");
    std::fs::write(&app, set.auth().credential_file()).unwrap();
    let sentinel = dir.join("sentinel-credentials");
    std::fs::write(&sentinel, format!("{SENTINEL_PASSWORD}\n")).unwrap();
    let addresses: Vec<String> = set
        .sentinel_addresses()
        .iter()
        .map(|a| format!("\"{a}\""))
        .collect();
    format!(
        "[listen]\naddress = \"127.0.0.1:0\"\n[upstream]\n[upstream.sentinel]\nmaster = \"{}\"\naddresses = [{}]\ncredentials_file = \"{}\"\npoll_interval = \"500ms\"\n[credentials]\nfile = \"{}\"\n{NO_PROBES}",
        set.master_name(),
        addresses.join(", "),
        sentinel.display(),
        app.display()
    )
}

/// What one write through the ambassador got.
#[derive(Debug, Clone)]
enum Outcome {
    /// `RPUSH log <seq>` acknowledged.
    Acked(u64),
    /// An error reply (its text).
    Error(String),
    /// The connection closed (or could not be made) before a reply.
    Closed,
}

/// A client writing through the ambassador as fast as it can, reconnecting whenever its
/// connection closes, until stopped (at most 60 s).
struct Writer {
    log: Arc<Mutex<Vec<(Instant, Outcome)>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Writer {
    fn start(amb: &Ambassador) -> Writer {
        let addr = amb.addr;
        let log = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (l, s) = (Arc::clone(&log), Arc::clone(&stop));
        let task = tokio::spawn(async move {
            let until = Instant::now() + Duration::from_secs(60);
            let mut seq = 0u64;
            while !s.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < until {
                let Ok(stream) = tokio::net::TcpStream::connect(addr).await else {
                    l.lock().unwrap().push((Instant::now(), Outcome::Closed));
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let mut raw = Raw::from_stream(stream);
                while !s.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < until {
                    seq += 1;
                    let sent = raw
                        .try_send(&command(&["RPUSH", "log", &seq.to_string()]))
                        .await;
                    let reply = match sent {
                        true => raw.try_reply_within(Duration::from_secs(5)).await,
                        false => None,
                    };
                    let outcome = match reply {
                        Some(OwnedFrame::Number { .. }) => Outcome::Acked(seq),
                        Some(other) => Outcome::Error(error_text(&other)),
                        None => Outcome::Closed,
                    };
                    let closed = matches!(outcome, Outcome::Closed | Outcome::Error(_));
                    l.lock().unwrap().push((Instant::now(), outcome));
                    if closed {
                        // A pause, so that a dead master is not hammered in a tight loop.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        break;
                    }
                }
            }
        });
        Writer { log, stop, task }
    }

    async fn finish(self) -> Vec<(Instant, Outcome)> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = tokio::time::timeout(DEADLINE, self.task).await;
        let log = self.log.lock().unwrap().clone();
        log
    }

    fn acked(&self) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, o)| matches!(o, Outcome::Acked(_)))
            .count()
    }
}

/// The sequence numbers in the `log` list of the server at `addr`.
async fn logged(set: &SentinelSet, addr: &str) -> std::collections::HashSet<u64> {
    let mut raw = set.server(addr).unwrap().direct().await;
    match raw.cmd(&["LRANGE", "log", "0", "-1"]).await {
        OwnedFrame::Array { data, .. } => data
            .iter()
            .map(|f| match f {
                OwnedFrame::BlobString { data, .. } => {
                    String::from_utf8_lossy(data).parse().unwrap()
                }
                other => panic!("{other:?}"),
            })
            .collect(),
        other => panic!("{other:?}"),
    }
}

/// Once the sentinels agree on `new` (now): no `-READONLY` ever reached the writer, and a
/// write was acknowledged and kept by the new master within 2 s.
async fn check_recovery(set: &SentinelSet, new: &str, writer: Writer) {
    let agreed = Instant::now();
    // The new master holds every write replicated before the failover: wait for more.
    let before = logged(set, new).await.len();
    wait_until("writes after the failover", DEADLINE, || async {
        logged(set, new).await.len() > before + 20
    })
    .await;
    let log = writer.finish().await;
    let errors: Vec<&String> = log
        .iter()
        .filter_map(|(_, o)| match o {
            Outcome::Error(e) => Some(e),
            _ => None,
        })
        .collect();
    assert!(
        errors.iter().all(|e| !e.starts_with("READONLY")),
        "a client saw -READONLY: {errors:?}"
    );
    let kept = logged(set, new).await;
    let recovered = log.iter().find_map(|(at, o)| match o {
        Outcome::Acked(seq) if *at > agreed && kept.contains(seq) => Some(*at - agreed),
        _ => None,
    });
    let recovered = recovered.expect("no write reached the new master after the failover");
    let mut kinds: std::collections::BTreeMap<&str, usize> = Default::default();
    for e in &errors {
        *kinds.entry(e.as_str()).or_default() += 1;
    }
    eprintln!(
        "writes on the new master {recovered:?} after the sentinels agreed; errors seen: {kinds:?}"
    );
    assert!(recovered < Duration::from_secs(2), "{recovered:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_resume_on_the_new_master_after_a_commanded_failover() {
    let set = SentinelSet::start(ServerAuth::app(), Some(SENTINEL_PASSWORD)).await;
    let dir = tempfile::tempdir().unwrap();
    let config = load_config(dir.path(), &profile(&set, dir.path()));
    assert!(
        config.summary().contains("Sentinel master \"mymaster\""),
        "{}",
        config.summary()
    );
    let amb = Ambassador::with_config(config, dir).await;
    let writer = Writer::start(&amb);
    wait_until("writes flow", DEADLINE, || async { writer.acked() > 20 }).await;

    let new = set.failover().await;
    check_recovery(&set, &new, writer).await;
    assert!(
        amb.metric("ambassador_sessions_moved_total", ("how", "failover"))
            .await
            >= Some(1.0)
    );
    amb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_resume_on_the_new_master_after_the_master_dies() {
    let mut set = SentinelSet::start(ServerAuth::app(), Some(SENTINEL_PASSWORD)).await;
    let dir = tempfile::tempdir().unwrap();
    let amb =
        Ambassador::with_config(load_config(dir.path(), &profile(&set, dir.path())), dir).await;
    let writer = Writer::start(&amb);
    wait_until("writes flow", DEADLINE, || async { writer.acked() > 20 }).await;

    set.kill_master().await;
    let new = set.replica_addr().to_owned();
    set.wait_master(&new, Instant::now() + SENTINEL_DEADLINE)
        .await;
    check_recovery(&set, &new, writer).await;
    amb.stop().await;
}

#[tokio::test]
async fn a_master_demoted_behind_sentinels_back_is_never_relayed_read_only() {
    let set = SentinelSet::start(ServerAuth::app(), Some(SENTINEL_PASSWORD)).await;
    let dir = tempfile::tempdir().unwrap();
    let amb =
        Ambassador::with_config(load_config(dir.path(), &profile(&set, dir.path())), dir).await;
    let mut session = amb.connect().await;
    assert_eq!(session.cmd(&["SET", "k", "1"]).await, simple("OK"));

    // The roles swap without Sentinel's say: the master now follows the replica.
    let (master, replica) = (set.master_addr().to_owned(), set.replica_addr().to_owned());
    let mut promoted = set.server(&replica).unwrap().direct().await;
    assert_eq!(
        promoted.cmd(&["REPLICAOF", "NO", "ONE"]).await,
        simple("OK")
    );
    let (host, port) = replica.rsplit_once(':').unwrap();
    let mut demoted = set.server(&master).unwrap().direct().await;
    assert_eq!(demoted.cmd(&["REPLICAOF", host, port]).await, simple("OK"));

    // The write gets no -READONLY: the session closes, as any dropped connection does.
    session.send(&command(&["SET", "k", "2"])).await;
    assert_eq!(session.read_to_close().await, b"");
    drop(session);
    wait_until(
        "the session counted as moved by -READONLY",
        DEADLINE,
        || async {
            amb.metric("ambassador_sessions_moved_total", ("how", "readonly"))
                .await
                == Some(1.0)
        },
    )
    .await;
    // A new connection: Sentinel still names the old master, and ROLE refuses it.
    let refused = amb.connect().await.cmd(&["GET", "k"]).await;
    let text = error_text(&refused);
    assert!(
        text.starts_with("ERR ambassador: upstream unavailable (the announced master is a slave"),
        "{text}"
    );
    amb.stop().await;
}
