//! The Sentinel harness itself (tests/common/sentinel.rs), before any ambassador test trusts
//! it: three real sentinels fail a real master over to its replica, on command and when the
//! master dies, and the data and roles follow.

mod common;

use std::time::Instant;

use common::*;

/// `SET key value` on `raw`, then WAIT until the one replica has it: a failover must not
/// lose it.
async fn write_replicated(raw: &mut Raw, key: &str, value: &str) {
    assert_eq!(raw.cmd(&["SET", key, value]).await, simple("OK"));
    assert_eq!(
        raw.cmd(&["WAIT", "1", "5000"]).await,
        int(1),
        "replica acked"
    );
}

#[tokio::test]
async fn a_commanded_failover_promotes_the_replica_demotes_the_old_master_and_can_go_back() {
    let started = Instant::now();
    let set = SentinelSet::start(ServerAuth::app(), Some("sentinel-pass-3c1")).await;
    let settled = started.elapsed();
    let (old, replica) = (set.master_addr().to_owned(), set.replica_addr().to_owned());
    assert_eq!(set.current_master().await, old);
    assert_eq!(set.sentinel_addresses().len(), 3);
    let mut before = set.server(&old).unwrap().direct().await;
    write_replicated(&mut before, "before", "failover").await;

    let asked = Instant::now();
    let new = set.failover().await;
    let failed_over = asked.elapsed();
    assert_eq!(new, replica);
    assert_eq!(set.current_master().await, replica);
    let mut promoted = set.server(&new).unwrap().direct().await;
    assert_eq!(promoted.cmd(&["GET", "before"]).await, bulk(b"failover"));

    // Sentinel demotes the old master some seconds later; then it follows the new one.
    set.wait_replica_of(&old, &new, Instant::now() + SENTINEL_DEADLINE)
        .await;
    let demoted_after = asked.elapsed();
    write_replicated(&mut promoted, "after", "failover").await;
    let mut demoted = set.server(&old).unwrap().direct().await;
    assert_eq!(demoted.cmd(&["GET", "after"]).await, bulk(b"failover"));
    let refused = demoted.cmd(&["SET", "after", "old-master"]).await;
    assert!(
        error_text(&refused).starts_with("READONLY"),
        "the demoted master refuses writes: {refused:?}"
    );
    eprintln!("settled in {settled:?}, failed over in {failed_over:?}, old master demoted after {demoted_after:?}");

    // Once demoted and in sync, it can be failed back to.
    let back_at = Instant::now();
    assert_eq!(set.failover().await, old);
    eprintln!("failed back in {:?}", back_at.elapsed());
}

#[tokio::test]
async fn a_killed_master_is_replaced_by_its_replica() {
    let started = Instant::now();
    let auth = ServerAuth::RequirePass("data-pass-91e".into());
    let mut set = SentinelSet::start(auth, None).await;
    let settled = started.elapsed();
    let replica = set.replica_addr().to_owned();
    let mut before = set.server(set.master_addr()).unwrap().direct().await;
    write_replicated(&mut before, "before", "kill").await;

    let killed_at = Instant::now();
    assert_eq!(set.kill_master().await, set.master_addr());
    assert!(set.server(set.master_addr()).is_none());
    set.wait_master(&replica, killed_at + SENTINEL_DEADLINE)
        .await;
    let failed_over = killed_at.elapsed();
    let mut promoted = set.server(&replica).unwrap().direct().await;
    assert_eq!(promoted.cmd(&["GET", "before"]).await, bulk(b"kill"));
    assert_eq!(promoted.cmd(&["SET", "after", "kill"]).await, simple("OK"));
    eprintln!("settled in {settled:?}, failed over {failed_over:?} after the kill");
}
