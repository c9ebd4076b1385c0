//! Streaming: a value of any size is relayed with memory that does not grow with the value.
//! The real binary's peak RSS (VmHWM) is read from /proc before and after a 256 MiB SET and GET.

mod common;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const VALUE: usize = 256 * 1024 * 1024;
/// The README says about 128 KiB (release); a debug build measured 620 KiB.
const ALLOWED_GROWTH_KIB: u64 = 1024;

fn peak_rss_kib(pid: u32) -> u64 {
    proc_kib(pid, "VmHWM")
}

#[tokio::test]
async fn a_256_mib_value_passes_with_bounded_memory() {
    let server =
        RedisServer::start_with(ServerAuth::app(), &["--client-query-buffer-limit", "1gb"]);
    let dir = tempfile::tempdir().unwrap();
    let bin = binary_for(&server, dir.path(), &[]);
    let mut c = Raw::connect(&bin.addr).await;
    assert_eq!(c.cmd(&["PING"]).await, simple("PONG"));
    let before = peak_rss_kib(bin.pid());

    // A recognisable pattern, so a reordering or a lost chunk cannot go unnoticed.
    let value: Vec<u8> = (0..VALUE).map(|i| (i % 251) as u8).collect();
    let header = format!("*3\r\n$3\r\nSET\r\n$3\r\nbig\r\n${VALUE}\r\n");
    let writer = async {
        c.stream.write_all(header.as_bytes()).await.unwrap();
        c.stream.write_all(&value).await.unwrap();
        c.stream.write_all(b"\r\n").await.unwrap();
    };
    tokio::time::timeout(DEADLINE * 6, writer)
        .await
        .expect("SET sent in time");
    assert_eq!(c.reply().await, simple("OK"));

    c.send(&command(&["GET", "big"])).await;
    let head = format!("${VALUE}\r\n");
    assert_eq!(c.read_bytes(head.len()).await, head.as_bytes());
    let mut got = vec![0u8; VALUE + 2];
    let mut have = c.buf.len().min(got.len());
    got[..have].copy_from_slice(&c.buf[..have]);
    c.buf.drain(..have);
    let reader = async {
        while have < got.len() {
            let n = c.stream.read(&mut got[have..]).await.unwrap();
            assert!(n > 0, "closed mid-value at {have}");
            have += n;
        }
    };
    tokio::time::timeout(DEADLINE * 6, reader)
        .await
        .expect("GET read in time");
    assert!(got[..VALUE] == value[..], "the value came back intact");
    assert_eq!(&got[VALUE..], b"\r\n");

    let after = peak_rss_kib(bin.pid());
    let growth = after.saturating_sub(before);
    println!("ambassador peak RSS: {before} KiB before, {after} KiB after a 256 MiB SET+GET (+{growth} KiB)");
    assert!(growth < ALLOWED_GROWTH_KIB, "peak RSS grew by {growth} KiB");
}
